//! Two real VMs of one network domain on two hosts, launched through trusted launch by the
//! host agents (issue 16's acceptance): `caas tenant launch --driver qemu --net-domain lan`
//! on a `caas dev --hosts 2` (swtpm TPMs, agents, the TTP and the scheduler), each agent
//! running its VM's network proxy with `lan`'s key from the TTP, the scheduler telling each
//! the other. The guests (the image of `scripts/build-guest-image --net-demo`: the tenant's own
//! traffic role) ping each other and move 1 MiB over TCP; the receiver's SHA-256 must be the
//! sender's. VMs run under the driver's default accelerator (TCG unless CAAS_QEMU_ACCEL).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_workload::console;
use common::vm::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The first complete console line of `vm` on `host` containing `marker`, from the marker on
/// (`caas_workload::console`, as `caas demo` reads it).
fn wait_line(root: &Path, host: &str, vm: &str, marker: &str, timeout: Duration) -> String {
    console::wait_marker(
        &root.join("dev/hosts").join(host),
        vm,
        marker,
        &[console::NET_PING_FAILED],
        timeout,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn two_vms_launched_through_their_agents_talk_over_the_overlay() {
    let image = net_demo_guest_image();
    let (_tmp, root, dev, _storage) = provisioned_guest(&image, &["host-1", "host-2"]);
    tenant(&root, &dev, &["acl", "--domains", "finance,lan"]);
    let t = Instant::now();
    for (vm, host, addr) in [
        ("vm-a", "host-1", "10.9.0.1/24"),
        ("vm-b", "host-2", "10.9.0.2/24"),
    ] {
        let out = launch_on_lan(&root, &dev, vm, host, addr);
        assert!(out.contains("\"net\""), "{out}");
        let cmd = qemu_cmdline(&root, vm).expect("the VM's qemu");
        assert!(
            cmd.iter().any(|a| a.starts_with("dgram,id=ovl0")),
            "no overlay NIC: {cmd:?}"
        );
    }
    let limit = Duration::from_secs(300);
    wait_line(&root, "host-2", "vm-b", console::NET_PING_OK, limit);
    let rtt = wait_line(&root, "host-2", "vm-b", console::NET_RTT, limit);
    let sent = wait_line(&root, "host-2", "vm-b", console::NET_SENT, limit);
    let recv = wait_line(&root, "host-1", "vm-a", console::NET_RECV, limit);
    let transfer = console::NetTransfer::parse(&sent, &recv).unwrap();
    transfer.check().unwrap();
    let sent = transfer.sent_sha256;
    println!(
        "two VMs through their agents' proxies: {rtt}; 1 MiB TCP, SHA-256 {sent} on both sides; {:.1} s from the first launch",
        t.elapsed().as_secs_f64()
    );
}

/// The overlay through the agent path for `bench/vm-net.sh` (`AGENT=1`; ignored in the
/// ordinary run): per round two VMs launched by trusted launch with `--net-domain lan` on
/// two hosts (image `--net-demo-bytes CAAS_NET_BENCH_BYTES`); latency is the average of the
/// sender's `ping -c 3 -i 0.2`, throughput the bytes over the time from its `caas-net-go`
/// line to the receiver's `caas-net-recv` line (both consoles polled every 10 ms), the
/// digests checked; both VMs stopped after each round. Best of CAAS_NET_BENCH_ROUNDS.
#[test]
#[ignore = "benchmark: bench/vm-net.sh AGENT=1"]
fn bench_overlay_through_agents() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let bytes = env("CAAS_NET_BENCH_BYTES", 16 << 20) / 1024 * 1024;
    let rounds = env("CAAS_NET_BENCH_ROUNDS", 2).max(1);
    let image = net_demo_guest_image_bytes(bytes);
    let (_tmp, root, dev, _storage) = provisioned_guest(&image, &["host-1", "host-2"]);
    tenant(&root, &dev, &["acl", "--domains", "finance,lan"]);
    let (d1, d2) = (root.join("dev/hosts/host-1"), root.join("dev/hosts/host-2"));
    let mut results = Vec::new();
    for round in 0..rounds {
        let (a, b) = (format!("vm-a{round}"), format!("vm-b{round}"));
        for (vm, host, addr) in [(&a, "host-1", "10.9.0.1/24"), (&b, "host-2", "10.9.0.2/24")] {
            launch_on_lan(&root, &dev, vm, host, addr);
        }
        let limit = Duration::from_secs(600);
        let t = Instant::now();
        let (mut go, mut recv) = (None, None);
        while recv.is_none() {
            assert!(t.elapsed() < limit, "round {round}: no transfer");
            let now = Instant::now();
            let cb = console::console(&d2, &b);
            assert!(
                console::find_marker(&cb, console::NET_PING_FAILED).is_none(),
                "{cb}"
            );
            if go.is_none() && console::find_marker(&cb, console::NET_GO).is_some() {
                go = Some(now);
            }
            if go.is_some() {
                recv = console::find_marker(&console::console(&d1, &a), console::NET_RECV)
                    .map(|l| (now, l));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (t1, recv) = recv.unwrap();
        let secs = t1.duration_since(go.unwrap()).as_secs_f64();
        let cb = console::console(&d2, &b);
        let sent = console::find_marker(&cb, console::NET_SENT).unwrap();
        console::NetTransfer::parse(&sent, &recv)
            .unwrap()
            .check_size(bytes)
            .unwrap();
        let rtt = console::find_marker(&cb, console::NET_RTT).unwrap();
        // "round-trip min/avg/max = A/B/C ms"
        let avg: f64 = rtt
            .rsplit('=')
            .next()
            .and_then(|v| v.split('/').nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{rtt}"));
        let mbps = bytes as f64 / secs / 1e6;
        println!("agent-overlay round {round}: {mbps:.2} MB/s ({secs:.2} s), rtt {avg:.3} ms");
        results.push((mbps, avg));
        // Stop both through the agents' operator API (as `caas demo` does).
        let ops = dev.agent_operator_http();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (vm, host) in [(&a, "host-1"), (&b, "host-2")] {
            let url = &dev.agent_url(host);
            rt.block_on(ops.post::<_, serde_json::Value>(
                &format!("{url}/v1/agent/workloads/{vm}/stop"),
                &serde_json::json!({}),
            ))
            .unwrap();
        }
    }
    let best_t = results.iter().map(|r| r.0).fold(0.0, f64::max);
    let best_l = results.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    println!(
        "agent-overlay (tenant launch --net-domain, bytes={bytes} rounds={rounds}): throughput {best_t:.1} MB/s, rtt {best_l:.3} ms  {results:?}"
    );
}
