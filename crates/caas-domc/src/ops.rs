//! Cryptographic operation state of a session (C_*Init / C_*Update / C_*Final) and the
//! mechanism table the token advertises. Each `*_init` checks the mechanism against the key's
//! class, type and usage flags; `finish` produces the output. Multi-part symmetric
//! encryption buffers its input and produces the output at C_*Final.
//!
//! What is served ([`MECHANISMS`] is the one source of `C_GetMechanismList` and
//! `C_GetMechanismInfo`; key sizes in bits for RSA/EC/EdDSA, bytes otherwise). Every
//! mechanism goes through the same key checks (usage flag, `CKA_ALLOWED_MECHANISMS`),
//! usage limits and audit (`Domain::use_key`); all of them work single- and multi-part.
//!
//! | mechanism | key sizes | flags |
//! |---|---|---|
//! | RSA_PKCS_KEY_PAIR_GEN (any modulus size in the range, e.g. the 3092 bits of the pkcs11-provider suite; e = 65537) | 2048–4096 | generate key pair |
//! | RSA_PKCS | 2048–4096 | sign, verify, encrypt, decrypt, wrap, unwrap |
//! | RSA_X_509 | 2048–4096 | sign, verify (no raw encryption) |
//! | SHA{1,224,256,384,512}_RSA_PKCS, RSA_PKCS_PSS, SHA{1,224,256,384,512}_RSA_PKCS_PSS (any salt length that fits the key, MGF1 with the same hash; salt = hash length through aws-lc-rs for SHA-2 ≥ 256, otherwise through OpenSSL) | 2048–4096 | sign, verify |
//! | RSA_PKCS_OAEP | 2048–4096 | encrypt, decrypt, wrap, unwrap |
//! | EC_KEY_PAIR_GEN (P-256, P-384, P-521) | 256–521 | generate key pair, EC F_P, named curve, uncompressed |
//! | ECDSA, ECDSA_SHA{1,224,256,384,512} (P-521: input up to 64 bytes) | 256–521 | sign, verify (+ EC flags) |
//! | ECDH1_DERIVE (CKK_EC P-256/384/521, and CKK_EC_MONTGOMERY X25519 with the peer's 32-byte public value, raw or as a DER OCTET STRING; `CKD_NULL`, or `CKD_SHA{1,224,256,384,512}_KDF` = the ANSI X9.63 KDF with the shared data, up to 1024 bytes) | 255–521 | derive (+ EC flags) |
//! | EC_MONTGOMERY_KEY_PAIR_GEN (X25519: `CKA_EC_PARAMS` the OID 1.3.101.110 or the printable string "curve25519"; X448 not served) | 255 | generate key pair |
//! | EC_EDWARDS_KEY_PAIR_GEN, EDDSA (Ed25519 through aws-lc-rs; Ed448, `CKA_EC_PARAMS` OID 1.3.101.113 or "edwards448", through OpenSSL; pure EdDSA) | 255–448 | generate key pair / sign, verify |
//! | AES_KEY_GEN | 16–32 | generate |
//! | AES_GCM (IV 1–256 bytes, tag 96–128 bits: 12-byte IV with a full tag through aws-lc-rs, the rest through OpenSSL), AES_CBC_PAD | 16–32 | encrypt, decrypt, wrap, unwrap |
//! | AES_GCM message-based (PKCS#11 3.0: `C_MessageEncryptInit`, `C_EncryptMessage`/`C_DecryptMessage` and `C_*MessageBegin`/`Next` (parts buffered, output at the last) with `CK_GCM_MESSAGE_PARAMS`; IV by `CKG_NO_GENERATE`, `CKG_GENERATE`/`CKG_GENERATE_COUNTER` (per-key-value counter, never reissued) or `CKG_GENERATE_RANDOM` (≥ 96 random bits)), see [`crate::domain::message`] | 16–32 | message encrypt, message decrypt, multi-message |
//! | AES_CTR (`CK_AES_CTR_PARAMS`, counter 1–128 bits; data that would wrap the counter is CKR_DATA_LEN_RANGE) | 16–32 | encrypt, decrypt |
//! | AES_ECB, AES_CBC (no padding: data a multiple of 16 bytes, else CKR_DATA_LEN_RANGE / CKR_ENCRYPTED_DATA_LEN_RANGE) | 16–32 | encrypt, decrypt (not wrap: SoftHSM2 offers it, the wrap policy here does not) |
//! | AES_CMAC, AES_CMAC_GENERAL (tag 1–16 bytes) | 16–32 | sign, verify |
//! | AES_KEY_WRAP, AES_KEY_WRAP_PAD, AES_KEY_WRAP_KWP (16, 24 or 32: a 24-byte KEK through OpenSSL's id-aes192-wrap(-pad), aws-lc-rs has no 192-bit KW), CAAS_AES_KEY_WRAP_ATTRS (16–32) | 16–32 | wrap, unwrap |
//! | GENERIC_SECRET_KEY_GEN | 1–512 | generate |
//! | SHA_1_HMAC, SHA224_HMAC, SHA256_HMAC, SHA384_HMAC, SHA512_HMAC and their `*_GENERAL` forms (output 1 to the hash's length) | 1–512 | sign, verify |
//! | SHA_1, SHA224, SHA256, SHA384, SHA512 | – | digest |
//! | ML_DSA_KEY_PAIR_GEN (`CKA_PARAMETER_SET` ML-DSA-44/65/87; PKCS#11 3.2) | 1312–2592 (public key bytes) | generate key pair |
//! | ML_DSA (pure, hedged; optional `CK_SIGN_ADDITIONAL_CONTEXT` with an empty context and `CKH_HEDGE_PREFERRED`/`_REQUIRED`) | 1312–2592 | sign, verify (single- and multi-part) |
//! | ML_KEM_KEY_PAIR_GEN (ML-KEM-512/768/1024; PKCS#11 3.2) | 800–1568 (public key bytes) | generate key pair |
//! | ML_KEM (`C_EncapsulateKey`/`C_DecapsulateKey`; the new key is a secret key of at most the 32-byte shared secret, never `CKA_LOCAL`) | 800–1568 | encapsulate, decapsulate |
//!
//! ECB, CBC and CTR give raw access to the block cipher (E_K of a chosen block), so an AES
//! key with `CKA_ENCRYPT` can compute GCM's hash key and CTR keystreams with them. That was
//! already true through CBC_PAD (chosen IV) and GCM (chosen nonce), so they add no new
//! power to a key's holder; a key that must serve only AES-GCM says so with
//! `CKA_ALLOWED_MECHANISMS` (enforced for every mechanism, `check_key`). Wrapped keys are
//! not exposed this way: a wrap-role key gets no `CKA_ENCRYPT`/`CKA_DECRYPT` by default and
//! cannot gain them, and a key that has both roles never wraps a sensitive key
//! (`crate::policy`); ECB/CBC/CTR are not offered for wrapping at all.
//!
//! **Key derivation by encrypting data (`CKM_AES_ECB_ENCRYPT_DATA`,
//! `CKM_AES_CBC_ENCRYPT_DATA`) is not served, by policy** (CKR_MECHANISM_INVALID, audited).
//! The derived key's value is E_K(data), so it turns `CKA_DERIVE` on a key into an
//! encryption oracle under that key (Clulow, "On the security of PKCS#11", 2003): derive
//! with chosen data into an extractable key and read it, or use it as a wrapping key
//! whose value the caller computes elsewhere with `C_Encrypt`. Serving it safely would
//! need the derived key forced sensitive, non-extractable, without wrap role and never
//! `CKA_LOCAL`, and the base key's `CKA_DERIVE` and mechanism list honoured; no workload
//! of this system needs it, so the domain refuses it outright (test
//! `encrypt_data_derivation_is_refused_and_audited`). EdDSA with `CK_EDDSA_PARAMS`
//! (Ed25519ph/Ed25519ctx, Ed448ph/Ed448 with a context) is not served: aws-lc-rs 1.19 has
//! neither for Ed25519 and the pure form is what TLS and X.509 use
//! (CKR_MECHANISM_PARAM_INVALID).
//!
//! With `--allow-legacy-rsa-1024` the RSA minimum is 1024 (`Domain`'s mechanism info).
//! Not served (yet): of PKCS#11 3.2, HashML-DSA
//! (`CKM_HASH_ML_DSA*`), ML-DSA with a context string or `CKH_DETERMINISTIC_REQUIRED`
//! (aws-lc-rs 1.19 exposes neither; CKR_MECHANISM_INVALID / CKR_MECHANISM_PARAM_INVALID),
//! `CKA_SEED`, and ML-DSA/ML-KEM private keys in `C_WrapKey` (CKR_KEY_NOT_WRAPPABLE,
//! as for every non-RSA private key). See [`crate::pq`]. **SLH-DSA** (`CKK_SLH_DSA`,
//! `CKM_SLH_DSA_KEY_PAIR_GEN`, `CKM_SLH_DSA`) is not served: the aws-lc-sys of Cargo.lock
//! (0.47, under aws-lc-rs 1.19) has no SLH-DSA (no `SLHDSA` symbol or NID in its bindings;
//! its `EVP_PKEY_PQDSA` is ML-DSA only) and the system OpenSSL is 3.0 (SLH-DSA came in
//! 3.5), so there is no implementation to put behind it (CKR_MECHANISM_INVALID). X448 and
//! message-based signing are not served either.

use crate::error::Ckr;
use crate::keys::{KeyMaterial, digest_alg};
use crate::object::Object;
use aws_lc_rs::cipher::{
    AES_128, AES_192, AES_256, DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext,
    PaddedBlockDecryptingKey, PaddedBlockEncryptingKey, UnboundCipherKey,
};
use aws_lc_rs::{aead, cmac, digest, hmac};
use caas_vsm_proto::MechParam;
use caas_vsm_proto::v32::{
    CKF_DECAPSULATE, CKF_ENCAPSULATE, CKH_HEDGE_PREFERRED, CKH_HEDGE_REQUIRED, CKK_ML_DSA,
    CKM_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN, CKM_ML_KEM, CKM_ML_KEM_KEY_PAIR_GEN,
};
use cryptoki_sys::*;
use std::sync::Arc;
use zeroize::Zeroizing;

/// One advertised mechanism: (type, min key size, max key size, flags).
pub const MECHANISMS: &[(u64, u64, u64, u64)] = &[
    (CKM_RSA_PKCS_KEY_PAIR_GEN, 2048, 4096, CKF_GENERATE_KEY_PAIR),
    (
        CKM_RSA_PKCS,
        2048,
        4096,
        CKF_SIGN | CKF_VERIFY | CKF_ENCRYPT | CKF_DECRYPT | CKF_WRAP | CKF_UNWRAP,
    ),
    // Raw RSA (the caller pads); no encrypt/decrypt (unpadded RSA encryption is unsafe).
    (CKM_RSA_X_509, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    // SHA-1/SHA-224 PKCS#1 v1.5 (legacy, as SoftHSM2): the DigestInfo signed through the
    // raw path (OpenSSL, blinded). Their PSS forms sign through OpenSSL too (aws-lc-rs PSS:
    // SHA-2 ≥ 256 only), `KeyMaterial::rsa_sign_digest`.
    (CKM_SHA1_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA224_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA1_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA224_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (
        CKM_RSA_PKCS_OAEP,
        2048,
        4096,
        CKF_ENCRYPT | CKF_DECRYPT | CKF_WRAP | CKF_UNWRAP,
    ),
    (
        CKM_EC_KEY_PAIR_GEN,
        256,
        521,
        CKF_GENERATE_KEY_PAIR | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA,
        256,
        521,
        CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA1,
        256,
        521,
        CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA224,
        256,
        521,
        CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA256,
        256,
        521,
        CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA384,
        256,
        521,
        CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA512,
        256,
        521,
        CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    // P-256/384/521 (CKK_EC) and X25519 (CKK_EC_MONTGOMERY).
    (
        CKM_ECDH1_DERIVE,
        255,
        521,
        CKF_DERIVE | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    // Ed25519 (aws-lc-rs) and Ed448 (OpenSSL).
    (CKM_EC_EDWARDS_KEY_PAIR_GEN, 255, 448, CKF_GENERATE_KEY_PAIR),
    (
        CKM_EC_MONTGOMERY_KEY_PAIR_GEN,
        255,
        255,
        CKF_GENERATE_KEY_PAIR,
    ),
    (CKM_EDDSA, 255, 448, CKF_SIGN | CKF_VERIFY),
    (CKM_AES_KEY_GEN, 16, 32, CKF_GENERATE),
    // Also message-based (C_EncryptMessage and C_EncryptMessageBegin/Next, and decryption;
    // `crate::domain::message`).
    (
        CKM_AES_GCM,
        16,
        32,
        CKF_ENCRYPT
            | CKF_DECRYPT
            | CKF_WRAP
            | CKF_UNWRAP
            | CKF_MESSAGE_ENCRYPT
            | CKF_MESSAGE_DECRYPT
            | CKF_MULTI_MESSAGE,
    ),
    (
        CKM_AES_CBC_PAD,
        16,
        32,
        CKF_ENCRYPT | CKF_DECRYPT | CKF_WRAP | CKF_UNWRAP,
    ),
    // Unpadded block modes: the data is a multiple of 16 bytes. Not offered for wrapping
    // (the wrap formats are the ones `crate::policy` allows).
    (CKM_AES_ECB, 16, 32, CKF_ENCRYPT | CKF_DECRYPT),
    (CKM_AES_CBC, 16, 32, CKF_ENCRYPT | CKF_DECRYPT),
    (CKM_AES_CTR, 16, 32, CKF_ENCRYPT | CKF_DECRYPT),
    (CKM_AES_CMAC, 16, 32, CKF_SIGN | CKF_VERIFY),
    (CKM_AES_CMAC_GENERAL, 16, 32, CKF_SIGN | CKF_VERIFY),
    (CKM_AES_KEY_WRAP, 16, 32, CKF_WRAP | CKF_UNWRAP),
    (CKM_AES_KEY_WRAP_PAD, 16, 32, CKF_WRAP | CKF_UNWRAP),
    (CKM_AES_KEY_WRAP_KWP, 16, 32, CKF_WRAP | CKF_UNWRAP),
    // The domain's own format, binding the wrapped key's attributes (`crate::wrap`).
    (
        crate::wrap::CKM_CAAS_AES_KEY_WRAP_ATTRS,
        16,
        32,
        CKF_WRAP | CKF_UNWRAP,
    ),
    (CKM_GENERIC_SECRET_KEY_GEN, 1, 512, CKF_GENERATE),
    (CKM_SHA_1_HMAC, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA_1_HMAC_GENERAL, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA224_HMAC_GENERAL, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_HMAC_GENERAL, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_HMAC_GENERAL, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_HMAC_GENERAL, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA224_HMAC, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_HMAC, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_HMAC, 1, 512, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_HMAC, 1, 512, CKF_SIGN | CKF_VERIFY),
    // PKCS#11 3.2 post-quantum (`crate::pq`); key sizes are public key bytes.
    (
        CKM_ML_DSA_KEY_PAIR_GEN,
        crate::pq::ML_DSA_KEY_BYTES.0,
        crate::pq::ML_DSA_KEY_BYTES.1,
        CKF_GENERATE_KEY_PAIR,
    ),
    (
        CKM_ML_DSA,
        crate::pq::ML_DSA_KEY_BYTES.0,
        crate::pq::ML_DSA_KEY_BYTES.1,
        CKF_SIGN | CKF_VERIFY,
    ),
    (
        CKM_ML_KEM_KEY_PAIR_GEN,
        crate::pq::ML_KEM_KEY_BYTES.0,
        crate::pq::ML_KEM_KEY_BYTES.1,
        CKF_GENERATE_KEY_PAIR,
    ),
    (
        CKM_ML_KEM,
        crate::pq::ML_KEM_KEY_BYTES.0,
        crate::pq::ML_KEM_KEY_BYTES.1,
        CKF_ENCAPSULATE | CKF_DECAPSULATE,
    ),
    (CKM_SHA_1, 0, 0, CKF_DIGEST),
    (CKM_SHA224, 0, 0, CKF_DIGEST),
    (CKM_SHA256, 0, 0, CKF_DIGEST),
    (CKM_SHA384, 0, 0, CKF_DIGEST),
    (CKM_SHA512, 0, 0, CKF_DIGEST),
];

/// Whether `mech` is advertised with `flag`.
#[must_use]
pub fn supports(mech: u64, flag: u64) -> bool {
    MECHANISMS.iter().any(|m| m.0 == mech && m.3 & flag != 0)
}

fn check_mech(mech: u64, flag: u64) -> Result<(), Ckr> {
    if !MECHANISMS.iter().any(|m| m.0 == mech) {
        return Err(Ckr(CKR_MECHANISM_INVALID));
    }
    if !supports(mech, flag) {
        return Err(Ckr(CKR_MECHANISM_INVALID));
    }
    Ok(())
}

/// Checks that `key` may be used for `usage` (a CKA_* flag) with `mech`, respecting
/// CKA_ALLOWED_MECHANISMS.
pub fn check_key(key: &Object, usage: u64, mech: u64) -> Result<(), Ckr> {
    if !key.flag(usage) {
        return Err(Ckr(CKR_KEY_FUNCTION_NOT_PERMITTED));
    }
    if let Some(allowed) = key.bytes(CKA_ALLOWED_MECHANISMS)
        && !allowed.is_empty()
        && !allowed
            .chunks_exact(8)
            .any(|c| caas_vsm_proto::attr::as_ulong(c) == Some(mech))
    {
        return Err(Ckr(CKR_MECHANISM_INVALID));
    }
    Ok(())
}

fn key_type_must(key: &Object, class: u64, types: &[u64]) -> Result<(), Ckr> {
    if key.class() != class || !key.key_type().is_some_and(|t| types.contains(&t)) {
        return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum SignKind {
    RsaPkcsRaw,
    RsaX509,
    /// CKM_RSA_PKCS_PSS over a hash of `hash_len` bytes, salt of `salt` bytes.
    RsaPssRaw {
        hash_len: usize,
        salt: usize,
    },
    RsaHash {
        pss: bool,
    },
    /// SHA*_RSA_PKCS_PSS with a salt of `salt` bytes.
    RsaHashPss {
        salt: usize,
    },
    /// PKCS#1 v1.5 over SHA-1 or SHA-224: the DigestInfo (its prefix here) signed raw.
    RsaHashLegacy(&'static [u8]),
    EcdsaRaw,
    EcdsaHash,
    Eddsa,
    MlDsa,
}

/// State of a sign or verify operation.
pub struct SignOp {
    kind: Option<SignKind>,
    key: Arc<KeyMaterial>,
    hasher: Option<digest::Context>,
    hmac: Option<(hmac::Context, hmac::Key)>,
    /// AES-CMAC and the tag length (16, or the CKM_AES_CMAC_GENERAL length).
    cmac: Option<(cmac::Context, usize)>,
    buf: Zeroizing<Vec<u8>>,
    /// Output length.
    pub out_len: usize,
    /// Whether C_SignUpdate was used (single-part calls then fail).
    pub multi: bool,
}

impl std::fmt::Debug for SignOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignOp")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// DigestInfo prefix of SHA-1 (RFC 8017 §9.2 note 1).
const DIGEST_INFO_SHA1: &[u8] = &[
    0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14,
];
/// DigestInfo prefix of SHA-224 (RFC 8017 §9.2 note 1).
const DIGEST_INFO_SHA224: &[u8] = &[
    0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04, 0x05,
    0x00, 0x04, 0x1c,
];

fn hash_for(mech: u64) -> Option<&'static digest::Algorithm> {
    Some(match mech {
        CKM_SHA256_RSA_PKCS | CKM_SHA256_RSA_PKCS_PSS | CKM_ECDSA_SHA256 | CKM_SHA256_HMAC => {
            &digest::SHA256
        }
        CKM_SHA384_RSA_PKCS | CKM_SHA384_RSA_PKCS_PSS | CKM_ECDSA_SHA384 | CKM_SHA384_HMAC => {
            &digest::SHA384
        }
        CKM_SHA512_RSA_PKCS | CKM_SHA512_RSA_PKCS_PSS | CKM_ECDSA_SHA512 | CKM_SHA512_HMAC => {
            &digest::SHA512
        }
        CKM_ECDSA_SHA224 | CKM_SHA224_HMAC | CKM_SHA224_RSA_PKCS | CKM_SHA224_RSA_PKCS_PSS => {
            &digest::SHA224
        }
        CKM_ECDSA_SHA1 | CKM_SHA_1_HMAC | CKM_SHA1_RSA_PKCS | CKM_SHA1_RSA_PKCS_PSS => {
            &digest::SHA1_FOR_LEGACY_USE_ONLY
        }
        _ => return None,
    })
}

fn is_general_hmac(mech: u64) -> bool {
    matches!(
        mech,
        CKM_SHA_1_HMAC_GENERAL
            | CKM_SHA224_HMAC_GENERAL
            | CKM_SHA256_HMAC_GENERAL
            | CKM_SHA384_HMAC_GENERAL
            | CKM_SHA512_HMAC_GENERAL
    )
}

/// Checks `CK_RSA_PKCS_PSS_PARAMS`: a served hash, MGF1 with the same hash, and the
/// mechanism's own hash when it names one. Returns (hash length, salt length); whether the
/// salt fits the key is checked when signing.
fn pss_check(
    param: &MechParam,
    expect_hash: Option<&'static digest::Algorithm>,
) -> Result<(usize, usize), Ckr> {
    let MechParam::Pss {
        hash,
        mgf,
        salt_len,
    } = param
    else {
        return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
    };
    let alg = digest_alg(*hash).ok_or(Ckr(CKR_MECHANISM_PARAM_INVALID))?;
    let mgf_ok = matches!(
        (*hash, *mgf),
        (CKM_SHA_1, CKG_MGF1_SHA1)
            | (CKM_SHA224, CKG_MGF1_SHA224)
            | (CKM_SHA256, CKG_MGF1_SHA256)
            | (CKM_SHA384, CKG_MGF1_SHA384)
            | (CKM_SHA512, CKG_MGF1_SHA512)
    );
    let len = alg.output_len();
    // A salt longer than the largest modulus served cannot fit any key.
    let salt = usize::try_from(*salt_len)
        .ok()
        .filter(|s| *s <= 1024)
        .ok_or(Ckr(CKR_MECHANISM_PARAM_INVALID))?;
    if !mgf_ok || expect_hash.is_some_and(|e| e != alg) {
        return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
    }
    Ok((len, salt))
}

impl SignOp {
    /// C_SignInit / C_VerifyInit. `sign` selects which key usage and class is required.
    pub fn init(mech: u64, param: &MechParam, key: &Object, sign: bool) -> Result<Self, Ckr> {
        check_mech(mech, if sign { CKF_SIGN } else { CKF_VERIFY })?;
        check_key(key, if sign { CKA_SIGN } else { CKA_VERIFY }, mech)?;
        let asym_class = if sign {
            CKO_PRIVATE_KEY
        } else {
            CKO_PUBLIC_KEY
        };
        let hash = hash_for(mech);
        let mut op = SignOp {
            kind: None,
            key: Arc::new(KeyMaterial::Secret(Zeroizing::new(Vec::new()))),
            hasher: None,
            hmac: None,
            cmac: None,
            buf: Zeroizing::new(Vec::new()),
            out_len: 0,
            multi: false,
        };
        let kind = match mech {
            CKM_SHA_1_HMAC
            | CKM_SHA224_HMAC
            | CKM_SHA256_HMAC
            | CKM_SHA384_HMAC
            | CKM_SHA512_HMAC
            | CKM_SHA_1_HMAC_GENERAL
            | CKM_SHA224_HMAC_GENERAL
            | CKM_SHA256_HMAC_GENERAL
            | CKM_SHA384_HMAC_GENERAL
            | CKM_SHA512_HMAC_GENERAL => {
                let alg = match mech {
                    CKM_SHA_1_HMAC | CKM_SHA_1_HMAC_GENERAL => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
                    CKM_SHA224_HMAC | CKM_SHA224_HMAC_GENERAL => hmac::HMAC_SHA224,
                    CKM_SHA256_HMAC | CKM_SHA256_HMAC_GENERAL => hmac::HMAC_SHA256,
                    CKM_SHA384_HMAC | CKM_SHA384_HMAC_GENERAL => hmac::HMAC_SHA384,
                    _ => hmac::HMAC_SHA512,
                };
                let full = alg.digest_algorithm().output_len();
                // The `*_GENERAL` forms give the output length (1 to the hash's length).
                op.out_len = match param {
                    MechParam::None {} if !is_general_hmac(mech) => full,
                    MechParam::MacLen { len } if is_general_hmac(mech) => usize::try_from(*len)
                        .ok()
                        .filter(|l| (1..=full).contains(l))
                        .ok_or(Ckr(CKR_MECHANISM_PARAM_INVALID))?,
                    _ => return Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
                };
                key_type_must(
                    key,
                    CKO_SECRET_KEY,
                    &[
                        CKK_GENERIC_SECRET,
                        CKK_SHA_1_HMAC,
                        CKK_SHA224_HMAC,
                        CKK_SHA256_HMAC,
                        CKK_SHA384_HMAC,
                        CKK_SHA512_HMAC,
                    ],
                )?;
                let m = key.material()?;
                let k = hmac::Key::new(alg, m.secret()?);
                op.hmac = Some((hmac::Context::with_key(&k), k));
                None
            }
            CKM_AES_CMAC | CKM_AES_CMAC_GENERAL => {
                let tag_len = match (mech, param) {
                    (CKM_AES_CMAC, MechParam::None {}) => 16,
                    (CKM_AES_CMAC_GENERAL, MechParam::MacLen { len }) if (1..=16).contains(len) => {
                        usize::try_from(*len).map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?
                    }
                    _ => return Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
                };
                key_type_must(key, CKO_SECRET_KEY, &[CKK_AES])?;
                let m = key.material()?;
                let alg = match m.secret()?.len() {
                    16 => cmac::AES_128,
                    24 => cmac::AES_192,
                    32 => cmac::AES_256,
                    _ => return Err(Ckr(CKR_KEY_SIZE_RANGE)),
                };
                let k = cmac::Key::new(alg, m.secret()?).map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
                op.out_len = tag_len;
                op.cmac = Some((cmac::Context::with_key(&k), tag_len));
                None
            }
            CKM_RSA_PKCS => Some(SignKind::RsaPkcsRaw),
            CKM_RSA_X_509 => Some(SignKind::RsaX509),
            CKM_RSA_PKCS_PSS => {
                let (hash_len, salt) = pss_check(param, None)?;
                Some(SignKind::RsaPssRaw { hash_len, salt })
            }
            CKM_SHA256_RSA_PKCS | CKM_SHA384_RSA_PKCS | CKM_SHA512_RSA_PKCS => {
                Some(SignKind::RsaHash { pss: false })
            }
            CKM_SHA1_RSA_PKCS => Some(SignKind::RsaHashLegacy(DIGEST_INFO_SHA1)),
            CKM_SHA224_RSA_PKCS => Some(SignKind::RsaHashLegacy(DIGEST_INFO_SHA224)),
            CKM_SHA1_RSA_PKCS_PSS
            | CKM_SHA224_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS
            | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS => {
                let (_, salt) = pss_check(param, hash)?;
                Some(SignKind::RsaHashPss { salt })
            }
            CKM_ECDSA => Some(SignKind::EcdsaRaw),
            CKM_ECDSA_SHA1 | CKM_ECDSA_SHA224 | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384
            | CKM_ECDSA_SHA512 => Some(SignKind::EcdsaHash),
            CKM_EDDSA => {
                if !matches!(param, MechParam::None {}) {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                }
                Some(SignKind::Eddsa)
            }
            CKM_ML_DSA => {
                // aws-lc-rs signs hedged with an empty context (`crate::pq`): a context
                // string or a deterministic signature cannot be honoured.
                match param {
                    MechParam::None {} => {}
                    MechParam::SignContext { hedge, context }
                        if context.0.is_empty()
                            && (!sign
                                || matches!(*hedge, CKH_HEDGE_PREFERRED | CKH_HEDGE_REQUIRED)) => {}
                    _ => return Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
                }
                Some(SignKind::MlDsa)
            }
            _ => return Err(Ckr(CKR_MECHANISM_INVALID)),
        };
        if let Some(kind) = kind {
            let types: &[u64] = match kind {
                SignKind::RsaPkcsRaw
                | SignKind::RsaX509
                | SignKind::RsaPssRaw { .. }
                | SignKind::RsaHash { .. }
                | SignKind::RsaHashPss { .. }
                | SignKind::RsaHashLegacy(_) => &[CKK_RSA],
                SignKind::EcdsaRaw | SignKind::EcdsaHash => &[CKK_EC],
                SignKind::Eddsa => &[CKK_EC_EDWARDS],
                SignKind::MlDsa => &[CKK_ML_DSA],
            };
            key_type_must(key, asym_class, types)?;
            op.key = key.material()?;
            // Ed25519 keys reach here only with CKK_EC_EDWARDS; an EC key with Ed25519
            // parameters is refused by the material check below.
            let ok = matches!(
                (&*op.key, kind),
                (
                    KeyMaterial::EdPrivate(_)
                        | KeyMaterial::EdPublic(_)
                        | KeyMaterial::Ed448Private(_)
                        | KeyMaterial::Ed448Public(_),
                    SignKind::Eddsa
                ) | (
                    KeyMaterial::MlDsaPrivate(_) | KeyMaterial::MlDsaPublic { .. },
                    SignKind::MlDsa
                ) | (
                    KeyMaterial::EcPrivate { .. } | KeyMaterial::EcPublic { .. },
                    SignKind::EcdsaRaw | SignKind::EcdsaHash
                ) | (
                    KeyMaterial::RsaPrivate { .. }
                        | KeyMaterial::RsaLegacyPrivate { .. }
                        | KeyMaterial::RsaPublic { .. },
                    SignKind::RsaPkcsRaw
                        | SignKind::RsaX509
                        | SignKind::RsaPssRaw { .. }
                        | SignKind::RsaHash { .. }
                        | SignKind::RsaHashPss { .. }
                        | SignKind::RsaHashLegacy(_)
                )
            );
            if !ok {
                return Err(Ckr(CKR_KEY_TYPE_INCONSISTENT));
            }
            op.out_len = op.key.signature_len();
            op.hasher = hash.map(digest::Context::new);
            op.kind = Some(kind);
        }
        Ok(op)
    }

    /// Feeds data.
    pub fn update(&mut self, data: &[u8]) -> Result<(), Ckr> {
        if let Some((ctx, _)) = &mut self.hmac {
            ctx.update(data);
        } else if let Some((ctx, _)) = &mut self.cmac {
            ctx.update(data).map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
        } else if let Some(h) = &mut self.hasher {
            h.update(data);
        } else {
            if matches!(
                self.kind,
                Some(SignKind::RsaPkcsRaw | SignKind::RsaX509 | SignKind::RsaPssRaw { .. })
            ) && self.buf.len() + data.len() > 1024
            {
                return Err(Ckr(CKR_DATA_LEN_RANGE));
            }
            self.buf.extend_from_slice(data);
        }
        Ok(())
    }

    fn digest_value(&mut self) -> Zeroizing<Vec<u8>> {
        match self.hasher.take() {
            Some(h) => Zeroizing::new(h.finish().as_ref().to_vec()),
            None => std::mem::take(&mut self.buf),
        }
    }

    /// Produces the signature.
    pub fn sign(&mut self) -> Result<Vec<u8>, Ckr> {
        if let Some((ctx, _)) = self.hmac.take() {
            let tag = ctx.sign();
            return Ok(tag
                .as_ref()
                .get(..self.out_len)
                .ok_or(Ckr(CKR_FUNCTION_FAILED))?
                .to_vec());
        }
        if let Some((ctx, len)) = self.cmac.take() {
            let tag = ctx.sign().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
            return Ok(tag.as_ref().get(..len).unwrap_or_default().to_vec());
        }
        let kind = self.kind.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        let input = self.digest_value();
        match kind {
            SignKind::RsaPkcsRaw => self.key.rsa_sign_raw(&input),
            SignKind::RsaX509 => self.key.rsa_sign_x509(&input),
            SignKind::RsaPssRaw { hash_len, salt } => {
                if input.len() != hash_len {
                    return Err(Ckr(CKR_DATA_LEN_RANGE));
                }
                self.key.rsa_pss_sign_digest(&input, salt)
            }
            SignKind::RsaHash { pss } => self.key.rsa_sign_digest(pss, &input),
            SignKind::RsaHashPss { salt } => self.key.rsa_pss_sign_digest(&input, salt),
            SignKind::RsaHashLegacy(prefix) => self.key.rsa_sign_raw(&[prefix, &input].concat()),
            SignKind::EcdsaRaw | SignKind::EcdsaHash => self.key.ecdsa_sign_digest(&input),
            SignKind::Eddsa => self.key.eddsa_sign(&input),
            SignKind::MlDsa => self.key.ml_dsa_sign(&input),
        }
    }

    /// Checks a signature.
    pub fn verify(&mut self, sig: &[u8]) -> Result<(), Ckr> {
        if let Some((ctx, key)) = self.hmac.take() {
            let tag = ctx.sign();
            if sig.len() != self.out_len {
                return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
            }
            drop(key);
            let tag = tag
                .as_ref()
                .get(..self.out_len)
                .ok_or(Ckr(CKR_FUNCTION_FAILED))?;
            return if aws_lc_rs::constant_time::verify_slices_are_equal(tag, sig).is_ok() {
                Ok(())
            } else {
                Err(Ckr(CKR_SIGNATURE_INVALID))
            };
        }
        if let Some((ctx, len)) = self.cmac.take() {
            if sig.len() != len {
                return Err(Ckr(CKR_SIGNATURE_LEN_RANGE));
            }
            let tag = ctx.sign().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
            let tag = tag.as_ref().get(..len).ok_or(Ckr(CKR_FUNCTION_FAILED))?;
            return if aws_lc_rs::constant_time::verify_slices_are_equal(tag, sig).is_ok() {
                Ok(())
            } else {
                Err(Ckr(CKR_SIGNATURE_INVALID))
            };
        }
        let kind = self.kind.ok_or(Ckr(CKR_OPERATION_NOT_INITIALIZED))?;
        let input = self.digest_value();
        match kind {
            SignKind::RsaPkcsRaw => self.key.rsa_verify_raw(&input, sig),
            SignKind::RsaX509 => self.key.rsa_verify_x509(&input, sig),
            SignKind::RsaPssRaw { hash_len, salt } => {
                if input.len() != hash_len {
                    return Err(Ckr(CKR_DATA_LEN_RANGE));
                }
                self.key.rsa_pss_verify_digest(&input, salt, sig)
            }
            SignKind::RsaHash { pss } => self.key.rsa_verify_digest(pss, &input, sig),
            SignKind::RsaHashPss { salt } => self.key.rsa_pss_verify_digest(&input, salt, sig),
            SignKind::RsaHashLegacy(prefix) => {
                self.key.rsa_verify_raw(&[prefix, &input].concat(), sig)
            }
            SignKind::EcdsaRaw | SignKind::EcdsaHash => self.key.ecdsa_verify_digest(&input, sig),
            SignKind::Eddsa => self.key.eddsa_verify(&input, sig),
            SignKind::MlDsa => self.key.ml_dsa_verify(&input, sig),
        }
    }
}

enum CipherKind {
    Gcm {
        key: aead::LessSafeKey,
        nonce: [u8; 12],
        aad: Vec<u8>,
    },
    /// AES-GCM with an IV other than 12 bytes or a tag shorter than 16 (OpenSSL).
    GcmOther {
        key: Zeroizing<Vec<u8>>,
        iv: Vec<u8>,
        aad: Vec<u8>,
        tag_len: usize,
    },
    CbcPad {
        key: Zeroizing<Vec<u8>>,
        iv: [u8; 16],
    },
    /// CKM_AES_ECB (no IV) or CKM_AES_CBC (with IV), no padding.
    Block {
        key: Zeroizing<Vec<u8>>,
        iv: Option<[u8; 16]>,
    },
    /// CKM_AES_CTR: the initial counter block and how many blocks the counter (its low
    /// `counter_bits` bits) can still count before it would wrap.
    Ctr {
        key: Zeroizing<Vec<u8>>,
        cb: [u8; 16],
        blocks_left: u128,
    },
    RsaOaep {
        hash: u64,
        label: Vec<u8>,
    },
    RsaPkcs,
}

/// State of an encrypt or decrypt operation.
pub struct CipherOp {
    kind: CipherKind,
    key: Arc<KeyMaterial>,
    buf: Zeroizing<Vec<u8>>,
    encrypt: bool,
    /// Whether C_*Update was used.
    pub multi: bool,
}

impl std::fmt::Debug for CipherOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CipherOp")
            .field("encrypt", &self.encrypt)
            .finish_non_exhaustive()
    }
}

fn aes_alg(len: usize) -> Result<&'static aws_lc_rs::cipher::Algorithm, Ckr> {
    match len {
        16 => Ok(&AES_128),
        24 => Ok(&AES_192),
        32 => Ok(&AES_256),
        _ => Err(Ckr(CKR_KEY_SIZE_RANGE)),
    }
}

impl CipherOp {
    /// C_EncryptInit / C_DecryptInit (also used by wrap/unwrap with `usage` CKA_WRAP/UNWRAP).
    pub fn init(
        mech: u64,
        param: &MechParam,
        key: &Object,
        encrypt: bool,
        usage: u64,
    ) -> Result<Self, Ckr> {
        let flag = match usage {
            CKA_WRAP => CKF_WRAP,
            CKA_UNWRAP => CKF_UNWRAP,
            _ if encrypt => CKF_ENCRYPT,
            _ => CKF_DECRYPT,
        };
        check_mech(mech, flag)?;
        check_key(key, usage, mech)?;
        let kind = match mech {
            CKM_AES_GCM => {
                key_type_must(key, CKO_SECRET_KEY, &[CKK_AES])?;
                let MechParam::Gcm { iv, aad, tag_bits } = param else {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                };
                // SP 800-38D: tags of 96 to 128 bits (the general-purpose lengths; 32 and
                // 64 need the data and use limits of its Appendix C, not enforced here),
                // IVs of 1 to 256 bytes (other than 12 they are GHASHed into J0).
                if !matches!(*tag_bits, 96 | 104 | 112 | 120 | 128)
                    || !(1..=256).contains(&iv.0.len())
                {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                }
                let m = key.material()?;
                if iv.0.len() != 12 || *tag_bits != 128 {
                    // aws-lc-rs serves 96-bit IVs and full tags only: OpenSSL does the rest.
                    aes_alg(m.secret()?.len())?;
                    CipherKind::GcmOther {
                        key: Zeroizing::new(m.secret()?.to_vec()),
                        iv: iv.0.clone(),
                        aad: aad.0.clone(),
                        tag_len: (*tag_bits / 8) as usize,
                    }
                } else {
                    let nonce: [u8; 12] =
                        iv.0.as_slice()
                            .try_into()
                            .map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?;
                    let alg = match m.secret()?.len() {
                        16 => &aead::AES_128_GCM,
                        24 => &aead::AES_192_GCM,
                        32 => &aead::AES_256_GCM,
                        _ => return Err(Ckr(CKR_KEY_SIZE_RANGE)),
                    };
                    let k = aead::UnboundKey::new(alg, m.secret()?)
                        .map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
                    CipherKind::Gcm {
                        key: aead::LessSafeKey::new(k),
                        nonce,
                        aad: aad.0.clone(),
                    }
                }
            }
            CKM_AES_CBC_PAD => {
                key_type_must(key, CKO_SECRET_KEY, &[CKK_AES])?;
                let MechParam::Bytes { data } = param else {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                };
                let iv: [u8; 16] = data
                    .0
                    .as_slice()
                    .try_into()
                    .map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?;
                let m = key.material()?;
                aes_alg(m.secret()?.len())?;
                CipherKind::CbcPad {
                    key: Zeroizing::new(m.secret()?.to_vec()),
                    iv,
                }
            }
            CKM_AES_ECB | CKM_AES_CBC => {
                key_type_must(key, CKO_SECRET_KEY, &[CKK_AES])?;
                let iv = match (mech, param) {
                    (CKM_AES_ECB, MechParam::None {}) => None,
                    (CKM_AES_CBC, MechParam::Bytes { data }) => Some(
                        <[u8; 16]>::try_from(data.0.as_slice())
                            .map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?,
                    ),
                    _ => return Err(Ckr(CKR_MECHANISM_PARAM_INVALID)),
                };
                let m = key.material()?;
                aes_alg(m.secret()?.len())?;
                CipherKind::Block {
                    key: Zeroizing::new(m.secret()?.to_vec()),
                    iv,
                }
            }
            CKM_AES_CTR => {
                key_type_must(key, CKO_SECRET_KEY, &[CKK_AES])?;
                let MechParam::Ctr { counter_bits, cb } = param else {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                };
                let cb: [u8; 16] =
                    cb.0.as_slice()
                        .try_into()
                        .map_err(|_| Ckr(CKR_MECHANISM_PARAM_INVALID))?;
                let blocks_left = ctr_blocks_left(*counter_bits, &cb)?;
                let m = key.material()?;
                aes_alg(m.secret()?.len())?;
                CipherKind::Ctr {
                    key: Zeroizing::new(m.secret()?.to_vec()),
                    cb,
                    blocks_left,
                }
            }
            CKM_RSA_PKCS_OAEP => {
                let MechParam::Oaep {
                    hash,
                    mgf,
                    source,
                    source_data,
                } = param
                else {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                };
                let mgf_ok = matches!(
                    (*hash, *mgf),
                    (CKM_SHA_1, CKG_MGF1_SHA1)
                        | (CKM_SHA256, CKG_MGF1_SHA256)
                        | (CKM_SHA384, CKG_MGF1_SHA384)
                        | (CKM_SHA512, CKG_MGF1_SHA512)
                );
                if !mgf_ok || (*source != 0 && *source != CKZ_DATA_SPECIFIED) {
                    return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
                }
                CipherKind::RsaOaep {
                    hash: *hash,
                    label: source_data.0.clone(),
                }
            }
            CKM_RSA_PKCS => CipherKind::RsaPkcs,
            _ => return Err(Ckr(CKR_MECHANISM_INVALID)),
        };
        if matches!(kind, CipherKind::RsaOaep { .. } | CipherKind::RsaPkcs) {
            let class = if encrypt {
                CKO_PUBLIC_KEY
            } else {
                CKO_PRIVATE_KEY
            };
            key_type_must(key, class, &[CKK_RSA])?;
        }
        Ok(CipherOp {
            kind,
            key: key.material()?,
            buf: Zeroizing::new(Vec::new()),
            encrypt,
            multi: false,
        })
    }

    /// An upper bound of the output for `input_len` more bytes.
    #[must_use]
    pub fn max_out(&self, input_len: usize) -> usize {
        let total = self.buf.len() + input_len;
        match (&self.kind, self.encrypt) {
            (CipherKind::Gcm { .. }, true) => total + 16,
            (CipherKind::Gcm { .. }, false) => total.saturating_sub(16),
            (CipherKind::GcmOther { tag_len, .. }, true) => total + tag_len,
            (CipherKind::GcmOther { tag_len, .. }, false) => total.saturating_sub(*tag_len),
            (CipherKind::CbcPad { .. }, true) => (total / 16 + 1) * 16,
            (CipherKind::CbcPad { .. } | CipherKind::Block { .. }, false)
            | (CipherKind::Block { .. } | CipherKind::Ctr { .. }, true)
            | (CipherKind::Ctr { .. }, false) => total,
            _ => self.key.signature_len(),
        }
    }

    /// Buffers input (multi-part).
    pub fn update(&mut self, data: &[u8]) -> Result<(), Ckr> {
        if self.buf.len() + data.len() > caas_vsm_proto::MAX_FRAME {
            return Err(Ckr(CKR_DATA_LEN_RANGE));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Runs the operation over all buffered input.
    pub fn finish(&mut self) -> Result<Zeroizing<Vec<u8>>, Ckr> {
        let input = std::mem::take(&mut self.buf);
        let bad_input = if self.encrypt {
            Ckr(CKR_DATA_LEN_RANGE)
        } else {
            Ckr(CKR_ENCRYPTED_DATA_INVALID)
        };
        match (&self.kind, self.encrypt) {
            (CipherKind::Gcm { key, nonce, aad }, true) => {
                let mut out = Zeroizing::new(input.to_vec());
                key.seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key(*nonce),
                    aead::Aad::from(aad.as_slice()),
                    &mut *out,
                )
                .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                Ok(out)
            }
            (CipherKind::Gcm { key, nonce, aad }, false) => {
                if input.len() < 16 {
                    return Err(Ckr(CKR_ENCRYPTED_DATA_LEN_RANGE));
                }
                let mut out = Zeroizing::new(input.to_vec());
                let n = key
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key(*nonce),
                        aead::Aad::from(aad.as_slice()),
                        &mut out,
                    )
                    .map_err(|_| Ckr(CKR_ENCRYPTED_DATA_INVALID))?
                    .len();
                out.truncate(n);
                Ok(out)
            }
            (
                CipherKind::GcmOther {
                    key,
                    iv,
                    aad,
                    tag_len,
                },
                encrypt,
            ) => {
                let cipher = match key.len() {
                    16 => openssl::symm::Cipher::aes_128_gcm(),
                    24 => openssl::symm::Cipher::aes_192_gcm(),
                    32 => openssl::symm::Cipher::aes_256_gcm(),
                    _ => return Err(Ckr(CKR_KEY_SIZE_RANGE)),
                };
                if encrypt {
                    let mut tag = vec![0u8; *tag_len];
                    let mut out =
                        openssl::symm::encrypt_aead(cipher, key, Some(iv), aad, &input, &mut tag)
                            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                    out.extend_from_slice(&tag);
                    Ok(Zeroizing::new(out))
                } else {
                    if input.len() < *tag_len {
                        return Err(Ckr(CKR_ENCRYPTED_DATA_LEN_RANGE));
                    }
                    let (ct, tag) = input.split_at(input.len() - tag_len);
                    openssl::symm::decrypt_aead(cipher, key, Some(iv), aad, ct, tag)
                        .map(Zeroizing::new)
                        .map_err(|_| Ckr(CKR_ENCRYPTED_DATA_INVALID))
                }
            }
            (CipherKind::CbcPad { key, iv }, true) => {
                let k = UnboundCipherKey::new(aes_alg(key.len())?, key)
                    .map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
                let k =
                    PaddedBlockEncryptingKey::cbc_pkcs7(k).map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                let mut out = input.to_vec();
                k.less_safe_encrypt(&mut out, EncryptionContext::Iv128((*iv).into()))
                    .map_err(|_| bad_input)?;
                Ok(Zeroizing::new(out))
            }
            (CipherKind::CbcPad { key, iv }, false) => {
                if input.is_empty() || !input.len().is_multiple_of(16) {
                    return Err(Ckr(CKR_ENCRYPTED_DATA_LEN_RANGE));
                }
                let k = UnboundCipherKey::new(aes_alg(key.len())?, key)
                    .map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
                let k =
                    PaddedBlockDecryptingKey::cbc_pkcs7(k).map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                let mut out = Zeroizing::new(input.to_vec());
                let n = k
                    .decrypt(&mut out, DecryptionContext::Iv128((*iv).into()))
                    .map_err(|_| bad_input)?
                    .len();
                out.truncate(n);
                Ok(out)
            }
            (CipherKind::Block { key, iv }, encrypt) => {
                if !input.len().is_multiple_of(16) {
                    return Err(bad_len(encrypt));
                }
                let mut out = Zeroizing::new(input.to_vec());
                if out.is_empty() {
                    return Ok(out);
                }
                let k = UnboundCipherKey::new(aes_alg(key.len())?, key)
                    .map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
                if encrypt {
                    let (k, ctx) = match iv {
                        Some(iv) => (
                            EncryptingKey::cbc(k),
                            EncryptionContext::Iv128((*iv).into()),
                        ),
                        None => (EncryptingKey::ecb(k), EncryptionContext::None),
                    };
                    k.map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
                        .less_safe_encrypt(&mut out, ctx)
                        .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                } else {
                    let (k, ctx) = match iv {
                        Some(iv) => (
                            DecryptingKey::cbc(k),
                            DecryptionContext::Iv128((*iv).into()),
                        ),
                        None => (DecryptingKey::ecb(k), DecryptionContext::None),
                    };
                    k.map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
                        .decrypt(&mut out, ctx)
                        .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                }
                Ok(out)
            }
            (
                CipherKind::Ctr {
                    key,
                    cb,
                    blocks_left,
                },
                _,
            ) => {
                // The counter must not wrap inside its `counter_bits` (PKCS#11 §2.10.4);
                // aws-lc counts over all 128 bits, which is the same as long as it does not.
                let blocks = input.len().div_ceil(16) as u128;
                if blocks > *blocks_left {
                    return Err(bad_len(self.encrypt));
                }
                let mut out = Zeroizing::new(input.to_vec());
                if out.is_empty() {
                    return Ok(out);
                }
                let k = UnboundCipherKey::new(aes_alg(key.len())?, key)
                    .map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
                EncryptingKey::ctr(k)
                    .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
                    .less_safe_encrypt(&mut out, EncryptionContext::Iv128((*cb).into()))
                    .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
                Ok(out)
            }
            (CipherKind::RsaOaep { hash, label }, true) => Ok(Zeroizing::new(
                self.key.rsa_oaep_encrypt(*hash, label, &input)?,
            )),
            (CipherKind::RsaOaep { hash, label }, false) => {
                self.key.rsa_oaep_decrypt(*hash, label, &input)
            }
            (CipherKind::RsaPkcs, true) => Ok(Zeroizing::new(self.key.rsa_pkcs1_encrypt(&input)?)),
            (CipherKind::RsaPkcs, false) => self.key.rsa_pkcs1_decrypt(&input),
        }
    }
}

/// The length error of an encryption (CKR_DATA_LEN_RANGE) or decryption
/// (CKR_ENCRYPTED_DATA_LEN_RANGE).
fn bad_len(encrypt: bool) -> Ckr {
    Ckr(if encrypt {
        CKR_DATA_LEN_RANGE
    } else {
        CKR_ENCRYPTED_DATA_LEN_RANGE
    })
}

/// How many 16-byte blocks a CTR counter of `bits` bits (the low bits of `cb`) counts
/// before it wraps, the current block included.
fn ctr_blocks_left(bits: u64, cb: &[u8; 16]) -> Result<u128, Ckr> {
    if !(1..=128).contains(&bits) {
        return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
    }
    let v = u128::from_be_bytes(*cb);
    if bits == 128 {
        return Ok((u128::MAX - v).saturating_add(1));
    }
    let mask = (1u128 << bits) - 1;
    Ok(mask - (v & mask) + 1)
}

/// AES key wrap (RFC 3394) or key wrap with padding (RFC 5649) of `data` under `kek`.
pub fn aes_kw(mech: u64, kek: &[u8], data: &[u8], wrap: bool) -> Result<Zeroizing<Vec<u8>>, Ckr> {
    use aws_lc_rs::key_wrap::{AES_128, AES_256, AesKek, KeyWrap, KeyWrapPadded};
    let padded = mech != CKM_AES_KEY_WRAP;
    if wrap && !padded && (!data.len().is_multiple_of(8) || data.len() < 16) {
        return Err(Ckr(CKR_KEY_SIZE_RANGE));
    }
    let cipher = match kek.len() {
        16 => &AES_128,
        32 => &AES_256,
        24 => return aes_kw_192(kek, data, wrap, padded),
        _ => return Err(Ckr(CKR_KEY_SIZE_RANGE)),
    };
    let k = AesKek::new(cipher, kek).map_err(|_| Ckr(CKR_KEY_SIZE_RANGE))?;
    let mut out = Zeroizing::new(vec![0u8; data.len() + 16]);
    let n = match (wrap, padded) {
        (true, false) => k
            .wrap(data, &mut out)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
            .len(),
        (true, true) => k
            .wrap_with_padding(data, &mut out)
            .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?
            .len(),
        (false, false) => k
            .unwrap(data, &mut out)
            .map_err(|_| Ckr(CKR_WRAPPED_KEY_INVALID))?
            .len(),
        (false, true) => k
            .unwrap_with_padding(data, &mut out)
            .map_err(|_| Ckr(CKR_WRAPPED_KEY_INVALID))?
            .len(),
    };
    out.truncate(n);
    Ok(out)
}

/// AES key wrap with a 192-bit KEK, which aws-lc-rs does not offer: OpenSSL's
/// id-aes192-wrap (RFC 3394) and id-aes192-wrap-pad (RFC 5649). The output buffer is
/// zeroizing (an unwrap's output is a key).
fn aes_kw_192(
    kek: &[u8],
    data: &[u8],
    wrap: bool,
    padded: bool,
) -> Result<Zeroizing<Vec<u8>>, Ckr> {
    use openssl::cipher::Cipher;
    use openssl::cipher_ctx::CipherCtx;
    let fail = if wrap {
        Ckr(CKR_FUNCTION_FAILED)
    } else {
        Ckr(CKR_WRAPPED_KEY_INVALID)
    };
    if !wrap && (data.len() < 16 || !data.len().is_multiple_of(8)) {
        return Err(Ckr(CKR_WRAPPED_KEY_INVALID));
    }
    let cipher = if padded {
        Cipher::aes_192_wrap_pad()
    } else {
        Cipher::aes_192_wrap()
    };
    let mut ctx = CipherCtx::new().map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
    if wrap {
        ctx.encrypt_init(Some(cipher), Some(kek), None)
    } else {
        ctx.decrypt_init(Some(cipher), Some(kek), None)
    }
    .map_err(|_| Ckr(CKR_FUNCTION_FAILED))?;
    // Room for the update's output (at most the input plus 15 bytes) and the final
    // call's block (the `openssl` crate asserts both sizes, so never less).
    let mut out = Zeroizing::new(vec![0u8; data.len() + 32]);
    let n = ctx.cipher_update(data, Some(&mut out)).map_err(|_| fail)?;
    let m = ctx
        .cipher_final(out.get_mut(n..).ok_or(fail)?)
        .map_err(|_| fail)?;
    out.truncate(n + m);
    Ok(out)
}

/// State of a digest operation.
pub struct DigestOp {
    ctx: digest::Context,
    /// Output length.
    pub out_len: usize,
    /// Whether C_DigestUpdate was used.
    pub multi: bool,
}

impl std::fmt::Debug for DigestOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestOp")
            .field("out_len", &self.out_len)
            .finish_non_exhaustive()
    }
}

impl DigestOp {
    /// C_DigestInit.
    pub fn init(mech: u64, param: &MechParam) -> Result<Self, Ckr> {
        let alg = digest_alg(mech).ok_or(Ckr(CKR_MECHANISM_INVALID))?;
        if !matches!(param, MechParam::None {}) {
            return Err(Ckr(CKR_MECHANISM_PARAM_INVALID));
        }
        Ok(Self {
            ctx: digest::Context::new(alg),
            out_len: alg.output_len(),
            multi: false,
        })
    }

    /// Feeds data.
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
    }

    /// The digest.
    #[must_use]
    pub fn finish(self) -> Vec<u8> {
        self.ctx.finish().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_kwp_rfc5649_vector() -> Result<(), Ckr> {
        // RFC 5649 §6, 20-octet key data.
        let kek =
            hex::decode("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8").unwrap_or_default();
        // A 192-bit KEK (OpenSSL's id-aes192-wrap-pad): both vectors of RFC 5649 §6.
        for (key, wrapped) in [
            (
                "c37b7e6492584340bed12207808941155068f738",
                "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a",
            ),
            ("466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f"),
        ] {
            let (key, wrapped) = (
                hex::decode(key).unwrap_or_default(),
                hex::decode(wrapped).unwrap_or_default(),
            );
            assert_eq!(*aes_kw(CKM_AES_KEY_WRAP_PAD, &kek, &key, true)?, wrapped);
            assert_eq!(*aes_kw(CKM_AES_KEY_WRAP_KWP, &kek, &wrapped, false)?, key);
            let mut bad = wrapped.clone();
            bad[5] ^= 1;
            assert_eq!(
                aes_kw(CKM_AES_KEY_WRAP_PAD, &kek, &bad, false).err(),
                Some(Ckr(CKR_WRAPPED_KEY_INVALID))
            );
        }
        // RFC 3394 §4.2: 128 bits of key data with a 192-bit KEK.
        let kek3394 =
            hex::decode("000102030405060708090a0b0c0d0e0f1011121314151617").unwrap_or_default();
        let data = hex::decode("00112233445566778899aabbccddeeff").unwrap_or_default();
        let want =
            hex::decode("96778b25ae6ca435f92b5b97c050aed2468ab8a17ad84e5d").unwrap_or_default();
        assert_eq!(*aes_kw(CKM_AES_KEY_WRAP, &kek3394, &data, true)?, want);
        assert_eq!(*aes_kw(CKM_AES_KEY_WRAP, &kek3394, &want, false)?, data);
        assert_eq!(
            aes_kw(CKM_AES_KEY_WRAP, &kek3394, &data[..12], true).err(),
            Some(Ckr(CKR_KEY_SIZE_RANGE))
        );
        let kek = [7u8; 32];
        for len in [1usize, 7, 8, 20, 32] {
            let data = vec![0x5a; len];
            let w = aes_kw(CKM_AES_KEY_WRAP_PAD, &kek, &data, true)?;
            assert_eq!(w.len(), len.div_ceil(8).max(1) * 8 + 8);
            assert_eq!(&*aes_kw(CKM_AES_KEY_WRAP_PAD, &kek, &w, false)?, &data[..]);
        }
        let mut w = aes_kw(CKM_AES_KEY_WRAP, &kek, &[1u8; 32], true)?;
        w[3] ^= 1;
        assert_eq!(
            aes_kw(CKM_AES_KEY_WRAP, &kek, &w, false).err(),
            Some(Ckr(CKR_WRAPPED_KEY_INVALID))
        );
        Ok(())
    }

    /// A secret key of `len` bytes allowed for `usage`.
    fn secret_key(key_type: u64, len: u64, usage: u64) -> Result<Object, Ckr> {
        use caas_vsm_proto::{Attr, Blob, attr};
        let tmpl = [Attr {
            ty: usage,
            value: Blob(attr::boolean(true)),
        }];
        let (a, s) = crate::object::build(
            &tmpl,
            CKO_SECRET_KEY,
            Some(key_type),
            crate::object::Origin::Generated(CKM_GENERIC_SECRET_KEY_GEN),
            &[(CKA_VALUE_LEN, attr::ulong(len))],
            Some(Zeroizing::new(vec![7u8; usize::try_from(len).unwrap_or(0)])),
            crate::policy::Role::User,
        )?;
        Ok(Object::new(1, None, a, s, 0))
    }

    /// C_GetMechanismInfo does not lie for the secret-key mechanisms: each advertised
    /// encrypt/decrypt/sign/verify flag works with a key at each end of the advertised size
    /// range (and AES-192 in between). Wrapping is covered by the policy tests and the
    /// RFC 3394/5649 vectors (192-bit KEK) above.
    #[test]
    fn every_advertised_secret_key_mechanism_works_across_its_key_range() -> Result<(), Ckr> {
        use caas_vsm_proto::Blob;
        let mut checked = 0;
        for &(mech, min, max, flags) in MECHANISMS {
            let (key_type, param) = match mech {
                CKM_AES_GCM => (
                    CKK_AES,
                    MechParam::Gcm {
                        iv: Blob(vec![0; 12]),
                        aad: Blob(Vec::new()),
                        tag_bits: 128,
                    },
                ),
                CKM_AES_CBC_PAD | CKM_AES_CBC => (
                    CKK_AES,
                    MechParam::Bytes {
                        data: Blob(vec![0; 16]),
                    },
                ),
                CKM_AES_CTR => (
                    CKK_AES,
                    MechParam::Ctr {
                        counter_bits: 128,
                        cb: Blob(vec![0; 16]),
                    },
                ),
                CKM_AES_ECB | CKM_AES_CMAC => (CKK_AES, MechParam::None {}),
                CKM_AES_CMAC_GENERAL => (CKK_AES, MechParam::MacLen { len: 8 }),
                CKM_SHA_1_HMAC | CKM_SHA224_HMAC | CKM_SHA256_HMAC | CKM_SHA384_HMAC
                | CKM_SHA512_HMAC => (CKK_GENERIC_SECRET, MechParam::None {}),
                m if is_general_hmac(m) => (CKK_GENERIC_SECRET, MechParam::MacLen { len: 10 }),
                _ => continue,
            };
            let sizes: Vec<u64> = if key_type == CKK_AES {
                [16, 24, 32]
                    .into_iter()
                    .filter(|s| (min..=max).contains(s))
                    .collect()
            } else {
                vec![min, max]
            };
            for size in sizes {
                for (flag, usage, first) in [
                    (CKF_ENCRYPT, CKA_ENCRYPT, true),
                    (CKF_DECRYPT, CKA_DECRYPT, false),
                    (CKF_SIGN, CKA_SIGN, true),
                    (CKF_VERIFY, CKA_VERIFY, false),
                ] {
                    if flags & flag == 0 {
                        continue;
                    }
                    let key = secret_key(key_type, size, usage)?;
                    let r = if usage == CKA_SIGN || usage == CKA_VERIFY {
                        SignOp::init(mech, &param, &key, first).map(|_| ())
                    } else {
                        CipherOp::init(mech, &param, &key, first, usage).map(|_| ())
                    };
                    assert!(
                        r.is_ok(),
                        "{mech:#x} flag {flag:#x} key {size} bytes: {r:?}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 40, "only {checked} combinations checked");
        Ok(())
    }

    #[test]
    fn ctr_counter_space() -> Result<(), Ckr> {
        let mut cb = [0u8; 16];
        assert_eq!(ctr_blocks_left(8, &cb)?, 256);
        cb[15] = 0xff;
        assert_eq!(ctr_blocks_left(8, &cb)?, 1);
        assert_eq!(ctr_blocks_left(16, &cb)?, 256 * 256 - 255);
        assert_eq!(ctr_blocks_left(128, &[0u8; 16])?, u128::MAX);
        assert_eq!(ctr_blocks_left(128, &[0xff; 16])?, 1);
        for bad in [0, 129] {
            assert_eq!(
                ctr_blocks_left(bad, &cb).err(),
                Some(Ckr(CKR_MECHANISM_PARAM_INVALID))
            );
        }
        Ok(())
    }

    #[test]
    fn sha256_digest_kat() -> Result<(), Ckr> {
        // FIPS 180-2 "abc".
        let mut d = DigestOp::init(CKM_SHA256, &MechParam::None {})?;
        d.update(b"abc");
        assert_eq!(
            hex::encode(d.finish()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }
}
