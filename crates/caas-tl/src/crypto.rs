//! The primitives of seed 003 §4.1 as used here:
//! - `Enc_pk(m)` to the TTP: X25519 ephemeral-static agreement, SP 800-108 KDF, AES-256-GCM
//!   ([`seal_to_ttp`] / [`TtpKeys::open`]); ECIES in the style of HPKE base mode.
//! - `Enc_pkTPM(m)` ("sealed to the host's bind key"): a fresh 256-bit key under RSA-OAEP
//!   (SHA-256, empty label) to the TPM bind key, the message under AES-256-GCM with that key
//!   ([`seal_to_bind_key`]). Only the host's TPM can undo the RSA part, and only while its
//!   PCRs match the bind key's PolicyPCR.
//! - `Sign_sk` / `Verify_pk`: Ed25519 for the DM and the TTP; the AK's signature is a TPM
//!   quote whose qualifying data is the digest of the signed body ([`ak_nonce`]).
//! - `PRF`, `MAC`: HMAC-SHA256 under keys derived from K_TTP.
use crate::error::{Error, Result};
use aws_lc_rs::agreement::{self, X25519};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair};
use caas_attest::structures::{PcrSelection, Public, PublicKey, encode_pcr_selection_list};
use caas_crypto::{SecretBytes, SecretKey};

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

/// Length-prefixed concatenation (u32 big-endian length before every field): the
/// unambiguous `a‖b‖…` of the seed's formulas.
pub fn lp(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 4).sum());
    for f in fields {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// The qualifying data of the quote that serves as the AK's signature `σ_AIK` over a
/// message body: `SHA-256(lp(label, body))`.
pub fn ak_nonce(label: &str, body: &[u8]) -> [u8; 32] {
    sha256(&lp(&[label.as_bytes(), body]))
}

/// Signs `lp(label, body)` with Ed25519.
pub fn ed25519_sign(kp: &Ed25519KeyPair, label: &str, body: &[u8]) -> Vec<u8> {
    kp.sign(&lp(&[label.as_bytes(), body])).as_ref().to_vec()
}

/// Verifies an Ed25519 signature made by [`ed25519_sign`].
pub fn ed25519_verify(pk: &[u8], label: &str, body: &[u8], sig: &[u8]) -> Result<()> {
    signature::UnparsedPublicKey::new(&signature::ED25519, pk)
        .verify(&lp(&[label.as_bytes(), body]), sig)
        .map_err(|_| Error::rejected("bad_signature", format!("{label}: signature invalid")))
}

/// Generates an Ed25519 key pair; returns its PKCS#8 document (keep it secret).
pub fn ed25519_generate() -> Result<SecretBytes> {
    let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| Error::Crypto("Ed25519 key generation"))?;
    Ok(SecretBytes::from_slice(doc.as_ref()))
}

/// Parses a PKCS#8 Ed25519 key.
pub fn ed25519_from_pkcs8(doc: &[u8]) -> Result<Ed25519KeyPair> {
    Ed25519KeyPair::from_pkcs8(doc)
        .map_err(|_| Error::malformed("Ed25519 key", "not PKCS#8 Ed25519"))
}

/// Public key bytes of an Ed25519 key pair.
pub fn ed25519_public(kp: &Ed25519KeyPair) -> Vec<u8> {
    kp.public_key().as_ref().to_vec()
}

/// HMAC-SHA256.
pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::hmac::sign(&k, data).as_ref());
    out
}

/// Constant-time equality.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// 32 random bytes.
pub fn random32() -> Result<[u8; 32]> {
    caas_crypto::random_array().map_err(|_| Error::Crypto("RNG"))
}

const TTP_KDF_LABEL: &[u8] = b"caas-tl x25519 seal v1";

/// Encrypts `plaintext` to the TTP's X25519 public key (`Enc_pkTTP`). Output:
/// `ephemeral public (32) ‖ AES-256-GCM envelope`.
pub fn seal_to_ttp(pk_ttp: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    if pk_ttp.len() != 32 {
        return Err(Error::malformed(
            "pk_TTP",
            "X25519 public keys are 32 bytes",
        ));
    }
    let eph = agreement::PrivateKey::generate(&X25519).map_err(|_| Error::Crypto("X25519"))?;
    let eph_pub = eph
        .compute_public_key()
        .map_err(|_| Error::Crypto("X25519"))?
        .as_ref()
        .to_vec();
    let key = agree(&eph, pk_ttp, &eph_pub, pk_ttp)?;
    let mut out = eph_pub;
    out.extend_from_slice(&caas_crypto::aead::seal(&key, aad, plaintext)?);
    Ok(out)
}

/// Shared key of the ephemeral-static agreement, bound to both public keys.
fn agree(
    sk: &agreement::PrivateKey,
    peer: &[u8],
    eph_pub: &[u8],
    recipient_pub: &[u8],
) -> Result<SecretKey> {
    let peer_key = agreement::UnparsedPublicKey::new(&X25519, peer);
    agreement::agree(sk, peer_key, Error::Crypto("X25519 agreement"), |z| {
        caas_crypto::kdf::derive_key(z, TTP_KDF_LABEL, &lp(&[eph_pub, recipient_pub]))
            .map_err(|_| Error::Crypto("KDF"))
    })
}

/// The TTP's long-term secrets: its Ed25519 signing key (`sk_TTP`), its X25519 decryption
/// key (the `sk_TTP` of `Dec_skTTP`), and the master key `K_TTP` of DBSP. They exist only in
/// the key service's memory and, at rest, sealed under the key service's domain key.
pub struct TtpKeys {
    signing: Ed25519KeyPair,
    signing_pkcs8: SecretBytes,
    decrypt: agreement::PrivateKey,
    decrypt_seed: SecretBytes,
    k_ttp: SecretKey,
}

impl std::fmt::Debug for TtpKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TtpKeys([REDACTED])")
    }
}

/// Public half of the TTP keys (what DMs and hosts pin).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TtpPublic {
    /// Ed25519 verification key (`pk_TTP` for signatures).
    #[serde(with = "caas_attest::b64")]
    pub sign: Vec<u8>,
    /// X25519 public key (`pk_TTP` for encryption).
    #[serde(with = "caas_attest::b64")]
    pub encrypt: Vec<u8>,
}

impl TtpPublic {
    /// Compact text form `<sign b64>.<encrypt b64>` (for `DIR/env` and command lines).
    pub fn to_text(&self) -> String {
        format!(
            "{}.{}",
            caas_attest::b64::encode(&self.sign),
            caas_attest::b64::encode(&self.encrypt)
        )
    }
    /// Parses [`TtpPublic::to_text`].
    pub fn from_text(s: &str) -> Result<Self> {
        let (a, b) = s
            .trim()
            .split_once('.')
            .ok_or_else(|| Error::malformed("TTP public key", "expected SIGN.ENCRYPT"))?;
        let sign =
            caas_attest::b64::decode(a).map_err(|e| Error::malformed("TTP public key", e))?;
        let encrypt =
            caas_attest::b64::decode(b).map_err(|e| Error::malformed("TTP public key", e))?;
        if sign.len() != 32 || encrypt.len() != 32 {
            return Err(Error::malformed(
                "TTP public key",
                "both halves are 32 bytes",
            ));
        }
        Ok(Self { sign, encrypt })
    }
}

impl TtpKeys {
    /// Fresh keys.
    pub fn generate() -> Result<Self> {
        let seed = agreement::PrivateKey::generate(&X25519).map_err(|_| Error::Crypto("X25519"))?;
        let seed_bytes: aws_lc_rs::encoding::Curve25519SeedBin<'_> =
            seed.as_be_bytes().map_err(|_| Error::Crypto("X25519"))?;
        let decrypt_seed = SecretBytes::from_slice(seed_bytes.as_ref());
        Self::from_parts(
            ed25519_generate()?,
            decrypt_seed,
            caas_crypto::random_key().map_err(|_| Error::Crypto("RNG"))?,
        )
    }

    fn from_parts(
        signing_pkcs8: SecretBytes,
        decrypt_seed: SecretBytes,
        k_ttp: SecretKey,
    ) -> Result<Self> {
        let signing = ed25519_from_pkcs8(signing_pkcs8.expose())?;
        let decrypt = agreement::PrivateKey::from_private_key(&X25519, decrypt_seed.expose())
            .map_err(|_| Error::malformed("TTP keys", "bad X25519 key"))?;
        Ok(Self {
            signing,
            signing_pkcs8,
            decrypt,
            decrypt_seed,
            k_ttp,
        })
    }

    /// Serialises the secrets (to be sealed by the caller before storing).
    pub fn to_secret_bytes(&self) -> SecretBytes {
        let mut v = Vec::new();
        v.extend_from_slice(&lp(&[
            self.signing_pkcs8.expose(),
            self.decrypt_seed.expose(),
            self.k_ttp.expose(),
        ]));
        SecretBytes::new(v)
    }

    /// Inverse of [`TtpKeys::to_secret_bytes`].
    pub fn from_secret_bytes(b: &[u8]) -> Result<Self> {
        let parts = split_lp(b, 3).ok_or_else(|| Error::malformed("TTP keys", "bad encoding"))?;
        let k =
            SecretKey::from_slice(parts[2]).map_err(|_| Error::malformed("TTP keys", "K_TTP"))?;
        Self::from_parts(
            SecretBytes::from_slice(parts[0]),
            SecretBytes::from_slice(parts[1]),
            k,
        )
    }

    /// Public keys.
    pub fn public(&self) -> Result<TtpPublic> {
        Ok(TtpPublic {
            sign: ed25519_public(&self.signing),
            encrypt: self
                .decrypt
                .compute_public_key()
                .map_err(|_| Error::Crypto("X25519"))?
                .as_ref()
                .to_vec(),
        })
    }

    /// `σ_TTP` over `lp(label, body)`.
    pub fn sign(&self, label: &str, body: &[u8]) -> Vec<u8> {
        ed25519_sign(&self.signing, label, body)
    }

    /// `Dec_skTTP(c)` of [`seal_to_ttp`].
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes> {
        if sealed.len() < 32 + caas_crypto::aead::OVERHEAD {
            return Err(Error::malformed("c1", "too short"));
        }
        let (eph, rest) = sealed.split_at(32);
        let own = self
            .decrypt
            .compute_public_key()
            .map_err(|_| Error::Crypto("X25519"))?;
        let key = agree(&self.decrypt, eph, eph, own.as_ref())?;
        Ok(caas_crypto::aead::open(&key, aad, rest)?)
    }

    /// A purpose-specific key derived from `K_TTP` (PRF, c4 encryption, MAC, DK wrapping).
    pub fn derived(&self, purpose: &str) -> Result<SecretKey> {
        Ok(caas_crypto::kdf::derive_key(
            self.k_ttp.expose(),
            b"caas-tl K_TTP",
            purpose.as_bytes(),
        )?)
    }
}

/// Splits an [`lp`] encoding into exactly `n` fields.
pub fn split_lp(mut b: &[u8], n: usize) -> Option<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(n);
    while !b.is_empty() {
        if b.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let rest = &b[4..];
        if rest.len() < len {
            return None;
        }
        out.push(&rest[..len]);
        b = &rest[len..];
    }
    (out.len() == n).then_some(out)
}

/// `Enc_pkTPM(m)`: seals `plaintext` to a TPM bind key given as TPM2B_PUBLIC (RSA-2048
/// decrypt key). Output: `lp(rsa_oaep(k), aes_gcm(k, aad, plaintext))`.
pub fn seal_to_bind_key(bind_public: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let public = Public::parse_tpm2b(bind_public).map_err(|e| Error::malformed("bind key", e))?;
    if !matches!(public.key, PublicKey::Rsa { .. }) {
        return Err(Error::malformed("bind key", "not an RSA key"));
    }
    let spki = caas_attest::der::spki(&public.key).map_err(|e| Error::malformed("bind key", e))?;
    let pk = PublicEncryptingKey::from_der(&spki)
        .map_err(|_| Error::malformed("bind key", "unusable RSA key"))?;
    let oaep = OaepPublicEncryptingKey::new(pk).map_err(|_| Error::Crypto("RSA-OAEP"))?;
    let k = caas_crypto::random_key().map_err(|_| Error::Crypto("RNG"))?;
    let mut ct = vec![0u8; oaep.ciphertext_size()];
    let n = oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, k.expose(), &mut ct, None)
        .map_err(|_| Error::Crypto("RSA-OAEP"))?
        .len();
    ct.truncate(n);
    let body = caas_crypto::aead::seal(&k, aad, plaintext)?;
    Ok(lp(&[&ct, &body]))
}

/// Splits a [`seal_to_bind_key`] output into the RSA-OAEP part (for the TPM) and the
/// AES-GCM part.
pub fn split_bind_sealed(sealed: &[u8]) -> Result<(&[u8], &[u8])> {
    let parts = split_lp(sealed, 2)
        .ok_or_else(|| Error::malformed("bind-sealed message", "bad encoding"))?;
    Ok((parts[0], parts[1]))
}

/// Second half of opening a bind-key seal: `key` is what the TPM decrypted.
pub fn open_bind_sealed(key: &[u8], aad: &[u8], body: &[u8]) -> Result<SecretBytes> {
    let k = SecretKey::from_slice(key)
        .map_err(|_| Error::rejected("decryption_failed", "bind-key payload has a bad length"))?;
    Ok(caas_crypto::aead::open(&k, aad, body)?)
}

/// The PolicyPCR digest (TPM 2.0 Part 3 §23.7) a key bound to `values` of `selection`
/// carries as authPolicy, computed in software:
/// `H(0…0 ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ H(values…))` with SHA-256.
pub fn policy_pcr_digest(selection: &PcrSelection, values: &[Vec<u8>]) -> [u8; 32] {
    const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
    let mut concat = Vec::new();
    for v in values {
        concat.extend_from_slice(v);
    }
    let pcr_digest = sha256(&concat);
    let mut m = vec![0u8; 32];
    m.extend_from_slice(&TPM_CC_POLICY_PCR.to_be_bytes());
    m.extend_from_slice(&encode_pcr_selection_list(std::slice::from_ref(selection)));
    m.extend_from_slice(&pcr_digest);
    sha256(&m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttp_seal_round_trip_and_tamper() -> Result<()> {
        let keys = TtpKeys::generate()?;
        let p = keys.public()?;
        let c = seal_to_ttp(&p.encrypt, b"aad", b"secret m1")?;
        assert_eq!(keys.open(b"aad", &c)?.expose(), b"secret m1");
        assert!(keys.open(b"other", &c).is_err());
        for i in [0, 40, c.len() - 1] {
            let mut t = c.clone();
            t[i] ^= 1;
            assert!(keys.open(b"aad", &t).is_err(), "byte {i}");
        }
        let again = TtpKeys::from_secret_bytes(keys.to_secret_bytes().expose())?;
        assert_eq!(again.public()?, p);
        assert_eq!(again.open(b"aad", &c)?.expose(), b"secret m1");
        assert_eq!(TtpPublic::from_text(&p.to_text())?, p);
        Ok(())
    }

    #[test]
    fn signatures_bind_label_and_body() -> Result<()> {
        let kp = ed25519_from_pkcs8(ed25519_generate()?.expose())?;
        let pk = ed25519_public(&kp);
        let s = ed25519_sign(&kp, "a", b"body");
        ed25519_verify(&pk, "a", b"body", &s)?;
        assert!(ed25519_verify(&pk, "b", b"body", &s).is_err());
        assert!(ed25519_verify(&pk, "a", b"bodx", &s).is_err());
        Ok(())
    }

    #[test]
    fn lp_is_unambiguous() {
        assert_ne!(lp(&[b"ab", b"c"]), lp(&[b"a", b"bc"]));
        assert_eq!(
            split_lp(&lp(&[b"ab", b"c"]), 2),
            Some(vec![&b"ab"[..], &b"c"[..]])
        );
        assert_eq!(split_lp(&[0, 0, 0, 9, 1], 1), None);
    }
}
