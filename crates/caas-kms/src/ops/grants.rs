//! Grants: CreateGrant, ListGrants, RevokeGrant, RetireGrant, ListRetirableGrants, and the
//! check that lets a grant authorize an operation the key policy does not. A grant token is
//! returned once; only its SHA-256 is stored. Presenting the token (GrantTokens) makes a
//! fresh grant effective at once, as in AWS; a token only ever helps its grant's grantee.
//!
//! AWS's rules, as enforced here:
//! - CreateGrant is allowed by the key policy (with `kms:GrantOperations`,
//!   `kms:GranteePrincipal`, `kms:RetiringPrincipal`, `kms:GrantConstraintType`,
//!   `kms:GrantIsForAWSResource` as condition keys), or else by a grant of the caller
//!   that includes `CreateGrant` — and then the new grant may carry only a subset of that
//!   grant's operations, and only encryption contexts that grant admits (constraints at
//!   least as strict). Anything else is AccessDenied (and audited, as every request is).
//! - RetireGrant: the grant's retiring principal, its grantee if the grant includes
//!   `RetireGrant`, or the account (root) in which the grant was created.
//! - RevokeGrant and ListGrants: key policy permission only.
use super::{Req, authorize, b64, denied, parse_grant, policy_verdict, resolve};
use crate::error::{KmsError, KmsResult};
use crate::model::{GrantRecord, KeyRecord, kind};
use crate::policy::Verdict;
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
    "DeriveSharedSecret",
    "Encapsulate",
    "Decapsulate",
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

/// The caller's grants on `key`, after checking that every presented grant token names an
/// existing grant of the key's account (a token of someone else's grant is valid but gives
/// the caller nothing: only grants whose grantee is the caller count).
async fn grants_of_caller(
    kms: &Kms,
    ctx: &Ctx,
    key: &KeyRecord,
    tokens: &[String],
) -> KmsResult<Vec<GrantRecord>> {
    let all = kms
        .store
        .list(kind::GRANT, Some(&key.account))
        .await
        .map_err(KmsError::store)?
        .iter()
        .map(parse_grant)
        .collect::<KmsResult<Vec<_>>>()?;
    for t in tokens {
        let h = token_hash(t);
        if !all.iter().any(|g| g.token_hash == h) {
            return Err(KmsError::InvalidGrantToken(
                "A grant token is not valid".into(),
            ));
        }
    }
    Ok(all
        .into_iter()
        .filter(|g| g.key_id == key.key_id && g.grantee == ctx.caller.principal)
        .collect())
}

/// `small` ⊆ `big` as sets of pairs.
fn pairs_within(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// The encryption-context constraints of a grant.
#[derive(Debug, Clone, Copy)]
struct EcConstraints<'a> {
    subset: Option<&'a BTreeMap<String, String>>,
    equals: Option<&'a BTreeMap<String, String>>,
}

impl EcConstraints<'_> {
    fn admits(&self, ec: &BTreeMap<String, String>) -> bool {
        self.equals.is_none_or(|e| e == ec) && self.subset.is_none_or(|s| pairs_within(s, ec))
    }

    /// Is every context `self` admits also admitted by `parent`?
    fn at_least_as_strict_as(&self, parent: &EcConstraints<'_>) -> bool {
        match (self.equals, self.subset) {
            // Admits exactly one context (or none, when its own subset does not fit it).
            (Some(e), sub) => sub.is_some_and(|s| !pairs_within(s, e)) || parent.admits(e),
            // Admits every context containing `s`: the parent may only require a subset of it.
            (None, Some(s)) => {
                parent.equals.is_none() && parent.subset.is_none_or(|p| pairs_within(p, s))
            }
            // Admits every context.
            (None, None) => parent.equals.is_none() && parent.subset.is_none(),
        }
    }
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
    let empty = BTreeMap::new();
    let ec = ec.unwrap_or(&empty);
    for g in grants_of_caller(kms, ctx, key, tokens).await? {
        // A grant is effective as soon as it is stored (AWS: eventually consistent, grant
        // tokens bridge the gap; here the store is read on every request).
        if !g
            .operations
            .iter()
            .any(|op| op == action || (action == "ReEncrypt" && op.starts_with("ReEncrypt")))
        {
            continue;
        }
        let constraints = EcConstraints {
            subset: g.ec_subset.as_ref(),
            equals: g.ec_equals.as_ref(),
        };
        if constraints.admits(ec) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// CreateGrant.
pub async fn create(kms: &Kms, ctx: &mut Ctx, r: Req<'_>) -> KmsResult<Out> {
    let l = resolve(kms, ctx, r.str("KeyId")?).await?;
    let tokens = super::grant_tokens(r)?;
    let grantee = r.str("GranteePrincipal")?;
    let retiring = r.opt_str("RetiringPrincipal")?;
    let mut ops = r
        .opt_str_list("Operations")?
        .ok_or_else(|| KmsError::Validation("Operations is required".into()))?;
    if ops.is_empty() || ops.iter().any(|o| !GRANT_OPERATIONS.contains(&o.as_str())) {
        return Err(KmsError::Validation(
            "Operations contains an invalid grant operation".into(),
        ));
    }
    ops.sort();
    ops.dedup();
    let (mut ec_subset, mut ec_equals) = (None, None);
    if let Some(c) = r.value("Constraints") {
        let c = Req(c);
        ec_subset = c.opt_map("EncryptionContextSubset")?;
        ec_equals = c.opt_map("EncryptionContextEquals")?;
    }
    let child = EcConstraints {
        subset: ec_subset.as_ref(),
        equals: ec_equals.as_ref(),
    };
    let mut extra: Vec<(&str, Vec<String>)> = vec![
        ("kms:GrantOperations", ops.clone()),
        ("kms:GranteePrincipal", vec![grantee.to_string()]),
    ];
    if let Some(rp) = retiring {
        extra.push(("kms:RetiringPrincipal", vec![rp.to_string()]));
    }
    let mut types = vec![];
    if ec_subset.is_some() {
        types.push("EncryptionContextSubset".to_string());
    }
    if ec_equals.is_some() {
        types.push("EncryptionContextEquals".to_string());
    }
    if !types.is_empty() {
        extra.push(("kms:GrantConstraintType", types));
    }
    match policy_verdict(kms, ctx, &l, "CreateGrant", None, &extra).await? {
        Verdict::Allow => {}
        Verdict::Deny => return Err(denied(ctx, "CreateGrant", &l.key)),
        Verdict::NoMatch => {
            // Only through a grant of the caller that includes CreateGrant, and only for a
            // grant no wider than that one.
            let mine = grants_of_caller(kms, ctx, &l.key, &tokens).await?;
            let parents: Vec<&GrantRecord> = mine
                .iter()
                .filter(|g| g.operations.iter().any(|o| o == "CreateGrant"))
                .collect();
            let parent = parents.iter().find(|g| {
                ops.iter().all(|o| g.operations.contains(o))
                    && child.at_least_as_strict_as(&EcConstraints {
                        subset: g.ec_subset.as_ref(),
                        equals: g.ec_equals.as_ref(),
                    })
            });
            match parent {
                Some(p) => {
                    ctx.detail
                        .insert("ParentGrantId".into(), json!(p.grant_id.clone()));
                }
                None if parents.is_empty() => return Err(denied(ctx, "CreateGrant", &l.key)),
                None => {
                    ctx.detail.insert(
                        "DeniedBecause".into(),
                        json!("grant would be wider than the caller's grant"),
                    );
                    return Err(KmsError::AccessDenied(format!(
                        "User: {} is not authorized to perform: kms:CreateGrant on resource: {}: a grant created through a grant may carry only that grant's operations, with constraints at least as strict",
                        ctx.caller.principal,
                        l.key.arn()
                    )));
                }
            }
        }
    }
    ctx.detail.insert("GrantOperations".into(), json!(ops));
    super::dry_run(ctx, r)?;
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
        retiring: retiring.map(str::to_string),
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
    authorize(kms, ctx, &l, "ListGrants", None, &[]).await?;
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
    authorize(kms, ctx, &l, "RevokeGrant", None, &[]).await?;
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
    super::dry_run(ctx, r)?;
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
    // AWS: the retiring principal, the grantee if the grant includes RetireGrant, or the
    // account in which the grant was created (its root). Not the issuer as such.
    let allowed = g.retiring.as_deref() == Some(me.as_str())
        || (g.grantee == *me && g.operations.iter().any(|o| o == "RetireGrant"))
        || *me == format!("arn:aws:iam::{}:root", ctx.caller.account);
    if !allowed {
        return Err(KmsError::AccessDenied(format!(
            "User: {me} is not allowed to retire this grant"
        )));
    }
    ctx.key_id = Some(g.key_id.clone());
    super::dry_run(ctx, r)?;
    Ok(Out {
        body: json!({}),
        writes: vec![delete_write(ctx, &g, rev)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn derived_grant_constraints_must_be_at_least_as_strict() {
        let (a, ab, b) = (
            m(&[("t", "a")]),
            m(&[("t", "a"), ("u", "b")]),
            m(&[("t", "b")]),
        );
        fn c<'a>(
            subset: Option<&'a BTreeMap<String, String>>,
            equals: Option<&'a BTreeMap<String, String>>,
        ) -> EcConstraints<'a> {
            EcConstraints { subset, equals }
        }
        let none = c(None, None);
        // (child, parent, allowed)
        for (child, parent, ok) in [
            (none, none, true),
            (c(Some(&a), None), none, true),
            (none, c(Some(&a), None), false),
            (c(Some(&a), None), c(Some(&a), None), true),
            (c(Some(&ab), None), c(Some(&a), None), true),
            (c(Some(&b), None), c(Some(&a), None), false),
            (c(None, Some(&ab)), c(Some(&a), None), true),
            (c(None, Some(&b)), c(Some(&a), None), false),
            (c(None, Some(&a)), c(None, Some(&a)), true),
            (c(Some(&a), None), c(None, Some(&a)), false),
            (c(None, Some(&ab)), c(None, Some(&a)), false),
            (none, c(None, Some(&a)), false),
            // A child that admits nothing at all is as strict as anything.
            (c(Some(&b), Some(&a)), c(None, Some(&ab)), true),
        ] {
            assert_eq!(
                child.at_least_as_strict_as(&parent),
                ok,
                "{child:?} vs {parent:?}"
            );
        }
        assert!(c(Some(&a), None).admits(&ab));
        assert!(!c(None, Some(&a)).admits(&ab));
    }
}
