//! Post-quantum keys of PKCS#11 3.2, through aws-lc-rs: ML-DSA (FIPS 204, `CKK_ML_DSA`,
//! `CKM_ML_DSA_KEY_PAIR_GEN`, `CKM_ML_DSA`) and ML-KEM (FIPS 203, `CKK_ML_KEM`,
//! `CKM_ML_KEM_KEY_PAIR_GEN`, `CKM_ML_KEM` with `C_EncapsulateKey`/`C_DecapsulateKey`).
//! The identifiers are in [`caas_vsm_proto::v32`] (cited from the OASIS 3.2 headers).
//!
//! Stored forms: the private object's secret is the FIPS 204 / FIPS 203 expanded private
//! key (PKCS#11 3.2 `CKA_VALUE` of the private key); the public object's `CKA_VALUE` is the
//! encoded public key. `CKA_PARAMETER_SET` names the parameter set on both.
//!
//! What aws-lc-rs 1.19 allows, and so what is served: pure ML-DSA, hedged, with an empty
//! context (`CK_SIGN_ADDITIONAL_CONTEXT` with `CKH_HEDGE_PREFERRED`/`CKH_HEDGE_REQUIRED`
//! and no context, or no parameter). A non-empty context, `CKH_DETERMINISTIC_REQUIRED` and
//! HashML-DSA (`CKM_HASH_ML_DSA*`) need APIs aws-lc-rs does not expose: they are refused
//! with CKR_MECHANISM_PARAM_INVALID / CKR_MECHANISM_INVALID. `CKA_SEED` is not kept
//! (aws-lc-rs does not return the seed of a generated key).

use crate::error::Ckr;
use aws_lc_rs::encoding::AsRawBytes as _;
use aws_lc_rs::kem;
use aws_lc_rs::signature::{self, KeyPair as _};
use caas_vsm_proto::v32::*;
use cryptoki_sys::*;
use zeroize::Zeroizing;

/// An ML-DSA parameter set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlDsa {
    /// ML-DSA-44.
    P44,
    /// ML-DSA-65.
    P65,
    /// ML-DSA-87.
    P87,
}

impl MlDsa {
    /// From CKA_PARAMETER_SET; an unknown set is CKR_PARAMETER_SET_NOT_SUPPORTED (3.2).
    pub fn from_set(set: u64) -> Result<Self, Ckr> {
        match set {
            CKP_ML_DSA_44 => Ok(Self::P44),
            CKP_ML_DSA_65 => Ok(Self::P65),
            CKP_ML_DSA_87 => Ok(Self::P87),
            _ => Err(Ckr(CKR_PARAMETER_SET_NOT_SUPPORTED)),
        }
    }

    /// The CKP_ML_DSA_* value.
    #[must_use]
    pub fn set(self) -> u64 {
        match self {
            Self::P44 => CKP_ML_DSA_44,
            Self::P65 => CKP_ML_DSA_65,
            Self::P87 => CKP_ML_DSA_87,
        }
    }

    fn signing(self) -> &'static signature::PqdsaSigningAlgorithm {
        match self {
            Self::P44 => &signature::ML_DSA_44_SIGNING,
            Self::P65 => &signature::ML_DSA_65_SIGNING,
            Self::P87 => &signature::ML_DSA_87_SIGNING,
        }
    }

    fn verifying(self) -> &'static signature::PqdsaVerificationAlgorithm {
        match self {
            Self::P44 => &signature::ML_DSA_44,
            Self::P65 => &signature::ML_DSA_65,
            Self::P87 => &signature::ML_DSA_87,
        }
    }

    /// Signature length in bytes (FIPS 204 Table 2).
    #[must_use]
    pub fn signature_len(self) -> usize {
        self.signing().signature_len()
    }
}

/// An ML-KEM parameter set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlKem {
    /// ML-KEM-512.
    P512,
    /// ML-KEM-768.
    P768,
    /// ML-KEM-1024.
    P1024,
}

impl MlKem {
    /// From CKA_PARAMETER_SET; an unknown set is CKR_PARAMETER_SET_NOT_SUPPORTED (3.2).
    pub fn from_set(set: u64) -> Result<Self, Ckr> {
        match set {
            CKP_ML_KEM_512 => Ok(Self::P512),
            CKP_ML_KEM_768 => Ok(Self::P768),
            CKP_ML_KEM_1024 => Ok(Self::P1024),
            _ => Err(Ckr(CKR_PARAMETER_SET_NOT_SUPPORTED)),
        }
    }

    /// The CKP_ML_KEM_* value.
    #[must_use]
    pub fn set(self) -> u64 {
        match self {
            Self::P512 => CKP_ML_KEM_512,
            Self::P768 => CKP_ML_KEM_768,
            Self::P1024 => CKP_ML_KEM_1024,
        }
    }

    fn alg(self) -> &'static kem::Algorithm<kem::AlgorithmId> {
        match self {
            Self::P512 => &kem::ML_KEM_512,
            Self::P768 => &kem::ML_KEM_768,
            Self::P1024 => &kem::ML_KEM_1024,
        }
    }

    /// The module rank k (FIPS 203 Table 2).
    fn k(self) -> usize {
        match self {
            Self::P512 => 2,
            Self::P768 => 3,
            Self::P1024 => 4,
        }
    }

    /// The encapsulation key inside a decapsulation key, checked: FIPS 203 Algorithm 16
    /// builds dk = dk_PKE (384k bytes) || ek (384k + 32) || H(ek) (32) || z (32), and §7.3
    /// asks a decapsulation key's holder to check H(ek) before use.
    pub fn public_from_private(self, dk: &[u8]) -> Result<&[u8], Ckr> {
        let k = self.k();
        let ek_len = 384 * k + 32;
        if dk.len() != 384 * k + ek_len + 64 {
            return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID));
        }
        let ek = &dk[384 * k..384 * k + ek_len];
        let h = &dk[384 * k + ek_len..384 * k + ek_len + 32];
        if aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA3_256, ek).as_ref() != h {
            return Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID));
        }
        check_ml_kem_public(self, ek)?;
        Ok(ek)
    }

    /// Ciphertext length in bytes (FIPS 203 Table 3).
    #[must_use]
    pub fn ciphertext_len(self) -> usize {
        match self {
            Self::P512 => 768,
            Self::P768 => 1088,
            Self::P1024 => 1568,
        }
    }
}

/// CK_MECHANISM_INFO key sizes of ML-DSA: public key bytes of ML-DSA-44 to ML-DSA-87
/// (PKCS#11 3.2 §ML-DSA: "the supported range of ML-DSA public key in bytes").
pub const ML_DSA_KEY_BYTES: (u64, u64) = (1312, 2592);
/// CK_MECHANISM_INFO key sizes of ML-KEM: public key bytes of ML-KEM-512 to ML-KEM-1024.
pub const ML_KEM_KEY_BYTES: (u64, u64) = (800, 1568);

/// The shared secret length of ML-KEM (all parameter sets).
pub const ML_KEM_SECRET_LEN: usize = 32;

/// A generated key pair: the private key's secret (expanded private key), the public key.
pub type Pair = (Zeroizing<Vec<u8>>, Vec<u8>);

fn dev<E>(_: E) -> Ckr {
    Ckr(CKR_DEVICE_ERROR)
}

fn bad_value<E>(_: E) -> Ckr {
    Ckr(CKR_ATTRIBUTE_VALUE_INVALID)
}

/// Generates an ML-DSA key pair.
pub fn generate_ml_dsa(p: MlDsa) -> Result<Pair, Ckr> {
    let kp = signature::PqdsaKeyPair::generate(p.signing()).map_err(dev)?;
    let raw = kp.private_key().as_raw_bytes().map_err(dev)?;
    Ok((
        Zeroizing::new(raw.as_ref().to_vec()),
        kp.public_key().as_ref().to_vec(),
    ))
}

/// Generates an ML-KEM key pair.
pub fn generate_ml_kem(p: MlKem) -> Result<Pair, Ckr> {
    let dk = kem::DecapsulationKey::generate(p.alg()).map_err(dev)?;
    let ek = dk.encapsulation_key().map_err(dev)?;
    let dk_bytes = dk.key_bytes().map_err(dev)?;
    let ek_bytes = ek.key_bytes().map_err(dev)?;
    Ok((
        Zeroizing::new(dk_bytes.as_ref().to_vec()),
        ek_bytes.as_ref().to_vec(),
    ))
}

/// ML-DSA private key.
pub struct MlDsaPrivate {
    /// Parameter set.
    pub set: MlDsa,
    key: signature::PqdsaKeyPair,
}

impl std::fmt::Debug for MlDsaPrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MlDsaPrivate({:?}, [REDACTED])", self.set)
    }
}

impl MlDsaPrivate {
    /// Parses a stored/imported expanded private key.
    pub fn new(set: MlDsa, raw: &[u8]) -> Result<Self, Ckr> {
        let key =
            signature::PqdsaKeyPair::from_raw_private_key(set.signing(), raw).map_err(bad_value)?;
        Ok(Self { set, key })
    }

    /// The public key of this private key.
    #[must_use]
    pub fn public(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// Pure ML-DSA signature (hedged, empty context).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Ckr> {
        let mut sig = vec![0u8; self.set.signature_len()];
        let n = self
            .key
            .sign(msg, &mut sig)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        sig.truncate(n);
        Ok(sig)
    }
}

/// Verifies a pure ML-DSA signature (empty context).
pub fn ml_dsa_verify(set: MlDsa, public: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), Ckr> {
    if sig.len() != set.signature_len() {
        return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
    }
    signature::UnparsedPublicKey::new(set.verifying(), public)
        .verify(msg, sig)
        .map_err(|_| Ckr(CKR_SIGNATURE_INVALID))
}

/// Checks an imported ML-DSA public key's length.
pub fn check_ml_dsa_public(set: MlDsa, public: &[u8]) -> Result<(), Ckr> {
    if public.len() == set.signing().public_key_len() {
        Ok(())
    } else {
        Err(Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
    }
}

/// ML-KEM private (decapsulation) key.
pub struct MlKemPrivate {
    /// Parameter set.
    pub set: MlKem,
    key: kem::DecapsulationKey<kem::AlgorithmId>,
}

impl std::fmt::Debug for MlKemPrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MlKemPrivate({:?}, [REDACTED])", self.set)
    }
}

impl MlKemPrivate {
    /// Parses a stored/imported decapsulation key.
    pub fn new(set: MlKem, raw: &[u8]) -> Result<Self, Ckr> {
        let key = kem::DecapsulationKey::new(set.alg(), raw).map_err(bad_value)?;
        Ok(Self { set, key })
    }

    /// FIPS 203 decapsulation. A ciphertext of the wrong length is
    /// CKR_WRAPPED_KEY_LEN_RANGE; a wrong ciphertext of the right length yields the implicit
    /// rejection secret (FIPS 203 §7.3), as the standard requires.
    pub fn decapsulate(&self, ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, Ckr> {
        if ct.len() != self.set.ciphertext_len() {
            return Err(Ckr(CKR_WRAPPED_KEY_LEN_RANGE));
        }
        let ss = self
            .key
            .decapsulate(kem::Ciphertext::from(ct))
            .map_err(|_| Ckr(CKR_WRAPPED_KEY_INVALID))?;
        Ok(Zeroizing::new(ss.as_ref().to_vec()))
    }
}

/// ML-KEM encapsulation to `public`: (ciphertext, shared secret).
pub fn ml_kem_encapsulate(set: MlKem, public: &[u8]) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>), Ckr> {
    let ek =
        kem::EncapsulationKey::new(set.alg(), public).map_err(|_| Ckr(CKR_KEY_HANDLE_INVALID))?;
    let (ct, ss) = ek.encapsulate().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
    Ok((ct.as_ref().to_vec(), Zeroizing::new(ss.as_ref().to_vec())))
}

/// Checks an imported ML-KEM public key.
pub fn check_ml_kem_public(set: MlKem, public: &[u8]) -> Result<(), Ckr> {
    kem::EncapsulationKey::new(set.alg(), public)
        .map(|_| ())
        .map_err(bad_value)
}

/// Public value of an imported private key, so that the public attributes stay truthful.
pub fn public_of(key_type: u64, set: u64, secret: &[u8]) -> Result<Vec<u8>, Ckr> {
    match key_type {
        CKK_ML_DSA => Ok(MlDsaPrivate::new(MlDsa::from_set(set)?, secret)?.public()),
        CKK_ML_KEM => {
            let p = MlKem::from_set(set)?;
            MlKemPrivate::new(p, secret)?;
            Ok(p.public_from_private(secret)?.to_vec())
        }
        _ => Err(Ckr(CKR_KEY_TYPE_INCONSISTENT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ml_dsa_round_trip_all_sets() -> Result<(), Ckr> {
        for p in [MlDsa::P44, MlDsa::P65, MlDsa::P87] {
            let (sk, pk) = generate_ml_dsa(p)?;
            let k = MlDsaPrivate::new(p, &sk)?;
            assert_eq!(k.public(), pk);
            let sig = k.sign(b"message")?;
            assert_eq!(sig.len(), p.signature_len());
            ml_dsa_verify(p, &pk, b"message", &sig)?;
            assert_eq!(
                ml_dsa_verify(p, &pk, b"other", &sig),
                Err(Ckr(CKR_SIGNATURE_INVALID))
            );
        }
        assert_eq!(
            MlDsa::from_set(4),
            Err(Ckr(CKR_PARAMETER_SET_NOT_SUPPORTED))
        );
        Ok(())
    }

    #[test]
    fn ml_kem_round_trip_all_sets() -> Result<(), Ckr> {
        for p in [MlKem::P512, MlKem::P768, MlKem::P1024] {
            let (sk, pk) = generate_ml_kem(p)?;
            let (ct, ss) = ml_kem_encapsulate(p, &pk)?;
            assert_eq!(ct.len(), p.ciphertext_len());
            let k = MlKemPrivate::new(p, &sk)?;
            assert_eq!(k.decapsulate(&ct)?, ss);
            assert_eq!(public_of(CKK_ML_KEM, p.set(), &sk)?, pk);
            // A decapsulation key whose embedded encapsulation key does not match its hash.
            let mut bad = sk.to_vec();
            let i = 384 * p.k() + 5;
            bad[i] ^= 1;
            assert_eq!(
                public_of(CKK_ML_KEM, p.set(), &bad).err(),
                Some(Ckr(CKR_ATTRIBUTE_VALUE_INVALID))
            );
            assert_eq!(k.decapsulate(&ct[1..]), Err(Ckr(CKR_WRAPPED_KEY_LEN_RANGE)));
        }
        Ok(())
    }
}
