//! Attestation-gated release to a TPM-resident recipient key: the caas counterpart of AWS
//! KMS's `Recipient` (`docs/recipient.md`). Pure Rust, no TPM access: the host agent makes
//! the TPM parts ([`binding`] is what its quote and its TPM2_Certify carry), the key
//! service checks a [`Document`] with [`verify`] and seals the secret with [`seal`], the
//! host agent opens it inside its TPM (`caas_host::recipient`).
//!
//! The document (version 1) is JSON with base64 byte fields:
//! `{"format": "caas-recipient-attestation", "version": 1, "host", "nonce", "ak_public",
//! "recipient": {"public", "certify_attest", "certify_signature"}, "evidence": {"quote",
//! "signature", "event_log", "pcr_values"}}`. Both the quote and the certification of the
//! recipient key carry `binding = SHA-256(lp("caas-recipient-attestation-v1", nonce,
//! SHA-256(recipient.public)))` as qualifying data, so a document is one fresh statement of
//! the host's AK: "this key lives in my TPM, usable only in this PCR state, which is this".
//!
//! [`verify`] checks, in this order, and stops at the first failure (its code):
//! 1. `document_malformed` — parses, format and version, sizes;
//! 2. `host_not_enrolled` — the host is enrolled with the registrar;
//! 3. `ak_not_enrolled` — the document's AK is byte for byte the one the registrar enrolled;
//! 4. `nonce_*` — by the caller's nonce check (issued for this host, fresh, single use);
//! 5. `attestation_failed` — caas-attest's appraisal ([`caas_attest::appraise`], the one the
//!    verifier runs) of the quote against the host's security profile, with `binding` as
//!    the expected qualifying data (a document for another key or nonce fails here);
//! 6. `recipient_key_invalid` — the recipient key is an RSA-2048, fixedTPM/fixedParent,
//!    policy-only decrypt key certified by the AK ([`caas_attest::registrar::check_bind_key`])
//!    with `binding` as the certification's qualifying data;
//! 7. `recipient_key_not_bound` — its authPolicy is PolicyPCR over the PCR values just
//!    appraised: only this TPM, in this state, can use it.
//!
//! `CiphertextForRecipient` is in AWS's format ([`seal`], [`crate::cms`]): a CMS
//! EnvelopedData (DER) whose one KeyTransRecipientInfo carries the content key under
//! RSAES-OAEP-SHA-256 to the recipient key, the secret under AES-256-CBC.

use crate::crypto::{ct_eq, lp, policy_pcr_digest, sha256};
use crate::error::{Error, Result};
use caas_attest::store::{BindKeyRecord, HostRecord, HostState};
use caas_attest::structures::{Attest, Public, PublicKey};
use caas_attest::{Evidence, SecurityProfile, appraise};
use std::collections::BTreeMap;

/// The document's `format` field.
pub const FORMAT: &str = "caas-recipient-attestation";
/// The document version this code writes and reads.
pub const VERSION: u32 = 1;
/// Label of the binding digest.
pub const BINDING_LABEL: &str = "caas-recipient-attestation-v1";
/// Largest document accepted (bytes of JSON).
pub const MAX_DOCUMENT: usize = 48 * 1024;
/// The key encryption algorithm (the only one AWS defines for `Recipient`).
pub const KEY_ENCRYPTION_ALGORITHM: &str = "RSAES_OAEP_SHA_256";

/// A recipient attestation document (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The host's name at the registrar.
    pub host: String,
    /// The key service's nonce.
    #[serde(with = "caas_attest::b64")]
    pub nonce: Vec<u8>,
    /// The AK's TPM2B_PUBLIC (must be the enrolled one).
    #[serde(with = "caas_attest::b64")]
    pub ak_public: Vec<u8>,
    /// The recipient key and its TPM2_Certify by the AK.
    pub recipient: BindKeyRecord,
    /// The quote, its signature, the event log and the PCR values.
    pub evidence: Evidence,
}

impl Document {
    /// Parses a document (size-limited JSON).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_DOCUMENT {
            return Err(Error::rejected(
                "document_malformed",
                format!("attestation document larger than {MAX_DOCUMENT} bytes"),
            ));
        }
        let d: Document = serde_json::from_slice(bytes).map_err(|e| {
            Error::rejected("document_malformed", format!("attestation document: {e}"))
        })?;
        if d.format != FORMAT || d.version != VERSION {
            return Err(Error::rejected(
                "document_malformed",
                format!("not a {FORMAT} version {VERSION} document"),
            ));
        }
        if d.nonce.len() != 32 {
            return Err(Error::rejected(
                "document_malformed",
                "the nonce must be 32 bytes",
            ));
        }
        Ok(d)
    }

    /// The document's encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The qualifying data of the document's quote and certification.
pub fn binding(nonce: &[u8], recipient_public: &[u8]) -> [u8; 32] {
    sha256(&lp(&[
        BINDING_LABEL.as_bytes(),
        nonce,
        &sha256(recipient_public),
    ]))
}

/// What a verified document establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Host name.
    pub host: String,
    /// Its security profile, which the quote satisfied.
    pub profile: String,
    /// PCR bank of the profile (`sha256`, ...).
    pub bank: String,
    /// Appraised PCR values (hex, lower case) by index.
    pub pcrs: BTreeMap<u32, String>,
    /// The recipient key's TPM2B_PUBLIC.
    pub recipient_public: Vec<u8>,
}

/// Steps 2–3 of the check order: the host is enrolled and the document's AK is its AK.
pub fn check_host(doc: &Document, host: Option<&HostRecord>) -> Result<Public> {
    let h = host
        .filter(|h| h.state == HostState::Enrolled)
        .ok_or_else(|| {
            Error::rejected(
                "host_not_enrolled",
                format!("host {} is not enrolled", doc.host),
            )
        })?;
    if !ct_eq(&h.ak_public, &doc.ak_public) {
        return Err(Error::rejected(
            "ak_not_enrolled",
            format!(
                "the document's attestation key is not the one host {} enrolled",
                doc.host
            ),
        ));
    }
    Ok(Public::parse_tpm2b(&h.ak_public)?)
}

/// Steps 5–7 of the check order (the caller did 1–4): appraisal of the quote against
/// `profile` with the binding as qualifying data, then the recipient key.
pub fn verify(
    doc: &Document,
    ak: &Public,
    profile: &SecurityProfile,
    now_ms: u64,
) -> Result<Verified> {
    let bind = binding(&doc.nonce, &doc.recipient.public);
    let v = appraise(ak, &bind, &doc.evidence, profile, now_ms);
    if !v.trusted {
        return Err(Error::rejected(
            "attestation_failed",
            format!(
                "host state does not match security profile {}: {}",
                profile.name,
                caas_attest::verifier::reason_codes(&v)
            ),
        ));
    }
    let key = caas_attest::registrar::check_bind_key(ak, &doc.recipient).map_err(|e| {
        Error::rejected(
            "recipient_key_invalid",
            format!("recipient key not certified by the AK: {e}"),
        )
    })?;
    let cert = Attest::parse(&doc.recipient.certify_attest)
        .map_err(|e| Error::rejected("recipient_key_invalid", e.to_string()))?;
    if !ct_eq(&cert.extra_data, &bind) {
        return Err(Error::rejected(
            "recipient_key_invalid",
            "the recipient key's certification is not for this nonce",
        ));
    }
    if !matches!(key.key, PublicKey::Rsa { bits: 2048, .. }) {
        return Err(Error::rejected(
            "recipient_key_invalid",
            "the recipient key must be RSA-2048",
        ));
    }
    let sel = profile.selection();
    let mut values = Vec::new();
    for p in &sel.pcrs {
        values.push(
            v.pcrs
                .get(p)
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| {
                    Error::rejected("recipient_key_not_bound", "appraised PCR values incomplete")
                })?,
        );
    }
    if !ct_eq(&key.auth_policy, &policy_pcr_digest(&sel, &values)) {
        return Err(Error::rejected(
            "recipient_key_not_bound",
            "the recipient key is not bound to the attested PCR state",
        ));
    }
    Ok(Verified {
        host: doc.host.clone(),
        profile: profile.name.clone(),
        bank: sel.hash.name().to_string(),
        pcrs: v.pcrs.clone(),
        recipient_public: doc.recipient.public.clone(),
    })
}

/// The recipient key's SubjectPublicKeyInfo (DER) from its TPM2B_PUBLIC (an RSA key).
pub fn recipient_spki(recipient_public: &[u8]) -> Result<Vec<u8>> {
    let public =
        Public::parse_tpm2b(recipient_public).map_err(|e| Error::malformed("recipient key", e))?;
    if !matches!(public.key, PublicKey::Rsa { .. }) {
        return Err(Error::malformed("recipient key", "not an RSA key"));
    }
    caas_attest::der::spki(&public.key).map_err(|e| Error::malformed("recipient key", e))
}

/// `CiphertextForRecipient`: `secret` enveloped to the verified recipient key (its
/// TPM2B_PUBLIC) as AWS does, a CMS EnvelopedData ([`crate::cms::envelope`]).
pub fn seal(recipient_public: &[u8], secret: &[u8]) -> Result<Vec<u8>> {
    crate::cms::envelope(&recipient_spki(recipient_public)?, secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_covers_nonce_and_key() {
        let b = binding(&[1; 32], b"key");
        assert_ne!(b, binding(&[2; 32], b"key"));
        assert_ne!(b, binding(&[1; 32], b"other key"));
        assert_eq!(b, binding(&[1; 32], b"key"));
    }

    #[test]
    fn malformed_documents_are_refused_with_their_code() {
        let code = |b: &[u8]| Document::parse(b).err().map(|e| e.code());
        assert_eq!(code(b"not json"), Some("document_malformed"));
        assert_eq!(
            code(&vec![b' '; MAX_DOCUMENT + 1]),
            Some("document_malformed")
        );
        let ev = serde_json::json!({"quote": "", "signature": "", "event_log": ""});
        let doc = |format: &str, version: u32, nonce: &[u8]| {
            serde_json::json!({
                "format": format, "version": version, "host": "h",
                "nonce": caas_attest::b64::encode(nonce), "ak_public": "",
                "recipient": {"public": "", "certify_attest": "", "certify_signature": ""},
                "evidence": ev,
            })
            .to_string()
            .into_bytes()
        };
        assert!(Document::parse(&doc(FORMAT, VERSION, &[0; 32])).is_ok());
        assert_eq!(
            code(&doc("other", VERSION, &[0; 32])),
            Some("document_malformed")
        );
        assert_eq!(code(&doc(FORMAT, 2, &[0; 32])), Some("document_malformed"));
        assert_eq!(
            code(&doc(FORMAT, VERSION, &[0; 8])),
            Some("document_malformed")
        );
        let mut extra: serde_json::Value =
            serde_json::from_slice(&doc(FORMAT, VERSION, &[0; 32])).unwrap_or_default();
        extra["extra"] = serde_json::json!(1);
        assert_eq!(
            code(extra.to_string().as_bytes()),
            Some("document_malformed")
        );
    }
}
