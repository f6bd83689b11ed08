//! The audit chain, sans-IO: the canonical record body, the conversion of stored rows into
//! records, and the chain verifier that `Store::audit_verify` feeds page by page. Hashing,
//! linking and verification are the one chain construction of caas
//! ([`caas_crypto::chain`], domain [`LogDomain::KMS_AUDIT`]); this file only says what the
//! body of a key-service audit record is.
//!
//! Record hash (one global chain per store): `chain::record_hash(KMS_AUDIT, prev_hash, seq,
//! body)` with `body = F(time_ms as i64 BE) ‖ F(account) ‖ F(principal) ‖ F(operation) ‖
//! K(key_id) ‖ F(result) ‖ F(request_id) ‖ F(detail)`, where `F(x)` is the byte length of
//! `x` as u64 BE followed by `x`, and `K(None)` is `u64::MAX` BE (no bytes follow) while
//! `K(Some(x))` is `F(x)`. The genesis `prev_hash` is 32 zero bytes.
//!
//! Format change: before the shared construction, the hash was `SHA-256(prev_hash ‖ seq ‖
//! body)` without the `caas-chain-v1` prefix and domain; audit chains written by such a build
//! report `HashMismatch` at record 1 (caas had no release; there is no migration).

use crate::{AuditEntry, AuditRecord, Error};
use caas_crypto::chain::{self, LogDomain, StoredRecord};

/// `prev_hash` of the first record of a chain.
pub const GENESIS_HASH: [u8; 32] = chain::GENESIS;

/// Why a record failed verification (the shared chain's reasons).
pub type AuditFaultReason = chain::FaultReason;

/// The first bad record found by `audit_verify`.
pub type AuditFault = chain::ChainFault;

/// The canonical body of a key-service audit record (module doc).
pub fn record_body(entry: &AuditEntry) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(128 + entry.detail.len());
    field(&mut out, &entry.time_ms.to_be_bytes());
    field(&mut out, entry.account.as_bytes());
    field(&mut out, entry.principal.as_bytes());
    field(&mut out, entry.operation.as_bytes());
    match &entry.key_id {
        None => out.extend_from_slice(&u64::MAX.to_be_bytes()),
        Some(k) => field(&mut out, k.as_bytes()),
    }
    field(&mut out, entry.result.as_bytes());
    field(&mut out, entry.request_id.as_bytes());
    field(&mut out, entry.detail.as_bytes());
    out
}

/// The canonical hash of the record `seq` whose predecessor hashed to `prev_hash`:
/// `caas_crypto::chain::record_hash(LogDomain::KMS_AUDIT, prev_hash, seq, body)` with the
/// body of [`record_body`] (module doc). The first record's `prev_hash` is [`GENESIS_HASH`].
pub fn chain_hash(prev_hash: &[u8; 32], seq: u64, entry: &AuditEntry) -> [u8; 32] {
    chain::record_hash(LogDomain::KMS_AUDIT, prev_hash, seq, &record_body(entry))
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
        let mut h = chain::Head {
            seq: self.seq,
            hash: self.hash,
        };
        let r = h.advance(LogDomain::KMS_AUDIT, &record_body(entry));
        *self = Head {
            seq: h.seq,
            hash: h.hash,
        };
        r
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

/// Checks records in ascending order; feed it every row with seq <= head.seq. The shared
/// chain verifier over the rows' canonical bodies.
///
/// The writer signs one record per group commit, the group's last; the others are stored
/// with an empty signature. Each record's hash covers its predecessor's, so a signature over
/// a record authenticates every record before it: a record with an empty signature is
/// accepted once a later record's signature verifies, and a chain whose last record is not
/// signed fails (`BadSignature` at the first record no signature covers). A non-empty
/// signature must verify. Editing, removing, inserting or reordering any record still
/// breaks a hash or link up to the next signature.
pub(crate) struct ChainVerifier {
    inner: chain::ChainVerifier,
    /// Records checked since the last signed one, and the first of them.
    uncovered: u64,
    first_uncovered: Option<u64>,
}

impl ChainVerifier {
    pub fn new() -> Self {
        ChainVerifier {
            inner: chain::ChainVerifier::new(LogDomain::KMS_AUDIT),
            uncovered: 0,
            first_uncovered: None,
        }
    }

    /// Records authenticated so far (those awaiting a later signature are not counted).
    pub fn checked(&self) -> u64 {
        self.inner.checked() - self.uncovered
    }

    pub fn check(
        &mut self,
        row: &RawAuditRow,
        verify: &dyn Fn(&[u8; 32], &[u8]) -> bool,
    ) -> Result<(), AuditFault> {
        let Ok(seq) = u64::try_from(row.seq) else {
            return Err(AuditFault {
                seq: self.inner.head().seq + 1,
                reason: AuditFaultReason::Malformed(format!("negative seq {}", row.seq)),
            });
        };
        let body = record_body(&row.entry);
        let unsigned = row.signature.is_empty();
        self.inner.check(
            &StoredRecord {
                seq,
                prev_hash: &row.prev_hash,
                hash: &row.hash,
                body: &body,
                tag: &row.signature,
            },
            // An empty signature defers to a later record's (checked in `finish` too).
            &|h, t| unsigned || verify(h, t),
        )?;
        if unsigned {
            self.uncovered += 1;
            self.first_uncovered.get_or_insert(seq);
        } else {
            self.uncovered = 0;
            self.first_uncovered = None;
        }
        Ok(())
    }

    /// Called after the last row: the chain must end exactly at the head, and its last
    /// record must be signed.
    pub fn finish(&self, head: &Head) -> Result<(), AuditFault> {
        self.inner.finish(&chain::Head {
            seq: head.seq,
            hash: head.hash,
        })?;
        match self.first_uncovered {
            Some(seq) => Err(AuditFault {
                seq,
                reason: AuditFaultReason::BadSignature,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]
    use super::*;
    use aws_lc_rs::digest;

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
        let mut body = Vec::new();
        for f in [&1i64.to_be_bytes()[..], b"a", b"", b"op"] {
            body.extend_from_slice(&(f.len() as u64).to_be_bytes());
            body.extend_from_slice(f);
        }
        body.extend_from_slice(&[0xff; 8]);
        for f in [&b"ok"[..], b"r", b"{}"] {
            body.extend_from_slice(&(f.len() as u64).to_be_bytes());
            body.extend_from_slice(f);
        }
        let mut buf = b"caas-chain-v1\0".to_vec();
        buf.extend_from_slice(&14u64.to_be_bytes());
        buf.extend_from_slice(b"caas/kms/audit");
        buf.extend_from_slice(&[0u8; 32]);
        buf.extend_from_slice(&7u64.to_be_bytes());
        buf.extend_from_slice(&(body.len() as u64).to_be_bytes());
        buf.extend_from_slice(&body);
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

    /// One signature per group commit: records before a signed one are covered by it.
    #[test]
    fn group_signature_covers_earlier_records_and_an_unsigned_tail_fails() {
        let (rows, head) = chain(5);
        // Groups {1,2,3} and {4,5}: only 3 and 5 signed.
        let mut grouped = rows.clone();
        for i in [0, 1, 3] {
            grouped[i].signature.clear();
        }
        assert_eq!(run(&grouped, &head), Ok(5));
        // The DBA edits a record only a later signature covers: its hash no longer matches.
        let mut edited = grouped.clone();
        edited[1].entry.result = "Success-but-edited".into();
        assert_eq!(
            run(&edited, &head).unwrap_err(),
            AuditFault {
                seq: 2,
                reason: AuditFaultReason::HashMismatch
            }
        );
        // ... and re-hashes it (and the link after it): the signature over 3 no longer
        // verifies, since 3's hash would have to change too.
        let mut rehashed = grouped.clone();
        let mut h = Head::GENESIS;
        for r in rehashed.iter_mut().take(3) {
            if r.seq == 2 {
                r.entry.result = "Denied".into();
            }
            let (_, prev, hash) = h.advance(&r.entry);
            r.prev_hash = prev.to_vec();
            r.hash = hash.to_vec();
        }
        let fault = run(&rehashed, &head).unwrap_err();
        assert_eq!(
            (fault.seq, fault.reason),
            (3, AuditFaultReason::BadSignature)
        );
        // The DBA strips the last signature (or appends unsigned records): refused.
        let mut stripped = grouped.clone();
        stripped[4].signature.clear();
        assert_eq!(
            run(&stripped, &head).unwrap_err(),
            AuditFault {
                seq: 4,
                reason: AuditFaultReason::BadSignature
            }
        );
        // A forged (non-empty) signature on a middle record is refused even though a later
        // one verifies.
        let mut forged = grouped.clone();
        forged[0].signature = vec![1, 2, 3];
        assert_eq!(run(&forged, &head).unwrap_err().seq, 1);
    }
}
