//! The caas encrypted volume format (specified in `docs/volume-format.md`): a 4 KiB
//! header (magic, version, volume id, cipher suite, key-wrapping info, DBSP fields as
//! opaque bytes, key check value, header tag, mutable state sector), a metadata area with
//! one 128-byte entry per 4 KiB data block, and the data area.
//!
//! Every data block is sealed with AES-256-GCM under the volume's data key, with a
//! 96-bit nonce made of a persistent 64-bit write counter and a 32-bit per-session salt,
//! and with the volume id, the block index and the slot kind as associated data (so
//! blocks cannot be moved, swapped or carried to another volume). Each entry has three
//! slots (nonce, kind, tag) so that a write never overwrites the tag of the block's
//! current content nor of its last flushed content: that is what makes the format crash
//! consistent (see [`entry::choose_target`]).
//!
//! This crate is pure: it encodes, decodes, seals and opens buffers; the IO engine lives in
//! `caas-sdp`.
pub mod cipher;
pub mod entry;
mod error;
pub mod header;
pub mod keys;
pub mod layout;

pub use cipher::VolumeCipher;
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
/// Bytes of one slot.
pub const SLOT_SIZE: usize = 32;
