//! Errors of the workload crate. No variant ever carries τ, a PIN or other secret bytes:
//! OpenSSL's error stack and the handshake error describe the failure, never the key.
use thiserror::Error;

/// What failed.
#[derive(Debug, Error)]
pub enum Error {
    /// An IO operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// OpenSSL rejected a configuration call.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] openssl::error::ErrorStack),
    /// The TLS 1.3 PSK handshake failed (wrong PSK, wrong identity, or a peer that is not
    /// a PSK endpoint).
    #[error("PSK handshake failed: {0}")]
    Handshake(String),
    /// Bad configuration, spec or arguments.
    #[error("{0}")]
    Config(String),
    /// The injected-secrets file is missing, malformed or has the wrong sizes.
    #[error("injected secrets: {0}")]
    Inject(String),
    /// The peer violated the challenge protocol (bad JSON, line too long, ...).
    #[error("challenge protocol: {0}")]
    Protocol(String),
    /// The workload rejected the DM's challenge signature.
    #[error("the workload rejected the DM signature")]
    DmSignatureInvalid,
    /// The workload answered with an error.
    #[error("workload error: {0}")]
    Remote(String),
    /// The report's VSM signature does not verify.
    #[error("VSM signature in the report does not verify")]
    VsmSignatureInvalid,
    /// The report does not answer this challenge (other vm_id).
    #[error("report mismatch: {0}")]
    ReportMismatch(String),
    /// Reading or writing a disk through NBD failed.
    #[error("disk: {0}")]
    Disk(#[from] caas_sdp::Error),
    /// The crypto domain (VSM) refused or failed an operation.
    #[error("crypto domain: {0}")]
    Vsm(#[from] caas_domc::Error),
    /// The PKCS#11 module (`libcaas_pkcs11.so`) refused or failed a call (its CK_RV name).
    #[error("PKCS#11 module: {0}")]
    Pkcs11(String),
    /// A driver could not start or control a workload.
    #[error("driver: {0}")]
    Driver(String),
    /// qemu's machine protocol (QMP) failed or qemu refused a command.
    #[error(transparent)]
    Qmp(#[from] crate::qmp::QmpError),
    /// The random number generator failed.
    #[error("random number generator failed")]
    Rng,
}

impl Error {
    /// Wraps an IO error with context.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Error::Io { context, source }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
