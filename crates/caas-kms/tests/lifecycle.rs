//! Key-service behaviour that needs the service clock or in-process access: scheduled
//! deletion and automatic rotation when due, domain-key rotation with EKT re-wrapping,
//! tenancy between accounts, no grant or last use outliving its key, and no secret in
//! trace-level logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use caas_kms::{Kms, KmsParams};
use serde_json::json;
use std::sync::{Arc, Mutex};

mod inproc;
use inproc::{b64, call, code, tenant};

const DAY: i64 = 86_400_000;

async fn open(dir: &std::path::Path) -> Arc<Kms> {
    Kms::open(&KmsParams {
        region: "us-east-1".into(),
        database: format!("sqlite:{}", dir.join("kms.sqlite3").display()),
        node_key_file: dir.join("node.key"),
        create_node_key: true,
        domain_key_rotation: Some(std::time::Duration::from_secs(86_400)),
        domain: None,
        audit_durability: Default::default(),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn scheduled_deletion_and_automatic_rotation_happen_when_due() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let a = tenant(&kms, "a").await;
    let doomed = call(&kms, &a, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    call(
        &kms,
        &a,
        "CreateAlias",
        json!({ "AliasName": "alias/doomed", "TargetKeyId": doomed }),
    )
    .await
    .unwrap();
    let rotating = call(&kms, &a, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    let old = call(
        &kms,
        &a,
        "Encrypt",
        json!({ "KeyId": rotating, "Plaintext": b64(b"v1") }),
    )
    .await
    .unwrap()["CiphertextBlob"]
        .clone();
    call(
        &kms,
        &a,
        "EnableKeyRotation",
        json!({ "KeyId": rotating, "RotationPeriodInDays": 90 }),
    )
    .await
    .unwrap();
    call(
        &kms,
        &a,
        "ScheduleKeyDeletion",
        json!({ "KeyId": doomed, "PendingWindowInDays": 7 }),
    )
    .await
    .unwrap();

    // Not yet due: nothing happens.
    kms.advance_clock(6 * DAY);
    assert_eq!(caas_kms::ops::maintenance(&kms).await.unwrap(), (0, 0));
    call(&kms, &a, "DescribeKey", json!({ "KeyId": doomed }))
        .await
        .unwrap();
    // Due.
    kms.advance_clock(2 * DAY);
    let (deleted, _) = caas_kms::ops::maintenance(&kms).await.unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(
        code(
            call(&kms, &a, "DescribeKey", json!({ "KeyId": doomed }))
                .await
                .unwrap_err()
        ),
        "NotFoundException"
    );
    assert_eq!(
        code(
            call(&kms, &a, "DescribeKey", json!({ "KeyId": "alias/doomed" }))
                .await
                .unwrap_err()
        ),
        "NotFoundException"
    );

    kms.advance_clock(85 * DAY);
    let (_, rotated) = caas_kms::ops::maintenance(&kms).await.unwrap();
    assert_eq!(rotated, 1);
    let rots = call(&kms, &a, "ListKeyRotations", json!({ "KeyId": rotating }))
        .await
        .unwrap();
    assert_eq!(rots["Rotations"][0]["RotationType"], json!("AUTOMATIC"));
    let p = call(&kms, &a, "Decrypt", json!({ "CiphertextBlob": old }))
        .await
        .unwrap();
    assert_eq!(p["Plaintext"], json!(b64(b"v1")));
    // The daily domain-key rotation also ran (the clock moved 93 days): keys still work.
    assert!(kms.keyring.current_version().unwrap() >= 2);
    let new = call(
        &kms,
        &a,
        "Encrypt",
        json!({ "KeyId": rotating, "Plaintext": b64(b"v2") }),
    )
    .await
    .unwrap();
    assert_ne!(new["CiphertextBlob"], old);
}

#[tokio::test]
async fn domain_key_rotation_rewraps_every_ekt_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, cts) = {
        let kms = open(tmp.path()).await;
        let a = tenant(&kms, "a").await;
        let mut cts = vec![];
        for spec in ["SYMMETRIC_DEFAULT", "SYMMETRIC_DEFAULT"] {
            let k = call(&kms, &a, "CreateKey", json!({ "KeySpec": spec }))
                .await
                .unwrap()["KeyMetadata"]["KeyId"]
                .as_str()
                .unwrap()
                .to_string();
            cts.push(
                call(
                    &kms,
                    &a,
                    "Encrypt",
                    json!({ "KeyId": k, "Plaintext": b64(k.as_bytes()) }),
                )
                .await
                .unwrap()["CiphertextBlob"]
                    .clone(),
            );
        }
        let ecc = call(
            &kms,
            &a,
            "CreateKey",
            json!({ "KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY" }),
        )
        .await
        .unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string();
        let before = kms.keyring.current_version().unwrap();
        let (v, n) = caas_kms::ops::rotate_domain_key(&kms).await.unwrap();
        assert_eq!(v, before + 1);
        assert!(n >= 3, "re-wrapped {n}");
        // Every EKT now names the new domain key version.
        for o in kms.store.list("key", None).await.unwrap() {
            let k: caas_kms::model::KeyRecord = serde_json::from_slice(&o.body).unwrap();
            for h in &k.versions {
                assert_eq!(caas_kms::keyring::Keyring::ekt_version(&h.ekt), Some(v));
            }
        }
        call(
            &kms,
            &a,
            "Sign",
            json!({ "KeyId": ecc, "Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_256" }),
        )
        .await
        .unwrap();
        (a, cts)
    };
    let kms = open(tmp.path()).await;
    for ct in cts {
        call(&kms, &a, "Decrypt", json!({ "CiphertextBlob": ct }))
            .await
            .unwrap();
    }
    let pk = kms.audit_public_key().to_vec();
    assert!(
        kms.store
            .audit_verify(&|h, s| caas_kms::audit::verify_signature(&pk, h, s))
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test]
async fn a_deleted_key_leaves_no_grant_or_last_use_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let a = tenant(&kms, "a").await;
    let b = tenant(&kms, "b").await;
    let new_key = || async {
        call(&kms, &a, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (doomed, kept) = (new_key().await, new_key().await);
    for k in [&doomed, &kept] {
        call(
            &kms,
            &a,
            "CreateGrant",
            json!({ "KeyId": k, "GranteePrincipal": b.principal, "Operations": ["Encrypt"] }),
        )
        .await
        .unwrap();
        call(
            &kms,
            &a,
            "Encrypt",
            json!({ "KeyId": k, "Plaintext": b64(b"x") }),
        )
        .await
        .unwrap();
    }
    kms.flush_audit().await;
    let stored = |kind: &'static str| {
        let kms = kms.clone();
        let account = a.account.clone();
        async move {
            kms.store
                .list(kind, Some(&account))
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(stored(caas_kms::usage::USAGE_KIND).await.len(), 2);
    assert_eq!(stored(caas_kms::model::kind::GRANT).await.len(), 2);
    call(
        &kms,
        &a,
        "ScheduleKeyDeletion",
        json!({ "KeyId": doomed, "PendingWindowInDays": 7 }),
    )
    .await
    .unwrap();
    kms.advance_clock(8 * DAY);
    assert_eq!(caas_kms::ops::maintenance(&kms).await.unwrap().0, 1);
    assert_eq!(
        stored(caas_kms::usage::USAGE_KIND).await,
        vec![kept.clone()]
    );
    let grants = call(&kms, &a, "ListGrants", json!({ "KeyId": kept }))
        .await
        .unwrap()["Grants"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        (stored(caas_kms::model::kind::GRANT).await.len(), grants),
        (1, 1)
    );
    // Nothing of the deleted key comes back from this node's memory either.
    kms.flush_audit().await;
    assert_eq!(stored(caas_kms::usage::USAGE_KIND).await, vec![kept]);
}

#[tokio::test]
async fn accounts_never_see_each_others_keys_aliases_grants_or_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let a = tenant(&kms, "a").await;
    let b = tenant(&kms, "b").await;
    let ka = call(&kms, &a, "CreateKey", json!({})).await.unwrap()["KeyMetadata"].clone();
    let id = ka["KeyId"].as_str().unwrap();
    call(
        &kms,
        &a,
        "CreateAlias",
        json!({ "AliasName": "alias/mine", "TargetKeyId": id }),
    )
    .await
    .unwrap();
    call(
        &kms,
        &a,
        "CreateGrant",
        json!({ "KeyId": id, "GranteePrincipal": b.principal, "Operations": ["Encrypt"] }),
    )
    .await
    .unwrap();
    let ct = call(
        &kms,
        &a,
        "Encrypt",
        json!({ "KeyId": id, "Plaintext": b64(b"a's") }),
    )
    .await
    .unwrap()["CiphertextBlob"]
        .clone();
    assert_eq!(
        call(&kms, &b, "ListKeys", json!({})).await.unwrap()["Keys"],
        json!([])
    );
    assert_eq!(
        call(&kms, &b, "ListAliases", json!({})).await.unwrap()["Aliases"],
        json!([])
    );
    for (op, body) in [
        ("DescribeKey", json!({ "KeyId": id })),
        ("DescribeKey", json!({ "KeyId": ka["Arn"] })),
        ("DescribeKey", json!({ "KeyId": "alias/mine" })),
        (
            "Encrypt",
            json!({ "KeyId": ka["Arn"], "Plaintext": b64(b"x") }),
        ),
        ("ListGrants", json!({ "KeyId": id })),
    ] {
        assert_eq!(
            code(call(&kms, &b, op, body.clone()).await.unwrap_err()),
            "NotFoundException",
            "{op} {body}"
        );
    }
    assert_eq!(
        code(
            call(&kms, &b, "Decrypt", json!({ "CiphertextBlob": ct }))
                .await
                .unwrap_err()
        ),
        "InvalidCiphertextException"
    );
    let b_audit = kms
        .store
        .audit_list(Some(&b.account), 0, 1000)
        .await
        .unwrap();
    assert!(!b_audit.is_empty() && b_audit.iter().all(|r| r.entry.account == b.account));
    assert!(
        b_audit
            .iter()
            .all(|r| r.entry.key_id.as_deref() != Some(id) || r.entry.result != "Success")
    );
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn trace_logs_never_contain_plaintext_or_keys() {
    let cap = Capture::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (data_key, secret) = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let kms = open(tmp.path()).await;
            let a = tenant(&kms, "a").await;
            let (_, secret) = kms.create_access_key(&a.account, "a").await.unwrap();
            let k = call(&kms, &a, "CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
                .as_str()
                .unwrap()
                .to_string();
            let ct = call(
                &kms,
                &a,
                "Encrypt",
                json!({ "KeyId": k, "Plaintext": b64(b"canary-plaintext-trace") }),
            )
            .await
            .unwrap()["CiphertextBlob"]
                .clone();
            call(&kms, &a, "Decrypt", json!({ "CiphertextBlob": ct }))
                .await
                .unwrap();
            let dk = call(
                &kms,
                &a,
                "GenerateDataKey",
                json!({ "KeyId": k, "KeySpec": "AES_256" }),
            )
            .await
            .unwrap()["Plaintext"]
                .as_str()
                .unwrap()
                .to_string();
            let _ = call(
                &kms,
                &a,
                "Decrypt",
                json!({ "CiphertextBlob": b64(&[1u8; 90]) }),
            )
            .await;
            (dk, String::from_utf8_lossy(secret.expose()).into_owned())
        })
    });
    let log = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    let node_key = std::fs::read(tmp.path().join("node.key")).unwrap();
    for needle in [
        "canary-plaintext-trace",
        &b64(b"canary-plaintext-trace"),
        &data_key,
        &secret,
        &hex::encode(&node_key),
    ] {
        assert!(!log.contains(needle), "secret found in trace log");
    }
}

/// EKTs and service-internal secrets name their owner in the AAD: moved to another account,
/// key, purpose or principal they do not open (even if a row MAC were bypassed); domain-key
/// rotation re-wraps access-key secrets bound to the same owner.
#[tokio::test]
async fn sealed_values_are_bound_to_their_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let m = caas_crypto::SecretBytes::new(vec![9; 32]);
    let ekt = kms.keyring.seal_ekt("111111111111", "k1", 1, &m).unwrap();
    let kr = &kms.keyring;
    assert_eq!(
        kr.open_ekt("111111111111", "k1", 1, &ekt)
            .await
            .unwrap()
            .expose(),
        m.expose()
    );
    assert!(kr.open_ekt("222222222222", "k1", 1, &ekt).await.is_err());
    assert!(kr.open_ekt("111111111111", "k2", 1, &ekt).await.is_err());
    assert!(kr.open_ekt("111111111111", "k1", 2, &ekt).await.is_err());
    let sealed = kr
        .seal_internal("access-key", &["AKIA1", "111111111111", "arn:u/a"], &m)
        .unwrap();
    for owner in [
        ["AKIA1", "222222222222", "arn:u/a"],
        ["AKIA2", "111111111111", "arn:u/a"],
        ["AKIA1", "111111111111", "arn:u/b"],
    ] {
        assert!(
            kr.open_internal("access-key", &owner, &sealed)
                .await
                .is_err()
        );
    }
    assert!(
        kr.open_internal(
            "tl-ttp-keys",
            &["AKIA1", "111111111111", "arn:u/a"],
            &sealed
        )
        .await
        .is_err()
    );
    // An EKT is not an internal secret and vice versa.
    assert!(
        kr.open_internal("access-key", &["111111111111", "k1"], &ekt)
            .await
            .is_err()
    );
    // Access keys survive a domain-key rotation (re-wrapped under the same owner).
    let account = kms.create_account("t").await.unwrap();
    let (akid, secret) = kms.create_access_key(&account, "u").await.unwrap();
    let (_, n) = caas_kms::ops::rotate_domain_key(&kms).await.unwrap();
    assert!(n >= 1);
    let o = kms
        .store
        .get("access_key", "-", &akid)
        .await
        .unwrap()
        .unwrap();
    let rec: caas_kms::model::AccessKeyRecord = serde_json::from_slice(&o.body).unwrap();
    assert_eq!(
        caas_kms::keyring::Keyring::ekt_version(&rec.sealed_secret),
        kms.keyring.current_version()
    );
    let opened = kr
        .open_internal(
            caas_kms::service::ACCESS_KEY_PURPOSE,
            &[&akid, &account, &rec.principal],
            &rec.sealed_secret,
        )
        .await
        .unwrap();
    assert_eq!(opened.expose(), secret.expose());
}
