//! The TTP and scheduler HTTP routes (feature `service`): the key service mounts
//! [`router`]; a benchmark or test can mount it over any [`AttestStore`].
//!
//! Routes (JSON): `GET /v1/tl/ttp` (pk_TTP), `POST /v1/tl/attest` (TL.AttestRequest →
//! TL.Attestation), `POST /v1/tl/domkey` (DBSP.DomKeyReq → DomKeyGen), `POST /v1/tl/epoch`
//! (the SC's AK-signed report of a DBSP volume's opened epoch → its anchor), `POST /v1/tl/migrate`
//! (live migration: the source SC's AK-signed request → the TTP's statement on the target),
//! `POST /v1/tl/suspend` and `POST /v1/tl/resume` (AK-signed: a saved state's key, sealed to the
//! host's bind key, `docs/suspend-migrate.md`), `POST /v1/tl/netkey` (AK-signed NetKeyReq →
//! the network domain's current key sealed to the bind key, [`crate::ttp::netkey`]),
//! `POST /v1/tl/netkey/leave` (AK-signed: a stopped or suspended workload's session ends,
//! its network domains rekeyed), `POST /v1/tl/netkey/rekey` (an operator's on-demand new epoch of a network domain), `PUT /v1/tl/acl`
//! (which domains a DM may give: a [`crate::wire::AclUpdate`] signed by that DM), `GET /v1/tl/hosts/{name}/bind-info` (a host's
//! certified bind key and trusted PCR values, seed 001 Algorithm 1 line 1), and the
//! scheduler `POST /v1/sched/launch` (places a TL.Request on a trusted host of its SP),
//! `POST /v1/sched/migrate` (asks a workload's host to migrate it, [`crate::migrate`]),
//! `POST /v1/sched/suspend` and `POST /v1/sched/resume` (forwarded to a host agent).
//!
//! Authentication is the key service's (`caas/src/key_service/auth.rs`): pk_TTP is public;
//! `attest`, `domkey`, `epoch`, `migrate`, `suspend`, `resume`, `netkey` and `netkey/leave` carry the host's AK signature (its identity) and, over
//! TLS, must come with the client certificate the host's enrollment bound to that AK
//! (`caas_attest::tls_binding`, checked by the TTP); the ACL change is
//! signed by the DM it is about ([`crate::ttp::Ttp::update_acl`]) and sent by a
//! SigV4-authenticated caller, whose principal the handler audits; bind info and the
//! scheduler need SigV4 (tenants or operators).
use crate::dm::HostBindInfo;
use crate::ttp::Ttp;
use crate::wire::{AkSigned, LaunchCall, LaunchRequest, Signed, label};
use crate::{TtpKeys, TtpPublic};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use caas_attest::store::{AttestStore, HostState, get_host, list_hosts};
use caas_attest::tls_binding::TlsClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// TTP + scheduler state.
pub struct TlService<S> {
    /// The TTP.
    pub ttp: Ttp<S>,
    store: Arc<S>,
    http: caas_attest::client::HttpClient,
    next: AtomicUsize,
    /// Placement data of network domains: N → id_vm → (its host's agent URL, the member);
    /// kept in the store (one [`NetDomainRecord`] per N, [`KIND_NET_PLACEMENT`]), read back
    /// on first use after a restart ([`Self::net_lock`]).
    net: tokio::sync::Mutex<NetPlacements>,
    /// Whether `net` was read from the store.
    net_loaded: std::sync::atomic::AtomicBool,
    /// Held across a whole [`Self::net_push`]: pushes of concurrent joins and leaves are
    /// serialised, so the last list an agent gets is the newest (never an older snapshot
    /// delivered after a newer one).
    net_push: tokio::sync::Mutex<()>,
    /// Whether revocation notices are sent to the agents (tests turn it off to stand for a
    /// compromised host that drops or ignores its notice; the TTP's side is unchanged).
    deliver_revocations: bool,
}

/// N → id_vm → (agent URL, member).
type NetPlacements = std::collections::HashMap<
    String,
    std::collections::BTreeMap<String, (String, crate::wire::NetMember)>,
>;

/// Store kind of the scheduler's placement data of network domains (one record per N).
pub const KIND_NET_PLACEMENT: &str = "sched_net_members";
/// The most members of one network domain the scheduler keeps (and reads back).
const MAX_NET_MEMBERS: usize = 1024;
/// The most network domains read back from the store.
const MAX_NET_DOMAINS: usize = 65536;
/// The largest stored record read back (bytes).
const MAX_NET_RECORD: usize = 1 << 20;

/// One network domain's members as stored (untrusted when read back: typed, checked,
/// bounded by [`NetDomainRecord::check`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDomainRecord {
    /// N.
    pub net_domain: String,
    /// Its members with the agent URL of the host each runs on.
    pub members: Vec<NetPlacement>,
}

/// A member of N where it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetPlacement {
    /// The agent of its host (`http://` or `https://`, as enrolled).
    pub agent_url: String,
    /// The member.
    pub member: crate::wire::NetMember,
}

impl NetDomainRecord {
    /// Checks a record read back from the store (or about to be written): N's name, at
    /// most `MAX_NET_MEMBERS` members, each with a valid id_vm, an agent URL of a
    /// bounded size and scheme, no id_vm or sender id twice.
    ///
    /// # Errors
    /// `malformed` naming what is wrong.
    pub fn check(&self) -> Result<(), crate::Error> {
        crate::wire::check_name("net_domain", &self.net_domain)?;
        if self.members.len() > MAX_NET_MEMBERS {
            return Err(crate::Error::malformed(
                "network placement",
                "too many members",
            ));
        }
        let (mut vms, mut senders) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for p in &self.members {
            crate::wire::check_name("vm_id", &p.member.vm_id)?;
            let url_ok = p.agent_url.len() <= 512
                && (p.agent_url.starts_with("http://") || p.agent_url.starts_with("https://"))
                && p.agent_url.bytes().all(|c| c.is_ascii_graphic());
            if !url_ok {
                return Err(crate::Error::malformed(
                    "network placement",
                    "bad agent URL",
                ));
            }
            if !vms.insert(p.member.vm_id.as_str()) || !senders.insert(p.member.sender) {
                return Err(crate::Error::malformed(
                    "network placement",
                    "a member or a sender id twice",
                ));
            }
        }
        Ok(())
    }

    /// Parses and checks a stored record.
    ///
    /// # Errors
    /// `malformed`: too large, not a record, or [`Self::check`] fails.
    pub fn from_stored(raw: &[u8]) -> Result<Self, crate::Error> {
        if raw.len() > MAX_NET_RECORD {
            return Err(crate::Error::malformed("network placement", "too large"));
        }
        let r: Self = serde_json::from_slice(raw)
            .map_err(|e| crate::Error::malformed("network placement", e.to_string()))?;
        r.check()?;
        Ok(r)
    }
}

impl<S> std::fmt::Debug for TlService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlService").finish_non_exhaustive()
    }
}

struct ApiError(crate::Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use caas_attest::http_error::{ErrorKind as K, HttpError};
        let kind = match &self.0 {
            crate::Error::Malformed { .. } => K::BadRequest,
            crate::Error::Rejected { .. } => K::Forbidden,
            crate::Error::NotFound { .. } => K::NotFound,
            crate::Error::Crypto(_) | crate::Error::Storage(_) => {
                return HttpError::internal(self.0.code()).into_response();
            }
        };
        HttpError::new(kind, self.0.code(), self.0.to_string()).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        Self(e)
    }
}

/// `POST /v1/sched/launch`: a launch call plus an optional placement hint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScheduleRequest {
    /// What the agent receives.
    #[serde(flatten)]
    pub call: LaunchCall,
    /// Place on this host (otherwise: any trusted host of the request's SP).
    #[serde(default)]
    pub host: Option<String>,
}

/// `POST /v1/tl/netkey/rekey` (operators): a new epoch of a network domain now.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRekey {
    /// The network domain N.
    pub net_domain: String,
}

/// `POST /v1/sched/migrate`: move a workload to another host (live migration). Untrusted
/// like the launch: the source agent asks the TTP, which attests the target in the
/// workload's profile before anything leaves the source.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MigrateSchedule {
    /// The workload.
    pub vm_id: String,
    /// The host it runs on.
    pub from: String,
    /// The host it is to move to.
    pub to: String,
}

/// `POST /v1/sched/suspend` and `POST /v1/sched/resume`: which workload, on which host
/// (suspend: where it runs; resume: a placement hint, otherwise any trusted host — the TTP
/// releases the state only to a host of the workload's profile).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// id_vm.
    pub vm_id: String,
    /// The host.
    #[serde(default)]
    pub host: Option<String>,
}

impl<S: AttestStore> TlService<S> {
    /// The service over the key service's store.
    pub fn new(store: Arc<S>, keys: TtpKeys) -> Self {
        Self {
            ttp: Ttp::new(store.clone(), keys),
            store,
            http: caas_attest::client::HttpClient::new(std::time::Duration::from_secs(120)),
            next: AtomicUsize::new(0),
            net: tokio::sync::Mutex::new(NetPlacements::new()),
            net_loaded: std::sync::atomic::AtomicBool::new(false),
            net_push: tokio::sync::Mutex::new(()),
            deliver_revocations: true,
        }
    }

    /// The client the scheduler and the TTP reach host agents with: agents answer only
    /// the key service's certificate (`caas_attest::client::HttpClient::with_tls`).
    pub fn with_agent_client(mut self, http: caas_attest::client::HttpClient) -> Self {
        self.http = http;
        self
    }

    /// Revocation notices are issued by the TTP (the host cut off, its network domains
    /// rekeyed) but not sent to the host's agent: for tests standing for a compromised host
    /// that ignores its notice.
    #[must_use]
    pub fn without_revocation_delivery(mut self) -> Self {
        self.deliver_revocations = false;
        self
    }

    /// pk_TTP.
    pub fn public(&self) -> crate::Result<TtpPublic> {
        self.ttp.public()
    }

    /// The same service, waiting at most `timeout` for a host agent's answer.
    #[must_use]
    pub fn with_agent_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.http = caas_attest::client::HttpClient::new(timeout);
        self
    }

    async fn bind_info(&self, name: &str) -> Result<HostBindInfo, crate::Error> {
        let h = get_host(&*self.store, name)
            .await?
            .ok_or_else(|| crate::Error::NotFound {
                kind: "host",
                id: name.into(),
            })?;
        let bind = h.bind_key.clone().ok_or_else(|| {
            crate::Error::rejected("bind_key_missing", "the host presented no bind key")
        })?;
        let verdict = h
            .last_verdict
            .clone()
            .filter(|v| v.trusted && h.trusted)
            .ok_or_else(|| crate::Error::rejected("host_untrusted", "the host is not trusted"))?;
        let profile = h
            .profile
            .clone()
            .ok_or_else(|| crate::Error::rejected("sp_mismatch", "the host has no profile"))?;
        let p = caas_attest::store::get_profile(&*self.store, &profile)
            .await?
            .ok_or_else(|| crate::Error::rejected("sp_mismatch", "unknown profile"))?;
        Ok(HostBindInfo {
            host: h.name,
            profile,
            ak_public: h.ak_public,
            bind,
            selection: p.selection(),
            pcrs: verdict.pcrs,
        })
    }

    /// The scheduler: untrusted placement. Picks an enrolled, trusted host whose profile is
    /// the request's SP (round robin) and forwards the call to its agent.
    async fn schedule(&self, req: &ScheduleRequest) -> Result<serde_json::Value, crate::Error> {
        let lr: LaunchRequest = req.call.request.peek(label::LAUNCH_REQUEST)?;
        let hosts: Vec<_> = list_hosts(&*self.store)
            .await?
            .into_iter()
            .filter(|h| {
                h.state == HostState::Enrolled
                    && h.trusted
                    && h.profile.as_deref() == Some(lr.sp.as_str())
                    && req.host.as_ref().is_none_or(|n| n == &h.name)
            })
            .collect();
        if hosts.is_empty() {
            return Err(crate::Error::rejected(
                "no_host",
                format!("no trusted host with security profile {}", lr.sp),
            ));
        }
        let h = &hosts[self.next.fetch_add(1, Ordering::Relaxed) % hosts.len()];
        let url = format!("{}/v1/agent/workloads", h.agent_url.trim_end_matches('/'));
        let v = self
            .http
            .post::<_, serde_json::Value>(&url, &req.call)
            .await
            .map_err(|e| match e {
                caas_attest::Error::Remote { code, message, .. } => crate::Error::Rejected {
                    code: leak_code(&code),
                    detail: format!("host {}: {message}", h.name),
                },
                other => crate::Error::rejected("host_unreachable", other.to_string()),
            })?;
        if let Some(n) = &req.call.net {
            self.net_join(&n.domain, &req.call.vm_id, &h.agent_url, &v)
                .await;
        }
        Ok(v)
    }

    /// The placement data of network domains, read back from the store at first use (a
    /// restarted scheduler keeps its member lists). Stored records are untrusted: each is
    /// parsed and checked ([`NetDomainRecord::from_stored`]); one that fails is left out
    /// (logged), as are records beyond [`MAX_NET_DOMAINS`].
    async fn net_lock(&self) -> tokio::sync::MutexGuard<'_, NetPlacements> {
        let mut g = self.net.lock().await;
        if !self.net_loaded.load(Ordering::Acquire) {
            match self.store.list(KIND_NET_PLACEMENT).await {
                Ok(rows) => {
                    for raw in rows.iter().take(MAX_NET_DOMAINS) {
                        match NetDomainRecord::from_stored(raw) {
                            Ok(r) => {
                                let m = r
                                    .members
                                    .into_iter()
                                    .map(|p| (p.member.vm_id.clone(), (p.agent_url, p.member)))
                                    .collect();
                                g.insert(r.net_domain, m);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "a stored network placement was refused");
                            }
                        }
                    }
                    self.net_loaded.store(true, Ordering::Release);
                }
                // Not marked loaded: the next use tries again.
                Err(e) => tracing::error!(error = %e, "network placements not read back"),
            }
        }
        g
    }

    /// Writes N's members to the store (under the placement lock, so writes of one N are
    /// in order). A failure is logged; the in-memory list stays right until a restart.
    async fn net_save(&self, g: &NetPlacements, n: &str) {
        let rec = NetDomainRecord {
            net_domain: n.to_string(),
            members: g
                .get(n)
                .map(|m| {
                    m.values()
                        .map(|(url, member)| NetPlacement {
                            agent_url: url.clone(),
                            member: member.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let r = async {
            rec.check()?;
            let body =
                serde_json::to_vec(&rec).map_err(|e| crate::Error::Storage(e.to_string()))?;
            self.store.put(KIND_NET_PLACEMENT, n, body, None).await?;
            Ok::<(), crate::Error>(())
        }
        .await;
        if let Err(e) = r {
            tracing::error!(net_domain = %n, error = %e, "network placement not stored");
        }
    }

    /// Puts `vm_id`'s member in N (in place of any earlier one of it, in any domain);
    /// returns the domains whose members changed. Stored.
    async fn net_place(
        &self,
        n: &str,
        vm_id: &str,
        agent_url: &str,
        member: crate::wire::NetMember,
    ) -> Vec<String> {
        let mut g = self.net_lock().await;
        let mut changed: Vec<String> = g
            .iter_mut()
            .filter_map(|(d, m)| m.remove(vm_id).map(|_| d.clone()))
            .collect();
        let m = g.entry(n.to_string()).or_default();
        if m.len() >= MAX_NET_MEMBERS {
            tracing::warn!(net_domain = %n, %vm_id, "network domain full: member not kept");
        } else {
            m.insert(
                vm_id.to_string(),
                (agent_url.trim_end_matches('/').to_string(), member),
            );
        }
        if !changed.iter().any(|d| d == n) {
            changed.push(n.to_string());
        }
        for d in &changed {
            self.net_save(&g, d).await;
        }
        changed
    }

    /// A VM of network domain N was launched: its member (from its agent's answer) joins
    /// N's placement data and every member's agent gets the new list (peer discovery,
    /// `docs/network-sdp.md`). The list is public and untrusted by the proxies: it says where
    /// sealed frames go; only holders of N's key are heard.
    async fn net_join(&self, n: &str, vm_id: &str, agent_url: &str, answer: &serde_json::Value) {
        let member: Option<crate::wire::NetMember> =
            serde_json::from_value(answer["workload"]["net"]["member"].clone()).ok();
        let Some(member) = member.filter(|m| m.vm_id == vm_id) else {
            tracing::warn!(%vm_id, net_domain = %n, "the launch's answer names no network member");
            return;
        };
        for d in self.net_place(n, vm_id, agent_url, member).await {
            self.net_push(&d).await;
        }
    }

    /// A VM moved (migrated) or came back (resumed) on the host of `agent_url`, whose
    /// answer names its network attachment `net` (`{domain, member, …}`, or null): it
    /// leaves every domain's placement data and joins N with its new member; every member
    /// of each changed domain is told.
    async fn net_moved(&self, vm_id: &str, agent_url: &str, net: &serde_json::Value) {
        let n = net["domain"]
            .as_str()
            .filter(|n| crate::wire::check_name("net_domain", n).is_ok())
            .map(str::to_string);
        let member: Option<crate::wire::NetMember> = serde_json::from_value(net["member"].clone())
            .ok()
            .filter(|m: &crate::wire::NetMember| m.vm_id == vm_id);
        let changed = match (n, member) {
            (Some(n), Some(member)) => self.net_place(&n, vm_id, agent_url, member).await,
            _ => {
                if !net.is_null() {
                    tracing::warn!(%vm_id, "the agent's answer names no valid network member");
                }
                self.net_remove(vm_id, None).await
            }
        };
        for n in changed {
            self.net_push(&n).await;
        }
    }

    /// Takes `vm_id` out of every domain's members (only where it is placed on the agent
    /// `at`, when given); returns the domains changed. Stored.
    async fn net_remove(&self, vm_id: &str, at: Option<&str>) -> Vec<String> {
        let mut g = self.net_lock().await;
        let left: Vec<String> = g
            .iter_mut()
            .filter(|(_, m)| at.is_none_or(|url| m.get(vm_id).is_some_and(|(u, _)| u == url)))
            .filter_map(|(n, m)| m.remove(vm_id).map(|_| n.clone()))
            .collect();
        for n in &left {
            self.net_save(&g, n).await;
        }
        left
    }

    /// A VM left N (suspended, migrated away; only its placement on the agent `at`, when
    /// given): out of N's placement data, the others told.
    async fn net_leave(&self, vm_id: &str, at: Option<&str>) {
        for n in self.net_remove(vm_id, at).await {
            self.net_push(&n).await;
        }
    }

    /// The TTP accepted `host`'s NetLeave for `vm_id` (stopped through its agent, failed to
    /// start, suspended or migrated away): the VM leaves every domain's placement data where
    /// it is still placed on that host, and the others are told at once. A placement on
    /// another host since (a migration's target, a resume) stays.
    async fn net_left_host(&self, host: &str, vm_id: &str) {
        let url = match get_host(&*self.store, host).await {
            Ok(Some(h)) => h.agent_url,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%host, %vm_id, error = %e, "cannot read the host that left");
                return;
            }
        };
        self.net_leave(vm_id, Some(&url)).await;
    }

    /// Sends N's member list to every member's agent (each leaves out its own VMs). A
    /// member whose agent no longer runs it (stopped through the agent) is dropped from the
    /// list when its agent says so, and the others are told again.
    async fn net_push(&self, n: &str) {
        let _serial = self.net_push.lock().await;
        for _ in 0..2 {
            let (body, agents) = {
                let g = self.net_lock().await;
                let Some(m) = g.get(n) else { return };
                let body = crate::wire::NetPeers {
                    net_domain: n.to_string(),
                    members: m.values().map(|(_, m)| m.clone()).collect(),
                };
                let mut agents: Vec<(String, Vec<String>)> = Vec::new();
                for (vm, (url, _)) in m {
                    match agents.iter_mut().find(|(u, _)| u == url) {
                        Some((_, vms)) => vms.push(vm.clone()),
                        None => agents.push((url.clone(), vec![vm.clone()])),
                    }
                }
                (body, agents)
            };
            let mut gone = Vec::new();
            for (url, vms) in agents {
                match self
                    .http
                    .post::<_, serde_json::Value>(&format!("{url}/v1/agent/net/peers"), &body)
                    .await
                {
                    Ok(v) => {
                        let local: Vec<String> =
                            serde_json::from_value(v["members"].clone()).unwrap_or_default();
                        gone.extend(vms.into_iter().filter(|vm| !local.contains(vm)));
                    }
                    Err(e) => {
                        tracing::warn!(agent = %url, net_domain = %n, error = %e, "peer list not delivered");
                    }
                }
            }
            if gone.is_empty() {
                return;
            }
            let mut g = self.net_lock().await;
            if let Some(m) = g.get_mut(n) {
                for vm in &gone {
                    m.remove(vm);
                }
            }
            self.net_save(&g, n).await;
        }
    }

    /// Forwards a migration request to the source's agent with the target's agent URL.
    async fn schedule_migrate(
        &self,
        req: &MigrateSchedule,
    ) -> Result<serde_json::Value, crate::Error> {
        crate::wire::check_name("vm_id", &req.vm_id)?;
        let enrolled = |h: Option<caas_attest::store::HostRecord>, name: &str| {
            h.filter(|h| h.state == HostState::Enrolled).ok_or_else(|| {
                crate::Error::rejected("host_unknown", format!("host {name} is not enrolled"))
            })
        };
        let from = enrolled(get_host(&*self.store, &req.from).await?, &req.from)?;
        let to = enrolled(get_host(&*self.store, &req.to).await?, &req.to)?;
        let body = serde_json::json!({
            "to": req.to,
            "to_url": to.agent_url.trim_end_matches('/'),
        });
        let r = self
            .to_agent(
                &from,
                &format!("/v1/agent/workloads/{}/migrate", req.vm_id),
                &body,
            )
            .await?;
        // The source's member leaves N, the target's (its own proxy, its own address)
        // joins: one change of N, pushed once.
        self.net_moved(&req.vm_id, &to.agent_url, &r["net"]).await;
        Ok(r)
    }

    /// Forwards a management call to a host agent, mapping its refusal to the caller.
    async fn to_agent(
        &self,
        h: &caas_attest::store::HostRecord,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, crate::Error> {
        let url = format!("{}{path}", h.agent_url.trim_end_matches('/'));
        self.http
            .post::<_, serde_json::Value>(&url, body)
            .await
            .map_err(|e| match e {
                caas_attest::Error::Remote { code, message, .. } => crate::Error::Rejected {
                    code: leak_code(&code),
                    detail: format!("host {}: {message}", h.name),
                },
                other => crate::Error::rejected("host_unreachable", other.to_string()),
            })
    }

    /// Suspend (management, untrusted): asks the agent of the host the workload runs on to
    /// suspend it into its encrypted saved state (`docs/suspend-migrate.md`).
    async fn suspend(&self, req: &MoveRequest) -> Result<serde_json::Value, crate::Error> {
        crate::wire::check_name("vm_id", &req.vm_id)?;
        let name = req
            .host
            .as_deref()
            .ok_or_else(|| crate::Error::malformed("host", "name the host the workload runs on"))?;
        let h = get_host(&*self.store, name)
            .await?
            .filter(|h| h.state == HostState::Enrolled)
            .ok_or_else(|| crate::Error::rejected("no_host", format!("no host {name}")))?;
        let r = self
            .to_agent(
                &h,
                &format!("/v1/agent/workloads/{}/suspend", req.vm_id),
                &serde_json::json!({}),
            )
            .await?;
        self.net_leave(&req.vm_id, None).await;
        Ok(r)
    }

    /// Resume (management, untrusted): places a suspended workload on an enrolled, trusted
    /// host (the hint, or round robin); the TTP decides whether that host gets its state.
    async fn resume(&self, req: &MoveRequest) -> Result<serde_json::Value, crate::Error> {
        crate::wire::check_name("vm_id", &req.vm_id)?;
        let hosts: Vec<_> = list_hosts(&*self.store)
            .await?
            .into_iter()
            .filter(|h| {
                h.state == HostState::Enrolled
                    && h.trusted
                    && req.host.as_ref().is_none_or(|n| n == &h.name)
            })
            .collect();
        if hosts.is_empty() {
            return Err(crate::Error::rejected("no_host", "no trusted host"));
        }
        let h = &hosts[self.next.fetch_add(1, Ordering::Relaxed) % hosts.len()];
        let r = self
            .to_agent(
                h,
                "/v1/agent/resume",
                &serde_json::json!({ "vm_id": req.vm_id }),
            )
            .await?;
        // A VM of a network domain joins it again with its resumed proxy.
        if !r["workload"]["net"].is_null() {
            self.net_moved(&req.vm_id, &h.agent_url, &r["workload"]["net"])
                .await;
        }
        Ok(r)
    }

    /// Tells `host`'s agent to drop its crypto domains' keys (it is no longer trusted).
    pub async fn revoke(&self, host: &str, reason: &str) {
        let Ok(Some(h)) = get_host(&*self.store, host).await else {
            return;
        };
        let notice = match self
            .ttp
            .revoke_notice(host, reason, caas_attest::now_ms())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(%host, error = %e, "revocation notice not issued (the host stays cut off at the TTP)");
                return;
            }
        };
        if !self.deliver_revocations {
            tracing::warn!(%host, "revocation notice issued, not delivered (test setting)");
            return;
        }
        let url = format!("{}/v1/agent/revoke", h.agent_url.trim_end_matches('/'));
        match self.http.post::<_, serde_json::Value>(&url, &notice).await {
            Ok(v) => tracing::warn!(%host, answer = %v, "revocation delivered"),
            Err(e) => {
                tracing::warn!(%host, error = %e, "revocation not delivered (the host stays cut off at the TTP)")
            }
        }
    }
}

/// Maps a remote error code to a static code (known codes keep their name).
fn leak_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "h1_mismatch",
        "h2_mismatch",
        "vm_id_mismatch",
        "nonce_replayed",
        "acl_denied",
        "sp_mismatch",
        "attestation_failed",
        "bind_key_not_bound",
        "bad_signature",
        "stale_message",
        "pcr_state_changed",
        "config_tampered",
        "config_missing",
        "decryption_failed",
        "malformed",
        "invalid_request",
        "host_unknown",
        "no_session",
        "c4_invalid",
        "mu_invalid",
        "host_untrusted",
        "dk_invalid",
        "crypto_domain_error",
        "owner_mismatch",
        "session_exists",
        "host_mismatch",
        "migration_replayed",
        "migration_in_progress",
        "no_migration",
        "stream_tampered",
        "stream_out_of_order",
        "stream_truncated",
        "stream_after_end",
        "confirmation_failed",
        "offer_invalid",
        "bind_key_missing",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("host_error")
}

type R<T> = Result<Json<T>, ApiError>;

/// The AK-signed host requests the TTP answers with a TTP-signed body.
#[derive(Debug, Clone, Copy)]
enum HostCall {
    Attest,
    DomKey,
    Suspend,
    Resume,
    Migrate,
    NetKey,
    NetLeave,
}

/// One handler for the [`HostCall`] routes: the request with the TLS client certificate of
/// its connection (the TTP checks it against the host's enrolled binding).
async fn host_call<S: AttestStore>(
    call: HostCall,
    State(s): State<Arc<TlService<S>>>,
    peer: Option<Extension<TlsClient>>,
    Json(r): Json<AkSigned>,
) -> R<Signed> {
    let peer = peer.map(|Extension(p)| p);
    let (peer, now) = (peer.as_ref(), caas_attest::now_ms());
    let t = &s.ttp;
    match call {
        HostCall::Attest => t.attest(&r, peer, now).await,
        HostCall::DomKey => t.domkey(&r, peer, now).await,
        HostCall::Suspend => t.suspend(&r, peer, now).await,
        HostCall::Resume => t.resume(&r, peer, now).await,
        HostCall::Migrate => t.migrate(&r, peer, now).await,
        HostCall::NetKey => t.netkey(&r, peer, now).await,
        HostCall::NetLeave => match t.net_leave(&r, peer, now).await {
            Ok((signed, left)) => {
                s.net_left_host(&left.host, &left.vm_id).await;
                Ok(signed)
            }
            Err(e) => Err(e),
        },
    }
    .map(Json)
    .map_err(ApiError)
}

/// The TTP and scheduler routes.
pub fn router<S: AttestStore>(svc: Arc<TlService<S>>) -> Router {
    Router::new()
        .route(
            "/v1/tl/ttp",
            get(|State(s): State<Arc<TlService<S>>>| async move {
                s.ttp.public().map(Json).map_err(ApiError)
            }),
        )
        .route(
            "/v1/tl/attest",
            post(|st, peer, body| host_call(HostCall::Attest, st, peer, body)),
        )
        .route(
            "/v1/tl/domkey",
            post(|st, peer, body| host_call(HostCall::DomKey, st, peer, body)),
        )
        .route(
            "/v1/tl/netkey",
            post(|st, peer, body| host_call(HostCall::NetKey, st, peer, body)),
        )
        .route(
            "/v1/tl/netkey/leave",
            post(|st, peer, body| host_call(HostCall::NetLeave, st, peer, body)),
        )
        .route(
            "/v1/tl/netkey/rekey",
            post(
                |State(s): State<Arc<TlService<S>>>,
                 p: Option<Extension<caas_attest::service::Principal>>,
                 Json(r): Json<NetRekey>| async move {
                    let who = p.map_or_else(|| "anonymous".to_string(), |Extension(p)| p.0);
                    let r: R<serde_json::Value> = s
                        .ttp
                        .net_rekey(
                            &r.net_domain,
                            &format!("on demand by {who}"),
                            caas_attest::now_ms(),
                        )
                        .await
                        .map(|e| Json(serde_json::json!({ "epoch": e })))
                        .map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/tl/suspend",
            post(|st, peer, body| host_call(HostCall::Suspend, st, peer, body)),
        )
        .route(
            "/v1/tl/resume",
            post(|st, peer, body| host_call(HostCall::Resume, st, peer, body)),
        )
        .route(
            "/v1/tl/epoch",
            post(
                |State(s): State<Arc<TlService<S>>>,
                 peer: Option<Extension<TlsClient>>,
                 Json(r): Json<AkSigned>| async move {
                    let peer = peer.map(|Extension(p)| p);
                    let r: R<serde_json::Value> = s
                        .ttp
                        .epoch_report(&r, peer.as_ref(), caas_attest::now_ms())
                        .await
                        .map(|e| Json(serde_json::json!({ "epoch": e })))
                        .map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/tl/migrate",
            post(|st, peer, body| host_call(HostCall::Migrate, st, peer, body)),
        )
        .route(
            "/v1/tl/acl",
            put(
                |State(s): State<Arc<TlService<S>>>,
                 p: Option<Extension<caas_attest::service::Principal>>,
                 Json(r): Json<Signed>| async move {
                    let who = p.map_or_else(|| "anonymous".to_string(), |Extension(p)| p.0);
                    let r: R<crate::ttp::AclEntry> = s
                        .ttp
                        .update_acl(&r, &who, caas_attest::now_ms())
                        .await
                        .map(Json)
                        .map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/tl/hosts/{name}/bind-info",
            get(
                |State(s): State<Arc<TlService<S>>>, Path(name): Path<String>| async move {
                    let r: R<HostBindInfo> = s.bind_info(&name).await.map(Json).map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/sched/launch",
            post(
                |State(s): State<Arc<TlService<S>>>, Json(r): Json<ScheduleRequest>| async move {
                    let r: R<serde_json::Value> = s.schedule(&r).await.map(Json).map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/sched/migrate",
            post(
                |State(s): State<Arc<TlService<S>>>, Json(r): Json<MigrateSchedule>| async move {
                    let r: R<serde_json::Value> =
                        s.schedule_migrate(&r).await.map(Json).map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/sched/suspend",
            post(
                |State(s): State<Arc<TlService<S>>>, Json(r): Json<MoveRequest>| async move {
                    let r: R<serde_json::Value> = s.suspend(&r).await.map(Json).map_err(ApiError);
                    r
                },
            ),
        )
        .route(
            "/v1/sched/resume",
            post(
                |State(s): State<Arc<TlService<S>>>, Json(r): Json<MoveRequest>| async move {
                    let r: R<serde_json::Value> = s.resume(&r).await.map(Json).map_err(ApiError);
                    r
                },
            ),
        )
        .with_state(svc)
}

/// The scheduler's network member lists survive a restart (a new service over the same
/// store reads them back), and stored rows are not trusted: a tampered or oversized record
/// is left out, the others still read.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use caas_attest::store::MemoryStore;

    fn member(vm: &str, sender: u32, port: u16) -> crate::wire::NetMember {
        crate::wire::NetMember {
            vm_id: vm.into(),
            sender,
            udp: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn service(store: &Arc<MemoryStore>) -> TlService<MemoryStore> {
        TlService::new(store.clone(), TtpKeys::generate().unwrap())
    }

    async fn members(s: &TlService<MemoryStore>, n: &str) -> Vec<(String, String, u16)> {
        s.net_lock()
            .await
            .get(n)
            .map(|m| {
                m.iter()
                    .map(|(vm, (url, mm))| (vm.clone(), url.clone(), mm.udp.port()))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn scheduler_restart_keeps_the_network_member_lists() {
        let store = Arc::new(MemoryStore::new());
        let s = service(&store);
        s.net_place(
            "lan",
            "vm-a",
            "http://127.0.0.1:1/",
            member("vm-a", 1, 4001),
        )
        .await;
        s.net_place("lan", "vm-b", "http://127.0.0.1:2", member("vm-b", 2, 4002))
            .await;
        s.net_place("dmz", "vm-c", "http://127.0.0.1:2", member("vm-c", 3, 4003))
            .await;
        // vm-a migrates (moves), vm-c stops (leaves).
        let changed = s
            .net_place("lan", "vm-a", "http://127.0.0.1:3", member("vm-a", 1, 4011))
            .await;
        assert_eq!(changed, vec!["lan".to_string()]);
        assert_eq!(s.net_remove("vm-c", None).await, vec!["dmz".to_string()]);
        drop(s);
        // The restarted scheduler.
        let s2 = service(&store);
        assert_eq!(
            members(&s2, "lan").await,
            vec![
                ("vm-a".into(), "http://127.0.0.1:3".into(), 4011),
                ("vm-b".into(), "http://127.0.0.1:2".into(), 4002),
            ]
        );
        assert!(members(&s2, "dmz").await.is_empty());
    }

    #[tokio::test]
    async fn tampered_stored_network_placements_are_refused_the_others_kept() {
        let store = Arc::new(MemoryStore::new());
        let s = service(&store);
        s.net_place("lan", "vm-a", "http://127.0.0.1:1", member("vm-a", 1, 4001))
            .await;
        let good = |n: &str, members: Vec<NetPlacement>| NetDomainRecord {
            net_domain: n.into(),
            members,
        };
        let p = |vm: &str, sender: u32, url: &str| NetPlacement {
            agent_url: url.into(),
            member: member(vm, sender, 5000),
        };
        let bad: Vec<(&str, Vec<u8>)> = vec![
            // A member named with a path.
            (
                "t1",
                serde_json::to_vec(&good("t1", vec![p("../x", 1, "http://h")])).unwrap(),
            ),
            // A sender id twice.
            (
                "t2",
                serde_json::to_vec(&good(
                    "t2",
                    vec![p("vm-1", 9, "http://h"), p("vm-2", 9, "http://h")],
                ))
                .unwrap(),
            ),
            // An agent URL of another scheme.
            (
                "t3",
                serde_json::to_vec(&good("t3", vec![p("vm-1", 1, "file:///etc/passwd")])).unwrap(),
            ),
            // Too many members.
            (
                "t4",
                serde_json::to_vec(&good(
                    "t4",
                    (0..=MAX_NET_MEMBERS as u32)
                        .map(|i| p(&format!("vm-{i}"), i, "http://h"))
                        .collect(),
                ))
                .unwrap(),
            ),
            // An unknown field, not JSON, oversized.
            (
                "t5",
                br#"{"net_domain":"t5","members":[],"extra":1}"#.to_vec(),
            ),
            ("t6", b"\xff{not json".to_vec()),
            ("t7", vec![b' '; MAX_NET_RECORD + 1]),
        ];
        for (id, body) in bad {
            store.put(KIND_NET_PLACEMENT, id, body, None).await.unwrap();
        }
        let s2 = service(&store);
        let g = s2.net_lock().await;
        assert_eq!(
            g.keys().cloned().collect::<Vec<_>>(),
            vec!["lan".to_string()]
        );
    }
}
