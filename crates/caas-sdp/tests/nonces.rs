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
    files.push((
        "a after rollback and session 3'",
        'a',
        std::fs::read(&a).unwrap(),
    ));

    // (key, nonce) -> (file, tag, where). A slot that persists into a later snapshot of
    // the same file (same key, nonce and tag) is one use; anything else is a repeat.
    type Use = (KeyName, [u8; 12]);
    let mut seen: HashMap<Use, (char, Vec<u8>, String)> = HashMap::new();
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
    assert!(
        seen.len() >= 5 * 64,
        "too few nonce uses collected: {}",
        seen.len()
    );
    // The check above names session keys by their derivation inputs as stored; this one
    // does not trust the naming. Had session 3' reused session 3's key and nonces (e.g. a
    // derivation without the session salt), ct3 ⊕ ct3' would equal raw3 ⊕ raw3' block by block.
    let (raw3, raw3b) = (
        std::fs::read(&raws[2]).unwrap(),
        std::fs::read(&raws[3]).unwrap(),
    );
    let (ct3, ct3b) = (
        ciphertext_prefixes(&files[3].2),
        ciphertext_prefixes(&files[4].2),
    );
    let mut reused = 0;
    for (i, (x, y)) in ct3.iter().zip(&ct3b).enumerate() {
        let at = i * 4096;
        let keystream_shared = (0..16).all(|j| x[j] ^ y[j] == raw3[at + j] ^ raw3b[at + j]);
        reused += usize::from(keystream_shared);
    }
    assert_eq!(
        reused, 0,
        "session 3' reused session 3's keystream in {reused} blocks"
    );
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

const STATE: std::ops::Range<usize> = 3584..4096;

fn read_range(path: &Path, r: std::ops::Range<usize>) -> Vec<u8> {
    std::fs::read(path).unwrap()[r].to_vec()
}

fn write_range(path: &Path, at: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at as u64).unwrap();
}

/// `caas-sdp serve` on a refused volume: it must exit with an error (never serve), say
/// why, and (for an integrity event) leave an audit record naming the event.
fn serve_is_refused(vol: &Path, key: &Path, extra: &[&str], why: &str, event: Option<&str>) {
    let out = Proc::new(BIN)
        .arg("serve")
        .arg(vol)
        .arg("--key-file")
        .arg(key)
        .arg("--socket")
        .arg(vol.with_extension("sock"))
        .args(extra)
        .env("CAAS_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served a refused volume: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "printed a serving line"
    );
    assert!(stderr.contains(why), "no `{why}` in: {stderr}");
    if let Some(event) = event {
        assert!(
            stderr.contains("caas_sdp::audit") && stderr.contains(&format!("event=\"{event}\"")),
            "no audit record `{event}` in: {stderr}"
        );
    }
}

async fn open_err(vol: &Path, key: &Path, writable: bool, min_epoch: u32) -> caas_volume::Error {
    use caas_sdp::engine::{KeyInput, OpenOptions, Volume};
    let k = caas_volume::keys::read_key_file(key).unwrap();
    let store = caas_sdp::Store::open_file(vol, writable, None).unwrap();
    let opts = OpenOptions {
        writable,
        min_epoch,
    };
    match Volume::open_with(store, &KeyInput::Raw(std::sync::Arc::new(k)), opts).await {
        Err(caas_sdp::Error::Volume(e)) => e,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a rolled-back volume (writable={writable})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_state_sector_is_detected() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = key_file(d);
    let raws: Vec<_> = (0..2)
        .map(|i| {
            let p = d.join(format!("raw{i}"));
            random_file(&p, SIZE as usize);
            p
        })
        .collect();
    let vol = d.join("v.caasvol");
    run(Proc::new(BIN)
        .args(["create", "--size", &SIZE.to_string(), "--out"])
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
    write_session(d, &vol, &key, &raws[0]); // epoch 2
    let old_state = read_range(&vol, STATE);
    let whole_snapshot = std::fs::read(&vol).unwrap();
    write_session(d, &vol, &key, &raws[1]); // epoch 3
    let good_state = read_range(&vol, STATE);

    // 1. Mix-and-match: storage restores the old (validly MACed) state sector only.
    write_range(&vol, STATE.start, &old_state);
    for writable in [true, false] {
        assert_eq!(
            open_err(&vol, &key, writable, 0).await,
            caas_volume::Error::StateRollback {
                recorded: 2,
                seen: 3
            }
        );
    }
    serve_is_refused(
        &vol,
        &key,
        &[],
        "state sector rolled back",
        Some("state_rollback"),
    );
    serve_is_refused(
        &vol,
        &key,
        &["--read-only"],
        "state sector rolled back",
        Some("state_rollback"),
    );
    let check = Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        !check.status.success(),
        "check accepted a rolled-back state sector"
    );

    // 2. An edited state sector (epoch raised, MAC kept; or a flipped MAC bit): refused.
    for at in [15usize, 500] {
        let mut edited = good_state.clone();
        edited[at] ^= 1;
        write_range(&vol, STATE.start, &edited);
        assert_eq!(
            open_err(&vol, &key, true, 0).await,
            caas_volume::Error::StateTampered
        );
        serve_is_refused(
            &vol,
            &key,
            &[],
            "state sector authentication failed",
            Some("state_tampered"),
        );
    }
    // 3. A state sector from another volume under the same key: refused.
    let other = d.join("o.caasvol");
    run(Proc::new(BIN)
        .args(["create", "--size", &SIZE.to_string(), "--out"])
        .arg(&other)
        .arg("--key-file")
        .arg(&key));
    write_range(&vol, STATE.start, &read_range(&other, STATE));
    assert_eq!(
        open_err(&vol, &key, false, 0).await,
        caas_volume::Error::StateTampered
    );

    // The real state sector opens, and every block holds the last session's data.
    write_range(&vol, STATE.start, &good_state);
    let out = d.join("out.raw");
    run(Proc::new(BIN)
        .arg("export")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key)
        .arg("--out")
        .arg(&out));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&raws[1]).unwrap()
    );

    // 4. A whole-volume rollback to a consistent snapshot cannot be told from the volume
    // alone; with the epoch the caller anchored elsewhere (3, the last session's) it is.
    std::fs::write(&vol, &whole_snapshot).unwrap();
    assert_eq!(
        open_err(&vol, &key, true, 3).await,
        caas_volume::Error::EpochBehind {
            epoch: 2,
            expected: 3
        }
    );
    serve_is_refused(
        &vol,
        &key,
        &["--min-epoch", "3"],
        "epoch 2 is behind the expected epoch 3",
        Some("volume_rollback"),
    );
    // Without the anchor it opens (documented limit), and its next session is epoch 3
    // again — but with a fresh session key (see the nonce test above).
    let s = Server::start(
        d,
        "again",
        &[
            vol.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--min-epoch",
            "2",
        ],
    );
    s.stop();
}

/// The v1 fixture `tests/fixtures/v1-8blocks.caasvol` was made by the format v1 code
/// (commit 437258f): `caas-sdp import` of an image then a second session writing the whole
/// disk with nbdcopy, key 32 × 0x42. Its content is [`v1_fixture_content`].
fn v1_fixture_content() -> Vec<u8> {
    (0..8 * 4096usize)
        .map(|o| {
            if o / 4096 == 3 {
                0
            } else {
                ((o * 7 + 3 + 2 * 101) % 251) as u8
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_volume_upgrades_to_v2() {
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("key");
    std::fs::write(&key, [0x42u8; 32]).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-8blocks.caasvol");
    let vol = d.join("v1.caasvol");
    std::fs::copy(&fixture, &vol).unwrap();
    let expect = v1_fixture_content();
    let export = |v: &Path| {
        let out = d.join("out.raw");
        let _ = std::fs::remove_file(&out);
        run(Proc::new(BIN)
            .arg("export")
            .arg(v)
            .arg("--key-file")
            .arg(&key)
            .arg("--out")
            .arg(&out));
        std::fs::read(&out).unwrap()
    };
    let info = |v: &Path| {
        run(Proc::new(BIN)
            .arg("info")
            .arg(v)
            .arg("--key-file")
            .arg(&key))
    };
    // v1 stays readable (export, read-only serve) and is never written as v1.
    assert!(info(&vol).contains("caas volume v1"), "{}", info(&vol));
    assert_eq!(export(&vol), expect);
    let s = Server::start(
        d,
        "ro",
        &[
            vol.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--read-only",
        ],
    );
    let got = d.join("got.raw");
    run(Proc::new("nbdcopy").arg(s.uri()).arg(&got));
    s.stop();
    assert_eq!(std::fs::read(&got).unwrap(), expect);
    {
        use caas_sdp::engine::{KeyInput, Volume};
        let k = KeyInput::Raw(std::sync::Arc::new(
            caas_volume::keys::read_key_file(&key).unwrap(),
        ));
        let store = caas_sdp::Store::open_file(&vol, true, None).unwrap();
        let r = Volume::open(store, &k, true).await;
        assert!(
            matches!(
                r,
                Err(caas_sdp::Error::Volume(caas_volume::Error::V1ReadOnly))
            ),
            "{r:?}"
        );
    }
    assert_eq!(
        std::fs::read(&vol).unwrap(),
        std::fs::read(&fixture).unwrap()
    );

    // Automatic upgrade: serving a v1 volume file for writing upgrades it first.
    let auto = d.join("auto.caasvol");
    std::fs::copy(&fixture, &auto).unwrap();
    let s = Server::start(
        d,
        "auto",
        &[auto.to_str().unwrap(), "--key-file", key.to_str().unwrap()],
    );
    run(Proc::new("nbdcopy").arg(s.uri()).arg(&got));
    assert_eq!(std::fs::read(&got).unwrap(), expect);
    s.stop();
    assert_eq!(std::fs::read(&auto).unwrap()[9], 2, "not upgraded");
    assert_eq!(export(&auto), expect);

    // A damaged v1 volume does not upgrade, and the original stays as it was.
    let damaged = d.join("damaged.caasvol");
    let mut bytes = std::fs::read(&fixture).unwrap();
    bytes[8192 + 2 * 4096 + 10] ^= 1;
    std::fs::write(&damaged, &bytes).unwrap();
    let out = Proc::new(BIN)
        .arg("upgrade")
        .arg(&damaged)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("block 2 failed authentication"));
    assert_eq!(std::fs::read(&damaged).unwrap(), bytes);
    assert!(!d.join("damaged.caasvol.upgrade-tmp").exists());

    // Upgrade into another file (the source is kept), then in place.
    let copy = d.join("v2-copy.caasvol");
    run(Proc::new(BIN)
        .arg("upgrade")
        .arg(&vol)
        .arg("--out")
        .arg(&copy)
        .arg("--key-file")
        .arg(&key));
    assert_eq!(
        std::fs::read(&vol).unwrap(),
        std::fs::read(&fixture).unwrap()
    );
    assert_eq!(export(&copy), expect);
    // A temporary file left by an interrupted upgrade does not block the next one.
    std::fs::write(d.join("v1.caasvol.upgrade-tmp"), b"partial").unwrap();
    let up = run(Proc::new(BIN)
        .arg("upgrade")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
    assert!(up.contains("upgraded volume to format v2"), "{up}");
    assert!(!d.join("v1.caasvol.upgrade-tmp").exists());
    let v2 = std::fs::read(&vol).unwrap();
    assert_eq!(u16::from_be_bytes([v2[8], v2[9]]), 2);
    assert_eq!(v2.len(), bytes.len(), "same layout and size");
    let i = info(&vol);
    assert!(
        i.contains("caas volume v2") && i.contains("state sector MAC"),
        "{i}"
    );
    assert_eq!(export(&vol), expect);
    run(Proc::new(BIN)
        .arg("check")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key));
    // Only v2 uses remain: no fixed-nonce GMAC under the data key, no v1 slot.
    assert!(
        aead_uses(&v2)
            .iter()
            .all(|((k, _), _)| *k != KeyName::DataKey)
    );
    // A second upgrade is refused; the upgraded volume is writable.
    let again = Proc::new(BIN)
        .arg("upgrade")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("already format v2"));
    let raw = d.join("new.raw");
    let data = random_file(&raw, 8 * 4096);
    write_session(d, &vol, &key, &raw);
    assert_eq!(export(&vol), data);
}
