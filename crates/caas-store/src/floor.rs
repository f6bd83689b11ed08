//! Revision floors: a running store remembers, for every object row it has written or read,
//! the newest revision it knows of (and, for a row it deleted, the revision it deleted), and
//! refuses a row read back *below* that: an older version of a row put back with the MAC it
//! had then (a key re-enabled by restoring its pre-`DisableKey` row, an older policy), or a
//! deleted row put back (a revoked grant or access key). The row MAC alone cannot tell: it
//! proves that the key service wrote those bytes under that name at that revision, not that
//! the revision is current.
//!
//! Rules, for a row read with revision `r` (its MAC already checked):
//! - unknown row, or `r` at or above the known live revision, or above the deleted revision:
//!   accepted, and the floor moves up to `r` (a newer version can only have been written
//!   by a holder of the record key: another node of the same database);
//! - `r` below the known live revision: refused as rolled back;
//! - `r` at or below the revision this store deleted: refused as a deleted row put back.
//!
//! Races with this store's own commits: a floor moves only once a commit is durable and
//! visible (or a read saw the row), so a row read is judged against the floor as it was
//! *before* the read began ([`Floors::peek`]): a commit that moved it meanwhile is no fault
//! of the row. A list is judged against the floors as they are after it was read; a row
//! found below is read again on its own and judged that way.
//!
//! Revisions of a deleted row continue when it is created again (the backends keep the
//! deleted revision in `tombstones`; the writer also continues above its own floor of the
//! row, so a row or tombstone deleted by hand does not lock the name out), so a
//! legitimately re-created row is always above its floor, on every node.
//!
//! A row missing on read is not refused: in a database shared by several nodes another node
//! may have deleted it (deleting a row denies service, which a database administrator can
//! always do; it never widens access). A restarted node gets its floors back from
//! [`Floors::export`]/[`Floors::import`] (the key service keeps them beside its node key).
//! What this does not cover (ARCHITECTURE.md, Trust boundaries): a rollback of a row this
//! node has not yet seen at its newer revision, and floors moved after the last export.
//!
//! The map's lock is never held across anything that can panic; should it be poisoned
//! anyway, its content is still whole (each change is one insert), so it is used as is
//! rather than failing open (a missing floor accepts any revision).
//!
//! Memory: one entry (16-byte name digest and a revision) per distinct row touched, never
//! evicted (evicting would reopen the window for that row).

use crate::Object;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A row's name (kind, account, id), digested: an unambiguous encoding, SHA-256, first 16
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RowName([u8; 16]);

impl RowName {
    pub fn of(kind: &str, account: &str, id: &str) -> RowName {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [kind, account, id] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
        let d = ctx.finish();
        let mut name = [0u8; 16];
        name.copy_from_slice(&d.as_ref()[..16]);
        RowName(name)
    }
}

/// The newest state of a row this store knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// The row exists at this revision or a newer one.
    Live(i64),
    /// This store deleted the row at this revision.
    Deleted(i64),
}

impl Known {
    /// The revision named.
    pub fn rev(self) -> i64 {
        match self {
            Known::Live(r) | Known::Deleted(r) => r,
        }
    }
}

/// Why a row read back is refused although its MAC is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stale {
    /// The row is older than a revision this store wrote or read.
    RolledBack { known: i64 },
    /// This store deleted the row at revision `deleted`; a version up to it was put back.
    PutBack { deleted: i64 },
}

impl Stale {
    /// The audit record's reason.
    pub fn reason(self) -> String {
        match self {
            Stale::RolledBack { known } => {
                format!("rolled back: older than revision {known}, already seen")
            }
            Stale::PutBack { deleted } => {
                format!("deleted at revision {deleted} and put back")
            }
        }
    }
}

/// What a committed write did to a row: the backends report it per write, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Written at this revision.
    Put(i64),
    /// Deleted; it was at this revision.
    Deleted(i64),
    /// A delete of a row that was absent: nothing changed.
    Absent,
}

/// The floors of one store (shared by its clones), and a generation that moves whenever
/// one of them does (so a keeper of exported floors writes only when they moved).
#[derive(Debug, Default)]
pub(crate) struct Floors {
    map: Mutex<HashMap<RowName, Known>>,
    generation: AtomicU64,
}

/// The first bytes of an export ([`Floors::export`]).
const EXPORT_MAGIC: &[u8] = b"caas/store/row-floors/v1";
/// Bytes per exported floor: the name, a tag (0 live, 1 deleted), the revision (i64 BE).
const EXPORT_ENTRY: usize = 16 + 1 + 8;

impl Floors {
    fn map(&self) -> MutexGuard<'_, HashMap<RowName, Known>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The floor of a row now. Taken before a read, it names a state that was durable and
    /// visible before the read began, so the read must return that state or a newer one.
    pub fn peek(&self, name: RowName) -> Option<Known> {
        self.map().get(&name).copied()
    }

    /// Judges a row read against `before` (its [`Floors::peek`] from before the read; a
    /// later commit of this store may have moved the floor since, which is no fault of
    /// the row) and moves the floor up when the row is newer than the floor is now.
    pub fn judge(&self, name: RowName, before: Option<Known>, o: &Object) -> Result<(), Stale> {
        match before {
            Some(Known::Live(known)) if o.rev < known => return Err(Stale::RolledBack { known }),
            Some(Known::Deleted(deleted)) if o.rev <= deleted => {
                return Err(Stale::PutBack { deleted });
            }
            _ => {}
        }
        self.wrote(name, Applied::Put(o.rev));
        Ok(())
    }

    /// Judges a row against the floor as it is now: conservative for a row read a while
    /// ago (a commit since may have moved the floor); a refusal here is confirmed by a
    /// fresh read judged with [`Floors::peek`] before it.
    pub fn check(&self, o: &Object) -> Result<(), Stale> {
        let name = RowName::of(&o.kind, &o.account, &o.id);
        self.judge(name, self.peek(name), o)
    }

    /// Records a durable write of this store. A write never lowers a floor: another node
    /// may have moved the row further since (its revision then is above this one).
    pub fn wrote(&self, name: RowName, applied: Applied) {
        let next = match applied {
            Applied::Put(rev) => Known::Live(rev),
            Applied::Deleted(rev) => Known::Deleted(rev),
            Applied::Absent => return,
        };
        let rank = |k: Known| match k {
            // A deletion at revision r comes after the row's life at r.
            Known::Live(r) => (r, 0),
            Known::Deleted(r) => (r, 1),
        };
        let mut map = self.map();
        match map.get(&name) {
            Some(k) if rank(*k) >= rank(next) => {}
            _ => {
                map.insert(name, next);
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Moves whenever a floor moves.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Every floor, in a stable byte form ([`EXPORT_MAGIC`], then per row, sorted by name:
    /// its 16-byte name, 0 (live) or 1 (deleted), the revision as i64 BE), with the
    /// generation it was taken at.
    pub fn export(&self) -> (u64, Vec<u8>) {
        let map = self.map();
        let generation = self.generation();
        let mut rows: Vec<(&RowName, &Known)> = map.iter().collect();
        rows.sort_unstable_by_key(|(name, _)| name.0);
        let mut out = Vec::with_capacity(EXPORT_MAGIC.len() + rows.len() * EXPORT_ENTRY);
        out.extend_from_slice(EXPORT_MAGIC);
        for (name, known) in rows {
            let (tag, rev) = match *known {
                Known::Live(r) => (0u8, r),
                Known::Deleted(r) => (1u8, r),
            };
            out.extend_from_slice(&name.0);
            out.push(tag);
            out.extend_from_slice(&rev.to_be_bytes());
        }
        (generation, out)
    }

    /// Merges an [`Floors::export`] (never lowering a floor); returns how many rows it named.
    /// Anything else is refused whole, before any floor moves.
    pub fn import(&self, bytes: &[u8]) -> Result<usize, String> {
        let body = bytes
            .strip_prefix(EXPORT_MAGIC)
            .ok_or("it does not start as a row floor export")?;
        if body.len() % EXPORT_ENTRY != 0 {
            return Err("its length is not a whole number of floors".into());
        }
        let mut parsed = Vec::with_capacity(body.len() / EXPORT_ENTRY);
        for e in body.chunks_exact(EXPORT_ENTRY) {
            let mut name = [0u8; 16];
            name.copy_from_slice(&e[..16]);
            let mut rev = [0u8; 8];
            rev.copy_from_slice(&e[17..]);
            let rev = i64::from_be_bytes(rev);
            if rev < 1 {
                return Err(format!("a floor has revision {rev}"));
            }
            let applied = match e[16] {
                0 => Applied::Put(rev),
                1 => Applied::Deleted(rev),
                t => return Err(format!("a floor has tag {t}")),
            };
            parsed.push((RowName(name), applied));
        }
        let n = parsed.len();
        for (name, applied) in parsed {
            self.wrote(name, applied);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(id: &str, rev: i64) -> Object {
        Object {
            kind: "key".into(),
            account: "a".into(),
            id: id.into(),
            rev,
            body: Vec::new(),
        }
    }

    #[test]
    fn names_do_not_collide_across_field_boundaries() {
        assert_ne!(RowName::of("ab", "c", "d"), RowName::of("a", "bc", "d"));
        assert_ne!(RowName::of("a", "b", "cd"), RowName::of("a", "bc", "d"));
    }

    #[test]
    fn a_row_below_its_floor_is_refused_and_newer_rows_move_it() {
        let f = Floors::default();
        assert_eq!(f.check(&obj("k", 2)), Ok(()));
        assert_eq!(f.check(&obj("k", 1)), Err(Stale::RolledBack { known: 2 }));
        assert_eq!(f.check(&obj("k", 3)), Ok(()));
        assert_eq!(f.check(&obj("k", 2)), Err(Stale::RolledBack { known: 3 }));
        // Other rows are not affected.
        assert_eq!(f.check(&obj("j", 1)), Ok(()));
    }

    #[test]
    fn a_deleted_row_put_back_is_refused_and_a_recreated_one_accepted() {
        let f = Floors::default();
        let k = RowName::of("key", "a", "k");
        f.wrote(k, Applied::Put(1));
        f.wrote(k, Applied::Put(2));
        f.wrote(k, Applied::Deleted(2));
        assert_eq!(f.check(&obj("k", 2)), Err(Stale::PutBack { deleted: 2 }));
        assert_eq!(f.check(&obj("k", 1)), Err(Stale::PutBack { deleted: 2 }));
        // Re-created: its revision continues above the deleted one.
        f.wrote(k, Applied::Put(3));
        assert_eq!(f.check(&obj("k", 3)), Ok(()));
        assert_eq!(f.check(&obj("k", 2)), Err(Stale::RolledBack { known: 3 }));
    }

    #[test]
    fn an_export_round_trips_and_bad_exports_are_refused_whole() {
        let f = Floors::default();
        let k = RowName::of("grant", "a", "g");
        assert_eq!(f.check(&obj("k", 4)), Ok(()));
        f.wrote(k, Applied::Put(2));
        f.wrote(k, Applied::Deleted(2));
        let (generation, bytes) = f.export();
        assert_eq!(generation, f.generation());
        assert_eq!(bytes.len(), EXPORT_MAGIC.len() + 2 * EXPORT_ENTRY);
        let g = Floors::default();
        assert_eq!(g.import(&bytes), Ok(2));
        assert_eq!(g.check(&obj("k", 3)), Err(Stale::RolledBack { known: 4 }));
        assert_eq!(g.peek(k), Some(Known::Deleted(2)));
        assert_eq!(g.export().1, bytes);
        // Truncated, a bad tag, a revision below 1, another format: nothing moves.
        let h = Floors::default();
        assert!(h.import(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        bad[EXPORT_MAGIC.len() + 16] = 7;
        assert!(h.import(&bad).is_err());
        let mut bad = bytes.clone();
        bad[EXPORT_MAGIC.len() + 17..EXPORT_MAGIC.len() + EXPORT_ENTRY].fill(0);
        assert!(h.import(&bad).is_err());
        assert!(h.import(b"not an export").is_err());
        assert_eq!(h.generation(), 0);
        assert_eq!(h.export().1, EXPORT_MAGIC);
    }

    #[test]
    fn a_write_never_lowers_a_floor() {
        let f = Floors::default();
        let k = RowName::of("key", "a", "k");
        assert_eq!(f.check(&obj("k", 5)), Ok(()));
        f.wrote(k, Applied::Put(4));
        assert_eq!(f.check(&obj("k", 4)), Err(Stale::RolledBack { known: 5 }));
        f.wrote(k, Applied::Absent);
        assert_eq!(f.check(&obj("k", 5)), Ok(()));
    }
}
