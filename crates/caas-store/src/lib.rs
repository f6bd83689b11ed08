//! Key-service storage: versioned objects and a hash-chained, signed audit log, on embedded
//! SQLite (default) or PostgreSQL (several key-service nodes sharing one database), behind
//! one API.
//!
//! Every change goes through [`Store::commit`]: a [`Batch`] of object writes (with
//! optimistic concurrency through `expect_rev`) and audit entries, applied atomically and
//! durable before the call returns. Concurrent commits are *group-committed*: one writer
//! (a thread with one SQLite connection, or a task with one PostgreSQL connection) applies
//! every batch that is waiting in one database transaction, each batch in its own
//! SAVEPOINT so that a conflict in one batch rolls back only that batch, and answers all
//! callers after the single durable COMMIT. Batches queued by [`Store::commit_deferred`]
//! (nobody waits for them) are gathered a little longer on SQLite: a group they lead takes
//! its last batches at most every 4 ms (`DEFERRED_GROUP_SPACING`), applying what arrives
//! every millisecond meanwhile, then commits. A group of waiting callers starts as
//! soon as the writer is free, with whatever is queued (no commit delay: an adaptive
//! 150 µs gathering delay was measured and made no difference). Reads use separate
//! connections.
//!
//! The audit log is one global chain per store, built with caas's one chain construction
//! (`caas_crypto::chain`; see [`chain_hash`] for the exact record hash);
//! each group commit signs the hash of its last record with the [`AuditSigner`] given to
//! [`Store::open`] (the chain binds every earlier record to it; the group's other records
//! are stored with an empty signature), and [`Store::audit_verify`] re-checks every hash,
//! link, seq and signature and requires every record to be covered by a signature.
//!
//! The database is not trusted for integrity. Every object row carries a MAC (column `mac`)
//! under the [`RecordAuthenticator`] given to [`Store::open`], covering the row's kind,
//! account, id, revision and body ([`record_mac_input`]). The writer computes it when it
//! assigns the revision, inside the transaction (so upserts are covered too); every read
//! ([`Store::get`], [`Store::list`], [`Store::list_healthy`]) re-computes it and never
//! returns a row whose MAC does not match: `get` and `list` answer [`Error::Integrity`]
//! naming the row (a list with one bad row is refused as a whole, not silently shortened),
//! and the store appends an audit record (operation `IntegrityCheck`, result
//! `IntegrityFailure`, principal `caas-store`) naming each refused row — once per distinct
//! bad row version per process, so a corrupt row read on every request does not flood the
//! chain (the key service's own per-request record names the row too). An edited, swapped,
//! copied (to another account or id) or re-pointed row is refused. An older version of a
//! row, or a deleted row, put back with its old MAC is refused too once this store has
//! written or read a newer state of that row, or was given its floor by
//! [`Store::floors_import`] (revision floors, `floor.rs`: `get` and `list` answer
//! [`Error::Integrity`] and the store audits the row with the reason); a deleted row is
//! not detected here (see ARCHITECTURE.md, Trust boundaries).
//!
//! Freshness: the database alone cannot prove that its tail was not cut or the whole file
//! restored from an old backup. [`Store::anchor_audit`] gives the writer a chain head known
//! from outside the database (the key service's signed checkpoint) and a [`HeadObserver`]
//! told every new head after its durable commit; from then on the writer refuses to append
//! (`Error::Corrupt`) after a head that is behind the anchor or does not contain it.

mod audit;
mod error;
mod floor;
mod postgres;
mod record;
mod sqlite;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod conformance;

pub use audit::{
    AuditFault, AuditFaultReason, AuditVerifyReport, GENESIS_HASH, chain_hash, record_body,
};
pub use error::Error;
pub use floor::Applied;
pub use record::{HmacRecordKey, RecordAuthenticator, RowRef, record_mac_input};

use floor::{Floors, RowName, Stale};
use record::RawObject;
use std::sync::{Arc, Mutex};

/// Signs audit record hashes (the key service signs with its audit key): the shared chain's
/// [`caas_crypto::chain::RecordSigner`].
pub use caas_crypto::chain::RecordSigner as AuditSigner;

/// Told the new chain head after every durable group commit that moved it, before the
/// callers of that group are answered (called on the writer; keep it short).
pub trait HeadObserver: Send + Sync + 'static {
    /// The chain now ends at record `seq` with hash `hash`, stored with `signature`: the
    /// store's [`AuditSigner`] over `hash` (every group commit signs its last record).
    fn committed(&self, seq: u64, hash: &[u8; 32], signature: &[u8]);
}

/// Which database a [`Store`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file (WAL, synchronous=FULL).
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Object kind ("key", "alias", "grant", ...), chosen by the caller.
    pub kind: String,
    /// Owning account.
    pub account: String,
    /// Id, unique within (kind, account).
    pub id: String,
    /// Revision: 1 on insert, +1 on every update.
    pub rev: i64,
    /// Opaque body (the caller's serialisation).
    pub body: Vec<u8>,
}

/// One object write inside a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert or update. `expect_rev`: `None` = unconditional upsert; `Some(0)` = must not
    /// exist yet; `Some(n)` = current rev must be n. New rev = old + 1 (1 on insert).
    Put {
        /// Object kind.
        kind: String,
        /// Owning account.
        account: String,
        /// Object id.
        id: String,
        /// New body.
        body: Vec<u8>,
        /// Optimistic-concurrency expectation.
        expect_rev: Option<i64>,
    },
    /// Delete. `expect_rev`: `None` = delete if present (absent is not an error); `Some(0)` =
    /// must not exist (a no-op that asserts absence); `Some(n)` = must exist with rev n.
    Delete {
        /// Object kind.
        kind: String,
        /// Owning account.
        account: String,
        /// Object id.
        id: String,
        /// Optimistic-concurrency expectation.
        expect_rev: Option<i64>,
    },
}

impl Write {
    /// The name of the row this write changes.
    fn row_name(&self) -> RowName {
        let (Write::Put {
            kind, account, id, ..
        }
        | Write::Delete {
            kind, account, id, ..
        }) = self;
        RowName::of(kind, account, id)
    }
}

/// Writes and audit entries committed atomically by [`Store::commit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Object writes, applied in order.
    pub writes: Vec<Write>,
    /// Audit entries, appended to the chain in order.
    pub audit: Vec<AuditEntry>,
}

/// What a successful commit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// The seq assigned to each audit entry of the batch, in order.
    pub audit_seqs: Vec<u64>,
    /// What each object write of the batch did, in order.
    pub applied: Vec<Applied>,
}

/// One audit entry as given by the key service. Never put secrets in any field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// Request time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Account the request acted for.
    pub account: String,
    /// Principal (access key id) that made the request.
    pub principal: String,
    /// Operation name (e.g. "Encrypt").
    pub operation: String,
    /// Key the request concerned, if any.
    pub key_id: Option<String>,
    /// Outcome ("Success" or an error code).
    pub result: String,
    /// Request id returned to the client.
    pub request_id: String,
    /// Further non-secret detail as JSON text.
    pub detail: String,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the global chain, starting at 1.
    pub seq: u64,
    /// The entry.
    pub entry: AuditEntry,
    /// Hash of the previous record ([`GENESIS_HASH`] for seq 1).
    pub prev_hash: [u8; 32],
    /// [`chain_hash`] of this record.
    pub hash: [u8; 32],
    /// The [`AuditSigner`]'s signature over `hash` on the last record of each group commit;
    /// empty on the group's other records (covered by the last one's through the chain).
    pub signature: Vec<u8>,
}

/// A storage handle; cheap to clone. Dropping the last clone stops the writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    stats: Arc<Counters>,
    auth: Arc<dyn RecordAuthenticator>,
    /// Fingerprints of bad row versions already audited by this process.
    reported: Arc<Mutex<std::collections::HashSet<[u8; 32]>>>,
    /// Batches queued by [`Store::commit_deferred`] and not yet durable.
    deferred: Arc<Deferred>,
    /// Moves when a commit with object writes is queued and when it is finished
    /// ([`Store::write_epoch`]).
    write_epoch: Arc<std::sync::atomic::AtomicU64>,
}

/// Where a queued batch's answer arrives.
pub(crate) type Pending = tokio::sync::oneshot::Receiver<Result<CommitInfo, Error>>;

/// The longest a batch queued by [`Store::commit_deferred`] may wait to be durable under
/// normal operation (see there). Documented bound of `audit_durability = "bounded"`.
pub const DEFERRED_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// [`Store::commit_deferred`] stops returning early (and waits like [`Store::commit`]) once
/// the oldest queued batch is this old, or this many are queued: the writer is behind, and
/// waiting keeps every acknowledged batch within [`DEFERRED_WINDOW`] of durable.
const DEFERRED_BACKPRESSURE_AGE: std::time::Duration = std::time::Duration::from_millis(7);

/// The SQLite writer takes the last batches of a group led by a deferred batch no sooner
/// than this after the previous group took its own (one transaction, fsync and audit
/// signature for every deferred record of the interval); meanwhile the group's transaction
/// is open and applies what has arrived every millisecond, so little is left to do when
/// the interval ends. A deferred batch thus waits at most this long before its group
/// commits, then the commit: within [`DEFERRED_BACKPRESSURE_AGE`] and well within
/// [`DEFERRED_WINDOW`] on a disk that syncs in about a millisecond (4 + ~1 ms). A
/// synchronous commit queued behind such a deferred batch waits as long (only under
/// `bounded` key use). 4 ms rather than 2: the per-group costs (fsync, which burns CPU on
/// a virtio disk, the group signature, the checkpoint's signature, WAL frames of the
/// head and index pages) were about half of the writer's CPU at 2 ms; see
/// bench/kms-bench.sh for the measurement.
pub(crate) const DEFERRED_GROUP_SPACING: std::time::Duration = std::time::Duration::from_millis(4);
const DEFERRED_BACKPRESSURE_COUNT: usize = 2048;

/// Bookkeeping of deferred batches: queue time by ticket (tickets increase in queue order,
/// the writer makes them durable in that order), and whether the last one failed.
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    queue: Mutex<DeferredQueue>,
    /// A deferred batch failed to commit: until a later commit succeeds, deferred batches
    /// are committed synchronously (their callers see the error).
    failed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct DeferredQueue {
    next: u64,
    pending: std::collections::BTreeMap<u64, std::time::Instant>,
}

/// Group-commit counters of one [`Store`] handle (its own writer only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Database transactions the writer ran.
    pub transactions: u64,
    /// Batches (commit calls) those transactions carried; batches / transactions is the
    /// average group size.
    pub batches: u64,
    /// [`Store::commit_deferred`] calls that waited for durability because the writer was
    /// behind (back-pressure) or a deferred batch had failed.
    pub deferred_waited: u64,
}

/// State shared by a [`Store`] handle and its writer: group-commit counters, the audit
/// anchor and the revision floors.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// The newest revision of each row this store has written or read (`floor.rs`); the
    /// writer records its commits before it answers ([`Job::finish`]).
    floors: Floors,
    transactions: std::sync::atomic::AtomicU64,
    batches: std::sync::atomic::AtomicU64,
    deferred_waited: std::sync::atomic::AtomicU64,
    anchor: std::sync::Mutex<Option<Anchor>>,
}

/// The last chain head this store's writer knows to be genuine, and whom to tell of new ones.
struct Anchor {
    head: audit::Head,
    observer: Arc<dyn HeadObserver>,
}

impl std::fmt::Debug for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anchor")
            .field("seq", &self.head.seq)
            .finish_non_exhaustive()
    }
}

/// What the writer must still check before appending after `start` (see
/// [`Counters::anchor_check`]): the record at `seq` must have `hash`.
pub(crate) struct AnchorProbe {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl AnchorProbe {
    /// Compares the stored hash of the probed record (None: no such record).
    pub fn confirm(&self, stored: Option<&[u8]>) -> Result<(), Error> {
        match stored {
            Some(h) if h == self.hash => Ok(()),
            Some(_) => Err(Error::Corrupt(format!(
                "audit record {} no longer has the hash this node anchored: the database was \
                 restored or rewritten; refusing to append",
                self.seq
            ))),
            None => Err(Error::Corrupt(format!(
                "audit record {} that this node anchored is missing: the chain's tail was cut; \
                 refusing to append",
                self.seq
            ))),
        }
    }
}

impl Counters {
    pub(crate) fn record(&self, batches: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.transactions.fetch_add(1, Relaxed);
        self.batches.fetch_add(batches as u64, Relaxed);
    }

    /// Before a group transaction appends after `start` (the head read under the write
    /// lock): refuses a head behind the anchor or beside it, and names the record to probe
    /// when other writers moved the head since (None: nothing to probe).
    pub(crate) fn anchor_check(&self, start: &audit::Head) -> Result<Option<AnchorProbe>, Error> {
        let guard = self.anchor.lock().map_err(|_| Error::WriterStopped)?;
        let Some(anchor) = guard.as_ref() else {
            return Ok(None);
        };
        let a = anchor.head;
        if start.seq < a.seq {
            return Err(Error::Corrupt(format!(
                "audit chain head {} is behind this node's anchored head {}: the tail was cut \
                 or the database rolled back; refusing to append",
                start.seq, a.seq
            )));
        }
        if start.seq == a.seq {
            return if start.hash == a.hash {
                Ok(None)
            } else {
                Err(Error::Corrupt(format!(
                    "audit chain head {} has another hash than this node anchored: the database \
                     was restored or rewritten; refusing to append",
                    a.seq
                )))
            };
        }
        if a.seq == 0 {
            return Ok(None);
        }
        Ok(Some(AnchorProbe {
            seq: a.seq,
            hash: a.hash,
        }))
    }

    /// After a durable commit that moved the chain to `head` (its record stored with
    /// `signature`): moves the anchor and tells the observer.
    pub(crate) fn anchor_advance(&self, head: &audit::Head, signature: &[u8]) {
        let observer = match self.anchor.lock() {
            Ok(mut g) => g.as_mut().map(|a| {
                a.head = *head;
                a.observer.clone()
            }),
            Err(_) => None,
        };
        if let Some(o) = observer {
            o.committed(head.seq, &head.hash, signature);
        }
    }
}

enum Inner {
    Sqlite(sqlite::SqliteStore),
    Postgres(Box<postgres::PgStore>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// Most distinct bad-row fingerprints remembered (audited once each) before the set is cleared.
const MAX_REPORTED: usize = 10_000;
/// Longest kind/account/id text copied into an integrity audit record.
const MAX_NAME: usize = 256;

/// `verify(seq, hash, signature)` of [`Store::audit_verify_seq`].
pub type SeqVerifier<'a> = dyn Fn(u64, &[u8; 32], &[u8]) -> bool + Sync + 'a;

/// How many audit records `audit_verify` reads per query.
const VERIFY_PAGE: usize = 2000;

impl Store {
    /// Opens (and creates if missing) a store. `url`: a filesystem path or `sqlite:PATH` for
    /// embedded SQLite; `postgres://user@host:port/db` (or `postgresql://`, any libpq-style
    /// URL that tokio-postgres accepts, no TLS) for PostgreSQL. Creating the schema is
    /// idempotent and safe when several nodes start at once. `records` authenticates every
    /// object row written and read (see the crate documentation).
    pub async fn open(
        url: &str,
        signer: Arc<dyn AuditSigner>,
        records: Arc<dyn RecordAuthenticator>,
    ) -> Result<Store, Error> {
        let stats = Arc::new(Counters::default());
        let inner = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Inner::Postgres(Box::new(
                postgres::PgStore::open(url, signer, records.clone(), stats.clone()).await?,
            ))
        } else {
            let path = url
                .strip_prefix("sqlite:")
                .map_or(url, |p| p.strip_prefix("//").unwrap_or(p));
            if path.is_empty() || path == ":memory:" || path.starts_with("file:") {
                return Err(Error::InvalidUrl(
                    "expected a file path, sqlite:PATH or postgres://...".into(),
                ));
            }
            Inner::Sqlite(
                sqlite::SqliteStore::open(
                    std::path::Path::new(path),
                    signer,
                    records.clone(),
                    stats.clone(),
                )
                .await?,
            )
        };
        Ok(Store {
            inner: Arc::new(inner),
            stats,
            auth: records,
            reported: Arc::new(Mutex::new(std::collections::HashSet::new())),
            deferred: Arc::new(Deferred::default()),
            write_epoch: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// A counter that moves when a commit with object writes is queued and again when the
    /// writer has finished it (durable, conflicting or failed; before its caller is
    /// answered), through any clone of this handle.
    /// A cache of rows read at epoch `e` (read before the rows) is current as long as the
    /// epoch is still `e`: no state change of this process has been committed since
    /// (another process's or node's changes are not seen here; see `caas_kms::keycache`).
    pub fn write_epoch(&self) -> u64 {
        self.write_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Group-commit counters of this handle's writer.
    pub fn commit_stats(&self) -> CommitStats {
        use std::sync::atomic::Ordering::Relaxed;
        CommitStats {
            transactions: self.stats.transactions.load(Relaxed),
            batches: self.stats.batches.load(Relaxed),
            deferred_waited: self.stats.deferred_waited.load(Relaxed),
        }
    }

    /// This store's revision floors (the newest revision of each row it has written or
    /// read, see the crate documentation) in a stable byte form, with their generation:
    /// for the key service to keep beside its node key and give back to
    /// [`Store::floors_import`] after a restart.
    pub fn floors_export(&self) -> (u64, Vec<u8>) {
        self.stats.floors.export()
    }

    /// Moves whenever a revision floor moves.
    pub fn floors_generation(&self) -> u64 {
        self.stats.floors.generation()
    }

    /// Merges floors exported by [`Store::floors_export`] (never lowering one); returns how
    /// many rows they name. Bytes that are not an export are refused whole
    /// ([`Error::InvalidInput`]), before any floor moves.
    pub fn floors_import(&self, bytes: &[u8]) -> Result<usize, Error> {
        self.stats
            .floors
            .import(bytes)
            .map_err(|why| Error::InvalidInput(format!("row floors refused: {why}")))
    }

    /// The database kind behind this store.
    pub fn backend(&self) -> Backend {
        match &*self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// One object, or None. A row whose MAC does not match, or that is older than a
    /// version this store has written or read (revision floors, see the crate
    /// documentation), is refused with [`Error::Integrity`] (and audited), never returned.
    pub async fn get(&self, kind: &str, account: &str, id: &str) -> Result<Option<Object>, Error> {
        match self.read_judged(kind, account, id).await? {
            None => Ok(None),
            Some(Verdict::Good(o)) => Ok(Some(o)),
            Some(Verdict::Bad(raw, fault)) => {
                let bad = Box::pin(self.refuse(&[(raw, fault)])).await;
                Err(integrity(bad))
            }
        }
    }

    /// Reads one row and judges it: its MAC, and its revision against the floor as it was
    /// before the read (see `floor.rs`). None: no such row.
    async fn read_judged(
        &self,
        kind: &str,
        account: &str,
        id: &str,
    ) -> Result<Option<Verdict>, Error> {
        let name = RowName::of(kind, account, id);
        let before = self.stats.floors.peek(name);
        let raw = match &*self.inner {
            Inner::Sqlite(s) => s.get(kind, account, id).await?,
            Inner::Postgres(s) => Box::pin(s.get(kind, account, id)).await?,
        };
        Ok(raw.map(|raw| {
            if !raw.verify(&*self.auth) {
                let fault = Fault::of_mac(&raw);
                return Verdict::Bad(raw, fault);
            }
            match self.stats.floors.judge(name, before, &raw.obj) {
                Ok(()) => Verdict::Good(raw.obj),
                Err(stale) => Verdict::Bad(raw, Fault::Stale(stale)),
            }
        }))
    }

    /// All objects of `kind` for `account` (None: every account), ordered by (account, id).
    /// If any row fails its integrity check the whole list is refused with
    /// [`Error::Integrity`] naming the first bad row (every bad row is audited): a caller
    /// never sees a list silently shortened by tampering.
    pub async fn list(&self, kind: &str, account: Option<&str>) -> Result<Vec<Object>, Error> {
        let (good, bad) = self.list_healthy(kind, account).await?;
        match bad.into_iter().next() {
            None => Ok(good),
            Some(first) => Err(integrity(first)),
        }
    }

    /// Every object kind that has at least one row (for whole-store jobs: re-MACing every
    /// row under a new key epoch).
    pub async fn kinds(&self) -> Result<Vec<String>, Error> {
        match &*self.inner {
            Inner::Sqlite(s) => s.kinds().await,
            Inner::Postgres(s) => Box::pin(s.kinds()).await,
        }
    }

    /// Like [`Store::list`], but returns the rows that verify together with the places of
    /// those that do not (already audited), for background jobs that must go on over the
    /// healthy rows (scheduled deletion, rotation, re-wrapping). Never returns a bad row.
    pub async fn list_healthy(
        &self,
        kind: &str,
        account: Option<&str>,
    ) -> Result<(Vec<Object>, Vec<RowRef>), Error> {
        let rows = match &*self.inner {
            Inner::Sqlite(s) => s.list(kind, account).await?,
            Inner::Postgres(s) => Box::pin(s.list(kind, account)).await?,
        };
        let (mut good, mut bad) = (Vec::with_capacity(rows.len()), Vec::new());
        for r in rows {
            if !r.verify(&*self.auth) {
                let fault = Fault::of_mac(&r);
                bad.push((r, fault));
            } else if self.stats.floors.check(&r.obj).is_ok() {
                good.push(r.obj);
            } else {
                // Below the floor as it is now: this store may have committed a newer
                // version since the list was read. A point read judged against the floor
                // from before it decides.
                let o = &r.obj;
                match self.read_judged(&o.kind, &o.account, &o.id).await? {
                    Some(Verdict::Good(fresh)) => good.push(fresh),
                    Some(Verdict::Bad(raw, fault)) => bad.push((raw, fault)),
                    None => {}
                }
            }
        }
        let refs = if bad.is_empty() {
            Vec::new()
        } else {
            self.refuse_all(&bad).await
        };
        Ok((good, refs))
    }

    async fn refuse(&self, bad: &[(RawObject, Fault)]) -> RowRef {
        let mut refs = self.refuse_all(bad).await;
        refs.swap_remove(0)
    }

    /// Audits refused rows (each distinct bad row version once per process) and names them.
    async fn refuse_all(&self, bad: &[(RawObject, Fault)]) -> Vec<RowRef> {
        let clip = |s: &str| -> String {
            s.chars()
                .take(MAX_NAME)
                .map(|c| if c == '\0' { '\u{fffd}' } else { c })
                .collect()
        };
        let mut refs = Vec::with_capacity(bad.len());
        let mut audit = Vec::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        for (r, fault) in bad {
            let o = &r.obj;
            let row = RowRef {
                kind: clip(&o.kind),
                account: clip(&o.account),
                id: clip(&o.id),
            };
            let fp = {
                let mut m = record_mac_input(&o.kind, &o.account, &o.id, o.rev, &o.body);
                m.extend_from_slice(r.mac.as_deref().unwrap_or(b"<null>"));
                let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &m);
                let mut fp = [0u8; 32];
                fp.copy_from_slice(d.as_ref());
                fp
            };
            let fresh = self.reported.lock().map_or(true, |mut set| {
                if set.len() >= MAX_REPORTED {
                    set.clear();
                }
                set.insert(fp)
            });
            // Once per bad row version at error level (a corrupt row read on every request
            // must not flood the log); the names come from the database: logged escaped.
            if fresh {
                tracing::error!(kind = ?row.kind, account = ?row.account, id = ?row.id, rev = o.rev,
                    reason = %fault.reason(), "stored record failed its integrity check; refused");
            } else {
                tracing::debug!(kind = ?row.kind, account = ?row.account, id = ?row.id, rev = o.rev,
                    "stored record failed its integrity check again; refused");
            }
            if fresh {
                audit.push(AuditEntry {
                    time_ms: now,
                    account: row.account.clone(),
                    principal: "caas-store".into(),
                    operation: "IntegrityCheck".into(),
                    key_id: Some(row.id.clone()),
                    result: "IntegrityFailure".into(),
                    request_id: String::new(),
                    detail: serde_json::json!({
                        "kind": row.kind, "account": row.account, "id": row.id, "rev": o.rev,
                        "reason": fault.reason(),
                    })
                    .to_string(),
                });
            }
            refs.push(row);
        }
        if !audit.is_empty()
            && let Err(e) = self
                .commit(Batch {
                    writes: Vec::new(),
                    audit,
                })
                .await
        {
            tracing::error!(error = %e, "cannot audit an integrity failure");
        }
        refs
    }

    /// Consumes an object: reads it (MAC-checked, as [`Store::get`]) and deletes it with a
    /// conditional write on the revision read (`expect_rev`), durable before the call
    /// returns. The database decides: among any number of concurrent takers of one object,
    /// on this node or on other nodes of the same database, exactly one gets it; the others
    /// (and every later call) get `None`, as for an absent object. For single-use tokens
    /// (the key service's recipient nonces) whose ids are never reused.
    pub async fn take(&self, kind: &str, account: &str, id: &str) -> Result<Option<Object>, Error> {
        let Some(o) = self.get(kind, account, id).await? else {
            return Ok(None);
        };
        let batch = Batch {
            writes: vec![Write::Delete {
                kind: kind.to_owned(),
                account: account.to_owned(),
                id: id.to_owned(),
                expect_rev: Some(o.rev),
            }],
            audit: Vec::new(),
        };
        match self.commit(batch).await {
            Ok(_) => Ok(Some(o)),
            Err(Error::Conflict { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Applies all writes and appends all audit entries atomically; returns only after the
    /// transaction is durable. If any `expect_rev` fails, nothing of this batch is applied
    /// and `Error::Conflict` names the first failing write.
    pub async fn commit(&self, batch: Batch) -> Result<CommitInfo, Error> {
        validate(&batch)?;
        if batch.writes.is_empty() && batch.audit.is_empty() {
            return Ok(CommitInfo {
                audit_seqs: Vec::new(),
                applied: Vec::new(),
            });
        }
        let rx = self.enqueue(batch)?;
        let result = rx.await.map_err(|_| Error::WriterStopped)?;
        if result.is_ok() {
            self.deferred
                .failed
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// Queues `batch`; a batch with object writes moves the write epoch now and again when
    /// the writer has finished it (before it answers, so also when the caller went away).
    fn enqueue(&self, batch: Batch) -> Result<Pending, Error> {
        use std::sync::atomic::Ordering::SeqCst;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let epoch = (!batch.writes.is_empty()).then(|| {
            self.write_epoch.fetch_add(1, SeqCst);
            self.write_epoch.clone()
        });
        let sent = self.send(Job {
            batch,
            reply: Reply::Wait {
                tx,
                epoch: epoch.clone(),
            },
        });
        if sent.is_err()
            && let Some(e) = epoch
        {
            e.fetch_add(1, SeqCst);
        }
        sent.map(|()| rx)
    }

    fn send(&self, job: Job) -> Result<(), Error> {
        match &*self.inner {
            Inner::Sqlite(s) => s.send(job),
            Inner::Postgres(s) => s.send(job),
        }
    }

    /// Queues `batch` for the writer and returns without waiting for it to be durable
    /// (`audit_durability = "bounded"`: the key service's audit records of key use). The
    /// batch is appended in call order relative to every other commit (so a later
    /// [`Store::commit`] that returned means this one is durable too), in a group
    /// transaction that starts as soon as the writer is free: under normal operation it is
    /// durable within [`DEFERRED_WINDOW`]. When the writer is behind (the oldest queued batch
    /// older than a few milliseconds, or thousands queued) or a deferred batch has failed
    /// since the last successful commit, this call waits for durability like
    /// [`Store::commit`] and returns its error: a stalled or failing disk slows or refuses
    /// callers instead of silently widening the window. A failure of a batch that was not
    /// waited for is logged and makes the next calls synchronous. Only batches without
    /// object writes may be deferred (state changes are always durable before their reply):
    /// a batch with writes is committed synchronously.
    pub async fn commit_deferred(&self, batch: Batch) -> Result<(), Error> {
        use std::sync::atomic::Ordering::Relaxed;
        validate(&batch)?;
        if batch.audit.is_empty() && batch.writes.is_empty() {
            return Ok(());
        }
        let behind = || -> bool {
            self.deferred.failed.load(Relaxed)
                || self.deferred.queue.lock().map_or(true, |q| {
                    q.pending.len() >= DEFERRED_BACKPRESSURE_COUNT
                        || q.pending
                            .first_key_value()
                            .is_some_and(|(_, t)| t.elapsed() >= DEFERRED_BACKPRESSURE_AGE)
                })
        };
        if !batch.writes.is_empty() {
            return self.commit(batch).await.map(|_| ());
        }
        if behind() {
            self.stats.deferred_waited.fetch_add(1, Relaxed);
            return self.commit(batch).await.map(|_| ());
        }
        // Queue order and ticket order are the same: both under this lock. The ticket is
        // pending before the writer can see the job, which retires it ([`Reply::finish`]).
        let mut q = self
            .deferred
            .queue
            .lock()
            .map_err(|_| Error::WriterStopped)?;
        let ticket = q.next;
        q.next += 1;
        q.pending.insert(ticket, std::time::Instant::now());
        let sent = self.send(Job {
            batch,
            reply: Reply::Deferred {
                ticket,
                deferred: self.deferred.clone(),
            },
        });
        if sent.is_err() {
            q.pending.remove(&ticket);
        }
        sent
    }

    /// Waits until everything queued before this call (deferred batches included) is
    /// durable or has failed: at clean shutdown, and for tests.
    pub async fn flush(&self) -> Result<(), Error> {
        let rx = self.enqueue(Batch::default())?;
        rx.await.map_err(|_| Error::WriterStopped)?.map(|_| ())
    }

    /// How many deferred batches are not yet durable, and the age of the oldest.
    pub fn deferred_backlog(&self) -> (usize, Option<std::time::Duration>) {
        self.deferred.queue.lock().map_or((0, None), |q| {
            (
                q.pending.len(),
                q.pending.first_key_value().map(|(_, t)| t.elapsed()),
            )
        })
    }

    /// Audit records of one account (None: all), seq > `after_seq`, ascending, at most `limit`.
    pub async fn audit_list(
        &self,
        account: Option<&str>,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, Error> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match &*self.inner {
            Inner::Sqlite(s) => s.audit_rows(account, after, i64::MAX, limit).await?,
            Inner::Postgres(s) => Box::pin(s.audit_rows(account, after, i64::MAX, limit)).await?,
        };
        rows.into_iter()
            .map(audit::RawAuditRow::into_record)
            .collect()
    }

    /// The chain head: seq and hash of the last audit record ((0, [`GENESIS_HASH`]) when
    /// empty). Publishing it elsewhere lets a later `audit_verify` detect a removed tail even
    /// by someone who rewrites the head row too.
    pub async fn audit_head(&self) -> Result<(u64, [u8; 32]), Error> {
        let head = match &*self.inner {
            Inner::Sqlite(s) => s.head().await?,
            Inner::Postgres(s) => Box::pin(s.head()).await?,
        };
        Ok((head.seq, head.hash))
    }

    /// Anchors this store's writer at the chain head `(seq, hash)`, known to be genuine from
    /// outside the database (the caller checked it against its own signed checkpoint), and
    /// registers `observer`, told every later head after its durable commit. From then on
    /// a group commit that finds the head behind the anchor, or a chain that no longer holds
    /// the anchored record, fails with `Error::Corrupt` instead of appending (a database
    /// rolled back or restored under a running node is not silently continued).
    pub fn anchor_audit(&self, seq: u64, hash: [u8; 32], observer: Arc<dyn HeadObserver>) {
        if let Ok(mut g) = self.stats.anchor.lock() {
            *g = Some(Anchor {
                head: audit::Head { seq, hash },
                observer,
            });
        }
    }

    /// Re-computes the whole chain up to the head at the time of the call: every hash, link,
    /// seq continuity, the head row, and each signature via `verify(hash, signature)`.
    pub async fn audit_verify(
        &self,
        verify: &(dyn Fn(&[u8; 32], &[u8]) -> bool + Sync),
    ) -> Result<AuditVerifyReport, Error> {
        self.audit_verify_seq(&|_, h, s| verify(h, s)).await
    }

    /// [`Store::audit_verify`] with the record's seq given to `verify(seq, hash, signature)`
    /// (for signers whose key changes along the chain: a KMS domain's key epochs).
    pub async fn audit_verify_seq(
        &self,
        verify: &SeqVerifier<'_>,
    ) -> Result<AuditVerifyReport, Error> {
        let head = match &*self.inner {
            Inner::Sqlite(s) => s.head().await?,
            Inner::Postgres(s) => Box::pin(s.head()).await?,
        };
        let upto = i64::try_from(head.seq).unwrap_or(i64::MAX);
        let mut verifier = audit::ChainVerifier::new();
        let mut after = 0i64;
        let report = |v: &audit::ChainVerifier, first_bad| AuditVerifyReport {
            checked: v.checked(),
            head_seq: head.seq,
            first_bad,
        };
        loop {
            let rows = match &*self.inner {
                Inner::Sqlite(s) => s.audit_rows(None, after, upto, VERIFY_PAGE as i64).await?,
                Inner::Postgres(s) => {
                    Box::pin(s.audit_rows(None, after, upto, VERIFY_PAGE as i64)).await?
                }
            };
            for row in &rows {
                let seq = u64::try_from(row.seq).unwrap_or(0);
                if let Err(fault) = verifier.check(row, &|h, sig| verify(seq, h, sig)) {
                    return Ok(report(&verifier, Some(fault)));
                }
                after = row.seq;
            }
            if rows.len() < VERIFY_PAGE {
                break;
            }
        }
        match verifier.finish(&head) {
            Ok(()) => Ok(report(&verifier, None)),
            Err(fault) => Ok(report(&verifier, Some(fault))),
        }
    }
}

/// A row read and judged (MAC, revision floor).
enum Verdict {
    /// Authentic and not below its floor.
    Good(Object),
    /// Refused, and why.
    Bad(RawObject, Fault),
}

/// Why a stored row is refused.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Its MAC does not match.
    Mac,
    /// It has no MAC.
    MacMissing,
    /// Its MAC matches but it is older than a version this store has seen.
    Stale(Stale),
}

impl Fault {
    /// The fault of a row whose MAC does not verify.
    fn of_mac(r: &RawObject) -> Fault {
        if r.mac.is_some() {
            Fault::Mac
        } else {
            Fault::MacMissing
        }
    }

    /// The audit record's reason.
    fn reason(self) -> String {
        match self {
            Fault::Mac => "MAC mismatch".into(),
            Fault::MacMissing => "MAC missing".into(),
            Fault::Stale(s) => s.reason(),
        }
    }
}

fn integrity(r: RowRef) -> Error {
    Error::Integrity {
        kind: r.kind,
        account: r.account,
        id: r.id,
    }
}

/// Rejects values that one of the backends cannot store faithfully (PostgreSQL TEXT cannot
/// hold NUL), so both backends behave the same.
fn validate(batch: &Batch) -> Result<(), Error> {
    let check = |what: &str, s: &str| {
        if s.contains('\0') {
            Err(Error::InvalidInput(format!(
                "{what} contains a NUL character"
            )))
        } else {
            Ok(())
        }
    };
    for w in &batch.writes {
        let (Write::Put {
            kind,
            account,
            id,
            expect_rev,
            ..
        }
        | Write::Delete {
            kind,
            account,
            id,
            expect_rev,
        }) = w;
        check("object kind", kind)?;
        check("object account", account)?;
        check("object id", id)?;
        if expect_rev.is_some_and(|r| r < 0) {
            return Err(Error::InvalidInput(
                "expect_rev must not be negative".into(),
            ));
        }
    }
    for e in &batch.audit {
        check("audit account", &e.account)?;
        check("audit principal", &e.principal)?;
        check("audit operation", &e.operation)?;
        check("audit key id", e.key_id.as_deref().unwrap_or(""))?;
        check("audit result", &e.result)?;
        check("audit request id", &e.request_id)?;
        check("audit detail", &e.detail)?;
    }
    Ok(())
}

/// A queued commit and where to send its answer.
pub(crate) struct Job {
    pub batch: Batch,
    pub reply: Reply,
}

impl Job {
    /// Answers the job with the result of its group commit (durable, or failed). A success
    /// moves the revision floors of the rows it wrote first, whether or not anybody still
    /// waits for the answer.
    pub(crate) fn finish(self, result: Result<CommitInfo, Error>, stats: &Counters) {
        if let Ok(info) = &result {
            for (write, applied) in self.batch.writes.iter().zip(&info.applied) {
                stats.floors.wrote(write.row_name(), *applied);
            }
        }
        self.reply.finish(result);
    }
}

/// Who is told a job's result.
pub(crate) enum Reply {
    /// A caller waiting for durability ([`Store::commit`]); a batch with object writes
    /// carries the store's write epoch, moved once it is finished.
    Wait {
        tx: tokio::sync::oneshot::Sender<Result<CommitInfo, Error>>,
        epoch: Option<Arc<std::sync::atomic::AtomicU64>>,
    },
    /// Nobody waits ([`Store::commit_deferred`]): the writer itself retires the ticket and
    /// records a failure, so a deferred batch costs no task and no wake-up of the caller.
    Deferred {
        ticket: u64,
        deferred: Arc<Deferred>,
    },
}

impl Reply {
    /// Delivers `result` (called by the writer once the group is durable or has failed).
    pub(crate) fn finish(self, result: Result<CommitInfo, Error>) {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            Reply::Wait { tx, epoch } => {
                if let Some(e) = epoch {
                    e.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = tx.send(result);
            }
            Reply::Deferred { ticket, deferred } => {
                if let Ok(mut q) = deferred.queue.lock() {
                    q.pending.remove(&ticket);
                }
                match result {
                    Ok(_) => deferred.failed.store(false, Relaxed),
                    Err(e) => {
                        deferred.failed.store(true, Relaxed);
                        tracing::error!(error = %e, "a deferred audit commit failed");
                    }
                }
            }
        }
    }
}

/// Most batches applied in one group transaction.
pub(crate) const MAX_GROUP: usize = 512;

/// Checks an `expect_rev` against the current revision (None: absent).
pub(crate) fn check_expect(
    kind: &str,
    id: &str,
    current: Option<i64>,
    expect: Option<i64>,
) -> Result<(), Error> {
    let ok = match expect {
        None => true,
        Some(0) => current.is_none(),
        Some(n) => current == Some(n),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Conflict {
            kind: kind.to_owned(),
            id: id.to_owned(),
        })
    }
}

/// The revision of a row inserted where none is stored: after its `tombstone`'s (the
/// revision it was deleted at) and after any revision this store knows of it, so that a
/// row deleted by hand, or whose tombstone was removed, does not come back below a floor.
pub(crate) fn insert_rev(
    stats: &Counters,
    kind: &str,
    account: &str,
    id: &str,
    tombstone: Option<i64>,
) -> Result<i64, Error> {
    let known = stats
        .floors
        .peek(RowName::of(kind, account, id))
        .map(floor::Known::rev);
    next_rev(tombstone.max(known))
}

/// The revision after `current` (1 on insert).
pub(crate) fn next_rev(current: Option<i64>) -> Result<i64, Error> {
    match current {
        None => Ok(1),
        Some(r) => r
            .checked_add(1)
            .filter(|n| *n > 1)
            .ok_or_else(|| Error::Corrupt(format!("object revision {r} out of range"))),
    }
}

pub(crate) fn seq_to_i64(seq: u64) -> Result<i64, Error> {
    i64::try_from(seq).map_err(|_| Error::Corrupt("audit seq out of range".into()))
}
