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
//!   commit it hands the new head to [`CheckpointWriter`], which rewrites the file before the
//!   group's callers are answered.
//! - **`caas audit verify`** runs the same comparison ([`check`]) and fails on a stale head.
//!
//! Durability policy: the file is replaced atomically (write a temp file, rename) after every
//! group commit **without** fsync — it is in the page cache, so a killed process (SIGKILL,
//! crash of the service) loses nothing — and fsynced (file and directory) at most every
//! [`SYNC_INTERVAL`] by a background task and at shutdown. An fsync per commit would double
//! the fsyncs of the group commit. Remaining window, honestly: after a power loss or kernel
//! crash the checkpoint may be up to [`SYNC_INTERVAL`] older than the last acknowledged
//! commit, and records acknowledged in that last second could be cut without detection
//! (the checkpoint is never *ahead* of the database: it is written after the durable
//! commit, so no false alarm). On file systems that do not order a rename after the data it
//! renames (not ext4 with its default `auto_da_alloc`), such a crash can also leave an empty
//! checkpoint file, which start-up reports as unreadable (override needed).
//!
//! Not done: a TPM NV counter (monotonic, survives copying the node directory). The node
//! key file and its checkpoint live on the same disk; whoever can roll back *both* (the
//! node's own administrator, not the database administrator) is not detected.
//!
//! Object rows have no freshness of their own beyond this: a restored database brings back
//! old object rows *and* the old chain, which this check detects; rows rolled back one by
//! one with the chain untouched are the record-authentication layer's concern.
use crate::audit::{Ed25519AuditSigner, verify_signature};
use crate::error::{KmsError, KmsResult};
use caas_store::{AuditEntry, Batch, HeadObserver, Store};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// At most this long between fsyncs of the checkpoint file while the chain moves.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Operation name of the record appended when an operator accepts a rollback.
pub const ACCEPT_OPERATION: &str = "AcceptAuditRollback";

const DOMAIN: &[u8] = b"caas/audit-checkpoint/v1\0";
const FILE_VERSION: u32 = 1;

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
        let f = FileFormat {
            version: FILE_VERSION,
            seq: self.seq,
            hash: hex::encode(self.hash),
            time_ms: self.time_ms,
            signature: hex::encode(signer.sign_bytes(&self.signed_bytes())),
        };
        let mut out = serde_json::to_vec(&f).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Reads and verifies a checkpoint file. `Ok(None)`: there is none.
    pub fn read(path: &Path, audit_public_key: &[u8]) -> Result<Option<Checkpoint>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read it: {}", e.kind())),
        };
        let f: FileFormat =
            serde_json::from_slice(&bytes).map_err(|_| "it is not a checkpoint".to_string())?;
        if f.version != FILE_VERSION {
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
        if !verify_signature(audit_public_key, &cp.signed_bytes(), &sig) {
            return Err("its signature does not verify with this node's audit key".into());
        }
        Ok(Some(cp))
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

/// Keeps a node's checkpoint file: rewritten after every group commit (page cache), synced
/// every [`SYNC_INTERVAL`] and at shutdown (see the module doc).
pub struct CheckpointWriter {
    path: PathBuf,
    signer: Arc<Ed25519AuditSigner>,
    dirty: AtomicBool,
    /// Serializes writers of this process (temp name, rename, sync).
    lock: Mutex<()>,
}

impl fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Distinguishes temp files of several writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl CheckpointWriter {
    /// A writer of `path`, signing with the node's audit key.
    pub fn new(path: PathBuf, signer: Arc<Ed25519AuditSigner>) -> Self {
        CheckpointWriter {
            path,
            signer,
            dirty: AtomicBool::new(false),
            lock: Mutex::new(()),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically replaces the checkpoint with `(seq, hash, now)`; no fsync.
    pub fn write(&self, seq: u64, hash: &[u8; 32]) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let bytes = Checkpoint {
            seq,
            hash: *hash,
            time_ms: crate::now_ms(),
        }
        .encode(&self.signer);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(format!(
            ".tmp.{}.{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = PathBuf::from(tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes the last written checkpoint durable (file and directory) if it is not yet.
    pub fn sync(&self) -> std::io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let synced = std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .and_then(|()| match self.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => std::fs::File::open(d)?.sync_all(),
                _ => std::fs::File::open(".")?.sync_all(),
            });
        if synced.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        synced
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
    fn committed(&self, seq: u64, hash: &[u8; 32]) {
        if let Err(e) = self.write(seq, hash) {
            // The commit is durable already; only the anchor lags. Say so loudly.
            tracing::error!(error = %e, path = %self.path.display(), seq, "cannot write the audit checkpoint");
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
pub async fn attach(
    store: &Store,
    path: PathBuf,
    signer: Arc<Ed25519AuditSigner>,
    on_rollback: OnRollback,
) -> KmsResult<(Arc<CheckpointWriter>, Freshness)> {
    let public = signer.public_key();
    let found = check(store, &path, &public).await?;
    let writer = Arc::new(CheckpointWriter::new(path, signer));
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
            });
            let mut entry: AuditEntry = crate::audit::system_entry(ACCEPT_OPERATION, "");
            entry.detail = detail.to_string();
            store
                .commit(Batch {
                    writes: vec![],
                    audit: vec![entry],
                })
                .await
                .map_err(KmsError::store)?;
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
    writer.spawn_syncer();
    Ok((writer, found))
}
