//! Nonce uniqueness and state-sector rollback, from the storage host's position: the
//! tests drive the real `caas-sdp` binary (create, serve, NBD writes with nbdcopy, SIGTERM)
//! and then read the volume files the way storage sees them.
//!
//! `two_volumes_under_one_key_never_reuse_a_nonce` enumerates every AES-GCM (key, nonce)
//! use the documented format implies for a file — per format version, independently of
//! the library — and asserts none repeats across two volumes created under one key file,
//! across sessions of one volume, and across a whole-volume rollback. Against format v1 it
//! fails: the key check value and the header tag of every v1 volume are GMACs under the
//! data key with the fixed nonces 0…01 and 0…02, so two volumes under one key reuse them
//! (two GMACs with one nonce reveal the GHASH key, which allows forgeries).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command as Proc;

const SIZE: u64 = 64 * 4096;

/// An AES-GCM key as storage can name it: the data key itself (v1), or a v2 session key
/// identified by its derivation inputs (volume salt, epoch, session salt).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyName {
    DataKey,
    Session(Vec<u8>),
}

/// Every (key, nonce) use a volume file implies, with where it comes from.
fn aead_uses(file: &[u8]) -> Vec<((KeyName, [u8; 12]), String)> {
    let version = u16::from_be_bytes([file[8], file[9]]);
    let size = u64::from_be_bytes(file[32..40].try_into().unwrap());
    let blocks = size / 4096;
    let mut uses = Vec::new();
    let (slot_size, kind_at) = match version {
        1 => {
            // Key check value and header tag: GMACs under K with fixed nonces.
            let mut n = [0u8; 12];
            n[11] = 1;
            uses.push(((KeyName::DataKey, n), "v1 key check value".into()));
            n[11] = 2;
            uses.push(((KeyName::DataKey, n), "v1 header tag".into()));
            (32, 12)
        }
        // v2: key check value, header tag and state MAC are KDF/HMAC outputs (no nonce).
        2 => (40, 0),
        v => panic!("unknown version {v}"),
    };
    let salt = file[2656..2688].to_vec();
    for b in 0..blocks {
        let e = &file[(4096 + b * 128) as usize..(4096 + b * 128 + 128) as usize];
        for k in 0..3 {
            let s = &e[k * slot_size..(k + 1) * slot_size];
            if s[kind_at] == 0 {
                continue;
            }
            let (key, nonce) = match version {
                1 => (KeyName::DataKey, s[..12].try_into().unwrap()),
                _ => {
                    // kind ‖ session salt (11) ‖ epoch (4) ‖ counter (8) ‖ tag
                    let mut id = salt.clone();
                    id.extend_from_slice(&s[1..16]);
                    let mut n = [0u8; 12];
                    n[..4].copy_from_slice(&s[12..16]);
                    n[4..].copy_from_slice(&s[16..24]);
                    (KeyName::Session(id), n)
                }
            };
            uses.push(((key, nonce), format!("block {b} slot {k}")));
        }
    }
    uses
}

/// First 16 bytes of every data block's ciphertext.
fn ciphertext_prefixes(file: &[u8]) -> Vec<[u8; 16]> {
    let size = u64::from_be_bytes(file[32..40].try_into().unwrap());
    let data = u64::from_be_bytes(file[56..64].try_into().unwrap());
    (0..size / 4096)
        .map(|b| {
            let at = (data + b * 4096) as usize;
            file[at..at + 16].try_into().unwrap()
        })
        .collect()
}

/// One writing session: serve, copy `raw` over the whole disk, SIGTERM.
fn write_session(dir: &Path, vol: &Path, key: &Path, raw: &Path) {
    let s = Server::start(
        dir,
        "w",
        &[vol.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    run(Proc::new("nbdcopy").arg(raw).arg(s.uri()));
    s.stop();
}

/// The tag bytes of a slot named by [`aead_uses`] (to tell a slot that persists in a
/// later snapshot from a second use of its (key, nonce)).
fn slot_tag(file: &[u8], what: &str) -> Vec<u8> {
    if !what.starts_with("block ") {
        return file[3568..3584].to_vec();
    }
    let mut it = what.split(' ');
    let b: usize = it.nth(1).unwrap().parse().unwrap();
    let k: usize = it.nth(1).unwrap().parse().unwrap();
    let (size, tag_at) = if file[9] == 1 { (32, 16) } else { (40, 24) };
    let at = 4096 + b * 128 + k * size + tag_at;
    file[at..at + 16].to_vec()
}

#[test]
fn two_volumes_under_one_key_never_reuse_a_nonce() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = key_file(d);
    let raws: Vec<_> = (0..4)
        .map(|i| {
            let p = d.join(format!("raw{i}"));
            random_file(&p, SIZE as usize);
            p
        })
        .collect();
    let (a, b) = (d.join("a.caasvol"), d.join("b.caasvol"));
    for v in [&a, &b] {
        run(Proc::new(BIN)
            .args(["create", "--size", &SIZE.to_string(), "--out"])
            .arg(v)
            .arg("--key-file")
            .arg(&key));
    }
    // (label, which volume file, bytes)
    let mut files: Vec<(&str, char, Vec<u8>)> = Vec::new();
    // The same data into both volumes.
    write_session(d, &a, &key, &raws[0]);
    write_session(d, &b, &key, &raws[0]);
    files.push(("a after session 1", 'a', std::fs::read(&a).unwrap()));
    files.push(("b after session 1", 'b', std::fs::read(&b).unwrap()));
    // A second session of `a`.
    write_session(d, &a, &key, &raws[1]);
    files.push(("a after session 2", 'a', std::fs::read(&a).unwrap()));
    // Whole-volume rollback by storage: snapshot, a session, restore the snapshot, a new
    // session. The new session must not repeat any (key, nonce) of the lost one.
    let snapshot = std::fs::read(&a).unwrap();
    write_session(d, &a, &key, &raws[2]);
    files.push(("a after session 3", 'a', std::fs::read(&a).unwrap()));
    std::fs::write(&a, &snapshot).unwrap();
    write_session(d, &a, &key, &raws[3]);
    files.push(("a after rollback and session 3'", 'a', std::fs::read(&a).unwrap()));

    // (key, nonce) -> (file, tag, where). A slot that persists into a later snapshot of
    // the same file (same key, nonce and tag) is one use; anything else is a repeat.
    let mut seen: HashMap<(KeyName, [u8; 12]), (char, Vec<u8>, String)> = HashMap::new();
    for (name, letter, f) in &files {
        for (u, what) in aead_uses(f) {
            let tag = slot_tag(f, &what);
            let here = format!("{name}: {what}");
            match seen.get(&u) {
                Some((l, t, _)) if l == letter && *t == tag => {}
                Some((_, _, prev)) => panic!(
                    "AES-GCM (key, nonce) = ({:?}, {}) used twice: {prev} and {here}",
                    u.0,
                    hex::encode(u.1)
                ),
                None => {
                    seen.insert(u, (*letter, tag, here));
                }
            }
        }
    }
    assert!(seen.len() >= 5 * 64, "too few nonce uses collected: {}", seen.len());
    // The same plaintext went into both volumes: their ciphertexts must still differ.
    let mut prefixes: HashMap<[u8; 16], String> = HashMap::new();
    for (name, letter, f) in &files {
        for (i, p) in ciphertext_prefixes(f).into_iter().enumerate() {
            let here = format!("{letter} block {i}");
            if let Some(prev) = prefixes.get(&p)
                && *prev != here
            {
                panic!("ciphertext prefix repeated: {prev} and {name}: block {i}");
            }
            prefixes.insert(p, here);
        }
    }
}
