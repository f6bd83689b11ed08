//! Key agreement: DeriveSharedSecret (ECDH with a `KEY_AGREEMENT` key on P-256/384/521).
use super::{
    Req, authorize_with, dry_run, grant_tokens, material, require_enabled, require_usage, resolve,
};
use crate::error::{KmsError, KmsResult};
use crate::material as km;
use crate::model::{KeyUsage, Origin};
use crate::service::{Ctx, Kms, Out};
use serde::Serialize;
use serde_json::json;

/// DeriveSharedSecret's response (AWS's shape) without the secret: `SharedSecret` (the raw
/// ECDH secret) or, with `Recipient` (attestation-gated release), `CiphertextForRecipient`
/// instead is added by [`crate::recipient::release`].
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeriveSharedSecretResponse {
    /// Key ARN.
    pub key_id: String,
    /// `ECDH`.
    pub key_agreement_algorithm: &'static str,
    /// The key's origin.
    pub key_origin: Origin,
}

/// DeriveSharedSecret. The peer's public key is a DER SubjectPublicKeyInfo on the key's
/// curve; the answer is the raw x-coordinate (no KDF), as AWS KMS returns it.
pub async fn derive_shared_secret(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let alg = r.str("KeyAgreementAlgorithm")?;
    if alg != km::ECDH {
        return Err(KmsError::Validation(format!(
            "KeyAgreementAlgorithm {} is not valid (ECDH)",
            alg.chars().take(64).collect::<String>()
        )));
    }
    let peer = r.blob("PublicKey", 8192)?;
    let att = crate::recipient::from_request(kms, ctx, r).await?;
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    let extra = crate::recipient::conditions(att.as_ref());
    authorize_with(
        kms,
        ctx,
        &l,
        "DeriveSharedSecret",
        None,
        &grant_tokens(r)?,
        &extra,
    )
    .await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::KeyAgreement, "DeriveSharedSecret")?;
    if !l.key.key_spec.is_ecdh() {
        return Err(KmsError::InvalidKeyUsage(format!(
            "{} ({}) cannot derive shared secrets",
            l.key.arn(),
            l.key.key_spec
        )));
    }
    ctx.detail
        .insert("KeyAgreementAlgorithm".into(), json!(alg));
    dry_run(ctx, r)?;
    let (_, sk) = material(kms, &l.key, None).await?;
    let secret = km::derive_shared_secret(l.key.key_spec, &sk, &peer)?;
    let resp = DeriveSharedSecretResponse {
        key_id: l.key.arn(),
        key_agreement_algorithm: km::ECDH,
        key_origin: l.key.origin,
    };
    let mut out = serde_json::to_value(&resp).map_err(|_| KmsError::Internal("encode".into()))?;
    crate::recipient::release(kms, att.as_ref(), &mut out, "SharedSecret", secret.expose())?;
    Ok(Out::reply(out))
}
