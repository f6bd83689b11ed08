//! The proxy against real third-party NBD clients: qemu-img (info, convert, compare),
//! qemu-io (unaligned reads, writes, discard, write-zeroes), nbdinfo and nbdcopy; plus
//! protocol-level checks with a raw client (error codes for out-of-range and malformed
//! requests, a client that never reads its replies does not stall the others).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_nbd::errno;
use caas_nbd::transmission::{Command, cmdflags};
use common::*;
use std::process::Command as Proc;
use std::time::{Duration, Instant};

#[test]
fn qemu_img_roundtrip_1gib_survives_restart() {
    require("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "1G");
    let raw = dir.path().join("image.raw");
    let image = random_file(&raw, 1 << 30);
    let args = [vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()];
    let srv = Server::start(dir.path(), "a", &args);
    let info = run(Proc::new("qemu-img").args(["info", "--output=json", &srv.uri()]));
    assert!(info.contains("\"virtual-size\": 1073741824"), "{info}");
    run(Proc::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&raw)
        .arg(srv.uri()));
    let out = run(Proc::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(srv.uri()));
    assert!(out.contains("Images are identical"), "{out}");
    srv.stop();
    // Restart the proxy: the image reads back identical.
    let srv = Server::start(dir.path(), "b", &args);
    let out = run(Proc::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(srv.uri()));
    assert!(out.contains("Images are identical"), "{out}");
    // And a modified byte is noticed by compare (the check is not vacuous). The image is
    // random, so the byte written is the complement of the one there: a fixed pattern
    // would already be there one run in 256 and change nothing.
    const AT: usize = 123_456_789;
    let write = format!("write -P {:#04x} {AT} 1", !image[AT]);
    run(Proc::new("qemu-io").args(["-f", "raw", &srv.uri(), "-c", &write]));
    let st = Proc::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(srv.uri())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1), "compare should report a difference");
    srv.stop();
    run(Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
}

#[test]
fn qemu_io_unaligned_reads_writes_discard_zeroes() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "16M");
    let srv = Server::start(
        dir.path(),
        "s",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    let cmds = [
        "write -P 0xab 1000 5000",
        "read -P 0xab 1000 5000",
        "read -P 0 0 1000",
        "read -P 0 6000 2192",
        "write -P 0xcd 4095 2",
        "read -P 0xcd 4095 2",
        "read -P 0xab 1000 3095",
        "read -P 0xab 4097 1903",
        "write -z 3000 10000",
        "read -P 0 3000 10000",
        "read -P 0xab 1000 2000",
        "write -P 0x5a 0 1048576",
        "discard 20000 70000",
        "read -P 0x5a 0 20000",
        "read -P 0 20480 65536",
        "read -P 0x5a 90000 958576",
        "write -z -u 1048576 1048576",
        "read -P 0 1048576 1048576",
        "write -P 0x77 16773120 4096",
        "read -P 0x77 16773120 4096",
        "aio_write -P 0x31 2097152 65536",
        "aio_write -P 0x32 2162688 65536",
        "aio_flush",
        "read -P 0x31 2097152 65536",
        "read -P 0x32 2162688 65536",
        "flush",
    ];
    let mut cmd = Proc::new("qemu-io");
    cmd.args(["-f", "raw", &srv.uri()]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(&mut cmd);
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 15, "{out}");
    // Out of range: qemu-io refuses client-side or gets an error; never success.
    let out = Proc::new("qemu-io")
        .args(["-f", "raw", &srv.uri(), "-c", "read 16777000 1000"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("read 1000/1000"), "{text}");
    srv.stop();
    run(Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
}

#[test]
fn nbdinfo_and_nbdcopy() {
    require("nbdinfo", "libnbd-bin");
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "64M");
    let srv = Server::start(
        dir.path(),
        "s",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    let info = run(Proc::new("nbdinfo").arg(srv.uri()));
    for want in [
        "export-size: 67108864",
        "can_multi_conn: true",
        "can_zero: true",
        "can_trim: true",
        "can_fua: true",
        "block_size_preferred: 4096",
    ] {
        assert!(info.contains(want), "missing {want:?} in {info}");
    }
    let list = run(Proc::new("nbdinfo").args([
        "--list",
        &format!("nbd+unix://?socket={}", srv.socket.display()),
    ]));
    assert!(list.contains("export=\"caas\""), "{list}");
    let raw = dir.path().join("in.raw");
    let data = random_file(&raw, 64 << 20);
    run(Proc::new("nbdcopy").arg(&raw).arg(srv.uri()));
    let back = dir.path().join("out.raw");
    run(Proc::new("nbdcopy").arg(srv.uri()).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    srv.stop();
}

#[test]
fn protocol_errors_map_to_nbd_errnos() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "1M");
    let srv = Server::start(
        dir.path(),
        "s",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    let mut c = RawClient::connect(&srv.socket);
    assert_eq!(c.size, 1 << 20);
    let size = c.size;
    // (command, flags, offset, length, payload) -> errno
    let cases: Vec<(Command, u16, u64, u32, Vec<u8>, u32)> = vec![
        (Command::Read, 0, size - 10, 20, vec![], errno::EINVAL),
        (Command::Read, 0, u64::MAX - 1, 4, vec![], errno::EINVAL),
        (Command::Write, 0, size - 10, 20, vec![1; 20], errno::ENOSPC),
        (Command::WriteZeroes, 0, size, 1, vec![], errno::ENOSPC),
        (Command::Trim, 0, size - 1, 2, vec![], errno::EINVAL),
        (Command::Read, 0, 0, (32 << 20) + 1, vec![], errno::EINVAL),
        (
            Command::Write,
            cmdflags::NO_HOLE,
            0,
            4,
            vec![1; 4],
            errno::EINVAL,
        ),
        (Command::Read, cmdflags::DF, 0, 4, vec![], errno::EINVAL), // DF needs structured replies
        (Command::Flush, 0, 5, 0, vec![], errno::EINVAL),
        (Command::Other(42), 0, 0, 0, vec![], errno::EINVAL),
        (Command::Cache, 0, 0, 4096, vec![], 0),
        (Command::Write, cmdflags::FUA, 4096, 4, vec![7; 4], 0),
        (Command::Read, 0, 4096, 4, vec![], 0),
        (
            Command::WriteZeroes,
            cmdflags::FAST_ZERO | cmdflags::NO_HOLE,
            0,
            8192,
            vec![],
            errno::ENOTSUP,
        ),
        (Command::WriteZeroes, cmdflags::NO_HOLE, 0, 8192, vec![], 0),
    ];
    for (cmd, flags, off, len, payload, want) in cases {
        let (e, _) = c.call(cmd, flags, off, len, &payload);
        assert_eq!(e, want, "{cmd:?} flags={flags:#x} off={off} len={len}");
    }
    // The connection is still in sync after all those errors.
    let (e, d) = c.call(Command::Read, 0, 0, 8192, &[]);
    assert_eq!((e, d), (0, vec![0u8; 8192]));
    let (e, _) = c.call(Command::Write, 0, 100, 3, b"abc");
    assert_eq!(e, 0);
    let (e, d) = c.call(Command::Read, 0, 99, 5, &[]);
    assert_eq!((e, d.as_slice()), (0, &b"\0abc\0"[..]));
    drop(c);
    srv.stop();
}

#[test]
fn a_client_that_never_reads_replies_does_not_stall_others() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "64M");
    let srv = Server::start(
        dir.path(),
        "s",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    // A hostile client: 200 reads of 4 MiB each, never reading a reply (its socket buffer
    // fills up and its requests block), plus one that stops mid-handshake.
    let mut bad = RawClient::connect(&srv.socket);
    for i in 0..200u64 {
        bad.send(Command::Read, 0, (i % 16) << 22, 4 << 20, &[]);
    }
    let _half = std::os::unix::net::UnixStream::connect(&srv.socket).unwrap();
    let t0 = Instant::now();
    let out = run(Proc::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri(),
        "-c",
        "write -P 0x42 0 1048576",
        "-c",
        "read -P 0x42 0 1048576",
    ]));
    assert!(!out.contains("failed"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "a well-behaved client was stalled"
    );
    drop(bad);
    srv.stop();
}

#[test]
fn tcp_listener_serves_qemu_io() {
    require("qemu-io", "qemu-utils");
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "4M");
    let mut child = Proc::new(BIN)
        .args([
            "serve",
            vol.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--tcp",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line.trim().strip_prefix("serving ").unwrap().to_string();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let out = run(Proc::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5 4096 8192",
        "-c",
        "read -P 0x5 4096 8192",
    ]));
    assert!(!out.contains("failed"), "{out}");
    run(Proc::new("kill").arg("-TERM").arg(child.id().to_string()));
    assert!(child.wait().unwrap().success());
}
