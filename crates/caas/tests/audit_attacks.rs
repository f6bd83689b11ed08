//! The audit log against the database administrator, from the DBA's real position: the
//! `sqlite3` CLI on the dev database file and `psql` on a private PostgreSQL cluster, with
//! real `caas` processes on port 0. A cut tail, a rolled-back head row and a restored old
//! backup all leave a chain that verifies on its own; each is caught by the node's signed
//! checkpoint (`caas_kms::checkpoint`) in `caas audit verify` and at start-up, and the
//! operator override is itself audited. Also: the CloudTrail-style export and the key
//! service's process hygiene.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The DBA's tool: runs `sql` with the `sqlite3` CLI on the dev database.
fn sqlite3(dir: &Path, sql: &str) -> String {
    common::sqlite3(&dir.join("kms.sqlite3"), sql)
        .trim()
        .to_string()
}

/// A few acknowledged requests: a key and some encryptions of it (returns the ciphertexts).
fn traffic(dev: &Dev, n: usize) -> Vec<String> {
    let c = dev.client();
    rt().block_on(async {
        let key = c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string();
        let mut out = vec![];
        for i in 0..n {
            let ct = c
                .call(
                    "Encrypt",
                    &json!({ "KeyId": key, "Plaintext": b64(format!("msg-{i}").as_bytes()) }),
                )
                .await
                .unwrap();
            out.push(ct["CiphertextBlob"].as_str().unwrap().to_string());
        }
        out
    })
}

/// `caas audit verify [--json] --data-dir DIR`: (success, stdout, stderr).
fn verify(dir: &Path, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(caas_bin());
    cmd.args(["audit", "verify", "--data-dir"]).arg(dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify_json(dir: &Path) -> (bool, Value) {
    let (ok, out, err) = verify(dir, true);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (ok, v)
}

fn head_seq(dir: &Path) -> u64 {
    sqlite3(dir, "SELECT seq FROM audit_head").parse().unwrap()
}

/// Starts `caas dev` on `dir` expecting it to refuse: returns its log.
fn dev_refuses(dir: &Path) -> String {
    let log = dir.join("refused.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(caas_bin())
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "caas dev served on a rolled-back audit chain: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "caas dev exited successfully: {text}");
    assert!(
        text.contains("refusing to start") && text.contains("--accept-audit-rollback"),
        "no reason given: {text}"
    );
    assert!(!dir.join("env").exists() || read_env(dir).is_empty());
    text
}

/// The chain on its own verifies (the forgery is consistent); only the checkpoint tells.
fn assert_detected(dir: &Path, problem: &str) {
    let (ok, v) = verify_json(dir);
    assert!(!ok, "verify accepted a rolled-back chain: {v}");
    assert_eq!(v["ok"], json!(false));
    assert_eq!(
        v["first_bad"],
        Value::Null,
        "the forged chain is consistent: {v}"
    );
    assert_eq!(v["checkpoint"]["status"], "stale", "{v}");
    let p = v["checkpoint"]["problem"].as_str().unwrap();
    assert!(p.contains(problem), "{p}");
    let (ok, text, _) = verify(dir, false);
    assert!(!ok);
    assert!(
        text.contains("checkpoint: FAILED")
            && text.contains(problem)
            && text.contains("result: FAILED"),
        "{text}"
    );
}

/// A fresh dev deployment with some traffic, then killed (-9: the checkpoint was never
/// fsynced by a clean shutdown; it is in the page cache).
fn dev_with_history(dir: &Path) -> Vec<String> {
    let mut dev = Dev::start(dir);
    let cts = traffic(&dev, 6);
    // The checkpoint thread trails the acknowledged head by one pwrite (µs; see
    // caas_kms::checkpoint): give it that before the kill.
    std::thread::sleep(Duration::from_millis(100));
    dev.kill9();
    let (ok, v) = verify_json(dir);
    assert!(ok, "{v}");
    assert_eq!(v["checkpoint"]["status"], "ok", "{v}");
    assert_eq!(
        v["checkpoint"]["seq"], v["head"]["seq"],
        "the checkpoint follows every commit: {v}"
    );
    cts
}

/// The attacker's best cut point: the last record at or before `seq` that carries a
/// signature (each group commit signs only its last record; cutting after an unsigned one
/// leaves a chain that fails verification on its own, see
/// `dba_cut_to_an_unsigned_record_fails_the_chain_itself`).
fn signed_at_or_before(dir: &Path, seq: u64) -> u64 {
    sqlite3(
        dir,
        &format!("SELECT max(seq) FROM audit_log WHERE seq <= {seq} AND length(signature) > 0"),
    )
    .parse()
    .unwrap()
}

#[test]
fn dba_cut_audit_tail_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    dev_with_history(dir);
    let head = head_seq(dir);
    // Delete the last three records and point the head row at the new last one.
    sqlite3(
        dir,
        &format!(
            "DELETE FROM audit_log WHERE seq > {keep}; \
             UPDATE audit_head SET seq = {keep}, hash = (SELECT hash FROM audit_log WHERE seq = {keep}) WHERE id = 1;",
            keep = signed_at_or_before(dir, head - 3)
        ),
    );
    assert_detected(dir, "tail was cut");
    let log = dev_refuses(dir);
    assert!(log.contains("tail was cut"), "{log}");
    // Nothing was appended by the refused start.
    assert_eq!(head_seq(dir), signed_at_or_before(dir, head - 3));
}

/// Group commits sign only their last record: a tail cut (or head rolled back) to a record
/// that only a removed later signature covered leaves a chain that fails on its own.
#[test]
fn dba_cut_to_an_unsigned_record_fails_the_chain_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    dev_with_history(dir);
    // Make the last record's predecessor unsigned, as a record in the middle of a group is.
    let head = head_seq(dir);
    sqlite3(
        dir,
        &format!(
            "UPDATE audit_log SET signature = x'' WHERE seq = {prev}; \
             DELETE FROM audit_log WHERE seq > {prev}; \
             UPDATE audit_head SET seq = {prev}, hash = (SELECT hash FROM audit_log WHERE seq = {prev}) WHERE id = 1;",
            prev = head - 1
        ),
    );
    let (ok, v) = verify_json(dir);
    assert!(!ok, "verify accepted an unsigned tail: {v}");
    // Reported at the first record no signature covers any more (head - 1, or earlier when
    // it shared its group with records before it).
    let bad = v["first_bad"]["seq"].as_u64().unwrap();
    assert!(bad < head, "{v}");
    assert!(v.to_string().to_lowercase().contains("signature"), "{v}");
    dev_refuses(dir);
}

#[test]
fn dba_rolled_back_head_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    dev_with_history(dir);
    let head = head_seq(dir);
    // Only the head row goes back; the records stay (later appends would reuse their seqs).
    sqlite3(
        dir,
        &format!(
            "UPDATE audit_head SET seq = {s}, hash = (SELECT hash FROM audit_log WHERE seq = {s}) WHERE id = 1;",
            s = signed_at_or_before(dir, head - 2)
        ),
    );
    assert_detected(dir, "head row was rolled back");
    dev_refuses(dir);
}

#[test]
fn restored_old_backup_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut dev = Dev::start(dir);
    let old = traffic(&dev, 2);
    dev.stop();
    // The DBA's backup of the database (sqlite3's online backup: a consistent copy).
    let db = dir.join("kms.sqlite3");
    let backup = tmp.path().join("backup.sqlite3");
    sqlite3(dir, &format!(".backup '{}'", backup.display()));
    let backup_head: u64 = head_seq(dir);
    let mut dev = Dev::start(dir);
    let newer = traffic(&dev, 4);
    dev.stop();
    assert!(head_seq(dir) > backup_head);
    // Restore it.
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("kms.sqlite3{suffix}")));
    }
    std::fs::copy(&backup, &db).unwrap();
    assert_eq!(head_seq(dir), backup_head);
    assert_detected(dir, "restored from an old backup");
    dev_refuses(dir);
    // The newer ciphertexts are exactly what the restore lost (their key was created after
    // the backup); the node said so instead of serving. Once the operator accepts the
    // restore, the old ones decrypt and the newer ones cannot.
    let dev = Dev::start_with(dir, "127.0.0.1:0", &["--accept-audit-rollback"]);
    let c = dev.client();
    rt().block_on(async {
        for ct in &old {
            c.call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await
                .unwrap();
        }
        for ct in &newer {
            assert!(
                c.call("Decrypt", &json!({ "CiphertextBlob": ct }))
                    .await
                    .is_err(),
                "a ciphertext of a key created after the backup decrypted"
            );
        }
    });
}

#[test]
fn operator_override_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cts = dev_with_history(dir);
    let head = head_seq(dir);
    let (old_cp, old_hash) = {
        let (_, v) = verify_json(dir);
        (
            v["checkpoint"]["seq"].as_u64().unwrap(),
            v["checkpoint"]["hash"].as_str().unwrap().to_string(),
        )
    };
    let keep = signed_at_or_before(dir, head - 2);
    sqlite3(
        dir,
        &format!(
            "DELETE FROM audit_log WHERE seq > {keep}; \
             UPDATE audit_head SET seq = {keep}, hash = (SELECT hash FROM audit_log WHERE seq = {keep}) WHERE id = 1;",
        ),
    );
    let accepted_hash = sqlite3(
        dir,
        &format!("SELECT lower(hex(hash)) FROM audit_log WHERE seq = {keep}"),
    );
    dev_refuses(dir);
    // The operator accepts the database as it is.
    let dev = Dev::start_with(dir, "127.0.0.1:0", &["--accept-audit-rollback"]);
    let records: Vec<Value> = dev
        .caas(&["audit", "list", "--limit", "1000"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let accepted: Vec<&Value> = records
        .iter()
        .filter(|r| r["Operation"] == "AcceptAuditRollback")
        .collect();
    assert_eq!(accepted.len(), 1, "{records:?}");
    let d = &accepted[0]["Detail"];
    assert_eq!(d["checkpoint"]["seq"], json!(old_cp), "{d}");
    assert_eq!(d["checkpoint"]["hash"], json!(old_hash), "{d}");
    assert_eq!(d["accepted_head"]["seq"], json!(keep), "{d}");
    assert_eq!(d["accepted_head"]["hash"], json!(accepted_hash), "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("tail was cut"),
        "{d}"
    );
    assert_eq!(accepted[0]["Seq"], json!(keep + 1));
    // The keys survived; serving goes on and the chain is fresh again.
    let c = dev.client();
    rt().block_on(async {
        for ct in &cts {
            c.call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await
                .unwrap();
        }
    });
    let (ok, v) = verify_json(dir);
    assert!(ok, "{v}");
    drop(dev);
    // A normal restart needs no override any more.
    let dev = Dev::start(dir);
    traffic(&dev, 1);
}

#[test]
fn kill9_and_restart_is_not_a_rollback() {
    // No false alarm: the checkpoint is written after each durable commit, so a SIGKILL
    // (or a clean stop) never leaves it ahead of the database.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for _ in 0..3 {
        let mut dev = Dev::start(dir);
        traffic(&dev, 3);
        dev.kill9();
    }
    let dev = Dev::start(dir);
    traffic(&dev, 1);
    let (ok, v) = verify_json(dir);
    assert!(ok, "{v}");
}

#[test]
fn audit_export_is_cloudtrail_shaped_and_holds_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let dev = Dev::start(dir);
    let canary = b"EXPORT-CANARY-plaintext-5f3a9c";
    let c = dev.client();
    let key = rt().block_on(async {
        let key = c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string();
        let ct = c
            .call(
                "Encrypt",
                &json!({ "KeyId": key, "Plaintext": b64(canary) }),
            )
            .await
            .unwrap();
        c.call(
            "Decrypt",
            &json!({ "CiphertextBlob": ct["CiphertextBlob"] }),
        )
        .await
        .unwrap();
        // A failure, for errorCode.
        assert!(
            c.call("Decrypt", &json!({ "CiphertextBlob": b64(b"garbage") }))
                .await
                .is_err()
        );
        key
    });
    let out = dev.caas(&["audit", "export"]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.len() >= 4, "{out}");
    let secret = &dev.env["AWS_SECRET_ACCESS_KEY"];
    for (what, n) in [
        ("plaintext", canary.to_vec()),
        ("plaintext (base64)", b64(canary).into_bytes()),
        ("secret access key", secret.as_bytes().to_vec()),
        ("node key", std::fs::read(dir.join("node.key")).unwrap()),
    ] {
        assert!(
            out.as_bytes().windows(n.len()).all(|w| w != &n[..]),
            "{what} in the export"
        );
    }
    let enc = events
        .iter()
        .find(|e| e["eventName"] == "Encrypt")
        .expect("an Encrypt event");
    for f in [
        "eventVersion",
        "eventTime",
        "eventSource",
        "eventName",
        "awsRegion",
        "userIdentity",
        "requestID",
        "eventID",
        "resources",
        "caas",
    ] {
        assert!(enc.get(f).is_some(), "{f} missing: {enc}");
    }
    assert_eq!(enc["eventSource"], "kms.amazonaws.com");
    assert_eq!(enc["awsRegion"], "us-east-1");
    let t = enc["eventTime"].as_str().unwrap();
    assert!(
        t.len() == 20 && t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T",
        "{t}"
    );
    assert_eq!(
        enc["userIdentity"]["accountId"],
        json!(dev.env["CAAS_ACCOUNT_ID"])
    );
    assert_eq!(
        enc["userIdentity"]["accessKeyId"],
        json!(dev.env["AWS_ACCESS_KEY_ID"])
    );
    assert_eq!(enc["resources"][0]["type"], "AWS::KMS::Key");
    assert!(
        enc["resources"][0]["ARN"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":key/{key}")),
        "{enc}"
    );
    assert!(enc.get("errorCode").is_none());
    let failed = events
        .iter()
        .find(|e| e["eventName"] == "Decrypt" && e.get("errorCode").is_some())
        .expect("a failed Decrypt");
    assert!(failed["errorCode"].as_str().unwrap().ends_with("Exception"));
    // Event ids are unique and stable across exports; --since-seq skips.
    let ids: std::collections::HashSet<&str> = events
        .iter()
        .map(|e| e["eventID"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len());
    let again = dev.caas(&["audit", "export"]);
    assert!(again.starts_with(out.lines().next().unwrap()));
    let last = events.last().unwrap()["caas"]["seq"].as_u64().unwrap();
    let since = dev.caas(&["audit", "export", "--since-seq", &(last - 1).to_string()]);
    assert_eq!(since.lines().count(), 1, "{since}");
}

/// The processes that serve the key service: not dumpable (the kernel then gives their
/// /proc/PID/* entries to root) and RLIMIT_CORE 0. Run as an unprivileged user (nobody when the
/// test runs as root) so that the ownership of /proc/PID tells dumpable from not.
#[test]
fn key_service_process_cannot_dump_core() {
    let root = nix_is_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ks");
    std::fs::create_dir(&dir).unwrap();
    let as_user = |cmd: &mut Command| {
        if root {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
            c.arg(cmd.get_program()).args(cmd.get_args());
            c
        } else {
            let mut c = Command::new(cmd.get_program());
            c.args(cmd.get_args());
            c
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Control: an ordinary process of the same user is dumpable (owns its /proc entry).
    let mut control = as_user(Command::new("sleep").arg("30"))
        .spawn()
        .expect("setpriv (util-linux) is needed");
    std::thread::sleep(Duration::from_millis(200));
    let control_uid = proc_owner(control.id());
    let _ = control.kill();
    let _ = control.wait();
    assert_ne!(control_uid, 0, "control process owned by root: cannot tell");

    // `caas key-service serve`.
    let cfg = dir.join("ks.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"{}\"\n[keys]\nnode_key_file = \"{}\"\ncreate_node_key = true\n",
            dir.join("kms.sqlite3").display(),
            dir.join("node.key").display()
        ),
    )
    .unwrap();
    if root {
        std::os::unix::fs::chown(&cfg, Some(65534), Some(65534)).unwrap();
    }
    let mut serve = as_user(
        Command::new(caas_bin())
            .args(["key-service", "serve", "--config"])
            .arg(&cfg),
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(serve.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on"), "{line}");
    let pid = serve.id();
    let res = std::panic::catch_unwind(|| assert_hardened(pid, "caas key-service serve"));
    let _ = serve.kill();
    let _ = serve.wait();
    res.unwrap();

    // `caas dev` (its key service runs in the dev process).
    let devdir = dir.join("dev");
    std::fs::create_dir(&devdir).unwrap();
    if root {
        std::os::unix::fs::chown(&devdir, Some(65534), Some(65534)).unwrap();
    }
    let mut dev = as_user(
        Command::new(caas_bin())
            .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&devdir),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !read_env(&devdir).contains_key("CAAS_KMS_ENDPOINT") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "caas dev did not start"
        );
        assert!(dev.try_wait().unwrap().is_none(), "caas dev exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = dev.id();
    let res = std::panic::catch_unwind(|| assert_hardened(pid, "caas dev"));
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = dev.wait();
    res.unwrap();
}

fn nix_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // The test process is dumpable, so /proc/self is owned by its effective uid.
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

fn proc_owner(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The kernel hands a non-dumpable process's /proc/PID/* entries (not the directory)
    // to root: environ, mem, fd...
    std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid()
}

fn assert_hardened(pid: u32, what: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap();
    assert_ne!(uid, 0, "{what} runs as root: cannot tell");
    assert_eq!(
        proc_owner(pid),
        0,
        "{what} (uid {uid}) is dumpable: its /proc/PID/environ is owned by it, not by root"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let f: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(
        (f.get(4), f.get(5)),
        (Some(&"0"), Some(&"0")),
        "{what}: core dumps not disabled: {core}"
    );
}

// ---------------------------------------------------------------- PostgreSQL, two nodes

struct PgNode {
    child: Option<std::process::Child>,
    endpoint: String,
}

/// `strict` audit durability: the test relies on each node's records being in the chain
/// when its replies arrive (with `bounded` a node's last Encrypt record may land after the
/// next node's CreateKey, and "the last four records are node 1's" would not hold).
fn pg_node_config(dir: &Path, url: &str, n: usize) -> PathBuf {
    let cfg = dir.join(format!("node{n}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"{url}\"\naudit_durability = \"strict\"\n[keys]\nnode_key_file = \"{}\"\n",
            dir.join(format!("node{n}")).join("node.key").display(),
        ),
    )
    .unwrap();
    cfg
}

fn serve(cfg: &Path) -> Result<PgNode, String> {
    let mut child = Command::new(caas_bin())
        .args(["key-service", "serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    match line.trim().strip_prefix("listening on ") {
        Some(addr) => Ok(PgNode {
            child: Some(child),
            endpoint: format!("http://{addr}"),
        }),
        None => {
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success());
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl PgNode {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn dba_cut_audit_tail_is_detected_on_postgres() {
    let pg = caas_store::testing::PgCluster::start().unwrap_or_else(|e| panic!("{}", e.0));
    let url = pg
        .create_database("caas")
        .unwrap_or_else(|e| panic!("{}", e.0));
    let tmp = tempfile::tempdir().unwrap();
    // Two nodes, each with its own directory (its own copy of the shared node key, its own
    // checkpoint), on one database.
    let cfgs: Vec<PathBuf> = (0..2)
        .map(|n| pg_node_config(tmp.path(), &url, n))
        .collect();
    for n in 0..2 {
        std::fs::create_dir(tmp.path().join(format!("node{n}"))).unwrap();
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
        for n in 0..2 {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp.path().join(format!("node{n}/node.key")))
                .unwrap();
            std::io::Write::write_all(&mut f, &key).unwrap();
        }
    }
    let mut nodes: Vec<PgNode> = cfgs.iter().map(|c| serve(c).unwrap()).collect();
    let acct: Value = serde_json::from_str(&caas_ok(
        &["admin", "create-account", "pg-tenant"],
        &cfgs[0],
    ))
    .unwrap();
    let ak: Value = serde_json::from_str(&caas_ok(
        &[
            "admin",
            "create-access-key",
            "--account",
            acct["Account"].as_str().unwrap(),
        ],
        &cfgs[0],
    ))
    .unwrap();
    rt().block_on(async {
        for node in &nodes {
            let c = caas_kms::client::KmsClient::new(
                &node.endpoint,
                "us-east-1",
                ak["AccessKeyId"].as_str().unwrap(),
                caas_crypto::SecretBytes::new(
                    ak["SecretAccessKey"].as_str().unwrap().as_bytes().to_vec(),
                ),
                None,
            )
            .unwrap();
            let key = c.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
                .as_str()
                .unwrap()
                .to_string();
            for i in 0..3 {
                c.call("Encrypt", &json!({ "KeyId": key, "Plaintext": b64(&[i]) }))
                    .await
                    .unwrap();
            }
        }
    });
    for n in &mut nodes {
        n.stop();
    }
    let verify_cfg = |cfg: &Path| {
        Command::new(caas_bin())
            .args(["audit", "verify", "--json", "--config"])
            .arg(cfg)
            .output()
            .unwrap()
    };
    for cfg in &cfgs {
        let out = verify_cfg(cfg);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The DBA cuts the last four records (node 1's) and rewrites the head row, with psql.
    let head: u64 = pg
        .psql("caas", "SELECT seq FROM audit_head")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let keep = head - 4;
    pg.psql(
        "caas",
        &format!(
            "BEGIN; DELETE FROM audit_log WHERE seq > {keep}; \
             UPDATE audit_head SET seq = {keep}, hash = (SELECT hash FROM audit_log WHERE seq = {keep}) WHERE id = 1; COMMIT;"
        ),
    )
    .unwrap();
    // Node 1 checkpointed the cut records: detected by verify and at its start-up.
    let out = verify_cfg(&cfgs[1]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success(), "{v}");
    assert_eq!(v["first_bad"], Value::Null, "{v}");
    assert_eq!(v["checkpoint"]["status"], "stale", "{v}");
    let err = serve(&cfgs[1]).err().expect("node 1 served a cut chain");
    assert!(
        err.contains("refusing to start") && err.contains("tail was cut"),
        "{err}"
    );
    // Node 0's checkpoint is older than the cut: its own check passes (seq ≤ head and the
    // record at its seq has its hash) — each node vouches for what it saw.
    let out = verify_cfg(&cfgs[0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Node 1 is brought back by the operator, audited.
    let mut cmd = Command::new(caas_bin());
    cmd.args([
        "key-service",
        "serve",
        "--accept-audit-rollback",
        "--config",
    ])
    .arg(&cfgs[1])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on"), "{line}");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let accepted = pg
        .psql(
            "caas",
            "SELECT detail FROM audit_log WHERE operation = 'AcceptAuditRollback'",
        )
        .unwrap();
    let d: Value = serde_json::from_str(accepted.trim()).unwrap();
    assert_eq!(d["checkpoint"]["seq"], json!(head), "{d}");
    assert_eq!(d["accepted_head"]["seq"], json!(keep), "{d}");
    let _ = &nodes;
}
