//! KMS domains and quorum (P7, seed 004 "Domains" … "Consensus"): key-service nodes that
//! share domain keys without trusting the database or each other's operators.
//!
//! - [`identity`]: each node's own identity (Ed25519) and agreement (X25519) keys.
//! - [`state`]: the signed, versioned, hash-chained domain state (members, operators,
//!   quorum rules) and the checks every member runs on every version.
//! - [`edt`]: exported domain tokens, the only form a domain key takes outside a member.
//! - [`member`]: the store-backed side: the chain and EDTs in the shared database, agreement
//!   on the next version by the database's compare-and-set (`expect_rev = 0` on the version's
//!   row), rotation, re-export to joiners, and the operator commands' primitives.
//!
//! - [`epoch`]: record-MAC key epochs that follow the domain keys, and the floor below which
//!   a removed node's keys no longer authenticate any row.
//!
//! Rows of the `kms_domain_*` kinds are authenticated by their signatures, not by the
//! record MAC (a node must read them before it holds any domain key): [`DomainRecordAuth`]
//! MACs them under a public constant key and every other row under the record key of a
//! domain-key epoch ([`epoch`]; epoch `v` derives from `DK_v` through [`domain_root`]).
pub mod edt;
pub mod epoch;
pub mod identity;
pub mod member;
pub mod state;

use caas_store::{HmacRecordKey, RecordAuthenticator};

/// A node's domain settings (`[keys] identity_file`, `domain_genesis`, `identity_tcti`).
#[derive(Debug, Clone)]
pub struct DomainParams {
    /// This node's identity file.
    pub identity_file: std::path::PathBuf,
    /// The pinned genesis hash.
    pub genesis: [u8; 32],
    /// The TPM the identity is sealed to (`[keys] identity_tcti`).
    pub identity_tcti: Option<String>,
    /// What unseals it (set by the binary from `identity_tcti`; the key service refuses to
    /// start with a TPM configured and no sealer).
    pub sealer: Option<std::sync::Arc<dyn identity::IdentitySealer>>,
}

impl DomainParams {
    /// Loads this node's identity (through the sealer when the config names a TPM).
    pub fn load_identity(&self) -> Result<identity::NodeIdentity, DomainError> {
        match (&self.identity_tcti, &self.sealer) {
            (Some(_), None) => Err(DomainError::Io(
                "keys.identity_tcti is set but this build has no TPM sealer".into(),
            )),
            (_, s) => identity::NodeIdentity::load_with(&self.identity_file, s.as_deref()),
        }
    }
}

/// Where a node records the newest domain state version it verified (beside its identity).
pub fn head_file(identity_file: &std::path::Path) -> std::path::PathBuf {
    let mut name = identity_file.as_os_str().to_owned();
    name.push(".domain-head");
    std::path::PathBuf::from(name)
}

/// Store kind of domain state versions (id: version, 20 digits).
pub const STATE_KIND: &str = "kms_domain_state";
/// Store kind of the pending (proposed, not yet approved) change (id `next`).
pub const PENDING_KIND: &str = "kms_domain_pending";
/// Store kind of domain key claims (id: dk version, 10 digits): who made it, under which state.
pub const DK_KIND: &str = "kms_domain_dk";
/// Store kind of EDTs (id: `dk version.state version.sender`).
pub const EDT_KIND: &str = "kms_domain_edt";

/// Why a domain operation failed. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Malformed input (file, row, operator text).
    #[error("malformed: {0}")]
    Malformed(String),
    /// A change, document or token that the rules refuse.
    #[error("refused: {0}")]
    Refused(String),
    /// Another node or operator changed the domain first (retry after re-reading).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Cryptographic failure.
    #[error("crypto: {0}")]
    Crypto(&'static str),
    /// File system.
    #[error("{0}")]
    Io(String),
    /// Database.
    #[error("database: {0}")]
    Store(String),
}

impl From<DomainError> for crate::KmsError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Conflict(m) => crate::KmsError::Conflict(m),
            other => crate::KmsError::Internal(format!("KMS domain: {other}")),
        }
    }
}

/// Record authenticator of a domain deployment (see the module documentation).
pub struct DomainRecordAuth {
    public: HmacRecordKey,
    epochs: Option<std::sync::Arc<epoch::EpochKeys>>,
}

impl std::fmt::Debug for DomainRecordAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainRecordAuth")
    }
}

impl DomainRecordAuth {
    /// Only the domain kinds readable (bootstrap: before any domain key is open).
    pub fn bootstrap() -> Self {
        DomainRecordAuth {
            public: HmacRecordKey::new(b"caas/kms/domain-rows/public-v1"),
            epochs: None,
        }
    }

    /// Domain kinds under the public key, every other row under the record key of the
    /// epoch its tag names ([`epoch::EpochKeys`]).
    pub fn with_epochs(epochs: std::sync::Arc<epoch::EpochKeys>) -> Self {
        DomainRecordAuth {
            epochs: Some(epochs),
            ..Self::bootstrap()
        }
    }

    fn domain_kind(parts: &[&[u8]]) -> bool {
        // parts = [DOMAIN, len(kind), kind, ...] (caas_store::record::row_tag).
        parts.get(2).is_some_and(|k| k.starts_with(b"kms_domain_"))
    }
}

impl RecordAuthenticator for DomainRecordAuth {
    fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        if Self::domain_kind(parts) {
            return self.public.tag(parts);
        }
        // Only reached through `seal`/`check` below, which never call it for other rows:
        // a tag nobody can match by accident.
        [0u8; 32]
    }

    fn seal(&self, parts: &[&[u8]]) -> Vec<u8> {
        if Self::domain_kind(parts) {
            return self.public.tag(parts).to_vec();
        }
        // No write epoch (bootstrap, which never writes such rows): an empty MAC, which no
        // reader accepts.
        self.epochs
            .as_ref()
            .and_then(|e| e.seal(parts))
            .unwrap_or_default()
    }

    fn check(&self, parts: &[&[u8]], stored: &[u8]) -> bool {
        if Self::domain_kind(parts) {
            return aws_lc_rs::constant_time::verify_slices_are_equal(
                &self.public.tag(parts),
                stored,
            )
            .is_ok();
        }
        self.epochs.as_ref().is_some_and(|e| e.check(parts, stored))
    }
}

/// The root secret of a domain-key epoch: derived from `DK_v`, it takes the place of the
/// single-node "node key" for what all members must share: the record MAC key and the audit
/// signing key of epoch `v` ([`epoch`]). The root of `DK_1` also keys the audit checkpoint
/// and import fingerprints.
pub fn domain_root(dk1: &caas_crypto::SecretKey) -> Result<caas_crypto::SecretKey, DomainError> {
    caas_crypto::kdf::derive_key(dk1.expose(), b"caas/kms/domain-root/v1", b"")
        .map_err(|_| DomainError::Crypto("KDF"))
}

/// An audit signer that signs nothing (the bootstrap store only reads).
#[derive(Debug)]
pub struct NoAuditSigner;

impl caas_store::AuditSigner for NoAuditSigner {
    fn sign(&self, _hash: &[u8; 32]) -> Vec<u8> {
        vec![0u8; 64]
    }
}

/// Opens the shared store as a member holding only the first domain key does: record MAC
/// epoch 1, audit signing key derived from the domain root. (`caas domain init` and tests; a
/// serving node goes through `Kms::open`, whose record epochs follow the domain keys.)
pub async fn open_store(
    database: &str,
    dk1: &caas_crypto::SecretKey,
) -> Result<caas_store::Store, DomainError> {
    let node = crate::keyring::NodeKey::from_domain_root(domain_root(dk1)?);
    let signer = node
        .audit_signer()
        .map_err(|_| DomainError::Crypto("audit key"))?;
    let epochs = epoch::EpochKeys::default();
    epochs.add_key(1, dk1)?;
    epochs.raise_write(1);
    caas_store::Store::open(
        database,
        std::sync::Arc::new(signer),
        std::sync::Arc::new(DomainRecordAuth::with_epochs(std::sync::Arc::new(epochs))),
    )
    .await
    .map_err(|e| DomainError::Store(e.to_string()))
}

/// Creates a new domain in `database` with `me` as its first member; returns the genesis
/// hash every node must pin (`[keys] domain_genesis`).
pub async fn init(
    database: &str,
    me: &identity::NodeIdentity,
    operators: std::collections::BTreeMap<String, state::OperatorPublic>,
    rules: state::QuorumRules,
) -> Result<[u8; 32], DomainError> {
    let g = member::prepare_genesis(me, operators, rules)?;
    let store = open_store(database, &g.dk1).await?;
    member::commit_genesis(&store, me, &g).await
}
