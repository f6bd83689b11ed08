//! The VSM server: accepts connections on a UNIX socket, on vsock, or on TCP with TLS (for a
//! crypto domain running as its own micro-VM) and serves each on its own thread (crypto is
//! CPU-bound and blocking; one thread per pooled module connection lets calls on different
//! connections run in parallel). Each connection starts with `Hello`; a malformed frame
//! closes that connection only.
//!
//! Who may connect is checked before a single byte is read ([`PeerPolicy`]): on the UNIX
//! socket the kernel's peer credentials (SO_PEERCRED) must name the domain's own uid (the
//! workload's identity when the host agent launched it) or an allowed uid (the agent's);
//! on vsock the peer's CID must be the workload VM's; TCP requires a client certificate
//! (mutual TLS). Every refusal is written to the audit log ([`Domain::refuse_peer`]).
//!
//! A connection's thread answers a request as soon as it is handled when no further request
//! is buffered (several buffered requests are answered in one write), and then waits for the
//! next request awake for a short bounded spin (50 µs, `CAAS_DOMC_SPIN_US`, 0 = off; UNIX
//! socket — virtio-serial included, since qemu connects the port to it — and vsock) before
//! blocking, as long as the client's last request came within that bound and no other
//! connection thread is awake: a client signing in a loop does not pay a sleep and a wake-up
//! of this thread per request, an idle one costs one spin, and busy connections (many client
//! threads, where requests arrive batched anyway) do not spin on the CPUs they share. A
//! client can make its thread spin at most that long per request it sends.
//!
//! **Shared-memory ring.** On the UNIX socket a module may move a connection onto a ring
//! (`Request::RingOpen`, [`caas_vsm_proto::ring`]): the domain creates a fresh memfd for that
//! connection only, seals it against resizing, maps it and sends it with the answer
//! (SCM_RIGHTS); from then on the connection's frames travel through the mapping, served by
//! the same loop (in order, batched answers, the same spin — polling memory instead of the
//! socket). The mapping is the workload's to scribble on, so the ring code treats it as
//! hostile: every index it reads is bounded against the domain's private ones, each byte is
//! copied once into a private buffer before it is parsed (a frame rewritten after it was
//! published changes nothing the domain checks twice), nothing but this connection's own
//! requests and answers is ever placed in it, and a full answer ring stops the connection's
//! thread (bounded memory) until the module reads or hangs up. A broken rule ends the
//! connection and is audited ([`Domain::ring_violation`], `RingViolation`); a malformed frame
//! ends it as on the socket; anything arriving on the socket after the switch, or its
//! hang-up, ends it too. vsock and TLS connections refuse the ring (no shared memory). A
//! guest that asks for one over its virtio-serial port (whose UNIX-socket peer is qemu)
//! only hands qemu an empty ring and ends its own connection: the guest cannot reach it, and
//! its next frame arrives on the socket.

use crate::domain::Domain;
use crate::error::Error;
use caas_vsm_proto::blocking::{IoError, read_message, write_message};
use caas_vsm_proto::ring;
use caas_vsm_proto::{
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Request, Response, frame_message_into,
};
use cryptoki_sys::{CKR_FUNCTION_NOT_SUPPORTED, CKR_GENERAL_ERROR};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Binds the socket (replacing a stale one) with mode `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    if path.exists() {
        std::fs::remove_file(path).map_err(Error::io("remove stale socket", path))?;
    }
    let l = UnixListener::bind(path).map_err(Error::io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod", path))?;
    Ok(l)
}

/// Who may connect to the domain (one policy for every crypto-domain listener).
pub use caas_crypto::peer::{PeerPolicy, peer_uid};

/// Serves connections forever, each only if `policy` allows its peer.
pub fn serve(domain: Arc<Domain>, listener: UnixListener, policy: PeerPolicy) -> Result<(), Error> {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Some(why) = policy.unix_refusal(&stream) {
                    domain.refuse_peer("unix", &why);
                    continue;
                }
                let d = domain.clone();
                let spawned = std::thread::Builder::new()
                    .name("vsm-conn".into())
                    .spawn(move || serve_conn(&d, stream));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start connection thread");
                }
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(())
}

/// A stream with buffered reads: one syscall usually brings a whole frame, or several when
/// the module pipelines requests.
struct Buffered<S> {
    reader: std::io::BufReader<S>,
    writer: S,
    /// The UNIX socket (a shared-memory ring can be offered over it; `None` on vsock).
    unix: Option<UnixStream>,
}

/// Whether another complete request is already buffered, so the answer to the one just
/// handled can wait and leave with the next answers in one write.
trait Queued {
    fn request_queued(&self) -> bool {
        false
    }
    /// Waits awake, at most `budget`, for the next request when nothing is buffered, so a
    /// client signing in a loop does not pay a sleep and a wake-up of this thread per
    /// request.
    fn spin_for_request(&mut self, _budget: Duration) {}
    /// Moves the connection onto a shared-memory ring: sends the answer to
    /// [`Request::RingOpen`] with the memfd attached and returns the ring's stream; `Err`
    /// (the rv to answer on this transport) where the transport has no shared memory.
    fn open_ring(&mut self) -> Result<RingStream, u64> {
        Err(CKR_FUNCTION_NOT_SUPPORTED)
    }
    /// `n` complete answers were just written (a ring publishes the count and wakes the
    /// callers waiting for them).
    fn answers_written(&mut self, _n: usize) {}
}

/// Whether `b` (a connection's private read buffer) starts with a whole frame.
fn whole_frame_buffered(b: &[u8]) -> bool {
    b.first_chunk::<4>()
        .and_then(|h| caas_vsm_proto::frame_len(*h).ok())
        .is_some_and(|len| b.len() - 4 >= len)
}

impl<S: Read + AsRawFd> Queued for Buffered<S> {
    fn request_queued(&self) -> bool {
        whole_frame_buffered(self.reader.buffer())
    }
    fn spin_for_request(&mut self, budget: Duration) {
        if self.reader.buffer().is_empty() {
            spin_readable(self.reader.get_ref().as_raw_fd(), budget);
        }
    }
    fn open_ring(&mut self) -> Result<RingStream, u64> {
        let Some(sock) = &self.unix else {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        };
        // Frames the module sent after RingOpen on the socket would be lost (or read out
        // of order): it must wait for the answer first.
        if !self.reader.buffer().is_empty() {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        }
        let (fd, map) = ring::create().map_err(|e| {
            tracing::warn!(error = %e, "cannot create a shared-memory ring");
            CKR_FUNCTION_NOT_SUPPORTED
        })?;
        let (Ok(rx_sock), Ok(tx_sock)) = (sock.try_clone(), sock.try_clone()) else {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        };
        let answer = caas_vsm_proto::frame_message(&Response::ok(caas_vsm_proto::Body::Empty {}))
            .map_err(|_| CKR_GENERAL_ERROR)?;
        // The answer and the memfd leave together; from here on the socket carries nothing
        // (anything that arrives on it, or its hang-up, ends the connection).
        ring::send_with_fd(sock, &answer, &fd).map_err(|_| CKR_GENERAL_ERROR)?;
        drop(fd);
        let (rx, tx) = ring::endpoints(map, ring::Side::Domain, rx_sock, tx_sock, None);
        Ok(RingStream {
            reader: std::io::BufReader::with_capacity(64 * 1024, rx),
            writer: tx,
        })
    }
}

/// A connection's shared-memory ring ([`caas_vsm_proto::ring`]), read through a private
/// buffer: every byte is copied out of the shared mapping once, before it is parsed.
struct RingStream {
    reader: std::io::BufReader<ring::Rx<UnixStream>>,
    writer: ring::Tx<UnixStream>,
}

impl RingStream {
    /// The first rule the module broke, if any.
    fn violation(&self) -> Option<ring::Violation> {
        self.reader
            .get_ref()
            .violation
            .clone()
            .or_else(|| self.writer.violation.clone())
    }
}

impl Read for RingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for RingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Queued for RingStream {
    fn request_queued(&self) -> bool {
        whole_frame_buffered(self.reader.buffer())
    }
    fn spin_for_request(&mut self, budget: Duration) {
        if self.reader.buffer().is_empty() {
            self.reader.get_mut().spin(budget);
        }
    }
    fn answers_written(&mut self, n: usize) {
        self.writer.answered(n);
    }
    // A second ring on the same connection: refused (the default).
}

/// How long a connection's thread waits awake for the next request before blocking
/// (`CAAS_DOMC_SPIN_US`, microseconds; 0 turns the spin off).
fn spin_budget() -> Duration {
    static B: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        Duration::from_micros(
            std::env::var("CAAS_DOMC_SPIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_SPIN_US)
                .min(MAX_SPIN_US),
        )
    })
}

/// Connection threads not waiting in a read (handling a request or spinning).
static AWAKE: AtomicUsize = AtomicUsize::new(0);

/// Counts its thread in [`AWAKE`] while it lives.
struct Awake;

impl Awake {
    fn new() -> Self {
        AWAKE.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        AWAKE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes its thread out of [`AWAKE`] while it lives (around a blocking read).
struct Asleep;

impl Asleep {
    fn new() -> Self {
        AWAKE.fetch_sub(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Asleep {
    fn drop(&mut self) {
        AWAKE.fetch_add(1, Ordering::Relaxed);
    }
}

/// The default spin.
const DEFAULT_SPIN_US: u64 = 50;
/// The longest spin allowed.
const MAX_SPIN_US: u64 = 1000;

/// Polls `fd` without blocking until it has data (or EOF/an error, which the blocking read
/// then reports) or `budget` has passed. Returns whether it became readable.
fn spin_readable(fd: RawFd, budget: Duration) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    let mut b = [0u8; 1];
    loop {
        match recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            _ => return true,
        }
        if start.elapsed() >= budget {
            return false;
        }
        // The peer may be runnable on this very CPU (a sync wake-up put it here): let it
        // run instead of spinning it out.
        std::thread::yield_now();
    }
}

impl<C, T: Read + Write> Queued for rustls::StreamOwned<C, T> {}

impl<S: Read> Read for Buffered<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl<S: Write> Write for Buffered<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// Serves one UNIX-socket connection until it closes.
pub fn serve_conn(domain: &Domain, stream: UnixStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let unix = stream.try_clone().ok();
    let mut s = Buffered {
        reader: std::io::BufReader::with_capacity(64 * 1024, read_half),
        writer: stream,
        unix,
    };
    serve_stream(domain, &mut s);
}

/// Serves vsock connections forever; only the peer `policy` names (the workload's VM) is
/// served.
pub fn serve_vsock(domain: Arc<Domain>, listener: crate::vsock::VsockListener, policy: PeerPolicy) {
    loop {
        let stream = match listener.accept() {
            Ok((s, cid)) => match policy.vsock_refusal(cid) {
                None => s,
                Some(why) => {
                    domain.refuse_peer("vsock", &why);
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "vsock accept failed");
                // Do not spin on a persistent failure (e.g. out of descriptors).
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let d = domain.clone();
        let spawned = std::thread::Builder::new()
            .name("vsm-vsock".into())
            .spawn(move || {
                let Ok(read_half) = stream.try_clone() else {
                    return;
                };
                let mut s = Buffered {
                    reader: std::io::BufReader::with_capacity(64 * 1024, read_half),
                    writer: stream,
                    unix: None,
                };
                serve_stream(&d, &mut s);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start connection thread");
        }
    }
}

/// Builds the TLS server configuration: certificate chain and key (PEM), and the CA that
/// client certificates must chain to (mutual TLS, mandatory: for a launched workload the
/// CA of its launch, so no other launch's client — nor the operator's — is served).
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |what: &str, e: rustls::pki_types::pem::Error| Error::Config(format!("{what}: {e}"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem("TLS certificate", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem("TLS certificate", e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem("TLS key", e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let ca = client_ca;
    let builder = {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem("client CA", e))? {
            roots
                .add(c.map_err(|e| pem("client CA", e))?)
                .map_err(|e| Error::Config(format!("client CA: {e}")))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Config(format!("client CA: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    };
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| Error::Config(format!("TLS certificate/key: {e}")))?;
    Ok(Arc::new(cfg))
}

/// Serves TLS connections on a TCP listener forever.
pub fn serve_tls(domain: Arc<Domain>, listener: TcpListener, cfg: Arc<rustls::ServerConfig>) {
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let _ = tcp.set_nodelay(true);
        let (d, cfg) = (domain.clone(), cfg.clone());
        let spawned = std::thread::Builder::new()
            .name("vsm-tls".into())
            .spawn(move || {
                let peer = tcp
                    .peer_addr()
                    .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
                match tls_handshake(cfg, tcp) {
                    Ok(mut s) => serve_stream(&d, &mut s),
                    // No certificate, or one of another launch's CA: refused and audited.
                    Err(why) => d.refuse_peer("tls", &format!("{peer}: {why}")),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start connection thread");
        }
    }
}

/// Time a TCP client has for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the TLS handshake to completion (the client's certificate is verified here), so a
/// refused client is known — and audited — before any frame is read.
fn tls_handshake(
    cfg: Arc<rustls::ServerConfig>,
    mut tcp: std::net::TcpStream,
) -> Result<rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>, String> {
    let mut conn = rustls::ServerConnection::new(cfg).map_err(|e| e.to_string())?;
    let _ = tcp.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(TLS_HANDSHAKE_TIMEOUT));
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
    }
    if conn.peer_certificates().is_none_or(<[_]>::is_empty) {
        return Err("TLS client presented no certificate".into());
    }
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Answers kept back while more requests are buffered are written once they reach this
/// size (or no request is left).
const MAX_BATCH: usize = 64 * 1024;

/// Serves one established stream (any transport) until it closes. Requests are answered in
/// order; while further complete requests are already buffered (a module pipelining the
/// calls of several threads), the answers are collected and written together, so a batch of
/// N requests costs one read and one write.
fn serve_stream<S: Read + Write + Queued>(domain: &Domain, stream: &mut S) {
    let app = match read_message::<_, Request>(stream) {
        Ok(Request::Hello { version, app })
            if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
        {
            app
        }
        Ok(_) | Err(_) => {
            let _ = write_message(stream, &Response::rv(CKR_GENERAL_ERROR));
            return;
        }
    };
    let app = domain.attach(app);
    if write_message(stream, &Response::ok(caas_vsm_proto::Body::Empty {})).is_ok()
        && let Some(mut ring) = serve_requests(domain, &app, stream)
    {
        // The rest of the connection runs over the shared-memory ring.
        let _ = serve_requests(domain, &app, &mut ring);
        if let Some(v) = ring.violation() {
            domain.ring_violation(&app, v.0);
        }
    }
    domain.detach(&app);
}

/// Answers the requests of `stream` until it closes, or until the module moves the
/// connection onto a shared-memory ring (returned; the answers so far are written first).
/// Requests are answered in order; while further complete requests are already buffered,
/// the answers are collected and written together.
fn serve_requests<S: Read + Write + Queued>(
    domain: &Domain,
    app: &std::sync::Arc<crate::domain::App>,
    stream: &mut S,
) -> Option<RingStream> {
    let mut out = Vec::with_capacity(MAX_BATCH);
    // Answers in `out`.
    let mut pending = 0usize;
    let budget = spin_budget();
    let mut spin = !budget.is_zero();
    let _awake = Awake::new();
    let mut ring = None;
    loop {
        // Spin only while the client's requests follow each other within the bound
        // (a client signing in a loop); an idle or slow client is waited for asleep,
        // until a request again comes within the bound.
        let idle_since = Instant::now();
        // Only when no other connection thread is awake: with several busy connections
        // (many client threads) a spinning thread takes the CPU the others sign on.
        if spin && AWAKE.load(Ordering::Relaxed) <= 1 {
            stream.spin_for_request(budget);
        }
        let read = {
            let _asleep = Asleep::new();
            read_message(stream)
        };
        let req: Request = match read {
            Ok(r) => {
                spin = idle_since.elapsed() < budget;
                r
            }
            Err(IoError::Io(_)) => break,
            Err(IoError::Protocol(e)) => {
                tracing::warn!(error = %e, "malformed request; closing connection");
                break;
            }
        };
        tracing::trace!(?req, "request");
        if matches!(req, Request::RingOpen {}) {
            // Earlier answers go out on this transport before it is left.
            if !out.is_empty() {
                if stream.write_all(&out).is_err() || stream.flush().is_err() {
                    return None;
                }
                stream.answers_written(pending);
                pending = 0;
                out.clear();
            }
            match stream.open_ring() {
                Ok(r) => {
                    ring = Some(r);
                    break;
                }
                Err(rv) => {
                    if frame_message_into(&Response::rv(rv), &mut out).is_err() {
                        break;
                    }
                    pending += 1;
                }
            }
        } else {
            let resp = domain.handle(app, req);
            tracing::trace!(rv = resp.rv, "response");
            if frame_message_into(&resp, &mut out).is_err() {
                break;
            }
            pending += 1;
        }
        if out.len() >= MAX_BATCH || !stream.request_queued() {
            if stream.write_all(&out).is_err() || stream.flush().is_err() {
                break;
            }
            stream.answers_written(pending);
            pending = 0;
            out.clear();
            // One large answer does not keep its buffer for the connection's lifetime.
            out.shrink_to(MAX_BATCH);
        }
    }
    // Answers still held back (the connection ends on a malformed frame that followed
    // them) go out before it closes.
    if !out.is_empty() && stream.write_all(&out).and_then(|()| stream.flush()).is_ok() {
        stream.answers_written(pending);
    }
    ring
}
