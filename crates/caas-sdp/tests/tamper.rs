//! Integrity attacks on the ciphertext store: flipped bytes in a data block or in its
//! metadata, swapped and moved blocks, blocks carried over from another volume. Each must
//! make exactly the affected block fail with EIO (never return wrong data), and leave an
//! audit record in the proxy's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_crypto::SecretKey;
use caas_sdp::engine::{self, KeyInput, Volume};
use caas_sdp::{Error, Store};
use caas_volume::header::Dbsp;
use caas_volume::{ENTRY_SIZE, Layout, Version};

const SLOT_SIZE: usize = Version::V2.slot_size();
/// Offset of the kind byte within a v2 slot.
const KIND_AT: usize = 0;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command as Proc;
use std::sync::Arc;

const BLOCKS: u64 = 16;

fn key() -> KeyInput {
    KeyInput::Raw(Arc::new(SecretKey::from_bytes([0x42; 32])))
}

/// Creates a 16-block volume: block i holds `content(i, gen)`; block 5 was written twice
/// (so it has a superseded slot), block 9 was zeroed after a write.
async fn build(path: &Path) -> Vec<Vec<u8>> {
    let layout = Layout::new(BLOCKS * 4096).unwrap();
    let store = Store::open_file(path, true, Some(layout.store_len())).unwrap();
    engine::create(&store, &key(), BLOCKS * 4096, Dbsp::default(), false)
        .await
        .unwrap();
    let (vol, _) = Volume::open(store, &key(), true).await.unwrap();
    let mut expect = Vec::new();
    for i in 0..BLOCKS {
        let mut b: Vec<u8> = (0..4096u32).map(|j| (j as u8) ^ (i as u8 * 17)).collect();
        vol.write(i * 4096, &mut b.clone(), false).await.unwrap();
        if i == 5 {
            b = vec![0xee; 4096];
            vol.write(i * 4096, &mut b.clone(), false).await.unwrap();
        }
        if i == 9 {
            vol.zero(i * 4096, 4096, false).await.unwrap();
            b = vec![0; 4096];
        }
        expect.push(b);
    }
    vol.close().await.unwrap();
    expect
}

/// Opens read-only and reads every block; returns the indices that failed, asserting
/// the others return exactly the expected data.
async fn failing_blocks(path: &Path, expect: &[Vec<u8>]) -> Vec<u64> {
    let (vol, _) = Volume::open(Store::open_file(path, false, None).unwrap(), &key(), false)
        .await
        .unwrap();
    let mut bad = Vec::new();
    for i in 0..BLOCKS {
        let mut out = vec![0u8; 4096];
        match vol.read(i * 4096, &mut out).await {
            Ok(()) => assert_eq!(out, expect[i as usize], "block {i} returned wrong data"),
            Err(Error::BlockAuth { index, .. }) => {
                assert_eq!(index, i);
                bad.push(i);
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    bad
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, at).unwrap();
}

/// The slot index holding the block's current version (highest counter).
fn current_slot(path: &Path, layout: &Layout, block: u64) -> usize {
    let f = std::fs::File::open(path).unwrap();
    let mut e = [0u8; ENTRY_SIZE];
    f.read_exact_at(&mut e, layout.entry_offset(block)).unwrap();
    caas_volume::Entry::decode(&e, Version::V2)
        .newest()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_any_byte_of_a_block_or_its_metadata_fails_exactly_that_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v");
    let expect = build(&path).await;
    let layout = Layout::new(BLOCKS * 4096).unwrap();
    assert!(failing_blocks(&path, &expect).await.is_empty());
    for block in [0u64, 5, 9, 15] {
        let cur = current_slot(&path, &layout, block) as u64;
        let mut positions: Vec<u64> = (0..4096)
            .step_by(61)
            .map(|o| layout.block_offset(block) + o)
            .collect();
        positions.push(layout.block_offset(block) + 4095);
        let entry = layout.entry_offset(block);
        // Every byte of the entry except superseded slots (older versions kept for crash
        // consistency, see docs/volume-format.md): the current slot, empty slots and the
        // reserved bytes.
        let f = std::fs::File::open(&path).unwrap();
        let mut raw = [0u8; ENTRY_SIZE];
        f.read_exact_at(&mut raw, entry).unwrap();
        let superseded = |slot: u64| slot != cur && raw[(slot as usize) * SLOT_SIZE + KIND_AT] != 0;
        positions.extend(
            (0..ENTRY_SIZE as u64)
                .filter(|o| o / SLOT_SIZE as u64 >= 3 || !superseded(o / SLOT_SIZE as u64))
                .map(|o| entry + o),
        );
        // 68 ciphertext positions, and at least the current 40-byte slot and the 8
        // reserved bytes of the entry (block 5 has two superseded slots).
        assert!(
            positions.len() >= 68 + 48,
            "block {block}: only {} positions",
            positions.len()
        );
        for pos in positions {
            flip(&path, pos);
            let bad = failing_blocks(&path, &expect).await;
            flip(&path, pos);
            assert_eq!(
                bad,
                vec![block],
                "flip at {pos} (block {block}, current slot {cur})"
            );
        }
    }
    assert!(failing_blocks(&path, &expect).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_and_moved_blocks_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v");
    let expect = build(&path).await;
    let layout = Layout::new(BLOCKS * 4096).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off).unwrap();
        b
    };
    // Swap data and metadata of blocks 3 and 4 (a consistent pair each).
    let (d3, d4) = (
        read(layout.block_offset(3), 4096),
        read(layout.block_offset(4), 4096),
    );
    let (e3, e4) = (
        read(layout.entry_offset(3), ENTRY_SIZE),
        read(layout.entry_offset(4), ENTRY_SIZE),
    );
    f.write_all_at(&d4, layout.block_offset(3)).unwrap();
    f.write_all_at(&d3, layout.block_offset(4)).unwrap();
    f.write_all_at(&e4, layout.entry_offset(3)).unwrap();
    f.write_all_at(&e3, layout.entry_offset(4)).unwrap();
    assert_eq!(failing_blocks(&path, &expect).await, vec![3, 4]);
    // Restore, then swap only the data.
    f.write_all_at(&e3, layout.entry_offset(3)).unwrap();
    f.write_all_at(&e4, layout.entry_offset(4)).unwrap();
    assert_eq!(failing_blocks(&path, &expect).await, vec![3, 4]);
    f.write_all_at(&d3, layout.block_offset(3)).unwrap();
    f.write_all_at(&d4, layout.block_offset(4)).unwrap();
    assert!(failing_blocks(&path, &expect).await.is_empty());
    // A block (data + entry) carried over from another volume under the same key.
    let other = dir.path().join("w");
    build(&other).await;
    let g = std::fs::File::open(&other).unwrap();
    let mut d = vec![0u8; 4096];
    let mut e = vec![0u8; ENTRY_SIZE];
    g.read_exact_at(&mut d, layout.block_offset(7)).unwrap();
    g.read_exact_at(&mut e, layout.entry_offset(7)).unwrap();
    f.write_all_at(&d, layout.block_offset(7)).unwrap();
    f.write_all_at(&e, layout.entry_offset(7)).unwrap();
    assert_eq!(failing_blocks(&path, &expect).await, vec![7]);
}

#[test]
fn a_tampered_block_gives_eio_to_qemu_io_and_an_audit_record() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "1M");
    let args = [vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()];
    let srv = Server::start(dir.path(), "a", &args);
    run(Proc::new("qemu-io").args(["-f", "raw", &srv.uri(), "-c", "write -P 0x61 0 1048576"]));
    srv.stop();
    let layout = Layout::new(1 << 20).unwrap();
    flip(&vol, layout.block_offset(7) + 1234);
    let srv = Server::start(dir.path(), "b", &args);
    let out = Proc::new("qemu-io")
        .args(["-f", "raw", &srv.uri(), "-c", "read -P 0x61 28672 4096"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    assert!(!text.contains("read 4096/4096"), "{text}");
    // The neighbours are fine.
    let ok = run(Proc::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri(),
        "-c",
        "read -P 0x61 0 28672",
        "-c",
        "read -P 0x61 32768 1015808",
    ]));
    assert!(!ok.contains("failed"), "{ok}");
    srv.stop();
    let log = std::fs::read_to_string(dir.path().join("b.stderr")).unwrap();
    assert!(
        log.contains("block_auth_failure") && log.contains("block=7"),
        "no audit record in: {log}"
    );
    // `volume check` reports exactly that block and fails.
    let out = Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("bad: 1") && stdout.contains("[7]"),
        "{stdout}"
    );
}

/// Returns the first 16-byte run of `plain` found anywhere in `cipher`.
fn find_plaintext_run(plain: &[u8], cipher: &[u8]) -> Option<usize> {
    let mut windows = std::collections::HashSet::with_capacity(plain.len());
    for w in plain.windows(16) {
        windows.insert(u128::from_ne_bytes(w.try_into().unwrap()));
    }
    cipher
        .windows(16)
        .position(|w| windows.contains(&u128::from_ne_bytes(w.try_into().unwrap())))
}

#[test]
fn canary_plaintext_never_appears_in_the_ciphertext() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let vol = dir.path().join("vol.caasvol");
    create_volume(&vol, &key, "8M");
    // Low-entropy canary (the same 4 KiB block repeated) then random data.
    let mut canary = b"CANARY-PLAINTEXT-caas-sdp-0123456789abcdef-".repeat(96);
    canary.truncate(4096);
    let mut plain = canary.repeat(1024);
    let rnd = random_file(&dir.path().join("rnd"), 4 << 20);
    plain.extend_from_slice(&rnd);
    let raw = dir.path().join("in.raw");
    std::fs::write(&raw, &plain).unwrap();
    let srv = Server::start(
        dir.path(),
        "s",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    run(Proc::new("nbdcopy").arg(&raw).arg(srv.uri()));
    srv.stop();
    let ct = std::fs::read(&vol).unwrap();
    let key_bytes = std::fs::read(&key).unwrap();
    assert_eq!(
        find_plaintext_run(&canary, &ct),
        None,
        "canary plaintext found in ciphertext"
    );
    assert_eq!(
        find_plaintext_run(&rnd, &ct),
        None,
        "random plaintext found in ciphertext"
    );
    assert_eq!(
        find_plaintext_run(&key_bytes, &ct),
        None,
        "key found in ciphertext"
    );
    // Sanity: the scanner does find a run that is there.
    let mut probe = ct.clone();
    probe[1000..1016].copy_from_slice(&rnd[5000..5016]);
    assert_eq!(find_plaintext_run(&rnd, &probe), Some(1000));
}
