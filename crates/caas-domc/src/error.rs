//! Errors of the crypto domain. [`Ckr`] is a PKCS#11 return value (the one place where
//! token-model failures map to the wire); [`Error`] covers the process around it: state
//! files, the domain key, sockets and hardening.

use std::path::PathBuf;

/// A PKCS#11 CK_RV other than CKR_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ckr(pub u64);

impl std::fmt::Display for Ckr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CK_RV 0x{:x}", self.0)
    }
}

/// Errors of the crypto domain process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file of the state directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The domain key could not be obtained or has the wrong shape.
    #[error("domain key: {0}")]
    DomainKey(String),
    /// A token state file failed authentication or decoding (tampered or wrong key).
    #[error("token state {path} is corrupt or was sealed under another key")]
    CorruptState {
        /// The state file.
        path: PathBuf,
    },
    /// The audit log's hash chain is broken.
    #[error("audit log broken at entry {seq}: {reason}")]
    AuditChain {
        /// Sequence number of the first bad entry.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A token operation failed with a PKCS#11 code.
    #[error("token operation failed: {0}")]
    Token(Ckr),
    /// A wire protocol error.
    #[error("protocol: {0}")]
    Protocol(#[from] caas_vsm_proto::Error),
    /// Process hardening failed.
    #[error("hardening: {0}")]
    Harden(String),
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
}

impl Error {
    /// Wraps an I/O error with what was done to which path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
