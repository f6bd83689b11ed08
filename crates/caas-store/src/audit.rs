//! The audit chain, sans-IO: the canonical record hash, the conversion of stored rows into
//! records, and the chain verifier that `Store::audit_verify` feeds page by page.
//!
//! Record hash (one global chain per store):
//! `SHA-256(prev_hash ‖ seq as u64 BE ‖ F(time_ms as i64 BE) ‖ F(account) ‖ F(principal) ‖
//! F(operation) ‖ K(key_id) ‖ F(result) ‖ F(request_id) ‖ F(detail))` where `F(x)` is the
//! byte length of `x` as u64 BE followed by `x`, and `K(None)` is `u64::MAX` BE (no bytes
//! follow) while `K(Some(x))` is `F(x)`. The genesis `prev_hash` is 32 zero bytes.

use crate::{AuditEntry, AuditRecord, Error};
use aws_lc_rs::digest;
use std::fmt;

/// `prev_hash` of the first record of a chain.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

/// The canonical hash of the record `seq` whose predecessor hashed to `prev_hash`:
/// `SHA-256(prev_hash ‖ seq as u64 BE ‖ F(time_ms as i64 BE) ‖ F(account) ‖ F(principal) ‖
/// F(operation) ‖ K(key_id) ‖ F(result) ‖ F(request_id) ‖ F(detail))`, where `F(x)` is the
/// byte length of `x` as u64 BE followed by `x`, `K(None)` is `u64::MAX` BE alone and
/// `K(Some(x))` is `F(x)`. The first record's `prev_hash` is [`GENESIS_HASH`].
pub fn chain_hash(prev_hash: &[u8; 32], seq: u64, entry: &AuditEntry) -> [u8; 32] {
    fn field(ctx: &mut digest::Context, bytes: &[u8]) {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev_hash);
    ctx.update(&seq.to_be_bytes());
    field(&mut ctx, &entry.time_ms.to_be_bytes());
    field(&mut ctx, entry.account.as_bytes());
    field(&mut ctx, entry.principal.as_bytes());
    field(&mut ctx, entry.operation.as_bytes());
    match &entry.key_id {
        None => ctx.update(&u64::MAX.to_be_bytes()),
        Some(k) => field(&mut ctx, k.as_bytes()),
    }
    field(&mut ctx, entry.result.as_bytes());
    field(&mut ctx, entry.request_id.as_bytes());
    field(&mut ctx, entry.detail.as_bytes());
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// One row of the audit table as stored, before any validation.
#[derive(Debug, Clone)]
pub(crate) struct RawAuditRow {
    pub seq: i64,
    pub entry: AuditEntry,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub signature: Vec<u8>,
}

fn hash32(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

impl RawAuditRow {
    /// Strict conversion for `audit_list`: any malformed column is `Error::Corrupt`.
    pub fn into_record(self) -> Result<AuditRecord, Error> {
        let seq = u64::try_from(self.seq)
            .map_err(|_| Error::Corrupt(format!("audit record with negative seq {}", self.seq)))?;
        let prev_hash = hash32(&self.prev_hash).ok_or_else(|| {
            Error::Corrupt(format!("audit record {seq}: prev_hash is not 32 bytes"))
        })?;
        let hash = hash32(&self.hash)
            .ok_or_else(|| Error::Corrupt(format!("audit record {seq}: hash is not 32 bytes")))?;
        Ok(AuditRecord {
            seq,
            entry: self.entry,
            prev_hash,
            hash,
            signature: self.signature,
        })
    }
}

/// The current end of the chain as recorded in the head row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    #[cfg(test)]
    pub const GENESIS: Head = Head {
        seq: 0,
        hash: GENESIS_HASH,
    };

    pub fn from_raw(seq: i64, hash: &[u8]) -> Result<Head, Error> {
        let seq = u64::try_from(seq)
            .map_err(|_| Error::Corrupt(format!("audit head has negative seq {seq}")))?;
        let hash =
            hash32(hash).ok_or_else(|| Error::Corrupt("audit head hash is not 32 bytes".into()))?;
        Ok(Head { seq, hash })
    }

    /// Appends `entry` after this head: returns the record's seq, prev_hash and hash, and
    /// moves the head.
    pub fn advance(&mut self, entry: &AuditEntry) -> (u64, [u8; 32], [u8; 32]) {
        let seq = self.seq + 1;
        let prev = self.hash;
        let hash = chain_hash(&prev, seq, entry);
        *self = Head { seq, hash };
        (seq, prev, hash)
    }
}

/// Why a record failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditFaultReason {
    /// A record with this seq should exist but does not (removed record or removed tail).
    Missing,
    /// A record carries a seq other than the next one expected (removed or reordered records).
    UnexpectedSeq {
        /// The seq found where `AuditFault::seq` was expected.
        found: i64,
    },
    /// The stored `prev_hash` does not equal the previous record's hash.
    BrokenLink,
    /// The stored hash does not match the record's content (edited or moved record).
    HashMismatch,
    /// The signature over the hash does not verify.
    BadSignature,
    /// A column has the wrong shape (for example a hash that is not 32 bytes).
    Malformed(String),
    /// The chain head row does not match the last record.
    HeadMismatch,
}

impl fmt::Display for AuditFaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "record is missing"),
            Self::UnexpectedSeq { found } => write!(f, "found seq {found} instead"),
            Self::BrokenLink => write!(f, "prev_hash does not match the previous record's hash"),
            Self::HashMismatch => write!(f, "hash does not match the record's content"),
            Self::BadSignature => write!(f, "signature does not verify"),
            Self::Malformed(m) => write!(f, "malformed record: {m}"),
            Self::HeadMismatch => write!(f, "chain head does not match the last record"),
        }
    }
}

/// The first bad record found by `audit_verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFault {
    /// The seq at which the chain is broken.
    pub seq: u64,
    /// What is wrong there.
    pub reason: AuditFaultReason,
}

impl fmt::Display for AuditFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit record {}: {}", self.seq, self.reason)
    }
}

/// Result of `Store::audit_verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerifyReport {
    /// Records that verified (hash, link, seq and signature) before the first fault, or all
    /// records when there is none.
    pub checked: u64,
    /// Seq of the chain head when verification started (records appended later are not checked).
    pub head_seq: u64,
    /// The first bad record, if any.
    pub first_bad: Option<AuditFault>,
}

impl AuditVerifyReport {
    /// True when the whole chain verified.
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Checks records in ascending order; feed it every row with seq <= head.seq.
pub(crate) struct ChainVerifier {
    next_seq: u64,
    prev_hash: [u8; 32],
    checked: u64,
}

impl ChainVerifier {
    pub fn new() -> Self {
        ChainVerifier {
            next_seq: 1,
            prev_hash: GENESIS_HASH,
            checked: 0,
        }
    }

    pub fn checked(&self) -> u64 {
        self.checked
    }

    pub fn check(
        &mut self,
        row: &RawAuditRow,
        verify: &dyn Fn(&[u8; 32], &[u8]) -> bool,
    ) -> Result<(), AuditFault> {
        let expected = self.next_seq;
        let fault = |reason| AuditFault {
            seq: expected,
            reason,
        };
        if u64::try_from(row.seq).ok() != Some(expected) {
            // A gap (removed record) or a seq out of place (reordered or edited seq).
            let reason = if row.seq > 0 && u64::try_from(row.seq).is_ok_and(|s| s > expected) {
                AuditFaultReason::Missing
            } else {
                AuditFaultReason::UnexpectedSeq { found: row.seq }
            };
            return Err(fault(reason));
        }
        let Some(prev) = hash32(&row.prev_hash) else {
            return Err(fault(AuditFaultReason::Malformed(
                "prev_hash is not 32 bytes".into(),
            )));
        };
        let Some(hash) = hash32(&row.hash) else {
            return Err(fault(AuditFaultReason::Malformed(
                "hash is not 32 bytes".into(),
            )));
        };
        if chain_hash(&prev, expected, &row.entry) != hash {
            return Err(fault(AuditFaultReason::HashMismatch));
        }
        if prev != self.prev_hash {
            return Err(fault(AuditFaultReason::BrokenLink));
        }
        if !verify(&hash, &row.signature) {
            return Err(fault(AuditFaultReason::BadSignature));
        }
        self.next_seq += 1;
        self.prev_hash = hash;
        self.checked += 1;
        Ok(())
    }

    /// Called after the last row: the chain must end exactly at the head.
    pub fn finish(&self, head: &Head) -> Result<(), AuditFault> {
        if self.next_seq <= head.seq {
            return Err(AuditFault {
                seq: self.next_seq,
                reason: AuditFaultReason::Missing,
            });
        }
        if self.next_seq != head.seq + 1 || self.prev_hash != head.hash {
            return Err(AuditFault {
                seq: head.seq,
                reason: AuditFaultReason::HeadMismatch,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]
    use super::*;

    fn entry(detail: &str, key_id: Option<&str>) -> AuditEntry {
        AuditEntry {
            time_ms: 1_700_000_000_000,
            account: "111122223333".into(),
            principal: "AKIAEXAMPLE".into(),
            operation: "Encrypt".into(),
            key_id: key_id.map(Into::into),
            result: "Success".into(),
            request_id: "req-1".into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn hash_separates_fields_and_none() {
        let a = chain_hash(&GENESIS_HASH, 1, &entry("{}", None));
        let b = chain_hash(&GENESIS_HASH, 1, &entry("{}", Some("")));
        let c = chain_hash(&GENESIS_HASH, 2, &entry("{}", None));
        let mut moved = entry("{}", None);
        moved.request_id = "req-1{".into();
        moved.detail = "}".into();
        let d = chain_hash(&GENESIS_HASH, 1, &moved);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a, chain_hash(&GENESIS_HASH, 1, &entry("{}", None)));
    }

    #[test]
    fn hash_known_answer() {
        // Independent computation of the documented encoding for a small entry.
        let e = AuditEntry {
            time_ms: 1,
            account: "a".into(),
            principal: String::new(),
            operation: "op".into(),
            key_id: None,
            result: "ok".into(),
            request_id: "r".into(),
            detail: "{}".into(),
        };
        let mut buf = Vec::new();
        buf.extend_from_slice(&[0u8; 32]);
        buf.extend_from_slice(&7u64.to_be_bytes());
        for f in [&1i64.to_be_bytes()[..], b"a", b"", b"op"] {
            buf.extend_from_slice(&(f.len() as u64).to_be_bytes());
            buf.extend_from_slice(f);
        }
        buf.extend_from_slice(&[0xff; 8]);
        for f in [&b"ok"[..], b"r", b"{}"] {
            buf.extend_from_slice(&(f.len() as u64).to_be_bytes());
            buf.extend_from_slice(f);
        }
        let want = digest::digest(&digest::SHA256, &buf);
        assert_eq!(&chain_hash(&GENESIS_HASH, 7, &e)[..], want.as_ref());
    }

    fn chain(n: usize) -> (Vec<RawAuditRow>, Head) {
        let mut head = Head::GENESIS;
        let rows = (0..n)
            .map(|i| {
                let e = entry(&format!("{{\"i\":{i}}}"), Some("k"));
                let (seq, prev, hash) = head.advance(&e);
                RawAuditRow {
                    seq: seq as i64,
                    entry: e,
                    prev_hash: prev.to_vec(),
                    hash: hash.to_vec(),
                    signature: hash[..4].to_vec(),
                }
            })
            .collect();
        (rows, head)
    }

    fn run(rows: &[RawAuditRow], head: &Head) -> Result<u64, AuditFault> {
        let sig_ok = |h: &[u8; 32], s: &[u8]| s == &h[..4];
        let mut v = ChainVerifier::new();
        for r in rows {
            v.check(r, &sig_ok)?;
        }
        v.finish(head)?;
        Ok(v.checked())
    }

    #[test]
    fn verifier_accepts_intact_and_finds_faults() {
        let (rows, head) = chain(5);
        assert_eq!(run(&rows, &head), Ok(5));
        let mut edited = rows.clone();
        edited[2].entry.result = "Denied".into();
        assert_eq!(
            run(&edited, &head).unwrap_err().reason,
            AuditFaultReason::HashMismatch
        );
        let mut removed = rows.clone();
        removed.remove(1);
        assert_eq!(
            run(&removed, &head).unwrap_err(),
            AuditFault {
                seq: 2,
                reason: AuditFaultReason::Missing
            }
        );
        let mut tail = rows.clone();
        tail.pop();
        assert_eq!(run(&tail, &head).unwrap_err().seq, 5);
        let mut badsig = rows.clone();
        badsig[3].signature = vec![0];
        assert_eq!(
            run(&badsig, &head).unwrap_err(),
            AuditFault {
                seq: 4,
                reason: AuditFaultReason::BadSignature
            }
        );
        let mut short = rows.clone();
        short[0].hash.pop();
        assert!(matches!(
            run(&short, &head).unwrap_err().reason,
            AuditFaultReason::Malformed(_)
        ));
    }
}
