//! Freshness of the audit chain, anchored outside the database.
//!
//! The chain in the database proves that no record *inside* it was edited, removed or
//! reordered; it cannot prove that its tail was not cut (with the head row rewritten), that
//! the head row was not rolled back, or that the whole database was not restored from an
//! old backup — the database administrator can do all three consistently. So each node keeps
//! a **checkpoint** of the chain head it last committed — `(seq, hash, time)`, signed with the
//! node's audit key — in a file beside its node key (`<node key file>.audit-checkpoint`),
//! where the database administrator cannot write.
//!
//! - **Start-up** ([`attach`]): the node reads its checkpoint, then the database head, and
//!   refuses to serve when the head is behind the checkpoint or the record at the
//!   checkpoint's seq is missing or has another hash ([`Freshness::Stale`]), naming what it
//!   found. The operator override (`--accept-audit-rollback`) starts anyway and appends an
//!   `AcceptAuditRollback` record naming the old checkpoint and the head it accepted. Several
//!   nodes on one PostgreSQL chain each check their own checkpoint against the shared chain.
//! - **While serving**: the store's writer is anchored at the checked head
//!   ([`caas_store::Store::anchor_audit`]) and refuses to append after a head behind it or
//!   beside it (a database rolled back under a running node); after every durable group
//!   commit it hands the new head to [`CheckpointWriter`], whose own thread writes it (see
//!   "File and durability policy" below).
//! - **`caas audit verify`** runs the same comparison ([`check`]) and fails on a stale head.
//!
//! File and durability policy: the file holds two 512-byte slots, each one signed checkpoint
//! (JSON, space-padded); a commit overwrites the older slot in place with one `pwrite` and
//! no fsync, and readers take the valid slot with the highest seq. A write that is torn by a
//! crash spoils at most the slot being written — the other still holds the previous
//! checkpoint. (Replacing the file by write-temp-and-rename cost ~2 ms per commit on ext4,
//! whose `auto_da_alloc` starts writeback on every rename-over; one `pwrite` costs µs.)
//! The store's writer only *records* each new head ([`HeadObserver::committed`] costs a
//! mutex and a wake-up); a dedicated thread writes the newest recorded head, so the `pwrite`
//! (and a signature, where one is made) stays off the commit path and coalesces under load
//! (one slot for as many group commits as happened meanwhile). The checkpoint thus trails
//! the acknowledged head by the time of one `pwrite` (µs; plus one signature in a domain).
//!
//! Two slot formats, both read. Version 1 signs `(seq, hash, time)` under a domain separator
//! with the node's audit key: written at start-up, and after each commit by a node in a KMS
//! domain (whose records are signed with domain-epoch keys). Version 2 carries the head
//! record's own signature — the node's audit key over the record hash, made by the store's
//! writer in the group commit and handed over with the head ([`HeadObserver::committed`]) —
//! so a node outside a domain signs nothing more per commit (signing every head was 5–7 %
//! of the key service's CPU under `strict` durability at 16 connections; bench/kms-bench.sh).
//! The seq of a version-2 slot is not under its signature, but the hash commits to it (the
//! chain hash covers the seq): the slot moved to another seq names a record the chain does
//! not hold there, which [`check`] reports as stale, like any other false checkpoint; only
//! a genuine record signature of this node's audit key makes a slot that verifies, i.e. a
//! head this node's chain really had — what replaying an older version-1 slot gives too.
//!
//! The page cache makes each write survive a killed process (SIGKILL, crash of the service);
//! a background task fsyncs the file at most every [`SYNC_INTERVAL`], and shutdown fsyncs
//! it. An fsync per commit would double the fsyncs of the group commit. Remaining window,
//! honestly: after a power loss or kernel crash the checkpoint may be up to
//! [`SYNC_INTERVAL`] older than the last acknowledged commit, and records acknowledged in
//! that last second (after a SIGKILL: in the last µs, one `pwrite` and, in a domain, one
//! signature) could then be cut without
//! detection. The checkpoint is never *ahead*
//! of the database (it is written after the durable commit), so there is no false alarm.
//!
//! Not done: a TPM NV counter (monotonic, survives copying the node directory). The node
//! key file and its checkpoint live on the same disk; whoever can roll back *both* (the
//! node's own administrator, not the database administrator) is not detected.
//!
//! Object rows: a restored database brings back old object rows *and* the old chain, which
//! this check detects; rows rolled back one by one with the chain untouched are refused by
//! the store's revision floors, which the node keeps beside this file
//! ([`crate::row_floors`]).
use crate::audit::{Ed25519AuditSigner, verify_signature};
use crate::error::{KmsError, KmsResult};
use caas_store::{AuditEntry, Batch, HeadObserver, Store};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// At most this long between fsyncs of the checkpoint file while the chain moves.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Operation name of the record appended when an operator accepts a rollback.
pub const ACCEPT_OPERATION: &str = "AcceptAuditRollback";

const DOMAIN: &[u8] = b"caas/audit-checkpoint/v1\0";
/// A slot signed for itself (module doc).
const FILE_VERSION: u32 = 1;
/// A slot carrying the head record's own signature (module doc).
const FILE_VERSION_RECORD: u32 = 2;
/// Bytes per slot; the file has two.
const SLOT: usize = 512;

/// The checkpoint file of a node key file: `<node key file>.audit-checkpoint`.
pub fn path_for(node_key_file: &Path) -> PathBuf {
    let mut name = node_key_file.as_os_str().to_owned();
    name.push(".audit-checkpoint");
    PathBuf::from(name)
}

/// A signed statement "the chain held record `seq` with hash `hash` at `time_ms`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Seq of the chain head (0: empty chain).
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// When the node wrote it (Unix ms).
    pub time_ms: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    seq: u64,
    hash: String,
    time_ms: i64,
    signature: String,
}

impl Checkpoint {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&self.hash);
        m.extend_from_slice(&self.time_ms.to_be_bytes());
        m
    }

    fn encode(&self, signer: &Ed25519AuditSigner) -> Vec<u8> {
        self.slot(FILE_VERSION, &signer.sign_bytes(&self.signed_bytes()))
    }

    /// A version-2 slot: `record_signature` is the audit key's signature over `self.hash`.
    fn encode_record(&self, record_signature: &[u8]) -> Vec<u8> {
        self.slot(FILE_VERSION_RECORD, record_signature)
    }

    fn slot(&self, version: u32, signature: &[u8]) -> Vec<u8> {
        let f = FileFormat {
            version,
            seq: self.seq,
            hash: hex::encode(self.hash),
            time_ms: self.time_ms,
            signature: hex::encode(signature),
        };
        let mut out = serde_json::to_vec(&f).unwrap_or_default();
        // A signed JSON checkpoint is ~300 bytes; pad to the slot, newline last.
        out.resize(SLOT - 1, b' ');
        out.push(b'\n');
        out
    }

    fn decode(slot: &[u8], audit_public_key: &[u8]) -> Result<Checkpoint, String> {
        let f: FileFormat =
            serde_json::from_slice(slot).map_err(|_| "it is not a checkpoint".to_string())?;
        if f.version != FILE_VERSION && f.version != FILE_VERSION_RECORD {
            return Err(format!("unsupported version {}", f.version));
        }
        let hash: [u8; 32] = hex::decode(&f.hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or("its hash is not 32 bytes of hex")?;
        let sig = hex::decode(&f.signature).map_err(|_| "its signature is not hex")?;
        let cp = Checkpoint {
            seq: f.seq,
            hash,
            time_ms: f.time_ms,
        };
        let signed = if f.version == FILE_VERSION {
            verify_signature(audit_public_key, &cp.signed_bytes(), &sig)
        } else {
            verify_signature(audit_public_key, &cp.hash, &sig)
        };
        if !signed {
            return Err("its signature does not verify with this node's audit key".into());
        }
        Ok(cp)
    }

    /// Reads and verifies a checkpoint file: the valid slot with the highest seq (a slot
    /// torn by a crash is skipped). `Ok(None)`: there is no file, or it is empty.
    pub fn read(path: &Path, audit_public_key: &[u8]) -> Result<Option<Checkpoint>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read it: {}", e.kind())),
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        let mut best: Option<Checkpoint> = None;
        let mut why = String::from("it is not a checkpoint");
        for slot in bytes.chunks(SLOT).take(2) {
            match Self::decode(slot, audit_public_key) {
                Ok(cp) if best.is_none_or(|b| cp.seq > b.seq) => best = Some(cp),
                Ok(_) => {}
                Err(e) => why = e,
            }
        }
        best.map(Some).ok_or(why)
    }
}

/// How a chain compares to a node's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// No checkpoint yet (a new node, or a node that never committed).
    NoCheckpoint {
        /// The chain head seq.
        head_seq: u64,
    },
    /// The chain contains the checkpointed record and reaches at least that far.
    Fresh {
        /// The checkpoint.
        checkpoint: Checkpoint,
        /// The chain head seq (≥ the checkpoint's).
        head_seq: u64,
    },
    /// Rolled back, cut or restored: the node must not serve without the override.
    Stale(Rollback),
}

impl Freshness {
    /// True unless stale.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Freshness::Stale(_))
    }
}

/// What a stale chain looks like against the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The checkpoint file.
    pub path: PathBuf,
    /// The checkpoint, when it could be read.
    pub checkpoint: Option<Checkpoint>,
    /// The database's chain head.
    pub head_seq: u64,
    /// Its hash.
    pub head_hash: [u8; 32],
    /// Why the chain is not fresh.
    pub reason: RollbackReason,
}

/// Why a chain is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackReason {
    /// The head is behind the checkpoint (tail cut, head row rolled back, or an old backup);
    /// `record_present`: the checkpointed record itself is still stored (only the head row
    /// was moved back).
    HeadBehind {
        /// Whether the checkpointed record is still in the table.
        record_present: bool,
    },
    /// The record at the checkpoint's seq is missing although the head is past it.
    RecordMissing,
    /// The record at the checkpoint's seq has another hash (restored or rewritten history).
    RecordDiffers,
    /// The checkpoint file exists but cannot be trusted (the message says why).
    Unreadable(String),
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = format!(
            "the database's audit head is record {} ({})",
            self.head_seq,
            short(&self.head_hash)
        );
        let cp = |c: &Option<Checkpoint>| match c {
            Some(c) => format!("record {} ({})", c.seq, short(&c.hash)),
            None => "?".into(),
        };
        match &self.reason {
            RollbackReason::HeadBehind { record_present } => write!(
                f,
                "{head}, behind this node's checkpoint at {} in {}: {}",
                cp(&self.checkpoint),
                self.path.display(),
                if *record_present {
                    "the head row was rolled back"
                } else {
                    "the chain's tail was cut or the database restored from an old backup"
                }
            ),
            RollbackReason::RecordMissing => write!(
                f,
                "this node's checkpoint at {} in {} names a record the database no longer has ({head}): the chain was cut and rewritten",
                cp(&self.checkpoint),
                self.path.display()
            ),
            RollbackReason::RecordDiffers => write!(
                f,
                "the database's record at this node's checkpoint {} in {} has another hash ({head}): the database was restored from another history or rewritten",
                cp(&self.checkpoint),
                self.path.display()
            ),
            RollbackReason::Unreadable(why) => write!(
                f,
                "the audit checkpoint {} cannot be trusted: {why} ({head})",
                self.path.display()
            ),
        }
    }
}

fn short(h: &[u8; 32]) -> String {
    hex::encode(&h[..8])
}

/// Compares the chain in `store` with the checkpoint at `path`. The checkpoint is read
/// *before* the head, so a node committing meanwhile cannot make a fresh chain look stale.
pub async fn check(store: &Store, path: &Path, audit_public_key: &[u8]) -> KmsResult<Freshness> {
    let read = Checkpoint::read(path, audit_public_key);
    let (head_seq, head_hash) = store.audit_head().await.map_err(KmsError::store)?;
    let stale = |checkpoint, reason| {
        Freshness::Stale(Rollback {
            path: path.to_owned(),
            checkpoint,
            head_seq,
            head_hash,
            reason,
        })
    };
    let cp = match read {
        Ok(None) => return Ok(Freshness::NoCheckpoint { head_seq }),
        Ok(Some(cp)) => cp,
        Err(why) => return Ok(stale(None, RollbackReason::Unreadable(why))),
    };
    if cp.seq == 0 {
        return Ok(Freshness::Fresh {
            checkpoint: cp,
            head_seq,
        });
    }
    // The record at the checkpoint's seq, read leniently (a malformed row counts as other).
    let stored = match store.audit_list(None, cp.seq - 1, 1).await {
        Ok(mut v) => v.pop().filter(|r| r.seq == cp.seq).map(|r| r.hash),
        Err(caas_store::Error::Corrupt(_)) => Some([0u8; 32]),
        Err(e) => return Err(KmsError::store(e)),
    };
    let same = stored.is_some_and(|h| h == cp.hash);
    Ok(if head_seq < cp.seq {
        stale(
            Some(cp),
            RollbackReason::HeadBehind {
                record_present: same,
            },
        )
    } else if stored.is_none() {
        stale(Some(cp), RollbackReason::RecordMissing)
    } else if !same {
        stale(Some(cp), RollbackReason::RecordDiffers)
    } else {
        Freshness::Fresh {
            checkpoint: cp,
            head_seq,
        }
    })
}

/// A committed head `(seq, hash, its record's signature)` waiting for the writer thread.
type CommittedHead = (u64, [u8; 32], Vec<u8>);

/// Keeps a node's checkpoint file: a slot rewritten after every group commit (page cache),
/// the file synced every [`SYNC_INTERVAL`] and at shutdown (see the module doc).
pub struct CheckpointWriter {
    path: PathBuf,
    file: std::fs::File,
    signer: Arc<Ed25519AuditSigner>,
    /// The store signs its records with `signer`'s key: a committed head's record signature
    /// makes a version-2 slot (module doc) instead of a new signature.
    record_signatures: bool,
    dirty: AtomicBool,
    /// Which slot the next write goes to.
    next_slot: AtomicU64,
    /// Serialises slot writes (a sync's flush and the writer thread may race).
    writing: Mutex<()>,
    /// The newest committed head not yet written (with its record's signature), and the
    /// writer thread's wake-up.
    pending: Mutex<Option<CommittedHead>>,
    wake: Condvar,
}

impl fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl CheckpointWriter {
    /// Opens (creating, mode 0600) the checkpoint file `path`, signing with the node's
    /// audit key. The slot written first is the one not holding the newest checkpoint.
    /// `record_signatures`: the store signs its audit records with the same key (a node
    /// outside a KMS domain), so committed heads are written with their record's signature
    /// (version 2) and not signed again.
    pub fn open(
        path: PathBuf,
        signer: Arc<Ed25519AuditSigner>,
        current: Option<&Checkpoint>,
        record_signatures: bool,
    ) -> std::io::Result<Self> {
        // Created empty with mode 0600 by the one secret-file writer, then updated in place
        // slot by slot (never through a symbolic link).
        let file = caas_crypto::fs::open_secret_in_place(&path)?;
        // Write first over the slot that does not hold `current` (if it is in the file).
        let bytes = std::fs::read(&path).unwrap_or_default();
        let public = signer.public_key();
        let newest_slot = bytes
            .chunks(SLOT)
            .take(2)
            .position(|s| current.is_some_and(|c| Checkpoint::decode(s, &public).ok() == Some(*c)));
        Ok(CheckpointWriter {
            path,
            file,
            signer,
            record_signatures,
            dirty: AtomicBool::new(false),
            next_slot: AtomicU64::new(match newest_slot {
                Some(0) => 1,
                _ => 0,
            }),
            writing: Mutex::new(()),
            pending: Mutex::new(None),
            wake: Condvar::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `(seq, hash, now)`, signed, over the older slot (one `pwrite`); no fsync.
    pub fn write(&self, seq: u64, hash: &[u8; 32]) -> std::io::Result<()> {
        let bytes = Checkpoint {
            seq,
            hash: *hash,
            time_ms: crate::now_ms(),
        }
        .encode(&self.signer);
        self.write_slot(&bytes)
    }

    /// Writes the committed head `(seq, hash)` whose record the store signed with
    /// `record_signature`: as a version-2 slot when the store signs with this writer's key
    /// and the signature is there, else signed ([`Self::write`]).
    fn write_committed(
        &self,
        seq: u64,
        hash: &[u8; 32],
        record_signature: &[u8],
    ) -> std::io::Result<()> {
        if !self.record_signatures || record_signature.is_empty() {
            return self.write(seq, hash);
        }
        let bytes = Checkpoint {
            seq,
            hash: *hash,
            time_ms: crate::now_ms(),
        }
        .encode_record(record_signature);
        self.write_slot(&bytes)
    }

    fn write_slot(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let _one_at_a_time = self
            .writing
            .lock()
            .map_err(|_| std::io::Error::other("checkpoint writer lock poisoned"))?;
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % 2;
        self.file.write_all_at(bytes, slot * SLOT as u64)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes the newest committed head that is not written yet, if any.
    fn flush_pending(&self) -> std::io::Result<()> {
        let next = self
            .pending
            .lock()
            .map_err(|_| std::io::Error::other("checkpoint lock poisoned"))?
            .take();
        match next {
            Some((seq, hash, signature)) => self.write_committed(seq, &hash, &signature),
            None => Ok(()),
        }
    }

    /// Writes any pending head, then makes the written checkpoints durable if they are not yet.
    pub fn sync(&self) -> std::io::Result<()> {
        self.flush_pending()?;
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let synced = self.file.sync_data();
        if synced.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        synced
    }

    /// Starts the thread that signs and writes the heads [`HeadObserver::committed`]
    /// records, while `self` is alive elsewhere.
    fn spawn_writer(self: &Arc<Self>) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("audit-checkpoint".into())
            .spawn(move || {
                loop {
                    let Some(w) = weak.upgrade() else { return };
                    let waited = w.pending.lock().ok().and_then(|g| {
                        w.wake
                            .wait_timeout_while(g, SYNC_INTERVAL, |p| p.is_none())
                            .ok()
                            .map(|(g, _)| g.is_some())
                    });
                    match waited {
                        None => return,
                        Some(false) => continue,
                        Some(true) => {
                            if let Err(e) = w.flush_pending() {
                                tracing::error!(error = %e, path = %w.path.display(), "cannot write the audit checkpoint");
                            }
                        }
                    }
                }
            })
            .map(|_| ())
    }

    /// Syncs every [`SYNC_INTERVAL`] while `self` is alive elsewhere (a background task).
    pub fn spawn_syncer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(SYNC_INTERVAL);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                let Some(w) = weak.upgrade() else { return };
                let r = tokio::task::spawn_blocking(move || w.sync()).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "cannot sync the audit checkpoint");
                }
            }
        });
    }
}

impl HeadObserver for CheckpointWriter {
    /// Records the new head for the writer thread (never moves backwards).
    fn committed(&self, seq: u64, hash: &[u8; 32], signature: &[u8]) {
        if let Ok(mut g) = self.pending.lock() {
            if g.as_ref().is_none_or(|(s, _, _)| seq > *s) {
                *g = Some((seq, *hash, signature.to_vec()));
            }
            self.wake.notify_one();
        }
    }
}

/// What to do at start-up when the chain is stale against the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRollback {
    /// Refuse to open (the default).
    Refuse,
    /// The operator accepts the database as it is: append an audited
    /// [`ACCEPT_OPERATION`] record and continue from the database's head.
    Accept,
}

/// Checks the chain against the node's checkpoint, anchors the store's writer at the
/// checked head, and keeps the checkpoint from now on. Returns the writer (sync it at
/// shutdown) and what was found.
/// `record_signatures`: the store signs its audit records with `signer`'s key (see
/// [`CheckpointWriter::open`]).
pub async fn attach(
    store: &Store,
    path: PathBuf,
    signer: Arc<Ed25519AuditSigner>,
    on_rollback: OnRollback,
    record_signatures: bool,
) -> KmsResult<(Arc<CheckpointWriter>, Freshness)> {
    let public = signer.public_key();
    let found = check(store, &path, &public).await?;
    let current = match &found {
        Freshness::Fresh { checkpoint, .. } => Some(*checkpoint),
        Freshness::Stale(r) => r.checkpoint,
        Freshness::NoCheckpoint { .. } => None,
    };
    let writer = CheckpointWriter::open(path.clone(), signer, current.as_ref(), record_signatures)
        .map_err(|e| {
            KmsError::Internal(format!(
                "cannot open the audit checkpoint {}: {}",
                path.display(),
                e.kind()
            ))
        })?;
    let writer = Arc::new(writer);
    let (head_seq, head_hash) = store.audit_head().await.map_err(KmsError::store)?;
    match &found {
        Freshness::Stale(r) if on_rollback == OnRollback::Refuse => {
            tracing::error!(problem = %r, "refusing to serve: audit chain is not fresh");
            return Err(KmsError::Internal(format!(
                "refusing to start: {r}. If this database state is intended (a deliberate \
                 restore), start once with --accept-audit-rollback; that is itself audited"
            )));
        }
        Freshness::Stale(r) => {
            tracing::warn!(problem = %r, "operator accepted an audit rollback");
            store.anchor_audit(head_seq, head_hash, writer.clone());
            let cp = r.checkpoint.as_ref();
            let detail = serde_json::json!({
                "reason": r.to_string(),
                "checkpoint": cp.map(|c| serde_json::json!({
                    "seq": c.seq, "hash": hex::encode(c.hash), "time_ms": c.time_ms,
                })),
                "checkpoint_file": r.path.display().to_string(),
                "accepted_head": { "seq": r.head_seq, "hash": hex::encode(r.head_hash) },
                // The caller discards the node's row floors of the earlier state
                // (`crate::row_floors::attach`).
                "row_floors": "discarded",
            });
            let mut entry: AuditEntry = crate::audit::system_entry(ACCEPT_OPERATION, "");
            entry.detail = detail.to_string();
            let info = store
                .commit(Batch {
                    writes: vec![],
                    audit: vec![entry],
                })
                .await
                .map_err(KmsError::store)?;
            // The old checkpoint (with a higher seq) must not survive in the other slot:
            // write the accepting record into both.
            let seq = info.audit_seqs.first().copied().unwrap_or(0);
            let rec = store
                .audit_list(None, seq.saturating_sub(1), 1)
                .await
                .map_err(KmsError::store)?;
            let hash = rec
                .first()
                .filter(|r| r.seq == seq)
                .map(|r| r.hash)
                .ok_or_else(|| KmsError::Internal("the accepting audit record vanished".into()))?;
            for _ in 0..2 {
                writer.write(seq, &hash).map_err(|e| {
                    KmsError::Internal(format!(
                        "cannot write the audit checkpoint {}: {}",
                        writer.path().display(),
                        e.kind()
                    ))
                })?;
            }
        }
        Freshness::Fresh { .. } | Freshness::NoCheckpoint { .. } => {
            store.anchor_audit(head_seq, head_hash, writer.clone());
            writer.write(head_seq, &head_hash).map_err(|e| {
                KmsError::Internal(format!(
                    "cannot write the audit checkpoint {}: {}",
                    writer.path().display(),
                    e.kind()
                ))
            })?;
        }
    }
    // Durable from the start (a new anchor, or the override's record).
    writer.sync().map_err(|e| {
        KmsError::Internal(format!(
            "cannot sync the audit checkpoint {}: {}",
            writer.path().display(),
            e.kind()
        ))
    })?;
    writer.spawn_writer().map_err(|e| {
        KmsError::Internal(format!(
            "cannot start the audit checkpoint writer: {}",
            e.kind()
        ))
    })?;
    writer.spawn_syncer();
    Ok((writer, found))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]
    use super::*;

    fn signer(seed: u8) -> Arc<Ed25519AuditSigner> {
        Arc::new(Ed25519AuditSigner::from_seed(&[seed; 32]).unwrap())
    }

    #[test]
    fn slots_survive_a_torn_write_and_refuse_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("node.key"));
        assert_eq!(path, dir.path().join("node.key.audit-checkpoint"));
        let s = signer(1);
        let pk = s.public_key();
        assert_eq!(Checkpoint::read(&path, &pk), Ok(None));
        let w = CheckpointWriter::open(path.clone(), s.clone(), None, false).unwrap();
        w.write(5, &[5; 32]).unwrap();
        w.write(6, &[6; 32]).unwrap();
        w.write(7, &[7; 32]).unwrap();
        w.sync().unwrap();
        let cp = Checkpoint::read(&path, &pk).unwrap().unwrap();
        assert_eq!((cp.seq, cp.hash), (7, [7; 32]));
        // A crash tears the slot being written: the previous checkpoint remains.
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 2 * SLOT);
        bytes[10] ^= 0x55; // slot 0 holds seq 7 (5, 6, 7 alternate 0, 1, 0)
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Checkpoint::read(&path, &pk).unwrap().unwrap().seq, 6);
        // Reopened, the writer first overwrites the slot not holding the newest checkpoint.
        let six = Checkpoint::read(&path, &pk).unwrap().unwrap();
        let w = CheckpointWriter::open(path.clone(), s.clone(), Some(&six), false).unwrap();
        w.write(8, &[8; 32]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(Checkpoint::read(&path, &pk).unwrap().unwrap().seq, 8);
        bytes[SLOT + 10] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Checkpoint::read(&path, &pk).unwrap().unwrap().seq, 8);
        // Another node key's signature is refused; garbage is refused.
        assert!(Checkpoint::read(&path, &signer(2).public_key()).is_err());
        std::fs::write(&path, b"{}").unwrap();
        assert!(Checkpoint::read(&path, &pk).is_err());
        // An edited seq breaks the signature.
        let w = CheckpointWriter::open(path.clone(), s, None, false).unwrap();
        w.write(3, &[3; 32]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"seq\":3", "\"seq\":9", 1)).unwrap();
        let r = Checkpoint::read(&path, &pk);
        assert!(r.as_ref().is_err_and(|e| e.contains("signature")), "{r:?}");
    }

    /// Version-2 slots carry the head record's own signature: read back as checkpoints,
    /// and from the position of whoever can write the file, nothing but a genuine record
    /// signature of this node makes one.
    #[test]
    fn record_signature_slots_verify_and_refuse_forgeries() {
        use caas_store::AuditSigner as _;
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("node.key"));
        let s = signer(1);
        let pk = s.public_key();
        let w = CheckpointWriter::open(path.clone(), s.clone(), None, true).unwrap();
        let (h9, h10) = ([9u8; 32], [10u8; 32]);
        w.write_committed(9, &h9, &s.sign(&h9)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\":2"), "{text}");
        let cp = Checkpoint::read(&path, &pk).unwrap().unwrap();
        assert_eq!((cp.seq, cp.hash), (9, h9));
        // A record signature over another hash (another head of the chain) is no signature
        // of this head: that slot is refused and the other (seq 9) stays the checkpoint.
        w.write_committed(10, &h10, &s.sign(&h9)).unwrap();
        assert_eq!(Checkpoint::read(&path, &pk).unwrap().unwrap().seq, 9);
        // Another key's record signature is refused.
        w.write_committed(9, &h9, &s.sign(&h9)).unwrap();
        w.write_committed(10, &h10, &signer(2).sign(&h10)).unwrap();
        assert_eq!(Checkpoint::read(&path, &pk).unwrap().unwrap().seq, 9);
        // A version-1 slot relabelled version 2 (or the reverse) does not verify: the two
        // sign different messages.
        let w1 = CheckpointWriter::open(path.clone(), s.clone(), None, true).unwrap();
        w1.write(11, &[11; 32]).unwrap();
        w1.write(11, &[11; 32]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\":1", "\"version\":2")).unwrap();
        assert!(Checkpoint::read(&path, &pk).is_err());
        w1.write_committed(12, &[12; 32], &s.sign(&[12; 32]))
            .unwrap();
        w1.write_committed(12, &[12; 32], &s.sign(&[12; 32]))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\":2", "\"version\":1")).unwrap();
        assert!(Checkpoint::read(&path, &pk).is_err());
        // A writer whose store signs with another key (a KMS domain) signs each checkpoint.
        let wd = CheckpointWriter::open(path.clone(), s.clone(), None, false).unwrap();
        wd.write_committed(13, &[13; 32], &[1, 2, 3]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\":1"), "{text}");
        assert_eq!(Checkpoint::read(&path, &pk).unwrap().unwrap().seq, 13);
    }

    /// The seq of a version-2 slot is not under its signature, but its hash commits to it:
    /// a genuine slot moved to another seq (by whoever can write the file) names a record the
    /// chain does not hold there, and the check reports the chain stale rather than fresh.
    #[tokio::test]
    async fn a_record_signature_slot_moved_to_another_seq_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(1);
        let pk = s.public_key();
        let db = dir.path().join("kms.sqlite3");
        let store = Store::open(
            db.to_str().unwrap(),
            s.clone(),
            Arc::new(caas_store::HmacRecordKey::new(&[7; 32])),
        )
        .await
        .unwrap();
        for i in 0..4 {
            let mut e = crate::audit::system_entry("Test", &format!("{i}"));
            e.request_id = format!("r{i}");
            store
                .commit(Batch {
                    writes: vec![],
                    audit: vec![e],
                })
                .await
                .unwrap();
        }
        let path = path_for(&dir.path().join("node.key"));
        let (writer, found) = attach(&store, path.clone(), s.clone(), OnRollback::Refuse, true)
            .await
            .unwrap();
        assert!(
            matches!(found, Freshness::NoCheckpoint { head_seq: 4 }),
            "{found:?}"
        );
        // Record 3, signed by its group commit: a genuine version-2 slot, in both slots...
        let rec3 = store.audit_list(None, 2, 1).await.unwrap().remove(0);
        assert!(!rec3.signature.is_empty());
        let both_slots_at_3 = || {
            for _ in 0..2 {
                writer
                    .write_committed(3, &rec3.hash, &rec3.signature)
                    .unwrap();
            }
        };
        both_slots_at_3();
        let fresh = check(&store, &path, &pk).await.unwrap();
        assert!(matches!(fresh, Freshness::Fresh { .. }), "{fresh:?}");
        // ... claimed for seq 2 (behind) or 6 (ahead of the head): stale either way.
        for (seq, want) in [
            (2, RollbackReason::RecordDiffers),
            (
                6,
                RollbackReason::HeadBehind {
                    record_present: false,
                },
            ),
        ] {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text.replace("\"seq\":3", &format!("\"seq\":{seq}"))).unwrap();
            match check(&store, &path, &pk).await.unwrap() {
                Freshness::Stale(r) => assert_eq!(r.reason, want, "seq {seq}"),
                other => panic!("seq {seq}: {other:?}"),
            }
            both_slots_at_3();
        }
    }
}
