//! Where things are in a volume of a given size: header, metadata area, data area.
use crate::{BLOCK_SIZE, ENTRY_SIZE, Error, HEADER_SIZE};

/// Largest supported volume (16 TiB) — keeps every offset computation far from overflow.
pub const MAX_VOLUME_SIZE: u64 = 16 << 40;

/// The byte layout of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Virtual (plaintext) size in bytes, a multiple of [`BLOCK_SIZE`].
    pub size: u64,
    /// Number of data blocks.
    pub blocks: u64,
    /// Offset of the metadata area (right after the header).
    pub meta_offset: u64,
    /// Offset of the data area (metadata area rounded up to 4 KiB).
    pub data_offset: u64,
}

impl Layout {
    /// Computes the layout of a volume of `size` bytes.
    pub fn new(size: u64) -> Result<Self, Error> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(Error::InvalidHeader(
                "size must be a non-zero multiple of 4096",
            ));
        }
        if size > MAX_VOLUME_SIZE {
            return Err(Error::InvalidHeader("size exceeds 16 TiB"));
        }
        let blocks = size / BLOCK_SIZE as u64;
        let meta_offset = HEADER_SIZE as u64;
        let meta_len = (blocks * ENTRY_SIZE as u64).div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
        Ok(Self {
            size,
            blocks,
            meta_offset,
            data_offset: meta_offset + meta_len,
        })
    }
    /// Total bytes of the ciphertext store.
    pub fn store_len(&self) -> u64 {
        self.data_offset + self.size
    }
    /// Offset of block `index`'s metadata entry.
    pub fn entry_offset(&self, index: u64) -> u64 {
        self.meta_offset + index * ENTRY_SIZE as u64
    }
    /// Offset of block `index`'s ciphertext.
    pub fn block_offset(&self, index: u64) -> u64 {
        self.data_offset + index * BLOCK_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_known_answers() {
        // 1 GiB: 262144 blocks, 32 MiB of metadata after the 4 KiB header.
        let l = Layout::new(1 << 30).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.blocks, 262_144);
        assert_eq!(l.data_offset, 4096 + (32 << 20));
        assert_eq!(l.entry_offset(1), 4096 + 128);
        assert_eq!(l.block_offset(2), 4096 + (32 << 20) + 8192);
        // 4 KiB: one entry padded to a 4 KiB metadata block.
        let l = Layout::new(4096).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.blocks, l.data_offset, l.store_len()), (1, 8192, 12288));
        assert!(Layout::new(0).is_err());
        assert!(Layout::new(4095).is_err());
        assert!(Layout::new(MAX_VOLUME_SIZE + 4096).is_err());
    }
}
