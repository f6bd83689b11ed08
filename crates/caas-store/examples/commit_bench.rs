//! Group-commit benchmark: single-audit-entry commits per second (and p50/p99 latency) from
//! 1, 16 and 64 concurrent committers, each durable before it returns, printed beside a
//! naive peer measured in the same run: one transaction per commit, with the same hashing and
//! ECDSA P-256 signing — on SQLite a shared connection (same WAL + synchronous=FULL
//! settings), on PostgreSQL one connection per committer locking the same kind of head row.
//!
//! ```text
//! cargo run --release -p caas-store --example commit_bench                 # SQLite in a temp dir
//! cargo run --release -p caas-store --features testing --example commit_bench -- --pg
//! cargo run --release -p caas-store --example commit_bench -- --url postgres://... --secs 5
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark binary")]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use caas_store::{AuditEntry, AuditSigner, Batch, Store};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct EcdsaSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl AuditSigner for EcdsaSigner {
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        self.key
            .sign(&self.rng, hash)
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default()
    }
}

fn signer() -> Arc<EcdsaSigner> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    Arc::new(EcdsaSigner { key, rng })
}

fn entry(n: u64) -> AuditEntry {
    AuditEntry {
        time_ms: 1_750_000_000_000,
        account: "111122223333".into(),
        principal: "AKIAIOSFODNN7EXAMPLE".into(),
        operation: "Encrypt".into(),
        key_id: Some("1234abcd-12ab-34cd-56ef-1234567890ab".into()),
        result: "Success".into(),
        request_id: format!("req-{n}"),
        detail: "{\"EncryptionAlgorithm\":\"SYMMETRIC_DEFAULT\"}".into(),
    }
}

struct Outcome {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn run<F, Fut>(concurrency: usize, secs: f64, op: F) -> Outcome
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = (t as u64) << 32;
            while Instant::now() < end {
                let t0 = Instant::now();
                op(n).await;
                lat.push(t0.elapsed());
                n += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Outcome {
        per_sec: lat.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// The peer: one transaction per commit on one mutex-guarded connection.
fn naive_peer(path: &std::path::Path) -> Arc<Mutex<rusqlite::Connection>> {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .unwrap();
    c.execute_batch(
        "PRAGMA synchronous=FULL; CREATE TABLE IF NOT EXISTS audit_log (seq INTEGER PRIMARY KEY, \
         entry TEXT NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL, signature BLOB NOT NULL); \
         CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY, seq INTEGER, hash BLOB); \
         INSERT OR IGNORE INTO head VALUES (1, 0, zeroblob(32));",
    )
    .unwrap();
    Arc::new(Mutex::new(c))
}

fn naive_commit(conn: &Mutex<rusqlite::Connection>, signer: &EcdsaSigner, n: u64) {
    let c = conn.lock().unwrap();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (seq, prev): (i64, Vec<u8>) = c
        .query_row("SELECT seq, hash FROM head WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let prev: [u8; 32] = prev.try_into().unwrap();
    let e = entry(n);
    let hash = caas_store::chain_hash(&prev, seq as u64 + 1, &e);
    let sig = signer.sign(&hash);
    c.execute(
        "INSERT INTO audit_log VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![seq + 1, e.request_id, &prev[..], &hash[..], sig],
    )
    .unwrap();
    c.execute(
        "UPDATE head SET seq = ?1, hash = ?2 WHERE id = 1",
        rusqlite::params![seq + 1, &hash[..]],
    )
    .unwrap();
    c.execute_batch("COMMIT").unwrap();
}

async fn pg_naive_setup(url: &str) {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS naive_audit (seq BIGINT PRIMARY KEY, entry TEXT NOT NULL, \
         prev_hash BYTEA NOT NULL, hash BYTEA NOT NULL, signature BYTEA NOT NULL); \
         CREATE TABLE IF NOT EXISTS naive_head (id INT PRIMARY KEY, seq BIGINT, hash BYTEA); \
         INSERT INTO naive_head VALUES (1, 0, decode(repeat('00', 32), 'hex')) ON CONFLICT DO NOTHING;",
    )
    .await
    .unwrap();
}

async fn pg_naive_commit(c: &tokio_postgres::Client, signer: &EcdsaSigner, n: u64) {
    c.batch_execute("BEGIN").await.unwrap();
    let row = c
        .query_one(
            "SELECT seq, hash FROM naive_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let seq: i64 = row.get(0);
    let prev: Vec<u8> = row.get(1);
    let prev: [u8; 32] = prev.try_into().unwrap();
    let e = entry(n);
    let hash = caas_store::chain_hash(&prev, seq as u64 + 1, &e);
    let sig = signer.sign(&hash);
    c.execute(
        "INSERT INTO naive_audit VALUES ($1, $2, $3, $4, $5)",
        &[&(seq + 1), &e.request_id, &&prev[..], &&hash[..], &sig],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE naive_head SET seq = $1, hash = $2 WHERE id = 1",
        &[&(seq + 1), &&hash[..]],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
}

/// One connection per committer, created up front.
async fn pg_naive_run(url: &str, concurrency: usize, secs: f64) -> f64 {
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        clients.push(Arc::new(c));
    }
    let sig = signer();
    let clients = Arc::new(clients);
    // Committer t's calls carry n = t << 32 | i: committer t uses connection t.
    run(concurrency, secs, move |n| {
        let (clients, sig) = (clients.clone(), sig.clone());
        async move {
            let i = (n >> 32) as usize % clients.len();
            pg_naive_commit(&clients[i], &sig, n).await;
        }
    })
    .await
    .per_sec
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut secs = 3.0;
    let mut url = None;
    let mut pg = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--secs" => {
                i += 1;
                secs = args[i].parse().expect("--secs SECONDS");
            }
            "--url" => {
                i += 1;
                url = Some(args[i].clone());
            }
            "--pg" => pg = true,
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
        i += 1;
    }
    let dir = tempfile::tempdir().unwrap();
    #[cfg(feature = "testing")]
    let _cluster;
    if pg {
        #[cfg(feature = "testing")]
        {
            let c = caas_store::testing::PgCluster::start().unwrap();
            url = Some(c.create_database("bench").unwrap());
            _cluster = c;
        }
        #[cfg(not(feature = "testing"))]
        panic!("--pg needs --features testing");
    }
    let url = url.unwrap_or_else(|| format!("sqlite:{}", dir.path().join("bench.db").display()));
    let records = std::sync::Arc::new(caas_store::HmacRecordKey::new(&[7u8; 32]));
    let store = Store::open(&url, signer(), records).await.unwrap();
    if store.backend() == caas_store::Backend::Postgres {
        pg_naive_setup(&url).await;
    }
    let naive = (store.backend() == caas_store::Backend::Sqlite)
        .then(|| (naive_peer(&dir.path().join("naive.db")), signer()));
    println!(
        "backend: {:?}; {secs} s per point; each commit = 1 audit record (SHA-256 chain + ECDSA P-256 signature), durable on return",
        store.backend()
    );
    println!(
        "{:>11} {:>12} {:>10} {:>10} {:>11} {:>14} {:>8}",
        "committers", "commits/s", "p50", "p99", "avg group", "naive peer/s", "ratio"
    );
    for concurrency in [1usize, 16, 64] {
        let before = store.commit_stats();
        let s = store.clone();
        let ours = run(concurrency, secs, move |n| {
            let s = s.clone();
            async move {
                s.commit(Batch {
                    writes: vec![],
                    audit: vec![entry(n)],
                })
                .await
                .unwrap();
            }
        })
        .await;
        let after = store.commit_stats();
        let group = (after.batches - before.batches) as f64
            / (after.transactions - before.transactions).max(1) as f64;
        let peer = match &naive {
            Some((conn, sig)) => {
                let (conn, sig) = (conn.clone(), sig.clone());
                let p = run(concurrency, secs, move |n| {
                    let (conn, sig) = (conn.clone(), sig.clone());
                    async move {
                        tokio::task::spawn_blocking(move || naive_commit(&conn, &sig, n))
                            .await
                            .unwrap();
                    }
                })
                .await;
                Some(p.per_sec)
            }
            None if store.backend() == caas_store::Backend::Postgres => {
                Some(pg_naive_run(&url, concurrency, secs).await)
            }
            None => None,
        };
        println!(
            "{:>11} {:>12.0} {:>10.2?} {:>10.2?} {:>11.1} {:>14} {:>8}",
            concurrency,
            ours.per_sec,
            ours.p50,
            ours.p99,
            group,
            peer.map_or("-".into(), |p| format!("{p:.0}")),
            peer.map_or("-".into(), |p| format!("{:.2}x", ours.per_sec / p)),
        );
    }
}
