//! Row floors kept across restarts: the revision floors of the node's store
//! ([`caas_store::Store::floors_export`], the newest revision of each object row the node
//! has written or read, and the revision at which it deleted a row) in a signed file beside
//! the node key (`<node key file>.row-floors`), where the database administrator cannot
//! write. Loaded at start-up, they make the store refuse a row put back at an older
//! revision, or a deleted row put back, even when it was done while the node was down
//! (`kms_db_attacks::dba_row_rolled_back_while_the_node_was_down_is_refused`, and after a
//! SIGKILL on PostgreSQL).
//!
//! File: the store's export followed by the node's audit key's Ed25519 signature over
//! `DOMAIN ‖ export` (64 bytes). Written by a background task at most every
//! [`PERSIST_INTERVAL`] when the floors moved, and at clean shutdown: write to a temporary
//! file, fsync, rename over, fsync the directory, so a crash leaves the previous file or
//! the new one. Floors only ever describe durable commits, so the file is never ahead of
//! the database: no false alarm after a crash. What the file lags (floors moved in the last
//! [`PERSIST_INTERVAL`] before a power loss or SIGKILL) is not protected across that restart;
//! the running node protected it while it ran.
//!
//! Cost: the file is rewritten whole, 25 bytes per row the node has touched (a million
//! rows: 25 MB every [`PERSIST_INTERVAL`] while rows change, off the request path). An
//! append-only journal of floor moves, compacted now and then, would remove that at scale.
//!
//! Start-up policy ([`attach`]): no file is a new node (or one upgraded from before floors);
//! a file that does not verify under the node's audit key (damaged, or not this node's)
//! refuses the start like a stale audit checkpoint. A deliberate restore started with
//! `--accept-audit-rollback` discards the floors (they describe the state before the
//! restore), and the accepting audit record says so (`"row_floors": "discarded"`).
//!
//! The serving process keeps the file; `caas admin` commands (short-lived processes on the
//! same node key) load it too. Should one of them write it, the file loses at most the
//! server's moves since that command started, until the server's next write: less
//! coverage, never a false refusal (floors only describe durable states).
//!
//! Same limit as the checkpoint: whoever can roll back the node's own files (the node's
//! administrator, not the database administrator) can roll back this file too.

use crate::audit::{Ed25519AuditSigner, verify_signature};
use crate::error::{KmsError, KmsResult};
use caas_store::Store;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// At most this long between writes of the floor file while the floors move.
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(2);

/// Domain separator of the file's signature.
const DOMAIN: &[u8] = b"caas/kms/row-floors/v1\0";
/// Ed25519 signature length.
const SIGNATURE: usize = 64;

/// The floor file of a node key file: `<node key file>.row-floors`.
pub fn path_for(node_key_file: &Path) -> PathBuf {
    let mut name = node_key_file.as_os_str().to_owned();
    name.push(".row-floors");
    PathBuf::from(name)
}

fn signed_message(export: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + export.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(export);
    m
}

/// At start-up, after the audit checkpoint was checked (`fresh`: it was not stale): loads
/// the node's floors into `store` (refusing the start when the file does not verify), or,
/// when an operator accepted a stale chain, discards them. Returns the keeper that writes
/// them from now on.
pub fn attach(
    store: &Store,
    node_key_file: &Path,
    signer: Arc<Ed25519AuditSigner>,
    fresh: bool,
) -> KmsResult<Arc<FloorKeeper>> {
    let path = path_for(node_key_file);
    if fresh {
        if let Some(n) = load(store, &path, &signer.public_key())? {
            tracing::info!(rows = n, file = %path.display(), "row floors loaded");
        }
    } else {
        tracing::warn!(file = %path.display(),
            "audit rollback accepted: the row floors of the earlier state are discarded");
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(KmsError::Internal(format!(
                    "cannot discard the row floor file {}: {}",
                    path.display(),
                    e.kind()
                )));
            }
        }
    }
    Ok(Arc::new(FloorKeeper {
        store: store.clone(),
        path,
        signer,
        written: Mutex::new(store.floors_generation()),
    }))
}

/// Reads, verifies and imports the floor file. `Ok(None)`: there is none.
fn load(store: &Store, path: &Path, audit_public: &[u8]) -> KmsResult<Option<usize>> {
    let refuse = |why: &str| {
        KmsError::Internal(format!(
            "refusing to start: the row floor file {} {why}. If this database state is \
             intended (a deliberate restore), start once with --accept-audit-rollback, which \
             discards it",
            path.display()
        ))
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refuse(&format!("cannot be read ({})", e.kind()))),
    };
    let Some(split) = bytes.len().checked_sub(SIGNATURE) else {
        return Err(refuse("is truncated"));
    };
    let (export, signature) = bytes.split_at(split);
    if !verify_signature(audit_public, &signed_message(export), signature) {
        return Err(refuse("does not verify under this node's audit key"));
    }
    store
        .floors_import(export)
        .map(Some)
        .map_err(|e| refuse(&format!("is malformed ({e})")))
}

/// Writes the node's floors to its floor file when they moved.
pub struct FloorKeeper {
    store: Store,
    path: PathBuf,
    signer: Arc<Ed25519AuditSigner>,
    /// The floors' generation the file holds.
    written: Mutex<u64>,
}

impl std::fmt::Debug for FloorKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FloorKeeper")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FloorKeeper {
    /// Writes the floors if they moved since the last write (blocking: file I/O and
    /// fsyncs). Returns whether it wrote.
    pub fn persist(&self) -> std::io::Result<bool> {
        let mut written = self
            .written
            .lock()
            .map_err(|_| std::io::Error::other("floor keeper lock poisoned"))?;
        let (generation, export) = self.store.floors_export();
        if generation == *written {
            return Ok(false);
        }
        let signature = self.signer.sign_bytes(&signed_message(&export));
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&export)?;
            f.write_all(&signature)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)?.sync_all()?;
        }
        *written = generation;
        Ok(true)
    }

    /// Writes the floors every [`PERSIST_INTERVAL`] while `keeper` lives (on the current
    /// tokio runtime; the writes run on its blocking pool).
    pub fn spawn(keeper: &Arc<FloorKeeper>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(keeper);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(PERSIST_INTERVAL).await;
                let Some(k) = weak.upgrade() else { break };
                match tokio::task::spawn_blocking(move || k.persist()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the row floors"),
                    Err(e) => {
                        tracing::error!(error = %e, "the row floor writer stopped");
                        break;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]
    use super::*;

    async fn store(dir: &Path) -> Store {
        let signer = Arc::new(Ed25519AuditSigner::from_seed(&[1; 32]).unwrap());
        Store::open(
            dir.join("db.sqlite3").to_str().unwrap(),
            signer,
            Arc::new(caas_store::HmacRecordKey::new(&[2; 32])),
        )
        .await
        .unwrap()
    }

    fn put(id: &str, expect_rev: i64) -> caas_store::Batch {
        caas_store::Batch {
            writes: vec![caas_store::Write::Put {
                kind: "key".into(),
                account: "a".into(),
                id: id.into(),
                body: b"x".to_vec(),
                expect_rev: Some(expect_rev),
            }],
            audit: vec![],
        }
    }

    /// Attacker: the host's other users or a damaged disk. A floor file that does not
    /// verify (edited, truncated, another node's) stops the start; the override discards it.
    #[tokio::test]
    async fn the_floor_file_round_trips_and_a_bad_one_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("node.key");
        let signer = Arc::new(Ed25519AuditSigner::from_seed(&[3; 32]).unwrap());
        let s = store(dir.path()).await;
        let keeper = attach(&s, &key_file, signer.clone(), true).unwrap();
        assert!(!keeper.persist().unwrap(), "nothing moved yet");
        s.commit(put("k", 0)).await.unwrap();
        s.commit(put("k", 1)).await.unwrap();
        assert!(keeper.persist().unwrap());
        assert!(!keeper.persist().unwrap());
        let path = path_for(&key_file);
        let good = std::fs::read(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A new handle gets the floors back.
        let t = store(dir.path()).await;
        attach(&t, &key_file, signer.clone(), true).unwrap();
        assert_eq!(t.floors_export().1, s.floors_export().1);
        // Edited, truncated, or signed by another node: refused, naming the file.
        let mut edited = good.clone();
        edited[30] ^= 1;
        let other = Arc::new(Ed25519AuditSigner::from_seed(&[4; 32]).unwrap());
        for bad in [edited, good[..40].to_vec(), good[..10].to_vec()] {
            std::fs::write(&path, &bad).unwrap();
            let e = attach(&store(dir.path()).await, &key_file, signer.clone(), true)
                .unwrap_err()
                .to_string();
            assert!(e.contains("row floor file"), "{e}");
        }
        std::fs::write(&path, &good).unwrap();
        let e = attach(&store(dir.path()).await, &key_file, other, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");
        // The override (a stale chain accepted) discards the file.
        attach(&store(dir.path()).await, &key_file, signer, false).unwrap();
        assert!(!path.exists());
    }
}
