//! caas-tl: trusted launch (TL) and domain-based storage protection (DBSP), seed 003 §4.3
//! and §4.4, message by message, plus the client side of encrypted provisioning (seed 001
//! Algorithm 1). Pure Rust, no TPM access: the host agent does the TPM steps and calls
//! [`sc`]; the key service hosts [`ttp::Ttp`]; the tenant CLI uses [`dm`].
//!
//! ```text
//!  DM ──TL.Request⟨c1,SP,pk_DM,r⟩σDM──► scheduler ──LaunchCall──► SC (host agent)
//!  SC ──TL.AttestRequest⟨…⟩σAIK (quote)──► TTP: AttestVerify → AttestToken
//!  TTP ──TL.Attestation⟨c2=Enc_pkTPM(τ‖H1‖H2‖DK‖id), r⟩σTTP──► SC: unseal (PCR policy),
//!        check id, H1, H2 → inject τ, pk_DM → start workload;  DM ⇄ workload: TLS-PSK(τ)
//!  SC ──DBSP.DomKeyReq⟨SR,H2,r,Enc_DK(meta[,c4,μ])⟩σAIK──► TTP: DomKeyGen
//!  TTP ──⟨c3=Enc_pkTPM(K‖IK), c4, μ, meta, r⟩σTTP──► SC: unseal → volume key
//! ```
pub mod cms;
pub mod crypto;
pub mod dm;
pub mod error;
pub mod migrate;
pub mod recipient;
pub mod sc;
#[cfg(feature = "service")]
pub mod service;
pub mod ttp;
pub mod wire;

pub use crypto::{TtpKeys, TtpPublic};
pub use error::{Error, Result};
