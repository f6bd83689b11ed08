//! The TLS front (key service in production, host agents) against a slowloris client: the
//! attacker on the network completes the TLS handshake (no client certificate needed: public
//! routes stay reachable), then trickles its request head one header at a time to hold a
//! connection (and its task) open for good. The header-read timeout of [`HttpLimits`] cuts
//! it off; the server keeps answering everyone else. And one huge request head, which the
//! default front (`serve`, every deployment's) refuses instead of buffering.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use caas_tls::client::ClientTls;
use caas_tls::pki::DevCa;
use caas_tls::server::{HttpLimits, ServerTls, serve, serve_with_limits, server_config};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

struct Front {
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
    _dir: tempfile::TempDir,
}

impl Front {
    /// The front under `limits`, or (`None`) as `serve` runs every deployment's.
    async fn start(limits: Option<HttpLimits>) -> Front {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::load_or_create(dir.path()).unwrap();
        let cert = ca.issue("key-service", &[], &["127.0.0.1"]).unwrap();
        let cfg = server_config(&ServerTls {
            cert: cert.cert,
            key: cert.key,
            client_ca: None,
            crl: None,
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        match limits {
            Some(l) => tokio::spawn(serve_with_limits(
                listener,
                app,
                cfg,
                None,
                l,
                std::future::pending(),
            )),
            None => tokio::spawn(serve(listener, app, cfg, None, std::future::pending())),
        };
        let client = ClientTls {
            ca: ca.ca_file(),
            identity: None,
            server_role: None,
        }
        .config()
        .unwrap();
        Front {
            addr,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            _dir: dir,
        }
    }

    async fn connect(&self) -> Tls {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        self.connector.connect(name, tcp).await.unwrap()
    }

    /// An honest client's `GET /healthz` is answered.
    async fn still_serving(&self) {
        let mut c = self.connect().await;
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
}

/// Whether the server closed `c` (end of stream or reset) within `within`.
async fn closed_within(c: &mut Tls, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let t = Instant::now();
    while t.elapsed() < within {
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await
        {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn a_tls_client_trickling_its_headers_is_cut_off_at_the_header_timeout() {
    let f = Front::start(Some(HttpLimits {
        header_read_timeout: Duration::from_millis(600),
        ..HttpLimits::default()
    }))
    .await;
    let mut c = f.connect().await;
    let started = Instant::now();
    c.write_all(b"POST / HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut closed = false;
    // One header every 100 ms: each arrives well inside any per-read timeout.
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.write_all(format!("x-slow-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
    }
    f.still_serving().await;
    closed = closed || closed_within(&mut c, Duration::from_secs(3)).await;
    assert!(closed, "a trickling TLS client must be disconnected");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut off near the 600 ms header timeout, not after {:?}",
        started.elapsed()
    );
    f.still_serving().await;
}

/// The log's text (what an operator's `RUST_LOG=debug` shows).
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every deployment's TLS front (`serve`, default limits): a request head of 64 KiB (one
/// huge header) is refused — 431, or the connection closed — never buffered whole or
/// served, and the front keeps serving. The refusal is in the operator's debug log, with
/// the client's address.
#[tokio::test]
async fn the_default_tls_front_refuses_an_oversized_request_head() {
    let log = Log::default();
    let writer = log.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish(),
    );
    assert_eq!(HttpLimits::default().max_head_bytes, 16 * 1024);
    assert_eq!(
        HttpLimits::default().header_read_timeout,
        Duration::from_secs(30)
    );
    let f = Front::start(None).await;
    let mut c = f.connect().await;
    let req = format!(
        "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The server may close while the head is still being written: a refusal too.
    let _ = c.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "an oversized head was served: {text}"
    );
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "refused with 431 or closed, got: {text}"
    );
    f.still_serving().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.text().contains("request head too large") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = log.text();
    assert!(
        text.contains("request head too large") && text.contains("127.0.0.1"),
        "the refusal is not in the debug log: {text}"
    );
}
