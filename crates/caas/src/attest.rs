//! The key service's attestation side in the `caas` binary: the registrar/verifier storage
//! on the key service's own store (`caas-store`), and the dev hosts of `caas dev --hosts N`
//! (each with its own swtpm, measured boot and host agent) enrolled and continuously
//! attested by the dev key service.
use anyhow::Result;
use caas_attest::service::AttestState;
use caas_attest::store::{AttestStore, AuditRecord};
use caas_attest::verifier::TrustEvent;
use caas_store::{AuditEntry, Batch, Store, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Account under which attestation records live in the store.
const ATTEST_ACCOUNT: &str = "-";

/// [`AttestStore`] on the key service's store: host and profile records are objects of
/// kinds `attest_host` / `attest_profile`; audit records join the key service's chain.
#[derive(Clone, Debug)]
pub struct KmsAttestStore(pub Store);

fn entry(r: AuditRecord) -> AuditEntry {
    AuditEntry {
        time_ms: i64::try_from(r.time_ms).unwrap_or(i64::MAX),
        account: ATTEST_ACCOUNT.into(),
        principal: r.principal,
        operation: r.operation,
        key_id: Some(r.subject),
        result: if r.result == "ok" {
            "Success".into()
        } else {
            r.result
        },
        request_id: uuid_like(),
        detail: serde_json::json!({ "detail": r.detail }).to_string(),
    }
}

fn uuid_like() -> String {
    caas_crypto::random_bytes(16)
        .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
        .unwrap_or_default()
}

fn storage(e: caas_store::Error) -> caas_attest::Error {
    caas_attest::Error::Storage(e.to_string())
}

impl AttestStore for KmsAttestStore {
    async fn get(
        &self,
        kind: &'static str,
        id: &str,
    ) -> Result<Option<Vec<u8>>, caas_attest::Error> {
        Ok(self
            .0
            .get(kind, ATTEST_ACCOUNT, id)
            .await
            .map_err(storage)?
            .map(|o| o.body))
    }
    async fn list(&self, kind: &'static str) -> Result<Vec<Vec<u8>>, caas_attest::Error> {
        Ok(self
            .0
            .list(kind, Some(ATTEST_ACCOUNT))
            .await
            .map_err(storage)?
            .into_iter()
            .map(|o| o.body)
            .collect())
    }
    async fn put(
        &self,
        kind: &'static str,
        id: &str,
        body: Vec<u8>,
        audit: Option<AuditRecord>,
    ) -> Result<(), caas_attest::Error> {
        let batch = Batch {
            writes: vec![Write::Put {
                kind: kind.into(),
                account: ATTEST_ACCOUNT.into(),
                id: id.into(),
                body,
                expect_rev: None,
            }],
            audit: audit.into_iter().map(entry).collect(),
        };
        self.0.commit(batch).await.map_err(storage).map(|_| ())
    }
    async fn audit(&self, record: AuditRecord) -> Result<(), caas_attest::Error> {
        self.0
            .commit(Batch {
                writes: vec![],
                audit: vec![entry(record)],
            })
            .await
            .map_err(storage)
            .map(|_| ())
    }
}

/// The attestation service of a dev deployment and its hosts.
pub struct DevAttestation {
    /// Routes to merge into the key service (host enrollment/attestation + admin).
    pub router: axum::Router,
    /// The simulated hosts (dropping them stops their swtpms and agents).
    pub hosts: caas_host::dev::DevHosts,
    /// The TTP and scheduler.
    pub tl: Arc<crate::tl::TlService>,
    /// The dev operator's client certificate (for the agents' management API).
    operator: caas_tls::pki::CertFiles,
    state: Arc<AttestState<KmsAttestStore, caas_attest::client::AgentClient>>,
    continuous: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for DevAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevAttestation")
            .field("hosts", &self.hosts.hosts.len())
            .finish_non_exhaustive()
    }
}

/// Name of the dev security profile.
pub const DEV_PROFILE: &str = "dev";

impl DevAttestation {
    /// Sets up `n` dev hosts (swtpm, measured boot) and the registrar/verifier that trusts
    /// their EK CA, with the `dev` profile matching their boot.
    pub async fn prepare(
        dir: &Path,
        n: usize,
        store: Store,
        endpoint: &str,
        ttp_keys: caas_tl::TtpKeys,
    ) -> Result<Self> {
        // The deployment CA in DIR/pki: the agents' server certificates, the key service's
        // client certificate to them and the operator's (DIR/env). pk_TTP is configured in
        // each agent, never fetched on first use.
        let opts = caas_host::dev::DevOptions {
            pki_dir: Some(dir.join("pki")),
            ttp_public_key: Some(ttp_keys.public()?),
            ..Default::default()
        };
        let hosts = caas_host::dev::DevHosts::prepare(&dir.join("hosts"), n, endpoint, opts)
            .await
            .map_err(|e| anyhow::anyhow!("dev hosts: {e}"))?;
        let agents = hosts
            .client(caas_tls::Role::KeyService)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let operator = hosts
            .issue("operator", caas_tls::Role::Operator)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let astore = Arc::new(KmsAttestStore(store));
        let profile = hosts
            .profile(DEV_PROFILE)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        caas_attest::store::put_profile(&*astore, &profile, "caas:dev", "CreateProfile")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let tl = Arc::new(
            crate::tl::TlService::new(astore.clone(), ttp_keys).with_agent_client(agents.clone()),
        );
        let tl_hook = tl.clone();
        let hook: caas_attest::service::TrustHook = Arc::new(move |ev: &TrustEvent| {
            if ev.trusted {
                tracing::info!(host = %ev.host, "host trusted");
            } else {
                let reasons = caas_attest::verifier::reason_codes(&ev.verdict);
                tracing::warn!(host = %ev.host, %reasons, "host no longer trusted: revoking its crypto domains' keys");
                // Attestation-gated release: the TTP already refuses this host's DBSP
                // requests (it is untrusted); its running crypto domains drop their keys.
                let (svc, host) = (tl_hook.clone(), ev.host.clone());
                tokio::spawn(async move { svc.revoke(&host, &reasons).await });
            }
        });
        let state = Arc::new(AttestState {
            registrar: hosts
                .registrar(DEV_PROFILE)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            verifier: caas_attest::verifier::Verifier::new(astore, 60_000),
            source: caas_attest::client::AgentClient { http: agents },
            on_trust_change: Some(hook),
        });
        // Dev mode: the admin routes are served unauthenticated on the loopback listener.
        let router =
            caas_attest::service::router(state.clone()).merge(crate::tl::router(tl.clone()));
        Ok(DevAttestation {
            operator,
            tl,
            router,
            hosts,
            state,
            continuous: None,
        })
    }

    /// Starts the agents (they enroll over HTTP, so the key service must be serving) and
    /// continuous attestation every `interval`.
    pub async fn start(&mut self, interval: Duration) -> Result<()> {
        self.hosts
            .start_agents(Duration::from_secs(90))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for h in &self.hosts.hosts {
            let v = self
                .state
                .attest(&h.name)
                .await
                .map_err(|e| anyhow::anyhow!("attesting {}: {e}", h.name))?;
            tracing::info!(host = %h.name, trusted = v.trusted, "initial attestation");
        }
        self.continuous = Some(caas_attest::service::spawn_continuous(
            self.state.clone(),
            interval,
        ));
        Ok(())
    }

    /// `DIR/env` variables of the hosts, the TTP's public key, the cloud storage, the
    /// deployment CA and the operator's certificate for the agents' management API.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .hosts
            .env_lines(DEV_PROFILE)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Ok(p) = self.tl.public() {
            v.push(("CAAS_TTP_PUBLIC_KEY".into(), p.to_text()));
        }
        v.push((
            "CAAS_STORAGE_DIR".into(),
            self.hosts.storage_dir().display().to_string(),
        ));
        let path = |p: &Path| p.display().to_string();
        v.push((
            caas_host::cli::ENV_PKI_CA.into(),
            path(&self.hosts.pki_ca_file()),
        ));
        v.push((
            caas_host::cli::ENV_OPERATOR_CERT.into(),
            path(&self.operator.cert),
        ));
        v.push((
            caas_host::cli::ENV_OPERATOR_KEY.into(),
            path(&self.operator.key),
        ));
        v
    }
}

impl Drop for DevAttestation {
    fn drop(&mut self) {
        if let Some(t) = self.continuous.take() {
            t.abort();
        }
    }
}
