//! Software MakeCredential (TPM 2.0 Library Part 1 §24, "Credential Protection"; KDFa and
//! KDFe per §11.4.10): the registrar encrypts a fresh secret to a TPM's EK, bound to the
//! Name of the attestation key, so that only that TPM — holding both keys — can recover it
//! with TPM2_ActivateCredential. This is the Privacy-CA protocol of host enrollment.

use crate::error::Error;
use crate::structures::{HashAlg, Public, PublicKey, alg, curve};
use crate::wire::put_tpm2b;
use aws_lc_rs::cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::{agreement, hmac, rand, rsa};
use zeroize::Zeroizing;

/// The output of MakeCredential: the two TPM2B payloads (without their size prefixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// TPM2B_ID_OBJECT contents: integrityHMAC (TPM2B) || encIdentity.
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the seed encrypted to the EK.
    pub encrypted_secret: Vec<u8>,
}

fn hmac_alg(h: HashAlg) -> hmac::Algorithm {
    match h {
        HashAlg::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        HashAlg::Sha256 => hmac::HMAC_SHA256,
        HashAlg::Sha384 => hmac::HMAC_SHA384,
        HashAlg::Sha512 => hmac::HMAC_SHA512,
    }
}

/// KDFa (SP 800-108 counter mode with HMAC), TPM 2.0 Part 1 §11.4.10.2.
pub fn kdfa(
    hash: HashAlg,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let k = hmac::Key::new(hmac_alg(hash), key);
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(bytes + hash.digest_len()));
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe (SP 800-56A concatenation KDF), TPM 2.0 Part 1 §11.4.10.3.
pub fn kdfe(
    hash: HashAlg,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(bytes + hash.digest_len()));
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let d = hash.hash_parts(&[
            &counter.to_be_bytes(),
            z,
            label.as_bytes(),
            &[0],
            party_u,
            party_v,
        ]);
        out.extend_from_slice(&d);
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// MakeCredential with a random secret generated here; returns the secret and the blobs.
pub fn make_credential(
    ek: &Public,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<MadeCredential, Error> {
    let name_alg = ek.name_alg;
    if ek.symmetric != alg::AES || !(ek.symmetric_bits == 128 || ek.symmetric_bits == 256) {
        return Err(Error::malformed(
            "EK public",
            "EK is not a storage key with AES-128/256-CFB",
        ));
    }
    if secret.len() > name_alg.digest_len() {
        return Err(Error::InvalidRequest(
            "credential longer than the EK name digest".into(),
        ));
    }
    // 1. Seed, protected to the EK.
    let (seed, encrypted_secret) = match &ek.key {
        PublicKey::Rsa { n, e, .. } => {
            let mut seed = Zeroizing::new(vec![0u8; name_alg.digest_len()]);
            rand::fill(&mut seed).map_err(|_| Error::Crypto("random"))?;
            let spki = crate::der::spki(&PublicKey::Rsa {
                n: n.clone(),
                e: e.clone(),
                bits: 0,
            })?;
            let pk = rsa::PublicEncryptingKey::from_der(&spki)
                .map_err(|_| Error::malformed("EK public", "RSA key rejected"))?;
            let oaep =
                rsa::OaepPublicEncryptingKey::new(pk).map_err(|_| Error::Crypto("OAEP key"))?;
            let oalg = match name_alg {
                HashAlg::Sha1 => &rsa::OAEP_SHA1_MGF1SHA1,
                HashAlg::Sha256 => &rsa::OAEP_SHA256_MGF1SHA256,
                HashAlg::Sha384 => &rsa::OAEP_SHA384_MGF1SHA384,
                HashAlg::Sha512 => &rsa::OAEP_SHA512_MGF1SHA512,
            };
            let mut ct = vec![0u8; oaep.ciphertext_size()];
            let len = oaep
                .encrypt(oalg, &seed, &mut ct, Some(b"IDENTITY\0"))
                .map_err(|_| Error::Crypto("RSA-OAEP encrypt"))?
                .len();
            ct.truncate(len);
            (seed, ct)
        }
        PublicKey::Ecc { curve: c, x, y } => {
            let (agree_alg, size) = match *c {
                curve::NIST_P256 => (&agreement::ECDH_P256, 32),
                curve::NIST_P384 => (&agreement::ECDH_P384, 48),
                other => {
                    return Err(Error::Unsupported {
                        what: "EK curve",
                        value: other,
                    });
                }
            };
            let eph = agreement::PrivateKey::generate(agree_alg)
                .map_err(|_| Error::Crypto("ECDH keygen"))?;
            let eph_pub = eph
                .compute_public_key()
                .map_err(|_| Error::Crypto("ECDH public"))?;
            let eph_pub = eph_pub.as_ref();
            if eph_pub.len() != 1 + 2 * size {
                return Err(Error::Crypto("unexpected ECDH public key encoding"));
            }
            let (ex, ey) = (&eph_pub[1..1 + size], &eph_pub[1 + size..]);
            let peer = crate::der::ec_point(*c, x, y)?;
            let ek_x = &peer[1..1 + size];
            let seed = agreement::agree(
                &eph,
                agreement::UnparsedPublicKey::new(agree_alg, &peer),
                Error::Crypto("ECDH"),
                |z| {
                    Ok(kdfe(
                        name_alg,
                        z,
                        "IDENTITY",
                        ex,
                        ek_x,
                        (name_alg.digest_len() * 8) as u32,
                    ))
                },
            )?;
            let mut point = Vec::new();
            put_tpm2b(&mut point, ex)?;
            put_tpm2b(&mut point, ey)?;
            (seed, point)
        }
        PublicKey::Other => return Err(Error::malformed("EK public", "not an asymmetric key")),
    };
    // 2. Encrypt the credential (as a TPM2B_DIGEST) with the symmetric key bound to the AK name.
    let sym_bits = u32::from(ek.symmetric_bits);
    let sym_key = kdfa(name_alg, &seed, "STORAGE", ak_name, &[], sym_bits);
    let mut enc_identity = Zeroizing::new(Vec::new());
    put_tpm2b(&mut enc_identity, secret)?;
    let cipher = if sym_bits == 128 { &AES_128 } else { &AES_256 };
    let key = UnboundCipherKey::new(cipher, &sym_key).map_err(|_| Error::Crypto("AES key"))?;
    let key = EncryptingKey::cfb128(key).map_err(|_| Error::Crypto("AES-CFB key"))?;
    key.less_safe_encrypt(
        &mut enc_identity,
        EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
    )
    .map_err(|_| Error::Crypto("AES-CFB encrypt"))?;
    // 3. Outer HMAC over encIdentity || Name(AK).
    let hmac_key = kdfa(
        name_alg,
        &seed,
        "INTEGRITY",
        &[],
        &[],
        (name_alg.digest_len() * 8) as u32,
    );
    let k = hmac::Key::new(hmac_alg(name_alg), &hmac_key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(&enc_identity);
    ctx.update(ak_name);
    let integrity = ctx.sign();
    let mut credential_blob = Vec::new();
    put_tpm2b(&mut credential_blob, integrity.as_ref())?;
    credential_blob.extend_from_slice(&enc_identity);
    Ok(MadeCredential {
        credential_blob,
        encrypted_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // KDFa: a fixed vector cross-checked against tpm2-tss' Tss2_Sys-independent
    // implementation in tpm2-tools' `tpm2_makecredential` (same seed/label/context -> same key)
    // is exercised end to end by the swtpm ActivateCredential test; here we check structure.
    #[test]
    fn kdfa_lengths_and_determinism() {
        let a = kdfa(HashAlg::Sha256, b"key", "STORAGE", b"name", &[], 128);
        let b = kdfa(HashAlg::Sha256, b"key", "STORAGE", b"name", &[], 128);
        assert_eq!(a.len(), 16);
        assert_eq!(*a, *b);
        let c = kdfa(HashAlg::Sha256, b"key", "INTEGRITY", b"name", &[], 128);
        assert_ne!(*a, *c);
        assert_eq!(kdfa(HashAlg::Sha256, b"k", "X", &[], &[], 520).len(), 65);
    }
}
