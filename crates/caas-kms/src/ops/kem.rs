//! Key encapsulation: Encapsulate and Decapsulate (ML-KEM, `ENCAPSULATE_DECAPSULATE` keys).
use super::{
    Req, authorize, b64, dry_run, grant_tokens, material, require_enabled, require_usage, resolve,
};
use crate::error::{KmsError, KmsResult};
use crate::material as km;
use crate::model::{KeyRecord, KeyUsage};
use crate::service::{Ctx, Kms, Out};
use serde_json::json;

fn check_alg(r: Req<'_>, key: &KeyRecord) -> KmsResult<()> {
    let alg = r.str("EncapsulationAlgorithm")?;
    if alg != km::ML_KEM {
        return Err(KmsError::Validation(format!(
            "EncapsulationAlgorithm {} is not valid (ML_KEM)",
            alg.chars().take(64).collect::<String>()
        )));
    }
    if !key.key_spec.is_ml_kem() {
        return Err(KmsError::InvalidKeyUsage(format!(
            "{} ({}) is not an ML-KEM key",
            key.arn(),
            key.key_spec
        )));
    }
    Ok(())
}

/// Encapsulate: a fresh shared secret and its ciphertext under the key's public key.
pub async fn encapsulate(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "Encapsulate", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::EncapsulateDecapsulate, "Encapsulate")?;
    check_alg(r, &l.key)?;
    dry_run(ctx, r)?;
    let pk = l
        .key
        .current()
        .and_then(|v| v.public_key.clone())
        .ok_or_else(|| KmsError::Internal("no public key".into()))?;
    let (ct, ss) = km::ml_kem_encapsulate(l.key.key_spec, &pk)?;
    Ok(Out::reply(json!({
        "KeyId": l.key.arn(), "SharedSecret": b64(ss.expose()),
        "SharedSecretCiphertextBlob": b64(&ct), "EncapsulationAlgorithm": km::ML_KEM,
    })))
}

/// Decapsulate: the shared secret of a ciphertext made for the key's public key.
pub async fn decapsulate(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let ct = r.blob("SharedSecretCiphertextBlob", 6144)?;
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "Decapsulate", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::EncapsulateDecapsulate, "Decapsulate")?;
    check_alg(r, &l.key)?;
    dry_run(ctx, r)?;
    let (_, sk) = material(kms, &l.key, None).await?;
    let ss = km::ml_kem_decapsulate(l.key.key_spec, &sk, &ct)?;
    Ok(Out::reply(json!({
        "KeyId": l.key.arn(), "SharedSecret": b64(ss.expose()), "EncapsulationAlgorithm": km::ML_KEM,
    })))
}
