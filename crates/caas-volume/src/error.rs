//! Errors of the volume format: malformed or tampered headers and metadata, wrong keys,
//! and authentication failures of single blocks.
use thiserror::Error;

/// What went wrong while parsing or verifying a volume.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The header does not start with the volume magic.
    #[error("not a caas volume (bad magic)")]
    BadMagic,
    /// Unknown format version.
    #[error("unsupported volume format version {0}")]
    UnsupportedVersion(u16),
    /// Unknown cipher suite.
    #[error("unsupported cipher suite {0}")]
    UnsupportedSuite(u16),
    /// A header field is out of range or inconsistent with the others.
    #[error("invalid volume header: {0}")]
    InvalidHeader(&'static str),
    /// The key does not match the key check value.
    #[error("wrong key for this volume (key check value mismatch)")]
    WrongKey,
    /// The header's authentication tag does not verify: it was modified.
    #[error("volume header authentication failed (header modified)")]
    HeaderTampered,
    /// A field is longer than the format allows.
    #[error("{what} is {len} bytes, the format allows at most {max}")]
    FieldTooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No metadata slot of a block authenticates its stored ciphertext.
    #[error("block {index} failed authentication")]
    BlockAuth {
        /// Block index.
        index: u64,
    },
    /// The nonce counter space is exhausted (2^64 writes): re-key the volume.
    #[error("nonce counter exhausted: re-key the volume")]
    NonceExhausted,
    /// The AEAD primitive failed unexpectedly.
    #[error("cryptographic primitive failed")]
    Crypto,
    /// A key source failed (KMS unreachable, wrapped key rejected, bad key file).
    #[error("data key provider: {0}")]
    KeyProvider(String),
}
