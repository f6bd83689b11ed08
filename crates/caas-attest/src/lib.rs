//! caas-attest: the key-service side of TPM 2.0 remote attestation, in pure Rust (no
//! libtss2). Sans-IO cores: the TCG PC Client event-log parser and replay ([`eventlog`]),
//! TPM structure parsers ([`structures`]), signature checks ([`quote`]), EK certificate
//! validation ([`ekcert`]), software MakeCredential ([`credential`]), security profiles
//! ([`profile`]) and appraisal ([`appraisal`]). On top: the registrar and verifier logic
//! over a small storage trait ([`registrar`], [`verifier`], [`store`]), the binding of a
//! host's TLS client certificate to its TPM identity ([`tls_binding`]) and, with the
//! `service` feature, their HTTP endpoints and the continuous-attestation task, and the one
//! error answer of caas's internal HTTP APIs ([`http_error`]).

pub mod appraisal;
#[cfg(feature = "service")]
pub mod client;
pub mod credential;
pub mod der;
pub mod ekcert;
pub mod error;
pub mod eventlog;
#[cfg(feature = "service")]
pub mod http_error;
pub mod profile;
pub mod quote;
pub mod registrar;
#[cfg(feature = "service")]
pub mod service;
pub mod store;
pub mod structures;
pub mod synthetic;
pub mod tls_binding;
pub mod verifier;
pub mod wire;

pub use appraisal::{Evidence, Reason, Verdict, appraise};
pub use error::Error;
pub use eventlog::{EventLog, EventLogWriter};
pub use profile::{PcrReference, SecurityProfile};
pub use structures::{Attest, HashAlg, PcrSelection, Public, Signature};

/// Current Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serde helper: bytes as standard base64 strings.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    /// Serialises bytes as base64.
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    /// Deserialises base64 into bytes.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
    /// Encodes bytes.
    pub fn encode(v: &[u8]) -> String {
        STANDARD.encode(v)
    }
    /// Decodes a string.
    pub fn decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
        STANDARD.decode(s.as_bytes())
    }
}
