//! The one error type of the host agent library.

/// Host-agent errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
    /// A TPM operation failed.
    #[error(transparent)]
    Tpm(#[from] caas_tpm::Error),
    /// The key service refused or could not be reached.
    #[error(transparent)]
    Attest(#[from] caas_attest::Error),
    /// Local file or socket I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A TL/DBSP protocol check failed.
    #[error(transparent)]
    Tl(#[from] caas_tl::Error),
    /// A crypto domain or workload could not be started or reached.
    #[error("crypto domain: {0}")]
    Domain(String),
    /// A workload cannot get an identity of its own (isolation required, or the range is
    /// exhausted).
    #[error("workload isolation: {0}")]
    Isolation(String),
    /// Invalid request to the agent API.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
