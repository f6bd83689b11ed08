//! Audit records of the key service. Every request — success or failure — appends exactly
//! one record in the same durable commit as its state change (see `service.rs`). Records
//! carry who, what, which key, the result and the request id; never plaintext, data keys or
//! key material. The chain is signed with an Ed25519 key derived from the node key, so
//! `caas audit verify` needs only the public key to check it (in a KMS domain: the key of the
//! domain-key epoch each signature names, `crate::domain::epoch`; `Kms::audit_signature_ok`).
//!
//! [`cloudtrail_event`] maps a stored record to a CloudTrail-style event (one JSON line of
//! `caas audit export`, for a SIEM). Access key ids are recorded in the record's detail
//! (`AccessKeyId`) and surface as `userIdentity.accessKeyId`; `requestParameters` is the
//! rest of the detail with any field that could carry secret or bulk data removed.
use crate::keyring::SYSTEM_ACCOUNT;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use caas_store::{AuditEntry, AuditRecord, AuditSigner};
use serde_json::{Map, Value, json};

/// Signs audit record hashes with the node's audit key.
pub struct Ed25519AuditSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for Ed25519AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ed25519AuditSigner(public={})",
            hex::encode(self.public_key())
        )
    }
}

impl Ed25519AuditSigner {
    /// Builds the signer from a 32-byte seed (derived from the node key).
    pub fn from_seed(seed: &[u8]) -> Option<Self> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .ok()
            .map(|key| Self { key })
    }
    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// Signs a domain-separated message other than a record hash (audit checkpoints).
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }
}

impl AuditSigner for Ed25519AuditSigner {
    fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
        self.key.sign(hash).as_ref().to_vec()
    }
}

/// Verifies a record signature against a raw Ed25519 public key.
pub fn verify_signature(public_key: &[u8], hash: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(hash, sig)
        .is_ok()
}

/// An audit entry for deployment-level events (domain key creation, scheduled deletions).
pub fn system_entry(operation: &str, detail: &str) -> AuditEntry {
    AuditEntry {
        time_ms: crate::now_ms(),
        account: SYSTEM_ACCOUNT.into(),
        principal: "caas:key-service".into(),
        operation: operation.into(),
        key_id: None,
        result: "Success".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        detail: serde_json::json!({ "detail": detail }).to_string(),
    }
}

/// The detail field naming the access key a request was signed with.
pub const ACCESS_KEY_FIELD: &str = "AccessKeyId";

/// Request fields never exported even if a future operation recorded one (secret or bulk
/// data in AWS KMS requests and responses).
const NEVER_EXPORTED: &[&str] = &[
    "plaintext",
    "ciphertextblob",
    "sourceciphertextblob",
    "secretaccesskey",
    "sessiontoken",
    "keymaterial",
    "encryptedkeymaterial",
    "importtoken",
    "privatekey",
    "privatekeyplaintext",
    "privatekeyciphertextblob",
    "message",
    "signature",
    "granttokens",
    "recipient",
    "attestationdocument",
    "sharedsecret",
    "ciphertextforrecipient",
    "sharedsecretciphertextblob",
];

fn scrub(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !NEVER_EXPORTED.contains(&k.to_ascii_lowercase().as_str()))
                .map(|(k, v)| (k.clone(), scrub(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(scrub).collect()),
        other => other.clone(),
    }
}

/// ISO-8601 UTC with seconds (`2026-12-05T11:49:17Z`), as CloudTrail's `eventTime`.
pub fn iso8601(time_ms: i64) -> String {
    let s = crate::sigv4::format_amz_date(time_ms.div_euclid(1000));
    // format_amz_date gives YYYYMMDDTHHMMSSZ.
    match (
        s.get(0..4),
        s.get(4..6),
        s.get(6..8),
        s.get(9..11),
        s.get(11..13),
        s.get(13..15),
    ) {
        (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) => {
            format!("{y}-{mo}-{d}T{h}:{mi}:{se}Z")
        }
        _ => s,
    }
}

/// A stable event id derived from the record's seq and hash (UUID version 8 layout).
pub fn event_id(seq: u64, hash: &[u8; 32]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(b"caas/audit/event-id\0");
    ctx.update(&seq.to_be_bytes());
    ctx.update(hash);
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid().to_string()
}

/// One audit record as a CloudTrail-style event (`eventVersion` 1.08 field names; the
/// request's TLS key-exchange group as `tlsDetails.keyExchange`), plus
/// `caas: {seq, hash}` so that a SIEM can tie it back to the verified chain.
pub fn cloudtrail_event(rec: &AuditRecord, region: &str) -> Value {
    let e = &rec.entry;
    let detail: Map<String, Value> = match serde_json::from_str(&e.detail) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let access_key = detail.get(ACCESS_KEY_FIELD).and_then(Value::as_str);
    let system = e.account == SYSTEM_ACCOUNT || e.principal.starts_with("caas:");
    let user_identity = if system {
        json!({ "type": "AWSService", "invokedBy": e.principal })
    } else if e.principal == "anonymous" || e.principal.is_empty() {
        json!({ "type": "Unknown", "accountId": e.account })
    } else {
        let kind = if e.principal.ends_with(":root") {
            "Root"
        } else if e.principal.contains(":assumed-role/") {
            "AssumedRole"
        } else {
            "IAMUser"
        };
        let mut u = json!({
            "type": kind,
            "principalId": access_key.unwrap_or(&e.principal),
            "arn": e.principal,
            "accountId": e.account,
        });
        if let (Some(ak), Some(m)) = (access_key, u.as_object_mut()) {
            m.insert("accessKeyId".into(), json!(ak));
        }
        u
    };
    let mut params: Map<String, Value> = detail
        .iter()
        .filter(|(k, _)| {
            k.as_str() != ACCESS_KEY_FIELD && k.as_str() != crate::service::TLS_KEY_EXCHANGE_FIELD
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(k) = &e.key_id {
        params.entry("KeyId").or_insert_with(|| json!(k));
    }
    let params = scrub(&Value::Object(params));
    let resources = match &e.key_id {
        Some(k) => {
            let arn = if k.starts_with("arn:") {
                k.clone()
            } else {
                format!("arn:aws:kms:{region}:{}:key/{k}", e.account)
            };
            json!([{ "ARN": arn, "accountId": e.account, "type": "AWS::KMS::Key" }])
        }
        None => json!([]),
    };
    let read_only = ["Describe", "List", "Get"]
        .iter()
        .any(|p| e.operation.starts_with(p));
    let mut ev = json!({
        "eventVersion": "1.08",
        "userIdentity": user_identity,
        "eventTime": iso8601(e.time_ms),
        "eventSource": "kms.amazonaws.com",
        "eventName": e.operation,
        "awsRegion": region,
        "requestParameters": if params.as_object().is_some_and(|m| m.is_empty()) { Value::Null } else { params },
        "responseElements": Value::Null,
        "requestID": e.request_id,
        "eventID": event_id(rec.seq, &rec.hash),
        "readOnly": read_only,
        "resources": resources,
        "eventType": if system { "AwsServiceEvent" } else { "AwsApiCall" },
        "managementEvent": true,
        "recipientAccountId": e.account,
        "eventCategory": "Management",
        "caas": { "seq": rec.seq, "hash": hex::encode(rec.hash) },
    });
    if e.result != "Success"
        && let Some(m) = ev.as_object_mut()
    {
        m.insert("errorCode".into(), json!(e.result));
    }
    // CloudTrail's tlsDetails, with the key-exchange group (caas's addition).
    if let (Some(kx), Some(m)) = (
        detail.get(crate::service::TLS_KEY_EXCHANGE_FIELD),
        ev.as_object_mut(),
    ) {
        m.insert("tlsDetails".into(), json!({ "keyExchange": kx }));
    }
    ev
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]
    use super::*;

    fn record(detail: Value, result: &str) -> AuditRecord {
        AuditRecord {
            seq: 42,
            entry: AuditEntry {
                time_ms: 1_764_935_357_123,
                account: "111122223333".into(),
                principal: "arn:aws:iam::111122223333:user/alice".into(),
                operation: "Encrypt".into(),
                key_id: Some("1234abcd-12ab-34cd-56ef-1234567890ab".into()),
                result: result.into(),
                request_id: "req-7".into(),
                detail: detail.to_string(),
            },
            prev_hash: [1; 32],
            hash: [2; 32],
            signature: vec![],
        }
    }

    #[test]
    fn export_event_has_the_cloudtrail_shape_and_no_secret() {
        let canary = "CANARY-PLAINTEXT-c0ffee";
        let rec = record(
            json!({
                "AccessKeyId": "AKIAEXAMPLE",
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "Plaintext": canary,
                "nested": { "SecretAccessKey": canary, "ok": 1 },
            }),
            "AccessDeniedException",
        );
        let ev = cloudtrail_event(&rec, "eu-west-1");
        assert_eq!(ev["eventVersion"], "1.08");
        assert_eq!(ev["eventTime"], "2025-12-05T11:49:17Z");
        assert_eq!(ev["eventSource"], "kms.amazonaws.com");
        assert_eq!(ev["eventName"], "Encrypt");
        assert_eq!(ev["awsRegion"], "eu-west-1");
        assert_eq!(ev["userIdentity"]["type"], "IAMUser");
        assert_eq!(
            ev["userIdentity"]["arn"],
            "arn:aws:iam::111122223333:user/alice"
        );
        assert_eq!(ev["userIdentity"]["accountId"], "111122223333");
        assert_eq!(ev["userIdentity"]["accessKeyId"], "AKIAEXAMPLE");
        assert_eq!(
            ev["requestParameters"]["EncryptionAlgorithm"],
            "SYMMETRIC_DEFAULT"
        );
        assert_eq!(ev["requestParameters"]["nested"]["ok"], 1);
        assert!(ev["requestParameters"].get("AccessKeyId").is_none());
        assert_eq!(
            ev["resources"][0]["ARN"],
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        );
        assert_eq!(ev["resources"][0]["type"], "AWS::KMS::Key");
        assert_eq!(ev["errorCode"], "AccessDeniedException");
        assert_eq!(ev["requestID"], "req-7");
        assert_eq!(ev["caas"]["seq"], 42);
        assert_eq!(ev["caas"]["hash"], hex::encode([2u8; 32]));
        // Stable and distinct event ids.
        assert_eq!(
            ev["eventID"],
            cloudtrail_event(&rec, "eu-west-1")["eventID"]
        );
        let mut other = rec.clone();
        other.seq = 43;
        assert_ne!(
            ev["eventID"],
            cloudtrail_event(&other, "eu-west-1")["eventID"]
        );
        assert!(uuid::Uuid::parse_str(ev["eventID"].as_str().unwrap()).is_ok());
        assert!(!ev.to_string().contains(canary), "{ev}");
        // Success: no errorCode.
        let ok = cloudtrail_event(&record(json!({}), "Success"), "us-east-1");
        assert!(ok.get("errorCode").is_none());
        assert_eq!(
            ok["requestParameters"]["KeyId"],
            "1234abcd-12ab-34cd-56ef-1234567890ab"
        );
    }

    #[test]
    fn export_names_the_tls_key_exchange_in_tls_details() {
        let rec = record(
            json!({ "TlsKeyExchange": "X25519MLKEM768", "MessageType": "RAW" }),
            "Success",
        );
        let ev = cloudtrail_event(&rec, "us-east-1");
        assert_eq!(ev["tlsDetails"]["keyExchange"], "X25519MLKEM768");
        assert!(ev["requestParameters"].get("TlsKeyExchange").is_none());
        assert_eq!(ev["requestParameters"]["MessageType"], "RAW");
        let plain = cloudtrail_event(&record(json!({}), "Success"), "us-east-1");
        assert!(plain.get("tlsDetails").is_none());
    }

    #[test]
    fn system_events_are_service_events() {
        let mut rec = record(json!({ "detail": "x" }), "Success");
        rec.entry.account = SYSTEM_ACCOUNT.into();
        rec.entry.principal = "caas:key-service".into();
        rec.entry.key_id = None;
        let ev = cloudtrail_event(&rec, "us-east-1");
        assert_eq!(ev["userIdentity"]["type"], "AWSService");
        assert_eq!(ev["eventType"], "AwsServiceEvent");
        assert_eq!(ev["resources"], json!([]));
    }
}
