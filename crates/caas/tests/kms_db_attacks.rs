//! The database administrator as the attacker (issue 10, SYSTEM.md §3): a real key service
//! (`caas key-service serve`, port 0) on SQLite or on a private PostgreSQL cluster, tenants
//! talking to it with a SigV4 client, and the attacker editing rows with the `sqlite3` CLI
//! or `psql` — re-pointing their own access key to a victim's account, copying a victim's
//! key record into their own account, editing a key's state, policy or a grant, putting back
//! a key's row from before `DisableKey` or a revoked grant's row. Each attack
//! must be refused (`KMSInternalException`, the row never used), leave an audit record
//! naming the row, and leave everything acknowledged before working.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use caas_kms::client::{ClientError, KmsClient};
use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

enum Db {
    Sqlite(PathBuf),
    Postgres(caas_store::testing::PgCluster),
}

/// One key-service node and the database it uses, with the administrator's tools.
struct Node {
    /// Holds the config and node key until the node is dropped.
    tmp: tempfile::TempDir,
    db: Db,
    cfg: PathBuf,
    child: Child,
    endpoint: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn sqlite() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("kms.sqlite3");
        Self::start(tmp, Db::Sqlite(path))
    }

    fn postgres() -> Node {
        let pg = caas_store::testing::PgCluster::start().unwrap_or_else(|e| panic!("{}", e.0));
        pg.create_database("caas")
            .unwrap_or_else(|e| panic!("{}", e.0));
        Self::start(tempfile::tempdir().unwrap(), Db::Postgres(pg))
    }

    fn start(tmp: tempfile::TempDir, db: Db) -> Node {
        let url = match &db {
            Db::Sqlite(p) => format!("sqlite:{}", p.display()),
            Db::Postgres(pg) => pg.url_for("caas"),
        };
        let cfg = tmp.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"{url}\"\n[keys]\nnode_key_file = \"{}\"\ncreate_node_key = true\n",
                tmp.path().join("node.key").display()
            ),
        )
        .unwrap();
        let (child, endpoint) = Self::serve(&cfg);
        Node {
            tmp,
            db,
            cfg,
            child,
            endpoint,
        }
    }

    /// `caas key-service serve --config CFG`, once it listens: the child and its endpoint.
    fn serve(cfg: &std::path::Path) -> (Child, String) {
        let mut child = Command::new(caas_bin())
            .args(["key-service", "serve", "--config"])
            .arg(cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("key service did not start: {line}"))
            .to_string();
        (child, format!("http://{addr}"))
    }

    /// Stops the node: `SIGTERM` (a clean stop: audit log, checkpoint and row floors
    /// written) or `SIGKILL`.
    fn stop(&mut self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        self.child.wait().unwrap();
    }

    /// Waits until the node's row floor file was written after `t` (it writes every
    /// `PERSIST_INTERVAL` while its floors move).
    fn wait_for_floor_file_after(&self, t: std::time::SystemTime) {
        let file = caas_kms::row_floors::path_for(&self.tmp.path().join("node.key"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m <= t)
            || !file.exists()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{} not written within 60 s",
                file.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Starts the stopped node again on its database and node key (a new port).
    fn start_again(&mut self) {
        (self.child, self.endpoint) = Self::serve(&self.cfg);
    }

    /// `caas <args> --config CFG`, which must succeed; its stdout.
    fn caas_ok(&self, args: &[&str]) -> String {
        caas_ok(args, &self.cfg)
    }

    /// `caas <args> --config CFG`, stdout as JSON lines.
    fn caas(&self, args: &[&str]) -> Vec<Value> {
        self.caas_ok(args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A new tenant account.
    fn tenant(&self, name: &str) -> String {
        self.caas(&["admin", "create-account", name])[0]["Account"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// An access key of `user` in `account`: (access key id, client).
    fn user(&self, account: &str, user: &str) -> (String, KmsClient) {
        let ak = &self.caas(&[
            "admin",
            "create-access-key",
            "--account",
            account,
            "--user",
            user,
        ])[0];
        let id = ak["AccessKeyId"].as_str().unwrap().to_string();
        let client = KmsClient::new(
            &self.endpoint,
            "us-east-1",
            &id,
            caas_crypto::SecretBytes::new(
                ak["SecretAccessKey"].as_str().unwrap().as_bytes().to_vec(),
            ),
            None,
        )
        .unwrap();
        (id, client)
    }

    /// The administrator's SQL, with the real CLI of the backend.
    fn sql(&self, sql: &str) -> String {
        match &self.db {
            Db::Sqlite(path) => sqlite3(path, sql),
            Db::Postgres(pg) => pg.psql("caas", sql).unwrap_or_else(|e| panic!("{}", e.0)),
        }
    }

    /// Replaces text inside the JSON body of one row (as a DBA would with SQL) and checks
    /// that exactly that row changed.
    fn edit_body(&self, kind: &str, account: &str, id: &str, from: &str, to: &str) {
        for s in [kind, account, id, from, to] {
            assert!(!s.contains('\''), "test strings must not need SQL quoting");
        }
        let body = match self.db {
            Db::Sqlite(_) => format!("CAST(replace(CAST(body AS TEXT), '{from}', '{to}') AS BLOB)"),
            Db::Postgres(_) => {
                format!("convert_to(replace(convert_from(body, 'UTF8'), '{from}', '{to}'), 'UTF8')")
            }
        };
        let changed = match self.db {
            Db::Sqlite(_) => self.sql(&format!(
                "UPDATE objects SET body = {body} WHERE kind = '{kind}' AND account = '{account}' AND id = '{id}' AND instr(CAST(body AS TEXT), '{from}') > 0; SELECT changes();"
            )),
            Db::Postgres(_) => self.sql(&format!(
                "WITH u AS (UPDATE objects SET body = {body} WHERE kind = '{kind}' AND account = '{account}' AND id = '{id}' AND position('{from}' in convert_from(body, 'UTF8')) > 0 RETURNING 1) SELECT count(*) FROM u"
            )),
        };
        assert_eq!(
            changed.trim(),
            "1",
            "the edit of {kind} {account}/{id} did not apply"
        );
        // The key-use cache may serve the verified record as it was before the edit for up
        // to its documented bound (`caas_kms::keycache`); from then on the edited row is
        // read, refused and audited, which is what these tests check.
        std::thread::sleep(caas_kms::keycache::KEY_CACHE_TTL);
    }

    /// Copies a row (with its MAC) to another account, as a DBA would.
    fn copy_row(&self, kind: &str, from_account: &str, id: &str, to_account: &str) {
        self.sql(&format!(
            "INSERT INTO objects (kind, account, id, rev, body, mac) SELECT kind, '{to_account}', id, rev, body, mac FROM objects WHERE kind = '{kind}' AND account = '{from_account}' AND id = '{id}'"
        ));
    }

    /// Keeps a copy of one row as it is now (its MAC valid), as a DBA would before a change.
    fn save_row(&self, kind: &str, account: &str, id: &str) {
        self.sql(&format!(
            "CREATE TABLE saved AS SELECT * FROM objects WHERE kind = '{kind}' AND account = '{account}' AND id = '{id}'"
        ));
    }

    /// Puts the saved copy back in place of the row (or where the row was deleted).
    fn put_back_row(&self, kind: &str, account: &str, id: &str) {
        self.sql(&format!(
            "DELETE FROM objects WHERE kind = '{kind}' AND account = '{account}' AND id = '{id}'; \
             INSERT INTO objects SELECT * FROM saved"
        ));
        // As in `edit_body`: past the key-use cache's bound, the row is read again.
        std::thread::sleep(caas_kms::keycache::KEY_CACHE_TTL);
    }

    /// Every audit record.
    fn audit(&self) -> Vec<Value> {
        self.caas(&["audit", "list", "--limit", "1000000"])
    }
}

/// The refusal a client sees: a KMSInternalException (HTTP 500) that names no row.
fn assert_refused(r: Result<Value, ClientError>) {
    match r {
        Err(ClientError::Service {
            code,
            message,
            status,
        }) => {
            assert_eq!(
                (code.as_str(), status),
                ("KMSInternalException", 500),
                "{message}"
            );
            assert!(message.contains("integrity"), "{message}");
        }
        other => panic!("expected the attack to be refused, got {other:?}"),
    }
}

/// The audit trail of a refused row: the store's IntegrityCheck record naming it, and the
/// refused request's own record naming it too.
fn assert_audited(node: &Node, kind: &str, account: &str, id: &str, operation: &str) {
    let audit = node.audit();
    let store_rec = audit.iter().any(|r| {
        r["Operation"] == "IntegrityCheck"
            && r["Result"] == "IntegrityFailure"
            && r["Account"] == account
            && r["KeyId"] == id
            && r["Detail"]["kind"] == kind
    });
    assert!(
        store_rec,
        "no IntegrityCheck audit record for {kind} {account}/{id}"
    );
    let request_rec = audit.iter().any(|r| {
        r["Operation"] == operation
            && r["Result"] == "KMSInternalException"
            && r["Detail"]["IntegrityFailure"]["kind"] == kind
            && r["Detail"]["IntegrityFailure"]["account"] == account
            && r["Detail"]["IntegrityFailure"]["id"] == id
    });
    assert!(
        request_rec,
        "no audit record of the refused {operation} naming {kind} {account}/{id}"
    );
    // The audit chain itself is intact.
    node.caas_ok(&["audit", "verify"]);
}

/// The store's IntegrityCheck record of row `id` gives a reason containing `why` (a
/// rollback is named as such, not as a bad MAC).
fn assert_reason(node: &Node, id: &str, why: &str) {
    let audit = node.audit();
    assert!(
        audit.iter().any(|r| r["Operation"] == "IntegrityCheck"
            && r["KeyId"] == json!(id)
            && r["Detail"]["reason"]
                .as_str()
                .is_some_and(|s| s.contains(why))),
        "no IntegrityCheck record of {id} with the reason {why:?}"
    );
}

struct Victim {
    client: KmsClient,
    key: String,
    ciphertext: String,
}

const SECRET: &[u8] = b"victim plaintext";

async fn victim_with_ciphertext(client: KmsClient) -> Victim {
    let key = client.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ciphertext = client
        .call(
            "Encrypt",
            &json!({ "KeyId": key, "Plaintext": b64(SECRET) }),
        )
        .await
        .unwrap()["CiphertextBlob"]
        .as_str()
        .unwrap()
        .to_string();
    Victim {
        client,
        key,
        ciphertext,
    }
}

/// The victim, and a second key of theirs with a ciphertext under it (the key an attack
/// changes): (victim, key id, ciphertext of "old").
async fn victim_and_second_key(client: KmsClient) -> (Victim, String, String) {
    let v = victim_with_ciphertext(client).await;
    let k = v.client.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ct = v
        .client
        .call("Encrypt", &json!({ "KeyId": k, "Plaintext": b64(b"old") }))
        .await
        .unwrap()["CiphertextBlob"]
        .as_str()
        .unwrap()
        .to_string();
    (v, k, ct)
}

/// Everything the victim was told before still holds.
async fn victim_still_decrypts(v: &Victim) {
    let p = v
        .client
        .call("Decrypt", &json!({ "CiphertextBlob": v.ciphertext }))
        .await
        .unwrap();
    assert_eq!(p["Plaintext"], json!(b64(SECRET)));
}

// ---------------------------------------------------------------------------------------
// Re-pointing one's own access key to the victim's account.

fn repointed_access_key(node: &Node) {
    let rt = rt();
    let victim_account = node.tenant("victim");
    let (_, victim_client) = node.user(&victim_account, "alice");
    let attacker_account = node.tenant("attacker");
    let (attacker_akid, attacker) = node.user(&attacker_account, "mallory");
    let v = rt.block_on(victim_with_ciphertext(victim_client));
    // The DBA re-points their own access key (whose secret they know) at the victim.
    node.edit_body(
        "access_key",
        "-",
        &attacker_akid,
        &format!("\"account\":\"{attacker_account}\""),
        &format!("\"account\":\"{victim_account}\""),
    );
    rt.block_on(async {
        assert_refused(
            attacker
                .call("Decrypt", &json!({ "CiphertextBlob": v.ciphertext }))
                .await,
        );
        assert_refused(attacker.call("ListKeys", &json!({})).await);
        victim_still_decrypts(&v).await;
    });
    assert_audited(node, "access_key", "-", &attacker_akid, "Decrypt");
    // The operator sees it too: listing access keys refuses rather than showing the edit.
    let out = Command::new(caas_bin())
        .args(["admin", "list-access-keys", "--config"])
        .arg(&node.cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("integrity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dba_repointed_access_key_is_refused() {
    repointed_access_key(&Node::sqlite());
}

#[test]
fn dba_repointed_access_key_is_refused_on_postgresql() {
    repointed_access_key(&Node::postgres());
}

// ---------------------------------------------------------------------------------------
// Copying the victim's key record (EKT and all) into one's own account.

fn copied_key_record(node: &Node) {
    let rt = rt();
    let victim_account = node.tenant("victim");
    let (_, victim_client) = node.user(&victim_account, "alice");
    let attacker_account = node.tenant("attacker");
    let (_, attacker) = node.user(&attacker_account, "mallory");
    let v = rt.block_on(victim_with_ciphertext(victim_client));
    // Copy the row as it is, then make its content claim the attacker's account (the
    // record's account field and the default policy's root principal).
    node.copy_row("key", &victim_account, &v.key, &attacker_account);
    node.edit_body(
        "key",
        &attacker_account,
        &v.key,
        &format!("\"account\":\"{victim_account}\""),
        &format!("\"account\":\"{attacker_account}\""),
    );
    node.edit_body(
        "key",
        &attacker_account,
        &v.key,
        &format!("arn:aws:iam::{victim_account}:root"),
        &format!("arn:aws:iam::{attacker_account}:root"),
    );
    rt.block_on(async {
        assert_refused(
            attacker
                .call("Decrypt", &json!({ "CiphertextBlob": v.ciphertext }))
                .await,
        );
        assert_refused(
            attacker
                .call(
                    "Encrypt",
                    &json!({ "KeyId": v.key, "Plaintext": b64(b"x") }),
                )
                .await,
        );
        victim_still_decrypts(&v).await;
    });
    assert_audited(node, "key", &attacker_account, &v.key, "Decrypt");
}

#[test]
fn dba_copied_key_record_cannot_decrypt() {
    copied_key_record(&Node::sqlite());
}

#[test]
fn dba_copied_key_record_cannot_decrypt_on_postgresql() {
    copied_key_record(&Node::postgres());
}

// ---------------------------------------------------------------------------------------
// Editing a key's state: re-enabling a key its owner disabled.

fn edited_key_state(node: &Node) {
    let rt = rt();
    let account = node.tenant("victim");
    let (_, client) = node.user(&account, "alice");
    let (v, disabled_key, disabled_ct) = rt.block_on(async {
        let (v, k, ct) = victim_and_second_key(client).await;
        v.client
            .call("DisableKey", &json!({ "KeyId": k }))
            .await
            .unwrap();
        (v, k, ct)
    });
    node.edit_body(
        "key",
        &account,
        &disabled_key,
        "\"state\":\"Disabled\"",
        "\"state\":\"Enabled\"",
    );
    rt.block_on(async {
        assert_refused(
            v.client
                .call("Decrypt", &json!({ "CiphertextBlob": disabled_ct }))
                .await,
        );
        assert_refused(
            v.client
                .call("DescribeKey", &json!({ "KeyId": disabled_key }))
                .await,
        );
        // A list with a bad row is refused as a whole, not silently shortened.
        assert_refused(v.client.call("ListKeys", &json!({})).await);
        victim_still_decrypts(&v).await;
    });
    assert_audited(node, "key", &account, &disabled_key, "Decrypt");
}

#[test]
fn dba_edited_key_state_is_refused() {
    edited_key_state(&Node::sqlite());
}

// ---------------------------------------------------------------------------------------
// Putting back the key's row as it was before DisableKey (its MAC was valid then).

fn restored_enabled_key(node: &Node) {
    let rt = rt();
    let account = node.tenant("victim");
    let (_, client) = node.user(&account, "alice");
    let (v, key, ct) = rt.block_on(victim_and_second_key(client));
    node.save_row("key", &account, &key);
    rt.block_on(async {
        v.client
            .call("DisableKey", &json!({ "KeyId": key }))
            .await
            .unwrap();
    });
    node.put_back_row("key", &account, &key);
    rt.block_on(async {
        assert_refused(
            v.client
                .call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await,
        );
        assert_refused(v.client.call("DescribeKey", &json!({ "KeyId": key })).await);
        assert_refused(v.client.call("ListKeys", &json!({})).await);
        victim_still_decrypts(&v).await;
    });
    assert_audited(node, "key", &account, &key, "Decrypt");
    assert_reason(node, &key, "rolled back");
}

#[test]
fn dba_restored_row_cannot_re_enable_a_disabled_key() {
    restored_enabled_key(&Node::sqlite());
}

#[test]
fn dba_restored_row_cannot_re_enable_a_disabled_key_on_postgresql() {
    restored_enabled_key(&Node::postgres());
}

// ---------------------------------------------------------------------------------------
// The same, done while the node is down: its row floors, kept beside its node key
// (`caas_kms::row_floors`), survive a clean stop and a SIGKILL.

fn rolled_back_while_down(node: &mut Node, signal: &str) {
    let rt = rt();
    let account = node.tenant("victim");
    let (_, client) = node.user(&account, "alice");
    let (v, key, ct) = rt.block_on(victim_and_second_key(client));
    node.save_row("key", &account, &key);
    rt.block_on(async {
        v.client
            .call("DisableKey", &json!({ "KeyId": key }))
            .await
            .unwrap();
    });
    if signal == "-KILL" {
        // Unannounced: what the background writer put on disk is all there is. Any write
        // after DisableKey's reply holds DisableKey's floor. File times are coarse (a
        // jiffy): one more change 20 ms later makes a write whose time tells.
        let t = std::time::SystemTime::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        rt.block_on(v.client.call("CreateKey", &json!({}))).unwrap();
        node.wait_for_floor_file_after(t + std::time::Duration::from_millis(10));
    }
    node.stop(signal);
    node.put_back_row("key", &account, &key);
    node.start_again();
    let (_, bob) = node.user(&account, "bob");
    rt.block_on(async {
        assert_refused(bob.call("Decrypt", &json!({ "CiphertextBlob": ct })).await);
        assert_refused(bob.call("DescribeKey", &json!({ "KeyId": key })).await);
        let p = bob
            .call("Decrypt", &json!({ "CiphertextBlob": v.ciphertext }))
            .await
            .unwrap();
        assert_eq!(p["Plaintext"], json!(b64(SECRET)));
    });
    assert_audited(node, "key", &account, &key, "Decrypt");
    assert_reason(node, &key, "rolled back");
}

#[test]
fn dba_row_rolled_back_while_the_node_was_down_is_refused() {
    rolled_back_while_down(&mut Node::sqlite(), "-TERM");
}

#[test]
fn dba_row_rolled_back_while_the_node_was_killed_is_refused_on_postgresql() {
    rolled_back_while_down(&mut Node::postgres(), "-KILL");
}

// ---------------------------------------------------------------------------------------
// Putting back a revoked grant's row.

fn restored_revoked_grant(node: &Node) {
    let rt = rt();
    let (account, admin, intern, key, ct) = rt.block_on(admin_and_intern(node));
    let grant = rt.block_on(async {
        let g = grant_intern(&admin, &account, &key, "Decrypt").await;
        // The grant works as granted.
        intern
            .call("Decrypt", &json!({ "CiphertextBlob": ct }))
            .await
            .unwrap();
        g
    });
    node.save_row("grant", &account, &grant);
    rt.block_on(async {
        admin
            .call("RevokeGrant", &json!({ "KeyId": key, "GrantId": grant }))
            .await
            .unwrap();
    });
    node.put_back_row("grant", &account, &grant);
    rt.block_on(async {
        assert_refused(
            intern
                .call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await,
        );
        assert_refused(admin.call("ListGrants", &json!({ "KeyId": key })).await);
    });
    assert_audited(node, "grant", &account, &grant, "Decrypt");
    assert_reason(node, &grant, "put back");
}

#[test]
fn dba_restored_revoked_grant_is_refused() {
    restored_revoked_grant(&Node::sqlite());
}

#[test]
fn dba_restored_revoked_grant_is_refused_on_postgresql() {
    restored_revoked_grant(&Node::postgres());
}

// ---------------------------------------------------------------------------------------
// Editing a key policy to let a lesser principal of the account in.

fn admin_only_policy(account: &str) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "admin only",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{account}:user/admin") },
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
    .to_string()
}

/// An account with an admin and an intern; a key only the admin may use; a ciphertext.
async fn admin_and_intern(node: &Node) -> (String, KmsClient, KmsClient, String, String) {
    let account = node.tenant("victim");
    let (_, admin) = node.user(&account, "admin");
    let (_, intern) = node.user(&account, "intern");
    let key = admin
        .call(
            "CreateKey",
            &json!({ "Policy": admin_only_policy(&account) }),
        )
        .await
        .unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let ct = admin
        .call(
            "Encrypt",
            &json!({ "KeyId": key, "Plaintext": b64(SECRET) }),
        )
        .await
        .unwrap()["CiphertextBlob"]
        .as_str()
        .unwrap()
        .to_string();
    // Before any attack the intern is refused.
    match intern
        .call("Decrypt", &json!({ "CiphertextBlob": ct }))
        .await
    {
        Err(ClientError::Service { code, .. }) => assert_eq!(code, "AccessDeniedException"),
        other => panic!("the intern must not decrypt: {other:?}"),
    }
    (account, admin, intern, key, ct)
}

/// A grant of `operation` on `key` to the account's intern: its id.
async fn grant_intern(admin: &KmsClient, account: &str, key: &str, operation: &str) -> String {
    let g = admin
        .call(
            "CreateGrant",
            &json!({ "KeyId": key, "GranteePrincipal": format!("arn:aws:iam::{account}:user/intern"), "Operations": [operation] }),
        )
        .await
        .unwrap();
    g["GrantId"].as_str().unwrap().to_string()
}

fn edited_key_policy(node: &Node) {
    let rt = rt();
    let (account, admin, intern, key, ct) = rt.block_on(admin_and_intern(node));
    node.edit_body(
        "key",
        &account,
        &key,
        &format!("arn:aws:iam::{account}:user/admin"),
        &format!("arn:aws:iam::{account}:user/intern"),
    );
    rt.block_on(async {
        assert_refused(
            intern
                .call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await,
        );
        assert_refused(admin.call("GetKeyPolicy", &json!({ "KeyId": key })).await);
        // Another key of the account is untouched.
        let v = victim_with_ciphertext(admin.clone()).await;
        victim_still_decrypts(&v).await;
    });
    assert_audited(node, "key", &account, &key, "Decrypt");
}

#[test]
fn dba_edited_key_policy_is_refused() {
    edited_key_policy(&Node::sqlite());
}

// ---------------------------------------------------------------------------------------
// Editing a grant to give its grantee more operations.

fn edited_grant(node: &Node) {
    let rt = rt();
    let (account, admin, intern, key, ct) = rt.block_on(admin_and_intern(node));
    let grant = rt.block_on(async {
        let g = grant_intern(&admin, &account, &key, "Encrypt").await;
        // The grant works as granted.
        intern
            .call("Encrypt", &json!({ "KeyId": key, "Plaintext": b64(b"ok") }))
            .await
            .unwrap();
        g
    });
    node.edit_body(
        "grant",
        &account,
        &grant,
        "\"operations\":[\"Encrypt\"]",
        "\"operations\":[\"Encrypt\",\"Decrypt\"]",
    );
    rt.block_on(async {
        assert_refused(
            intern
                .call("Decrypt", &json!({ "CiphertextBlob": ct }))
                .await,
        );
        assert_refused(admin.call("ListGrants", &json!({ "KeyId": key })).await);
        // The admin's own use (by the key policy) is untouched.
        let p = admin
            .call("Decrypt", &json!({ "CiphertextBlob": ct }))
            .await
            .unwrap();
        assert_eq!(p["Plaintext"], json!(b64(SECRET)));
    });
    assert_audited(node, "grant", &account, &grant, "Decrypt");
}

#[test]
fn dba_edited_grant_is_refused() {
    edited_grant(&Node::sqlite());
}

// ---------------------------------------------------------------------------------------
// Re-pointing an alias to another key of the account (one the DBA prefers).

#[test]
fn dba_repointed_alias_is_refused() {
    let node = Node::sqlite();
    let rt = rt();
    let account = node.tenant("victim");
    let (_, client) = node.user(&account, "alice");
    let (v, other) = rt.block_on(async {
        let v = victim_with_ciphertext(client).await;
        v.client
            .call(
                "CreateAlias",
                &json!({ "AliasName": "alias/app", "TargetKeyId": v.key }),
            )
            .await
            .unwrap();
        let other = v.client.call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string();
        (v, other)
    });
    node.edit_body(
        "alias",
        &account,
        "alias/app",
        &format!("\"target_key_id\":\"{}\"", v.key),
        &format!("\"target_key_id\":\"{other}\""),
    );
    rt.block_on(async {
        assert_refused(
            v.client
                .call(
                    "Encrypt",
                    &json!({ "KeyId": "alias/app", "Plaintext": b64(b"x") }),
                )
                .await,
        );
        assert_refused(v.client.call("ListAliases", &json!({})).await);
        victim_still_decrypts(&v).await;
    });
    assert_audited(&node, "alias", &account, "alias/app", "Encrypt");
}

// ---------------------------------------------------------------------------------------
// `caas dev` start-up over a database whose domain-key row was edited.

#[test]
fn dba_edited_domain_key_row_stops_caas_dev_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The dev deployment's database (node key, domain key, an account) as a first start makes it.
    let out = Command::new(caas_bin())
        .args(["admin", "create-account", "dev-tenant", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = dir.join("kms.sqlite3");
    let sqlite = |sql: &str| sqlite3(&db, sql);
    // The DBA moves the domain key's creation time (a harmless-looking edit).
    let changed = sqlite(
        "UPDATE objects SET body = CAST(replace(CAST(body AS TEXT), '\"created_ms\":', '\"created_ms\":1') AS BLOB) \
         WHERE kind = 'domain_key'; SELECT changes();",
    );
    assert_eq!(changed.trim(), "1");
    // (`timeout`: should it start anyway, the test fails instead of hanging.)
    let out = Command::new("timeout")
        .arg("120")
        .arg(caas_bin())
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "caas dev started over a tampered database"
    );
    assert!(
        stderr.contains("refusing to start")
            && stderr.contains("domain_key record 0000000001")
            && stderr.contains("integrity check"),
        "{stderr}"
    );
    // The refusal is in the audit log (read with the administrator's own tool).
    let audit = sqlite(
        "SELECT operation || ' ' || result || ' ' || key_id FROM audit_log WHERE operation = 'IntegrityCheck'",
    );
    assert_eq!(
        audit.trim(),
        "IntegrityCheck IntegrityFailure 0000000001",
        "{audit}"
    );
}
