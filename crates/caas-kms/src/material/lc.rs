//! The two AWS-LC primitives aws-lc-rs does not expose safely, called through aws-lc-sys
//! (the very library aws-lc-rs links): ML-DSA signing and verification of a caller's
//! external μ (FIPS 204 §6.2, `MessageType` `EXTERNAL_MU`) and Ed25519ph (RFC 8032
//! HashEdDSA, `ED25519_PH_SHA_512`). Every pointer handed to C comes from a live Rust
//! slice with its length; every object C allocates is freed by a guard on every path.
//! Keys arrive as PKCS#8 / SPKI DER (the same encodings aws-lc-rs produces) and are
//! parsed by AWS-LC itself; the 64-byte Ed25519 private key lives only in a zeroizing
//! buffer.
#![allow(unsafe_code)]
use aws_lc_sys as sys;
use zeroize::Zeroizing;

/// Length of ML-DSA's message representative μ.
pub const MU_LEN: usize = 64;

struct Pkey(*mut sys::EVP_PKEY);
impl Drop for Pkey {
    fn drop(&mut self) {
        // SAFETY: the pointer is non-null (checked at construction) and owned here.
        unsafe { sys::EVP_PKEY_free(self.0) }
    }
}

struct PkeyCtx(*mut sys::EVP_PKEY_CTX);
impl Drop for PkeyCtx {
    fn drop(&mut self) {
        // SAFETY: the pointer is non-null (checked at construction) and owned here.
        unsafe { sys::EVP_PKEY_CTX_free(self.0) }
    }
}

/// Parses DER with AWS-LC (`private`: PKCS#8, else SPKI); the whole input must be used.
fn parse(der: &[u8], private: bool) -> Option<Pkey> {
    // SAFETY: CBS borrows `der` for the duration of the parse only; the EVP_PKEY returned
    // owns its own copy of the key.
    unsafe {
        let mut cbs = std::mem::zeroed::<sys::CBS>();
        sys::CBS_init(&mut cbs, der.as_ptr(), der.len());
        let p = if private {
            sys::EVP_parse_private_key(&mut cbs)
        } else {
            sys::EVP_parse_public_key(&mut cbs)
        };
        if p.is_null() {
            return None;
        }
        let key = Pkey(p);
        (sys::CBS_len(&cbs) == 0).then_some(key)
    }
}

fn ctx(key: &Pkey) -> Option<PkeyCtx> {
    // SAFETY: `key` is a live EVP_PKEY; the context takes its own reference.
    let c = unsafe { sys::EVP_PKEY_CTX_new(key.0, std::ptr::null_mut()) };
    (!c.is_null()).then_some(PkeyCtx(c))
}

/// ML-DSA signature over the external μ with the PKCS#8 private key; `sig_len` is the
/// parameter set's signature length.
pub fn mldsa_sign_mu(pkcs8: &[u8], mu: &[u8; MU_LEN], sig_len: usize) -> Option<Vec<u8>> {
    let key = parse(pkcs8, true)?;
    let c = ctx(&key)?;
    let mut sig = vec![0u8; sig_len];
    let mut len = sig.len();
    // SAFETY: `sig` has `len` writable bytes, `mu` 64 readable ones; the context is live.
    let ok = unsafe {
        sys::EVP_PKEY_sign_init(c.0) == 1
            && sys::EVP_PKEY_sign(c.0, sig.as_mut_ptr(), &mut len, mu.as_ptr(), mu.len()) == 1
    };
    (ok && len == sig_len).then_some(sig)
}

/// Verifies an ML-DSA signature over the external μ with the SPKI public key.
pub fn mldsa_verify_mu(spki: &[u8], mu: &[u8; MU_LEN], sig: &[u8]) -> bool {
    let Some(key) = parse(spki, false) else {
        return false;
    };
    let Some(c) = ctx(&key) else {
        return false;
    };
    // SAFETY: both slices are live with their lengths; the context is live.
    unsafe {
        sys::EVP_PKEY_verify_init(c.0) == 1
            && sys::EVP_PKEY_verify(c.0, sig.as_ptr(), sig.len(), mu.as_ptr(), mu.len()) == 1
    }
}

/// Ed25519ph (HashEdDSA, empty context) of `message`: the private key is the 32-byte seed
/// and the 32-byte public key.
pub fn ed25519ph_sign(seed: &[u8; 32], public: &[u8; 32], message: &[u8]) -> Option<[u8; 64]> {
    let mut private = Zeroizing::new([0u8; 64]);
    private[..32].copy_from_slice(seed);
    private[32..].copy_from_slice(public);
    let mut sig = [0u8; 64];
    // SAFETY: fixed-size buffers as the C prototype requires; no context (length 0).
    let ok = unsafe {
        sys::ED25519ph_sign(
            sig.as_mut_ptr(),
            message.as_ptr(),
            message.len(),
            private.as_ptr(),
            std::ptr::null(),
            0,
        )
    };
    (ok == 1).then_some(sig)
}

/// Verifies an Ed25519ph signature (empty context) with the raw 32-byte public key.
pub fn ed25519ph_verify(public: &[u8; 32], message: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = <&[u8; 64]>::try_from(sig) else {
        return false;
    };
    // SAFETY: fixed-size buffers as the C prototype requires; no context (length 0).
    unsafe {
        sys::ED25519ph_verify(
            message.as_ptr(),
            message.len(),
            sig.as_ptr(),
            public.as_ptr(),
            std::ptr::null(),
            0,
        ) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '\n'], "")).unwrap_or_default()
    }

    /// RFC 8032 §7.3, the Ed25519ph test vector ("abc").
    #[test]
    fn ed25519ph_matches_rfc8032_test_vector() {
        let seed: [u8; 32] =
            unhex("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42")
                .try_into()
                .unwrap_or([0; 32]);
        let public: [u8; 32] =
            unhex("ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf")
                .try_into()
                .unwrap_or([0; 32]);
        let want = unhex(
            "98a70222f0b8121aa9d30f813d683f809e462b469c7ff87639499bb94e6dae41\
             31f85042463c2a355a2003d062adf5aaa10b8c61e636062aaad11c2a26083406",
        );
        let sig = ed25519ph_sign(&seed, &public, b"abc");
        assert_eq!(sig.map(|s| s.to_vec()), Some(want.clone()));
        assert!(ed25519ph_verify(&public, b"abc", &want));
        assert!(!ed25519ph_verify(&public, b"abd", &want));
        assert!(!ed25519ph_verify(&public, b"abc", &want[..63]));
    }

    #[test]
    fn der_with_trailing_bytes_is_refused() {
        assert!(parse(b"", true).is_none());
        assert!(parse(&[0x30, 0x00, 0x00], false).is_none());
    }
}
