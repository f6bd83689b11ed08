//! Metadata entries: 128 bytes per data block holding three slots. A slot is a (session,
//! counter, kind, tag) record; the slot that comes last in write order and authenticates
//! the stored block is its content. [`choose_target`] picks the slot a new write may
//! overwrite without destroying the current or the last flushed version.
//!
//! Version 2 slot (40 bytes; slots at 0, 40, 80; bytes 120..128 reserved, zero):
//! kind (1) ‖ session salt (11) ‖ epoch (4) ‖ counter (8) ‖ GCM tag (16).
//! Version 1 slot (32 bytes; slots at 0, 32, 64; bytes 96..128 reserved, zero):
//! nonce = counter (8) ‖ session salt (4) ‖ kind (1) ‖ reserved (3) ‖ GCM tag (16).
use crate::cipher::SessionId;
use crate::{ENTRY_SIZE, SLOTS, Version};

/// What a slot says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotKind {
    /// Unused slot (all bytes zero).
    Empty = 0,
    /// The data area holds the ciphertext sealed with this slot's key, nonce and tag.
    Data = 1,
    /// The block reads as zeroes; the tag is a GMAC over the block's associated data.
    Zero = 2,
}

/// One slot of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Slot kind.
    pub kind: SlotKind,
    /// The session that wrote it: its key is derived from this (v2). In v1 the epoch is 0
    /// and the first four salt bytes are the nonce's 32-bit session salt.
    pub session: SessionId,
    /// Write counter within the session (v2) or within the volume (v1); ≥ 1 when used.
    pub counter: u64,
    /// GCM tag.
    pub tag: [u8; 16],
}

impl Slot {
    /// The empty slot.
    pub const EMPTY: Slot = Slot {
        kind: SlotKind::Empty,
        session: SessionId {
            epoch: 0,
            salt: [0; 11],
        },
        counter: 0,
        tag: [0; 16],
    };

    /// The write order of used slots: (epoch, counter). Epochs grow with every writable
    /// open and counters within a session, so the larger key is the later write.
    pub fn order(&self) -> (u32, u64) {
        (self.session.epoch, self.counter)
    }

    /// The 96-bit GCM nonce: v2 `epoch ‖ counter` (under the session key), v1
    /// `counter ‖ salt32` (under the data key).
    pub fn nonce(&self, v: Version) -> [u8; 12] {
        let mut n = [0u8; 12];
        match v {
            Version::V2 => {
                n[..4].copy_from_slice(&self.session.epoch.to_be_bytes());
                n[4..].copy_from_slice(&self.counter.to_be_bytes());
            }
            Version::V1 => {
                n[..8].copy_from_slice(&self.counter.to_be_bytes());
                n[8..].copy_from_slice(&self.session.salt[..4]);
            }
        }
        n
    }

    /// Decodes a slot of `b` (exactly `v.slot_size()` bytes); `None` for a malformed one
    /// (wrong length, unknown kind, non-zero reserved bytes, an empty slot with content, or
    /// a used slot with counter 0 or, in v2, epoch 0). A malformed slot never
    /// authenticates anything.
    pub fn decode(b: &[u8], v: Version) -> Option<Slot> {
        if b.len() != v.slot_size() {
            return None;
        }
        let mut tag = [0u8; 16];
        let mut salt = [0u8; 11];
        let (kind, epoch, counter) = match v {
            Version::V2 => {
                salt.copy_from_slice(&b[1..12]);
                tag.copy_from_slice(&b[24..40]);
                (b[0], be32(&b[12..16]), be64(&b[16..24]))
            }
            Version::V1 => {
                if b[13..16] != [0, 0, 0] {
                    return None;
                }
                salt[..4].copy_from_slice(&b[8..12]);
                tag.copy_from_slice(&b[16..32]);
                (b[12], 0, be64(&b[..8]))
            }
        };
        let kind = match kind {
            0 => SlotKind::Empty,
            1 => SlotKind::Data,
            2 => SlotKind::Zero,
            _ => return None,
        };
        let slot = Slot {
            kind,
            session: SessionId { epoch, salt },
            counter,
            tag,
        };
        match kind {
            SlotKind::Empty if slot != Slot::EMPTY => None,
            SlotKind::Data | SlotKind::Zero if counter == 0 || (v == Version::V2 && epoch == 0) => {
                None
            }
            _ => Some(slot),
        }
    }

    /// Encodes the slot into `out` (exactly `v.slot_size()` bytes).
    pub fn encode_into(&self, v: Version, out: &mut [u8]) {
        out.fill(0);
        match v {
            Version::V2 => {
                out[0] = self.kind as u8;
                out[1..12].copy_from_slice(&self.session.salt);
                out[12..16].copy_from_slice(&self.session.epoch.to_be_bytes());
                out[16..24].copy_from_slice(&self.counter.to_be_bytes());
                out[24..40].copy_from_slice(&self.tag);
            }
            Version::V1 => {
                out[..8].copy_from_slice(&self.counter.to_be_bytes());
                out[8..12].copy_from_slice(&self.session.salt[..4]);
                out[12] = self.kind as u8;
                out[16..32].copy_from_slice(&self.tag);
            }
        }
    }

    /// Encodes the slot (`v.slot_size()` bytes).
    pub fn encode(&self, v: Version) -> Vec<u8> {
        let mut b = vec![0u8; v.slot_size()];
        self.encode_into(v, &mut b);
        b
    }
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A decoded entry: `None` marks a malformed slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The three slots.
    pub slots: [Option<Slot>; SLOTS],
    /// True when the reserved bytes are zero (otherwise the entry authenticates nothing).
    pub reserved_ok: bool,
}

impl Entry {
    /// Decodes an entry.
    pub fn decode(b: &[u8; ENTRY_SIZE], v: Version) -> Entry {
        let n = v.slot_size();
        let mut slots = [None; SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            *s = Slot::decode(&b[i * n..(i + 1) * n], v);
        }
        let reserved_ok = b[SLOTS * n..].iter().all(|&x| x == 0);
        Entry { slots, reserved_ok }
    }

    /// Decodes the entry at the start of `b` (which must hold at least 128 bytes).
    pub fn decode_slice(b: &[u8], v: Version) -> Entry {
        let mut raw = [0u8; ENTRY_SIZE];
        let n = b.len().min(ENTRY_SIZE);
        raw[..n].copy_from_slice(&b[..n]);
        if n < ENTRY_SIZE {
            raw[ENTRY_SIZE - 1] = 1; // short input: mark reserved bytes as bad
        }
        Entry::decode(&raw, v)
    }

    /// Slot indices of used slots, newest (latest in write order) first. An entry with a
    /// malformed slot or non-zero reserved bytes was damaged and yields no candidate.
    pub fn candidates(&self) -> ([usize; SLOTS], usize) {
        let mut idx = [0usize; SLOTS];
        let mut n = 0;
        if !self.reserved_ok || self.slots.iter().any(Option::is_none) {
            return (idx, 0);
        }
        for (i, s) in self.slots.iter().enumerate() {
            if matches!(s, Some(s) if s.kind != SlotKind::Empty) {
                idx[n] = i;
                n += 1;
            }
        }
        let order = |i: usize| self.slots[i].map_or((0, 0), |s| s.order());
        idx[..n].sort_unstable_by_key(|&i| std::cmp::Reverse(order(i)));
        (idx, n)
    }

    /// The newest used slot, if any.
    pub fn newest(&self) -> Option<usize> {
        let (idx, n) = self.candidates();
        (n > 0).then_some(idx[0])
    }
}

/// Picks the slot a new write of a block overwrites: neither `current` (the slot that
/// authenticates what is on disk now: a crash between the metadata and the data write
/// must leave it usable) nor `committed` (the slot of the last flushed content: writes
/// since then may be lost on power failure). Among the remaining slots, the oldest.
pub fn choose_target(entry: &Entry, current: Option<usize>, committed: Option<usize>) -> usize {
    let order = |i: usize| {
        entry.slots[i].map_or((0, 0), |s| {
            if s.kind == SlotKind::Empty {
                (0, 0)
            } else {
                s.order()
            }
        })
    };
    let mut best = None::<usize>;
    for i in 0..SLOTS {
        if Some(i) == current || Some(i) == committed {
            continue;
        }
        best = match best {
            Some(b) if order(b) <= order(i) => Some(b),
            _ => Some(i),
        };
    }
    // With three slots and at most two excluded, one always remains.
    best.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(epoch: u32, counter: u64, kind: SlotKind) -> Slot {
        Slot {
            kind,
            session: SessionId {
                epoch,
                salt: [7; 11],
            },
            counter,
            tag: [counter as u8; 16],
        }
    }

    fn entry(slots: [Slot; 3]) -> Entry {
        let v = Version::V2;
        let mut raw = [0u8; ENTRY_SIZE];
        for (i, s) in slots.iter().enumerate() {
            s.encode_into(v, &mut raw[v.slot_offset(i)..v.slot_offset(i + 1)]);
        }
        Entry::decode(&raw, v)
    }

    #[test]
    fn slot_roundtrip_and_known_layout() {
        let s = slot(3, 0x0102, SlotKind::Data);
        let b = s.encode(Version::V2);
        assert_eq!(b.len(), 40);
        assert_eq!(&b[..1], &[1]);
        assert_eq!(&b[1..12], &[7; 11]);
        assert_eq!(&b[12..24], &[0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(Slot::decode(&b, Version::V2), Some(s));
        assert_eq!(s.nonce(Version::V2), [0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(Slot::decode(&[0u8; 40], Version::V2), Some(Slot::EMPTY));
        // Version 1: counter ‖ salt32 ‖ kind ‖ 000 ‖ tag.
        let mut v1 = [0u8; 32];
        v1[..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 7]);
        v1[12] = 1;
        let s1 = Slot::decode(&v1, Version::V1).unwrap_or_else(|| panic!("v1 slot"));
        assert_eq!((s1.counter, s1.session.epoch), (0x0102, 0));
        assert_eq!(s1.nonce(Version::V1), [0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 7]);
        assert_eq!(&s1.encode(Version::V1)[..], &v1[..]);
    }

    #[test]
    fn malformed_slots_are_rejected() {
        let v = Version::V2;
        let mut b = slot(1, 1, SlotKind::Data).encode(v);
        b[0] = 9;
        assert_eq!(Slot::decode(&b, v), None);
        let mut b = [0u8; 40];
        b[30] = 1; // empty kind with a tag
        assert_eq!(Slot::decode(&b, v), None);
        let b = slot(1, 0, SlotKind::Zero).encode(v); // counter 0 is reserved
        assert_eq!(Slot::decode(&b, v), None);
        let b = slot(0, 5, SlotKind::Data).encode(v); // epoch 0 is reserved in v2
        assert_eq!(Slot::decode(&b, v), None);
        assert_eq!(Slot::decode(&[0u8; 32], v), None); // wrong length
        let mut b = [0u8; 32];
        b[7] = 1;
        b[12] = 1;
        b[14] = 1; // v1 reserved byte
        assert_eq!(Slot::decode(&b, Version::V1), None);
    }

    #[test]
    fn candidates_newest_first() {
        let e = entry([
            slot(2, 5, SlotKind::Data),
            slot(3, 1, SlotKind::Zero),
            Slot::EMPTY,
        ]);
        let (idx, n) = e.candidates();
        // Epoch first: (3, 1) is newer than (2, 5).
        assert_eq!(&idx[..n], &[1, 0]);
        assert_eq!(e.newest(), Some(1));
        let v = Version::V2;
        let mut raw = [0u8; ENTRY_SIZE];
        slot(1, 5, SlotKind::Data).encode_into(v, &mut raw[..40]);
        assert_eq!(Entry::decode(&raw, v).candidates().1, 1);
        raw[127] = 1;
        assert_eq!(Entry::decode(&raw, v).candidates().1, 0);
        raw[127] = 0;
        raw[100] = 1; // a damaged empty slot poisons the entry
        assert_eq!(Entry::decode(&raw, v).candidates().1, 0);
    }

    #[test]
    fn target_never_current_or_committed() {
        let e = entry([
            slot(1, 5, SlotKind::Data),
            slot(1, 9, SlotKind::Data),
            slot(1, 7, SlotKind::Data),
        ]);
        // check(current, committed) -> target
        let cases = [
            (Some(1), Some(1), 0),
            (Some(1), Some(0), 2),
            (Some(1), Some(2), 0),
            (Some(2), Some(0), 1),
            (None, None, 0),
        ];
        for (cur, com, expect) in cases {
            assert_eq!(choose_target(&e, cur, com), expect, "{cur:?} {com:?}");
        }
        let fresh = entry([slot(1, 1, SlotKind::Zero), Slot::EMPTY, Slot::EMPTY]);
        assert_eq!(choose_target(&fresh, Some(0), Some(0)), 1);
    }
}
