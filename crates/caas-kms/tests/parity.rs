//! AWS KMS 2024–2026 additions, in process and over the service's TLS: ML-DSA (raw and
//! external μ), Ed25519 and Ed25519ph, DeriveSharedSecret (ECDH), GetKeyLastUsage, DryRun,
//! their policy and grant checks, the bad inputs an attacker or a confused client sends,
//! and the post-quantum TLS key exchange named in every audit record.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use base64::Engine as _;
use caas_kms::{Caller, Kms, KmsParams};
use serde_json::{Value, json};
use std::sync::Arc;

mod inproc;
use inproc::{b64, call, code, tenant, user};

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

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

async fn create(kms: &Kms, who: &Caller, spec: &str, usage: &str) -> String {
    call(
        kms,
        who,
        "CreateKey",
        json!({ "KeySpec": spec, "KeyUsage": usage }),
    )
    .await
    .unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A key whose policy allows only its creator (not the whole account).
async fn create_private(kms: &Kms, who: &Caller, spec: &str, usage: &str) -> String {
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Principal": { "AWS": who.principal }, "Action": "kms:*", "Resource": "*" }]
    });
    call(
        kms,
        who,
        "CreateKey",
        json!({ "KeySpec": spec, "KeyUsage": usage, "Policy": policy.to_string() }),
    )
    .await
    .unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn audit(kms: &Kms, account: &str) -> Vec<caas_store::AuditEntry> {
    kms.store
        .audit_list(Some(account), 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry)
        .collect()
}

/// ML-DSA-44/65/87: GetPublicKey is an SPKI with FIPS 204's OID that aws-lc-rs (outside
/// the service) verifies RAW signatures with; EXTERNAL_MU signs and verifies; a tampered
/// signature or message is refused with KMSInvalidSignatureException.
#[tokio::test]
async fn ml_dsa_signs_raw_and_external_mu_and_refuses_tampering() {
    use aws_lc_rs::signature::{self, ParsedPublicKey};
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "pq").await;
    for (spec, valg, oid_last, sig_len) in [
        ("ML_DSA_44", &signature::ML_DSA_44, 0x11u8, 2420usize),
        ("ML_DSA_65", &signature::ML_DSA_65, 0x12, 3309),
        ("ML_DSA_87", &signature::ML_DSA_87, 0x13, 4627),
    ] {
        let k = create(&kms, &t, spec, "SIGN_VERIFY").await;
        let d = call(&kms, &t, "DescribeKey", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(
            d["KeyMetadata"]["SigningAlgorithms"],
            json!(["ML_DSA_SHAKE_256"])
        );
        let pk = call(&kms, &t, "GetPublicKey", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(pk["KeySpec"], json!(spec));
        let spki = unb64(&pk["PublicKey"]);
        // id-ml-dsa-{44,65,87} = 2.16.840.1.101.3.4.3.{17,18,19}
        let oid = [
            0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, oid_last,
        ];
        assert!(spki.windows(oid.len()).any(|w| w == oid), "{spec} OID");
        let msg = vec![0x5au8; 4096];
        let s = call(
            &kms,
            &t,
            "Sign",
            json!({ "KeyId": k, "Message": b64(&msg), "SigningAlgorithm": "ML_DSA_SHAKE_256" }),
        )
        .await
        .unwrap();
        let sig = unb64(&s["Signature"]);
        assert_eq!(sig.len(), sig_len);
        let outside = ParsedPublicKey::new(valg, &spki).unwrap();
        outside.verify_sig(&msg, &sig).unwrap();
        let mut bad = sig.clone();
        bad[100] ^= 1;
        assert!(outside.verify_sig(&msg, &bad).is_err());
        let v = |m: &[u8], s: &[u8], mt: &str| {
            json!({ "KeyId": k, "Message": b64(m), "Signature": b64(s),
                    "SigningAlgorithm": "ML_DSA_SHAKE_256", "MessageType": mt })
        };
        assert_eq!(
            call(&kms, &t, "Verify", v(&msg, &sig, "RAW"))
                .await
                .unwrap()["SignatureValid"],
            json!(true)
        );
        assert_eq!(
            code(
                call(&kms, &t, "Verify", v(&msg, &bad, "RAW"))
                    .await
                    .unwrap_err()
            ),
            "KMSInvalidSignatureException"
        );
        // External μ: sign, verify, tampered μ refused.
        let mu = [7u8; 64];
        let s = call(
            &kms,
            &t,
            "Sign",
            json!({ "KeyId": k, "Message": b64(&mu), "SigningAlgorithm": "ML_DSA_SHAKE_256",
                    "MessageType": "EXTERNAL_MU" }),
        )
        .await
        .unwrap();
        let musig = unb64(&s["Signature"]);
        assert_eq!(musig.len(), sig_len);
        call(&kms, &t, "Verify", v(&mu, &musig, "EXTERNAL_MU"))
            .await
            .unwrap();
        let mut mu2 = mu;
        mu2[0] ^= 0x80;
        assert_eq!(
            code(
                call(&kms, &t, "Verify", v(&mu2, &musig, "EXTERNAL_MU"))
                    .await
                    .unwrap_err()
            ),
            "KMSInvalidSignatureException"
        );
    }
}

/// Ed25519: pure over RAW (verified outside with aws-lc-rs), Ed25519ph over DIGEST, both
/// refused when tampered; as a data key pair spec the private key is PKCS#8 that signs.
#[tokio::test]
async fn ed25519_raw_and_prehash_sign_and_data_key_pairs() {
    use aws_lc_rs::signature::{self, KeyPair, ParsedPublicKey};
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "ed").await;
    let k = create(&kms, &t, "ECC_NIST_EDWARDS25519", "SIGN_VERIFY").await;
    let pk = call(&kms, &t, "GetPublicKey", json!({ "KeyId": k }))
        .await
        .unwrap();
    assert_eq!(
        pk["SigningAlgorithms"],
        json!(["ED25519_SHA_512", "ED25519_PH_SHA_512"])
    );
    let spki = unb64(&pk["PublicKey"]);
    let s = call(
        &kms,
        &t,
        "Sign",
        json!({ "KeyId": k, "Message": b64(b"hello ed"), "SigningAlgorithm": "ED25519_SHA_512" }),
    )
    .await
    .unwrap();
    let sig = unb64(&s["Signature"]);
    let outside = ParsedPublicKey::new(&signature::ED25519, &spki[12..]).unwrap();
    outside.verify_sig(b"hello ed", &sig).unwrap();
    assert!(outside.verify_sig(b"hello Ed", &sig).is_err());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, b"pre-hashed");
    let ph = |m: &[u8], sig: Option<&[u8]>| {
        let mut b = json!({ "KeyId": k, "Message": b64(m), "SigningAlgorithm": "ED25519_PH_SHA_512",
                            "MessageType": "DIGEST" });
        if let Some(s) = sig {
            b["Signature"] = json!(b64(s));
        }
        b
    };
    let phsig = unb64(
        &call(&kms, &t, "Sign", ph(digest.as_ref(), None))
            .await
            .unwrap()["Signature"],
    );
    assert_ne!(phsig, sig);
    call(&kms, &t, "Verify", ph(digest.as_ref(), Some(&phsig)))
        .await
        .unwrap();
    let mut bad = phsig.clone();
    bad[5] ^= 1;
    assert_eq!(
        code(
            call(&kms, &t, "Verify", ph(digest.as_ref(), Some(&bad)))
                .await
                .unwrap_err()
        ),
        "KMSInvalidSignatureException"
    );
    // A pure signature is not an Ed25519ph one (domain separation).
    let pure_over_digest = unb64(
        &call(
            &kms,
            &t,
            "Sign",
            json!({ "KeyId": k, "Message": b64(digest.as_ref()), "SigningAlgorithm": "ED25519_SHA_512" }),
        )
        .await
        .unwrap()["Signature"],
    );
    assert!(
        call(
            &kms,
            &t,
            "Verify",
            ph(digest.as_ref(), Some(&pure_over_digest))
        )
        .await
        .is_err()
    );
    // GenerateDataKeyPair with ECC_NIST_EDWARDS25519.
    let sym = create(&kms, &t, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT").await;
    let p = call(
        &kms,
        &t,
        "GenerateDataKeyPair",
        json!({ "KeyId": sym, "KeyPairSpec": "ECC_NIST_EDWARDS25519" }),
    )
    .await
    .unwrap();
    assert_eq!(p["KeyPairSpec"], json!("ECC_NIST_EDWARDS25519"));
    let kp = signature::Ed25519KeyPair::from_pkcs8(&unb64(&p["PrivateKeyPlaintext"])).unwrap();
    assert_eq!(unb64(&p["PublicKey"])[12..], *kp.public_key().as_ref());
    let wp = call(
        &kms,
        &t,
        "GenerateDataKeyPairWithoutPlaintext",
        json!({ "KeyId": sym, "KeyPairSpec": "ECC_NIST_EDWARDS25519" }),
    )
    .await
    .unwrap();
    assert!(wp.get("PrivateKeyPlaintext").is_none());
    let d = call(
        &kms,
        &t,
        "Decrypt",
        json!({ "CiphertextBlob": wp["PrivateKeyCiphertextBlob"] }),
    )
    .await
    .unwrap();
    signature::Ed25519KeyPair::from_pkcs8(&unb64(&d["Plaintext"])).unwrap();
}

/// DeriveSharedSecret equals a local ECDH with the key's public key, on every curve.
#[tokio::test]
async fn derive_shared_secret_equals_local_ecdh() {
    use aws_lc_rs::agreement;
    use aws_lc_rs::encoding::AsDer;
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "ecdh").await;
    for (spec, alg) in [
        ("ECC_NIST_P256", &agreement::ECDH_P256),
        ("ECC_NIST_P384", &agreement::ECDH_P384),
        ("ECC_NIST_P521", &agreement::ECDH_P521),
    ] {
        let k = create(&kms, &t, spec, "KEY_AGREEMENT").await;
        let d = call(&kms, &t, "DescribeKey", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(d["KeyMetadata"]["KeyUsage"], json!("KEY_AGREEMENT"));
        assert_eq!(d["KeyMetadata"]["KeyAgreementAlgorithms"], json!(["ECDH"]));
        let pk = call(&kms, &t, "GetPublicKey", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(pk["KeyAgreementAlgorithms"], json!(["ECDH"]));
        let kms_pub = unb64(&pk["PublicKey"]);
        let mine = agreement::PrivateKey::generate(alg).unwrap();
        let my_spki = mine.compute_public_key().unwrap();
        let my_spki: aws_lc_rs::encoding::PublicKeyX509Der<'_> = my_spki.as_der().unwrap();
        let r = call(
            &kms,
            &t,
            "DeriveSharedSecret",
            json!({ "KeyId": k, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(my_spki.as_ref()) }),
        )
        .await
        .unwrap();
        assert_eq!(r["KeyAgreementAlgorithm"], json!("ECDH"));
        assert_eq!(r["KeyOrigin"], json!("AWS_KMS"));
        let local = agreement::agree(
            &mine,
            agreement::UnparsedPublicKey::new(alg, &kms_pub),
            (),
            |s| Ok(s.to_vec()),
        )
        .unwrap();
        assert_eq!(unb64(&r["SharedSecret"]), local, "{spec}");
    }
}

/// The bad inputs: wrong key usage, wrong spec, oversize message, EXTERNAL_MU of the wrong
/// length or for the wrong algorithm, message types Ed25519 does not take, a peer key on
/// another curve or not an SPKI, unknown algorithms — each with AWS's error and an audit
/// record of the refusal.
#[tokio::test]
async fn bad_inputs_are_refused_with_aws_errors_and_audited() {
    use aws_lc_rs::agreement;
    use aws_lc_rs::encoding::AsDer;
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "bad").await;
    let ml = create(&kms, &t, "ML_DSA_65", "SIGN_VERIFY").await;
    let ed = create(&kms, &t, "ECC_NIST_EDWARDS25519", "SIGN_VERIFY").await;
    let ka = create(&kms, &t, "ECC_NIST_P256", "KEY_AGREEMENT").await;
    let sv = create(&kms, &t, "ECC_NIST_P256", "SIGN_VERIFY").await;
    let e = |r: Result<Value, (u16, Value)>| code(r.unwrap_err());
    // Specs and usages CreateKey refuses.
    for (spec, usage) in [
        ("ECC_SECG_P256K1", "KEY_AGREEMENT"),
        ("ML_DSA_44", "KEY_AGREEMENT"),
        ("ML_DSA_44", "ENCRYPT_DECRYPT"),
        ("ECC_NIST_EDWARDS25519", "KEY_AGREEMENT"),
        ("SYMMETRIC_DEFAULT", "KEY_AGREEMENT"),
        ("RSA_2048", "KEY_AGREEMENT"),
    ] {
        assert_eq!(
            e(call(
                &kms,
                &t,
                "CreateKey",
                json!({ "KeySpec": spec, "KeyUsage": usage })
            )
            .await),
            "ValidationException",
            "{spec} {usage}"
        );
    }
    let sign = |k: &str, m: &[u8], alg: &str, mt: &str| json!({ "KeyId": k, "Message": b64(m), "SigningAlgorithm": alg, "MessageType": mt });
    let cases: Vec<(Value, &str)> = vec![
        (
            sign(&ml, &[1; 4097], "ML_DSA_SHAKE_256", "RAW"),
            "ValidationException",
        ),
        (
            sign(&ml, &[1; 63], "ML_DSA_SHAKE_256", "EXTERNAL_MU"),
            "ValidationException",
        ),
        (
            sign(&ml, &[1; 65], "ML_DSA_SHAKE_256", "EXTERNAL_MU"),
            "ValidationException",
        ),
        (
            sign(&ml, &[1; 64], "ML_DSA_SHAKE_256", "DIGEST"),
            "ValidationException",
        ),
        (
            sign(&ml, &[1; 32], "ECDSA_SHA_256", "DIGEST"),
            "InvalidKeyUsageException",
        ),
        (
            sign(&ml, &[1; 32], "ML_DSA_SHAKE_128", "RAW"),
            "ValidationException",
        ),
        (
            sign(&ml, &[1; 32], "ML_DSA_SHAKE_256", "PREHASH"),
            "ValidationException",
        ),
        (
            sign(&sv, &[1; 64], "ECDSA_SHA_256", "EXTERNAL_MU"),
            "ValidationException",
        ),
        (
            sign(&sv, &[1; 64], "ML_DSA_SHAKE_256", "RAW"),
            "InvalidKeyUsageException",
        ),
        (
            sign(&ed, &[1; 64], "ED25519_SHA_512", "DIGEST"),
            "ValidationException",
        ),
        (
            sign(&ed, &[1; 64], "ED25519_PH_SHA_512", "RAW"),
            "ValidationException",
        ),
        (
            sign(&ed, &[1; 32], "ED25519_PH_SHA_512", "DIGEST"),
            "ValidationException",
        ),
        (
            sign(&ed, &[1; 64], "ED25519_SHA_512", "EXTERNAL_MU"),
            "ValidationException",
        ),
        (
            sign(&ed, &[1; 32], "ECDSA_SHA_256", "RAW"),
            "InvalidKeyUsageException",
        ),
        (
            sign(&ka, b"m", "ECDSA_SHA_256", "RAW"),
            "InvalidKeyUsageException",
        ),
    ];
    for (body, want) in cases {
        assert_eq!(
            e(call(&kms, &t, "Sign", body.clone()).await),
            want,
            "{body}"
        );
    }
    // DeriveSharedSecret refusals.
    let other_curve = agreement::PrivateKey::generate(&agreement::ECDH_P384).unwrap();
    let other_curve = other_curve.compute_public_key().unwrap();
    let other_spki: aws_lc_rs::encoding::PublicKeyX509Der<'_> = other_curve.as_der().unwrap();
    let p256 = agreement::PrivateKey::generate(&agreement::ECDH_P256).unwrap();
    let p256_pub = p256.compute_public_key().unwrap();
    let p256_spki: aws_lc_rs::encoding::PublicKeyX509Der<'_> = p256_pub.as_der().unwrap();
    let dss = |k: &str, alg: &str, pk: &[u8]| json!({ "KeyId": k, "KeyAgreementAlgorithm": alg, "PublicKey": b64(pk) });
    let cases: Vec<(Value, &str)> = vec![
        (
            dss(&sv, "ECDH", p256_spki.as_ref()),
            "InvalidKeyUsageException",
        ),
        (
            dss(&ml, "ECDH", p256_spki.as_ref()),
            "InvalidKeyUsageException",
        ),
        (dss(&ka, "ECDH", other_spki.as_ref()), "ValidationException"),
        // The bare point, not an SPKI.
        (dss(&ka, "ECDH", p256_pub.as_ref()), "ValidationException"),
        (
            dss(&ka, "ECDH", &[0x30, 0x03, 0x02, 0x01, 0x00]),
            "ValidationException",
        ),
        (dss(&ka, "ECDHE", p256_spki.as_ref()), "ValidationException"),
        (
            json!({ "KeyId": ka, "KeyAgreementAlgorithm": "ECDH" }),
            "ValidationException",
        ),
        // A caller asking for attestation-gated release never gets the secret in the clear
        // (here the key service has no verifier of attestation documents: refused).
        (
            json!({ "KeyId": ka, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(p256_spki.as_ref()),
                    "Recipient": { "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b64(b"doc") } }),
            "ValidationException",
        ),
    ];
    for (body, want) in cases {
        assert_eq!(
            e(call(&kms, &t, "DeriveSharedSecret", body.clone()).await),
            want,
            "{body}"
        );
    }
    // Keys of the new specs are not for encryption or MACs.
    assert_eq!(
        e(call(
            &kms,
            &t,
            "Encrypt",
            json!({ "KeyId": ml, "Plaintext": b64(b"x") })
        )
        .await),
        "InvalidKeyUsageException"
    );
    assert_eq!(
        e(call(
            &kms,
            &t,
            "GenerateDataKeyPair",
            json!({ "KeyId": ml, "KeyPairSpec": "ECC_NIST_EDWARDS25519" })
        )
        .await),
        "InvalidKeyUsageException"
    );
    let sym = create(&kms, &t, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT").await;
    assert_eq!(
        e(call(
            &kms,
            &t,
            "GenerateDataKeyPair",
            json!({ "KeyId": sym, "KeyPairSpec": "ML_DSA_65" })
        )
        .await),
        "ValidationException"
    );
    // Every refusal is in the audit log with its code.
    let log = audit(&kms, &t.account).await;
    let refused = |op: &str, code: &str| {
        log.iter()
            .filter(|a| a.operation == op && a.result == code)
            .count()
    };
    assert!(refused("Sign", "ValidationException") >= 10);
    assert!(refused("Sign", "InvalidKeyUsageException") >= 4);
    assert!(refused("DeriveSharedSecret", "ValidationException") >= 5);
    assert!(refused("DeriveSharedSecret", "InvalidKeyUsageException") >= 2);
}

/// DryRun: answered with DryRunOperationException (HTTP 412) only once the caller is
/// authorized and the input valid; nothing is signed, derived or changed; the audit record
/// says DryRun and is not a use of the key (GetKeyLastUsage stays empty until a real call).
#[tokio::test]
async fn dry_run_checks_without_doing_and_is_not_a_key_use() {
    use aws_lc_rs::agreement;
    use aws_lc_rs::encoding::AsDer;
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "dry").await;
    let k = create_private(&kms, &t, "ML_DSA_44", "SIGN_VERIFY").await;
    let ka = create(&kms, &t, "ECC_NIST_P384", "KEY_AGREEMENT").await;
    let sym = create(&kms, &t, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT").await;
    let last = |id: String| {
        let kms = kms.clone();
        let t = t.clone();
        async move {
            call(&kms, &t, "GetKeyLastUsage", json!({ "KeyId": id }))
                .await
                .unwrap()
        }
    };
    let u = last(k.clone()).await;
    assert_eq!(u["KeyLastUsage"], json!({}));
    assert!(u["TrackingStartDate"].as_f64().unwrap() >= u["KeyCreationDate"].as_f64().unwrap());
    let body = json!({ "KeyId": k, "Message": b64(b"m"), "SigningAlgorithm": "ML_DSA_SHAKE_256", "DryRun": true });
    let (status, err) = call(&kms, &t, "Sign", body.clone()).await.unwrap_err();
    assert_eq!(
        (status, err["__type"].as_str().unwrap()),
        (412, "DryRunOperationException")
    );
    assert!(err.get("Signature").is_none());
    // A dry run with bad input gets the real error, not DryRun.
    let mut bad = body.clone();
    bad["MessageType"] = json!("EXTERNAL_MU");
    assert_eq!(
        code(call(&kms, &t, "Sign", bad).await.unwrap_err()),
        "ValidationException"
    );
    // A dry run by someone the policy does not allow gets AccessDenied.
    let stranger = user(&t.account, "stranger");
    assert_eq!(
        code(
            call(&kms, &stranger, "Sign", body.clone())
                .await
                .unwrap_err()
        ),
        "AccessDeniedException"
    );
    let peer = agreement::PrivateKey::generate(&agreement::ECDH_P384).unwrap();
    let peer = peer.compute_public_key().unwrap();
    let peer: aws_lc_rs::encoding::PublicKeyX509Der<'_> = peer.as_der().unwrap();
    let (status, err) = call(
        &kms,
        &t,
        "DeriveSharedSecret",
        json!({ "KeyId": ka, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(peer.as_ref()), "DryRun": true }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (status, err["__type"].as_str().unwrap()),
        (412, "DryRunOperationException")
    );
    for (op, b) in [
        (
            "Encrypt",
            json!({ "KeyId": sym, "Plaintext": b64(b"x"), "DryRun": true }),
        ),
        (
            "GenerateDataKey",
            json!({ "KeyId": sym, "KeySpec": "AES_256", "DryRun": true }),
        ),
        (
            "GenerateDataKeyPair",
            json!({ "KeyId": sym, "KeyPairSpec": "ECC_NIST_EDWARDS25519", "DryRun": true }),
        ),
        (
            "CreateGrant",
            json!({ "KeyId": sym, "GranteePrincipal": stranger.principal, "Operations": ["Encrypt"], "DryRun": true }),
        ),
    ] {
        assert_eq!(
            code(call(&kms, &t, op, b).await.unwrap_err()),
            "DryRunOperationException",
            "{op}"
        );
    }
    assert!(
        call(&kms, &t, "ListGrants", json!({ "KeyId": sym }))
            .await
            .unwrap()["Grants"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a dry-run CreateGrant created nothing"
    );
    assert_eq!(last(k.clone()).await["KeyLastUsage"], json!({}));
    assert_eq!(last(ka.clone()).await["KeyLastUsage"], json!({}));
    assert_eq!(last(sym.clone()).await["KeyLastUsage"], json!({}));
    let log = audit(&kms, &t.account).await;
    let dry: Vec<_> = log
        .iter()
        .filter(|a| a.result == "DryRunOperationException")
        .collect();
    assert_eq!(dry.len(), 6);
    for a in &dry {
        let d: Value = serde_json::from_str(&a.detail).unwrap();
        assert_eq!(d["DryRun"], json!(true), "{}", a.detail);
        assert!(a.key_id.is_some());
    }
    // Now for real: GetKeyLastUsage names the operation, its time and request id.
    let before = caas_kms::now_ms() as f64 / 1000.0;
    let mut real = body.clone();
    real["DryRun"] = json!(false);
    call(&kms, &t, "Sign", real).await.unwrap();
    let u = last(k.clone()).await;
    assert_eq!(u["KeyId"], json!(k));
    assert_eq!(u["KeyLastUsage"]["Operation"], json!("Sign"));
    assert!(u["KeyLastUsage"]["Timestamp"].as_f64().unwrap() >= before - 1.0);
    let rid = u["KeyLastUsage"]["KmsRequestId"].as_str().unwrap();
    let log = audit(&kms, &t.account).await;
    let rec = log.iter().find(|a| a.request_id == rid).unwrap();
    assert_eq!(
        (rec.operation.as_str(), rec.result.as_str()),
        ("Sign", "Success")
    );
    // A refused call after it does not move it.
    call(
        &kms,
        &t,
        "Verify",
        json!({ "KeyId": k, "Message": b64(b"m"), "Signature": b64(&[0; 2420]), "SigningAlgorithm": "ML_DSA_SHAKE_256" }),
    )
    .await
    .unwrap_err();
    assert_eq!(
        last(k.clone()).await["KeyLastUsage"]["Operation"],
        json!("Sign")
    );
    // Alias names are not accepted; another account's key is not found.
    call(
        &kms,
        &t,
        "CreateAlias",
        json!({ "AliasName": "alias/pq", "TargetKeyId": k }),
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            call(&kms, &t, "GetKeyLastUsage", json!({ "KeyId": "alias/pq" }))
                .await
                .unwrap_err()
        ),
        "InvalidArnException"
    );
    let other = tenant(&kms, "other").await;
    assert_eq!(
        code(
            call(&kms, &other, "GetKeyLastUsage", json!({ "KeyId": k }))
                .await
                .unwrap_err()
        ),
        "NotFoundException"
    );
}

/// kms:DeriveSharedSecret and kms:GetKeyLastUsage are policy actions: a Deny refuses
/// them; a grant of DeriveSharedSecret lets its grantee derive.
#[tokio::test]
async fn derive_shared_secret_and_last_usage_obey_policy_and_grants() {
    use aws_lc_rs::agreement;
    use aws_lc_rs::encoding::AsDer;
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "pol").await;
    let ka = create_private(&kms, &t, "ECC_NIST_P256", "KEY_AGREEMENT").await;
    let peer = agreement::PrivateKey::generate(&agreement::ECDH_P256).unwrap();
    let peer = peer.compute_public_key().unwrap();
    let peer: aws_lc_rs::encoding::PublicKeyX509Der<'_> = peer.as_der().unwrap();
    let body =
        json!({ "KeyId": ka, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(peer.as_ref()) });
    let friend = user(&t.account, "friend");
    assert_eq!(
        code(
            call(&kms, &friend, "DeriveSharedSecret", body.clone())
                .await
                .unwrap_err()
        ),
        "AccessDeniedException"
    );
    let g = call(
        &kms,
        &t,
        "CreateGrant",
        json!({ "KeyId": ka, "GranteePrincipal": friend.principal, "Operations": ["DeriveSharedSecret"] }),
    )
    .await
    .unwrap();
    assert!(g["GrantToken"].is_string());
    call(&kms, &friend, "DeriveSharedSecret", body.clone())
        .await
        .unwrap();
    let deny = json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Principal": { "AWS": t.principal }, "Action": "kms:*", "Resource": "*" },
            { "Effect": "Deny", "Principal": { "AWS": "*" }, "Action": ["kms:DeriveSharedSecret", "kms:GetKeyLastUsage"], "Resource": "*" }
        ]
    });
    call(
        &kms,
        &t,
        "PutKeyPolicy",
        json!({ "KeyId": ka, "PolicyName": "default", "Policy": deny.to_string() }),
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            call(&kms, &t, "DeriveSharedSecret", body.clone())
                .await
                .unwrap_err()
        ),
        "AccessDeniedException"
    );
    assert_eq!(
        code(
            call(&kms, &friend, "DeriveSharedSecret", body.clone())
                .await
                .unwrap_err()
        ),
        "AccessDeniedException",
        "an explicit Deny beats the grant"
    );
    assert_eq!(
        code(
            call(&kms, &t, "GetKeyLastUsage", json!({ "KeyId": ka }))
                .await
                .unwrap_err()
        ),
        "AccessDeniedException"
    );
}

/// The key service's TLS negotiates X25519MLKEM768 with a client that offers it (caas's
/// own client) and records it in the request's audit record; a classical-only client gets
/// X25519, recorded too (here on a request refused before authentication); in-process
/// calls say they had no TLS.
#[tokio::test]
async fn tls_negotiates_x25519mlkem768_and_audit_records_name_the_group() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let account = kms.create_account("tls").await.unwrap();
    let (akid, secret) = kms.create_access_key(&account, "tls").await.unwrap();
    let ca = caas_tls::pki::DevCa::load_or_create(&tmp.path().join("ca")).unwrap();
    let files = ca
        .issue("kms", &[caas_tls::Role::KeyService], &["127.0.0.1"])
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(caas_kms::server::serve(
        kms.clone(),
        listener,
        Some(caas_kms::server::TlsFiles {
            cert: files.cert.clone(),
            key: files.key.clone(),
            client_ca: None,
            crl: None,
        }),
        None,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let ca_pem = std::fs::read(ca.ca_file()).unwrap();
    let client = caas_kms::client::KmsClient::new(
        &format!("https://127.0.0.1:{port}"),
        "us-east-1",
        &akid,
        secret,
        Some(&ca_pem),
    )
    .unwrap();
    let k = client
        .call("CreateKey", &json!({ "KeySpec": "ML_DSA_65" }))
        .await
        .unwrap()["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_string();
    // A classical client (X25519 only), unsigned: refused, and audited with its group.
    let ca_file = ca.ca_file();
    let classical = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        for c in caas_tls::read_certs(&ca_file).unwrap() {
            roots.add(c).unwrap();
        }
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(p))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let body = b"{}";
        write!(
            tls,
            "POST / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-amz-target: TrentService.ListKeys\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        tls.write_all(body).unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        let group = conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()));
        (String::from_utf8_lossy(&out).into_owned(), group)
    })
    .await
    .unwrap();
    assert!(
        classical.0.contains("MissingAuthenticationTokenException"),
        "{}",
        classical.0
    );
    assert_eq!(classical.1.as_deref(), Some("X25519"));
    // In-process.
    let me = user(&account, "tls");
    call(&kms, &me, "DescribeKey", json!({ "KeyId": k }))
        .await
        .unwrap();
    let _ = stop_tx.send(());
    let _ = server.await;

    let all: Vec<_> = kms
        .store
        .audit_list(None, 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry)
        .collect();
    let group_of = |pred: &dyn Fn(&caas_store::AuditEntry) -> bool| -> String {
        let a = all.iter().find(|a| pred(a)).expect("audit record");
        let d: Value = serde_json::from_str(&a.detail).unwrap();
        d["TlsKeyExchange"]
            .as_str()
            .unwrap_or("missing")
            .to_string()
    };
    assert_eq!(
        group_of(&|a| a.operation == "CreateKey" && a.result == "Success"),
        "X25519MLKEM768"
    );
    assert_eq!(
        group_of(
            &|a| a.operation == "ListKeys" && a.result == "MissingAuthenticationTokenException"
        ),
        "X25519"
    );
    assert_eq!(
        group_of(&|a| a.operation == "DescribeKey"),
        "none (in-process call)"
    );
}

/// ML-KEM-512/768/1024: GetPublicKey is an SPKI with FIPS 203's OID whose key a local
/// (aws-lc-rs) encapsulation uses, and Decapsulate recovers that secret; Encapsulate's
/// ciphertext decapsulates to its secret; a tampered ciphertext yields another secret
/// (implicit rejection), a wrong-length one or a wrong key is refused; DryRun works.
#[tokio::test]
async fn ml_kem_encapsulates_and_decapsulates_like_a_local_peer() {
    use aws_lc_rs::kem;
    let tmp = tempfile::tempdir().unwrap();
    let kms = open(tmp.path()).await;
    let t = tenant(&kms, "kem").await;
    let ml_dsa = create(&kms, &t, "ML_DSA_44", "SIGN_VERIFY").await;
    for (spec, alg, oid_last, ek_len, ct_len) in [
        ("ML_KEM_512", &kem::ML_KEM_512, 1u8, 800usize, 768usize),
        ("ML_KEM_768", &kem::ML_KEM_768, 2, 1184, 1088),
        ("ML_KEM_1024", &kem::ML_KEM_1024, 3, 1568, 1568),
    ] {
        let k = create(&kms, &t, spec, "ENCAPSULATE_DECAPSULATE").await;
        let d = call(&kms, &t, "DescribeKey", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(
            d["KeyMetadata"]["EncapsulationAlgorithms"],
            json!(["ML_KEM"])
        );
        let pk = call(&kms, &t, "GetPublicKey", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(pk["EncapsulationAlgorithms"], json!(["ML_KEM"]));
        let spki = unb64(&pk["PublicKey"]);
        assert_eq!(
            spki.len(),
            4 + usize::from(u16::from_be_bytes([spki[2], spki[3]]))
        );
        let oid = [
            0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x04, oid_last,
        ];
        assert!(spki.windows(oid.len()).any(|w| w == oid), "{spec} OID");
        let ek = kem::EncapsulationKey::new(alg, &spki[spki.len() - ek_len..]).unwrap();
        let (ct, local) = ek.encapsulate().unwrap();
        let dec = |ct: &[u8]| json!({ "KeyId": k, "SharedSecretCiphertextBlob": b64(ct), "EncapsulationAlgorithm": "ML_KEM" });
        let r = call(&kms, &t, "Decapsulate", dec(ct.as_ref()))
            .await
            .unwrap();
        assert_eq!(unb64(&r["SharedSecret"]), local.as_ref(), "{spec}");
        let e = call(
            &kms,
            &t,
            "Encapsulate",
            json!({ "KeyId": k, "EncapsulationAlgorithm": "ML_KEM" }),
        )
        .await
        .unwrap();
        let ct2 = unb64(&e["SharedSecretCiphertextBlob"]);
        assert_eq!(ct2.len(), ct_len);
        let r2 = call(&kms, &t, "Decapsulate", dec(&ct2)).await.unwrap();
        assert_eq!(r2["SharedSecret"], e["SharedSecret"]);
        let mut bad = ct2.clone();
        bad[0] ^= 1;
        let r3 = call(&kms, &t, "Decapsulate", dec(&bad)).await.unwrap();
        assert_ne!(r3["SharedSecret"], e["SharedSecret"]);
        assert_eq!(
            code(
                call(&kms, &t, "Decapsulate", dec(&ct2[1..]))
                    .await
                    .unwrap_err()
            ),
            "ValidationException"
        );
        let mut wrong_alg = dec(&ct2);
        wrong_alg["EncapsulationAlgorithm"] = json!("ML_KEM_768");
        assert_eq!(
            code(call(&kms, &t, "Decapsulate", wrong_alg).await.unwrap_err()),
            "ValidationException"
        );
        let mut other_key = dec(&ct2);
        other_key["KeyId"] = json!(ml_dsa);
        assert_eq!(
            code(call(&kms, &t, "Decapsulate", other_key).await.unwrap_err()),
            "InvalidKeyUsageException"
        );
        assert_eq!(
            code(
                call(
                    &kms,
                    &t,
                    "Sign",
                    json!({ "KeyId": k, "Message": b64(b"m"), "SigningAlgorithm": "ML_DSA_SHAKE_256" })
                )
                .await
                .unwrap_err()
            ),
            "InvalidKeyUsageException"
        );
        let mut dry = dec(&ct2);
        dry["DryRun"] = json!(true);
        assert_eq!(
            code(call(&kms, &t, "Decapsulate", dry).await.unwrap_err()),
            "DryRunOperationException"
        );
        let u = call(&kms, &t, "GetKeyLastUsage", json!({ "KeyId": k }))
            .await
            .unwrap();
        assert_eq!(u["KeyLastUsage"]["Operation"], json!("Decapsulate"));
    }
    for usage in ["SIGN_VERIFY", "ENCRYPT_DECRYPT", "KEY_AGREEMENT"] {
        assert_eq!(
            code(
                call(
                    &kms,
                    &t,
                    "CreateKey",
                    json!({ "KeySpec": "ML_KEM_768", "KeyUsage": usage })
                )
                .await
                .unwrap_err()
            ),
            "ValidationException"
        );
    }
    // The decapsulated secret is in no audit record.
    let log = audit(&kms, &t.account).await;
    assert!(log.iter().all(|a| !a.detail.contains("SharedSecret\"")));
}
