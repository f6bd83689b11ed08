//! The secure component (SC) of trusted launch and DBSP on the host (seed 003 §4.3, §4.4)
//! and the launch of encrypted workloads (seed 001 §3.4, Fig. 5).
//!
//! Launch, step by step ([`Agent::launch`]):
//! 1. TL.Request from the (untrusted) scheduler: σ_DM and freshness of r (host replay cache);
//!    the image's sealed configuration must name the signing DM as its owner (H2).
//! 2. TL.AttestRequest to the TTP: the request, the AK-certified bind key, and a quote whose
//!    qualifying data is the digest of the request body (σ_AIK) with the event log (IML).
//! 3. TL.Attestation: σ_TTP and r checked, c2 opened with the TPM bind key — only possible
//!    while the PCRs are in the state the bind key is bound to.
//! 4. id_vm, H1 (hash of the image in storage) and H2 (hash of the supplied pk_DM) checked.
//! 5. The crypto-domain configuration (sealed to this host's bind key by the tenant, seed 001
//!    Algorithm 1) opened with the TPM — again only in the trusted PCR state — with the
//!    owner's H2 in its AAD; its owner must be m2's H2 and its H1 the image's.
//! 6. The crypto domain started: a Secure Device Proxy process serving the image under k
//!    (the key goes over a pipe, never in arguments, environment or files) and a VSM process
//!    with the tenant's token (its domain key generated in its own memory); then the
//!    workload with τ and pk_DM injected (a 0600 file of the workload's identity, deleted
//!    once read). All of them run under the workload's own identity
//!    ([`crate::identity`]) in a 0700 run directory, and serve only it and the agent.
//!
//! The management API can launch, stop, list and attach; no route returns key material, a
//! plaintext configuration or crypto-domain memory, and every call is recorded in the
//! agent's keyed hash-chained audit log ([`crate::audit`]). TTP revocations are applied once: their sequence number
//! is recorded in `revocation.json` before the crypto domains are stopped.
use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::error::Error;
use crate::identity::{Identities, Ids, LaunchIds, RunAs, RunDirs};
use caas_crypto::SecretKey;
use caas_tl::crypto::{ak_nonce, split_bind_sealed};
use caas_tl::wire::{self, AkSigned, AttestRequest, LaunchCall, Meta, Signed, label};
use caas_tl::{TtpPublic, sc};
use caas_tpm::{KeyBlob, PcrBank};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Size limit of a sealed crypto-domain configuration.
const MAX_CONFIG: u64 = 64 * 1024;

/// Retries of a NetKeyReq the TTP refused as busy (`rekey_in_progress`), [`Agent::net_key`].
const NET_KEY_BUSY_RETRIES: usize = 20;

tokio::task_local! {
    /// The caller of the management call being served (`name[roles]@addr` from its
    /// certificate), set by the agent's authorization layer; in-process calls have none.
    pub(crate) static CALLER: String;
}

fn caller() -> String {
    CALLER
        .try_with(|c| c.clone())
        .unwrap_or_else(|_| "local".to_string())
}

/// Per-host TL state.
#[derive(Debug)]
pub struct TlHost {
    ttp: std::sync::RwLock<Option<TtpPublic>>,
    replay: sc::ReplayCache,
    pub(crate) workloads: tokio::sync::Mutex<HashMap<String, Workload>>,
    audit: std::sync::Arc<std::sync::Mutex<AuditLog>>,
    storage: PathBuf,
    run_dir: PathBuf,
    ids: Identities,
    /// The last revocation accepted (its sequence number), kept in `revocation.json`.
    revocation: std::sync::Mutex<RevocationState>,
    /// Bounds the audit records of refused calls (each is fsync'd).
    refusals: std::sync::Mutex<RefusalBudget>,
    /// Live migrations this host receives (`crate::migrate`).
    pub(crate) migrations: crate::migrate::MigrationState,
}

/// At most [`RefusalBudget::PER_SECOND`] refusal records a second: beyond that, refused
/// calls are counted and one `RefusalsSuppressed` record with the count is written when the
/// next second opens, so an unauthenticated flood cannot grow the log (and its fsyncs)
/// without bound nor go unrecorded.
#[derive(Debug)]
struct RefusalBudget {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl RefusalBudget {
    const PER_SECOND: u32 = 50;

    fn new() -> Self {
        Self {
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether this refusal is recorded; `Some(n)` first when `n` were suppressed before.
    fn admit(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut flushed = None;
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
            if self.suppressed > 0 {
                flushed = Some(std::mem::take(&mut self.suppressed));
            }
        }
        if self.used < Self::PER_SECOND {
            self.used += 1;
            (true, flushed)
        } else {
            self.suppressed += 1;
            (false, flushed)
        }
    }
}

/// What the agent keeps of the last TTP revocation it applied (`STATE/revocation.json`,
/// written atomically and fsync'd before the revocation is acted on): a notice whose
/// sequence number is not above `seq` is a replay and is refused, after restarts too.
/// The notice is public (TTP-signed host name, time, reason) and is kept so an operator can
/// see why the host's workloads were stopped.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RevocationState {
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notice: Option<Signed>,
}

impl RevocationState {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("revocation.json")
    }

    /// Loads the state. A file that is unreadable or does not parse sets the floor to the
    /// current time instead: every notice issued before this start is then refused as a
    /// replay, and the TTP's next notice (its `seq` is at least its issue time) is accepted.
    fn load(state_dir: &Path) -> Self {
        let path = Self::path(state_dir);
        let floor = || {
            tracing::warn!(path = %path.display(), "revocation state unreadable: refusing every earlier notice");
            Self {
                seq: caas_attest::now_ms(),
                notice: None,
            }
        };
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|_| floor()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(_) => floor(),
        }
    }

    fn store(&self, state_dir: &Path) -> Result<(), Error> {
        let path = Self::path(state_dir);
        write_private(&path, &wire::to_bytes(self))
    }
}

/// A running crypto-domain or workload process.
#[derive(Debug)]
struct Proc {
    what: &'static str,
    child: ProcChild,
    /// The VSM's control channel (token export/import, [`crate::token`]).
    control: Option<crate::token::VsmControl>,
}

#[derive(Debug)]
enum ProcChild {
    Plain(Child),
    Workload(caas_workload::driver::WorkloadHandle),
}

impl Proc {
    fn plain(what: &'static str, child: Child) -> Self {
        Self {
            what,
            child: ProcChild::Plain(child),
            control: None,
        }
    }

    fn pid(&self) -> u32 {
        match &self.child {
            ProcChild::Plain(c) => c.id(),
            ProcChild::Workload(h) => h.pid(),
        }
    }

    fn exited(&mut self) -> Option<String> {
        match &mut self.child {
            ProcChild::Plain(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            ProcChild::Workload(h) => h.try_wait().ok().flatten().map(|s| s.to_string()),
        }
    }

    /// SIGTERM (a Secure Device Proxy then flushes and marks its volume clean), SIGKILL
    /// after 2 s.
    fn stop(&mut self) {
        match &mut self.child {
            ProcChild::Plain(c) => {
                if let Ok(pid) = i32::try_from(c.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < deadline {
                        if let Ok(Some(_)) = c.try_wait() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            ProcChild::Workload(h) => {
                let _ = h.stop();
            }
        }
    }
}

/// The name under which qemu holds a live-migration pipe.
const MIGRATION_FD: &str = "caas-migrate";

/// A VM being received by live migration: its qemu reads the stream from a pipe that a
/// thread writes the opened `vm` records into.
pub(crate) struct IncomingVm {
    vm_id: String,
    /// Writes the chunks of qemu's stream (authenticated, in order) into its pipe until
    /// their sender (the migration's) is dropped.
    writer: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
    qmp: Option<caas_workload::qmp::Qmp>,
    /// When qemu was ready for its stream.
    pub(crate) ready: Instant,
}

impl std::fmt::Debug for IncomingVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingVm")
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

/// A launched workload and its crypto domain.
pub(crate) struct Workload {
    vm_id: String,
    image_id: String,
    h2: String,
    /// r of the TL.Request that launched it (names the TTP's session).
    launch_r: Vec<u8>,
    sp: String,
    /// DK_i (TL session key with the TTP).
    dk: Zeroizing<Vec<u8>>,
    /// τ and pk_DM as injected, kept (in this non-dumpable process only) so that a live
    /// migration can hand them to the attested target's crypto domain; zeroized at stop.
    tau: Zeroizing<Vec<u8>>,
    pk_dm: Vec<u8>,
    /// Workload driver.
    driver: String,
    endpoint: Option<String>,
    disk_uri: String,
    vsm_socket: PathBuf,
    /// The VSM's mutual-TLS address, for a launch with network transports.
    vsm_tls: Option<String>,
    /// The launch's client credentials until they are injected into the workload.
    tls_client: Option<caas_workload::TlsCredentials>,
    procs: Vec<Proc>,
    volumes: Vec<AttachedVolume>,
    started_ms: u64,
    dirs: RunDirs,
    /// The identities its crypto domain and the workload run under (returned when
    /// dropped, after the processes are stopped).
    identity: LaunchIds,
    /// Its network proxy, when attached to a network domain ([`crate::net`]).
    pub(crate) net: Option<crate::net::NetProxy>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct AttachedVolume {
    domain: String,
    sr: String,
    uri: String,
    proc: Proc,
    /// Served but not opened yet (a migration's or a resume's target).
    deferred: Option<DeferredOpen>,
}

/// A DBSP volume whose Secure Device Proxy already holds its key and answers the NBD
/// handshake, but opens and locks the volume only on the go byte (`--defer-open`): sent
/// once the previous writer released it (the migration's source committed; a suspended
/// VM's proxies stopped at suspend). Dropped without the go: the proxy never opens it.
struct DeferredOpen {
    req: AttachRequest,
    c4: Vec<u8>,
    stdin: std::process::ChildStdin,
    report: PathBuf,
}

impl std::fmt::Debug for DeferredOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredOpen")
            .field("domain", &self.req.domain)
            .field("sr", &self.req.sr)
            .finish_non_exhaustive()
    }
}

impl Workload {
    fn stop(&mut self) {
        // The workload first (it closes its NBD connections), then its volumes' proxies,
        // then the crypto domain.
        for p in self.procs.iter_mut().filter(|p| p.what == "workload") {
            p.stop();
        }
        // Its network proxy with it (the VM's NIC is gone; the key dies with the process).
        if let Some(n) = self.net.as_mut() {
            n.stop();
        }
        for v in &mut self.volumes {
            v.proc.stop();
        }
        self.volumes.clear();
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
        self.procs.clear();
        zeroize::Zeroize::zeroize(&mut *self.dk);
        zeroize::Zeroize::zeroize(&mut *self.tau);
    }

    /// Its TL session's credentials for a NetLeave, when it is attached to a network domain
    /// and was started by trusted launch (or a migration, or a resume).
    fn net_creds(&self) -> Option<crate::net::NetCreds> {
        (self.net.is_some() && self.launch_r.len() == 32).then(|| crate::net::NetCreds {
            launch_r: self.launch_r.clone(),
            h2: self.h2.clone(),
            sp: self.sp.clone(),
            dk: self.dk.clone(),
        })
    }

    /// Its VSM's control channel.
    fn vsm_control(&self) -> Option<crate::token::VsmControl> {
        self.procs.iter().find_map(|p| p.control.clone())
    }

    fn view(&self) -> WorkloadView {
        WorkloadView {
            vm_id: self.vm_id.clone(),
            image_id: self.image_id.clone(),
            sp: self.sp.clone(),
            endpoint: self.endpoint.clone(),
            disk_uri: self.disk_uri.clone(),
            vsm_socket: self.vsm_socket.display().to_string(),
            vsm_tls: self.vsm_tls.clone(),
            processes: self
                .procs
                .iter()
                .map(|p| format!("{}:{}", p.what, p.pid()))
                .chain(self.net.as_ref().map(|n| format!("net:{}", n.pid())))
                .collect(),
            volumes: self
                .volumes
                .iter()
                .map(|v| VolumeView {
                    domain: v.domain.clone(),
                    sr: v.sr.clone(),
                    uri: v.uri.clone(),
                })
                .collect(),
            started_ms: self.started_ms,
            net: self.net.as_ref().map(|n| n.view(&self.vm_id)),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A workload as the management API shows it (no key material).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkloadView {
    /// id_vm.
    pub vm_id: String,
    /// Image.
    pub image_id: String,
    /// Security profile.
    pub sp: String,
    /// The workload's PSK-TLS endpoint (for the DM).
    pub endpoint: Option<String>,
    /// NBD URI of the decrypted image disk (served by the crypto domain to the workload).
    pub disk_uri: String,
    /// VSM socket.
    pub vsm_socket: String,
    /// The VSM over TCP with mutual TLS bound to the launch (`HOST:PORT`), for a launch
    /// with network transports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsm_tls: Option<String>,
    /// `role:pid` of each process.
    pub processes: Vec<String>,
    /// Attached DBSP volumes.
    pub volumes: Vec<VolumeView>,
    /// Start time (Unix ms).
    pub started_ms: u64,
    /// Its network attachment (the member the scheduler tells the other members about).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetView>,
}

/// An attached DBSP volume.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VolumeView {
    /// Domain.
    pub domain: String,
    /// Storage resource.
    pub sr: String,
    /// NBD URI the workload uses.
    pub uri: String,
}

/// Result of a launch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LaunchResult {
    /// Host.
    pub host: String,
    /// The workload.
    pub workload: WorkloadView,
    /// Phase timings (name, milliseconds).
    pub timings: Vec<(String, f64)>,
}

/// `POST /v1/agent/workloads/{vm}/volumes`.
pub type AttachRequest = caas_tl::wire::VolumeRequest;

/// Result of an attach.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttachResult {
    /// The volume.
    pub volume: VolumeView,
    /// Whether the volume was created now.
    pub created: bool,
    /// Phase timings (name, milliseconds), after seed 003 Table 1.
    pub timings: Vec<(String, f64)>,
}

use crate::audit::AuditLog;
pub use crate::audit::{AuditEntry, verify_audit_log};

fn ms(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

impl TlHost {
    /// State for `cfg`; `audit_key` authenticates the audit log ([`crate::audit::key_from_tpm`]).
    pub fn new(
        cfg: &AgentConfig,
        audit_key: caas_crypto::chain::HmacChainKey,
    ) -> Result<Self, Error> {
        let run_dir = cfg.run_dir.clone();
        std::fs::create_dir_all(&run_dir)
            .map_err(Error::io(format!("create {}", run_dir.display())))?;
        // Workload identities traverse it to their own 0700 directories; nobody lists it.
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o711))
                .map_err(Error::io(format!("chmod {}", run_dir.display())))?;
        }
        // pk_TTP: configured, or fetched over the authenticated channel (see `Agent::ttp`);
        // never read back from a file an earlier, unauthenticated fetch could have written.
        Ok(Self {
            ttp: std::sync::RwLock::new(cfg.ttp_public_key.clone()),
            replay: sc::ReplayCache::default(),
            workloads: tokio::sync::Mutex::new(HashMap::new()),
            audit: std::sync::Arc::new(std::sync::Mutex::new(AuditLog::open(
                cfg.state_dir.join("audit.jsonl"),
                audit_key,
            ))),
            storage: cfg.storage_dir.clone(),
            ids: Identities::new(cfg.workload_ids, cfg.isolation, run_dir.clone()),
            run_dir,
            revocation: std::sync::Mutex::new(RevocationState::load(&cfg.state_dir)),
            refusals: std::sync::Mutex::new(RefusalBudget::new()),
            migrations: Default::default(),
        })
    }

    pub(crate) fn audit(&self, op: &str, subject: &str, r: &Result<impl Sized, Error>) {
        let result = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => error_code(e).to_string(),
        };
        if let Ok(mut a) = self.audit.lock() {
            a.append(op, subject, &result, &caller());
        }
    }

    /// Live migration, source: what the TTP and the target need to know of `vm_id` (its
    /// DM's H2, the r naming its TTP session, its description). No key.
    pub(crate) async fn migration_source(
        &self,
        vm_id: &str,
    ) -> Result<
        (
            String,
            Vec<u8>,
            crate::migrate::WorkloadTransfer,
            crate::migrate::DomainSecrets,
        ),
        Error,
    > {
        let g = self.workloads.lock().await;
        let w = g
            .get(vm_id)
            .ok_or_else(|| Error::InvalidRequest(format!("no workload {vm_id}")))?;
        if w.launch_r.len() != 32 {
            return Err(Error::InvalidRequest(format!(
                "workload {vm_id} was not started by trusted launch"
            )));
        }
        if w.tau.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "workload {vm_id} was resumed from a saved state, which carries no τ: it can be \
                 suspended again but not live-migrated"
            )));
        }
        Ok((
            w.h2.clone(),
            w.launch_r.clone(),
            crate::migrate::WorkloadTransfer {
                vm_id: w.vm_id.clone(),
                image_id: w.image_id.clone(),
                h2: w.h2.clone(),
                driver: w.driver.clone(),
                volumes: w
                    .volumes
                    .iter()
                    .map(|v| (v.domain.clone(), v.sr.clone()))
                    .collect(),
                net: w.net.as_ref().map(|n| n.attach.clone()),
            },
            crate::migrate::DomainSecrets::new(&w.tau, &w.pk_dm),
        ))
    }

    /// The QMP socket of `vm_id`'s VM (None: not a VM).
    pub(crate) async fn workload_qmp(&self, vm_id: &str) -> Option<PathBuf> {
        let g = self.workloads.lock().await;
        g.get(vm_id)?.procs.iter().find_map(|p| match &p.child {
            ProcChild::Workload(h) => h.qmp_path().map(Path::to_path_buf),
            ProcChild::Plain(_) => None,
        })
    }

    /// The VSM control channel of `vm_id`'s crypto domain.
    pub(crate) async fn vsm_control(&self, vm_id: &str) -> Option<crate::token::VsmControl> {
        self.workloads.lock().await.get(vm_id)?.vsm_control()
    }

    /// Whether a workload `vm_id` runs here.
    pub(crate) async fn has_workload(&self, vm_id: &str) -> bool {
        self.workloads.lock().await.contains_key(vm_id)
    }

    /// `vm_id`'s network attachment (no key, no counters).
    pub(crate) async fn net_view(&self, vm_id: &str) -> Option<crate::net::NetView> {
        let g = self.workloads.lock().await;
        g.get(vm_id)?.net.as_ref().map(|n| n.view(vm_id))
    }

    /// `NetProxyStop` for a workload leaving the table with a network proxy.
    fn audit_net_stop(&self, w: &Workload) {
        if let Some(n) = &w.net {
            self.audit(
                "NetProxyStop",
                &format!("{}/{}", w.vm_id, n.attach.domain),
                &Ok::<(), Error>(()),
            );
        }
    }

    /// Live migration, source: the VM stopped; its volumes' proxies stop now (SIGTERM: they
    /// flush, mark the volumes clean and release their locks) so the target can open them.
    pub(crate) async fn release_volumes(&self, vm_id: &str) {
        if let Some(w) = self.workloads.lock().await.get_mut(vm_id) {
            for v in &mut w.volumes {
                v.proc.stop();
            }
            w.volumes.clear();
        }
    }

    /// Live migration, source: the workload moved; its processes (the workload, the volume
    /// proxies, which flush and release their volumes, and the crypto domain) stop, its DK_i
    /// is zeroized and its run directory removed.
    /// Stops a workload's own process (a process workload leaving by migration), its
    /// crypto domain staying for the token's export; whether there was one.
    pub(crate) async fn stop_workload_process(&self, vm_id: &str) -> bool {
        let mut g = self.workloads.lock().await;
        let Some(w) = g.get_mut(vm_id) else {
            return false;
        };
        let mut stopped = false;
        for p in w.procs.iter_mut().filter(|p| p.what == "workload") {
            p.stop();
            stopped = true;
        }
        w.procs.retain(|p| p.what != "workload");
        stopped
    }

    /// A migrated VM's source copy after the target continued it: out of the table now
    /// (no request reaches it any more), its stopped qemu and crypto domain stopped and
    /// its run directory removed right after, off the migration's answer.
    pub(crate) async fn drop_migrated_soon(&self, vm_id: &str) {
        if let Some(mut w) = self.workloads.lock().await.remove(vm_id) {
            self.audit_net_stop(&w);
            let audit = self.audit.clone();
            let vm_id = vm_id.to_string();
            tokio::task::spawn_blocking(move || {
                w.stop();
                remove_run_dir(&audit, &vm_id, &w.dirs);
            });
        }
    }

    pub(crate) async fn drop_migrated(&self, vm_id: &str) {
        if let Some(mut w) = self.workloads.lock().await.remove(vm_id) {
            w.stop();
            self.audit_net_stop(&w);
            remove_run_dir(&self.audit, vm_id, &w.dirs);
        }
    }

    /// Records a refused call (authentication or authorization) with its caller.
    pub(crate) fn audit_refusal(&self, op: &str, subject: &str, caller: &str, code: &str) {
        let (record, flushed) = match self.refusals.lock() {
            Ok(mut b) => b.admit(Instant::now()),
            Err(_) => (true, None),
        };
        if let Ok(mut a) = self.audit.lock() {
            if let Some(n) = flushed {
                a.append("RefusalsSuppressed", &n.to_string(), "rate_limited", "-");
            }
            if record {
                tracing::warn!(%op, %subject, %caller, %code, "agent API call refused");
                a.append(op, subject, code, caller);
            }
        }
    }

    /// Path of an image's files in the cloud storage.
    pub fn image_dir(storage: &Path, image_id: &str) -> PathBuf {
        storage.join("images").join(image_id)
    }

    /// Path of a DBSP volume in the cloud storage.
    pub fn volume_path(storage: &Path, domain: &str, sr: &str) -> PathBuf {
        storage
            .join("domains")
            .join(domain)
            .join(format!("{sr}.caasvol"))
    }
}

impl Drop for TlHost {
    fn drop(&mut self) {
        if let Ok(mut w) = self.workloads.try_lock() {
            w.clear();
        }
    }
}

/// The stable code of an agent error (for the API and the audit log).
pub fn error_code(e: &Error) -> &str {
    match e {
        Error::Tl(t) => t.code(),
        Error::Attest(caas_attest::Error::Remote { code, .. }) => code,
        Error::Attest(_) => "key_service_error",
        Error::Tpm(t) if t.is_policy_failure() => "pcr_state_changed",
        Error::Tpm(_) => "tpm_error",
        Error::InvalidRequest(_) => "invalid_request",
        Error::Domain(_) => "crypto_domain_error",
        Error::Isolation(_) => "isolation_unavailable",
        Error::Config(_) | Error::Io { .. } => "internal",
    }
}

fn sha256_file(path: &Path) -> Result<[u8; 32], Error> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(Error::io(format!("open {}", path.display())))?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(Error::io(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// The `caas` executable the crypto domains and workloads are started from.
pub(crate) fn caas_exe() -> Result<String, Error> {
    let exe = std::env::var_os("CAAS_EXE")
        .map(PathBuf::from)
        .map_or_else(std::env::current_exe, Ok)
        .map_err(Error::io("current executable"))?;
    Ok(exe.display().to_string())
}

/// Where a Secure Device Proxy serves its workload.
#[derive(Debug, Clone)]
enum Endpoint {
    /// A UNIX socket in the workload's run directory (peer-checked).
    Unix(PathBuf),
    /// TCP on loopback with mutual TLS bound to the launch ([`crate::pki`]).
    Tls(std::net::SocketAddr, TlsFiles),
}

impl Endpoint {
    async fn reachable(&self) -> bool {
        match self {
            Endpoint::Unix(p) => tokio::net::UnixStream::connect(p).await.is_ok(),
            Endpoint::Tls(a, _) => tokio::net::TcpStream::connect(a).await.is_ok(),
        }
    }

    /// The NBD URI the workload is given.
    fn nbd_uri(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("nbd+unix:///caas?socket={}", p.display()),
            Endpoint::Tls(a, _) => format!("nbds://{a}/caas"),
        }
    }
}

/// The launch's server credentials as files for the crypto-domain processes, which read
/// them at start (as root, before switching to their identity); removed by the agent once
/// they serve.
#[derive(Debug, Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A launch's network transports: the launch's credentials, where the disk and the VSM
/// will listen, and the client credentials for the workload.
struct NetPlan {
    files: TlsFiles,
    /// Removes the server credentials from the disk when the plan is dropped (served, or
    /// the launch failed).
    _cleanup: RemoveOnDrop,
    disk: std::net::SocketAddr,
    vsm: std::net::SocketAddr,
    client: caas_workload::TlsCredentials,
}

impl std::fmt::Debug for NetPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPlan")
            .field("disk", &self.disk)
            .field("vsm", &self.vsm)
            .finish_non_exhaustive()
    }
}

/// A directory removed when this is dropped.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on loopback (bound, then released for the process that serves it; a
/// lost race makes the launch fail, never serve someone else).
fn free_loopback_addr() -> Result<std::net::SocketAddr, Error> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(Error::io("pick a loopback port"))
}

/// Makes the launch's CA and certificates ([`crate::pki`]) and writes the server side to
/// `dir/tls` (0700 directory, 0600 files of the agent).
fn net_plan(dir: &Path, vm_id: &str) -> Result<NetPlan, Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = crate::pki::LaunchPki::generate(vm_id)?;
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).map_err(Error::io("create the TLS directory"))?;
    let cleanup = RemoveOnDrop(tls.clone());
    std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("chmod the TLS directory"))?;
    let files = TlsFiles {
        ca: tls.join("launch-ca.pem"),
        cert: tls.join("server.pem"),
        key: tls.join("server.key"),
    };
    write_private(&files.ca, pki.ca_pem.as_bytes())?;
    write_private(&files.cert, pki.server_cert_pem.as_bytes())?;
    write_private(&files.key, pki.server_key_pem.as_bytes())?;
    Ok(NetPlan {
        disk: free_loopback_addr()?,
        vsm: free_loopback_addr()?,
        client: caas_workload::TlsCredentials {
            ca_pem: pki.ca_pem.as_bytes().to_vec(),
            cert_pem: pki.client_cert_pem.as_bytes().to_vec(),
            key_pem: caas_crypto::SecretBytes::from_slice(pki.client_key_pem.as_bytes()),
        },
        files,
        _cleanup: cleanup,
    })
}

/// A launch's network transports once served: the server key is gone from the disk.
struct NetLaunch {
    disk_uri: String,
    vsm: std::net::SocketAddr,
    client: caas_workload::TlsCredentials,
}

impl NetPlan {
    /// The crypto-domain processes have read the server credentials (or failed): removes
    /// them from the disk.
    fn served(self) -> NetLaunch {
        // `self._cleanup` is dropped on return: the server key leaves the disk.
        NetLaunch {
            disk_uri: format!("nbds://{}/caas", self.disk),
            vsm: self.vsm,
            client: self.client,
        }
    }
}

async fn wait_for_socket(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<(), Error> {
    wait_for(&Endpoint::Unix(path.to_path_buf()), proc, timeout).await
}

async fn wait_for(ep: &Endpoint, proc: &mut Proc, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if ep.reachable().await {
            return Ok(());
        }
        if let Some(st) = proc.exited() {
            return Err(Error::Domain(format!("{} exited ({st})", proc.what)));
        }
        if Instant::now() > deadline {
            return Err(Error::Domain(format!("{} did not come up", proc.what)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a Secure Device Proxy process for `volume` on `ep`; it waits for its key on the
/// returned stdin pipe (never in arguments, environment or files), then switches to the
/// crypto domain's identity and serves only the workload's identity and the agent.
fn spawn_sdp_unkeyed(
    volume: &Path,
    ep: &Endpoint,
    read_only: bool,
    ids: Ids,
    anchor: Option<(u32, &Path)>,
    defer: bool,
) -> Result<(Proc, std::process::ChildStdin), Error> {
    let mut cmd = caas_tpm::swtpm::command_without_inherited_fds(&caas_exe()?);
    cmd.arg("volume").arg("serve").arg(volume);
    match ep {
        Endpoint::Unix(socket) => {
            let _ = std::fs::remove_file(socket);
            // The crypto-domain directory (0710, the workload's group) and the peer check
            // guard the socket, which the workload's identity must be able to open.
            cmd.arg("--socket")
                .arg(socket)
                .args(["--socket-mode", "666"]);
        }
        Endpoint::Tls(addr, f) => {
            cmd.arg("--tcp")
                .arg(addr.to_string())
                .arg("--tls-cert")
                .arg(&f.cert)
                .arg("--tls-key")
                .arg(&f.key)
                .arg("--tls-client-ca")
                .arg(&f.ca);
        }
    }
    cmd.arg("--key-file")
        .arg("/dev/stdin")
        .args(ids.peer_args())
        .args(read_only.then_some("--read-only"));
    // A DBSP volume: refused below its anchored epoch; the epoch it opens at is reported.
    if let Some((min_epoch, report)) = anchor {
        let _ = std::fs::remove_file(report);
        cmd.arg("--min-epoch")
            .arg(min_epoch.to_string())
            .arg("--report-epoch")
            .arg(report);
    }
    // Serve at once, open and lock the volume on the agent's go ([`DeferredOpen`]).
    if defer {
        cmd.arg("--defer-open");
    }
    if ids.domain.own {
        cmd.arg("--run-as")
            .arg(format!("{}:{}", ids.domain.uid, ids.domain.gid));
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(Error::io("start the Secure Device Proxy"))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Domain("no stdin pipe to the Secure Device Proxy".into()))?;
    Ok((Proc::plain("sdp", child), stdin))
}

/// Hands the key to a waiting Secure Device Proxy and waits until it serves.
async fn key_sdp(
    mut proc: Proc,
    mut stdin: std::process::ChildStdin,
    key: &SecretKey,
    ep: &Endpoint,
) -> Result<Proc, Error> {
    let r = stdin
        .write_all(key.expose())
        .map_err(Error::io("hand the key to the Secure Device Proxy"));
    drop(stdin);
    if let Err(e) = r {
        proc.stop();
        return Err(e);
    }
    if let Err(e) = wait_for(ep, &mut proc, Duration::from_secs(20)).await {
        proc.stop();
        return Err(e);
    }
    Ok(proc)
}

/// Starts a Secure Device Proxy serving `volume` on `socket` with `key`.
async fn spawn_sdp(
    volume: &Path,
    socket: &Path,
    key: &SecretKey,
    read_only: bool,
    ids: Ids,
    anchor: Option<(u32, &Path)>,
) -> Result<Proc, Error> {
    let ep = Endpoint::Unix(socket.to_path_buf());
    let (proc, stdin) = spawn_sdp_unkeyed(volume, &ep, read_only, ids, anchor, false)?;
    key_sdp(proc, stdin, key, &ep).await
}

/// The crypto domain's processes, started but not yet keyed.
struct Prestart {
    sdp: Proc,
    sdp_stdin: std::process::ChildStdin,
    disk: Endpoint,
    vsm: Proc,
    vsm_sock: PathBuf,
}

impl Prestart {
    fn abort(&mut self) {
        self.sdp.stop();
        self.vsm.stop();
    }
}

/// Starts the tenant's crypto domain without keys: the image's Secure Device Proxy (waiting
/// for k) and the VSM process (its token not yet initialised; its domain key is generated
/// in its own memory and never stored), both under the crypto domain's identity, in `dir`
/// (the crypto-domain directory), serving the workload's identity and the agent. With
/// `net`, the disk is served over NBD with mutual TLS instead of the UNIX socket, and the
/// VSM also over TCP with mutual TLS, both trusting only the launch's CA.
async fn prestart(
    dir: &Path,
    image: &Path,
    read_only: bool,
    ids: Ids,
    net: Option<&NetPlan>,
) -> Result<Prestart, Error> {
    let disk = match net {
        Some(n) => Endpoint::Tls(n.disk, n.files.clone()),
        None => Endpoint::Unix(dir.join("disk.sock")),
    };
    let vsm_sock = dir.join("vsm.sock");
    let (mut sdp, sdp_stdin) = spawn_sdp_unkeyed(image, &disk, read_only, ids, None, false)?;
    let state = dir.join("domc");
    let vsm = (|| {
        std::fs::create_dir_all(&state).map_err(Error::io("create crypto-domain state"))?;
        let _ = std::fs::remove_file(&vsm_sock);
        let run_as = format!("{}:{}", ids.domain.uid, ids.domain.gid);
        let mut cmd = caas_tpm::swtpm::command_without_inherited_fds(&caas_exe()?);
        cmd.args([
            "domc",
            "serve",
            "--ephemeral-key",
            "--control-stdio",
            "--socket-mode",
            "666",
            "--run-as",
            &run_as,
        ])
        .args(ids.peer_args())
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&vsm_sock);
        if let Some(n) = net {
            cmd.arg("--tcp")
                .arg(n.vsm.to_string())
                .arg("--tls-cert")
                .arg(&n.files.cert)
                .arg("--tls-key")
                .arg(&n.files.key)
                .arg("--tls-client-ca")
                .arg(&n.files.ca);
        }
        // Its control channel: pipes only the agent holds.
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(Error::io("start the VSM crypto domain"))?;
        let control = match (child.stdin.take(), child.stdout.take()) {
            (Some(to), Some(from)) => caas_domc::transfer::Control::new(to, from),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Domain("the VSM has no control channel".into()));
            }
        };
        let mut p = Proc::plain("vsm", child);
        p.control = Some(std::sync::Arc::new(std::sync::Mutex::new(control)));
        Ok::<_, Error>(p)
    })();
    let mut vsm = match vsm {
        Ok(v) => v,
        Err(e) => {
            sdp.stop();
            return Err(e);
        }
    };
    if let Err(e) = wait_for_socket(&vsm_sock, &mut vsm, Duration::from_secs(20)).await {
        sdp.stop();
        vsm.stop();
        return Err(e);
    }
    Ok(Prestart {
        sdp,
        sdp_stdin,
        disk,
        vsm,
        vsm_sock,
    })
}

/// Keys a prestarted crypto domain from the opened configuration: k to the Secure Device
/// Proxy, the token's label and PINs to the VSM.
async fn finish_domain(pre: Prestart, cfg: &caas_tl::dm::DomcConfig) -> Result<Vec<Proc>, Error> {
    let Prestart {
        sdp,
        sdp_stdin,
        disk,
        mut vsm,
        vsm_sock,
    } = pre;
    let key = match cfg.key() {
        Ok(k) => k,
        Err(e) => {
            let (mut a, mut b) = (sdp, vsm);
            a.stop();
            b.stop();
            return Err(e.into());
        }
    };
    let (sock, label_text, so, user) = (
        vsm_sock.clone(),
        cfg.token_label.clone(),
        Zeroizing::new(cfg.so_pin.clone()),
        Zeroizing::new(cfg.user_pin.clone()),
    );
    let token = tokio::task::spawn_blocking(move || {
        caas_domc::dev::init_token(&sock, 0, &label_text, &so, &user)
    });
    let sdp = key_sdp(sdp, sdp_stdin, &key, &disk).await;
    let token = token
        .await
        .map_err(|e| Error::Domain(format!("token init task: {e}")))
        .and_then(|r| r.map_err(|e| Error::Domain(format!("token initialisation failed: {e}"))));
    match (sdp, token) {
        (Ok(sdp), Ok(())) => Ok(vec![sdp, vsm]),
        (Ok(mut sdp), Err(e)) => {
            sdp.stop();
            vsm.stop();
            Err(e)
        }
        (Err(e), _) => {
            vsm.stop();
            Err(e)
        }
    }
}

/// The DBSP fields (c4, μ) of the volume at `path` (None when it does not exist), checked to
/// name `domain`. `locked`: take the reader's lock while reading (refused while a writer
/// holds it); a deferred open reads the header without it, the proxy locks at the open.
async fn volume_dbsp(
    path: &Path,
    domain: &str,
    locked: bool,
) -> Result<Option<(Vec<u8>, Vec<u8>)>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let store = match locked {
        true => caas_sdp::store::Store::open_file(path, false, None),
        false => caas_sdp::store::Store::open_file_unlocked(path, false, false),
    }
    .map_err(|e| Error::Domain(format!("open volume: {e}")))?;
    let (h, _) = caas_sdp::engine::inspect(&store)
        .await
        .map_err(|e| Error::Tl(caas_tl::Error::rejected("header_invalid", e.to_string())))?;
    if h.dbsp.domain_id != domain.as_bytes() {
        return Err(Error::Tl(caas_tl::Error::rejected(
            "header_invalid",
            "the volume's domain header names another domain",
        )));
    }
    Ok(Some((h.dbsp.c4.clone(), h.dbsp.mu.clone())))
}

/// A 0600 file of the agent (atomic; the one writer, `caas_crypto::fs`).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    caas_crypto::fs::write_secret(path, bytes, None)
        .map_err(Error::io(format!("write {}", path.display())))
}

/// Writes the workload's spec, injected secrets and PIN file, starts it through its driver
/// and waits for its ready file; returns the process and its PSK-channel address.
/// Where a workload's PSK channel listens: the agent's own address, so that the tenant
/// reaches it from its machine (the channel is authenticated by τ, and the workload proves
/// itself to the DM); loopback when the agent listens on every address (the endpoint the
/// tenant is given must be one address) — set `listen` to the host's address then.
pub(crate) fn workload_listen_ip(agent: std::net::IpAddr) -> std::net::IpAddr {
    if agent.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        agent
    }
}

/// The command that starts a workload (qemu, or the process that stands in for a VM) as
/// `owner`: no inherited descriptor, stdout discarded, and file-creation mask 007, so that
/// qemu's NIC socket in the network directory, whose group is the crypto domain's, is
/// writable by the network proxy ([`crate::identity::RunDirs::net`]); the workload's
/// other files are in its own 0700 directory.
fn workload_command(program: &Path, owner: Option<(u32, u32)>) -> std::process::Command {
    let mut cmd = caas_crypto::hardening::command_without_inherited_fds_and_umask(program, 0o007);
    cmd.stdout(Stdio::null());
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(uid).gid(gid);
    }
    cmd
}

#[allow(clippy::too_many_arguments)]
async fn start_workload(
    vm_id: &str,
    dir: &Path,
    disk: &str,
    vsm_socket: &Path,
    volumes: Vec<String>,
    driver: &str,
    injected: &caas_workload::InjectedSecrets,
    user_pin: &str,
    id: RunAs,
    listen_ip: std::net::IpAddr,
    incoming: bool,
    network: Option<caas_workload::NetSpec>,
) -> Result<(Proc, String), Error> {
    let wl = |e: caas_workload::Error| Error::Domain(format!("workload: {e}"));
    // τ, pk_DM and the PIN: 0600 files of the workload's identity only, which it deletes
    // once read (the agent removes what is left once the workload is ready).
    let owner = id.own.then_some((id.uid, id.gid));
    let inject = dir.join("inject.json");
    let _ = std::fs::remove_file(&inject);
    injected.write_to_owned(&inject, owner).map_err(wl)?;
    let pin_file = dir.join("user.pin");
    caas_crypto::fs::write_secret(&pin_file, user_pin.as_bytes(), owner.map(Into::into))
        .map_err(Error::io(format!("write {}", pin_file.display())))?;
    let ready = dir.join("ready");
    let spec = caas_workload::WorkloadSpec {
        vm_id: vm_id.to_string(),
        listen: std::net::SocketAddr::new(listen_ip, 0),
        ready_file: ready.clone(),
        inject_file: inject,
        disk: disk.to_string(),
        vsm: Some(caas_workload::VsmSpec {
            socket: vsm_socket.to_path_buf(),
            user_pin_file: pin_file,
            slot: 0,
        }),
        volumes,
        network,
    };
    use caas_workload::driver::{Driver, ProcessDriver, QemuDriver};
    let driver: Box<dyn Driver> = match driver {
        "qemu" => {
            let mut q = QemuDriver::new(dir.to_path_buf());
            q.incoming = incoming;
            Box::new(q)
        }
        _ if incoming => {
            return Err(Error::InvalidRequest(
                "only a VM receives a live-migration stream".into(),
            ));
        }
        _ => {
            let d = ProcessDriver::new(PathBuf::from(caas_exe()?), dir.to_path_buf());
            Box::new(match owner {
                Some((uid, gid)) => d.owned_by(uid, gid),
                None => d,
            })
        }
    };
    let program = driver.program().map_err(wl)?;
    let cmd = workload_command(&program, owner);
    let mut handle = driver.start(&spec, cmd).map_err(wl)?;
    if incoming {
        // The guest does not boot: it waits for its state (`-incoming defer -S`); qemu has
        // read its fw_cfg files once its QMP socket answers (the caller connects to it).
        let addr = handle
            .forwarded_addr()
            .ok_or_else(|| Error::Domain("the VM has no forwarded port".into()))?;
        return Ok((
            Proc {
                what: "workload",
                child: ProcChild::Workload(handle),
                control: None,
            },
            addr.to_string(),
        ));
    }
    let (handle, addr) = tokio::task::spawn_blocking(move || {
        let r = handle.wait_ready(Duration::from_secs(60));
        (handle, r)
    })
    .await
    .map_err(|e| Error::Domain(format!("workload task: {e}")))?;
    let mut p = Proc {
        what: "workload",
        child: ProcChild::Workload(handle),
        control: None,
    };
    // The workload has read its PIN and τ: neither stays on the host's disk.
    let _ = std::fs::remove_file(dir.join("user.pin"));
    let _ = std::fs::remove_file(dir.join("inject.json"));
    match addr {
        Ok(a) => Ok((p, a.to_string())),
        Err(e) => {
            p.stop();
            Err(wl(e))
        }
    }
}

impl Agent {
    fn bind_blob(&self) -> KeyBlob {
        KeyBlob {
            public: self.keys.bind_public.clone(),
            private: self.keys.bind_private.clone(),
        }
    }

    /// TPM2_RSA_Decrypt with the bind key under its PCR policy.
    pub(crate) async fn bind_decrypt(&self, ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let bind = self.bind_blob();
        let pcrs = self.keys.bind_pcrs.clone();
        let ct = ct.to_vec();
        Ok(self
            .tpm
            .run(move |t| t.bind_decrypt(&bind, PcrBank::Sha256, &pcrs, &ct))
            .await?)
    }

    /// σ_AIK over `body`: a quote of the bind PCRs with qualifying data `ak_nonce(label, body)`.
    pub(crate) async fn ak_sign(&self, label_text: &str, body: Vec<u8>) -> Result<AkSigned, Error> {
        let nonce = ak_nonce(label_text, &body).to_vec();
        let ak = self.ak_blob();
        let pcrs = self.keys.bind_pcrs.clone();
        // One TPM command: the quote (the PCR values are bound by its digest and replayed
        // from the event log by the TTP, so they are not read separately).
        let (q, log) = tokio::join!(
            self.tpm
                .run(move |t| t.quote(&ak, &nonce, PcrBank::Sha256, &pcrs)),
            tokio::fs::read(&self.cfg.event_log)
        );
        let q = q?;
        let event_log = log.map_err(Error::io("read the event log"))?;
        Ok(AkSigned {
            body,
            evidence: caas_attest::Evidence {
                quote: q.attest,
                signature: q.signature,
                event_log,
                pcr_values: Vec::new(),
            },
        })
    }

    /// An AK-signed request to the TTP's `route` (`/v1/tl/...`) and its answer.
    pub(crate) async fn ttp_request<T: serde::de::DeserializeOwned>(
        &self,
        label_text: &str,
        route: &str,
        body: Vec<u8>,
    ) -> Result<T, Error> {
        let signed = self.ak_sign(label_text, body).await?;
        Ok(self
            .http
            .post(&format!("{}{route}", self.cfg.key_service_url), &signed)
            .await?)
    }

    /// pk_TTP: configured (`ttp_public_key`), or fetched from the key service over HTTPS
    /// (the deployment CA pinned, the `key-service` role required) and kept in memory.
    /// Never trust on first use: over plain HTTP whoever answers could pose as the TTP, so
    /// without a configured key the agent refuses (`ttp_key_unauthenticated`).
    pub(crate) async fn ttp(&self) -> Result<TtpPublic, Error> {
        if let Ok(g) = self.tl.ttp.read()
            && let Some(p) = g.as_ref()
        {
            return Ok(p.clone());
        }
        if !self.http.is_tls() {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "ttp_key_unauthenticated",
                "no ttp_public_key configured and the key service is not reached over \
                 authenticated TLS: the TTP's key is never taken on first use",
            )));
        }
        let p: TtpPublic = self
            .http
            .get(&format!("{}/v1/tl/ttp", self.cfg.key_service_url))
            .await?;
        if let Ok(mut g) = self.tl.ttp.write() {
            *g = Some(p.clone());
        }
        Ok(p)
    }

    /// Trusted launch of a workload (module doc, steps 1–6).
    pub async fn launch(&self, call: &LaunchCall) -> Result<LaunchResult, Error> {
        let r = self.launch_inner(call).await;
        self.tl.audit(
            "LaunchWorkload",
            &format!("{}/{}", call.vm_id, call.image_id),
            &r,
        );
        if let Err(e) = &r {
            tracing::warn!(vm = %call.vm_id, code = error_code(e), error = %e, "launch refused");
        }
        r
    }

    async fn launch_inner(&self, call: &LaunchCall) -> Result<LaunchResult, Error> {
        let mut timings = Vec::new();
        let t = Instant::now();
        let now = caas_attest::now_ms();
        let req = sc::verify_launch(call, now)?;
        let driver = self.check_new_workload(call).await?;
        self.tl.replay.check(&req.r, now)?;
        // The image's crypto-domain configuration names its owner: another DM's launch is
        // refused here, before any TPM or TTP work (and again on m2 once it is opened).
        let sealed_cfg = self.read_config(&call.image_id)?;
        let h2 = hex::encode(caas_tl::crypto::sha256(&req.pk_dm));
        caas_tl::dm::SealedDomc::parse(&sealed_cfg)?.check_owner(&h2)?;
        timings.push(("verify request".to_string(), ms(t)));
        // The TL protocol runs while the crypto-domain processes start (they get no key
        // until the protocol has succeeded, and are killed if it fails).
        let image = TlHost::image_dir(&self.tl.storage, &call.image_id).join("image.caasvol");
        let id = self.tl.ids.allocate_launch()?;
        let dir = self.fresh_dirs(&call.vm_id, &id)?;
        let net = call
            .network
            .then(|| net_plan(&dir.domain, &call.vm_id))
            .transpose()?;
        let t = Instant::now();
        let (tl, pre) = tokio::join!(self.tl_protocol(call, &req, &image, &sealed_cfg), async {
            let r = prestart(&dir.domain, &image, true, Ids::of(&id), net.as_ref()).await;
            (r, ms(t))
        });
        let (pre, pre_ms) = pre;
        let ((m2, cfg, tl_timings), pre) = match (tl, pre) {
            (Ok(x), Ok(p)) => (x, p),
            (Err(e), Ok(mut p)) => {
                p.abort();
                return Err(e);
            }
            (_, Err(e)) => return Err(e),
        };
        timings.push((
            "crypto-domain processes started (in parallel with TL)".to_string(),
            pre_ms,
        ));
        timings.extend(tl_timings);
        let t = Instant::now();
        let procs = finish_domain(pre, &cfg).await;
        let net = net.map(NetPlan::served);
        let procs = procs?;
        timings.push(("crypto domain keyed (k, token)".to_string(), ms(t)));
        self.run_workload(
            call, &req.sp, &m2.h2, &req.r, &m2.dk, &m2.tau, &req.pk_dm, driver, &cfg, dir, procs,
            now, timings, id, net, None,
        )
        .await
    }

    /// Benchmark baseline: the same launch without TL — the crypto domain started with a
    /// configuration the caller supplies, then the workload. Not reachable over the API.
    pub async fn launch_baseline(
        &self,
        call: &LaunchCall,
        cfg: &caas_tl::dm::DomcConfig,
        tau: &[u8],
        pk_dm: &[u8],
    ) -> Result<LaunchResult, Error> {
        let now = caas_attest::now_ms();
        let driver = self.check_new_workload(call).await?;
        let image = TlHost::image_dir(&self.tl.storage, &call.image_id).join("image.caasvol");
        let id = self.tl.ids.allocate_launch()?;
        let dir = self.fresh_dirs(&call.vm_id, &id)?;
        let net = call
            .network
            .then(|| net_plan(&dir.domain, &call.vm_id))
            .transpose()?;
        let t = Instant::now();
        let pre = prestart(&dir.domain, &image, true, Ids::of(&id), net.as_ref()).await?;
        let procs = finish_domain(pre, cfg).await;
        let net = net.map(NetPlan::served);
        let procs = procs?;
        let timings = vec![("crypto domain".to_string(), ms(t))];
        let dk = vec![0u8; 32];
        self.run_workload(
            call,
            "baseline",
            "",
            &[],
            &dk,
            tau,
            pk_dm,
            driver,
            cfg,
            dir,
            procs,
            now,
            timings,
            id,
            net,
            None,
        )
        .await
    }

    /// Live migration, target: the workload's crypto domain is re-created here from the
    /// image's configuration sealed to this host (opened by the TPM under the bind key's
    /// PCR policy, owner = the statement's H2, image = H1), its DBSP volumes attached under
    /// the workload's new TTP session (the migration id names it; DK_i came sealed to the
    /// bind key) — which raises their epochs, fencing any older writer — and the workload
    /// is started with the τ and pk_DM that travelled in the encrypted stream.
    /// Live migration of a VM, target: the crypto domain as in
    /// [`Agent::resume_migrated`], then qemu started waiting for its state (`-incoming defer
    /// -S`) and told to read it from a pipe, which a thread fills from `stream` (the opened
    /// `vm` records, queued by the caller while this runs); the caller calls
    /// [`Agent::finish_incoming`] after the end record.
    pub(crate) async fn prepare_incoming(
        &self,
        st: &caas_tl::migrate::MigrationStatement,
        t: &crate::migrate::WorkloadTransfer,
        secrets: &crate::migrate::DomainSecrets,
        dk: &[u8],
        stream: crate::migrate::StreamQueueRx,
    ) -> Result<IncomingVm, Error> {
        let r = self
            .prepare_incoming_inner(st, t, secrets, dk, stream)
            .await;
        if r.is_err()
            && let Some(mut w) = self.tl.workloads.lock().await.remove(&st.vm_id)
        {
            w.stop();
            remove_run_dir(&self.tl.audit, &st.vm_id, &w.dirs);
        }
        r
    }

    async fn prepare_incoming_inner(
        &self,
        st: &caas_tl::migrate::MigrationStatement,
        t: &crate::migrate::WorkloadTransfer,
        secrets: &crate::migrate::DomainSecrets,
        dk: &[u8],
        stream: crate::migrate::StreamQueueRx,
    ) -> Result<IncomingVm, Error> {
        let (call, cfg, dirs, procs, identity, _) = self.migrated_domain(st, t, secrets).await?;
        let now = caas_attest::now_ms();
        let w = Workload {
            vm_id: call.vm_id.clone(),
            image_id: call.image_id.clone(),
            h2: st.h2.clone(),
            launch_r: st.migration_id.clone(),
            sp: st.sp.clone(),
            dk: Zeroizing::new(dk.to_vec()),
            tau: Zeroizing::new(secrets.tau().to_vec()),
            pk_dm: secrets.pk_dm().to_vec(),
            driver: t.driver.clone(),
            endpoint: None,
            disk_uri: Endpoint::Unix(dirs.domain.join("disk.sock")).nbd_uri(),
            vsm_socket: dirs.domain.join("vsm.sock"),
            vsm_tls: None,
            tls_client: None,
            procs,
            volumes: Vec::new(),
            started_ms: now,
            dirs,
            identity,
            net: None,
        };
        let (dir, disk, vsm_socket, run_as) = (
            w.dirs.workload.clone(),
            w.disk_uri.clone(),
            w.vsm_socket.clone(),
            w.identity.workload.run_as(),
        );
        let (sock_dir, net_dir, ids) = (
            w.dirs.domain.clone(),
            w.dirs.net.clone(),
            Ids::of(&w.identity),
        );
        self.tl.workloads.lock().await.insert(call.vm_id.clone(), w);
        // The volumes: keys under the new session now, served to qemu at its start, opened
        // only after the source's commit (`finish_incoming`).
        let mut uris = Vec::new();
        for (d, sr) in &t.volumes {
            let v = self
                .attach_deferred(
                    &call.vm_id,
                    &st.migration_id,
                    &st.h2,
                    &st.sp,
                    dk,
                    (d, sr),
                    &sock_dir,
                    ids,
                )
                .await?;
            uris.push(v.uri.clone());
            let mut g = self.tl.workloads.lock().await;
            g.get_mut(&call.vm_id)
                .ok_or_else(|| Error::Domain("workload vanished".into()))?
                .volumes
                .push(v);
        }
        // Its network proxy (the same NIC as on the source: MAC from N and id_vm), keyed
        // only after the source's commit (`finish_incoming`): this session's first key
        // retires the source's at the TTP.
        let network = match &t.net {
            Some(n) => Some(self.attach_net(&call.vm_id, n, &net_dir, ids).await?.1),
            None => None,
        };
        let pk: [u8; 32] = secrets
            .pk_dm()
            .try_into()
            .map_err(|_| Error::InvalidRequest("pk_DM must be 32 bytes".into()))?;
        let injected = caas_workload::InjectedSecrets {
            tau: caas_crypto::SecretBytes::from_slice(secrets.tau()),
            pk_dm: pk,
            tls: None,
        };
        let (proc, endpoint) = start_workload(
            &call.vm_id,
            &dir,
            &disk,
            &vsm_socket,
            uris,
            &t.driver,
            &injected,
            &cfg.user_pin,
            run_as,
            workload_listen_ip(self.cfg.listen.ip()),
            true,
            network,
        )
        .await?;
        drop(injected);
        let qmp_path = match &proc.child {
            ProcChild::Workload(h) => h.qmp_path().map(Path::to_path_buf),
            ProcChild::Plain(_) => None,
        }
        .ok_or_else(|| Error::Domain("the VM has no QMP socket".into()))?;
        self.attach_workload_proc(&call.vm_id, proc, endpoint)
            .await?;
        let wd = dir.clone();
        let (qmp, pipe) = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !qmp_path.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut q = caas_workload::qmp::Qmp::connect_until(
                &qmp_path,
                deadline,
                Duration::from_secs(30),
            )?;
            // qemu has read its fw_cfg files: τ, pk_DM and the PIN leave the disk.
            let _ = std::fs::remove_file(wd.join("user.pin"));
            let _ = std::fs::remove_file(wd.join("inject.json"));
            let (r, w) = std::io::pipe().map_err(|source| caas_workload::qmp::QmpError::Io {
                context: "migration pipe",
                source,
            })?;
            q.getfd(MIGRATION_FD, std::os::fd::AsFd::as_fd(&r))?;
            drop(r);
            q.migrate_incoming(&caas_workload::qmp::MigrationUri::Fd(MIGRATION_FD.into()))?;
            Ok::<_, caas_workload::qmp::QmpError>((q, w))
        })
        .await
        .map_err(|e| Error::Domain(format!("QMP task: {e}")))?
        .map_err(|e| Error::Domain(format!("qemu: {e}")))?;
        // qemu answers QMP: it has bound its NIC socket; the directory is closed to it.
        crate::identity::seal_net_dir(&net_dir, ids)?;
        let mut rx = stream;
        let writer = std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut n = 0u64;
            while let Some(chunk) = rx.recv() {
                let len = chunk.len();
                std::io::Write::write_all(&mut pipe, &chunk)?;
                n += len as u64;
                drop(chunk);
                rx.written(len);
            }
            Ok(n)
        });
        Ok(IncomingVm {
            vm_id: call.vm_id.clone(),
            writer: Some(writer),
            qmp: Some(qmp),
            ready: Instant::now(),
        })
    }

    /// After the end record: qemu has the whole stream; once it has loaded it (paused, its
    /// incoming migration completed) the guest continues. Returns the VM's endpoint. On
    /// failure the VM and its crypto domain are stopped: it never runs on a partial state.
    pub(crate) async fn finish_incoming(&self, mut vm: IncomingVm) -> Result<String, Error> {
        let r = async {
            // The source committed (its proxies flushed and released the volumes): the
            // single writer moves here — before qemu activates its disks at the end of
            // its incoming migration, and before the guest continues.
            let (launch_r, net) = {
                let g = self.tl.workloads.lock().await;
                g.get(&vm.vm_id)
                    .map(|w| {
                        (
                            w.launch_r.clone(),
                            w.net.as_ref().map(|n| (n.attach.clone(), n.ctl())),
                        )
                    })
                    .ok_or_else(|| Error::Domain("workload vanished".into()))?
            };
            let pending = self.take_deferred(&vm.vm_id).await;
            let writer = vm.writer.take();
            let mut qmp = vm
                .qmp
                .take()
                .ok_or_else(|| Error::Domain("no QMP".into()))?;
            // qemu loads the rest of its stream while the volumes open (their proxies hold
            // its requests until then); the guest continues only when both are done.
            let loaded = tokio::task::spawn_blocking(move || -> Result<_, String> {
                if let Some(w) = writer {
                    w.join()
                        .map_err(|_| "state writer panicked".to_string())?
                        .map_err(|e| format!("state pipe: {e}"))?;
                }
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let st = qmp.query_status().map_err(|e| e.to_string())?;
                    match st.status.as_str() {
                        "inmigrate" | "restore-vm" => {}
                        "paused" | "prelaunch" => break,
                        other => return Err(format!("after loading the state qemu is {other}")),
                    }
                    if Instant::now() > deadline {
                        return Err("loading the state timed out".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let info = qmp.query_migrate().map_err(|e| e.to_string())?;
                if info.status != caas_workload::qmp::MigrationStatus::Completed {
                    return Err(format!("incoming migration ended as {:?}", info.status));
                }
                Ok(qmp)
            });
            // Its network proxy gets N's key under this session meanwhile (the TTP retires
            // the source's session and moves N to a new epoch).
            let keyed = async {
                match &net {
                    Some((n, ctl)) => self.key_net(&vm.vm_id, n, ctl, None).await.map(drop),
                    None => Ok(()),
                }
            };
            let (opened, loaded, keyed) = tokio::join!(
                self.open_deferred(&vm.vm_id, &launch_r, pending),
                loaded,
                keyed
            );
            let qmp = loaded
                .map_err(|e| Error::Domain(format!("QMP task: {e}")))?
                .map_err(|e| Error::Domain(format!("qemu: {e}")))?;
            opened?;
            keyed?;
            let mut qmp = qmp;
            tokio::task::spawn_blocking(move || qmp.cont().map_err(|e| e.to_string()))
                .await
                .map_err(|e| Error::Domain(format!("QMP task: {e}")))?
                .map_err(|e| Error::Domain(format!("qemu: {e}")))?;
            let g = self.tl.workloads.lock().await;
            g.get(&vm.vm_id)
                .and_then(|w| w.endpoint.clone())
                .ok_or_else(|| Error::Domain("workload vanished".into()))
        }
        .await;
        if r.is_err() {
            self.tl.drop_migrated(&vm.vm_id).await;
        }
        r
    }

    /// The crypto domain of a migrated workload: the image's configuration sealed to this
    /// host opened by the TPM (owner = the statement's H2, image = H1), then keyed.
    #[allow(clippy::type_complexity)]
    async fn migrated_domain(
        &self,
        st: &caas_tl::migrate::MigrationStatement,
        t: &crate::migrate::WorkloadTransfer,
        secrets: &crate::migrate::DomainSecrets,
    ) -> Result<
        (
            LaunchCall,
            caas_tl::dm::DomcConfig,
            RunDirs,
            Vec<Proc>,
            LaunchIds,
            Vec<(String, f64)>,
        ),
        Error,
    > {
        let mut timings = Vec::new();
        let start = Instant::now();
        if hex::encode(caas_tl::crypto::sha256(secrets.pk_dm())) != st.h2 {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "h2_mismatch",
                "pk_DM in the state is not the statement's DM",
            )));
        }
        let call = LaunchCall {
            request: Signed {
                body: Vec::new(),
                sig: Vec::new(),
            },
            vm_id: st.vm_id.clone(),
            image_id: t.image_id.clone(),
            driver: Some(t.driver.clone()),
            volumes: t
                .volumes
                .iter()
                .map(|(d, sr)| caas_tl::wire::VolumeRequest {
                    domain: d.clone(),
                    sr: sr.clone(),
                    size: 64 << 20,
                })
                .collect(),
            network: false,
            // Its own proxy here, keyed under this host's session (`launch_rest`; a VM's
            // in `prepare_incoming` and `finish_incoming`).
            net: t.net.clone(),
        };
        wire::check_name("image id", &call.image_id)?;
        self.check_new_workload(&call).await?;
        let sealed_cfg = self.read_config(&call.image_id)?;
        caas_tl::dm::SealedDomc::parse(&sealed_cfg)?.check_owner(&st.h2)?;
        let image = TlHost::image_dir(&self.tl.storage, &call.image_id).join("image.caasvol");
        let ip = image.clone();
        let id = self.tl.ids.allocate_launch()?;
        let dir = self.fresh_dirs(&call.vm_id, &id)?;
        // The crypto domain's processes start (unkeyed) while the TPM opens the
        // configuration and the image is hashed, as at launch.
        let (h1, cfg, pre) = tokio::join!(
            async {
                tokio::task::spawn_blocking(move || sha256_file(&ip))
                    .await
                    .map_err(|e| Error::Domain(format!("hash task: {e}")))?
            },
            self.open_config(&call.image_id, secrets.pk_dm(), &sealed_cfg),
            prestart(&dir.domain, &image, true, Ids::of(&id), None)
        );
        let mut pre = match pre {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir.root);
                return Err(e);
            }
        };
        let owner = caas_tl::wire::M2 {
            tau: Vec::new(),
            h1: String::new(),
            h2: st.h2.clone(),
            dk: Vec::new(),
            vm_id: st.vm_id.clone(),
        };
        let cfg = match (h1, cfg) {
            (Ok(h1), Ok(cfg)) => sc::check_config(&cfg, &owner, &h1)
                .map(|()| cfg)
                .map_err(Error::from),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => {
                pre.abort();
                let _ = std::fs::remove_dir_all(&dir.root);
                return Err(e);
            }
        };
        timings.push(("open crypto-domain config (TPM), H1".to_string(), ms(start)));
        let t0 = Instant::now();
        let procs = finish_domain(pre, &cfg).await?;
        timings.push(("crypto domain keyed (k, token)".to_string(), ms(t0)));
        Ok((call, cfg, dir, procs, id, timings))
    }

    pub(crate) async fn resume_migrated(
        &self,
        st: &caas_tl::migrate::MigrationStatement,
        t: &crate::migrate::WorkloadTransfer,
        secrets: &crate::migrate::DomainSecrets,
        dk: &[u8],
        token: Option<crate::token::TokenTransfer>,
    ) -> Result<LaunchResult, Error> {
        let now = caas_attest::now_ms();
        let (call, cfg, dir, procs, id, timings) = self.migrated_domain(st, t, secrets).await?;
        let token = token.map(|t| {
            (
                t,
                crate::token::migration_context(&st.vm_id, &st.h2, &st.migration_id),
            )
        });
        let driver = call.driver.clone().unwrap_or_default();
        self.run_workload(
            &call,
            &st.sp,
            &st.h2,
            &st.migration_id,
            dk,
            secrets.tau(),
            secrets.pk_dm(),
            &driver,
            &cfg,
            dir,
            procs,
            now,
            timings,
            id,
            None,
            token,
        )
        .await
    }

    async fn check_new_workload<'a>(&self, call: &'a LaunchCall) -> Result<&'a str, Error> {
        if self.tl.workloads.lock().await.contains_key(&call.vm_id) {
            return Err(Error::InvalidRequest(format!(
                "workload {} is already running",
                call.vm_id
            )));
        }
        let driver = call.driver.as_deref().unwrap_or("process");
        if driver != "process" && driver != "qemu" {
            return Err(Error::InvalidRequest(format!("unknown driver {driver}")));
        }
        if let Some(n) = &call.net {
            n.check()?;
        }
        Ok(driver)
    }

    /// Registers a registered workload's started VM (or process) and its endpoint, so that
    /// a stop or a failure from here on stops it with its crypto domain.
    async fn attach_workload_proc(
        &self,
        vm_id: &str,
        proc: Proc,
        endpoint: String,
    ) -> Result<(), Error> {
        let mut g = self.tl.workloads.lock().await;
        let w = g
            .get_mut(vm_id)
            .ok_or_else(|| Error::Domain("workload vanished".into()))?;
        w.procs.push(proc);
        w.endpoint = Some(endpoint);
        Ok(())
    }

    /// The launch's run directories, created afresh ([`crate::identity::fresh_dirs`]).
    fn fresh_dirs(&self, vm_id: &str, ids: &LaunchIds) -> Result<RunDirs, Error> {
        wire::check_name("vm_id", vm_id)?;
        crate::identity::fresh_dirs(&self.tl.run_dir.join(vm_id), ids)
    }

    /// TL.AttestRequest → TL.Attestation → checks of m2 → the crypto-domain configuration.
    async fn tl_protocol(
        &self,
        call: &LaunchCall,
        req: &caas_tl::wire::LaunchRequest,
        image: &Path,
        sealed_cfg: &[u8],
    ) -> Result<
        (
            caas_tl::wire::M2,
            caas_tl::dm::DomcConfig,
            Vec<(String, f64)>,
        ),
        Error,
    > {
        let mut timings = Vec::new();
        let ttp = self.ttp().await?;
        let t = Instant::now();
        let body = wire::to_bytes(&AttestRequest {
            host: self.cfg.name.clone(),
            launch: call.request.clone(),
            bind: self.bind_key(),
            t_ms: caas_attest::now_ms(),
        });
        let signed = self.ak_sign(label::ATTEST_REQUEST, body).await?;
        timings.push(("quote (σ_AIK)".to_string(), ms(t)));
        // The TTP's round trip, hashing the image (H1') and opening the configuration with
        // the TPM run concurrently; the results are used in the protocol's order.
        let t = Instant::now();
        let ip = image.to_path_buf();
        let url = format!("{}/v1/tl/attest", self.cfg.key_service_url);
        let (resp, h1, cfg) = tokio::join!(
            self.http.post::<_, Signed>(&url, &signed),
            async {
                tokio::task::spawn_blocking(move || sha256_file(&ip))
                    .await
                    .map_err(|e| Error::Domain(format!("hash task: {e}")))?
            },
            self.open_config(&call.image_id, &req.pk_dm, sealed_cfg)
        );
        timings.push((
            "TTP attestation ∥ H1' ∥ open crypto-domain config (TPM)".to_string(),
            ms(t),
        ));
        let resp = resp?;
        let t = Instant::now();
        let att = sc::check_attestation(&resp, &ttp, &self.cfg.name, &req.r)?;
        let (rsa, _) = split_bind_sealed(&att.c2)?;
        let key = self.bind_decrypt(rsa).await?;
        let m2 = sc::open_m2(&key, &att)?;
        drop(key);
        timings.push(("unseal c2 (TPM)".to_string(), ms(t)));
        let h1 = h1?;
        sc::check_m2(&m2, &call.vm_id, &h1, &req.pk_dm)?;
        let cfg = cfg?;
        // Seed 001's configuration, bound to the owner the TTP vouched for in m2 and to the
        // encrypted image whose hash was just checked against H1.
        sc::check_config(&cfg, &m2, &h1)?;
        Ok((m2, cfg, timings))
    }

    /// The sealed crypto-domain configuration of `image_id` for this host, as stored.
    fn read_config(&self, image_id: &str) -> Result<Vec<u8>, Error> {
        let cfg_path = TlHost::image_dir(&self.tl.storage, image_id)
            .join(format!("domc-{}.sealed", self.cfg.name));
        let meta = std::fs::metadata(&cfg_path).map_err(|_| {
            Error::Tl(caas_tl::Error::rejected(
                "config_missing",
                format!("image {image_id} has no crypto-domain configuration for this host"),
            ))
        })?;
        if meta.len() > MAX_CONFIG {
            return Err(Error::Tl(caas_tl::Error::malformed(
                "domc config",
                "too large",
            )));
        }
        std::fs::read(&cfg_path).map_err(Error::io("read the sealed configuration"))
    }

    /// Opens the crypto-domain configuration sealed to this host's bind key (seed 001,
    /// Algorithm 1) for a launch by `pk_dm`: only its owner's launch opens it (the owner's
    /// H2 is in its AAD and plaintext).
    async fn open_config(
        &self,
        image_id: &str,
        pk_dm: &[u8],
        sealed: &[u8],
    ) -> Result<caas_tl::dm::DomcConfig, Error> {
        let h2 = hex::encode(caas_tl::crypto::sha256(pk_dm));
        let env = caas_tl::dm::SealedDomc::parse(sealed)?;
        env.check_owner(&h2)?;
        let tampered = || {
            Error::Tl(caas_tl::Error::rejected(
                "config_tampered",
                "the crypto-domain configuration was altered",
            ))
        };
        let rsa = env.rsa().map_err(|_| tampered())?;
        let key = self.bind_decrypt(rsa).await.map_err(|e| match e {
            Error::Tpm(ref t) if !t.is_policy_failure() => tampered(),
            e => e,
        })?;
        Ok(caas_tl::dm::open_domc_config(
            &key,
            &self.cfg.name,
            image_id,
            &h2,
            sealed,
        )?)
    }

    /// Registers the workload (with its keyed crypto domain), attaches its DBSP volumes and
    /// starts it with τ and pk_DM injected.
    #[allow(clippy::too_many_arguments)]
    async fn run_workload(
        &self,
        call: &LaunchCall,
        sp: &str,
        h2: &str,
        launch_r: &[u8],
        dk: &[u8],
        tau: &[u8],
        pk_dm: &[u8],
        driver: &str,
        cfg: &caas_tl::dm::DomcConfig,
        dirs: RunDirs,
        procs: Vec<Proc>,
        now: u64,
        mut timings: Vec<(String, f64)>,
        identity: LaunchIds,
        net: Option<NetLaunch>,
        token: Option<(crate::token::TokenTransfer, Vec<u8>)>,
    ) -> Result<LaunchResult, Error> {
        let w = Workload {
            vm_id: call.vm_id.clone(),
            image_id: call.image_id.clone(),
            h2: h2.to_string(),
            launch_r: launch_r.to_vec(),
            sp: sp.to_string(),
            dk: Zeroizing::new(dk.to_vec()),
            tau: Zeroizing::new(tau.to_vec()),
            pk_dm: pk_dm.to_vec(),
            driver: driver.to_string(),
            endpoint: None,
            disk_uri: net.as_ref().map_or_else(
                || Endpoint::Unix(dirs.domain.join("disk.sock")).nbd_uri(),
                |n| n.disk_uri.clone(),
            ),
            vsm_socket: dirs.domain.join("vsm.sock"),
            vsm_tls: net.as_ref().map(|n| n.vsm.to_string()),
            tls_client: net.map(|n| n.client),
            procs,
            volumes: Vec::new(),
            started_ms: now,
            dirs,
            identity,
            net: None,
        };
        let vm_id = call.vm_id.clone();
        self.tl.workloads.lock().await.insert(vm_id.clone(), w);
        let rest = self
            .launch_rest(call, tau, pk_dm, driver, &cfg.user_pin, token, &mut timings)
            .await;
        let mut g = self.tl.workloads.lock().await;
        match rest {
            Ok(()) => {
                let view = g
                    .get(&vm_id)
                    .map(Workload::view)
                    .ok_or_else(|| Error::Domain("workload vanished".into()))?;
                Ok(LaunchResult {
                    host: self.cfg.name.clone(),
                    workload: view,
                    timings,
                })
            }
            Err(e) => {
                // A VM that fails to start after its proxy was keyed leaves its network
                // domain as a stopped one does: its session would otherwise stay a member
                // (its key current) until the scheduled rekey.
                let creds = g.remove(&vm_id).and_then(|mut w| {
                    let creds = w.net_creds();
                    w.stop();
                    self.tl.audit_net_stop(&w);
                    creds
                });
                drop(g);
                if let Some(c) = creds {
                    self.leave_net(&vm_id, &c, "launch failed").await;
                }
                Err(e)
            }
        }
    }

    /// After the crypto domain runs: DBSP volumes, a migrated workload's VSM token (into
    /// the new VSM for the context given, before anything opens a session on it), then the
    /// workload with τ and pk_DM.
    #[allow(clippy::too_many_arguments)]
    async fn launch_rest(
        &self,
        call: &LaunchCall,
        tau: &[u8],
        pk_dm: &[u8],
        driver: &str,
        user_pin: &str,
        token: Option<(crate::token::TokenTransfer, Vec<u8>)>,
        timings: &mut Vec<(String, f64)>,
    ) -> Result<(), Error> {
        let mut uris = Vec::new();
        for v in &call.volumes {
            let r = self.attach_volume(&call.vm_id, v).await?;
            for (k, t) in r.timings {
                timings.push((format!("DBSP {}: {k}", v.sr), t));
            }
            uris.push(r.volume.uri);
        }
        if let Some((token, context)) = token {
            let t = Instant::now();
            let ctl = self
                .tl
                .vsm_control(&call.vm_id)
                .await
                .ok_or_else(|| Error::Domain("the VSM has no control channel".into()))?;
            token.import(ctl, context).await?;
            timings.push(("VSM token imported".to_string(), ms(t)));
        }
        let t = Instant::now();
        let pk: [u8; 32] = pk_dm
            .try_into()
            .map_err(|_| Error::InvalidRequest("pk_DM must be 32 bytes".into()))?;
        let (tls, dir, net_dir, disk, vsm_socket, ids) = {
            let mut g = self.tl.workloads.lock().await;
            let w = g
                .get_mut(&call.vm_id)
                .ok_or_else(|| Error::Domain("workload vanished".into()))?;
            (
                w.tls_client.take(),
                w.dirs.workload.clone(),
                w.dirs.net.clone(),
                w.disk_uri.clone(),
                w.vsm_socket.clone(),
                Ids::of(&w.identity),
            )
        };
        let id = ids.workload;
        let injected = caas_workload::InjectedSecrets {
            tau: caas_crypto::SecretBytes::from_slice(tau),
            pk_dm: pk,
            tls,
        };
        let network = match &call.net {
            Some(n) => {
                let t = Instant::now();
                let spec = self
                    .start_net(&call.vm_id, n, &net_dir, ids, driver)
                    .await?;
                timings.push(("network proxy keyed (TTP, TPM)".to_string(), ms(t)));
                spec
            }
            None => None,
        };
        let (proc, endpoint) = start_workload(
            &call.vm_id,
            &dir,
            &disk,
            &vsm_socket,
            uris,
            driver,
            &injected,
            user_pin,
            id,
            workload_listen_ip(self.cfg.listen.ip()),
            false,
            network,
        )
        .await?;
        drop(injected);
        self.attach_workload_proc(&call.vm_id, proc, endpoint)
            .await?;
        // The workload is up (a VM has bound its NIC socket): its network directory is
        // closed to it.
        crate::identity::seal_net_dir(&net_dir, ids)?;
        timings.push(("start workload".to_string(), ms(t)));
        Ok(())
    }

    /// Management: the running workloads (no key material).
    pub async fn workloads(&self) -> Vec<WorkloadView> {
        let r: Vec<WorkloadView> = self
            .tl
            .workloads
            .lock()
            .await
            .values()
            .map(Workload::view)
            .collect();
        self.tl.audit("ListWorkloads", "-", &Ok::<(), Error>(()));
        r
    }

    /// Management: stops a workload and its crypto domain (keys are dropped with it).
    ///
    /// A VM attached to a network domain leaves it: once its proxy stopped, the agent's
    /// NetLeave ends its TL session at the TTP, which rekeys the domain (the others stop
    /// accepting the stopped member's key after the overlap).
    pub async fn stop_workload(&self, vm_id: &str) -> Result<(), Error> {
        let removed = self.tl.workloads.lock().await.remove(vm_id);
        let r = match removed {
            Some(mut w) => {
                let creds = w.net_creds();
                w.stop();
                self.tl.audit_net_stop(&w);
                remove_run_dir(&self.tl.audit, vm_id, &w.dirs);
                Ok(creds)
            }
            None => Err(Error::InvalidRequest(format!("no workload {vm_id}"))),
        };
        match r {
            Ok(creds) => {
                self.tl.audit("StopWorkload", vm_id, &Ok::<(), Error>(()));
                if let Some(c) = creds {
                    self.leave_net(vm_id, &c, "stopped").await;
                }
                Ok(())
            }
            Err(e) => {
                let e = Err(e);
                self.tl.audit("StopWorkload", vm_id, &e);
                e
            }
        }
    }

    /// DBSP: attaches the storage resource `sr` of domain `D` to a workload: DomKeyReq to the
    /// TTP (with c4, μ from the domain header when the volume exists), c3 unsealed by the TPM,
    /// the volume created or opened with the keys and served to the workload.
    pub async fn attach_volume(
        &self,
        vm_id: &str,
        a: &AttachRequest,
    ) -> Result<AttachResult, Error> {
        let r = self.attach_inner(vm_id, a).await;
        self.tl.audit(
            "AttachVolume",
            &format!("{vm_id}/{}/{}", a.domain, a.sr),
            &r,
        );
        r
    }

    async fn attach_inner(&self, vm_id: &str, a: &AttachRequest) -> Result<AttachResult, Error> {
        let mut timings = Vec::new();
        wire::check_name("domain", &a.domain)?;
        wire::check_name("sr", &a.sr)?;
        if a.size == 0 || a.size > (1 << 40) {
            return Err(Error::InvalidRequest("size must be 1 B..1 TiB".into()));
        }
        let ttp = self.ttp().await?;
        let (h2, launch_r, sp, dk, sock_dir, id) = {
            let g = self.tl.workloads.lock().await;
            let w = g
                .get(vm_id)
                .ok_or_else(|| Error::InvalidRequest(format!("no workload {vm_id}")))?;
            if w.volumes
                .iter()
                .any(|v| v.domain == a.domain && v.sr == a.sr)
            {
                return Err(Error::InvalidRequest("volume already attached".into()));
            }
            (
                w.h2.clone(),
                w.launch_r.clone(),
                w.sp.clone(),
                w.dk.clone(),
                w.dirs.domain.clone(),
                Ids::of(&w.identity),
            )
        };
        let path = TlHost::volume_path(&self.tl.storage, &a.domain, &a.sr);
        let existing = volume_dbsp(&path, &a.domain, true).await?;
        // The proxy starts once the key and the volume's anchored epoch are known.
        let sock = sock_dir.join(format!("vol-{}-{}.sock", a.domain, a.sr));
        let report = sock_dir.join(format!("vol-{}-{}.epoch", a.domain, a.sr));
        let (d, vk) = self
            .domkey_exchange(
                vm_id,
                &launch_r,
                a,
                &h2,
                &sp,
                &dk,
                existing.clone(),
                &ttp,
                &mut timings,
            )
            .await?;
        let t = Instant::now();
        let created = existing.is_none();
        let anchor = Some((d.min_epoch, report.as_path()));
        let proc = match existing {
            Some(_) => spawn_sdp(&path, &sock, &vk, false, id, anchor).await,
            None => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(Error::io("create the domain directory"))?;
                }
                let dbsp = caas_volume::header::Dbsp {
                    domain_id: a.domain.as_bytes().to_vec(),
                    security_profile: sp.as_bytes().to_vec(),
                    c4: d.c4.clone(),
                    mu: d.mu.clone(),
                };
                let key_in = caas_sdp::engine::KeyInput::Raw(std::sync::Arc::new(vk.clone()));
                caas_sdp::cli::create_file(&path, a.size, &key_in, dbsp)
                    .await
                    .map_err(|e| Error::Domain(format!("create volume: {e}")))?;
                spawn_sdp(&path, &sock, &vk, false, id, anchor).await
            }
        };
        let report_line = std::fs::read_to_string(&report).unwrap_or_default();
        let _ = std::fs::remove_file(&report);
        let mut proc = match proc {
            Ok(p) => p,
            Err(_) if report_line.trim() == "volume_rollback" => {
                return Err(Error::Tl(caas_tl::Error::rejected(
                    "volume_rollback",
                    format!(
                        "volume {}/{} is behind its anchored epoch {}: storage rolled it back",
                        a.domain, a.sr, d.min_epoch
                    ),
                )));
            }
            Err(e) => return Err(e),
        };
        timings.push(("open volume".to_string(), ms(t)));
        // The anchor moves up to the epoch just opened, before the workload may use it.
        let t = Instant::now();
        let anchored = match report_line
            .trim()
            .strip_prefix("epoch ")
            .and_then(|e| e.parse::<u32>().ok())
        {
            Some(epoch) => self.report_epoch(vm_id, &launch_r, a, &d.c4, epoch).await,
            None => Err(Error::Domain("the volume proxy reported no epoch".into())),
        };
        if let Err(e) = anchored {
            proc.stop();
            return Err(e);
        }
        timings.push(("epoch anchored at the TTP (incl. quote)".to_string(), ms(t)));
        let uri = format!("nbd+unix:///caas?socket={}", sock.display());
        let view = VolumeView {
            domain: a.domain.clone(),
            sr: a.sr.clone(),
            uri: uri.clone(),
        };
        let mut g = self.tl.workloads.lock().await;
        match g.get_mut(vm_id) {
            Some(w) => w.volumes.push(AttachedVolume {
                domain: a.domain.clone(),
                sr: a.sr.clone(),
                uri,
                proc,
                deferred: None,
            }),
            None => {
                let mut proc = proc;
                proc.stop();
                return Err(Error::InvalidRequest(format!("workload {vm_id} stopped")));
            }
        }
        Ok(AttachResult {
            volume: view,
            created,
            timings,
        })
    }

    /// A migration's or a resume's target: DomKeyReq for the existing volume (domain, sr)
    /// under the workload's new session (`launch_r`, `dk`), and its Secure Device Proxy
    /// started with the key and the anchored epoch but with a deferred open: it answers the
    /// NBD handshake (the target's qemu connects when it starts) and opens and locks the
    /// volume only in [`Agent::open_deferred`].
    #[allow(clippy::too_many_arguments)]
    async fn attach_deferred(
        &self,
        vm_id: &str,
        launch_r: &[u8],
        h2: &str,
        sp: &str,
        dk: &[u8],
        (domain, sr): (&str, &str),
        sock_dir: &Path,
        ids: Ids,
    ) -> Result<AttachedVolume, Error> {
        wire::check_name("domain", domain)?;
        wire::check_name("sr", sr)?;
        let ttp = self.ttp().await?;
        let a = AttachRequest {
            domain: domain.to_string(),
            sr: sr.to_string(),
            size: 0,
        };
        let path = TlHost::volume_path(&self.tl.storage, domain, sr);
        let existing = volume_dbsp(&path, domain, false).await?;
        if existing.is_none() {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "volume_missing",
                format!("volume {domain}/{sr} is not in the storage"),
            )));
        }
        let mut timings = Vec::new();
        let (d, vk) = self
            .domkey_exchange(
                vm_id,
                launch_r,
                &a,
                h2,
                sp,
                dk,
                existing,
                &ttp,
                &mut timings,
            )
            .await?;
        let sock = sock_dir.join(format!("vol-{domain}-{sr}.sock"));
        let report = sock_dir.join(format!("vol-{domain}-{sr}.epoch"));
        let ep = Endpoint::Unix(sock.clone());
        let (mut proc, mut stdin) = spawn_sdp_unkeyed(
            &path,
            &ep,
            false,
            ids,
            Some((d.min_epoch, report.as_path())),
            true,
        )?;
        let keyed = stdin
            .write_all(vk.expose())
            .map_err(Error::io("hand the key to the Secure Device Proxy"));
        drop(vk);
        let served = match keyed {
            Ok(()) => wait_for(&ep, &mut proc, Duration::from_secs(20)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = served {
            proc.stop();
            return Err(e);
        }
        Ok(AttachedVolume {
            domain: domain.to_string(),
            sr: sr.to_string(),
            uri: ep.nbd_uri(),
            proc,
            deferred: Some(DeferredOpen {
                req: a,
                c4: d.c4,
                stdin,
                report,
            }),
        })
    }

    /// The previous writer released the volumes: each deferred proxy opens and locks its
    /// volume (refused below the anchored epoch: `volume_rollback`) and the epoch it opened
    /// at is anchored at the TTP under the workload's session `launch_r` — which also
    /// retires the session this one replaces (a migration's source, a suspended launch).
    async fn open_deferred(
        &self,
        vm_id: &str,
        launch_r: &[u8],
        pending: Vec<DeferredOpen>,
    ) -> Result<(), Error> {
        for mut p in pending {
            std::io::Write::write_all(&mut p.stdin, b"o")
                .map_err(Error::io("tell the Secure Device Proxy to open"))?;
            drop(p.stdin);
            let deadline = Instant::now() + Duration::from_secs(30);
            let line = loop {
                if let Ok(l) = std::fs::read_to_string(&p.report)
                    && l.ends_with('\n')
                {
                    break l;
                }
                if Instant::now() > deadline {
                    return Err(Error::Domain(format!(
                        "volume {}/{} was not opened in time",
                        p.req.domain, p.req.sr
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let _ = std::fs::remove_file(&p.report);
            match line.trim() {
                "volume_rollback" => {
                    return Err(Error::Tl(caas_tl::Error::rejected(
                        "volume_rollback",
                        format!(
                            "volume {}/{} is behind its anchored epoch: storage rolled it back",
                            p.req.domain, p.req.sr
                        ),
                    )));
                }
                l => match l.strip_prefix("epoch ").and_then(|e| e.parse::<u32>().ok()) {
                    Some(epoch) => {
                        self.report_epoch(vm_id, launch_r, &p.req, &p.c4, epoch)
                            .await?
                    }
                    None => {
                        return Err(Error::Domain(format!(
                            "the volume proxy refused to open {}/{}",
                            p.req.domain, p.req.sr
                        )));
                    }
                },
            }
        }
        Ok(())
    }

    /// The deferred volumes of `vm_id` (taken out: opened once).
    async fn take_deferred(&self, vm_id: &str) -> Vec<DeferredOpen> {
        let mut g = self.tl.workloads.lock().await;
        g.get_mut(vm_id)
            .map(|w| {
                w.volumes
                    .iter_mut()
                    .filter_map(|v| v.deferred.take())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// DBSP epoch report (AK-signed): the TTP raises the volume's anchor to `epoch`.
    async fn report_epoch(
        &self,
        vm_id: &str,
        launch_r: &[u8],
        a: &AttachRequest,
        c4: &[u8],
        epoch: u32,
    ) -> Result<(), Error> {
        let rep = caas_tl::wire::EpochReport {
            host: self.cfg.name.clone(),
            vm_id: vm_id.to_string(),
            launch_r: launch_r.to_vec(),
            domain: a.domain.clone(),
            sr: a.sr.clone(),
            c4: c4.to_vec(),
            epoch,
            r: caas_crypto::random_bytes(32).map_err(|_| Error::Domain("no randomness".into()))?,
            t_ms: caas_attest::now_ms(),
        };
        let _: serde_json::Value = self
            .ttp_request(label::EPOCH_REPORT, "/v1/tl/epoch", wire::to_bytes(&rep))
            .await?;
        Ok(())
    }

    /// DBSP.DomKeyReq (AK-signed) → DomKeyGen response → c3 unsealed by the TPM → the
    /// volume key.
    #[allow(clippy::too_many_arguments)]
    async fn domkey_exchange(
        &self,
        vm_id: &str,
        launch_r: &[u8],
        a: &AttachRequest,
        h2: &str,
        sp: &str,
        dk: &[u8],
        existing: Option<(Vec<u8>, Vec<u8>)>,
        ttp: &TtpPublic,
        timings: &mut Vec<(String, f64)>,
    ) -> Result<(caas_tl::wire::DomKeyResponse, SecretKey), Error> {
        let t = Instant::now();
        let now = caas_attest::now_ms();
        let req = sc::domkey_request(
            &self.cfg.name,
            vm_id,
            launch_r,
            &a.sr,
            h2,
            dk,
            Meta {
                domain: a.domain.clone(),
                sp: sp.to_string(),
            },
            existing,
            now,
        )?;
        let signed = self
            .ak_sign(label::DOMKEY_REQUEST, wire::to_bytes(&req))
            .await?;
        timings.push(("handle request (incl. quote)".to_string(), ms(t)));
        let t = Instant::now();
        let resp: Signed = self
            .http
            .post(
                &format!("{}/v1/tl/domkey", self.cfg.key_service_url),
                &signed,
            )
            .await?;
        timings.push(("key from TTP".to_string(), ms(t)));
        let t = Instant::now();
        let d = sc::check_domkey_response(&resp, ttp, &req)?;
        let (rsa, _) = split_bind_sealed(&d.c3)?;
        let key = self.bind_decrypt(rsa).await?;
        let (k, ik) = sc::open_c3(&key, &d)?;
        drop(key);
        let vk = sc::volume_key(&k, &ik, &a.domain, &a.sr)?;
        timings.push(("TPM unseal c3".to_string(), ms(t)));
        Ok((d, vk))
    }

    /// NetKeyReq (AK-signed, `docs/network-sdp.md` §Keys) for running workload `vm_id`:
    /// the TTP's grant of network domain `net_domain`'s current key, sealed to this host's
    /// bind key, opened by the TPM here. Returns the epoch, K_{N,e} and when the TTP rekeys
    /// at the latest, for the workload's `caas net serve` (`Key{epoch,key}` on its control
    /// channel, [`crate::net`]).
    ///
    /// The TTP serves one request of a network domain at a time; the others wait for it up
    /// to 2 s and are then refused with `rekey_in_progress` ("retry"). Such a refusal is
    /// retried with a fresh request (new r, new quote) after a
    /// short, growing pause (20 ms doubling to 500 ms, at most 20 times); any other refusal is
    /// final.
    pub async fn net_key(
        &self,
        vm_id: &str,
        net_domain: &str,
    ) -> Result<crate::net::NetGrant, Error> {
        self.net_key_as(vm_id, net_domain, None).await
    }

    /// [`Self::net_key`] under the TL session `creds` (a workload not registered yet: a
    /// resume), or the registered workload's when `None`.
    pub(crate) async fn net_key_as(
        &self,
        vm_id: &str,
        net_domain: &str,
        creds: Option<&crate::net::NetCreds>,
    ) -> Result<crate::net::NetGrant, Error> {
        let mut pause = Duration::from_millis(20);
        for _ in 0..NET_KEY_BUSY_RETRIES {
            match self.net_key_once(vm_id, net_domain, creds).await {
                Err(Error::Attest(caas_attest::Error::Remote { code, .. }))
                    if code == "rekey_in_progress" =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                r => return r,
            }
        }
        self.net_key_once(vm_id, net_domain, creds).await
    }

    async fn net_key_once(
        &self,
        vm_id: &str,
        net_domain: &str,
        creds: Option<&crate::net::NetCreds>,
    ) -> Result<crate::net::NetGrant, Error> {
        let (launch_r, h2, sp, dk) = match creds {
            Some(c) => (c.launch_r.clone(), c.h2.clone(), c.sp.clone(), c.dk.clone()),
            None => {
                let g = self.tl.workloads.lock().await;
                let w = g
                    .get(vm_id)
                    .ok_or_else(|| Error::Domain(format!("no workload {vm_id} on this host")))?;
                (w.launch_r.clone(), w.h2.clone(), w.sp.clone(), w.dk.clone())
            }
        };
        let ttp = self.ttp().await?;
        let req = sc::netkey_request(
            &self.cfg.name,
            vm_id,
            &launch_r,
            &h2,
            &dk,
            net_domain,
            &sp,
            caas_attest::now_ms(),
        )?;
        let signed = self
            .ak_sign(label::NETKEY_REQUEST, wire::to_bytes(&req))
            .await?;
        let resp: Signed = self
            .http
            .post(
                &format!("{}/v1/tl/netkey", self.cfg.key_service_url),
                &signed,
            )
            .await?;
        let g = sc::check_netkey_grant(&resp, &ttp, &req)?;
        let (rsa, _) = split_bind_sealed(&g.sealed)?;
        let key = self.bind_decrypt(rsa).await?;
        let k = sc::open_netkey(&key, &g)?;
        drop(key);
        Ok(crate::net::NetGrant {
            epoch: g.epoch,
            key: k,
            rekey_at_ms: g.rekey_at_ms,
        })
    }

    /// The TTP's notice that this host is no longer trusted: every crypto domain is stopped
    /// (its keys die with it) and every DK dropped. A notice is applied once: its sequence
    /// number must be above the last accepted one, which is recorded durably first
    /// (`revoke_replayed` otherwise, also after an agent restart).
    pub async fn revoke(&self, notice: &Signed) -> Result<usize, Error> {
        let r = async {
            let ttp = self.ttp().await?;
            {
                let mut st = self
                    .tl
                    .revocation
                    .lock()
                    .map_err(|_| Error::Domain("revocation state poisoned".into()))?;
                let n = sc::check_revoke(
                    notice,
                    &ttp,
                    &self.cfg.name,
                    st.seq,
                    caas_attest::now_ms(),
                )?;
                let next = RevocationState {
                    seq: n.seq,
                    notice: Some(notice.clone()),
                };
                // The notice is authentic and fresh: it is applied even if it cannot be
                // recorded (stopping the crypto domains is always safe).
                if let Err(e) = next.store(&self.cfg.state_dir) {
                    tracing::error!(error = %e, "revocation state not recorded: a replay after a restart would not be recognised");
                }
                *st = next;
            }
            let mut g = self.tl.workloads.lock().await;
            let n = g.len();
            for (_, mut w) in g.drain() {
                w.stop();
                self.tl.audit_net_stop(&w);
            }
            tracing::warn!(
                stopped = n,
                "TTP revoked this host: crypto domains stopped, keys dropped"
            );
            Ok(n)
        }
        .await;
        self.tl.audit("Revoke", &self.cfg.name, &r);
        r
    }

    /// Dev/test hosts: extends `pcr` with SHA-256(`data`) (a runtime measurement).
    pub async fn dev_measure(&self, pcr: u32, data: &[u8]) -> Result<(), Error> {
        let r = async {
            if !self.cfg.dev_measure {
                return Err(Error::InvalidRequest(
                    "dev measurements are disabled".into(),
                ));
            }
            if pcr >= 24 {
                return Err(Error::InvalidRequest("pcr must be < 24".into()));
            }
            let digest = caas_tl::crypto::sha256(data).to_vec();
            self.tpm
                .run(move |t| t.pcr_extend(PcrBank::Sha256, pcr, &digest))
                .await?;
            Ok(())
        }
        .await;
        self.tl.audit("DevMeasure", &pcr.to_string(), &r);
        r
    }

    /// The agent's audit log, verified.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>, Error> {
        match self.tl.audit.lock() {
            Ok(a) => a.entries().map_err(Error::Config),
            Err(_) => Err(Error::Config("audit log lock poisoned".into())),
        }
    }
}

/// Removes a workload's run directory (its crypto domain stopped) after appending the
/// crypto domain's own audit records (`domain/domc/audit.log`, chained under the domain's
/// ephemeral key, which goes with the domain) to the agent's audit log: one `DomainAudit`
/// record per entry (subject: vm, seq, time, application, PKCS#11 call, slot, object,
/// mechanism; result: its CK_RV), then `DomainAuditShipped` with the count — or with
/// `domain_audit_broken` when the file's chain does not link (nothing of it is shipped;
/// the file is kept aside in the agent's run directory as `<vm>.domc-audit.broken-<ms>`).
/// Entries carry no key, PIN or data.
pub(crate) fn remove_run_dir(
    audit: &std::sync::Mutex<AuditLog>,
    vm_id: &str,
    dirs: &crate::identity::RunDirs,
) {
    ship_domain_audit(audit, vm_id, dirs);
    let _ = std::fs::remove_dir_all(&dirs.root);
}

fn ship_domain_audit(
    audit: &std::sync::Mutex<AuditLog>,
    vm_id: &str,
    dirs: &crate::identity::RunDirs,
) {
    let path = dirs.domain.join("domc").join("audit.log");
    if !path.exists() {
        return;
    }
    let entries = caas_domc::audit::verify_links_only(&path);
    let Ok(mut a) = audit.lock() else { return };
    match entries {
        Ok(entries) => {
            for e in &entries {
                a.append(
                    "DomainAudit",
                    &format!(
                        "{vm_id} #{} t={} app={} {} slot={} object={} mech={}",
                        e.seq, e.time_ms, e.app, e.op, e.slot, e.object, e.mechanism
                    ),
                    &e.rv,
                    "domc",
                );
            }
            a.append(
                "DomainAuditShipped",
                &format!("{vm_id} {} records", entries.len()),
                "ok",
                "-",
            );
        }
        Err(e) => {
            tracing::error!(vm = %vm_id, error = %e, "the crypto domain's audit log does not link");
            let aside = dirs.root.with_file_name(format!(
                "{vm_id}.domc-audit.broken-{}",
                caas_attest::now_ms()
            ));
            let _ = std::fs::rename(&path, &aside);
            a.append(
                "DomainAuditShipped",
                &format!("{vm_id} kept aside: {}", aside.display()),
                "domain_audit_broken",
                "-",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant on another machine reaches its process workload: the PSK channel listens
    /// on the agent's address (tests/multi_host_netns.rs connects across namespaces).
    #[test]
    fn the_workload_listens_on_the_agents_address() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(workload_listen_ip(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(workload_listen_ip(ip("127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(workload_listen_ip(ip("0.0.0.0")), ip("127.0.0.1"));
    }

    #[test]
    fn refusal_records_are_bounded_and_the_rest_counted() {
        let mut b = RefusalBudget::new();
        let t0 = b.window;
        let admitted = (0..200).filter(|_| b.admit(t0).0).count();
        assert_eq!(admitted, RefusalBudget::PER_SECOND as usize);
        // The next second: recorded again, with the count of the suppressed ones.
        let (ok, flushed) = b.admit(t0 + Duration::from_millis(1001));
        assert!(ok);
        assert_eq!(flushed, Some(150));
        assert_eq!(b.admit(t0 + Duration::from_millis(1002)).1, None);
    }
}

/// Where saved states live in the (untrusted) cloud storage: `STORAGE/states/<vm>.state`.
fn state_path(storage: &Path, vm_id: &str) -> Result<PathBuf, Error> {
    wire::check_name("vm_id", vm_id)?;
    Ok(storage.join("states").join(format!("{vm_id}.state")))
}

/// The crypto domain's part of a saved state (authenticated and encrypted under K_s with
/// the VM's state). It names what the target host re-creates the crypto domain from: the
/// image (whose key k the target opens from ITS sealed configuration, bound to its TPM) and
/// the owner. No key travels in it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainState {
    image_id: String,
    h2: String,
    sp: String,
    /// The image's H1 as the suspended launch checked it.
    h1: String,
    /// The DBSP volumes (domain, SR) the resumed VM re-attaches (their keys come from the
    /// TTP under the resumed session; their epoch anchors refuse a rolled-back volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<(String, String)>,
    /// A second section follows with the VSM's token export and its transfer key
    /// ([`crate::token`]).
    #[serde(default)]
    token: bool,
    /// Its network attachment: the resumed VM's proxy is started (same NIC) and keyed
    /// under the resumed session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<caas_tl::wire::NetAttach>,
}

/// Result of a suspend (no key, no plaintext state).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SuspendResult {
    /// Host.
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// The TTP's suspend counter of this saved state.
    pub counter: u64,
    /// The saved-state object, relative to the storage directory.
    pub object: String,
    /// Its size in bytes (ciphertext).
    pub bytes: u64,
    /// Phase timings (name, milliseconds).
    pub timings: Vec<(String, f64)>,
}

/// `POST /v1/agent/resume`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeCall {
    /// id_vm of the suspended workload (its saved state is `states/<vm>.state`).
    pub vm_id: String,
}

fn state_refused(e: caas_workload::state::StateError) -> Error {
    Error::Tl(caas_tl::Error::rejected(
        "state_invalid",
        format!("the saved state was refused: {e}"),
    ))
}

fn suspend_err(e: caas_workload::suspend::SuspendError) -> Error {
    match e {
        caas_workload::suspend::SuspendError::State(s) => state_refused(s),
        e => Error::Domain(format!("qemu: {e}")),
    }
}

impl Agent {
    /// Suspend (issue 13 item 4; `docs/suspend-migrate.md`): the TTP raises the workload's
    /// suspend counter and releases a fresh K_s sealed to this host's bind key; the VM is
    /// stopped and its qemu state, with the crypto domain's state, is written to the
    /// untrusted storage as one saved-state object encrypted and authenticated under K_s
    /// ([`caas_workload::state`]); then the VM and its crypto domain are torn down (keys
    /// dropped with the processes, DK_i and K_s zeroized). Audited (`SuspendWorkload`).
    pub async fn suspend_workload(&self, vm_id: &str) -> Result<SuspendResult, Error> {
        let r = self.suspend_inner(vm_id).await;
        self.tl.audit("SuspendWorkload", vm_id, &r);
        r
    }

    async fn suspend_inner(&self, vm_id: &str) -> Result<SuspendResult, Error> {
        let mut timings = Vec::new();
        let t = Instant::now();
        let object = state_path(&self.tl.storage, vm_id)?;
        let (h2, launch_r, image_id, sp, volumes, net) = {
            let g = self.tl.workloads.lock().await;
            let w = g
                .get(vm_id)
                .ok_or_else(|| Error::InvalidRequest(format!("no workload {vm_id}")))?;
            if !w
                .procs
                .iter()
                .any(|p| matches!(&p.child, ProcChild::Workload(h) if h.qmp_path().is_some()))
            {
                return Err(Error::InvalidRequest(format!(
                    "workload {vm_id} is not a VM (suspend needs the qemu driver)"
                )));
            }
            // Not carried by a saved state yet (docs/suspend-migrate.md, limits): refused
            // rather than resumed without them.
            if w.vsm_tls.is_some() {
                return Err(Error::InvalidRequest(format!(
                    "workload {vm_id} has network transports: suspend does not carry them yet"
                )));
            }
            (
                w.h2.clone(),
                w.launch_r.clone(),
                w.image_id.clone(),
                w.sp.clone(),
                w.volumes
                    .iter()
                    .map(|v| (v.domain.clone(), v.sr.clone()))
                    .collect::<Vec<_>>(),
                w.net.as_ref().map(|n| n.attach.clone()),
            )
        };
        let ttp = self.ttp().await?;
        let r = caas_crypto::random_bytes(32).map_err(|_| Error::Domain("no randomness".into()))?;
        let req = wire::SuspendRequest {
            host: self.cfg.name.clone(),
            vm_id: vm_id.to_string(),
            launch_r,
            h2: h2.clone(),
            r: r.clone(),
            t_ms: caas_attest::now_ms(),
        };
        let resp: Signed = self
            .ttp_request(
                label::SUSPEND_REQUEST,
                "/v1/tl/suspend",
                wire::to_bytes(&req),
            )
            .await?;
        let grant = sc::check_state_grant(&resp, &ttp, &self.cfg.name, vm_id, &r)?;
        let (rsa, _) = split_bind_sealed(&grant.sealed)?;
        let key = self.bind_decrypt(rsa).await?;
        let (k_s, _) = sc::open_state_grant(&key, &grant)?;
        drop(key);
        timings.push((
            "state key from the TTP (quote, TPM unseal)".to_string(),
            ms(t),
        ));
        let h1 = {
            let image = TlHost::image_dir(&self.tl.storage, &image_id).join("image.caasvol");
            tokio::task::spawn_blocking(move || sha256_file(&image))
                .await
                .map_err(|e| Error::Domain(format!("hash task: {e}")))??
        };
        let domain = DomainState {
            image_id,
            h2: h2.clone(),
            sp,
            h1: hex::encode(h1),
            volumes,
            token: false,
            net,
        };
        // The workload leaves the table while its state is saved (no concurrent stop).
        let mut w = self
            .tl
            .workloads
            .lock()
            .await
            .remove(vm_id)
            .ok_or_else(|| Error::Domain("workload vanished".into()))?;
        let idx = w
            .procs
            .iter()
            .position(|p| p.what == "workload")
            .ok_or_else(|| Error::Domain("the VM process is gone".into()))?;
        let vm = w.procs.remove(idx);
        let t = Instant::now();
        let header = caas_workload::state::StateHeader::new(vm_id, &h2, grant.counter)
            .map_err(state_refused)?;
        let vsm = w.vsm_control();
        let token_context =
            crate::token::suspend_context(vm_id, &h2, grant.counter, &header.stream_id);
        let dir = object
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.tl.storage.clone());
        let path = object.clone();
        let (vm_back, saved) = tokio::task::spawn_blocking(move || {
            let r = (|| -> Result<(u64, u64), Error> {
                let ProcChild::Workload(h) = &vm.child else {
                    return Err(Error::Domain("not a VM".into()));
                };
                std::fs::create_dir_all(&dir).map_err(Error::io("create the states directory"))?;
                // A fresh temporary next to the object, renamed over it once complete.
                let tmp = dir.join(format!(".{}.{}.tmp", header.vm_id, header.stream_id));
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(Error::io("create the saved state"))?;
                let res = (|| {
                    let mut q = h
                        .qmp(Duration::from_secs(10))
                        .map_err(|e| Error::Domain(format!("qemu: {e}")))?;
                    let mut wr = caas_workload::state::StateWriter::new(
                        std::io::BufWriter::new(f),
                        &k_s,
                        &header,
                    )
                    .map_err(state_refused)?;
                    // The guest stops first, so its VSM's token is exported as the guest
                    // left it (token objects made after launch travel), sealed under a
                    // fresh transfer key that goes only into this K_s-encrypted state.
                    q.stop().map_err(|e| Error::Domain(format!("qemu: {e}")))?;
                    let token = vsm
                        .as_ref()
                        .map(|c| crate::token::TokenTransfer::export_blocking(c, &token_context))
                        .transpose()?;
                    let domain = DomainState {
                        token: token.is_some(),
                        ..domain
                    };
                    let ds = wire::to_bytes(&domain);
                    wr.write_domain_state(&ds).map_err(state_refused)?;
                    if let Some(token) = &token {
                        wr.write_domain_state(token.to_bytes().expose())
                            .map_err(state_refused)?;
                    }
                    let t =
                        caas_workload::suspend::save_vm(&mut q, &mut wr, Duration::from_secs(120))
                            .map_err(suspend_err)?;
                    let (out, bytes) = wr.finish().map_err(state_refused)?;
                    let f = out
                        .into_inner()
                        .map_err(|e| Error::io("flush the saved state")(e.into_error()))?;
                    f.sync_all().map_err(Error::io("fsync the saved state"))?;
                    std::fs::rename(&tmp, &path).map_err(Error::io("store the saved state"))?;
                    let _ = q.quit();
                    Ok((bytes, t.millis))
                })();
                if res.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                    // The VM goes on where it was.
                    if let Ok(mut q) = h.qmp(Duration::from_secs(5)) {
                        let _ = q.cont();
                    }
                }
                res
            })();
            (vm, r)
        })
        .await
        .map_err(|e| Error::Domain(format!("suspend task: {e}")))?;
        match saved {
            Ok((bytes, vm_ms)) => {
                timings.push(("VM stopped and its state saved".to_string(), vm_ms as f64));
                timings.push(("saved-state object written".to_string(), ms(t)));
                let mut vm = vm_back;
                vm.stop();
                let creds = w.net_creds();
                w.stop();
                self.tl.audit_net_stop(&w);
                remove_run_dir(&self.tl.audit, vm_id, &w.dirs);
                // Suspended: it leaves its network domain (its session ends at the TTP, N
                // rekeys); the resume joins again under the resumed session.
                if let Some(c) = creds {
                    self.leave_net(vm_id, &c, "suspended").await;
                }
                Ok(SuspendResult {
                    host: self.cfg.name.clone(),
                    vm_id: vm_id.to_string(),
                    counter: grant.counter,
                    object: format!("states/{vm_id}.state"),
                    bytes,
                    timings,
                })
            }
            Err(e) => {
                w.procs.insert(idx, vm_back);
                self.tl.workloads.lock().await.insert(vm_id.to_string(), w);
                Err(e)
            }
        }
    }

    /// Resume (issue 13 item 4): reads the saved state's header from storage, asks the TTP
    /// for its K_s (AK-signed, with a fresh attestation and this host's certified bind key:
    /// the TTP releases it only to a trusted host appraised under the workload's profile,
    /// only for the latest suspend, only once), opens the image's configuration sealed to
    /// THIS host's TPM, starts the crypto domain, and feeds the authenticated state to a
    /// qemu started with `-incoming defer -S`; the guest continues only after the whole
    /// state verified. Audited (`ResumeWorkload`).
    pub async fn resume_workload(&self, call: &ResumeCall) -> Result<LaunchResult, Error> {
        let r = self.resume_inner(call).await;
        self.tl.audit("ResumeWorkload", &call.vm_id, &r);
        r
    }

    async fn resume_inner(&self, call: &ResumeCall) -> Result<LaunchResult, Error> {
        let mut timings = Vec::new();
        let now = caas_attest::now_ms();
        let vm_id = call.vm_id.as_str();
        if self.tl.workloads.lock().await.contains_key(vm_id) {
            return Err(Error::InvalidRequest(format!(
                "workload {vm_id} is already running"
            )));
        }
        let t = Instant::now();
        let object = state_path(&self.tl.storage, vm_id)?;
        // The storage is untrusted: a planted symbolic link is not followed.
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&object)
        }
        .map_err(|_| {
            Error::Tl(caas_tl::Error::rejected(
                "no_saved_state",
                format!("no saved state of {vm_id} in the storage"),
            ))
        })?;
        let (header, prefix) =
            caas_workload::state::read_header(&mut file).map_err(state_refused)?;
        if header.vm_id != vm_id {
            return Err(state_refused(caas_workload::state::StateError::Header(
                "another workload's state".into(),
            )));
        }
        // A state this agent resumed once is never resumed again here (the TTP releases its
        // key again only to this host, for a resume that failed half-way).
        let done = self
            .cfg
            .state_dir
            .join("resumed")
            .join(format!("{vm_id}.json"));
        let marker = format!("{}:{}", header.counter, header.stream_id);
        if std::fs::read_to_string(&done).is_ok_and(|m| m == marker) {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "state_replayed",
                "this saved state was already resumed on this host",
            )));
        }
        let ttp = self.ttp().await?;
        let r = caas_crypto::random_bytes(32).map_err(|_| Error::Domain("no randomness".into()))?;
        let req = wire::ResumeRequest {
            host: self.cfg.name.clone(),
            vm_id: vm_id.to_string(),
            h2: header.h2.clone(),
            counter: header.counter,
            bind: self.bind_key(),
            r: r.clone(),
            t_ms: now,
        };
        let resp: Signed = self
            .ttp_request(label::RESUME_REQUEST, "/v1/tl/resume", wire::to_bytes(&req))
            .await?;
        let grant = sc::check_state_grant(&resp, &ttp, &self.cfg.name, vm_id, &r)?;
        if grant.h2 != header.h2 || grant.counter != header.counter {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "nonce_mismatch",
                "the grant names another saved state",
            )));
        }
        let (rsa, _) = split_bind_sealed(&grant.sealed)?;
        let key = self.bind_decrypt(rsa).await?;
        let (k_s, dk) = sc::open_state_grant(&key, &grant)?;
        drop(key);
        let dk = dk.ok_or_else(|| Error::Tl(caas_tl::Error::malformed("grant", "no DK_i")))?;
        timings.push((
            "state key from the TTP (quote, TPM unseal)".to_string(),
            ms(t),
        ));
        let token_context =
            crate::token::suspend_context(vm_id, &header.h2, header.counter, &header.stream_id);
        let mut reader = caas_workload::state::StateReader::new(
            std::io::BufReader::new(file),
            header,
            &prefix,
            &k_s,
        )
        .map_err(state_refused)?;
        drop(k_s);
        let domain: DomainState = {
            let b = reader.read_domain_state().map_err(state_refused)?;
            wire::parse("domain state", b.expose())?
        };
        if domain.h2 != grant.h2 || domain.sp != grant.sp {
            return Err(state_refused(caas_workload::state::StateError::Section(
                "owner or profile differ from the TTP's record".into(),
            )));
        }
        let token = if domain.token {
            let b = reader.read_domain_state().map_err(state_refused)?;
            Some(crate::token::TokenTransfer::parse(b.expose())?)
        } else {
            None
        };
        // k and the token's PINs from the configuration sealed to THIS host (Algorithm 1),
        // owned by the same DM, for the same upload of the image.
        let t = Instant::now();
        let sealed_cfg = self.read_config(&domain.image_id)?;
        let env = caas_tl::dm::SealedDomc::parse(&sealed_cfg)?;
        env.check_owner(&domain.h2)?;
        let tampered = || {
            Error::Tl(caas_tl::Error::rejected(
                "config_tampered",
                "the crypto-domain configuration was altered",
            ))
        };
        let rsa = env.rsa().map_err(|_| tampered())?;
        let key = self.bind_decrypt(rsa).await?;
        let cfg = caas_tl::dm::open_domc_config(
            &key,
            &self.cfg.name,
            &domain.image_id,
            &domain.h2,
            &sealed_cfg,
        )?;
        drop(key);
        let image = TlHost::image_dir(&self.tl.storage, &domain.image_id).join("image.caasvol");
        let ip = image.clone();
        let h1 = tokio::task::spawn_blocking(move || sha256_file(&ip))
            .await
            .map_err(|e| Error::Domain(format!("hash task: {e}")))??;
        if !caas_tl::crypto::ct_eq(domain.h1.as_bytes(), hex::encode(h1).as_bytes())
            || !caas_tl::crypto::ct_eq(cfg.image_h1.as_bytes(), domain.h1.as_bytes())
        {
            return Err(tampered());
        }
        timings.push(("crypto-domain configuration (TPM)".to_string(), ms(t)));
        let t = Instant::now();
        let id = self.tl.ids.allocate_launch()?;
        let dirs = self.fresh_dirs(vm_id, &id)?;
        let pre = prestart(&dirs.domain, &image, true, Ids::of(&id), None).await?;
        let procs = finish_domain(pre, &cfg).await?;
        timings.push(("crypto domain keyed (k, token)".to_string(), ms(t)));
        let t = Instant::now();
        let w = Workload {
            vm_id: vm_id.to_string(),
            image_id: domain.image_id.clone(),
            h2: domain.h2.clone(),
            launch_r: r,
            sp: domain.sp.clone(),
            dk: Zeroizing::new(dk.expose().to_vec()),
            // The saved state carries no secret: τ and pk_DM stay in the guest's memory,
            // not on this host, so a resumed VM cannot be live-migrated (refused below).
            tau: Zeroizing::new(Vec::new()),
            pk_dm: Vec::new(),
            driver: "qemu".to_string(),
            endpoint: None,
            disk_uri: Endpoint::Unix(dirs.domain.join("disk.sock")).nbd_uri(),
            vsm_socket: dirs.domain.join("vsm.sock"),
            vsm_tls: None,
            tls_client: None,
            procs,
            volumes: Vec::new(),
            started_ms: now,
            dirs,
            identity: id,
            net: None,
        };
        let (dir, disk, vsm_socket, run_as) = (
            w.dirs.workload.clone(),
            w.disk_uri.clone(),
            w.vsm_socket.clone(),
            w.identity.workload.run_as(),
        );
        let mut w = w;
        // The volumes: DomKeyReq under the resumed session's DK_i, opened and locked (the
        // suspending host's proxies released them), epochs anchored — before qemu starts.
        let vols = async {
            let (sock_dir, ids) = (w.dirs.domain.clone(), Ids::of(&w.identity));
            for (d, sr) in &domain.volumes {
                let v = self
                    .attach_deferred(
                        vm_id,
                        &w.launch_r,
                        &domain.h2,
                        &domain.sp,
                        &w.dk,
                        (d, sr),
                        &sock_dir,
                        ids,
                    )
                    .await?;
                w.volumes.push(v);
            }
            let pending = w
                .volumes
                .iter_mut()
                .filter_map(|v| v.deferred.take())
                .collect();
            self.open_deferred(vm_id, &w.launch_r, pending).await
        }
        .await;
        if let Err(e) = vols {
            w.stop();
            remove_run_dir(&self.tl.audit, vm_id, &w.dirs);
            return Err(e);
        }
        if !w.volumes.is_empty() {
            timings.push((
                "volumes re-attached (DomKeyReq, open, epoch)".to_string(),
                ms(t),
            ));
        }
        // The token as the guest left it, into the new VSM before qemu connects to it: only
        // an export made for THIS saved state (workload, counter, stream id) is accepted.
        if let Some(token) = token {
            let t = Instant::now();
            let imported = match w.vsm_control() {
                Some(ctl) => token.import(ctl, token_context).await,
                None => Err(Error::Domain("the VSM has no control channel".into())),
            };
            if let Err(e) = imported {
                w.stop();
                remove_run_dir(&self.tl.audit, vm_id, &w.dirs);
                return Err(e);
            }
            timings.push(("VSM token imported".to_string(), ms(t)));
        }
        // Its network proxy, keyed under the resumed session (whose first key retires the
        // suspended one at the TTP), before qemu restores the NIC.
        let network = match &domain.net {
            Some(n) => {
                let t = Instant::now();
                let started = async {
                    let proxy = self
                        .spawn_net(vm_id, n, &w.dirs.net, Ids::of(&w.identity))
                        .await?;
                    let (ctl, spec) = (proxy.ctl(), proxy.spec());
                    w.net = Some(proxy);
                    let creds = crate::net::NetCreds {
                        launch_r: w.launch_r.clone(),
                        h2: w.h2.clone(),
                        sp: w.sp.clone(),
                        dk: w.dk.clone(),
                    };
                    let (epoch, at) = self.key_net(vm_id, n, &ctl, Some(&creds)).await?;
                    if let Some(p) = w.net.as_mut() {
                        p.epoch = epoch;
                        p.schedule(Duration::from_millis(self.cfg.net.key_poll_ms), at);
                    }
                    Ok::<_, Error>(spec)
                }
                .await;
                match started {
                    Ok(spec) => {
                        timings.push(("network proxy keyed (TTP, TPM)".to_string(), ms(t)));
                        Some(spec)
                    }
                    Err(e) => {
                        w.stop();
                        self.tl.audit_net_stop(&w);
                        remove_run_dir(&self.tl.audit, vm_id, &w.dirs);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let uris = w.volumes.iter().map(|v| v.uri.clone()).collect();
        match restore_workload(
            vm_id,
            &dir,
            &disk,
            &vsm_socket,
            run_as,
            uris,
            network,
            reader,
        )
        .await
        .and_then(|(proc, endpoint, stream)| {
            w.procs.push(proc);
            w.endpoint = Some(endpoint);
            // qemu is up: its NIC socket is bound; the directory is closed to it.
            crate::identity::seal_net_dir(&w.dirs.net, Ids::of(&w.identity)).map(|()| stream)
        }) {
            Ok(stream) => {
                timings.push((
                    format!("VM restored from {stream} bytes of qemu state and continued"),
                    ms(t),
                ));
                if let Some(d) = done.parent() {
                    let _ = std::fs::create_dir_all(d);
                }
                write_private(&done, marker.as_bytes())?;
                let view = w.view();
                self.tl.workloads.lock().await.insert(vm_id.to_string(), w);
                // Resumed once (the TTP will not release its key again): the object goes.
                let _ = std::fs::remove_file(&object);
                Ok(LaunchResult {
                    host: self.cfg.name.clone(),
                    workload: view,
                    timings,
                })
            }
            Err(e) => {
                w.stop();
                self.tl.audit_net_stop(&w);
                remove_run_dir(&self.tl.audit, vm_id, &w.dirs);
                Err(e)
            }
        }
    }
}

/// Starts qemu waiting for its state (`-incoming defer -S`) on the resumed crypto domain
/// and feeds it the authenticated state; returns the VM process, its PSK endpoint and the
/// qemu stream's size. The guest read its secrets at its first boot: its `fw_cfg` entries
/// get empty placeholders (the devices must match the saved state's).
#[allow(clippy::too_many_arguments)]
async fn restore_workload(
    vm_id: &str,
    dir: &Path,
    disk: &str,
    vsm_socket: &Path,
    id: RunAs,
    volumes: Vec<String>,
    network: Option<caas_workload::NetSpec>,
    mut reader: caas_workload::state::StateReader<std::io::BufReader<std::fs::File>>,
) -> Result<(Proc, String, u64), Error> {
    let owner = id.own.then_some((id.uid, id.gid));
    let inject = dir.join("inject.json");
    let pin_file = dir.join("user.pin");
    for p in [&inject, &pin_file] {
        caas_crypto::fs::write_secret(p, b"{}", owner.map(Into::into))
            .map_err(Error::io(format!("write {}", p.display())))?;
    }
    let spec = caas_workload::WorkloadSpec {
        vm_id: vm_id.to_string(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ready_file: dir.join("ready"),
        inject_file: inject.clone(),
        disk: disk.to_string(),
        vsm: Some(caas_workload::VsmSpec {
            socket: vsm_socket.to_path_buf(),
            user_pin_file: pin_file.clone(),
            slot: 0,
        }),
        volumes,
        network,
    };
    use caas_workload::driver::Driver as _;
    let mut driver = caas_workload::driver::QemuDriver::new(dir.to_path_buf());
    driver.incoming = true;
    let wl = |e: caas_workload::Error| Error::Domain(format!("workload: {e}"));
    let program = driver.program().map_err(wl)?;
    let cmd = workload_command(&program, owner);
    let handle = driver.start(&spec, cmd).map_err(wl)?;
    let (handle, r) = tokio::task::spawn_blocking(move || {
        let r = (|| {
            let mut q = handle.qmp(Duration::from_secs(30)).map_err(wl)?;
            caas_workload::suspend::restore_vm(&mut q, &mut reader, Duration::from_secs(120))
                .map_err(suspend_err)
        })();
        (handle, r)
    })
    .await
    .map_err(|e| Error::Domain(format!("resume task: {e}")))?;
    let _ = std::fs::remove_file(&inject);
    let _ = std::fs::remove_file(&pin_file);
    let addr = handle.forwarded_addr();
    let mut p = Proc {
        what: "workload",
        child: ProcChild::Workload(handle),
        control: None,
    };
    match (r, addr) {
        (Ok(t), Some(a)) => Ok((p, a.to_string(), t.stream_bytes)),
        (Ok(_), None) => {
            p.stop();
            Err(Error::Domain("the VM has no endpoint".into()))
        }
        (Err(e), _) => {
            p.stop();
            Err(e)
        }
    }
}
