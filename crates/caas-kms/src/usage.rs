//! Each key's last successful cryptographic use, for `GetKeyLastUsage`.
//!
//! Recorded by [`crate::Kms::handle_on`] after the request's audit record is committed,
//! only for a `Success` of one of AWS's tracked operations ([`TRACKED`]); a dry run, a
//! refusal or a failure never counts. ReEncrypt counts for its source and its destination
//! key. The audit log stays the authoritative history (`CloudTrailEventId` and
//! `KmsRequestId` are the request id of that record).
//!
//! Recording costs the request only a map insert in this node's memory. The store is the
//! shared, durable copy: every [`PERSIST_INTERVAL`] (and at clean shutdown,
//! `Kms::flush_audit`) the node writes each key used since its last write, as an object of
//! kind [`USAGE_KIND`] (MAC-protected like every record), only if it is newer than what the
//! store holds (another node's write is never rolled back). So a key gets at most one write
//! per interval per node, however often it is used, and [`LastUsage::get`] answers the newer
//! of this node's memory and the store: every node of one database gives the same answer
//! within one interval, and a restart loses at most the last interval of a node that was
//! killed (a clean stop loses nothing). `TrackingStartDate` is when the deployment began
//! tracking (the earliest start of a node, kept in the store), or the key's creation if
//! later, as AWS's own tracking began on a date.
use crate::service::Ctx;
use caas_store::{Batch, Store, Write};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// Object kind of the persisted last uses (account: the key's, id: the key id).
pub const USAGE_KIND: &str = "key_last_usage";
/// Object kind and id of the deployment's tracking start.
const TRACKING_KIND: &str = "key_last_usage_tracking";
const TRACKING_ID: &str = "start";
const TRACKING_ACCOUNT: &str = "-";
/// How often a node writes the last uses it recorded (the coalescing window: at most one
/// write per key per interval per node).
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(5);

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastUse {
    /// The operation (one of [`TRACKED`]).
    pub operation: String,
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
    /// Keys recorded since the last write to the store.
    dirty: Mutex<HashSet<(String, String)>>,
    /// Whether the tracking start is known to be in the store.
    tracking_stored: std::sync::atomic::AtomicBool,
}

impl LastUsage {
    /// Tracking from `started_ms`.
    pub fn new(started_ms: i64) -> Self {
        LastUsage {
            started_ms,
            last: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            tracking_stored: std::sync::atomic::AtomicBool::new(false),
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
        let source = match ctx.detail.get("SourceKeyId") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            _ => None,
        };
        let Ok(mut g) = self.last.lock() else {
            return;
        };
        let Ok(mut d) = self.dirty.lock() else {
            return;
        };
        // On the hot path (the same key used again) the entry is updated in place,
        // reusing its buffers.
        for k in ctx.key_id.as_deref().into_iter().chain(source) {
            let id = (ctx.caller.account.clone(), k.to_owned());
            match g.get_mut(&id) {
                Some(u) => {
                    if u.operation != operation {
                        u.operation = operation.to_string();
                    }
                    u.time_ms = time_ms;
                    u.request_id.clone_from(&ctx.request_id);
                }
                None => {
                    g.insert(
                        id.clone(),
                        LastUse {
                            operation: operation.to_string(),
                            time_ms,
                            request_id: ctx.request_id.clone(),
                        },
                    );
                }
            }
            if !d.contains(&id) {
                d.insert(id);
            }
        }
    }

    /// Drops this node's memory of a key being deleted (its stored last use goes in the
    /// deletion's own commit; the key is `PendingDeletion`, so no use can follow).
    pub fn forget(&self, account: &str, key_id: &str) {
        let id = (account.to_string(), key_id.to_string());
        if let Ok(mut g) = self.last.lock() {
            g.remove(&id);
        }
        if let Ok(mut d) = self.dirty.lock() {
            d.remove(&id);
        }
    }

    /// This node's memory of a key's last use.
    fn memory(&self, account: &str, key_id: &str) -> Option<LastUse> {
        self.last
            .lock()
            .ok()?
            .get(&(account.to_string(), key_id.to_string()))
            .cloned()
    }

    /// A key's last use since tracking began: the newer of this node's memory and the store.
    pub async fn get(
        &self,
        store: &Store,
        account: &str,
        key_id: &str,
    ) -> Result<Option<LastUse>, caas_store::Error> {
        let stored = store
            .get(USAGE_KIND, account, key_id)
            .await?
            .and_then(|o| serde_json::from_slice::<LastUse>(&o.body).ok());
        let mine = self.memory(account, key_id);
        Ok(match (mine, stored) {
            (Some(m), Some(s)) => Some(if s.time_ms > m.time_ms { s } else { m }),
            (m, s) => m.or(s),
        })
    }

    /// When the deployment began tracking: the earliest start of any node, kept in the store
    /// (written by the first node, lowered by an earlier-started one).
    pub async fn tracking_start(&self, store: &Store) -> Result<i64, caas_store::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        for _ in 0..3 {
            let cur = store
                .get(TRACKING_KIND, TRACKING_ACCOUNT, TRACKING_ID)
                .await?;
            let value = cur.as_ref().and_then(|o| {
                std::str::from_utf8(&o.body)
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok())
            });
            if let Some(v) = value
                && v <= self.started_ms
            {
                self.tracking_stored.store(true, Relaxed);
                return Ok(v);
            }
            let put = store
                .commit(Batch {
                    writes: vec![Write::Put {
                        kind: TRACKING_KIND.into(),
                        account: TRACKING_ACCOUNT.into(),
                        id: TRACKING_ID.into(),
                        body: self.started_ms.to_string().into_bytes(),
                        expect_rev: Some(cur.map_or(0, |o| o.rev)),
                    }],
                    audit: vec![],
                })
                .await;
            match put {
                Ok(_) => {
                    self.tracking_stored.store(true, Relaxed);
                    return Ok(self.started_ms);
                }
                Err(caas_store::Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(self.started_ms)
    }

    /// Writes the last uses recorded since the previous call to the store (each only if
    /// newer than the stored one). A key whose write fails stays pending for the next call.
    pub async fn persist(&self, store: &Store) -> Result<usize, caas_store::Error> {
        if !self
            .tracking_stored
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.tracking_start(store).await?;
        }
        let pending: Vec<(String, String)> = match self.dirty.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => return Ok(0),
        };
        let mut written = 0;
        let mut failed = Vec::new();
        let mut error = None;
        for (account, key_id) in pending {
            let Some(mine) = self.memory(&account, &key_id) else {
                continue;
            };
            match persist_one(store, &account, &key_id, &mine).await {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(e) => {
                    failed.push((account, key_id));
                    error = Some(e);
                }
            }
        }
        if let Ok(mut d) = self.dirty.lock() {
            d.extend(failed);
        }
        match error {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }
}

/// Writes `mine` unless the store holds a use at least as recent; retries once on a
/// concurrent write by another node.
async fn persist_one(
    store: &Store,
    account: &str,
    key_id: &str,
    mine: &LastUse,
) -> Result<bool, caas_store::Error> {
    let body = serde_json::to_vec(mine).map_err(|e| caas_store::Error::Corrupt(e.to_string()))?;
    for _ in 0..2 {
        let cur = store.get(USAGE_KIND, account, key_id).await?;
        if let Some(o) = &cur
            && serde_json::from_slice::<LastUse>(&o.body).is_ok_and(|s| s.time_ms >= mine.time_ms)
        {
            return Ok(false);
        }
        let put = store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: USAGE_KIND.into(),
                    account: account.into(),
                    id: key_id.into(),
                    body: body.clone(),
                    expect_rev: Some(cur.map_or(0, |o| o.rev)),
                }],
                audit: vec![],
            })
            .await;
        match put {
            Ok(_) => return Ok(true),
            Err(caas_store::Error::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}
