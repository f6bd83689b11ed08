//! Key lifecycle: CreateKey, DescribeKey, ListKeys, Enable/DisableKey,
//! UpdateKeyDescription, Schedule/CancelKeyDeletion, tags, key policies, and rotation
//! (Enable/DisableKeyRotation, GetKeyRotationStatus, RotateKeyOnDemand, ListKeyRotations).
use super::{Loaded, Req, authorize, resolve};
use crate::error::{KmsError, KmsResult};
use crate::material::{self, KeySpec};
use crate::model::{
    HbkVersion, ImportState, KeyRecord, KeyState, KeyUsage, Origin, Rotation, kind,
};
use crate::policy;
use crate::service::{Ctx, Kms, Out};
use caas_store::Write;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const DAY_MS: i64 = 86_400_000;

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The `KeyMetadata` structure.
pub fn metadata(k: &KeyRecord) -> Value {
    let spec = k.key_spec;
    let mut m = json!({
        "AWSAccountId": k.account,
        "KeyId": k.key_id,
        "Arn": k.arn(),
        "CreationDate": secs(k.created_ms),
        "Enabled": k.state == KeyState::Enabled,
        "Description": k.description,
        "KeyUsage": k.key_usage,
        "KeyState": k.state,
        "Origin": k.origin,
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": k.key_spec,
        "KeySpec": k.key_spec,
        "MultiRegion": false,
    });
    match k.key_usage {
        KeyUsage::EncryptDecrypt => m["EncryptionAlgorithms"] = json!(spec.encryption_algorithms()),
        KeyUsage::SignVerify => m["SigningAlgorithms"] = json!(spec.signing_algorithms()),
        KeyUsage::GenerateVerifyMac => m["MacAlgorithms"] = json!(spec.mac_algorithms()),
        KeyUsage::KeyAgreement => {
            m["KeyAgreementAlgorithms"] = json!(spec.key_agreement_algorithms())
        }
        KeyUsage::EncapsulateDecapsulate => {
            m["EncapsulationAlgorithms"] = json!(spec.encapsulation_algorithms())
        }
    }
    if let Some(d) = k.deletion_date_ms {
        m["DeletionDate"] = json!(secs(d));
        m["PendingDeletionWindowInDays"] = json!(k.pending_window_days);
    }
    if k.origin == Origin::External {
        if let Some(em) = &k.import.expiration_model {
            m["ExpirationModel"] = json!(em);
        }
        if let Some(v) = k.import.valid_to_ms {
            m["ValidTo"] = json!(secs(v));
        }
    }
    if let Some(c) = k.current() {
        m["CurrentKeyMaterialId"] = json!(format!("{:064x}", c.version));
    }
    m
}

/// Parses `Tags: [{TagKey, TagValue}]`.
fn parse_tags(r: Req<'_>) -> KmsResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if let Some(v) = r.value("Tags") {
        let arr = v
            .as_array()
            .ok_or_else(|| KmsError::Serialization("'Tags' must be a list".into()))?;
        for t in arr {
            let k = t
                .get("TagKey")
                .and_then(Value::as_str)
                .ok_or_else(|| KmsError::Validation("TagKey is required".into()))?;
            let v = t
                .get("TagValue")
                .and_then(Value::as_str)
                .ok_or_else(|| KmsError::Validation("TagValue is required".into()))?;
            if k.is_empty() || k.len() > 128 || v.len() > 256 {
                return Err(KmsError::Validation(
                    "Tag keys must be 1–128 characters and values at most 256".into(),
                ));
            }
            out.insert(k.to_string(), v.to_string());
        }
    }
    Ok(out)
}

/// CreateKey.
pub async fn create_key(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let spec_name = r
        .opt_str("KeySpec")?
        .or(r.opt_str("CustomerMasterKeySpec")?)
        .unwrap_or("SYMMETRIC_DEFAULT");
    let spec = KeySpec::parse(spec_name)
        .ok_or_else(|| KmsError::Validation(format!("KeySpec {spec_name} is not supported")))?;
    let usage = match r.opt_str("KeyUsage")? {
        None => spec.default_usage(),
        Some(u) => KeyUsage::parse(u)
            .ok_or_else(|| KmsError::Validation(format!("KeyUsage {u} is not valid")))?,
    };
    if !spec.allowed_usages().contains(&usage) {
        return Err(KmsError::Validation(format!(
            "KeyUsage {usage} is not compatible with KeySpec {spec_name}"
        )));
    }
    let origin = match r.opt_str("Origin")? {
        None => Origin::AwsKms,
        Some(o) => Origin::parse(o).ok_or_else(|| {
            KmsError::UnsupportedOperation(format!("Origin {o} is not supported"))
        })?,
    };
    if origin == Origin::External
        && spec != KeySpec::SymmetricDefault
        && !spec.is_hmac()
        && !spec.is_rsa()
        && !spec.is_ecc()
    {
        return Err(KmsError::UnsupportedOperation(
            "This key spec cannot be imported".into(),
        ));
    }
    let description = r.opt_str("Description")?.unwrap_or("");
    if description.len() > 8192 {
        return Err(KmsError::Validation(
            "Description must be at most 8192 characters".into(),
        ));
    }
    if r.opt_bool("MultiRegion")?.unwrap_or(false) {
        return Err(KmsError::UnsupportedOperation(
            "Multi-Region keys are not supported".into(),
        ));
    }
    let policy_doc = match r.opt_str("Policy")? {
        Some(p) => {
            policy::validate(p)?;
            p.to_string()
        }
        None => policy::default_policy(&ctx.caller.account),
    };
    let key_id = uuid::Uuid::new_v4().to_string();
    let now = kms.now_ms();
    let mut versions = vec![];
    if origin == Origin::AwsKms {
        let m = material::generate(spec)?;
        let public_key = if spec.is_asymmetric() {
            Some(material::public_key_der(spec, &m)?)
        } else {
            None
        };
        versions.push(HbkVersion {
            version: 1,
            created_ms: now,
            ekt: kms.keyring.seal_ekt(&ctx.caller.account, &key_id, 1, &m)?,
            public_key,
        });
    }
    let rec = KeyRecord {
        key_id: key_id.clone(),
        account: ctx.caller.account.clone(),
        region: kms.region.clone(),
        description: description.to_string(),
        created_ms: now,
        state: if origin == Origin::External {
            KeyState::PendingImport
        } else {
            KeyState::Enabled
        },
        key_spec: spec,
        key_usage: usage,
        origin,
        deletion_date_ms: None,
        pending_window_days: None,
        rotation_enabled: false,
        rotation_period_days: 365,
        next_rotation_ms: None,
        rotations: vec![],
        versions,
        tags: parse_tags(r)?,
        policy: policy_doc,
        import: ImportState::default(),
    };
    ctx.key_id = Some(key_id.clone());
    ctx.detail.insert("KeySpec".into(), json!(spec.name()));
    let body = serde_json::to_vec(&rec).map_err(|_| KmsError::Internal("encode".into()))?;
    Ok(Out {
        body: json!({ "KeyMetadata": metadata(&rec) }),
        writes: vec![Write::Put {
            kind: kind::KEY.into(),
            account: rec.account.clone(),
            id: key_id,
            body,
            expect_rev: Some(0),
        }],
    })
}

/// DescribeKey.
pub async fn describe_key(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, "DescribeKey", None, &super::grant_tokens(r)?).await?;
    Ok(Out::reply(json!({ "KeyMetadata": metadata(&l.key) })))
}

fn page(r: Req<'_>, items: Vec<Value>, field: &str) -> KmsResult<Value> {
    let limit = r.opt_int("Limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(KmsError::Validation(
            "Limit must be between 1 and 1000".into(),
        ));
    }
    let start: usize = match r.opt_str("Marker")? {
        Some(m) => m
            .parse()
            .map_err(|_| KmsError::Validation("Invalid Marker".into()))?,
        None => 0,
    };
    // `Marker` is the caller's: saturate rather than overflow (a panic in debug builds).
    let end = start
        .saturating_add(usize::try_from(limit).unwrap_or(0))
        .min(items.len());
    let slice = items
        .get(start.min(items.len())..end)
        .unwrap_or(&[])
        .to_vec();
    let mut out = json!({ field: slice, "Truncated": end < items.len() });
    if end < items.len() {
        out["NextMarker"] = json!(end.to_string());
    }
    Ok(out)
}

/// ListKeys.
pub async fn list_keys(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let objs = kms
        .store
        .list(kind::KEY, Some(&ctx.caller.account))
        .await
        .map_err(KmsError::store)?;
    // A row that fails its integrity check refuses the whole list (the store audits it).
    let items = objs
        .iter()
        .map(|o| super::parse_key(o).map(|k| json!({ "KeyId": k.key_id, "KeyArn": k.arn() })))
        .collect::<KmsResult<Vec<_>>>()?;
    Ok(Out::reply(page(r, items, "Keys")?))
}

async fn load_for(kms: &Kms, ctx: &mut Ctx, r: Req<'_>, action: &str) -> KmsResult<Loaded> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l, action, None, &[]).await?;
    Ok(l)
}

/// EnableKey / DisableKey.
pub async fn set_enabled(kms: &Kms, ctx: &mut Ctx, r: Req<'_>, enable: bool) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, if enable { "EnableKey" } else { "DisableKey" }).await?;
    let mut k = l.key.clone();
    match k.state {
        KeyState::Enabled | KeyState::Disabled => {
            k.state = if enable {
                KeyState::Enabled
            } else {
                KeyState::Disabled
            }
        }
        s => return Err(KmsError::InvalidState(format!("{} is {s}", k.arn()))),
    }
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}

/// UpdateKeyDescription.
pub async fn update_description(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "UpdateKeyDescription").await?;
    let d = r
        .opt_str("Description")?
        .ok_or_else(|| KmsError::Validation("Description is required".into()))?;
    if d.len() > 8192 {
        return Err(KmsError::Validation(
            "Description must be at most 8192 characters".into(),
        ));
    }
    let mut k = l.key.clone();
    k.description = d.into();
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}

/// ScheduleKeyDeletion (7–30 days, default 30).
pub async fn schedule_deletion(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "ScheduleKeyDeletion").await?;
    let days = r.opt_int("PendingWindowInDays")?.unwrap_or(30);
    if !(7..=30).contains(&days) {
        return Err(KmsError::Validation(
            "PendingWindowInDays must be between 7 and 30".into(),
        ));
    }
    let mut k = l.key.clone();
    if k.state == KeyState::PendingDeletion {
        return Err(KmsError::InvalidState(format!(
            "{} is pending deletion.",
            k.arn()
        )));
    }
    let when = kms.now_ms() + days * DAY_MS;
    k.state = KeyState::PendingDeletion;
    k.deletion_date_ms = Some(when);
    k.pending_window_days = Some(days as u32);
    Ok(Out {
        body: json!({ "KeyId": k.arn(), "DeletionDate": secs(when), "KeyState": "PendingDeletion", "PendingWindowInDays": days }),
        writes: vec![l.put(&k)?],
    })
}

/// CancelKeyDeletion: the key returns Disabled, as in AWS.
pub async fn cancel_deletion(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "CancelKeyDeletion").await?;
    let mut k = l.key.clone();
    if k.state != KeyState::PendingDeletion {
        return Err(KmsError::InvalidState(format!(
            "{} is not pending deletion.",
            k.arn()
        )));
    }
    k.state = KeyState::Disabled;
    k.deletion_date_ms = None;
    k.pending_window_days = None;
    Ok(Out {
        body: json!({ "KeyId": k.arn() }),
        writes: vec![l.put(&k)?],
    })
}

/// TagResource.
pub async fn tag_resource(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "TagResource").await?;
    let mut k = l.key.clone();
    k.tags.extend(parse_tags(r)?);
    if k.tags.len() > 50 {
        return Err(KmsError::LimitExceeded(
            "A key can have at most 50 tags".into(),
        ));
    }
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}

/// UntagResource.
pub async fn untag_resource(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "UntagResource").await?;
    let mut k = l.key.clone();
    for t in r.opt_str_list("TagKeys")?.unwrap_or_default() {
        k.tags.remove(&t);
    }
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}

/// ListResourceTags.
pub async fn list_tags(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "ListResourceTags").await?;
    let items = l
        .key
        .tags
        .iter()
        .map(|(k, v)| json!({ "TagKey": k, "TagValue": v }))
        .collect();
    Ok(Out::reply(page(r, items, "Tags")?))
}

fn check_policy_name(r: Req<'_>) -> KmsResult<()> {
    match r.opt_str("PolicyName")? {
        None | Some("default") => Ok(()),
        Some(_) => Err(KmsError::NotFound(
            "Only the policy named 'default' exists".into(),
        )),
    }
}

/// GetKeyPolicy.
pub async fn get_policy(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    check_policy_name(r)?;
    let l = load_for(kms, ctx, r, "GetKeyPolicy").await?;
    Ok(Out::reply(
        json!({ "Policy": l.key.policy, "PolicyName": "default" }),
    ))
}

/// PutKeyPolicy.
pub async fn put_policy(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    check_policy_name(r)?;
    let l = load_for(kms, ctx, r, "PutKeyPolicy").await?;
    let p = r.str("Policy")?;
    policy::validate(p)?;
    let mut k = l.key.clone();
    k.policy = p.into();
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}

/// ListKeyPolicies.
pub async fn list_policies(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let _ = load_for(kms, ctx, r, "ListKeyPolicies").await?;
    Ok(Out::reply(
        json!({ "PolicyNames": ["default"], "Truncated": false }),
    ))
}

fn rotatable(k: &KeyRecord) -> KmsResult<()> {
    if k.key_spec != KeySpec::SymmetricDefault || k.origin != Origin::AwsKms {
        return Err(KmsError::UnsupportedOperation(format!(
            "{} does not support automatic key rotation.",
            k.arn()
        )));
    }
    super::require_enabled(k)
}

/// EnableKeyRotation / DisableKeyRotation.
pub async fn set_rotation(kms: &Kms, ctx: &mut Ctx, r: Req<'_>, enable: bool) -> KmsResult<Out> {
    let l = load_for(
        kms,
        ctx,
        r,
        if enable {
            "EnableKeyRotation"
        } else {
            "DisableKeyRotation"
        },
    )
    .await?;
    let mut k = l.key.clone();
    rotatable(&k)?;
    k.rotation_enabled = enable;
    if enable {
        let days = r.opt_int("RotationPeriodInDays")?.unwrap_or(365);
        if !(90..=2560).contains(&days) {
            return Err(KmsError::Validation(
                "RotationPeriodInDays must be between 90 and 2560".into(),
            ));
        }
        k.rotation_period_days = days as u32;
        k.next_rotation_ms = Some(kms.now_ms() + days * DAY_MS);
    } else {
        k.next_rotation_ms = None;
    }
    Ok(Out {
        body: json!({}),
        writes: vec![l.put(&k)?],
    })
}

/// GetKeyRotationStatus.
pub async fn rotation_status(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "GetKeyRotationStatus").await?;
    let k = &l.key;
    let mut out = json!({ "KeyRotationEnabled": k.rotation_enabled, "KeyId": k.arn() });
    if k.rotation_enabled {
        out["RotationPeriodInDays"] = json!(k.rotation_period_days);
        if let Some(n) = k.next_rotation_ms {
            out["NextRotationDate"] = json!(secs(n));
        }
    }
    if let Some(last) = k
        .rotations
        .iter()
        .rev()
        .find(|r| r.rotation_type == "ON_DEMAND")
    {
        out["OnDemandRotationStartDate"] = json!(secs(last.date_ms));
    }
    Ok(Out::reply(out))
}

/// Adds a new HBK version to a key (rotation).
pub fn add_version(kms: &Kms, k: &mut KeyRecord, rotation_type: &str) -> KmsResult<u32> {
    let spec = k.key_spec;
    let next = k.versions.last().map(|v| v.version + 1).unwrap_or(1);
    let m = material::generate(spec)?;
    let now = kms.now_ms();
    k.versions.push(HbkVersion {
        version: next,
        created_ms: now,
        ekt: kms.keyring.seal_ekt(&k.account, &k.key_id, next, &m)?,
        public_key: None,
    });
    k.rotations.push(Rotation {
        version: next,
        date_ms: now,
        rotation_type: rotation_type.into(),
    });
    Ok(next)
}

/// RotateKeyOnDemand.
pub async fn rotate_on_demand(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "RotateKeyOnDemand").await?;
    let mut k = l.key.clone();
    rotatable(&k)?;
    if k.rotations
        .iter()
        .filter(|r| r.rotation_type == "ON_DEMAND")
        .count()
        >= 25
    {
        return Err(KmsError::LimitExceeded(
            "At most 25 on-demand rotations per key".into(),
        ));
    }
    let v = add_version(kms, &mut k, "ON_DEMAND")?;
    ctx.detail.insert("NewVersion".into(), json!(v));
    Ok(Out {
        body: json!({ "KeyId": k.arn() }),
        writes: vec![l.put(&k)?],
    })
}

/// ListKeyRotations.
pub async fn list_rotations(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = load_for(kms, ctx, r, "ListKeyRotations").await?;
    let items = l
        .key
        .rotations
        .iter()
        .map(|rot| json!({ "KeyId": l.key.arn(), "RotationDate": secs(rot.date_ms), "RotationType": rot.rotation_type, "KeyMaterialId": format!("{:064x}", rot.version) }))
        .collect();
    Ok(Out::reply(page(r, items, "Rotations")?))
}

/// Background maintenance: deletes keys whose waiting period ended and rotates keys whose
/// automatic rotation is due. Safe to run on every node (optimistic concurrency).
pub async fn maintenance(kms: &Kms) -> KmsResult<(usize, usize)> {
    let now = kms.now_ms();
    if kms.keyring.domain_member().is_some() {
        // A KMS domain: verify the chain, make a domain key if a removal or a forced
        // rotation demands one, send keys to joiners; re-wrap when the sealing key moved.
        let before = kms.keyring.current_version();
        kms.keyring.reload().await?;
        if let Some(v) = kms.keyring.current_version()
            && Some(v) != before
        {
            let n = rewrap_all(kms, v).await?;
            tracing::info!(version = v, rewrapped = n, "KMS domain: new domain key");
        }
        if let Some(floor) = kms.keyring.reseal_domain_records().await? {
            tracing::info!(floor, "KMS domain: every row re-MAC'd, record floor raised");
        }
    }
    if let (Some(period), Some(created)) =
        (kms.domain_key_rotation, kms.keyring.current_created_ms())
    {
        kms.keyring.reload().await?;
        if kms
            .keyring
            .current_created_ms()
            .is_some_and(|c| c.max(created) + period.as_millis() as i64 <= now)
        {
            let (v, n) = rotate_domain_key(kms).await?;
            tracing::info!(version = v, rewrapped = n, "scheduled domain key rotation");
        }
    }
    let (mut deleted, mut rotated) = (0, 0);
    // Rows failing their integrity check are skipped (the store audited them); the healthy
    // keys of every account are still maintained.
    let (keys, _bad) = kms
        .store
        .list_healthy(kind::KEY, None)
        .await
        .map_err(KmsError::store)?;
    for o in keys {
        let Ok(mut k) = super::parse_key(&o) else {
            continue;
        };
        let l = Loaded {
            key: k.clone(),
            rev: o.rev,
            alias: None,
            cached: None,
        };
        let mut entry = crate::audit::system_entry("", "");
        entry.account = k.account.clone();
        entry.key_id = Some(k.key_id.clone());
        let deleting =
            k.state == KeyState::PendingDeletion && k.deletion_date_ms.is_some_and(|d| d <= now);
        let writes = if deleting {
            entry.operation = "DeleteKey".into();
            entry.detail = json!({ "reason": "scheduled deletion due" }).to_string();
            deleted += 1;
            let mut w = vec![Write::Delete {
                kind: kind::KEY.into(),
                account: k.account.clone(),
                id: k.key_id.clone(),
                expect_rev: Some(o.rev),
            }];
            // Aliases pointing at the key go with it, so do its grants (as in AWS KMS) and
            // its last use (GetKeyLastUsage): nothing of a deleted key outlives it.
            w.extend(
                deletes_referring(kms, kind::ALIAS, &k.account, |a| {
                    super::parse_alias(a).is_ok_and(|a| a.target_key_id == k.key_id)
                })
                .await?,
            );
            w.extend(
                deletes_referring(kms, kind::GRANT, &k.account, |g| {
                    super::parse_grant(g).is_ok_and(|g| g.key_id == k.key_id)
                })
                .await?,
            );
            if let Some(u) = kms
                .store
                .get(crate::usage::USAGE_KIND, &k.account, &k.key_id)
                .await
                .map_err(KmsError::store)?
            {
                w.push(Write::Delete {
                    kind: crate::usage::USAGE_KIND.into(),
                    account: k.account.clone(),
                    id: k.key_id.clone(),
                    expect_rev: Some(u.rev),
                });
            }
            w
        } else if k.state == KeyState::Enabled
            && k.rotation_enabled
            && k.next_rotation_ms.is_some_and(|t| t <= now)
        {
            let v = add_version(kms, &mut k, "AUTOMATIC")?;
            k.next_rotation_ms = Some(now + i64::from(k.rotation_period_days) * DAY_MS);
            entry.operation = "RotateKey".into();
            entry.detail =
                json!({ "reason": "automatic rotation due", "NewVersion": v }).to_string();
            rotated += 1;
            vec![l.put(&k)?]
        } else {
            continue;
        };
        match kms
            .store
            .commit(caas_store::Batch {
                writes,
                audit: vec![entry],
            })
            .await
        {
            Ok(_) if deleting => kms.last_usage.forget(&k.account, &k.key_id),
            Ok(_) | Err(caas_store::Error::Conflict { .. }) => {}
            Err(e) => return Err(KmsError::store(e)),
        }
    }
    Ok((deleted, rotated))
}

/// Deletes (at their current revisions) of the healthy `kind` rows of `account` that
/// `refers` picks: the rows that go with a deleted key.
async fn deletes_referring(
    kms: &Kms,
    kind: &str,
    account: &str,
    refers: impl Fn(&caas_store::Object) -> bool,
) -> KmsResult<Vec<Write>> {
    let (rows, _bad) = kms
        .store
        .list_healthy(kind, Some(account))
        .await
        .map_err(KmsError::store)?;
    Ok(rows
        .iter()
        .filter(|o| refers(o))
        .map(|o| Write::Delete {
            kind: kind.into(),
            account: account.into(),
            id: o.id.clone(),
            expect_rev: Some(o.rev),
        })
        .collect())
}

/// Rotates the domain key (seed 004) and re-wraps every key's EKTs and every access-key
/// secret under the new version. Returns (new version, records re-wrapped). Interrupted
/// runs are safe: old domain key versions stay loaded, and a re-run finishes the work.
pub async fn rotate_domain_key(kms: &Kms) -> KmsResult<(u32, usize)> {
    let v = kms.keyring.rotate_domain_key().await?;
    Ok((v, rewrap_all(kms, v).await?))
}

/// Re-wraps every key's EKTs and every access-key secret under the current domain key
/// (`v`, for the audit records). Returns the number of records re-wrapped.
pub async fn rewrap_all(kms: &Kms, v: u32) -> KmsResult<usize> {
    let mut n = 0;
    // Every re-wrapped row is written anew, so the store re-authenticates it (fresh MAC at
    // the new revision). Rows failing their integrity check are skipped (and audited by the
    // store): they are not trusted, so nothing is re-sealed from them.
    let (keys, _bad) = kms
        .store
        .list_healthy(kind::KEY, None)
        .await
        .map_err(KmsError::store)?;
    for o in keys {
        let Ok(mut k) = super::parse_key(&o) else {
            continue;
        };
        let mut changed = false;
        for h in &mut k.versions {
            if let Some(new) = kms
                .keyring
                .rewrap_ekt(&k.account, &k.key_id, h.version, &h.ekt)
                .await?
            {
                h.ekt = new;
                changed = true;
            }
        }
        if changed {
            let l = Loaded {
                key: k.clone(),
                rev: o.rev,
                alias: None,
                cached: None,
            };
            let mut entry = crate::audit::system_entry("RewrapKey", &format!("domain key v{v}"));
            entry.account = k.account.clone();
            entry.key_id = Some(k.key_id.clone());
            kms.store
                .commit(caas_store::Batch {
                    writes: vec![l.put(&k)?],
                    audit: vec![entry],
                })
                .await
                .map_err(KmsError::store)?;
            n += 1;
        }
    }
    let (access_keys, _bad) = kms
        .store
        .list_healthy(kind::ACCESS_KEY, Some(crate::keyring::SYSTEM_ACCOUNT))
        .await
        .map_err(KmsError::store)?;
    for o in access_keys {
        let Ok(mut a) = crate::service::access_key_record(&o) else {
            continue;
        };
        if let Some(new) = kms
            .keyring
            .rewrap_internal(
                crate::service::ACCESS_KEY_PURPOSE,
                &[&a.access_key_id, &a.account, &a.principal],
                &a.sealed_secret,
            )
            .await?
        {
            a.sealed_secret = new;
            let body = serde_json::to_vec(&a).map_err(|_| KmsError::Internal("encode".into()))?;
            let w = Write::Put {
                kind: kind::ACCESS_KEY.into(),
                account: o.account.clone(),
                id: o.id.clone(),
                body,
                expect_rev: Some(o.rev),
            };
            kms.store
                .commit(caas_store::Batch {
                    writes: vec![w],
                    audit: vec![crate::audit::system_entry(
                        "RewrapAccessKey",
                        &a.access_key_id,
                    )],
                })
                .await
                .map_err(KmsError::store)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_marker_does_not_overflow_in_page() {
        let items: Vec<Value> = (0..3).map(|i| json!(i)).collect();
        for marker in [usize::MAX.to_string(), (usize::MAX - 5).to_string()] {
            let req = json!({ "Marker": marker, "Limit": 1000 });
            let out = page(Req(&req), items.clone(), "Keys");
            assert!(out.is_ok());
            let out = out.unwrap_or_default();
            assert_eq!(out["Keys"], json!([]));
            assert_eq!(out["Truncated"], json!(false));
        }
        let req = json!({ "Marker": "1", "Limit": 1 });
        let out = page(Req(&req), items, "Keys").unwrap_or_default();
        assert_eq!(out["Keys"], json!([1]));
        assert_eq!(out["NextMarker"], json!("2"));
    }
}
