//! Aliases: CreateAlias, UpdateAlias, DeleteAlias, ListAliases. An alias belongs to the
//! caller's account and names one of that account's keys.
use super::{Req, authorize, resolve};
use crate::error::{KmsError, KmsResult};
use crate::model::{AliasRecord, KeyRecord, kind};
use crate::service::{Ctx, Kms, Out};
use caas_store::Write;
use serde_json::json;

fn check_name(name: &str) -> KmsResult<()> {
    let ok = name.starts_with("alias/")
        && name.len() > 6
        && name.len() <= 256
        && !name.starts_with("alias/aws/")
        && name[6..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(KmsError::InvalidAliasName(format!(
            "Alias name {} is not valid",
            name.chars().take(256).collect::<String>()
        )))
    }
}

fn put(ctx: &Ctx, a: &AliasRecord, expect_rev: Option<i64>) -> KmsResult<Write> {
    Ok(Write::Put {
        kind: kind::ALIAS.into(),
        account: ctx.caller.account.clone(),
        id: a.name.clone(),
        body: serde_json::to_vec(a).map_err(|_| KmsError::Internal("encode".into()))?,
        expect_rev,
    })
}

/// CreateAlias.
pub async fn create(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let name = r.str("AliasName")?;
    check_name(name)?;
    let target = resolve(kms, ctx, r.str("TargetKeyId")?).await?;
    authorize(kms, ctx, &target.key, "CreateAlias", None, &[]).await?;
    if kms
        .store
        .get(kind::ALIAS, &ctx.caller.account, name)
        .await
        .map_err(KmsError::store)?
        .is_some()
    {
        return Err(KmsError::AlreadyExists(format!(
            "An alias with the name {name} already exists"
        )));
    }
    let now = kms.now_ms();
    let a = AliasRecord {
        name: name.into(),
        target_key_id: target.key.key_id.clone(),
        created_ms: now,
        updated_ms: now,
    };
    Ok(Out {
        body: json!({}),
        writes: vec![put(ctx, &a, Some(0))?],
    })
}

/// UpdateAlias: the new target must have the same key spec and usage.
pub async fn update(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let name = r.str("AliasName")?;
    check_name(name)?;
    let o = kms
        .store
        .get(kind::ALIAS, &ctx.caller.account, name)
        .await
        .map_err(KmsError::store)?
        .ok_or_else(|| KmsError::NotFound(format!("Alias {name} is not found.")))?;
    let mut a = super::parse_alias(&o)?;
    let old = kms
        .store
        .get(kind::KEY, &ctx.caller.account, &a.target_key_id)
        .await
        .map_err(KmsError::store)?;
    let target = resolve(kms, ctx, r.str("TargetKeyId")?).await?;
    authorize(kms, ctx, &target.key, "UpdateAlias", None, &[]).await?;
    let old: Option<KeyRecord> = old.as_ref().map(super::parse_key).transpose()?;
    if let Some(old) = old
        && (old.key_spec != target.key.key_spec || old.key_usage != target.key.key_usage)
    {
        return Err(KmsError::Validation(
            "The new target key must have the same key spec and key usage".into(),
        ));
    }
    a.target_key_id = target.key.key_id.clone();
    a.updated_ms = kms.now_ms();
    Ok(Out {
        body: json!({}),
        writes: vec![put(ctx, &a, Some(o.rev))?],
    })
}

/// DeleteAlias.
pub async fn delete(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let name = r.str("AliasName")?;
    check_name(name)?;
    let o = kms
        .store
        .get(kind::ALIAS, &ctx.caller.account, name)
        .await
        .map_err(KmsError::store)?
        .ok_or_else(|| KmsError::NotFound(format!("Alias {name} is not found.")))?;
    let a = super::parse_alias(&o)?;
    // An alias whose key is gone may be deleted; any other failure to read the target (an
    // integrity failure above all) must not skip the authorization.
    match resolve(kms, ctx, &a.target_key_id).await {
        Ok(target) => authorize(kms, ctx, &target.key, "DeleteAlias", None, &[]).await?,
        Err(KmsError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(Out {
        body: json!({}),
        writes: vec![Write::Delete {
            kind: kind::ALIAS.into(),
            account: ctx.caller.account.clone(),
            id: name.into(),
            expect_rev: Some(o.rev),
        }],
    })
}

/// ListAliases (optionally for one key).
pub async fn list(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let key_filter = match r.opt_str("KeyId")? {
        Some(k) => Some(resolve(kms, ctx, k).await?.key.key_id),
        None => None,
    };
    let objs = kms
        .store
        .list(kind::ALIAS, Some(&ctx.caller.account))
        .await
        .map_err(KmsError::store)?;
    let region = &kms.region;
    let account = &ctx.caller.account;
    let aliases = objs
        .iter()
        .map(super::parse_alias)
        .collect::<KmsResult<Vec<AliasRecord>>>()?;
    let items: Vec<_> = aliases
        .iter()
        .filter(|a| key_filter.as_ref().is_none_or(|k| *k == a.target_key_id))
        .map(|a| {
            json!({
                "AliasName": a.name,
                "AliasArn": format!("arn:aws:kms:{region}:{account}:{}", a.name),
                "TargetKeyId": a.target_key_id,
                "CreationDate": a.created_ms as f64 / 1000.0,
                "LastUpdatedDate": a.updated_ms as f64 / 1000.0,
            })
        })
        .collect();
    Ok(Out::reply(json!({ "Aliases": items, "Truncated": false })))
}
