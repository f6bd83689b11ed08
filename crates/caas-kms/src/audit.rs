//! Audit records of the key service. Every request — success or failure — appends exactly
//! one record in the same durable commit as its state change (see `service.rs`). Records
//! carry who, what, which key, the result and the request id; never plaintext, data keys or
//! key material. The chain is signed with an Ed25519 key derived from the node key, so
//! `caas audit verify` needs only the public key to check it.
use crate::keyring::SYSTEM_ACCOUNT;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use caas_store::{AuditEntry, AuditSigner};

/// Signs audit record hashes with the node's audit key.
pub struct Ed25519AuditSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for Ed25519AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ed25519AuditSigner(public={})",
            hex::encode(self.public_key())
        )
    }
}

impl Ed25519AuditSigner {
    /// Builds the signer from a 32-byte seed (derived from the node key).
    pub fn from_seed(seed: &[u8]) -> Option<Self> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .ok()
            .map(|key| Self { key })
    }
    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

impl AuditSigner for Ed25519AuditSigner {
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        self.key.sign(hash).as_ref().to_vec()
    }
}

/// Verifies a record signature against a raw Ed25519 public key.
pub fn verify_signature(public_key: &[u8], hash: &[u8; 32], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(hash, sig)
        .is_ok()
}

/// An audit entry for deployment-level events (domain key creation, scheduled deletions).
pub fn system_entry(operation: &str, detail: &str) -> AuditEntry {
    AuditEntry {
        time_ms: crate::now_ms(),
        account: SYSTEM_ACCOUNT.into(),
        principal: "caas:key-service".into(),
        operation: operation.into(),
        key_id: None,
        result: "Success".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        detail: serde_json::json!({ "detail": detail }).to_string(),
    }
}
