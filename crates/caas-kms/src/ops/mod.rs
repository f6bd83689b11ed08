//! The KMS operations, one file per family (keys, aliases, symmetric crypto, asymmetric
//! and MAC, key agreement, key encapsulation, import, grants, last usage), and what they share: parameter
//! access with AWS validation errors, key resolution by id / ARN / alias, authorization,
//! `DryRun`, and key-record updates.
mod agreement;
mod aliases;
mod asym;
mod crypto;
mod grants;
mod import;
mod kem;
mod keys;
mod last_usage;

pub use crypto::canonical_context;
/// The per-request envelope encryption (for benchmarks of the in-process primitive).
pub use crypto::seal as seal_for_bench;
pub use keys::{maintenance, rotate_domain_key};

use crate::error::{KmsError, KmsResult};
use crate::model::{AliasRecord, GrantRecord, KeyRecord, KeyState, KeyUsage, kind};
use crate::policy::{self, Verdict};
use crate::service::{Ctx, Kms, Out};
use base64::Engine as _;
use caas_crypto::SecretBytes;
use caas_store::Write;
use serde_json::Value;
use std::collections::BTreeMap;

/// Runs the named operation.
pub async fn dispatch(kms: &Kms, ctx: &mut Ctx, op: &str, req: &Value) -> KmsResult<Out> {
    let r = Req(req);
    // The most frequent key uses inline; every other operation's future on the heap, so
    // that the largest of them does not set the size of every request's future (moved
    // several times per request).
    match op {
        "Encrypt" => crypto::encrypt(kms, ctx, r).await,
        "Decrypt" => crypto::decrypt(kms, ctx, r).await,
        "GenerateDataKey" => crypto::generate_data_key(kms, ctx, r, true).await,
        "GenerateDataKeyWithoutPlaintext" => crypto::generate_data_key(kms, ctx, r, false).await,
        _ => Box::pin(dispatch_other(kms, ctx, op, r)).await,
    }
}

/// [`dispatch`] of every operation but the most frequent key uses.
async fn dispatch_other(kms: &Kms, ctx: &mut Ctx, op: &str, r: Req<'_>) -> KmsResult<Out> {
    match op {
        "CreateKey" => keys::create_key(kms, ctx, r).await,
        "DescribeKey" => keys::describe_key(kms, ctx, r).await,
        "ListKeys" => keys::list_keys(kms, ctx, r).await,
        "EnableKey" => keys::set_enabled(kms, ctx, r, true).await,
        "DisableKey" => keys::set_enabled(kms, ctx, r, false).await,
        "UpdateKeyDescription" => keys::update_description(kms, ctx, r).await,
        "ScheduleKeyDeletion" => keys::schedule_deletion(kms, ctx, r).await,
        "CancelKeyDeletion" => keys::cancel_deletion(kms, ctx, r).await,
        "TagResource" => keys::tag_resource(kms, ctx, r).await,
        "UntagResource" => keys::untag_resource(kms, ctx, r).await,
        "ListResourceTags" => keys::list_tags(kms, ctx, r).await,
        "GetKeyPolicy" => keys::get_policy(kms, ctx, r).await,
        "PutKeyPolicy" => keys::put_policy(kms, ctx, r).await,
        "ListKeyPolicies" => keys::list_policies(kms, ctx, r).await,
        "EnableKeyRotation" => keys::set_rotation(kms, ctx, r, true).await,
        "DisableKeyRotation" => keys::set_rotation(kms, ctx, r, false).await,
        "GetKeyRotationStatus" => keys::rotation_status(kms, ctx, r).await,
        "RotateKeyOnDemand" => keys::rotate_on_demand(kms, ctx, r).await,
        "ListKeyRotations" => keys::list_rotations(kms, ctx, r).await,
        "CreateAlias" => aliases::create(kms, ctx, r).await,
        "UpdateAlias" => aliases::update(kms, ctx, r).await,
        "DeleteAlias" => aliases::delete(kms, ctx, r).await,
        "ListAliases" => aliases::list(kms, ctx, r).await,
        "Encrypt" => crypto::encrypt(kms, ctx, r).await,
        "Decrypt" => crypto::decrypt(kms, ctx, r).await,
        "ReEncrypt" => crypto::re_encrypt(kms, ctx, r).await,
        "GenerateDataKey" => crypto::generate_data_key(kms, ctx, r, true).await,
        "GenerateDataKeyWithoutPlaintext" => crypto::generate_data_key(kms, ctx, r, false).await,
        "GenerateDataKeyPair" => asym::generate_data_key_pair(kms, ctx, r, true).await,
        "GenerateDataKeyPairWithoutPlaintext" => {
            asym::generate_data_key_pair(kms, ctx, r, false).await
        }
        "GenerateRandom" => crypto::generate_random(kms, ctx, r).await,
        "Sign" => asym::sign(kms, ctx, r).await,
        "Verify" => asym::verify(kms, ctx, r).await,
        "GetPublicKey" => asym::get_public_key(kms, ctx, r).await,
        "GenerateMac" => asym::generate_mac(kms, ctx, r).await,
        "VerifyMac" => asym::verify_mac(kms, ctx, r).await,
        "DeriveSharedSecret" => agreement::derive_shared_secret(kms, ctx, r).await,
        "GetKeyLastUsage" => last_usage::get_key_last_usage(kms, ctx, r).await,
        "Encapsulate" => kem::encapsulate(kms, ctx, r).await,
        "Decapsulate" => kem::decapsulate(kms, ctx, r).await,
        "GetParametersForImport" => import::get_parameters(kms, ctx, r).await,
        "ImportKeyMaterial" => import::import(kms, ctx, r).await,
        "DeleteImportedKeyMaterial" => import::delete(kms, ctx, r).await,
        "CreateGrant" => grants::create(kms, ctx, r).await,
        "ListGrants" => grants::list(kms, ctx, r).await,
        "RevokeGrant" => grants::revoke(kms, ctx, r).await,
        "RetireGrant" => grants::retire(kms, ctx, r).await,
        "ListRetirableGrants" => grants::list_retirable(kms, ctx, r).await,
        _ => Err(KmsError::UnknownOperation(format!(
            "Unknown operation '{}'",
            op.chars().take(64).collect::<String>()
        ))),
    }
}

/// Typed access to request parameters, with AWS-style validation errors.
#[derive(Clone, Copy, Debug)]
pub struct Req<'a>(pub &'a Value);

impl<'a> Req<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
    /// Optional string.
    pub fn opt_str(&self, name: &str) -> KmsResult<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(KmsError::Serialization(format!(
                "'{name}' must be a string"
            ))),
        }
    }
    /// Required string.
    pub fn str(&self, name: &str) -> KmsResult<&'a str> {
        self.opt_str(name)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| KmsError::Validation(format!("1 validation error detected: Value at '{}' failed to satisfy constraint: Member must not be null", lower_first(name))))
    }
    /// Optional integer.
    pub fn opt_int(&self, name: &str) -> KmsResult<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| KmsError::Serialization(format!("'{name}' must be an integer"))),
        }
    }
    /// Optional bool.
    pub fn opt_bool(&self, name: &str) -> KmsResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(KmsError::Serialization(format!(
                "'{name}' must be a boolean"
            ))),
        }
    }
    /// Optional base64 blob with a maximum decoded length.
    pub fn opt_blob(&self, name: &str, max: usize) -> KmsResult<Option<Vec<u8>>> {
        let Some(s) = self.opt_str(name)? else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| KmsError::Serialization(format!("'{name}' is not valid base64")))?;
        if bytes.is_empty() || bytes.len() > max {
            return Err(KmsError::Validation(format!(
                "1 validation error detected: Value at '{}' failed to satisfy constraint: Member must have length between 1 and {max}",
                lower_first(name)
            )));
        }
        Ok(Some(bytes))
    }
    /// Required base64 blob.
    pub fn blob(&self, name: &str, max: usize) -> KmsResult<Vec<u8>> {
        self.opt_blob(name, max)?.ok_or_else(|| KmsError::Validation(format!("1 validation error detected: Value at '{}' failed to satisfy constraint: Member must not be null", lower_first(name))))
    }
    /// Optional string → string map (EncryptionContext, constraints).
    pub fn opt_map(&self, name: &str) -> KmsResult<Option<BTreeMap<String, String>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|s| (k.clone(), s.to_string()))
                        .ok_or_else(|| {
                            KmsError::Serialization(format!("'{name}' values must be strings"))
                        })
                })
                .collect::<KmsResult<BTreeMap<_, _>>>()
                .map(Some),
            Some(_) => Err(KmsError::Serialization(format!(
                "'{name}' must be an object"
            ))),
        }
    }
    /// Optional list of strings.
    pub fn opt_str_list(&self, name: &str) -> KmsResult<Option<Vec<String>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        KmsError::Serialization(format!("'{name}' must be a list of strings"))
                    })
                })
                .collect::<KmsResult<Vec<_>>>()
                .map(Some),
            Some(_) => Err(KmsError::Serialization(format!("'{name}' must be a list"))),
        }
    }
    /// Raw value.
    pub fn value(&self, name: &str) -> Option<&'a Value> {
        self.get(name)
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// Base64 for responses.
pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A key record with the revision it was read at.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The record.
    pub key: KeyRecord,
    /// Its store revision.
    pub rev: i64,
    /// The alias name the request named the key by (`kms:RequestAlias`), if any.
    pub alias: Option<String>,
    /// The key-use cache entry the record came from or was put in ([`resolve_for_use`]).
    pub cached: Option<std::sync::Arc<crate::keycache::CachedKey>>,
}

impl Loaded {
    /// The write that stores an updated record, conditional on the revision read.
    pub fn put(&self, key: &KeyRecord) -> KmsResult<Write> {
        Ok(Write::Put {
            kind: kind::KEY.into(),
            account: key.account.clone(),
            id: key.key_id.clone(),
            body: serde_json::to_vec(key).map_err(|_| KmsError::Internal("encode".into()))?,
            expect_rev: Some(self.rev),
        })
    }
}

/// Resolves a KeyId parameter (key id, key ARN, alias name or alias ARN) within the caller's account.
pub async fn resolve(kms: &Kms, ctx: &mut Ctx, key_ref: &str) -> KmsResult<Loaded> {
    let (id, alias) = key_row_id(kms, ctx, key_ref).await?;
    let o = kms
        .store
        .get(kind::KEY, &ctx.caller.account, &id)
        .await
        .map_err(KmsError::store)?
        .ok_or_else(|| not_found(key_ref))?;
    let key = parse_key(&o)?;
    ctx.key_id = Some(key.key_id.clone());
    Ok(Loaded {
        key,
        rev: o.rev,
        alias,
        cached: None,
    })
}

/// [`resolve`] for the operations that use a key without changing it (Encrypt, Decrypt,
/// ReEncrypt, GenerateDataKey*, Sign, Verify, GenerateMac, VerifyMac): the record may come
/// from the key-use cache, under its consistency rule ([`crate::keycache`]); a record read
/// here is put in it, with the current HBK of a symmetric key opened once.
pub async fn resolve_for_use(kms: &Kms, ctx: &mut Ctx, key_ref: &str) -> KmsResult<Loaded> {
    resolve_cached(kms, ctx, key_ref, true).await
}

/// [`resolve_for_use`] that reads the row (and refreshes the cache) even when a usable
/// entry exists: for a ciphertext of an HBK version the cached record does not have yet
/// (rotated on another node).
pub async fn resolve_for_use_fresh(kms: &Kms, ctx: &mut Ctx, key_ref: &str) -> KmsResult<Loaded> {
    resolve_cached(kms, ctx, key_ref, false).await
}

async fn resolve_cached(
    kms: &Kms,
    ctx: &mut Ctx,
    key_ref: &str,
    use_cached: bool,
) -> KmsResult<Loaded> {
    let (id, alias) = key_row_id(kms, ctx, key_ref).await?;
    let account = &ctx.caller.account;
    // The epoch and the time before the row is read: the entry is no newer than either.
    let epoch = kms.store.write_epoch();
    let cached = use_cached
        .then(|| kms.key_cache.get(account, &id, epoch))
        .flatten();
    let entry = match cached {
        Some(e) => e,
        // On the heap: the row read and the EKT opening would otherwise make the future
        // of every key use (moved a few times per request) several KiB larger.
        None => Box::pin(fetch_for_use(kms, account, &id, key_ref, epoch)).await?,
    };
    ctx.key_id = Some(entry.key.key_id.clone());
    Ok(Loaded {
        key: entry.key.clone(),
        rev: entry.rev,
        alias,
        cached: Some(entry),
    })
}

/// [`resolve_cached`] on a cache miss: reads the key row, opens the current HBK of a
/// symmetric key, and puts both in the key-use cache.
async fn fetch_for_use(
    kms: &Kms,
    account: &str,
    id: &str,
    key_ref: &str,
    epoch: u64,
) -> KmsResult<std::sync::Arc<crate::keycache::CachedKey>> {
    let fetched = std::time::Instant::now();
    let o = kms
        .store
        .get(kind::KEY, account, id)
        .await
        .map_err(KmsError::store)?
        .ok_or_else(|| not_found(key_ref))?;
    let key = parse_key(&o)?;
    let current = match (key.key_spec, key.current()) {
        (crate::material::KeySpec::SymmetricDefault, Some(h)) => Some((
            h.version,
            kms.keyring
                .open_ekt(&key.account, &key.key_id, h.version, &h.ekt)
                .await?,
        )),
        _ => None,
    };
    Ok(kms.key_cache.put(key, o.rev, current, fetched, epoch))
}

fn not_found(key_ref: &str) -> KmsError {
    KmsError::NotFound(format!(
        "Invalid keyId {}",
        key_ref.chars().take(256).collect::<String>()
    ))
}

/// The key id a KeyId parameter names in the caller's account (an alias resolved through
/// its row), and the alias name if it was one.
async fn key_row_id(kms: &Kms, ctx: &Ctx, key_ref: &str) -> KmsResult<(String, Option<String>)> {
    let account = ctx.caller.account.as_str();
    let not_found = || not_found(key_ref);
    if key_ref.len() > 2048 {
        return Err(KmsError::Validation(
            "KeyId must be at most 2048 characters".into(),
        ));
    }
    let mut id = key_ref.to_string();
    let mut alias = None;
    if let Some(rest) = key_ref.strip_prefix("arn:aws:kms:") {
        // arn:aws:kms:REGION:ACCOUNT:key/ID or alias/NAME
        let parts: Vec<&str> = rest.splitn(3, ':').collect();
        if parts.len() != 3 || parts[1] != account {
            return Err(not_found());
        }
        id = parts[2]
            .strip_prefix("key/")
            .map(str::to_string)
            .unwrap_or_else(|| parts[2].to_string());
    }
    if id.starts_with("alias/") {
        let o = Box::pin(kms.store.get(kind::ALIAS, account, &id))
            .await
            .map_err(KmsError::store)?
            .ok_or_else(|| KmsError::NotFound(format!("Alias {id} is not found.")))?;
        alias = Some(id);
        id = parse_alias(&o)?.target_key_id;
    }
    Ok((id, alias))
}

/// Checks the key policy (and, failing that, grants) for an action.
pub async fn authorize(
    kms: &Kms,
    ctx: &Ctx,
    l: &Loaded,
    action: &str,
    ec: Option<&BTreeMap<String, String>>,
    grant_tokens: &[String],
) -> KmsResult<()> {
    authorize_with(kms, ctx, l, action, ec, grant_tokens, &[]).await
}

/// [`authorize`] with extra condition keys for the key policy (e.g. the verified
/// `Recipient`'s, [`crate::recipient::conditions`]).
pub async fn authorize_with(
    kms: &Kms,
    ctx: &Ctx,
    l: &Loaded,
    action: &str,
    ec: Option<&BTreeMap<String, String>>,
    grant_tokens: &[String],
    extra: &[(String, Vec<String>)],
) -> KmsResult<()> {
    let extra: Vec<(&str, Vec<String>)> =
        extra.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    match policy_verdict(kms, ctx, l, action, ec, &extra).await? {
        Verdict::Allow => return Ok(()),
        Verdict::Deny => return Err(denied(ctx, action, &l.key)),
        Verdict::NoMatch => {}
    }
    if Box::pin(grants::allows(kms, ctx, &l.key, action, ec, grant_tokens)).await? {
        return Ok(());
    }
    Err(denied(ctx, action, &l.key))
}

/// Evaluates the key's policy for `action` with every condition key the engine supports
/// that applies: the caller's, the key's (spec, usage, origin, tags, aliases), the
/// request's alias and encryption context, and `extra` (operation parameters such as
/// CreateGrant's `kms:GrantOperations`).
pub async fn policy_verdict(
    kms: &Kms,
    ctx: &Ctx,
    l: &Loaded,
    action: &str,
    ec: Option<&BTreeMap<String, String>>,
    extra: &[(&str, Vec<String>)],
) -> KmsResult<Verdict> {
    let key = &l.key;
    let policy = kms.policies.get(&key.policy);
    if !policy.has_conditions() {
        // No condition can read a key: skip building them.
        return Ok(policy.evaluate_unconditioned(
            &ctx.caller.account,
            &ctx.caller.principal,
            action,
            &key.arn(),
        ));
    }
    let mut c = policy::Context::new(
        &ctx.caller.account,
        &ctx.caller.principal,
        action,
        &key.arn(),
    );
    if let Some(ec) = ec {
        c.encryption_context(ec);
    }
    c.time(kms.now_ms())
        .set("aws:RequestedRegion", &kms.region)
        .set("aws:ResourceAccount", &key.account)
        .set("kms:KeySpec", key.key_spec.as_str())
        .set("kms:CustomerMasterKeySpec", key.key_spec.as_str())
        .set("kms:KeyUsage", key.key_usage.as_str())
        .set("kms:CustomerMasterKeyUsage", key.key_usage.as_str())
        .set("kms:KeyOrigin", key.origin.as_str());
    for (k, v) in &key.tags {
        c.set(&format!("aws:ResourceTag/{k}"), v);
    }
    if let Some(a) = &l.alias {
        c.set("kms:RequestAlias", a);
    }
    if policy.mentions("kms:ResourceAliases") {
        let aliases = Box::pin(aliases_of(kms, key)).await?;
        if !aliases.is_empty() {
            c.set_all("kms:ResourceAliases", &aliases);
        }
    }
    if matches!(action, "CreateGrant" | "ListGrants" | "RevokeGrant") {
        // No AWS service calls caas on a principal's behalf.
        c.set("kms:GrantIsForAWSResource", "false");
    }
    for (k, v) in extra {
        c.set_all(k, v);
    }
    Ok(policy.evaluate(&c))
}

/// The alias names that point at `key`.
async fn aliases_of(kms: &Kms, key: &KeyRecord) -> KmsResult<Vec<String>> {
    let objs = kms
        .store
        .list(kind::ALIAS, Some(&key.account))
        .await
        .map_err(KmsError::store)?;
    let mut out = vec![];
    for o in objs {
        let a = parse_alias(&o)?;
        if a.target_key_id == key.key_id {
            out.push(a.name);
        }
    }
    Ok(out)
}

pub(crate) fn denied(ctx: &Ctx, action: &str, key: &KeyRecord) -> KmsError {
    KmsError::AccessDenied(format!(
        "User: {} is not authorized to perform: kms:{action} on resource: {}",
        ctx.caller.principal,
        key.arn()
    ))
}

/// Requires the key to be usable for cryptographic operations.
pub fn require_enabled(key: &KeyRecord) -> KmsResult<()> {
    match key.state {
        KeyState::Enabled => Ok(()),
        KeyState::Disabled => Err(KmsError::Disabled(format!("{} is disabled.", key.arn()))),
        KeyState::PendingDeletion => Err(KmsError::InvalidState(format!(
            "{} is pending deletion.",
            key.arn()
        ))),
        KeyState::PendingImport => Err(KmsError::InvalidState(format!(
            "{} is pending import.",
            key.arn()
        ))),
    }
}

/// `DryRun`: once the request has been authorized and validated, a request with
/// `DryRun: true` stops here with `DryRunOperationException` (HTTP 412), before any key
/// material is used (ReEncrypt: after opening its source, which is not returned) or
/// anything is changed; its audit record says `DryRun` and its
/// result is that exception, so it never counts as a use of the key
/// ([`crate::usage`]).
pub fn dry_run(ctx: &mut Ctx, r: Req<'_>) -> KmsResult<()> {
    if r.opt_bool("DryRun")?.unwrap_or(false) {
        ctx.detail.insert("DryRun".into(), Value::Bool(true));
        return Err(KmsError::DryRun);
    }
    Ok(())
}

/// Requires a key usage.
pub fn require_usage(key: &KeyRecord, usage: KeyUsage, op: &str) -> KmsResult<()> {
    if key.key_usage == usage {
        Ok(())
    } else {
        Err(KmsError::InvalidKeyUsage(format!(
            "{} key usage is {} which is not valid for {op}.",
            key.arn(),
            key.key_usage
        )))
    }
}

/// Opens the material of a key version.
pub async fn material(
    kms: &Kms,
    key: &KeyRecord,
    version: Option<u32>,
) -> KmsResult<(u32, SecretBytes)> {
    let hbk = match version {
        Some(v) => key.version(v),
        None => key.current(),
    }
    .ok_or_else(|| KmsError::InvalidState(format!("{} has no key material.", key.arn())))?;
    let m = kms
        .keyring
        .open_ekt(&key.account, &key.key_id, hbk.version, &hbk.ekt)
        .await?;
    Ok((hbk.version, m))
}

/// [`material`] for a record from [`resolve_for_use`]: the cached current HBK when that
/// is the version asked for.
pub async fn material_for_use(
    kms: &Kms,
    l: &Loaded,
    version: Option<u32>,
) -> KmsResult<(u32, SecretBytes)> {
    if let Some(c) = &l.cached
        && let Some((v, m)) = &c.current
        && version.is_none_or(|want| want == *v)
        && l.key.current().is_some_and(|h| h.version == *v)
    {
        return Ok((*v, m.clone()));
    }
    Box::pin(material(kms, &l.key, version)).await
}

/// Grant tokens of a request.
pub fn grant_tokens(r: Req<'_>) -> KmsResult<Vec<String>> {
    Ok(r.opt_str_list("GrantTokens")?.unwrap_or_default())
}

/// Parses a key row (already MAC-checked by the store); the record must name the row's
/// account and id.
pub fn parse_key(o: &caas_store::Object) -> KmsResult<KeyRecord> {
    serde_json::from_slice::<KeyRecord>(&o.body)
        .ok()
        .filter(|k| k.key_id == o.id && k.account == o.account)
        .ok_or_else(|| KmsError::mismatch(&o.kind, &o.account, &o.id))
}

/// Parses an alias row; the record must name the row's id.
pub fn parse_alias(o: &caas_store::Object) -> KmsResult<AliasRecord> {
    serde_json::from_slice::<AliasRecord>(&o.body)
        .ok()
        .filter(|a| a.name == o.id)
        .ok_or_else(|| KmsError::mismatch(&o.kind, &o.account, &o.id))
}

/// Parses a grant row; the record must name the row's id.
pub fn parse_grant(o: &caas_store::Object) -> KmsResult<GrantRecord> {
    serde_json::from_slice::<GrantRecord>(&o.body)
        .ok()
        .filter(|g| g.grant_id == o.id)
        .ok_or_else(|| KmsError::mismatch(&o.kind, &o.account, &o.id))
}
