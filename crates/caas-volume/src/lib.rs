//! The caas encrypted volume format (specified in `docs/volume-format.md`): a 4 KiB
//! header (magic, version, volume id and salt, cipher suite, key-wrapping info, DBSP fields
//! as opaque bytes, key check value, header tag, authenticated state sector), a metadata
//! area with one 128-byte entry per 4 KiB data block, and the data area.
//!
//! Version 2 (written by this crate) never uses the data key K directly: every key is
//! derived from K with the SP 800-108 KDF of `caas-crypto`, bound to the volume's random
//! 256-bit salt. The key check value, the header tag and the state-sector MAC come from
//! per-volume keys (HMAC, no nonce); data blocks are sealed with AES-256-GCM under a
//! per-*session* key — derived from the salt, the session's epoch and an 88-bit random
//! session salt chosen at each writable open — with a per-session counter as the nonce, so
//! no (key, nonce) pair repeats across volumes or sessions, even when the storage host
//! rolls the volume back. The volume id, block index and slot kind are the associated data
//! (blocks cannot be moved, swapped or carried to another volume). Each entry has three
//! slots (session, counter, kind, tag) so that a write never overwrites the tag of the
//! block's current content nor of its last flushed content: that is what makes the format
//! crash consistent (see [`entry::choose_target`]).
//!
//! Version 1 volumes (K used directly, fixed nonces for the key check value and header
//! tag, an unauthenticated state sector) are still parsed and readable, never written;
//! `caas volume upgrade` re-encrypts them as version 2.
//!
//! This crate is pure: it encodes, decodes, seals and opens buffers; the IO engine lives in
//! `caas-sdp`.
pub mod cipher;
pub mod entry;
mod error;
pub mod header;
pub mod keys;
pub mod layout;

pub use cipher::{Session, SessionId, VolumeCipher};
pub use entry::{Entry, Slot, SlotKind};
pub use error::Error;
pub use header::{Dbsp, Header, KeySource, State};
pub use keys::DataKeyProvider;
pub use layout::Layout;

/// Plaintext bytes per data block.
pub const BLOCK_SIZE: usize = 4096;
/// Bytes of the header (block 0 of the volume).
pub const HEADER_SIZE: usize = 4096;
/// Bytes of one metadata entry.
pub const ENTRY_SIZE: usize = 128;
/// Metadata slots per entry.
pub const SLOTS: usize = 3;

/// The on-store format version of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Version 1: read-only support (upgrade with `caas volume upgrade`).
    V1,
    /// Version 2: derived per-volume and per-session keys, authenticated state sector.
    V2,
}

impl Version {
    /// The version number in the header.
    pub const fn number(self) -> u16 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }
    /// Bytes of one metadata slot (32 in v1, 40 in v2).
    pub const fn slot_size(self) -> usize {
        match self {
            Version::V1 => 32,
            Version::V2 => 40,
        }
    }
    /// Offset of slot `k` within an entry.
    pub const fn slot_offset(self, k: usize) -> usize {
        k * self.slot_size()
    }
}
