#!/usr/bin/env bash
# CPU per signature on both sides of the VSM (the client process, by p11bench's getrusage,
# and the crypto domain, by /proc/PID/stat), with the module's shared-memory ring off and on
# in interleaved runs of the same binaries (caas-vsm-proto/src/ring.rs; CAAS_PKCS11_RING=0
# keeps the pipes on the socket). The load-independent companion of vsm-bench.sh on a
# shared machine: sig/s moves with the load, CPU per signature much less.
#
# Usage: crates/caas-domc/bench/vsm-cpu.sh [SECONDS] [REPS]   (after vsm-bench.sh built the
# release binaries; CARGO_TARGET_DIR as for it; MECH=ecdsa-p256|ed25519|mldsa65,
# THREADS="1 8", RINGS="0 1"; run under `chrt -f 10` on a loaded machine)
set -euo pipefail
cd "$(dirname "$0")/../../.."
T=${CARGO_TARGET_DIR:-target}/release
SECS=${1:-4}
REPS=${2:-3}
W=$(mktemp -d)
DOMC_PID=
cleanup() { [ -n "$DOMC_PID" ] && kill "$DOMC_PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
"$T/caas-domc" domc serve --state-dir "$W/domc" --socket "$W/domc.sock" --create-key --run-as 0:0 2>/dev/null &
DOMC_PID=$!
for _ in $(seq 100); do [ -S "$W/domc.sock" ] && break; sleep 0.05; done
export CAAS_PKCS11_SOCKET="$W/domc.sock"
CAAS="$(realpath "$T/libcaas_pkcs11.so")"
pkcs11-tool --module "$CAAS" --init-token --label bench --so-pin 12345678 >/dev/null 2>&1
pkcs11-tool --module "$CAAS" --init-pin --login --so-pin 12345678 --pin 1234 >/dev/null 2>&1
TK=$(getconf CLK_TCK)
dcpu() { awk -v tk="$TK" '{printf "%.2f", ($14 + $15) / tk}' "/proc/$DOMC_PID/stat"; }
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$REPS"); do
  for ring in ${RINGS:-0 1}; do
    for t in ${THREADS:-1 8}; do
      d0=$(dcpu)
      out=$(CAAS_PKCS11_RING=$ring "$T/examples/p11bench" "$CAAS" bench 1234 "${MECH:-ecdsa-p256}" "$t" "$SECS")
      d1=$(dcpu)
      echo "$out" | awk -v d0="$d0" -v d1="$d1" -v s="$SECS" -v r="$ring" -v t="$t" '{n = $3 * s;
        printf "ring=%s %dt %8d sig/s  client %5.1f us/sig  domain %5.1f us/sig  total %5.1f\n",
          r, t, $3, $4 * 1e6 / n, (d1 - d0) * 1e6 / n, ($4 + d1 - d0) * 1e6 / n}'
    done
  done
done
