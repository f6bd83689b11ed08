//! Symmetric cryptography: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
//! GenerateRandom — and RSA-OAEP Encrypt/Decrypt for asymmetric ENCRYPT_DECRYPT keys.
//!
//! Per request (seed 004): a fresh 256-bit nonce, a key derived from the HBK with the
//! SP 800-108 KDF, AES-256-GCM with the header and the canonical encryption context as AAD;
//! the result is the self-describing blob of `blob.rs`.
use super::{
    Req, authorize, authorize_with, b64, dry_run, grant_tokens, material_for_use, require_enabled,
    require_usage, resolve_for_use, resolve_for_use_fresh,
};
use crate::blob;
use crate::error::{KmsError, KmsResult};
use crate::material::{self as km, KeySpec};
use crate::model::KeyUsage;
use crate::recipient;
use crate::service::{Ctx, Kms, Out};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use caas_crypto::{SecretBytes, kdf};
use serde_json::json;
use std::collections::BTreeMap;

const KDF_LABEL: &[u8] = b"caas/kms/encrypt";
/// Largest plaintext of Encrypt (AWS: 4096 bytes).
pub const MAX_PLAINTEXT: usize = 4096;
/// Largest ciphertext blob accepted.
pub const MAX_CIPHERTEXT: usize = 6144;

/// Canonical encoding of an encryption context: sorted pairs, each length-prefixed.
pub fn canonical_context(ec: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in ec {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn gcm(key: &[u8]) -> KmsResult<LessSafeKey> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| KmsError::internal_crypto("aes key"))?,
    ))
}

/// Encrypts under a symmetric key's current HBK.
pub fn seal(
    key_id: &str,
    hbk_version: u32,
    hbk: &SecretBytes,
    ec: &BTreeMap<String, String>,
    plaintext: &[u8],
) -> KmsResult<Vec<u8>> {
    // The derivation nonce and the IV from one call of the DRBG (each call pays its
    // fork/snapshot check and reseed bookkeeping); both are public, in the blob's header.
    let fresh: [u8; 44] =
        caas_crypto::random_array().map_err(|_| KmsError::internal_crypto("rng"))?;
    let (nonce, iv) = fresh.split_at(32);
    let (nonce, iv): (&[u8; 32], [u8; 12]) = match (nonce.try_into(), iv.try_into()) {
        (Ok(n), Ok(i)) => (n, i),
        _ => return Err(KmsError::internal_crypto("rng")),
    };
    let dk = kdf::derive(hbk.expose(), KDF_LABEL, nonce, 32)
        .map_err(|_| KmsError::internal_crypto("kdf"))?;
    let mut out = blob::header(key_id, hbk_version, nonce, &iv)?;
    let mut aad = out.clone();
    aad.extend_from_slice(&canonical_context(ec));
    let hdr = out.len();
    out.extend_from_slice(plaintext);
    let tag = gcm(dk.expose())?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(&aad),
            &mut out[hdr..],
        )
        .map_err(|_| KmsError::internal_crypto("seal"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn invalid() -> KmsError {
    KmsError::InvalidCiphertext("The ciphertext is invalid, was altered, or was encrypted under a different encryption context".into())
}

/// Opens a blob with the named key's HBK version.
pub fn open(
    parsed: &blob::Blob<'_>,
    hbk: &SecretBytes,
    ec: &BTreeMap<String, String>,
) -> KmsResult<SecretBytes> {
    let dk = kdf::derive(hbk.expose(), KDF_LABEL, parsed.nonce, 32)
        .map_err(|_| KmsError::internal_crypto("kdf"))?;
    let mut aad = parsed.header.to_vec();
    aad.extend_from_slice(&canonical_context(ec));
    let mut buf = parsed.sealed.to_vec();
    let n = gcm(dk.expose())?
        .open_in_place(
            Nonce::assume_unique_for_key(*parsed.iv),
            Aad::from(&aad),
            &mut buf,
        )
        .map_err(|_| invalid())?
        .len();
    buf.truncate(n);
    Ok(SecretBytes::new(buf))
}

fn ec_of(r: Req<'_>) -> KmsResult<BTreeMap<String, String>> {
    Ok(r.opt_map("EncryptionContext")?.unwrap_or_default())
}

fn spec_of(k: &crate::model::KeyRecord) -> KmsResult<KeySpec> {
    Ok(k.key_spec)
}

/// Encrypt.
pub async fn encrypt(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let plaintext = SecretBytes::new(r.blob("Plaintext", MAX_PLAINTEXT)?);
    let ec = ec_of(r)?;
    let l = resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "Encrypt", Some(&ec), &grant_tokens(r)?).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::EncryptDecrypt, "Encrypt")?;
    let spec = spec_of(&l.key)?;
    let alg = r
        .opt_str("EncryptionAlgorithm")?
        .unwrap_or("SYMMETRIC_DEFAULT");
    if !spec.encryption_algorithms().contains(&alg) {
        return Err(KmsError::InvalidKeyUsage(format!(
            "EncryptionAlgorithm {alg} is not valid for {}",
            l.key.arn()
        )));
    }
    dry_run(ctx, r)?;
    let ct = if spec.is_rsa() {
        let pk = l
            .key
            .current()
            .and_then(|v| v.public_key.clone())
            .ok_or_else(|| KmsError::Internal("no public key".into()))?;
        km::rsa_encrypt(&pk, alg, plaintext.expose())?
    } else {
        let (v, hbk) = material_for_use(kms, &l, None).await?;
        seal(&l.key.key_id, v, &hbk, &ec, plaintext.expose())?
    };
    Ok(Out::reply(
        json!({ "CiphertextBlob": b64(&ct), "KeyId": l.key.arn(), "EncryptionAlgorithm": alg }),
    ))
}

/// Decrypts a blob for the caller, checking the named key (if any) and the context.
/// The request fields and policy action of the decrypting half of Decrypt / ReEncrypt.
#[derive(Clone, Copy)]
struct DecryptSide {
    key_field: &'static str,
    alg_field: &'static str,
    ec_field: &'static str,
    action: &'static str,
}

const DECRYPT: DecryptSide = DecryptSide {
    key_field: "KeyId",
    alg_field: "EncryptionAlgorithm",
    ec_field: "EncryptionContext",
    action: "Decrypt",
};
const RE_ENCRYPT_FROM: DecryptSide = DecryptSide {
    key_field: "SourceKeyId",
    alg_field: "SourceEncryptionAlgorithm",
    ec_field: "SourceEncryptionContext",
    action: "ReEncryptFrom",
};

async fn decrypt_inner(
    kms: &Kms,
    ctx: &mut Ctx,
    r: Req<'_>,
    side: &DecryptSide,
    extra: &[(String, Vec<String>)],
) -> KmsResult<(SecretBytes, String, String)> {
    let DecryptSide {
        key_field,
        alg_field,
        ec_field,
        action,
    } = *side;
    let ct = r.blob("CiphertextBlob", MAX_CIPHERTEXT)?;
    let ec = r.opt_map(ec_field)?.unwrap_or_default();
    let alg = r.opt_str(alg_field)?.unwrap_or("SYMMETRIC_DEFAULT");
    if alg != "SYMMETRIC_DEFAULT" {
        // Asymmetric: KeyId is required, ciphertext is raw RSA-OAEP.
        let l = resolve_for_use(
            kms,
            ctx,
            r.opt_str(key_field)?.ok_or_else(|| {
                KmsError::Validation("KeyId is required for asymmetric decryption".into())
            })?,
        )
        .await?;
        authorize_with(kms, ctx, &l, action, Some(&ec), &grant_tokens(r)?, extra).await?;
        require_enabled(&l.key)?;
        require_usage(&l.key, KeyUsage::EncryptDecrypt, "Decrypt")?;
        if !spec_of(&l.key)?.is_rsa() {
            return Err(KmsError::InvalidKeyUsage(format!(
                "EncryptionAlgorithm {alg} is not valid for {}",
                l.key.arn()
            )));
        }
        if action == "Decrypt" {
            dry_run(ctx, r)?;
        }
        let (_, sk) = material_for_use(kms, &l, None).await?;
        let p = km::rsa_decrypt(&sk, alg, &ct)?;
        return Ok((p, l.key.arn(), alg.to_string()));
    }
    let parsed = blob::parse(&ct)?;
    let not_found_is_invalid = |e| match e {
        KmsError::NotFound(_) => invalid(),
        other => other,
    };
    let mut l = resolve_for_use(kms, ctx, parsed.key_id)
        .await
        .map_err(not_found_is_invalid)?;
    if l.cached.is_some() && l.key.version(parsed.hbk_version).is_none() {
        // A version the cached record does not know (rotated on another node): the row.
        l = resolve_for_use_fresh(kms, ctx, parsed.key_id)
            .await
            .map_err(not_found_is_invalid)?;
    }
    if let Some(named) = r.opt_str(key_field)? {
        let want = resolve_for_use(kms, ctx, named).await?;
        if want.key.key_id != l.key.key_id {
            return Err(KmsError::IncorrectKey("The key ID in the request does not identify a KMS key that can perform this operation.".into()));
        }
        ctx.key_id = Some(l.key.key_id.clone());
        // kms:RequestAlias is the alias the request named the key by.
        l.alias = want.alias;
    }
    authorize_with(kms, ctx, &l, action, Some(&ec), &grant_tokens(r)?, extra).await?;
    require_enabled(&l.key)?;
    if l.key.key_spec != KeySpec::SymmetricDefault {
        return Err(invalid());
    }
    if action == "Decrypt" {
        dry_run(ctx, r)?;
    }
    let (_, hbk) = material_for_use(kms, &l, Some(parsed.hbk_version))
        .await
        .map_err(|_| invalid())?;
    let p = open(&parsed, &hbk, &ec)?;
    Ok((p, l.key.arn(), "SYMMETRIC_DEFAULT".into()))
}

/// Decrypt (with `Recipient`: the plaintext only as `CiphertextForRecipient`).
pub async fn decrypt(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let att = recipient::from_request(kms, ctx, r).await?;
    let extra = recipient::conditions(att.as_ref());
    let (p, arn, alg) = decrypt_inner(kms, ctx, r, &DECRYPT, &extra).await?;
    let mut out = json!({ "KeyId": arn, "EncryptionAlgorithm": alg });
    recipient::release(kms, att.as_ref(), &mut out, "Plaintext", p.expose())?;
    Ok(Out::reply(out))
}

/// ReEncrypt: decrypt under the source key and context, encrypt under the destination.
pub async fn re_encrypt(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let (p, source_arn, source_alg) = decrypt_inner(kms, ctx, r, &RE_ENCRYPT_FROM, &[]).await?;
    let source_key = ctx.key_id.clone();
    let dest_ec = r
        .opt_map("DestinationEncryptionContext")?
        .unwrap_or_default();
    let dest = resolve_for_use(kms, ctx, r.str("DestinationKeyId")?).await?;
    authorize(
        kms,
        ctx,
        &dest,
        "ReEncryptTo",
        Some(&dest_ec),
        &grant_tokens(r)?,
    )
    .await?;
    require_enabled(&dest.key)?;
    require_usage(&dest.key, KeyUsage::EncryptDecrypt, "ReEncrypt")?;
    let dalg = r
        .opt_str("DestinationEncryptionAlgorithm")?
        .unwrap_or("SYMMETRIC_DEFAULT");
    let spec = spec_of(&dest.key)?;
    if !spec.encryption_algorithms().contains(&dalg) {
        return Err(KmsError::InvalidKeyUsage(format!(
            "EncryptionAlgorithm {dalg} is not valid for {}",
            dest.key.arn()
        )));
    }
    // The source side was opened (nothing of it is returned) and both sides authorized.
    dry_run(ctx, r)?;
    let ct = if spec.is_rsa() {
        let pk = dest
            .key
            .current()
            .and_then(|v| v.public_key.clone())
            .ok_or_else(|| KmsError::Internal("no public key".into()))?;
        km::rsa_encrypt(&pk, dalg, p.expose())?
    } else {
        let (v, hbk) = material_for_use(kms, &dest, None).await?;
        seal(&dest.key.key_id, v, &hbk, &dest_ec, p.expose())?
    };
    if let Some(s) = source_key {
        ctx.detail.insert("SourceKeyId".into(), json!(s));
    }
    Ok(Out::reply(json!({
        "CiphertextBlob": b64(&ct), "SourceKeyId": source_arn, "KeyId": dest.key.arn(),
        "SourceEncryptionAlgorithm": source_alg, "DestinationEncryptionAlgorithm": dalg,
    })))
}

/// GenerateDataKey / GenerateDataKeyWithoutPlaintext.
pub async fn generate_data_key(
    kms: &Kms,
    ctx: &mut Ctx,
    r: Req<'_>,
    with_plaintext: bool,
) -> KmsResult<Out> {
    let len = match (r.opt_str("KeySpec")?, r.opt_int("NumberOfBytes")?) {
        (Some(_), Some(_)) => {
            return Err(KmsError::Validation(
                "Specify either KeySpec or NumberOfBytes, not both".into(),
            ));
        }
        (Some("AES_256"), None) => 32,
        (Some("AES_128"), None) => 16,
        (Some(other), None) => {
            return Err(KmsError::Validation(format!(
                "KeySpec {other} is not valid"
            )));
        }
        (None, Some(n)) if (1..=1024).contains(&n) => n as usize,
        (None, Some(_)) => {
            return Err(KmsError::Validation(
                "NumberOfBytes must be between 1 and 1024".into(),
            ));
        }
        (None, None) => {
            return Err(KmsError::Validation(
                "KeySpec or NumberOfBytes is required".into(),
            ));
        }
    };
    let ec = ec_of(r)?;
    // AWS accepts Recipient on GenerateDataKey only.
    let att = if with_plaintext {
        recipient::from_request(kms, ctx, r).await?
    } else {
        None
    };
    let l = resolve_for_use(kms, ctx, r.str("KeyId")?).await?;
    let action = if with_plaintext {
        "GenerateDataKey"
    } else {
        "GenerateDataKeyWithoutPlaintext"
    };
    let extra = recipient::conditions(att.as_ref());
    authorize_with(kms, ctx, &l, action, Some(&ec), &grant_tokens(r)?, &extra).await?;
    require_enabled(&l.key)?;
    require_usage(&l.key, KeyUsage::EncryptDecrypt, action)?;
    if l.key.key_spec != KeySpec::SymmetricDefault {
        return Err(KmsError::InvalidKeyUsage(format!(
            "{} is not a symmetric key",
            l.key.arn()
        )));
    }
    dry_run(ctx, r)?;
    let dk = SecretBytes::new(km::random(len)?);
    let (v, hbk) = material_for_use(kms, &l, None).await?;
    let ct = seal(&l.key.key_id, v, &hbk, &ec, dk.expose())?;
    let mut out = json!({ "CiphertextBlob": b64(&ct), "KeyId": l.key.arn() });
    if with_plaintext {
        recipient::release(kms, att.as_ref(), &mut out, "Plaintext", dk.expose())?;
    }
    Ok(Out::reply(out))
}

/// GenerateRandom.
pub async fn generate_random(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let n = r
        .opt_int("NumberOfBytes")?
        .ok_or_else(|| KmsError::Validation("NumberOfBytes is required".into()))?;
    if !(1..=1024).contains(&n) {
        return Err(KmsError::Validation(
            "NumberOfBytes must be between 1 and 1024".into(),
        ));
    }
    // No key, no key policy: a verified document is all GenerateRandom can require.
    let att = recipient::from_request(kms, ctx, r).await?;
    let bytes = SecretBytes::new(km::random(n as usize)?);
    let mut out = json!({});
    recipient::release(kms, att.as_ref(), &mut out, "Plaintext", bytes.expose())?;
    Ok(Out::reply(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_bound() -> KmsResult<()> {
        let hbk = SecretBytes::new(vec![3; 32]);
        let ec: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        let ct = seal("k", 1, &hbk, &ec, b"hello")?;
        let p = blob::parse(&ct)?;
        assert_eq!(open(&p, &hbk, &ec)?.expose(), b"hello");
        assert!(open(&p, &hbk, &BTreeMap::new()).is_err());
        // Canonical encoding cannot be confused by shifting bytes between key and value.
        let ec2: BTreeMap<String, String> = [("a1".to_string(), "".to_string())].into();
        assert_ne!(canonical_context(&ec), canonical_context(&ec2));
        Ok(())
    }
}
