//! The deferred open (`serve --defer-open`, the target of a live migration or a resume,
//! `docs/suspend-migrate.md`): the proxy answers the NBD handshake at once, but a request
//! waits until the volume is opened — never a read of the data the previous writer is still
//! changing, never a write without the single-writer lock — and the open happens only on the
//! agent's go, refused while the previous writer still holds the volume and below the
//! anchored epoch.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_sdp::engine::{KeyInput, OpenOptions, Volume};
use common::*;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * 4096;

fn key(p: &Path) -> KeyInput {
    KeyInput::Raw(Arc::new(caas_volume::keys::read_key_file(p).unwrap()))
}

/// A fresh volume and its key file.
async fn volume(dir: &Path) -> (PathBuf, PathBuf) {
    let k = key_file(dir);
    let vol = dir.join("vol.caasvol");
    caas_sdp::cli::create_file(&vol, SIZE, &key(&k), Default::default())
        .await
        .unwrap();
    (vol, k)
}

/// The previous writer (the migration's source): the volume open for writing, locked.
async fn writer(vol: &Path, k: &Path) -> Arc<Volume> {
    let store = caas_sdp::Store::open_file(vol, true, None).unwrap();
    let opts = OpenOptions {
        writable: true,
        min_epoch: 0,
    };
    Volume::open_with(store, &key(k), opts).await.unwrap().0
}

struct Deferred {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    socket: PathBuf,
    report: PathBuf,
}

impl Deferred {
    /// `serve --defer-open` with the key on its stdin (no go yet).
    fn start(dir: &Path, vol: &Path, k: &Path, min_epoch: u32) -> Self {
        let socket = dir.join("d.sock");
        let report = dir.join("d.epoch");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&report);
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg(vol)
            .arg("--socket")
            .arg(&socket)
            .args([
                "--key-file",
                "/dev/stdin",
                "--defer-open",
                "--defer-wait",
                "5",
            ])
            .args(["--min-epoch", &min_epoch.to_string()])
            .arg("--report-epoch")
            .arg(&report)
            .env("CAAS_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&std::fs::read(k).unwrap()).unwrap();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Deferred {
            child,
            stdin: Some(stdin),
            socket,
            report,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///caas?socket={}", self.socket.display())
    }

    fn go(&mut self) {
        let mut s = self.stdin.take().unwrap();
        s.write_all(b"o").unwrap();
    }

    fn report(&self) -> String {
        let t = Instant::now();
        loop {
            if let Ok(l) = std::fs::read_to_string(&self.report)
                && l.ends_with('\n')
            {
                return l.trim().to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no epoch report");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_the_deferred_open_and_see_the_previous_writers_last_data() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, k) = volume(dir.path()).await;
    let src = writer(&vol, &k).await;
    let src_epoch = src.epoch();
    src.write(0, &mut vec![b'A'; 4096], true).await.unwrap();
    let mut d = Deferred::start(dir.path(), &vol, &k, src_epoch);
    // The target's client (qemu) connects and negotiates at once: the size is known.
    let client = caas_sdp::Store::connect_nbd(&d.uri()).await.unwrap();
    assert_eq!(client.byte_len().await.unwrap(), SIZE);
    let c2 = client.clone();
    let read = tokio::spawn(async move {
        let mut b = vec![0u8; 4096];
        c2.read_at(0, &mut b).await.map(|()| b)
    });
    let c3 = client.clone();
    let write = tokio::spawn(async move { c3.write_at(4096, &[b'T'; 4096]).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!read.is_finished(), "a read was served before the open");
    assert!(!write.is_finished(), "a write was served before the open");
    // The source's last write, then it flushes and releases the volume (its commit).
    src.write(0, &mut vec![b'B'; 4096], true).await.unwrap();
    src.close().await.unwrap();
    drop(src);
    d.go();
    let b = read.await.unwrap().unwrap();
    assert!(b.iter().all(|&x| x == b'B'), "stale data after the open");
    write.await.unwrap().unwrap();
    // The single writer moved: a new epoch above the source's.
    assert_eq!(d.report(), format!("epoch {}", src_epoch + 1));
    let mut b = vec![0u8; 4096];
    client.read_at(4096, &mut b).await.unwrap();
    assert!(b.iter().all(|&x| x == b'T'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_is_refused_while_the_previous_writer_holds_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, k) = volume(dir.path()).await;
    let src = writer(&vol, &k).await;
    let mut d = Deferred::start(dir.path(), &vol, &k, 0);
    let client = caas_sdp::Store::connect_nbd(&d.uri()).await.unwrap();
    // A premature go (the source did not commit): the lock is refused, no request is
    // served, the proxy ends.
    d.go();
    assert_eq!(d.report(), "open_refused");
    let mut b = vec![0u8; 4096];
    assert!(client.read_at(0, &mut b).await.is_err());
    let st = d.child.wait().unwrap();
    assert!(!st.success());
    drop(src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_volume_is_refused_at_the_deferred_open() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, k) = volume(dir.path()).await;
    // A writer, then the storage keeps a copy; a later writer (anchored at its epoch); the
    // copy is put back.
    writer(&vol, &k).await.close().await.unwrap();
    let old = std::fs::read(&vol).unwrap();
    let later = writer(&vol, &k).await;
    let anchor = later.epoch();
    later.close().await.unwrap();
    drop(later);
    std::fs::write(&vol, &old).unwrap();
    let mut d = Deferred::start(dir.path(), &vol, &k, anchor);
    let client = caas_sdp::Store::connect_nbd(&d.uri()).await.unwrap();
    d.go();
    assert_eq!(d.report(), "volume_rollback");
    let mut b = vec![0u8; 4096];
    assert!(client.read_at(0, &mut b).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_go_the_volume_is_never_opened_and_requests_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, k) = volume(dir.path()).await;
    let before = std::fs::read(&vol).unwrap();
    let d = Deferred::start(dir.path(), &vol, &k, 0);
    let client = caas_sdp::Store::connect_nbd(&d.uri()).await.unwrap();
    let t = Instant::now();
    let mut b = vec![0u8; 4096];
    assert!(client.read_at(0, &mut b).await.is_err(), "served unopened");
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(!d.report.exists());
    drop(client);
    drop(d);
    assert_eq!(
        std::fs::read(&vol).unwrap(),
        before,
        "the store was touched"
    );
}
