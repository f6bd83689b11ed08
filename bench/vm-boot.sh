#!/usr/bin/env bash
# VM boot-to-ready (issue 13 benchmark): the legacy guest image of scripts/build-guest-image
# booted, in the same run on the same host,
#   (a) encrypted, through trusted launch on a `caas dev` host: the qemu driver boots the
#       whole disk from the crypto domain's NBD export (AES-256-GCM per 4 KiB block), with
#       τ/pk_DM over fw_cfg and the VSM over virtio-serial — the launch's "start workload"
#       step (qemu spawned → the guest's ready line), and
#   (b) plaintext, the same image as a plain raw file (`-drive file=IMG`), the same qemu
#       arguments otherwise (fw_cfg τ/pk_DM, no VSM) — qemu spawned → the same ready line,
# and prints the medians and the ratio a/b. "Ready" = the guest agent has read fw_cfg,
# hashed its whole boot disk (so every block of the image went through the crypto domain in
# (a)), bound its PSK listener and, in (a), logged in to its VSM over virtio-serial.
#
# Usage: bench/vm-boot.sh             (REPEAT=3 boots of each; TCG unless CAAS_QEMU_ACCEL)
# Needs what scripts/install-deps installs (qemu-system-x86, syslinux, mtools, ...), and
# builds `caas` and `caas-guest` (dev profile, as the tests use them).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
cargo build -q -p caas --bins
bin=target/debug
img=$(scripts/build-guest-image --agent $bin/caas-guest --pkcs11 $bin/libcaas_pkcs11.so)
work=$(mktemp -d /tmp/caas-vm-bench.XXXXXX)
chmod 711 "$work"
dev_pid=""
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# (b) plaintext image on a plain disk.
plain_ms=()
for i in $(seq "$REPEAT"); do
  python3 - "$work/inject.json" <<'EOF'
import base64, json, os, sys
json.dump({"tau": base64.b64encode(os.urandom(32)).decode(),
           "pk_dm": base64.b64encode(os.urandom(32)).decode()}, open(sys.argv[1], "w"))
EOF
  chmod 600 "$work/inject.json"
  log="$work/plain-$i.serial.log"
  accel=tcg; cpu=max
  [ "${CAAS_QEMU_ACCEL:-tcg}" = kvm ] && { accel=kvm; cpu=qemu64; }
  start=$(date +%s%N)
  qemu-system-x86_64 -name guest=plain -accel $accel -cpu $cpu -m 256 -nographic -monitor none \
    -no-reboot -serial "file:$log" -device virtio-rng-pci \
    -drive "file=$img,format=raw,if=virtio,snapshot=on" \
    -fw_cfg "name=opt/caas/inject,file=$work/inject.json" -fw_cfg name=opt/caas/vm-id,string=plain \
    -netdev user,id=net0,hostfwd=tcp:127.0.0.1:0-:7000 -device virtio-net-pci,netdev=net0,romfile= \
    </dev/null >/dev/null 2>&1 &
  qpid=$!
  until grep -q "caas-workload ready" "$log" 2>/dev/null; do
    kill -0 $qpid 2>/dev/null || { echo "plain VM exited:"; cat "$log"; exit 1; }
    sleep 0.02
  done
  end=$(date +%s%N)
  kill $qpid; wait $qpid 2>/dev/null || true
  plain_ms+=($(( (end - start) / 1000000 )))
done

# (a) encrypted image through trusted launch and the crypto domain.
$bin/caas dev --data-dir "$work/dev" --listen 127.0.0.1:0 --hosts 1 --attest-secs 3600 \
  >"$work/dev.log" 2>&1 &
dev_pid=$!
until [ -f "$work/dev/env" ] && grep -q CAAS_KMS_ENDPOINT "$work/dev/env"; do
  kill -0 $dev_pid 2>/dev/null || { cat "$work/dev.log"; exit 1; }
  sleep 0.1
done
sleep 1
set -a; . "$work/dev/env"; set +a
t() { $bin/caas tenant --dir "$work/tenant" "$@"; }
cp "$img" "$work/guest.raw"
t init >/dev/null
t acl --domains bench >/dev/null
t provision --image "$work/guest.raw" --id bench --hosts host-1 >/dev/null
enc_ms=()
for i in $(seq "$REPEAT"); do
  out=$(t launch --id bench --vm "vm$i" --driver qemu --domains bench)
  ms=$(printf '%s' "$out" | python3 -c '
import json, sys
text = sys.stdin.read()
doc = json.loads(text[text.index("{"):])
for name, ms in doc["timings"]:
    if name == "start workload":
        print(int(ms))
')
  enc_ms+=("$ms")
  t connect --vm "vm$i" >/dev/null
  curl -fsS -X POST "${CAAS_HOST_HOST_1_URL}/v1/agent/workloads/vm$i/stop" >/dev/null 2>&1 || true
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
p=$(median "${plain_ms[@]}")
e=$(median "${enc_ms[@]}")
echo "VM boot-to-ready, $(basename "$img"), accel ${CAAS_QEMU_ACCEL:-tcg}, $REPEAT boots each"
echo "  (b) plaintext image, plain disk:           ${plain_ms[*]} ms (median $p)"
echo "  (a) encrypted image via crypto domain, TL: ${enc_ms[*]} ms (median $e)"
python3 -c "print(f'  ratio a/b: {$e / $p:.2f}')"
