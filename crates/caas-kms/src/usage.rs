//! Each key's last successful cryptographic use, for `GetKeyLastUsage`.
//!
//! Recorded by [`crate::Kms::handle_on`] after the request's audit record is committed,
//! only for a `Success` of one of AWS's tracked operations ([`TRACKED`]); a dry run, a
//! refusal or a failure never counts. Kept in memory by this node: tracking starts when
//! the node starts (`TrackingStartDate` is that time, or the key's creation if later), as
//! AWS's own tracking began on a date; the audit log stays the authoritative history
//! (`CloudTrailEventId` and `KmsRequestId` are the request id of that record). ReEncrypt
//! counts for its source and its destination key.
use crate::service::Ctx;
use std::collections::HashMap;
use std::sync::Mutex;

/// AWS's `KeyLastUsageTrackingOperation` values this service implements; with GenerateRandom,
/// also the key uses whose audit record `audit_durability = "bounded"` may defer.
pub const TRACKED: &[&str] = &[
    "Decrypt",
    "DeriveSharedSecret",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateMac",
    "ReEncrypt",
    "Sign",
    "Verify",
    "VerifyMac",
    "Encapsulate",
    "Decapsulate",
];

/// One key's last use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastUse {
    /// The operation (one of [`TRACKED`]).
    pub operation: &'static str,
    /// When (the audit record's time).
    pub time_ms: i64,
    /// The request id (the audit record's).
    pub request_id: String,
}

/// Last uses by (account, key id).
#[derive(Debug)]
pub struct LastUsage {
    started_ms: i64,
    last: Mutex<HashMap<(String, String), LastUse>>,
}

impl LastUsage {
    /// Tracking from `started_ms`.
    pub fn new(started_ms: i64) -> Self {
        LastUsage {
            started_ms,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// When tracking began on this node.
    pub fn started_ms(&self) -> i64 {
        self.started_ms
    }

    /// Records a successful, committed request (ignored unless `op` is tracked).
    pub fn record(&self, ctx: &Ctx, op: &str, time_ms: i64) {
        let Some(operation) = TRACKED.iter().copied().find(|t| *t == op) else {
            return;
        };
        let mut keys: Vec<String> = ctx.key_id.iter().cloned().collect();
        if let Some(serde_json::Value::String(s)) = ctx.detail.get("SourceKeyId") {
            keys.push(s.clone());
        }
        let Ok(mut g) = self.last.lock() else {
            return;
        };
        for k in keys {
            g.insert(
                (ctx.caller.account.clone(), k),
                LastUse {
                    operation,
                    time_ms,
                    request_id: ctx.request_id.clone(),
                },
            );
        }
    }

    /// A key's last use, if any since tracking began.
    pub fn get(&self, account: &str, key_id: &str) -> Option<LastUse> {
        self.last
            .lock()
            .ok()?
            .get(&(account.to_string(), key_id.to_string()))
            .cloned()
    }
}
