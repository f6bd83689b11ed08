#!/usr/bin/env bash
# Live migration of the legacy guest VM (issue 13 benchmark), in the same run on the same host:
#   (a) caas: `caas tenant migrate --vm V --to H` between the two hosts of `caas dev --hosts 2`
#       — the TTP attests the target, the session key goes through the target's TPM, qemu's
#       migration stream travels in AES-256-GCM records over the agents' mutual-TLS link, the
#       target's crypto domain is started from its sealed configuration, the source's is
#       destroyed; the VM boots from the crypto domain's NBD export on both sides;
#   (b) plain qemu: the same image as a plain raw file, the same qemu arguments, migrated
#       from one qemu to another over a UNIX socket (QMP `migrate unix:`).
# The VM is migrated back and forth REPEAT times in each setting (interleaved). Printed:
#   total  — (a) the source agent's receipt of the request to the target's acknowledgement
#            after it continued the guest (TTP, key agreement, crypto domain, stream,
#            handover), as the agent measures it — compared with (b) QMP `migrate` (the
#            controlling process's request) to `completed` on the source, which does not
#            even include the target's `cont`; (a) end to end is also printed: the tenant
#            CLI's process start → scheduler → agent → answer (it adds the CLI's start, its
#            TLS connections and the scheduler's hop, which (b) has no counterpart of);
#   downtime — (b) qemu's own figure (vCPUs stopped → stream done, the target autostarts);
#            (a) qemu's figure plus what caas adds while the guest is stopped: the handover
#            (commit record → the target checked the end record → `cont`); the source's
#            crypto domain is destroyed after the target continued the guest.
# and the medians and ratios a/b (goal ≤ 1.1×).
#
# Usage: bench/vm-migrate.sh          (REPEAT=3; TCG unless CAAS_QEMU_ACCEL; VERBOSE=1 prints
#        the source agent's phases of each caas migration, with the stream's: MiB qemu wrote into
#        the local buffer before the key, the sender's waits for qemu and for the target's acks,
#        requests)
#
# Figures (2026-12-05, 2 cores shared with other builds at load ~9, TCG, guest image 28 MiB,
# 256 MiB RAM, ~135 MB of qemu stream, dev profile; `REPEAT=7 bench/vm-migrate.sh`):
#   (b) plain qemu   total 989 901 968 1094 1145 954 957 ms (median 968)
#                    downtime 62 47 53 48 49 48 47 ms (median 48)
#   (a) caas         total 1335 1325 1415 1590 1353 1419 1577 ms (median 1415)
#                    downtime 56 63 58 113 47 68 164 ms (median 63)
#   ratio a/b: total 1.46, downtime 1.31 (goal 1.1 not met). Where (a) spends its extra
#   ~450 ms, from the agent's timings: the TTP's statement (AK quote over the request,
#   appraisal) ~150–400 ms, the key agreement with two TPM RSA decryptions on the target
#   ~100 ms, the target's crypto domain (configuration opened by its TPM, proxy and VSM
#   started, qemu -incoming started) before the stream ~300 ms — all before the guest
#   stops; the stream itself (AES-GCM records over HTTPS batches of 1 MiB) runs at about
#   the speed of qemu's UNIX-socket stream under TCG. The extra downtime (~15 ms median) is
#   the commit round trip and the target's check of the end record before `cont`.
#   Not yet tried: starting the target's crypto domain and qemu in parallel with the TTP
#   request (it would need the statement first: it names the target), and streaming in one
#   long request instead of 1 MiB POSTs.
#
# After the VSM token travels (export after the guest stopped, counted in the downtime) and
# the target starts its crypto-domain processes while its TPM opens the configuration
# (2026-12-05, same machine, load ~9–18 from other builds, `REPEAT=4 bench/vm-migrate.sh`):
#   (b) plain qemu   total 908 948 974 955 ms     downtime 54 47 64 47 ms
#   (a) caas         total 1241 1263 1305 1318 ms downtime 58 73 46 101 ms
#   medians: total 1.33×, downtime 1.23×; minima: total 1241/908 = 1.37×, downtime 46/47 = 0.98×.
#   The goal (≤ 1.1× total) is still not met: the TTP statement and the key agreement
#   (three TPM operations) happen before the first byte of qemu's stream.
#
# After the target prepares the VM in the background (its TPM opens DK' after the accept;
# the crypto domain and `qemu -incoming` start while the stream already arrives, queued up
# to 64 MiB) and opens the volumes while qemu loads; downtime now measured end to end by the source (qemu's stop → the target's ack
# after `cont`) (2026-12-06 00:32, same machine, load 12–14 from other builds and tests,
# `REPEAT=3 VERBOSE=1 bench/vm-migrate.sh`):
#   (b) plain qemu   total 980 954 1062 ms    downtime 56 48 183 ms
#   (a) caas         total 1250 1174 1270 ms  downtime 40 109 50 ms
#   medians: total 1.28×, downtime 0.89×; minima: total 1174/954 = 1.23×, downtime 40/48 = 0.83×.
#   Downtime meets the goal; total does not yet. The agent's phases (VERBOSE) show where
#   the ~250 ms go: TTP statement 30–50 ms and session key 15–50 ms before the stream; the
#   stream itself 1000–1100 ms (plain: ~950), with the target ready for it 300–365 ms after
#   the offer (hidden by the queue); the tenant CLI → scheduler → agent path ~100 ms, which
#   the plain figure (QMP migrate → completed) does not contain. Left to try: starting the
#   source's qemu into a bounded local buffer while the TTP answers (nothing leaves the
#   source before the statement), and one streaming request instead of 1 MiB POSTs.
#
# After the source's qemu starts at once into a bounded local buffer (16 MiB in the agent's
# memory, sealed and sent only after the TTP's statement and the key confirmation; dropped
# unsent and qemu's migration cancelled on a refusal), the stream goes in batches of what is
# queued (≤ 8 MiB) with one request in flight while the next is sealed, and (a)'s total is
# the agent's (request received → target continued the guest), end to end printed too
# (2026-12-06 03:41, same machine, load 7–11 from other builds and tests,
# `REPEAT=3 VERBOSE=1 bench/vm-migrate.sh`):
#   (b) plain qemu   total 972 940 1076 ms     downtime 67 77 74 ms
#   (a) caas         total 980 1026 1062 ms    downtime 57 91 112 ms
#       end to end   1028 1062 1149 ms
#   medians: total 1.06× (end to end 1.09×), downtime 1.23×; minima: total 980/940 = 1.04×,
#   downtime 57/67 = 0.85×. The total goal (≤ 1.1×) is met. A run 50 min earlier (load ~8):
#   plain 1033 1062 1151, caas 972 1007 1056 (end to end 1030 1024 1074), downtime plain
#   125 145 45, caas 58 67 119: total 0.95× (end to end 0.97×), downtime 0.54×. Phases
#   (VERBOSE): 13 MiB of qemu's stream wait here while the TTP (25–60 ms) and the key
#   agreement (15–35 ms) run; the stream after the key 880–990 ms, the sender waiting
#   160–580 ms for qemu and 260–520 ms for the target's acks, 25–170 requests. caas's
#   downtime includes the commit round trip and the target's `cont` (handover 13–55 ms),
#   which qemu's own figure for (b) does not; it varies with the load more than (b)'s.
#
# Same code on a QUIET machine (2026-12-06 04:22, load 0.35 at the start, lead,
# `REPEAT=3 VERBOSE=1 bench/vm-migrate.sh`):
#   (b) plain qemu   total 989 1008 1054 ms    downtime 109 99 107 ms
#   (a) caas         total 958 950 944 ms      downtime 46 44 42 ms
#       end to end   979 972 956 ms
#   medians: total 0.94× (end to end 0.96×), downtime 0.41×. Goal (≤ 1.1×) met. Phases: TTP
#   24–26 ms, session key 14–17 ms, 13 MiB buffered before the key, stream after the key
#   889–906 ms (the sender waiting 530–680 ms for qemu), handover 10–15 ms.

set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
cargo build -q -p caas --bins
cargo build -q -p caas-pkcs11
bin=target/debug
img=$(scripts/build-guest-image --agent $bin/caas-guest --pkcs11 $bin/libcaas_pkcs11.so)
work=$(mktemp -d /tmp/caas-vm-migrate.XXXXXX)
chmod 711 "$work"
dev_pid=""
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# (b) plain qemu: source booted to ready, target waiting on -incoming unix:, QMP migrate.
plain_migrate() { # N → prints "TOTAL_MS DOWNTIME_MS"
  local accel=tcg cpu=max
  [ "${CAAS_QEMU_ACCEL:-tcg}" = kvm ] && { accel=kvm; cpu=qemu64; }
  python3 - "$img" "$work" "$1" "$accel" "$cpu" <<'EOF2'
import base64, json, os, socket, subprocess, sys, time
img, work, n, accel, cpu = sys.argv[1:]
inject = os.path.join(work, "inject.json")
fd = os.open(inject, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, json.dumps({"tau": base64.b64encode(os.urandom(32)).decode(),
                         "pk_dm": base64.b64encode(os.urandom(32)).decode()}).encode())
os.close(fd)
def qemu(tag, extra):
    log = os.path.join(work, f"plain-{n}-{tag}.serial.log")
    qmp = os.path.join(work, f"plain-{n}-{tag}.qmp")
    p = subprocess.Popen(["qemu-system-x86_64", "-name", "guest=plain", "-accel", accel,
        "-cpu", cpu, "-m", "256", "-nographic", "-monitor", "none",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-no-reboot", "-serial", "file:" + log,
        "-device", "virtio-rng-pci", "-drive", f"file={img},format=raw,if=virtio,readonly=on",
        "-fw_cfg", f"name=opt/caas/inject,file={inject}",
        "-fw_cfg", "name=opt/caas/vm-id,string=plain",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:7000",
        "-device", "virtio-net-pci,netdev=net0,romfile="] + extra,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, log, qmp
def connect(path):
    for _ in range(500):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rw")
    f.readline()
    def cmd(c, a=None):
        f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n"); f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r
    cmd("qmp_capabilities")
    return cmd
src, log, sq = qemu("src", [])
sock = os.path.join(work, f"plain-{n}.mig")
dst, _, dq = qemu("dst", ["-incoming", f"unix:{sock}"])
try:
    while b"caas-workload ready" not in open(log, "rb").read() if os.path.exists(log) else True:
        time.sleep(0.02)
    s = connect(sq); connect(dq)
    start = time.monotonic()
    s("migrate", {"uri": f"unix:{sock}"})
    while True:
        r = s("query-migrate")["return"]
        if r.get("status") == "completed":
            break
        if r.get("status") in ("failed", "cancelled"):
            sys.exit(f"plain migration {r}")
        time.sleep(0.005)
    total = int((time.monotonic() - start) * 1000)
    print(total, r.get("downtime", 0))
finally:
    for p in (src, dst):
        p.kill(); p.wait()
EOF2
}

# (a) caas.
CAAS_LOG=warn $bin/caas dev --data-dir "$work/dev" --listen 127.0.0.1:0 --hosts 2 \
  --attest-secs 3600 >"$work/dev.log" 2>&1 &
dev_pid=$!
until [ -f "$work/dev/env" ] && grep -q CAAS_HOST_HOST_2_URL "$work/dev/env"; do
  kill -0 $dev_pid 2>/dev/null || { cat "$work/dev.log"; exit 1; }
  sleep 0.1
done
sleep 1
set -a; . "$work/dev/env"; set +a
t() { $bin/caas tenant --dir "$work/tenant" "$@"; }
cp "$img" "$work/guest.raw"
t init >/dev/null
t acl --domains bench >/dev/null
t provision --image "$work/guest.raw" --id bench --hosts host-1,host-2 >/dev/null 2>&1
t launch --id bench --vm vm1 --driver qemu --host host-1 --domains bench >/dev/null 2>&1
t connect --vm vm1 >/dev/null
enc_migrate() { # N → prints "TOTAL_MS AGENT_TOTAL_MS DOWNTIME_MS" (odd N: to host-2, even: back to host-1)
  local to out s e
  to=host-2; [ $(($1 % 2)) = 0 ] && to=host-1
  s=$(date +%s%N)
  out=$(t migrate --vm vm1 --to "$to" 2>/dev/null)
  e=$(date +%s%N)
  d=$(printf '%s' "$out" | python3 -c '
import json, sys
text = sys.stdin.read()
doc = json.loads(text[text.index("{"):])
t = {name: ms for name, ms in doc["timings"]}
down = t.get("downtime: guest stopped here → continued on the target")
if down is None:
    down = (t["qemu downtime (source: stop to end of stream)"]
            + t.get("source crypto domain destroyed (guest stopped)", 0)
            + t.get("VSM token exported (workload stopped)", 0)
            + t.get("source volumes flushed and released", 0)
            + t["handover: commit → target resumed the workload"])
print(int(t["source agent: request received → target resumed the workload"]), int(down))')
  echo "$(( (e - s) / 1000000 )) $d"
  # VERBOSE=1: the source agent's phases of each migration, on stderr.
  [ -z "${VERBOSE:-}" ] || printf '%s' "$out" | python3 -c '
import json, sys
text = sys.stdin.read()
doc = json.loads(text[text.index("{"):])
print("   ", "; ".join(f"{n.strip()} {ms:.1f}" if ms < 10 else f"{n.strip()} {ms:.0f}" for n, ms in doc["timings"]), file=sys.stderr)'
  # The guest answers the tenant on the target (τ, disk, VSM) before the next round.
  t connect --vm vm1 >/dev/null
}

pt=(); pd=(); et=(); ea=(); ed=()
for i in $(seq "$REPEAT"); do
  r=$(plain_migrate "$i"); read -r a b <<<"$r"; pt+=("$a"); pd+=("$b")
  r=$(enc_migrate "$i"); read -r a b c <<<"$r"; et+=("$a"); ea+=("$b"); ed+=("$c")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
minimum() { printf '%s\n' "$@" | sort -n | head -1; }
mpt=$(median "${pt[@]}"); mpd=$(median "${pd[@]}"); met=$(median "${et[@]}"); mea=$(median "${ea[@]}")
med=$(median "${ed[@]}")
echo "VM live migration, $(basename "$img"), 256 MiB RAM, accel ${CAAS_QEMU_ACCEL:-tcg}, $REPEAT each"
echo "  (b) plain qemu, unix socket:   total ${pt[*]} ms (median $mpt)   downtime ${pd[*]} ms (median $mpd)"
echo "  (a) caas, attested + encrypted: total ${ea[*]} ms (median $mea)   downtime ${ed[*]} ms (median $med)"
echo "      end to end (tenant CLI → scheduler → agent → acknowledged): ${et[*]} ms (median $met)"
python3 -c "print(f'  ratio a/b: total {$mea / $mpt:.2f}   downtime {$med / max($mpd, 1):.2f}   (end to end {$met / $mpt:.2f})')"
# On a shared machine the minimum is the least disturbed run of each.
nt=$(minimum "${pt[@]}"); nd=$(minimum "${pd[@]}"); xt=$(minimum "${ea[@]}"); xd=$(minimum "${ed[@]}")
python3 -c "print(f'  minima: (b) total $nt downtime $nd, (a) total $xt downtime $xd; ratio a/b: total {$xt / $nt:.2f}   downtime {$xd / max($nd, 1):.2f}')"
