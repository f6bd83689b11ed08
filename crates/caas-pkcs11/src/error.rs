//! Errors of the PKCS#11 module. Inside the module every failure is a CK_RV (the only error
//! type the C API has); [`Error`] covers loading the configuration.

/// Configuration errors (reported as CKR_GENERAL_ERROR by C_Initialize, with a message on
/// stderr).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither CAAS_PKCS11_SOCKET nor CAAS_PKCS11_CONFIG is set.
    #[error("set CAAS_PKCS11_SOCKET (path of the crypto domain's socket) or CAAS_PKCS11_CONFIG")]
    NotConfigured,
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("parsing {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}
