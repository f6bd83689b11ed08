//! Errors of the shared crypto layer. They never carry key material or plaintext.
use thiserror::Error;

/// What went wrong in a cryptographic operation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// Authenticated decryption failed: wrong key, wrong associated data or tampered bytes.
    #[error(
        "authentication failed: the ciphertext or its context was altered, or the key is wrong"
    )]
    AuthenticationFailed,
    /// An input had an unusable length.
    #[error("invalid length for {what}: {len}")]
    InvalidLength {
        /// The input concerned.
        what: &'static str,
        /// Its actual length.
        len: usize,
    },
    /// The system random number generator failed.
    #[error("random number generator failure")]
    Rng,
}
