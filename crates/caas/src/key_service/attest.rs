//! The key service's registrar (Privacy CA) and verifier: their storage on the key
//! service's own store (`caas-store`: records MAC-protected, audit records in the key
//! service's chain) and their construction from `[attestation]` ([`AttestationParams`]).
use anyhow::{Context, Result};
use caas_attest::SecurityProfile;
use caas_attest::service::AttestState;
use caas_attest::store::{AttestStore, AuditRecord};
use caas_store::{AuditEntry, Batch, Store, Write};
use std::path::PathBuf;
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
        request_id: request_id(),
        detail: serde_json::json!({ "detail": r.detail }).to_string(),
    }
}

/// A random request id for audit records (hex).
pub fn request_id() -> String {
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

/// The registrar and verifier of the key service, with their evidence source.
pub type AttestService = AttestState<KmsAttestStore, caas_attest::client::AgentClient>;

/// `[attestation]`: how hosts are enrolled and appraised.
#[derive(Debug, Clone)]
pub struct AttestationParams {
    /// TPM vendor CA certificates (PEM or DER files) that EK certificates must chain to.
    /// None: no host can enroll.
    pub ek_ca_files: Vec<PathBuf>,
    /// Security profiles created at start-up when missing (existing ones are kept: the
    /// operators' API owns them afterwards).
    pub profiles: Vec<SecurityProfile>,
    /// Profile assigned to a host at enrollment; `None`: an operator admits each host
    /// (`caas host set-profile`, permission `hosts:admit`).
    pub default_profile: Option<String>,
    /// Seconds between continuous attestations of every enrolled host.
    pub interval: Duration,
    /// How long an enrollment challenge stays valid.
    pub enrollment_ttl: Duration,
}

impl Default for AttestationParams {
    fn default() -> Self {
        Self {
            ek_ca_files: vec![],
            profiles: vec![],
            default_profile: None,
            interval: Duration::from_secs(60),
            enrollment_ttl: Duration::from_secs(60),
        }
    }
}

/// Builds the registrar and verifier over `store`; creates missing profiles (audited as
/// `principal`).
pub async fn open(
    store: Arc<KmsAttestStore>,
    p: &AttestationParams,
    principal: &str,
) -> Result<caas_attest::registrar::Registrar> {
    let mut ca = caas_attest::ekcert::EkCaStore::new();
    for f in &p.ek_ca_files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        ca.add(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
    }
    for profile in &p.profiles {
        profile.validate()?;
        if caas_attest::store::get_profile(&*store, &profile.name)
            .await?
            .is_none()
        {
            caas_attest::store::put_profile(&*store, profile, principal, "CreateProfile").await?;
        }
    }
    Ok(caas_attest::registrar::Registrar {
        ca,
        enrollment_ttl_ms: u64::try_from(p.enrollment_ttl.as_millis()).unwrap_or(u64::MAX),
        default_profile: p.default_profile.clone(),
    })
}
