//! Zeroizing containers for key material: wiped on drop, `[REDACTED]` in `Debug`, no
//! `Serialize`, no `Display`.
use crate::Error;
use zeroize::{Zeroize, Zeroizing};

/// A 256-bit secret key. Zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    /// Wraps raw key bytes (the caller's copy should itself be zeroizing).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }
    /// Copies a 32-byte slice into a key.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| Error::InvalidLength {
            what: "256-bit key",
            len: bytes.len(),
        })?;
        let mut arr = arr;
        let key = Self::from_bytes(arr);
        arr.zeroize();
        Ok(key)
    }
    /// The raw key bytes: hand them only to a primitive.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

/// Variable-length secret bytes (HMAC keys, PKCS#8 private keys, data-key plaintext).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of the bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    /// Copies the bytes.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }
    /// The raw bytes: hand them only to a primitive or to the party entitled to them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.0.len())
    }
}

/// Fills a fresh array from the system CSPRNG.
pub fn random_array<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    aws_lc_rs::rand::fill(&mut out).map_err(|_| Error::Rng)?;
    Ok(out)
}

/// Fresh random bytes (not secret by type: use [`random_key`] for keys).
pub fn random_bytes(n: usize) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut out).map_err(|_| Error::Rng)?;
    Ok(out)
}

/// A fresh random 256-bit key.
pub fn random_key() -> Result<SecretKey, Error> {
    let mut k = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(k.as_mut()).map_err(|_| Error::Rng)?;
    Ok(SecretKey(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_bytes() {
        let k = SecretKey::from_bytes([0x41; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("41") && !s.contains("65") && s.contains("REDACTED"));
        let b = SecretBytes::from_slice(b"canary-secret");
        assert!(!format!("{b:?}").contains("canary"));
    }

    #[test]
    fn random_keys_differ() -> Result<(), Error> {
        assert_ne!(random_key()?, random_key()?);
        Ok(())
    }
}
