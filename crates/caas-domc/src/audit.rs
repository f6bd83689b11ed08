//! The crypto domain's tamper-evident audit log: one JSON line per operation (who = the
//! application instance, what = the PKCS#11 call and key, when, result), each carrying the
//! SHA-256 of the previous line's hash and its own content, so any edit, deletion or
//! reordering breaks the chain. The tenant reads and checks it with `caas domc audit`.
//! Entries never contain key material, PINs or data.

use crate::Error;
use aws_lc_rs::digest;
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
    /// SHA-256(prev || JSON of this entry without `hash`), hex.
    #[serde(default)]
    pub hash: String,
}

impl Entry {
    /// The JSON line (with its newline) and hash of an entry whose `hash` is still empty,
    /// serializing it once: the hashed body is the line with `"hash":""`, and `hash` is the
    /// last field, so the line is the body with the hash spliced in before `"}`.
    fn line(&self) -> Option<(Vec<u8>, String)> {
        let mut body = serde_json::to_vec(self).ok()?;
        if !self.hash.is_empty() || !body.ends_with(br#","hash":""}"#) {
            return None;
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(self.prev.as_bytes());
        ctx.update(&body);
        let hash = hex::encode(ctx.finish().as_ref());
        body.truncate(body.len() - 2);
        body.extend_from_slice(hash.as_bytes());
        body.extend_from_slice(b"\"}\n");
        Some((body, hash))
    }

    fn compute_hash(&self) -> String {
        let mut e = self.clone();
        e.hash = String::new();
        let body = serde_json::to_vec(&e).unwrap_or_default();
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(self.prev.as_bytes());
        ctx.update(&body);
        hex::encode(ctx.finish().as_ref())
    }
}

#[derive(Debug)]
struct Tail {
    seq: u64,
    prev: String,
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
    /// Opens (verifying) or creates the log at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let (seq, prev) = if path.exists() {
            let entries = verify(path)?;
            entries
                .last()
                .map_or((0, "0".repeat(64)), |e| (e.seq, e.hash.clone()))
        } else {
            (0, "0".repeat(64))
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io("open audit log", path))?;
        Ok(Self {
            path: path.to_path_buf(),
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
        // Everything that does not depend on the chain is formatted before taking the lock.
        let mut e = Entry {
            seq: 0,
            time_ms,
            app: hex::encode(&r.app[..8]),
            op: r.op.to_string(),
            slot: r.slot,
            object: r.object,
            mechanism: r.mechanism.map(|m| format!("0x{m:x}")).unwrap_or_default(),
            rv: format!("0x{:x}", r.rv),
            prev: String::new(),
            hash: String::new(),
        };
        let routine = r.rv == 0 && is_routine(r.op);
        let mut t = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        e.seq = t.seq + 1;
        e.prev = t.prev.clone();
        let (line, hash) = match e.line() {
            Some(x) => x,
            None => {
                // Not expected (the layout is fixed); the slow, obviously right way.
                let hash = e.compute_hash();
                e.hash = hash.clone();
                let Ok(mut line) = serde_json::to_vec(&e) else {
                    tracing::error!("audit entry not serializable");
                    return;
                };
                line.push(b'\n');
                (line, hash)
            }
        };
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
        t.seq = e.seq;
        t.prev = hash;
    }
}

/// Reads and verifies the whole chain, returning the entries.
pub fn verify(path: &Path) -> Result<Vec<Entry>, Error> {
    let f = std::fs::File::open(path).map_err(Error::io("open audit log", path))?;
    let mut prev = "0".repeat(64);
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let seq = i as u64 + 1;
        let line = line.map_err(Error::io("read audit log", path))?;
        let e: Entry = serde_json::from_str(&line).map_err(|err| Error::AuditChain {
            seq,
            reason: format!("unparsable entry: {err}"),
        })?;
        if e.seq != seq {
            return Err(Error::AuditChain {
                seq,
                reason: format!("sequence number {} out of order", e.seq),
            });
        }
        if e.prev != prev {
            return Err(Error::AuditChain {
                seq,
                reason: "previous-hash link does not match".into(),
            });
        }
        if e.compute_hash() != e.hash {
            return Err(Error::AuditChain {
                seq,
                reason: "entry hash does not match its content".into(),
            });
        }
        prev = e.hash.clone();
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_line_matches_the_verified_form() -> Result<(), Box<dyn std::error::Error>> {
        let e = Entry {
            seq: 3,
            time_ms: 5,
            app: "00aa".into(),
            op: "C_Sign".into(),
            slot: 0,
            object: "7:key \"q\"".into(),
            mechanism: "0x1041".into(),
            rv: "0x0".into(),
            prev: "ab".repeat(32),
            hash: String::new(),
        };
        let (line, hash) = e.line().ok_or("no fast line")?;
        let parsed: Entry = serde_json::from_slice(&line)?;
        assert_eq!(parsed.hash, hash);
        assert_eq!(parsed.compute_hash(), hash);
        assert!(line.ends_with(b"\"}\n"));
        Ok(())
    }

    #[test]
    fn chain_detects_edits() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("audit.log");
        let log = AuditLog::open(&p)?;
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
        AuditLog::open(&p)?.record(Record {
            app: [1; 16],
            op: "C_Logout",
            ..Default::default()
        });
        assert_eq!(verify(&p)?.len(), 4);
        // Routine successful uses may wait for the flusher; a failure writes through with
        // everything before it, always as whole lines.
        let log = AuditLog::open(&p)?;
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
        assert_eq!(verify(&p)?.len(), 6);
        log.record(Record {
            app: [1; 16],
            op: "C_Verify",
            ..Default::default()
        });
        log.flush();
        assert_eq!(verify(&p)?.len(), 7);
        drop(log);
        let text = std::fs::read_to_string(&p)?;
        std::fs::write(&p, text.replacen("C_Sign", "C_Verify", 1))?;
        assert!(matches!(verify(&p), Err(Error::AuditChain { seq: 2, .. })));
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&p, format!("{}\n{}\n", lines[0], lines[2]))?;
        assert!(matches!(verify(&p), Err(Error::AuditChain { seq: 2, .. })));
        Ok(())
    }
}
