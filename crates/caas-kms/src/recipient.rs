//! Attestation-gated release, AWS's `Recipient` parameter (`docs/recipient.md`).
//!
//! Decrypt, GenerateDataKey, GenerateDataKeyPair and GenerateRandom accept
//! `Recipient = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": <base64>}`
//! as boto3 sends it. The document is checked by the deployment's [`RecipientVerifier`]
//! (the `caas` binary plugs in one over the registrar's records and the security profiles:
//! `caas_tl::recipient`) **before** authorization, so that the key policy can test what it
//! established through the condition keys of [`conditions`]:
//! `caas:RecipientAttestation:Host`, `caas:RecipientAttestation:Profile` and
//! `caas:RecipientAttestation:PCR<n>` (hex, lower case; `n` the PCR index). A request without
//! `Recipient` has none of them, so a statement that requires one (`StringEquals`, or
//! `Null: false`) does not match it: a policy can refuse plain Decrypt.
//!
//! With a verified recipient the secret (plaintext, data key, private key, random bytes)
//! leaves only as `CiphertextForRecipient`, sealed to the TPM-resident key in the document;
//! `Plaintext` / `PrivateKeyPlaintext` are absent. A refused document is
//! `ValidationException` (AWS's answer to an invalid attestation document), with the
//! refusal's code in the message and in the request's audit record (`Detail.Recipient`).
//!
//! **Hook for DeriveSharedSecret** (and any later operation AWS gives `Recipient`), three
//! lines in the operation:
//! ```text
//! let att = crate::recipient::from_request(kms, ctx, r).await?;          // before resolve/authorize
//! let extra = crate::recipient::conditions(att.as_ref());
//! super::authorize_with(kms, ctx, &l, "DeriveSharedSecret", None, &grant_tokens(r)?, &extra).await?;
//! ...
//! crate::recipient::release(kms, att.as_ref(), &mut out, "SharedSecret", secret.expose())?;
//! ```
use crate::error::{KmsError, KmsResult};
use crate::ops::{Req, b64};
use crate::service::{Ctx, Kms};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

/// The only key encryption algorithm (as in AWS).
pub const KEY_ENCRYPTION_ALGORITHM: &str = "RSAES_OAEP_SHA_256";
/// Largest `AttestationDocument` accepted (decoded bytes).
pub const MAX_DOCUMENT: usize = 48 * 1024;
/// Condition-key prefix (lower case, as the policy engine compares).
pub const CONDITION_PREFIX: &str = "caas:recipientattestation:";

/// Why a document was refused: a stable code (audited) and a message (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable code, e.g. `nonce_replayed`, `attestation_failed`, `ak_not_enrolled`.
    pub code: String,
    /// Human-readable reason.
    pub message: String,
}

/// What a verified document establishes about the recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// Host name at the registrar.
    pub host: String,
    /// Security profile the host's quote satisfied.
    pub profile: String,
    /// Appraised PCR values (hex) by index.
    pub pcrs: BTreeMap<u32, String>,
    /// The recipient key (opaque to the KMS; the verifier seals to it).
    pub recipient_public: Vec<u8>,
}

/// A boxed future (no async-trait dependency).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Verifies attestation documents and seals secrets to their recipient keys.
pub trait RecipientVerifier: Send + Sync + 'static {
    /// Checks a document (consuming its nonce).
    fn verify<'a>(&'a self, document: &'a [u8]) -> BoxFuture<'a, Result<Attested, Refusal>>;
    /// `CiphertextForRecipient` of `secret` for a verified recipient.
    fn seal(&self, recipient: &Attested, secret: &[u8]) -> Result<Vec<u8>, Refusal>;
}

/// Reads and verifies the request's `Recipient`, if any. Records the outcome in the
/// request's audit detail (`Recipient`: host and profile, or the refusal code).
pub async fn from_request(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Option<Attested>> {
    let Some(v) = r.value("Recipient") else {
        return Ok(None);
    };
    let Value::Object(m) = v else {
        return Err(KmsError::Serialization(
            "'Recipient' must be an object".into(),
        ));
    };
    if let Some(k) = m
        .keys()
        .find(|k| *k != "KeyEncryptionAlgorithm" && *k != "AttestationDocument")
    {
        return Err(KmsError::Serialization(format!(
            "Unknown field '{}' in Recipient",
            k.chars().take(64).collect::<String>()
        )));
    }
    let rr = Req(v);
    match rr.opt_str("KeyEncryptionAlgorithm")? {
        None | Some(KEY_ENCRYPTION_ALGORITHM) => {}
        Some(other) => {
            return Err(KmsError::Validation(format!(
                "1 validation error detected: Value '{}' at 'recipient.keyEncryptionAlgorithm' failed to satisfy constraint: Member must satisfy enum value set: [{KEY_ENCRYPTION_ALGORITHM}]",
                other.chars().take(64).collect::<String>()
            )));
        }
    }
    let doc = rr.blob("AttestationDocument", MAX_DOCUMENT)?;
    let Some(verifier) = kms.recipient_verifier() else {
        refused(ctx, "not_configured");
        return Err(KmsError::Validation(
            "This key service does not accept attestation documents".into(),
        ));
    };
    match verifier.verify(&doc).await {
        Ok(a) => {
            ctx.detail.insert(
                "Recipient".into(),
                json!({ "Result": "Verified", "Host": a.host, "Profile": a.profile }),
            );
            Ok(Some(a))
        }
        Err(e) => {
            refused(ctx, &e.code);
            Err(KmsError::Validation(format!(
                "Invalid attestation document ({}): {}",
                e.code, e.message
            )))
        }
    }
}

fn refused(ctx: &mut Ctx, code: &str) {
    ctx.detail.insert(
        "Recipient".into(),
        json!({ "Result": "Refused", "Code": code }),
    );
}

/// The condition keys a verified recipient sets (none without one).
pub fn conditions(a: Option<&Attested>) -> Vec<(String, Vec<String>)> {
    let Some(a) = a else { return vec![] };
    let mut out = vec![
        (format!("{CONDITION_PREFIX}host"), vec![a.host.clone()]),
        (
            format!("{CONDITION_PREFIX}profile"),
            vec![a.profile.clone()],
        ),
    ];
    for (i, v) in &a.pcrs {
        out.push((
            format!("{CONDITION_PREFIX}pcr{i}"),
            vec![v.to_ascii_lowercase()],
        ));
    }
    out
}

/// Puts `secret` into `out`: as `plaintext_field` without a recipient, else sealed to the
/// recipient as `CiphertextForRecipient` (and no plaintext field).
pub fn release(
    kms: &Kms,
    recipient: Option<&Attested>,
    out: &mut Value,
    plaintext_field: &str,
    secret: &[u8],
) -> KmsResult<()> {
    match recipient {
        None => out[plaintext_field] = json!(b64(secret)),
        Some(a) => {
            let verifier = kms
                .recipient_verifier()
                .ok_or_else(|| KmsError::Internal("no recipient verifier".into()))?;
            let ct = verifier.seal(a, secret).map_err(|e| {
                tracing::error!(code = %e.code, "cannot seal to the recipient key");
                KmsError::Validation(format!(
                    "Invalid attestation document ({}): {}",
                    e.code, e.message
                ))
            })?;
            out["CiphertextForRecipient"] = json!(b64(&ct));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_name_host_profile_and_pcrs() {
        assert!(conditions(None).is_empty());
        let a = Attested {
            host: "h1".into(),
            profile: "prod".into(),
            pcrs: [(7, "AB".to_string())].into(),
            recipient_public: vec![],
        };
        let c = conditions(Some(&a));
        assert!(c.contains(&(
            "caas:recipientattestation:profile".into(),
            vec!["prod".into()]
        )));
        assert!(c.contains(&("caas:recipientattestation:pcr7".into(), vec!["ab".into()])));
        assert!(c.contains(&("caas:recipientattestation:host".into(), vec!["h1".into()])));
    }
}
