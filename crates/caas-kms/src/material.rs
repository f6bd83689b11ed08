//! Key specs and the cryptographic operations on customer key material: generation,
//! signing, verification, RSA encryption and MACs. Private material enters and leaves
//! this module only as [`SecretBytes`] (PKCS#8 DER for asymmetric keys, raw bytes for
//! symmetric and HMAC keys).
use crate::error::{KmsError, KmsResult};
use crate::model::KeyUsage;
use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
    OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};
use aws_lc_rs::{hmac, rand};
use caas_crypto::SecretBytes;

/// A KMS `KeySpec` (serialized as its wire name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySpec {
    /// AES-256-GCM envelope key.
    SymmetricDefault,
    /// HMAC keys.
    Hmac224,
    /// HMAC-SHA-256.
    Hmac256,
    /// HMAC-SHA-384.
    Hmac384,
    /// HMAC-SHA-512.
    Hmac512,
    /// RSA 2048.
    Rsa2048,
    /// RSA 3072.
    Rsa3072,
    /// RSA 4096.
    Rsa4096,
    /// ECC NIST P-256.
    EccP256,
    /// ECC NIST P-384.
    EccP384,
    /// ECC NIST P-521.
    EccP521,
    /// secp256k1.
    EccSecgP256k1,
}

impl serde::Serialize for KeySpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for KeySpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeySpec::parse(&s).ok_or_else(|| serde::de::Error::custom("unknown key spec"))
    }
}

impl std::fmt::Display for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl KeySpec {
    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        use KeySpec::*;
        Some(match s {
            "SYMMETRIC_DEFAULT" => SymmetricDefault,
            "HMAC_224" => Hmac224,
            "HMAC_256" => Hmac256,
            "HMAC_384" => Hmac384,
            "HMAC_512" => Hmac512,
            "RSA_2048" => Rsa2048,
            "RSA_3072" => Rsa3072,
            "RSA_4096" => Rsa4096,
            "ECC_NIST_P256" => EccP256,
            "ECC_NIST_P384" => EccP384,
            "ECC_NIST_P521" => EccP521,
            "ECC_SECG_P256K1" => EccSecgP256k1,
            _ => return None,
        })
    }
    /// The wire name.
    pub fn name(self) -> &'static str {
        use KeySpec::*;
        match self {
            SymmetricDefault => "SYMMETRIC_DEFAULT",
            Hmac224 => "HMAC_224",
            Hmac256 => "HMAC_256",
            Hmac384 => "HMAC_384",
            Hmac512 => "HMAC_512",
            Rsa2048 => "RSA_2048",
            Rsa3072 => "RSA_3072",
            Rsa4096 => "RSA_4096",
            EccP256 => "ECC_NIST_P256",
            EccP384 => "ECC_NIST_P384",
            EccP521 => "ECC_NIST_P521",
            EccSecgP256k1 => "ECC_SECG_P256K1",
        }
    }
    /// The wire name (same as [`KeySpec::name`]).
    pub fn as_str(self) -> &'static str {
        self.name()
    }
    /// Is this an RSA spec?
    pub fn is_rsa(self) -> bool {
        matches!(self, KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096)
    }
    /// Is this an elliptic-curve spec?
    pub fn is_ecc(self) -> bool {
        matches!(
            self,
            KeySpec::EccP256 | KeySpec::EccP384 | KeySpec::EccP521 | KeySpec::EccSecgP256k1
        )
    }
    /// Is this an HMAC spec?
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            KeySpec::Hmac224 | KeySpec::Hmac256 | KeySpec::Hmac384 | KeySpec::Hmac512
        )
    }
    /// Usages this spec allows.
    pub fn allowed_usages(self) -> &'static [KeyUsage] {
        if self == KeySpec::SymmetricDefault {
            &[KeyUsage::EncryptDecrypt]
        } else if self.is_hmac() {
            &[KeyUsage::GenerateVerifyMac]
        } else if self.is_rsa() {
            &[KeyUsage::EncryptDecrypt, KeyUsage::SignVerify]
        } else {
            &[KeyUsage::SignVerify]
        }
    }
    /// Default usage for CreateKey without KeyUsage.
    pub fn default_usage(self) -> KeyUsage {
        if self.is_hmac() {
            KeyUsage::GenerateVerifyMac
        } else if self == KeySpec::SymmetricDefault {
            KeyUsage::EncryptDecrypt
        } else {
            KeyUsage::SignVerify
        }
    }
    /// Signing algorithms (SIGN_VERIFY usage).
    pub fn signing_algorithms(self) -> Vec<&'static str> {
        match self {
            KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => vec![
                "RSASSA_PSS_SHA_256",
                "RSASSA_PSS_SHA_384",
                "RSASSA_PSS_SHA_512",
                "RSASSA_PKCS1_V1_5_SHA_256",
                "RSASSA_PKCS1_V1_5_SHA_384",
                "RSASSA_PKCS1_V1_5_SHA_512",
            ],
            KeySpec::EccP256 | KeySpec::EccSecgP256k1 => vec!["ECDSA_SHA_256"],
            KeySpec::EccP384 => vec!["ECDSA_SHA_384"],
            KeySpec::EccP521 => vec!["ECDSA_SHA_512"],
            _ => vec![],
        }
    }
    /// Encryption algorithms (ENCRYPT_DECRYPT usage).
    pub fn encryption_algorithms(self) -> Vec<&'static str> {
        if self == KeySpec::SymmetricDefault {
            vec!["SYMMETRIC_DEFAULT"]
        } else if self.is_rsa() {
            vec!["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
        } else {
            vec![]
        }
    }
    /// MAC algorithms.
    pub fn mac_algorithms(self) -> Vec<&'static str> {
        match self {
            KeySpec::Hmac224 => vec!["HMAC_SHA_224"],
            KeySpec::Hmac256 => vec!["HMAC_SHA_256"],
            KeySpec::Hmac384 => vec!["HMAC_SHA_384"],
            KeySpec::Hmac512 => vec!["HMAC_SHA_512"],
            _ => vec![],
        }
    }
    fn hmac_len(self) -> usize {
        match self {
            KeySpec::Hmac224 => 28,
            KeySpec::Hmac256 => 32,
            KeySpec::Hmac384 => 48,
            _ => 64,
        }
    }
    fn ecdsa_alg(
        self,
    ) -> Option<(
        &'static signature::EcdsaSigningAlgorithm,
        &'static signature::EcdsaVerificationAlgorithm,
    )> {
        Some(match self {
            KeySpec::EccP256 => (
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &signature::ECDSA_P256_SHA256_ASN1,
            ),
            KeySpec::EccP384 => (
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1,
            ),
            KeySpec::EccP521 => (
                &signature::ECDSA_P521_SHA512_ASN1_SIGNING,
                &signature::ECDSA_P521_SHA512_ASN1,
            ),
            KeySpec::EccSecgP256k1 => (
                &signature::ECDSA_P256K1_SHA256_ASN1_SIGNING,
                &signature::ECDSA_P256K1_SHA256_ASN1,
            ),
            _ => return None,
        })
    }
}

/// Generates fresh key material for a spec.
pub fn generate(spec: KeySpec) -> KmsResult<SecretBytes> {
    let fail = || KmsError::internal_crypto("key generation");
    match spec {
        KeySpec::SymmetricDefault => Ok(SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| fail())?,
        )),
        s if s.is_hmac() => Ok(SecretBytes::new(
            caas_crypto::random_bytes(s.hmac_len()).map_err(|_| fail())?,
        )),
        s if s.is_rsa() => {
            let size = match s {
                KeySpec::Rsa2048 => KeySize::Rsa2048,
                KeySpec::Rsa3072 => KeySize::Rsa3072,
                _ => KeySize::Rsa4096,
            };
            let kp = RsaKeyPair::generate(size).map_err(|_| fail())?;
            let der: Pkcs8V1Der<'static> = kp.as_der().map_err(|_| fail())?;
            Ok(SecretBytes::from_slice(der.as_ref()))
        }
        s => {
            let (alg, _) = s.ecdsa_alg().ok_or_else(fail)?;
            let kp = EcdsaKeyPair::generate(alg).map_err(|_| fail())?;
            let doc = kp.to_pkcs8v1().map_err(|_| fail())?;
            Ok(SecretBytes::from_slice(doc.as_ref()))
        }
    }
}

/// The DER SubjectPublicKeyInfo of an asymmetric key's private material.
pub fn public_key_der(spec: KeySpec, private: &SecretBytes) -> KmsResult<Vec<u8>> {
    let fail = || KmsError::internal_crypto("public key derivation");
    if spec.is_rsa() {
        let kp = RsaKeyPair::from_pkcs8(private.expose()).map_err(|_| fail())?;
        let der = kp.public_key().as_der().map_err(|_| fail())?;
        Ok(der.as_ref().to_vec())
    } else if let Some((alg, _)) = spec.ecdsa_alg() {
        let kp = EcdsaKeyPair::from_pkcs8(alg, private.expose()).map_err(|_| fail())?;
        let der = kp.public_key().as_der().map_err(|_| fail())?;
        Ok(der.as_ref().to_vec())
    } else {
        Err(KmsError::UnsupportedOperation(format!(
            "{} keys have no public key",
            spec.name()
        )))
    }
}

fn digest_alg_for(algorithm: &str) -> Option<&'static digest::Algorithm> {
    if algorithm.ends_with("SHA_256") {
        Some(&digest::SHA256)
    } else if algorithm.ends_with("SHA_384") {
        Some(&digest::SHA384)
    } else if algorithm.ends_with("SHA_512") {
        Some(&digest::SHA512)
    } else {
        None
    }
}

/// The message digest for Sign/Verify: hashes RAW messages, checks DIGEST lengths.
pub fn message_digest(algorithm: &str, message: &[u8], message_type: &str) -> KmsResult<Digest> {
    let alg = digest_alg_for(algorithm)
        .ok_or_else(|| KmsError::Validation(format!("Unsupported SigningAlgorithm {algorithm}")))?;
    match message_type {
        "RAW" => {
            if message.len() > 4096 {
                return Err(KmsError::Validation(
                    "Message must be at most 4096 bytes for MessageType RAW".into(),
                ));
            }
            Ok(digest::digest(alg, message))
        }
        "DIGEST" => digest::Digest::import_less_safe(message, alg).map_err(|_| {
            KmsError::Validation(format!(
                "Digest length {} does not match {algorithm}",
                message.len()
            ))
        }),
        other => Err(KmsError::Validation(format!(
            "Unsupported MessageType {other}"
        ))),
    }
}

fn rsa_encoding(algorithm: &str) -> Option<&'static dyn signature::RsaEncoding> {
    Some(match algorithm {
        "RSASSA_PSS_SHA_256" => &signature::RSA_PSS_SHA256,
        "RSASSA_PSS_SHA_384" => &signature::RSA_PSS_SHA384,
        "RSASSA_PSS_SHA_512" => &signature::RSA_PSS_SHA512,
        "RSASSA_PKCS1_V1_5_SHA_256" => &signature::RSA_PKCS1_SHA256,
        "RSASSA_PKCS1_V1_5_SHA_384" => &signature::RSA_PKCS1_SHA384,
        "RSASSA_PKCS1_V1_5_SHA_512" => &signature::RSA_PKCS1_SHA512,
        _ => return None,
    })
}

fn rsa_verify_params(algorithm: &str) -> Option<&'static signature::RsaParameters> {
    Some(match algorithm {
        "RSASSA_PSS_SHA_256" => &signature::RSA_PSS_2048_8192_SHA256,
        "RSASSA_PSS_SHA_384" => &signature::RSA_PSS_2048_8192_SHA384,
        "RSASSA_PSS_SHA_512" => &signature::RSA_PSS_2048_8192_SHA512,
        "RSASSA_PKCS1_V1_5_SHA_256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "RSASSA_PKCS1_V1_5_SHA_384" => &signature::RSA_PKCS1_2048_8192_SHA384,
        "RSASSA_PKCS1_V1_5_SHA_512" => &signature::RSA_PKCS1_2048_8192_SHA512,
        _ => return None,
    })
}

fn check_signing_alg(spec: KeySpec, algorithm: &str) -> KmsResult<()> {
    if spec.signing_algorithms().contains(&algorithm) {
        Ok(())
    } else {
        Err(KmsError::InvalidKeyUsage(format!(
            "SigningAlgorithm {algorithm} is not valid for a {} key",
            spec.name()
        )))
    }
}

/// Signs a digest with a private key.
pub fn sign(
    spec: KeySpec,
    private: &SecretBytes,
    algorithm: &str,
    digest: &Digest,
) -> KmsResult<Vec<u8>> {
    check_signing_alg(spec, algorithm)?;
    let fail = || KmsError::internal_crypto("sign");
    if spec.is_rsa() {
        let kp = RsaKeyPair::from_pkcs8(private.expose()).map_err(|_| fail())?;
        let enc = rsa_encoding(algorithm).ok_or_else(fail)?;
        let mut sig = vec![0u8; kp.public_modulus_len()];
        kp.sign_digest(enc, digest, &mut sig).map_err(|_| fail())?;
        Ok(sig)
    } else {
        let (alg, _) = spec.ecdsa_alg().ok_or_else(fail)?;
        let kp = EcdsaKeyPair::from_pkcs8(alg, private.expose()).map_err(|_| fail())?;
        let sig = kp.sign_digest(digest).map_err(|_| fail())?;
        Ok(sig.as_ref().to_vec())
    }
}

/// Verifies a signature over a digest with a public key (DER SPKI).
pub fn verify(
    spec: KeySpec,
    public_der: &[u8],
    algorithm: &str,
    digest: &Digest,
    sig: &[u8],
) -> KmsResult<bool> {
    check_signing_alg(spec, algorithm)?;
    let fail = || KmsError::internal_crypto("verify");
    let ok = if spec.is_rsa() {
        let params = rsa_verify_params(algorithm).ok_or_else(fail)?;
        // Parse the SPKI into modulus/exponent form that aws-lc-rs verifies against.
        let pk = aws_lc_rs::rsa::PublicKey::from_der(public_der).map_err(|_| fail())?;
        UnparsedPublicKey::new(params, pk.as_ref())
            .verify_digest(digest, sig)
            .is_ok()
    } else {
        let (_, valg) = spec.ecdsa_alg().ok_or_else(fail)?;
        let parsed = signature::ParsedPublicKey::new(valg, public_der).map_err(|_| fail())?;
        parsed.verify_digest_sig(digest, sig).is_ok()
    };
    Ok(ok)
}

fn oaep(algorithm: &str) -> KmsResult<&'static aws_lc_rs::rsa::OaepAlgorithm> {
    match algorithm {
        "RSAES_OAEP_SHA_1" => Ok(&OAEP_SHA1_MGF1SHA1),
        "RSAES_OAEP_SHA_256" => Ok(&OAEP_SHA256_MGF1SHA256),
        other => Err(KmsError::InvalidKeyUsage(format!(
            "EncryptionAlgorithm {other} is not valid for an RSA key"
        ))),
    }
}

/// RSA-OAEP encryption with a public key (DER SPKI).
pub fn rsa_encrypt(public_der: &[u8], algorithm: &str, plaintext: &[u8]) -> KmsResult<Vec<u8>> {
    let alg = oaep(algorithm)?;
    let pk = PublicEncryptingKey::from_der(public_der)
        .map_err(|_| KmsError::internal_crypto("rsa public key"))?;
    let key = OaepPublicEncryptingKey::new(pk)
        .map_err(|_| KmsError::internal_crypto("rsa public key"))?;
    if plaintext.len() > key.max_plaintext_size(alg) {
        return Err(KmsError::Validation(format!(
            "Plaintext is too long for {algorithm} with this key (max {} bytes)",
            key.max_plaintext_size(alg)
        )));
    }
    let mut out = vec![0u8; key.ciphertext_size()];
    let n = key
        .encrypt(alg, plaintext, &mut out, None)
        .map_err(|_| KmsError::internal_crypto("rsa encrypt"))?
        .len();
    out.truncate(n);
    Ok(out)
}

/// RSA-OAEP decryption with a private key.
pub fn rsa_decrypt(
    private: &SecretBytes,
    algorithm: &str,
    ciphertext: &[u8],
) -> KmsResult<SecretBytes> {
    let alg = oaep(algorithm)?;
    let sk = PrivateDecryptingKey::from_pkcs8(private.expose())
        .map_err(|_| KmsError::internal_crypto("rsa private key"))?;
    let key = OaepPrivateDecryptingKey::new(sk)
        .map_err(|_| KmsError::internal_crypto("rsa private key"))?;
    let mut out = vec![0u8; key.min_output_size()];
    let n = match key.decrypt(alg, ciphertext, &mut out, None) {
        Ok(p) => p.len(),
        Err(_) => {
            return Err(KmsError::InvalidCiphertext(
                "The ciphertext is invalid for this key and algorithm".into(),
            ));
        }
    };
    out.truncate(n);
    Ok(SecretBytes::new(out))
}

fn hmac_alg(spec: KeySpec, algorithm: &str) -> KmsResult<hmac::Algorithm> {
    if !spec.mac_algorithms().contains(&algorithm) {
        return Err(KmsError::InvalidKeyUsage(format!(
            "MacAlgorithm {algorithm} is not valid for a {} key",
            spec.name()
        )));
    }
    Ok(match spec {
        KeySpec::Hmac224 => hmac::HMAC_SHA224,
        KeySpec::Hmac256 => hmac::HMAC_SHA256,
        KeySpec::Hmac384 => hmac::HMAC_SHA384,
        _ => hmac::HMAC_SHA512,
    })
}

/// HMAC over a message.
pub fn mac(
    spec: KeySpec,
    key: &SecretBytes,
    algorithm: &str,
    message: &[u8],
) -> KmsResult<Vec<u8>> {
    let k = hmac::Key::new(hmac_alg(spec, algorithm)?, key.expose());
    Ok(hmac::sign(&k, message).as_ref().to_vec())
}

/// Constant-time HMAC verification.
pub fn verify_mac(
    spec: KeySpec,
    key: &SecretBytes,
    algorithm: &str,
    message: &[u8],
    tag: &[u8],
) -> KmsResult<bool> {
    let k = hmac::Key::new(hmac_alg(spec, algorithm)?, key.expose());
    Ok(hmac::verify(&k, message, tag).is_ok())
}

/// Fresh random bytes for GenerateRandom.
pub fn random(n: usize) -> KmsResult<Vec<u8>> {
    let mut out = vec![0u8; n];
    rand::fill(&mut out).map_err(|_| KmsError::internal_crypto("rng"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_every_spec() -> KmsResult<()> {
        for spec in [
            KeySpec::EccP256,
            KeySpec::EccP384,
            KeySpec::EccP521,
            KeySpec::EccSecgP256k1,
            KeySpec::Rsa2048,
        ] {
            let sk = generate(spec)?;
            let pk = public_key_der(spec, &sk)?;
            for alg in spec.signing_algorithms() {
                let d = message_digest(alg, b"hello", "RAW")?;
                let sig = sign(spec, &sk, alg, &d)?;
                assert!(verify(spec, &pk, alg, &d, &sig)?, "{spec:?} {alg}");
                let d2 = message_digest(alg, b"hellO", "RAW")?;
                assert!(!verify(spec, &pk, alg, &d2, &sig)?, "{spec:?} {alg}");
                // DIGEST mode over the same hash verifies the same signature.
                let dd = message_digest(alg, d.as_ref(), "DIGEST")?;
                assert!(verify(spec, &pk, alg, &dd, &sig)?);
            }
        }
        Ok(())
    }

    #[test]
    fn rsa_oaep_and_hmac_round_trip() -> KmsResult<()> {
        let sk = generate(KeySpec::Rsa2048)?;
        let pk = public_key_der(KeySpec::Rsa2048, &sk)?;
        for alg in ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"] {
            let c = rsa_encrypt(&pk, alg, b"secret")?;
            assert_eq!(rsa_decrypt(&sk, alg, &c)?.expose(), b"secret");
        }
        let hk = generate(KeySpec::Hmac384)?;
        let t = mac(KeySpec::Hmac384, &hk, "HMAC_SHA_384", b"m")?;
        assert!(verify_mac(KeySpec::Hmac384, &hk, "HMAC_SHA_384", b"m", &t)?);
        assert!(!verify_mac(
            KeySpec::Hmac384,
            &hk,
            "HMAC_SHA_384",
            b"n",
            &t
        )?);
        assert!(mac(KeySpec::Hmac384, &hk, "HMAC_SHA_256", b"m").is_err());
        Ok(())
    }
}
