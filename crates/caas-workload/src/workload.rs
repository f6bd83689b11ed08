//! The process workload: the "VM" of the tests and of `caas demo`. At start it takes the
//! injected secrets (τ, pk_DM; the file is deleted), logs in to its crypto domain if it
//! has one, reads its whole boot disk through NBD and hashes it, then serves the PSK
//! channel (identity = vm_id, PSK = τ) and answers DM challenges ([`crate::proto`]).
use crate::driver::QEMU_READY_MARKER;
use crate::error::{Error, Result};
use crate::proto::{
    self, ChallengeRequest, ERR_BAD_REQUEST, ERR_DM_SIGNATURE, ERR_REPLAY, ErrorAnswer,
    MAX_REQUEST_LINE, NONCE_LEN, VolumeCheck, VsmSignature, WorkloadReport,
};
use crate::psk;
use crate::spec::{InjectedSecrets, ReadyInfo, WorkloadSpec};
use crate::vsm::{VSM_MECHANISM, VsmEndpoint, VsmSigner};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use caas_sdp::store::Store;
use openssl::ssl::SslAcceptor;
use std::collections::{HashSet, VecDeque};
use std::io::{BufReader, Read as _, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Read size when hashing the disk.
const HASH_CHUNK: usize = 1 << 20;
/// Size of the marker block written to extra volumes (the last block of each).
pub const MARKER_BLOCK: u64 = 4096;
/// Prefix of the marker block.
const MARKER_MAGIC: &[u8] = b"caas-workload marker v1\0";
/// Concurrent connections served; more are closed at once.
const MAX_CONNECTIONS: usize = 8;
/// Read/write timeout of a connection (handshake included).
const CONN_TIMEOUT: Duration = Duration::from_secs(30);
/// How many answered nonces are remembered for replay detection.
const NONCE_MEMORY: usize = 4096;

/// Runs the workload until it is killed: [`Workload::start`], then [`Workload::serve`].
pub fn run(spec: &WorkloadSpec) -> Result<()> {
    Workload::start(spec)?.serve()
}

/// The guest agent's inputs inside a VM ([`Workload::start_guest`]).
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The `fw_cfg` directory of the caas entries
    /// (`/sys/firmware/qemu_fw_cfg/by_name/opt/caas`): `vm-id`, `inject`, `vsm-pin`.
    pub fw_cfg: PathBuf,
    /// The boot disk as the guest sees it (`/dev/vda`).
    pub disk: PathBuf,
    /// Where the PSK channel listens (the host forwards a loopback port to it).
    pub listen: SocketAddr,
    /// The crypto domain (`virtio:/dev/virtio-ports/caas.vsm`).
    pub vsm: Option<VsmEndpoint>,
}

/// A started workload: secrets taken, disk hashed, listener bound, ready file written.
#[derive(Debug)]
pub struct Workload {
    listener: TcpListener,
    ready: ReadyInfo,
    shared: Arc<Shared>,
}

/// Answered nonces: a set for lookup, a queue for eviction (oldest first).
type SeenNonces = (HashSet<[u8; NONCE_LEN]>, VecDeque<[u8; NONCE_LEN]>);

struct Shared {
    vm_id: String,
    pk_dm: [u8; 32],
    acceptor: SslAcceptor,
    disk_sha256: [u8; 32],
    disk_size: u64,
    vsm: Option<Mutex<VsmSigner>>,
    volumes: Vec<String>,
    rt: IoRuntime,
    seen: Mutex<SeenNonces>,
    active: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("vm_id", &self.vm_id)
            .field("disk_size", &self.disk_size)
            .finish_non_exhaustive()
    }
}

impl Workload {
    /// Takes the injected secrets (deleting the file), connects to the crypto domain if
    /// configured, hashes the disk, binds the listener and writes the ready file.
    pub fn start(spec: &WorkloadSpec) -> Result<Self> {
        spec.validate()?;
        let _ = std::fs::remove_file(&spec.ready_file);
        // First thing: the secrets should spend as little time on disk as possible.
        let InjectedSecrets { tau, pk_dm, tls } = InjectedSecrets::take_from(&spec.inject_file)?;
        // The launch's client credentials for the crypto domain's mutual-TLS transports.
        let tls = match tls {
            Some(t) => Some(caas_sdp::store::TlsClient::from_pem(
                &t.ca_pem,
                &t.cert_pem,
                t.key_pem.expose(),
            )?),
            None => None,
        };
        let acceptor = psk::server_acceptor(&spec.vm_id, &tau)?;
        drop(tau);
        let vsm = match &spec.vsm {
            Some(v) => Some(Mutex::new(VsmSigner::from_pin_file(
                &v.socket,
                v.slot,
                &v.user_pin_file,
            )?)),
            None => None,
        };
        let rt = IoRuntime::new()?;
        let (disk_sha256, disk_size) = rt.block_on(hash_disk(&spec.disk, tls.as_ref()))??;
        tracing::info!(
            vm_id = %spec.vm_id,
            disk_size,
            disk_sha256 = %hex::encode(disk_sha256),
            "workload read its disk"
        );
        let listener = TcpListener::bind(spec.listen).map_err(Error::io("bind listener"))?;
        let addr = listener.local_addr().map_err(Error::io("local address"))?;
        let ready = ReadyInfo {
            vm_id: spec.vm_id.clone(),
            addr,
            pid: std::process::id(),
            disk_sha256: hex::encode(disk_sha256),
        };
        ready.write_to(&spec.ready_file)?;
        tracing::info!(vm_id = %spec.vm_id, %addr, "workload serving the PSK channel");
        Ok(Self {
            listener,
            ready,
            shared: Arc::new(Shared {
                vm_id: spec.vm_id.clone(),
                pk_dm,
                acceptor,
                disk_sha256,
                disk_size,
                vsm,
                volumes: spec.volumes.clone(),
                rt,
                seen: Mutex::new((HashSet::new(), VecDeque::new())),
                active: AtomicUsize::new(0),
            }),
        })
    }

    /// The guest agent of a VM (issue 13): reads its id, τ and pk_DM once from `fw_cfg`,
    /// connects to its crypto domain over the virtio-serial port if it has one (the
    /// `vsm-pin` entry present), hashes its boot disk (a local block device: the host's
    /// crypto domain decrypts it underneath), binds the listener and prints
    /// [`QEMU_READY_MARKER`] on its console (stdout). The `fw_cfg` entries stay readable to
    /// the guest's root for the VM's life (the guest is the tenant's); the host deletes its
    /// files once qemu has read them.
    pub fn start_guest(cfg: &GuestConfig) -> Result<Self> {
        let entry = |name: &str| cfg.fw_cfg.join(name).join("raw");
        let id = crate::spec::read_bounded(&entry("vm-id"), 256, "read fw_cfg vm-id")?;
        let vm_id = std::str::from_utf8(&id)
            .map_err(|_| Error::Config("fw_cfg vm-id is not UTF-8".into()))?
            .trim()
            .to_string();
        crate::spec::validate_vm_id(&vm_id)?;
        let raw = crate::spec::read_bounded(&entry("inject"), 4096, "read fw_cfg inject")?;
        let InjectedSecrets { tau, pk_dm, .. } = InjectedSecrets::parse(&raw)?;
        drop(raw);
        let acceptor = psk::server_acceptor(&vm_id, &tau)?;
        drop(tau);
        let pin = entry("vsm-pin");
        let vsm = match (&cfg.vsm, pin.exists()) {
            (Some(ep), true) => Some(Mutex::new(VsmSigner::from_pin_file_to(
                ep.clone(),
                0,
                &pin,
            )?)),
            _ => None,
        };
        let (disk_sha256, disk_size) = hash_local_disk(&cfg.disk)?;
        tracing::info!(%vm_id, disk_size, "guest read its disk");
        let listener = TcpListener::bind(cfg.listen).map_err(Error::io("bind listener"))?;
        let addr = listener.local_addr().map_err(Error::io("local address"))?;
        let ready = ReadyInfo {
            vm_id: vm_id.clone(),
            addr,
            pid: std::process::id(),
            disk_sha256: hex::encode(disk_sha256),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{QEMU_READY_MARKER}").map_err(Error::io("print the ready marker"))?;
        out.flush().map_err(Error::io("print the ready marker"))?;
        Ok(Self {
            listener,
            ready,
            shared: Arc::new(Shared {
                vm_id,
                pk_dm,
                acceptor,
                disk_sha256,
                disk_size,
                vsm,
                volumes: Vec::new(),
                rt: IoRuntime::new()?,
                seen: Mutex::new((HashSet::new(), VecDeque::new())),
                active: AtomicUsize::new(0),
            }),
        })
    }

    /// The bound address of the PSK channel.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.ready.addr
    }

    /// What was written to the ready file.
    #[must_use]
    pub fn ready_info(&self) -> &ReadyInfo {
        &self.ready
    }

    /// Serves connections until the process is killed (one thread per connection, at
    /// most 8 at a time).
    pub fn serve(self) -> Result<()> {
        for conn in self.listener.incoming() {
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if self.shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.shared.active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("too many connections; closing one");
                continue;
            }
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("workload-conn".into())
                .spawn(move || {
                    let peer = tcp.peer_addr().ok();
                    if let Err(e) = handle(&shared, tcp) {
                        tracing::warn!(?peer, error = %e, "connection failed");
                    }
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                self.shared.active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(error = %e, "cannot spawn a connection thread");
            }
        }
        Ok(())
    }
}

/// A small tokio runtime for the NBD client, usable from any thread: futures run on a
/// scoped helper thread, so calling in from an async context (the `caas` binary's runtime,
/// `spawn_blocking`, `#[tokio::test]`) cannot hit tokio's nested-runtime panic, and it is
/// shut down without blocking when dropped.
#[derive(Debug)]
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(Error::io("start the IO runtime"))?;
        Ok(Self(Some(rt)))
    }

    fn block_on<F>(&self, f: F) -> Result<F::Output>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let rt = self
            .0
            .as_ref()
            .ok_or_else(|| Error::Config("IO runtime stopped".into()))?;
        std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join())
            .map_err(|_| Error::Config("IO thread panicked".into()))
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// SHA-256 and size of a local disk (a block device: read to its end).
fn hash_local_disk(path: &Path) -> Result<([u8; 32], u64)> {
    let mut f = std::fs::File::open(path).map_err(Error::io("open the boot disk"))?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read the boot disk")(e)),
        };
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((out, size))
}

async fn hash_disk(uri: &str, tls: Option<&caas_sdp::store::TlsClient>) -> Result<([u8; 32], u64)> {
    let store = match tls {
        Some(t) if uri.starts_with("nbds://") => Store::connect_nbd_tls(uri, t).await?,
        _ => Store::connect_nbd(uri).await?,
    };
    let size = store.byte_len().await?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(HASH_CHUNK as u64)).unwrap_or(HASH_CHUNK);
        let chunk = &mut buf[..n];
        store.read_at(off, chunk).await?;
        ctx.update(chunk);
        off += n as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((out, size))
}

fn send_line<W: Write>(w: &mut W, value: &impl serde::Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(value).map_err(|e| Error::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).map_err(Error::io("send answer"))?;
    w.flush().map_err(Error::io("send answer"))
}

fn refuse<W: Write>(w: &mut W, code: &str) -> Result<()> {
    send_line(
        w,
        &ErrorAnswer {
            error: code.to_string(),
        },
    )
}

fn handle(shared: &Shared, tcp: TcpStream) -> Result<()> {
    tcp.set_read_timeout(Some(CONN_TIMEOUT))
        .map_err(Error::io("set timeout"))?;
    tcp.set_write_timeout(Some(CONN_TIMEOUT))
        .map_err(Error::io("set timeout"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = psk::accept(&shared.acceptor, tcp)?;
    let line = match proto::read_line_bounded(&mut BufReader::new(&mut tls), MAX_REQUEST_LINE) {
        Ok(l) => l,
        Err(e @ Error::Protocol(_)) => {
            refuse(&mut tls, ERR_BAD_REQUEST)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let parsed = serde_json::from_slice::<ChallengeRequest>(&line)
        .map_err(|e| Error::Protocol(format!("bad request: {e}")))
        .and_then(|r| {
            Ok((
                proto::b64_array::<NONCE_LEN>(&r.nonce, "nonce")?,
                proto::b64_array::<64>(&r.sig, "sig")?,
            ))
        });
    let (nonce, sig) = match parsed {
        Ok(p) => p,
        Err(e) => {
            refuse(&mut tls, ERR_BAD_REQUEST)?;
            return Err(e);
        }
    };
    // "vm verifies the authenticity of DM" (seed 003 §4.3).
    let msg = proto::challenge_message(&shared.vm_id, &nonce);
    if aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, shared.pk_dm)
        .verify(&msg, &sig)
        .is_err()
    {
        refuse(&mut tls, ERR_DM_SIGNATURE)?;
        let _ = tls.shutdown();
        return Err(Error::DmSignatureInvalid);
    }
    if !remember_nonce(shared, nonce) {
        refuse(&mut tls, ERR_REPLAY)?;
        return Err(Error::Protocol("replayed nonce".into()));
    }
    let report = report(shared, &nonce)?;
    send_line(&mut tls, &report)?;
    let _ = tls.shutdown();
    tracing::info!(vm_id = %shared.vm_id, "answered a verified DM challenge");
    Ok(())
}

/// Records `nonce`; false if it was already answered.
fn remember_nonce(shared: &Shared, nonce: [u8; NONCE_LEN]) -> bool {
    let Ok(mut seen) = shared.seen.lock() else {
        return false;
    };
    let (set, order) = &mut *seen;
    if !set.insert(nonce) {
        return false;
    }
    order.push_back(nonce);
    if order.len() > NONCE_MEMORY
        && let Some(old) = order.pop_front()
    {
        set.remove(&old);
    }
    true
}

fn report(shared: &Shared, nonce: &[u8; NONCE_LEN]) -> Result<WorkloadReport> {
    let vsm = match &shared.vsm {
        Some(signer) => {
            let msg = proto::vsm_message(&shared.vm_id, nonce, &shared.disk_sha256);
            let mut signer = signer
                .lock()
                .map_err(|_| Error::Config("VSM signer poisoned".into()))?;
            let (sig, point) = signer.sign(&msg)?;
            Some(VsmSignature {
                mechanism: VSM_MECHANISM.into(),
                public_point: B64.encode(point),
                signature: B64.encode(sig),
            })
        }
        None => None,
    };
    let volumes = shared
        .volumes
        .iter()
        .map(|uri| {
            let result = shared
                .rt
                .block_on(check_volume(uri, nonce))
                .unwrap_or(Err("internal"));
            if let Err(step) = &result {
                tracing::warn!(uri, step, "volume marker check failed");
            }
            VolumeCheck {
                uri: uri.clone(),
                ok: result.is_ok(),
                error: result.err().map(str::to_string),
            }
        })
        .collect();
    Ok(WorkloadReport {
        vm_id: shared.vm_id.clone(),
        nonce: B64.encode(nonce),
        disk_sha256: hex::encode(shared.disk_sha256),
        disk_size: shared.disk_size,
        vsm,
        volumes,
    })
}

/// Writes a fresh marker into the last 4 KiB block of the volume, flushes, and reads it
/// back. The error is the failing step (details go to the log only).
async fn check_volume(uri: &str, nonce: &[u8; NONCE_LEN]) -> Result<(), &'static str> {
    let log = |step: &'static str| {
        move |e: caas_sdp::Error| {
            tracing::debug!(uri, step, error = %e, "volume step failed");
            step
        }
    };
    let store = Store::connect_nbd(uri).await.map_err(log("connect"))?;
    let size = store.byte_len().await.map_err(log("size"))?;
    if size < MARKER_BLOCK {
        return Err("size");
    }
    let offset = (size / MARKER_BLOCK - 1) * MARKER_BLOCK;
    let mut marker = vec![0u8; MARKER_BLOCK as usize];
    aws_lc_rs::rand::fill(&mut marker).map_err(|_| "random")?;
    marker[..MARKER_MAGIC.len()].copy_from_slice(MARKER_MAGIC);
    marker[MARKER_MAGIC.len()..MARKER_MAGIC.len() + NONCE_LEN].copy_from_slice(nonce);
    store
        .write_at(offset, &marker)
        .await
        .map_err(log("write"))?;
    store.sync().await.map_err(log("flush"))?;
    let mut back = vec![0u8; marker.len()];
    store
        .read_at(offset, &mut back)
        .await
        .map_err(log("read"))?;
    if back != marker {
        return Err("mismatch");
    }
    Ok(())
}
