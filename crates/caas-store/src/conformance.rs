//! The store conformance suite: one set of generic async test functions, each run against
//! embedded SQLite and against a private PostgreSQL cluster (`testing::PgCluster`), plus the
//! SIGKILL durability test on both backends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use crate::testing::PgCluster;
use crate::{
    AuditEntry, AuditFaultReason, AuditSigner, Backend, Batch, Error, HmacRecordKey, Store, Write,
    chain_hash,
};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A real signer: Ed25519 over the record hash.
pub(crate) struct TestSigner {
    key: Ed25519KeyPair,
}

impl TestSigner {
    pub fn generate() -> (Arc<TestSigner>, Vec<u8>) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        (Self::from_pkcs8(pkcs8.as_ref()), pkcs8.as_ref().to_vec())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Arc<TestSigner> {
        Arc::new(TestSigner {
            key: Ed25519KeyPair::from_pkcs8(pkcs8).unwrap(),
        })
    }

    pub fn verifier(&self) -> impl Fn(&[u8; 32], &[u8]) -> bool + Send + Sync + use<> {
        let public = self.key.public_key().as_ref().to_vec();
        move |hash: &[u8; 32], sig: &[u8]| {
            UnparsedPublicKey::new(&ED25519, &public)
                .verify(hash, sig)
                .is_ok()
        }
    }
}

impl AuditSigner for TestSigner {
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        self.key.sign(hash).as_ref().to_vec()
    }
}

/// A fresh, empty database of one backend.
pub(crate) trait Harness {
    fn url(&self) -> String;
    fn signer(&self) -> Arc<TestSigner>;
    fn pkcs8(&self) -> Vec<u8>;
    /// Executes SQL directly on the database (tampering).
    async fn raw(&self, sql: &str);
    /// A BLOB/BYTEA literal.
    fn blob(&self, bytes: &[u8]) -> String;

    async fn open(&self) -> Store {
        Store::open(&self.url(), self.signer(), record_key())
            .await
            .unwrap()
    }
}

/// The record authenticator of the tests (a fixed key, like a node key read from a file).
pub(crate) fn record_key() -> Arc<HmacRecordKey> {
    Arc::new(HmacRecordKey::new(b"conformance record key, 32 bytes"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) struct SqliteHarness {
    dir: tempfile::TempDir,
    signer: Arc<TestSigner>,
    pkcs8: Vec<u8>,
}

impl SqliteHarness {
    pub fn new() -> Self {
        let (signer, pkcs8) = TestSigner::generate();
        SqliteHarness {
            dir: tempfile::tempdir().unwrap(),
            signer,
            pkcs8,
        }
    }
}

impl Harness for SqliteHarness {
    fn url(&self) -> String {
        format!("sqlite:{}", self.dir.path().join("store.db").display())
    }
    fn signer(&self) -> Arc<TestSigner> {
        self.signer.clone()
    }
    fn pkcs8(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }
    async fn raw(&self, sql: &str) {
        let c = rusqlite::Connection::open(self.dir.path().join("store.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.execute_batch(sql).unwrap();
    }
    fn blob(&self, bytes: &[u8]) -> String {
        format!("X'{}'", hex(bytes))
    }
}

pub(crate) struct PgHarness {
    cluster: PgCluster,
    url: String,
    signer: Arc<TestSigner>,
    pkcs8: Vec<u8>,
}

impl PgHarness {
    pub fn new() -> Self {
        let cluster = match PgCluster::start() {
            Ok(c) => c,
            Err(e) => panic!("cannot start a private PostgreSQL cluster: {e}"),
        };
        let url = cluster.create_database("conformance").unwrap();
        let (signer, pkcs8) = TestSigner::generate();
        PgHarness {
            cluster,
            url,
            signer,
            pkcs8,
        }
    }
}

impl Harness for PgHarness {
    fn url(&self) -> String {
        self.url.clone()
    }
    fn signer(&self) -> Arc<TestSigner> {
        self.signer.clone()
    }
    fn pkcs8(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }
    async fn raw(&self, sql: &str) {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = task.await;
    }
    fn blob(&self, bytes: &[u8]) -> String {
        format!("decode('{}', 'hex')", hex(bytes))
    }
}

fn put(kind: &str, account: &str, id: &str, body: &[u8], expect_rev: Option<i64>) -> Write {
    Write::Put {
        kind: kind.into(),
        account: account.into(),
        id: id.into(),
        body: body.to_vec(),
        expect_rev,
    }
}

fn del(kind: &str, account: &str, id: &str, expect_rev: Option<i64>) -> Write {
    Write::Delete {
        kind: kind.into(),
        account: account.into(),
        id: id.into(),
        expect_rev,
    }
}

fn entry(account: &str, op: &str, key_id: Option<&str>, n: usize) -> AuditEntry {
    AuditEntry {
        time_ms: 1_750_000_000_000 + n as i64,
        account: account.into(),
        principal: format!("AKIA{account}"),
        operation: op.into(),
        key_id: key_id.map(Into::into),
        result: "Success".into(),
        request_id: format!("req-{n}"),
        detail: format!("{{\"n\":{n}}}"),
    }
}

fn writes(w: Vec<Write>) -> Batch {
    Batch {
        writes: w,
        audit: Vec::new(),
    }
}

fn assert_conflict(r: Result<crate::CommitInfo, Error>, kind: &str, id: &str) {
    match r {
        Err(Error::Conflict { kind: k, id: i }) => assert_eq!((k.as_str(), i.as_str()), (kind, id)),
        other => panic!("expected a conflict on {kind} {id}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The generic suite.

pub(crate) async fn objects_put_get_list_delete(h: &impl Harness) {
    let s = h.open().await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    s.commit(writes(vec![
        put("key", "a", "k2", b"two", None),
        put("key", "a", "k1", &all_bytes, None),
        put("key", "b", "k1", b"b1", None),
        put("alias", "a", "x", b"alias", None),
        // Byte order, not a locale's collation: "B" < "a" < "é".
        put("order", "a", "é", b"", None),
        put("order", "a", "a", b"", None),
        put("order", "a", "B", b"", None),
    ]))
    .await
    .unwrap();
    let k1 = s.get("key", "a", "k1").await.unwrap().unwrap();
    assert_eq!((k1.rev, k1.body.as_slice()), (1, all_bytes.as_slice()));
    assert_eq!(s.get("key", "c", "k1").await.unwrap(), None);
    assert_eq!(s.get("alias", "a", "k1").await.unwrap(), None);
    let ids = |v: Vec<crate::Object>| {
        v.into_iter()
            .map(|o| format!("{}/{}/{}", o.kind, o.account, o.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(s.list("key", Some("a")).await.unwrap()),
        ["key/a/k1", "key/a/k2"]
    );
    assert_eq!(
        ids(s.list("key", None).await.unwrap()),
        ["key/a/k1", "key/a/k2", "key/b/k1"]
    );
    assert_eq!(
        ids(s.list("order", Some("a")).await.unwrap()),
        ["order/a/B", "order/a/a", "order/a/é"]
    );
    assert!(s.list("nothing", None).await.unwrap().is_empty());

    s.commit(writes(vec![put("key", "a", "k1", b"new", None)]))
        .await
        .unwrap();
    let k1 = s.get("key", "a", "k1").await.unwrap().unwrap();
    assert_eq!((k1.rev, k1.body.as_slice()), (2, &b"new"[..]));
    s.commit(writes(vec![
        del("key", "a", "k2", None),
        del("key", "a", "absent", None),
    ]))
    .await
    .unwrap();
    assert_eq!(s.get("key", "a", "k2").await.unwrap(), None);
    assert_eq!(ids(s.list("key", Some("a")).await.unwrap()), ["key/a/k1"]);
    // Re-insert after delete continues the deleted row's revisions (revision floors).
    s.commit(writes(vec![put("key", "a", "k2", b"again", Some(0))]))
        .await
        .unwrap();
    assert_eq!(s.get("key", "a", "k2").await.unwrap().unwrap().rev, 2);
    // An empty batch is fine and appends nothing.
    assert!(
        s.commit(Batch::default())
            .await
            .unwrap()
            .audit_seqs
            .is_empty()
    );
}

pub(crate) async fn expect_rev_conflicts_roll_back_whole_batch(h: &impl Harness) {
    let s = h.open().await;
    assert_eq!(s.audit_head().await.unwrap(), (0, crate::GENESIS_HASH));
    s.commit(writes(vec![put("key", "a", "k1", b"v1", Some(0))]))
        .await
        .unwrap();
    assert_conflict(
        s.commit(writes(vec![put("key", "a", "k1", b"x", Some(0))]))
            .await,
        "key",
        "k1",
    );
    s.commit(writes(vec![put("key", "a", "k1", b"v2", Some(1))]))
        .await
        .unwrap();
    assert_conflict(
        s.commit(writes(vec![put("key", "a", "k1", b"x", Some(1))]))
            .await,
        "key",
        "k1",
    );
    assert_conflict(
        s.commit(writes(vec![put("key", "a", "nope", b"x", Some(3))]))
            .await,
        "key",
        "nope",
    );
    assert_eq!(s.get("key", "a", "nope").await.unwrap(), None);

    // A batch whose second write conflicts: neither its first write nor its audit entry stays.
    let before = s.audit_list(None, 0, 1000).await.unwrap().len();
    let r = s
        .commit(Batch {
            writes: vec![
                put("key", "a", "k3", b"new", Some(0)),
                del("key", "a", "k1", None),
                put("alias", "a", "al", b"x", Some(5)),
            ],
            audit: vec![entry("a", "CreateKey", Some("k3"), 1)],
        })
        .await;
    assert_conflict(r, "alias", "al");
    assert_eq!(s.get("key", "a", "k3").await.unwrap(), None);
    assert_eq!(s.get("key", "a", "k1").await.unwrap().unwrap().body, b"v2");
    assert_eq!(s.audit_list(None, 0, 1000).await.unwrap().len(), before);

    assert_conflict(
        s.commit(writes(vec![del("key", "a", "k1", Some(1))])).await,
        "key",
        "k1",
    );
    assert_conflict(
        s.commit(writes(vec![del("key", "a", "k1", Some(0))])).await,
        "key",
        "k1",
    );
    s.commit(writes(vec![del("key", "a", "gone", Some(0))]))
        .await
        .unwrap();
    s.commit(writes(vec![del("key", "a", "k1", Some(2))]))
        .await
        .unwrap();
    assert_eq!(s.get("key", "a", "k1").await.unwrap(), None);
    assert_conflict(
        s.commit(writes(vec![del("key", "a", "k1", Some(2))])).await,
        "key",
        "k1",
    );

    // The chain stays valid across rolled-back batches.
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
}

pub(crate) async fn invalid_input_is_rejected(h: &impl Harness) {
    let s = h.open().await;
    let r = s
        .commit(writes(vec![put("key", "a", "bad\0id", b"", None)]))
        .await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let r = s
        .commit(writes(vec![put("key", "a", "k", b"", Some(-1))]))
        .await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let mut e = entry("a", "Encrypt", None, 0);
    e.detail = "\0".into();
    let r = s
        .commit(Batch {
            writes: vec![],
            audit: vec![e],
        })
        .await;
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    assert!(s.audit_list(None, 0, 10).await.unwrap().is_empty());
}

pub(crate) async fn concurrent_commits_all_succeed_and_chain_holds(h: &impl Harness) {
    let s = h.open().await;
    s.commit(writes(vec![put("key", "shared", "contended", b"0", None)]))
        .await
        .unwrap();
    const TASKS: usize = 32;
    const PER_TASK: usize = 25;
    // Verification runs concurrently with the appends and always sees an intact prefix.
    let verifier = {
        let (s, verify) = (s.clone(), h.signer().verifier());
        tokio::spawn(async move {
            let mut runs = 0;
            loop {
                let v = s.audit_verify(&verify).await.unwrap();
                assert!(v.is_ok(), "{v:?}");
                runs += 1;
                if v.head_seq > (TASKS * PER_TASK) as u64 || runs > 1000 {
                    return runs;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut contended_wins = 0;
            for i in 0..PER_TASK {
                let id = format!("t{t}-{i}");
                let info = s
                    .commit(Batch {
                        writes: vec![put("key", "acct", &id, id.as_bytes(), Some(0))],
                        audit: vec![entry("acct", "CreateKey", Some(&id), t * 1000 + i)],
                    })
                    .await
                    .unwrap();
                assert_eq!(info.audit_seqs.len(), 1);
                seqs.extend(info.audit_seqs);
                if i % 5 == 0 {
                    // Everybody races for rev 1 -> 2 of one object: exactly one winner per
                    // revision; losers' batches (and their audit entries) are rolled back
                    // without disturbing the other batches of the same group.
                    let r = s
                        .commit(Batch {
                            writes: vec![put("key", "shared", "contended", b"x", Some(1))],
                            audit: vec![entry("shared", "UpdateKey", None, 0)],
                        })
                        .await;
                    match r {
                        Ok(info) => {
                            contended_wins += 1;
                            seqs.extend(info.audit_seqs);
                        }
                        Err(Error::Conflict { .. }) => {}
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
            }
            (seqs, contended_wins)
        }));
    }
    let mut all = Vec::new();
    let mut wins = 0;
    for h in handles {
        let (seqs, w) = h.await.unwrap();
        all.extend(seqs);
        wins += w;
    }
    assert_eq!(wins, 1, "exactly one commit can move rev 1 to 2");
    assert!(verifier.await.unwrap() > 1);
    // Group commit happened: fewer transactions than batches.
    let st = s.commit_stats();
    assert!(
        st.batches > st.transactions,
        "no batches were grouped: {st:?}"
    );
    all.sort_unstable();
    let n = TASKS * PER_TASK + 1;
    assert_eq!(
        all,
        (1..=n as u64).collect::<Vec<_>>(),
        "audit seqs are unique and contiguous"
    );
    assert_eq!(
        s.list("key", Some("acct")).await.unwrap().len(),
        TASKS * PER_TASK
    );
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.checked, v.head_seq), (n as u64, n as u64));
}

pub(crate) async fn audit_append_list_verify(h: &impl Harness) {
    let s = h.open().await;
    let mut expected = Vec::new();
    for n in 0..10 {
        let acct = if n % 2 == 0 { "alice" } else { "bob" };
        let key = (n % 3 == 0).then(|| format!("key-{n}"));
        let e = entry(acct, "Encrypt", key.as_deref(), n);
        let info = s
            .commit(Batch {
                writes: vec![],
                audit: vec![e.clone()],
            })
            .await
            .unwrap();
        assert_eq!(info.audit_seqs, vec![n as u64 + 1]);
        expected.push(e);
    }
    // Several entries in one batch get consecutive seqs.
    let multi = vec![
        entry("bob", "A", None, 100),
        entry("alice", "B", Some(""), 101),
        entry("bob", "C", None, 102),
    ];
    let info = s
        .commit(Batch {
            writes: vec![],
            audit: multi.clone(),
        })
        .await
        .unwrap();
    assert_eq!(info.audit_seqs, vec![11, 12, 13]);
    expected.extend(multi);

    let all = s.audit_list(None, 0, 1000).await.unwrap();
    assert_eq!(all.len(), 13);
    let verify = h.signer().verifier();
    let mut prev = crate::GENESIS_HASH;
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.entry, expected[i]);
        assert_eq!(r.prev_hash, prev);
        assert_eq!(r.hash, chain_hash(&prev, r.seq, &r.entry));
        // One signature per group commit, over its last record; the others are covered by
        // it through the chain. Here a multi-entry batch is one group.
        if r.signature.is_empty() {
            assert!((11..13).contains(&r.seq), "record {} unsigned", r.seq);
        } else {
            assert!(verify(&r.hash, &r.signature));
        }
        prev = r.hash;
    }
    let alice = s.audit_list(Some("alice"), 0, 1000).await.unwrap();
    assert!(alice.iter().all(|r| r.entry.account == "alice"));
    assert_eq!(
        alice.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 3, 5, 7, 9, 12]
    );
    let page = s.audit_list(Some("alice"), 3, 2).await.unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 7]);
    assert_eq!(s.audit_list(None, 12, 100).await.unwrap().len(), 1);
    assert!(s.audit_list(None, 13, 100).await.unwrap().is_empty());
    assert!(
        s.audit_list(Some("carol"), 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.audit_list(None, u64::MAX, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );

    let v = s.audit_verify(&verify).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.checked, v.head_seq), (13, 13));
    assert_eq!(s.audit_head().await.unwrap(), (13, all[12].hash));
    // A signature check that fails is reported at the first record.
    let v = s
        .audit_verify(&|_: &[u8; 32], _: &[u8]| false)
        .await
        .unwrap();
    let bad = v.first_bad.unwrap();
    assert_eq!((bad.seq, bad.reason), (1, AuditFaultReason::BadSignature));
    // A signature from another key does not verify either.
    let (other, _) = TestSigner::generate();
    let v = s.audit_verify(&other.verifier()).await.unwrap();
    assert_eq!(v.first_bad.unwrap().reason, AuditFaultReason::BadSignature);
}

async fn six_records(h: &impl Harness) -> Store {
    let s = h.open().await;
    for n in 0..6 {
        s.commit(Batch {
            writes: vec![],
            audit: vec![entry("a", "Sign", Some("k"), n)],
        })
        .await
        .unwrap();
    }
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    s
}

async fn first_bad(h: &impl Harness, s: &Store) -> (u64, AuditFaultReason) {
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    let bad = v
        .first_bad
        .clone()
        .unwrap_or_else(|| panic!("tampering not detected: {v:?}"));
    assert_eq!(v.checked, bad.seq - 1, "{v:?}");
    (bad.seq, bad.reason)
}

pub(crate) async fn tamper_edited_record_is_detected(h: &impl Harness) {
    let s = six_records(h).await;
    h.raw("UPDATE audit_log SET result = 'AccessDenied' WHERE seq = 3")
        .await;
    assert_eq!(first_bad(h, &s).await, (3, AuditFaultReason::HashMismatch));
}

pub(crate) async fn tamper_edited_record_with_recomputed_hash_is_detected(h: &impl Harness) {
    let s = six_records(h).await;
    let rec = s.audit_list(None, 3, 1).await.unwrap().remove(0);
    let mut forged = rec.entry.clone();
    forged.principal = "someone-else".into();
    let hash = chain_hash(&rec.prev_hash, rec.seq, &forged);
    h.raw(&format!(
        "UPDATE audit_log SET principal = 'someone-else', hash = {} WHERE seq = 4",
        h.blob(&hash)
    ))
    .await;
    assert_eq!(first_bad(h, &s).await, (4, AuditFaultReason::BadSignature));
}

pub(crate) async fn tamper_removed_record_is_detected(h: &impl Harness) {
    let s = six_records(h).await;
    h.raw("DELETE FROM audit_log WHERE seq = 2").await;
    assert_eq!(first_bad(h, &s).await, (2, AuditFaultReason::Missing));
}

pub(crate) async fn tamper_removed_tail_is_detected(h: &impl Harness) {
    let s = six_records(h).await;
    h.raw("DELETE FROM audit_log WHERE seq = 6").await;
    assert_eq!(first_bad(h, &s).await, (6, AuditFaultReason::Missing));
}

pub(crate) async fn tamper_reordered_records_are_detected(h: &impl Harness) {
    let s = six_records(h).await;
    h.raw(
        "UPDATE audit_log SET seq = -1 WHERE seq = 3; \
         UPDATE audit_log SET seq = 3 WHERE seq = 4; \
         UPDATE audit_log SET seq = 4 WHERE seq = -1;",
    )
    .await;
    assert_eq!(first_bad(h, &s).await, (3, AuditFaultReason::HashMismatch));
}

pub(crate) async fn tamper_malformed_hash_is_reported_not_panicking(h: &impl Harness) {
    let s = six_records(h).await;
    h.raw(&format!(
        "UPDATE audit_log SET hash = {} WHERE seq = 5",
        h.blob(b"short")
    ))
    .await;
    let (seq, reason) = first_bad(h, &s).await;
    assert_eq!(seq, 5);
    assert!(
        matches!(reason, AuditFaultReason::Malformed(_)),
        "{reason:?}"
    );
    // audit_list reports the bad row as corrupt data instead of panicking.
    let r = s.audit_list(None, 0, 100).await;
    assert!(matches!(r, Err(Error::Corrupt(_))), "{r:?}");
}

pub(crate) async fn reopen_keeps_objects_and_chain(h: &impl Harness) {
    {
        let s = h.open().await;
        s.commit(Batch {
            writes: vec![put("key", "a", "k1", b"body", None)],
            audit: vec![entry("a", "CreateKey", Some("k1"), 0)],
        })
        .await
        .unwrap();
    }
    let s = h.open().await;
    assert_eq!(
        s.get("key", "a", "k1").await.unwrap().unwrap().body,
        b"body"
    );
    let info = s
        .commit(Batch {
            writes: vec![put("key", "a", "k1", b"body2", Some(1))],
            audit: vec![entry("a", "UpdateKey", Some("k1"), 1)],
        })
        .await
        .unwrap();
    assert_eq!(info.audit_seqs, vec![2]);
    drop(s);
    let s = h.open().await;
    assert_eq!(s.get("key", "a", "k1").await.unwrap().unwrap().rev, 2);
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    assert!(v.is_ok() && v.checked == 2, "{v:?}");
}

pub(crate) async fn two_nodes_append_to_one_chain(h: &impl Harness) {
    // Two Store handles = two nodes: separate writers, connections and group commits.
    let (a, b) = tokio::join!(h.open(), h.open());
    const TASKS: usize = 16;
    const PER_TASK: usize = 20;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let s = if t % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_TASK {
                let id = format!("n{t}-{i}");
                let info = s
                    .commit(Batch {
                        writes: vec![put("key", "acct", &id, b"v", Some(0))],
                        audit: vec![entry("acct", "CreateKey", Some(&id), i)],
                    })
                    .await
                    .unwrap();
                seqs.extend(info.audit_seqs);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort_unstable();
    let n = (TASKS * PER_TASK) as u64;
    assert_eq!(all, (1..=n).collect::<Vec<_>>());
    for s in [&a, &b] {
        let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
        assert!(v.is_ok() && v.checked == n, "{v:?}");
        assert_eq!(
            s.list("key", Some("acct")).await.unwrap().len(),
            TASKS * PER_TASK
        );
    }
}

/// A head the writer reported: seq, hash, the head record's signature.
type Reported = (u64, [u8; 32], Vec<u8>);

/// Records every head the writer reports.
#[derive(Default)]
struct Heads(std::sync::Mutex<Vec<Reported>>);

impl Heads {
    /// The last head reported.
    fn last(&self) -> Option<(u64, [u8; 32])> {
        self.0.lock().unwrap().last().map(|(s, h, _)| (*s, *h))
    }
}

impl crate::HeadObserver for Heads {
    fn committed(&self, seq: u64, hash: &[u8; 32], signature: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .push((seq, *hash, signature.to_vec()));
    }
}

async fn one(s: &Store, n: usize) -> Result<crate::CommitInfo, Error> {
    s.commit(Batch {
        writes: vec![],
        audit: vec![entry("a", "Sign", Some("k"), n)],
    })
    .await
}

pub(crate) async fn anchor_observes_heads_and_follows_other_writers(h: &impl Harness) {
    let s = six_records(h).await;
    let (seq, hash) = s.audit_head().await.unwrap();
    let heads = Arc::new(Heads::default());
    s.anchor_audit(seq, hash, heads.clone());
    one(&s, 7).await.unwrap();
    let after = s.audit_head().await.unwrap();
    assert_eq!(after.0, 7);
    assert_eq!(heads.last(), Some(after));
    // Another node (store handle) appends: the anchored record is still in the chain.
    let other = h.open().await;
    one(&other, 8).await.unwrap();
    one(&other, 9).await.unwrap();
    one(&s, 10).await.unwrap();
    assert_eq!(heads.last().unwrap().0, 10);
    // Each reported head comes with the signature stored on that record, which verifies.
    let verify = h.signer().verifier();
    let observed = heads.0.lock().unwrap().clone();
    assert!(!observed.is_empty());
    for (seq, hash, sig) in &observed {
        let rec = s.audit_list(None, seq - 1, 1).await.unwrap().remove(0);
        assert_eq!((rec.seq, rec.hash), (*seq, *hash));
        assert_eq!(&rec.signature, sig, "record {seq}");
        assert!(verify(hash, sig), "record {seq}");
    }
    assert!(
        s.audit_verify(&h.signer().verifier())
            .await
            .unwrap()
            .is_ok()
    );
}

pub(crate) async fn anchor_refuses_a_cut_tail(h: &impl Harness) {
    let s = six_records(h).await;
    let (seq, hash) = s.audit_head().await.unwrap();
    let heads = Arc::new(Heads::default());
    s.anchor_audit(seq, hash, heads.clone());
    // The DBA deletes the last two records and points the head row at record 4.
    let rec4 = s.audit_list(None, 3, 1).await.unwrap().remove(0);
    h.raw(&format!(
        "DELETE FROM audit_log WHERE seq > 4; UPDATE audit_head SET seq = 4, hash = {} WHERE id = 1",
        h.blob(&rec4.hash)
    ))
    .await;
    // The forged chain verifies on its own — only the anchor tells.
    assert!(
        s.audit_verify(&h.signer().verifier())
            .await
            .unwrap()
            .is_ok()
    );
    let r = one(&s, 7).await;
    assert!(
        matches!(&r, Err(Error::Corrupt(m)) if m.contains("behind")),
        "{r:?}"
    );
    assert_eq!(s.audit_head().await.unwrap().0, 4, "nothing appended");
    assert!(heads.0.lock().unwrap().is_empty());
}

pub(crate) async fn anchor_refuses_a_rewritten_chain(h: &impl Harness) {
    let s = six_records(h).await;
    let rec3 = s.audit_list(None, 2, 1).await.unwrap().remove(0);
    s.anchor_audit(3, rec3.hash, Arc::new(Heads::default()));
    // The anchored record was replaced (a restored backup with other history).
    h.raw(&format!(
        "UPDATE audit_log SET hash = {} WHERE seq = 3",
        h.blob(&[7u8; 32])
    ))
    .await;
    let r = one(&s, 7).await;
    assert!(
        matches!(&r, Err(Error::Corrupt(m)) if m.contains("audit record 3")),
        "{r:?}"
    );
    // The anchored record removed altogether.
    h.raw("DELETE FROM audit_log WHERE seq = 3").await;
    let r = one(&s, 8).await;
    assert!(
        matches!(&r, Err(Error::Corrupt(m)) if m.contains("missing")),
        "{r:?}"
    );
    // Same seq as the head but another hash.
    let (seq, _) = s.audit_head().await.unwrap();
    s.anchor_audit(seq, [9u8; 32], Arc::new(Heads::default()));
    let r = one(&s, 9).await;
    assert!(
        matches!(&r, Err(Error::Corrupt(m)) if m.contains("another hash")),
        "{r:?}"
    );
}

pub(crate) async fn backend_is_reported(h: &impl Harness) {
    let s = h.open().await;
    let want = if h.url().starts_with("postgres") {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    assert_eq!(s.backend(), want);
}

/// PostgreSQL only: the writer and the readers survive a server restart (reconnect).
pub(crate) async fn postgres_restart_is_survived(h: &PgHarness) {
    let s = h.open().await;
    let commit = |n: usize| Batch {
        writes: vec![put("key", "a", &format!("k{n}"), b"v", Some(0))],
        audit: vec![entry("a", "CreateKey", None, n)],
    };
    s.commit(commit(0)).await.unwrap();
    assert!(s.get("key", "a", "k0").await.unwrap().is_some());
    tokio::task::block_in_place(|| h.cluster.restart()).unwrap();
    // Give the client side a moment to notice the closed sockets.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.commit(commit(1)).await.unwrap();
    assert!(s.get("key", "a", "k1").await.unwrap().is_some());
    assert_eq!(s.list("key", Some("a")).await.unwrap().len(), 2);
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    assert!(v.is_ok() && v.checked == 2, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_is_survived_test() {
    postgres_restart_is_survived(&PgHarness::new()).await;
}

// ---------------------------------------------------------------------------------------
// Durability: a child process commits in a loop and prints each acknowledged id; the parent
// SIGKILLs it, reopens the store, and checks that every acknowledged id and the chain are there.

const CHILD_URL: &str = "CAAS_STORE_DURABILITY_URL";
const CHILD_KEY_FILE: &str = "CAAS_STORE_DURABILITY_KEY_FILE";

/// The child side; only runs when started by `sigkill_loses_no_acknowledged_commit`.
pub(crate) async fn durability_child() {
    let url = std::env::var(CHILD_URL).expect("started by the durability test");
    let pkcs8 = std::fs::read(std::env::var(CHILD_KEY_FILE).unwrap()).unwrap();
    let s = Store::open(&url, TestSigner::from_pkcs8(&pkcs8), record_key())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline && i < 100_000 {
                let id = format!("t{t}-{i}");
                s.commit(Batch {
                    writes: vec![put("dur", "acct", &id, id.as_bytes(), Some(0))],
                    audit: vec![entry("acct", "Encrypt", Some(&id), i)],
                })
                .await
                .unwrap();
                let mut out = std::io::stdout().lock();
                std::io::Write::write_all(&mut out, format!("ACK {id}\n").as_bytes()).unwrap();
                std::io::Write::flush(&mut out).unwrap();
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

pub(crate) async fn sigkill_loses_no_acknowledged_commit(h: &impl Harness) {
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("signer.pk8");
    std::fs::write(&key_file, h.pkcs8()).unwrap();
    // Create the schema first so the child starts committing at once.
    drop(h.open().await);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "conformance::durability_child_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, h.url())
        .env(CHILD_KEY_FILE, &key_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                // Only complete lines count: a torn last line was not fully acknowledged.
                Ok(_) if line.ends_with(b"\n") => {
                    let text = String::from_utf8_lossy(&line);
                    if let Some(id) = text.trim_end().strip_prefix("ACK ")
                        && tx.send(id.to_owned()).is_err()
                    {
                        break;
                    }
                }
                Ok(_) => break,
            }
        }
    });
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 600 && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(id) => acked.push(id),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "durability child exited early"
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    assert!(
        acked.len() >= 600,
        "child acknowledged only {} commits",
        acked.len()
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    acked.extend(rx.try_iter());

    let s = h.open().await;
    for id in &acked {
        let o = s.get("dur", "acct", id).await.unwrap();
        assert!(
            o.is_some(),
            "acknowledged commit {id} is missing after SIGKILL"
        );
    }
    let v = s.audit_verify(&h.signer().verifier()).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert!(v.checked >= acked.len() as u64);
    assert_eq!(
        v.checked as usize,
        s.list("dur", Some("acct")).await.unwrap().len()
    );
}

// ---------------------------------------------------------------------------------------
// Object-row integrity: the database administrator edits rows directly.

fn assert_integrity<T: std::fmt::Debug>(r: Result<T, Error>, kind: &str, account: &str, id: &str) {
    match r {
        Err(Error::Integrity {
            kind: k,
            account: a,
            id: i,
        }) => assert_eq!((k.as_str(), a.as_str(), i.as_str()), (kind, account, id)),
        other => panic!("expected an integrity failure on {kind} {account}/{id}, got {other:?}"),
    }
}

/// The integrity audit records the store appended, as (account, key_id, detail).
async fn integrity_audits(s: &Store) -> Vec<(String, Option<String>, String)> {
    s.audit_list(None, 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.operation == "IntegrityCheck" && r.entry.result == "IntegrityFailure")
        .map(|r| (r.entry.account, r.entry.key_id, r.entry.detail))
        .collect()
}

async fn seeded(h: &impl Harness) -> Store {
    let s = h.open().await;
    s.commit(writes(vec![
        put(
            "key",
            "victim",
            "k1",
            br#"{"state":"Enabled","policy":"victim"}"#,
            Some(0),
        ),
        put("key", "victim", "k2", b"second victim key", Some(0)),
        put("key", "attacker", "a1", b"attacker key", Some(0)),
        put(
            "access_key",
            "-",
            "AKIAATTACKER",
            br#"{"account":"attacker"}"#,
            Some(0),
        ),
    ]))
    .await
    .unwrap();
    // A second revision, so that there is an old version to speak of.
    s.commit(writes(vec![put(
        "key",
        "victim",
        "k1",
        br#"{"state":"Disabled","policy":"victim"}"#,
        Some(1),
    )]))
    .await
    .unwrap();
    s
}

pub(crate) async fn integrity_edited_body_is_refused(h: &impl Harness) {
    let s = seeded(h).await;
    h.raw(&format!(
        "UPDATE objects SET body = {} WHERE kind = 'key' AND account = 'victim' AND id = 'k1'",
        h.blob(br#"{"state":"Enabled","policy":"victim"}"#)
    ))
    .await;
    assert_integrity(s.get("key", "victim", "k1").await, "key", "victim", "k1");
    // The whole list is refused, not silently shortened.
    assert_integrity(s.list("key", Some("victim")).await, "key", "victim", "k1");
    assert_integrity(s.list("key", None).await, "key", "victim", "k1");
    // Background jobs get the healthy rows and the place of the bad one.
    let (good, bad) = s.list_healthy("key", None).await.unwrap();
    let ids: Vec<_> = good.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, ["a1", "k2"]);
    assert_eq!(bad.len(), 1);
    assert_eq!((bad[0].kind.as_str(), bad[0].id.as_str()), ("key", "k1"));
    // Audited once per distinct bad row version, naming the row.
    let audits = integrity_audits(&s).await;
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert_eq!(audits[0].0, "victim");
    assert_eq!(audits[0].1.as_deref(), Some("k1"));
    assert!(audits[0].2.contains("\"kind\":\"key\""), "{}", audits[0].2);
    // The chain with the integrity records still verifies.
    assert!(
        s.audit_verify(&h.signer().verifier())
            .await
            .unwrap()
            .is_ok()
    );
    // Healthy rows still read; a legitimate rewrite heals the row.
    assert_eq!(
        s.get("key", "victim", "k2").await.unwrap().unwrap().body,
        b"second victim key"
    );
    s.commit(writes(vec![put("key", "victim", "k1", b"rewritten", None)]))
        .await
        .unwrap();
    assert_eq!(
        s.get("key", "victim", "k1").await.unwrap().unwrap().body,
        b"rewritten"
    );
}

pub(crate) async fn integrity_edited_rev_or_mac_is_refused(h: &impl Harness) {
    let s = seeded(h).await;
    h.raw("UPDATE objects SET rev = 7 WHERE kind = 'key' AND account = 'victim' AND id = 'k1'")
        .await;
    assert_integrity(s.get("key", "victim", "k1").await, "key", "victim", "k1");
    h.raw(&format!(
        "UPDATE objects SET mac = {} WHERE kind = 'key' AND account = 'victim' AND id = 'k2'",
        h.blob(&[0u8; 32])
    ))
    .await;
    assert_integrity(s.get("key", "victim", "k2").await, "key", "victim", "k2");
    assert_eq!(integrity_audits(&s).await.len(), 2);
}

pub(crate) async fn integrity_copied_row_is_refused(h: &impl Harness) {
    let s = seeded(h).await;
    // Copy the victim's key row (with its valid MAC) into the attacker's account.
    h.raw(
        "INSERT INTO objects (kind, account, id, rev, body, mac) \
         SELECT kind, 'attacker', id, rev, body, mac FROM objects \
         WHERE kind = 'key' AND account = 'victim' AND id = 'k2'",
    )
    .await;
    assert_integrity(
        s.get("key", "attacker", "k2").await,
        "key",
        "attacker",
        "k2",
    );
    assert_integrity(
        s.list("key", Some("attacker")).await,
        "key",
        "attacker",
        "k2",
    );
    // ... and under another id / another kind of the victim's own.
    h.raw(
        "INSERT INTO objects (kind, account, id, rev, body, mac) \
         SELECT kind, account, 'k9', rev, body, mac FROM objects \
         WHERE kind = 'key' AND account = 'victim' AND id = 'k2'",
    )
    .await;
    assert_integrity(s.get("key", "victim", "k9").await, "key", "victim", "k9");
    h.raw(
        "INSERT INTO objects (kind, account, id, rev, body, mac) \
         SELECT 'alias', account, id, rev, body, mac FROM objects \
         WHERE kind = 'key' AND account = 'victim' AND id = 'k2'",
    )
    .await;
    assert_integrity(
        s.get("alias", "victim", "k2").await,
        "alias",
        "victim",
        "k2",
    );
    // The original still reads.
    assert!(s.get("key", "victim", "k2").await.unwrap().is_some());
}

pub(crate) async fn integrity_swapped_rows_are_refused(h: &impl Harness) {
    let s = seeded(h).await;
    // Swap the bodies and MACs of two rows of the same account.
    h.raw(
        "UPDATE objects SET body = (SELECT body FROM objects WHERE kind = 'key' AND account = 'victim' AND id = 'k2'), \
                            mac = (SELECT mac FROM objects WHERE kind = 'key' AND account = 'victim' AND id = 'k2') \
         WHERE kind = 'key' AND account = 'victim' AND id = 'k1'",
    )
    .await;
    assert_integrity(s.get("key", "victim", "k1").await, "key", "victim", "k1");
    assert!(s.get("key", "victim", "k2").await.unwrap().is_some());
}

pub(crate) async fn integrity_repointed_row_is_refused(h: &impl Harness) {
    let s = seeded(h).await;
    // Re-point the attacker's access key to the victim's account (the body names it).
    h.raw(&format!(
        "UPDATE objects SET body = {} WHERE kind = 'access_key' AND account = '-' AND id = 'AKIAATTACKER'",
        h.blob(br#"{"account":"victim"}"#)
    ))
    .await;
    assert_integrity(
        s.get("access_key", "-", "AKIAATTACKER").await,
        "access_key",
        "-",
        "AKIAATTACKER",
    );
    // Moving the row itself to another account (the column) is refused too.
    h.raw("UPDATE objects SET account = 'victim' WHERE kind = 'key' AND account = 'attacker' AND id = 'a1'")
        .await;
    assert_integrity(s.get("key", "victim", "a1").await, "key", "victim", "a1");
    // A row with its MAC removed (NULL is impossible by schema; an empty one) is refused.
    h.raw(&format!(
        "UPDATE objects SET mac = {} WHERE kind = 'key' AND account = 'victim' AND id = 'k2'",
        h.blob(&[])
    ))
    .await;
    assert_integrity(s.get("key", "victim", "k2").await, "key", "victim", "k2");
}

pub(crate) async fn integrity_needs_the_record_key(h: &impl Harness) {
    let s = seeded(h).await;
    drop(s);
    // A store opened with another record key (another deployment, or a forger) refuses
    // every row: the MAC is keyed, not a checksum.
    let other = Store::open(
        &h.url(),
        h.signer(),
        Arc::new(HmacRecordKey::new(&[1u8; 32])),
    )
    .await
    .unwrap();
    assert!(matches!(
        other.get("key", "attacker", "a1").await,
        Err(Error::Integrity { .. })
    ));
    // The right key reads it.
    assert!(
        h.open()
            .await
            .get("key", "attacker", "a1")
            .await
            .unwrap()
            .is_some()
    );
}

/// Attacker: the database administrator, with a copy of a row taken earlier (its MAC was
/// valid then). Putting the older version back under a running node (re-enabling a
/// disabled key, restoring a wider policy) is refused and audited with the reason; a legit
/// rewrite heals the row. What remains (documented): a node that never saw the newer
/// version (a restart, another node that has not read the row since) accepts it.
pub(crate) async fn integrity_old_version_of_a_row_put_back_is_refused(h: &impl Harness) {
    let s = h.open().await;
    s.commit(writes(vec![put("key", "v", "k", b"enabled", Some(0))]))
        .await
        .unwrap();
    // The administrator keeps a copy of the row at rev 1 ...
    h.raw("CREATE TABLE objects_backup AS SELECT * FROM objects WHERE kind = 'key' AND id = 'k'")
        .await;
    s.commit(writes(vec![put("key", "v", "k", b"disabled", Some(1))]))
        .await
        .unwrap();
    // ... and puts it back later: the MAC is valid for (key, v, k, rev 1, "enabled").
    h.raw(
        "DELETE FROM objects WHERE kind = 'key' AND id = 'k'; \
         INSERT INTO objects SELECT * FROM objects_backup",
    )
    .await;
    assert_integrity(s.get("key", "v", "k").await, "key", "v", "k");
    assert_integrity(s.list("key", Some("v")).await, "key", "v", "k");
    let audits = integrity_audits(&s).await;
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert!(
        audits[0].2.contains("rolled back: older than revision 2"),
        "{}",
        audits[0].2
    );
    // A node that has not seen revision 2 cannot tell (the documented limit).
    let fresh = h.open().await;
    assert_eq!(fresh.get("key", "v", "k").await.unwrap().unwrap().rev, 1);
    // A rewrite through the store heals the row: it continues from the stored revision.
    s.commit(writes(vec![put("key", "v", "k", b"disabled again", None)]))
        .await
        .unwrap();
    let o = s.get("key", "v", "k").await.unwrap().unwrap();
    assert_eq!((o.rev, o.body.as_slice()), (2, &b"disabled again"[..]));
    // A commit whose caller went away (a cancelled request) moves the floor all the same.
    h.raw(
        "DROP TABLE objects_backup; \
         CREATE TABLE objects_backup AS SELECT * FROM objects WHERE kind = 'key' AND id = 'k'",
    )
    .await;
    {
        // Polled once (the batch is queued), then dropped before its answer.
        let mut cancelled =
            std::pin::pin!(s.commit(writes(vec![put("key", "v", "k", b"disabled", Some(2))])));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(cancelled.as_mut().poll(&mut cx).is_pending());
    }
    s.flush().await.unwrap();
    h.raw(
        "DELETE FROM objects WHERE kind = 'key' AND id = 'k'; \
         INSERT INTO objects SELECT * FROM objects_backup",
    )
    .await;
    assert_integrity(s.get("key", "v", "k").await, "key", "v", "k");
}

/// The same attack while no node runs: the floors exported before the stop
/// ([`Store::floors_export`], which the key service keeps beside its node key) and given to
/// the next handle make it refuse the older version and a deleted row put back.
pub(crate) async fn integrity_floors_carried_over_a_restart_refuse_a_rollback(h: &impl Harness) {
    let s = h.open().await;
    s.commit(writes(vec![
        put("key", "v", "k", b"enabled", Some(0)),
        put("grant", "v", "g", b"grant", Some(0)),
    ]))
    .await
    .unwrap();
    h.raw("CREATE TABLE objects_backup AS SELECT * FROM objects")
        .await;
    s.commit(writes(vec![
        put("key", "v", "k", b"disabled", Some(1)),
        del("grant", "v", "g", Some(1)),
    ]))
    .await
    .unwrap();
    let (generation, floors) = s.floors_export();
    assert!(generation > 0);
    drop(s);
    h.raw(
        "DELETE FROM objects; \
         INSERT INTO objects SELECT * FROM objects_backup",
    )
    .await;
    let t = h.open().await;
    assert_eq!(t.floors_import(&floors).unwrap(), 2);
    assert_integrity(t.get("key", "v", "k").await, "key", "v", "k");
    assert_integrity(t.get("grant", "v", "g").await, "grant", "v", "g");
    // Bytes that are not an export are refused, and change nothing.
    assert!(matches!(
        t.floors_import(b"caas/store/row-floors/v1 but not whole"),
        Err(Error::InvalidInput(_))
    ));
}

/// Attacker: the database administrator puts back a deleted row (a revoked grant, a
/// deleted access key) with its old MAC: refused by the node that deleted it. A row
/// legitimately created again continues its revisions, so it is accepted everywhere.
pub(crate) async fn integrity_deleted_row_put_back_is_refused(h: &impl Harness) {
    let s = h.open().await;
    let other = h.open().await;
    s.commit(writes(vec![put("grant", "v", "g", b"grant", Some(0))]))
        .await
        .unwrap();
    s.commit(writes(vec![put(
        "grant",
        "v",
        "g",
        b"grant, used",
        Some(1),
    )]))
    .await
    .unwrap();
    assert_eq!(other.get("grant", "v", "g").await.unwrap().unwrap().rev, 2);
    h.raw("CREATE TABLE objects_backup AS SELECT * FROM objects WHERE kind = 'grant'")
        .await;
    let done = s
        .commit(writes(vec![del("grant", "v", "g", Some(2))]))
        .await
        .unwrap();
    assert_eq!(done.applied, [crate::Applied::Deleted(2)]);
    // Another node sees it gone (a row missing is not refused: another node may delete).
    assert_eq!(other.get("grant", "v", "g").await.unwrap(), None);
    h.raw("INSERT INTO objects SELECT * FROM objects_backup")
        .await;
    assert_integrity(s.get("grant", "v", "g").await, "grant", "v", "g");
    assert_integrity(s.list("grant", None).await, "grant", "v", "g");
    // The other node read revision 2 before: it refuses the old revision 2 put back only
    // if it knew of the deletion; it read rev 2 itself, so rev 2 is not below its floor.
    assert_eq!(other.get("grant", "v", "g").await.unwrap().unwrap().rev, 2);
    let audits = integrity_audits(&s).await;
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert!(
        audits[0].2.contains("deleted at revision 2 and put back"),
        "{}",
        audits[0].2
    );
    // Created again (the administrator's copy removed first, as the service would find
    // the id free): revisions continue at 3, and both nodes accept it.
    h.raw("DELETE FROM objects WHERE kind = 'grant'").await;
    let made = s
        .commit(writes(vec![put("grant", "v", "g", b"new grant", Some(0))]))
        .await
        .unwrap();
    assert_eq!(made.applied, [crate::Applied::Put(3)]);
    assert_eq!(s.get("grant", "v", "g").await.unwrap().unwrap().rev, 3);
    assert_eq!(other.get("grant", "v", "g").await.unwrap().unwrap().rev, 3);
    // The old copy put back over the current row is refused by both.
    h.raw(
        "CREATE TABLE objects_current AS SELECT * FROM objects WHERE kind = 'grant'; \
         DELETE FROM objects WHERE kind = 'grant'; \
         INSERT INTO objects SELECT * FROM objects_backup",
    )
    .await;
    assert_integrity(s.get("grant", "v", "g").await, "grant", "v", "g");
    assert_integrity(other.get("grant", "v", "g").await, "grant", "v", "g");
    // With the current row back, deleted and created again on the other node: the
    // revisions continue there too, and the first node accepts the new row.
    h.raw(
        "DELETE FROM objects WHERE kind = 'grant'; \
         INSERT INTO objects SELECT * FROM objects_current",
    )
    .await;
    other
        .commit(writes(vec![del("grant", "v", "g", Some(3))]))
        .await
        .unwrap();
    other
        .commit(writes(vec![put("grant", "v", "g", b"again", Some(0))]))
        .await
        .unwrap();
    assert_eq!(s.get("grant", "v", "g").await.unwrap().unwrap().rev, 4);
}

/// Attacker: the database administrator deletes a row by hand (no tombstone), or removes a
/// deletion's tombstone, so that the row, created again, would start below this node's
/// floor and be refused for good (a tenant locked out of an alias name). The writer
/// continues above what the node knows: the re-created row is accepted.
pub(crate) async fn a_row_deleted_by_hand_comes_back_above_the_floor(h: &impl Harness) {
    let s = h.open().await;
    s.commit(writes(vec![put("alias", "v", "alias/app", b"k1", Some(0))]))
        .await
        .unwrap();
    s.commit(writes(vec![put("alias", "v", "alias/app", b"k2", Some(1))]))
        .await
        .unwrap();
    h.raw("DELETE FROM objects WHERE kind = 'alias'").await;
    assert_eq!(s.get("alias", "v", "alias/app").await.unwrap(), None);
    let made = s
        .commit(writes(vec![put("alias", "v", "alias/app", b"k3", Some(0))]))
        .await
        .unwrap();
    assert_eq!(made.applied, [crate::Applied::Put(3)]);
    assert_eq!(
        s.get("alias", "v", "alias/app").await.unwrap().unwrap().rev,
        3
    );
    s.commit(writes(vec![del("alias", "v", "alias/app", Some(3))]))
        .await
        .unwrap();
    h.raw("DELETE FROM tombstones").await;
    let made = s
        .commit(writes(vec![put("alias", "v", "alias/app", b"k4", Some(0))]))
        .await
        .unwrap();
    assert_eq!(made.applied, [crate::Applied::Put(4)]);
    assert_eq!(
        s.get("alias", "v", "alias/app")
            .await
            .unwrap()
            .unwrap()
            .body,
        b"k4"
    );
    assert!(integrity_audits(&s).await.is_empty());
}

/// Readers racing the node's own updates and deletes never take a commit for a rollback:
/// a row read just before a commit moved its floor is read again.
pub(crate) async fn readers_racing_commits_see_no_false_rollback(h: &impl Harness) {
    let s = h.open().await;
    s.commit(writes(vec![put("key", "v", "k", b"0", Some(0))]))
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (s, stop) = (s.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.get("key", "v", "k").await?;
                s.list("key", Some("v")).await?;
                reads += 1;
            }
            Ok::<u64, Error>(reads)
        }));
    }
    for n in 0..150 {
        if n % 10 == 9 {
            s.commit(writes(vec![del("key", "v", "k", None)]))
                .await
                .unwrap();
            s.commit(writes(vec![put("key", "v", "k", b"again", Some(0))]))
                .await
                .unwrap();
        } else {
            s.commit(writes(vec![put("key", "v", "k", b"next", None)]))
                .await
                .unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut results = Vec::new();
    for r in readers {
        results.push(r.await.unwrap());
    }
    let audits = integrity_audits(&s).await;
    assert!(audits.is_empty(), "{results:?} {audits:?}");
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|n| *n > 0)));
    // 150 puts (15 of them after a delete): every revision continued.
    assert_eq!(s.get("key", "v", "k").await.unwrap().unwrap().rev, 151);
}

/// Every Store future can be spawned (axum handlers and tokio::spawn need Send).
#[test]
fn store_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
    assert_shareable::<Store>();
    let check = |s: &Store| {
        assert_send(&Store::open("x", TestSigner::generate().0, record_key()));
        assert_send(&s.get("k", "a", "i"));
        assert_send(&s.list("k", None));
        assert_send(&s.commit(Batch::default()));
        assert_send(&s.audit_list(None, 0, 1));
        let verify = |_: &[u8; 32], _: &[u8]| true;
        assert_send(&s.audit_verify(&verify));
    };
    let _ = check;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkill_loses_no_acknowledged_commit"]
async fn durability_child_entry() {
    durability_child().await;
}

/// Single use enforced by the database: a token taken concurrently by many callers on two
/// nodes (two `Store` handles on one database) is handed to exactly one of them; a later
/// take, on either node or after a reopen, finds nothing.
async fn take_consumes_once_across_nodes(h: &impl Harness) {
    let a = h.open().await;
    let b = h.open().await;
    for round in 0..3 {
        let id = format!("nonce-{round}");
        a.commit(Batch {
            writes: vec![Write::Put {
                kind: "token".into(),
                account: "-".into(),
                id: id.clone(),
                body: b"issued".to_vec(),
                expect_rev: Some(0),
            }],
            audit: vec![],
        })
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = id.clone();
            tasks.push(tokio::spawn(async move { s.take("token", "-", &id).await }));
        }
        let mut winners = 0;
        for t in tasks {
            if let Some(o) = t.await.unwrap().unwrap() {
                assert_eq!(o.body, b"issued");
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one taker wins");
        assert!(a.take("token", "-", &id).await.unwrap().is_none());
        assert!(b.take("token", "-", &id).await.unwrap().is_none());
    }
    drop(a);
    drop(b);
    let c = h.open().await;
    assert!(c.take("token", "-", "nonce-0").await.unwrap().is_none());
    assert!(
        c.take("token", "-", "never-issued")
            .await
            .unwrap()
            .is_none()
    );
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::SqliteHarness::new();
                    super::$name(&h).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::PgHarness::new();
                    super::$name(&h).await;
                }
            )*
        }
    };
}

suite!(
    objects_put_get_list_delete,
    expect_rev_conflicts_roll_back_whole_batch,
    invalid_input_is_rejected,
    concurrent_commits_all_succeed_and_chain_holds,
    audit_append_list_verify,
    tamper_edited_record_is_detected,
    tamper_edited_record_with_recomputed_hash_is_detected,
    tamper_removed_record_is_detected,
    tamper_removed_tail_is_detected,
    tamper_reordered_records_are_detected,
    tamper_malformed_hash_is_reported_not_panicking,
    reopen_keeps_objects_and_chain,
    two_nodes_append_to_one_chain,
    backend_is_reported,
    sigkill_loses_no_acknowledged_commit,
    anchor_observes_heads_and_follows_other_writers,
    anchor_refuses_a_cut_tail,
    anchor_refuses_a_rewritten_chain,
    integrity_edited_body_is_refused,
    integrity_edited_rev_or_mac_is_refused,
    integrity_copied_row_is_refused,
    integrity_swapped_rows_are_refused,
    integrity_repointed_row_is_refused,
    integrity_needs_the_record_key,
    integrity_old_version_of_a_row_put_back_is_refused,
    integrity_deleted_row_put_back_is_refused,
    integrity_floors_carried_over_a_restart_refuse_a_rollback,
    a_row_deleted_by_hand_comes_back_above_the_floor,
    readers_racing_commits_see_no_false_rollback,
    take_consumes_once_across_nodes,
);
