//! caas-tpm: every TPM 2.0 operation caas needs, over tss-esapi (this is the only crate that
//! links libtss2). One [`Tpm`] owns one ESYS context; [`TpmHandle`] runs it on a dedicated
//! thread so async code shares it safely. Operations: EK public and certificate, AK
//! create/load (ECC P-256 default, RSA-2048 optional) under the EK, PCR read/extend, quote,
//! the PCR-policy-bound decrypt ("bind") key certified by the AK, policy-session decrypt,
//! seal/unseal to a PCR policy, and ActivateCredential. Every transient object and session
//! is flushed before an operation returns (swtpm has 3 object and 3 session slots).

mod actor;
mod error;
mod ops;
pub mod swtpm;
mod tcti;

pub use actor::TpmHandle;
pub use error::Error;
pub use ops::{AkAlg, KeyBlob, Quote, Tpm};
pub use tcti::parse_tcti;

/// A PCR bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcrBank {
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
}

impl PcrBank {
    pub(crate) fn alg(self) -> tss_esapi::interface_types::algorithm::HashingAlgorithm {
        use tss_esapi::interface_types::algorithm::HashingAlgorithm as H;
        match self {
            Self::Sha1 => H::Sha1,
            Self::Sha256 => H::Sha256,
            Self::Sha384 => H::Sha384,
        }
    }
    /// Digest size.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }
}
