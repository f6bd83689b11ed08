//! Key material held by the crypto domain, parsed once per object from its stored secret or
//! public attributes, and the primitive operations on it (all through aws-lc-rs). Secret
//! bytes live only in `Zeroizing` buffers and aws-lc key objects; `Debug` never shows them.

use crate::der;
use crate::error::Ckr;
use aws_lc_rs::encoding::{AsBigEndian, AsDer};
use aws_lc_rs::signature::{self, KeyPair as _};
use aws_lc_rs::{agreement, digest, rsa};
use cryptoki_sys::*;
use zeroize::Zeroizing;

/// The elliptic curves the domain supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// NIST P-256.
    P256,
    /// NIST P-384.
    P384,
    /// NIST P-521.
    P521,
    /// Edwards25519 (EdDSA).
    Ed25519,
}

impl Curve {
    /// Parses CKA_EC_PARAMS.
    pub fn from_params(p: &[u8]) -> Result<Self, Ckr> {
        match p {
            der::OID_P256 => Ok(Curve::P256),
            der::OID_P384 => Ok(Curve::P384),
            der::OID_P521 => Ok(Curve::P521),
            der::OID_ED25519 | der::NAME_ED25519 => Ok(Curve::Ed25519),
            _ => Err(Ckr(CKR_CURVE_NOT_SUPPORTED)),
        }
    }

    /// CKA_EC_PARAMS of the curve.
    #[must_use]
    pub fn params(self) -> &'static [u8] {
        match self {
            Curve::P256 => der::OID_P256,
            Curve::P384 => der::OID_P384,
            Curve::P521 => der::OID_P521,
            Curve::Ed25519 => der::OID_ED25519,
        }
    }

    /// Field (and order) size in bytes.
    #[must_use]
    pub fn field_len(self) -> usize {
        match self {
            Curve::P256 | Curve::Ed25519 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }

    fn signing(self) -> &'static signature::EcdsaSigningAlgorithm {
        match self {
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            Curve::P521 => &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
            _ => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        }
    }

    fn verifying(self) -> &'static signature::EcdsaVerificationAlgorithm {
        match self {
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED,
            Curve::P521 => &signature::ECDSA_P521_SHA512_FIXED,
            _ => &signature::ECDSA_P256_SHA256_FIXED,
        }
    }

    fn agreement(self) -> &'static agreement::Algorithm {
        match self {
            Curve::P384 => &agreement::ECDH_P384,
            Curve::P521 => &agreement::ECDH_P521,
            _ => &agreement::ECDH_P256,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Curve::P384 => &digest::SHA384,
            Curve::P521 => &digest::SHA512,
            _ => &digest::SHA256,
        }
    }
}

/// Parsed key material of one object (one per object, behind an `Arc`: size is no concern).
#[allow(clippy::large_enum_variant)]
pub enum KeyMaterial {
    /// RSA private key (signing and decryption views of the same PKCS#8).
    RsaPrivate {
        /// Signing key.
        sign: signature::RsaKeyPair,
        /// Decryption key.
        decrypt: rsa::PrivateDecryptingKey,
        /// PKCS#8, for the raw PKCS#1 v1.5 path.
        pkcs8: Zeroizing<Vec<u8>>,
        /// Raw-signing key (built on first CKM_RSA_PKCS over non-DigestInfo data).
        raw: std::sync::OnceLock<openssl::rsa::Rsa<openssl::pkey::Private>>,
    },
    /// A 1024-bit RSA private key (legacy; used only when the crypto domain runs with
    /// `--allow-legacy-rsa-1024`, for PKCS#1 v1.5 signatures). aws-lc-rs refuses keys below
    /// 2048 bits, so these go through OpenSSL, which clears the key's bignums when freed.
    RsaLegacyPrivate {
        /// The key.
        key: openssl::rsa::Rsa<openssl::pkey::Private>,
        /// Its PKCS#8 encoding.
        pkcs8: Zeroizing<Vec<u8>>,
    },
    /// RSA public key.
    RsaPublic {
        /// PKCS#1 RSAPublicKey DER.
        der: Vec<u8>,
        /// Modulus and exponent (big-endian) for raw verification.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
        /// Modulus length in bytes.
        modulus_len: usize,
    },
    /// ECDSA private key.
    EcPrivate {
        /// The curve.
        curve: Curve,
        /// Signing key.
        sign: signature::EcdsaKeyPair,
        /// Scalar for ECDH.
        scalar: Zeroizing<Vec<u8>>,
    },
    /// EC public key (uncompressed point).
    EcPublic {
        /// The curve.
        curve: Curve,
        /// Uncompressed point.
        point: Vec<u8>,
    },
    /// Ed25519 private key.
    EdPrivate(signature::Ed25519KeyPair),
    /// Ed25519 public key (32 bytes).
    EdPublic(Vec<u8>),
    /// Ed448 private key (CKK_EC_EDWARDS with Ed448 parameters; OpenSSL, as aws-lc-rs has
    /// no Ed448).
    Ed448Private(openssl::pkey::PKey<openssl::pkey::Private>),
    /// Ed448 public key (57 bytes).
    Ed448Public(Vec<u8>),
    /// X25519 private key (CKK_EC_MONTGOMERY, RFC 7748; ECDH only).
    XPrivate(agreement::PrivateKey),
    /// X25519 public key (32 bytes, the u-coordinate little-endian).
    XPublic(Vec<u8>),
    /// ML-DSA private key (PKCS#11 3.2, [`crate::pq`]).
    MlDsaPrivate(crate::pq::MlDsaPrivate),
    /// ML-DSA public key.
    MlDsaPublic {
        /// Parameter set.
        set: crate::pq::MlDsa,
        /// Encoded public key.
        public: Vec<u8>,
    },
    /// ML-KEM private (decapsulation) key.
    MlKemPrivate(crate::pq::MlKemPrivate),
    /// ML-KEM public (encapsulation) key.
    MlKemPublic {
        /// Parameter set.
        set: crate::pq::MlKem,
        /// Encoded public key.
        public: Vec<u8>,
    },
    /// AES, HMAC or generic secret key.
    Secret(Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyMaterial::RsaPrivate { .. } => "RsaPrivate([REDACTED])",
            KeyMaterial::RsaLegacyPrivate { .. } => "RsaLegacyPrivate([REDACTED])",
            KeyMaterial::RsaPublic { .. } => "RsaPublic",
            KeyMaterial::EcPrivate { .. } => "EcPrivate([REDACTED])",
            KeyMaterial::EcPublic { .. } => "EcPublic",
            KeyMaterial::EdPrivate(_) => "EdPrivate([REDACTED])",
            KeyMaterial::EdPublic(_) => "EdPublic",
            KeyMaterial::XPrivate(_) => "XPrivate([REDACTED])",
            KeyMaterial::Ed448Private(_) => "Ed448Private([REDACTED])",
            KeyMaterial::Ed448Public(_) => "Ed448Public",
            KeyMaterial::XPublic(_) => "XPublic",
            KeyMaterial::MlDsaPrivate(_) => "MlDsaPrivate([REDACTED])",
            KeyMaterial::MlDsaPublic { .. } => "MlDsaPublic",
            KeyMaterial::MlKemPrivate(_) => "MlKemPrivate([REDACTED])",
            KeyMaterial::MlKemPublic { .. } => "MlKemPublic",
            KeyMaterial::Secret(_) => "Secret([REDACTED])",
        })
    }
}

fn bad_key<E>(_: E) -> Ckr {
    Ckr(CKR_KEY_TYPE_INCONSISTENT)
}

/// A freshly generated key pair: the private secret to store plus public attributes.
#[derive(Debug)]
pub struct GeneratedPair {
    /// Secret of the private object (PKCS#8 for RSA, scalar for EC, seed for Ed25519).
    pub secret: Zeroizing<Vec<u8>>,
    /// Public attributes shared by both objects: (type, canonical value).
    pub public_attrs: Vec<(u64, Vec<u8>)>,
}

/// Public attributes of an RSA key from its PKCS#8 encoding.
pub fn rsa_public_attrs(pkcs8: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, Ckr> {
    let parts = der::rsa_parts_from_pkcs8(pkcs8).ok_or(Ckr(CKR_WRAPPED_KEY_INVALID))?;
    Ok(vec![
        (CKA_MODULUS, parts.n.to_vec()),
        (CKA_PUBLIC_EXPONENT, parts.e.to_vec()),
        (
            CKA_MODULUS_BITS,
            caas_vsm_proto::attr::ulong(bit_len(parts.n)),
        ),
    ])
}

fn bit_len(be: &[u8]) -> u64 {
    let skip = be.iter().take_while(|b| **b == 0).count();
    match be.get(skip) {
        None => 0,
        Some(first) => ((be.len() - skip) as u64) * 8 - u64::from(first.leading_zeros()),
    }
}

/// Bits below which an RSA key is "legacy" (only 1024 is accepted, and only by a domain
/// started with `--allow-legacy-rsa-1024`).
pub const RSA_MIN_BITS: u64 = 2048;

/// The largest RSA key the domain generates (the top of `CKM_RSA_PKCS_KEY_PAIR_GEN`'s range;
/// generation time grows with the cube of the size, so this also bounds what one request
/// can cost the domain).
pub const RSA_MAX_BITS: u64 = 4096;

/// Generates an RSA key pair of `bits`: any size from [`RSA_MIN_BITS`] to [`RSA_MAX_BITS`]
/// (2048, 3072 and 4096 by aws-lc-rs, other sizes such as the 3092 bits of the
/// pkcs11-provider suite by OpenSSL, e = 65537; aws-lc-rs then loads the PKCS#8 as for any
/// key); 1024 too when `legacy_1024`.
pub fn generate_rsa(bits: u64, legacy_1024: bool) -> Result<GeneratedPair, Ckr> {
    let size = match bits {
        2048 => rsa::KeySize::Rsa2048,
        3072 => rsa::KeySize::Rsa3072,
        4096 => rsa::KeySize::Rsa4096,
        1024 if legacy_1024 => return generate_rsa_openssl(1024),
        _ if (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) => {
            let g = generate_rsa_openssl(bits)?;
            // The key must be usable on the aws-lc-rs path it will be loaded into.
            KeyMaterial::rsa_private(&g.secret)?;
            return Ok(g);
        }
        _ => return Err(Ckr(CKR_KEY_SIZE_RANGE)),
    };
    let kp = signature::RsaKeyPair::generate(size).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let pkcs8 = kp.as_der().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let secret = Zeroizing::new(pkcs8.as_ref().to_vec());
    let public_attrs = rsa_public_attrs(&secret)?;
    Ok(GeneratedPair {
        secret,
        public_attrs,
    })
}

/// An RSA key pair of `bits` made by OpenSSL (sizes aws-lc-rs does not generate); OpenSSL
/// clears the key's bignums when freed, the PKCS#8 is zeroizing.
fn generate_rsa_openssl(bits: u64) -> Result<GeneratedPair, Ckr> {
    let bits = u32::try_from(bits).map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
    let e = openssl::bn::BigNum::from_u32(65537).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let key = openssl::rsa::Rsa::generate_with_e(bits, &e).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let pkey = openssl::pkey::PKey::from_rsa(key).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let secret = Zeroizing::new(
        pkey.private_key_to_pkcs8()
            .map_err(|_| Ckr(CKR_DEVICE_ERROR))?,
    );
    let public_attrs = rsa_public_attrs(&secret)?;
    Ok(GeneratedPair {
        secret,
        public_attrs,
    })
}

/// Generates an EC key pair on `curve`.
pub fn generate_ec(curve: Curve) -> Result<GeneratedPair, Ckr> {
    match curve {
        Curve::Ed25519 => {
            let kp = signature::Ed25519KeyPair::generate().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            let seed = kp.seed().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            let seed_bytes: aws_lc_rs::encoding::Curve25519SeedBin<'_> =
                seed.as_be_bytes().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            let point = kp.public_key().as_ref().to_vec();
            Ok(GeneratedPair {
                secret: Zeroizing::new(seed_bytes.as_ref().to_vec()),
                public_attrs: vec![
                    (CKA_EC_PARAMS, curve.params().to_vec()),
                    (CKA_EC_POINT, der::tlv(0x04, &point)),
                ],
            })
        }
        _ => {
            let kp = signature::EcdsaKeyPair::generate(curve.signing())
                .map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            let scalar: aws_lc_rs::encoding::EcPrivateKeyBin<'_> =
                kp.private_key()
                    .as_be_bytes()
                    .map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            let point = kp.public_key().as_ref().to_vec();
            Ok(GeneratedPair {
                secret: Zeroizing::new(scalar.as_ref().to_vec()),
                public_attrs: vec![
                    (CKA_EC_PARAMS, curve.params().to_vec()),
                    (CKA_EC_POINT, der::tlv(0x04, &point)),
                ],
            })
        }
    }
}

/// Ed448 private and public key length (RFC 8032 §5.2).
pub const ED448_KEY_LEN: usize = 57;
/// Ed448 signature length.
pub const ED448_SIG_LEN: usize = 114;

/// Generates an Ed448 key pair (CKM_EC_EDWARDS_KEY_PAIR_GEN with Ed448 parameters): 57
/// random bytes from aws-lc's generator as the private key, kept in a zeroizing buffer; the
/// public key computed by OpenSSL.
pub fn generate_ed448() -> Result<GeneratedPair, Ckr> {
    let mut secret = Zeroizing::new(vec![0u8; ED448_KEY_LEN]);
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let KeyMaterial::Ed448Private(k) = KeyMaterial::ed448_private(&secret)? else {
        return Err(Ckr(CKR_DEVICE_ERROR));
    };
    let public = k.raw_public_key().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    Ok(GeneratedPair {
        secret,
        public_attrs: vec![
            (CKA_EC_PARAMS, der::OID_ED448.to_vec()),
            (CKA_EC_POINT, der::tlv(0x04, &public)),
        ],
    })
}

/// Generates an X25519 key pair (CKM_EC_MONTGOMERY_KEY_PAIR_GEN): the 32-byte private key
/// and the public attributes (CKA_EC_PARAMS, CKA_EC_POINT as a DER OCTET STRING, as for
/// Ed25519 and as SoftHSM2 does).
pub fn generate_x25519() -> Result<GeneratedPair, Ckr> {
    let k =
        agreement::PrivateKey::generate(&agreement::X25519).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let secret: aws_lc_rs::encoding::Curve25519SeedBin<'_> =
        k.as_be_bytes().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let public = k.compute_public_key().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    Ok(GeneratedPair {
        secret: Zeroizing::new(secret.as_ref().to_vec()),
        public_attrs: vec![
            (CKA_EC_PARAMS, der::OID_X25519.to_vec()),
            (CKA_EC_POINT, der::tlv(0x04, public.as_ref())),
        ],
    })
}

/// The raw 32-byte X25519 public value of CKA_EC_POINT or ECDH public data (raw, or a DER
/// OCTET STRING around it).
fn x25519_point(v: &[u8]) -> Result<&[u8], Ckr> {
    let raw = der::octet_string(v).filter(|r| r.len() == 32).unwrap_or(v);
    if raw.len() == 32 {
        Ok(raw)
    } else {
        Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
    }
}

/// Public EC point (uncompressed, or 32 bytes for Ed25519) for a private scalar/seed.
pub fn ec_public_point(curve: Curve, secret: &[u8]) -> Result<Vec<u8>, Ckr> {
    match curve {
        Curve::Ed25519 => {
            let kp = signature::Ed25519KeyPair::from_seed_unchecked(secret)
                .map_err(|_| Ckr(CKR_ATTRIBUTE_VALUE_INVALID))?;
            Ok(kp.public_key().as_ref().to_vec())
        }
        _ => {
            let pk = agreement::PrivateKey::from_private_key(curve.agreement(), secret)
                .map_err(|_| Ckr(CKR_ATTRIBUTE_VALUE_INVALID))?;
            let public = pk.compute_public_key().map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
            Ok(public.as_ref().to_vec())
        }
    }
}

impl KeyMaterial {
    /// Parses an RSA private key from PKCS#8. A 1024-bit key parses as
    /// [`KeyMaterial::RsaLegacyPrivate`]; whether it may be used is the domain's policy.
    pub fn rsa_private(pkcs8: &[u8]) -> Result<Self, Ckr> {
        if der::rsa_parts_from_pkcs8(pkcs8).is_some_and(|p| bit_len(p.n) == 1024) {
            return Ok(KeyMaterial::RsaLegacyPrivate {
                key: raw_rsa_key(pkcs8)?,
                pkcs8: Zeroizing::new(pkcs8.to_vec()),
            });
        }
        Ok(KeyMaterial::RsaPrivate {
            sign: signature::RsaKeyPair::from_pkcs8(pkcs8).map_err(bad_key)?,
            decrypt: rsa::PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(bad_key)?,
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            raw: std::sync::OnceLock::new(),
        })
    }

    /// An RSA public key from modulus and exponent.
    pub fn rsa_public(n: &[u8], e: &[u8]) -> Result<Self, Ckr> {
        let skip = n.iter().take_while(|b| **b == 0).count();
        let modulus_len = n.len() - skip;
        if !(128..=1024).contains(&modulus_len) {
            return Err(Ckr(CKR_KEY_SIZE_RANGE));
        }
        Ok(KeyMaterial::RsaPublic {
            der: der::rsa_public_key(n, e),
            n: n.to_vec(),
            e: e.to_vec(),
            modulus_len,
        })
    }

    /// An EC or Ed25519 private key from its scalar/seed.
    pub fn ec_private(curve: Curve, secret: &[u8]) -> Result<Self, Ckr> {
        if secret.len() != curve.field_len() {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        }
        match curve {
            Curve::Ed25519 => Ok(KeyMaterial::EdPrivate(
                signature::Ed25519KeyPair::from_seed_unchecked(secret).map_err(bad_key)?,
            )),
            _ => {
                let point = ec_public_point(curve, secret)?;
                let sign = signature::EcdsaKeyPair::from_private_key_and_public_key(
                    curve.signing(),
                    secret,
                    &point,
                )
                .map_err(bad_key)?;
                Ok(KeyMaterial::EcPrivate {
                    curve,
                    sign,
                    scalar: Zeroizing::new(secret.to_vec()),
                })
            }
        }
    }

    /// An Ed448 private key from its 57 bytes.
    pub fn ed448_private(secret: &[u8]) -> Result<Self, Ckr> {
        if secret.len() != ED448_KEY_LEN {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        }
        openssl::pkey::PKey::private_key_from_raw_bytes(secret, openssl::pkey::Id::ED448)
            .map(KeyMaterial::Ed448Private)
            .map_err(bad_key)
    }

    /// An Ed448 public key from CKA_EC_POINT (DER OCTET STRING or the raw 57 bytes).
    pub fn ed448_public(ec_point: &[u8]) -> Result<Self, Ckr> {
        let raw = der::octet_string(ec_point)
            .filter(|r| r.len() == ED448_KEY_LEN)
            .unwrap_or(ec_point);
        if raw.len() != ED448_KEY_LEN {
            return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID));
        }
        Ok(KeyMaterial::Ed448Public(raw.to_vec()))
    }

    /// An X25519 private key from its 32 bytes.
    pub fn x25519_private(secret: &[u8]) -> Result<Self, Ckr> {
        if secret.len() != 32 {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        }
        agreement::PrivateKey::from_private_key(&agreement::X25519, secret)
            .map(KeyMaterial::XPrivate)
            .map_err(bad_key)
    }

    /// An X25519 public key from CKA_EC_POINT (DER OCTET STRING or the raw 32 bytes).
    pub fn x25519_public(ec_point: &[u8]) -> Result<Self, Ckr> {
        Ok(KeyMaterial::XPublic(x25519_point(ec_point)?.to_vec()))
    }

    /// An EC public key from CKA_EC_POINT (DER OCTET STRING or raw point).
    pub fn ec_public(curve: Curve, ec_point: &[u8]) -> Result<Self, Ckr> {
        let raw = der::octet_string(ec_point).unwrap_or(ec_point).to_vec();
        match curve {
            Curve::Ed25519 if raw.len() == 32 => Ok(KeyMaterial::EdPublic(raw)),
            Curve::Ed25519 => Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID)),
            _ if raw.len() == 1 + 2 * curve.field_len() && raw[0] == 4 => {
                Ok(KeyMaterial::EcPublic { curve, point: raw })
            }
            _ => Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID)),
        }
    }

    /// Signature length in bytes.
    #[must_use]
    pub fn signature_len(&self) -> usize {
        match self {
            KeyMaterial::RsaPrivate { sign, .. } => sign.public_modulus_len(),
            KeyMaterial::RsaLegacyPrivate { key, .. } => key.size() as usize,
            KeyMaterial::RsaPublic { modulus_len, .. } => *modulus_len,
            KeyMaterial::EcPrivate { curve, .. } | KeyMaterial::EcPublic { curve, .. } => {
                2 * curve.field_len()
            }
            KeyMaterial::EdPrivate(_) | KeyMaterial::EdPublic(_) => 64,
            KeyMaterial::Ed448Private(_) | KeyMaterial::Ed448Public(_) => ED448_SIG_LEN,
            KeyMaterial::MlDsaPrivate(k) => k.set.signature_len(),
            KeyMaterial::MlDsaPublic { set, .. } => set.signature_len(),
            KeyMaterial::MlKemPrivate(_)
            | KeyMaterial::MlKemPublic { .. }
            | KeyMaterial::XPrivate(_)
            | KeyMaterial::XPublic(_)
            | KeyMaterial::Secret(_) => 0,
        }
    }

    /// RSA bits of an RSA key (0 for other keys).
    #[must_use]
    pub fn rsa_bits(&self) -> u64 {
        match self {
            KeyMaterial::RsaPrivate { .. }
            | KeyMaterial::RsaLegacyPrivate { .. }
            | KeyMaterial::RsaPublic { .. } => self.signature_len() as u64 * 8,
            _ => 0,
        }
    }

    /// PKCS#1 v1.5 signature with a legacy key: `block` is the DigestInfo (or raw data).
    fn legacy_sign_pkcs1(
        key: &openssl::rsa::Rsa<openssl::pkey::Private>,
        block: &[u8],
    ) -> Result<Vec<u8>, Ckr> {
        let k = key.size() as usize;
        if block.len() + 11 > k {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let mut out = vec![0u8; k];
        let n = key
            .private_encrypt(block, &mut out, openssl::rsa::Padding::PKCS1)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        out.truncate(n);
        Ok(out)
    }

    /// RSA PKCS#1 v1.5 or PSS signature over a precomputed hash.
    pub fn rsa_sign_digest(&self, pss: bool, hash: &[u8]) -> Result<Vec<u8>, Ckr> {
        if let KeyMaterial::RsaLegacyPrivate { key, .. } = self {
            // Legacy keys sign PKCS#1 v1.5 only (what DNSSEC-era signers such as
            // ods-hsmspeed use); PSS is offered from 2048 bits.
            if pss {
                return Err(Ckr(CKR_KEY_SIZE_RANGE));
            }
            let (prefix, _) = der::DIGEST_INFO_PREFIXES
                .iter()
                .find(|(_, len)| *len == hash.len())
                .ok_or(Ckr(CKR_DATA_LEN_RANGE))?;
            return Self::legacy_sign_pkcs1(key, &[*prefix, hash].concat());
        }
        let KeyMaterial::RsaPrivate {
            sign, pkcs8, raw, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if pss && let Some(md) = legacy_pss_md(hash.len()) {
            // RSA-PSS over SHA-1 or SHA-224 (aws-lc-rs signs PSS with SHA-2 ≥ 256 only):
            // OpenSSL, blinded, salt as long as the hash, MGF1 with the same hash.
            let key = match raw.get() {
                Some(k) => k,
                None => {
                    let k = raw_rsa_key(pkcs8)?;
                    raw.get_or_init(|| k)
                }
            };
            let pkey = openssl::pkey::PKey::from_rsa(key.clone()).map_err(bad_key)?;
            let mut ctx = openssl::pkey_ctx::PkeyCtx::new(&pkey).map_err(bad_key)?;
            ctx.sign_init().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
            pss_setup(&mut ctx, md)?;
            let mut out = vec![0u8; sign.public_modulus_len()];
            let n = ctx
                .sign(hash, Some(&mut out))
                .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
            out.truncate(n);
            return Ok(out);
        }
        let (alg, enc): (
            &'static digest::Algorithm,
            &'static dyn signature::RsaEncoding,
        ) = match (hash.len(), pss) {
            (32, false) => (&digest::SHA256, &signature::RSA_PKCS1_SHA256),
            (48, false) => (&digest::SHA384, &signature::RSA_PKCS1_SHA384),
            (64, false) => (&digest::SHA512, &signature::RSA_PKCS1_SHA512),
            (32, true) => (&digest::SHA256, &signature::RSA_PSS_SHA256),
            (48, true) => (&digest::SHA384, &signature::RSA_PSS_SHA384),
            (64, true) => (&digest::SHA512, &signature::RSA_PSS_SHA512),
            _ => return Err(Ckr(CKR_DATA_LEN_RANGE)),
        };
        let d = digest::Digest::import_less_safe(hash, alg).map_err(|_| Ckr(CKR_DATA_INVALID))?;
        let mut out = vec![0u8; sign.public_modulus_len()];
        sign.sign_digest(enc, &d, &mut out)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        Ok(out)
    }

    /// RSA-PSS signature over a precomputed hash with a salt of `salt` bytes (MGF1 with the
    /// same hash). PKCS#11 lets the caller choose `sLen`; a salt as long as the hash goes
    /// the usual way ([`Self::rsa_sign_digest`]), any other length (0, or OpenSSL's
    /// "maximum" that the pkcs11-provider passes for `rsa_pss_saltlen:max`) through OpenSSL,
    /// blinded. A salt that does not fit the key is `CKR_MECHANISM_PARAM_INVALID`.
    pub fn rsa_pss_sign_digest(&self, hash: &[u8], salt: usize) -> Result<Vec<u8>, Ckr> {
        if salt == hash.len() {
            return self.rsa_sign_digest(true, hash);
        }
        let KeyMaterial::RsaPrivate {
            sign, pkcs8, raw, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        let md = pss_md(hash.len()).ok_or(Ckr(CKR_DATA_LEN_RANGE))?;
        let salt = pss_salt(sign.public_modulus_len(), hash.len(), salt)?;
        let key = match raw.get() {
            Some(k) => k,
            None => {
                let k = raw_rsa_key(pkcs8)?;
                raw.get_or_init(|| k)
            }
        };
        let pkey = openssl::pkey::PKey::from_rsa(key.clone()).map_err(bad_key)?;
        let mut ctx = openssl::pkey_ctx::PkeyCtx::new(&pkey).map_err(bad_key)?;
        ctx.sign_init().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        pss_setup_salt(&mut ctx, md, salt)?;
        let mut out = vec![0u8; sign.public_modulus_len()];
        let n = ctx
            .sign(hash, Some(&mut out))
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        out.truncate(n);
        Ok(out)
    }

    /// Verifies an RSA-PSS signature over a precomputed hash with a salt of `salt` bytes.
    pub fn rsa_pss_verify_digest(&self, hash: &[u8], salt: usize, sig: &[u8]) -> Result<(), Ckr> {
        if salt == hash.len() {
            return self.rsa_verify_digest(true, hash, sig);
        }
        let KeyMaterial::RsaPublic {
            n, e, modulus_len, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if sig.len() != *modulus_len {
            return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
        }
        if (*modulus_len as u64) * 8 < RSA_MIN_BITS {
            return Err(Ckr(CKR_KEY_SIZE_RANGE));
        }
        let md = pss_md(hash.len()).ok_or(Ckr(CKR_DATA_LEN_RANGE))?;
        let salt = pss_salt(*modulus_len, hash.len(), salt)?;
        let pkey = openssl::pkey::PKey::from_rsa(ossl_public(n, e)?).map_err(bad_key)?;
        let mut ctx = openssl::pkey_ctx::PkeyCtx::new(&pkey).map_err(bad_key)?;
        ctx.verify_init().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        pss_setup_salt(&mut ctx, md, salt)?;
        match ctx.verify(hash, sig) {
            Ok(true) => Ok(()),
            _ => Err(Ckr(CKR_SIGNATURE_INVALID)),
        }
    }

    /// Verifies an RSA signature over a precomputed hash.
    pub fn rsa_verify_digest(&self, pss: bool, hash: &[u8], sig: &[u8]) -> Result<(), Ckr> {
        let (der_bytes, modulus_len) = match self {
            KeyMaterial::RsaPublic {
                der, modulus_len, ..
            } => (der.clone(), *modulus_len),
            _ => return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        };
        if sig.len() != modulus_len {
            return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
        }
        if (modulus_len as u64) * 8 < RSA_MIN_BITS {
            // A legacy key (the domain's policy let it through): PKCS#1 v1.5 via OpenSSL.
            let KeyMaterial::RsaPublic { n, e, .. } = self else {
                return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
            };
            if pss {
                return Err(Ckr(CKR_KEY_SIZE_RANGE));
            }
            let (prefix, _) = der::DIGEST_INFO_PREFIXES
                .iter()
                .find(|(_, len)| *len == hash.len())
                .ok_or(Ckr(CKR_DATA_LEN_RANGE))?;
            let pk = ossl_public(n, e)?;
            let mut out = vec![0u8; modulus_len];
            let len = pk
                .public_decrypt(sig, &mut out, openssl::rsa::Padding::PKCS1)
                .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))?;
            return if out[..len] == [*prefix, hash].concat() {
                Ok(())
            } else {
                Err(Ckr(CKR_SIGNATURE_INVALID))
            };
        }
        if pss && let Some(md) = legacy_pss_md(hash.len()) {
            let KeyMaterial::RsaPublic { n, e, .. } = self else {
                return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
            };
            let pkey = openssl::pkey::PKey::from_rsa(ossl_public(n, e)?).map_err(bad_key)?;
            let mut ctx = openssl::pkey_ctx::PkeyCtx::new(&pkey).map_err(bad_key)?;
            ctx.verify_init().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
            pss_setup(&mut ctx, md)?;
            return match ctx.verify(hash, sig) {
                Ok(true) => Ok(()),
                _ => Err(Ckr(CKR_SIGNATURE_INVALID)),
            };
        }
        let (alg, params): (
            &'static digest::Algorithm,
            &'static signature::RsaParameters,
        ) = match (hash.len(), pss) {
            (32, false) => (&digest::SHA256, &signature::RSA_PKCS1_2048_8192_SHA256),
            (48, false) => (&digest::SHA384, &signature::RSA_PKCS1_2048_8192_SHA384),
            (64, false) => (&digest::SHA512, &signature::RSA_PKCS1_2048_8192_SHA512),
            (32, true) => (&digest::SHA256, &signature::RSA_PSS_2048_8192_SHA256),
            (48, true) => (&digest::SHA384, &signature::RSA_PSS_2048_8192_SHA384),
            (64, true) => (&digest::SHA512, &signature::RSA_PSS_2048_8192_SHA512),
            _ => return Err(Ckr(CKR_DATA_LEN_RANGE)),
        };
        let d = digest::Digest::import_less_safe(hash, alg).map_err(|_| Ckr(CKR_DATA_INVALID))?;
        signature::UnparsedPublicKey::new(params, der_bytes)
            .verify_digest(&d, sig)
            .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))
    }

    /// Raw RSA PKCS#1 v1.5 signature (CKM_RSA_PKCS): `data` is padded as is (the caller
    /// supplies the DigestInfo or, for legacy TLS, MD5||SHA-1). DigestInfos of SHA-256/384/512
    /// go through aws-lc; anything else through the `rsa` crate with blinding.
    pub fn rsa_sign_raw(&self, data: &[u8]) -> Result<Vec<u8>, Ckr> {
        if let KeyMaterial::RsaLegacyPrivate { key, .. } = self {
            return Self::legacy_sign_pkcs1(key, data);
        }
        if let Some((_, hash)) = der::parse_digest_info(data) {
            return self.rsa_sign_digest(false, hash);
        }
        let KeyMaterial::RsaPrivate {
            sign, pkcs8, raw, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if data.len() + 11 > sign.public_modulus_len() {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let key = match raw.get() {
            Some(k) => k,
            None => {
                let k = raw_rsa_key(pkcs8)?;
                raw.get_or_init(|| k)
            }
        };
        let mut out = vec![0u8; sign.public_modulus_len()];
        let n = key
            .private_encrypt(data, &mut out, openssl::rsa::Padding::PKCS1)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        out.truncate(n);
        Ok(out)
    }

    /// Raw RSA private-key operation (CKM_RSA_X_509): the caller padded the block (OpenSSL
    /// does so for RSA-PSS in TLS 1.3 through the pkcs11 engine). Blinded, and checked by
    /// re-encryption against fault attacks.
    pub fn rsa_sign_x509(&self, data: &[u8]) -> Result<Vec<u8>, Ckr> {
        let KeyMaterial::RsaPrivate {
            sign, pkcs8, raw, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        let k = sign.public_modulus_len();
        if data.len() > k {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let key = match raw.get() {
            Some(key) => key,
            None => {
                let key = raw_rsa_key(pkcs8)?;
                raw.get_or_init(|| key)
            }
        };
        let mut block = Zeroizing::new(vec![0u8; k]);
        block[k - data.len()..].copy_from_slice(data);
        let mut out = vec![0u8; k];
        key.private_encrypt(&block, &mut out, openssl::rsa::Padding::NONE)
            .map_err(|_| Ckr(CKR_DATA_INVALID))?;
        Ok(out)
    }

    /// Raw RSA public-key check (CKM_RSA_X_509 verify): sig^e mod n must equal the block.
    pub fn rsa_verify_x509(&self, data: &[u8], sig: &[u8]) -> Result<(), Ckr> {
        let KeyMaterial::RsaPublic {
            n, e, modulus_len, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        let k = *modulus_len;
        if sig.len() != k {
            return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
        }
        if data.len() > k {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let pk = ossl_public(n, e)?;
        let mut out = Zeroizing::new(vec![0u8; k]);
        pk.public_decrypt(sig, &mut out, openssl::rsa::Padding::NONE)
            .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))?;
        let mut block = vec![0u8; k];
        block[k - data.len()..].copy_from_slice(data);
        if *out == block {
            Ok(())
        } else {
            Err(Ckr(CKR_SIGNATURE_INVALID))
        }
    }

    /// Verifies a raw RSA PKCS#1 v1.5 signature.
    pub fn rsa_verify_raw(&self, data: &[u8], sig: &[u8]) -> Result<(), Ckr> {
        if let Some((_, hash)) = der::parse_digest_info(data) {
            return self.rsa_verify_digest(false, hash, sig);
        }
        let KeyMaterial::RsaPublic {
            n, e, modulus_len, ..
        } = self
        else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if sig.len() != *modulus_len {
            return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
        }
        let pk = ossl_public(n, e)?;
        let mut out = vec![0u8; *modulus_len];
        let len = pk
            .public_decrypt(sig, &mut out, openssl::rsa::Padding::PKCS1)
            .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))?;
        if out[..len] == *data {
            Ok(())
        } else {
            Err(Ckr(CKR_SIGNATURE_INVALID))
        }
    }

    /// Normalises a hash to the curve's order length (leftmost bits, as ECDSA does).
    fn ecdsa_digest(curve: Curve, hash: &[u8]) -> Result<digest::Digest, Ckr> {
        // P-521 signs over SHA-512 (64 bytes, fewer bits than the order, so no truncation):
        // a shorter hash is left-padded to the same integer; a longer input would need
        // truncation to 521 bits, which a 64-byte digest cannot express.
        let n = match curve {
            Curve::P521 if hash.len() > 64 => return Err(Ckr(CKR_DATA_LEN_RANGE)),
            Curve::P521 => 64,
            _ => curve.field_len(),
        };
        let mut buf = vec![0u8; n];
        if hash.len() >= n {
            buf.copy_from_slice(&hash[..n]);
        } else {
            buf[n - hash.len()..].copy_from_slice(hash);
        }
        digest::Digest::import_less_safe(&buf, curve.digest()).map_err(|_| Ckr(CKR_DATA_INVALID))
    }

    /// ECDSA signature (r || s) over a hash.
    pub fn ecdsa_sign_digest(&self, hash: &[u8]) -> Result<Vec<u8>, Ckr> {
        let KeyMaterial::EcPrivate { curve, sign, .. } = self else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if hash.is_empty() {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let d = Self::ecdsa_digest(*curve, hash)?;
        let sig = sign.sign_digest(&d).map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        Ok(sig.as_ref().to_vec())
    }

    /// Verifies an ECDSA (r || s) signature over a hash.
    pub fn ecdsa_verify_digest(&self, hash: &[u8], sig: &[u8]) -> Result<(), Ckr> {
        let KeyMaterial::EcPublic { curve, point } = self else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if sig.len() != 2 * curve.field_len() {
            return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
        }
        let d = Self::ecdsa_digest(*curve, hash)?;
        signature::UnparsedPublicKey::new(curve.verifying(), point)
            .verify_digest(&d, sig)
            .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))
    }

    /// Ed25519 signature.
    pub fn eddsa_sign(&self, msg: &[u8]) -> Result<Vec<u8>, Ckr> {
        match self {
            KeyMaterial::EdPrivate(kp) => Ok(kp.sign(msg).as_ref().to_vec()),
            KeyMaterial::Ed448Private(k) => openssl::sign::Signer::new_without_digest(k)
                .and_then(|mut s| s.sign_oneshot_to_vec(msg))
                .map_err(|_| Ckr(CKR_FUNCTION_FAILED)),
            _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }

    /// Verifies an Ed25519 signature.
    pub fn eddsa_verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), Ckr> {
        if let KeyMaterial::Ed448Public(pk) = self {
            if sig.len() != ED448_SIG_LEN {
                return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
            }
            let k = openssl::pkey::PKey::public_key_from_raw_bytes(pk, openssl::pkey::Id::ED448)
                .map_err(bad_key)?;
            let ok = openssl::sign::Verifier::new_without_digest(&k)
                .and_then(|mut v| v.verify_oneshot(sig, msg))
                .unwrap_or(false);
            return if ok {
                Ok(())
            } else {
                Err(Ckr(CKR_SIGNATURE_INVALID))
            };
        }
        let KeyMaterial::EdPublic(pk) = self else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        if sig.len() != 64 {
            return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
        }
        signature::UnparsedPublicKey::new(&signature::ED25519, pk)
            .verify(msg, sig)
            .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))
    }

    /// Pure ML-DSA signature (hedged, empty context).
    pub fn ml_dsa_sign(&self, msg: &[u8]) -> Result<Vec<u8>, Ckr> {
        match self {
            KeyMaterial::MlDsaPrivate(k) => k.sign(msg),
            _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }

    /// Verifies a pure ML-DSA signature (empty context).
    pub fn ml_dsa_verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), Ckr> {
        match self {
            KeyMaterial::MlDsaPublic { set, public } => {
                crate::pq::ml_dsa_verify(*set, public, msg, sig)
            }
            _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }

    fn rsa_public_encrypting(&self) -> Result<rsa::PublicEncryptingKey, Ckr> {
        match self {
            KeyMaterial::RsaPublic { der, .. } => {
                // PublicEncryptingKey parses SubjectPublicKeyInfo.
                let alg = der::tlv(
                    0x30,
                    &[
                        &[
                            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
                        ][..],
                        &[0x05, 0x00][..],
                    ]
                    .concat(),
                );
                let mut bits = vec![0u8];
                bits.extend_from_slice(der);
                let spki = der::tlv(0x30, &[alg, der::tlv(0x03, &bits)].concat());
                rsa::PublicEncryptingKey::from_der(&spki).map_err(bad_key)
            }
            _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }

    /// RSA-OAEP encryption; `hash` is the CKM_ of the OAEP hash (MGF1 uses the same).
    pub fn rsa_oaep_encrypt(&self, hash: u64, label: &[u8], pt: &[u8]) -> Result<Vec<u8>, Ckr> {
        let key =
            rsa::OaepPublicEncryptingKey::new(self.rsa_public_encrypting()?).map_err(bad_key)?;
        let alg = oaep_alg(hash)?;
        if pt.len() > key.max_plaintext_size(alg) {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let mut out = vec![0u8; key.ciphertext_size()];
        let label = (!label.is_empty()).then_some(label);
        let n = key
            .encrypt(alg, pt, &mut out, label)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
            .len();
        out.truncate(n);
        Ok(out)
    }

    /// RSA-OAEP decryption.
    pub fn rsa_oaep_decrypt(
        &self,
        hash: u64,
        label: &[u8],
        ct: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Ckr> {
        let KeyMaterial::RsaPrivate { decrypt, .. } = self else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        let key = rsa::OaepPrivateDecryptingKey::new(decrypt.clone()).map_err(bad_key)?;
        if ct.len() != key.key_size_bytes() {
            return Err(Ckr(CKR_ENCRYPTED_DATA_LEN_RANGE));
        }
        let mut out = Zeroizing::new(vec![0u8; key.min_output_size()]);
        let label = (!label.is_empty()).then_some(label);
        let n = key
            .decrypt(oaep_alg(hash)?, ct, &mut out, label)
            .map_err(|_| Ckr(CKR_ENCRYPTED_DATA_INVALID))?
            .len();
        out.truncate(n);
        Ok(out)
    }

    /// RSA PKCS#1 v1.5 encryption.
    pub fn rsa_pkcs1_encrypt(&self, pt: &[u8]) -> Result<Vec<u8>, Ckr> {
        let key =
            rsa::Pkcs1PublicEncryptingKey::new(self.rsa_public_encrypting()?).map_err(bad_key)?;
        if pt.len() > key.max_plaintext_size() {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        let mut out = vec![0u8; key.ciphertext_size()];
        let n = key
            .encrypt(pt, &mut out)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
            .len();
        out.truncate(n);
        Ok(out)
    }

    /// RSA PKCS#1 v1.5 decryption.
    pub fn rsa_pkcs1_decrypt(&self, ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, Ckr> {
        let KeyMaterial::RsaPrivate { decrypt, .. } = self else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        let key = rsa::Pkcs1PrivateDecryptingKey::new(decrypt.clone()).map_err(bad_key)?;
        if ct.len() != key.key_size_bytes() {
            return Err(Ckr(CKR_ENCRYPTED_DATA_LEN_RANGE));
        }
        let mut out = Zeroizing::new(vec![0u8; key.min_output_size()]);
        let n = key
            .decrypt(ct, &mut out)
            .map_err(|_| Ckr(CKR_ENCRYPTED_DATA_INVALID))?
            .len();
        out.truncate(n);
        Ok(out)
    }

    /// ECDH: the shared x-coordinate with the peer's public point (P-256/384/521), or the
    /// X25519 shared secret with the peer's 32-byte u-coordinate (raw or a DER OCTET STRING;
    /// a low-order peer point giving the all-zero secret is refused, RFC 7748 §6.1).
    pub fn ecdh(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, Ckr> {
        if let KeyMaterial::XPrivate(k) = self {
            let raw = x25519_point(peer).map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?;
            let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, raw);
            return agreement::agree(k, peer, Ckr(CKR_MECHANISM_PARAM_INVALID), |z| {
                if z.iter().all(|b| *b == 0) {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                }
                Ok(Zeroizing::new(z.to_vec()))
            });
        }
        let KeyMaterial::EcPrivate { curve, scalar, .. } = self else {
            return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
        };
        let raw = der::octet_string(peer)
            .filter(|r| r.len() == 1 + 2 * curve.field_len())
            .unwrap_or(peer);
        let pk =
            agreement::PrivateKey::from_private_key(curve.agreement(), scalar).map_err(bad_key)?;
        let peer = agreement::UnparsedPublicKey::new(curve.agreement(), raw);
        agreement::agree(&pk, peer, Ckr(CKR_MECHANISM_PARAM_INVALID), |z| {
            Ok(Zeroizing::new(z.to_vec()))
        })
    }

    /// The secret value of a symmetric key.
    pub fn secret(&self) -> Result<&[u8], Ckr> {
        match self {
            KeyMaterial::Secret(s) => Ok(s),
            _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }
}

/// The private key as an OpenSSL RSA object (blinding on by default), for raw operations.
fn raw_rsa_key(pkcs8: &[u8]) -> Result<openssl::rsa::Rsa<openssl::pkey::Private>, Ckr> {
    openssl::pkey::PKey::private_key_from_pkcs8(pkcs8)
        .and_then(|k| k.rsa())
        .map_err(bad_key)
}

fn ossl_public(n: &[u8], e: &[u8]) -> Result<openssl::rsa::Rsa<openssl::pkey::Public>, Ckr> {
    let n = openssl::bn::BigNum::from_slice(n).map_err(bad_key)?;
    let e = openssl::bn::BigNum::from_slice(e).map_err(bad_key)?;
    openssl::rsa::Rsa::from_public_components(n, e).map_err(bad_key)
}

/// The OpenSSL digest of an RSA-PSS signature over SHA-1 (20 bytes) or SHA-224 (28 bytes),
/// the two PSS hashes aws-lc-rs does not sign with.
fn legacy_pss_md(hash_len: usize) -> Option<openssl::hash::MessageDigest> {
    match hash_len {
        20 => Some(openssl::hash::MessageDigest::sha1()),
        28 => Some(openssl::hash::MessageDigest::sha224()),
        _ => None,
    }
}

/// Sets an initialised OpenSSL RSA-PSS context up: salt as long as the hash, MGF1 with the
/// same hash.
fn pss_setup<T>(
    ctx: &mut openssl::pkey_ctx::PkeyCtx<T>,
    md: openssl::hash::MessageDigest,
) -> Result<(), Ckr> {
    pss_setup_salt(ctx, md, openssl::sign::RsaPssSaltlen::DIGEST_LENGTH)
}

/// [`pss_setup`] with a chosen salt length.
fn pss_setup_salt<T>(
    ctx: &mut openssl::pkey_ctx::PkeyCtx<T>,
    md: openssl::hash::MessageDigest,
    salt: openssl::sign::RsaPssSaltlen,
) -> Result<(), Ckr> {
    let fail = |_| Ckr(CKR_FUNCTION_FAILED);
    let md = openssl::md::Md::from_nid(md.type_()).ok_or(Ckr(CKR_FUNCTION_FAILED))?;
    ctx.set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)
        .map_err(fail)?;
    ctx.set_signature_md(md).map_err(fail)?;
    ctx.set_rsa_mgf1_md(md).map_err(fail)?;
    ctx.set_rsa_pss_saltlen(salt).map_err(fail)
}

/// A PSS salt length for OpenSSL, checked against the key (RFC 8017 §9.1.1: the encoded
/// message, at most one byte shorter than the modulus, holds hash, salt and two bytes).
fn pss_salt(
    modulus_len: usize,
    hash_len: usize,
    salt: usize,
) -> Result<openssl::sign::RsaPssSaltlen, Ckr> {
    if hash_len + salt + 2 > modulus_len {
        return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
    }
    let salt = i32::try_from(salt).map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?;
    Ok(openssl::sign::RsaPssSaltlen::custom(salt))
}

/// The OpenSSL digest of a hash of `hash_len` bytes (the PSS hashes PKCS#11 names).
fn pss_md(hash_len: usize) -> Option<openssl::hash::MessageDigest> {
    use openssl::hash::MessageDigest as M;
    match hash_len {
        20 => Some(M::sha1()),
        28 => Some(M::sha224()),
        32 => Some(M::sha256()),
        48 => Some(M::sha384()),
        64 => Some(M::sha512()),
        _ => None,
    }
}

fn oaep_alg(hash: u64) -> Result<&'static rsa::OaepAlgorithm, Ckr> {
    match hash {
        CKM_SHA_1 => Ok(&rsa::OAEP_SHA1_MGF1SHA1),
        CKM_SHA256 => Ok(&rsa::OAEP_SHA256_MGF1SHA256),
        CKM_SHA384 => Ok(&rsa::OAEP_SHA384_MGF1SHA384),
        CKM_SHA512 => Ok(&rsa::OAEP_SHA512_MGF1SHA512),
        _ => Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
    }
}

/// The ANSI X9.63 key derivation (SEC 1 §3.6.1) that `CKD_SHA*_KDF` names for
/// `CKM_ECDH1_DERIVE`: `Hash(Z || counter || SharedInfo)` for counter = 1, 2, … (32-bit
/// big-endian), concatenated and cut to `len` bytes. `kdf` is `CKD_SHA1_KDF`, `CKD_SHA224_KDF`,
/// `CKD_SHA256_KDF`, `CKD_SHA384_KDF` or `CKD_SHA512_KDF`; anything else, or more than 1024
/// bytes, is `CKR_MECHANISM_PARAM_INVALID`.
pub fn x963_kdf(
    kdf: u64,
    z: &[u8],
    shared_info: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>, Ckr> {
    let alg = match kdf {
        CKD_SHA1_KDF => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        CKD_SHA224_KDF => &digest::SHA224,
        CKD_SHA256_KDF => &digest::SHA256,
        CKD_SHA384_KDF => &digest::SHA384,
        CKD_SHA512_KDF => &digest::SHA512,
        _ => return Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
    };
    if len == 0 || len > 1024 {
        return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(len + alg.output_len()));
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut ctx = digest::Context::new(alg);
        ctx.update(z);
        ctx.update(&counter.to_be_bytes());
        ctx.update(shared_info);
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(len);
    Ok(out)
}

/// The aws-lc digest for a CKM_SHA* digest mechanism.
pub fn digest_alg(mech: u64) -> Option<&'static digest::Algorithm> {
    match mech {
        CKM_SHA_1 => Some(&digest::SHA1_FOR_LEGACY_USE_ONLY),
        CKM_SHA224 => Some(&digest::SHA224),
        CKM_SHA256 => Some(&digest::SHA256),
        CKM_SHA384 => Some(&digest::SHA384),
        CKM_SHA512 => Some(&digest::SHA512),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X963_SHA256_40: &str =
        "31f011f3acf0bedfddd1131ef801b03f049c1138c8ef9c702830e75ef3b067a8e96037cf39b2b10d";

    #[test]
    fn x963_kdf_matches_openssl() -> Result<(), Ckr> {
        // OpenSSL's X963KDF (`openssl kdf -keylen 40 -kdfopt digest:SHA256 -kdfopt
        // hexkey:000102…1f -kdfopt hexinfo:a0a1a2a3 X963KDF`), two blocks, cut to 40 bytes.
        let z: Vec<u8> = (0u8..32).collect();
        let got = x963_kdf(CKD_SHA256_KDF, &z, &[0xa0, 0xa1, 0xa2, 0xa3], 40)?;
        assert_eq!(
            hex::encode(got.as_slice()),
            X963_SHA256_40,
            "X9.63 KDF differs from OpenSSL's"
        );
        assert_eq!(
            x963_kdf(CKD_NULL, &z, &[], 32).err(),
            Some(Ckr(CKR_MECHANISM_PARAM_INVALID))
        );
        assert_eq!(
            x963_kdf(CKD_SHA1_KDF, &z, &[], 1025).err(),
            Some(Ckr(CKR_MECHANISM_PARAM_INVALID))
        );
        Ok(())
    }

    #[test]
    fn rsa_pss_with_a_chosen_salt_length_verifies_with_openssl() -> Result<(), Ckr> {
        let g = generate_rsa(2048, false)?;
        let private = KeyMaterial::rsa_private(&g.secret)?;
        let public = KeyMaterial::rsa_public(&g.public_attrs[0].1, &g.public_attrs[1].1)?;
        let h = digest::digest(&digest::SHA256, b"salted");
        let pkey = openssl::pkey::PKey::private_key_from_pkcs8(&g.secret).map_err(bad_key)?;
        // 0, the hash length, and the maximum for 2048 bits (256 - 32 - 2).
        for salt in [0usize, 32, 222] {
            let sig = private.rsa_pss_sign_digest(h.as_ref(), salt)?;
            public.rsa_pss_verify_digest(h.as_ref(), salt, &sig)?;
            // An independent check: OpenSSL with the same salt length.
            let mut ctx = openssl::pkey_ctx::PkeyCtx::new(&pkey).map_err(bad_key)?;
            ctx.verify_init().map_err(bad_key)?;
            pss_setup_salt(
                &mut ctx,
                openssl::hash::MessageDigest::sha256(),
                openssl::sign::RsaPssSaltlen::custom(salt as i32),
            )?;
            assert!(ctx.verify(h.as_ref(), &sig).unwrap_or(false), "salt {salt}");
            // The salt length is part of what is verified.
            let other = if salt == 0 { 20 } else { 0 };
            assert_eq!(
                public.rsa_pss_verify_digest(h.as_ref(), other, &sig),
                Err(Ckr(CKR_SIGNATURE_INVALID)),
                "salt {salt} verified as {other}"
            );
        }
        // A salt that does not fit the key is a parameter error, not a failure.
        assert_eq!(
            private.rsa_pss_sign_digest(h.as_ref(), 223).err(),
            Some(Ckr(CKR_MECHANISM_PARAM_INVALID))
        );
        Ok(())
    }

    #[test]
    fn rsa_sizes_between_the_standard_ones_generate_sign_verify_and_decrypt() -> Result<(), Ckr> {
        for bits in [2056, 3092] {
            let g = generate_rsa(bits, false)?;
            let private = KeyMaterial::rsa_private(&g.secret)?;
            let public = KeyMaterial::rsa_public(&g.public_attrs[0].1, &g.public_attrs[1].1)?;
            let KeyMaterial::RsaPublic { modulus_len, .. } = public else {
                return Err(Ckr(CKR_GENERAL_ERROR));
            };
            assert_eq!(modulus_len as u64, bits.div_ceil(8));
            let h = digest::digest(&digest::SHA256, b"odd size");
            for pss in [false, true] {
                let sig = private.rsa_sign_digest(pss, h.as_ref())?;
                assert_eq!(sig.len(), modulus_len);
                public.rsa_verify_digest(pss, h.as_ref(), &sig)?;
            }
            let ct = public.rsa_oaep_encrypt(CKM_SHA256, &[], b"secret")?;
            assert_eq!(
                private.rsa_oaep_decrypt(CKM_SHA256, &[], &ct)?.as_slice(),
                b"secret"
            );
        }
        // Outside 2048..=4096 (and 1024 without the legacy switch) is refused.
        for bits in [0, 1024, 2047, 4097, 8192] {
            assert_eq!(
                generate_rsa(bits, false).err(),
                Some(Ckr(CKR_KEY_SIZE_RANGE)),
                "{bits}"
            );
        }
        Ok(())
    }

    #[test]
    fn rsa_sign_verify_both_paddings() -> Result<(), Ckr> {
        let g = generate_rsa(2048, false)?;
        let private = KeyMaterial::rsa_private(&g.secret)?;
        let n = &g.public_attrs[0].1;
        let e = &g.public_attrs[1].1;
        let public = KeyMaterial::rsa_public(n, e)?;
        let h = digest::digest(&digest::SHA256, b"hello");
        for pss in [false, true] {
            let sig = private.rsa_sign_digest(pss, h.as_ref())?;
            assert_eq!(sig.len(), 256);
            public.rsa_verify_digest(pss, h.as_ref(), &sig)?;
            let mut bad = sig.clone();
            bad[10] ^= 1;
            assert_eq!(
                public.rsa_verify_digest(pss, h.as_ref(), &bad),
                Err(Ckr(CKR_SIGNATURE_INVALID))
            );
        }
        // CKM_RSA_X_509 of an EMSA-PKCS1-v1_5 block equals the PKCS#1 v1.5 signature.
        let mut block = vec![0xffu8; 256];
        block[0] = 0;
        block[1] = 1;
        let digest_info = [crate::der::DIGEST_INFO_PREFIXES[0].0, h.as_ref()].concat();
        block[256 - digest_info.len() - 1] = 0;
        block[256 - digest_info.len()..].copy_from_slice(&digest_info);
        let x509 = private.rsa_sign_x509(&block)?;
        assert_eq!(x509, private.rsa_sign_digest(false, h.as_ref())?);
        public.rsa_verify_x509(&block, &x509)?;
        block[100] ^= 1;
        assert_eq!(
            public.rsa_verify_x509(&block, &x509),
            Err(Ckr(CKR_SIGNATURE_INVALID))
        );
        let raw = private.rsa_sign_raw(b"36 bytes of md5 and sha1 for tls1.0")?;
        public.rsa_verify_raw(b"36 bytes of md5 and sha1 for tls1.0", &raw)?;
        assert_eq!(
            public.rsa_verify_raw(b"other", &raw),
            Err(Ckr(CKR_SIGNATURE_INVALID))
        );
        let ct = public.rsa_oaep_encrypt(CKM_SHA256, b"", b"secret")?;
        assert_eq!(&*private.rsa_oaep_decrypt(CKM_SHA256, b"", &ct)?, b"secret");
        let ct = public.rsa_pkcs1_encrypt(b"secret")?;
        assert_eq!(&*private.rsa_pkcs1_decrypt(&ct)?, b"secret");
        Ok(())
    }

    #[test]
    fn ecdsa_and_ecdh() -> Result<(), Ckr> {
        for curve in [Curve::P256, Curve::P384, Curve::P521] {
            let a = generate_ec(curve)?;
            let b = generate_ec(curve)?;
            let pa = KeyMaterial::ec_private(curve, &a.secret)?;
            let pub_a = KeyMaterial::ec_public(curve, &a.public_attrs[1].1)?;
            let h = digest::digest(&digest::SHA512, b"m");
            let sig = pa.ecdsa_sign_digest(h.as_ref())?;
            pub_a.ecdsa_verify_digest(h.as_ref(), &sig)?;
            let pb = KeyMaterial::ec_private(curve, &b.secret)?;
            let z1 = pa.ecdh(&b.public_attrs[1].1)?;
            let z2 = pb.ecdh(&a.public_attrs[1].1)?;
            assert_eq!(z1, z2);
            assert_eq!(z1.len(), curve.field_len());
        }
        Ok(())
    }

    /// P-521 signatures (r || s over SHA-512, and over a shorter hash left-padded) verify
    /// with OpenSSL, an implementation independent of aws-lc.
    #[test]
    fn p521_ecdsa_verifies_with_openssl() -> Result<(), Ckr> {
        use openssl::{bn::BigNum, ec, ecdsa::EcdsaSig, nid::Nid};
        let fail = |_| Ckr(CKR_FUNCTION_FAILED);
        let g = generate_ec(Curve::P521)?;
        assert_eq!(g.secret.len(), 66);
        let k = KeyMaterial::ec_private(Curve::P521, &g.secret)?;
        let point = der::octet_string(&g.public_attrs[1].1).ok_or(Ckr(CKR_FUNCTION_FAILED))?;
        let group = ec::EcGroup::from_curve_name(Nid::SECP521R1).map_err(fail)?;
        let mut ctx = openssl::bn::BigNumContext::new().map_err(fail)?;
        let pt = ec::EcPoint::from_bytes(&group, point, &mut ctx).map_err(fail)?;
        let key = ec::EcKey::from_public_key(&group, &pt).map_err(fail)?;
        for h in [
            digest::digest(&digest::SHA512, b"m").as_ref().to_vec(),
            digest::digest(&digest::SHA256, b"m").as_ref().to_vec(),
        ] {
            let sig = k.ecdsa_sign_digest(&h)?;
            assert_eq!(sig.len(), 132);
            let (r, s) = sig.split_at(66);
            let es = EcdsaSig::from_private_components(
                BigNum::from_slice(r).map_err(fail)?,
                BigNum::from_slice(s).map_err(fail)?,
            )
            .map_err(fail)?;
            assert!(
                es.verify(&h, &key).map_err(fail)?,
                "OpenSSL rejects a P-521 signature"
            );
        }
        assert_eq!(
            k.ecdsa_sign_digest(&[1u8; 66]),
            Err(Ckr(CKR_DATA_LEN_RANGE))
        );
        Ok(())
    }

    #[test]
    fn ed25519_rfc8032_test1() -> Result<(), Ckr> {
        // RFC 8032 §7.1 TEST 1.
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap_or_default();
        let public =
            hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap_or_default();
        assert_eq!(ec_public_point(Curve::Ed25519, &seed)?, public);
        let k = KeyMaterial::ec_private(Curve::Ed25519, &seed)?;
        let sig = k.eddsa_sign(b"")?;
        assert_eq!(
            hex::encode(&sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        KeyMaterial::ec_public(Curve::Ed25519, &der::tlv(4, &public))?.eddsa_verify(b"", &sig)
    }
}

#[cfg(test)]
mod ed448 {
    use super::*;

    /// RFC 8032 §7.4, the "Blank" Ed448 vector: public key, signature, verification.
    #[test]
    fn ed448_rfc8032_blank() -> Result<(), Ckr> {
        let h = |s: &str| hex::decode(s).unwrap_or_default();
        let secret = h(
            "6c82a562cb808d10d632be89c8513ebf6c929f34ddfa8c9f63c9960ef6e348a3528c8a3fcc2f044e39a3fc5b94492f8f032e7549a20098f95b",
        );
        let public = h(
            "5fd7449b59b461fd2ce787ec616ad46a1da1342485a70e1f8a0ea75d80e96778edf124769b46c7061bd6783df1e50f6cd1fa1abeafe8256180",
        );
        let want = "533a37f6bbe457251f023c0d88f976ae2dfb504a843e34d2074fd823d41a591f2b233f034f628281f2fd7a22ddd47d7828c59bd0a21bfd3980ff0d2028d4b18a9df63e006c5d1c2d345b925d8dc00b4104852db99ac5c7cdda8530a113a0f4dbb61149f05a7363268c71d95808ff2e652600";
        let k = KeyMaterial::ed448_private(&secret)?;
        let KeyMaterial::Ed448Private(pk) = &k else {
            return Err(Ckr(CKR_FUNCTION_FAILED));
        };
        assert_eq!(pk.raw_public_key().unwrap_or_default(), public);
        let sig = k.eddsa_sign(b"")?;
        assert_eq!(hex::encode(&sig), want);
        let p = KeyMaterial::ed448_public(&der::tlv(4, &public))?;
        p.eddsa_verify(b"", &sig)?;
        assert_eq!(p.eddsa_verify(b"x", &sig), Err(Ckr(CKR_SIGNATURE_INVALID)));
        assert_eq!(
            p.eddsa_verify(b"", &sig[..64]),
            Err(Ckr(CKR_SIGNATURE_LEN_RANGE))
        );
        let g = generate_ed448()?;
        let k = KeyMaterial::ed448_private(&g.secret)?;
        let p = KeyMaterial::ed448_public(&g.public_attrs[1].1)?;
        p.eddsa_verify(b"m", &k.eddsa_sign(b"m")?)
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing probe; run with --release -- --ignored --nocapture"]
    fn raw_rsa_speed() -> Result<(), Ckr> {
        let g = generate_rsa(2048, false)?;
        let k = KeyMaterial::rsa_private(&g.secret)?;
        let t = std::time::Instant::now();
        for _ in 0..200 {
            k.rsa_sign_raw(&[5u8; 35])?;
        }
        println!("openssl raw: {:?}/sig", t.elapsed() / 200);
        let h = digest::digest(&digest::SHA256, b"x");
        let t = std::time::Instant::now();
        for _ in 0..200 {
            k.rsa_sign_digest(false, h.as_ref())?;
        }
        println!("aws-lc: {:?}/sig", t.elapsed() / 200);
        Ok(())
    }
}
