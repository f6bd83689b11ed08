//! Asymmetric keys and MACs: Sign, Verify, GetPublicKey, GenerateDataKeyPair(WithoutPlaintext),
//! GenerateMac, VerifyMac.
use super::{
    Req, authorize, b64, dry_run, grant_tokens, material, require_enabled, require_usage, resolve,
};
use crate::error::{KmsError, KmsResult};
use crate::material::{self as km, KeySpec};
use crate::model::KeyUsage;
use crate::service::{Ctx, Kms, Out};
use serde_json::json;

fn spec_of(k: &crate::model::KeyRecord) -> KmsResult<KeySpec> {
    Ok(k.key_spec)
}

/// Sign.
pub async fn sign(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let msg = r.blob("Message", 4096)?;
    let alg = r.str("SigningAlgorithm")?;
    let mtype = r.opt_str("MessageType")?.unwrap_or("RAW");
    let l = super::resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "Sign", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::SignVerify, "Sign")?;
    let spec = spec_of(&l.key)?;
    let input = km::sign_input(spec, alg, &msg, mtype)?;
    ctx.detail.insert("SigningAlgorithm".into(), json!(alg));
    ctx.detail.insert("MessageType".into(), json!(mtype));
    dry_run(ctx, r)?;
    let (_, sk) = material(kms, &l.key, None).await?;
    let sig = km::sign_message(spec, &sk, alg, &input)?;
    Ok(Out::reply(
        json!({ "KeyId": l.key.arn(), "Signature": b64(&sig), "SigningAlgorithm": alg }),
    ))
}

/// Verify.
pub async fn verify(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let msg = r.blob("Message", 4096)?;
    let sig = r.blob("Signature", 6144)?;
    let alg = r.str("SigningAlgorithm")?;
    let mtype = r.opt_str("MessageType")?.unwrap_or("RAW");
    let l = super::resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "Verify", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::SignVerify, "Verify")?;
    let spec = spec_of(&l.key)?;
    let input = km::sign_input(spec, alg, &msg, mtype)?;
    ctx.detail.insert("SigningAlgorithm".into(), json!(alg));
    ctx.detail.insert("MessageType".into(), json!(mtype));
    dry_run(ctx, r)?;
    let pk = l
        .key
        .current()
        .and_then(|v| v.public_key.clone())
        .ok_or_else(|| KmsError::Internal("no public key".into()))?;
    if !km::verify_message(spec, &pk, alg, &input, &sig)? {
        return Err(KmsError::InvalidSignature(
            "The signature is not valid for this message and key".into(),
        ));
    }
    Ok(Out::reply(
        json!({ "KeyId": l.key.arn(), "SignatureValid": true, "SigningAlgorithm": alg }),
    ))
}

/// GetPublicKey.
pub async fn get_public_key(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "GetPublicKey", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    let spec = spec_of(&l.key)?;
    if !spec.is_asymmetric() {
        return Err(KmsError::UnsupportedOperation(format!(
            "{} is not an asymmetric key",
            l.key.arn()
        )));
    }
    let pk = l
        .key
        .current()
        .and_then(|v| v.public_key.clone())
        .ok_or_else(|| KmsError::InvalidState("no key material".into()))?;
    let mut out = json!({
        "KeyId": l.key.arn(), "PublicKey": b64(&pk), "CustomerMasterKeySpec": l.key.key_spec,
        "KeySpec": l.key.key_spec, "KeyUsage": l.key.key_usage,
    });
    match l.key.key_usage {
        KeyUsage::SignVerify => out["SigningAlgorithms"] = json!(spec.signing_algorithms()),
        KeyUsage::KeyAgreement => {
            out["KeyAgreementAlgorithms"] = json!(spec.key_agreement_algorithms())
        }
        KeyUsage::EncapsulateDecapsulate => {
            out["EncapsulationAlgorithms"] = json!(spec.encapsulation_algorithms())
        }
        _ => out["EncryptionAlgorithms"] = json!(spec.encryption_algorithms()),
    }
    Ok(Out::reply(out))
}

/// GenerateDataKeyPair / GenerateDataKeyPairWithoutPlaintext: a fresh key pair whose
/// private key is returned encrypted under a symmetric KMS key.
pub async fn generate_data_key_pair(
    kms: &Kms,
    ctx: &mut Ctx,
    r: Req<'_>,
    with_plaintext: bool,
) -> KmsResult<Out> {
    let pair_spec_name = r.str("KeyPairSpec")?;
    let pair_spec = KeySpec::parse(pair_spec_name)
        .filter(|s| s.is_rsa() || s.is_ecc() || *s == KeySpec::EccEd25519)
        .ok_or_else(|| {
            KmsError::Validation(format!("KeyPairSpec {pair_spec_name} is not valid"))
        })?;
    let ec = r.opt_map("EncryptionContext")?.unwrap_or_default();
    // AWS accepts Recipient on GenerateDataKeyPair only.
    let att = if with_plaintext {
        crate::recipient::from_request(kms, ctx, r).await?
    } else {
        None
    };
    let l = super::resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    let action = if with_plaintext {
        "GenerateDataKeyPair"
    } else {
        "GenerateDataKeyPairWithoutPlaintext"
    };
    let extra = crate::recipient::conditions(att.as_ref());
    super::authorize_with(kms, ctx, &l, action, Some(&ec), &grant_tokens(r)?, &extra).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::EncryptDecrypt, action)?;
    if l.key.key_spec != KeySpec::SymmetricDefault {
        return Err(KmsError::InvalidKeyUsage(format!(
            "{} is not a symmetric key",
            l.key.arn()
        )));
    }
    dry_run(ctx, r)?;
    let sk = km::generate(pair_spec)?;
    let pk = km::public_key_der(pair_spec, &sk)?;
    let (v, hbk) = super::material_for_use(kms, &l, None).await?;
    let ct = super::crypto::seal(&l.key.key_id, v, &hbk, &ec, sk.expose())?;
    let mut out = json!({ "PrivateKeyCiphertextBlob": b64(&ct), "PublicKey": b64(&pk), "KeyId": l.key.arn(), "KeyPairSpec": pair_spec.name() });
    if with_plaintext {
        crate::recipient::release(
            kms,
            att.as_ref(),
            &mut out,
            "PrivateKeyPlaintext",
            sk.expose(),
        )?;
    }
    Ok(Out::reply(out))
}

/// GenerateMac.
pub async fn generate_mac(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let msg = r.blob("Message", 4096)?;
    let alg = r.str("MacAlgorithm")?;
    let l = super::resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "GenerateMac", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::GenerateVerifyMac, "GenerateMac")?;
    dry_run(ctx, r)?;
    let (_, k) = material(kms, &l.key, None).await?;
    let mac = km::mac(spec_of(&l.key)?, &k, alg, &msg)?;
    Ok(Out::reply(
        json!({ "Mac": b64(&mac), "MacAlgorithm": alg, "KeyId": l.key.arn() }),
    ))
}

/// VerifyMac.
pub async fn verify_mac(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let msg = r.blob("Message", 4096)?;
    let mac = r.blob("Mac", 64)?;
    let alg = r.str("MacAlgorithm")?;
    let l = super::resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "VerifyMac", None, &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::GenerateVerifyMac, "VerifyMac")?;
    dry_run(ctx, r)?;
    let (_, k) = material(kms, &l.key, None).await?;
    if !km::verify_mac(spec_of(&l.key)?, &k, alg, &msg, &mac)? {
        return Err(KmsError::InvalidMac(
            "The MAC is not valid for this message and key".into(),
        ));
    }
    Ok(Out::reply(
        json!({ "KeyId": l.key.arn(), "MacValid": true, "MacAlgorithm": alg }),
    ))
}
