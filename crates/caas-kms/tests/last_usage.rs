//! GetKeyLastUsage is durable and shared (`caas_kms::usage`): two key-service nodes on one
//! database give the same answer once the user's node wrote its last uses (every
//! `PERSIST_INTERVAL`, and at clean shutdown), the newer use wins whichever node recorded
//! it, a key used many times in one interval costs one write, and the answer and
//! `TrackingStartDate` survive a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod inproc;
use caas_kms::{Kms, KmsParams};
use inproc::{b64, call, tenant, user};
use serde_json::{Value, json};
use std::sync::Arc;

async fn open(dir: &std::path::Path) -> Arc<Kms> {
    Kms::open(&KmsParams {
        region: "us-east-1".into(),
        database: format!("sqlite:{}", dir.join("kms.sqlite3").display()),
        node_key_file: dir.join("node.key"),
        create_node_key: true,
        domain_key_rotation: None,
        domain: None,
        audit_durability: Default::default(),
    })
    .await
    .unwrap()
}

async fn last(kms: &Kms, who: &caas_kms::Caller, key: &str) -> Value {
    call(kms, who, "GetKeyLastUsage", json!({ "KeyId": key }))
        .await
        .unwrap()
}

async fn encrypt(kms: &Kms, who: &caas_kms::Caller, key: &str) {
    call(
        kms,
        who,
        "Encrypt",
        json!({ "KeyId": key, "Plaintext": b64(b"x") }),
    )
    .await
    .unwrap();
}

fn stored_rev(v: Option<caas_store::Object>) -> i64 {
    v.map_or(0, |o| o.rev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_usage_is_shared_by_nodes_coalesced_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path()).await;
    let b = open(dir.path()).await;
    let t = tenant(&a, "t").await;
    let key = call(&a, &t, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let t_b = user(&t.account, "t");

    // Used on node A: A knows at once; B once A wrote it.
    encrypt(&a, &t, &key).await;
    let on_a = last(&a, &t, &key).await;
    assert_eq!(on_a["KeyLastUsage"]["Operation"], json!("Encrypt"));
    a.flush_audit().await;
    let on_b = last(&b, &t_b, &key).await;
    assert_eq!(
        on_b["KeyLastUsage"], on_a["KeyLastUsage"],
        "same answer on node B"
    );
    assert_eq!(on_b["TrackingStartDate"], on_a["TrackingStartDate"]);

    // A later use on node B wins on both nodes, though A's memory holds an older one.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    call(
        &b,
        &t_b,
        "GenerateDataKey",
        json!({ "KeyId": key, "KeySpec": "AES_256" }),
    )
    .await
    .unwrap();
    b.flush_audit().await;
    a.flush_audit().await;
    let on_a = last(&a, &t, &key).await;
    assert_eq!(on_a["KeyLastUsage"]["Operation"], json!("GenerateDataKey"));
    assert_eq!(
        on_a["KeyLastUsage"],
        last(&b, &t_b, &key).await["KeyLastUsage"]
    );

    // Coalesced: 40 uses between two writes are one write.
    let before = stored_rev(
        a.store
            .get("key_last_usage", &t.account, &key)
            .await
            .unwrap(),
    );
    for _ in 0..40 {
        encrypt(&a, &t, &key).await;
    }
    a.flush_audit().await;
    let after = stored_rev(
        a.store
            .get("key_last_usage", &t.account, &key)
            .await
            .unwrap(),
    );
    assert_eq!(after, before + 1, "one write for 40 uses");
    let expected = last(&a, &t, &key).await;
    assert_eq!(expected["KeyLastUsage"]["Operation"], json!("Encrypt"));

    // Restart of both nodes (a clean stop writes what is pending): same answer, same
    // tracking start.
    drop(a);
    drop(b);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let a = open(dir.path()).await;
    let again = last(&a, &t, &key).await;
    assert_eq!(again["KeyLastUsage"], expected["KeyLastUsage"]);
    assert_eq!(again["TrackingStartDate"], expected["TrackingStartDate"]);
    assert!(
        again["TrackingStartDate"].as_f64().unwrap()
            <= again["KeyCreationDate"].as_f64().unwrap() + 0.001
    );
}
