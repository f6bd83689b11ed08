//! The one hash-chained, authenticated log construction of caas (ARCHITECTURE.md, "one
//! chain"): the key service's audit log (`caas-store`, Ed25519-signed), the crypto domain's
//! audit log (`caas-domc`, HMAC) and the host agent's management log (`caas-host`, HMAC) all
//! hash, link, authenticate and verify their records here.
//!
//! A record is `(seq, prev_hash, body, hash, tag)`: `seq` counts from 1, `prev_hash` is the
//! previous record's hash ([`GENESIS`] for the first), `body` the log's own canonical,
//! unambiguous encoding of the record's fields, and
//!
//! ```text
//! hash = SHA-256("caas-chain-v1" ‖ 0x00 ‖ F(domain) ‖ prev_hash ‖ seq as u64 BE ‖ F(body))
//! ```
//!
//! where `F(x)` is the length of `x` as u64 BE followed by `x`, and `domain` names the log
//! ([`LogDomain`]): a record (or a whole chain) of one log never verifies as another's.
//! `tag` authenticates `hash` under a key the writing process holds: an Ed25519 signature
//! (the key service: anyone with the public key can verify, nobody else can sign) or
//! HMAC-SHA256 under a per-log key derived from a key the process already holds
//! ([`HmacChainKey::derive`]; the hot paths of the crypto domain and the agent).
//!
//! **What it gives.** Whoever edits, removes, inserts or reorders records without the key is
//! detected by [`ChainVerifier`] (an unkeyed hash chain, as the crypto domain and the agent
//! had before, is recomputed by such an editor). **What it does not give.** Whoever holds
//! the key (the process, or root on its machine) can rewrite the log; and a cut *tail*
//! (the newest records removed) leaves a valid shorter chain: detecting it needs the head
//! `(seq, hash)` anchored outside the file — the key service does so with its signed
//! checkpoint (`caas-kms/src/checkpoint.rs`, passed to [`ChainVerifier::finish`]); the
//! crypto domain's and agent's logs have no anchor yet.

use crate::{Error, SecretKey};
use aws_lc_rs::{digest, hmac};
use std::fmt;

/// `prev_hash` of the first record of every chain.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Names a log for domain separation of its record hashes and of its HMAC key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDomain(&'static str);

impl LogDomain {
    /// The key service's audit log (`caas-store`).
    pub const KMS_AUDIT: LogDomain = LogDomain("caas/kms/audit");
    /// A crypto domain's audit log (`caas-domc`).
    pub const DOMC_AUDIT: LogDomain = LogDomain("caas/domc/audit");
    /// The host agent's management log (`caas-host`).
    pub const AGENT_AUDIT: LogDomain = LogDomain("caas/host-agent/audit");

    /// The label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// The record hash (module doc).
#[must_use]
pub fn record_hash(domain: LogDomain, prev_hash: &[u8; 32], seq: u64, body: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"caas-chain-v1\0");
    ctx.update(&(domain.0.len() as u64).to_be_bytes());
    ctx.update(domain.0.as_bytes());
    ctx.update(prev_hash);
    ctx.update(&seq.to_be_bytes());
    ctx.update(&(body.len() as u64).to_be_bytes());
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Authenticates record hashes (the writer's side).
pub trait RecordSigner: Send + Sync + 'static {
    /// The tag (signature or MAC) of a record hash.
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8>;
}

/// An HMAC-SHA256 key for one log's record tags.
pub struct HmacChainKey {
    key: hmac::Key,
    domain: LogDomain,
}

impl fmt::Debug for HmacChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HmacChainKey({}, [REDACTED])", self.domain.0)
    }
}

impl HmacChainKey {
    /// The log's key: SP 800-108 KDF of `parent` (a key the process holds: the crypto
    /// domain's domain key, the agent's state key) with label `caas chain key` and the log's
    /// domain as context. The parent key is not used for anything else through this key.
    ///
    /// # Errors
    /// [`Error::InvalidLength`] for an empty parent key.
    pub fn derive(parent: &[u8], domain: LogDomain) -> Result<Self, Error> {
        let k: SecretKey = crate::kdf::derive_key(parent, b"caas chain key", domain.0.as_bytes())?;
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, k.expose()),
            domain,
        })
    }

    /// The log this key authenticates.
    #[must_use]
    pub fn domain(&self) -> LogDomain {
        self.domain
    }

    /// Whether `tag` is this key's tag of `hash` (constant time).
    #[must_use]
    pub fn verify(&self, hash: &[u8; 32], tag: &[u8]) -> bool {
        hmac::verify(&self.key, hash, tag).is_ok()
    }
}

impl RecordSigner for HmacChainKey {
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        hmac::sign(&self.key, hash).as_ref().to_vec()
    }
}

/// The head of a chain: the last record's seq and hash (`(0, GENESIS)` when empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Seq of the last record.
    pub seq: u64,
    /// Hash of the last record.
    pub hash: [u8; 32],
}

impl Head {
    /// The head of an empty chain.
    pub const GENESIS: Head = Head {
        seq: 0,
        hash: GENESIS,
    };

    /// Appends a record with `body` after this head: returns its seq, prev_hash and hash,
    /// and moves the head.
    pub fn advance(&mut self, domain: LogDomain, body: &[u8]) -> (u64, [u8; 32], [u8; 32]) {
        let seq = self.seq + 1;
        let prev = self.hash;
        let hash = record_hash(domain, &prev, seq, body);
        *self = Head { seq, hash };
        (seq, prev, hash)
    }
}

/// Why a record failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultReason {
    /// A record with this seq should exist but does not (removed record or removed tail).
    Missing,
    /// A record carries a seq other than the next one expected (removed or reordered records).
    UnexpectedSeq {
        /// The seq found where `ChainFault::seq` was expected.
        found: u64,
    },
    /// The stored `prev_hash` does not equal the previous record's hash.
    BrokenLink,
    /// The stored hash does not match the record's content (edited or moved record).
    HashMismatch,
    /// The tag (signature or MAC) over the hash does not verify.
    BadSignature,
    /// A field has the wrong shape (for example a hash that is not 32 bytes).
    Malformed(String),
    /// The chain does not end at the expected head (anchored elsewhere).
    HeadMismatch,
}

impl fmt::Display for FaultReason {
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

/// The first bad record of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFault {
    /// The seq at which the chain is broken.
    pub seq: u64,
    /// What is wrong there.
    pub reason: FaultReason,
}

impl fmt::Display for ChainFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "record {}: {}", self.seq, self.reason)
    }
}

impl std::error::Error for ChainFault {}

/// One stored record as the verifier sees it.
#[derive(Debug, Clone, Copy)]
pub struct StoredRecord<'a> {
    /// Its seq.
    pub seq: u64,
    /// Its stored `prev_hash`.
    pub prev_hash: &'a [u8],
    /// Its stored hash.
    pub hash: &'a [u8],
    /// Its canonical body (the log's encoding of its fields).
    pub body: &'a [u8],
    /// Its tag.
    pub tag: &'a [u8],
}

/// The one chain verifier: feed it every record in ascending order, then
/// [`ChainVerifier::finish`] (or [`ChainVerifier::head`] when no anchor is known).
#[derive(Debug)]
pub struct ChainVerifier {
    domain: LogDomain,
    next_seq: u64,
    prev_hash: [u8; 32],
    checked: u64,
}

impl ChainVerifier {
    /// A verifier of a chain of `domain` from its first record.
    #[must_use]
    pub fn new(domain: LogDomain) -> Self {
        ChainVerifier {
            domain,
            next_seq: 1,
            prev_hash: GENESIS,
            checked: 0,
        }
    }

    /// Records that verified so far.
    #[must_use]
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The head of the records verified so far.
    #[must_use]
    pub fn head(&self) -> Head {
        Head {
            seq: self.next_seq - 1,
            hash: self.prev_hash,
        }
    }

    /// Checks the next record: seq, hash over its body, link, then `verify(hash, tag)`.
    ///
    /// # Errors
    /// The fault, at the seq expected here.
    pub fn check(
        &mut self,
        r: &StoredRecord<'_>,
        verify: &dyn Fn(&[u8; 32], &[u8]) -> bool,
    ) -> Result<(), ChainFault> {
        let expected = self.next_seq;
        let fault = |reason| ChainFault {
            seq: expected,
            reason,
        };
        if r.seq != expected {
            // A gap (removed record) or a seq out of place (reordered or edited seq).
            return Err(fault(if r.seq > expected {
                FaultReason::Missing
            } else {
                FaultReason::UnexpectedSeq { found: r.seq }
            }));
        }
        let Ok(prev) = <[u8; 32]>::try_from(r.prev_hash) else {
            return Err(fault(FaultReason::Malformed(
                "prev_hash is not 32 bytes".into(),
            )));
        };
        let Ok(hash) = <[u8; 32]>::try_from(r.hash) else {
            return Err(fault(FaultReason::Malformed("hash is not 32 bytes".into())));
        };
        if record_hash(self.domain, &prev, expected, r.body) != hash {
            return Err(fault(FaultReason::HashMismatch));
        }
        if prev != self.prev_hash {
            return Err(fault(FaultReason::BrokenLink));
        }
        if !verify(&hash, r.tag) {
            return Err(fault(FaultReason::BadSignature));
        }
        self.next_seq += 1;
        self.prev_hash = hash;
        self.checked += 1;
        Ok(())
    }

    /// Called after the last record when the head is anchored elsewhere: the chain must end
    /// exactly at `head`.
    ///
    /// # Errors
    /// [`FaultReason::Missing`] for a cut tail, [`FaultReason::HeadMismatch`] otherwise.
    pub fn finish(&self, head: &Head) -> Result<(), ChainFault> {
        if self.next_seq <= head.seq {
            return Err(ChainFault {
                seq: self.next_seq,
                reason: FaultReason::Missing,
            });
        }
        if self.next_seq != head.seq + 1 || self.prev_hash != head.hash {
            return Err(ChainFault {
                seq: head.seq,
                reason: FaultReason::HeadMismatch,
            });
        }
        Ok(())
    }
}

/// Hex of a hash (the text logs' encoding).
#[must_use]
pub fn hex32(h: &[u8; 32]) -> String {
    // A table lookup per nibble: this runs twice for every audit record (a hot path of the
    // crypto domain), where `write!("{:02x}")` per byte cost more than the record's hashing.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in h {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Parses [`hex32`]'s output (or any even-length lowercase/uppercase hex) into bytes; `None`
/// for anything else.
#[must_use]
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize, key: &HmacChainKey) -> (Vec<Rec>, Head) {
        let mut head = Head::GENESIS;
        let recs = (0..n)
            .map(|i| {
                let body = format!("record {i}").into_bytes();
                let (seq, prev, hash) = head.advance(key.domain(), &body);
                (seq, prev, hash, body, key.sign(&hash))
            })
            .collect();
        (recs, head)
    }

    type Rec = (u64, [u8; 32], [u8; 32], Vec<u8>, Vec<u8>);

    fn run(recs: &[Rec], key: &HmacChainKey, head: Option<&Head>) -> Result<u64, ChainFault> {
        let mut v = ChainVerifier::new(key.domain());
        for (seq, prev, hash, body, tag) in recs {
            v.check(
                &StoredRecord {
                    seq: *seq,
                    prev_hash: prev,
                    hash,
                    body,
                    tag,
                },
                &|h, t| key.verify(h, t),
            )?;
        }
        if let Some(h) = head {
            v.finish(h)?;
        }
        Ok(v.checked())
    }

    #[test]
    fn record_hash_known_answer() {
        // Independent computation of the documented encoding.
        let mut buf = b"caas-chain-v1\0".to_vec();
        buf.extend_from_slice(&14u64.to_be_bytes());
        buf.extend_from_slice(b"caas/kms/audit");
        buf.extend_from_slice(&[7u8; 32]);
        buf.extend_from_slice(&9u64.to_be_bytes());
        buf.extend_from_slice(&3u64.to_be_bytes());
        buf.extend_from_slice(b"abc");
        let want = digest::digest(&digest::SHA256, &buf);
        assert_eq!(
            &record_hash(LogDomain::KMS_AUDIT, &[7u8; 32], 9, b"abc")[..],
            want.as_ref()
        );
    }

    #[test]
    fn domains_separate_hashes_and_keys() {
        let a = record_hash(LogDomain::DOMC_AUDIT, &GENESIS, 1, b"x");
        let b = record_hash(LogDomain::AGENT_AUDIT, &GENESIS, 1, b"x");
        assert_ne!(a, b);
        let parent = [3u8; 32];
        let kd = HmacChainKey::derive(&parent, LogDomain::DOMC_AUDIT).unwrap();
        let ka = HmacChainKey::derive(&parent, LogDomain::AGENT_AUDIT).unwrap();
        assert!(!ka.verify(&a, &kd.sign(&a)));
        assert!(kd.verify(&a, &kd.sign(&a)));
        assert!(format!("{kd:?}").contains("REDACTED"));
    }

    #[test]
    fn verifier_accepts_intact_and_finds_every_fault() {
        let key = HmacChainKey::derive(&[1u8; 32], LogDomain::AGENT_AUDIT).unwrap();
        let (recs, head) = chain(5, &key);
        assert_eq!(run(&recs, &key, Some(&head)), Ok(5));

        let mut edited = recs.clone();
        edited[2].3 = b"record X".to_vec();
        assert_eq!(
            run(&edited, &key, None).unwrap_err().reason,
            FaultReason::HashMismatch
        );

        // An editor without the key recomputes the hashes of an edited chain: the tags fail.
        let mut forged = recs.clone();
        let mut h = Head::GENESIS;
        for r in &mut forged {
            if r.0 == 3 {
                r.3 = b"record X".to_vec();
            }
            let (_, prev, hash) = h.advance(key.domain(), &r.3);
            (r.1, r.2) = (prev, hash);
        }
        assert_eq!(
            run(&forged, &key, None).unwrap_err(),
            ChainFault {
                seq: 3,
                reason: FaultReason::BadSignature
            }
        );

        let mut removed = recs.clone();
        removed.remove(1);
        assert_eq!(
            run(&removed, &key, None).unwrap_err(),
            ChainFault {
                seq: 2,
                reason: FaultReason::Missing
            }
        );
        let mut swapped = recs.clone();
        swapped.swap(1, 2);
        assert_eq!(run(&swapped, &key, None).unwrap_err().seq, 2);
        let mut relinked = recs.clone();
        relinked[3].1 = relinked[1].2;
        assert!(run(&relinked, &key, None).is_err());

        // A cut tail is found only against an anchored head.
        let mut tail = recs.clone();
        tail.pop();
        assert_eq!(run(&tail, &key, None), Ok(4));
        assert_eq!(
            run(&tail, &key, Some(&head)).unwrap_err(),
            ChainFault {
                seq: 5,
                reason: FaultReason::Missing
            }
        );

        // Another log's key, or another log's domain, never verifies.
        let other = HmacChainKey::derive(&[1u8; 32], LogDomain::DOMC_AUDIT).unwrap();
        assert_eq!(
            run(&recs, &other, None).unwrap_err().reason,
            FaultReason::HashMismatch
        );
        let mut short = recs.clone();
        short[0].4.pop();
        assert_eq!(
            run(&short, &key, None).unwrap_err().reason,
            FaultReason::BadSignature
        );
    }

    #[test]
    fn hex_round_trip() {
        let h = [0xabu8; 32];
        assert_eq!(unhex(&hex32(&h)).unwrap(), h.to_vec());
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        // Every byte value encodes as the two lowercase digits `{:02x}` gives (the logs
        // already written must keep verifying).
        for start in (0..=255u8).step_by(32) {
            let h: [u8; 32] = std::array::from_fn(|i| start.wrapping_add(i as u8));
            let want: String = h.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex32(&h), want);
        }
    }
}
