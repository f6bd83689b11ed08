//! The `caas dev` hook (demo volume served on a socket, env lines) and the log canary:
//! at trace level, neither the key nor the plaintext ever reaches the proxy's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::process::Command as Proc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_volume_is_served_and_reports_its_env() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let dev = caas_sdp::dev::start_dev(dir.path(), None).await.unwrap();
    let env: std::collections::HashMap<_, _> = dev.env_lines().into_iter().collect();
    assert!(env["CAAS_NBD_URI"].starts_with("nbd+unix:///caas?socket="));
    assert_eq!(env["CAAS_NBD_SOCKET"], dev.socket.display().to_string());
    assert_eq!(
        env["CAAS_VOLUME_FILE"],
        dev.volume_file.display().to_string()
    );
    let uri = dev.uri.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(Proc::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x33 0 65536",
            "-c",
            "read -P 0x33 0 65536",
        ]))
    })
    .await
    .unwrap();
    assert!(!out.contains("failed"), "{out}");
    dev.stop().await.unwrap();
    // A second start reuses the volume and its key: the data is still there.
    let dev = caas_sdp::dev::start_dev(dir.path(), None).await.unwrap();
    let uri = dev.uri.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(Proc::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x33 0 65536"]))
    })
    .await
    .unwrap();
    assert!(!out.contains("failed"), "{out}");
    dev.stop().await.unwrap();
}

#[test]
fn trace_logs_never_contain_key_or_plaintext() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "1M");
    let socket = dir.path().join("t.sock");
    let stderr = dir.path().join("t.stderr");
    let mut child = Proc::new(BIN)
        .args([
            "serve",
            vol.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--socket",
        ])
        .arg(&socket)
        .env("CAAS_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t0.elapsed().as_secs() < 20, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let canary = dir.path().join("canary.raw");
    std::fs::write(&canary, b"CANARY-PLAINTEXT-9f8e7d6c5b4a".repeat(1000)).unwrap();
    let uri = format!("nbd+unix:///caas?socket={}", socket.display());
    run(Proc::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&canary)
        .arg(&uri));
    run(Proc::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read 0 29000",
        "-c",
        "write -P 0x41 1 5000",
    ]));
    run(Proc::new("kill").arg("-TERM").arg(child.id().to_string()));
    assert!(child.wait().unwrap().success());
    let log = std::fs::read(&stderr).unwrap();
    let text = String::from_utf8_lossy(&log);
    let key_bytes = std::fs::read(&key).unwrap();
    assert!(
        text.contains("request") && text.contains("Write"),
        "the trace log is empty: {text}"
    );
    assert!(!text.contains("CANARY-PLAINTEXT"), "plaintext in the log");
    assert!(
        !text.contains(&hex::encode(&key_bytes)),
        "key (hex) in the log"
    );
    assert!(
        !log.windows(32).any(|w| w == key_bytes.as_slice()),
        "key (raw) in the log"
    );
    assert!(
        !text.contains(&format!("{:?}", key_bytes)),
        "key (debug) in the log"
    );
}
