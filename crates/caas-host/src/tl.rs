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
use crate::identity::{Identities, Identity, RunAs, agent_ids};
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

/// Per-host TL state.
#[derive(Debug)]
pub struct TlHost {
    ttp: std::sync::RwLock<Option<TtpPublic>>,
    replay: sc::ReplayCache,
    workloads: tokio::sync::Mutex<HashMap<String, Workload>>,
    audit: std::sync::Mutex<AuditLog>,
    storage: PathBuf,
    run_dir: PathBuf,
    ttp_pin_file: PathBuf,
    ids: Identities,
    /// The last revocation accepted (its sequence number), kept in `revocation.json`.
    revocation: std::sync::Mutex<RevocationState>,
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

/// A launched workload and its crypto domain.
struct Workload {
    vm_id: String,
    image_id: String,
    h2: String,
    /// r of the TL.Request that launched it (names the TTP's session).
    launch_r: Vec<u8>,
    sp: String,
    /// DK_i (TL session key with the TTP).
    dk: Zeroizing<Vec<u8>>,
    endpoint: Option<String>,
    disk_uri: String,
    vsm_socket: PathBuf,
    procs: Vec<Proc>,
    volumes: Vec<AttachedVolume>,
    started_ms: u64,
    dir: PathBuf,
    /// The identity its crypto domain and the workload run under (returned when dropped,
    /// after the processes are stopped).
    identity: Identity,
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
}

impl Workload {
    fn stop(&mut self) {
        // The workload first (it closes its NBD connections), then its volumes' proxies,
        // then the crypto domain.
        for p in self.procs.iter_mut().filter(|p| p.what == "workload") {
            p.stop();
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
    }

    fn view(&self) -> WorkloadView {
        WorkloadView {
            vm_id: self.vm_id.clone(),
            image_id: self.image_id.clone(),
            sp: self.sp.clone(),
            endpoint: self.endpoint.clone(),
            disk_uri: self.disk_uri.clone(),
            vsm_socket: self.vsm_socket.display().to_string(),
            processes: self
                .procs
                .iter()
                .map(|p| format!("{}:{}", p.what, p.pid()))
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
    /// `role:pid` of each process.
    pub processes: Vec<String>,
    /// Attached DBSP volumes.
    pub volumes: Vec<VolumeView>,
    /// Start time (Unix ms).
    pub started_ms: u64,
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
    /// State for `cfg`.
    pub fn new(cfg: &AgentConfig) -> Result<Self, Error> {
        let run_dir = cfg.run_dir.clone();
        std::fs::create_dir_all(&run_dir)
            .map_err(Error::io(format!("create {}", run_dir.display())))?;
        // Workload identities traverse it to their own 0700 directories; nobody lists it.
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o711))
                .map_err(Error::io(format!("chmod {}", run_dir.display())))?;
        }
        let ttp_pin_file = cfg.state_dir.join("ttp.pub");
        let pinned = match &cfg.ttp_public_key {
            Some(p) => Some(p.clone()),
            None => std::fs::read_to_string(&ttp_pin_file)
                .ok()
                .and_then(|s| TtpPublic::from_text(&s).ok()),
        };
        Ok(Self {
            ttp: std::sync::RwLock::new(pinned),
            replay: sc::ReplayCache::default(),
            workloads: tokio::sync::Mutex::new(HashMap::new()),
            audit: std::sync::Mutex::new(AuditLog::open(
                cfg.state_dir.join("audit.jsonl"),
                crate::audit::load_or_create_key(&cfg.state_dir).map_err(Error::Config)?,
            )),
            storage: cfg.storage_dir.clone(),
            ids: Identities::new(cfg.workload_ids, cfg.isolation, run_dir.clone()),
            run_dir,
            ttp_pin_file,
            revocation: std::sync::Mutex::new(RevocationState::load(&cfg.state_dir)),
        })
    }

    fn audit(&self, op: &str, subject: &str, r: &Result<impl Sized, Error>) {
        let result = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => error_code(e).to_string(),
        };
        if let Ok(mut a) = self.audit.lock() {
            a.append(op, subject, &result);
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
fn caas_exe() -> Result<String, Error> {
    let exe = std::env::var_os("CAAS_EXE")
        .map(PathBuf::from)
        .map_or_else(std::env::current_exe, Ok)
        .map_err(Error::io("current executable"))?;
    Ok(exe.display().to_string())
}

async fn wait_for_socket(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
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

/// Starts a Secure Device Proxy process for `volume` on `socket`; it waits for its key on
/// the returned stdin pipe (never in arguments, environment or files), then switches to
/// the workload's identity `id` and serves only it and the agent.
fn spawn_sdp_unkeyed(
    volume: &Path,
    socket: &Path,
    read_only: bool,
    id: RunAs,
) -> Result<(Proc, std::process::ChildStdin), Error> {
    let _ = std::fs::remove_file(socket);
    let mut cmd = caas_tpm::swtpm::command_without_inherited_fds(&caas_exe()?);
    cmd.arg("volume")
        .arg("serve")
        .arg(volume)
        .arg("--socket")
        .arg(socket)
        .arg("--key-file")
        .arg("/dev/stdin")
        .arg("--peer-uid")
        .arg(agent_ids().0.to_string())
        .args(read_only.then_some("--read-only"));
    if id.own {
        cmd.arg("--run-as").arg(format!("{}:{}", id.uid, id.gid));
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
    socket: &Path,
) -> Result<Proc, Error> {
    let r = stdin
        .write_all(key.expose())
        .map_err(Error::io("hand the key to the Secure Device Proxy"));
    drop(stdin);
    if let Err(e) = r {
        proc.stop();
        return Err(e);
    }
    if let Err(e) = wait_for_socket(socket, &mut proc, Duration::from_secs(20)).await {
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
    id: RunAs,
) -> Result<Proc, Error> {
    let (proc, stdin) = spawn_sdp_unkeyed(volume, socket, read_only, id)?;
    key_sdp(proc, stdin, key, socket).await
}

/// The crypto domain's processes, started but not yet keyed.
struct Prestart {
    sdp: Proc,
    sdp_stdin: std::process::ChildStdin,
    disk_sock: PathBuf,
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
/// in its own memory and never stored), both under the workload's identity `id`.
async fn prestart(dir: &Path, image: &Path, read_only: bool, id: RunAs) -> Result<Prestart, Error> {
    let disk_sock = dir.join("disk.sock");
    let vsm_sock = dir.join("vsm.sock");
    let (mut sdp, sdp_stdin) = spawn_sdp_unkeyed(image, &disk_sock, read_only, id)?;
    let state = dir.join("domc");
    let vsm = (|| {
        std::fs::create_dir_all(&state).map_err(Error::io("create crypto-domain state"))?;
        let _ = std::fs::remove_file(&vsm_sock);
        let ids = format!("{}:{}", id.uid, id.gid);
        let agent_uid = agent_ids().0.to_string();
        let mut cmd = caas_tpm::swtpm::command_without_inherited_fds(&caas_exe()?);
        cmd.args([
            "domc",
            "serve",
            "--ephemeral-key",
            "--socket-mode",
            "600",
            "--run-as",
            &ids,
            "--peer-uid",
            &agent_uid,
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&vsm_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(Error::io("start the VSM crypto domain"))?;
        Ok::<_, Error>(Proc::plain("vsm", child))
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
        disk_sock,
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
        disk_sock,
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
    let sdp = key_sdp(sdp, sdp_stdin, &key, &disk_sock).await;
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

/// A 0600 file of the agent (atomic; the one writer, `caas_crypto::fs`).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    caas_crypto::fs::write_secret(path, bytes, None)
        .map_err(Error::io(format!("write {}", path.display())))
}

/// Writes the workload's spec, injected secrets and PIN file, starts it through its driver
/// and waits for its ready file; returns the process and its PSK-channel address.
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
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ready_file: ready.clone(),
        inject_file: inject,
        disk: disk.to_string(),
        vsm: Some(caas_workload::VsmSpec {
            socket: vsm_socket.to_path_buf(),
            user_pin_file: pin_file,
            slot: 0,
        }),
        volumes,
    };
    use caas_workload::driver::{Driver, ProcessDriver, QemuDriver};
    let driver: Box<dyn Driver> = match driver {
        "qemu" => Box::new(QemuDriver::new(dir.to_path_buf())),
        _ => {
            let d = ProcessDriver::new(PathBuf::from(caas_exe()?), dir.to_path_buf());
            Box::new(match owner {
                Some((uid, gid)) => d.owned_by(uid, gid),
                None => d,
            })
        }
    };
    let program = driver.program().map_err(wl)?;
    let mut cmd = caas_tpm::swtpm::command_without_inherited_fds(&program.display().to_string());
    cmd.stdout(Stdio::null());
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(uid).gid(gid);
    }
    let mut handle = driver.start(&spec, cmd).map_err(wl)?;
    let (handle, addr) = tokio::task::spawn_blocking(move || {
        let r = handle.wait_ready(Duration::from_secs(60));
        (handle, r)
    })
    .await
    .map_err(|e| Error::Domain(format!("workload task: {e}")))?;
    let mut p = Proc {
        what: "workload",
        child: ProcChild::Workload(handle),
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
    async fn bind_decrypt(&self, ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let bind = self.bind_blob();
        let pcrs = self.keys.bind_pcrs.clone();
        let ct = ct.to_vec();
        Ok(self
            .tpm
            .run(move |t| t.bind_decrypt(&bind, PcrBank::Sha256, &pcrs, &ct))
            .await?)
    }

    /// σ_AIK over `body`: a quote of the bind PCRs with qualifying data `ak_nonce(label, body)`.
    async fn ak_sign(&self, label_text: &str, body: Vec<u8>) -> Result<AkSigned, Error> {
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

    /// pk_TTP: configured, pinned, or fetched once from the key service and pinned.
    async fn ttp(&self) -> Result<TtpPublic, Error> {
        if let Ok(g) = self.tl.ttp.read()
            && let Some(p) = g.as_ref()
        {
            return Ok(p.clone());
        }
        let p: TtpPublic = self
            .http
            .get(&format!("{}/v1/tl/ttp", self.cfg.key_service_url))
            .await?;
        write_private(&self.tl.ttp_pin_file, p.to_text().as_bytes())?;
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
        let id = self.tl.ids.allocate()?;
        let dir = self.fresh_dir(&call.vm_id, id.run_as())?;
        let t = Instant::now();
        let (tl, pre) = tokio::join!(self.tl_protocol(call, &req, &image, &sealed_cfg), async {
            let r = prestart(&dir, &image, true, id.run_as()).await;
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
        let procs = finish_domain(pre, &cfg).await?;
        timings.push(("crypto domain keyed (k, token)".to_string(), ms(t)));
        self.run_workload(
            call, &req.sp, &m2.h2, &req.r, &m2.dk, &m2.tau, &req.pk_dm, driver, &cfg, dir, procs,
            now, timings, id,
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
        let id = self.tl.ids.allocate()?;
        let dir = self.fresh_dir(&call.vm_id, id.run_as())?;
        let t = Instant::now();
        let pre = prestart(&dir, &image, true, id.run_as()).await?;
        let procs = finish_domain(pre, cfg).await?;
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
        Ok(driver)
    }

    /// The workload's run directory, created afresh: mode 0700, owned by its identity.
    fn fresh_dir(&self, vm_id: &str, id: RunAs) -> Result<PathBuf, Error> {
        wire::check_name("vm_id", vm_id)?;
        let dir = self.tl.run_dir.join(vm_id);
        crate::identity::fresh_dir(&dir, id)?;
        Ok(dir)
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
        dir: PathBuf,
        procs: Vec<Proc>,
        now: u64,
        mut timings: Vec<(String, f64)>,
        identity: Identity,
    ) -> Result<LaunchResult, Error> {
        let w = Workload {
            vm_id: call.vm_id.clone(),
            image_id: call.image_id.clone(),
            h2: h2.to_string(),
            launch_r: launch_r.to_vec(),
            sp: sp.to_string(),
            dk: Zeroizing::new(dk.to_vec()),
            endpoint: None,
            disk_uri: format!(
                "nbd+unix:///caas?socket={}",
                dir.join("disk.sock").display()
            ),
            vsm_socket: dir.join("vsm.sock"),
            procs,
            volumes: Vec::new(),
            started_ms: now,
            dir,
            identity,
        };
        let vm_id = call.vm_id.clone();
        self.tl.workloads.lock().await.insert(vm_id.clone(), w);
        let rest = self
            .launch_rest(call, tau, pk_dm, driver, &cfg.user_pin, &mut timings)
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
                if let Some(mut w) = g.remove(&vm_id) {
                    w.stop();
                }
                Err(e)
            }
        }
    }

    /// After the crypto domain runs: DBSP volumes, then the workload with τ and pk_DM.
    async fn launch_rest(
        &self,
        call: &LaunchCall,
        tau: &[u8],
        pk_dm: &[u8],
        driver: &str,
        user_pin: &str,
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
        let t = Instant::now();
        let pk: [u8; 32] = pk_dm
            .try_into()
            .map_err(|_| Error::InvalidRequest("pk_DM must be 32 bytes".into()))?;
        let injected = caas_workload::InjectedSecrets {
            tau: caas_crypto::SecretBytes::from_slice(tau),
            pk_dm: pk,
        };
        let (dir, disk, vsm_socket, id) = {
            let g = self.tl.workloads.lock().await;
            let w = g
                .get(&call.vm_id)
                .ok_or_else(|| Error::Domain("workload vanished".into()))?;
            (
                w.dir.clone(),
                w.disk_uri.clone(),
                w.vsm_socket.clone(),
                w.identity.run_as(),
            )
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
        )
        .await?;
        drop(injected);
        let mut g = self.tl.workloads.lock().await;
        let w = g
            .get_mut(&call.vm_id)
            .ok_or_else(|| Error::Domain("workload vanished".into()))?;
        w.procs.push(proc);
        w.endpoint = Some(endpoint);
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
    pub async fn stop_workload(&self, vm_id: &str) -> Result<(), Error> {
        let r = match self.tl.workloads.lock().await.remove(vm_id) {
            Some(mut w) => {
                w.stop();
                let _ = std::fs::remove_dir_all(&w.dir);
                Ok(())
            }
            None => Err(Error::InvalidRequest(format!("no workload {vm_id}"))),
        };
        self.tl.audit("StopWorkload", vm_id, &r);
        r
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
                w.dir.clone(),
                w.identity.run_as(),
            )
        };
        let path = TlHost::volume_path(&self.tl.storage, &a.domain, &a.sr);
        let existing = if path.exists() {
            let store = caas_sdp::store::Store::open_file(&path, false, None)
                .map_err(|e| Error::Domain(format!("open volume: {e}")))?;
            let (h, _) = caas_sdp::engine::inspect(&store).await.map_err(|e| {
                Error::Tl(caas_tl::Error::rejected("header_invalid", e.to_string()))
            })?;
            if h.dbsp.domain_id != a.domain.as_bytes() {
                return Err(Error::Tl(caas_tl::Error::rejected(
                    "header_invalid",
                    "the volume's domain header names another domain",
                )));
            }
            Some((h.dbsp.c4.clone(), h.dbsp.mu.clone()))
        } else {
            None
        };
        // An existing volume's proxy starts while its key is fetched (it waits for it).
        let sock = sock_dir.join(format!("vol-{}-{}.sock", a.domain, a.sr));
        let mut pre = match existing {
            Some(_) => Some(spawn_sdp_unkeyed(&path, &sock, false, id)?),
            None => None,
        };
        let r = self
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
            .await;
        let (d, vk) = match r {
            Ok(x) => x,
            Err(e) => {
                if let Some((mut p, _)) = pre.take() {
                    p.stop();
                }
                return Err(e);
            }
        };
        let t = Instant::now();
        let created = existing.is_none();
        let proc = match pre.take() {
            Some((p, stdin)) => key_sdp(p, stdin, &vk, &sock).await?,
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
                spawn_sdp(&path, &sock, &vk, false, id).await?
            }
        };
        timings.push(("open volume".to_string(), ms(t)));
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
