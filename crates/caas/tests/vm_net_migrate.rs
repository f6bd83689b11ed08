//! A real VM attached to a network domain live-migrates (issue 16, `docs/network-sdp.md`
//! §The agent's side): two qemu VMs of `lan` launched by trusted launch on host-1 and
//! host-2 of a `caas dev --hosts 3` (swtpm TPMs, agents, TTP, scheduler; image
//! `scripts/build-guest-image --net-demo`) talk (ping, 1 MiB over TCP, digests equal); then
//! `caas tenant migrate` moves vm-a to host-3. host-3's qemu takes the same overlay NIC
//! (its device state loads), host-3's agent starts vm-a's proxy keyed under its own session
//! (epoch 2: the source's session is retired), host-1's proxy stops with the source VM, the
//! scheduler moves the member, and frames of the migrated VM's NIC — qemu's
//! `announce-self` (RARP from the guest's MAC, as after every migration) — reach vm-b's
//! proxy sealed under epoch 2 from host-3's proxy. Then vm-a is suspended (its proxy stops,
//! its session ends at the TTP: epoch 3) and resumed on host-1, whose proxy — keyed at
//! epoch 3 under the resumed session — carries the restored NIC's frames to vm-b again.
//! VMs run under the driver's default accelerator (TCG unless CAAS_QEMU_ACCEL).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_workload::console;
use common::vm::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

struct Ops {
    http: caas_attest::client::HttpClient,
    rt: tokio::runtime::Runtime,
}

impl Ops {
    fn new(dev: &common::Dev) -> Self {
        let http = dev.agent_operator_http();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self { http, rt }
    }

    /// `vm`'s network attachment on `host` with its proxy's counters.
    fn net(&self, dev: &common::Dev, host: &str, vm: &str) -> Value {
        let url = format!("{}/v1/agent/workloads/{vm}/net", dev.agent_url(host));
        self.rt.block_on(self.http.get::<Value>(&url)).unwrap()
    }

    fn stat(&self, dev: &common::Dev, host: &str, vm: &str, name: &str) -> u64 {
        common::net_stat(&self.net(dev, host, vm), name)
    }

    /// vm-a's qemu announces the guest's MAC (QMP `announce-self`, 3 rounds): at least
    /// three of its frames must reach vm-b's proxy (from wherever vm-a now runs).
    fn announced_frames_reach_vm_b(&self, dev: &common::Dev, root: &Path, what: &str) {
        let before = self.stat(dev, "host-2", "vm-b", "rx_frames");
        let mut q =
            caas_workload::qmp::Qmp::connect(&qmp_socket(root, "vm-a"), Duration::from_secs(10))
                .unwrap();
        q.execute(
            "announce-self",
            Some(json!({
                "initial": 50, "max": 100, "rounds": 3, "step": 10
            })),
        )
        .unwrap();
        wait(20, what, || {
            self.stat(dev, "host-2", "vm-b", "rx_frames") >= before + 3
        });
    }

    fn workloads(&self, dev: &common::Dev, host: &str) -> Vec<String> {
        let url = format!("{}/v1/agent/workloads", dev.agent_url(host));
        let v: Value = self.rt.block_on(self.http.get(&url)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|w| w["vm_id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// The QMP socket of `vm`'s only qemu (from its command line).
fn qmp_socket(root: &Path, vm: &str) -> std::path::PathBuf {
    wait(30, "the source's qemu is gone", || {
        qemu_cmdlines(root, vm).len() == 1
    });
    let cmd = qemu_cmdlines(root, vm).remove(0);
    let arg = cmd
        .iter()
        .find(|a| a.contains("qmp.sock"))
        .unwrap_or_else(|| panic!("no QMP socket: {cmd:?}"));
    let path = arg.trim_start_matches("unix:");
    std::path::PathBuf::from(path.split(',').next().unwrap())
}

fn wait(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn networked_vm_live_migrates_and_its_nic_speaks_through_the_targets_proxy() {
    let image = net_demo_guest_image();
    let (_tmp, root, dev, _storage) = provisioned_guest(&image, &["host-1", "host-2", "host-3"]);
    tenant(&root, &dev, &["acl", "--domains", "finance,lan"]);
    for (vm, host, addr) in [
        ("vm-a", "host-1", "10.9.0.1/24"),
        ("vm-b", "host-2", "10.9.0.2/24"),
    ] {
        launch_on_lan(&root, &dev, vm, host, addr);
    }
    let limit = Duration::from_secs(300);
    let dir = |h: &str| root.join("dev/hosts").join(h);
    let wl = |h: &str, vm: &str, m: &str| {
        console::wait_marker(&dir(h), vm, m, &[console::NET_PING_FAILED], limit)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let sent = wl("host-2", "vm-b", console::NET_SENT);
    let recv = wl("host-1", "vm-a", console::NET_RECV);
    console::NetTransfer::parse(&sent, &recv)
        .unwrap()
        .check()
        .unwrap();
    let ops = Ops::new(&dev);
    assert_eq!(ops.net(&dev, "host-1", "vm-a")["epoch"], json!(1));
    let old = ops.net(&dev, "host-1", "vm-a")["member"].clone();
    // The tenant moves vm-a to host-3 through the (untrusted) scheduler.
    let t = Instant::now();
    let out = tenant(&root, &dev, &["migrate", "--vm", "vm-a", "--to", "host-3"]);
    let r: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    println!("net VM migrated in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(r["target"], json!("host-3"), "{r}");
    assert_eq!(r["net"]["domain"], json!("lan"), "{r}");
    assert!(ops.workloads(&dev, "host-1").is_empty());
    let na = ops.net(&dev, "host-3", "vm-a");
    assert_eq!(na["epoch"], json!(2), "{na}");
    assert_eq!(na["member"]["sender"], old["sender"]);
    assert_ne!(na["member"]["udp"], old["udp"]);
    wait(30, "the source's qemu is gone", || {
        qemu_cmdlines(&root, "vm-a").len() == 1
    });
    let cmd = qemu_cmdline(&root, "vm-a").expect("vm-a's qemu on host-3");
    assert!(
        cmd.iter().any(|a| a.starts_with("dgram,id=ovl0")),
        "no overlay NIC on the target: {cmd:?}"
    );
    // vm-b's proxy learns vm-a's new place (the scheduler's push) and epoch 2.
    wait(30, "vm-b's proxy at epoch 2", || {
        ops.net(&dev, "host-2", "vm-b")["epoch"] == json!(2)
    });
    // The migrated VM's NIC speaks: qemu announces the guest's MAC from host-3.
    ops.announced_frames_reach_vm_b(&dev, &root, "vm-a's frames reach vm-b's proxy from host-3");
    // Suspend: vm-a's proxy stops with it and its session ends at the TTP (NetLeave): `lan`
    // moves to epoch 3, which vm-b's proxy fetches when the scheduler tells it vm-a left.
    let t = Instant::now();
    tenant(&root, &dev, &["suspend", "--vm", "vm-a"]);
    println!("net VM suspended in {:.1} s", t.elapsed().as_secs_f64());
    assert!(ops.workloads(&dev, "host-3").is_empty());
    wait(30, "vm-b's proxy at epoch 3", || {
        ops.net(&dev, "host-2", "vm-b")["epoch"] == json!(3)
    });
    // Resume on host-1: its own proxy (same NIC) keyed under the resumed session at the
    // current epoch, back among `lan`'s members; the restored NIC speaks through it.
    let t = Instant::now();
    let out = tenant(&root, &dev, &["resume", "--vm", "vm-a", "--host", "host-1"]);
    println!("net VM resumed in {:.1} s", t.elapsed().as_secs_f64());
    assert!(out.contains("\"net\""), "{out}");
    let na = ops.net(&dev, "host-1", "vm-a");
    assert_eq!(na["epoch"], json!(3), "{na}");
    assert_eq!(na["member"]["sender"], old["sender"]);
    ops.announced_frames_reach_vm_b(&dev, &root, "the resumed vm-a's frames reach vm-b's proxy");
    assert_eq!(ops.stat(&dev, "host-2", "vm-b", "rx_auth_failed"), 0);
}
