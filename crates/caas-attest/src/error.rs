//! The one error type of caas-attest. Variants say what failed and why, without ever
//! carrying a secret (credentials, nonces in flight and seeds are never formatted).

/// Errors of parsing, verification, enrollment and storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input ended before a structure was complete.
    #[error("{what}: truncated at offset {offset}")]
    Truncated {
        /// Structure being parsed.
        what: &'static str,
        /// Byte offset where data ran out.
        offset: usize,
    },
    /// Input is structurally invalid.
    #[error("{what}: malformed: {reason}")]
    Malformed {
        /// Structure being parsed.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An algorithm or parameter that caas does not support.
    #[error("unsupported {what}: {value:#06x}")]
    Unsupported {
        /// Kind of parameter (hash, key type, scheme, curve).
        what: &'static str,
        /// TPM algorithm or curve identifier.
        value: u16,
    },
    /// A signature did not verify.
    #[error("signature verification failed: {0}")]
    BadSignature(&'static str),
    /// The EK certificate is not acceptable.
    #[error("EK certificate rejected: {0}")]
    EkCertificate(String),
    /// Enrollment failed (with a machine-readable code).
    #[error("enrollment failed: {code}: {message}")]
    Enrollment {
        /// Machine-readable reason, e.g. `ek_cert_untrusted`.
        code: &'static str,
        /// Human-readable detail.
        message: String,
    },
    /// A host, profile or enrollment that does not exist.
    #[error("{kind} not found: {id}")]
    NotFound {
        /// Object kind.
        kind: &'static str,
        /// Its identifier.
        id: String,
    },
    /// Invalid request parameters.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The storage backend failed.
    #[error("storage: {0}")]
    Storage(String),
    /// Talking to a host agent failed.
    #[error("host agent {host}: {reason}")]
    Agent {
        /// Host name.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// A remote caas service answered with an error.
    #[error("{url}: HTTP {status}: {code}: {message}")]
    Remote {
        /// Request URL (no credentials).
        url: String,
        /// HTTP status.
        status: u16,
        /// Machine-readable code from the body.
        code: String,
        /// Message from the body.
        message: String,
    },
    /// A cryptographic primitive failed unexpectedly.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}

impl Error {
    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Malformed {
            what,
            reason: reason.into(),
        }
    }
}
