//! KMS domains (P7) from the attacker's positions: a database administrator who writes rows
//! (too few approvals, forged approvals, replayed or skipped versions, forged or moved EDTs,
//! a rolled-back chain), a removed node, and an operator acting alone. Every member must
//! refuse, and refusals are audited.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use caas_kms::domain::edt;
use caas_kms::domain::identity::NodeIdentity;
use caas_kms::domain::member::{self, Approved, Member};
use caas_kms::domain::state::{Change, OperatorKey, QuorumRules, SignedState};
use caas_kms::domain::{self, DomainError, EDT_KIND, STATE_KIND};
use caas_kms::{Caller, Kms, KmsParams};
use caas_store::{Batch, Store, Write};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod inproc;
use inproc::call;

struct Domain {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    db: String,
    genesis: [u8; 32],
    ops: Vec<OperatorKey>,
    /// Node 1's store (holds the domain root).
    store: Store,
}

fn node_file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("node{n}.identity"))
}

/// A domain with node 1 as first member, three operators, quorum 2 for everything.
async fn domain() -> (Domain, Member) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let db = format!("sqlite:{}", dir.join("kms.sqlite3").display());
    let n1 = NodeIdentity::create(&node_file(&dir, 1)).unwrap();
    let ops: Vec<OperatorKey> = (1..=3)
        .map(|i| OperatorKey::create(&dir.join(format!("op{i}.key")), &format!("op{i}")).unwrap())
        .collect();
    let operators: BTreeMap<_, _> = ops.iter().map(|o| (o.name.clone(), o.public())).collect();
    let genesis = domain::init(&db, &n1, operators, QuorumRules::uniform(2))
        .await
        .unwrap();
    let m1 = Member::new(n1, genesis, Some(domain::head_file(&node_file(&dir, 1))));
    // Node 1's store: open through its own EDT.
    let boot = Store::open(
        &db,
        std::sync::Arc::new(domain::NoAuditSigner),
        std::sync::Arc::new(domain::DomainRecordAuth::bootstrap()),
    )
    .await
    .unwrap();
    let (_, dks) = m1.keys(&boot, None).await.unwrap();
    let store = domain::open_store(&db, &dks.keys[&1]).await.unwrap();
    (
        Domain {
            _tmp: tmp,
            dir,
            db,
            genesis,
            ops,
            store,
        },
        m1,
    )
}

impl Domain {
    /// Proposes `change` and has the first `k` operators approve it.
    async fn change(&self, change: Change, k: usize) -> Approved {
        let p = member::propose(&self.store, &self.genesis, change)
            .await
            .unwrap();
        let h = p.signed.hash();
        let mut last = None;
        for op in &self.ops[..k] {
            last = Some(
                member::approve(&self.store, &self.genesis, op, &h)
                    .await
                    .unwrap(),
            );
        }
        last.unwrap()
    }

    fn member(&self, n: usize) -> Member {
        let id = NodeIdentity::load_or_create(&node_file(&self.dir, n)).unwrap();
        Member::new(
            id,
            self.genesis,
            Some(domain::head_file(&node_file(&self.dir, n))),
        )
    }

    /// Writes a row as a database administrator would (public MAC of domain rows).
    async fn put_raw(&self, kind: &str, id: &str, body: Vec<u8>) {
        self.store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: kind.into(),
                    account: "-".into(),
                    id: id.into(),
                    body,
                    expect_rev: None,
                }],
                audit: vec![],
            })
            .await
            .unwrap();
    }

    async fn refusals(&self) -> Vec<Value> {
        self.store
            .audit_list(None, 0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.entry.operation == "DomainChangeRefused")
            .map(|r| serde_json::from_str(&r.entry.detail).unwrap())
            .collect()
    }
}

fn add_node(m: &Member) -> Change {
    Change::AddNode {
        keys: m.identity().public().clone(),
    }
}

#[tokio::test]
async fn quorum_change_takes_effect_only_with_enough_approvals() {
    let (d, m1) = domain().await;
    let m2 = d.member(2);
    assert_eq!(
        d.change(add_node(&m2), 1).await,
        Approved::Recorded { have: 1, need: 2 }
    );
    let chain = m1.chain(&d.store, Some(&d.store)).await.unwrap();
    assert_eq!(
        chain.latest().version,
        1,
        "one approval of two changed the domain"
    );
    // The same operator approving twice still counts once.
    let p = member::pending(&d.store, &d.genesis)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        member::approve(&d.store, &d.genesis, &d.ops[0], &p.signed.hash())
            .await
            .unwrap(),
        Approved::Recorded { have: 1, need: 2 }
    );
    assert_eq!(
        member::approve(&d.store, &d.genesis, &d.ops[1], &p.signed.hash())
            .await
            .unwrap(),
        Approved::Published(2)
    );
    let chain = m1.chain(&d.store, Some(&d.store)).await.unwrap();
    assert!(chain.latest().members.contains_key(m2.identity().id()));
}

#[tokio::test]
async fn quorum_too_few_signatures_written_by_the_database_is_refused_and_audited() {
    let (d, m1) = domain().await;
    let m2 = d.member(2);
    // The attacker writes version 2 directly with one genuine approval.
    let chain = m1.chain(&d.store, None).await.unwrap();
    let next = chain.latest().apply(&add_node(&m2)).unwrap();
    let mut s = SignedState::new(&next).unwrap();
    s.approve(&d.ops[0]);
    d.put_raw(
        STATE_KIND,
        &format!("{:020}", 2),
        serde_json::to_vec(&s).unwrap(),
    )
    .await;
    for m in [&m1, &m2] {
        let chain = m.chain(&d.store, Some(&d.store)).await.unwrap();
        assert_eq!(chain.latest().version, 1);
        assert!(chain.refused.as_ref().unwrap().1.contains("needs 2"));
    }
    let r = d.refusals().await;
    assert!(
        r.iter().any(
            |r| r["what"] == "DomainState" && r["reason"].as_str().unwrap().contains("needs 2")
        ),
        "{r:?}"
    );
    // Node 2 is not a member: it holds no domain key.
    let (_, dks) = m2.keys(&d.store, None).await.unwrap();
    assert!(dks.keys.is_empty());
}

#[tokio::test]
async fn quorum_forged_approval_is_refused() {
    let (d, m1) = domain().await;
    let m2 = d.member(2);
    let chain = m1.chain(&d.store, None).await.unwrap();
    let next = chain.latest().apply(&add_node(&m2)).unwrap();
    let mut s = SignedState::new(&next).unwrap();
    s.approve(&d.ops[0]);
    // A key the attacker made, under operator 2's name.
    s.approve(&OperatorKey::generate("op2").unwrap());
    d.put_raw(
        STATE_KIND,
        &format!("{:020}", 2),
        serde_json::to_vec(&s).unwrap(),
    )
    .await;
    let chain = m1.chain(&d.store, Some(&d.store)).await.unwrap();
    assert_eq!(chain.latest().version, 1);
    // The approval tool refuses a key that is not the operator's.
    let p = member::propose(&d.store, &d.genesis, add_node(&d.member(3)))
        .await
        .unwrap();
    let forged = OperatorKey::generate("op2").unwrap();
    assert!(matches!(
        member::approve(&d.store, &d.genesis, &forged, &p.signed.hash()).await,
        Err(DomainError::Refused(_))
    ));
}

#[tokio::test]
async fn quorum_document_with_more_than_the_approved_change_is_refused() {
    let (d, m1) = domain().await;
    let m2 = d.member(2);
    let chain = m1.chain(&d.store, None).await.unwrap();
    // Claims "AddNode" but also drops operator 3 — approvals are genuine.
    let mut next = chain.latest().apply(&add_node(&m2)).unwrap();
    next.operators.remove("op3");
    next.rules = QuorumRules::uniform(1);
    let mut s = SignedState::new(&next).unwrap();
    s.approve(&d.ops[0]);
    s.approve(&d.ops[1]);
    d.put_raw(
        STATE_KIND,
        &format!("{:020}", 2),
        serde_json::to_vec(&s).unwrap(),
    )
    .await;
    let chain = m1.chain(&d.store, Some(&d.store)).await.unwrap();
    assert_eq!(chain.latest().version, 1);
    assert!(chain.refused.unwrap().1.contains("change applied"));
}

#[tokio::test]
async fn quorum_replayed_and_skipped_domain_state_versions_are_refused() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    assert_eq!(d.change(add_node(&m2), 2).await, Approved::Published(2));
    let v2 = d
        .store
        .get(STATE_KIND, "-", &format!("{:020}", 2))
        .await
        .unwrap()
        .unwrap();
    // Replay: version 2's approved document written again as version 3.
    d.put_raw(STATE_KIND, &format!("{:020}", 3), v2.body.clone())
        .await;
    let chain = m1.chain(&d.store, Some(&d.store)).await.unwrap();
    assert_eq!(chain.latest().version, 2);
    assert!(chain.refused.unwrap().1.contains("skipped or replayed"));
    // Approvals of version 2 moved onto a different document.
    let mut other = SignedState::new(&chain.versions[1].1.apply(&add_node(&m3)).unwrap()).unwrap();
    let old: SignedState = serde_json::from_slice(&v2.body).unwrap();
    other.approvals = old.approvals;
    d.put_raw(
        STATE_KIND,
        &format!("{:020}", 3),
        serde_json::to_vec(&other).unwrap(),
    )
    .await;
    assert_eq!(m1.chain(&d.store, None).await.unwrap().latest().version, 2);
    // Skip: a properly approved version 4 without a version 3.
    d.store
        .commit(Batch {
            writes: vec![Write::Delete {
                kind: STATE_KIND.into(),
                account: "-".into(),
                id: format!("{:020}", 3),
                expect_rev: None,
            }],
            audit: vec![],
        })
        .await
        .unwrap();
    let mut v3 = chain_latest(&d, &m1).await.apply(&add_node(&m3)).unwrap();
    v3.version = 4;
    let mut s = SignedState::new(&v3).unwrap();
    s.approve(&d.ops[0]);
    s.approve(&d.ops[1]);
    d.put_raw(
        STATE_KIND,
        &format!("{:020}", 4),
        serde_json::to_vec(&s).unwrap(),
    )
    .await;
    let chain = m1.chain(&d.store, Some(&d.store)).await.unwrap();
    assert_eq!(chain.latest().version, 2);
    assert!(chain.refused.unwrap().1.contains("skipped"));
    assert!(d.refusals().await.len() >= 2);
}

async fn chain_latest(d: &Domain, m: &Member) -> caas_kms::domain::state::DomainState {
    m.chain(&d.store, None).await.unwrap().latest().clone()
}

#[tokio::test]
async fn quorum_rolled_back_domain_state_is_refused_by_a_node_that_saw_newer() {
    let (d, m1) = domain().await;
    let m2 = d.member(2);
    d.change(add_node(&m2), 2).await;
    d.change(
        Change::RemoveNode {
            node: m2.identity().id().into(),
        },
        2,
    )
    .await;
    assert_eq!(m1.chain(&d.store, None).await.unwrap().latest().version, 3);
    // The administrator restores the chain as it was before the removal.
    d.store
        .commit(Batch {
            writes: vec![Write::Delete {
                kind: STATE_KIND.into(),
                account: "-".into(),
                id: format!("{:020}", 3),
                expect_rev: None,
            }],
            audit: vec![],
        })
        .await
        .unwrap();
    let e = m1.chain(&d.store, None).await.unwrap_err();
    assert!(e.to_string().contains("rolled-back"), "{e}");
}

#[tokio::test]
async fn quorum_new_operator_cannot_approve_its_own_admission_and_rules_stay_satisfiable() {
    let (d, _m1) = domain().await;
    let newcomer = OperatorKey::generate("op4").unwrap();
    let p = member::propose(
        &d.store,
        &d.genesis,
        Change::AddOperator {
            name: "op4".into(),
            public: newcomer.public().public,
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        member::approve(&d.store, &d.genesis, &newcomer, &p.signed.hash()).await,
        Err(DomainError::Refused(_))
    ));
    // Rules needing more operators than exist are refused at proposal.
    assert!(
        member::propose(
            &d.store,
            &d.genesis,
            Change::SetRules {
                rules: QuorumRules::uniform(4)
            }
        )
        .await
        .is_err()
    );
    // Removing operators below the quorum is refused too.
    d.change(Change::RemoveOperator { name: "op3".into() }, 2)
        .await;
    assert!(
        member::propose(
            &d.store,
            &d.genesis,
            Change::RemoveOperator { name: "op2".into() }
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn edt_three_nodes_share_the_domain_key_and_a_removed_node_gets_no_later_key() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    d.change(add_node(&m2), 2).await;
    d.change(add_node(&m3), 2).await;
    // Node 1 sends its keys to the joiners.
    m1.sync(&d.store).await.unwrap();
    let k1 = m1.keys(&d.store, None).await.unwrap().1;
    for m in [&m2, &m3] {
        let k = m.keys(&d.store, None).await.unwrap().1;
        assert_eq!(k.keys[&1].expose(), k1.keys[&1].expose());
        assert_eq!(k.sealing, Some(1));
    }
    // Remove node 3: the next key is made without it.
    d.change(
        Change::RemoveNode {
            node: m3.identity().id().into(),
        },
        2,
    )
    .await;
    let k = m2.sync(&d.store).await.unwrap();
    assert_eq!(k.sealing, Some(2), "a removal forces a new domain key");
    let k1 = m1.sync(&d.store).await.unwrap();
    assert_eq!(k1.keys[&2].expose(), k.keys[&2].expose());
    let k3 = m3.keys(&d.store, None).await.unwrap().1;
    assert!(
        k3.keys.contains_key(&1),
        "old keys stay (made before its removal)"
    );
    assert!(
        !k3.keys.contains_key(&2),
        "the removed node opened a later key"
    );
    // Every stored EDT for version 2 lacks an envelope for node 3.
    for o in d.store.list(EDT_KIND, Some("-")).await.unwrap() {
        let t: edt::Edt = serde_json::from_slice(&o.body).unwrap();
        let b = t.body().unwrap();
        if b.dk_version >= 2 {
            assert!(
                b.envelopes
                    .iter()
                    .all(|e| e.recipient != m3.identity().id())
            );
        }
    }
}

#[tokio::test]
async fn edt_forged_by_a_non_member_or_removed_node_is_never_used() {
    let (d, m1) = domain().await;
    let m2 = d.member(2);
    d.change(add_node(&m2), 2).await;
    m1.sync(&d.store).await.unwrap();
    let chain = m1.chain(&d.store, None).await.unwrap();
    let st = chain.latest().clone();
    // An outsider who knows every public key makes "domain key 2" for node 1 and signs it
    // with its own identity.
    let outsider = NodeIdentity::generate().unwrap();
    let mut fake_state = st.clone();
    fake_state
        .members
        .insert(outsider.id().into(), outsider.public().clone());
    let dk = caas_crypto::random_key().unwrap();
    let forged = edt::seal(
        &outsider,
        &fake_state,
        2,
        &dk,
        &[m1.identity().id().into()],
        None,
    )
    .unwrap();
    let b = forged.body().unwrap();
    d.put_raw(
        EDT_KIND,
        &format!("{:010}.{:020}.{}", 2, b.state_version, b.sender),
        serde_json::to_vec(&forged).unwrap(),
    )
    .await;
    let k = m1.keys(&d.store, Some(&d.store)).await.unwrap().1;
    assert!(!k.keys.contains_key(&2), "a forged EDT was opened");
    assert_eq!(k.sealing, Some(1));
    assert!(
        d.refusals()
            .await
            .iter()
            .any(|r| r["what"] == "EDT" && r["reason"].as_str().unwrap().contains("not a member")),
    );
    // A tampered body (one bit) no longer verifies.
    let real = d
        .store
        .list(EDT_KIND, Some("-"))
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let mut t: edt::Edt = serde_json::from_slice(&real.body).unwrap();
    let mut b = t.body().unwrap();
    let sv = b.state_version;
    assert!(t.verify(chain.get(sv).unwrap()).is_ok());
    b.created_ms += 1;
    t.body = serde_json::to_vec(&b).unwrap();
    assert!(matches!(
        t.verify(chain.get(sv).unwrap()),
        Err(DomainError::Refused(m)) if m.contains("signature")
    ));
    // Node 2 removed; it then makes a "new" key under the old state where it was a member.
    d.change(
        Change::RemoveNode {
            node: m2.identity().id().into(),
        },
        2,
    )
    .await;
    let old = chain.get(2).unwrap();
    let sneaky = edt::seal(
        &m2.identity_clone(&d),
        old,
        9,
        &dk,
        &[m1.identity().id().into()],
        None,
    )
    .unwrap();
    d.put_raw(
        EDT_KIND,
        &format!("{:010}.{:020}.{}", 9, 2, m2.identity().id()),
        serde_json::to_vec(&sneaky).unwrap(),
    )
    .await;
    let k = m1.sync(&d.store).await.unwrap();
    assert!(
        k.keys.contains_key(&9),
        "(validly signed under a state it was in)"
    );
    assert_ne!(
        k.sealing,
        Some(9),
        "a removed node's later key is used for new EKTs"
    );
}

trait Clone2 {
    fn identity_clone(&self, d: &Domain) -> NodeIdentity;
}
impl Clone2 for Member {
    fn identity_clone(&self, d: &Domain) -> NodeIdentity {
        for n in 1..=4 {
            let p = node_file(&d.dir, n);
            if let Ok(i) = NodeIdentity::load(&p)
                && i.id() == self.identity().id()
            {
                return i;
            }
        }
        panic!("no identity file")
    }
}

#[tokio::test]
async fn edt_for_another_node_or_moved_is_refused() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    d.change(add_node(&m2), 2).await;
    d.change(add_node(&m3), 2).await;
    let st = m1.chain(&d.store, None).await.unwrap().latest().clone();
    let dk = caas_crypto::random_key().unwrap();
    let id1 = m1.identity_clone(&d);
    let for2 = edt::seal(&id1, &st, 5, &dk, &[m2.identity().id().into()], None).unwrap();
    let body = for2.verify(&st).unwrap();
    // Node 3 has no envelope in it.
    assert!(matches!(
        edt::open(&m3.identity_clone(&d), &body),
        Err(DomainError::Refused(_))
    ));
    // Node 2's envelope relabelled for node 3 does not open (recipient bound in the AAD
    // and the KDF), even before the signature (which it also breaks).
    let mut moved = body.clone();
    moved.envelopes[0].recipient = m3.identity().id().into();
    assert!(edt::open(&m3.identity_clone(&d), &moved).is_err());
    // Same envelope claimed for another key version: does not open.
    let mut other_v = body.clone();
    other_v.dk_version = 6;
    assert!(edt::open(&m2.identity_clone(&d), &other_v).is_err());
    assert_eq!(
        edt::open(&m2.identity_clone(&d), &body).unwrap().expose(),
        dk.expose()
    );
    // Stored under another version's id: refused by the member.
    d.put_raw(
        EDT_KIND,
        &format!("{:010}.{:020}.{}", 7, st.version, m1.identity().id()),
        serde_json::to_vec(&for2).unwrap(),
    )
    .await;
    let k = m2.keys(&d.store, Some(&d.store)).await.unwrap().1;
    assert!(!k.keys.contains_key(&7) && !k.keys.contains_key(&5));
}

// ---- whole key service: three members of one database --------------------------------

fn params(d: &Domain, n: usize) -> KmsParams {
    KmsParams {
        region: "us-east-1".into(),
        database: d.db.clone(),
        node_key_file: node_file(&d.dir, n),
        create_node_key: false,
        domain_key_rotation: Some(std::time::Duration::from_secs(86_400)),
        domain: Some(domain::DomainParams {
            identity_file: node_file(&d.dir, n),
            genesis: d.genesis,
            identity_tcti: None,
            sealer: None,
        }),
        audit_durability: Default::default(),
    }
}

#[tokio::test]
async fn three_nodes_key_service_encrypt_on_one_decrypt_on_the_others_across_rotation() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    d.change(add_node(&m2), 2).await;
    d.change(add_node(&m3), 2).await;
    drop((m2, m3));
    m1.sync(&d.store).await.unwrap();
    let k1 = Kms::open(&params(&d, 1)).await.unwrap();
    let k2 = Kms::open(&params(&d, 2)).await.unwrap();
    let k3 = Kms::open(&params(&d, 3)).await.unwrap();
    assert_eq!(k1.audit_public_key(), k3.audit_public_key());
    let account = k1.create_account("t").await.unwrap();
    let who = Caller {
        principal: format!("arn:aws:iam::{account}:user/t"),
        account,
        access_key_id: "AKIATEST".into(),
        kind: caas_kms::operator::CallerKind::Tenant,
    };
    let key = call(&k1, &who, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ct = call(
        &k1,
        &who,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": "aGVsbG8=" }),
    )
    .await
    .unwrap()["CiphertextBlob"]
        .clone();
    for k in [&k2, &k3] {
        let pt = call(k, &who, "Decrypt", json!({ "CiphertextBlob": ct }))
            .await
            .unwrap();
        assert_eq!(pt["Plaintext"], "aGVsbG8=");
    }
    // Quorum-approved forced rotation: node 2 makes the key, node 1 and 3 follow.
    d.change(Change::Rotate, 2).await;
    caas_kms::ops::maintenance(&k2).await.unwrap();
    assert_eq!(k2.keyring.current_version(), Some(2));
    for k in [&k1, &k3] {
        caas_kms::ops::maintenance(k).await.unwrap();
        assert_eq!(k.keyring.current_version(), Some(2));
    }
    let ct2 = call(
        &k3,
        &who,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": "d29ybGQ=" }),
    )
    .await
    .unwrap()["CiphertextBlob"]
        .clone();
    for k in [&k1, &k2, &k3] {
        assert_eq!(
            call(k, &who, "Decrypt", json!({ "CiphertextBlob": ct }))
                .await
                .unwrap()["Plaintext"],
            "aGVsbG8="
        );
        assert_eq!(
            call(k, &who, "Decrypt", json!({ "CiphertextBlob": ct2 }))
                .await
                .unwrap()["Plaintext"],
            "d29ybGQ="
        );
    }
}

#[tokio::test]
async fn node_join_a_node_admitted_by_quorum_serves_after_a_member_sends_it_the_keys() {
    let (d, m1) = domain().await;
    let m4 = d.member(4);
    // Not admitted yet: it cannot start.
    assert!(Kms::open(&params(&d, 4)).await.is_err());
    d.change(add_node(&m4), 2).await;
    // Admitted, but no member has sent it the keys yet.
    assert!(Kms::open(&params(&d, 4)).await.is_err());
    drop(m4);
    m1.sync(&d.store).await.unwrap();
    let k4 = Kms::open(&params(&d, 4)).await.unwrap();
    assert_eq!(k4.keyring.current_version(), Some(1));
}

#[tokio::test]
async fn quorum_two_approved_changes_racing_for_one_version_only_one_takes_effect() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    let cur = m1.chain(&d.store, None).await.unwrap().latest().clone();
    // Both fully approved, both for version 2: the database's compare-and-set decides.
    let mut writes = vec![];
    for m in [&m2, &m3] {
        let mut s = SignedState::new(&cur.apply(&add_node(m)).unwrap()).unwrap();
        s.approve(&d.ops[0]);
        s.approve(&d.ops[1]);
        let store = d.store.clone();
        writes.push(tokio::spawn(async move {
            store
                .commit(Batch {
                    writes: vec![Write::Put {
                        kind: STATE_KIND.into(),
                        account: "-".into(),
                        id: format!("{:020}", 2),
                        body: serde_json::to_vec(&s).unwrap(),
                        expect_rev: Some(0),
                    }],
                    audit: vec![],
                })
                .await
        }));
    }
    let mut ok = 0;
    for w in writes {
        match w.await.unwrap() {
            Ok(_) => ok += 1,
            Err(caas_store::Error::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1);
    let latest = m1.chain(&d.store, None).await.unwrap().latest().clone();
    assert_eq!(latest.version, 2);
    assert_eq!(latest.members.len(), 2, "exactly one of the two joined");
}

#[tokio::test]
async fn three_nodes_a_node_dying_between_new_domain_key_and_rewrap_leaves_the_domain_consistent() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    d.change(add_node(&m2), 2).await;
    d.change(add_node(&m3), 2).await;
    drop((m2, m3));
    m1.sync(&d.store).await.unwrap();
    let k1 = Kms::open(&params(&d, 1)).await.unwrap();
    let account = k1.create_account("t").await.unwrap();
    let who = Caller {
        principal: format!("arn:aws:iam::{account}:user/t"),
        account,
        access_key_id: "AKIATEST".into(),
        kind: caas_kms::operator::CallerKind::Tenant,
    };
    let key = call(&k1, &who, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ct = call(
        &k1,
        &who,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": "b2xk" }),
    )
    .await
    .unwrap()["CiphertextBlob"]
        .clone();
    // Node 2 makes the new domain key (one transaction) and dies before re-wrapping anything.
    {
        let k2 = Kms::open(&params(&d, 2)).await.unwrap();
        d.change(Change::Rotate, 2).await;
        k2.keyring
            .domain_member()
            .unwrap()
            .rotate(&k2.store)
            .await
            .unwrap();
    }
    // The others pick the new key up and finish the re-wrap; node 2 restarts and catches up.
    caas_kms::ops::maintenance(&k1).await.unwrap();
    assert_eq!(k1.keyring.current_version(), Some(2));
    let k3 = Kms::open(&params(&d, 3)).await.unwrap();
    let k2 = Kms::open(&params(&d, 2)).await.unwrap();
    for k in [&k1, &k2, &k3] {
        assert_eq!(k.keyring.current_version(), Some(2));
        assert_eq!(
            call(k, &who, "Decrypt", json!({ "CiphertextBlob": ct }))
                .await
                .unwrap()["Plaintext"],
            "b2xk"
        );
    }
    // Exactly one domain key version 2 exists.
    let claims = d.store.list(domain::DK_KIND, Some("-")).await.unwrap();
    assert_eq!(claims.len(), 2);
}

/// Runs maintenance on `nodes` until each has raised its record floor to `floor` (a few
/// rounds: acknowledge the new key, switch the write epoch, re-MAC, publish).
async fn maintain_until_floor(nodes: &[&Kms], floor: u32) {
    for _ in 0..6 {
        for k in nodes {
            caas_kms::ops::maintenance(k).await.unwrap();
        }
        if nodes
            .iter()
            .all(|k| k.keyring.domain_member().unwrap().epochs().floor() >= floor)
        {
            return;
        }
    }
    panic!("the record floor did not reach {floor} within six maintenance rounds");
}

fn integrity_failures(records: &[caas_store::AuditRecord], id: &str) -> usize {
    records
        .iter()
        .filter(|r| r.entry.operation == "IntegrityCheck" && r.entry.key_id.as_deref() == Some(id))
        .count()
}

/// The attacker: node 3, removed by quorum, keeps its identity, every domain key it was sent
/// (DK_1, hence the first record-MAC key) and write access to the database. After the next
/// rotation it forges a row (an existing key's row put back under its own MAC): every
/// remaining node refuses the row and audits it, rows written before the removal stay
/// readable, new rows are MAC'd under a key the removed node never had, and neither deleting
/// the floor row nor restarting a node brings the old key back.
#[tokio::test]
async fn three_nodes_removed_node_cannot_forge_a_row_after_the_next_rotation() {
    let (d, m1) = domain().await;
    let (m2, m3) = (d.member(2), d.member(3));
    d.change(add_node(&m2), 2).await;
    d.change(add_node(&m3), 2).await;
    let id3 = m3.identity().id().to_string();
    drop((m2, m3));
    m1.sync(&d.store).await.unwrap();
    let k1 = Kms::open(&params(&d, 1)).await.unwrap();
    let k2 = Kms::open(&params(&d, 2)).await.unwrap();
    let k3 = Kms::open(&params(&d, 3)).await.unwrap();
    let account = k1.create_account("t").await.unwrap();
    let who = Caller {
        principal: format!("arn:aws:iam::{account}:user/t"),
        account: account.clone(),
        access_key_id: "AKIATEST".into(),
        kind: caas_kms::operator::CallerKind::Tenant,
    };
    let key = call(&k1, &who, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ct = call(
        &k1,
        &who,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": "aGVsbG8=" }),
    )
    .await
    .unwrap()["CiphertextBlob"]
        .clone();
    for k in [&k1, &k2, &k3] {
        caas_kms::ops::maintenance(k).await.unwrap();
    }
    assert_eq!(
        k1.keyring.domain_member().unwrap().epochs().write(),
        Some(1)
    );
    drop(k3);

    // Removal by quorum; the remaining nodes rotate, switch epochs, re-MAC, raise the floor.
    d.change(Change::RemoveNode { node: id3.clone() }, 2).await;
    maintain_until_floor(&[&k1, &k2], 2).await;
    for k in [&k1, &k2] {
        let e = k.keyring.domain_member().unwrap().epochs();
        assert_eq!((e.floor(), e.write()), (2, Some(2)));
    }
    let resealed = k1
        .store
        .audit_list(None, 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.operation == "DomainRecordsResealed")
        .count();
    assert_eq!(resealed, 1, "one member re-MACs and publishes the floor");
    // Rows written before the removal are still readable (re-MAC'd under epoch 2).
    for k in [&k1, &k2] {
        assert_eq!(
            call(k, &who, "Decrypt", json!({ "CiphertextBlob": ct }))
                .await
                .unwrap()["Plaintext"],
            "aGVsbG8="
        );
    }

    // The audit chain verifies across the epochs (epoch 1 before the floor, 2 after).
    k1.flush_audit().await;
    k2.flush_audit().await;
    let report = k2
        .store
        .audit_verify_seq(&|q, h, s| k2.audit_signature_ok(q, h, s))
        .await
        .unwrap();
    assert!(report.is_ok(), "{report:?}");
    let (honest_head, _) = k2.store.audit_head().await.unwrap();

    // The removed node, with DK_1 (all it holds) and database access.
    let m3 = d.member(3);
    let boot = Store::open(
        &d.db,
        std::sync::Arc::new(domain::NoAuditSigner),
        std::sync::Arc::new(domain::DomainRecordAuth::bootstrap()),
    )
    .await
    .unwrap();
    let dks3 = m3.keys(&boot, None).await.unwrap().1;
    assert!(!dks3.keys.contains_key(&2), "the removed node opened DK_2");
    let attacker = domain::open_store(&d.db, &dks3.keys[&1]).await.unwrap();
    // It cannot even verify the rows the members write now.
    assert!(matches!(
        attacker.get("key", &account, &key).await,
        Err(caas_store::Error::Integrity { .. })
    ));
    // It forges the key's row under the MAC key it has (the body as the database shows it).
    let row = k1.store.get("key", &account, &key).await.unwrap().unwrap();
    attacker
        .commit(Batch {
            writes: vec![Write::Put {
                kind: "key".into(),
                account: account.clone(),
                id: key.clone(),
                body: row.body.clone(),
                expect_rev: None,
            }],
            audit: vec![],
        })
        .await
        .unwrap();
    // A key record verified before the forgery may serve key use for up to the key-use
    // cache's bound (`caas_kms::keycache`); after it, every node reads the forged row.
    tokio::time::sleep(caas_kms::keycache::KEY_CACHE_TTL).await;
    for k in [&k1, &k2] {
        let err = call(k, &who, "Decrypt", json!({ "CiphertextBlob": ct }))
            .await
            .unwrap_err();
        assert!(
            format!("{err:?}").contains("Internal") || format!("{err:?}").contains("Integrity"),
            "forged row was used: {err:?}"
        );
        let audit = k.store.audit_list(None, 0, 100_000).await.unwrap();
        assert!(
            integrity_failures(&audit, &key) >= 1,
            "the refused row is not audited"
        );
    }

    // Every audit record the removed node appends under its audit key is refused: the first
    // is its own store's IntegrityCheck of the row it could not verify, then the forgery.
    let forged = attacker
        .commit(Batch {
            writes: vec![],
            audit: vec![caas_kms::audit::system_entry("CreateKey", "forged")],
        })
        .await
        .unwrap()
        .audit_seqs[0];
    for k in [&k1, &k2] {
        let report = k
            .store
            .audit_verify_seq(&|q, h, s| k.audit_signature_ok(q, h, s))
            .await
            .unwrap();
        assert!(forged > honest_head + 1);
        assert_eq!(
            report.first_bad.as_ref().map(|f| f.seq),
            Some(honest_head + 1),
            "the removed node's audit record was accepted: {report:?}"
        );
    }

    // The database hides the floor (deletes its row); node 1 restarts: still refused.
    d.store
        .commit(Batch {
            writes: vec![Write::Delete {
                kind: domain::epoch::FLOOR_KIND.into(),
                account: "-".into(),
                id: domain::epoch::FLOOR_ID.into(),
                expect_rev: None,
            }],
            audit: vec![],
        })
        .await
        .unwrap();
    drop(k1);
    let k1 = Kms::open(&params(&d, 1)).await.unwrap();
    assert_eq!(k1.keyring.domain_member().unwrap().epochs().floor(), 2);
    assert!(matches!(
        k1.store.get("key", &account, &key).await,
        Err(caas_store::Error::Integrity { .. })
    ));
}

/// Rows a domain wrote before record epochs existed (bare 32-byte MACs under the first
/// domain key's record key) stay readable: epoch 1 is that key, in that format.
#[tokio::test]
async fn quorum_rows_of_a_domain_from_before_record_epochs_stay_readable() {
    let (d, m1) = domain().await;
    drop(m1);
    // What an older node wrote: HMAC under DK_1's record key, 32 bytes, no epoch.
    let boot = Store::open(
        &d.db,
        std::sync::Arc::new(domain::NoAuditSigner),
        std::sync::Arc::new(domain::DomainRecordAuth::bootstrap()),
    )
    .await
    .unwrap();
    let dk1 = d.member(1).keys(&boot, None).await.unwrap().1.keys[&1].clone();
    let legacy = Store::open(
        &d.db,
        std::sync::Arc::new(domain::NoAuditSigner),
        std::sync::Arc::new(domain::epoch::record_key(&dk1).unwrap()),
    )
    .await
    .unwrap();
    legacy
        .commit(Batch {
            writes: vec![Write::Put {
                kind: "alias".into(),
                account: "111122223333".into(),
                id: "alias/old".into(),
                body: b"{}".to_vec(),
                expect_rev: Some(0),
            }],
            audit: vec![],
        })
        .await
        .unwrap();
    let k1 = Kms::open(&params(&d, 1)).await.unwrap();
    let o = k1
        .store
        .get("alias", "111122223333", "alias/old")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.body, b"{}");
}
