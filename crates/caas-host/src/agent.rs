//! The host agent: the only holder of the host's TPM. It keeps an attestation key and a
//! PCR-bound, AK-certified bind key (on disk only as TPM-wrapped blobs), enrolls with the
//! key service (EK certificate → MakeCredential/ActivateCredential; the AK also quotes the
//! hash of the agent's TLS client certificate, which binds that certificate to this TPM at
//! the key service: `caas_attest::tls_binding`), and answers
//! attestation challenges with a quote, the PCR values and the boot event log.
//!
//! The API is served over TLS only ([`caas_tls::server`]) and every route but `/healthz`
//! needs a client certificate from the deployment CA whose role the route allows: the one
//! table is [`ROUTES`] (key service: quote, launch, attach, revoke; operators: list, stop,
//! status, audit, re-enroll, recipient documents; both: migrate; other hosts' agents: a
//! migration's offer and records, [`crate::migrate`]). Refusals and management calls are
//! audited with the caller's certificate identity. The management API (for the untrusted
//! cloud management) only reports status and public material: no operation reveals key
//! material, because the agent holds none outside the TPM — with one exception by design,
//! `POST /v1/agent/recipient/open` ([`crate::recipient`]): it returns a secret the key
//! service sealed to a TPM-resident recipient key, and only to the client certificate that
//! asked for that key's attestation document.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Keys: load or create AK + bind key (TPM-wrapped blobs)
//!     Keys --> Enrolling: POST /v1/attest/enroll
//!     Enrolling --> Enrolling: key service unreachable (retry)
//!     Enrolling --> Enrolled: ActivateCredential, POST /v1/attest/enroll/finish
//!     Enrolled --> Enrolled: challenge → quote + event log
//!     Enrolled --> Enrolling: POST /v1/agent/enroll (re-enroll)
//! ```

use crate::config::AgentConfig;
use crate::error::Error;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use caas_attest::client::HttpClient;
use caas_attest::registrar::{EnrollChallenge, EnrollFinish, EnrollRequest};
use caas_attest::service::HostView;
use caas_attest::store::BindKeyRecord;
use caas_attest::verifier::Challenge;
use caas_attest::{Evidence, HashAlg};
use caas_tls::Role;
use caas_tpm::{KeyBlob, PcrBank, TpmHandle};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Mutex;

/// Serialised TPM-wrapped key blobs (the only thing the agent stores).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredKeys {
    #[serde(with = "caas_attest::b64")]
    ak_public: Vec<u8>,
    #[serde(with = "caas_attest::b64")]
    ak_private: Vec<u8>,
    #[serde(with = "caas_attest::b64")]
    pub(crate) bind_public: Vec<u8>,
    #[serde(with = "caas_attest::b64")]
    pub(crate) bind_private: Vec<u8>,
    #[serde(with = "caas_attest::b64")]
    bind_certify_attest: Vec<u8>,
    #[serde(with = "caas_attest::b64")]
    bind_certify_signature: Vec<u8>,
    pub(crate) bind_pcrs: Vec<u32>,
}

/// What the management API reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentStatus {
    /// Host name.
    pub name: String,
    /// Whether enrollment completed.
    pub enrolled: bool,
    /// AK name (hex).
    pub ak_name: String,
    /// Bind-key name (hex).
    pub bind_key_name: String,
    /// PCRs the bind key is bound to.
    pub bind_pcrs: Vec<u32>,
    /// Key service URL.
    pub key_service_url: String,
    /// Whether the agent process is dumpable (core files, ptrace and /proc/PID/mem by its
    /// user): false once hardened at start, since it unseals launch secrets.
    #[serde(default)]
    pub dumpable: bool,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) tpm: TpmHandle,
    pub(crate) keys: StoredKeys,
    pub(crate) http: HttpClient,
    pub(crate) tl: crate::tl::TlHost,
    /// Recipient keys of attestation documents, held for their callers.
    pub(crate) recipients: crate::recipient::RecipientKeys,
    enrolled: AtomicBool,
    advertise_url: Mutex<String>,
}

fn bank(h: HashAlg) -> Result<PcrBank, Error> {
    match h {
        HashAlg::Sha1 => Ok(PcrBank::Sha1),
        HashAlg::Sha256 => Ok(PcrBank::Sha256),
        HashAlg::Sha384 => Ok(PcrBank::Sha384),
        HashAlg::Sha512 => Err(Error::InvalidRequest(
            "sha512 PCR bank not supported".into(),
        )),
    }
}

impl Agent {
    /// Opens the TPM and loads (or creates and stores) the AK and bind key.
    pub async fn new(cfg: AgentConfig) -> Result<Self, Error> {
        // The agent unseals launch secrets (k, DK_i, τ, token PINs): no core file, no ptrace
        // or /proc/PID/mem by processes of its user, and its memory locked where it may be
        // without bound (the agent runs as root in production): the crypto domain's
        // implementation.
        caas_domc::harden::harden_service("host agent")
            .map_err(|e| Error::Config(format!("hardening: {e}")))?;
        let tpm = TpmHandle::open(&cfg.tcti)?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(Error::io(format!("create {}", cfg.state_dir.display())))?;
        let path = cfg.state_dir.join("tpm-keys.json");
        let stored = match std::fs::read(&path) {
            Ok(b) => Some(
                serde_json::from_slice::<StoredKeys>(&b)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
            ),
            Err(_) => None,
        };
        // The audit key first: unsealing it needs a free object slot, which the AK kept
        // loaded by the checks below would take on a TPM with few (swtpm: 3).
        let audit_key = crate::audit::key_from_tpm(&tpm, &cfg.state_dir).await?;
        let keys = Self::check_or_create_keys(&tpm, &cfg, stored).await?;
        caas_crypto::fs::write_secret(
            &path,
            &serde_json::to_vec_pretty(&keys).map_err(|e| Error::Config(e.to_string()))?,
            None,
        )
        .map_err(Error::io(format!("write {}", path.display())))?;
        let adv = cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", cfg.listen));
        let tl = crate::tl::TlHost::new(&cfg, audit_key)?;
        let http = cfg.key_service_client(std::time::Duration::from_secs(30))?;
        Ok(Self {
            cfg,
            tpm,
            keys,
            tl,
            http,
            recipients: Default::default(),
            enrolled: AtomicBool::new(false),
            advertise_url: Mutex::new(adv),
        })
    }

    /// Reuses stored blobs when the TPM still accepts them: the AK must load and quote, and
    /// the bind key's policy must match the current PCR state (a changed boot makes it
    /// unusable, so a new one is made and certified). Otherwise creates fresh keys.
    async fn check_or_create_keys(
        tpm: &TpmHandle,
        cfg: &AgentConfig,
        stored: Option<StoredKeys>,
    ) -> Result<StoredKeys, Error> {
        let alg = cfg.ak_alg;
        let pcrs = cfg.bind_pcrs.clone();
        tpm.run(move |t| {
            let ak_ok = |k: &StoredKeys, t: &mut caas_tpm::Tpm| {
                let ak = KeyBlob {
                    public: k.ak_public.clone(),
                    private: k.ak_private.clone(),
                };
                t.quote(&ak, b"probe", PcrBank::Sha256, &[0]).map(|_| ak)
            };
            let (ak, reuse) = match stored.as_ref().map(|k| (k, ak_ok(k, t))) {
                Some((k, Ok(ak))) => (ak, Some(k.clone())),
                Some((_, Err(e))) => {
                    tracing::warn!(error = %e, "stored AK unusable; creating new keys");
                    (t.create_ak(alg)?, None)
                }
                None => (t.create_ak(alg)?, None),
            };
            let policy = t.pcr_policy_digest(PcrBank::Sha256, &pcrs, None)?;
            if let Some(k) = reuse {
                let bind_policy = caas_attest::Public::parse_tpm2b(&k.bind_public)
                    .map(|p| p.auth_policy)
                    .unwrap_or_default();
                if bind_policy == policy && k.bind_pcrs == pcrs {
                    return Ok(k);
                }
                tracing::info!(
                    "PCR state differs from the bind key's policy; creating a new bind key"
                );
            }
            let bind = t.create_bind_key(PcrBank::Sha256, &pcrs)?;
            let cert = t.certify_bind_key(&ak, &bind, b"caas-bind-key")?;
            Ok(StoredKeys {
                ak_public: ak.public,
                ak_private: ak.private,
                bind_public: bind.public,
                bind_private: bind.private,
                bind_certify_attest: cert.attest,
                bind_certify_signature: cert.signature,
                bind_pcrs: pcrs,
            })
        })
        .await
        .map_err(Error::from)
    }

    pub(crate) fn ak_blob(&self) -> KeyBlob {
        self.ak()
    }

    fn ak(&self) -> KeyBlob {
        KeyBlob {
            public: self.keys.ak_public.clone(),
            private: self.keys.ak_private.clone(),
        }
    }

    /// The TPM owner handle.
    pub fn tpm(&self) -> &TpmHandle {
        &self.tpm
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Whether enrollment completed.
    pub fn is_enrolled(&self) -> bool {
        self.enrolled.load(Ordering::SeqCst)
    }

    /// The AK-certified bind key (public material only).
    pub fn bind_key(&self) -> BindKeyRecord {
        BindKeyRecord {
            public: self.keys.bind_public.clone(),
            certify_attest: self.keys.bind_certify_attest.clone(),
            certify_signature: self.keys.bind_certify_signature.clone(),
        }
    }

    /// Status for the management API.
    pub fn status(&self) -> AgentStatus {
        let name = |b: &[u8]| {
            caas_attest::Public::parse_tpm2b(b)
                .map(|p| hex::encode(p.name()))
                .unwrap_or_default()
        };
        AgentStatus {
            name: self.cfg.name.clone(),
            enrolled: self.is_enrolled(),
            ak_name: name(&self.keys.ak_public),
            bind_key_name: name(&self.keys.bind_public),
            bind_pcrs: self.keys.bind_pcrs.clone(),
            key_service_url: self.cfg.key_service_url.clone(),
            dumpable: nix::sys::prctl::get_dumpable().unwrap_or(true),
        }
    }

    /// Enrolls with the key service (protocol P1, host side).
    pub async fn enroll(&self) -> Result<HostView, Error> {
        let (ek_public, ek_cert) = self
            .tpm
            .run(|t| Ok((t.ek_public()?, t.ek_certificate()?)))
            .await?;
        let req = EnrollRequest {
            name: self.cfg.name.clone(),
            agent_url: self.advertise_url.lock().await.clone(),
            ek_public,
            ek_cert,
            ak_public: self.keys.ak_public.clone(),
        };
        let ch: EnrollChallenge = self
            .http
            .post(
                &format!("{}/v1/attest/enroll", self.cfg.key_service_url),
                &req,
            )
            .await?;
        let ak = self.ak();
        let secret = self
            .tpm
            .run(move |t| t.activate_credential(&ak, &ch.credential_blob, &ch.encrypted_secret))
            .await?;
        // The AK endorses this agent's TLS client certificate (the one its key-service
        // client presents) for this enrollment: `caas_attest::tls_binding`.
        let spki = caas_tls::spki_sha256_of_file(&self.cfg.tls.cert)
            .map_err(|e| Error::Config(format!("tls.cert: {e}")))?;
        let nonce = caas_attest::tls_binding::binding_nonce(&ch.enrollment_id, &spki);
        let ak = self.ak();
        let q = self
            .tpm
            .run(move |t| t.quote(&ak, &nonce, PcrBank::Sha256, &[0]))
            .await?;
        let fin = EnrollFinish {
            name: self.cfg.name.clone(),
            enrollment_id: ch.enrollment_id,
            secret: secret.to_vec(),
            bind_key: Some(self.bind_key()),
            tls_binding: Some(caas_attest::tls_binding::TlsBinding {
                spki_sha256: hex::encode(spki),
                quote_attest: q.attest,
                quote_signature: q.signature,
            }),
        };
        let view: HostView = self
            .http
            .post(
                &format!("{}/v1/attest/enroll/finish", self.cfg.key_service_url),
                &fin,
            )
            .await?;
        self.enrolled.store(true, Ordering::SeqCst);
        tracing::info!(host = %self.cfg.name, "enrolled with the key service");
        Ok(view)
    }

    /// Answers a challenge: quote over the requested PCRs with the nonce, the PCR values and
    /// the event log.
    pub async fn evidence(&self, ch: &Challenge) -> Result<Evidence, Error> {
        if ch.nonce.is_empty() || ch.nonce.len() > 64 {
            return Err(Error::InvalidRequest("nonce must be 1..64 bytes".into()));
        }
        let b = bank(ch.selection.hash)?;
        let pcrs = ch.selection.pcrs.clone();
        if pcrs.is_empty() || pcrs.iter().any(|p| *p >= 24) || pcrs.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(Error::InvalidRequest(
                "PCR selection must be ascending indices < 24".into(),
            ));
        }
        let ak = self.ak();
        let nonce = ch.nonce.clone();
        let (q, vals) = self
            .tpm
            .run(move |t| {
                let q = t.quote(&ak, &nonce, b, &pcrs)?;
                let vals = t.pcr_read(b, &pcrs)?;
                Ok((q, vals))
            })
            .await?;
        let event_log = tokio::fs::read(&self.cfg.event_log)
            .await
            .map_err(Error::io(format!(
                "read event log {}",
                self.cfg.event_log.display()
            )))?;
        Ok(Evidence {
            quote: q.attest,
            signature: q.signature,
            event_log,
            pcr_values: vals.iter().map(hex::encode).collect(),
        })
    }
}

struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use caas_attest::http_error::{ErrorKind as K, HttpError};
        let code = crate::tl::error_code(&self.0);
        let kind = match &self.0 {
            Error::InvalidRequest(_) => K::BadRequest,
            Error::Tl(caas_tl::Error::Malformed { .. }) => K::BadRequest,
            Error::Tl(caas_tl::Error::Rejected { .. }) => K::Forbidden,
            Error::Attest(caas_attest::Error::Remote { status, .. }) if *status == 403 => {
                K::Forbidden
            }
            Error::Attest(_) => K::Upstream,
            Error::Tpm(t) if t.is_policy_failure() => K::Forbidden,
            Error::Tpm(_) | Error::Isolation(_) => K::Unavailable,
            Error::Config(_) | Error::Io { .. } => {
                return HttpError::internal(code).into_response();
            }
            _ => K::Internal,
        };
        let message = match &self.0 {
            Error::Isolation(_) => {
                "a workload cannot get an identity of its own on this host (see the agent log)"
                    .to_string()
            }
            e => e.to_string(),
        };
        HttpError::new(kind, code, message).into_response()
    }
}

/// Body of `POST /v1/agent/dev/measure`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevMeasure {
    /// PCR index.
    pub pcr: u32,
    /// Measured data (its SHA-256 is extended).
    pub data: String,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (liveness only).
    Public,
    /// A client certificate from the deployment CA with one of these roles.
    Roles(&'static [Role]),
}

/// The operation behind a route (its handler, and its name in the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `GET /healthz`.
    Health,
    /// Attestation: quote + PCRs + event log for a verifier's challenge.
    Quote,
    /// The AK-certified bind key (public).
    GetBindKey,
    /// Agent status.
    GetStatus,
    /// Re-enroll with the key service.
    Enroll,
    /// List workloads.
    ListWorkloads,
    /// Trusted launch (the scheduler forwards a DM's TL.Request).
    LaunchWorkload,
    /// Stop a workload and its crypto domain.
    StopWorkload,
    /// Suspend a VM into an encrypted saved state in the storage.
    SuspendWorkload,
    /// Resume a suspended VM from its saved state on this host.
    ResumeWorkload,
    /// DBSP: attach a domain volume.
    AttachVolume,
    /// TTP revocation (TTP-signed notice as well).
    Revoke,
    /// The agent's audit log.
    GetAudit,
    /// Dev hosts only: extend a PCR.
    DevMeasure,
    /// Live migration of a workload to another host (source side).
    MigrateWorkload,
    /// Live migration: the source agent's offer (target side).
    AcceptMigration,
    /// Live migration: the source agent's records (target side).
    MigrationRecords,
    /// A recipient attestation document (fresh TPM-resident recipient key).
    RecipientDocument,
    /// Open a `CiphertextForRecipient` in the TPM (the document's caller only).
    RecipientOpen,
    /// The scheduler's member list of a network domain (peer discovery, [`crate::net`]).
    NetPeers,
    /// A workload's network attachment and its proxy's counters (no key material).
    NetStatus,
}

impl Op {
    /// Name in the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Op::Health => "Health",
            Op::Quote => "Quote",
            Op::GetBindKey => "GetBindKey",
            Op::GetStatus => "GetStatus",
            Op::Enroll => "Enroll",
            Op::ListWorkloads => "ListWorkloads",
            Op::LaunchWorkload => "LaunchWorkload",
            Op::StopWorkload => "StopWorkload",
            Op::SuspendWorkload => "SuspendWorkload",
            Op::ResumeWorkload => "ResumeWorkload",
            Op::AttachVolume => "AttachVolume",
            Op::Revoke => "Revoke",
            Op::GetAudit => "GetAudit",
            Op::DevMeasure => "DevMeasure",
            Op::MigrateWorkload => "MigrateWorkload",
            Op::AcceptMigration => "AcceptMigration",
            Op::MigrationRecords => "MigrationRecords",
            Op::RecipientDocument => "RecipientDocument",
            Op::RecipientOpen => "RecipientOpen",
            Op::NetPeers => "NetPeers",
            Op::NetStatus => "NetStatus",
        }
    }
}

/// One route of the agent API.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    /// HTTP method.
    pub method: &'static str,
    /// Path (axum syntax).
    pub path: &'static str,
    /// Operation.
    pub op: Op,
    /// Who may call it.
    pub access: Access,
    /// Routed only on dev hosts with `dev_measure` (production refuses it at load).
    pub dev_only: bool,
}

const KS: &[Role] = &[Role::KeyService];
const OPS: &[Role] = &[Role::Operator];
const KS_OPS: &[Role] = &[Role::KeyService, Role::Operator];
const HOSTS: &[Role] = &[Role::Host];

const fn r(method: &'static str, path: &'static str, op: Op, access: Access) -> RouteSpec {
    RouteSpec {
        method,
        path,
        op,
        access,
        dev_only: false,
    }
}

/// THE table of the agent API: [`router`] is built from it (a route that is not here does
/// not exist), and the authorization layer reads it. Roles come from the caller's client
/// certificate (SAN URI `caas:role:<role>`), which must chain to the deployment CA.
pub const ROUTES: &[RouteSpec] = &[
    r("GET", "/healthz", Op::Health, Access::Public),
    r("POST", "/v1/agent/quote", Op::Quote, Access::Roles(KS)),
    r(
        "GET",
        "/v1/agent/bind-key",
        Op::GetBindKey,
        Access::Roles(KS_OPS),
    ),
    r(
        "GET",
        "/v1/agent/status",
        Op::GetStatus,
        Access::Roles(KS_OPS),
    ),
    r("POST", "/v1/agent/enroll", Op::Enroll, Access::Roles(OPS)),
    r(
        "GET",
        "/v1/agent/workloads",
        Op::ListWorkloads,
        Access::Roles(OPS),
    ),
    r(
        "POST",
        "/v1/agent/workloads",
        Op::LaunchWorkload,
        Access::Roles(KS),
    ),
    r(
        "POST",
        "/v1/agent/workloads/{vm}/stop",
        Op::StopWorkload,
        Access::Roles(OPS),
    ),
    r(
        "POST",
        "/v1/agent/workloads/{vm}/suspend",
        Op::SuspendWorkload,
        Access::Roles(KS_OPS),
    ),
    r(
        "POST",
        "/v1/agent/resume",
        Op::ResumeWorkload,
        Access::Roles(KS_OPS),
    ),
    r(
        "POST",
        "/v1/agent/workloads/{vm}/volumes",
        Op::AttachVolume,
        Access::Roles(KS),
    ),
    r(
        "POST",
        "/v1/agent/workloads/{vm}/migrate",
        Op::MigrateWorkload,
        Access::Roles(KS_OPS),
    ),
    r(
        "POST",
        "/v1/agent/migrations",
        Op::AcceptMigration,
        Access::Roles(HOSTS),
    ),
    r(
        "POST",
        "/v1/agent/migrations/{id}/records",
        Op::MigrationRecords,
        Access::Roles(HOSTS),
    ),
    r("POST", "/v1/agent/revoke", Op::Revoke, Access::Roles(KS)),
    r(
        "POST",
        "/v1/agent/net/peers",
        Op::NetPeers,
        Access::Roles(KS),
    ),
    r(
        "GET",
        "/v1/agent/workloads/{vm}/net",
        Op::NetStatus,
        Access::Roles(OPS),
    ),
    r("GET", "/v1/agent/audit", Op::GetAudit, Access::Roles(OPS)),
    r(
        "POST",
        "/v1/agent/recipient/document",
        Op::RecipientDocument,
        Access::Roles(OPS),
    ),
    r(
        "POST",
        "/v1/agent/recipient/open",
        Op::RecipientOpen,
        Access::Roles(OPS),
    ),
    RouteSpec {
        method: "POST",
        path: "/v1/agent/dev/measure",
        op: Op::DevMeasure,
        access: Access::Roles(OPS),
        dev_only: true,
    },
];

/// The routes this agent serves (the dev-only one only with `dev_measure`).
pub fn routes(cfg: &AgentConfig) -> impl Iterator<Item = &'static RouteSpec> + '_ {
    ROUTES.iter().filter(|r| !r.dev_only || cfg.dev_measure)
}

fn handler(op: Op) -> MethodRouter<Arc<Agent>> {
    use crate::tl::AttachRequest;
    use axum::extract::Path;
    use caas_tl::wire::{LaunchCall, Signed};
    match op {
        Op::Health => get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        Op::Quote => post(
            |State(a): State<Arc<Agent>>, Json(ch): Json<Challenge>| async move {
                a.evidence(&ch).await.map(Json).map_err(ApiError)
            },
        ),
        Op::GetBindKey => get(|State(a): State<Arc<Agent>>| async move { Json(a.bind_key()) }),
        Op::GetStatus => get(|State(a): State<Arc<Agent>>| async move { Json(a.status()) }),
        Op::Enroll => post(|State(a): State<Arc<Agent>>| async move {
            a.enroll().await.map(Json).map_err(ApiError)
        }),
        Op::ListWorkloads => {
            get(|State(a): State<Arc<Agent>>| async move { Json(a.workloads().await) })
        }
        Op::LaunchWorkload => post(
            |State(a): State<Arc<Agent>>, Json(c): Json<LaunchCall>| async move {
                a.launch(&c).await.map(Json).map_err(ApiError)
            },
        ),
        Op::StopWorkload => post(
            |State(a): State<Arc<Agent>>, Path(vm): Path<String>| async move {
                a.stop_workload(&vm)
                    .await
                    .map(|()| Json(serde_json::json!({ "stopped": vm })))
                    .map_err(ApiError)
            },
        ),
        Op::SuspendWorkload => post(
            |State(a): State<Arc<Agent>>, Path(vm): Path<String>| async move {
                a.suspend_workload(&vm).await.map(Json).map_err(ApiError)
            },
        ),
        Op::ResumeWorkload => post(
            |State(a): State<Arc<Agent>>, Json(c): Json<crate::tl::ResumeCall>| async move {
                a.resume_workload(&c).await.map(Json).map_err(ApiError)
            },
        ),
        Op::AttachVolume => post(
            |State(a): State<Arc<Agent>>, Path(vm): Path<String>, Json(r): Json<AttachRequest>| async move {
                a.attach_volume(&vm, &r).await.map(Json).map_err(ApiError)
            },
        ),
        Op::Revoke => post(
            |State(a): State<Arc<Agent>>, Json(n): Json<Signed>| async move {
                a.revoke(&n)
                    .await
                    .map(|n| Json(serde_json::json!({ "stopped": n })))
                    .map_err(ApiError)
            },
        ),
        Op::GetAudit => {
            get(
                |State(a): State<Arc<Agent>>| async move { a.audit_log().map(Json).map_err(ApiError) },
            )
        }
        Op::MigrateWorkload => post(
            |State(a): State<Arc<Agent>>,
             Path(vm): Path<String>,
             Json(c): Json<crate::migrate::MigrateCall>| async move {
                a.migrate_workload(&vm, &c)
                    .await
                    .map(Json)
                    .map_err(ApiError)
            },
        ),
        Op::AcceptMigration => post(
            |State(a): State<Arc<Agent>>,
             peer: Option<axum::Extension<caas_tls::server::Peer>>,
             Json(o): Json<caas_tl::migrate::MigrateOffer>| async move {
                let id = peer.as_ref().and_then(|p| p.0.identity.clone());
                a.accept_migration(&o, id.as_ref())
                    .await
                    .map(Json)
                    .map_err(ApiError)
            },
        ),
        Op::MigrationRecords => post(
            |State(a): State<Arc<Agent>>,
             Path(id): Path<String>,
             peer: Option<axum::Extension<caas_tls::server::Peer>>,
             body: axum::body::Bytes| async move {
                let who = peer.as_ref().and_then(|p| p.0.identity.clone());
                a.migration_records(&id, &body, who.as_ref())
                    .await
                    .map(Json)
                    .map_err(ApiError)
            },
        )
        // A batch of a VM stream's records (the caller is a host: the authorization layer
        // runs before the body is read).
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::migrate::RECORDS_BODY_LIMIT,
        )),
        Op::RecipientDocument => post(
            |State(a): State<Arc<Agent>>,
             peer: Option<axum::Extension<caas_tls::server::Peer>>,
             Json(ch): Json<Challenge>| async move {
                let r = a.recipient_document(&ch, peer.as_ref().map(|p| &p.0)).await;
                a.tl.audit("RecipientDocument", &hex::encode(&ch.nonce), &r);
                r.map(Json).map_err(ApiError)
            },
        ),
        Op::RecipientOpen => post(
            |State(a): State<Arc<Agent>>,
             peer: Option<axum::Extension<caas_tls::server::Peer>>,
             Json(o): Json<crate::recipient::OpenRequest>| async move {
                let r = a.recipient_open(&o, peer.as_ref().map(|p| &p.0)).await;
                a.tl.audit("RecipientOpen", "", &r);
                r.map(Json).map_err(ApiError)
            },
        ),
        Op::NetPeers => post(
            |State(a): State<Arc<Agent>>, Json(c): Json<crate::net::PeersCall>| async move {
                a.net_peers(&c)
                    .await
                    .map(|m| Json(serde_json::json!({ "members": m })))
                    .map_err(ApiError)
            },
        ),
        Op::NetStatus => get(
            |State(a): State<Arc<Agent>>, Path(vm): Path<String>| async move {
                a.net_status(&vm).await.map(Json).map_err(ApiError)
            },
        ),
        Op::DevMeasure => post(
            |State(a): State<Arc<Agent>>, Json(m): Json<DevMeasure>| async move {
                a.dev_measure(m.pcr, m.data.as_bytes())
                    .await
                    .map(|()| Json(serde_json::json!({ "extended": m.pcr })))
                    .map_err(ApiError)
            },
        ),
    }
}

fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": code, "message": message })),
    )
        .into_response()
}

/// The authorization layer: runs before any extractor (so before the body is read or
/// parsed). The route's entry in [`ROUTES`] decides; a request without a verified client
/// certificate, or with one lacking the route's role, is refused (401 `unauthenticated`,
/// 403 `forbidden`) and the refusal is audited with the caller. Allowed management calls
/// run with the caller recorded for their own audit records.
async fn authorize(
    State(a): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = match req.method().as_str() {
        "HEAD" => "GET",
        m => m,
    };
    let peer = req.extensions().get::<caas_tls::server::Peer>().cloned();
    let caller = peer
        .as_ref()
        .map_or_else(|| "anonymous@local".to_string(), |p| p.to_string());
    let Some(spec) = ROUTES.iter().find(|r| r.path == path && r.method == method) else {
        a.tl.audit_refusal("Unrouted", req.uri().path(), &caller, "forbidden");
        return refusal(StatusCode::FORBIDDEN, "forbidden", "no such operation");
    };
    let roles = match spec.access {
        Access::Public => return next.run(req).await,
        Access::Roles(roles) => roles,
    };
    let subject = req.uri().path().to_string();
    match peer.as_ref().and_then(|p| p.identity.as_ref()) {
        None => {
            a.tl.audit_refusal(spec.op.name(), &subject, &caller, "unauthenticated");
            refusal(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a client certificate from the deployment CA is required",
            )
        }
        Some(id) if !roles.iter().any(|r| id.has(*r)) => {
            a.tl.audit_refusal(spec.op.name(), &subject, &caller, "forbidden");
            refusal(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the caller's role may not call this operation",
            )
        }
        Some(_) => crate::tl::CALLER.scope(caller, next.run(req)).await,
    }
}

/// The agent's HTTP API, built from [`ROUTES`] (see there for each route's roles); every
/// route but `/healthz` goes through the authorization layer. `POST /v1/agent/revoke` is
/// TTP-signed as well. No route returns key material but `POST /v1/agent/recipient/open`
/// (a secret sealed to a recipient key, to the certificate that asked for that key).
pub fn router(agent: Arc<Agent>) -> Router {
    let mut app: Router<Arc<Agent>> = Router::new();
    for spec in routes(&agent.cfg) {
        app = app.route(spec.path, handler(spec.op));
    }
    app.route_layer(axum::middleware::from_fn_with_state(
        agent.clone(),
        authorize,
    ))
    .with_state(agent)
}

/// A running agent (API server + enrollment loop).
#[derive(Debug)]
pub struct RunningAgent {
    /// The agent.
    pub agent: Arc<Agent>,
    /// Its API base URL.
    pub url: String,
    /// Server task.
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds the API, starts serving, and enrolls (retrying every 2 s until the key service
/// accepts). Returns once the API is listening.
pub async fn spawn(cfg: AgentConfig) -> Result<RunningAgent, Error> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(Error::io(format!("bind {}", cfg.listen)))?;
    let addr = listener.local_addr().map_err(Error::io("local address"))?;
    let agent = Arc::new(Agent::new(cfg).await?);
    let url = {
        let mut adv = agent.advertise_url.lock().await;
        if agent.cfg.advertise_url.is_none() {
            *adv = format!("https://{addr}");
        }
        adv.clone()
    };
    let app = router(agent.clone());
    let tls = caas_tls::server::server_config(&agent.cfg.tls)
        .map_err(|e| Error::Config(format!("agent TLS: {e}")))?;
    // A handshake refused on its certificate (another CA, expired, ...) is audited too.
    let a3 = agent.clone();
    let on_refused: caas_tls::server::OnRefused = Arc::new(move |addr, reason| {
        tracing::warn!(%addr, %reason, "TLS client refused");
        a3.tl.audit_refusal(
            "TlsHandshake",
            &reason,
            &format!("unverified@{addr}"),
            "bad_certificate",
        );
    });
    let a2 = agent.clone();
    let net = tokio::spawn(crate::net::refresh_loop(Arc::downgrade(&agent)));
    let task = tokio::spawn(async move {
        let enroll = tokio::spawn(async move {
            loop {
                match a2.enroll().await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "enrollment failed; retrying in 2 s");
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                }
            }
        });
        if let Err(e) =
            caas_tls::server::serve(listener, app, tls, Some(on_refused), std::future::pending())
                .await
        {
            tracing::error!(error = %e, "host agent API stopped");
        }
        enroll.abort();
        net.abort();
    });
    Ok(RunningAgent { agent, url, task })
}

/// `caas host serve`: runs the agent until Ctrl-C.
pub async fn serve(cfg: AgentConfig) -> Result<(), Error> {
    let running = spawn(cfg).await?;
    tracing::info!(url = %running.url, "host agent listening");
    let _ = tokio::signal::ctrl_c().await;
    drop(running);
    Ok(())
}
