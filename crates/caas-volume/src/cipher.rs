//! The per-block AEAD: AES-256-GCM with an explicit 96-bit nonce from the slot and the
//! volume id, block index and slot kind as associated data; plus the key check value and
//! the header tag, which use reserved nonces no block write can produce (block nonces
//! have a counter ≥ 1 in their first eight bytes; the reserved ones have zeroes there).
use crate::Error;
use crate::entry::SlotKind;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use caas_crypto::SecretKey;

/// Domain separation for block associated data.
const BLOCK_AAD_TAG: &[u8; 8] = b"CAASBLK1";
/// Domain separation for the key check value.
const KCV_AAD_TAG: &[u8] = b"caas-volume-kcv-v1";
/// Reserved nonce of the key check value.
const KCV_NONCE: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Reserved nonce of the header tag.
const HEADER_NONCE: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// A volume's data key, ready to seal and open blocks of that volume.
pub struct VolumeCipher {
    key: LessSafeKey,
    volume_id: [u8; 16],
}

impl std::fmt::Debug for VolumeCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeCipher")
            .field("key", &"[REDACTED]")
            .field("volume_id", &self.volume_id)
            .finish()
    }
}

impl VolumeCipher {
    /// Binds a data key to a volume id.
    pub fn new(key: &SecretKey, volume_id: [u8; 16]) -> Result<Self, Error> {
        let unbound = UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| Error::Crypto)?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            volume_id,
        })
    }

    /// The volume id the cipher is bound to.
    pub fn volume_id(&self) -> [u8; 16] {
        self.volume_id
    }

    fn aad(&self, index: u64, kind: SlotKind) -> [u8; 33] {
        let mut aad = [0u8; 33];
        aad[..8].copy_from_slice(BLOCK_AAD_TAG);
        aad[8..24].copy_from_slice(&self.volume_id);
        aad[24..32].copy_from_slice(&index.to_be_bytes());
        aad[32] = kind as u8;
        aad
    }

    /// Encrypts one block in place; returns the tag.
    pub fn seal_block(
        &self,
        index: u64,
        nonce: [u8; 12],
        buf: &mut [u8],
    ) -> Result<[u8; 16], Error> {
        let aad = self.aad(index, SlotKind::Data);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), buf)
            .map_err(|_| Error::Crypto)?;
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `ct` into `out` (same length) if `tag` authenticates it as block `index`.
    pub fn open_block(
        &self,
        index: u64,
        nonce: [u8; 12],
        tag: &[u8; 16],
        ct: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        let aad = self.aad(index, SlotKind::Data);
        self.key
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                ct,
                tag,
                out,
            )
            .map_err(|_| Error::BlockAuth { index })
    }

    /// Decrypts block `index` in place if `tag` authenticates it. On failure `buf` holds
    /// unspecified bytes (never returned to anyone): re-read the ciphertext to retry.
    pub fn open_block_in_place(
        &self,
        index: u64,
        nonce: [u8; 12],
        tag: &[u8; 16],
        buf: &mut [u8],
    ) -> Result<(), Error> {
        let aad = self.aad(index, SlotKind::Data);
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                tag,
                buf,
            )
            .map(|_| ())
            .map_err(|_| Error::BlockAuth { index })
    }

    /// The tag of a "reads as zeroes" slot (a GMAC over the associated data).
    pub fn zero_tag(&self, index: u64, nonce: [u8; 12]) -> Result<[u8; 16], Error> {
        let aad = self.aad(index, SlotKind::Zero);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut [],
            )
            .map_err(|_| Error::Crypto)?;
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Verifies a "reads as zeroes" slot.
    pub fn verify_zero(&self, index: u64, nonce: [u8; 12], tag: &[u8; 16]) -> bool {
        let aad = self.aad(index, SlotKind::Zero);
        self.key
            .open_separate_gather(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &[],
                tag,
                &mut [],
            )
            .is_ok()
    }

    /// The key check value: a GMAC under the data key over a constant and the volume id.
    /// It reveals nothing about the key and tells a wrong key from a tampered header.
    pub fn kcv(&self) -> Result<[u8; 16], Error> {
        let mut aad = Vec::with_capacity(KCV_AAD_TAG.len() + 16);
        aad.extend_from_slice(KCV_AAD_TAG);
        aad.extend_from_slice(&self.volume_id);
        self.gmac(KCV_NONCE, &aad)
    }

    /// The header tag: a GMAC over the immutable part of the header.
    pub fn header_tag(&self, immutable: &[u8]) -> Result<[u8; 16], Error> {
        self.gmac(HEADER_NONCE, immutable)
    }

    fn gmac(&self, nonce: [u8; 12], aad: &[u8]) -> Result<[u8; 16], Error> {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut [],
            )
            .map_err(|_| Error::Crypto)?;
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }
}

/// Builds a block nonce: 64-bit write counter (big-endian) then the 32-bit session salt.
pub fn block_nonce(counter: u64, salt: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_be_bytes());
    n[8..].copy_from_slice(&salt.to_be_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> VolumeCipher {
        VolumeCipher::new(&SecretKey::from_bytes([7u8; 32]), [9u8; 16])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Known answer: Test Case 13 of the GCM specification (McGrew & Viega, "The
    /// Galois/Counter Mode of Operation"): K = 0^256, IV = 0^96, empty P and A,
    /// T = 530f8afbc74536b9a963b4f1c4cb738b.
    #[test]
    fn aes_256_gcm_known_answer() {
        let unbound = UnboundKey::new(&AES_256_GCM, &[0u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let key = LessSafeKey::new(unbound);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::empty(),
                &mut [],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            hex::encode(tag.as_ref()),
            "530f8afbc74536b9a963b4f1c4cb738b"
        );
    }

    #[test]
    fn block_roundtrip_and_binding() {
        let c = cipher();
        let plain = [0x5au8; 4096];
        let mut buf = plain;
        let nonce = block_nonce(1, 0xdead_beef);
        let tag = c
            .seal_block(3, nonce, &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(buf, plain);
        let mut out = [0u8; 4096];
        assert!(c.open_block(3, nonce, &tag, &buf, &mut out).is_ok());
        assert_eq!(out, plain);
        let mut inplace = buf;
        assert!(c.open_block_in_place(3, nonce, &tag, &mut inplace).is_ok());
        assert_eq!(inplace, plain);
        let mut inplace = buf;
        assert!(c.open_block_in_place(2, nonce, &tag, &mut inplace).is_err());
        // Moved to another index: rejected.
        assert_eq!(
            c.open_block(4, nonce, &tag, &buf, &mut out),
            Err(Error::BlockAuth { index: 4 })
        );
        // Another volume id: rejected.
        let other = VolumeCipher::new(&SecretKey::from_bytes([7u8; 32]), [8u8; 16])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(other.open_block(3, nonce, &tag, &buf, &mut out).is_err());
        // Flipped ciphertext bit: rejected.
        buf[100] ^= 1;
        assert!(c.open_block(3, nonce, &tag, &buf, &mut out).is_err());
    }

    #[test]
    fn zero_slots_bind_index_and_kind() {
        let c = cipher();
        let nonce = block_nonce(5, 1);
        let tag = c.zero_tag(2, nonce).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.verify_zero(2, nonce, &tag));
        assert!(!c.verify_zero(3, nonce, &tag));
        // A data tag over an empty block is not a zero tag (kind is in the AAD).
        let data_tag = c
            .seal_block(2, nonce, &mut [])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.verify_zero(2, nonce, &data_tag));
    }

    #[test]
    fn kcv_depends_on_key_and_volume() {
        let a = cipher().kcv().unwrap_or_else(|e| panic!("{e}"));
        let b = VolumeCipher::new(&SecretKey::from_bytes([6u8; 32]), [9u8; 16])
            .and_then(|c| c.kcv())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a, b);
        assert_eq!(a, cipher().kcv().unwrap_or_else(|e| panic!("{e}")));
    }

    #[test]
    fn nonce_layout() {
        assert_eq!(
            hex::encode(block_nonce(0x0102, 0xaabbccdd)),
            "0000000000000102aabbccdd"
        );
    }
}
