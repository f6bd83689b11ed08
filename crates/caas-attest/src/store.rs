//! Storage for the registrar and verifier: a deliberately small trait over opaque JSON
//! objects addressed by (kind, id), with an optional audit record committed atomically with
//! a write — so the key service can implement it on its own store in a few lines — plus the
//! record types and an in-memory implementation for tests and benchmarks.

use crate::appraisal::Verdict;
use crate::error::Error;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

/// Object kind of host records.
pub const KIND_HOST: &str = "attest_host";
/// Object kind of security profiles.
pub const KIND_PROFILE: &str = "attest_profile";

/// One audit record (who did what to which host/profile, with which result).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    /// Who: an authenticated principal, `host:<name>` or `system`.
    pub principal: String,
    /// Operation, e.g. `EnrollHost`, `AttestHost`, `HostUntrusted`, `CreateProfile`.
    pub operation: String,
    /// Host or profile name.
    pub subject: String,
    /// `ok` or an error/reason code.
    pub result: String,
    /// Non-secret detail (JSON of reasons, profile revision, ...).
    pub detail: String,
}

/// What the registrar and verifier need from storage.
pub trait AttestStore: Send + Sync + 'static {
    /// Reads an object.
    fn get(
        &self,
        kind: &'static str,
        id: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, Error>> + Send;
    /// Lists all objects of a kind.
    fn list(&self, kind: &'static str) -> impl Future<Output = Result<Vec<Vec<u8>>, Error>> + Send;
    /// Writes an object and, atomically with it, an audit record.
    fn put(
        &self,
        kind: &'static str,
        id: &str,
        body: Vec<u8>,
        audit: Option<AuditRecord>,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Appends an audit record on its own (e.g. a refused enrollment).
    fn audit(&self, record: AuditRecord) -> impl Future<Output = Result<(), Error>> + Send;
}

/// In-memory store (tests, benchmarks).
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<(&'static str, String), Vec<u8>>>,
    audit: Mutex<Vec<AuditRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    /// A copy of the audit trail.
    pub fn audit_trail(&self) -> Vec<AuditRecord> {
        self.audit.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl AttestStore for MemoryStore {
    async fn get(&self, kind: &'static str, id: &str) -> Result<Option<Vec<u8>>, Error> {
        let m = self
            .objects
            .lock()
            .map_err(|_| Error::Storage("poisoned".into()))?;
        Ok(m.get(&(kind, id.to_string())).cloned())
    }
    async fn list(&self, kind: &'static str) -> Result<Vec<Vec<u8>>, Error> {
        let m = self
            .objects
            .lock()
            .map_err(|_| Error::Storage("poisoned".into()))?;
        Ok(m.iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect())
    }
    async fn put(
        &self,
        kind: &'static str,
        id: &str,
        body: Vec<u8>,
        audit: Option<AuditRecord>,
    ) -> Result<(), Error> {
        let mut m = self
            .objects
            .lock()
            .map_err(|_| Error::Storage("poisoned".into()))?;
        let mut a = self
            .audit
            .lock()
            .map_err(|_| Error::Storage("poisoned".into()))?;
        m.insert((kind, id.to_string()), body);
        if let Some(r) = audit {
            a.push(r);
        }
        Ok(())
    }
    async fn audit(&self, record: AuditRecord) -> Result<(), Error> {
        self.audit
            .lock()
            .map_err(|_| Error::Storage("poisoned".into()))?
            .push(record);
        Ok(())
    }
}

/// Enrollment state of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Credential issued, waiting for the host to prove activation.
    Pending,
    /// EK validated, AK certified.
    Enrolled,
}

/// The certified TPM-bound decrypt key of a host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BindKeyRecord {
    /// TPM2B_PUBLIC of the bind key.
    #[serde(with = "crate::b64")]
    pub public: Vec<u8>,
    /// TPMS_ATTEST of TPM2_Certify by the AK.
    #[serde(with = "crate::b64")]
    pub certify_attest: Vec<u8>,
    /// TPMT_SIGNATURE over it.
    #[serde(with = "crate::b64")]
    pub certify_signature: Vec<u8>,
}

/// A pending enrollment: only the hash of the credential secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingEnrollment {
    /// Enrollment id handed to the host.
    pub id: String,
    /// SHA-256 of the secret (hex).
    pub secret_sha256: String,
    /// Expiry, Unix ms.
    pub expires_ms: u64,
    /// The enrollment's agent URL, applied on success.
    pub agent_url: String,
    /// The enrollment's EK TPM2B_PUBLIC, applied on success.
    #[serde(with = "crate::b64")]
    pub ek_public: Vec<u8>,
    /// The enrollment's EK certificate, applied on success.
    #[serde(with = "crate::b64")]
    pub ek_cert: Vec<u8>,
    /// The AK being certified, applied on success.
    #[serde(with = "crate::b64")]
    pub ak_public: Vec<u8>,
}

/// What the key service knows about a compute host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostRecord {
    /// Host name.
    pub name: String,
    /// Base URL of the host agent's attestation API.
    pub agent_url: String,
    /// Enrollment state.
    pub state: HostState,
    /// Whether the latest attestation passed under `profile`.
    pub trusted: bool,
    /// Security profile the host is appraised against.
    pub profile: Option<String>,
    /// TPM2B_PUBLIC of the EK.
    #[serde(with = "crate::b64")]
    pub ek_public: Vec<u8>,
    /// EK certificate (DER).
    #[serde(with = "crate::b64")]
    pub ek_cert: Vec<u8>,
    /// TPM2B_PUBLIC of the AK.
    #[serde(with = "crate::b64")]
    pub ak_public: Vec<u8>,
    /// Name of the AK (hex).
    pub ak_name: String,
    /// Certified bind key, if the host presented one.
    pub bind_key: Option<BindKeyRecord>,
    /// Pending enrollment, while in `Pending`.
    pub pending: Option<PendingEnrollment>,
    /// Latest verdict.
    pub last_verdict: Option<Verdict>,
    /// When enrollment completed (Unix ms).
    pub enrolled_ms: u64,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo of the TLS client certificate the host
    /// enrolled with, endorsed by its AK ([`crate::tls_binding`]); `None` for a host that
    /// enrolled without TLS (the loopback dev key service).
    #[serde(default)]
    pub tls_spki_sha256: Option<String>,
}

/// Reads and decodes a host record.
pub async fn get_host<S: AttestStore>(s: &S, name: &str) -> Result<Option<HostRecord>, Error> {
    match s.get(KIND_HOST, name).await? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Storage(format!("host record: {e}"))),
        None => Ok(None),
    }
}

/// Encodes and writes a host record.
pub async fn put_host<S: AttestStore>(
    s: &S,
    h: &HostRecord,
    audit: Option<AuditRecord>,
) -> Result<(), Error> {
    let b = serde_json::to_vec(h).map_err(|e| Error::Storage(format!("host record: {e}")))?;
    s.put(KIND_HOST, &h.name, b, audit).await
}

/// All host records.
pub async fn list_hosts<S: AttestStore>(s: &S) -> Result<Vec<HostRecord>, Error> {
    s.list(KIND_HOST)
        .await?
        .iter()
        .map(|b| serde_json::from_slice(b).map_err(|e| Error::Storage(format!("host record: {e}"))))
        .collect()
}

/// Reads a profile.
pub async fn get_profile<S: AttestStore>(
    s: &S,
    name: &str,
) -> Result<Option<crate::SecurityProfile>, Error> {
    match s.get(KIND_PROFILE, name).await? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Storage(format!("profile: {e}"))),
        None => Ok(None),
    }
}

/// All profiles.
pub async fn list_profiles<S: AttestStore>(s: &S) -> Result<Vec<crate::SecurityProfile>, Error> {
    s.list(KIND_PROFILE)
        .await?
        .iter()
        .map(|b| serde_json::from_slice(b).map_err(|e| Error::Storage(format!("profile: {e}"))))
        .collect()
}

/// Validates and writes a profile with an audit record.
pub async fn put_profile<S: AttestStore>(
    s: &S,
    p: &crate::SecurityProfile,
    principal: &str,
    operation: &str,
) -> Result<(), Error> {
    p.validate()?;
    let b = serde_json::to_vec(p).map_err(|e| Error::Storage(format!("profile: {e}")))?;
    let audit = AuditRecord {
        time_ms: crate::now_ms(),
        principal: principal.to_string(),
        operation: operation.to_string(),
        subject: p.name.clone(),
        result: "ok".into(),
        detail: format!("pcrs={:?}", p.pcrs.keys().collect::<Vec<_>>()),
    };
    s.put(KIND_PROFILE, &p.name, b, Some(audit)).await
}
