//! Crash consistency: SIGKILL the proxy during a pipelined random write workload with
//! periodic flushes, restart it (recovery runs on the dirty volume) and check that every
//! block reads back as its last flushed content or a later-written one — never an
//! authentication failure — and that `caas volume check` passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_nbd::transmission::{self as tx, Command, Request};
use common::*;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::process::Command as Proc;
use std::time::Duration;

const BLOCKS: u64 = 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The content of write `seq` to `block` (seq 0 = never written = zeroes).
fn content(block: u64, seq: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0u8; 4096];
    }
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let mut r = Rng(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    while out.len() < 4096 {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out
}

/// Runs the workload until the connection dies; updates `acceptable` (per block, the
/// sequence numbers a read may return).
fn workload(
    sock: &std::path::Path,
    acceptable: &mut [HashSet<u64>],
    next_seq: &mut u64,
    rng: &mut Rng,
) -> u64 {
    let mut c = RawClient::connect(sock);
    // cookie -> block; overlapping writes in flight have no defined order in NBD, so the
    // workload never has two writes to one block in flight.
    let mut inflight: HashMap<u64, u64> = HashMap::new();
    let mut epoch_writes = 0u32;
    let mut latest: HashMap<u64, u64> = HashMap::new();
    let mut cookie = 0u64;
    let mut flushes = 0;
    loop {
        // Fill the pipeline.
        while inflight.len() < 32 && epoch_writes < 64 {
            let block = rng.next() % BLOCKS;
            if inflight.values().any(|&b| b == block) {
                continue;
            }
            *next_seq += 1;
            let seq = *next_seq;
            // Acceptable as soon as it is sent: it may land before the crash.
            acceptable[block as usize].insert(seq);
            latest.insert(block, seq);
            cookie += 1;
            let r = Request {
                flags: 0,
                command: Command::Write,
                cookie,
                offset: block * 4096,
                length: 4096,
            };
            let mut msg = r.encode().to_vec();
            msg.extend_from_slice(&content(block, seq));
            if c.s.write_all(&msg).is_err() {
                return flushes;
            }
            inflight.insert(cookie, block);
            epoch_writes += 1;
        }
        if inflight.is_empty() {
            // Epoch done: flush; once acknowledged, older versions are no longer acceptable.
            cookie += 1;
            let r = Request {
                flags: 0,
                command: Command::Flush,
                cookie,
                offset: 0,
                length: 0,
            };
            if c.s.write_all(&r.encode()).is_err() {
                return flushes;
            }
            let mut h = [0u8; tx::SIMPLE_REPLY_LEN];
            if c.s.read_exact(&mut h).is_err() {
                return flushes;
            }
            let rep = tx::Reply::parse_simple(&h).unwrap();
            assert_eq!((rep.cookie, rep.error), (cookie, 0));
            for (b, seq) in latest.drain() {
                acceptable[b as usize] = HashSet::from([seq]);
            }
            flushes += 1;
            epoch_writes = 0;
            continue;
        }
        let mut h = [0u8; tx::SIMPLE_REPLY_LEN];
        if c.s.read_exact(&mut h).is_err() {
            return flushes;
        }
        let rep = tx::Reply::parse_simple(&h).unwrap();
        assert_eq!(rep.error, 0, "write failed before the crash");
        assert!(inflight.remove(&rep.cookie).is_some());
    }
}

#[test]
fn sigkill_during_random_writes_keeps_every_block_readable() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, &(BLOCKS * 4096).to_string());
    let args = [vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()];
    let mut acceptable: Vec<HashSet<u64>> = (0..BLOCKS).map(|_| HashSet::from([0u64])).collect();
    let mut next_seq = 0u64;
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1);
    for round in 0..4 {
        let srv = Server::start(dir.path(), &format!("r{round}"), &args);
        let pid = srv.child.id();
        let delay = 300 + rng.next() % 700;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            run(Proc::new("kill").arg("-KILL").arg(pid.to_string()));
        });
        let flushes = workload(&srv.socket, &mut acceptable, &mut next_seq, &mut rng);
        killer.join().unwrap();
        srv.crash();
        assert!(
            flushes > 0,
            "round {round}: the workload never reached a flush before the kill"
        );
        // Restart: recovery runs; every block must be acceptable.
        let srv = Server::start(dir.path(), &format!("v{round}"), &args);
        let mut c = RawClient::connect(&srv.socket);
        for b in 0..BLOCKS {
            let (e, data) = c.call(Command::Read, 0, b * 4096, 4096, &[]);
            assert_eq!(
                e,
                0,
                "round {round}: block {b} unreadable after crash: {}",
                srv.log()
            );
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&data[8..16]);
            let seq = if data.iter().all(|&x| x == 0) {
                0
            } else {
                u64::from_le_bytes(seq)
            };
            assert_eq!(
                data,
                content(b, seq),
                "round {round}: block {b} holds garbage"
            );
            assert!(
                acceptable[b as usize].contains(&seq),
                "round {round}: block {b} holds write {seq}, acceptable {:?}",
                acceptable[b as usize]
            );
            acceptable[b as usize] = HashSet::from([seq]);
        }
        drop(c);
        srv.stop();
        let out = run(Proc::new(BIN)
            .arg("check")
            .arg(&vol)
            .arg("--key-file")
            .arg(&key));
        assert!(out.contains("bad: 0"), "{out}");
    }
}

/// The crash window the slot protocol exists for, made deterministic: the metadata of a
/// write reached the store but its data did not. The previous version must read back,
/// recovery must repair the entry, and the block must stay writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_write_reads_back_the_previous_version() {
    use caas_sdp::Store;
    use caas_sdp::engine::{self, KeyInput, Volume};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v");
    let key = KeyInput::Raw(Arc::new(caas_crypto::SecretKey::from_bytes([3; 32])));
    let layout = caas_volume::Layout::new(64 * 4096).unwrap();
    let store = Store::open_file(&path, true, Some(layout.store_len())).unwrap();
    engine::create(&store, &key, 64 * 4096, Default::default(), false)
        .await
        .unwrap();
    let (vol, rep) = Volume::open(store, &key, true).await.unwrap();
    assert!(rep.is_none());
    vol.write(10 * 4096, &mut content(10, 1), false)
        .await
        .unwrap();
    vol.flush().await.unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let mut old_data = vec![0u8; 4096];
    f.read_exact_at(&mut old_data, layout.block_offset(10))
        .unwrap();
    vol.write(10 * 4096, &mut content(10, 2), false)
        .await
        .unwrap();
    drop(vol); // crash: no close, the dirty flag stays set
    // Undo the data write only.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&old_data, layout.block_offset(10)).unwrap();
    let (vol, rep) = Volume::open(Store::open_file(&path, true, None).unwrap(), &key, true)
        .await
        .unwrap();
    let rep = rep.expect("a dirty volume runs recovery");
    assert_eq!((rep.torn, rep.bad_count), (1, 0));
    let mut out = vec![0u8; 4096];
    vol.read(10 * 4096, &mut out).await.unwrap();
    assert_eq!(out, content(10, 1));
    // Recovery left a clean entry: a check finds nothing to repair.
    assert_eq!(vol.scan(false).await.unwrap().torn, 0);
    vol.write(10 * 4096, &mut content(10, 3), false)
        .await
        .unwrap();
    vol.read(10 * 4096, &mut out).await.unwrap();
    assert_eq!(out, content(10, 3));
    vol.close().await.unwrap();
}
