#!/usr/bin/env bash
# Network Secure Device Proxy benchmark (issue 16): two VMs (the guest image of
# scripts/build-guest-image, qemu, 1 vCPU, 256 MiB each) on this host, in the same run,
#   (a) direct:  their second NICs joined by qemu's own `-netdev dgram` over UDP on loopback;
#   (b) overlay: each NIC backed by its `caas net serve` (a UNIX datagram socket to qemu), the
#                two proxies sealing every Ethernet frame with AES-256-GCM over UDP on loopback.
# Latency: the average of busybox `ping -c 20 -i 0.2` from A to B. Throughput: BYTES of a
# TCP stream (busybox nc, A → B), timed on the host from A's "go" line to B's "done" line on
# the serial consoles. Each mode is measured ROUNDS times, interleaved; the best of each is
# kept. Prints both and the ratios (goal: throughput ≥ 0.8×, latency ≤ 1.2×).
#
# Usage: bench/vm-net.sh     BYTES=16777216  ROUNDS=2   (TCG unless CAAS_QEMU_ACCEL=kvm|auto)
#
# The test harness is crates/caas/tests/vm_net.rs (`bench_overlay_vs_direct`, ignored in the
# ordinary run); the proxies are the dev-profile `caas` (our code at opt-level 1, aws-lc
# optimised), as the other VM benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
export CAAS_NET_BENCH_BYTES=${BYTES:-16777216}
export CAAS_NET_BENCH_ROUNDS=${ROUNDS:-2}
cargo test -q -p caas --test vm_net -- --ignored --exact bench_overlay_vs_direct --nocapture 2>&1 \
  | grep -E '^(vm-net|direct|overlay|ratios)'
