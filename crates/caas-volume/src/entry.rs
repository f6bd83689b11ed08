//! Metadata entries: 128 bytes per data block, three 32-byte slots plus 32 reserved bytes
//! (kept zero; room for a per-block version counter against rollback). A slot is a
//! (nonce, kind, tag) triple; the slot with the highest write counter that authenticates
//! the stored block is its content. [`choose_target`] picks the slot a new write may
//! overwrite without destroying the current or the last flushed version.
use crate::{ENTRY_SIZE, SLOT_SIZE, SLOTS};

/// What a slot says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SlotKind {
    /// Unused slot (all 32 bytes zero).
    Empty = 0,
    /// The data area holds the ciphertext sealed with this slot's nonce and tag.
    Data = 1,
    /// The block reads as zeroes; the tag is a GMAC over the block's associated data.
    Zero = 2,
}

/// One slot of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The 96-bit nonce: 64-bit write counter, then the 32-bit session salt.
    pub nonce: [u8; 12],
    /// Slot kind.
    pub kind: SlotKind,
    /// GCM tag.
    pub tag: [u8; 16],
}

impl Slot {
    /// The empty slot.
    pub const EMPTY: Slot = Slot {
        nonce: [0; 12],
        kind: SlotKind::Empty,
        tag: [0; 16],
    };

    /// The write counter (first eight nonce bytes).
    pub fn counter(&self) -> u64 {
        let mut c = [0u8; 8];
        c.copy_from_slice(&self.nonce[..8]);
        u64::from_be_bytes(c)
    }

    /// Decodes a slot; `None` for a malformed one (unknown kind, non-zero reserved bytes,
    /// an empty slot with content, or a used slot with counter 0). A malformed slot never
    /// authenticates anything.
    pub fn decode(b: &[u8; SLOT_SIZE]) -> Option<Slot> {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&b[..12]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&b[16..]);
        if b[13..16] != [0, 0, 0] {
            return None;
        }
        let kind = match b[12] {
            0 => SlotKind::Empty,
            1 => SlotKind::Data,
            2 => SlotKind::Zero,
            _ => return None,
        };
        let slot = Slot { nonce, kind, tag };
        match kind {
            SlotKind::Empty if slot != Slot::EMPTY => None,
            SlotKind::Data | SlotKind::Zero if slot.counter() == 0 => None,
            _ => Some(slot),
        }
    }

    /// Encodes the slot.
    pub fn encode(&self) -> [u8; SLOT_SIZE] {
        let mut b = [0u8; SLOT_SIZE];
        b[..12].copy_from_slice(&self.nonce);
        b[12] = self.kind as u8;
        b[16..].copy_from_slice(&self.tag);
        b
    }
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
    pub fn decode(b: &[u8; ENTRY_SIZE]) -> Entry {
        let mut slots = [None; SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let mut raw = [0u8; SLOT_SIZE];
            raw.copy_from_slice(&b[i * SLOT_SIZE..(i + 1) * SLOT_SIZE]);
            *s = Slot::decode(&raw);
        }
        let reserved_ok = b[SLOTS * SLOT_SIZE..].iter().all(|&x| x == 0);
        Entry { slots, reserved_ok }
    }

    /// Decodes the entry at the start of `b` (which must hold at least 128 bytes).
    pub fn decode_slice(b: &[u8]) -> Entry {
        let mut raw = [0u8; ENTRY_SIZE];
        let n = b.len().min(ENTRY_SIZE);
        raw[..n].copy_from_slice(&b[..n]);
        if n < ENTRY_SIZE {
            raw[ENTRY_SIZE - 1] = 1; // short input: mark reserved bytes as bad
        }
        Entry::decode(&raw)
    }

    /// Slot indices of used slots, newest (highest counter) first. An entry with a
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
        let counter = |i: usize| self.slots[i].map_or(0, |s| s.counter());
        idx[..n].sort_unstable_by_key(|&i| std::cmp::Reverse(counter(i)));
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
    let counter = |i: usize| {
        entry.slots[i].map_or(0, |s| {
            if s.kind == SlotKind::Empty {
                0
            } else {
                s.counter()
            }
        })
    };
    let mut best = None::<usize>;
    for i in 0..SLOTS {
        if Some(i) == current || Some(i) == committed {
            continue;
        }
        best = match best {
            Some(b) if counter(b) <= counter(i) => Some(b),
            _ => Some(i),
        };
    }
    // With three slots and at most two excluded, one always remains.
    best.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(counter: u64, kind: SlotKind) -> Slot {
        Slot {
            nonce: crate::cipher::block_nonce(counter, 7),
            kind,
            tag: [counter as u8; 16],
        }
    }

    fn entry(slots: [Slot; 3]) -> Entry {
        let mut raw = [0u8; ENTRY_SIZE];
        for (i, s) in slots.iter().enumerate() {
            raw[i * SLOT_SIZE..(i + 1) * SLOT_SIZE].copy_from_slice(&s.encode());
        }
        Entry::decode(&raw)
    }

    #[test]
    fn slot_roundtrip_and_known_layout() {
        let s = slot(0x0102, SlotKind::Data);
        let b = s.encode();
        assert_eq!(&b[..13], &[0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 7, 1]);
        assert_eq!(Slot::decode(&b), Some(s));
        assert_eq!(Slot::decode(&[0u8; 32]), Some(Slot::EMPTY));
    }

    #[test]
    fn malformed_slots_are_rejected() {
        let mut b = slot(1, SlotKind::Data).encode();
        b[12] = 9;
        assert_eq!(Slot::decode(&b), None);
        let mut b = slot(1, SlotKind::Data).encode();
        b[14] = 1;
        assert_eq!(Slot::decode(&b), None);
        let mut b = [0u8; 32];
        b[20] = 1; // empty kind with a tag
        assert_eq!(Slot::decode(&b), None);
        let b = slot(0, SlotKind::Zero).encode(); // counter 0 is reserved
        assert_eq!(Slot::decode(&b), None);
    }

    #[test]
    fn candidates_newest_first() {
        let e = entry([
            slot(5, SlotKind::Data),
            slot(9, SlotKind::Zero),
            Slot::EMPTY,
        ]);
        let (idx, n) = e.candidates();
        assert_eq!(&idx[..n], &[1, 0]);
        assert_eq!(e.newest(), Some(1));
        let mut raw = [0u8; ENTRY_SIZE];
        raw[..32].copy_from_slice(&slot(5, SlotKind::Data).encode());
        assert_eq!(Entry::decode(&raw).candidates().1, 1);
        raw[127] = 1;
        assert_eq!(Entry::decode(&raw).candidates().1, 0);
        raw[127] = 0;
        raw[80] = 1; // a damaged empty slot poisons the entry
        assert_eq!(Entry::decode(&raw).candidates().1, 0);
    }

    #[test]
    fn target_never_current_or_committed() {
        let e = entry([
            slot(5, SlotKind::Data),
            slot(9, SlotKind::Data),
            slot(7, SlotKind::Data),
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
        let fresh = entry([slot(1, SlotKind::Zero), Slot::EMPTY, Slot::EMPTY]);
        assert_eq!(choose_target(&fresh, Some(0), Some(0)), 1);
    }
}
