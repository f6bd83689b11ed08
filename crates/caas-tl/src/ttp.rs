//! The trusted third party (TTP) of TL and DBSP, run inside the key service:
//! `AttestVerify` + `AttestToken` (seed 003 §4.3, Definition 6) and `DomKeyGen` (§4.4), the
//! ACL of which domain manager may give which workload which domain, the TL sessions (DK_i
//! per host, workload and launch) and the revocation sequence numbers. Records live in the
//! key service's store through [`AttestStore`] (so they share its durability and audit
//! chain); every request, accepted or refused, leaves an audit record.
use crate::crypto::{
    TtpKeys, TtpPublic, ak_nonce, ct_eq, hmac, lp, policy_pcr_digest, random32, seal_to_bind_key,
    sha256,
};
use crate::error::{Error, Result};
use crate::migrate::{MigrateRequest, MigrationStatement};
use crate::wire::{
    self, AkSigned, AttestRequest, Attestation, DomKeyInner, DomKeyRequest, DomKeyResponse,
    LaunchRequest, M1, M2, Meta, Revoke, Signed, check_fresh, check_name, label,
};
use caas_attest::store::{AttestStore, AuditRecord, HostState, get_host, get_profile};
use caas_attest::structures::Public;
use caas_attest::tls_binding::TlsClient;
use caas_attest::{SecurityProfile, Verdict, appraise, b64};
use std::collections::BTreeSet;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Store kinds.
pub const KIND_ACL: &str = "tl_acl";
/// Domain ownership records.
pub const KIND_DOMAIN: &str = "tl_domain";
/// TL sessions.
pub const KIND_SESSION: &str = "tl_session";
/// Used nonces.
pub const KIND_NONCE: &str = "tl_nonce";
/// The last revocation sequence number issued per host.
pub const KIND_REVOKE_SEQ: &str = "tl_revoke_seq";
/// DBSP volume epoch anchors, per (domain, SR, volume instance).
pub const KIND_VOLUME_EPOCH: &str = "tl_volume_epoch";
/// Suspended workloads: the suspend counter per (H2, id_vm) and whether its latest saved
/// state was resumed.
pub const KIND_SUSPEND: &str = "tl_suspend";

/// What the TTP keeps of a workload's suspends ([`Ttp::suspend`], [`Ttp::resume`]). The
/// state key itself is never stored: K_s = HMAC(K_TTP-derived key, H2 ‖ id_vm ‖ counter).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SuspendRecord {
    /// id_vm.
    pub vm_id: String,
    /// H2 of the owner.
    pub h2: String,
    /// The workload's security profile: only a host appraised under it may resume.
    pub sp: String,
    /// D_vm.
    pub domains: Vec<String>,
    /// The latest suspend counter: only the state saved under it can be resumed.
    pub counter: u64,
    /// The host that suspended it.
    pub suspended_on: String,
    /// The host its key was released to for a resume: the only host that may resume it.
    #[serde(default)]
    pub resumed_on: Option<String>,
    /// Unix ms of the last change.
    pub time_ms: u64,
    /// The TL session that suspended it: the resumed session replaces it (retired at the
    /// resumed session's first epoch anchor, as a migration's source session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// The store id of a volume's epoch anchor: the instance is named by its c4.
fn anchor_id(domain: &str, sr: &str, c4: &[u8]) -> String {
    format!("{domain}/{sr}/{}", hexs(&crate::crypto::sha256(c4)[..16]))
}

/// One ACL entry: the domains a domain manager (identified by H2 = SHA-256(pk_DM)) may give
/// its workloads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AclEntry {
    /// H2 of the DM (hex).
    pub dm: String,
    /// Free text.
    #[serde(default)]
    pub label: String,
    /// Domains.
    pub domains: Vec<String>,
}

/// A TL session: what the TTP remembers about a launched workload. Sessions are keyed by
/// (host, id_vm, r of the TL.Request): r is consumed once, so a later launch of the same
/// id_vm on the same host — by the same DM, another DM or the scheduler — gets a session of
/// its own and can never replace a live one (its DK_i, H2 or D_vm).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// Host.
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// r of the launching TL.Request (hex).
    pub launch_r: String,
    /// H2 of the launching DM.
    pub h2: String,
    /// SP.
    pub sp: String,
    /// D_vm.
    pub domains: Vec<String>,
    /// DK_i wrapped under a key derived from K_TTP.
    #[serde(with = "b64")]
    pub dk_wrapped: Vec<u8>,
    /// The bind key c2 was sealed to (c3 goes to the same key).
    #[serde(with = "b64")]
    pub bind_public: Vec<u8>,
    /// Unix ms.
    pub created_ms: u64,
    /// A migration's target session: the source's session it replaces, retired when this
    /// one first anchors a volume's epoch ([`Ttp::epoch_report`]: the target opened the
    /// volume, so the source committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// Set when the workload moved away (Unix ms): DomKeyReq, EpochReport, suspend and
    /// migrate on this session are refused (`session_retired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_ms: Option<u64>,
}

/// The TTP.
pub struct Ttp<S> {
    store: Arc<S>,
    keys: TtpKeys,
    nonce_lock: InFlight,
    /// Network domains a member left while a request of theirs held the lock.
    net_dirty: InFlight,
    /// One rekey or key release of a network domain at a time ([`netkey`]).
    net_locks: NetLocks,
    /// Network keys: a new epoch when the current one is this old ([`netkey`]).
    net_rekey_after_ms: u64,
}

pub mod netkey;

/// Nonces whose replay check (a store get, then a put) is in progress on this node: a
/// concurrent second use of the same nonce is refused instead of racing the store.
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<std::collections::HashSet<String>>);

impl InFlight {
    /// Marks `id` in flight for as long as the returned guard lives; `None` if it already
    /// is. The guard clears the mark when dropped, also when the request holding it is
    /// abandoned mid-flight (its client went away and the server dropped the handler's
    /// future), so an abandoned request never leaves `id` marked for good.
    fn hold(&self, id: &str) -> Option<Held<'_>> {
        let fresh = self
            .0
            .lock()
            .map(|mut s| s.insert(id.to_string()))
            .unwrap_or(false);
        fresh.then(|| Held {
            set: self,
            id: id.to_string(),
        })
    }
    /// Marks `id` (idempotent).
    fn mark(&self, id: &str) {
        if let Ok(mut s) = self.0.lock() {
            s.insert(id.to_string());
        }
    }
    /// Whether `id` is marked.
    fn contains(&self, id: &str) -> bool {
        self.0.lock().map(|s| s.contains(id)).unwrap_or(true)
    }
    /// Clears `id`, saying whether it was marked.
    fn take(&self, id: &str) -> bool {
        self.0.lock().map(|mut s| s.remove(id)).unwrap_or(true)
    }
}

/// An id held in flight ([`InFlight::hold`]); cleared on drop.
struct Held<'a> {
    set: &'a InFlight,
    id: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.0.lock() {
            s.remove(&self.id);
        }
    }
}

/// One async lock per network domain: a NetKeyReq waits for the one in flight (briefly,
/// [`NET_LOCK_WAIT`]); a rekey trigger (revocation, retirement, on demand) only tries it and
/// marks the domain dirty when it is held. Released when its guard drops — also when the
/// request's future is dropped (its client went away).
#[derive(Default)]
struct NetLocks(std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// How long a NetKeyReq waits for another request of its domain before `rekey_in_progress`.
const NET_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl NetLocks {
    fn of(&self, domain: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let mut g = self.0.lock().ok()?;
        Some(g.entry(domain.to_string()).or_default().clone())
    }

    /// The domain's lock if free now.
    fn try_lock(&self, domain: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.of(domain)?.try_lock_owned().ok()
    }

    /// The domain's lock, waiting up to `wait` for the request holding it.
    async fn lock(
        &self,
        domain: &str,
        wait: std::time::Duration,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        tokio::time::timeout(wait, self.of(domain)?.lock_owned())
            .await
            .ok()
    }
}

impl<S> std::fmt::Debug for Ttp<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ttp").finish_non_exhaustive()
    }
}

fn session_id(host: &str, vm_id: &str, launch_r: &[u8]) -> String {
    format!("{host}/{vm_id}/{}", hex::encode(launch_r))
}

fn hexs(b: &[u8]) -> String {
    hex::encode(b)
}

impl<S: AttestStore> Ttp<S> {
    /// A TTP over `store` with `keys`.
    pub fn new(store: Arc<S>, keys: TtpKeys) -> Self {
        Self {
            store,
            keys,
            nonce_lock: Default::default(),
            net_dirty: Default::default(),
            net_locks: Default::default(),
            net_rekey_after_ms: netkey::DEFAULT_REKEY_AFTER_MS,
        }
    }

    /// The same TTP, rekeying network domains every `ms` (`rekey_after`).
    #[must_use]
    pub fn with_net_rekey_after(mut self, ms: u64) -> Self {
        self.net_rekey_after_ms = ms.max(1);
        self
    }

    /// pk_TTP.
    pub fn public(&self) -> Result<TtpPublic> {
        self.keys.public()
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        kind: &'static str,
        id: &str,
    ) -> Result<Option<T>> {
        match self.store.get(kind, id).await? {
            Some(b) => Ok(Some(
                serde_json::from_slice(&b).map_err(|e| Error::Storage(format!("{kind}: {e}")))?,
            )),
            None => Ok(None),
        }
    }

    async fn put<T: serde::Serialize>(
        &self,
        kind: &'static str,
        id: &str,
        v: &T,
        audit: Option<AuditRecord>,
    ) -> Result<()> {
        Ok(self.store.put(kind, id, wire::to_bytes(v), audit).await?)
    }

    /// The prologue every AK-signed TTP request shares: parses `req`'s body as `B`, runs
    /// `inner` on it and audits the outcome as `B::OPERATION` under the body's host and
    /// subject (`?` when the body does not parse), `summary` describing a success.
    async fn audited<B: AuditedRequest, T>(
        &self,
        req: &AkSigned,
        inner: impl AsyncFnOnce(&B) -> Result<T>,
        summary: impl FnOnce(&T) -> String,
    ) -> Result<T> {
        let body: Result<B> = wire::parse(B::WHAT, &req.body);
        let (host, subject) = match &body {
            Ok(b) => (b.host().to_string(), b.subject()),
            Err(_) => ("?".into(), "?".into()),
        };
        let r = match body {
            Ok(b) => inner(&b).await,
            Err(e) => Err(e),
        };
        let detail = r.as_ref().map(summary).map_err(clone_err);
        self.audit(&host, B::OPERATION, &subject, &detail).await;
        r
    }

    /// Opens the part of a request protected under the workload's DK_i (DomKeyReq,
    /// NetKeyReq): `dk_invalid` when it was not sealed with this session's DK_i.
    fn open_under_dk(
        &self,
        sid: &str,
        session: &Session,
        aad: &[u8],
        enc: &[u8],
    ) -> Result<caas_crypto::SecretBytes> {
        let dk = self.open_dk(sid, &session.dk_wrapped)?;
        let dk = caas_crypto::SecretKey::from_slice(dk.expose())
            .map_err(|_| Error::Storage("DK".into()))?;
        caas_crypto::aead::open(&dk, aad, enc).map_err(|_| {
            Error::rejected(
                "dk_invalid",
                "the request is not protected with this workload's DK",
            )
        })
    }

    async fn audit(&self, principal: &str, operation: &str, subject: &str, r: &Result<String>) {
        let (result, detail) = match r {
            Ok(d) => ("ok".to_string(), d.clone()),
            Err(e) => (e.code().to_string(), e.to_string()),
        };
        let rec = AuditRecord {
            time_ms: caas_attest::now_ms(),
            principal: principal.into(),
            operation: operation.into(),
            subject: subject.into(),
            result,
            detail,
        };
        if let Err(e) = self.store.audit(rec).await {
            tracing::error!(error = %e, "TL audit record could not be written");
        }
    }

    /// An ACL change signed by the DM it is about ([`crate::wire::AclUpdate`]): the
    /// signature must verify under the `pk_dm` it names (`bad_signature`), be fresh
    /// (`stale_message`), and its nonce unused (`nonce_replayed`, recorded durably before the
    /// change). Every refusal is audited (`TlSetAcl`, with `principal`, the authenticated
    /// HTTP caller).
    pub async fn update_acl(
        &self,
        signed: &crate::wire::Signed,
        principal: &str,
        now_ms: u64,
    ) -> Result<AclEntry> {
        let claimed = signed.peek::<crate::wire::AclUpdate>(crate::wire::label::ACL_UPDATE);
        let subject = claimed
            .as_ref()
            .map_or_else(|_| "-".to_string(), |u| hexs(&sha256(&u.pk_dm)));
        let r = async {
            let u: crate::wire::AclUpdate =
                signed.open(&claimed?.pk_dm, crate::wire::label::ACL_UPDATE)?;
            crate::wire::check_fresh(u.time_ms, now_ms)?;
            self.consume_nonce("acl", &u.nonce).await?;
            Ok(u)
        }
        .await;
        match r {
            Ok(u) => {
                self.set_acl(&u.pk_dm, &u.label, &u.domains, principal)
                    .await
            }
            Err(e) => {
                self.audit(principal, "TlSetAcl", &subject, &Err(clone_err(&e)))
                    .await;
                Err(e)
            }
        }
    }

    /// Records the ACL of a domain manager: `pk_dm` may give its workloads `domains`. A
    /// domain belongs to the first DM that registers it; registering another DM's domain is
    /// refused (`domain_owned`). Callers outside the TTP use [`Ttp::update_acl`] (the
    /// change signed by the DM); this is for in-process set-ups (benchmarks).
    pub async fn set_acl(
        &self,
        pk_dm: &[u8],
        label_text: &str,
        domains: &[String],
        principal: &str,
    ) -> Result<AclEntry> {
        if pk_dm.len() != 32 {
            return Err(Error::malformed(
                "pk_DM",
                "Ed25519 public keys are 32 bytes",
            ));
        }
        let h2 = hexs(&sha256(pk_dm));
        let set: BTreeSet<String> = domains.iter().cloned().collect();
        for d in &set {
            check_name("domain", d)?;
            if let Some(owner) = self.get::<String>(KIND_DOMAIN, d).await?
                && owner != h2
            {
                let e = Error::rejected(
                    "domain_owned",
                    format!("domain {d} belongs to another domain manager"),
                );
                self.audit(principal, "TlSetAcl", &h2, &Err(clone_err(&e)))
                    .await;
                return Err(e);
            }
        }
        for d in &set {
            self.put(KIND_DOMAIN, d, &h2, None).await?;
        }
        let entry = AclEntry {
            dm: h2.clone(),
            label: label_text.chars().take(128).collect(),
            domains: set.into_iter().collect(),
        };
        let audit = AuditRecord {
            time_ms: caas_attest::now_ms(),
            principal: principal.into(),
            operation: "TlSetAcl".into(),
            subject: h2.clone(),
            result: "ok".into(),
            detail: entry.domains.join(","),
        };
        self.put(KIND_ACL, &h2, &entry, Some(audit)).await?;
        Ok(entry)
    }

    /// The ACL entry of a DM (by H2 hex).
    pub async fn acl(&self, h2: &str) -> Result<Option<AclEntry>> {
        self.get(KIND_ACL, h2).await
    }

    /// Consumes a nonce: refused if seen before (durably recorded first).
    async fn consume_nonce(&self, scope: &str, r: &[u8]) -> Result<()> {
        if r.len() != 32 {
            return Err(Error::malformed("r", "nonces are 32 bytes"));
        }
        let id = format!("{scope}-{}", hexs(r));
        let Some(_held) = self.nonce_lock.hold(&id) else {
            return Err(Error::rejected(
                "nonce_replayed",
                "this message was already seen",
            ));
        };
        if self.store.get(KIND_NONCE, &id).await?.is_some() {
            return Err(Error::rejected(
                "nonce_replayed",
                "this message was already seen",
            ));
        }
        self.put(KIND_NONCE, &id, &caas_attest::now_ms(), None)
            .await
    }

    /// Host, its AK and its profile, checking enrollment and that the request came over
    /// the TLS client identity the host enrolled with (`peer`; `caas_attest::tls_binding`).
    async fn host_context(
        &self,
        host: &str,
        peer: Option<&TlsClient>,
    ) -> Result<(caas_attest::store::HostRecord, Public, SecurityProfile)> {
        let h = self.enrolled_record(host).await?;
        // The channel is checked first: a caller on another host's certificate learns
        // nothing of this host's profile.
        caas_attest::tls_binding::check_request(&h, peer)
            .map_err(|r| Error::rejected(r.code, r.message))?;
        self.with_keys(h).await
    }

    /// Host, its AK and its profile, checking enrollment (a host the request is about, not
    /// the one that sent it: no TLS binding to check).
    async fn enrolled_host(
        &self,
        host: &str,
    ) -> Result<(caas_attest::store::HostRecord, Public, SecurityProfile)> {
        let h = self.enrolled_record(host).await?;
        self.with_keys(h).await
    }

    /// The record of an enrolled host.
    async fn enrolled_record(&self, host: &str) -> Result<caas_attest::store::HostRecord> {
        check_name("host", host)?;
        let h = get_host(&*self.store, host).await?.ok_or_else(|| {
            Error::rejected("host_unknown", format!("host {host} is not enrolled"))
        })?;
        if h.state != HostState::Enrolled {
            return Err(Error::rejected(
                "host_unknown",
                format!("host {host} is not enrolled"),
            ));
        }
        Ok(h)
    }

    /// An enrolled host's record with its AK and its security profile.
    async fn with_keys(
        &self,
        h: caas_attest::store::HostRecord,
    ) -> Result<(caas_attest::store::HostRecord, Public, SecurityProfile)> {
        let ak = Public::parse_tpm2b(&h.ak_public)?;
        let pname = h
            .profile
            .clone()
            .ok_or_else(|| Error::rejected("sp_mismatch", "host has no security profile"))?;
        let profile = get_profile(&*self.store, &pname)
            .await?
            .ok_or_else(|| Error::rejected("sp_mismatch", "host's security profile is unknown"))?;
        Ok((h, ak, profile))
    }

    /// A request from `host`'s SC: over the certificate its enrollment bound (`peer`), from
    /// a host trusted by its latest attestation, whose AK quote over this request appraises
    /// fresh under its profile, with a nonce `r` this TTP never saw in `scope` (consumed
    /// durably). Returns the host, its AK, its profile and the verdict.
    #[allow(clippy::too_many_arguments)]
    async fn trusted_request(
        &self,
        host: &str,
        peer: Option<&TlsClient>,
        label_text: &str,
        req: &AkSigned,
        scope: &str,
        r: &[u8],
        now_ms: u64,
    ) -> Result<(
        caas_attest::store::HostRecord,
        Public,
        SecurityProfile,
        Verdict,
    )> {
        let (host, ak, profile) = self.host_context(host, peer).await?;
        if !host.trusted {
            return Err(Error::rejected(
                "host_untrusted",
                format!("host {} failed its latest attestation", host.name),
            ));
        }
        let verdict = self.appraise_fresh(&ak, label_text, req, &profile, now_ms)?;
        self.consume_nonce(scope, r).await?;
        Ok((host, ak, profile, verdict))
    }

    /// DK_i as a session record keeps it: wrapped under a key derived from K_TTP, bound to
    /// the session's id.
    fn wrap_dk(&self, sid: &str, dk: &[u8]) -> Result<Vec<u8>> {
        Ok(caas_crypto::aead::seal(
            &self.keys.derived("tl dk wrap")?,
            sid.as_bytes(),
            dk,
        )?)
    }

    /// DK_i of the session `sid` (see [`Self::wrap_dk`]).
    fn open_dk(&self, sid: &str, wrapped: &[u8]) -> Result<caas_crypto::SecretBytes> {
        Ok(caas_crypto::aead::open(
            &self.keys.derived("tl dk wrap")?,
            sid.as_bytes(),
            wrapped,
        )?)
    }

    /// Records a new TL session (a launch, a resume, a migration's target); never replaces
    /// one (`session_exists`): no code path can clobber a live session.
    async fn insert_session(&self, sid: &str, session: &Session) -> Result<()> {
        if self.store.get(KIND_SESSION, sid).await?.is_some() {
            return Err(Error::rejected(
                "session_exists",
                "a TL session with this id already exists",
            ));
        }
        self.put(KIND_SESSION, sid, session, None).await
    }

    /// The live TL session of `vm_id` launched on `host` with `launch_r`, owned by `h2`
    /// when given (`no_session`, `h2_mismatch` otherwise).
    async fn live_session(
        &self,
        host: &str,
        vm_id: &str,
        launch_r: &[u8],
        h2: Option<&str>,
    ) -> Result<Session> {
        if launch_r.len() != 32 {
            return Err(Error::malformed("launch_r", "nonces are 32 bytes"));
        }
        let sid = session_id(host, vm_id, launch_r);
        let session: Session = self.get(KIND_SESSION, &sid).await?.ok_or_else(|| {
            Error::rejected(
                "no_session",
                format!("no trusted launch of {vm_id} on {host}"),
            )
        })?;
        if session.retired_ms.is_some() {
            return Err(Error::rejected(
                "session_retired",
                format!("{vm_id} migrated away from {host}: its session there is retired"),
            ));
        }
        if h2.is_some_and(|h2| session.h2 != h2) {
            return Err(Error::rejected(
                "h2_mismatch",
                "the request names another domain manager",
            ));
        }
        Ok(session)
    }

    /// A migration's target session anchored a volume: the target opened it after the
    /// source's commit, so the source's session (`session.replaces`) is retired for good
    /// (audited `TlSessionRetired`). Idempotent.
    async fn retire_replaced(&self, session: &Session, now_ms: u64) -> Result<()> {
        let Some(old_sid) = &session.replaces else {
            return Ok(());
        };
        let Some(mut old) = self.get::<Session>(KIND_SESSION, old_sid).await? else {
            return Ok(());
        };
        if old.retired_ms.is_some() {
            return Ok(());
        }
        old.retired_ms = Some(now_ms);
        self.put(KIND_SESSION, old_sid, &old, None).await?;
        if let Err(e) = self
            .net_member_left(|sid| sid == old_sid, "session retired", now_ms)
            .await
        {
            tracing::error!(session = %old_sid, error = %e, "network domains of a retired session not rekeyed");
        }
        self.audit(
            &session.host,
            "TlSessionRetired",
            old_sid,
            &Ok(format!("replaced by the session on {}", session.host)),
        )
        .await;
        Ok(())
    }

    fn appraise_fresh(
        &self,
        ak: &Public,
        label_text: &str,
        req: &AkSigned,
        profile: &SecurityProfile,
        now_ms: u64,
    ) -> Result<Verdict> {
        let nonce = ak_nonce(label_text, &req.body);
        let v = appraise(ak, &nonce, &req.evidence, profile, now_ms);
        if !v.trusted {
            return Err(Error::rejected(
                "attestation_failed",
                format!(
                    "host state does not match security profile {}: {}",
                    profile.name,
                    caas_attest::verifier::reason_codes(&v)
                ),
            ));
        }
        Ok(v)
    }

    /// TL.AttestRequest → TL.Attestation (AttestVerify, then AttestToken).
    ///
    /// `peer`: the TLS client certificate of the request's connection (`None` without TLS).
    pub async fn attest(
        &self,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        let body: Result<AttestRequest> = wire::parse("attest request", &req.body);
        let (host, subject, launch_r) = match &body {
            Ok(b) => (
                b.host.clone(),
                b.host.clone(),
                b.launch
                    .peek::<LaunchRequest>(label::LAUNCH_REQUEST)
                    .map(|l| hexs(&l.r))
                    .unwrap_or_default(),
            ),
            Err(_) => ("?".into(), "?".into(), String::new()),
        };
        let mut vm = String::new();
        let r = match body {
            Ok(b) => self.attest_inner(&b, req, peer, now_ms, &mut vm).await,
            Err(e) => Err(e),
        };
        let summary = r
            .as_ref()
            .map(|_| format!("vm {vm}, session launch r {launch_r}"))
            .map_err(clone_err);
        self.audit(&host, "TlAttest", &format!("{subject}/{vm}"), &summary)
            .await;
        r
    }

    async fn attest_inner(
        &self,
        b: &AttestRequest,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
        vm: &mut String,
    ) -> Result<Signed> {
        check_fresh(b.t_ms, now_ms)?;
        // σ_DM over TL.Request, by the key whose hash the DM put in m1 (checked below).
        let claimed: LaunchRequest = b.launch.peek(label::LAUNCH_REQUEST)?;
        let launch: LaunchRequest = b.launch.open(&claimed.pk_dm, label::LAUNCH_REQUEST)?;
        check_fresh(launch.t_ms, now_ms)?;
        let (host, ak, profile) = self.host_context(&b.host, peer).await?;
        // σ_AIK over the request and a fresh attestation of CH_i against SP_i.
        let verdict = self.appraise_fresh(&ak, label::ATTEST_REQUEST, req, &profile, now_ms)?;
        if launch.sp != profile.name {
            return Err(Error::rejected(
                "sp_mismatch",
                format!(
                    "host {} is appraised under {}, the DM requires {}",
                    host.name, profile.name, launch.sp
                ),
            ));
        }
        // pk_TPM: certified by the AK (σ_TCI) and bound to the PCR state just attested.
        check_bind_key_bound(&ak, &b.bind, &profile, &verdict)?;
        // Freshness of r (durable: replays are refused after restarts too).
        self.consume_nonce("tl", &launch.r).await?;
        // Dec_skTTP(c1) = m1.
        let m1_bytes = self.keys.open(label::M1.as_bytes(), &launch.c1)?;
        let m1: M1 = wire::parse("m1", m1_bytes.expose())?;
        check_name("vm_id", &m1.vm_id)?;
        *vm = m1.vm_id.clone();
        if m1.tau.len() != 32 {
            return Err(Error::malformed("m1", "τ must be 32 bytes"));
        }
        if m1.h2 != hexs(&sha256(&launch.pk_dm)) {
            return Err(Error::rejected(
                "h2_mismatch",
                "m1 names another domain manager's key",
            ));
        }
        if m1.sp != launch.sp {
            return Err(Error::rejected(
                "sp_mismatch",
                "m1 and the request name different profiles",
            ));
        }
        self.check_acl(&m1.h2, &m1.domains).await?;
        // AttestToken: DK_i, m2 sealed to pk_TPM.
        let dk = Zeroizing::new(random32()?);
        let m2 = M2 {
            tau: m1.tau.clone(),
            h1: m1.h1.clone(),
            h2: m1.h2.clone(),
            dk: dk.to_vec(),
            vm_id: m1.vm_id.clone(),
        };
        let m2_bytes = Zeroizing::new(wire::to_bytes(&m2));
        drop(m2);
        let c2 = seal_to_bind_key(
            &b.bind.public,
            &wire::m2_aad(&host.name, &launch.r),
            &m2_bytes,
        )?;
        let sid = session_id(&host.name, &m1.vm_id, &launch.r);
        let session = Session {
            host: host.name.clone(),
            vm_id: m1.vm_id.clone(),
            launch_r: hexs(&launch.r),
            h2: m1.h2.clone(),
            sp: m1.sp.clone(),
            domains: m1.domains.clone(),
            dk_wrapped: self.wrap_dk(&sid, &dk[..])?,
            bind_public: b.bind.public.clone(),
            created_ms: now_ms,
            replaces: None,
            retired_ms: None,
        };
        self.insert_session(&sid, &session).await?;
        let att = Attestation {
            host: host.name.clone(),
            r: launch.r.clone(),
            c2,
        };
        let body = wire::to_bytes(&att);
        Ok(Signed {
            sig: self.keys.sign(label::ATTESTATION, &body),
            body,
        })
    }

    async fn check_acl(&self, h2: &str, domains: &[String]) -> Result<()> {
        let acl = self.acl(h2).await?;
        for d in domains {
            check_name("domain", d)?;
            if !acl
                .as_ref()
                .is_some_and(|a| a.domains.iter().any(|x| x == d))
            {
                return Err(Error::rejected(
                    "acl_denied",
                    format!("the domain manager may not give access to domain {d}"),
                ));
            }
        }
        Ok(())
    }

    /// DBSP.DomKeyReq → DBSP.DomKeyGen response.
    ///
    /// `peer`: the TLS client certificate of the request's connection (`None` without TLS).
    pub async fn domkey(
        &self,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        self.audited(
            req,
            async |b: &DomKeyRequest| self.domkey_inner(b, req, peer, now_ms).await,
            |(_, dom)| format!("domain {dom}"),
        )
        .await
        .map(|(s, _)| s)
    }

    async fn domkey_inner(
        &self,
        b: &DomKeyRequest,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<(Signed, String)> {
        check_name("vm_id", &b.vm_id)?;
        check_name("sr", &b.sr)?;
        check_fresh(b.t_ms, now_ms)?;
        let (host, _, profile, _) = self
            .trusted_request(
                &b.host,
                peer,
                label::DOMKEY_REQUEST,
                req,
                "dbsp",
                &b.r,
                now_ms,
            )
            .await?;
        let session = self
            .live_session(&host.name, &b.vm_id, &b.launch_r, Some(&b.h2))
            .await?;
        let sid = session_id(&host.name, &b.vm_id, &b.launch_r);
        let inner_bytes = self.open_under_dk(&sid, &session, &b.inner_aad(), &b.enc)?;
        let inner: DomKeyInner = wire::parse("domkey inner", inner_bytes.expose())?;
        let Meta { domain, sp } = inner.meta.clone();
        check_name("domain", &domain)?;
        if sp != session.sp || sp != profile.name {
            return Err(Error::rejected(
                "sp_mismatch",
                format!(
                    "domain access requires {sp}; the host is appraised under {}",
                    profile.name
                ),
            ));
        }
        if !session.domains.iter().any(|d| d == &domain) {
            return Err(Error::rejected(
                "acl_denied",
                format!(
                    "workload {} was not launched with access to domain {domain}",
                    b.vm_id
                ),
            ));
        }
        self.check_acl(&session.h2, std::slice::from_ref(&domain))
            .await?;
        let k_enc = self.keys.derived("dbsp c4")?;
        let k_mac = self.keys.derived("dbsp mac")?;
        let c4_aad = lp(&[label::C4.as_bytes(), domain.as_bytes()]);
        let (n, c4, mu) = match (&inner.c4, &inner.mu) {
            (Some(c4), Some(mu)) => {
                let plain = caas_crypto::aead::open(&k_enc, &c4_aad, c4).map_err(|_| {
                    Error::rejected("c4_invalid", "c4 was altered or belongs to another domain")
                })?;
                let parts = crate::crypto::split_lp(plain.expose(), 2)
                    .ok_or_else(|| Error::rejected("c4_invalid", "c4 has a bad encoding"))?;
                let (n, sp_c4) = (parts[0].to_vec(), parts[1].to_vec());
                let expect = hmac(k_mac.expose(), &lp(&[domain.as_bytes(), &n, &sp_c4]));
                if !ct_eq(&expect, mu) {
                    return Err(Error::rejected("mu_invalid", "μ does not verify"));
                }
                if sp_c4 != sp.as_bytes() {
                    return Err(Error::rejected(
                        "sp_mismatch",
                        "the domain's volume was created for another security profile",
                    ));
                }
                (n, c4.clone(), mu.clone())
            }
            (None, None) => {
                let n = random32()?.to_vec();
                let c4 = caas_crypto::aead::seal(&k_enc, &c4_aad, &lp(&[&n, sp.as_bytes()]))?;
                let mu =
                    hmac(k_mac.expose(), &lp(&[domain.as_bytes(), &n, sp.as_bytes()])).to_vec();
                (n, c4, mu)
            }
            _ => return Err(Error::malformed("domkey inner", "c4 and μ come together")),
        };
        let k_prf = self.keys.derived("dbsp prf")?;
        let k = Zeroizing::new(hmac(
            k_prf.expose(),
            &lp(&[b"K", domain.as_bytes(), sp.as_bytes(), &n]),
        ));
        let ik = Zeroizing::new(hmac(k_prf.expose(), &lp(&[b"IK", domain.as_bytes(), &n])));
        let mut keys = Zeroizing::new(Vec::with_capacity(64));
        keys.extend_from_slice(&k[..]);
        keys.extend_from_slice(&ik[..]);
        let c3 = seal_to_bind_key(
            &session.bind_public,
            &DomKeyResponse::c3_aad(&host.name, &b.vm_id, &b.sr, &b.r),
            &keys,
        )?;
        // The volume's epoch anchor: created at 0 with the volume, raised by the SC's
        // AK-signed reports ([`Ttp::epoch_report`]).
        let aid = anchor_id(&domain, &b.sr, &c4);
        let min_epoch = match self.get::<u32>(KIND_VOLUME_EPOCH, &aid).await? {
            Some(e) => e,
            None => {
                self.put(KIND_VOLUME_EPOCH, &aid, &0u32, None).await?;
                0
            }
        };
        let resp = DomKeyResponse {
            host: host.name.clone(),
            vm_id: b.vm_id.clone(),
            sr: b.sr.clone(),
            r: b.r.clone(),
            meta: inner.meta,
            c3,
            c4,
            mu,
            min_epoch,
        };
        let body = wire::to_bytes(&resp);
        let signed = Signed {
            sig: self.keys.sign(label::DOMKEY_RESPONSE, &body),
            body,
        };
        Ok((signed, domain))
    }

    /// DBSP epoch report: a trusted host's SC reports the epoch a volume of a domain its
    /// workload may access was opened at; the anchor becomes the highest reported (it
    /// never goes down). Returns the anchor.
    ///
    /// `peer`: the TLS client certificate of the request's connection (`None` without TLS).
    pub async fn epoch_report(
        &self,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<u32> {
        self.audited(
            req,
            async |b: &wire::EpochReport| self.epoch_report_inner(b, req, peer, now_ms).await,
            |e| format!("epoch {e}"),
        )
        .await
    }

    async fn epoch_report_inner(
        &self,
        b: &wire::EpochReport,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<u32> {
        check_name("vm_id", &b.vm_id)?;
        check_name("domain", &b.domain)?;
        check_name("sr", &b.sr)?;
        check_fresh(b.t_ms, now_ms)?;
        let (host, _, _, _) = self
            .trusted_request(
                &b.host,
                peer,
                label::EPOCH_REPORT,
                req,
                "epoch",
                &b.r,
                now_ms,
            )
            .await?;
        let session = self
            .live_session(&host.name, &b.vm_id, &b.launch_r, None)
            .await?;
        if !session.domains.iter().any(|d| d == &b.domain) {
            return Err(Error::rejected(
                "acl_denied",
                format!(
                    "workload {} was not launched with access to domain {}",
                    b.vm_id, b.domain
                ),
            ));
        }
        let aid = anchor_id(&b.domain, &b.sr, &b.c4);
        let old: u32 = self.get(KIND_VOLUME_EPOCH, &aid).await?.ok_or_else(|| {
            Error::rejected("unknown_volume", "no key was issued for this volume")
        })?;
        let new = old.max(b.epoch);
        if new != old {
            self.put(KIND_VOLUME_EPOCH, &aid, &new, None).await?;
        }
        self.retire_replaced(&session, now_ms).await?;
        Ok(new)
    }

    /// Live migration, step 1 (`docs/suspend-migrate.md`): the source SC's AK-signed
    /// [`MigrateRequest`] → a [`MigrationStatement`] signed by sk_TTP. Refused unless the
    /// source is trusted, its fresh quote appraises and the workload's session exists with
    /// that H2; and the target is another enrolled host, trusted by its latest attestation,
    /// appraised under the workload's security profile (`sp_mismatch` otherwise), with a
    /// bind key certified by its AK and bound to the PCR values of that attestation. On
    /// success the workload gets a session on the target (launch_r = the migration id, the
    /// same H2, SP and D_vm, a new DK_i sealed to the target's bind key) so the target can
    /// take over its DBSP volumes. That session replaces the source's, which is retired at
    /// the target's first epoch report (the target opened a volume: the source committed);
    /// a migration refused half-way leaves the source's session live. Audited (`TlMigrate`)
    /// either way.
    /// `peer`: the TLS client certificate of the request's connection (the source's; `None`
    /// without TLS).
    pub async fn migrate(
        &self,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        self.audited(
            req,
            async |b: &MigrateRequest| self.migrate_inner(b, req, peer, now_ms).await,
            |s| {
                s.peek::<MigrationStatement>(label::MIGRATE_STATEMENT)
                    .map(|st| format!("migration {}, profile {}", hexs(&st.migration_id), st.sp))
                    .unwrap_or_default()
            },
        )
        .await
    }

    async fn migrate_inner(
        &self,
        b: &MigrateRequest,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        check_name("vm_id", &b.vm_id)?;
        check_name("host", &b.target)?;
        check_fresh(b.t_ms, now_ms)?;
        if b.launch_r.len() != 32 {
            return Err(Error::malformed("launch_r", "nonces are 32 bytes"));
        }
        let (source, _, _, _) = self
            .trusted_request(
                &b.source,
                peer,
                label::MIGRATE_REQUEST,
                req,
                "migrate",
                &b.r,
                now_ms,
            )
            .await?;
        let session = self
            .live_session(&source.name, &b.vm_id, &b.launch_r, Some(&b.h2))
            .await?;
        if b.target == source.name {
            return Err(Error::rejected(
                "host_mismatch",
                "a workload does not migrate to its own host",
            ));
        }
        // The target: enrolled, trusted now, in the workload's profile, its bind key bound
        // to the state that was appraised.
        let (target, t_ak, t_profile) = self.enrolled_host(&b.target).await.map_err(|e| {
            if e.code() == "sp_mismatch" {
                Error::rejected(
                    "sp_mismatch",
                    format!(
                        "host {} is outside the workload's security profile {}",
                        b.target, session.sp
                    ),
                )
            } else {
                e
            }
        })?;
        if t_profile.name != session.sp {
            return Err(Error::rejected(
                "sp_mismatch",
                format!(
                    "host {} is appraised under {}, the workload requires {}",
                    target.name, t_profile.name, session.sp
                ),
            ));
        }
        let verdict = target
            .last_verdict
            .as_ref()
            .filter(|v| target.trusted && v.trusted && v.profile == session.sp)
            .ok_or_else(|| {
                Error::rejected(
                    "host_untrusted",
                    format!(
                        "host {} is not trusted under {} by its latest attestation",
                        target.name, session.sp
                    ),
                )
            })?;
        let bind = target.bind_key.as_ref().ok_or_else(|| {
            Error::rejected("bind_key_missing", "the target presented no bind key")
        })?;
        check_bind_key_bound(&t_ak, bind, &t_profile, verdict)?;
        // The workload's session on the target, named by the migration id.
        let migration_id = random32()?.to_vec();
        let dk = Zeroizing::new(random32()?);
        let c_dk = seal_to_bind_key(
            &bind.public,
            &crate::migrate::dk_aad(&target.name, &migration_id),
            &dk[..],
        )?;
        let tsid = session_id(&target.name, &b.vm_id, &migration_id);
        let t_session = Session {
            host: target.name.clone(),
            vm_id: b.vm_id.clone(),
            launch_r: hexs(&migration_id),
            h2: session.h2.clone(),
            sp: session.sp.clone(),
            domains: session.domains.clone(),
            dk_wrapped: self.wrap_dk(&tsid, &dk[..])?,
            bind_public: bind.public.clone(),
            created_ms: now_ms,
            replaces: Some(session_id(&source.name, &b.vm_id, &b.launch_r)),
            retired_ms: None,
        };
        self.insert_session(&tsid, &t_session).await?;
        let st = MigrationStatement {
            migration_id,
            source: source.name.clone(),
            target: target.name.clone(),
            vm_id: b.vm_id.clone(),
            h2: session.h2.clone(),
            sp: session.sp.clone(),
            domains: session.domains.clone(),
            target_bind: bind.public.clone(),
            c_dk,
            r: b.r.clone(),
            t_ms: now_ms,
        };
        let body = wire::to_bytes(&st);
        Ok(Signed {
            sig: self.keys.sign(label::MIGRATE_STATEMENT, &body),
            body,
        })
    }

    /// K_s of (H2, id_vm, counter): derived, never stored.
    fn state_key(&self, h2: &str, vm_id: &str, counter: u64) -> Result<Zeroizing<[u8; 32]>> {
        let k = self.keys.derived("tl suspend state key")?;
        Ok(Zeroizing::new(hmac(
            k.expose(),
            &lp(&[h2.as_bytes(), vm_id.as_bytes(), &counter.to_be_bytes()]),
        )))
    }

    /// Suspend (seed 001 §3.4 "Suspension"; `docs/suspend-migrate.md`): the SC of a trusted
    /// host whose fresh quote appraises, running a live TL session of the workload (H2 must
    /// match), gets the key of a NEW saved state: the workload's suspend counter goes up by
    /// one (durably, before the key is released), so every older saved state is refused at
    /// resume; K_s is sealed to the session's bind key. Audited (`TlSuspend`).
    pub async fn suspend(
        &self,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        self.audited(
            req,
            async |b: &wire::SuspendRequest| self.suspend_inner(b, req, peer, now_ms).await,
            |(_, n)| format!("suspend counter {n}"),
        )
        .await
        .map(|(s, _)| s)
    }

    async fn suspend_inner(
        &self,
        b: &wire::SuspendRequest,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<(Signed, u64)> {
        check_name("vm_id", &b.vm_id)?;
        check_fresh(b.t_ms, now_ms)?;
        let (host, _, profile, _) = self
            .trusted_request(
                &b.host,
                peer,
                label::SUSPEND_REQUEST,
                req,
                "suspend",
                &b.r,
                now_ms,
            )
            .await?;
        let session = self
            .live_session(&host.name, &b.vm_id, &b.launch_r, Some(&b.h2))
            .await?;
        if session.sp != profile.name {
            return Err(Error::rejected(
                "sp_mismatch",
                "the host is no longer appraised under the workload's profile",
            ));
        }
        let rid = format!("{}/{}", session.h2, session.vm_id);
        let Some(_held) = self.nonce_lock.hold(&rid) else {
            return Err(Error::rejected(
                "suspend_in_progress",
                "another suspend or resume of this workload is in progress",
            ));
        };
        async {
            let old: Option<SuspendRecord> = self.get(KIND_SUSPEND, &rid).await?;
            let counter = old.map_or(0, |o| o.counter).saturating_add(1);
            let rec = SuspendRecord {
                vm_id: session.vm_id.clone(),
                h2: session.h2.clone(),
                sp: session.sp.clone(),
                domains: session.domains.clone(),
                counter,
                suspended_on: host.name.clone(),
                resumed_on: None,
                time_ms: now_ms,
                session: Some(session_id(&host.name, &b.vm_id, &b.launch_r)),
            };
            // The counter is durable before any key for it exists.
            self.put(KIND_SUSPEND, &rid, &rec, None).await?;
            let k_s = self.state_key(&rec.h2, &rec.vm_id, counter)?;
            let sealed = seal_to_bind_key(
                &session.bind_public,
                &wire::StateKeyGrant::sealed_aad(&host.name, &rec.vm_id, counter, &b.r),
                &k_s[..],
            )?;
            let grant = wire::StateKeyGrant {
                host: host.name.clone(),
                vm_id: rec.vm_id,
                h2: rec.h2,
                counter,
                sp: rec.sp,
                domains: rec.domains,
                r: b.r.clone(),
                sealed,
            };
            let body = wire::to_bytes(&grant);
            Ok((
                Signed {
                    sig: self.keys.sign(label::STATE_KEY, &body),
                    body,
                },
                counter,
            ))
        }
        .await
    }

    /// Resume: the SC of a host that is enrolled, trusted, appraised NOW under the
    /// workload's security profile (the one it was launched under) and whose bind key is
    /// certified by its AK and bound to the attested PCR state, gets K_s of the saved state
    /// (H2, id_vm, counter) — only for the latest counter (`state_replayed` for an older
    /// one) and only on the first host that asked (`state_replayed` on any other: no
    /// fork) — and DK_i of a new TL
    /// session (host, id_vm, r), both sealed to that bind key. The ACL must still grant
    /// D_vm. Audited (`TlResume`).
    pub async fn resume(
        &self,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        self.audited(
            req,
            async |b: &wire::ResumeRequest| self.resume_inner(b, req, peer, now_ms).await,
            |_| "state key released".to_string(),
        )
        .await
    }

    async fn resume_inner(
        &self,
        b: &wire::ResumeRequest,
        req: &AkSigned,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<Signed> {
        check_name("vm_id", &b.vm_id)?;
        check_fresh(b.t_ms, now_ms)?;
        let (host, ak, profile, verdict) = self
            .trusted_request(
                &b.host,
                peer,
                label::RESUME_REQUEST,
                req,
                "resume",
                &b.r,
                now_ms,
            )
            .await?;
        check_bind_key_bound(&ak, &b.bind, &profile, &verdict)?;
        let rid = format!("{}/{}", b.h2, b.vm_id);
        let Some(_held) = self.nonce_lock.hold(&rid) else {
            return Err(Error::rejected(
                "suspend_in_progress",
                "another suspend or resume of this workload is in progress",
            ));
        };
        async {
            let mut rec: SuspendRecord = self.get(KIND_SUSPEND, &rid).await?.ok_or_else(|| {
                Error::rejected("no_saved_state", format!("{} was never suspended", b.vm_id))
            })?;
            if rec.sp != profile.name {
                return Err(Error::rejected(
                    "sp_mismatch",
                    format!(
                        "the workload needs a host appraised under {}; {} is under {}",
                        rec.sp, host.name, profile.name
                    ),
                ));
            }
            // The latest state only; and once a host got its key, no other host does (no
            // fork). That host may ask again (a resume that failed half-way, e.g. on a
            // tampered object); its agent refuses to resume a state twice.
            if b.counter != rec.counter || rec.resumed_on.as_deref().is_some_and(|h| h != host.name)
            {
                return Err(Error::rejected(
                    "state_replayed",
                    format!(
                        "saved state {} of {} is not the latest, or was resumed elsewhere",
                        b.counter, b.vm_id
                    ),
                ));
            }
            self.check_acl(&rec.h2, &rec.domains).await?;
            // The new TL session of the resumed workload on this host (DBSP, later suspends).
            let sid = session_id(&host.name, &rec.vm_id, &b.r);
            let dk = Zeroizing::new(random32()?);
            let session = Session {
                host: host.name.clone(),
                vm_id: rec.vm_id.clone(),
                launch_r: hexs(&b.r),
                h2: rec.h2.clone(),
                sp: rec.sp.clone(),
                domains: rec.domains.clone(),
                dk_wrapped: self.wrap_dk(&sid, &dk[..])?,
                bind_public: b.bind.public.clone(),
                created_ms: now_ms,
                replaces: rec.session.clone(),
                retired_ms: None,
            };
            self.insert_session(&sid, &session).await?;
            // Consumed durably before the key leaves: a second resume (a fork) is refused.
            rec.resumed_on = Some(host.name.clone());
            rec.time_ms = now_ms;
            self.put(KIND_SUSPEND, &rid, &rec, None).await?;
            let k_s = self.state_key(&rec.h2, &rec.vm_id, rec.counter)?;
            let mut both = Zeroizing::new(Vec::with_capacity(64));
            both.extend_from_slice(&k_s[..]);
            both.extend_from_slice(&dk[..]);
            let sealed = seal_to_bind_key(
                &b.bind.public,
                &wire::StateKeyGrant::sealed_aad(&host.name, &rec.vm_id, rec.counter, &b.r),
                &both,
            )?;
            let grant = wire::StateKeyGrant {
                host: host.name.clone(),
                vm_id: rec.vm_id,
                h2: rec.h2,
                counter: rec.counter,
                sp: rec.sp,
                domains: rec.domains,
                r: b.r.clone(),
                sealed,
            };
            let body = wire::to_bytes(&grant);
            Ok(Signed {
                sig: self.keys.sign(label::STATE_KEY, &body),
                body,
            })
        }
        .await
    }

    /// A signed notice telling `host` to drop its crypto domains' keys. Its sequence
    /// number is `max(last + 1, now_ms)` per host, recorded (with a `TlRevoke` audit
    /// record) before the notice is returned: strictly increasing even if the record were
    /// lost, as long as the clock does not go back. Two concurrent revocations of one host
    /// may get the same number; the host applies the first and refuses the second as a
    /// replay, which has the same effect.
    pub async fn revoke_notice(&self, host: &str, reason: &str, now_ms: u64) -> Result<Signed> {
        check_name("host", host)?;
        let last: u64 = self.get(KIND_REVOKE_SEQ, host).await?.unwrap_or(0);
        let seq = last.saturating_add(1).max(now_ms);
        let audit = AuditRecord {
            time_ms: caas_attest::now_ms(),
            principal: "ttp".into(),
            operation: "TlRevoke".into(),
            subject: host.into(),
            result: "ok".into(),
            detail: format!(
                "seq {seq}: {}",
                reason.chars().take(200).collect::<String>()
            ),
        };
        self.put(KIND_REVOKE_SEQ, host, &seq, Some(audit)).await?;
        // The host left: every network domain it held a key of gets a new epoch it will
        // not receive (it is untrusted now).
        // (A failure here does not hold back the notice: the TTP refuses the host every
        // key anyway.)
        if let Err(e) = self
            .net_member_left(
                |sid| sid.starts_with(&format!("{host}/")),
                "host revoked",
                now_ms,
            )
            .await
        {
            tracing::error!(%host, error = %e, "network domains of a revoked host not rekeyed");
        }
        let body = wire::to_bytes(&Revoke {
            host: host.into(),
            seq,
            t_ms: now_ms,
            reason: reason.into(),
        });
        Ok(Signed {
            sig: self.keys.sign(label::REVOKE, &body),
            body,
        })
    }
}

/// pk_TPM is certified by `ak` (σ_TCI) and its authPolicy is PolicyPCR over the PCR values
/// of `verdict` for `profile`'s selection: usable only in the state that was appraised.
fn check_bind_key_bound(
    ak: &Public,
    bind: &caas_attest::store::BindKeyRecord,
    profile: &SecurityProfile,
    verdict: &Verdict,
) -> Result<()> {
    let key = caas_attest::registrar::check_bind_key(ak, bind)?;
    let sel = profile.selection();
    let mut values = Vec::new();
    for p in &sel.pcrs {
        let v = verdict
            .pcrs
            .get(p)
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| {
                Error::rejected("bind_key_not_bound", "attested PCR values are incomplete")
            })?;
        values.push(v);
    }
    if !ct_eq(&key.auth_policy, &policy_pcr_digest(&sel, &values)) {
        return Err(Error::rejected(
            "bind_key_not_bound",
            "the bind key is not bound to the attested PCR state",
        ));
    }
    Ok(())
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::Rejected { code, detail } => Error::Rejected {
            code,
            detail: detail.clone(),
        },
        Error::Malformed { what, detail } => Error::Malformed {
            what,
            detail: detail.clone(),
        },
        Error::NotFound { kind, id } => Error::NotFound {
            kind,
            id: id.clone(),
        },
        Error::Crypto(s) => Error::Crypto(s),
        Error::Storage(s) => Error::Storage(s.clone()),
    }
}

/// An AK-signed request body of the TTP's protocol, as [`Ttp::audited`] parses and audits it.
trait AuditedRequest: serde::de::DeserializeOwned {
    /// What a parse error calls the body.
    const WHAT: &'static str;
    /// The audit record's operation.
    const OPERATION: &'static str;
    /// The requesting host (the audit record's principal).
    fn host(&self) -> &str;
    /// The audit record's subject.
    fn subject(&self) -> String;
}

impl AuditedRequest for DomKeyRequest {
    const WHAT: &'static str = "domkey request";
    const OPERATION: &'static str = "DbspDomKey";
    fn host(&self) -> &str {
        &self.host
    }
    fn subject(&self) -> String {
        format!("{}/{}/{}", self.host, self.vm_id, self.sr)
    }
}

impl AuditedRequest for wire::EpochReport {
    const WHAT: &'static str = "epoch report";
    const OPERATION: &'static str = "DbspEpoch";
    fn host(&self) -> &str {
        &self.host
    }
    fn subject(&self) -> String {
        format!("{}/{}/{}/{}", self.host, self.vm_id, self.domain, self.sr)
    }
}

impl AuditedRequest for MigrateRequest {
    const WHAT: &'static str = "migrate request";
    const OPERATION: &'static str = "TlMigrate";
    fn host(&self) -> &str {
        &self.source
    }
    fn subject(&self) -> String {
        format!("{}/{} -> {}", self.source, self.vm_id, self.target)
    }
}

impl AuditedRequest for wire::SuspendRequest {
    const WHAT: &'static str = "suspend request";
    const OPERATION: &'static str = "TlSuspend";
    fn host(&self) -> &str {
        &self.host
    }
    fn subject(&self) -> String {
        format!("{}/{}", self.host, self.vm_id)
    }
}

impl AuditedRequest for wire::ResumeRequest {
    const WHAT: &'static str = "resume request";
    const OPERATION: &'static str = "TlResume";
    fn host(&self) -> &str {
        &self.host
    }
    fn subject(&self) -> String {
        format!("{}/{} counter {}", self.host, self.vm_id, self.counter)
    }
}

impl AuditedRequest for wire::NetLeaveRequest {
    const WHAT: &'static str = "netleave request";
    const OPERATION: &'static str = "NetLeave";
    fn host(&self) -> &str {
        &self.host
    }
    fn subject(&self) -> String {
        format!("{}/{} ({})", self.host, self.vm_id, self.why)
    }
}

impl AuditedRequest for wire::NetKeyRequest {
    const WHAT: &'static str = "netkey request";
    const OPERATION: &'static str = "NetKey";
    fn host(&self) -> &str {
        &self.host
    }
    fn subject(&self) -> String {
        format!("{}/{}/{}", self.host, self.vm_id, self.net_domain)
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    /// The attacker: a network client (or a management relay) that sends a workload's
    /// suspend or resume and hangs up while the TTP holds the workload's lock, so that the
    /// server drops the handler's future mid-flight. With the former begin/end pair the
    /// workload stayed "in progress" for good — every later suspend or resume of it refused
    /// `suspend_in_progress`, and every abandoned nonce check stayed in memory. The guard
    /// clears the mark when the future is dropped.
    #[test]
    fn a_request_abandoned_mid_flight_does_not_leave_its_workload_locked() {
        let lock = InFlight::default();
        {
            let handler = async {
                let Some(_held) = lock.hold("h2/vm-a") else {
                    return false;
                };
                // The store write the handler waits on when its client hangs up.
                std::future::pending::<()>().await;
                true
            };
            let mut handler = pin!(handler);
            let mut cx = Context::from_waker(Waker::noop());
            assert!(handler.as_mut().poll(&mut cx).is_pending());
            assert!(lock.contains("h2/vm-a"), "held while in flight");
            assert!(
                lock.hold("h2/vm-a").is_none(),
                "a concurrent second suspend of the workload is refused"
            );
        } // the server drops the abandoned handler's future here
        assert!(!lock.contains("h2/vm-a"));
        assert!(
            lock.hold("h2/vm-a").is_some(),
            "the workload can be suspended or resumed again"
        );
    }
}
