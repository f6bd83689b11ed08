//! Record-MAC and audit key epochs of a KMS domain: the row MAC and the audit signature
//! follow the domain keys, so a node removed from the domain (which keeps every domain key
//! it was sent) cannot forge rows or audit records once the remaining members have moved
//! past its keys.
//!
//! - **Epoch `v`** is domain key `DK_v`: its record key and audit key are derived from `DK_v`
//!   exactly as the single-node ones are derived from the node key (`domain_root(DK_v)`, then
//!   `"caas/kms/record-mac-key"` / `"caas/kms/audit-signing-key"`), so epoch 1 is what every
//!   domain had before epochs existed and their stored rows and records verify unchanged.
//! - **Tags carry their epoch.** Epoch 1 keeps the bare 32-byte HMAC (what older nodes wrote
//!   and read: a rolling upgrade keeps working); epoch `v ≥ 2` is stored as
//!   `'E' ‖ v (u32 BE) ‖ HMAC-SHA256` (37 bytes). A row is checked under the key of the epoch
//!   its tag names — never under another one.
//! - **The write epoch** of a node is the newest epoch every current member holds (from the
//!   members' signed acknowledgements, `kms_domain_ack`, one per node: "I hold up to `h`,
//!   I write under `w`"), capped by its own sealing key; a member without an
//!   acknowledgement counts as holding epoch 1 only. It never goes down.
//! - **The floor.** After a removal or a forced rotation (`rotate_from` in the domain state)
//!   every epoch made before the first domain key made under the new rules is *exposed*: a
//!   removed node may hold it. Once every current member acknowledges writing at or above
//!   that first fresh epoch `T`, one member re-MACs every row (it reads each row under its
//!   old epoch and writes it back under `T` or later), then publishes the floor `T`
//!   (`kms_domain_floor`, signed by its identity, with the audit seq it reached). From then
//!   on every member refuses a tag under an epoch below the floor (the store answers
//!   `Integrity` and audits the row, `IntegrityCheck`) and an audit record after that seq
//!   signed under such an epoch ([`EpochKeys::verify_audit`]; audit signatures carry their
//!   epoch the same way: bare Ed25519 for epoch 1, `'E' ‖ v ‖ signature` after). Each node keeps the highest floor it has seen beside its identity
//!   (`<identity>.record-floor`), so a database that deletes or rolls back the floor row
//!   does not lower it.
//!
//! What stays open: between a removal and the floor (a few maintenance intervals) the
//! removed node can still forge rows under an exposed epoch, and the re-MAC pass carries
//! such a forgery forward; a node that joins after the floor and never saw it trusts the
//! floor row the database shows it (see docs/kms-domains.md). The audit checkpoint file
//! stays signed under the epoch-1 audit key (local to each node).
use super::DomainError;
use super::identity::{NodeId, NodeIdentity, verify_ed25519};
use super::state::DomainState;
use crate::audit::Ed25519AuditSigner;
use caas_crypto::SecretKey;
use caas_store::{AuditSigner, HmacRecordKey, RecordAuthenticator};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Store kind of the members' epoch acknowledgements (id: node id).
pub const ACK_KIND: &str = "kms_domain_ack";
/// Store kind of the record-MAC floor (id `records`).
pub const FLOOR_KIND: &str = "kms_domain_floor";
/// Id of the floor row.
pub const FLOOR_ID: &str = "records";

/// First byte of a versioned (epoch ≥ 2) tag.
const TAG_PREFIX: u8 = b'E';
const VERSIONED_LEN: usize = 37;

/// The record key of epoch `v` (domain key `dk` = `DK_v`).
pub fn record_key(dk: &SecretKey) -> Result<HmacRecordKey, DomainError> {
    crate::keyring::NodeKey::from_domain_root(super::domain_root(dk)?)
        .record_authenticator()
        .map_err(|_| DomainError::Crypto("record key"))
}

/// The audit signing key of epoch `v` (domain key `dk` = `DK_v`).
pub fn audit_key(dk: &SecretKey) -> Result<Ed25519AuditSigner, DomainError> {
    crate::keyring::NodeKey::from_domain_root(super::domain_root(dk)?)
        .audit_signer()
        .map_err(|_| DomainError::Crypto("audit key"))
}

struct EpochKey {
    record: HmacRecordKey,
    audit: Ed25519AuditSigner,
}

#[derive(Default)]
struct Epochs {
    keys: BTreeMap<u32, EpochKey>,
    write: Option<u32>,
    floor: u32,
    /// Audit records after this seq must be signed at or above the floor.
    audit_from: u64,
}

/// The record keys of every epoch this node holds, its write epoch and its floor; shared
/// between the member (which updates them on every reload) and the store's authenticator.
#[derive(Default)]
pub struct EpochKeys(RwLock<Epochs>);

impl std::fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EpochKeys(held={:?}, write={:?}, floor={})",
            self.held(),
            self.write(),
            self.floor()
        )
    }
}

impl EpochKeys {
    /// Adds the record keys of domain keys not seen before.
    pub fn add_keys(&self, dks: &BTreeMap<u32, SecretKey>) -> Result<(), DomainError> {
        for (v, dk) in dks {
            self.add_key(*v, dk)?;
        }
        Ok(())
    }

    /// Adds the record key of epoch `v` (`dk` = `DK_v`) unless already held.
    pub fn add_key(&self, v: u32, dk: &SecretKey) -> Result<(), DomainError> {
        let known = self
            .0
            .read()
            .map_err(|_| DomainError::Crypto("epoch lock"))?
            .keys
            .contains_key(&v);
        if !known {
            let k = EpochKey {
                record: record_key(dk)?,
                audit: audit_key(dk)?,
            };
            self.0
                .write()
                .map_err(|_| DomainError::Crypto("epoch lock"))?
                .keys
                .entry(v)
                .or_insert(k);
        }
        Ok(())
    }

    /// Moves the write epoch up to `v` (never down; never below the floor).
    pub fn raise_write(&self, v: u32) {
        if let Ok(mut g) = self.0.write() {
            let v = v.max(g.floor);
            if g.write.is_none_or(|w| w < v) {
                g.write = Some(v);
            }
        }
    }

    /// Moves the floor up to `f` (never down), effective for audit records after seq
    /// `audit_from`; returns whether it moved.
    pub fn raise_floor(&self, f: u32, audit_from: u64) -> bool {
        match self.0.write() {
            Ok(mut g) if f > g.floor => {
                g.floor = f;
                g.audit_from = audit_from;
                if g.write.is_some_and(|w| w < f) {
                    g.write = Some(f);
                }
                true
            }
            _ => false,
        }
    }

    /// Epoch new rows are MAC'd under.
    pub fn write(&self) -> Option<u32> {
        self.0.read().ok().and_then(|g| g.write)
    }

    /// Tags under epochs below this are refused.
    pub fn floor(&self) -> u32 {
        self.0.read().map(|g| g.floor).unwrap_or(u32::MAX)
    }

    /// The floor and the audit seq after which it holds for audit signatures.
    pub fn floor_at(&self) -> (u32, u64) {
        self.0
            .read()
            .map(|g| (g.floor, g.audit_from))
            .unwrap_or((u32::MAX, 0))
    }

    /// Signs an audit record hash under the write epoch: a bare Ed25519 signature for epoch
    /// 1 (what every domain wrote before epochs), `'E' ‖ v (u32 BE) ‖ signature` for `v ≥ 2`.
    /// Without a write epoch: a signature nobody accepts.
    pub fn sign_audit(&self, hash: &[u8; 32]) -> Vec<u8> {
        let Ok(g) = self.0.read() else {
            return vec![0u8; 64];
        };
        let Some((w, k)) = g.write.and_then(|w| g.keys.get(&w).map(|k| (w, k))) else {
            return vec![0u8; 64];
        };
        let sig = AuditSigner::sign(&k.audit, hash);
        if w == 1 {
            return sig;
        }
        let mut out = Vec::with_capacity(5 + sig.len());
        out.push(TAG_PREFIX);
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&sig);
        out
    }

    /// Checks audit record `seq`'s signature under the epoch it names: refused when that
    /// epoch is below the floor and the record comes after the floor's seq, or unknown here.
    pub fn verify_audit(&self, seq: u64, hash: &[u8; 32], sig: &[u8]) -> bool {
        let (v, sig) = match sig.len() {
            64 => (1, sig),
            69 if sig[0] == TAG_PREFIX => {
                let v = u32::from_be_bytes([sig[1], sig[2], sig[3], sig[4]]);
                if v < 2 {
                    return false;
                }
                (v, &sig[5..])
            }
            _ => return false,
        };
        let Ok(g) = self.0.read() else { return false };
        if v < g.floor && seq > g.audit_from {
            return false;
        }
        g.keys
            .get(&v)
            .is_some_and(|k| crate::audit::verify_signature(&k.audit.public_key(), hash, sig))
    }

    /// Newest epoch this node holds.
    pub fn held(&self) -> Option<u32> {
        self.0
            .read()
            .ok()
            .and_then(|g| g.keys.keys().next_back().copied())
    }

    /// What the writer stores (see the module documentation).
    pub fn seal(&self, parts: &[&[u8]]) -> Option<Vec<u8>> {
        let g = self.0.read().ok()?;
        let w = g.write?;
        let tag = g.keys.get(&w)?.record.tag(parts);
        if w == 1 {
            return Some(tag.to_vec());
        }
        let mut out = Vec::with_capacity(VERSIONED_LEN);
        out.push(TAG_PREFIX);
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&tag);
        Some(out)
    }

    /// The epoch a stored tag names and its HMAC part (None: not a tag of this format).
    pub fn parse(stored: &[u8]) -> Option<(u32, &[u8])> {
        match stored.len() {
            32 => Some((1, stored)),
            VERSIONED_LEN if stored[0] == TAG_PREFIX => {
                let v = u32::from_be_bytes([stored[1], stored[2], stored[3], stored[4]]);
                // One encoding per epoch: epoch 1 is always the bare tag.
                (v >= 2).then_some((v, &stored[5..]))
            }
            _ => None,
        }
    }

    /// Checks `stored` under the epoch it names; refuses epochs below the floor and epochs
    /// this node does not hold.
    pub fn check(&self, parts: &[&[u8]], stored: &[u8]) -> bool {
        let Some((v, mac)) = Self::parse(stored) else {
            return false;
        };
        let Ok(g) = self.0.read() else { return false };
        if v < g.floor {
            return false;
        }
        let Some(k) = g.keys.get(&v) else {
            return false;
        };
        aws_lc_rs::constant_time::verify_slices_are_equal(&k.record.tag(parts), mac).is_ok()
    }
}

/// What a member signs about its epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckBody {
    /// Domain id.
    pub domain: String,
    /// The member.
    pub node: NodeId,
    /// Newest epoch it holds (can verify).
    pub holds: u32,
    /// Epoch it writes under.
    pub writes: u32,
    /// Domain state version it acted under.
    pub state_version: u64,
}

/// A member's signed floor publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorBody {
    /// Domain id.
    pub domain: String,
    /// The floor.
    pub floor: u32,
    /// The member that re-MAC'd every row and publishes it.
    pub node: NodeId,
    /// Domain state version it acted under.
    pub state_version: u64,
    /// Audit head seq once every member wrote (and signed) at or above `floor`: later
    /// audit records must be signed at or above it.
    pub audit_from: u64,
}

/// A body signed by a node's identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// JSON bytes of the body.
    #[serde(with = "crate::model::b64")]
    pub body: Vec<u8>,
    /// Ed25519 over `label ‖ body`.
    #[serde(with = "crate::model::b64")]
    pub signature: Vec<u8>,
}

const ACK_LABEL: &[u8] = b"caas/kms/domain-epoch-ack/v1";
const FLOOR_LABEL: &[u8] = b"caas/kms/domain-record-floor/v1";

fn message(label: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = label.to_vec();
    m.extend_from_slice(body);
    m
}

fn sign<T: Serialize>(me: &NodeIdentity, label: &[u8], body: &T) -> Result<Vec<u8>, DomainError> {
    let body = serde_json::to_vec(body).map_err(|_| DomainError::Malformed("encode".into()))?;
    let signature = me.sign(&message(label, &body));
    serde_json::to_vec(&Signed { body, signature })
        .map_err(|_| DomainError::Malformed("encode".into()))
}

/// Opens a row signed by a member of `st` (returns the signer and the body).
fn open<T: for<'de> Deserialize<'de>>(
    st: &DomainState,
    label: &[u8],
    row: &[u8],
    node_of: impl Fn(&T) -> &str,
) -> Result<T, DomainError> {
    let s: Signed =
        serde_json::from_slice(row).map_err(|_| DomainError::Malformed("signed row".into()))?;
    let body: T = serde_json::from_slice(&s.body)
        .map_err(|_| DomainError::Malformed("signed row body".into()))?;
    let keys = st
        .members
        .get(node_of(&body))
        .ok_or_else(|| DomainError::Refused("signer is not a current member".into()))?;
    if !verify_ed25519(&keys.signing, &message(label, &s.body), &s.signature) {
        return Err(DomainError::Refused(
            "signature does not verify (forged or altered)".into(),
        ));
    }
    Ok(body)
}

/// A signed acknowledgement row.
pub fn sign_ack(me: &NodeIdentity, body: &AckBody) -> Result<Vec<u8>, DomainError> {
    sign(me, ACK_LABEL, body)
}

/// Verifies an acknowledgement row stored under `id` against the current state.
pub fn open_ack(st: &DomainState, id: &str, row: &[u8]) -> Result<AckBody, DomainError> {
    let b: AckBody = open(st, ACK_LABEL, row, |b: &AckBody| &b.node)?;
    if b.node != id || b.domain != st.domain {
        return Err(DomainError::Refused(
            "acknowledgement stored under another node or domain".into(),
        ));
    }
    Ok(b)
}

/// A signed floor row.
pub fn sign_floor(me: &NodeIdentity, body: &FloorBody) -> Result<Vec<u8>, DomainError> {
    sign(me, FLOOR_LABEL, body)
}

/// Verifies the floor row against the current state.
pub fn open_floor(st: &DomainState, row: &[u8]) -> Result<FloorBody, DomainError> {
    let b: FloorBody = open(st, FLOOR_LABEL, row, |b: &FloorBody| &b.node)?;
    if b.domain != st.domain {
        return Err(DomainError::Refused("floor of another domain".into()));
    }
    Ok(b)
}

/// The audit signer of a domain member's store: signs under its write epoch.
#[derive(Debug)]
pub struct EpochAuditSigner(pub std::sync::Arc<EpochKeys>);

impl AuditSigner for EpochAuditSigner {
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        self.0.sign_audit(hash)
    }
}

/// Where a node keeps the highest floor it has seen (beside its identity).
pub fn floor_file(identity_file: &std::path::Path) -> std::path::PathBuf {
    let mut name = identity_file.as_os_str().to_owned();
    name.push(".record-floor");
    std::path::PathBuf::from(name)
}
