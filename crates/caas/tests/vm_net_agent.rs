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
        let out = tenant(
            &root,
            &dev,
            &[
                "launch",
                "--id",
                "legacy",
                "--vm",
                vm,
                "--host",
                host,
                "--driver",
                "qemu",
                "--domains",
                "finance",
                "--net-domain",
                "lan",
                "--net-addr",
                addr,
            ],
        );
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
