//! Every route of the key service, attacked from the network: a real `caas dev` process,
//! raw HTTP requests without credentials, with a forged SigV4 signature, with a tenant's
//! valid credentials on operator routes and an operator's on the KMS API. Only the listed
//! public routes answer without credentials; the host-protocol routes reach their handler
//! (their message is the authentication: Privacy CA, AK signature); every other refusal is
//! 401/403 (the KMS API: AWS's 400 shape) with an error code, and audited.
//!
//! The route table comes from the binary (`caas key-service routes`, the table the
//! authentication layer enforces; a route the router serves but the table does not list is
//! refused to everyone) and must equal [`EXPECTED`]: a new route fails this test until its
//! access is written down here.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_crypto::SecretBytes;
use caas_tl::dm::DomainManager;
use common::Dev;
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// (method, path, access) of every route the key service serves.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "public"),
    ("GET", "/v1/audit/public-key", "public"),
    ("GET", "/v1/tl/ttp", "public"),
    ("POST", "/", "kms-tenant"),
    ("POST", "/v1/attest/enroll", "host-protocol"),
    ("POST", "/v1/attest/enroll/finish", "host-protocol"),
    ("GET", "/v1/attest/hosts", "operator:hosts:read"),
    ("GET", "/v1/attest/hosts/{name}", "operator:hosts:read"),
    (
        "POST",
        "/v1/attest/hosts/{name}/attest",
        "operator:hosts:attest",
    ),
    (
        "PUT",
        "/v1/attest/hosts/{name}/profile",
        "operator:hosts:admit",
    ),
    ("GET", "/v1/attest/profiles", "operator:profiles:read"),
    ("POST", "/v1/attest/profiles", "operator:profiles:write"),
    (
        "GET",
        "/v1/attest/profiles/{name}",
        "operator:profiles:read",
    ),
    (
        "PUT",
        "/v1/attest/profiles/{name}",
        "operator:profiles:write",
    ),
    ("POST", "/v1/tl/attest", "host-protocol"),
    ("POST", "/v1/tl/domkey", "host-protocol"),
    ("POST", "/v1/tl/epoch", "host-protocol"),
    ("POST", "/v1/tl/migrate", "host-protocol"),
    ("POST", "/v1/tl/suspend", "host-protocol"),
    ("POST", "/v1/tl/resume", "host-protocol"),
    ("POST", "/v1/tl/netkey", "host-protocol"),
    ("POST", "/v1/tl/netkey/leave", "host-protocol"),
    ("POST", "/v1/tl/netkey/rekey", "operator:acl:admin"),
    ("PUT", "/v1/tl/acl", "tenant|operator:acl:admin"),
    (
        "GET",
        "/v1/tl/hosts/{name}/bind-info",
        "tenant|operator:hosts:read",
    ),
    (
        "POST",
        "/v1/recipient/challenge",
        "tenant|operator:hosts:read",
    ),
    ("POST", "/v1/sched/launch", "tenant|operator:schedule"),
    ("POST", "/v1/sched/migrate", "tenant|operator:schedule"),
    ("POST", "/v1/sched/suspend", "tenant|operator:schedule"),
    ("POST", "/v1/sched/resume", "tenant|operator:schedule"),
];

/// Credentials: (access key id, secret).
#[derive(Clone)]
struct Creds(String, String);

fn tenant(dev: &Dev) -> Creds {
    Creds(
        dev.env["AWS_ACCESS_KEY_ID"].clone(),
        dev.env["AWS_SECRET_ACCESS_KEY"].clone(),
    )
}

fn operator(dev: &Dev) -> Creds {
    Creds(
        dev.env["CAAS_OPERATOR_ACCESS_KEY_ID"].clone(),
        dev.env["CAAS_OPERATOR_SECRET_ACCESS_KEY"].clone(),
    )
}

/// A raw HTTP/1.1 request; `sign` = (credentials, scope service). Returns (status, body).
fn request(
    dev: &Dev,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    sign: Option<(&Creds, &str)>,
) -> (u16, Value) {
    request_to(dev.endpoint(), method, path, headers, body, sign)
}

/// [`request`] to any plain-HTTP endpoint.
fn request_to(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    sign: Option<(&Creds, &str)>,
) -> (u16, Value) {
    use std::io::{Read, Write};
    let hostport = endpoint.trim_start_matches("http://").to_string();
    let mut hs: Vec<(String, String)> = vec![("host".into(), hostport.clone())];
    hs.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    if let Some((c, service)) = sign {
        let signer = caas_kms::client::Signer::new(
            "us-east-1",
            service,
            &c.0,
            SecretBytes::new(c.1.clone().into_bytes()),
        );
        let auth = signer.sign(method, path, "", &mut hs, body).unwrap();
        hs.push(("authorization".into(), auth));
    }
    let mut s = std::net::TcpStream::connect(&hostport).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in &hs {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

/// A JSON call to a key-service route (scope `caas`).
fn call(dev: &Dev, method: &str, path: &str, body: &Value, who: Option<&Creds>) -> (u16, Value) {
    let b = body.to_string();
    request(
        dev,
        method,
        path,
        &[("content-type", "application/json")],
        b.as_bytes(),
        who.map(|c| (c, "caas")),
    )
}

/// A KMS API call (scope `kms`).
fn kms(dev: &Dev, op: &str, body: &Value, who: Option<&Creds>) -> (u16, Value) {
    let target = format!("TrentService.{op}");
    let b = body.to_string();
    request(
        dev,
        "POST",
        "/",
        &[
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", &target),
        ],
        b.as_bytes(),
        who.map(|c| (c, "kms")),
    )
}

fn audit(dev: &Dev) -> Vec<Value> {
    dev.caas(&["audit", "list", "--limit", "100000"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn audited(records: &[Value], op: &str, result: &str, principal: Option<&str>) -> bool {
    records.iter().any(|r| {
        r["Operation"] == json!(op)
            && r["Result"] == json!(result)
            && principal.is_none_or(|p| r["Principal"] == json!(p))
    })
}

fn refused(r: &(u16, Value), status: u16, code: &str, what: &str) {
    assert!(
        r.0 == status && r.1["code"] == json!(code),
        "{what}: expected {status} {code}, got {r:?}"
    );
}

fn start() -> (tempfile::TempDir, Dev) {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("dev"));
    (tmp, dev)
}

fn concrete(path: &str) -> String {
    path.replace("{name}", "host-1")
}

fn tenant_principal(dev: &Dev) -> String {
    format!("arn:aws:iam::{}:user/dev", dev.env["CAAS_ACCOUNT_ID"])
}

#[test]
fn every_route_refuses_callers_without_valid_credentials() {
    let (_tmp, dev) = start();
    // The table the binary enforces is the table written down here.
    let out = std::process::Command::new(common::caas_bin())
        .args(["key-service", "routes"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: BTreeSet<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["method"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
                v["access"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String, String)> = EXPECTED
        .iter()
        .map(|(m, p, a)| (m.to_string(), p.to_string(), a.to_string()))
        .collect();
    assert_eq!(
        listed, expected,
        "the key service's route table changed: write the new route's access into EXPECTED"
    );
    assert_eq!(listed.len(), EXPECTED.len());

    let forged = Creds(tenant(&dev).0, "not-the-secret".into());
    let tenant = tenant(&dev);
    let operator = operator(&dev);
    let principal = tenant_principal(&dev);
    for (method, path, access) in EXPECTED {
        let p = concrete(path);
        let what = format!("{method} {path}");
        match *access {
            "public" => {
                let r = call(&dev, method, &p, &json!({}), None);
                assert_eq!(r.0, 200, "{what} is public: {r:?}");
            }
            "host-protocol" => {
                // Reaches its handler (the message is the authentication), which refuses
                // an empty message.
                let r = call(&dev, method, &p, &json!({}), None);
                assert!(
                    (400..500).contains(&r.0) && ![401, 403, 404, 405].contains(&r.0),
                    "{what}: the handler refuses an empty message: {r:?}"
                );
            }
            "kms-tenant" => {
                let r = kms(&dev, "ListKeys", &json!({}), None);
                assert!(
                    r.0 == 400 && r.1["__type"] == json!("MissingAuthenticationTokenException"),
                    "{what} without credentials: {r:?}"
                );
                let r = kms(&dev, "ListKeys", &json!({}), Some(&forged));
                assert!(
                    r.0 == 400 && r.1["__type"] == json!("InvalidSignatureException"),
                    "{what} forged: {r:?}"
                );
                let r = kms(&dev, "ListKeys", &json!({}), Some(&operator));
                assert!(
                    r.0 == 400 && r.1["__type"] == json!("AccessDeniedException"),
                    "{what} by an operator: {r:?}"
                );
                let r = kms(&dev, "ListKeys", &json!({}), Some(&tenant));
                assert_eq!(r.0, 200, "{what} by the tenant: {r:?}");
            }
            signed => {
                let r = call(&dev, method, &p, &json!({}), None);
                refused(&r, 401, "missing_authentication", &what);
                let r = call(&dev, method, &p, &json!({}), Some(&forged));
                refused(&r, 401, "invalid_signature", &format!("{what} forged"));
                // A signature by the right key over another body does not carry over.
                let mut hs = vec![
                    (
                        "host".to_string(),
                        dev.endpoint().trim_start_matches("http://").to_string(),
                    ),
                    ("content-type".to_string(), "application/json".to_string()),
                ];
                let signer = caas_kms::client::Signer::new(
                    "us-east-1",
                    "caas",
                    &operator.0,
                    SecretBytes::new(operator.1.clone().into_bytes()),
                );
                let auth = signer.sign(method, &p, "", &mut hs, b"{}").unwrap();
                let date = hs
                    .iter()
                    .find(|(k, _)| k == "x-amz-date")
                    .unwrap()
                    .1
                    .clone();
                let r = request(
                    &dev,
                    method,
                    &p,
                    &[
                        ("content-type", "application/json"),
                        ("x-amz-date", &date),
                        ("authorization", &auth),
                    ],
                    br#"{"profile":"attacker"}"#,
                    None,
                );
                refused(
                    &r,
                    401,
                    "invalid_signature",
                    &format!("{what} body swapped"),
                );
                // The operator's key scoped to `kms` is not a key-service signature.
                let b = b"{}";
                let r = request(
                    &dev,
                    method,
                    &p,
                    &[("content-type", "application/json")],
                    b,
                    Some((&operator, "kms")),
                );
                refused(&r, 401, "invalid_signature", &format!("{what} wrong scope"));
                let by_tenant = call(&dev, method, &p, &json!({}), Some(&tenant));
                let by_operator = call(&dev, method, &p, &json!({}), Some(&operator));
                if signed.starts_with("operator:") {
                    refused(
                        &by_tenant,
                        403,
                        "access_denied",
                        &format!("{what} by a tenant"),
                    );
                } else {
                    assert!(
                        by_tenant.0 != 401 && by_tenant.1["code"] != json!("access_denied"),
                        "{what}: a tenant passes authentication: {by_tenant:?}"
                    );
                }
                // The dev operator holds every permission: past authentication.
                assert!(
                    by_operator.0 != 401 && by_operator.1["code"] != json!("access_denied"),
                    "{what}: the operator passes authentication: {by_operator:?}"
                );
            }
        }
    }
    // Every refusal is in the key service's audit chain.
    let records = audit(&dev);
    for (method, path, access) in EXPECTED {
        let op = format!("HTTP {method} {path}");
        match *access {
            "public" | "host-protocol" => {}
            "kms-tenant" => {
                assert!(audited(
                    &records,
                    "ListKeys",
                    "MissingAuthenticationTokenException",
                    Some("anonymous")
                ));
                assert!(audited(
                    &records,
                    "ListKeys",
                    "InvalidSignatureException",
                    None
                ));
                assert!(audited(
                    &records,
                    "ListKeys",
                    "AccessDeniedException",
                    Some("arn:caas:iam::operator:operator/dev-operator")
                ));
            }
            signed => {
                assert!(
                    audited(&records, &op, "missing_authentication", Some("anonymous")),
                    "{op}: unauthenticated call not audited"
                );
                assert!(
                    audited(&records, &op, "invalid_signature", Some("anonymous")),
                    "{op}: forged call not audited"
                );
                if signed.starts_with("operator:") {
                    assert!(
                        audited(&records, &op, "access_denied", Some(&principal)),
                        "{op}: the tenant's call not audited"
                    );
                }
            }
        }
    }
    // The verified chain still verifies.
    dev.caas(&["audit", "verify"]);
}

#[test]
fn unauthenticated_profile_change_is_refused() {
    let (_tmp, dev) = start();
    let op = operator(&dev);
    let profile = json!({
        "name": "prod", "bank": "sha256", "pcrs": { "0": { "values": ["00".repeat(32)] } },
    });
    let created = call(&dev, "POST", "/v1/attest/profiles", &profile, Some(&op));
    assert_eq!(
        created.0, 201,
        "the operator creates a profile: {created:?}"
    );
    // The attacker on the network: change the profile, re-point a host, admit a host.
    let mut evil = created.1.clone();
    evil["description"] = json!("attacker");
    let r = call(&dev, "PUT", "/v1/attest/profiles/prod", &evil, None);
    refused(
        &r,
        401,
        "missing_authentication",
        "unauthenticated profile update",
    );
    let r = call(
        &dev,
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        &json!({ "profile": "prod" }),
        None,
    );
    refused(
        &r,
        401,
        "missing_authentication",
        "unauthenticated host profile change",
    );
    let r = call(
        &dev,
        "POST",
        "/v1/attest/profiles",
        &json!({"name": "evil"}),
        None,
    );
    refused(
        &r,
        401,
        "missing_authentication",
        "unauthenticated profile creation",
    );
    // Nothing changed.
    let now = call(
        &dev,
        "GET",
        "/v1/attest/profiles/prod",
        &json!({}),
        Some(&op),
    );
    assert_eq!(now.0, 200);
    assert_eq!(now.1, created.1, "the profile is unchanged");
    let records = audit(&dev);
    assert!(audited(
        &records,
        "HTTP PUT /v1/attest/profiles/{name}",
        "missing_authentication",
        Some("anonymous")
    ));
    assert!(audited(
        &records,
        "HTTP PUT /v1/attest/hosts/{name}/profile",
        "missing_authentication",
        Some("anonymous")
    ));
    assert!(audited(
        &records,
        "HTTP POST /v1/attest/profiles",
        "missing_authentication",
        Some("anonymous")
    ));
    // The operator's own change is audited under its principal.
    assert!(records.iter().any(|r| {
        r["Operation"] == json!("CreateProfile")
            && r["Principal"]
                .as_str()
                .unwrap_or("")
                .ends_with("operator/dev-operator")
    }));
}

#[test]
fn tenant_cannot_call_operator_routes() {
    let (_tmp, dev) = start();
    let t = tenant(&dev);
    let principal = tenant_principal(&dev);
    for (method, path, body) in [
        (
            "POST",
            "/v1/attest/profiles",
            json!({"name": "mine", "bank": "sha256", "pcrs": {}}),
        ),
        (
            "PUT",
            "/v1/attest/hosts/host-1/profile",
            json!({"profile": "mine"}),
        ),
        ("POST", "/v1/attest/hosts/host-1/attest", json!({})),
        ("GET", "/v1/attest/hosts", json!({})),
    ] {
        let r = call(&dev, method, path, &body, Some(&t));
        refused(&r, 403, "access_denied", &format!("tenant {method} {path}"));
    }
    // And an operator cannot use the KMS API on tenant keys (nor create its own).
    let op = operator(&dev);
    let key = kms(&dev, "CreateKey", &json!({}), Some(&t));
    assert_eq!(key.0, 200, "{key:?}");
    let key_id = key.1["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    for (o, body) in [
        ("CreateKey", json!({})),
        (
            "DescribeKey",
            json!({ "KeyId": format!("arn:aws:kms:us-east-1:{}:key/{key_id}", dev.env["CAAS_ACCOUNT_ID"]) }),
        ),
        ("Encrypt", json!({ "KeyId": key_id, "Plaintext": "AAAA" })),
    ] {
        let r = kms(&dev, o, &body, Some(&op));
        assert!(
            r.0 == 400 && r.1["__type"] == json!("AccessDeniedException"),
            "operator {o}: {r:?}"
        );
    }
    let records = audit(&dev);
    assert!(audited(
        &records,
        "HTTP POST /v1/attest/profiles",
        "access_denied",
        Some(&principal)
    ));
    assert!(audited(
        &records,
        "HTTP PUT /v1/attest/hosts/{name}/profile",
        "access_denied",
        Some(&principal)
    ));
    assert!(audited(
        &records,
        "HTTP POST /v1/attest/hosts/{name}/attest",
        "access_denied",
        Some(&principal)
    ));
    // Audited under the operator's own name.
    let op_principal = "arn:caas:iam::operator:operator/dev-operator";
    assert!(audited(
        &records,
        "CreateKey",
        "AccessDeniedException",
        Some(op_principal)
    ));
    assert!(audited(
        &records,
        "Encrypt",
        "AccessDeniedException",
        Some(op_principal)
    ));
}

fn new_dm() -> DomainManager {
    let doc = caas_tl::crypto::ed25519_generate().unwrap();
    DomainManager::from_pkcs8(doc.expose()).unwrap()
}

#[test]
fn forged_acl_update_is_refused() {
    let (_tmp, dev) = start();
    let attacker_creds = tenant(&dev); // a valid tenant of this key service
    let victim = new_dm();
    let attacker = new_dm();
    // The attacker claims the victim's pk_DM but can only sign with its own key.
    let update = caas_tl::wire::AclUpdate {
        pk_dm: victim.public(),
        label: "forged".into(),
        domains: vec!["victim-data".into()],
        nonce: caas_crypto::random_bytes(32).unwrap(),
        time_ms: caas_attest::now_ms(),
    };
    let forged = caas_tl::wire::Signed::sign(
        attacker.key_pair(),
        caas_tl::wire::label::ACL_UPDATE,
        &update,
    );
    let body = serde_json::to_value(&forged).unwrap();
    let r = call(&dev, "PUT", "/v1/tl/acl", &body, Some(&attacker_creds));
    refused(&r, 403, "bad_signature", "ACL change for another DM's key");
    // Unsigned by SigV4 it does not even reach the TTP.
    let r = call(&dev, "PUT", "/v1/tl/acl", &body, None);
    refused(
        &r,
        401,
        "missing_authentication",
        "unauthenticated ACL change",
    );
    // The domain was not taken: the victim registers it with its own signature.
    let own = victim
        .acl_update("victim", &["victim-data".into()], caas_attest::now_ms())
        .unwrap();
    let r = call(
        &dev,
        "PUT",
        "/v1/tl/acl",
        &serde_json::to_value(&own).unwrap(),
        Some(&attacker_creds),
    );
    assert_eq!(r.0, 200, "the DM's own signed change: {r:?}");
    assert_eq!(r.1["dm"], json!(victim.h2()));
    // And the attacker cannot take it over with its own key either.
    let grab = attacker
        .acl_update("grab", &["victim-data".into()], caas_attest::now_ms())
        .unwrap();
    let r = call(
        &dev,
        "PUT",
        "/v1/tl/acl",
        &serde_json::to_value(&grab).unwrap(),
        Some(&attacker_creds),
    );
    refused(&r, 403, "domain_owned", "another DM's domain");
    let records = audit(&dev);
    assert!(
        audited(
            &records,
            "TlSetAcl",
            "bad_signature",
            Some(&tenant_principal(&dev))
        ),
        "forged ACL change not audited"
    );
    assert!(audited(
        &records,
        "HTTP PUT /v1/tl/acl",
        "missing_authentication",
        Some("anonymous")
    ));
}

#[test]
fn replayed_acl_update_is_refused() {
    let (_tmp, dev) = start();
    let creds = tenant(&dev);
    let dm = new_dm();
    let first = dm
        .acl_update("dm", &["d1".into()], caas_attest::now_ms())
        .unwrap();
    let body = serde_json::to_value(&first).unwrap();
    let r = call(&dev, "PUT", "/v1/tl/acl", &body, Some(&creds));
    assert_eq!(r.0, 200, "{r:?}");
    // The DM shrinks its ACL; the attacker replays the first change to restore it.
    let second = dm
        .acl_update("dm", &["d2".into()], caas_attest::now_ms())
        .unwrap();
    let r = call(
        &dev,
        "PUT",
        "/v1/tl/acl",
        &serde_json::to_value(&second).unwrap(),
        Some(&creds),
    );
    assert_eq!(r.0, 200, "{r:?}");
    let r = call(&dev, "PUT", "/v1/tl/acl", &body, Some(&creds));
    refused(&r, 403, "nonce_replayed", "replayed ACL change");
    // A change signed long ago is refused too (freshness window).
    let old = dm
        .acl_update("dm", &["d1".into()], caas_attest::now_ms() - 10 * 60 * 1000)
        .unwrap();
    let r = call(
        &dev,
        "PUT",
        "/v1/tl/acl",
        &serde_json::to_value(&old).unwrap(),
        Some(&creds),
    );
    refused(&r, 403, "stale_message", "stale ACL change");
    // After a restart too (the nonce is recorded in the store).
    let mut dev = dev;
    dev.stop();
    let dev = Dev::start(&dev.dir.clone());
    let r = call(&dev, "PUT", "/v1/tl/acl", &body, Some(&creds));
    refused(
        &r,
        403,
        "nonce_replayed",
        "replayed ACL change after a restart",
    );
    let records = audit(&dev);
    assert!(
        audited(&records, "TlSetAcl", "nonce_replayed", None),
        "replay not audited"
    );
    assert!(
        audited(&records, "TlSetAcl", "stale_message", None),
        "stale change not audited"
    );
}

/// `caas key-service serve --config` (production mode) serves every role from its config,
/// and an operator can do only what its permissions name.
#[test]
fn production_key_service_serves_every_role_and_checks_operator_permissions() {
    let help = std::process::Command::new(common::caas_bin())
        .args(["key-service", "serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for role in ["KMS", "registrar", "verifier", "TTP", "scheduler"] {
        assert!(help.contains(role), "--help names the {role}: {help}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let profile = json!({
        "name": "prod", "bank": "sha256", "pcrs": { "0": { "values": ["11".repeat(32)] } },
    });
    std::fs::write(tmp.path().join("prod.json"), profile.to_string()).unwrap();
    let cfg = tmp.path().join("ks.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"sqlite:{}\"\n[keys]\nnode_key_file = \"{}\"\ncreate_node_key = true\n\
             [attestation]\nek_ca_files = []\nprofiles = [\"prod.json\"]\ninterval_secs = 30\n\
             [ttp]\nrevoke_untrusted_hosts = true\n[scheduler]\nagent_timeout_secs = 60\n",
            tmp.path().join("kms.sqlite3").display(),
            tmp.path().join("node.key").display()
        ),
    )
    .unwrap();
    let admin = |args: &[&str]| -> Value {
        let o = std::process::Command::new(common::caas_bin())
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let creds = |v: &Value| {
        Creds(
            v["AccessKeyId"].as_str().unwrap().into(),
            v["SecretAccessKey"].as_str().unwrap().into(),
        )
    };
    // The first operators, created offline against the store (bootstrap).
    let reader = creds(&admin(&[
        "admin",
        "create-operator",
        "reader",
        "--permissions",
        "hosts:read,profiles:read",
    ]));
    let boss = creds(&admin(&[
        "admin",
        "create-operator",
        "boss",
        "--permissions",
        "all",
    ]));
    let mut child = std::process::Command::new(common::caas_bin())
        .args(["key-service", "serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _child = Kill(child);
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let ep = format!("http://127.0.0.1:{port}");
    let json_call = |method: &str, path: &str, body: &Value, who: Option<&Creds>| {
        let b = body.to_string();
        request_to(
            &ep,
            method,
            path,
            &[("content-type", "application/json")],
            b.as_bytes(),
            who.map(|c| (c, "caas")),
        )
    };
    assert_eq!(json_call("GET", "/healthz", &json!({}), None).0, 200);
    let ttp = json_call("GET", "/v1/tl/ttp", &json!({}), None);
    assert_eq!(ttp.0, 200, "the TTP is served: {ttp:?}");
    let r = json_call(
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        &json!({"profile": "prod"}),
        None,
    );
    refused(
        &r,
        401,
        "missing_authentication",
        "production: unauthenticated profile change",
    );
    // The configured profile exists; the reader may read it but not change it.
    let got = json_call("GET", "/v1/attest/profiles/prod", &json!({}), Some(&reader));
    assert_eq!(got.0, 200, "{got:?}");
    let mut changed = got.1.clone();
    changed["description"] = json!("changed");
    let r = json_call("PUT", "/v1/attest/profiles/prod", &changed, Some(&reader));
    refused(
        &r,
        403,
        "access_denied",
        "an operator without profiles:write",
    );
    let r = json_call(
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        &json!({"profile": "prod"}),
        Some(&reader),
    );
    refused(&r, 403, "access_denied", "an operator without hosts:admit");
    let r = json_call("PUT", "/v1/attest/profiles/prod", &changed, Some(&boss));
    assert_eq!(r.0, 200, "an operator with profiles:write: {r:?}");
    // An operator's key is no KMS credential.
    let r = request_to(
        &ep,
        "POST",
        "/",
        &[
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "TrentService.CreateKey"),
        ],
        b"{}",
        Some((&boss, "kms")),
    );
    assert!(
        r.0 == 400 && r.1["__type"] == json!("AccessDeniedException"),
        "{r:?}"
    );
    let out = std::process::Command::new(common::caas_bin())
        .args(["audit", "list", "--limit", "100000", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(audited(
        &records,
        "HTTP PUT /v1/attest/profiles/{name}",
        "access_denied",
        Some("arn:caas:iam::operator:operator/reader")
    ));
    assert!(audited(
        &records,
        "HTTP PUT /v1/attest/hosts/{name}/profile",
        "missing_authentication",
        Some("anonymous")
    ));
    assert!(audited(&records, "CreateOperator", "Success", None));
}
