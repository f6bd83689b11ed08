//! The caas key service: an AWS-KMS-compatible KMS (JSON 1.1 protocol, SigV4) over the key
//! hierarchy of seed 004 (HBK versions as EKTs under domain keys, domain keys wrapped by the
//! node key), with a hash-chained, signed audit log of every request.
//!
//! Map: [`sigv4`] authentication · [`service`] dispatch, authorization and the one durable
//! commit per request · `ops/` one file per operation family · [`keyring`] node and domain
//! keys, EKTs · [`keycache`] key records cached for key use (consistency rule there) · [`domain`] KMS domains of several nodes (identities, quorum-signed domain
//! state, EDTs) · [`blob`] ciphertext format · [`material`] key specs and primitives ·
//! [`policy`] key policies · [`recipient`] attestation-gated release (`Recipient`) ·
//! [`usage`] keys' last use · [`operator`] operator principals and their permissions ·
//! [`server`] HTTP/TLS · [`client`] a SigV4 client for caas's own
//! tools · [`audit`] audit signing and CloudTrail-style export · [`checkpoint`] audit
//! freshness anchored outside the database.
//!
//! The database is not trusted for integrity: the store MACs every row under a key derived
//! from the node key ([`keyring::NodeKey::record_authenticator`]) and refuses rows that fail
//! (see `caas_store`); the service answers such a refusal with `KMSInternalException`
//! ([`KmsError::Integrity`]), names the row in the request's audit record
//! (`Detail.IntegrityFailure`) and never uses it. Records parsed from rows must also name the
//! row they are in (`ops::parse_key` and friends). Sealed values bind their owner in the AAD
//! ([`keyring`]).
pub mod audit;
pub mod blob;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod domain;
mod error;
pub mod keycache;
pub mod keyring;
pub mod material;
pub mod model;
pub mod operator;
pub mod ops;
pub mod policy;
pub mod recipient;
pub mod row_floors;
pub mod server;
pub mod service;
pub mod sigv4;
pub mod usage;

pub use error::{KmsError, KmsResult};
pub use service::{Caller, Kms, KmsParams};

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
