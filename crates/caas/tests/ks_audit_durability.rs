//! Audit durability of key use (`[storage] audit_durability`, `caas_kms::config::AuditDurability`)
//! against a crash, from the real position: a real `caas dev` process driven by concurrent
//! SigV4-signed Encrypts over keep-alive connections, killed with SIGKILL mid-load.
//!
//! - `bounded`: every reply the clients received more than the documented window
//!   (`caas_store::DEFERRED_WINDOW`, 10 ms) before the kill has its audit record; the chain
//!   verifies afterwards (no gap, no fork) and the service restarts on it.
//! - `strict`: every reply received before the kill has its record.
//! - A clean stop (SIGTERM) under load flushes every queued record.
//! - A state change (CreateKey) is durable before its reply in `bounded` mode too.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use common::*;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One keep-alive HTTP/1.1 connection sending signed requests; returns the response's
/// status, `x-amzn-requestid` and body, or None when the server went away.
struct Conn {
    host: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    signer: caas_kms::client::Signer,
}

impl Conn {
    fn open(dev: &Dev) -> Conn {
        let host = dev.endpoint().trim_start_matches("http://").to_string();
        let tcp = TcpStream::connect(&host).unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let signer = caas_kms::client::Signer::new(
            "us-east-1",
            "kms",
            &dev.env["AWS_ACCESS_KEY_ID"],
            caas_crypto::SecretBytes::new(dev.env["AWS_SECRET_ACCESS_KEY"].clone().into_bytes()),
        );
        Conn {
            host,
            reader: BufReader::new(tcp.try_clone().unwrap()),
            writer: tcp,
            signer,
        }
    }

    fn call(&mut self, op: &str, body: &[u8]) -> Option<(u16, String, String)> {
        let mut headers = vec![
            (
                "content-type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
            ("host".to_string(), self.host.clone()),
            ("x-amz-target".to_string(), format!("TrentService.{op}")),
        ];
        let auth = self
            .signer
            .sign("POST", "/", "", &mut headers, body)
            .unwrap();
        let mut req = String::from("POST / HTTP/1.1\r\n");
        for (n, v) in &headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str(&format!(
            "authorization: {auth}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        ));
        self.writer.write_all(req.as_bytes()).ok()?;
        self.writer.write_all(body).ok()?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        let (mut len, mut rid) = (0usize, String::new());
        loop {
            line.clear();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':')?;
            match n.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().ok()?,
                "x-amzn-requestid" => rid = v.trim().to_string(),
                _ => {}
            }
        }
        let mut buf = vec![0u8; len];
        self.reader.read_exact(&mut buf).ok()?;
        Some((status, rid, String::from_utf8_lossy(&buf).into_owned()))
    }
}

fn start(dir: &Path, mode: &str) -> Dev {
    Dev::start_with(dir, "127.0.0.1:0", &["--audit-durability", mode])
}

fn create_key(dev: &Dev) -> String {
    rt().block_on(async {
        dev.client().call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string()
    })
}

/// Acknowledged Encrypts: (request id, when the reply was received).
type Acks = Arc<Mutex<Vec<(String, Instant)>>>;

/// `CLIENTS` threads sending Encrypts until `stop` or the server goes away.
fn load(dev: &Dev, key: &str, stop: Arc<AtomicBool>) -> (Acks, Vec<std::thread::JoinHandle<()>>) {
    let acks: Acks = Arc::new(Mutex::new(Vec::new()));
    let body = json!({
        "KeyId": key,
        "Plaintext": base64::engine::general_purpose::STANDARD.encode([7u8; 64]),
    })
    .to_string()
    .into_bytes();
    let threads = (0..CLIENTS)
        .map(|_| {
            let mut c = Conn::open(dev);
            let (acks, stop, body) = (acks.clone(), stop.clone(), body.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match c.call("Encrypt", &body) {
                        Some((200, rid, _)) => {
                            let at = Instant::now();
                            assert!(!rid.is_empty(), "no x-amzn-requestid");
                            acks.lock().unwrap().push((rid, at));
                        }
                        Some((status, _, body)) => panic!("Encrypt answered {status}: {body}"),
                        None => return,
                    }
                }
            })
        })
        .collect();
    (acks, threads)
}

/// Request ids of the Encrypt records in the database (read with the `sqlite3` CLI, as
/// anyone inspecting the crashed node's file would).
fn audited_encrypts(dir: &Path) -> HashSet<String> {
    sqlite3(
        &dir.join("kms.sqlite3"),
        "SELECT request_id FROM audit_log WHERE operation = 'Encrypt' AND result = 'Success'",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// `caas audit verify --json`: the whole chain verifies (hashes, links, seq continuity,
/// signatures) and is not behind the node's checkpoint.
fn assert_chain_verifies(dir: &Path) -> u64 {
    let out = std::process::Command::new(caas_bin())
        .args(["audit", "verify", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "audit verify failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["records_checked"].as_u64().unwrap_or_default()
}

/// Runs the load for `warm` then kills `caas dev` with SIGKILL; returns the acks and the
/// instant just before the kill.
fn load_then_kill(dev: &mut Dev, key: &str, warm: Duration) -> (Vec<(String, Instant)>, Instant) {
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, threads) = load(dev, key, stop.clone());
    std::thread::sleep(warm);
    let killed_at = Instant::now();
    dev.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    (acks, killed_at)
}

/// Every reply acknowledged more than `window` before the kill has its record; returns
/// (acks checked, acks inside the window, of those without a record).
fn check_acks(
    acks: &[(String, Instant)],
    audited: &HashSet<String>,
    killed_at: Instant,
    window: Duration,
) -> (usize, usize, usize) {
    let (mut old, mut recent, mut recent_missing) = (0, 0, 0);
    let mut missing = vec![];
    for (rid, at) in acks {
        let before_kill = killed_at.saturating_duration_since(*at);
        if *at <= killed_at && before_kill > window {
            old += 1;
            if !audited.contains(rid) {
                missing.push((rid.clone(), before_kill));
            }
        } else {
            recent += 1;
            if !audited.contains(rid) {
                recent_missing += 1;
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {old} replies acknowledged more than {window:?} before the kill have no audit \
         record, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    (old, recent, recent_missing)
}

#[test]
fn bounded_mode_kill9_under_load_loses_no_record_older_than_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = start(&dir, "bounded");
    let key = create_key(&dev);
    let (acks, killed_at) = load_then_kill(&mut dev, &key, Duration::from_secs(3));
    assert!(
        acks.len() > 200,
        "too little load to prove anything: {} Encrypts",
        acks.len()
    );
    let audited = audited_encrypts(&dir);
    let (old, recent, recent_missing) =
        check_acks(&acks, &audited, killed_at, caas_store::DEFERRED_WINDOW);
    eprintln!(
        "bounded: {} Encrypts acknowledged; {old} older than the window all audited; \
         {recent} within the window, {recent_missing} of them without a record",
        acks.len()
    );
    // No record of a request that was never answered: every Encrypt record is one we sent
    // (the ids are unique per request), and the chain verifies with no gap or fork.
    let acked: HashMap<&str, ()> = acks.iter().map(|(r, _)| (r.as_str(), ())).collect();
    let unacked = audited
        .iter()
        .filter(|r| !acked.contains_key(r.as_str()))
        .count();
    assert!(
        unacked <= CLIENTS,
        "{unacked} records of requests never answered (at most one in flight per client)"
    );
    let checked = assert_chain_verifies(&dir);
    assert!(checked as usize >= old, "chain has {checked} records");
    // The node restarts on the crashed database (checkpoint not ahead of the chain) and
    // appends after it.
    let mut dev = start(&dir, "bounded");
    let _ = create_key(&dev);
    dev.stop();
    assert_chain_verifies(&dir);
}

#[test]
fn strict_mode_kill9_under_load_loses_no_acknowledged_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = start(&dir, "strict");
    let key = create_key(&dev);
    let (acks, killed_at) = load_then_kill(&mut dev, &key, Duration::from_secs(2));
    assert!(acks.len() > 50, "too little load: {} Encrypts", acks.len());
    let audited = audited_encrypts(&dir);
    let (_, _, recent_missing) = check_acks(&acks, &audited, killed_at, Duration::ZERO);
    assert_eq!(
        recent_missing, 0,
        "strict: an acknowledged reply has no record"
    );
    assert_chain_verifies(&dir);
}

#[test]
fn bounded_mode_clean_stop_under_load_flushes_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = start(&dir, "bounded");
    let key = create_key(&dev);
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, threads) = load(&dev, &key, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    dev.stop(); // SIGTERM: graceful shutdown flushes the queue before exiting
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    assert!(acks.len() > 100, "too little load: {} Encrypts", acks.len());
    let audited = audited_encrypts(&dir);
    let missing: Vec<_> = acks.iter().filter(|(r, _)| !audited.contains(r)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged Encrypts lost at a clean stop",
        missing.len()
    );
    assert_chain_verifies(&dir);
}

#[test]
fn bounded_mode_state_change_is_durable_before_its_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = start(&dir, "bounded");
    let mut c = Conn::open(&dev);
    let (status, rid, body) = c.call("CreateKey", b"{}").unwrap();
    assert_eq!(status, 200, "{body}");
    // Killed right after the reply: the key and its record are on disk.
    dev.kill9();
    let key_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let rec = sqlite3(
        &dir.join("kms.sqlite3"),
        &format!(
            "SELECT operation, key_id FROM audit_log WHERE request_id = '{}'",
            rid.replace('\'', "")
        ),
    );
    assert_eq!(rec.trim(), format!("CreateKey|{key_id}"));
    assert_chain_verifies(&dir);
}
