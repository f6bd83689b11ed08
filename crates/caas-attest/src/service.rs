//! HTTP endpoints of the registrar and verifier (JSON over HTTP, axum) and the
//! continuous-attestation task. The key service mounts [`router`] and authenticates the
//! administrative routes itself before any handler runs (operators with SigV4; it puts a
//! [`Principal`] extension on the request for the audit trail); the enrollment routes are
//! for host agents and are protected by the Privacy-CA protocol itself; over TLS the key
//! service puts the connection's client certificate on the request
//! ([`crate::tls_binding::TlsClient`]) and the registrar binds it to the host's AK.
//!
//! Routes (all under `/v1/attest`):
//! `POST /enroll`, `POST /enroll/finish` (host agents);
//! `GET /hosts`, `GET /hosts/{name}`, `POST /hosts/{name}/attest`, `PUT /hosts/{name}/profile`;
//! `GET|POST /profiles`, `GET|PUT /profiles/{name}`.

use crate::appraisal::Verdict;
use crate::error::Error;
use crate::profile::SecurityProfile;
use crate::registrar::{EnrollChallenge, EnrollFinish, EnrollRequest, Registrar};
use crate::store::{
    AttestStore, AuditRecord, HostRecord, get_host, get_profile, list_hosts, list_profiles,
    put_host, put_profile,
};
use crate::tls_binding::TlsClient;
use crate::verifier::{EvidenceSource, TrustEvent, Verifier};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use std::sync::Arc;
use std::time::Duration;

/// The authenticated caller, if the key service's auth layer sets one.
#[derive(Debug, Clone)]
pub struct Principal(pub String);

/// Callback for trust changes (audit hooks, key revocation).
pub type TrustHook = Arc<dyn Fn(&TrustEvent) + Send + Sync>;

/// Shared state of the endpoints and the background task.
pub struct AttestState<S, E> {
    /// Registrar (Privacy CA).
    pub registrar: Registrar,
    /// Verifier.
    pub verifier: Verifier<S>,
    /// Where evidence comes from.
    pub source: E,
    /// Called on every trust change.
    pub on_trust_change: Option<TrustHook>,
}

impl<S: std::fmt::Debug, E: std::fmt::Debug> std::fmt::Debug for AttestState<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestState")
            .field("registrar", &self.registrar)
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl<S: AttestStore, E: EvidenceSource> AttestState<S, E> {
    /// Runs one attestation of `host` now and reports a trust change to the hook.
    pub async fn attest(&self, host: &str) -> Result<Verdict, Error> {
        let (v, ev) = self.verifier.attest(&self.source, host).await?;
        if let (Some(ev), Some(hook)) = (ev, &self.on_trust_change) {
            hook(&ev);
        }
        Ok(v)
    }
}

/// An API error: status plus `{"code", "message"}`.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use crate::http_error::{ErrorKind as K, HttpError};
        let (kind, code) = match &self.0 {
            Error::Enrollment { code, .. } => (K::Forbidden, *code),
            Error::NotFound { .. } => (K::NotFound, "not_found"),
            Error::InvalidRequest(_) => (K::BadRequest, "invalid_request"),
            Error::Truncated { .. } | Error::Malformed { .. } | Error::Unsupported { .. } => {
                (K::BadRequest, "malformed")
            }
            Error::EkCertificate(_) => (K::Forbidden, "ek_cert_invalid"),
            Error::BadSignature(_) => (K::Forbidden, "bad_signature"),
            Error::Agent { .. } | Error::Remote { .. } => (K::Upstream, "host_unreachable"),
            Error::Storage(_) | Error::Crypto(_) => {
                return HttpError::internal("internal").into_response();
            }
        };
        HttpError::new(kind, code, self.0.to_string()).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

type R<T> = Result<Json<T>, ApiError>;

fn principal(p: &Option<Extension<Principal>>) -> String {
    p.as_ref()
        .map_or_else(|| "anonymous".to_string(), |Extension(p)| p.0.clone())
}

/// A host as shown by the API (no pending secrets).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostView {
    /// Name.
    pub name: String,
    /// `pending` or `enrolled`.
    pub state: crate::store::HostState,
    /// Trusted under its profile right now.
    pub trusted: bool,
    /// Profile.
    pub profile: Option<String>,
    /// AK name (hex).
    pub ak_name: String,
    /// Agent URL.
    pub agent_url: String,
    /// Whether an AK-certified bind key is recorded.
    pub has_bind_key: bool,
    /// Latest verdict.
    pub last_verdict: Option<Verdict>,
    /// SHA-256 (hex) of the SPKI of the TLS client certificate bound at enrollment.
    #[serde(default)]
    pub tls_spki_sha256: Option<String>,
}

impl From<&HostRecord> for HostView {
    fn from(h: &HostRecord) -> Self {
        Self {
            name: h.name.clone(),
            state: h.state,
            trusted: h.trusted,
            profile: h.profile.clone(),
            ak_name: h.ak_name.clone(),
            agent_url: h.agent_url.clone(),
            has_bind_key: h.bind_key.is_some(),
            last_verdict: h.last_verdict.clone(),
            tls_spki_sha256: h.tls_spki_sha256.clone(),
        }
    }
}

/// Body of `PUT /hosts/{name}/profile`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AssignProfile {
    /// Profile name.
    pub profile: String,
}

/// The whole registrar/verifier API: [`host_router`] merged with [`admin_router`].
pub fn router<S: AttestStore, E: EvidenceSource>(state: Arc<AttestState<S, E>>) -> Router {
    host_router(state.clone()).merge(admin_router(state))
}

/// Routes for host agents (enrollment). Not behind operator authentication: the
/// Privacy-CA protocol (EK certificate + credential activation) is the authentication.
pub fn host_router<S: AttestStore, E: EvidenceSource>(state: Arc<AttestState<S, E>>) -> Router {
    Router::new()
        .route("/v1/attest/enroll", post(enroll_start::<S, E>))
        .route("/v1/attest/enroll/finish", post(enroll_finish::<S, E>))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Operator routes (hosts, attestations, profiles): mount behind the key service's
/// authentication, which may insert a [`Principal`] extension for the audit trail.
pub fn admin_router<S: AttestStore, E: EvidenceSource>(state: Arc<AttestState<S, E>>) -> Router {
    Router::new()
        .route("/v1/attest/hosts", get(hosts_list::<S, E>))
        .route("/v1/attest/hosts/{name}", get(host_get::<S, E>))
        .route("/v1/attest/hosts/{name}/attest", post(host_attest::<S, E>))
        .route("/v1/attest/hosts/{name}/profile", put(host_profile::<S, E>))
        .route(
            "/v1/attest/profiles",
            get(profiles_list::<S, E>).post(profile_create::<S, E>),
        )
        .route(
            "/v1/attest/profiles/{name}",
            get(profile_get::<S, E>).put(profile_update::<S, E>),
        )
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

async fn enroll_start<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    peer: Option<Extension<TlsClient>>,
    Json(req): Json<EnrollRequest>,
) -> R<EnrollChallenge> {
    let peer = peer.map(|Extension(p)| p);
    Ok(Json(
        st.registrar
            .start(&**st.verifier.store(), &req, peer.as_ref(), crate::now_ms())
            .await?,
    ))
}

async fn enroll_finish<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    peer: Option<Extension<TlsClient>>,
    Json(req): Json<EnrollFinish>,
) -> R<HostView> {
    let peer = peer.map(|Extension(p)| p);
    let h = st
        .registrar
        .finish(&**st.verifier.store(), &req, peer.as_ref(), crate::now_ms())
        .await?;
    Ok(Json(HostView::from(&h)))
}

async fn hosts_list<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
) -> R<Vec<HostView>> {
    Ok(Json(
        list_hosts(&**st.verifier.store())
            .await?
            .iter()
            .map(HostView::from)
            .collect(),
    ))
}

async fn host_get<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    Path(name): Path<String>,
) -> R<HostView> {
    let h = get_host(&**st.verifier.store(), &name)
        .await?
        .ok_or(Error::NotFound {
            kind: "host",
            id: name,
        })?;
    Ok(Json(HostView::from(&h)))
}

async fn host_attest<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    p: Option<Extension<Principal>>,
    Path(name): Path<String>,
) -> R<Verdict> {
    let v = st.attest(&name).await?;
    st.verifier
        .store()
        .audit(AuditRecord {
            time_ms: crate::now_ms(),
            principal: principal(&p),
            operation: "AttestHost".into(),
            subject: name,
            result: if v.trusted {
                "ok".into()
            } else {
                crate::verifier::reason_codes(&v)
            },
            detail: String::new(),
        })
        .await?;
    Ok(Json(v))
}

async fn host_profile<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    p: Option<Extension<Principal>>,
    Path(name): Path<String>,
    Json(body): Json<AssignProfile>,
) -> R<HostView> {
    let store = &**st.verifier.store();
    if get_profile(store, &body.profile).await?.is_none() {
        return Err(Error::NotFound {
            kind: "profile",
            id: body.profile,
        }
        .into());
    }
    let mut h = get_host(store, &name).await?.ok_or(Error::NotFound {
        kind: "host",
        id: name.clone(),
    })?;
    h.profile = Some(body.profile.clone());
    h.trusted = false;
    let audit = AuditRecord {
        time_ms: crate::now_ms(),
        principal: principal(&p),
        operation: "AssignProfile".into(),
        subject: name,
        result: "ok".into(),
        detail: body.profile,
    };
    put_host(store, &h, Some(audit)).await?;
    Ok(Json(HostView::from(&h)))
}

async fn profiles_list<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
) -> R<Vec<SecurityProfile>> {
    Ok(Json(list_profiles(&**st.verifier.store()).await?))
}

async fn profile_get<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    Path(name): Path<String>,
) -> R<SecurityProfile> {
    Ok(Json(
        get_profile(&**st.verifier.store(), &name)
            .await?
            .ok_or(Error::NotFound {
                kind: "profile",
                id: name,
            })?,
    ))
}

async fn profile_create<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    p: Option<Extension<Principal>>,
    Json(profile): Json<SecurityProfile>,
) -> Result<(StatusCode, Json<SecurityProfile>), ApiError> {
    let store = &**st.verifier.store();
    if get_profile(store, &profile.name).await?.is_some() {
        return Err(
            Error::InvalidRequest(format!("profile {} already exists", profile.name)).into(),
        );
    }
    put_profile(store, &profile, &principal(&p), "CreateProfile").await?;
    Ok((StatusCode::CREATED, Json(profile)))
}

async fn profile_update<S: AttestStore, E: EvidenceSource>(
    State(st): State<Arc<AttestState<S, E>>>,
    p: Option<Extension<Principal>>,
    Path(name): Path<String>,
    Json(profile): Json<SecurityProfile>,
) -> R<SecurityProfile> {
    let store = &**st.verifier.store();
    if profile.name != name {
        return Err(
            Error::InvalidRequest("profile name in body differs from the path".into()).into(),
        );
    }
    if get_profile(store, &name).await?.is_none() {
        return Err(Error::NotFound {
            kind: "profile",
            id: name,
        }
        .into());
    }
    put_profile(store, &profile, &principal(&p), "UpdateProfile").await?;
    Ok(Json(profile))
}

/// Re-attests every enrolled host every `interval` (hosts in parallel); trust changes are
/// stored with an audit record by the verifier and passed to the state's hook.
pub fn spawn_continuous<S: AttestStore, E: EvidenceSource>(
    state: Arc<AttestState<S, E>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let hosts = match list_hosts(&**state.verifier.store()).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "continuous attestation: listing hosts failed");
                    continue;
                }
            };
            let mut set = tokio::task::JoinSet::new();
            for h in hosts
                .into_iter()
                .filter(|h| h.state == crate::store::HostState::Enrolled && h.profile.is_some())
            {
                let st = state.clone();
                set.spawn(async move {
                    if let Err(e) = st.attest(&h.name).await {
                        tracing::warn!(host = %h.name, error = %e, "continuous attestation failed");
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
    })
}
