//! The one error type of caas-tpm. TPM failures keep the operation name and the TSS
//! response code text; no key material or sealed data is ever formatted.

/// Errors of TPM operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TCTI configuration string is invalid.
    #[error("invalid TCTI '{tcti}': {reason}")]
    Tcti {
        /// The configured string.
        tcti: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A TPM or TSS call failed.
    #[error("TPM {op} failed: {source}")]
    Tpm {
        /// Operation.
        op: &'static str,
        /// TSS error (response code).
        #[source]
        source: tss_esapi::Error,
    },
    /// Invalid argument (PCR index, sizes, blobs).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The TPM's answer was not what was expected.
    #[error("unexpected TPM answer: {0}")]
    Unexpected(String),
    /// The TPM owner thread is gone.
    #[error("the TPM owner thread has stopped")]
    OwnerGone,
}

/// Adds the operation name to a TSS result.
pub(crate) trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, Error>;
}

impl<T> Op<T> for Result<T, tss_esapi::Error> {
    fn op(self, op: &'static str) -> Result<T, Error> {
        self.map_err(|source| Error::Tpm { op, source })
    }
}

impl Error {
    /// Whether the TPM refused a policy (PCR state changed since the policy was made).
    pub fn is_policy_failure(&self) -> bool {
        match self {
            Self::Tpm { source, .. } => {
                let s = source.to_string().to_lowercase();
                s.contains("policy") || s.contains("0x99d") || s.contains("0x9a2")
            }
            _ => false,
        }
    }
}
