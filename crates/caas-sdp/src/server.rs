//! The NBD server: listeners (UNIX socket, TCP, vsock), the fixed-newstyle handshake and the
//! transmission loop. Each connection parses requests sequentially and runs them as
//! concurrent tasks (bounded per connection), so crypto runs in parallel across requests
//! and connections, replies go out in completion order, and a client that stops reading
//! its replies only blocks its own connection.
//!
//! Who may connect is checked on accept, before the greeting ([`PeerPolicy`]): a UNIX-socket
//! peer's kernel credentials (SO_PEERCRED) must name the proxy's own uid (the workload's
//! identity when the host agent launched it) or an allowed uid; a vsock peer must have the
//! workload VM's CID. A refused connection is closed at once, logged with the reason and
//! counted.
//!
//! TLS (NBD_OPT_STARTTLS) is always mutual: a client must present a certificate of the
//! configured client CA (`--tls-client-ca`; for a launched workload, the CA of its own
//! launch), and TLS is then required. The option haggling starts in the clear, the client
//! asks for STARTTLS, both sides run a TLS 1.3 handshake (rustls, aws-lc-rs) over the same
//! connection and option haggling continues encrypted; every option except STARTTLS and
//! ABORT is refused with NBD_REP_ERR_TLS_REQD before TLS. A client refused in the
//! handshake is logged with the reason and counted.
use crate::Error;
use crate::engine::Backend;
use crate::engine::PoolBuf;
use caas_nbd::handshake::{self as hs, ClientOption, OptionReply};
use caas_nbd::transmission::{self as tx, Command, ExportLimits, Request, cmdflags};
use caas_nbd::{opt, rep, tflags};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export's name (the empty name also selects it).
    pub export_name: String,
    /// Human-readable description sent with NBD_INFO_DESCRIPTION.
    pub description: String,
    /// Largest READ/WRITE payload.
    pub max_payload: u32,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Time allowed for the handshake (option haggling and the TLS handshake).
    pub handshake_timeout: Duration,
    /// TLS (NBD_OPT_STARTTLS); `None` refuses STARTTLS with NBD_REP_ERR_POLICY.
    pub tls: Option<TlsSettings>,
    /// Who may connect.
    pub peers: PeerPolicy,
}

/// Who may connect to the proxy (one policy for every crypto-domain listener).
pub use caas_crypto::peer::PeerPolicy;

/// Why a peer is refused, or `None` when it may connect.
fn refusal(p: &PeerPolicy, conn: &Conn) -> Option<String> {
    match conn {
        Conn::Unix(s) => p.unix_refusal(s),
        Conn::Vsock(_, cid) => p.vsock_refusal(*cid),
        // TCP clients authenticate inside TLS (a client certificate is mandatory).
        Conn::Tcp(_) => None,
    }
}

/// TLS settings of the server.
#[derive(Clone)]
pub struct TlsSettings {
    /// The TLS 1.3 acceptor.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Refuse every option except STARTTLS and ABORT before TLS (NBD_REP_ERR_TLS_REQD).
    pub required: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1) from
    /// files and builds a TLS 1.3-only server configuration with mutual TLS: a client must
    /// present a certificate chaining to `client_ca` (PEM) or its handshake fails (for a
    /// launched workload: the CA of its launch, so no other launch's client is served).
    /// TLS is then required (a client certificate is only asked for inside TLS, so a
    /// client staying in the clear would skip authentication). Error messages name the
    /// file but never include key material.
    pub fn from_pem_files(cert: &Path, key: &Path, client_ca: &Path) -> Result<Self, Error> {
        use rustls::pki_types::pem::{self, PemObject};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pem_err = |what: &str, path: &Path, e: pem::Error| {
            let why = match e {
                pem::Error::Io(e) => e.to_string(),
                pem::Error::NoItemsFound => "no PEM item of the expected type".to_string(),
                // Other PEM errors may quote file contents: do not repeat them.
                _ => "malformed PEM".to_string(),
            };
            Error::Config(format!("TLS {what} {}: {why}", path.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err("certificate", cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err("certificate", cert, e))?;
        if certs.is_empty() {
            return Err(Error::Config(format!(
                "TLS certificate {}: no certificate found",
                cert.display()
            )));
        }
        let key_der =
            PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("private key", key, e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let ca = client_ca;
        let builder = {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err("client CA", ca, e))? {
                roots
                    .add(c.map_err(|e| pem_err("client CA", ca, e))?)
                    .map_err(|e| Error::Config(format!("TLS client CA {}: {e}", ca.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| Error::Config(format!("TLS client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        };
        let cfg = builder.with_single_cert(certs, key_der).map_err(|e| {
            Error::Config(format!(
                "TLS certificate {} / private key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            required: true,
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            export_name: "caas".into(),
            description: "caas encrypted volume".into(),
            max_payload: 32 << 20,
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
            peers: PeerPolicy::default(),
        }
    }
}

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A UNIX socket path (a stale socket file is replaced).
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
    /// An AF_VSOCK port on VMADDR_CID_ANY.
    Vsock(u32),
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// UNIX socket.
    Unix(tokio::net::UnixListener, PathBuf),
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// vsock.
    Vsock(crate::vsock::VsockListener),
}

impl Listener {
    /// Binds.
    pub async fn bind(listen: &Listen) -> Result<Self, Error> {
        match listen {
            Listen::Unix(p) => {
                if let Ok(md) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if md.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    }
                }
                let l = tokio::net::UnixListener::bind(p).map_err(Error::io("bind NBD socket"))?;
                Ok(Listener::Unix(l, p.clone()))
            }
            Listen::Tcp(a) => Ok(Listener::Tcp(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(Error::io("bind NBD port"))?,
            )),
            Listen::Vsock(port) => Ok(Listener::Vsock(crate::vsock::VsockListener::bind(*port)?)),
        }
    }
    /// The bound TCP address (for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) | Listener::Vsock(_) => None,
        }
    }
}

/// Serves `backend` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: Listener,
    backend: Backend,
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let cfg = Arc::new(cfg);
    tokio::pin!(shutdown);
    let mut refused: u64 = 0;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = accept(&listener) => match r.map(|c| (refusal(&cfg.peers, &c), c)) {
                Ok((Some(why), conn)) => {
                    refused += 1;
                    tracing::warn!(reason = %why, refused, "NBD connection refused");
                    drop(conn);
                }
                Ok((None, Conn::Unix(s))) => {
                    let (r, w) = s.into_split();
                    spawn_conn(r, w, backend.clone(), cfg.clone())
                }
                Ok((None, Conn::Vsock(s, _))) => {
                    spawn_conn(s.clone(), s, backend.clone(), cfg.clone())
                }
                Ok((None, Conn::Tcp(s))) => {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    spawn_conn(r, w, backend.clone(), cfg.clone())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    Vsock(crate::vsock::VsockStream, u32),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    match l {
        Listener::Unix(l, _) => Ok(Conn::Unix(l.accept().await?.0)),
        Listener::Tcp(l) => Ok(Conn::Tcp(l.accept().await?.0)),
        Listener::Vsock(l) => {
            let (s, cid) = l.accept().await?;
            Ok(Conn::Vsock(s, cid))
        }
    }
}

/// Spawns a connection handler over the two (owned, lock-free) halves of a stream.
pub fn spawn_conn<R, W>(r: R, w: W, backend: Backend, cfg: Arc<ServerConfig>)
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = handle_conn(r, w, backend, cfg).await {
            tracing::debug!(error = %e, "NBD connection ended with an error");
        }
    });
}

/// Negotiated transmission parameters.
struct Negotiated {
    structured: bool,
}

/// How an option-haggling phase ended.
enum Haggled {
    /// NBD_OPT_GO or NBD_OPT_EXPORT_NAME: transmission follows.
    Go(Negotiated),
    /// NBD_OPT_ABORT: close.
    Abort,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake follows.
    StartTls,
}

/// Where TLS stands on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// No TLS configured.
    Off,
    /// Configured, not (yet) negotiated.
    Offered { required: bool },
    /// The connection runs over TLS.
    Active,
}

fn transmission_flags(backend: &Backend, structured: bool) -> u16 {
    let mut f = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_TRIM
        | tflags::SEND_WRITE_ZEROES
        // All connections share one engine and FLUSH syncs the whole store.
        | tflags::CAN_MULTI_CONN;
    if structured {
        f |= tflags::SEND_DF;
    }
    if backend.read_only() {
        f |= tflags::READ_ONLY;
    }
    f
}

async fn greet<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
) -> Result<bool, Error> {
    w.write_all(&hs::server_greeting())
        .await
        .map_err(Error::io("send greeting"))?;
    let mut cf = [0u8; 4];
    r.read_exact(&mut cf)
        .await
        .map_err(Error::io("read client flags"))?;
    Ok(hs::parse_client_flags(cf)?)
}

/// One option-haggling phase (before TLS, or after it: options negotiated before
/// STARTTLS are forgotten).
async fn haggle<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    backend: &Backend,
    cfg: &ServerConfig,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Haggled, Error> {
    let mut structured = false;
    let mut out = Vec::with_capacity(256);
    loop {
        let mut hdr = [0u8; hs::OPTION_HEADER_LEN];
        r.read_exact(&mut hdr)
            .await
            .map_err(Error::io("read option"))?;
        let (option, len) = hs::parse_option_header(&hdr)?;
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)
            .await
            .map_err(Error::io("read option data"))?;
        out.clear();
        let name_ok = |n: &str| n.is_empty() || n == cfg.export_name;
        let mut go = false;
        let parsed = hs::parse_option(option, &data);
        if tls == (TlsState::Offered { required: true })
            && !matches!(parsed, Ok(ClientOption::StartTls | ClientOption::Abort))
        {
            if option == opt::EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: the specification says to close.
                return Err(Error::Config(
                    "NBD_OPT_EXPORT_NAME before required TLS".into(),
                ));
            }
            hs::encode_option_reply(
                option,
                &OptionReply::Error(rep::ERR_TLS_REQD, "TLS is required: use NBD_OPT_STARTTLS"),
                &mut out,
            );
            w.write_all(&out)
                .await
                .map_err(Error::io("send option reply"))?;
            continue;
        }
        match parsed {
            Err(e) => {
                if option == opt::EXPORT_NAME {
                    return Err(e.into());
                }
                hs::encode_option_reply(
                    option,
                    &OptionReply::Error(rep::ERR_INVALID, "malformed option"),
                    &mut out,
                );
            }
            Ok(ClientOption::ExportName(name)) => {
                if !name_ok(&name) {
                    return Err(Error::Config(format!("unknown export {name:?}")));
                }
                let flags = transmission_flags(backend, structured);
                hs::encode_export_name_reply(backend.size(), flags, no_zeroes, &mut out);
                go = true;
            }
            Ok(ClientOption::Abort) => {
                hs::encode_option_reply(option, &OptionReply::Ack, &mut out);
                let _ = w.write_all(&out).await;
                let _ = w.flush().await;
                return Ok(Haggled::Abort);
            }
            Ok(ClientOption::List) => {
                hs::encode_option_reply(option, &OptionReply::Server(&cfg.export_name), &mut out);
                hs::encode_option_reply(option, &OptionReply::Ack, &mut out);
            }
            Ok(ClientOption::StartTls) => match tls {
                TlsState::Off => hs::encode_option_reply(
                    option,
                    &OptionReply::Error(rep::ERR_POLICY, "TLS is not configured"),
                    &mut out,
                ),
                TlsState::Active => hs::encode_option_reply(
                    option,
                    &OptionReply::Error(rep::ERR_INVALID, "TLS is already active"),
                    &mut out,
                ),
                TlsState::Offered { .. } => {
                    hs::encode_option_reply(option, &OptionReply::Ack, &mut out);
                    w.write_all(&out)
                        .await
                        .map_err(Error::io("send option reply"))?;
                    w.flush().await.map_err(Error::io("send option reply"))?;
                    return Ok(Haggled::StartTls);
                }
            },
            Ok(ClientOption::StructuredReply) => {
                structured = true;
                hs::encode_option_reply(option, &OptionReply::Ack, &mut out);
            }
            Ok(ClientOption::Info(req) | ClientOption::Go(req)) => {
                if !name_ok(&req.name) {
                    hs::encode_option_reply(
                        option,
                        &OptionReply::Error(rep::ERR_UNKNOWN, "unknown export"),
                        &mut out,
                    );
                } else {
                    let flags = transmission_flags(backend, structured);
                    hs::encode_option_reply(
                        option,
                        &OptionReply::InfoExport {
                            size: backend.size(),
                            flags,
                        },
                        &mut out,
                    );
                    if req.requests.contains(&caas_nbd::info::NAME) {
                        hs::encode_option_reply(
                            option,
                            &OptionReply::InfoName(&cfg.export_name),
                            &mut out,
                        );
                    }
                    if req.requests.contains(&caas_nbd::info::DESCRIPTION) {
                        hs::encode_option_reply(
                            option,
                            &OptionReply::InfoDescription(&cfg.description),
                            &mut out,
                        );
                    }
                    let bs = OptionReply::InfoBlockSize {
                        min: 1,
                        preferred: 4096,
                        max: cfg.max_payload,
                    };
                    hs::encode_option_reply(option, &bs, &mut out);
                    hs::encode_option_reply(option, &OptionReply::Ack, &mut out);
                    go = option == opt::GO;
                }
            }
            Ok(ClientOption::Unsupported(_)) => {
                hs::encode_option_reply(
                    option,
                    &OptionReply::Error(rep::ERR_UNSUP, "option not supported"),
                    &mut out,
                );
            }
        }
        w.write_all(&out)
            .await
            .map_err(Error::io("send option reply"))?;
        w.flush().await.map_err(Error::io("send option reply"))?;
        if go {
            return Ok(Haggled::Go(Negotiated { structured }));
        }
    }
}

/// Room reserved in front of read data for the reply header.
const HEADROOM: usize = tx::CHUNK_HEADER_LEN + 8;
/// Largest rejected WRITE payload we read and discard instead of disconnecting.
const MAX_DRAIN: u32 = 64 << 20;

async fn handle_conn<R, W>(
    mut r: R,
    mut w: W,
    backend: Backend,
    cfg: Arc<ServerConfig>,
) -> Result<(), Error>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let deadline = tokio::time::Instant::now() + cfg.handshake_timeout;
    let timed_out = |_| Error::Config("handshake timed out".into());
    let tls = match &cfg.tls {
        None => TlsState::Off,
        Some(t) => TlsState::Offered {
            required: t.required,
        },
    };
    let phase1 = async {
        let no_zeroes = greet(&mut r, &mut w).await?;
        let h = haggle(&mut r, &mut w, &backend, &cfg, no_zeroes, tls).await?;
        Ok::<_, Error>((no_zeroes, h))
    };
    let (no_zeroes, h) = tokio::time::timeout_at(deadline, phase1)
        .await
        .map_err(timed_out)??;
    match h {
        Haggled::Abort => Ok(()),
        Haggled::Go(neg) => transmit(r, w, backend, cfg, neg).await,
        Haggled::StartTls => {
            let Some(t) = &cfg.tls else {
                return Err(Error::Config("STARTTLS without TLS settings".into()));
            };
            let acceptor = t.acceptor.clone();
            let tls_stream =
                match tokio::time::timeout_at(deadline, acceptor.accept(tokio::io::join(r, w)))
                    .await
                {
                    Ok(Ok(s)) => s,
                    // No client certificate, or one of another launch's CA.
                    Ok(Err(e)) => {
                        refuse_tls(&format!("TLS handshake failed: {e}"));
                        return Err(Error::io("TLS handshake")(e));
                    }
                    Err(e) => {
                        refuse_tls("TLS handshake timed out");
                        return Err(timed_out(e));
                    }
                };
            let (mut r, mut w) = tokio::io::split(tls_stream);
            let h = tokio::time::timeout_at(
                deadline,
                haggle(&mut r, &mut w, &backend, &cfg, no_zeroes, TlsState::Active),
            )
            .await
            .map_err(timed_out)??;
            match h {
                Haggled::Go(neg) => transmit(r, w, backend, cfg, neg).await,
                Haggled::Abort => {
                    let _ = w.shutdown().await;
                    Ok(())
                }
                Haggled::StartTls => Err(Error::Config("STARTTLS twice".into())),
            }
        }
    }
}

/// TLS clients refused so far (the handshake runs in the connection's task).
static TLS_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Logs and counts a client refused in the TLS handshake.
fn refuse_tls(why: &str) {
    let n = TLS_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    tracing::warn!(reason = %why, refused = n, "NBD connection refused");
}

/// The transmission phase.
async fn transmit<R, W>(
    r: R,
    w: W,
    backend: Backend,
    cfg: Arc<ServerConfig>,
    neg: Negotiated,
) -> Result<(), Error>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    let w = Arc::new(Mutex::new(w));
    let lim = ExportLimits {
        size: backend.size(),
        min_block: 1,
        max_payload: cfg.max_payload,
        read_only: backend.read_only(),
        structured: neg.structured,
    };
    let sem = Arc::new(Semaphore::new(cfg.max_in_flight));
    let structured = neg.structured;
    let result = loop {
        let mut hdr = [0u8; tx::REQUEST_LEN];
        if let Err(e) = r.read_exact(&mut hdr).await {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(Error::io("read request")(e))
            };
        }
        let req = match Request::parse(&hdr) {
            Ok(q) => q,
            Err(e) => break Err(e.into()),
        };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break Ok(());
        };
        if let Err(code) = req.validate(&lim) {
            let plen = req.payload_len();
            if plen > 0 {
                if plen > MAX_DRAIN {
                    break Err(Error::Config("oversized write payload".into()));
                }
                let mut sink = tokio::io::sink();
                let mut take = (&mut r).take(u64::from(plen));
                if tokio::io::copy(&mut take, &mut sink).await.is_err() {
                    break Ok(());
                }
            }
            if send_error(&w, &req, structured, code, "invalid request", None)
                .await
                .is_err()
            {
                break Ok(());
            }
            continue;
        }
        if req.command == Command::Disconnect {
            break Ok(());
        }
        let mut payload = None;
        if req.command == Command::Write {
            let payload = payload.insert(backend.pool().get(req.length as usize));
            if let Err(e) = r.read_exact(payload).await {
                break Err(Error::io("read write payload")(e));
            }
        }
        let (backend, w) = (backend.clone(), w.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = execute(&backend, &w, req, payload, structured).await;
        });
    };
    // Let requests in flight finish (NBD_CMD_DISC semantics), then close.
    let _ = sem.acquire_many(cfg.max_in_flight as u32).await;
    let _ = w.lock().await.shutdown().await;
    result
}

async fn send_error<W: AsyncWrite + Unpin>(
    w: &Mutex<W>,
    req: &Request,
    structured: bool,
    code: u32,
    msg: &str,
    offset: Option<u64>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    if structured && req.command == Command::Read {
        // An error offset must lie inside the request.
        let off = offset.map(|o| o.max(req.offset));
        tx::error_chunk(req.cookie, code, msg, off, &mut out);
    } else {
        out.extend_from_slice(&tx::simple_reply(code, req.cookie));
    }
    send_locked(w, &out).await
}

/// Writes one reply and flushes it (a TLS stream buffers ciphertext until flushed).
async fn send_locked<W: AsyncWrite + Unpin>(w: &Mutex<W>, data: &[u8]) -> std::io::Result<()> {
    let mut g = w.lock().await;
    g.write_all(data).await?;
    g.flush().await
}

async fn execute<W: AsyncWrite + Unpin>(
    backend: &Backend,
    w: &Mutex<W>,
    req: Request,
    payload: Option<PoolBuf>,
    structured: bool,
) -> std::io::Result<()> {
    let fua = req.flags & cmdflags::FUA != 0;
    tracing::trace!(command = ?req.command, flags = req.flags, offset = req.offset, length = req.length, "request");
    let res = match req.command {
        Command::Read => {
            let len = req.length as usize;
            let mut buf = backend.pool().get(HEADROOM + len);
            let res = backend.read(req.offset, &mut buf[HEADROOM..]).await;
            let out = match res {
                Ok(()) => {
                    let start = if structured {
                        buf[..HEADROOM].copy_from_slice(&tx::read_data_chunk(
                            req.cookie, req.offset, req.length,
                        ));
                        0
                    } else {
                        buf[HEADROOM - tx::SIMPLE_REPLY_LEN..HEADROOM]
                            .copy_from_slice(&tx::simple_reply(0, req.cookie));
                        HEADROOM - tx::SIMPLE_REPLY_LEN
                    };
                    send_locked(w, &buf[start..]).await
                }
                Err(e) => {
                    send_error(
                        w,
                        &req,
                        structured,
                        e.nbd_errno(),
                        "read failed",
                        e.offset(),
                    )
                    .await
                }
            };
            backend.pool().put(buf);
            return out;
        }
        Command::Write => match payload {
            Some(mut p) => {
                let r = backend.write(req.offset, &mut p, fua).await;
                backend.pool().put(p);
                r
            }
            None => Ok(()),
        },
        Command::Flush => backend.flush().await,
        Command::WriteZeroes if req.flags & cmdflags::FAST_ZERO != 0 => {
            // Zeroing costs as much as writing here (blocks are sealed), so a fast zero
            // must fail quickly, as the specification requires.
            let mut out = Vec::new();
            if structured {
                tx::error_chunk(
                    req.cookie,
                    caas_nbd::errno::ENOTSUP,
                    "fast zero not supported",
                    None,
                    &mut out,
                );
            } else {
                out.extend_from_slice(&tx::simple_reply(caas_nbd::errno::ENOTSUP, req.cookie));
            }
            return send_locked(w, &out).await;
        }
        Command::WriteZeroes if req.flags & cmdflags::FAST_ZERO != 0 => {
            // Zeroing costs as much as writing here (blocks are sealed), so a fast zero
            // must fail quickly, as the specification requires.
            Err(Error::NotSupported("fast zero"))
        }
        Command::Trim | Command::WriteZeroes => {
            backend.zero(req.offset, u64::from(req.length), fua).await
        }
        Command::Cache | Command::Disconnect | Command::Other(_) => Ok(()),
    };
    match res {
        Ok(()) => send_locked(w, &tx::simple_reply(0, req.cookie)).await,
        Err(e) => {
            tracing::warn!(error = %e, command = ?req.command, offset = req.offset, "request failed");
            send_error(
                w,
                &req,
                structured,
                e.nbd_errno(),
                "request failed",
                e.offset(),
            )
            .await
        }
    }
}
