//! The module's side of the connection to the crypto domain: configuration and a pool of
//! connections (UNIX socket, vsock, TCP with TLS, or a VM's virtio-serial port). A call takes an idle connection (or opens one), sends one request,
//! reads one response and puts the connection back; the pool lock is held only to pop and
//! push, so calls from many threads run concurrently on separate connections. On the UNIX
//! socket the fused single-part operations instead share a few pipelined connections (one
//! per CPU, `mux.rs`): the requests of several threads leave in one write and their
//! answers come back in one read. A transport
//! failure drops that connection and yields CKR_DEVICE_ERROR (CKR_DEVICE_REMOVED when the
//! domain cannot be reached at all); nothing here can crash the host process.
//!
//! The virtio-serial transport (`CAAS_PKCS11_SOCKET=virtio:/dev/virtio-ports/caas.vsm`, or
//! `virtio = "..."` in the config file) is a VM's character device that the host's qemu
//! connects to the crypto domain's socket. Its limits (see
//! [`caas_vsm_proto::serial`]): one process of the VM at a time can open the port (another
//! gets CKR_DEVICE_REMOVED while it is held), calls of this process are serialised on the
//! one connection, and the crypto domain sees every process of the VM as one application
//! (sessions and login state outlive the process until the VM stops).

use crate::Error;
use crate::mux::Pipe;
use crate::ops::Ops;
use caas_vsm_proto::blocking::{IoError, read_message};
use caas_vsm_proto::serial::SerialPort;
use caas_vsm_proto::{PROTOCOL_VERSION, Request, Response, frame_message, ring};
use cryptoki_sys::{CK_RV, CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_GENERAL_ERROR};
use nix::sys::socket::{MsgFlags, send};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Raw config file (`CAAS_PKCS11_CONFIG`, TOML).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// UNIX socket of the crypto domain.
    socket: Option<PathBuf>,
    /// vsock address of the crypto domain, "CID:PORT".
    vsock: Option<String>,
    /// TCP address (HOST:PORT) of a crypto domain serving TLS.
    tcp: Option<String>,
    /// A virtio-serial port inside a VM (`/dev/virtio-ports/caas.vsm`).
    virtio: Option<PathBuf>,
    /// CA certificate(s) (PEM) the domain's TLS certificate must chain to.
    tls_ca: Option<PathBuf>,
    /// Name to verify in the domain's certificate (default: the host part of `tcp`).
    tls_server_name: Option<String>,
    /// Client certificate chain (PEM) for mutual TLS.
    tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    tls_client_key: Option<PathBuf>,
    /// Seconds to wait for one answer (default 300).
    timeout_secs: Option<u64>,
}

/// How to reach the crypto domain.
#[derive(Debug, Clone)]
pub enum Transport {
    /// A UNIX socket.
    Unix(PathBuf),
    /// vsock (AF_VSOCK): a crypto domain on the VM's host or in another VM.
    Vsock {
        /// Context id of the domain's VM (2 = the host).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A virtio-serial port (character device) inside a VM, connected by the host's qemu
    /// to the crypto domain's socket.
    Virtio(PathBuf),
    /// TCP with TLS.
    Tls {
        /// HOST:PORT.
        addr: String,
        /// Name checked against the server certificate.
        server_name: rustls::pki_types::ServerName<'static>,
        /// Client configuration (roots, optional client certificate).
        config: Arc<rustls::ClientConfig>,
    },
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the crypto domain is.
    pub transport: Transport,
    /// Read timeout per call.
    pub timeout: Duration,
}

impl Config {
    /// From the environment: CAAS_PKCS11_SOCKET (a UNIX socket path, `vsock:CID:PORT` or
    /// `virtio:PATH`) wins over CAAS_PKCS11_CONFIG.
    pub fn from_env() -> Result<Self, Error> {
        if let Some(s) = std::env::var_os("CAAS_PKCS11_SOCKET") {
            let text = s.to_str();
            let transport = if let Some(addr) = text.and_then(|t| t.strip_prefix("vsock:")) {
                parse_vsock(addr).map_err(|reason| Error::Parse {
                    path: "CAAS_PKCS11_SOCKET".into(),
                    reason,
                })?
            } else if let Some(port) = text.and_then(|t| t.strip_prefix("virtio:")) {
                Transport::Virtio(PathBuf::from(port))
            } else {
                Transport::Unix(PathBuf::from(s))
            };
            return Ok(Self {
                transport,
                timeout: Duration::from_secs(300),
            });
        }
        let path = std::env::var("CAAS_PKCS11_CONFIG").map_err(|_| Error::NotConfigured)?;
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_raw(raw, &path)
    }

    pub(crate) fn from_raw(raw: RawConfig, path: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::Parse {
            path: path.to_string(),
            reason,
        };
        let transport = match (raw.socket, raw.tcp, raw.vsock, raw.virtio) {
            (Some(s), None, None, None) => Transport::Unix(s),
            (None, None, Some(v), None) => parse_vsock(&v).map_err(bad)?,
            (None, None, None, Some(p)) => Transport::Virtio(p),
            (None, Some(addr), None, None) => {
                let ca = raw
                    .tls_ca
                    .ok_or_else(|| bad("`tcp` needs `tls_ca`".into()))?;
                let name = match raw.tls_server_name {
                    Some(n) => n,
                    None => addr
                        .rsplit_once(':')
                        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                        .ok_or_else(|| bad("`tcp` must be HOST:PORT".into()))?,
                };
                let server_name = rustls::pki_types::ServerName::try_from(name)
                    .map_err(|e| bad(format!("tls_server_name: {e}")))?;
                let config = tls_client_config(&ca, raw.tls_client_cert.zip(raw.tls_client_key))
                    .map_err(bad)?;
                Transport::Tls {
                    addr,
                    server_name,
                    config,
                }
            }
            _ => {
                return Err(bad(
                    "give exactly one of `socket`, `vsock`, `virtio` and `tcp`".into(),
                ));
            }
        };
        Ok(Self {
            transport,
            timeout: Duration::from_secs(raw.timeout_secs.unwrap_or(300)),
        })
    }
}

/// Parses "CID:PORT" (decimal u32s).
fn parse_vsock(addr: &str) -> Result<Transport, String> {
    let bad = || format!("bad vsock address {addr:?}: expected vsock:CID:PORT (decimal numbers)");
    let (cid, port) = addr.split_once(':').ok_or_else(bad)?;
    Ok(Transport::Vsock {
        cid: cid.parse().map_err(|_| bad())?,
        port: port.parse().map_err(|_| bad())?,
    })
}

/// A connected vsock stream (safe wrappers of nix; writes never raise SIGPIPE).
#[derive(Debug)]
struct Vsock(std::os::fd::OwnedFd);

impl Vsock {
    fn connect(cid: u32, port: u32, timeout: Duration) -> Result<Self, CK_RV> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|_| CKR_DEVICE_REMOVED)?;
        // Linux gives up an unanswered vsock connect after 2 s (ETIMEDOUT).
        loop {
            match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
                Ok(()) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return Err(CKR_DEVICE_REMOVED),
            }
        }
        let tv = nix::sys::time::TimeVal::new(
            i64::try_from(timeout.as_secs().min(86_400)).unwrap_or(0),
            0,
        );
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|_| CKR_DEVICE_ERROR)?;
        Ok(Self(fd))
    }

    fn try_clone(&self) -> Result<Self, CK_RV> {
        Ok(Self(self.0.try_clone().map_err(|_| CKR_DEVICE_ERROR)?))
    }
}

impl std::io::Read for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match nix::sys::socket::recv(self.0.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn tls_client_config(
    ca: &std::path::Path,
    client: Option<(PathBuf, PathBuf)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("tls_ca: {e}"))? {
        roots
            .add(c.map_err(|e| format!("tls_ca: {e}"))?)
            .map_err(|e| format!("tls_ca: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(&cert)
                .map_err(|e| format!("tls_client_cert: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls_client_cert: {e}"))?;
            let key =
                PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("tls_client_key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A TCP stream whose writes never raise SIGPIPE in the host process.
#[derive(Debug)]
struct NoSigPipe(std::net::TcpStream);

impl std::io::Read for NoSigPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for NoSigPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match send(self.0.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(std::io::Error::from(e)),
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One pooled connection.
#[derive(Debug)]
enum Conn {
    /// UNIX socket: the stream (for writes) and a buffered reader over a clone of it.
    Unix {
        stream: UnixStream,
        reader: std::io::BufReader<UnixStream>,
    },
    /// vsock: the stream (for writes) and a buffered reader over a duplicate of it.
    Vsock {
        stream: Vsock,
        reader: std::io::BufReader<Vsock>,
    },
    /// TLS over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, NoSigPipe>>),
    /// A virtio-serial port: the port (for writes) and a buffered reader over a duplicate.
    Virtio {
        port: SerialPort,
        reader: std::io::BufReader<SerialPort>,
    },
}

/// The connection pool of one C_Initialize.
#[derive(Debug)]
pub struct Client {
    cfg: Config,
    app: [u8; 16],
    idle: Mutex<Vec<Conn>>,
    pid: u32,
    /// The process's fork generation when the pool was made (`None`: compare `pid`).
    forks: Option<u64>,
    /// The domain refused protocol v2: speak v1 (no fused single-part operations).
    v1_only: AtomicBool,
    /// The domain offers no shared-memory ring: pipes stay on the socket.
    no_ring: AtomicBool,
    /// Per-session operation state for the single-round-trip operations.
    pub(crate) ops: Ops,
    /// Held for a whole call on the virtio-serial transport (one connection only).
    serial: Mutex<()>,
    /// Pipelined connections for the single-part operations on the UNIX socket
    /// ([`crate::mux`]); each calling thread keeps to one of them.
    pipes: Vec<Mutex<Option<Arc<Pipe>>>>,
}

/// Pipes per client: one per CPU (the domain serves each connection on one thread), at
/// most [`MAX_PIPES`].
fn pipe_count() -> usize {
    std::env::var("CAAS_PKCS11_PIPES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
        .clamp(1, MAX_PIPES)
}

/// The most pipes a client opens.
const MAX_PIPES: usize = 8;

/// Which pipe the calling thread uses (threads are spread over the pipes in turn).
fn pipe_index(n: usize) -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static MINE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }
    let i = MINE.with(|c| {
        *c.get().get_or_insert_with(|| {
            let i = NEXT.fetch_add(1, Ordering::Relaxed);
            c.set(Some(i));
            i
        })
    });
    i % n.max(1)
}

/// Whether pipes ask for a shared-memory ring (`CAAS_PKCS11_RING=0` keeps them on the
/// socket).
fn ring_wanted() -> bool {
    static W: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *W.get_or_init(|| std::env::var("CAAS_PKCS11_RING").map_or(true, |v| v != "0"))
}

/// The fused single-part requests: short, and the hot path of a signing workload.
fn pipelined(req: &Request) -> bool {
    matches!(
        req,
        Request::SignOnce { .. }
            | Request::VerifyOnce { .. }
            | Request::EncryptOnce { .. }
            | Request::DecryptOnce { .. }
    )
}

fn send_all(s: &impl AsRawFd, mut buf: &[u8]) -> Result<(), CK_RV> {
    while !buf.is_empty() {
        // MSG_NOSIGNAL: a dead peer must give EPIPE, not kill the host process with SIGPIPE.
        match send(s.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(CKR_DEVICE_ERROR),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Err(CKR_DEVICE_ERROR),
        }
    }
    Ok(())
}

fn exchange(c: &mut Conn, req: &Request) -> Result<Response, CK_RV> {
    let frame = frame_message(req).map_err(|_| cryptoki_sys::CKR_DATA_LEN_RANGE)?;
    let read = match c {
        Conn::Unix { stream, reader } => {
            send_all(stream, &frame)?;
            read_message::<_, Response>(reader)
        }
        Conn::Vsock { stream, reader } => {
            send_all(&stream.0, &frame)?;
            read_message::<_, Response>(reader)
        }
        Conn::Virtio { port, reader } => {
            std::io::Write::write_all(port, &frame).map_err(|_| CKR_DEVICE_ERROR)?;
            read_message::<_, Response>(reader)
        }
        Conn::Tls(s) => {
            std::io::Write::write_all(s.as_mut(), &frame).map_err(|_| CKR_DEVICE_ERROR)?;
            std::io::Write::flush(s.as_mut()).map_err(|_| CKR_DEVICE_ERROR)?;
            read_message::<_, Response>(s.as_mut())
        }
    };
    match read {
        Ok(r) => Ok(r),
        Err(IoError::Io(_)) => Err(CKR_DEVICE_ERROR),
        Err(IoError::Protocol(_)) => Err(CKR_DEVICE_ERROR),
    }
}

impl Client {
    /// A pool for `cfg` with a fresh application id.
    pub fn new(cfg: Config) -> Result<Self, CK_RV> {
        // The application id only needs to be unique, not secret; the module links no
        // crypto library, so it comes straight from the kernel.
        let mut app = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|_| CKR_GENERAL_ERROR)?,
            &mut app,
        )
        .map_err(|_| CKR_GENERAL_ERROR)?;
        Ok(Self {
            cfg,
            app,
            idle: Mutex::new(Vec::new()),
            pid: std::process::id(),
            forks: crate::ffi::fork_generation(),
            v1_only: AtomicBool::new(false),
            no_ring: AtomicBool::new(false),
            ops: Ops::default(),
            serial: Mutex::new(()),
            pipes: (0..pipe_count()).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// The calling thread's pipe, opened (again) when there is none or it broke.
    fn pipe(&self) -> Result<Arc<Pipe>, CK_RV> {
        let slot = self
            .pipes
            .get(pipe_index(self.pipes.len()))
            .ok_or(CKR_GENERAL_ERROR)?;
        let mut p = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pipe) = p.as_ref().filter(|x| !x.is_broken()) {
            return Ok(pipe.clone());
        }
        *p = None;
        let Conn::Unix { stream, reader } = self.connect()? else {
            return Err(CKR_GENERAL_ERROR);
        };
        let pipe = if ring_wanted() && !self.no_ring.load(Ordering::Relaxed) {
            match self.open_ring(&stream, reader.buffer().is_empty()) {
                Ok(Some((rx, tx))) => Pipe::new_ring(stream, rx, tx, self.cfg.timeout),
                // Refused (answered on the socket): stay on it.
                Ok(None) => {
                    self.no_ring.store(true, Ordering::Relaxed);
                    Pipe::new(stream, reader)
                }
                // A crypto domain that predates the ring drops the connection: a new one
                // stays on the socket, for good.
                Err(_) => {
                    self.no_ring.store(true, Ordering::Relaxed);
                    let Conn::Unix { stream, reader } = self.connect()? else {
                        return Err(CKR_GENERAL_ERROR);
                    };
                    Pipe::new(stream, reader)
                }
            }
        } else {
            Pipe::new(stream, reader)
        };
        let pipe = Arc::new(pipe);
        *p = Some(pipe.clone());
        Ok(pipe)
    }

    /// Asks the domain to move a fresh connection onto a shared-memory ring
    /// ([`caas_vsm_proto::ring`]). `Ok(None)`: the domain refused (the connection stays
    /// usable on the socket); `Err`: the connection is unusable.
    #[allow(clippy::type_complexity)]
    fn open_ring(
        &self,
        stream: &UnixStream,
        nothing_buffered: bool,
    ) -> Result<Option<(ring::Rx<UnixStream>, ring::Tx<UnixStream>)>, CK_RV> {
        if !nothing_buffered {
            return Err(CKR_DEVICE_ERROR);
        }
        send_all(
            stream,
            &frame_message(&Request::RingOpen {}).map_err(|_| CKR_GENERAL_ERROR)?,
        )?;
        // The answer comes with the memfd attached: read it with recvmsg, not through the
        // buffered reader (which would drop the descriptor).
        let mut buf = [0u8; 256];
        let mut have = 0;
        let mut fd = None;
        let len = loop {
            let (n, f) =
                ring::recv_with_fd(stream, &mut buf[have..]).map_err(|_| CKR_DEVICE_ERROR)?;
            if n == 0 {
                return Err(CKR_DEVICE_ERROR);
            }
            have += n;
            fd = fd.or(f);
            if let Some(h) = buf.first_chunk::<4>().filter(|_| have >= 4) {
                let len = caas_vsm_proto::frame_len(*h).map_err(|_| CKR_DEVICE_ERROR)?;
                if len > buf.len() - 4 {
                    return Err(CKR_DEVICE_ERROR);
                }
                if have >= 4 + len {
                    break len;
                }
            }
        };
        if have != 4 + len {
            // Nothing else may follow the answer.
            return Err(CKR_DEVICE_ERROR);
        }
        let r: Response =
            caas_vsm_proto::from_bytes(&buf[4..4 + len]).map_err(|_| CKR_DEVICE_ERROR)?;
        if r.rv != 0 {
            return Ok(None);
        }
        let fd = fd.ok_or(CKR_DEVICE_ERROR)?;
        let map = ring::attach(&fd).map_err(|_| CKR_DEVICE_ERROR)?;
        drop(fd);
        let (Ok(a), Ok(b)) = (stream.try_clone(), stream.try_clone()) else {
            return Err(CKR_DEVICE_ERROR);
        };
        Ok(Some(ring::endpoints(
            map,
            ring::Side::Client,
            a,
            b,
            Some(self.cfg.timeout),
        )))
    }

    /// Whether the domain serves the fused single-part requests (protocol v2).
    #[must_use]
    pub fn fused(&self) -> bool {
        !self.v1_only.load(Ordering::Relaxed)
    }

    fn connect(&self) -> Result<Conn, CK_RV> {
        if !self.fused() {
            return self.connect_with(1)?.map_err(|()| CKR_DEVICE_ERROR);
        }
        match self.connect_with(PROTOCOL_VERSION)? {
            Ok(c) => Ok(c),
            // An older crypto domain refuses the version: fall back to v1 for good.
            Err(()) => {
                self.v1_only.store(true, Ordering::Relaxed);
                self.connect_with(1)?.map_err(|()| CKR_DEVICE_ERROR)
            }
        }
    }

    /// Connects and says hello; `Ok(Err(()))` when the domain refuses the hello.
    fn connect_with(&self, version: u32) -> Result<Result<Conn, ()>, CK_RV> {
        let mut s = match &self.cfg.transport {
            Transport::Unix(path) => {
                let s = UnixStream::connect(path).map_err(|_| CKR_DEVICE_REMOVED)?;
                s.set_read_timeout(Some(self.cfg.timeout))
                    .map_err(|_| CKR_DEVICE_ERROR)?;
                let reader = std::io::BufReader::with_capacity(
                    64 * 1024,
                    s.try_clone().map_err(|_| CKR_DEVICE_ERROR)?,
                );
                Conn::Unix { stream: s, reader }
            }
            Transport::Vsock { cid, port } => {
                let s = Vsock::connect(*cid, *port, self.cfg.timeout)?;
                let reader = std::io::BufReader::with_capacity(64 * 1024, s.try_clone()?);
                Conn::Vsock { stream: s, reader }
            }
            Transport::Virtio(path) => {
                // EBUSY (another process holds the port) and a missing port alike: the
                // domain cannot be reached now.
                let port = SerialPort::open(path, Some(self.cfg.timeout))
                    .map_err(|_| CKR_DEVICE_REMOVED)?;
                let reader = std::io::BufReader::with_capacity(
                    64 * 1024,
                    port.try_clone().map_err(|_| CKR_DEVICE_ERROR)?,
                );
                Conn::Virtio { port, reader }
            }
            Transport::Tls {
                addr,
                server_name,
                config,
            } => {
                let tcp = std::net::TcpStream::connect(addr).map_err(|_| CKR_DEVICE_REMOVED)?;
                tcp.set_read_timeout(Some(self.cfg.timeout))
                    .map_err(|_| CKR_DEVICE_ERROR)?;
                let _ = tcp.set_nodelay(true);
                let tls = rustls::ClientConnection::new(config.clone(), server_name.clone())
                    .map_err(|_| CKR_DEVICE_ERROR)?;
                Conn::Tls(Box::new(rustls::StreamOwned::new(tls, NoSigPipe(tcp))))
            }
        };
        let r = exchange(
            &mut s,
            &Request::Hello {
                version,
                app: self.app,
            },
        )?;
        if r.rv != 0 {
            return Ok(Err(()));
        }
        Ok(Ok(s))
    }

    /// Opens one connection up front so the domain sees this application.
    pub fn warm_up(&self) {
        if let Ok(s) = self.connect() {
            self.put_back(s);
        }
    }

    fn put_back(&self, s: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s);
    }

    /// Whether this pool was created by the current process (a forked child must call
    /// C_Initialize itself and never share the parent's connections).
    /// A fork bumps the process's fork generation in the child (a `pthread_atfork` handler),
    /// so this costs an atomic load rather than a `getpid` per call; without the handler it
    /// compares process ids.
    #[must_use]
    pub fn owned_by_this_process(&self) -> bool {
        match self.forks {
            Some(g) => crate::ffi::fork_generation() == Some(g),
            None => self.pid == std::process::id(),
        }
    }

    /// Sends one request and returns the response.
    pub fn call(&self, req: &Request) -> Result<Response, CK_RV> {
        if !self.owned_by_this_process() {
            return Err(cryptoki_sys::CKR_CRYPTOKI_NOT_INITIALIZED);
        }
        // One connection on a serial port: the whole call holds it.
        let _serial = matches!(self.cfg.transport, Transport::Virtio(_)).then(|| {
            self.serial
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        if pipelined(req) && matches!(self.cfg.transport, Transport::Unix(_)) {
            let r = self.pipe().and_then(|p| p.call(req));
            if let Err(CKR_DEVICE_ERROR | CKR_DEVICE_REMOVED) = r {
                self.transport_failed();
            }
            return r;
        }
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let r = match pooled {
            Some(s) => Ok(s),
            None => self.connect(),
        }
        .and_then(|mut s| {
            let r = exchange(&mut s, req)?;
            self.put_back(s);
            Ok(r)
        });
        if let Err(CKR_DEVICE_ERROR | CKR_DEVICE_REMOVED) = r {
            self.transport_failed();
        }
        r
    }

    /// After a transport failure the domain may have restarted: nothing validated before
    /// can be trusted, and every other connection (idle in the pool, or a pipe) is likely
    /// dead too, so they are all dropped rather than each failing one more call.
    fn transport_failed(&self) {
        self.ops.invalidate();
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for p in &self.pipes {
            *p.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    /// [`Client::call`] as the (CK_RV, body) pair the operation layer works with.
    pub(crate) fn rv_body(&self, req: &Request) -> Result<(CK_RV, caas_vsm_proto::Body), CK_RV> {
        self.call(req).map(|r| (r.rv, r.body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing port, or a path that is no character device (a planted regular file), is
    /// CKR_DEVICE_REMOVED: the module never writes frames into a file.
    #[test]
    fn virtio_transport_refuses_what_is_not_a_port() {
        let file = std::env::temp_dir().join(format!("caas-pkcs11-port-{}", std::process::id()));
        let _ = std::fs::write(&file, b"");
        for path in [PathBuf::from("/nonexistent/caas.vsm"), file.clone()] {
            let c = Client::new(Config {
                transport: Transport::Virtio(path.clone()),
                timeout: Duration::from_millis(100),
            });
            let r = c.map(|c| {
                c.call(&Request::GetSlotList {
                    token_present: true,
                })
                .map(|_| ())
            });
            assert!(matches!(r, Ok(Err(CKR_DEVICE_REMOVED))), "{path:?}: {r:?}");
        }
        assert_eq!(std::fs::read(&file).map(|b| b.len()).ok(), Some(0));
        let _ = std::fs::remove_file(&file);
    }

    /// A crypto domain that predates the shared-memory ring drops a connection that asks
    /// for one (an unknown request is a malformed frame to it): the module opens a new
    /// connection, stays on the socket for good, and the call succeeds.
    #[test]
    fn a_domain_without_the_ring_leaves_the_pipes_on_the_socket() {
        use caas_vsm_proto::{Body, frame_message};
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("caas-pkcs11-noring-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        let old_domain = std::thread::spawn(move || {
            let mut ring_asked = 0;
            for conn in l.incoming().take(2) {
                let Ok(mut s) = conn else { return ring_asked };
                loop {
                    let Ok(req) = read_message::<_, Request>(&mut s) else {
                        break;
                    };
                    let answer = match req {
                        Request::Hello { .. } => Response::ok(Body::Empty {}),
                        Request::RingOpen {} => {
                            ring_asked += 1;
                            break;
                        }
                        Request::SignOnce { .. } => Response::ok(Body::Data {
                            data: caas_vsm_proto::Blob(vec![7; 64]),
                        }),
                        _ => Response::rv(cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED),
                    };
                    let Ok(f) = frame_message(&answer) else { break };
                    if s.write_all(&f).is_err() {
                        break;
                    }
                }
            }
            ring_asked
        });
        let c = Client::new(Config {
            transport: Transport::Unix(path.clone()),
            timeout: Duration::from_secs(10),
        })
        .unwrap_or_else(|e| panic!("{e:#x}"));
        for _ in 0..3 {
            let r = c.call(&Request::SignOnce {
                session: 1,
                mechanism: caas_vsm_proto::Mechanism {
                    mechanism: cryptoki_sys::CKM_ECDSA,
                    param: caas_vsm_proto::MechParam::None {},
                },
                key: 2,
                data: caas_vsm_proto::Blob(vec![1; 32]),
            });
            assert!(
                matches!(&r, Ok(Response { rv: 0, body: Body::Data { data } }) if data.0 == [7; 64]),
                "{r:?}"
            );
        }
        assert!(c.no_ring.load(Ordering::Relaxed));
        drop(c);
        assert_eq!(
            old_domain.join().ok(),
            Some(1),
            "the ring is asked for once"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn example_config_parses_and_unknown_keys_are_refused() {
        let raw: Result<RawConfig, _> = toml::from_str(include_str!("../caas-pkcs11.toml.example"));
        assert!(raw.is_ok(), "{raw:?}");
        if let Ok(raw) = raw {
            assert!(Config::from_raw(raw, "example").is_ok());
        }
        let both: Result<RawConfig, _> = toml::from_str("socket = \"/x\"\ntcp = \"h:1\"\n");
        assert!(both.is_ok_and(|r| Config::from_raw(r, "t").is_err()));
        let no_ca: Result<RawConfig, _> = toml::from_str("tcp = \"h:1\"\n");
        assert!(no_ca.is_ok_and(|r| Config::from_raw(r, "t").is_err()));
        let v: Result<RawConfig, _> = toml::from_str("vsock = \"2:5000\"\n");
        assert!(v.is_ok_and(|r| matches!(
            Config::from_raw(r, "t").map(|c| c.transport),
            Ok(Transport::Vsock { cid: 2, port: 5000 })
        )));
        for bad in [
            "vsock = \"2\"\n",
            "vsock = \"x:1\"\n",
            "vsock = \"2:1\"\nsocket = \"/x\"\n",
            "virtio = \"/dev/virtio-ports/caas.vsm\"\nsocket = \"/x\"\n",
        ] {
            let r: Result<RawConfig, _> = toml::from_str(bad);
            assert!(r.is_ok_and(|r| Config::from_raw(r, "t").is_err()), "{bad}");
        }
        let v: Result<RawConfig, _> = toml::from_str("virtio = \"/dev/virtio-ports/caas.vsm\"\n");
        assert!(v.is_ok_and(|r| matches!(
            Config::from_raw(r, "t").map(|c| c.transport),
            Ok(Transport::Virtio(p)) if p == std::path::Path::new("/dev/virtio-ports/caas.vsm")
        )));
        let bad: Result<RawConfig, _> = toml::from_str("socket = \"/x\"\nsokcet = 1\n");
        assert!(bad.is_err());
    }
}
