//! GetKeyLastUsage: the last successful cryptographic use of a key (see [`crate::usage`]).
use super::{Req, authorize, resolve};
use crate::error::{KmsError, KmsResult};
use crate::service::{Ctx, Kms, Out};
use serde_json::json;

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// GetKeyLastUsage. The key is named by key id or key ARN only (an alias is an
/// `InvalidArnException`, as in AWS); policy action `kms:GetKeyLastUsage`.
pub async fn get_key_last_usage(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let key_ref = r.str("KeyId")?;
    if key_ref.starts_with("alias/") || key_ref.contains(":alias/") {
        return Err(KmsError::InvalidArn(
            "GetKeyLastUsage takes a key id or key ARN, not an alias".into(),
        ));
    }
    let l = resolve(kms, ctx, key_ref).await?;
    authorize(kms, ctx, &l, "GetKeyLastUsage", None, &[]).await?;
    let tracking = kms
        .last_usage
        .tracking_start(&kms.store)
        .await
        .map_err(KmsError::store)?
        .max(l.key.created_ms);
    let last = kms
        .last_usage
        .get(&kms.store, &l.key.account, &l.key.key_id)
        .await
        .map_err(KmsError::store)?
        .map(|u| {
            json!({
                "Operation": u.operation,
                "Timestamp": secs(u.time_ms),
                "CloudTrailEventId": u.request_id,
                "KmsRequestId": u.request_id,
            })
        })
        .unwrap_or_else(|| json!({}));
    Ok(Out::reply(json!({
        "KeyId": l.key.key_id,
        "KeyLastUsage": last,
        "TrackingStartDate": secs(tracking),
        "KeyCreationDate": secs(l.key.created_ms),
    })))
}
