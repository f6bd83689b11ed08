//! Where a volume's data key comes from: a [`DataKeyProvider`] (the tenant's KMS:
//! GenerateDataKey under a tenant key, the wrapped key stored in the header) or a raw
//! 32-byte key file for standalone use.
use crate::Error;
use caas_crypto::SecretKey;

/// A source of data keys, typically the caas key service (GenerateDataKey / Decrypt under
/// a tenant key). The wrapped blob is stored in the volume header; the plaintext key never
/// touches the disk.
pub trait DataKeyProvider: Send + Sync {
    /// Generates a fresh 256-bit data key; returns it and its wrapped (encrypted) form.
    fn generate(&self) -> Result<(SecretKey, Vec<u8>), Error>;
    /// Unwraps a blob previously returned by [`DataKeyProvider::generate`].
    fn unwrap(&self, blob: &[u8]) -> Result<SecretKey, Error>;
}

/// Reads a raw 32-byte key file (exactly 32 bytes; no trailing newline).
pub fn read_key_file(path: &std::path::Path) -> Result<SecretKey, Error> {
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Error::KeyProvider(format!("cannot read key file: {}", e.kind())))?,
    );
    SecretKey::from_slice(&bytes).map_err(|_| {
        Error::KeyProvider(format!(
            "key file must hold exactly 32 raw bytes, found {}",
            bytes.len()
        ))
    })
}
