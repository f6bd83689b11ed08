//! HTTP(S) front of the key service: `POST /` with `X-Amz-Target: TrentService.<Op>`,
//! bodies read up to a limit (larger ones get a ValidationException, never a hang or a
//! panic), every request authenticated with SigV4 and answered with the AWS error shape on
//! failure; only tenants (an operator's key is refused, see [`crate::operator`]). TLS
//! (rustls, offering the hybrid post-quantum group `X25519MLKEM768` first) when a
//! certificate is configured; every audit record names the request's key-exchange group
//! (or says it came over plain HTTP). `GET /healthz` for liveness. Without TLS the
//! connections are served by [`serve_plain`] (HTTP/1.1 only, a header-read timeout against
//! slowloris clients and a limit on the request head: [`HttpLimits`]).
use crate::error::KmsError;
use crate::service::{Kms, MAX_BODY, Transport};
use crate::sigv4;
use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;
use tokio::net::TcpListener;

fn aws_response(status: u16, body: String, request_id: &str) -> Response {
    let mut resp = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", v);
    }
    resp
}

/// A random (version 4) UUID for `x-amzn-RequestId`, from aws-lc's user-space DRBG: no
/// `getrandom` system call per request (the `uuid` crate's generator makes one).
fn request_id() -> String {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return uuid::Uuid::new_v4().to_string();
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

/// The [`sigv4::Header`]s of an HTTP request: values that are not UTF-8 become U+FFFD, so such a
/// header can never match what a client signed (and unsigned headers are ignored anyway).
pub fn header_view(headers: &axum::http::HeaderMap) -> Vec<sigv4::Header<'_>> {
    headers
        .iter()
        .map(|(n, v)| {
            // `HeaderName` is always lower-case; UTF-8 checked with the fast validator
            // first (the lossy path only for the rare value that is not UTF-8).
            let value = match std::str::from_utf8(v.as_bytes()) {
                Ok(s) => std::borrow::Cow::Borrowed(s),
                Err(_) => String::from_utf8_lossy(v.as_bytes()),
            };
            (n.as_str(), value)
        })
        .collect()
}

async fn kms_endpoint(State(kms): State<Arc<Kms>>, req: Request) -> Response {
    let request_id = request_id();
    let (parts, body) = req.into_parts();
    // The TLS accept loop names the connection's key-exchange group; none over plain HTTP.
    let transport = match parts.extensions.get::<caas_tls::server::TlsSession>() {
        Some(t) => Transport::Tls {
            key_exchange: t.key_exchange.clone(),
        },
        None => Transport::PlainHttp,
    };
    let headers = header_view(&parts.headers);
    // The operation is the X-Amz-Target that authentication checks: signed and sent once.
    let target = headers
        .iter()
        .find(|(n, _)| *n == "x-amz-target")
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let e = KmsError::Validation(format!("Request body is larger than {MAX_BODY} bytes"));
            kms.audit_rejected(&target, &e, &request_id, &transport)
                .await;
            return aws_response(413, e.body(), &request_id);
        }
    };
    let sreq = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body: &body,
    };
    let caller = match kms
        .authenticate_scope(&sreq, "kms", sigv4::KMS_SIGNED_HEADERS)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            kms.audit_rejected(&target, &e, &request_id, &transport)
                .await;
            return aws_response(e.status(), e.body(), &request_id);
        }
    };
    // Only tenants call the KMS API: an operator's valid signature is refused, audited
    // under the operator's name.
    if let Some(e) = Kms::refuse_operator(&caller) {
        kms.audit_refused_caller(&caller, &target, &e, &request_id, &transport)
            .await;
        return aws_response(e.status(), e.body(), &request_id);
    }
    let (status, body) = kms
        .handle_on(caller, &target, &body, request_id.clone(), &transport)
        .await;
    aws_response(status, body, &request_id)
}

/// The key service's router.
pub fn router(kms: Arc<Kms>) -> Router {
    Router::new()
        .route("/", post(kms_endpoint))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(kms)
}

/// TLS material for the listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// The deployment CA client certificates must chain to (host agents present theirs):
    /// a certificate is then requested, not required (tenants and operators use SigV4);
    /// each request carries its [`caas_tls::server::Peer`].
    pub client_ca: Option<std::path::PathBuf>,
    /// Revocation list(s) of that CA (PEM).
    pub crl: Option<std::path::PathBuf>,
}

/// Serves until `shutdown` resolves. Plain HTTP without `tls`.
/// `extra` routes (the attestation registrar/verifier) are served beside the KMS API.
pub async fn serve(
    kms: Arc<Kms>,
    listener: TcpListener,
    tls: Option<TlsFiles>,
    extra: Option<Router>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = match extra {
        Some(r) => router(kms).merge(r),
        None => router(kms),
    };
    serve_router(app, listener, tls, shutdown).await
}

/// Serves `app` (a router that includes [`router`]) until `shutdown` resolves; plain HTTP
/// without `tls`.
pub async fn serve_router(
    app: Router,
    listener: TcpListener,
    tls: Option<TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router_with(app, listener, tls, None, shutdown).await
}

/// [`serve_router`], telling `on_refused` about every TLS handshake that failed on the
/// client's certificate (another CA, revoked: for the caller's audit trail).
pub async fn serve_router_with(
    app: Router,
    listener: TcpListener,
    tls: Option<TlsFiles>,
    on_refused: Option<caas_tls::server::OnRefused>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => serve_plain(listener, app, HttpLimits::default(), shutdown).await,
        Some(t) => serve_tls(listener, app, &t, on_refused, shutdown).await,
    }
}

pub use caas_tls::server::HttpLimits;

/// The plain-HTTP accept loop: HTTP/1.1 only (keep-alive, pipelined requests answered in
/// order), each connection served by hyper under `limits`, `TCP_NODELAY` on. On `shutdown`
/// it stops accepting, lets every connection finish the request it is serving (idle ones
/// close at once) and returns when all are closed.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    let builder = Arc::new(caas_tls::server::http1_builder(limits));
    // Every connection task holds a receiver: `closed()` resolves once all have ended.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                // Out of descriptors and the like: keep serving the others.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            // The router per request (a cheap clone), as `axum::serve` does.
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            let ended = tokio::select! {
                end = conn.as_mut() => Some(end),
                _ = stop.wait_for(|s| *s) => None,
            };
            let end = match ended {
                Some(end) => end,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            caas_tls::server::log_connection_end(addr, end);
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}

async fn serve_tls(
    listener: TcpListener,
    app: Router,
    t: &TlsFiles,
    on_refused: Option<caas_tls::server::OnRefused>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The one TLS accept loop (shared with the host agents). Tenants and operators
    // authenticate with SigV4; a client certificate (requested with `client_ca`) is how
    // host agents authenticate their channel, checked per route by the router.
    let cfg = caas_tls::server::server_config(&caas_tls::server::ServerTls {
        cert: t.cert.clone(),
        key: t.key.clone(),
        client_ca: t.client_ca.clone(),
        crl: t.crl.clone(),
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    caas_tls::server::serve(listener, app, cfg, on_refused, shutdown).await
}
