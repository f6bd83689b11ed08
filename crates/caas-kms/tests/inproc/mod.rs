//! Calling the key service in process, shared by `lifecycle.rs`, `parity.rs` and
//! `domain_quorum.rs`: a tenant caller, one JSON operation through `Kms::handle` (the
//! service's own dispatch, authorization and commit), and the AWS error code of a refusal.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use base64::Engine as _;
use caas_kms::{Caller, Kms};
use serde_json::Value;

/// Standard base64.
pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A new account `name` and its user `name`.
pub async fn tenant(kms: &Kms, name: &str) -> Caller {
    let account = kms.create_account(name).await.unwrap();
    user(&account, name)
}

/// The IAM user `name` of `account`.
pub fn user(account: &str, name: &str) -> Caller {
    Caller {
        principal: format!("arn:aws:iam::{account}:user/{name}"),
        account: account.into(),
        access_key_id: "AKIATEST".into(),
        kind: caas_kms::operator::CallerKind::Tenant,
    }
}

/// `TrentService.{op}` with `body` as `who`: the reply, or the HTTP status and error body.
pub async fn call(kms: &Kms, who: &Caller, op: &str, body: Value) -> Result<Value, (u16, Value)> {
    let (status, text) = kms
        .handle(
            who.clone(),
            &format!("TrentService.{op}"),
            body.to_string().as_bytes(),
            uuid::Uuid::new_v4().to_string(),
        )
        .await;
    let v: Value = serde_json::from_str(&text).unwrap();
    if status == 200 {
        Ok(v)
    } else {
        Err((status, v))
    }
}

/// The AWS error code (`__type`) of a refusal.
pub fn code(e: (u16, Value)) -> String {
    e.1["__type"].as_str().unwrap().to_string()
}
