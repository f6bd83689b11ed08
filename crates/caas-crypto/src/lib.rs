//! Shared cryptographic building blocks of caas.
//!
//! Everything here is small on purpose: zeroizing key types ([`SecretKey`],
//! [`SecretBytes`]), the NIST SP 800-108 HMAC-SHA256 counter-mode KDF ([`kdf`]), and an
//! AES-256-GCM envelope ([`aead`]) used to wrap keys under keys (EKTs, domain keys, token
//! objects, volume keys). All primitives come from aws-lc-rs. [`hardening`] holds the one
//! process-hygiene routine (non-dumpable, no core files) of every key-holding process;
//! [`fs`] the one writer of secret files (atomic, 0600, owner set before content, never
//! through a symbolic link); [`chain`] the one hash-chained, authenticated log construction
//! (record hash, tags, verifier) of the key service's, crypto domain's and agent's logs;
//! [`spin`] the one bounded spin-before-block of their socket loops.
pub mod aead;
pub mod chain;
mod error;
pub mod fs;
pub mod hardening;
pub mod kdf;
pub mod peer;
mod secret;
pub mod spin;

pub use error::Error;
pub use secret::{SecretBytes, SecretKey, random_array, random_bytes, random_key};
