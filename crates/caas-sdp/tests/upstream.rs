//! Upstream mode (the chained front-end/back-end of seed 001 §3.1): the proxy keeps its
//! ciphertext on an NBD export served by the untrusted storage host (nbdkit, qemu-nbd).
//! The round trip must hold across a proxy restart, and the export's backing file must
//! hold only ciphertext.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

struct Upstream(Child);
impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_upstream(kind: &str, backing: &Path, sock: &Path) -> Upstream {
    let child = match kind {
        "nbdkit" => Proc::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "--unix"])
            .arg(sock)
            .arg("file")
            .arg(format!("file={}", backing.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        _ => Proc::new("qemu-nbd")
            .args(["-f", "raw", "--cache=writeback", "--persistent", "-k"])
            .arg(sock)
            .arg(backing)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let t0 = Instant::now();
    while UnixStream::connect(sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{kind} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Upstream(child)
}

fn roundtrip_through(kind: &str) {
    require("qemu-img", "qemu-utils");
    require(
        if kind == "nbdkit" {
            "nbdkit"
        } else {
            "qemu-nbd"
        },
        if kind == "nbdkit" {
            "nbdkit"
        } else {
            "qemu-utils"
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let size = 64u64 << 20;
    let backing = dir.path().join("backing.img");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(caas_volume::Layout::new(size).unwrap().store_len())
        .unwrap();
    drop(f);
    let up_sock = dir.path().join("up.sock");
    let up = start_upstream(kind, &backing, &up_sock);
    let up_uri = format!("nbd+unix:///?socket={}", up_sock.display());
    run(Proc::new(BIN)
        .args([
            "create",
            "--size",
            "64M",
            "--upstream",
            &up_uri,
            "--key-file",
        ])
        .arg(&key));
    let raw = dir.path().join("image.raw");
    let data = random_file(&raw, size as usize);
    let args = ["--upstream", &up_uri, "--key-file", key.to_str().unwrap()];
    let srv = Server::start(dir.path(), "a", &args);
    run(Proc::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&raw)
        .arg(srv.uri()));
    srv.stop();
    let srv = Server::start(dir.path(), "b", &args);
    let out = run(Proc::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(srv.uri()));
    assert!(out.contains("Images are identical"), "{out}");
    srv.stop();
    run(Proc::new(BIN)
        .args(["check", "--upstream", &up_uri, "--key-file"])
        .arg(&key));
    drop(up);
    // The storage host's file holds only ciphertext: no 16-byte run of the plaintext
    // (sampled at every 4 KiB block start and in the middle of each block).
    let ct = std::fs::read(&backing).unwrap();
    let mut probes = std::collections::HashSet::new();
    for off in (0..data.len()).step_by(2048) {
        probes.insert(u128::from_ne_bytes(data[off..off + 16].try_into().unwrap()));
    }
    let hit = ct
        .windows(16)
        .position(|w| probes.contains(&u128::from_ne_bytes(w.try_into().unwrap())));
    assert_eq!(
        hit, None,
        "plaintext found in the storage host's backing file"
    );
    assert!(ct.len() as u64 > size);
}

#[test]
fn upstream_nbdkit_roundtrip_holds_only_ciphertext() {
    roundtrip_through("nbdkit");
}

#[test]
fn upstream_qemu_nbd_roundtrip_holds_only_ciphertext() {
    roundtrip_through("qemu-nbd");
}
