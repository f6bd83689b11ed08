//! A small JSON-over-HTTP(S) client (hyper-util) shared by the verifier (to reach host
//! agents), the TTP and scheduler, the host agent (to enroll) and the CLI (to reach the key
//! service). Error bodies of caas services (`{"code", "message"}`) become [`Error::Remote`].
//!
//! [`HttpClient::with_tls`] pins the deployment CA (`caas_tls::client::ClientTls`), presents
//! a client certificate and refuses `http://` URLs; [`HttpClient::new`] is plain HTTP (the
//! loopback key service of `caas dev`, public reads). Calls to the key service's
//! authenticated routes carry a [`RequestSigner`] (caas's one SigV4 signer,
//! `caas_kms::client::Signer`, plugged in by the binary).

use crate::appraisal::Evidence;
use crate::error::Error;
use crate::store::HostRecord;
use crate::verifier::{Challenge, EvidenceSource};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Largest response body accepted.
const MAX_BODY: usize = 32 << 20;

use caas_tls::client::HttpsConnector;

#[derive(Debug, Clone)]
enum Inner {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector, Full<Bytes>>),
    /// `https://` URLs over the pinned TLS client, `http://` ones in the clear.
    ByScheme {
        plain: Client<HttpConnector, Full<Bytes>>,
        tls: Client<HttpsConnector, Full<Bytes>>,
    },
}

/// Signs a request before it is sent (SigV4 to the key service).
pub trait RequestSigner: Send + Sync + std::fmt::Debug {
    /// `headers` hold `host`, `content-type` and any extra header; the signer adds its own
    /// (date, authorization) to them. Every header in `headers` is sent.
    fn sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &mut Vec<(String, String)>,
        body: &[u8],
    ) -> Result<(), String>;
}

/// JSON HTTP client.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Inner,
    timeout: Duration,
    signer: Option<std::sync::Arc<dyn RequestSigner>>,
}

/// The client builder: pooled keep-alive connections are dropped after 20 s idle, before
/// caas's servers close an idle connection (their header-read timeout, 30 s:
/// `caas_tls::server::HttpLimits`), so a request is not sent on a connection the server is
/// closing.
fn pooled() -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(20));
    b
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

impl HttpClient {
    /// A client with a per-request timeout.
    pub fn new(timeout: Duration) -> Self {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        Self {
            inner: Inner::Plain(pooled().build(c)),
            timeout,
            signer: None,
        }
    }

    /// An HTTPS-only client: the server must chain to `tls.ca` (and carry
    /// `tls.server_role`), and the client presents `tls.identity`.
    pub fn with_tls(timeout: Duration, tls: &caas_tls::client::ClientTls) -> Result<Self, Error> {
        let conn = tls
            .connector()
            .map_err(|e| Error::InvalidRequest(format!("TLS client: {e}")))?;
        Ok(Self {
            inner: Inner::Tls(pooled().build(conn)),
            timeout,
            signer: None,
        })
    }

    /// A client for a URL the user chose (the CLI's key-service endpoint): `https://` URLs
    /// exactly as [`HttpClient::with_tls`] (pinned CA, required server role), `http://`
    /// URLs in the clear (the loopback key service of `caas dev`). Not [`Self::is_tls`].
    pub fn with_tls_for_https(
        timeout: Duration,
        tls: &caas_tls::client::ClientTls,
    ) -> Result<Self, Error> {
        let Inner::Tls(tls) = Self::with_tls(timeout, tls)?.inner else {
            return Err(Error::InvalidRequest("TLS client expected".into()));
        };
        let Inner::Plain(plain) = Self::new(timeout).inner else {
            return Err(Error::InvalidRequest("plain client expected".into()));
        };
        Ok(Self {
            inner: Inner::ByScheme { plain, tls },
            timeout,
            signer: None,
        })
    }

    /// Whether this client speaks TLS only.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// The same client, signing every request with `signer`.
    #[must_use]
    pub fn with_signer(mut self, signer: std::sync::Arc<dyn RequestSigner>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Sends `method url` with an optional JSON body and decodes the JSON answer.
    pub async fn request<R: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        url: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<R, Error> {
        let agent_err = |reason: String| Error::Agent {
            host: url.to_string(),
            reason,
        };
        let body = body.unwrap_or_default();
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| agent_err(format!("bad URL: {e}")))?;
        let mut all: Vec<(String, String)> =
            vec![("content-type".into(), "application/json".into())];
        for (k, v) in headers {
            all.push((k.to_ascii_lowercase(), (*v).to_string()));
        }
        if let Some(signer) = &self.signer {
            let host = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| agent_err("URL without host".into()))?;
            all.push(("host".into(), host));
            signer
                .sign(
                    method,
                    uri.path(),
                    uri.query().unwrap_or(""),
                    &mut all,
                    &body,
                )
                .map_err(|e| agent_err(format!("signing: {e}")))?;
        }
        let https = uri.scheme_str() == Some("https");
        let mut b = hyper::Request::builder().method(method).uri(uri);
        for (k, v) in &all {
            b = b.header(k.as_str(), v.as_str());
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| agent_err(format!("request: {e}")))?;
        let sent = match &self.inner {
            Inner::Plain(c) => tokio::time::timeout(self.timeout, c.request(req)).await,
            Inner::Tls(c) => tokio::time::timeout(self.timeout, c.request(req)).await,
            Inner::ByScheme { tls, .. } if https => {
                tokio::time::timeout(self.timeout, tls.request(req)).await
            }
            Inner::ByScheme { plain, .. } => {
                tokio::time::timeout(self.timeout, plain.request(req)).await
            }
        };
        let resp = sent
            .map_err(|_| agent_err("timed out".into()))?
            .map_err(|e| agent_err(format!("connect: {}", error_chain(&e))))?;
        let status = resp.status().as_u16();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_BODY);
        let bytes = tokio::time::timeout(self.timeout, limited.collect())
            .await
            .map_err(|_| agent_err("timed out reading body".into()))?
            .map_err(|e| agent_err(format!("body: {e}")))?
            .to_bytes();
        if !(200..300).contains(&status) {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(Error::Remote {
                url: url.to_string(),
                status,
                code: v
                    .get("code")
                    .and_then(|c| c.as_str())
                    .unwrap_or("http_error")
                    .to_string(),
                message: v
                    .get("message")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| agent_err(format!("invalid JSON answer: {e}")))
    }

    /// POST JSON.
    pub async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &B,
    ) -> Result<R, Error> {
        let b = serde_json::to_vec(body).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.request("POST", url, Some(b), &[]).await
    }

    /// PUT JSON.
    pub async fn put<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &B,
    ) -> Result<R, Error> {
        let b = serde_json::to_vec(body).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.request("PUT", url, Some(b), &[]).await
    }

    /// GET JSON.
    pub async fn get<R: serde::de::DeserializeOwned>(&self, url: &str) -> Result<R, Error> {
        self.request("GET", url, None, &[]).await
    }
}

/// `e` and its sources (a TLS refusal is only visible in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Fetches evidence from host agents: `POST {agent_url}/v1/agent/quote` with the challenge.
/// Host agents answer only the key service's certificate: build it with
/// [`AgentClient::with_tls`] (the default is plain HTTP and is refused by every agent).
#[derive(Debug, Clone, Default)]
pub struct AgentClient {
    /// The HTTP client.
    pub http: HttpClient,
}

impl AgentClient {
    /// The key service's client to host agents: the deployment CA pinned, agents must hold
    /// the `host` role, the key service presents `identity` (its `key-service` certificate).
    pub fn with_tls(
        timeout: Duration,
        ca: &std::path::Path,
        identity: caas_tls::pki::CertFiles,
    ) -> Result<Self, Error> {
        Ok(Self {
            http: HttpClient::with_tls(
                timeout,
                &caas_tls::client::ClientTls {
                    ca: ca.to_path_buf(),
                    identity: Some(identity),
                    server_role: Some(caas_tls::Role::Host),
                },
            )?,
        })
    }
}

impl EvidenceSource for AgentClient {
    async fn fetch(&self, host: &HostRecord, challenge: &Challenge) -> Result<Evidence, String> {
        let url = format!("{}/v1/agent/quote", host.agent_url.trim_end_matches('/'));
        self.http
            .post(&url, challenge)
            .await
            .map_err(|e| e.to_string())
    }
}
