//! The key-use cache's consistency rule (`caas_kms::keycache`), from the position of an
//! attacker who relies on a cached key record: a key that was disabled, scheduled for
//! deletion, rotated or had its policy tightened must not be used after the stated bound —
//! on the node that made the change, at once; on another node sharing the PostgreSQL
//! database, at most `KEY_CACHE_TTL` after the change committed.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use base64::Engine as _;
use caas_kms::keycache::KEY_CACHE_TTL;
use caas_kms::{Caller, Kms, KmsParams};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

mod inproc;
use inproc::{b64, call, code, tenant};

async fn open(database: String, node_key: &Path, create: bool) -> Arc<Kms> {
    Kms::open(&KmsParams {
        region: "us-east-1".into(),
        database,
        node_key_file: node_key.to_path_buf(),
        create_node_key: create,
        domain_key_rotation: None,
        domain: None,
        audit_durability: Default::default(),
    })
    .await
    .unwrap()
}

async fn create_key(kms: &Kms, who: &Caller) -> String {
    call(kms, who, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn encrypt(kms: &Kms, who: &Caller, key: &str) -> Result<Value, (u16, Value)> {
    call(
        kms,
        who,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": b64(b"secret") }),
    )
    .await
}

/// The HBK version a ciphertext was sealed under.
fn hbk_version(reply: &Value) -> u32 {
    let ct = base64::engine::general_purpose::STANDARD
        .decode(reply["CiphertextBlob"].as_str().unwrap())
        .unwrap();
    caas_kms::blob::parse(&ct).unwrap().hbk_version
}

#[tokio::test]
async fn key_cache_a_local_state_change_applies_to_the_next_request() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(
        format!("sqlite:{}", tmp.path().join("kms.sqlite3").display()),
        &tmp.path().join("node.key"),
        true,
    )
    .await;
    let a = tenant(&kms, "a").await;
    let key = create_key(&kms, &a).await;
    // Warm the cache, then change the key: each change applies to the very next use.
    assert_eq!(hbk_version(&encrypt(&kms, &a, &key).await.unwrap()), 1);
    call(&kms, &a, "DisableKey", json!({ "KeyId": key }))
        .await
        .unwrap();
    assert_eq!(
        code(encrypt(&kms, &a, &key).await.unwrap_err()),
        "DisabledException"
    );
    call(&kms, &a, "EnableKey", json!({ "KeyId": key }))
        .await
        .unwrap();
    encrypt(&kms, &a, &key).await.unwrap();
    call(&kms, &a, "RotateKeyOnDemand", json!({ "KeyId": key }))
        .await
        .unwrap();
    let v2 = encrypt(&kms, &a, &key).await.unwrap();
    assert_eq!(hbk_version(&v2), 2, "rotation applies to the next Encrypt");
    // A policy that no longer allows the caller applies at once.
    let deny = json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Sid": "root", "Effect": "Allow",
              "Principal": { "AWS": format!("arn:aws:iam::{}:root", a.account) },
              "Action": "kms:*", "Resource": "*" },
            { "Sid": "no-encrypt", "Effect": "Deny",
              "Principal": { "AWS": a.principal.clone() },
              "Action": "kms:Encrypt", "Resource": "*" }
        ]
    });
    call(
        &kms,
        &a,
        "PutKeyPolicy",
        json!({ "KeyId": key, "PolicyName": "default", "Policy": deny.to_string() }),
    )
    .await
    .unwrap();
    assert_eq!(
        code(encrypt(&kms, &a, &key).await.unwrap_err()),
        "AccessDeniedException"
    );
    // Decrypt (not denied) still works with the cached record, then deletion applies at once.
    call(
        &kms,
        &a,
        "Decrypt",
        json!({ "CiphertextBlob": v2["CiphertextBlob"] }),
    )
    .await
    .unwrap();
    call(
        &kms,
        &a,
        "ScheduleKeyDeletion",
        json!({ "KeyId": key, "PendingWindowInDays": 7 }),
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            call(
                &kms,
                &a,
                "Decrypt",
                json!({ "CiphertextBlob": v2["CiphertextBlob"] }),
            )
            .await
            .unwrap_err()
        ),
        "KMSInvalidStateException"
    );
    // Another account naming the key's ARN never finds the cached entry.
    let b = tenant(&kms, "b").await;
    let other = create_key(&kms, &a).await;
    encrypt(&kms, &a, &other).await.unwrap();
    let arn = format!("arn:aws:kms:us-east-1:{}:key/{other}", a.account);
    assert_eq!(
        code(encrypt(&kms, &b, &arn).await.unwrap_err()),
        "NotFoundException"
    );
    assert_eq!(
        code(encrypt(&kms, &b, &other).await.unwrap_err()),
        "NotFoundException"
    );
}

/// Sleeps until `KEY_CACHE_TTL` after `since` (when the change had committed).
async fn past_the_bound(since: Instant) {
    let until = since + KEY_CACHE_TTL;
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_cache_another_nodes_disable_delete_rotate_apply_within_the_bound() {
    let pg = caas_store::testing::PgCluster::start().unwrap_or_else(|e| panic!("{}", e.0));
    let url = pg
        .create_database("keycache")
        .unwrap_or_else(|e| panic!("{}", e.0));
    let tmp = tempfile::tempdir().unwrap();
    // Two nodes sharing the database and the node key (each its own checkpoint file).
    let key_a = tmp.path().join("a.key");
    let node_a = open(url.clone(), &key_a, true).await;
    let key_b = tmp.path().join("b.key");
    std::fs::copy(&key_a, &key_b).unwrap();
    let node_b = open(url, &key_b, false).await;

    let t = tenant(&node_a, "t").await;
    let key = create_key(&node_a, &t).await;

    // Disable on A while B holds the key in its cache: B refuses from the bound on.
    encrypt(&node_b, &t, &key).await.unwrap();
    call(&node_a, &t, "DisableKey", json!({ "KeyId": key }))
        .await
        .unwrap();
    let changed = Instant::now();
    assert_eq!(
        code(encrypt(&node_a, &t, &key).await.unwrap_err()),
        "DisabledException",
        "the node that made the change applies it at once"
    );
    past_the_bound(changed).await;
    assert_eq!(
        code(encrypt(&node_b, &t, &key).await.unwrap_err()),
        "DisabledException",
        "node B used a key disabled on node A past KEY_CACHE_TTL"
    );

    // Rotation on A: B seals under the new version from the bound on, and opens a
    // ciphertext of the new version at once (a version it has not cached is read).
    call(&node_a, &t, "EnableKey", json!({ "KeyId": key }))
        .await
        .unwrap();
    past_the_bound(Instant::now()).await;
    assert_eq!(hbk_version(&encrypt(&node_b, &t, &key).await.unwrap()), 1);
    call(&node_a, &t, "RotateKeyOnDemand", json!({ "KeyId": key }))
        .await
        .unwrap();
    let changed = Instant::now();
    let v2 = encrypt(&node_a, &t, &key).await.unwrap();
    assert_eq!(hbk_version(&v2), 2);
    let opened = call(
        &node_b,
        &t,
        "Decrypt",
        json!({ "CiphertextBlob": v2["CiphertextBlob"] }),
    )
    .await
    .unwrap();
    assert_eq!(opened["Plaintext"], json!(b64(b"secret")));
    past_the_bound(changed).await;
    assert_eq!(
        hbk_version(&encrypt(&node_b, &t, &key).await.unwrap()),
        2,
        "node B sealed under a rotated-away version past KEY_CACHE_TTL"
    );

    // Deletion scheduled on A: B refuses Decrypt from the bound on.
    call(
        &node_b,
        &t,
        "Decrypt",
        json!({ "CiphertextBlob": v2["CiphertextBlob"] }),
    )
    .await
    .unwrap();
    call(
        &node_a,
        &t,
        "ScheduleKeyDeletion",
        json!({ "KeyId": key, "PendingWindowInDays": 7 }),
    )
    .await
    .unwrap();
    let changed = Instant::now();
    past_the_bound(changed).await;
    assert_eq!(
        code(
            call(
                &node_b,
                &t,
                "Decrypt",
                json!({ "CiphertextBlob": v2["CiphertextBlob"] }),
            )
            .await
            .unwrap_err()
        ),
        "KMSInvalidStateException",
        "node B used a key pending deletion on node A past KEY_CACHE_TTL"
    );
}
