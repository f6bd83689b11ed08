//! Protocol errors. Every rejection has a stable machine-readable code (the wire's
//! `{"code": ...}`) and a message that never contains key material or plaintext.

/// A TL/DBSP protocol error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message does not parse or a field is out of range.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which message or field.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A check of the protocol failed: the request is refused.
    #[error("{code}: {detail}")]
    Rejected {
        /// Stable code, e.g. `h1_mismatch`, `nonce_replayed`, `acl_denied`.
        code: &'static str,
        /// Human-readable reason (no secrets).
        detail: String,
    },
    /// A referenced record does not exist.
    #[error("{kind} not found: {id}")]
    NotFound {
        /// Record kind.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A cryptographic primitive failed (RNG, key parsing).
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
    /// The record store failed.
    #[error("storage: {0}")]
    Storage(String),
}

impl Error {
    /// A rejection with `code`.
    pub fn rejected(code: &'static str, detail: impl Into<String>) -> Self {
        Self::Rejected {
            code,
            detail: detail.into(),
        }
    }

    /// A malformed-input error.
    pub fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what,
            detail: detail.to_string(),
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::Rejected { code, .. } => code,
            Self::NotFound { .. } => "not_found",
            Self::Crypto(_) => "crypto_failure",
            Self::Storage(_) => "internal",
        }
    }
}

impl From<caas_crypto::Error> for Error {
    fn from(e: caas_crypto::Error) -> Self {
        match e {
            caas_crypto::Error::AuthenticationFailed => {
                Self::rejected("decryption_failed", "authenticated decryption failed")
            }
            _ => Self::Crypto("primitive failed"),
        }
    }
}

impl From<caas_attest::Error> for Error {
    fn from(e: caas_attest::Error) -> Self {
        match e {
            caas_attest::Error::Storage(s) => Self::Storage(s),
            caas_attest::Error::NotFound { kind, id } => Self::NotFound { kind, id },
            other => Self::rejected("attestation_invalid", other.to_string()),
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
