//! The one `serve()` of the key service, used by `caas key-service serve` and `caas dev`:
//! binds, opens every role ([`Roles`]: KMS, registrar and verifier, TTP, scheduler) on one
//! store, mounts their routes behind [`super::auth::authenticate`], and runs the background
//! work (maintenance, continuous attestation) until SIGINT/SIGTERM.
use super::attest::{AttestService, AttestationParams, KmsAttestStore};
use super::config::{KeyServiceParams, TlParams};
use super::tl::TlService;
use anyhow::{Context, Result};
use caas_attest::verifier::TrustEvent;
use caas_kms::Kms;
use caas_kms::checkpoint::OnRollback;
use caas_kms::config::ServeParams;
use std::sync::Arc;

/// Process hygiene of the key service: not dumpable (no core file, no ptrace by the same
/// user), RLIMIT_CORE 0, and its memory locked where it may be without bound (HBKs and
/// domain keys never reach swap) — the crypto domain's routines
/// (`caas_domc::harden::harden_service`).
pub fn harden() -> Result<()> {
    caas_domc::harden::harden_service("key service")
        .map_err(|e| anyhow::anyhow!("cannot harden the key-service process: {e}"))
}

/// A key service that is bound but not yet serving.
pub struct Bound {
    /// The service.
    pub kms: Arc<Kms>,
    /// Bound listener.
    pub listener: tokio::net::TcpListener,
    /// Its address.
    pub addr: std::net::SocketAddr,
}

/// Opens the store (checking the audit chain against this node's checkpoint; see
/// `caas_kms::checkpoint`) and binds the listener.
pub async fn bind(params: &ServeParams, accept_audit_rollback: bool) -> Result<Bound> {
    let on_rollback = if accept_audit_rollback {
        OnRollback::Accept
    } else {
        OnRollback::Refuse
    };
    let kms = Kms::open_with(&params.kms, Some(on_rollback))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(params.listen)
        .await
        .with_context(|| format!("cannot listen on {}", params.listen))?;
    let addr = listener.local_addr()?;
    Ok(Bound {
        kms,
        listener,
        addr,
    })
}

/// The key service's roles besides the KMS, on the KMS's store: the registrar and
/// verifier, and the TTP (whose keys it owns, sealed under the domain key) with the
/// scheduler.
pub struct Roles {
    /// The KMS.
    pub kms: Arc<Kms>,
    /// Registrar and verifier.
    pub attest: Arc<AttestService>,
    /// TTP and scheduler.
    pub tl: Arc<TlService>,
    /// `Recipient` attestation documents: their nonces and verification.
    pub recipients: Arc<super::recipient::Recipients>,
    attestation: AttestationParams,
}

impl std::fmt::Debug for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roles").finish_non_exhaustive()
    }
}

impl Roles {
    /// Opens every role: loads (or creates) the TTP keys, the TPM vendor CAs and the
    /// configured profiles. `agents`: the HTTPS client (deployment CA pinned, the key
    /// service's client certificate) the verifier, TTP and scheduler reach host agents with;
    /// `None` gives a plain client, which agents (TLS only) refuse. `caas key-service serve`
    /// builds it from the config's `[agents]` section, `caas dev` from its dev PKI.
    pub async fn open(
        kms: Arc<Kms>,
        a: &AttestationParams,
        t: &TlParams,
        agents: Option<caas_attest::client::HttpClient>,
    ) -> Result<Arc<Self>> {
        let astore = Arc::new(KmsAttestStore(kms.store.clone()));
        let recipients = Arc::new(super::recipient::Recipients::new(astore.clone()));
        kms.set_recipient_verifier(recipients.clone());
        let registrar = super::attest::open(astore.clone(), a, "caas:config").await?;
        let keys = super::tl::load_or_create_keys(&kms).await?;
        let mut tl = TlService::new(astore.clone(), keys).with_agent_timeout(t.agent_timeout);
        if let Some(agents) = &agents {
            tl = tl.with_agent_client(agents.clone());
        }
        if !t.deliver_revocations {
            tl = tl.without_revocation_delivery();
        }
        let tl = Arc::new(tl);
        let revoke = t.revoke_untrusted_hosts;
        let tl_hook = tl.clone();
        let hook: caas_attest::service::TrustHook = Arc::new(move |ev: &TrustEvent| {
            if ev.trusted {
                tracing::info!(host = %ev.host, "host trusted");
            } else {
                let reasons = caas_attest::verifier::reason_codes(&ev.verdict);
                tracing::warn!(host = %ev.host, %reasons, "host no longer trusted");
                // Attestation-gated release: the TTP already refuses this host (it is
                // untrusted); its running crypto domains are told to drop their keys.
                if revoke {
                    let (svc, host) = (tl_hook.clone(), ev.host.clone());
                    tokio::spawn(async move { svc.revoke(&host, &reasons).await });
                }
            }
        });
        let attest = Arc::new(caas_attest::service::AttestState {
            registrar,
            verifier: caas_attest::verifier::Verifier::new(astore, 60_000),
            source: agents.map_or_else(caas_attest::client::AgentClient::default, |http| {
                caas_attest::client::AgentClient { http }
            }),
            on_trust_change: Some(hook),
        });
        Ok(Arc::new(Roles {
            kms,
            attest,
            tl,
            recipients,
            attestation: a.clone(),
        }))
    }

    /// Every route of every role (without authentication: [`serve`] adds it).
    fn router(&self) -> axum::Router {
        let audit_pk: String = self
            .kms
            .audit_public_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        caas_kms::server::router(self.kms.clone())
            .merge(caas_attest::service::router(self.attest.clone()))
            .merge(caas_tl::service::router(self.tl.clone()))
            .merge(
                axum::Router::new()
                    .route(
                        "/v1/recipient/challenge",
                        axum::routing::post(super::recipient::challenge_route),
                    )
                    .with_state(self.recipients.clone()),
            )
            .route(
                "/v1/audit/public-key",
                axum::routing::get(move || async move {
                    axum::Json(
                        serde_json::json!({ "algorithm": "Ed25519", "public_key": audit_pk }),
                    )
                }),
            )
    }

    /// The whole application: every route behind the authentication layer.
    pub fn app(&self) -> axum::Router {
        self.router().layer(axum::middleware::from_fn_with_state(
            self.kms.clone(),
            super::auth::authenticate,
        ))
    }
}

/// Serves every role until SIGINT/SIGTERM: maintenance and continuous attestation run in
/// the background.
pub async fn serve(params: KeyServiceParams, bound: Bound, roles: Arc<Roles>) -> Result<()> {
    let Bound {
        kms,
        listener,
        addr,
    } = bound;
    let maint = {
        let kms = kms.clone();
        let every = params.serve.maintenance_interval;
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                match caas_kms::ops::maintenance(&kms).await {
                    Ok((d, r)) if d + r > 0 => {
                        tracing::info!(deleted = d, rotated = r, "maintenance")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "maintenance failed"),
                }
            }
        })
    };
    let continuous =
        caas_attest::service::spawn_continuous(roles.attest.clone(), roles.attestation.interval);
    tracing::info!(%addr, tls = params.serve.tls.is_some(), "key service listening");
    let served = caas_kms::server::serve_router_with(
        roles.app(),
        listener,
        params.serve.tls,
        Some(handshake_audit(kms.clone())),
        shutdown_signal(),
    )
    .await;
    maint.abort();
    continuous.abort();
    // `bounded` key-use records still queued become durable before the checkpoint.
    kms.flush_audit().await;
    kms.sync_audit_checkpoint();
    served?;
    tracing::info!("key service stopped");
    Ok(())
}

/// Audits every TLS handshake refused on the client's certificate (another CA, a revoked
/// certificate): operation `TlsHandshake`, result `bad_certificate`, the peer's address and
/// rustls's reason.
fn handshake_audit(kms: Arc<Kms>) -> caas_tls::server::OnRefused {
    Arc::new(move |addr: std::net::SocketAddr, reason: String| {
        let kms = kms.clone();
        tokio::spawn(async move {
            let mut entry = caas_kms::audit::system_entry("TlsHandshake", "");
            entry.principal = format!("anonymous@{addr}");
            entry.result = "bad_certificate".into();
            entry.request_id = super::attest::request_id();
            entry.detail = serde_json::json!({
                "detail": "TLS handshake refused on the client certificate",
                "reason": reason.chars().take(256).collect::<String>(),
            })
            .to_string();
            if let Err(e) = kms
                .store
                .commit(caas_store::Batch {
                    writes: vec![],
                    audit: vec![entry],
                })
                .await
            {
                tracing::error!(error = %e, "cannot audit a refused TLS handshake");
            }
        });
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
