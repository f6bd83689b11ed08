//! The key-use cache: authenticated key records (and the opened current HBK of symmetric
//! keys) kept for the cryptographic operations' hot path, so that an Encrypt or Decrypt
//! does not read, MAC-check and parse the key row and open its EKT every time.
//!
//! **Consistency rule.** A cached record is used only while *both* hold:
//! - it is younger than [`KEY_CACHE_TTL`] (fetched from the database at most that long
//!   ago; after that the row is read again, MAC-checked by the store, and re-parsed), and
//! - no state change has been committed through this process's store since it was
//!   fetched ([`caas_store::Store::write_epoch`] moves before and after every commit with
//!   object writes, from any caller: operations, maintenance, domain-key rotation; an
//!   entry fetched while a write was in flight is never used after that write returns).
//!
//! So on one node, a DisableKey, ScheduleKeyDeletion, RotateKeyOnDemand, PutKeyPolicy, …
//! applies to the very next request; with several nodes on one PostgreSQL database,
//! another node's change applies here at most [`KEY_CACHE_TTL`] after it committed (AWS
//! KMS documents key-state changes as eventually consistent, typically within seconds).
//! `tests/key_cache.rs` proves both.
//!
//! Only the key-use operations read through the cache ([`crate::ops::resolve_for_use`]):
//! everything that changes a key, lists or describes it reads the row itself, so a
//! state change is always decided on the current row (and its `expect_rev`).
//!
//! **Integrity.** Entries are filled only from rows the store has verified (MAC over kind,
//! account, id, revision and body) and parsed with the row's account and id checked; an
//! entry never outlives [`KEY_CACHE_TTL`], so a row tampered with in the database is
//! refused (and audited) at the latest that long after it changed. The opened HBK is held
//! in a zeroizing [`SecretBytes`] and dropped with the entry. Keyed by account first: a
//! caller only ever finds its own account's entries.
use crate::model::KeyRecord;
use caas_crypto::SecretBytes;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The longest a cached key record is used without reading its row again (the bound on
/// how late another node's change to a key applies here).
pub const KEY_CACHE_TTL: Duration = Duration::from_millis(500);

/// Most entries kept; the cache starts over when full.
const MAX_ENTRIES: usize = 10_000;

/// One cached key record.
pub struct CachedKey {
    /// The record, from a verified row.
    pub key: KeyRecord,
    /// The row's revision.
    pub rev: i64,
    /// The current HBK (version, material) of a symmetric key, opened at fetch time.
    pub current: Option<(u32, SecretBytes)>,
    fetched: Instant,
    epoch: u64,
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedKey")
            .field("key_id", &self.key.key_id)
            .field("rev", &self.rev)
            .finish_non_exhaustive()
    }
}

/// Account → key id → entry.
#[derive(Default)]
pub struct KeyCache {
    map: RwLock<HashMap<String, HashMap<String, Arc<CachedKey>>>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

impl KeyCache {
    /// The entry of (`account`, `key_id`) if it may still be used at write epoch `epoch`.
    pub fn get(&self, account: &str, key_id: &str, epoch: u64) -> Option<Arc<CachedKey>> {
        let g = self.map.read().ok()?;
        let e = g.get(account)?.get(key_id)?;
        (e.epoch == epoch && e.fetched.elapsed() < KEY_CACHE_TTL).then(|| e.clone())
    }

    /// Caches a record read from a verified row, tagged with the write epoch `epoch` read
    /// *before* the row: if a write has happened since, the record may predate it, and the
    /// entry is never used (its tag is no longer the current epoch).
    pub fn put(
        &self,
        key: KeyRecord,
        rev: i64,
        current: Option<(u32, SecretBytes)>,
        fetched: Instant,
        epoch: u64,
    ) -> Arc<CachedKey> {
        let e = Arc::new(CachedKey {
            key,
            rev,
            current,
            fetched,
            epoch,
        });
        if let Ok(mut g) = self.map.write() {
            if g.values().map(HashMap::len).sum::<usize>() >= MAX_ENTRIES {
                g.clear();
            }
            g.entry(e.key.account.clone())
                .or_default()
                .insert(e.key.key_id.clone(), e.clone());
        }
        e
    }
}
