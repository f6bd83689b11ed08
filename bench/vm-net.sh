#!/usr/bin/env bash
# Network Secure Device Proxy benchmark (issue 16): throughput and latency between two VMs
# through the overlay vs the SAME VMs connected directly by qemu's own socket networking.
# Two guests (the image of scripts/build-guest-image, qemu, 1 vCPU, 256 MiB each) on this
# host, each with two NICs in ONE boot:
#   direct:  10.9.0.0/24, the two qemus joined by `-netdev dgram` over UDP on loopback;
#   overlay: 10.9.1.0/24, each NIC backed by its `caas net serve` (a UNIX datagram socket to
#            qemu), the two proxies sealing every Ethernet frame with AES-256-GCM over UDP.
# The sender's script (crates/caas/tests/vm_net.rs, `bench_overlay_vs_direct`) interleaves
# the modes: ROUNDS rounds, each BURSTS pairs of busybox `ping -c 20 -i 0.2` bursts (one
# to each of the receiver's addresses) and then one TCP transfer of BYTES (busybox nc) to
# each; the modes' order alternates between rounds (direct first in odd rounds). Every
# reply's time is a sample: latency is the median of a mode's samples (p10/p90 shown),
# throughput the median of its transfers, each timed on the host from the sender's "go" to
# the receiver's "done" console line (digest checked). BOOTS boots pool their samples.
# Prints each round, both modes and the ratios (goal: throughput >= 0.8x, latency <= 1.2x).
#
# Why one boot: a TCG guest's own round trip varies 1.7-3.6 ms from one boot to the next
# (below: the old method booted a fresh pair of VMs per mode per round and took the best of
# rounds, so its ratio swung with one lucky boot of either mode).
#
# The proxies measured are a RELEASE build of `caas` (the product's build): the script runs
# `cargo build --release -p caas --bin caas` first (a first build takes long; then cached in
# the target dir) unless CAAS_NET_BENCH_BIN=/path/to/caas names one; RELEASE=0 measures the
# test's dev-profile `caas` instead. The "vm-net" line names the binary used. Build it
# before timing a run: after any change to the caas crates the release build takes ~4 min
# on 2 busy cores (~11 min from scratch); the two boots then take ~3 min.
#
# Usage: bench/vm-net.sh     BYTES=16777216 ROUNDS=3 BURSTS=3 BOOTS=2 RELEASE=1 AGENT=0 MICRO=0
#                            CAAS_NET_BENCH_BIN= CAAS_NET_BENCH_SPIN=   (TCG here)
# CAAS_NET_BENCH_SPIN=US runs the proxies with their spin on (CAAS_NET_SPIN_US, off by
# default) for the whole run.
#
# MICRO=1 also times the proxies alone, without qemu (`bench_proxy_round_trip`): round
# trips of a ping-sized frame between two stand-in VMs through two proxies on loopback, 1 ms
# apart, against one UDP hop each way, idle and with one busy thread per CPU, and the
# proxies' CPU per frame (CAAS_NET_MICRO_N=2000 round trips; CAAS_NET_MICRO_ENV="K=V;K=V"
# one run per set of proxy environment settings).
#
# AGENT=1 also measures the overlay through the agent path (crates/caas/tests/vm_net_agent.rs,
# `bench_overlay_through_agents`): `caas dev --hosts 2`, each round two VMs launched by trusted
# launch with `caas tenant launch --driver qemu --net-domain lan` (the agents start and key the
# proxies from the TTP, the scheduler tells them of each other); the image's own traffic role
# (`scripts/build-guest-image --net-demo --net-demo-bytes BYTES`) pings 3 times and sends BYTES,
# timed on the host from the sender's "caas-net-go" to the receiver's "caas-net-recv" line
# (the old per-boot method; the dev-profile binary, which the agents start).
#
# Figures on a QUIET machine with this method (2026-12-06, lead, HEAD of the merge of
# h/netbench, h/kmsfast, h/vsmfast; TCG; release proxies; load 1-3;
# `BYTES=8388608 ROUNDS=3 CAAS_NET_BENCH_BIN=/work/target-rel/release/caas bench/vm-net.sh`,
# 2 boots x 3 rounds, 360 pings per mode, ~3 min each):
#   10:22: latency rounds 1.24/1.01/1.35x (boot 1), 1.15/1.17/1.30x (boot 2);
#     direct 3.03 MB/s, rtt 1.433 ms (p10 1.170, p90 2.035);
#     overlay 3.02 MB/s, rtt 1.715 ms (p10 1.396, p90 2.328);
#     ratios: throughput 1.00x, latency 1.20x (1.197; +0.28 ms)
#   10:25: latency rounds 1.18/1.23/1.16x (boot 1), 1.25/1.16/1.25x (boot 2);
#     direct 3.08 MB/s, rtt 1.551 ms (p10 1.222, p90 2.155);
#     overlay 2.95 MB/s, rtt 1.854 ms (p10 1.447, p90 2.529);
#     ratios: throughput 0.96x, latency 1.19x (+0.30 ms)
#   Both goals met in both runs, the latency one narrowly: the overlay's four extra hops
#   cost ~0.3 ms per round trip here (each a wake-up of a sleeping proxy thread; the
#   proxies' own CPU is ~20 us per frame). Single rounds range 1.01-1.35x.
#
# Figures with this method (2026-12-06, helper netbench, TCG, 2 cores shared with other
# helpers' builds: BUSY-machine figures, load average in brackets; BYTES=8388608 ROUNDS=3
# BURSTS=3, 180 pings per mode; "+" is the overlay's extra median round trip):
#   09:32 [4-6], `BYTES=8388608 ROUNDS=3 bench/vm-net.sh` (BOOTS=2, release): latency rounds
#     1.05/0.84/1.12x (boot 1), 1.24/1.21/0.96x (boot 2); direct 2.43 MB/s, rtt 1.717 ms
#     (p10 1.321, p90 3.686); overlay 2.42 MB/s, 1.890 ms (p10 1.507, p90 3.549);
#     ratios: throughput 0.99x, latency 1.10x (+0.17 ms). (10m35s in all: the release
#     caas was rebuilt first after a change to caas-sdp; the VMs themselves take ~3 min.)
#   09:27 [5], `BYTES=8388608 ROUNDS=3 MICRO=1 bench/vm-net.sh` (BOOTS=2, release; 3m40s in
#     all): rounds 1.25/1.03/1.05x (boot 1), 1.15/1.13/1.09x (boot 2) latency;
#     direct 2.13 MB/s, rtt 1.756 ms (p10 1.416, p90 3.338, 360 pings);
#     overlay 2.40 MB/s, 1.997 ms (p10 1.544, p90 4.519);
#     ratios: throughput 1.13x, latency 1.14x (+0.24 ms);
#     proxies alone: +111 µs per round trip idle, +54 µs with two busy threads, 26.5 and
#     16.4 µs of CPU per frame
#   09:11 [5-6] release proxies (BOOTS=1): direct 2.50 MB/s, rtt 1.714 ms (p10 1.316, p90 3.125);
#     overlay 2.62 MB/s, 1.857 ms (p10 1.519, p90 3.839); rounds 1.08/1.09/1.13x;
#     ratios: throughput 1.05x, latency 1.08x (+0.14 ms)
#   09:13 [6] release, CAAS_NET_SCHED=slice:100 (an experiment, removed): 0.94x, 1.10x
#     (1.680 vs 1.848 ms, +0.17 ms)
#   09:15 [4-6] dev-profile proxies (RELEASE=0): 2.84 vs 2.27 MB/s, 1.671 vs 1.961 ms;
#     rounds 1.28/1.16/1.10x; ratios 0.80x, 1.17x (+0.29 ms)
#   09:04 [9-11] dev-profile: 1.81 vs 1.33 MB/s, 2.606 vs 3.323 ms: 0.73x, 1.28x (+0.72 ms)
#   09:07 [8-10] dev-profile, SCHED_FIFO frame thread (removed): 0.95x, 1.39x
#   Paired in one boot the direct mode's own RTT varied only 1.48-1.84 ms between rounds at
#   load 5-6 (against 1.7-3.6 ms between boots before). At load 5-6 the release proxies meet
#   both goals; the overlay's extra latency grows with the host's load (each of its four
#   extra hops is a wake-up that waits for a CPU). The proxies alone, without qemu
#   (MICRO=1, same machine): 55-120 µs per round trip, 16-37 µs of CPU per frame, the same
#   in release and dev builds (the kernel's sleep/wake-up cost, not the sealing; less when
#   busy threads keep the CPUs from idling: waking an idle vCPU of this VM is what costs
#   most, so a quiet host may see a little more per hop than a busy one); SCHED_FIFO
#   +155-163 µs and twice the CPU per frame, so it was dropped (crates/caas-sdp/src/net/serve.rs).
#
# ---- Figures with the OLD method (a fresh pair of VMs per mode per round, best of rounds of
# ---- 20-ping averages; dev-profile proxies), kept for the history:
#
# Figures on a QUIET machine with the one-frame-thread proxy (2026-12-06, lead, load 0.3-3,
# TCG, dev profile, HEAD 3023be7):
#   07:19, `BYTES=8388608 ROUNDS=3 CAAS_NET_BENCH_SPIN=2000 bench/vm-net.sh`:
#     round 1: direct 4.12 MB/s 2.37 ms, overlay 2.59 MB/s 2.66 ms, overlay-spin 3.43 MB/s 3.68 ms
#     round 2: direct 2.90 MB/s 1.68 ms, overlay 2.85 MB/s 3.05 ms, overlay-spin 3.24 MB/s 3.28 ms
#     round 3: direct 2.86 MB/s 3.56 ms, overlay 2.26 MB/s 3.29 ms, overlay-spin 2.34 MB/s 3.54 ms
#     best of: 0.69x throughput, 1.58x latency (medians: 0.91x, 1.29x)
#   07:56, `BYTES=8388608 ROUNDS=3 bench/vm-net.sh`:
#     rounds: direct 2.71/3.54/3.00 MB/s 1.80/3.10/3.44 ms; overlay 2.43/3.13/3.24 MB/s
#     3.84/3.83/3.08 ms; best of: 0.92x throughput, 1.71x latency (medians: 1.04x, 1.24x)
#   The latency goal (1.2x) is not met. On a quiet machine a TCG guest's own ping RTT varies
#   1.7-3.6 ms between rounds of the DIRECT mode, so a best-of ratio swings with one lucky
#   round; the medians put the overlay's cost at ~0.7 ms per round trip, as before the
#   one-thread change. The spin did not help here either (it stays off by default).
#
# Since the one-frame-thread proxy (2026-12-06, helper netlat, 2 cores shared with 3 other
# helpers' builds, load 6-17, TCG, dev profile; NOT a quiet machine — every mode varies 2x
# between rounds, so these show the spin's failure under contention, not the 1.2x goal):
#   05:58-06:01, load 5.7-6.8, `CAAS_NET_BENCH_NOSPIN=1 BYTES=4194304 ROUNDS=3` (an earlier
#   build: spin 1 ms on by default, no contention cut-off yet; the extra line with it off):
#     round 1: direct 1.52 MB/s 2.51 ms, overlay(spin) 1.65 MB/s 5.01 ms, no spin 1.06 MB/s 3.99 ms
#     round 2: direct 1.82 MB/s 3.84 ms, overlay(spin) 1.55 MB/s 4.40 ms, no spin 2.64 MB/s 2.20 ms
#     round 3: direct 2.10 MB/s 5.46 ms, overlay(spin) 1.53 MB/s 3.14 ms, no spin 0.90 MB/s 7.93 ms
#   06:42-06:48, load 10.7-16.9, same with the spin 2 ms:
#     round 1: direct 0.78 MB/s 7.35 ms, overlay(spin) 0.53 MB/s 16.95 ms, no spin 1.60 MB/s 5.62 ms
#     round 2: direct 1.47 MB/s 5.61 ms, overlay(spin) 1.20 MB/s 4.14 ms, no spin 1.24 MB/s 4.34 ms
#     round 3: direct 1.43 MB/s 8.95 ms, overlay(spin) 0.09 MB/s 62.86 ms, no spin 2.12 MB/s 6.09 ms
#   best of: direct 1.5 MB/s 5.61 ms; overlay without spin 2.1 MB/s 4.34 ms (1.41x, 0.77x).
#   07:03-07:05, load 4.7-6.6, spin off by default, `BYTES=4194304 ROUNDS=2
#   CAAS_NET_BENCH_SPIN=2000 bench/vm-net.sh`:
#     round 1: direct 3.14 MB/s 3.03 ms, overlay 2.54 MB/s 3.20 ms (0.81x, 1.06x), spin 1.81 MB/s 5.04 ms
#     round 2: direct 1.13 MB/s 3.00 ms, overlay 1.01 MB/s 5.78 ms (0.90x, 1.93x), spin 2.24 MB/s 3.62 ms
#     best of: direct 3.1 MB/s 3.00 ms, overlay 2.5 MB/s 3.20 ms: 0.81x and 1.07x (goal met in
#     this run; round 2 shows how far one round can stray at this load).
#   The spin (a yielding poll loop) gave whole time slices to the builds while frames waited:
#   it is off by default now. Without it the one-thread overlay was within the direct mode's
#   noise in all six rounds; the 1.2x latency goal needs the quiet re-measure:
#     `BYTES=8388608 ROUNDS=3 CAAS_NET_BENCH_SPIN=2000 bench/vm-net.sh`
#
# Figures on a QUIET machine (2026-12-06 04:48–04:50 UTC, load 1.6, lead, TCG, dev profile,
# two frame threads per proxy, before the change above):
#   `BYTES=8388608 ROUNDS=2 bench/vm-net.sh`: direct 3.8 MB/s, rtt 1.97 ms; overlay 3.6 MB/s,
#   rtt 2.75 ms: throughput 0.95x (goal met), latency 1.40x (goal <= 1.2 not met).
#   `ROUNDS=3`: direct 3.6 MB/s, 2.28 ms; overlay 3.8 MB/s, 3.00 ms: 1.06x and 1.32x.
#   The overlay's extra ~0.7 ms per round trip is four more hops (VM → proxy → UDP → proxy →
#   VM, each way), each a blocking thread's wake-up on two CPUs that also emulate two guests.
#
# Figures (2026-12-06, same machine, load ~4, TCG, BYTES=8 MiB ROUNDS=2, AGENT path only):
#   agent-overlay 1.9 MB/s (rounds 1.42, 1.88), rtt 3.11 ms (4.91, 3.11) — the 10 ms console
#   polling and ping -c 3 make these coarser than the direct/overlay pair above.
#
# Figures (2026-12-06, 2 cores shared with ~7 builds, load average 12-15, TCG — nested KVM
# stalls here; BYTES=8 MiB ROUNDS=2; dev profile):
#   direct  3.9 MB/s (rounds 3.9, 2.2), rtt 2.68 ms (2.98, 2.68)
#   overlay 2.9 MB/s (rounds 2.2, 2.9), rtt 2.98 ms (3.03, 2.98)
#   ratios: throughput 0.75x (goal >= 0.8), latency 1.11x (goal <= 1.2)
# At this load the figures are dominated by emulating two guests on starved cores (each mode
# varies by ~2x between rounds; an earlier run had the overlay ahead, 2.1x and 0.34x): the
# proxies' two extra hops and two AES-GCM passes per frame compete with the guests for the
# same two cores. Not yet measured on a quiet machine or with KVM.
#
# The test harness is crates/caas/tests/vm_net.rs (`bench_overlay_vs_direct`, ignored in the
# ordinary run); the proxies are the dev-profile `caas` (our code at opt-level 1, aws-lc
# optimised), as the other VM benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
export CAAS_NET_BENCH_BYTES=${BYTES:-16777216}
export CAAS_NET_BENCH_ROUNDS=${ROUNDS:-3}
export CAAS_NET_BENCH_BURSTS=${BURSTS:-3}
export CAAS_NET_BENCH_BOOTS=${BOOTS:-2}
if [ -z "${CAAS_NET_BENCH_BIN:-}" ] && [ "${RELEASE:-1}" = 1 ]; then
  # The product's build of the proxy; cargo prints where it put it.
  CAAS_NET_BENCH_BIN=$(cargo build -q --release -p caas --bin caas --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*\/caas\)".*/\1/p' | tail -1)
  [ -x "$CAAS_NET_BENCH_BIN" ] || { echo "vm-net: no release caas binary built" >&2; exit 1; }
  export CAAS_NET_BENCH_BIN
fi
out=$(mktemp /tmp/caas-vm-net.XXXXXX)
if ! cargo test -q -p caas --test vm_net -- --ignored --exact bench_overlay_vs_direct --nocapture >"$out" 2>&1; then
  grep -v caas-counter "$out" | tail -40 >&2
  rm -f "$out"
  exit 1
fi
grep -E '^(vm-net|round|direct|overlay|ratios)' "$out"
if [ "${MICRO:-0}" = 1 ]; then
  if ! cargo test -q -p caas --test vm_net -- --ignored --exact bench_proxy_round_trip --nocapture >"$out" 2>&1; then
    tail -40 "$out" >&2
    rm -f "$out"
    exit 1
  fi
  grep -E '^proxy-rtt' "$out"
fi
if [ "${AGENT:-0}" = 1 ]; then
  if ! cargo test -q -p caas --test vm_net_agent -- --ignored --exact bench_overlay_through_agents --nocapture >"$out" 2>&1; then
    grep -v caas-counter "$out" | tail -40 >&2
    rm -f "$out"
    exit 1
  fi
  grep -E '^agent-overlay' "$out"
fi
rm -f "$out"
