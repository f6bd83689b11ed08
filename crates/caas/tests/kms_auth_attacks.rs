//! Attacks on the key service's request authentication, grants and key policies, each from
//! the attacker's real position against a real `caas dev`:
//! - a network observer who captured requests signed by botocore (the AWS SDK for Python)
//!   and replays them modified with a raw HTTP client: another body, another operation,
//!   another scope, and forged requests meant to poison the signing-key cache;
//! - a second principal of the tenant, with boto3, trying to widen a grant it holds or to
//!   use another principal's grant token;
//! - a tenant writing key policies the engine cannot evaluate.
//!
//! Every refusal must carry the AWS error code and leave an audit record (read back with
//! `caas audit list`).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A request as a network observer captured it.
#[derive(Debug, Clone)]
struct Captured {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Captured {
    fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
    fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.into(), value.into()));
    }
}

/// Has botocore's SigV4Auth sign KMS requests (`specs` as in tests/python/sigv4_sign.py).
fn botocore_sign(specs: &[Value]) -> Vec<Captured> {
    let mut child = Command::new(venv_bin().join("python"))
        .arg(repo_root().join("tests/python/sigv4_sign.py"))
        .arg("sign")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::Array(specs.to_vec()).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sigv4_sign.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let q = r["query"].as_str().unwrap();
            Captured {
                path: format!(
                    "{}{}{}",
                    r["path"].as_str().unwrap(),
                    if q.is_empty() { "" } else { "?" },
                    q
                ),
                headers: r["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
                    .collect(),
                body: base64::engine::general_purpose::STANDARD
                    .decode(r["body_b64"].as_str().unwrap())
                    .unwrap(),
            }
        })
        .collect()
}

/// A botocore signing spec for a KMS call with the given credentials.
fn spec(dev: &Dev, creds: (&str, &str), target: Option<&str>, body: &Value) -> Value {
    let mut headers = json!({ "Content-Type": "application/x-amz-json-1.1" });
    if let Some(t) = target {
        headers["X-Amz-Target"] = json!(format!("TrentService.{t}"));
    }
    json!({
        "method": "POST",
        "url": format!("{}/", dev.endpoint()),
        "headers": headers,
        "body_b64": b64(body.to_string().as_bytes()),
        "region": dev.env["AWS_DEFAULT_REGION"],
        "service": "kms",
        "access_key": creds.0,
        "secret": creds.1,
    })
}

/// An HTTP reply: status, headers (lower-case names), body.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn code(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["__type"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
    fn request_id(&self) -> String {
        self.headers
            .get("x-amzn-requestid")
            .cloned()
            .unwrap_or_default()
    }
}

/// Sends a (possibly modified) captured request as it is, with a raw HTTP/1.1 client.
fn send(dev: &Dev, c: &Captured) -> Reply {
    let hostport = dev.endpoint().trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("POST {} HTTP/1.1\r\n", c.path);
    for (k, v) in &c.headers {
        if k != "content-length" {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        c.body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(&c.body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn audit(dev: &Dev) -> Vec<Value> {
    dev.caas(&["audit", "list", "--limit", "1000000"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The refusal must have its own audit record, under its request id, with its error code.
fn assert_audited(dev: &Dev, request_id: &str, result: &str, operation: &str) -> Value {
    assert!(!request_id.is_empty(), "the reply carries no request id");
    let recs = audit(dev);
    let rec = recs
        .iter()
        .find(|r| r["RequestId"] == json!(request_id))
        .unwrap_or_else(|| panic!("no audit record for request {request_id}"))
        .clone();
    assert_eq!(rec["Result"], json!(result), "{rec}");
    assert_eq!(rec["Operation"], json!(operation), "{rec}");
    rec
}

/// Asserts a refusal with `code`, and its audit record.
fn assert_refused(dev: &Dev, r: &Reply, code: &str, operation: &str, what: &str) {
    assert_eq!(r.status, 400, "{what}: {} {}", r.status, r.body);
    assert_eq!(r.code(), code, "{what}: {}", r.body);
    assert_audited(dev, &r.request_id(), code, operation);
}

fn admin_creds(dev: &Dev) -> (String, String) {
    (
        dev.env["AWS_ACCESS_KEY_ID"].clone(),
        dev.env["AWS_SECRET_ACCESS_KEY"].clone(),
    )
}

/// A new access key for `user` in the dev account: (id, secret).
fn new_principal(dev: &Dev, user: &str) -> (String, String) {
    let v: Value = serde_json::from_str(&dev.caas(&[
        "admin",
        "create-access-key",
        "--account",
        &dev.env["CAAS_ACCOUNT_ID"],
        "--user",
        user,
    ]))
    .unwrap();
    (
        v["AccessKeyId"].as_str().unwrap().into(),
        v["SecretAccessKey"].as_str().unwrap().into(),
    )
}

fn client_for(dev: &Dev, creds: &(String, String)) -> caas_kms::client::KmsClient {
    caas_kms::client::KmsClient::new(
        dev.endpoint(),
        &dev.env["AWS_DEFAULT_REGION"],
        &creds.0,
        caas_crypto::SecretBytes::new(creds.1.clone().into_bytes()),
        None,
    )
    .unwrap()
}

/// Runs boto3 code with `admin`, `b`, `c` clients (b = "second", c = "third" principals)
/// and `call(client, op, **kw)` returning `{"ok", "reply" | "code", "request_id"}`; the
/// code sets `out[...]`, which is returned.
fn boto3(dev: &Dev, b: &(String, String), c: &(String, String), code: &str) -> Value {
    let prelude = r#"
import base64, json, os, boto3
from botocore.exceptions import ClientError
def client(akid, secret):
    return boto3.client("kms", endpoint_url=os.environ["AWS_ENDPOINT_URL"], aws_access_key_id=akid,
                        aws_secret_access_key=secret, region_name=os.environ["AWS_DEFAULT_REGION"])
def call(cl, op, **kw):
    try:
        r = getattr(cl, op)(**kw)
        rid = r.pop("ResponseMetadata", {}).get("RequestId")
        return {"ok": True, "reply": r, "request_id": rid}
    except ClientError as e:
        return {"ok": False, "code": e.response["Error"]["Code"], "message": e.response["Error"].get("Message"),
                "request_id": e.response.get("ResponseMetadata", {}).get("RequestId")}
admin = client(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
b = client(os.environ["B_AKID"], os.environ["B_SECRET"])
c = client(os.environ["C_AKID"], os.environ["C_SECRET"])
acct = os.environ["CAAS_ACCOUNT_ID"]
B = f"arn:aws:iam::{acct}:user/second"
C = f"arn:aws:iam::{acct}:user/third"
DEV = f"arn:aws:iam::{acct}:user/dev"
ONLY_DEV = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": DEV}, "Action": "kms:*", "Resource": "*"}]})
out = {}
"#;
    let epilogue = "\nprint(json.dumps(out, default=lambda x: base64.b64encode(x).decode() if isinstance(x, bytes) else str(x)))\n";
    let out = Command::new(venv_bin().join("python"))
        .arg("-c")
        .arg(format!("{prelude}{code}{epilogue}"))
        .envs(&dev.env)
        .env("B_AKID", &b.0)
        .env("B_SECRET", &b.1)
        .env("C_AKID", &c.0)
        .env("C_SECRET", &c.1)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_denied(dev: &Dev, v: &Value, code: &str, operation: &str, what: &str) {
    assert_eq!(v["ok"], json!(false), "{what} succeeded: {v}");
    assert_eq!(v["code"], json!(code), "{what}: {v}");
    assert_audited(dev, v["request_id"].as_str().unwrap_or(""), code, operation);
}

fn create_key(dev: &Dev) -> String {
    rt().block_on(async {
        dev.client().call("CreateKey", &json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string()
    })
}

#[test]
fn replayed_request_with_another_body_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let key = create_key(&dev);
    let (ct_a, ct_b) = rt().block_on(async {
        let c = dev.client();
        let enc = |p: &'static [u8]| {
            let c = c.clone();
            let key = key.clone();
            async move {
                c.call("Encrypt", &json!({ "KeyId": key, "Plaintext": b64(p) }))
                    .await
                    .unwrap()["CiphertextBlob"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        (
            enc(b"A: may be seen").await,
            enc(b"B: the victim's secret").await,
        )
    });
    let admin = admin_creds(&dev);
    let body_a = json!({ "CiphertextBlob": ct_a });
    let body_b = json!({ "CiphertextBlob": ct_b }).to_string().into_bytes();
    let hash_a = caas_kms::sigv4::sha256_hex(body_a.to_string().as_bytes());
    let mut with_hash = spec(&dev, (&admin.0, &admin.1), Some("Decrypt"), &body_a);
    with_hash["headers"]["X-Amz-Content-SHA256"] = json!(hash_a);
    let mut unsigned_payload = spec(&dev, (&admin.0, &admin.1), Some("Decrypt"), &body_a);
    unsigned_payload["headers"]["X-Amz-Content-SHA256"] = json!("UNSIGNED-PAYLOAD");
    let captured = botocore_sign(&[
        spec(&dev, (&admin.0, &admin.1), Some("Decrypt"), &body_a),
        with_hash,
        unsigned_payload,
    ]);
    let secret_b = b64(b"B: the victim's secret");
    // The captured request itself is good (botocore's signature verifies).
    let r = send(&dev, &captured[0]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(&b64(b"A: may be seen")));
    // The attack of the issue: another body, and the original body's hash in
    // x-amz-content-sha256 (which the old verifier used instead of hashing the body).
    let mut replay = captured[0].clone();
    replay.body = body_b.clone();
    replay.set_header("x-amz-content-sha256", &hash_a);
    let r = send(&dev, &replay);
    assert!(!r.body.contains(&secret_b));
    assert_refused(
        &dev,
        &r,
        "IncompleteSignatureException",
        "Decrypt",
        "body swap + unsigned hash header",
    );
    // Another body, nothing else.
    let mut replay = captured[0].clone();
    replay.body = body_b.clone();
    let r = send(&dev, &replay);
    assert!(!r.body.contains(&secret_b));
    assert_refused(
        &dev,
        &r,
        "InvalidSignatureException",
        "Decrypt",
        "body swap",
    );
    // The signer signed x-amz-content-sha256: the body must still hash to it.
    let mut replay = captured[1].clone();
    assert_eq!(send(&dev, &replay.clone()).status, 200);
    replay.body = body_b.clone();
    let r = send(&dev, &replay);
    assert!(!r.body.contains(&secret_b));
    assert_refused(
        &dev,
        &r,
        "InvalidSignatureException",
        "Decrypt",
        "body swap, signed hash",
    );
    // UNSIGNED-PAYLOAD is not accepted for KMS, even as signed.
    for body in [body_a.to_string().into_bytes(), body_b] {
        let mut replay = captured[2].clone();
        replay.body = body;
        let r = send(&dev, &replay);
        assert!(!r.body.contains(&secret_b));
        assert_refused(
            &dev,
            &r,
            "InvalidSignatureException",
            "Decrypt",
            "UNSIGNED-PAYLOAD",
        );
    }
}

#[test]
fn unsigned_target_header_swap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let key = create_key(&dev);
    let admin = admin_creds(&dev);
    let body = json!({ "KeyId": key, "PendingWindowInDays": 7 });
    let captured = botocore_sign(&[
        spec(&dev, (&admin.0, &admin.1), None, &body),
        spec(&dev, (&admin.0, &admin.1), Some("DescribeKey"), &body),
    ]);
    // Signed without X-Amz-Target; the observer adds one.
    let mut attack = captured[0].clone();
    attack.set_header("x-amz-target", "TrentService.ScheduleKeyDeletion");
    let r = send(&dev, &attack);
    assert_refused(
        &dev,
        &r,
        "IncompleteSignatureException",
        "ScheduleKeyDeletion",
        "added target",
    );
    // Signed for DescribeKey; the observer swaps the target.
    let mut attack = captured[1].clone();
    attack.set_header("x-amz-target", "TrentService.ScheduleKeyDeletion");
    let r = send(&dev, &attack);
    assert_refused(
        &dev,
        &r,
        "InvalidSignatureException",
        "ScheduleKeyDeletion",
        "swapped target",
    );
    // ...or sends a second X-Amz-Target before the signed one.
    let mut attack = captured[1].clone();
    attack.headers.insert(
        0,
        (
            "x-amz-target".into(),
            "TrentService.ScheduleKeyDeletion".into(),
        ),
    );
    let r = send(&dev, &attack);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.code(), "IncompleteSignatureException", "{}", r.body);
    assert_audited(
        &dev,
        &r.request_id(),
        "IncompleteSignatureException",
        "ScheduleKeyDeletion",
    );
    // The captured DescribeKey itself works, and the key is not scheduled for deletion.
    assert_eq!(send(&dev, &captured[1]).status, 200);
    rt().block_on(async {
        let d = dev
            .client()
            .call("DescribeKey", &json!({ "KeyId": key }))
            .await
            .unwrap();
        assert_eq!(d["KeyMetadata"]["KeyState"], json!("Enabled"));
    });
}

#[test]
fn other_scope_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let admin = admin_creds(&dev);
    let body = json!({});
    let mut eu = spec(&dev, (&admin.0, &admin.1), Some("ListKeys"), &body);
    eu["region"] = json!("eu-west-1");
    let mut s3 = spec(&dev, (&admin.0, &admin.1), Some("ListKeys"), &body);
    s3["service"] = json!("s3");
    let captured = botocore_sign(&[
        spec(&dev, (&admin.0, &admin.1), Some("ListKeys"), &body),
        eu,
        s3,
    ]);
    assert_eq!(send(&dev, &captured[0]).status, 200);
    // Correctly signed by botocore, but for another region or service.
    for (c, what) in [(&captured[1], "region"), (&captured[2], "service")] {
        let r = send(&dev, c);
        assert_refused(&dev, &r, "InvalidSignatureException", "ListKeys", what);
        assert!(r.body.contains(what), "{}", r.body);
    }
    // The observer edits the scope of a good request.
    let auth = captured[0].header("authorization");
    let date = &captured[0].header("x-amz-date")[..8];
    let region = dev.env["AWS_DEFAULT_REGION"].clone();
    let yesterday = caas_kms::sigv4::format_amz_date(caas_kms::now_ms() / 1000 - 86400);
    for (from, to) in [
        (format!("/{date}/"), format!("/{}/", &yesterday[..8])),
        (format!("/{region}/"), "/us-west-2/".to_string()),
        ("/kms/".to_string(), "/KMS/".to_string()),
        ("/aws4_request".to_string(), "/aws4_requesT".to_string()),
    ] {
        let mut c = captured[0].clone();
        c.set_header("authorization", &auth.replacen(&from, &to, 1));
        let r = send(&dev, &c);
        assert_refused(&dev, &r, "InvalidSignatureException", "ListKeys", &to);
    }
}

#[test]
fn forged_request_does_not_poison_signing_key_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    // The victim's access key id is not secret (request logs, CloudTrail); its cache entry
    // is fresh.
    let victim = new_principal(&dev, "victim");
    let now = caas_kms::sigv4::format_amz_date(caas_kms::now_ms() / 1000);
    let region = dev.env["AWS_DEFAULT_REGION"].clone();
    let hostport = dev.endpoint().trim_start_matches("http://").to_string();
    for service in ["s3", "kms"] {
        for round in 0..3 {
            let forged = Captured {
                path: "/".into(),
                headers: vec![
                    ("host".into(), hostport.clone()),
                    ("content-type".into(), "application/x-amz-json-1.1".into()),
                    ("x-amz-date".into(), now.clone()),
                    ("x-amz-target".into(), "TrentService.ListKeys".into()),
                    (
                        "authorization".into(),
                        format!(
                            "AWS4-HMAC-SHA256 Credential={}/{}/{region}/{service}/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature={}",
                            victim.0,
                            &now[..8],
                            format!("{round}").repeat(64)
                        ),
                    ),
                ],
                body: b"{}".to_vec(),
            };
            let r = send(&dev, &forged);
            assert_refused(&dev, &r, "InvalidSignatureException", "ListKeys", service);
        }
    }
    // The victim's own requests still verify: with the old code the forged "s3" request
    // had cached a wrong signing key for (date, region) for 10 seconds.
    let c = client_for(&dev, &victim);
    rt().block_on(async {
        for _ in 0..3 {
            c.call("ListKeys", &json!({}))
                .await
                .expect("the victim is locked out");
        }
    });
    // And botocore-signed requests of the victim too.
    let captured = botocore_sign(&[spec(
        &dev,
        (&victim.0, &victim.1),
        Some("ListKeys"),
        &json!({}),
    )]);
    assert_eq!(send(&dev, &captured[0]).status, 200);
}

#[test]
fn grantee_cannot_widen_its_grant() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let b = new_principal(&dev, "second");
    let c = new_principal(&dev, "third");
    let out = boto3(
        &dev,
        &b,
        &c,
        r#"
key = admin.create_key(Policy=ONLY_DEV)["KeyMetadata"]["KeyId"]
ct = admin.encrypt(KeyId=key, Plaintext=b"victim secret")["CiphertextBlob"]
ct_a = admin.encrypt(KeyId=key, Plaintext=b"team a secret", EncryptionContext={"team": "a"})["CiphertextBlob"]
out["no_grant"] = call(b, "create_grant", KeyId=key, GranteePrincipal=B, Operations=["Encrypt"])
admin.create_grant(KeyId=key, GranteePrincipal=B, Operations=["Encrypt", "CreateGrant"])
out["widen"] = call(b, "create_grant", KeyId=key, GranteePrincipal=B, Operations=["Decrypt"])
out["widen_mixed"] = call(b, "create_grant", KeyId=key, GranteePrincipal=C, Operations=["Encrypt", "Decrypt"])
out["decrypt"] = call(b, "decrypt", CiphertextBlob=ct)
out["subset"] = call(b, "create_grant", KeyId=key, GranteePrincipal=C, Operations=["Encrypt"])
admin.create_grant(KeyId=key, GranteePrincipal=B, Operations=["Decrypt", "CreateGrant"],
                   Constraints={"EncryptionContextSubset": {"team": "a"}})
out["loosen"] = call(b, "create_grant", KeyId=key, GranteePrincipal=C, Operations=["Decrypt"])
out["other_context"] = call(b, "create_grant", KeyId=key, GranteePrincipal=C, Operations=["Decrypt"],
                            Constraints={"EncryptionContextSubset": {"team": "b"}})
out["stricter"] = call(b, "create_grant", KeyId=key, GranteePrincipal=C, Operations=["Decrypt"],
                       Constraints={"EncryptionContextSubset": {"team": "a", "env": "prod"}})
out["b_decrypt_other_context"] = call(b, "decrypt", CiphertextBlob=ct)
out["b_decrypt_team_a"] = call(b, "decrypt", CiphertextBlob=ct_a, EncryptionContext={"team": "a"})
"#,
    );
    let op = "CreateGrant";
    assert_denied(
        &dev,
        &out["no_grant"],
        "AccessDeniedException",
        op,
        "no grant",
    );
    assert_denied(
        &dev,
        &out["widen"],
        "AccessDeniedException",
        op,
        "Decrypt from [Encrypt, CreateGrant]",
    );
    let rec = assert_audited(
        &dev,
        out["widen"]["request_id"].as_str().unwrap(),
        "AccessDeniedException",
        op,
    );
    assert!(
        rec["Principal"].as_str().unwrap().ends_with(":user/second"),
        "{rec}"
    );
    assert_denied(
        &dev,
        &out["widen_mixed"],
        "AccessDeniedException",
        op,
        "[Encrypt, Decrypt]",
    );
    assert_denied(
        &dev,
        &out["decrypt"],
        "AccessDeniedException",
        "Decrypt",
        "decrypt",
    );
    assert_eq!(out["subset"]["ok"], json!(true), "{}", out["subset"]);
    assert_denied(
        &dev,
        &out["loosen"],
        "AccessDeniedException",
        op,
        "constraint dropped",
    );
    assert_denied(
        &dev,
        &out["other_context"],
        "AccessDeniedException",
        op,
        "other context",
    );
    assert_eq!(out["stricter"]["ok"], json!(true), "{}", out["stricter"]);
    assert_denied(
        &dev,
        &out["b_decrypt_other_context"],
        "AccessDeniedException",
        "Decrypt",
        "decrypt",
    );
    assert_eq!(
        out["b_decrypt_team_a"]["ok"],
        json!(true),
        "{}",
        out["b_decrypt_team_a"]
    );
}

#[test]
fn grant_token_helps_only_its_grantee_and_retire_rights_follow_aws() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let b = new_principal(&dev, "second");
    let c = new_principal(&dev, "third");
    let out = boto3(
        &dev,
        &b,
        &c,
        r#"
key = admin.create_key(Policy=ONLY_DEV)["KeyMetadata"]["KeyId"]
ct = admin.encrypt(KeyId=key, Plaintext=b"for b only")["CiphertextBlob"]
g = admin.create_grant(KeyId=key, GranteePrincipal=B, Operations=["Decrypt"])
out["c_with_b_token"] = call(c, "decrypt", CiphertextBlob=ct, GrantTokens=[g["GrantToken"]])
out["b_with_token"] = call(b, "decrypt", CiphertextBlob=ct, GrantTokens=[g["GrantToken"]])
out["c_retire"] = call(c, "retire_grant", GrantToken=g["GrantToken"])
out["b_retire_without_retiregrant"] = call(b, "retire_grant", GrantToken=g["GrantToken"])
out["b_revoke"] = call(b, "revoke_grant", KeyId=key, GrantId=g["GrantId"])
g2 = admin.create_grant(KeyId=key, GranteePrincipal=B, Operations=["Decrypt"], RetiringPrincipal=C)
out["c_retire_as_retiring"] = call(c, "retire_grant", KeyId=key, GrantId=g2["GrantId"])
g3 = admin.create_grant(KeyId=key, GranteePrincipal=B, Operations=["Decrypt", "RetireGrant"])
out["b_retire_with_retiregrant"] = call(b, "retire_grant", GrantToken=g3["GrantToken"])
out["admin_revoke"] = call(admin, "revoke_grant", KeyId=key, GrantId=g["GrantId"])
out["b_after_revoke"] = call(b, "decrypt", CiphertextBlob=ct)
"#,
    );
    assert_denied(
        &dev,
        &out["c_with_b_token"],
        "AccessDeniedException",
        "Decrypt",
        "other's token",
    );
    assert_eq!(
        out["b_with_token"]["ok"],
        json!(true),
        "{}",
        out["b_with_token"]
    );
    assert_denied(
        &dev,
        &out["c_retire"],
        "AccessDeniedException",
        "RetireGrant",
        "stranger retires",
    );
    assert_denied(
        &dev,
        &out["b_retire_without_retiregrant"],
        "AccessDeniedException",
        "RetireGrant",
        "grantee retires",
    );
    assert_denied(
        &dev,
        &out["b_revoke"],
        "AccessDeniedException",
        "RevokeGrant",
        "grantee revokes",
    );
    for ok in [
        "c_retire_as_retiring",
        "b_retire_with_retiregrant",
        "admin_revoke",
    ] {
        assert_eq!(out[ok]["ok"], json!(true), "{ok}: {}", out[ok]);
    }
    assert_denied(
        &dev,
        &out["b_after_revoke"],
        "AccessDeniedException",
        "Decrypt",
        "after revoke",
    );
}

#[test]
fn deny_with_unsupported_condition_is_refused_at_put() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let b = new_principal(&dev, "second");
    let c = new_principal(&dev, "third");
    let out = boto3(
        &dev,
        &b,
        &c,
        r#"
def with_statement(st):
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": DEV}, "Action": "kms:*", "Resource": "*"}, st]})
key = admin.create_key()["KeyMetadata"]["KeyId"]
for name, cond in [("secure_transport", {"Bool": {"aws:SecureTransport": "false"}}),
                   ("source_ip", {"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}),
                   ("unknown_key", {"StringEquals": {"kms:NoSuchKey": "x"}}),
                   ("bad_operator", {"StringEqualsSometimes": {"kms:CallerAccount": acct}})]:
    deny = {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*", "Condition": cond}
    out["put_" + name] = call(admin, "put_key_policy", KeyId=key, PolicyName="default", Policy=with_statement(deny))
    out["create_" + name] = call(admin, "create_key", Policy=with_statement(deny))
# StringLike is case-sensitive: an Allow for "billing*" does not allow "BILLING".
like = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": DEV}, "NotAction": "kms:Encrypt", "Resource": "*"},
    {"Effect": "Allow", "Principal": {"AWS": DEV}, "Action": "kms:Encrypt", "Resource": "*",
     "Condition": {"StringLike": {"kms:EncryptionContext:app": "billing*"}}}]})
k2 = admin.create_key(Policy=like)["KeyMetadata"]["KeyId"]
out["like_lower"] = call(admin, "encrypt", KeyId=k2, Plaintext=b"x", EncryptionContext={"app": "billing-eu"})
out["like_upper"] = call(admin, "encrypt", KeyId=k2, Plaintext=b"x", EncryptionContext={"app": "BILLING-eu"})
# A documented grant policy: no grant may include Decrypt.
no_decrypt_grants = with_statement({"Effect": "Deny", "Principal": "*", "Action": "kms:CreateGrant", "Resource": "*",
    "Condition": {"ForAnyValue:StringEquals": {"kms:GrantOperations": ["Decrypt", "ReEncryptFrom"]}}})
k3 = admin.create_key(Policy=no_decrypt_grants)["KeyMetadata"]["KeyId"]
out["grant_decrypt"] = call(admin, "create_grant", KeyId=k3, GranteePrincipal=B, Operations=["Encrypt", "Decrypt"])
out["grant_encrypt"] = call(admin, "create_grant", KeyId=k3, GranteePrincipal=B, Operations=["Encrypt"])
# kms:RequestAlias and kms:ResourceAliases come from the request and the key's aliases.
by_alias = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": DEV}, "NotAction": ["kms:Encrypt", "kms:GenerateDataKey"], "Resource": "*"},
    {"Effect": "Allow", "Principal": {"AWS": DEV}, "Action": "kms:Encrypt", "Resource": "*",
     "Condition": {"StringEquals": {"kms:RequestAlias": "alias/app"}}},
    {"Effect": "Allow", "Principal": {"AWS": DEV}, "Action": "kms:GenerateDataKey", "Resource": "*",
     "Condition": {"ForAnyValue:StringLike": {"kms:ResourceAliases": "alias/fin-*"}}}]})
k4 = admin.create_key(Policy=by_alias)["KeyMetadata"]["KeyId"]
admin.create_alias(AliasName="alias/app", TargetKeyId=k4)
out["encrypt_by_alias"] = call(admin, "encrypt", KeyId="alias/app", Plaintext=b"x")
out["encrypt_by_id"] = call(admin, "encrypt", KeyId=k4, Plaintext=b"x")
out["gdk_without_fin_alias"] = call(admin, "generate_data_key", KeyId=k4, KeySpec="AES_256")
admin.create_alias(AliasName="alias/fin-eu", TargetKeyId=k4)
out["gdk_with_fin_alias"] = call(admin, "generate_data_key", KeyId=k4, KeySpec="AES_256")
"#,
    );
    for name in [
        "secure_transport",
        "source_ip",
        "unknown_key",
        "bad_operator",
    ] {
        assert_denied(
            &dev,
            &out[format!("put_{name}")],
            "MalformedPolicyDocumentException",
            "PutKeyPolicy",
            name,
        );
        assert_denied(
            &dev,
            &out[format!("create_{name}")],
            "MalformedPolicyDocumentException",
            "CreateKey",
            name,
        );
    }
    assert_eq!(
        out["like_lower"]["ok"],
        json!(true),
        "{}",
        out["like_lower"]
    );
    assert_denied(
        &dev,
        &out["like_upper"],
        "AccessDeniedException",
        "Encrypt",
        "StringLike case",
    );
    assert_denied(
        &dev,
        &out["grant_decrypt"],
        "AccessDeniedException",
        "CreateGrant",
        "Decrypt grant",
    );
    assert_eq!(
        out["grant_encrypt"]["ok"],
        json!(true),
        "{}",
        out["grant_encrypt"]
    );
    assert_eq!(
        out["encrypt_by_alias"]["ok"],
        json!(true),
        "{}",
        out["encrypt_by_alias"]
    );
    assert_denied(
        &dev,
        &out["encrypt_by_id"],
        "AccessDeniedException",
        "Encrypt",
        "RequestAlias",
    );
    assert_denied(
        &dev,
        &out["gdk_without_fin_alias"],
        "AccessDeniedException",
        "GenerateDataKey",
        "ResourceAliases",
    );
    assert_eq!(
        out["gdk_with_fin_alias"]["ok"],
        json!(true),
        "{}",
        out["gdk_with_fin_alias"]
    );
}

#[test]
fn a_large_marker_gets_an_answer_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let key = create_key(&dev);
    rt().block_on(async {
        let c = dev.client();
        for op in ["ListKeys", "ListResourceTags", "ListKeyRotations"] {
            let r = c
                .call(
                    op,
                    &json!({ "KeyId": key, "Marker": u64::MAX.to_string(), "Limit": 1000 }),
                )
                .await;
            let r = r.unwrap_or_else(|e| panic!("{op}: {e}"));
            assert_eq!(r["Truncated"], json!(false), "{op}: {r}");
        }
        c.call("ListKeys", &json!({})).await.unwrap();
    });
}
