//! The PostgreSQL backend for several key-service nodes sharing one database: one writer
//! task with its own connection (group commit; appends are serialized across nodes by the
//! locked `audit_head` row, `SELECT ... FOR UPDATE`, in the same transaction as the writes),
//! and a few shared read connections (tokio-postgres pipelines concurrent queries).

use crate::audit::{Head, RawAuditRow};
use crate::record::{RawObject, tag_row};
use crate::sqlite::clone_err;
use crate::{
    Applied, AuditEntry, AuditSigner, Batch, CommitInfo, Counters, Error, Job, MAX_GROUP, Object,
    RecordAuthenticator, Write, check_expect, insert_rev, next_rev, seq_to_i64,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

/// Version 2: object rows carry a MAC (`mac`). Version-1 databases are refused.
const SCHEMA_VERSION: &str = "2";
const READERS: usize = 4;
/// Arbitrary constant key of the advisory lock that serializes schema creation.
const SCHEMA_LOCK: i64 = 0x6361_6173_5354_4f52; // "caasSTOR"

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO store_meta (name, value) VALUES ('schema_version', '2') ON CONFLICT (name) DO NOTHING;
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT COLLATE "C" NOT NULL, account TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL,
    rev BIGINT NOT NULL, body BYTEA NOT NULL, mac BYTEA NOT NULL,
    PRIMARY KEY (kind, account, id));
CREATE TABLE IF NOT EXISTS tombstones (
    kind TEXT COLLATE "C" NOT NULL, account TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL, rev BIGINT NOT NULL,
    PRIMARY KEY (kind, account, id));
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY, time_ms BIGINT NOT NULL, account TEXT NOT NULL,
    principal TEXT NOT NULL, operation TEXT NOT NULL, key_id TEXT, result TEXT NOT NULL,
    request_id TEXT NOT NULL, detail TEXT NOT NULL,
    prev_hash BYTEA NOT NULL, hash BYTEA NOT NULL, signature BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS audit_log_account ON audit_log (account, seq);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash BYTEA NOT NULL);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'))
    ON CONFLICT (id) DO NOTHING;
"#;

const AUDIT_COLUMNS: &str = "seq, time_ms, account, principal, operation, key_id, result, \
     request_id, detail, prev_hash, hash, signature";

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |e| Error::postgres(context, e)
}

fn col<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, Error> {
    row.try_get(i)
        .map_err(|e| Error::Corrupt(format!("unexpected column {i}: {e}")))
}

fn row_to_object(r: &Row) -> Result<RawObject, Error> {
    Ok(RawObject {
        obj: Object {
            kind: col(r, 0)?,
            account: col(r, 1)?,
            id: col(r, 2)?,
            rev: col(r, 3)?,
            body: col(r, 4)?,
        },
        mac: col(r, 5)?,
    })
}

fn row_to_audit(r: &Row) -> Result<RawAuditRow, Error> {
    Ok(RawAuditRow {
        seq: col(r, 0)?,
        entry: AuditEntry {
            time_ms: col(r, 1)?,
            account: col(r, 2)?,
            principal: col(r, 3)?,
            operation: col(r, 4)?,
            key_id: col(r, 5)?,
            result: col(r, 6)?,
            request_id: col(r, 7)?,
            detail: col(r, 8)?,
        },
        prev_hash: col(r, 9)?,
        hash: col(r, 10)?,
        signature: col(r, 11)?,
    })
}

fn head_from_row(row: Option<Row>) -> Result<Head, Error> {
    let row = row.ok_or_else(|| Error::Corrupt("audit head row is missing".into()))?;
    let seq: i64 = col(&row, 0)?;
    let hash: Vec<u8> = col(&row, 1)?;
    Head::from_raw(seq, &hash)
}

async fn connect(config: &Config) -> Result<Client, Error> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(pg("connecting to PostgreSQL"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection closed with an error");
        }
    });
    Ok(client)
}

struct Reader {
    client: Client,
    get: Statement,
    list_account: Statement,
    list_all: Statement,
    audit_account: Statement,
    audit_all: Statement,
    head: Statement,
}

impl Reader {
    async fn connect(config: &Config) -> Result<Reader, Error> {
        let client = connect(config).await?;
        let p = |sql: String| {
            let client = &client;
            async move { client.prepare(&sql).await.map_err(pg("preparing a query")) }
        };
        let obj = "SELECT kind, account, id, rev, body, mac FROM objects";
        Ok(Reader {
            get: p(format!(
                "{obj} WHERE kind = $1 AND account = $2 AND id = $3"
            ))
            .await?,
            list_account: p(format!(
                "{obj} WHERE kind = $1 AND account = $2 ORDER BY account, id"
            ))
            .await?,
            list_all: p(format!("{obj} WHERE kind = $1 ORDER BY account, id")).await?,
            audit_account: p(format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE account = $1 AND seq > $2 \
                 AND seq <= $3 ORDER BY seq LIMIT $4"
            ))
            .await?,
            audit_all: p(format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 AND seq <= $2 \
                 ORDER BY seq LIMIT $3"
            ))
            .await?,
            head: p("SELECT seq, hash FROM audit_head WHERE id = 1".into()).await?,
            client,
        })
    }
}

struct WriterConn {
    client: Client,
    append_audit: Statement,
    select_rev: Statement,
    insert_object: Statement,
    update_object: Statement,
    delete_object: Statement,
    take_tombstone: Statement,
    anchored_hash: Statement,
}

impl WriterConn {
    async fn connect(config: &Config) -> Result<WriterConn, Error> {
        Self::prepare(connect(config).await?).await
    }

    async fn prepare(client: Client) -> Result<WriterConn, Error> {
        let p = |sql: String| {
            let client = &client;
            async move {
                client
                    .prepare(&sql)
                    .await
                    .map_err(pg("preparing a statement"))
            }
        };
        Ok(WriterConn {
            append_audit: p(format!(
                "WITH appended AS (INSERT INTO audit_log ({AUDIT_COLUMNS}) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::bytea[], \
                 $11::bytea[], $12::bytea[])) \
                 UPDATE audit_head SET seq = $13, hash = $14 WHERE id = 1"
            ))
            .await?,
            select_rev: p(
                "SELECT rev FROM objects WHERE kind = $1 AND account = $2 AND id = $3 FOR UPDATE"
                    .into(),
            )
            .await?,
            insert_object: p(
                "INSERT INTO objects (kind, account, id, rev, body, mac) VALUES ($1, $2, $3, $4, $5, $6)"
                    .into(),
            )
            .await?,
            update_object: p(
                "UPDATE objects SET rev = $4, body = $5, mac = $6 WHERE kind = $1 AND account = $2 AND id = $3"
                    .into(),
            )
            .await?,
            // Deleting keeps the row's last revision in `tombstones`, one statement.
            delete_object: p(
                "WITH gone AS (DELETE FROM objects WHERE kind = $1 AND account = $2 AND id = $3 \
                 RETURNING kind, account, id, rev) \
                 INSERT INTO tombstones (kind, account, id, rev) SELECT * FROM gone \
                 ON CONFLICT (kind, account, id) DO UPDATE SET rev = EXCLUDED.rev"
                    .into(),
            )
            .await?,
            take_tombstone: p(
                "DELETE FROM tombstones WHERE kind = $1 AND account = $2 AND id = $3 RETURNING rev"
                    .into(),
            )
            .await?,
            anchored_hash: p("SELECT hash FROM audit_log WHERE seq = $1".into()).await?,
            client,
        })
    }
}

pub(crate) struct PgStore {
    config: Config,
    writer: mpsc::UnboundedSender<Job>,
    readers: Vec<Mutex<Option<Arc<Reader>>>>,
    next_reader: AtomicUsize,
}

async fn create_schema(client: &Client) -> Result<(), Error> {
    let ctx = "creating the schema";
    client.batch_execute("BEGIN").await.map_err(pg(ctx))?;
    let run = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg(ctx))?;
        client.batch_execute(SCHEMA).await.map_err(pg(ctx))?;
        let row = client
            .query_one(
                "SELECT value FROM store_meta WHERE name = 'schema_version'",
                &[],
            )
            .await
            .map_err(pg(ctx))?;
        let found: String = col(&row, 0)?;
        if found != SCHEMA_VERSION {
            return Err(Error::SchemaVersion {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        client.batch_execute("COMMIT").await.map_err(pg(ctx))
    };
    match run.await {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

impl PgStore {
    pub async fn open(
        url: &str,
        signer: Arc<dyn AuditSigner>,
        records: Arc<dyn RecordAuthenticator>,
        stats: Arc<Counters>,
    ) -> Result<PgStore, Error> {
        // The parser's message could quote parts of the URL (a password): do not repeat it.
        let config: Config = url
            .parse()
            .map_err(|_| Error::InvalidUrl("cannot parse the PostgreSQL connection URL".into()))?;
        let client = connect(&config).await?;
        create_schema(&client).await?;
        let writer = WriterConn::prepare(client).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_task(
            config.clone(),
            writer,
            rx,
            signer,
            records,
            stats,
        ));
        Ok(PgStore {
            config,
            writer: tx,
            readers: (0..READERS).map(|_| Mutex::new(None)).collect(),
            next_reader: AtomicUsize::new(0),
        })
    }

    async fn reader(&self) -> Result<Arc<Reader>, Error> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len().max(1);
        let slot = self.readers.get(i).ok_or(Error::WriterStopped)?;
        let current = slot.lock().ok().and_then(|g| g.clone());
        if let Some(r) = current
            && !r.client.is_closed()
        {
            return Ok(r);
        }
        let fresh = Arc::new(Reader::connect(&self.config).await?);
        if let Ok(mut g) = slot.lock() {
            *g = Some(fresh.clone());
        }
        Ok(fresh)
    }

    /// Runs a read; if it failed because the server closed the connection (restart,
    /// failover), reconnects and tries once more (reads are idempotent).
    // The closure takes the reader by `Arc` (not `&Reader` through `AsyncFn`) so that the
    // returned future is `Send` for axum handlers: a higher-ranked borrow is not.
    async fn read<T, F, Fut>(&self, context: &'static str, f: F) -> Result<T, Error>
    where
        F: Fn(Arc<Reader>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let r = self.reader().await?;
        match f(r.clone()).await {
            Ok(v) => Ok(v),
            Err(_) if r.client.is_closed() => {
                let r = self.reader().await?;
                f(r).await.map_err(pg(context))
            }
            Err(e) => Err(Error::postgres(context, e)),
        }
    }

    pub async fn get(
        &self,
        kind: &str,
        account: &str,
        id: &str,
    ) -> Result<Option<RawObject>, Error> {
        let row = self
            .read("reading an object", |r: Arc<Reader>| async move {
                r.client.query_opt(&r.get, &[&kind, &account, &id]).await
            })
            .await?;
        row.as_ref().map(row_to_object).transpose()
    }

    pub async fn list(&self, kind: &str, account: Option<&str>) -> Result<Vec<RawObject>, Error> {
        let rows = self
            .read("listing objects", |r: Arc<Reader>| async move {
                match account {
                    Some(a) => r.client.query(&r.list_account, &[&kind, &a]).await,
                    None => r.client.query(&r.list_all, &[&kind]).await,
                }
            })
            .await?;
        rows.iter().map(row_to_object).collect()
    }

    pub async fn kinds(&self) -> Result<Vec<String>, Error> {
        let rows = self
            .read("listing object kinds", |r: Arc<Reader>| async move {
                r.client
                    .query("SELECT DISTINCT kind FROM objects ORDER BY kind", &[])
                    .await
            })
            .await?;
        rows.iter()
            .map(|r| {
                r.try_get::<_, String>(0)
                    .map_err(pg("listing object kinds"))
            })
            .collect()
    }

    pub async fn head(&self) -> Result<Head, Error> {
        let row = self
            .read("reading the audit head", |r: Arc<Reader>| async move {
                r.client.query_opt(&r.head, &[]).await
            })
            .await?;
        head_from_row(row)
    }

    pub async fn audit_rows(
        &self,
        account: Option<&str>,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<RawAuditRow>, Error> {
        let rows = self
            .read("reading audit records", |r: Arc<Reader>| async move {
                match account {
                    Some(a) => {
                        r.client
                            .query(&r.audit_account, &[&a, &after, &upto, &limit])
                            .await
                    }
                    None => r.client.query(&r.audit_all, &[&after, &upto, &limit]).await,
                }
            })
            .await?;
        rows.iter().map(row_to_audit).collect()
    }

    /// Queues a job for the writer (in call order).
    pub fn send(&self, job: Job) -> Result<(), Error> {
        self.writer.send(job).map_err(|_| Error::WriterStopped)
    }
}

async fn writer_task(
    config: Config,
    conn: WriterConn,
    mut rx: mpsc::UnboundedReceiver<Job>,
    signer: Arc<dyn AuditSigner>,
    records: Arc<dyn RecordAuthenticator>,
    stats: Arc<Counters>,
) {
    let mut conn = Some(conn);
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match WriterConn::connect(&config).await {
                Ok(c) => Some(c),
                Err(e) => {
                    for job in jobs {
                        job.reply.finish(Err(clone_err(&e)));
                    }
                    continue;
                }
            };
        }
        // Nothing has happened yet if BEGIN fails on a connection the server closed
        // (restart, failover): reconnect and begin once more.
        let mut begun = match conn.as_ref() {
            Some(c) => begin_and_lock_head(&c.client).await,
            None => Err(Error::WriterStopped),
        };
        if begun.is_err() && conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            match WriterConn::connect(&config).await {
                Ok(c) => {
                    begun = begin_and_lock_head(&c.client).await;
                    conn = Some(c);
                }
                Err(e) => begun = Err(e),
            }
        }
        let (Some(c), Ok(start)) = (conn.as_ref(), begun.as_ref()) else {
            let e = begun.err().unwrap_or(Error::WriterStopped);
            tracing::warn!(error = %e, "PostgreSQL writer cannot begin a transaction");
            if let Some(c) = conn.as_ref() {
                let _ = c.client.batch_execute("ROLLBACK").await;
            }
            for job in jobs {
                job.reply.finish(Err(clone_err(&e)));
            }
            continue;
        };
        let batches: Vec<&Batch> = jobs.iter().map(|j| &j.batch).collect();
        stats.record(batches.len());
        let results = match run_group(c, *start, &batches, &*signer, &*records, &stats).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, batches = jobs.len(), "PostgreSQL group commit failed");
                let _ = c.client.batch_execute("ROLLBACK").await;
                batches.iter().map(|_| Err(clone_err(&e))).collect()
            }
        };
        for (job, result) in jobs.into_iter().zip(results) {
            job.finish(result, &stats);
        }
    }
}

/// Audit rows of one group, inserted with a single `UNNEST` statement at the end.
#[derive(Default)]
struct PendingAudit {
    seq: Vec<i64>,
    time_ms: Vec<i64>,
    account: Vec<String>,
    principal: Vec<String>,
    operation: Vec<String>,
    key_id: Vec<Option<String>>,
    result: Vec<String>,
    request_id: Vec<String>,
    detail: Vec<String>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
    signature: Vec<Vec<u8>>,
}

impl PendingAudit {
    /// Chains the batch's entries after `head` (moving it), unsigned: [`run_group`] signs
    /// the group's last record ([`PendingAudit::sign_last`]).
    fn push_batch(&mut self, batch: &Batch, head: &mut Head) -> Result<Vec<u64>, Error> {
        let mut seqs = Vec::with_capacity(batch.audit.len());
        for e in &batch.audit {
            let (seq, prev, hash) = head.advance(e);
            self.signature.push(Vec::new());
            self.seq.push(seq_to_i64(seq)?);
            self.time_ms.push(e.time_ms);
            self.account.push(e.account.clone());
            self.principal.push(e.principal.clone());
            self.operation.push(e.operation.clone());
            self.key_id.push(e.key_id.clone());
            self.result.push(e.result.clone());
            self.request_id.push(e.request_id.clone());
            self.detail.push(e.detail.clone());
            self.prev_hash.push(prev.to_vec());
            self.hash.push(hash.to_vec());
            seqs.push(seq);
        }
        Ok(seqs)
    }

    /// One signature per group: over the last record (`head`), which the hash chain binds to
    /// every earlier record of the group (see `crate::audit::ChainVerifier`).
    fn sign_last(&mut self, head: &Head, signer: &dyn AuditSigner) {
        if let Some(last) = self.signature.last_mut() {
            *last = signer.sign(&head.hash);
        }
    }
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = nibble(pair.first().copied()?)?;
        let lo = nibble(pair.get(1).copied()?)?;
        *out.get_mut(i)? = (hi << 4) | lo;
    }
    Some(out)
}

/// BEGIN and lock the chain head in one round trip; the lock serializes every writer of
/// every node on this database until COMMIT (simple-query protocol: the explicit
/// BEGIN keeps the transaction open after the query string).
async fn begin_and_lock_head(client: &Client) -> Result<Head, Error> {
    let msgs = client
        .simple_query(
            "BEGIN; SELECT seq, encode(hash, 'hex') FROM audit_head WHERE id = 1 FOR UPDATE",
        )
        .await
        .map_err(pg("locking the audit head"))?;
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            let seq = row
                .get(0)
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| Error::Corrupt("audit head seq is not a number".into()))?;
            let hash = row
                .get(1)
                .and_then(parse_hex32)
                .ok_or_else(|| Error::Corrupt("audit head hash is not 32 bytes".into()))?;
            return Head::from_raw(seq, &hash);
        }
    }
    Err(Error::Corrupt("audit head row is missing".into()))
}

/// One group transaction: BEGIN + head lock (1 round trip); per batch with object writes a
/// SAVEPOINT (skipped when the group is a single batch), its writes, RELEASE or ROLLBACK TO;
/// then every audit row of the group and the new head in one statement, and COMMIT.
/// Batches without object writes cannot conflict and cost no round trip of their own.
async fn run_group(
    c: &WriterConn,
    start: Head,
    batches: &[&Batch],
    signer: &dyn AuditSigner,
    records: &dyn RecordAuthenticator,
    stats: &Counters,
) -> Result<Vec<Result<CommitInfo, Error>>, Error> {
    if let Some(probe) = stats.anchor_check(&start)? {
        let seq = seq_to_i64(probe.seq)?;
        let row = c
            .client
            .query_opt(&c.anchored_hash, &[&seq])
            .await
            .map_err(pg("reading the anchored audit record"))?;
        let stored: Option<Vec<u8>> = row.as_ref().map(|r| col(r, 0)).transpose()?;
        probe.confirm(stored.as_deref())?;
    }
    let mut head = start;
    let mut pending = PendingAudit::default();
    let single = batches.len() == 1;
    let mut results = Vec::with_capacity(batches.len());
    for batch in batches {
        if batch.writes.is_empty() {
            let seqs = pending.push_batch(batch, &mut head)?;
            results.push(Ok(CommitInfo {
                audit_seqs: seqs,
                applied: Vec::new(),
            }));
            continue;
        }
        // With a single batch the transaction itself is the batch's unit of rollback.
        if !single {
            c.client
                .batch_execute("SAVEPOINT batch")
                .await
                .map_err(pg("creating a savepoint"))?;
        }
        match apply_writes(c, batch, records, stats).await {
            Ok(applied) => {
                if !single {
                    c.client
                        .batch_execute("RELEASE SAVEPOINT batch")
                        .await
                        .map_err(pg("releasing a savepoint"))?;
                }
                let seqs = pending.push_batch(batch, &mut head)?;
                results.push(Ok(CommitInfo {
                    audit_seqs: seqs,
                    applied,
                }));
            }
            Err(e) => {
                if single {
                    c.client
                        .batch_execute("ROLLBACK")
                        .await
                        .map_err(pg("rolling back"))?;
                    return Ok(vec![Err(e)]);
                }
                c.client
                    .batch_execute("ROLLBACK TO SAVEPOINT batch; RELEASE SAVEPOINT batch")
                    .await
                    .map_err(pg("rolling back a savepoint"))?;
                results.push(Err(e));
            }
        }
    }
    if head != start {
        let seq = seq_to_i64(head.seq)?;
        pending.sign_last(&head, signer);
        let p = &pending;
        c.client
            .execute(
                &c.append_audit,
                &[
                    &p.seq,
                    &p.time_ms,
                    &p.account,
                    &p.principal,
                    &p.operation,
                    &p.key_id,
                    &p.result,
                    &p.request_id,
                    &p.detail,
                    &p.prev_hash,
                    &p.hash,
                    &p.signature,
                    &seq,
                    &&head.hash[..],
                ],
            )
            .await
            .map_err(pg("appending audit records"))?;
    }
    c.client
        .batch_execute("COMMIT")
        .await
        .map_err(pg("committing"))?;
    if head != start {
        let signature = pending.signature.last().map_or(&[][..], Vec::as_slice);
        stats.anchor_advance(&head, signature);
    }
    Ok(results)
}

async fn apply_writes(
    c: &WriterConn,
    batch: &Batch,
    records: &dyn RecordAuthenticator,
    stats: &Counters,
) -> Result<Vec<Applied>, Error> {
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
        let row = c
            .client
            .query_opt(&c.select_rev, &[kind, account, id])
            .await
            .map_err(pg("reading an object revision"))?;
        let current: Option<i64> = row.as_ref().map(|r| col(r, 0)).transpose()?;
        check_expect(kind, id, current, *expect_rev)?;
        match w {
            Write::Put { body, .. } => {
                // A row created again continues the revisions of its deleted life.
                let rev = match current {
                    Some(_) => next_rev(current)?,
                    None => {
                        let tombstone = c
                            .client
                            .query_opt(&c.take_tombstone, &[kind, account, id])
                            .await
                            .map_err(pg("reading a deleted object's revision"))?
                            .as_ref()
                            .map(|r| col(r, 0))
                            .transpose()?;
                        insert_rev(stats, kind, account, id, tombstone)?
                    }
                };
                let mac = tag_row(records, kind, account, id, rev, body);
                let stmt = if current.is_some() {
                    &c.update_object
                } else {
                    &c.insert_object
                };
                c.client
                    .execute(stmt, &[kind, account, id, &rev, body, &mac])
                    .await
                    .map_err(|e| {
                        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                            Error::Conflict {
                                kind: kind.clone(),
                                id: id.clone(),
                            }
                        } else {
                            Error::postgres("writing an object", e)
                        }
                    })?;
                applied.push(Applied::Put(rev));
            }
            Write::Delete { .. } => {
                let Some(rev) = current else {
                    applied.push(Applied::Absent);
                    continue;
                };
                c.client
                    .execute(&c.delete_object, &[kind, account, id])
                    .await
                    .map_err(pg("deleting an object"))?;
                applied.push(Applied::Deleted(rev));
            }
        }
    }
    Ok(applied)
}
