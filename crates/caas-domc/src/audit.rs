//! The crypto domain's tamper-evident audit log: one JSON line per operation (who = the
//! application instance, what = the PKCS#11 call and key, when, result), hash-chained and
//! authenticated with caas's one chain construction ([`caas_crypto::chain`], domain
//! `caas/domc/audit`): each line carries the previous record's hash (`prev`), its own
//! record hash over its body (`hash`) and an HMAC-SHA256 tag of that hash (`tag`) under a key
//! derived from the domain key ([`audit_key`]). Any edit, deletion, insertion or reordering
//! breaks the chain — also for an editor who recomputes the hashes, since the tags need the
//! domain key. The tenant reads and checks it with `caas domc audit` (which needs the domain
//! key). Entries never contain key material, PINs or data.
//!
//! Threat model: the domain key holder (the crypto domain process; root on its host, who can
//! read its memory or its key source) can still rewrite the log; the keyed chain makes edits
//! by anyone without the domain key (a file editor, a backup, the storage) evident. A cut
//! tail (the newest lines removed) is not detected: that needs the head anchored outside the
//! file (as the key service's checkpoint does), which the crypto domain does not have yet.
//!
//! Durability: successful routine key uses (a signature, a decryption...) are buffered and
//! reach the file within `FLUSH_INTERVAL` (100 ms) — by the next record or the flusher
//! thread —, so a `kill -9` of the domain loses at most that window of them; every other
//! record (any failure, logins, object and token changes, refusals) is written through at
//! once with everything before it. Buffering never merges records: each key use is its own
//! line, its own chain step and tag, in the order served. On the hot path the body is
//! formatted before the chain's lock is taken (`body_tail`); it is byte for byte the JSON
//! the verifier rebuilds (test `fast_record_body_is_the_serde_body`).
//!
//! Format: the record body is the JSON of the fields `seq` … `rv` (the line up to, without,
//! its `prev`); lines written before the keyed chain (no `tag`) do not verify and make
//! [`AuditLog::open`] refuse the file: move it aside.

use crate::Error;
use crate::keysource::DomainKey;
use caas_crypto::chain::{self, ChainVerifier, HmacChainKey, LogDomain, RecordSigner as _};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One audit record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Application instance (first 8 bytes of its id, hex).
    pub app: String,
    /// The operation (`C_Sign`, `C_Login`...).
    pub op: String,
    /// Slot.
    pub slot: u64,
    /// Key or object concerned: `handle:label`.
    pub object: String,
    /// Mechanism, hex, when relevant.
    pub mechanism: String,
    /// CK_RV result, hex.
    pub rv: String,
    /// Hash of the previous entry (hex; zeros for the first).
    pub prev: String,
    /// The record hash (`caas_crypto::chain::record_hash`) over this entry's body, hex.
    #[serde(default)]
    pub hash: String,
    /// HMAC-SHA256 of `hash` under the domain's audit key ([`audit_key`]), hex.
    #[serde(default)]
    pub tag: String,
}

/// The record body: the fields up to `rv`, serialized in this order.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time_ms: u64,
    app: &'a str,
    op: &'a str,
    slot: u64,
    object: &'a str,
    mechanism: &'a str,
    rv: &'a str,
}

impl Entry {
    /// The canonical body bytes (a JSON object of `seq` … `rv`).
    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            seq: self.seq,
            time_ms: self.time_ms,
            app: &self.app,
            op: &self.op,
            slot: self.slot,
            object: &self.object,
            mechanism: &self.mechanism,
            rv: &self.rv,
        })
        .unwrap_or_default()
    }

    /// The JSON line (with its newline) and hash of the entry `seq` after `prev`: the body,
    /// with `prev`, `hash` and `tag` appended as its last fields (the hot path builds the
    /// same bytes with [`body_tail`] and [`seal`]; the tests hold the two together).
    #[cfg(test)]
    fn line(&self, prev: &[u8; 32], key: &HmacChainKey) -> (Vec<u8>, [u8; 32]) {
        seal(self.body(), self.seq, prev, key)
    }
}

/// Appends the lowercase hex of `b` (the chain's hex, as [`chain::hex32`] writes it).
fn push_hex(out: &mut Vec<u8>, b: &[u8]) {
    let at = out.len();
    out.resize(at + 2 * b.len(), 0);
    // The slice is exactly twice `b`'s length: encoding cannot fail.
    let _ = hex::encode_to_slice(b, &mut out[at..]);
}

/// Appends `n` in decimal (writing to a `Vec` cannot fail).
fn push_u64(out: &mut Vec<u8>, n: u64) {
    let _ = write!(out, "{n}");
}

/// Appends `"0x<hex>"` (a CK_ULONG as the log writes it, `format!("0x{n:x}")`).
fn push_ulong_hex(out: &mut Vec<u8>, n: u64) {
    let _ = write!(out, "\"0x{n:x}\"");
}

/// The record body of `r` (byte for byte what serde_json makes of [`Entry::body`]'s fields)
/// without its `{"seq":N,` head: everything that does not depend on the chain, so it is
/// formatted before the log's lock is taken. Ends with the body's closing brace.
fn body_tail(r: &Record<'_>, time_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(128 + r.object.len());
    b.extend_from_slice(b"\"time_ms\":");
    push_u64(&mut b, time_ms);
    b.extend_from_slice(b",\"app\":\"");
    push_hex(&mut b, &r.app[..8]);
    b.extend_from_slice(b"\",\"op\":");
    // Strings that may carry anything (a label) are escaped by serde_json itself.
    let _ = serde_json::to_writer(&mut b, r.op);
    b.extend_from_slice(b",\"slot\":");
    push_u64(&mut b, r.slot);
    b.extend_from_slice(b",\"object\":");
    let _ = serde_json::to_writer(&mut b, &r.object);
    b.extend_from_slice(b",\"mechanism\":");
    match r.mechanism {
        Some(m) => push_ulong_hex(&mut b, m),
        None => b.extend_from_slice(b"\"\""),
    }
    b.extend_from_slice(b",\"rv\":");
    push_ulong_hex(&mut b, r.rv);
    b.push(b'}');
    b
}

/// The body of record `seq` from its [`body_tail`].
fn body_with_seq(seq: u64, tail: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(tail.len() + 32 + 240);
    b.extend_from_slice(b"{\"seq\":");
    push_u64(&mut b, seq);
    b.push(b',');
    b.extend_from_slice(tail);
    b
}

/// The JSON line (with its newline) and hash of the record `seq` with `body` after `prev`:
/// the body, with `prev`, `hash` and `tag` appended as its last fields.
fn seal(mut line: Vec<u8>, seq: u64, prev: &[u8; 32], key: &HmacChainKey) -> (Vec<u8>, [u8; 32]) {
    let hash = chain::record_hash(LogDomain::DOMC_AUDIT, prev, seq, &line);
    let tag = key.sign(&hash);
    line.pop(); // the body's closing brace
    line.reserve(250);
    line.extend_from_slice(b",\"prev\":\"");
    push_hex(&mut line, prev);
    line.extend_from_slice(b"\",\"hash\":\"");
    push_hex(&mut line, &hash);
    line.extend_from_slice(b"\",\"tag\":\"");
    push_hex(&mut line, &tag);
    line.extend_from_slice(b"\"}\n");
    (line, hash)
}

/// The audit log's chain key: derived from the domain key (label `caas chain key`, context
/// `caas/domc/audit`), used for nothing else.
///
/// # Errors
/// Not expected (the domain key has 32 bytes).
pub fn audit_key(key: &DomainKey) -> Result<HmacChainKey, Error> {
    HmacChainKey::derive(key.expose(), LogDomain::DOMC_AUDIT)
        .map_err(|e| Error::DomainKey(format!("audit key: {e}")))
}

#[derive(Debug)]
struct Tail {
    seq: u64,
    prev: [u8; 32],
    out: std::io::BufWriter<std::fs::File>,
    last_flush: std::time::Instant,
}

/// Routine successful key uses are flushed at most this late (by the next record or the
/// flusher thread); failures and administrative events are flushed immediately.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Successful key uses (the hot path: a signature, a decryption...) are "routine": their
/// records are buffered and reach the file within [`FLUSH_INTERVAL`]; everything else (any
/// failure, logins, object and token changes) is written through at once, together with
/// whatever routine records precede it.
fn is_routine(op: &str) -> bool {
    matches!(
        op,
        "C_Sign"
            | "C_SignInit"
            | "C_Verify"
            | "C_VerifyInit"
            | "C_Encrypt"
            | "C_EncryptInit"
            | "C_Decrypt"
            | "C_DecryptInit"
    )
}

/// The append side of the log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    key: HmacChainKey,
    tail: Mutex<Tail>,
}

/// What to record.
#[derive(Debug, Clone, Default)]
pub struct Record<'a> {
    /// Application id.
    pub app: [u8; 16],
    /// Operation.
    pub op: &'a str,
    /// Slot.
    pub slot: u64,
    /// Object description.
    pub object: String,
    /// Mechanism.
    pub mechanism: Option<u64>,
    /// Result.
    pub rv: u64,
}

impl AuditLog {
    /// Opens (verifying with `key`, see [`audit_key`]) or creates the log at `path`.
    ///
    /// # Errors
    /// [`Error::AuditChain`] when the existing log does not verify (edited, or written
    /// without this domain's key).
    pub fn open(path: &Path, key: HmacChainKey) -> Result<Self, Error> {
        let (seq, prev) = if path.exists() {
            let entries = verify(path, &key)?;
            match entries.last() {
                Some(e) => (e.seq, hash32(&e.hash, e.seq)?),
                None => (0, chain::GENESIS),
            }
        } else {
            (0, chain::GENESIS)
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io("open audit log", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            key,
            tail: Mutex::new(Tail {
                seq,
                prev,
                out: std::io::BufWriter::with_capacity(256 * 1024, f),
                last_flush: std::time::Instant::now(),
            }),
        })
    }

    /// Flushes buffered records.
    pub fn flush(&self) {
        let mut t = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.out.flush().is_err() {
            tracing::error!("audit log flush failed");
        }
        t.last_flush = std::time::Instant::now();
    }

    /// Starts a thread that flushes buffered records every 100 ms.
    pub fn start_flusher(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("audit-flush".into())
            .spawn(move || {
                while let Some(log) = weak.upgrade() {
                    log.flush();
                    drop(log);
                    std::thread::sleep(FLUSH_INTERVAL);
                }
            });
    }

    /// Path of the log.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record.
    pub fn record(&self, r: Record<'_>) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Everything that does not depend on the chain is formatted before taking the lock
        // (two connection threads signing at once only serialise on the chain step).
        let tail = body_tail(&r, time_ms);
        let routine = r.rv == 0 && is_routine(r.op);
        let mut t = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = t.seq + 1;
        let (line, hash) = seal(body_with_seq(seq, &tail), seq, &t.prev, &self.key);
        // One write_all per line: the buffer is only ever flushed at line boundaries, so a
        // reader (or a crash) never sees half an entry.
        let flush_now = !routine || t.last_flush.elapsed() >= FLUSH_INTERVAL;
        let written = t.out.write_all(&line).and_then(|()| {
            if flush_now {
                t.last_flush = std::time::Instant::now();
                t.out.flush()
            } else {
                Ok(())
            }
        });
        if written.is_err() {
            tracing::error!("audit log write failed");
            return;
        }
        t.seq = seq;
        t.prev = hash;
    }
}

fn hash32(hex: &str, seq: u64) -> Result<[u8; 32], Error> {
    chain::unhex(hex)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| Error::AuditChain {
            seq,
            reason: "hash is not 32 bytes of hex".into(),
        })
}

/// Reads and verifies the whole chain (seq, links, record hashes and tags under `key`, with
/// the shared verifier), returning the entries.
///
/// # Errors
/// [`Error::AuditChain`] naming the first bad entry; I/O errors.
pub fn verify(path: &Path, key: &HmacChainKey) -> Result<Vec<Entry>, Error> {
    verify_with(path, Some(key))
}

/// [`verify`] without the tags, for a log whose domain key is gone (an `--ephemeral-key`
/// domain, as trusted launch runs them, generates its key in memory and never stores it):
/// checks seq, links and record hashes only, which an editor of the file can recompute.
/// Say so wherever its result is shown.
///
/// # Errors
/// As [`verify`].
pub fn verify_links_only(path: &Path) -> Result<Vec<Entry>, Error> {
    verify_with(path, None)
}

fn verify_with(path: &Path, key: Option<&HmacChainKey>) -> Result<Vec<Entry>, Error> {
    let f = std::fs::File::open(path).map_err(Error::io("open audit log", path))?;
    let mut v = ChainVerifier::new(LogDomain::DOMC_AUDIT);
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let seq = i as u64 + 1;
        let line = line.map_err(Error::io("read audit log", path))?;
        let e: Entry = serde_json::from_str(&line).map_err(|err| Error::AuditChain {
            seq,
            reason: format!("unparsable entry: {err}"),
        })?;
        let malformed = |what: &str| Error::AuditChain {
            seq,
            reason: format!("{what} is not hex"),
        };
        let prev = chain::unhex(&e.prev).ok_or_else(|| malformed("prev"))?;
        let hash = chain::unhex(&e.hash).ok_or_else(|| malformed("hash"))?;
        let tag = chain::unhex(&e.tag).ok_or_else(|| malformed("tag"))?;
        v.check(
            &chain::StoredRecord {
                seq: e.seq,
                prev_hash: &prev,
                hash: &hash,
                body: &e.body(),
                tag: &tag,
            },
            &|h, t| key.is_none_or(|k| k.verify(h, t)),
        )
        .map_err(|f| Error::AuditChain {
            seq: f.seq,
            reason: f.reason.to_string(),
        })?;
        out.push(e);
    }
    Ok(out)
}

/// [`verify`] with the key derived from the domain key in `key_file` (a `--key-file`
/// domain's `STATE/domain.key`).
///
/// # Errors
/// As [`verify`]; the key file's errors.
pub fn verify_with_key_file(path: &Path, key_file: &Path) -> Result<Vec<Entry>, Error> {
    use crate::keysource::DomainKeySource as _;
    let dk = crate::keysource::KeyFile {
        path: key_file.to_path_buf(),
        create: false,
    }
    .load()?;
    verify(path, &audit_key(&dk)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> HmacChainKey {
        audit_key(&DomainKey::new([b; 32])).unwrap()
    }

    #[test]
    fn line_parses_back_and_verifies() -> Result<(), Box<dyn std::error::Error>> {
        let e = Entry {
            seq: 1,
            time_ms: 5,
            app: "00aa".into(),
            op: "C_Sign".into(),
            slot: 0,
            object: "7:key \"q\"".into(),
            mechanism: "0x1041".into(),
            rv: "0x0".into(),
            prev: String::new(),
            hash: String::new(),
            tag: String::new(),
        };
        let k = key(1);
        let (line, hash) = e.line(&chain::GENESIS, &k);
        let parsed: Entry = serde_json::from_slice(&line)?;
        assert_eq!(parsed.hash, chain::hex32(&hash));
        assert_eq!(parsed.prev, "0".repeat(64));
        assert!(line.ends_with(b"\"}\n"));
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("audit.log");
        std::fs::write(&p, &line)?;
        assert_eq!(verify(&p, &k)?, vec![parsed]);
        Ok(())
    }

    /// The line written on the hot path is byte for byte the serde_json line the verifier
    /// rebuilds, for labels an application chose (quotes, backslashes, control characters,
    /// non-ASCII) and every shape of mechanism and result.
    #[test]
    fn fast_record_body_is_the_serde_body() -> Result<(), Box<dyn std::error::Error>> {
        let k = key(3);
        let labels = [
            "7:key",
            "",
            "9:a \"quoted\" \\ label\n\t\u{1}\u{7f}",
            "12:clé 🔑 \u{2028}",
        ];
        for (i, label) in labels.iter().enumerate() {
            for (mech, rv) in [
                (None, 0),
                (Some(0), 0x0),
                (Some(0x1041), 0x101),
                (Some(u64::MAX), u64::MAX),
                (Some(0x8000_0000_0000_0010), 0x10),
            ] {
                let seq = (i as u64) * 1000 + u64::from(rv == 0);
                let r = Record {
                    app: [0xa5; 16],
                    op: "C_Sign",
                    slot: 3,
                    object: (*label).to_string(),
                    mechanism: mech,
                    rv,
                };
                let fast = body_with_seq(seq, &body_tail(&r, 1_733_000_000_123));
                let e = Entry {
                    seq,
                    time_ms: 1_733_000_000_123,
                    app: hex::encode(&r.app[..8]),
                    op: r.op.to_string(),
                    slot: r.slot,
                    object: r.object.clone(),
                    mechanism: mech.map(|m| format!("0x{m:x}")).unwrap_or_default(),
                    rv: format!("0x{rv:x}"),
                    prev: String::new(),
                    hash: String::new(),
                    tag: String::new(),
                };
                assert_eq!(
                    String::from_utf8(fast.clone())?,
                    String::from_utf8(e.body())?
                );
                let prev = [i as u8; 32];
                assert_eq!(seal(fast, seq, &prev, &k), e.line(&prev, &k));
            }
        }
        Ok(())
    }

    fn write_log(p: &Path, k: u8) -> Result<(), Box<dyn std::error::Error>> {
        let log = AuditLog::open(p, key(k))?;
        for op in ["C_Login", "C_Sign", "C_Sign"] {
            log.record(Record {
                app: [1; 16],
                op,
                rv: 0,
                ..Default::default()
            });
        }
        drop(log);
        // Reopening continues the chain.
        AuditLog::open(p, key(k))?.record(Record {
            app: [1; 16],
            op: "C_Logout",
            ..Default::default()
        });
        Ok(())
    }

    #[test]
    fn chain_detects_edits() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("audit.log");
        write_log(&p, 1)?;
        assert_eq!(verify(&p, &key(1))?.len(), 4);
        // Routine successful uses may wait for the flusher; a failure writes through with
        // everything before it, always as whole lines.
        let log = AuditLog::open(&p, key(1))?;
        log.record(Record {
            app: [1; 16],
            op: "C_Sign",
            ..Default::default()
        });
        log.record(Record {
            app: [1; 16],
            op: "C_Sign",
            rv: 0x200,
            ..Default::default()
        });
        assert_eq!(verify(&p, &key(1))?.len(), 6);
        log.record(Record {
            app: [1; 16],
            op: "C_Verify",
            ..Default::default()
        });
        log.flush();
        assert_eq!(verify(&p, &key(1))?.len(), 7);
        drop(log);
        let text = std::fs::read_to_string(&p)?;
        std::fs::write(&p, text.replacen("C_Sign", "C_Verify", 1))?;
        assert!(matches!(
            verify(&p, &key(1)),
            Err(Error::AuditChain { seq: 2, .. })
        ));
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&p, format!("{}\n{}\n", lines[0], lines[2]))?;
        assert!(matches!(
            verify(&p, &key(1)),
            Err(Error::AuditChain { seq: 2, .. })
        ));
        Ok(())
    }

    /// The attack the unkeyed chain allowed: an editor of the file changes a record (a
    /// refused `C_Sign` becomes a `C_Verify`) and recomputes every hash after it. The tags
    /// need the domain key: the log no longer verifies, and the domain refuses to open it.
    #[test]
    fn edited_domc_audit_record_is_detected() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("audit.log");
        write_log(&p, 1)?;
        let mut entries = verify(&p, &key(1))?;
        entries[1].op = "C_Verify".into();
        // Recompute the chain as an attacker would: new hashes, links, seqs; tags copied (or
        // computed under a key the attacker guesses).
        let mut head = chain::Head::GENESIS;
        let mut forged = String::new();
        for e in &mut entries {
            let (_, prev, hash) = head.advance(LogDomain::DOMC_AUDIT, &e.body());
            e.prev = chain::hex32(&prev);
            e.hash = chain::hex32(&hash);
            forged.push_str(&serde_json::to_string(e)?);
            forged.push('\n');
        }
        std::fs::write(&p, &forged)?;
        assert!(
            matches!(verify(&p, &key(1)), Err(Error::AuditChain { seq: 2, ref reason }) if reason.contains("signature")),
            "a re-hashed edit verified"
        );
        assert!(AuditLog::open(&p, key(1)).is_err());
        // Re-tagged under another key (another domain's, or a guess): refused just the same.
        let other = key(2);
        let mut head = chain::Head::GENESIS;
        let mut retagged = String::new();
        for e in &mut entries {
            let (_, _, hash) = head.advance(LogDomain::DOMC_AUDIT, &e.body());
            e.tag = hex::encode(other.sign(&hash));
            retagged.push_str(&serde_json::to_string(e)?);
            retagged.push('\n');
        }
        std::fs::write(&p, &retagged)?;
        assert!(matches!(
            verify(&p, &key(1)),
            Err(Error::AuditChain { seq: 1, .. })
        ));
        Ok(())
    }

    #[test]
    fn unkeyed_log_of_the_old_format_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("audit.log");
        std::fs::write(
            &p,
            concat!(
                r#"{"seq":1,"time_ms":5,"app":"00","op":"C_Login","slot":0,"object":"","#,
                r#""mechanism":"","rv":"0x0","prev":"0000000000000000000000000000000000000000000000000000000000000000","#,
                r#""hash":"1111111111111111111111111111111111111111111111111111111111111111"}"#,
                "\n"
            ),
        )?;
        assert!(matches!(
            verify(&p, &key(1)),
            Err(Error::AuditChain { seq: 1, .. })
        ));
        assert!(AuditLog::open(&p, key(1)).is_err());
        Ok(())
    }
}
