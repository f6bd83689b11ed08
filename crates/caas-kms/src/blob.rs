//! The self-describing ciphertext blob of symmetric Encrypt / GenerateDataKey.
//!
//! ```text
//! 0      1 byte   format version (0x01)
//! 1      1 byte   key id length n (1..=64)
//! 2      n bytes  key id (ASCII)
//! 2+n    4 bytes  HBK version (u32 BE)
//! 6+n   32 bytes  KDF nonce: the per-request key is KDF(HBK, "caas/kms/encrypt", nonce)
//! 38+n  12 bytes  AES-GCM IV
//! 50+n   ...      AES-256-GCM ciphertext ‖ 16-byte tag
//! ```
//! The AAD is the header (bytes 0..50+n) followed by the canonical encryption context, so
//! that neither can be altered. Clients treat the blob as opaque.
use crate::error::{KmsError, KmsResult};

/// Current format version.
pub const VERSION: u8 = 1;
/// Smallest possible blob (1-byte key id, empty plaintext).
pub const MIN_LEN: usize = 2 + 1 + 4 + 32 + 12 + 16;

/// A parsed blob (borrowing the input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob<'a> {
    /// Key id.
    pub key_id: &'a str,
    /// HBK version.
    pub hbk_version: u32,
    /// KDF nonce.
    pub nonce: &'a [u8; 32],
    /// GCM IV.
    pub iv: &'a [u8; 12],
    /// The header (AAD prefix).
    pub header: &'a [u8],
    /// Ciphertext ‖ tag.
    pub sealed: &'a [u8],
}

fn invalid() -> KmsError {
    KmsError::InvalidCiphertext("The ciphertext blob is malformed".into())
}

/// Parses a blob; never panics on any input.
pub fn parse(data: &[u8]) -> KmsResult<Blob<'_>> {
    if data.len() < MIN_LEN || data[0] != VERSION {
        return Err(invalid());
    }
    let n = usize::from(data[1]);
    if n == 0 || n > 64 {
        return Err(invalid());
    }
    let hdr_len = 2 + n + 4 + 32 + 12;
    if data.len() < hdr_len + 16 {
        return Err(invalid());
    }
    let key_id = std::str::from_utf8(&data[2..2 + n]).map_err(|_| invalid())?;
    let v = &data[2 + n..6 + n];
    let hbk_version = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
    let nonce: &[u8; 32] = data[6 + n..38 + n].try_into().map_err(|_| invalid())?;
    let iv: &[u8; 12] = data[38 + n..50 + n].try_into().map_err(|_| invalid())?;
    Ok(Blob {
        key_id,
        hbk_version,
        nonce,
        iv,
        header: &data[..hdr_len],
        sealed: &data[hdr_len..],
    })
}

/// Writes the header of a new blob.
pub fn header(
    key_id: &str,
    hbk_version: u32,
    nonce: &[u8; 32],
    iv: &[u8; 12],
) -> KmsResult<Vec<u8>> {
    let n = u8::try_from(key_id.len())
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| KmsError::internal_crypto("key id length"))?;
    let mut out = Vec::with_capacity(50 + key_id.len() + 64);
    out.push(VERSION);
    out.push(n);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&hbk_version.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(iv);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trip_and_garbage() -> KmsResult<()> {
        let mut b = header(
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            7,
            &[1; 32],
            &[2; 12],
        )?;
        b.extend_from_slice(&[9; 20]);
        let p = parse(&b)?;
        assert_eq!(
            (p.key_id, p.hbk_version, p.sealed.len()),
            ("1234abcd-12ab-34cd-56ef-1234567890ab", 7, 20)
        );
        for len in 0..b.len() - 4 {
            let _ = parse(&b[..len]);
        }
        assert!(parse(&[]).is_err());
        assert!(parse(&[2; 100]).is_err());
        let mut bad = b.clone();
        bad[1] = 200;
        assert!(parse(&bad).is_err());
        Ok(())
    }
}
