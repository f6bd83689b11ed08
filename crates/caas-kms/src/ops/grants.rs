//! Grants: CreateGrant, ListGrants, RevokeGrant, RetireGrant, ListRetirableGrants, and the
//! check that lets a grant authorize an operation the key policy does not. A grant token is
//! returned once; only its SHA-256 is stored. Presenting the token (GrantTokens) makes a
//! fresh grant effective at once, as in AWS.
use super::{Req, authorize, b64, parse_grant, resolve};
use crate::error::{KmsError, KmsResult};
use crate::model::{GrantRecord, KeyRecord, kind};
use crate::service::{Ctx, Kms, Out};
use aws_lc_rs::digest;
use caas_store::Write;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const GRANT_OPERATIONS: &[&str] = &[
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "Verify",
    "GetPublicKey",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
];

fn token_hash(token: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

fn grant_json(g: &GrantRecord) -> Value {
    let mut v = json!({
        "KeyId": g.key_id, "GrantId": g.grant_id, "GranteePrincipal": g.grantee, "Operations": g.operations,
        "IssuingAccount": g.issuing, "CreationDate": g.created_ms as f64 / 1000.0,
    });
    if let Some(n) = &g.name {
        v["Name"] = json!(n);
    }
    if let Some(r) = &g.retiring {
        v["RetiringPrincipal"] = json!(r);
    }
    let mut c = serde_json::Map::new();
    if let Some(s) = &g.ec_subset {
        c.insert("EncryptionContextSubset".into(), json!(s));
    }
    if let Some(e) = &g.ec_equals {
        c.insert("EncryptionContextEquals".into(), json!(e));
    }
    if !c.is_empty() {
        v["Constraints"] = Value::Object(c);
    }
    v
}

/// Does any grant (stored, or presented by token) let the caller do `action` on `key`?
pub async fn allows(
    kms: &Kms,
    ctx: &Ctx,
    key: &KeyRecord,
    action: &str,
    ec: Option<&BTreeMap<String, String>>,
    tokens: &[String],
) -> KmsResult<bool> {
    let grants = kms
        .store
        .list(kind::GRANT, Some(&key.account))
        .await
        .map_err(KmsError::store)?;
    // Presented grant tokens must name existing grants of this account.
    for t in tokens {
        let h = token_hash(t);
        let mut known = false;
        for o in &grants {
            known |= parse_grant(o)?.token_hash == h;
        }
        if !known {
            return Err(KmsError::InvalidGrantToken(
                "A grant token is not valid".into(),
            ));
        }
    }
    let empty = BTreeMap::new();
    let ec = ec.unwrap_or(&empty);
    for o in grants {
        let g = parse_grant(&o)?;
        if g.key_id != key.key_id || g.grantee != ctx.caller.principal {
            continue;
        }
        // A grant is effective as soon as it is stored (AWS: eventually consistent, grant
        // tokens bridge the gap; here the store is read on every request).
        if !g
            .operations
            .iter()
            .any(|op| op == action || (action == "ReEncrypt" && op.starts_with("ReEncrypt")))
        {
            continue;
        }
        if let Some(eq) = &g.ec_equals
            && eq != ec
        {
            continue;
        }
        if let Some(sub) = &g.ec_subset
            && !sub.iter().all(|(k, v)| ec.get(k) == Some(v))
        {
            continue;
        }
        return Ok(true);
    }
    Ok(false)
}

/// CreateGrant.
pub async fn create(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(
        kms,
        ctx,
        &l.key,
        "CreateGrant",
        None,
        &super::grant_tokens(r)?,
    )
    .await?;
    let grantee = r.str("GranteePrincipal")?;
    let ops = r
        .opt_str_list("Operations")?
        .ok_or_else(|| KmsError::Validation("Operations is required".into()))?;
    if ops.is_empty() || ops.iter().any(|o| !GRANT_OPERATIONS.contains(&o.as_str())) {
        return Err(KmsError::Validation(
            "Operations contains an invalid grant operation".into(),
        ));
    }
    let (mut ec_subset, mut ec_equals) = (None, None);
    if let Some(c) = r.value("Constraints") {
        let c = Req(c);
        ec_subset = c.opt_map("EncryptionContextSubset")?;
        ec_equals = c.opt_map("EncryptionContextEquals")?;
    }
    let grant_id = hex::encode(crate::material::random(32)?);
    let token = format!(
        "{}{}",
        b64(&crate::material::random(48)?).replace(['+', '/', '='], ""),
        &grant_id[..8]
    );
    let g = GrantRecord {
        grant_id: grant_id.clone(),
        key_id: l.key.key_id.clone(),
        name: r.opt_str("Name")?.map(str::to_string),
        grantee: grantee.into(),
        retiring: r.opt_str("RetiringPrincipal")?.map(str::to_string),
        operations: ops,
        ec_subset,
        ec_equals,
        issuing: ctx.caller.principal.clone(),
        created_ms: kms.now_ms(),
        token_hash: token_hash(&token),
    };
    ctx.detail.insert("GrantId".into(), json!(grant_id));
    let body = serde_json::to_vec(&g).map_err(|_| KmsError::Internal("encode".into()))?;
    Ok(Out {
        body: json!({ "GrantId": grant_id, "GrantToken": token }),
        writes: vec![Write::Put {
            kind: kind::GRANT.into(),
            account: ctx.caller.account.clone(),
            id: grant_id,
            body,
            expect_rev: Some(0),
        }],
    })
}

/// ListGrants for a key.
pub async fn list(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l.key, "ListGrants", None, &[]).await?;
    let want_id = r.opt_str("GrantId")?;
    let want_grantee = r.opt_str("GranteePrincipal")?;
    let objs = kms
        .store
        .list(kind::GRANT, Some(&ctx.caller.account))
        .await
        .map_err(KmsError::store)?;
    let mut items = vec![];
    for o in objs {
        let g = parse_grant(&o)?;
        if g.key_id == l.key.key_id
            && want_id.is_none_or(|w| w == g.grant_id)
            && want_grantee.is_none_or(|w| w == g.grantee)
        {
            items.push(grant_json(&g));
        }
    }
    Ok(Out::reply(json!({ "Grants": items, "Truncated": false })))
}

/// ListRetirableGrants for a principal.
pub async fn list_retirable(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let who = r.str("RetiringPrincipal")?;
    let objs = kms
        .store
        .list(kind::GRANT, Some(&ctx.caller.account))
        .await
        .map_err(KmsError::store)?;
    let mut items = vec![];
    for o in objs {
        let g = parse_grant(&o)?;
        if g.retiring.as_deref() == Some(who) {
            items.push(grant_json(&g));
        }
    }
    Ok(Out::reply(json!({ "Grants": items, "Truncated": false })))
}

async fn find(kms: &Kms, ctx: &Ctx, grant_id: &str) -> KmsResult<(GrantRecord, i64)> {
    let o = kms
        .store
        .get(kind::GRANT, &ctx.caller.account, grant_id)
        .await
        .map_err(KmsError::store)?
        .ok_or_else(|| KmsError::NotFound("Grant does not exist".into()))?;
    Ok((parse_grant(&o)?, o.rev))
}

fn delete_write(ctx: &Ctx, g: &GrantRecord, rev: i64) -> Write {
    Write::Delete {
        kind: kind::GRANT.into(),
        account: ctx.caller.account.clone(),
        id: g.grant_id.clone(),
        expect_rev: Some(rev),
    }
}

/// RevokeGrant (key administrators).
pub async fn revoke(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    authorize(kms, ctx, &l.key, "RevokeGrant", None, &[]).await?;
    let gid = r.str("GrantId")?;
    let (g, rev) = find(kms, ctx, gid).await.map_err(|e| match e {
        KmsError::NotFound(_) => KmsError::InvalidGrantId("Grant id is not valid".into()),
        // An integrity failure stays one (audited as such), not "invalid id".
        other => other,
    })?;
    if g.key_id != l.key.key_id {
        return Err(KmsError::InvalidGrantId(
            "Grant id is not valid for this key".into(),
        ));
    }
    Ok(Out {
        body: json!({}),
        writes: vec![delete_write(ctx, &g, rev)],
    })
}

/// RetireGrant: by token, or by key id + grant id, by the retiring or grantee principal.
pub async fn retire(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let (g, rev) = if let Some(token) = r.opt_str("GrantToken")? {
        let h = token_hash(token);
        let objs = kms
            .store
            .list(kind::GRANT, Some(&ctx.caller.account))
            .await
            .map_err(KmsError::store)?;
        let mut found = None;
        for o in objs {
            let g = parse_grant(&o)?;
            if g.token_hash == h {
                found = Some((g, o.rev));
                break;
            }
        }
        found.ok_or_else(|| KmsError::InvalidGrantToken("Grant token is not valid".into()))?
    } else {
        let l = resolve(kms, ctx, r.str("KeyId")?).await?;
        let (g, rev) = find(kms, ctx, r.str("GrantId")?)
            .await
            .map_err(|e| match e {
                KmsError::NotFound(_) => KmsError::InvalidGrantId("Grant id is not valid".into()),
                // An integrity failure stays one (audited as such), not "invalid id".
                other => other,
            })?;
        if g.key_id != l.key.key_id {
            return Err(KmsError::InvalidGrantId(
                "Grant id is not valid for this key".into(),
            ));
        }
        (g, rev)
    };
    let me = &ctx.caller.principal;
    let allowed = g.retiring.as_deref() == Some(me.as_str())
        || (g.grantee == *me && g.operations.iter().any(|o| o == "RetireGrant"))
        || g.issuing == *me;
    if !allowed {
        return Err(KmsError::AccessDenied(format!(
            "User: {me} is not allowed to retire this grant"
        )));
    }
    ctx.key_id = Some(g.key_id.clone());
    Ok(Out {
        body: json!({}),
        writes: vec![delete_write(ctx, &g, rev)],
    })
}
