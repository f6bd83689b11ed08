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
    /// The nonce counter space of a session is exhausted (2^64 writes): reopen the volume.
    #[error("nonce counter exhausted: re-key the volume")]
    NonceExhausted,
    /// The AEAD primitive failed unexpectedly.
    #[error("cryptographic primitive failed")]
    Crypto,
    /// The state sector's MAC does not verify: it was edited, or copied from another
    /// volume.
    #[error("volume state sector authentication failed (edited or from another volume)")]
    StateTampered,
    /// The state sector is older than the blocks: it records epoch `recorded` but a block
    /// slot written in the later epoch `seen` authenticates. The storage host restored an
    /// old state sector (mix-and-match rollback).
    #[error(
        "volume state sector rolled back: it records epoch {recorded}, but blocks were written in epoch {seen}"
    )]
    StateRollback {
        /// Epoch in the state sector.
        recorded: u32,
        /// A later epoch found in an authenticated block slot.
        seen: u32,
    },
    /// The volume's epoch is behind the one the caller knows it reached (an external
    /// anchor): the whole volume was rolled back to an older snapshot.
    #[error(
        "volume epoch {epoch} is behind the expected epoch {expected}: the volume was rolled back"
    )]
    EpochBehind {
        /// Epoch in the state sector.
        epoch: u32,
        /// The minimum epoch the caller expects.
        expected: u32,
    },
    /// The volume has been opened for writing 2^32 - 1 times: re-key it.
    #[error("volume epoch counter exhausted: re-key the volume")]
    EpochExhausted,
    /// A format v1 volume was opened for writing: writing v1 would keep its nonce flaws.
    #[error("format v1 volume: open it read-only, or upgrade it first (`caas volume upgrade`)")]
    V1ReadOnly,
    /// A key source failed (KMS unreachable, wrapped key rejected, bad key file).
    #[error("data key provider: {0}")]
    KeyProvider(String),
}
