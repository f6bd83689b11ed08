//! KMS domains (P7) end to end: separate `caas key-service serve` processes, each with its
//! own identity, on a private PostgreSQL cluster, changed only by `caas domain` commands with
//! operator quorum. Needs the PostgreSQL server binaries (`apt-get install postgresql`).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn caas(args: &[&str]) -> Value {
    let out = Command::new(caas_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "caas {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("").to_string();
    serde_json::from_str(&last).unwrap_or(Value::String(last))
}

struct Net {
    dir: PathBuf,
    url: String,
    genesis: String,
    ops: Vec<PathBuf>,
}

impl Net {
    fn identity(&self, n: usize) -> PathBuf {
        self.dir.join(format!("node{n}.id"))
    }

    fn config(&self, n: usize) -> PathBuf {
        let p = self.dir.join(format!("node{n}.toml"));
        if !p.exists() {
            std::fs::write(
                &p,
                format!(
                    "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"{}\"\n[keys]\n\
                     identity_file = \"{}\"\ndomain_genesis = \"{}\"\n[maintenance]\ninterval_secs = 1\n",
                    self.url,
                    self.identity(n).display(),
                    self.genesis
                ),
            )
            .unwrap();
        }
        p
    }

    fn cfg(&self, n: usize) -> String {
        self.config(n).display().to_string()
    }

    /// Proposes with `args` on node `via` and has operators `approvers` approve.
    fn change(&self, via: usize, args: &[&str], approvers: &[usize]) -> Value {
        let mut a = vec!["domain"];
        a.extend_from_slice(&args[..1]);
        let cfg = self.cfg(via);
        a.extend_from_slice(&["--config", &cfg]);
        a.extend_from_slice(&args[1..]);
        let p = caas(&a);
        let hash = p["Pending"]["Hash"].as_str().unwrap().to_string();
        let mut last = Value::Null;
        for &o in approvers {
            last = caas(&[
                "domain",
                "approve",
                "--config",
                &cfg,
                "--operator-key",
                self.ops[o].to_str().unwrap(),
                "--hash",
                &hash,
            ]);
        }
        last
    }

    fn status(&self, n: usize) -> Value {
        caas(&["domain", "status", "--config", &self.cfg(n)])
    }

    fn wait_status(&self, n: usize, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status(n);
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < until, "node {n}: {what}: {s}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn serve(&self, n: usize) -> (Child, String) {
        let mut child = Command::new(caas_bin())
            .args(["key-service", "serve", "--config", &self.cfg(n)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("node {n}: {line}"))
            .to_string();
        (child, format!("http://{addr}"))
    }
}

fn held(s: &Value) -> Vec<u64> {
    s["DomainKeysHeld"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn client(ep: &str, ak: &Value) -> caas_kms::client::KmsClient {
    caas_kms::client::KmsClient::new(
        ep,
        "us-east-1",
        ak["AccessKeyId"].as_str().unwrap(),
        caas_crypto::SecretBytes::new(ak["SecretAccessKey"].as_str().unwrap().as_bytes().to_vec()),
        None,
    )
    .unwrap()
}

fn kill9(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn three_nodes_quorum_rotation_node_join_removal_and_kill9_on_postgresql() {
    let pg = caas_store::testing::PgCluster::start().unwrap_or_else(|e| panic!("{}", e.0));
    let url = pg
        .create_database("caas")
        .unwrap_or_else(|e| panic!("{}", e.0));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // Three operators, quorum 2.
    let mut ops = vec![];
    let mut op_args = vec![];
    for i in 1..=3 {
        let f = dir.join(format!("op{i}.key"));
        let v = caas(&[
            "domain",
            "operator-key",
            "--name",
            &format!("op{i}"),
            "--out",
            f.to_str().unwrap(),
        ]);
        op_args.push(v.as_str().unwrap().to_string());
        ops.push(f);
    }
    let id1 = dir.join("node1.id");
    let mut init = vec![
        "domain".to_string(),
        "init".into(),
        "--database".into(),
        url.clone(),
        "--identity".into(),
        id1.display().to_string(),
        "--quorum".into(),
        "2".into(),
    ];
    for o in &op_args {
        init.push("--operator".into());
        init.push(o.clone());
    }
    let g = caas(&init.iter().map(String::as_str).collect::<Vec<_>>());
    let net = Net {
        dir: dir.clone(),
        url: url.clone(),
        genesis: g["Genesis"].as_str().unwrap().to_string(),
        ops,
    };
    let join = |n: usize| {
        caas(&[
            "domain",
            "join",
            "--identity",
            net.identity(n).to_str().unwrap(),
        ])["Keys"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (k2, k3) = (join(2), join(3));
    // Too few approvals: nothing changes.
    let one = net.change(1, &["add-node", &k2], &[0]);
    assert_eq!(one["Approvals"], 1, "{one}");
    assert_eq!(net.status(1)["Version"], 1);
    // The second approval publishes it.
    let p = net.status(1)["Pending"]["Hash"]
        .as_str()
        .unwrap()
        .to_string();
    let pubd = caas(&[
        "domain",
        "approve",
        "--config",
        &net.cfg(1),
        "--operator-key",
        net.ops[1].to_str().unwrap(),
        "--hash",
        &p,
    ]);
    assert_eq!(pubd["Published"], 2, "{pubd}");
    assert_eq!(net.change(1, &["add-node", &k3], &[1, 2])["Published"], 3);

    let (mut n1, ep1) = net.serve(1);
    for n in [2, 3] {
        net.wait_status(n, "keys sent", |s| held(s) == vec![1]);
    }
    let (mut n2, ep2) = net.serve(2);
    let (mut n3, ep3) = net.serve(3);

    let acct = caas(&[
        "admin",
        "create-account",
        "--config",
        &net.cfg(1),
        "domain-tenant",
    ]);
    let ak = caas(&[
        "admin",
        "create-access-key",
        "--config",
        &net.cfg(1),
        "--account",
        acct["Account"].as_str().unwrap(),
    ]);
    let (c1, c2, c3) = (client(&ep1, &ak), client(&ep2, &ak), client(&ep3, &ak));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let enc = |c: &caas_kms::client::KmsClient, key: &str, pt: &[u8]| -> Value {
        rt.block_on(c.call("Encrypt", &json!({ "KeyId": key, "Plaintext": b64(pt) })))
            .unwrap()["CiphertextBlob"]
            .clone()
    };
    let dec = |c: &caas_kms::client::KmsClient, ct: &Value| {
        rt.block_on(c.call("Decrypt", &json!({ "CiphertextBlob": ct })))
            .map(|v| v["Plaintext"].as_str().unwrap().to_string())
    };
    // A key created on node 1 is used on nodes 2 and 3.
    let key = rt.block_on(c1.call("CreateKey", &json!({}))).unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ct1 = enc(&c1, &key, b"domain-canary-one");
    for c in [&c2, &c3] {
        assert_eq!(dec(c, &ct1).unwrap(), b64(b"domain-canary-one"));
    }
    let ct3 = enc(&c3, &key, b"from node three");
    assert_eq!(dec(&c1, &ct3).unwrap(), b64(b"from node three"));

    // Quorum-approved rotation; node 2 is killed -9 right as it takes effect.
    assert_eq!(net.change(1, &["rotate"], &[0, 2])["Published"], 4);
    kill9(&mut n2);
    for n in [1, 3] {
        net.wait_status(n, "rotation", |s| s["SealingDomainKey"] == 2);
    }
    // Restarted, node 2 catches up and serves old and new ciphertexts.
    std::thread::sleep(Duration::from_secs(3));
    let (mut n2b, ep2b) = net.serve(2);
    let c2 = client(&ep2b, &ak);
    let ct_rot = enc(&c2, &key, b"after rotation");
    for c in [&c1, &c2, &c3] {
        assert_eq!(dec(c, &ct1).unwrap(), b64(b"domain-canary-one"));
        assert_eq!(dec(c, &ct_rot).unwrap(), b64(b"after rotation"));
    }
    assert_eq!(net.status(2)["Version"], 4);

    // A fourth node joins with quorum approval and serves.
    let k4 = join(4);
    assert_eq!(net.change(2, &["add-node", &k4], &[0, 1])["Published"], 5);
    net.wait_status(4, "keys sent to the joiner", |s| {
        held(s).contains(&2) && held(s).contains(&1)
    });
    let (mut n4, ep4) = net.serve(4);
    let c4 = client(&ep4, &ak);
    assert_eq!(dec(&c4, &ct1).unwrap(), b64(b"domain-canary-one"));
    assert_eq!(dec(&c4, &ct_rot).unwrap(), b64(b"after rotation"));

    // Node 3 is removed: the next domain key is not sent to it.
    let node3 = net.status(3)["Node"].as_str().unwrap().to_string();
    assert_eq!(
        net.change(1, &["remove-node", &node3], &[1, 2])["Published"],
        6
    );
    net.wait_status(1, "rotation after removal", |s| {
        s["SealingDomainKey"].as_u64().is_some_and(|v| v >= 3)
    });
    let newest = net.status(1)["SealingDomainKey"].as_u64().unwrap();
    // Let the members re-wrap (maintenance every second).
    std::thread::sleep(Duration::from_secs(4));
    let ct_after = enc(&c4, &key, b"after removal");
    assert_eq!(dec(&c1, &ct_after).unwrap(), b64(b"after removal"));
    let s3 = net.status(3);
    assert_eq!(s3["Member"], false);
    assert!(
        !held(&s3).contains(&newest),
        "removed node holds the new key: {s3}"
    );
    assert!(
        dec(&c3, &ct_after).is_err(),
        "the removed node decrypted a later ciphertext"
    );

    // The remaining members re-MAC every row under the first key made after the removal and
    // raise the record floor: the removed node's record and audit keys authenticate nothing
    // new (crates/caas-kms/tests/domain_quorum.rs has the forgery itself).
    let f = net.wait_status(1, "record floor after the removal", |s| {
        s["RecordFloor"].as_u64().is_some_and(|f| f >= 3)
    });
    assert!(
        f["RecordEpoch"].as_u64() >= f["RecordFloor"].as_u64(),
        "{f}"
    );
    for c in [&c1, &c2, &c4] {
        assert_eq!(dec(c, &ct1).unwrap(), b64(b"domain-canary-one"));
        assert_eq!(dec(c, &ct_after).unwrap(), b64(b"after removal"));
    }

    // The database administrator inserts the next version with too few approvals (none):
    // every member refuses it and records the refusal in the audit log.
    let members: Vec<String> = [1, 2, 4]
        .iter()
        .map(|n| net.status(*n)["Node"].as_str().unwrap().to_string())
        .collect();
    let node4 = members[2].clone();
    let forged_id = rt.block_on(async {
        let store = bootstrap_store(&net).await;
        let g: [u8; 32] = hex::decode(&net.genesis).unwrap().try_into().unwrap();
        let chain = caas_kms::domain::member::read_chain(&store, &g)
            .await
            .unwrap();
        let next = chain
            .latest()
            .apply(&caas_kms::domain::state::Change::RemoveNode { node: node4 })
            .unwrap();
        let id = format!("{:020}", next.version);
        let signed = caas_kms::domain::state::SignedState::new(&next).unwrap();
        store
            .commit(caas_store::Batch {
                writes: vec![caas_store::Write::Put {
                    kind: caas_kms::domain::STATE_KIND.into(),
                    account: "-".into(),
                    id: id.clone(),
                    body: serde_json::to_vec(&signed).unwrap(),
                    expect_rev: Some(0),
                }],
                audit: vec![],
            })
            .await
            .unwrap();
        id
    });
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let refused: Vec<Value> = rt.block_on(async {
            bootstrap_store(&net)
                .await
                .audit_list(None, 0, 1_000_000)
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.entry.operation == "DomainChangeRefused")
                .map(|r| serde_json::from_str(&r.entry.detail).unwrap())
                .filter(|d: &Value| d["row"] == forged_id.as_str())
                .collect()
        });
        if members
            .iter()
            .all(|m| refused.iter().any(|d| d["node"] == m.as_str()))
        {
            assert!(
                refused
                    .iter()
                    .all(|d| d["reason"].as_str().unwrap().contains("operator approvals")),
                "{refused:?}"
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "not every member audited the refused version: {refused:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        net.status(1)["Version"],
        6,
        "the refused version took effect"
    );
    assert_eq!(dec(&c4, &ct1).unwrap(), b64(b"domain-canary-one"));

    // Nothing secret in the database: no domain key, no node secret, no plaintext.
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("canary".into(), b"domain-canary-one".to_vec()),
        (
            "access secret".into(),
            ak["SecretAccessKey"].as_str().unwrap().as_bytes().to_vec(),
        ),
    ];
    for n in 1..=4 {
        let f = std::fs::read(net.identity(n)).unwrap();
        needles.push((format!("node {n} signing seed"), f[8..40].to_vec()));
        needles.push((format!("node {n} agreement key"), f[40..72].to_vec()));
    }
    for dk in domain_keys(&net, 1) {
        needles.push(("a domain key".into(), dk));
    }
    assert!(needles.len() >= 2 + 8 + 3);
    let dump = pg.dump("caas").unwrap_or_else(|e| panic!("{}", e.0));
    for (what, n) in &needles {
        for enc in [n.clone(), b64(n).into_bytes(), hex::encode(n).into_bytes()] {
            assert!(
                dump.windows(enc.len()).all(|w| w != &enc[..]),
                "{what} found in the PostgreSQL dump"
            );
        }
    }
    for c in [&mut n1, &mut n2b, &mut n3, &mut n4] {
        kill9(c);
    }
}

/// A handle on the database as its administrator has it (no key: domain rows only).
async fn bootstrap_store(net: &Net) -> caas_store::Store {
    caas_store::Store::open(
        &net.url,
        std::sync::Arc::new(caas_kms::domain::NoAuditSigner),
        std::sync::Arc::new(caas_kms::domain::DomainRecordAuth::bootstrap()),
    )
    .await
    .unwrap()
}

/// The domain keys node `n` holds, opened from its EDTs the way the node does (test only).
fn domain_keys(net: &Net, n: usize) -> Vec<Vec<u8>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let me = caas_kms::domain::identity::NodeIdentity::load(&net.identity(n)).unwrap();
        let g: [u8; 32] = hex::decode(&net.genesis).unwrap().try_into().unwrap();
        let m = caas_kms::domain::member::Member::new(me, g, None);
        let store = caas_store::Store::open(
            &net.url,
            std::sync::Arc::new(caas_kms::domain::NoAuditSigner),
            std::sync::Arc::new(caas_kms::domain::DomainRecordAuth::bootstrap()),
        )
        .await
        .unwrap();
        let (_, k) = m.keys(&store, None).await.unwrap();
        k.keys.values().map(|k| k.expose().to_vec()).collect()
    })
}

/// The node identity sealed to the node's TPM (`caas domain join --tcti`, `[keys]
/// identity_tcti`): the attacker copies the identity file to another machine (another TPM),
/// or reads it without the TPM — it opens nothing there; on its own TPM it opens every time.
#[test]
fn node_join_identity_sealed_to_the_tpm_is_useless_on_another_machine() {
    use caas_tpm::swtpm::{LocalCa, Swtpm};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = LocalCa::create(&dir.join("tpm-ca")).unwrap();
    let start = |name: &str| {
        let state = dir.join(name);
        ca.provision(&state).unwrap();
        Swtpm::start(&state).unwrap()
    };
    let (own, other) = (start("tpm-own"), start("tpm-other"));
    let id = dir.join("node.id");
    let join = |file: &std::path::Path, tcti: Option<&str>| {
        let mut args = vec![
            "domain".to_string(),
            "join".into(),
            "--identity".into(),
            file.display().to_string(),
        ];
        if let Some(t) = tcti {
            args.extend(["--tcti".to_string(), t.to_string()]);
        }
        Command::new(caas_bin()).args(&args).output().unwrap()
    };
    let first = join(&id, Some(&own.tcti()));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let node = |o: &std::process::Output| -> Value {
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
    };
    let again = join(&id, Some(&own.tcti()));
    assert_eq!(node(&first)["Node"], node(&again)["Node"]);
    let bytes = std::fs::read(&id).unwrap();
    assert!(bytes.starts_with(b"CAASNID2"), "identity not sealed");
    // The copy on another machine: another TPM, or no TPM at all.
    let copy = dir.join("copied.id");
    std::fs::copy(&id, &copy).unwrap();
    let elsewhere = join(&copy, Some(&other.tcti()));
    assert!(
        !elsewhere.status.success(),
        "the copied identity opened on another TPM"
    );
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("does not unseal on this TPM"),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );
    let no_tpm = join(&copy, None);
    assert!(
        !no_tpm.status.success(),
        "the sealed identity opened without a TPM"
    );
    assert!(
        String::from_utf8_lossy(&no_tpm.stderr).contains("sealed to a TPM"),
        "{}",
        String::from_utf8_lossy(&no_tpm.stderr)
    );
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        bytes,
        "the copy was rewritten"
    );
}
