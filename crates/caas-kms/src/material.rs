//! Key specs and the cryptographic operations on customer key material: generation,
//! signing (RSA, ECDSA, Ed25519 and Ed25519ph, ML-DSA with a raw message or an external
//! μ), verification, ECDH key agreement, ML-KEM encapsulation, RSA encryption and MACs.
//! Private material enters and leaves this module only as [`SecretBytes`] (PKCS#8 DER for
//! asymmetric keys — the seed form for ML-DSA —, FIPS 203's decapsulation key for ML-KEM,
//! raw bytes for symmetric and HMAC keys). `lc` holds the two
//! calls into AWS-LC that aws-lc-rs does not wrap (external μ, Ed25519ph).
use crate::error::{KmsError, KmsResult};
use crate::model::KeyUsage;
use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::{AsBigEndian, AsDer, Curve25519SeedBin, Pkcs8V1Der};
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
    OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, PqdsaKeyPair, RsaKeyPair, UnparsedPublicKey,
};
use aws_lc_rs::{agreement, hmac, kem, rand};
use caas_crypto::SecretBytes;

mod lc;
pub use lc::MU_LEN;

/// `SigningAlgorithm` of Ed25519 over the raw message (`MessageType` `RAW` only).
pub const ED25519: &str = "ED25519_SHA_512";
/// `SigningAlgorithm` of Ed25519ph (HashEdDSA; `MessageType` `DIGEST` only: the caller's
/// SHA-512 digest is the message Ed25519ph hashes again, as AWS KMS does).
pub const ED25519_PH: &str = "ED25519_PH_SHA_512";
/// `SigningAlgorithm` of ML-DSA (`MessageType` `RAW` or `EXTERNAL_MU`).
pub const ML_DSA: &str = "ML_DSA_SHAKE_256";
/// `KeyAgreementAlgorithm` ECDH.
pub const ECDH: &str = "ECDH";
/// `EncapsulationAlgorithm` ML-KEM.
pub const ML_KEM: &str = "ML_KEM";

/// Every `SigningAlgorithm` this service knows (others are a `ValidationException`).
pub const SIGNING_ALGORITHMS: &[&str] = &[
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
    "ECDSA_SHA_256",
    "ECDSA_SHA_384",
    "ECDSA_SHA_512",
    ED25519,
    ED25519_PH,
    ML_DSA,
];

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
    /// Ed25519 (`ECC_NIST_EDWARDS25519`).
    EccEd25519,
    /// ML-DSA-44 (FIPS 204).
    MlDsa44,
    /// ML-DSA-65 (FIPS 204).
    MlDsa65,
    /// ML-DSA-87 (FIPS 204).
    MlDsa87,
    /// ML-KEM-512 (FIPS 203).
    MlKem512,
    /// ML-KEM-768 (FIPS 203).
    MlKem768,
    /// ML-KEM-1024 (FIPS 203).
    MlKem1024,
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
            "ECC_NIST_EDWARDS25519" => EccEd25519,
            "ML_DSA_44" => MlDsa44,
            "ML_DSA_65" => MlDsa65,
            "ML_DSA_87" => MlDsa87,
            "ML_KEM_512" => MlKem512,
            "ML_KEM_768" => MlKem768,
            "ML_KEM_1024" => MlKem1024,
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
            EccEd25519 => "ECC_NIST_EDWARDS25519",
            MlDsa44 => "ML_DSA_44",
            MlDsa65 => "ML_DSA_65",
            MlDsa87 => "ML_DSA_87",
            MlKem512 => "ML_KEM_512",
            MlKem768 => "ML_KEM_768",
            MlKem1024 => "ML_KEM_1024",
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
    /// Is this an ECDSA (NIST or secp256k1 curve) spec?
    pub fn is_ecc(self) -> bool {
        matches!(
            self,
            KeySpec::EccP256 | KeySpec::EccP384 | KeySpec::EccP521 | KeySpec::EccSecgP256k1
        )
    }
    /// Is this an ML-DSA spec?
    pub fn is_ml_dsa(self) -> bool {
        matches!(self, KeySpec::MlDsa44 | KeySpec::MlDsa65 | KeySpec::MlDsa87)
    }
    /// Is this an ML-KEM spec?
    pub fn is_ml_kem(self) -> bool {
        matches!(
            self,
            KeySpec::MlKem512 | KeySpec::MlKem768 | KeySpec::MlKem1024
        )
    }
    /// Is this an asymmetric spec (a key pair with a public key)?
    pub fn is_asymmetric(self) -> bool {
        self.is_rsa()
            || self.is_ecc()
            || self.is_ml_dsa()
            || self.is_ml_kem()
            || self == KeySpec::EccEd25519
    }
    /// Key encapsulation algorithms (ENCAPSULATE_DECAPSULATE usage).
    pub fn encapsulation_algorithms(self) -> Vec<&'static str> {
        if self.is_ml_kem() {
            vec![ML_KEM]
        } else {
            vec![]
        }
    }
    /// The ML-KEM parameter set of this spec.
    fn ml_kem_alg(self) -> Option<MlKem> {
        let (alg, oid_last, ek_len, ct_len) = match self {
            KeySpec::MlKem512 => (&kem::ML_KEM_512, 1, 800, 768),
            KeySpec::MlKem768 => (&kem::ML_KEM_768, 2, 1184, 1088),
            KeySpec::MlKem1024 => (&kem::ML_KEM_1024, 3, 1568, 1568),
            _ => return None,
        };
        Some(MlKem {
            alg,
            oid_last,
            ek_len,
            ct_len,
        })
    }
    /// Can keys of this spec derive ECDH shared secrets (`KEY_AGREEMENT`)?
    pub fn is_ecdh(self) -> bool {
        matches!(self, KeySpec::EccP256 | KeySpec::EccP384 | KeySpec::EccP521)
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
        } else if self.is_ecdh() {
            &[KeyUsage::SignVerify, KeyUsage::KeyAgreement]
        } else if self.is_ml_kem() {
            &[KeyUsage::EncapsulateDecapsulate]
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
        } else if self.is_ml_kem() {
            KeyUsage::EncapsulateDecapsulate
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
            KeySpec::EccEd25519 => vec![ED25519, ED25519_PH],
            KeySpec::MlDsa44 | KeySpec::MlDsa65 | KeySpec::MlDsa87 => vec![ML_DSA],
            _ => vec![],
        }
    }
    /// Key agreement algorithms (KEY_AGREEMENT usage).
    pub fn key_agreement_algorithms(self) -> Vec<&'static str> {
        if self.is_ecdh() { vec![ECDH] } else { vec![] }
    }
    fn ml_dsa_alg(
        self,
    ) -> Option<(
        &'static signature::PqdsaSigningAlgorithm,
        &'static signature::PqdsaVerificationAlgorithm,
    )> {
        Some(match self {
            KeySpec::MlDsa44 => (&signature::ML_DSA_44_SIGNING, &signature::ML_DSA_44),
            KeySpec::MlDsa65 => (&signature::ML_DSA_65_SIGNING, &signature::ML_DSA_65),
            KeySpec::MlDsa87 => (&signature::ML_DSA_87_SIGNING, &signature::ML_DSA_87),
            _ => return None,
        })
    }
    fn ecdh_alg(self) -> Option<&'static agreement::Algorithm> {
        Some(match self {
            KeySpec::EccP256 => &agreement::ECDH_P256,
            KeySpec::EccP384 => &agreement::ECDH_P384,
            KeySpec::EccP521 => &agreement::ECDH_P521,
            _ => return None,
        })
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

/// An ML-KEM parameter set (FIPS 203).
struct MlKem {
    alg: &'static kem::Algorithm<kem::AlgorithmId>,
    /// Last arc of id-alg-ml-kem-512/768/1024 = 2.16.840.1.101.3.4.4.{1,2,3}.
    oid_last: u8,
    /// Encapsulation key length.
    ek_len: usize,
    /// Ciphertext length.
    ct_len: usize,
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
        KeySpec::EccEd25519 => {
            let kp = Ed25519KeyPair::generate().map_err(|_| fail())?;
            let doc = kp.to_pkcs8v1().map_err(|_| fail())?;
            Ok(SecretBytes::from_slice(doc.as_ref()))
        }
        s if s.is_ml_kem() => {
            let p = s.ml_kem_alg().ok_or_else(fail)?;
            let dk = kem::DecapsulationKey::generate(p.alg).map_err(|_| fail())?;
            let raw = dk.key_bytes().map_err(|_| fail())?;
            Ok(SecretBytes::from_slice(raw.as_ref()))
        }
        s if s.is_ml_dsa() => {
            let (alg, _) = s.ml_dsa_alg().ok_or_else(fail)?;
            let kp = PqdsaKeyPair::generate(alg).map_err(|_| fail())?;
            let doc = kp.to_pkcs8v1().map_err(|_| fail())?;
            Ok(SecretBytes::from_slice(doc.as_ref()))
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
    } else if spec == KeySpec::EccEd25519 {
        let kp = Ed25519KeyPair::from_pkcs8(private.expose()).map_err(|_| fail())?;
        let der = kp.public_key().as_der().map_err(|_| fail())?;
        Ok(der.as_ref().to_vec())
    } else if let Some((alg, _)) = spec.ml_dsa_alg() {
        let kp = PqdsaKeyPair::from_pkcs8(alg, private.expose()).map_err(|_| fail())?;
        let der = kp.public_key().as_der().map_err(|_| fail())?;
        Ok(der.as_ref().to_vec())
    } else if let Some(p) = spec.ml_kem_alg() {
        // FIPS 203 §7.1: dk = dk_PKE (384·k bytes) ‖ ek ‖ H(ek) ‖ z, and |ek| = 384·k + 32.
        let start = p.ek_len - 32;
        let ek = private
            .expose()
            .get(start..start + p.ek_len)
            .ok_or_else(fail)?;
        // The key must load, and its embedded ek be a valid encapsulation key.
        kem::DecapsulationKey::new(p.alg, private.expose()).map_err(|_| fail())?;
        kem::EncapsulationKey::new(p.alg, ek).map_err(|_| fail())?;
        Ok(ml_kem_spki(p.oid_last, ek))
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

/// What Sign and Verify sign: a digest (RSA, ECDSA), the raw message (Ed25519, ML-DSA
/// `RAW`), ML-DSA's external μ, or the caller's SHA-512 digest that Ed25519ph hashes again.
#[derive(Debug)]
pub enum SignInput {
    /// RSA / ECDSA over a digest.
    Digest(Digest),
    /// Ed25519 or ML-DSA over the message itself.
    Message(Vec<u8>),
    /// ML-DSA over the caller's 64-byte μ.
    Mu([u8; MU_LEN]),
    /// Ed25519ph over the caller's 64-byte SHA-512 digest.
    PreHashed(Vec<u8>),
}

/// Checks `algorithm` and `message_type` against the key spec and the message, AWS's
/// rules: an unknown algorithm or message type, a `DIGEST` of the wrong length, an
/// `EXTERNAL_MU` that is not 64 bytes or not for ML-DSA, `ED25519_SHA_512` other than `RAW`,
/// `ED25519_PH_SHA_512` other than `DIGEST` are `ValidationException`s; an algorithm the
/// key's spec does not offer is `InvalidKeyUsageException`.
pub fn sign_input(
    spec: KeySpec,
    algorithm: &str,
    message: &[u8],
    message_type: &str,
) -> KmsResult<SignInput> {
    if !SIGNING_ALGORITHMS.contains(&algorithm) {
        return Err(KmsError::Validation(format!(
            "Unsupported SigningAlgorithm {}",
            algorithm.chars().take(64).collect::<String>()
        )));
    }
    if !matches!(message_type, "RAW" | "DIGEST" | "EXTERNAL_MU") {
        return Err(KmsError::Validation(format!(
            "Unsupported MessageType {}",
            message_type.chars().take(64).collect::<String>()
        )));
    }
    check_signing_alg(spec, algorithm)?;
    let wrong_type = |allowed: &str| {
        Err(KmsError::Validation(format!(
            "SigningAlgorithm {algorithm} requires MessageType {allowed}, not {message_type}"
        )))
    };
    match algorithm {
        ML_DSA => match message_type {
            "RAW" => Ok(SignInput::Message(message.to_vec())),
            "EXTERNAL_MU" => <[u8; MU_LEN]>::try_from(message)
                .map(SignInput::Mu)
                .map_err(|_| {
                    KmsError::Validation(format!(
                        "Message must be exactly {MU_LEN} bytes for MessageType EXTERNAL_MU, not {}",
                        message.len()
                    ))
                }),
            _ => wrong_type("RAW or EXTERNAL_MU"),
        },
        ED25519 => match message_type {
            "RAW" => Ok(SignInput::Message(message.to_vec())),
            _ => wrong_type("RAW"),
        },
        ED25519_PH => match message_type {
            "DIGEST" if message.len() == 64 => Ok(SignInput::PreHashed(message.to_vec())),
            "DIGEST" => Err(KmsError::Validation(format!(
                "Digest length {} does not match {algorithm} (64 bytes)",
                message.len()
            ))),
            _ => wrong_type("DIGEST"),
        },
        _ if message_type == "EXTERNAL_MU" => wrong_type("RAW or DIGEST"),
        _ => message_digest(algorithm, message, message_type).map(SignInput::Digest),
    }
}

/// Signs a prepared input (see [`sign_input`]) with a private key.
pub fn sign_message(
    spec: KeySpec,
    private: &SecretBytes,
    algorithm: &str,
    input: &SignInput,
) -> KmsResult<Vec<u8>> {
    check_signing_alg(spec, algorithm)?;
    let fail = || KmsError::internal_crypto("sign");
    match input {
        SignInput::Digest(d) => sign(spec, private, algorithm, d),
        SignInput::Message(m) if spec == KeySpec::EccEd25519 => {
            let kp = Ed25519KeyPair::from_pkcs8(private.expose()).map_err(|_| fail())?;
            Ok(kp.try_sign(m).map_err(|_| fail())?.as_ref().to_vec())
        }
        SignInput::Message(m) => {
            let (alg, _) = spec.ml_dsa_alg().ok_or_else(fail)?;
            let kp = PqdsaKeyPair::from_pkcs8(alg, private.expose()).map_err(|_| fail())?;
            let mut sig = vec![0u8; alg.signature_len()];
            let n = kp.sign(m, &mut sig).map_err(|_| fail())?;
            sig.truncate(n);
            Ok(sig)
        }
        SignInput::Mu(mu) => {
            let (alg, _) = spec.ml_dsa_alg().ok_or_else(fail)?;
            lc::mldsa_sign_mu(private.expose(), mu, alg.signature_len()).ok_or_else(fail)
        }
        SignInput::PreHashed(d) => {
            if spec != KeySpec::EccEd25519 {
                return Err(fail());
            }
            let kp = Ed25519KeyPair::from_pkcs8(private.expose()).map_err(|_| fail())?;
            let seed_bin: Curve25519SeedBin<'static> = kp
                .seed()
                .map_err(|_| fail())?
                .as_be_bytes()
                .map_err(|_| fail())?;
            let seed = zeroize::Zeroizing::new(
                <[u8; 32]>::try_from(seed_bin.as_ref()).map_err(|_| fail())?,
            );
            let public = <[u8; 32]>::try_from(kp.public_key().as_ref()).map_err(|_| fail())?;
            Ok(lc::ed25519ph_sign(&seed, &public, d)
                .ok_or_else(fail)?
                .to_vec())
        }
    }
}

/// Verifies a signature over a prepared input (see [`sign_input`]) with a public key (DER
/// SPKI).
pub fn verify_message(
    spec: KeySpec,
    public_der: &[u8],
    algorithm: &str,
    input: &SignInput,
    sig: &[u8],
) -> KmsResult<bool> {
    check_signing_alg(spec, algorithm)?;
    let fail = || KmsError::internal_crypto("verify");
    Ok(match input {
        SignInput::Digest(d) => return verify(spec, public_der, algorithm, d, sig),
        SignInput::Message(m) if spec == KeySpec::EccEd25519 => {
            signature::ParsedPublicKey::new(&signature::ED25519, ed25519_raw(public_der)?)
                .map_err(|_| fail())?
                .verify_sig(m, sig)
                .is_ok()
        }
        SignInput::Message(m) => {
            let (_, valg) = spec.ml_dsa_alg().ok_or_else(fail)?;
            signature::ParsedPublicKey::new(valg, public_der)
                .map_err(|_| fail())?
                .verify_sig(m, sig)
                .is_ok()
        }
        SignInput::Mu(mu) => lc::mldsa_verify_mu(public_der, mu, sig),
        SignInput::PreHashed(d) => lc::ed25519ph_verify(&ed25519_raw(public_der)?, d, sig),
    })
}

/// The raw 32-byte Ed25519 public key of its SubjectPublicKeyInfo (RFC 8410: a fixed
/// 12-byte header, then the key).
fn ed25519_raw(spki: &[u8]) -> KmsResult<[u8; 32]> {
    const HEADER: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    match spki.split_at_checked(HEADER.len()) {
        Some((h, k)) if h == HEADER => {
            <[u8; 32]>::try_from(k).map_err(|_| KmsError::internal_crypto("ed25519 public key"))
        }
        _ => Err(KmsError::internal_crypto("ed25519 public key")),
    }
}

fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
}

/// The SubjectPublicKeyInfo of a raw ML-KEM encapsulation key (FIPS 203 OIDs, no
/// parameters; the key is the BIT STRING's content).
fn ml_kem_spki(oid_last: u8, ek: &[u8]) -> Vec<u8> {
    let alg_id = [
        0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x04, oid_last,
    ];
    let mut bits = vec![0x03];
    der_len(ek.len() + 1, &mut bits);
    bits.push(0);
    bits.extend_from_slice(ek);
    let mut out = vec![0x30];
    der_len(alg_id.len() + bits.len(), &mut out);
    out.extend_from_slice(&alg_id);
    out.extend_from_slice(&bits);
    out
}

/// ML-KEM encapsulation to the key's public key (its SPKI): (ciphertext, shared secret).
pub fn ml_kem_encapsulate(spec: KeySpec, public_der: &[u8]) -> KmsResult<(Vec<u8>, SecretBytes)> {
    let fail = || KmsError::internal_crypto("ml-kem encapsulate");
    let p = spec.ml_kem_alg().ok_or_else(fail)?;
    let raw = public_der
        .len()
        .checked_sub(p.ek_len)
        .and_then(|i| public_der.get(i..))
        .ok_or_else(fail)?;
    let ek = kem::EncapsulationKey::new(p.alg, raw).map_err(|_| fail())?;
    let (ct, ss) = ek.encapsulate().map_err(|_| fail())?;
    Ok((ct.as_ref().to_vec(), SecretBytes::from_slice(ss.as_ref())))
}

/// ML-KEM decapsulation. A ciphertext of the wrong length is a `ValidationException`; a
/// tampered one of the right length yields an unrelated secret (FIPS 203's implicit
/// rejection), as in AWS KMS.
pub fn ml_kem_decapsulate(
    spec: KeySpec,
    private: &SecretBytes,
    ciphertext: &[u8],
) -> KmsResult<SecretBytes> {
    let fail = || KmsError::internal_crypto("ml-kem decapsulate");
    let p = spec.ml_kem_alg().ok_or_else(fail)?;
    if ciphertext.len() != p.ct_len {
        return Err(KmsError::Validation(format!(
            "SharedSecretCiphertextBlob must be {} bytes for {}, not {}",
            p.ct_len,
            spec.name(),
            ciphertext.len()
        )));
    }
    let dk = kem::DecapsulationKey::new(p.alg, private.expose()).map_err(|_| fail())?;
    let ss = dk
        .decapsulate(kem::Ciphertext::from(ciphertext))
        .map_err(|_| fail())?;
    Ok(SecretBytes::from_slice(ss.as_ref()))
}

/// ECDH (`KeyAgreementAlgorithm` `ECDH`): the raw shared secret (the x-coordinate, as
/// AWS KMS returns it) of the key's private key and the peer's public key, which must be a
/// DER SubjectPublicKeyInfo on the key's curve (anything else is a `ValidationException`).
pub fn derive_shared_secret(
    spec: KeySpec,
    private: &SecretBytes,
    peer_spki: &[u8],
) -> KmsResult<SecretBytes> {
    let fail = || KmsError::internal_crypto("ecdh");
    let alg = spec.ecdh_alg().ok_or_else(|| {
        KmsError::InvalidKeyUsage(format!("{} keys cannot derive shared secrets", spec.name()))
    })?;
    let bad_peer = || {
        KmsError::Validation(format!(
            "PublicKey must be a DER SubjectPublicKeyInfo of a {} public key",
            spec.name()
        ))
    };
    // A SubjectPublicKeyInfo is a DER SEQUENCE; aws-lc-rs would also take a bare point.
    if peer_spki.first() != Some(&0x30) {
        return Err(bad_peer());
    }
    let peer = agreement::UnparsedPublicKey::new(alg, peer_spki);
    let sk =
        agreement::PrivateKey::from_private_key_der(alg, private.expose()).map_err(|_| fail())?;
    agreement::agree(&sk, peer, bad_peer(), |s| Ok(SecretBytes::from_slice(s)))
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
