//! Imported key material (origin EXTERNAL): GetParametersForImport, ImportKeyMaterial,
//! DeleteImportedKeyMaterial. Wrapping: RSAES_OAEP_SHA_256 (material encrypted directly to
//! the wrapping key) and RSA_AES_KEY_WRAP_SHA_256 (an ephemeral AES-256 key under RSA-OAEP
//! SHA-256, followed by the material under AES key wrap with padding, RFC 5649).
use super::{Req, authorize, b64, resolve};
use crate::error::{KmsError, KmsResult};
use crate::material::{self as km, KeySpec};
use crate::model::{HbkVersion, ImportRecord, KeyState, Origin, kind};
use crate::service::{Ctx, Kms, Out};
use aws_lc_rs::hmac;
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use caas_crypto::SecretBytes;
use caas_store::Write;
use serde_json::json;

const TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;
/// `seal_internal` purpose of import wrapping keys (owner: account, key id, token id).
const IMPORT_PURPOSE: &str = "import-wrapping-key";

/// GetParametersForImport.
pub async fn get_parameters(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l.key, "GetParametersForImport", None, &[]).await?;
    if l.key.origin != Origin::External {
        return Err(KmsError::UnsupportedOperation(format!(
            "{} does not have origin EXTERNAL",
            l.key.arn()
        )));
    }
    if l.key.state == KeyState::PendingDeletion {
        return Err(KmsError::InvalidState(format!(
            "{} is pending deletion.",
            l.key.arn()
        )));
    }
    let alg = r.str("WrappingAlgorithm")?;
    if !matches!(
        alg,
        "RSAES_OAEP_SHA_256" | "RSAES_OAEP_SHA_1" | "RSA_AES_KEY_WRAP_SHA_256"
    ) {
        return Err(KmsError::Validation(format!(
            "WrappingAlgorithm {alg} is not supported"
        )));
    }
    let spec = match r.str("WrappingKeySpec")? {
        "RSA_2048" => KeySpec::Rsa2048,
        "RSA_3072" => KeySpec::Rsa3072,
        "RSA_4096" => KeySpec::Rsa4096,
        other => {
            return Err(KmsError::Validation(format!(
                "WrappingKeySpec {other} is not supported"
            )));
        }
    };
    let sk = km::generate(spec)?;
    let pk = km::public_key_der(spec, &sk)?;
    let token_id = uuid::Uuid::new_v4().to_string();
    let valid_to = kms.now_ms() + TOKEN_TTL_MS;
    let rec = ImportRecord {
        token_id: token_id.clone(),
        key_id: l.key.key_id.clone(),
        wrapping_algorithm: alg.into(),
        wrapping_key_ekt: kms.keyring.seal_internal(
            IMPORT_PURPOSE,
            &[&ctx.caller.account, &l.key.key_id, &token_id],
            &sk,
        )?,
        valid_to_ms: valid_to,
    };
    let body = serde_json::to_vec(&rec).map_err(|_| KmsError::Internal("encode".into()))?;
    Ok(Out {
        body: json!({ "KeyId": l.key.arn(), "ImportToken": b64(token_id.as_bytes()), "PublicKey": b64(&pk), "ParametersValidTo": valid_to as f64 / 1000.0 }),
        writes: vec![Write::Put {
            kind: kind::IMPORT.into(),
            account: ctx.caller.account.clone(),
            id: token_id,
            body,
            expect_rev: Some(0),
        }],
    })
}

fn unwrap_material(alg: &str, sk: &SecretBytes, wrapped: &[u8]) -> KmsResult<SecretBytes> {
    let bad = || {
        KmsError::InvalidCiphertext(
            "The encrypted key material could not be unwrapped with the import parameters".into(),
        )
    };
    match alg {
        "RSAES_OAEP_SHA_256" | "RSAES_OAEP_SHA_1" => {
            km::rsa_decrypt(sk, alg, wrapped).map_err(|_| bad())
        }
        "RSA_AES_KEY_WRAP_SHA_256" => {
            let sk_len = aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(sk.expose())
                .map_err(|_| bad())?
                .key_size_bytes();
            let (rsa_part, kw_part) = wrapped.split_at_checked(sk_len).ok_or_else(bad)?;
            let aes = km::rsa_decrypt(sk, "RSAES_OAEP_SHA_256", rsa_part).map_err(|_| bad())?;
            let kek = AesKek::new(&AES_256, aes.expose()).map_err(|_| bad())?;
            let mut out = vec![0u8; kw_part.len()];
            let n = kek
                .unwrap_with_padding(kw_part, &mut out)
                .map_err(|_| bad())?
                .len();
            out.truncate(n);
            Ok(SecretBytes::new(out))
        }
        _ => Err(bad()),
    }
}

fn check_material(spec: KeySpec, m: &SecretBytes) -> KmsResult<()> {
    let ok = match spec {
        KeySpec::SymmetricDefault => m.len() == 32,
        s if s.is_hmac() => (16..=64).contains(&m.len()),
        s => km::public_key_der(s, m).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(KmsError::IncorrectKeyMaterial(
            "The key material is not valid for this key spec".into(),
        ))
    }
}

/// ImportKeyMaterial.
pub async fn import(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let token_raw = r.blob("ImportToken", 4096)?;
    let wrapped = r.blob("EncryptedKeyMaterial", 8192)?;
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l.key, "ImportKeyMaterial", None, &[]).await?;
    if l.key.origin != Origin::External {
        return Err(KmsError::UnsupportedOperation(format!(
            "{} does not have origin EXTERNAL",
            l.key.arn()
        )));
    }
    let token_id = String::from_utf8(token_raw)
        .map_err(|_| KmsError::InvalidImportToken("The import token is invalid".into()))?;
    let o = kms
        .store
        .get(kind::IMPORT, &ctx.caller.account, &token_id)
        .await
        .map_err(KmsError::store)?
        .ok_or_else(|| KmsError::InvalidImportToken("The import token is invalid".into()))?;
    let rec: ImportRecord = serde_json::from_slice::<ImportRecord>(&o.body)
        .ok()
        .filter(|r| r.token_id == o.id)
        .ok_or_else(|| KmsError::mismatch(&o.kind, &o.account, &o.id))?;
    if rec.key_id != l.key.key_id {
        return Err(KmsError::InvalidImportToken(
            "The import token is not for this key".into(),
        ));
    }
    if rec.valid_to_ms < kms.now_ms() {
        return Err(KmsError::ExpiredImportToken(
            "The import token has expired".into(),
        ));
    }
    let sk = kms
        .keyring
        .open_internal(
            IMPORT_PURPOSE,
            &[&ctx.caller.account, &rec.key_id, &token_id],
            &rec.wrapping_key_ekt,
        )
        .await?;
    let m = unwrap_material(&rec.wrapping_algorithm, &sk, &wrapped)?;
    let spec = l.key.key_spec;
    check_material(spec, &m)?;
    // Re-imports must bring the same material (AWS rule); compare keyed fingerprints.
    let fp = fingerprint(kms, &l.key.key_id, &m)?;
    let mut k = l.key.clone();
    if let Some(prev) = &k.import.fingerprint
        && *prev != fp
    {
        return Err(KmsError::IncorrectKeyMaterial(
            "The key material does not match the key's previously imported material".into(),
        ));
    }
    let model = r
        .opt_str("ExpirationModel")?
        .unwrap_or("KEY_MATERIAL_EXPIRES");
    let valid_to = match model {
        "KEY_MATERIAL_DOES_NOT_EXPIRE" => None,
        "KEY_MATERIAL_EXPIRES" => {
            let v = r.value("ValidTo").and_then(|v| v.as_f64()).ok_or_else(|| {
                KmsError::Validation(
                    "ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES".into(),
                )
            })?;
            Some((v * 1000.0) as i64)
        }
        other => {
            return Err(KmsError::Validation(format!(
                "ExpirationModel {other} is not valid"
            )));
        }
    };
    let public_key = if spec.is_rsa() || spec.is_ecc() {
        Some(km::public_key_der(spec, &m)?)
    } else {
        None
    };
    // Imported keys never rotate and re-imports must bring the same material, so the
    // material is always HBK version 1: ciphertexts from before a delete/re-import decrypt.
    let version = 1;
    k.versions = vec![HbkVersion {
        version,
        created_ms: kms.now_ms(),
        ekt: kms.keyring.seal_ekt(&k.account, &k.key_id, version, &m)?,
        public_key,
    }];
    k.import.fingerprint = Some(fp);
    k.import.expiration_model = Some(model.into());
    k.import.valid_to_ms = valid_to;
    if k.state == KeyState::PendingImport {
        k.state = KeyState::Enabled;
    }
    Ok(Out {
        body: json!({ "KeyId": k.arn() }),
        writes: vec![
            l.put(&k)?,
            Write::Delete {
                kind: kind::IMPORT.into(),
                account: ctx.caller.account.clone(),
                id: token_id,
                expect_rev: Some(o.rev),
            },
        ],
    })
}

fn fingerprint(kms: &Kms, key_id: &str, m: &SecretBytes) -> KmsResult<Vec<u8>> {
    // A keyed hash, so the database never holds a plain hash of the material.
    let fk = kms.keyring.fingerprint_key()?;
    let k = hmac::Key::new(hmac::HMAC_SHA256, fk.expose());
    let mut msg = key_id.as_bytes().to_vec();
    msg.push(0);
    msg.extend_from_slice(m.expose());
    let tag = hmac::sign(&k, &msg).as_ref().to_vec();
    zeroize::Zeroize::zeroize(&mut msg);
    Ok(tag)
}

/// DeleteImportedKeyMaterial.
pub async fn delete(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l.key, "DeleteImportedKeyMaterial", None, &[]).await?;
    if l.key.origin != Origin::External {
        return Err(KmsError::UnsupportedOperation(format!(
            "{} does not have origin EXTERNAL",
            l.key.arn()
        )));
    }
    let mut k = l.key.clone();
    if k.state == KeyState::PendingDeletion {
        return Err(KmsError::InvalidState(format!(
            "{} is pending deletion.",
            k.arn()
        )));
    }
    k.versions.clear();
    k.state = KeyState::PendingImport;
    k.import.valid_to_ms = None;
    k.import.expiration_model = None;
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}
