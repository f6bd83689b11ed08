//! The embedded SQLite backend: one writer thread owning the only write connection (group
//! commit, WAL, synchronous=FULL), and a small pool of read connections: point reads by
//! primary key run inline on an idle pooled connection (a WAL reader never waits for the
//! writer), everything else through `spawn_blocking`.

use crate::audit::{Head, RawAuditRow};
use crate::record::{RawObject, tag_row};
use crate::{
    Applied, AuditEntry, AuditSigner, Batch, CommitInfo, Counters, DEFERRED_GROUP_SPACING, Error,
    Job, MAX_GROUP, Object, RecordAuthenticator, Write, check_expect, insert_rev, next_rev,
    seq_to_i64,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// Version 2: object rows carry a MAC (`mac`). Version-1 databases are refused.
const SCHEMA_VERSION: &str = "2";
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_IDLE_READERS: usize = 8;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO store_meta (name, value) VALUES ('schema_version', '2');
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, account TEXT NOT NULL, id TEXT NOT NULL,
    rev INTEGER NOT NULL, body BLOB NOT NULL, mac BLOB NOT NULL,
    PRIMARY KEY (kind, account, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    kind TEXT NOT NULL, account TEXT NOT NULL, id TEXT NOT NULL, rev INTEGER NOT NULL,
    PRIMARY KEY (kind, account, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, account TEXT NOT NULL,
    principal TEXT NOT NULL, operation TEXT NOT NULL, key_id TEXT, result TEXT NOT NULL,
    request_id TEXT NOT NULL, detail TEXT NOT NULL,
    prev_hash BLOB NOT NULL, hash BLOB NOT NULL, signature BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS audit_log_account ON audit_log (account, seq);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash BLOB NOT NULL);
INSERT OR IGNORE INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));
";

const AUDIT_COLUMNS: &str = "seq, time_ms, account, principal, operation, key_id, result, \
     request_id, detail, prev_hash, hash, signature";

/// The append of one audit record (a literal: no formatting per record on the writer).
const INSERT_AUDIT: &str = "INSERT INTO audit_log (seq, time_ms, account, principal, \
     operation, key_id, result, request_id, detail, prev_hash, hash, signature) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

pub(crate) struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Backend {
            context: "running a blocking SQLite call",
            message: e.to_string(),
        })?
}

fn sq(context: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |e| Error::sqlite(context, e)
}

/// Creates the database file with mode 0600 if it does not exist (it holds wrapped keys;
/// SQLite gives its -wal and -shm files the same mode).
fn create_private(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Backend {
            context: "creating the database file",
            message: e.to_string(),
        }),
    }
}

fn open_writer(path: &Path) -> Result<Connection, Error> {
    create_private(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sq("opening the database"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sq("setting the busy timeout"))?;
    // Switching to WAL takes an exclusive lock; SQLite may answer SQLITE_BUSY without
    // calling the busy handler when another connection (another node, or a second store
    // in this process) holds a lock at that moment, so retry for up to the busy timeout.
    let started = std::time::Instant::now();
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
            Ok(m) => break m,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(sq("enabling WAL")(e)),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Backend {
            context: "enabling WAL",
            message: format!("journal_mode is {mode}"),
        });
    }
    conn.execute_batch("PRAGMA synchronous=FULL;")
        .map_err(sq("setting synchronous=FULL"))?;
    conn.set_prepared_statement_cache_capacity(32);
    // BEGIN IMMEDIATE takes the write lock up front, so two processes creating the schema at
    // once simply take turns (busy timeout).
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(sq("creating the schema"))?;
    let created = conn
        .execute_batch(SCHEMA)
        .map_err(sq("creating the schema"))
        .and_then(|()| {
            conn.query_row(
                "SELECT value FROM store_meta WHERE name = 'schema_version'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map_err(sq("reading the schema version"))
        });
    match created {
        Ok(v) if v == SCHEMA_VERSION => {
            conn.execute_batch("COMMIT")
                .map_err(sq("creating the schema"))?;
            Ok(conn)
        }
        Ok(found) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(Error::SchemaVersion {
                found,
                supported: SCHEMA_VERSION,
            })
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sq("opening a read connection"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sq("setting the busy timeout"))?;
    conn.execute_batch("PRAGMA query_only=ON;")
        .map_err(sq("opening a read connection"))?;
    Ok(conn)
}

/// Returns a reader connection to the idle pool (or closes it when the pool is full).
fn return_reader(pool: &Mutex<Vec<Connection>>, conn: Connection) {
    if let Ok(mut v) = pool.lock()
        && v.len() < MAX_IDLE_READERS
    {
        v.push(conn);
    }
}

fn row_to_object(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawObject> {
    Ok(RawObject {
        obj: Object {
            kind: r.get(0)?,
            account: r.get(1)?,
            id: r.get(2)?,
            rev: r.get(3)?,
            body: r.get(4)?,
        },
        // A MAC of another SQLite type (text, integer) or NULL is no MAC.
        mac: match r.get_ref(5)? {
            rusqlite::types::ValueRef::Blob(b) => Some(b.to_vec()),
            _ => None,
        },
    })
}

fn row_to_audit(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawAuditRow> {
    Ok(RawAuditRow {
        seq: r.get(0)?,
        entry: AuditEntry {
            time_ms: r.get(1)?,
            account: r.get(2)?,
            principal: r.get(3)?,
            operation: r.get(4)?,
            key_id: r.get(5)?,
            result: r.get(6)?,
            request_id: r.get(7)?,
            detail: r.get(8)?,
        },
        prev_hash: r.get(9)?,
        hash: r.get(10)?,
        signature: r.get(11)?,
    })
}

fn read_head(conn: &Connection) -> Result<Head, Error> {
    let row: Option<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(sq("reading the audit head"))?;
    let (seq, hash) = row.ok_or_else(|| Error::Corrupt("audit head row is missing".into()))?;
    Head::from_raw(seq, &hash)
}

impl SqliteStore {
    pub async fn open(
        path: &Path,
        signer: Arc<dyn AuditSigner>,
        records: Arc<dyn RecordAuthenticator>,
        stats: Arc<Counters>,
    ) -> Result<SqliteStore, Error> {
        let owned = path.to_owned();
        let conn = blocking(move || open_writer(&owned)).await?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("caas-store-writer".into())
            .spawn(move || writer_loop(conn, rx, signer, records, stats))
            .map_err(|e| Error::Backend {
                context: "starting the writer thread",
                message: e.to_string(),
            })?;
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let pool = self.readers.clone();
        let path = self.path.clone();
        blocking(move || {
            let pooled = pool.lock().ok().and_then(|mut v| v.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = f(&conn);
            return_reader(&pool, conn);
            result
        })
        .await
    }

    /// A point read by primary key. With an idle pooled connection it runs inline on the
    /// calling task: a WAL reader never waits for the writer, and a lookup of one row
    /// in a hot page cache costs less than the hop to the blocking pool (whose queue
    /// was the contended lock of the KMS hot path). Without one it goes through [`Self::read`],
    /// which may open a connection.
    pub async fn get(
        &self,
        kind: &str,
        account: &str,
        id: &str,
    ) -> Result<Option<RawObject>, Error> {
        fn lookup(
            c: &Connection,
            kind: &str,
            account: &str,
            id: &str,
        ) -> Result<Option<RawObject>, Error> {
            c.prepare_cached(
                "SELECT kind, account, id, rev, body, mac FROM objects \
                 WHERE kind = ?1 AND account = ?2 AND id = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![kind, account, id], row_to_object)
                    .optional()
            })
            .map_err(sq("reading an object"))
        }
        let idle = self.readers.lock().ok().and_then(|mut v| v.pop());
        if let Some(conn) = idle {
            let result = lookup(&conn, kind, account, id);
            return_reader(&self.readers, conn);
            return result;
        }
        let (kind, account, id) = (kind.to_owned(), account.to_owned(), id.to_owned());
        self.read(move |c| lookup(c, &kind, &account, &id)).await
    }

    pub async fn list(&self, kind: &str, account: Option<&str>) -> Result<Vec<RawObject>, Error> {
        let (kind, account) = (kind.to_owned(), account.map(str::to_owned));
        self.read(move |c| {
            let r = match account {
                Some(a) => c
                    .prepare_cached(
                        "SELECT kind, account, id, rev, body, mac FROM objects \
                         WHERE kind = ?1 AND account = ?2 ORDER BY account, id",
                    )
                    .and_then(|mut s| s.query_map(params![kind, a], row_to_object)?.collect()),
                None => c
                    .prepare_cached(
                        "SELECT kind, account, id, rev, body, mac FROM objects \
                         WHERE kind = ?1 ORDER BY account, id",
                    )
                    .and_then(|mut s| s.query_map(params![kind], row_to_object)?.collect()),
            };
            r.map_err(sq("listing objects"))
        })
        .await
    }

    pub async fn head(&self) -> Result<Head, Error> {
        self.read(read_head).await
    }

    pub async fn kinds(&self) -> Result<Vec<String>, Error> {
        self.read(|c| {
            c.prepare_cached("SELECT DISTINCT kind FROM objects ORDER BY kind")
                .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect())
                .map_err(sq("listing object kinds"))
        })
        .await
    }

    pub async fn audit_rows(
        &self,
        account: Option<&str>,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<RawAuditRow>, Error> {
        let account = account.map(str::to_owned);
        self.read(move |c| {
            let r = match account {
                Some(a) => c
                    .prepare_cached(&format!(
                        "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE account = ?1 \
                         AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4"
                    ))
                    .and_then(|mut s| {
                        s.query_map(params![a, after, upto, limit], row_to_audit)?
                            .collect()
                    }),
                None => c
                    .prepare_cached(&format!(
                        "SELECT {AUDIT_COLUMNS} FROM audit_log \
                         WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3"
                    ))
                    .and_then(|mut s| {
                        s.query_map(params![after, upto, limit], row_to_audit)?
                            .collect()
                    }),
            };
            r.map_err(sq("reading audit records"))
        })
        .await
    }

    /// Queues a job for the writer (in call order).
    pub fn send(&self, job: Job) -> Result<(), Error> {
        self.writer.send(job).map_err(|_| Error::WriterStopped)
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Job>,
    signer: Arc<dyn AuditSigner>,
    records: Arc<dyn RecordAuthenticator>,
    stats: Arc<Counters>,
) {
    // When the previous group last drained the queue, and whether it drained it (fewer than
    // MAX_GROUP jobs): then every job still queued arrived after that moment.
    let mut previous: Option<(std::time::Instant, bool)> = None;
    while let Ok(first) = rx.recv() {
        // A group led by a deferred batch (nobody waits for it) takes its last jobs no sooner
        // than DEFERRED_GROUP_SPACING after the previous group took its own: deferred key-use
        // records then share one transaction, fsync and signature instead of paying one
        // each, and sleeping (not a blocking receive) spares senders a wake-up each. The
        // leading batch arrived after that moment (the queue was drained), so it waits at
        // most the spacing before its group commits. Meanwhile the group is open and takes
        // what has arrived every GATHER_SLICE (see `run_group`).
        let gather_until = match (&first.reply, previous) {
            (crate::Reply::Deferred { .. }, Some((taken, true))) => taken
                .checked_add(DEFERRED_GROUP_SPACING)
                .filter(|until| *until > std::time::Instant::now()),
            _ => None,
        };
        let mut jobs = vec![first];
        let mut taken = std::time::Instant::now();
        let results = match run_group(
            &conn,
            &rx,
            &mut jobs,
            gather_until,
            &mut taken,
            &*signer,
            &*records,
            &stats,
        ) {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, batches = jobs.len(), "SQLite group commit failed");
                let _ = conn.execute_batch("ROLLBACK");
                jobs.iter().map(|_| Err(clone_err(&e))).collect()
            }
        };
        previous = Some((taken, jobs.len() < MAX_GROUP));
        stats.record(jobs.len());
        for (job, result) in jobs.into_iter().zip(results) {
            job.finish(result, &stats);
        }
    }
}

/// Moves every queued job (up to [`MAX_GROUP`] in all) into `jobs`.
fn drain(rx: &mpsc::Receiver<Job>, jobs: &mut Vec<Job>) {
    while jobs.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
}

/// Errors are not Clone (they wrap foreign errors as text, so this is lossless).
pub(crate) fn clone_err(e: &Error) -> Error {
    match e {
        Error::Conflict { kind, id } => Error::Conflict {
            kind: kind.clone(),
            id: id.clone(),
        },
        Error::Backend { context, message } => Error::Backend {
            context,
            message: message.clone(),
        },
        Error::Corrupt(m) => Error::Corrupt(m.clone()),
        Error::Integrity { kind, account, id } => Error::Integrity {
            kind: kind.clone(),
            account: account.clone(),
            id: id.clone(),
        },
        Error::SchemaVersion { found, supported } => Error::SchemaVersion {
            found: found.clone(),
            supported,
        },
        Error::InvalidUrl(m) => Error::InvalidUrl(m.clone()),
        Error::InvalidInput(m) => Error::InvalidInput(m.clone()),
        Error::WriterStopped => Error::WriterStopped,
    }
}

/// Runs a parameterless statement through the statement cache (no re-parse per batch).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// While a group led by deferred batches gathers, it applies what has arrived every this
/// often: the records' hashing and INSERTs are spread over the gathering interval instead
/// of all landing after it, so the group's commit follows its last job sooner (a long burst
/// after the interval made the oldest records of a busy group pass the back-pressure age,
/// and 2 % of bounded requests then waited for durability; bench/kms-bench.sh).
const GATHER_SLICE: Duration = Duration::from_millis(1);

/// One group transaction over `jobs` (the first already there; the rest taken from `rx` as
/// they come, until `gather_until` when given, then whatever is queued, up to
/// [`MAX_GROUP`]); `taken` is set to when the last jobs were taken. Outer error: the whole
/// group failed (caller rolls back); inner results: per job.
#[expect(
    clippy::too_many_arguments,
    reason = "the writer's state, passed down once per group"
)]
fn run_group(
    conn: &Connection,
    rx: &mpsc::Receiver<Job>,
    jobs: &mut Vec<Job>,
    gather_until: Option<std::time::Instant>,
    taken: &mut std::time::Instant,
    signer: &dyn AuditSigner,
    records: &dyn RecordAuthenticator,
    stats: &Counters,
) -> Result<Vec<Result<CommitInfo, Error>>, Error> {
    exec_cached(conn, "BEGIN IMMEDIATE").map_err(sq("beginning a write transaction"))?;
    let start = read_head(conn)?;
    if let Some(probe) = stats.anchor_check(&start)? {
        let stored: Option<Vec<u8>> = conn
            .prepare_cached("SELECT hash FROM audit_log WHERE seq = ?1")
            .and_then(|mut s| {
                s.query_row(params![seq_to_i64(probe.seq).unwrap_or(i64::MAX)], |r| {
                    r.get(0)
                })
                .optional()
            })
            .map_err(sq("reading the anchored audit record"))?;
        probe.confirm(stored.as_deref())?;
    }
    let mut group = Group {
        conn,
        stats,
        // Checked out of the statement cache once per group, not once per record (the
        // cache hashes the SQL text on every lookup).
        insert: conn
            .prepare_cached(INSERT_AUDIT)
            .map_err(sq("appending an audit record"))?,
        head: start,
        results: Vec::with_capacity(jobs.len()),
        signed: None,
        signature: Vec::new(),
    };
    if let Some(until) = gather_until {
        loop {
            for job in &jobs[group.results.len()..] {
                group.apply(&job.batch, None, records)?;
            }
            let now = std::time::Instant::now();
            if now >= until || jobs.len() >= MAX_GROUP {
                break;
            }
            std::thread::sleep(GATHER_SLICE.min(until - now));
            drain(rx, jobs);
        }
    }
    *taken = std::time::Instant::now();
    drain(rx, jobs);
    // The group's last batch signs its last record as it inserts it (one signature per
    // group, no second write of the row).
    let last = jobs.len().saturating_sub(1);
    for (i, job) in jobs.iter().enumerate().skip(group.results.len()) {
        group.apply(&job.batch, (i == last).then_some(signer), records)?;
    }
    let Group {
        insert,
        head,
        results,
        signed,
        mut signature,
        ..
    } = group;
    drop(insert);
    if head != start {
        let seq = seq_to_i64(head.seq)?;
        // One signature per group: over the last record, which the hash chain binds to every
        // earlier record of the group (see `crate::audit::ChainVerifier`). Usually it went
        // in with the record; not when the group's last batch appended nothing (a flush, a
        // batch of object writes only, a conflict), nor when the last records came in a
        // gathering slice: then the last record is signed here.
        if signed != Some(head.seq) {
            signature = signer.sign(&head.hash);
            conn.prepare_cached("UPDATE audit_log SET signature = ?2 WHERE seq = ?1")
                .and_then(|mut s| s.execute(params![seq, &signature[..]]))
                .map_err(sq("signing the group's last audit record"))?;
        }
        conn.prepare_cached("UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1")
            .and_then(|mut s| s.execute(params![seq, &head.hash[..]]))
            .map_err(sq("moving the audit head"))?;
    }
    exec_cached(conn, "COMMIT").map_err(sq("committing"))?;
    if head != start {
        stats.anchor_advance(&head, &signature);
    }
    Ok(results)
}

/// An open group transaction (see [`run_group`]).
struct Group<'c> {
    conn: &'c Connection,
    /// The store's shared state (revision floors for new rows' revisions).
    stats: &'c Counters,
    /// The prepared [`INSERT_AUDIT`].
    insert: rusqlite::CachedStatement<'c>,
    /// The chain head after the batches applied so far.
    head: Head,
    /// One per batch applied so far.
    results: Vec<Result<CommitInfo, Error>>,
    /// The seq of the record signed as it was inserted, and its signature.
    signed: Option<u64>,
    signature: Vec<u8>,
}

impl Group<'_> {
    /// Applies one batch; `sign`: it is the group's last, sign its last record. Error: the
    /// group failed (a batch's own failure is its result).
    fn apply(
        &mut self,
        batch: &Batch,
        sign: Option<&dyn AuditSigner>,
        records: &dyn RecordAuthenticator,
    ) -> Result<(), Error> {
        let conn = self.conn;
        let signing = sign.map(|s| (s, &mut self.signature));
        // A batch without object writes cannot conflict: no savepoint needed (a failure to
        // append fails the whole group).
        let outcome = if batch.writes.is_empty() {
            Ok((
                append_audit(&mut self.insert, batch, &mut self.head, signing)?,
                Vec::new(),
            ))
        } else {
            exec_cached(conn, "SAVEPOINT batch").map_err(sq("creating a savepoint"))?;
            let mut tentative = self.head;
            let applied = apply(
                conn,
                &mut self.insert,
                batch,
                &mut tentative,
                records,
                self.stats,
                signing,
            );
            if applied.is_ok() {
                exec_cached(conn, "RELEASE batch").map_err(sq("releasing a savepoint"))?;
                self.head = tentative;
            } else {
                exec_cached(conn, "ROLLBACK TO batch")
                    .and_then(|()| exec_cached(conn, "RELEASE batch"))
                    .map_err(sq("rolling back a savepoint"))?;
            }
            applied
        };
        if let (Ok((audit_seqs, _)), Some(_)) = (&outcome, sign) {
            self.signed = audit_seqs.last().copied();
        }
        self.results
            .push(outcome.map(|(audit_seqs, applied)| CommitInfo {
                audit_seqs,
                applied,
            }));
        Ok(())
    }
}

fn apply(
    conn: &Connection,
    insert: &mut rusqlite::Statement<'_>,
    batch: &Batch,
    head: &mut Head,
    records: &dyn RecordAuthenticator,
    stats: &Counters,
    sign: Option<(&dyn AuditSigner, &mut Vec<u8>)>,
) -> Result<(Vec<u64>, Vec<Applied>), Error> {
    let mut applied = Vec::with_capacity(batch.writes.len());
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
        let current: Option<i64> = conn
            .prepare_cached("SELECT rev FROM objects WHERE kind = ?1 AND account = ?2 AND id = ?3")
            .and_then(|mut s| {
                s.query_row(params![kind, account, id], |r| r.get(0))
                    .optional()
            })
            .map_err(sq("reading an object revision"))?;
        check_expect(kind, id, current, *expect_rev)?;
        match w {
            Write::Put { body, .. } => {
                // A row created again continues the revisions of its deleted life.
                let rev = match current {
                    Some(_) => next_rev(current)?,
                    None => {
                        let tombstone = conn
                            .prepare_cached(
                                "DELETE FROM tombstones WHERE kind = ?1 AND account = ?2 \
                                 AND id = ?3 RETURNING rev",
                            )
                            .and_then(|mut s| {
                                s.query_row(params![kind, account, id], |r| r.get(0))
                                    .optional()
                            })
                            .map_err(sq("reading a deleted object's revision"))?;
                        insert_rev(stats, kind, account, id, tombstone)?
                    }
                };
                let mac = tag_row(records, kind, account, id, rev, body);
                let sql = if current.is_some() {
                    "UPDATE objects SET rev = ?4, body = ?5, mac = ?6 WHERE kind = ?1 AND account = ?2 AND id = ?3"
                } else {
                    "INSERT INTO objects (kind, account, id, rev, body, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                };
                conn.prepare_cached(sql)
                    .and_then(|mut s| s.execute(params![kind, account, id, rev, body, mac]))
                    .map_err(sq("writing an object"))?;
                applied.push(Applied::Put(rev));
            }
            Write::Delete { .. } => {
                let Some(rev) = current else {
                    applied.push(Applied::Absent);
                    continue;
                };
                conn.prepare_cached(
                    "DELETE FROM objects WHERE kind = ?1 AND account = ?2 AND id = ?3",
                )
                .and_then(|mut s| s.execute(params![kind, account, id]))
                .and_then(|_| {
                    conn.prepare_cached(
                        "INSERT INTO tombstones (kind, account, id, rev) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (kind, account, id) DO UPDATE SET rev = excluded.rev",
                    )
                })
                .and_then(|mut s| s.execute(params![kind, account, id, rev]))
                .map_err(sq("deleting an object"))?;
                applied.push(Applied::Deleted(rev));
            }
        }
    }
    Ok((append_audit(insert, batch, head, sign)?, applied))
}

/// Appends the batch's records after `head` (moving it), unsigned except the last when
/// `sign` is given (the group's last batch: its last record is the group's, whose signature
/// covers the group; the signature is also left in `sign`'s buffer). [`run_group`] signs
/// the group's last record itself when it was not signed here.
/// `insert` is the prepared [`INSERT_AUDIT`].
fn append_audit(
    insert: &mut rusqlite::Statement<'_>,
    batch: &Batch,
    head: &mut Head,
    mut sign: Option<(&dyn AuditSigner, &mut Vec<u8>)>,
) -> Result<Vec<u64>, Error> {
    let mut seqs = Vec::with_capacity(batch.audit.len());
    let last = batch.audit.len().saturating_sub(1);
    for (i, e) in batch.audit.iter().enumerate() {
        let (seq, prev, hash) = head.advance(e);
        let signature: &[u8] = match &mut sign {
            Some((signer, out)) if i == last => {
                **out = signer.sign(&hash);
                &out[..]
            }
            _ => &[],
        };
        let seq_i = seq_to_i64(seq)?;
        insert
            .execute(params![
                seq_i,
                e.time_ms,
                e.account,
                e.principal,
                e.operation,
                e.key_id,
                e.result,
                e.request_id,
                e.detail,
                &prev[..],
                &hash[..],
                signature,
            ])
            .map_err(sq("appending an audit record"))?;
        seqs.push(seq);
    }
    Ok(seqs)
}
