//! The one TLS accept loop of caas's HTTP servers (the key service, host agents).
//!
//! [`server_config`] builds a rustls server configuration from PEM files; with a client CA,
//! a client certificate is *requested* and, when sent, must chain to that CA (the
//! handshake fails otherwise). Connections without one are accepted so that public routes
//! (`/healthz`) stay reachable: authorization is the router's job, per route, from the
//! [`Peer`] that [`serve`] puts into every request's extensions, beside the
//! [`TlsSession`] (the negotiated key-exchange group, for audit records). Every connection
//! is served under [`HttpLimits`]: a request head not read within its timeout (slowloris)
//! or larger than its limit closes the connection.

use crate::{Error, PeerIdentity};
use axum::Router;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The server's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// CA that client certificates must chain to (None: no client certificates).
    pub client_ca: Option<std::path::PathBuf>,
    /// Certificate revocation list(s) of that CA (PEM, e.g. `caas pki revoke`'s
    /// `crl.pem`): a client certificate listed there fails the handshake.
    pub crl: Option<std::path::PathBuf>,
}

/// Who is on the other end of a connection (in every request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The client certificate's identity, when one was presented and chained to the CA.
    pub identity: Option<PeerIdentity>,
}

impl std::fmt::Display for Peer {
    /// `name[roles]@addr`, or `anonymous@addr`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.identity {
            Some(i) => write!(f, "{i}@{}", self.addr),
            None => write!(f, "anonymous@{}", self.addr),
        }
    }
}

/// The TLS session a request arrived on (in every request's extensions, beside [`Peer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSession {
    /// The negotiated key-exchange group's IANA name (`X25519MLKEM768`, `X25519`, ...).
    pub key_exchange: String,
}

/// Told about every connection whose TLS handshake failed because of its certificate
/// (e.g. one from another CA): remote address and reason.
pub type OnRefused = Arc<dyn Fn(SocketAddr, String) + Send + Sync>;

/// Longest time a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls server configuration for `tls` (TLS 1.2/1.3, aws-lc-rs, HTTP/1.1; key
/// exchange preferring the hybrid post-quantum `X25519MLKEM768`, see [`crate::provider`]).
pub fn server_config(tls: &ServerTls) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = crate::read_certs(&tls.cert)?;
    let key = crate::read_key(&tls.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = crate::read_roots(ca)?;
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                crate::provider(),
            )
            .allow_unauthenticated();
            if let Some(crl) = &tls.crl {
                // Only end entities are checked (the CA is the trust anchor); a certificate
                // whose status the list cannot tell (another issuer) is refused.
                verifier = verifier
                    .with_crls(crate::read_crls(crl)?)
                    .only_check_end_entity_revocation();
            }
            let verifier = verifier
                .build()
                .map_err(|e| Error::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(format!("{}: {e}", tls.cert.display())))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether a handshake error is about the peer's certificate (worth an audit record),
/// rather than a client that does not speak TLS or went away.
fn certificate_error(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_) => Some(inner.to_string()),
        _ => None,
    }
}

/// Limits of the HTTP/1.1 connections caas serves (over TLS here; in the clear by
/// `caas_kms::server::serve_plain`).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// How long a client has to send a request's whole head (request line and headers),
    /// also the longest a keep-alive connection may stay idle before its next request: a
    /// client that trickles its headers (slowloris) is disconnected.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) buffered; a larger one is answered
    /// `431` and the connection closed. At least 8 KiB (hyper's minimum).
    pub max_head_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(30),
            // AWS SDK requests carry well under 4 KiB of headers.
            max_head_bytes: 16 * 1024,
        }
    }
}

/// hyper's HTTP/1.1 connection builder under `limits` (keep-alive on).
pub fn http1_builder(limits: HttpLimits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(true);
    b
}

/// Logs how an HTTP connection ended when hyper ended it with an error: a client that sent
/// its head too slowly (header timeout) or too large, a malformed request, a hang-up in the
/// middle of one. These refusals come before any request exists, so they are logged (at
/// debug level: an unauthenticated client can cause them at will) and never appended to the
/// signed audit log, which such a client could otherwise flood.
pub fn log_connection_end(peer: std::net::SocketAddr, end: Result<(), hyper::Error>) {
    let Err(e) = end else { return };
    let why = if e.is_timeout() {
        "request head not received in time"
    } else if e.is_parse_too_large() {
        "request head too large"
    } else if e.is_parse() {
        "malformed request"
    } else if e.is_incomplete_message() {
        "connection closed in the middle of a request"
    } else {
        "connection error"
    };
    tracing::debug!(%peer, error = %e, "HTTP connection refused or cut: {why}");
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves. Each request carries the
/// connection's [`Peer`]; handshakes that fail on the client's certificate are reported to
/// `on_refused`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: Arc<rustls::ServerConfig>,
    on_refused: Option<OnRefused>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(
        listener,
        app,
        cfg,
        on_refused,
        HttpLimits::default(),
        shutdown,
    )
    .await
}

/// [`serve`] with the given [`HttpLimits`] (a request head not read within its timeout
/// closes the connection: a TLS client trickling its headers holds no task for long).
pub async fn serve_with_limits(
    listener: TcpListener,
    app: Router,
    cfg: Arc<rustls::ServerConfig>,
    on_refused: Option<OnRefused>,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let http = Arc::new(http1_builder(limits));
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                // Out of descriptors and the like: keep serving the others.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let on_refused = on_refused.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    if let (Some(reason), Some(f)) = (certificate_error(&e), on_refused) {
                        f(addr, reason);
                    }
                    return;
                }
                Err(_) => return,
            };
            // The chain was verified by the handshake; only its end entity is read.
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| PeerIdentity::from_der(c).ok());
            let peer = Peer { addr, identity };
            let session = TlsSession {
                key_exchange: tls
                    .get_ref()
                    .1
                    .negotiated_key_exchange_group()
                    .map(|g| format!("{:?}", g.name()))
                    .unwrap_or_else(|| "unknown".into()),
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req.extensions_mut().insert(session.clone());
                    let mut app = app.clone();
                    async move {
                        tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await
                    }
                },
            );
            log_connection_end(addr, http.serve_connection(TokioIo::new(tls), svc).await);
        });
    }
}
