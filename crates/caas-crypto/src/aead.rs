//! AES-256-GCM envelope: `nonce (12) ‖ ciphertext ‖ tag (16)`, random nonce per seal.
//!
//! Used for key wrapping (EKTs under a domain key, domain keys under the node key, token
//! objects under a crypto-domain key). Random 96-bit nonces are safe here because each
//! wrapping key seals far fewer than 2^32 messages (NIST SP 800-38D §8.3).
use crate::{Error, SecretBytes, SecretKey, random_array};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Bytes added by [`seal`].
pub const OVERHEAD: usize = 12 + 16;

fn key(k: &SecretKey) -> Result<LessSafeKey, Error> {
    let unbound = UnboundKey::new(&AES_256_GCM, k.expose()).map_err(|_| Error::InvalidLength {
        what: "AES-256 key",
        len: 32,
    })?;
    Ok(LessSafeKey::new(unbound))
}

/// Encrypts and authenticates `plaintext` with `aad` bound in.
pub fn seal(k: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let nonce: [u8; 12] = random_array()?;
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key(k)?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[12..],
        )
        .map_err(|_| Error::AuthenticationFailed)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens a [`seal`]ed envelope; fails on any change to it or to `aad`.
pub fn open(k: &SecretKey, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, Error> {
    if sealed.len() < OVERHEAD {
        return Err(Error::InvalidLength {
            what: "sealed envelope",
            len: sealed.len(),
        });
    }
    let (nonce, rest) = sealed.split_at(12);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Error::AuthenticationFailed)?;
    let mut buf = rest.to_vec();
    let len = key(k)?
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| Error::AuthenticationFailed)?
        .len();
    buf.truncate(len);
    Ok(SecretBytes::new(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random_key;

    #[test]
    fn round_trip_and_tamper() -> Result<(), Error> {
        let k = random_key()?;
        let s = seal(&k, b"aad", b"secret")?;
        assert_eq!(open(&k, b"aad", &s)?.expose(), b"secret");
        assert_eq!(open(&k, b"other", &s), Err(Error::AuthenticationFailed));
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 1;
            assert_eq!(open(&k, b"aad", &t), Err(Error::AuthenticationFailed));
        }
        assert!(open(&k, b"aad", &s[..10]).is_err());
        Ok(())
    }
}
