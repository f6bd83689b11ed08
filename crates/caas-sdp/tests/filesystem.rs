//! A real filesystem and a real I/O generator on the proxy: `nbdfuse` + `losetup` +
//! `mkfs.ext4` + `mount` (files survive an unmount and a proxy restart), and fio's `nbd`
//! engine writing and verifying random blocks.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

/// nbdfuse mount + loop device + ext4 mount, torn down in reverse order on drop.
struct Mounted {
    fuse_dir: PathBuf,
    nbdfuse: Child,
    loopdev: String,
    mnt: PathBuf,
}

impl Mounted {
    fn new(dir: &Path, uri: &str, mkfs: bool) -> Mounted {
        let fuse_dir = dir.join("fuse");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let nbdfuse = Proc::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(uri)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let disk = fuse_dir.join("nbd");
        let t0 = Instant::now();
        while !disk.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "nbdfuse did not mount"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let loopdev = run(Proc::new("losetup").args(["-f", "--show"]).arg(&disk))
            .trim()
            .to_string();
        let mut m = Mounted {
            fuse_dir,
            nbdfuse,
            loopdev,
            mnt: mnt.clone(),
        };
        if mkfs {
            run(Proc::new("mkfs.ext4").args(["-q", "-F", &m.loopdev]));
        }
        run(Proc::new("mount").arg(&m.loopdev).arg(&mnt));
        m.mnt = mnt;
        m
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Proc::new("umount").arg(&self.mnt).status();
        let _ = Proc::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = Proc::new("umount").arg(&self.fuse_dir).status();
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

#[test]
fn nbdfuse_ext4_filesystem_survives_remount_and_restart() {
    require("nbdfuse", "libnbd-bin");
    require("losetup", "mount");
    require("mkfs.ext4", "e2fsprogs");
    assert!(
        run(Proc::new("id").arg("-u")).trim() == "0",
        "this test needs root (losetup and mount); run the suite as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "64M");
    let args = [vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()];
    let payload: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    {
        let srv = Server::start(dir.path(), "a", &args);
        let m = Mounted::new(dir.path(), &srv.uri(), true);
        std::fs::create_dir(m.mnt.join("docs")).unwrap();
        std::fs::write(
            m.mnt.join("docs/hello.txt"),
            b"hello from the crypto domain\n",
        )
        .unwrap();
        std::fs::write(m.mnt.join("big.bin"), &payload).unwrap();
        run(&mut Proc::new("sync"));
        drop(m);
        srv.stop();
    }
    // The ciphertext file does not contain the file contents.
    let ct = std::fs::read(&vol).unwrap();
    assert!(!ct.windows(16).any(|w| w == &b"hello from the c"[..]));
    run(Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
    let srv = Server::start(dir.path(), "b", &args);
    let m = Mounted::new(dir.path(), &srv.uri(), false);
    assert_eq!(
        std::fs::read(m.mnt.join("docs/hello.txt")).unwrap(),
        b"hello from the crypto domain\n"
    );
    assert!(std::fs::read(m.mnt.join("big.bin")).unwrap() == payload);
    drop(m);
    srv.stop();
}

#[test]
fn fio_nbd_engine_writes_and_verifies() {
    require("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "64M");
    let srv = Server::start(
        dir.path(),
        "s",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    let out = run(Proc::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json = &out[out.find('{').unwrap()..];
    assert!(json.contains("\"error\" : 0"), "{out}");
    assert!(!out.contains("verify: bad"), "{out}");
    // Random reads with 16 jobs over 4 connections.
    let out = run(Proc::new("fio").current_dir(dir.path()).args([
        "--name=rr",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri()),
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=4",
        "--size=32M",
        "--runtime=2",
        "--time_based",
    ]));
    assert!(out.contains("READ: bw="), "{out}");
    srv.stop();
    run(Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
}
