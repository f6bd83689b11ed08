//! A small KMS client for caas's own tools (`caas demo`, `caas volume create`, tests): the
//! AWS KMS JSON protocol with SigV4, over HTTP or HTTPS (rustls, system-independent: the
//! caller passes the CA certificate to trust). Not a replacement for the AWS SDKs, which
//! tenants use directly.
//!
//! [`Signer`] is caas's one SigV4 request signer: the KMS client uses it, and so does every
//! caas tool calling the key service's other routes (attestation, TTP, scheduler; scope
//! service [`crate::operator::SERVICE`]) through its HTTP client.
use crate::sigv4;
use base64::Engine as _;
use caas_crypto::SecretBytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::sync::Arc;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the endpoint.
    #[error("cannot reach {endpoint}: {reason}")]
    Connect {
        /// Endpoint URL.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The service answered with an AWS error.
    #[error("{code}: {message}")]
    Service {
        /// `__type`.
        code: String,
        /// `message`.
        message: String,
        /// HTTP status.
        status: u16,
    },
    /// The reply was not understood.
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// SigV4 credentials of one access key for one credential-scope service: signs requests.
#[derive(Clone)]
pub struct Signer {
    region: String,
    service: String,
    access_key_id: String,
    secret: SecretBytes,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Credentials scoped to `region` and `service` (`kms`, or [`crate::operator::SERVICE`]).
    pub fn new(region: &str, service: &str, access_key_id: &str, secret: SecretBytes) -> Self {
        Self {
            region: region.into(),
            service: service.into(),
            access_key_id: access_key_id.into(),
            secret,
        }
    }

    /// The access key id.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// Signs a request: adds `x-amz-date` (now) to `headers` (which must hold `host`, and
    /// everything else to sign: every header given is signed), then returns the
    /// `Authorization` value over method, path, query, those headers and `body`.
    pub fn sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &mut Vec<(String, String)>,
        body: &[u8],
    ) -> Result<String, ClientError> {
        headers.retain(|(n, _)| n != "x-amz-date" && n != "authorization");
        headers.push((
            "x-amz-date".into(),
            sigv4::format_amz_date(crate::now_ms() / 1000),
        ));
        let view = sigv4::borrowed(headers);
        let sreq = sigv4::Request {
            method,
            path,
            query,
            headers: &view,
            body,
        };
        sigv4::sign(
            &sreq,
            &self.access_key_id,
            self.secret.expose(),
            &self.region,
            &self.service,
        )
        .map_err(|_| ClientError::Malformed("cannot sign".into()))
    }
}

/// Credentials and endpoint.
#[derive(Clone)]
pub struct KmsClient {
    endpoint: String,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    signer: Signer,
}

impl std::fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsClient")
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.signer.access_key_id)
            .finish_non_exhaustive()
    }
}

impl KmsClient {
    /// A client for `http://host:port` or `https://host:port` (then `ca_pem` is the CA to trust).
    pub fn new(
        endpoint: &str,
        region: &str,
        access_key_id: &str,
        secret: SecretBytes,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        let bad = |r: &str| ClientError::Connect {
            endpoint: endpoint.into(),
            reason: r.into(),
        };
        let (tls, rest) = if let Some(r) = endpoint.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = endpoint.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("endpoint must start with http:// or https://"));
        };
        let hostport = rest.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (hostport.to_string(), if tls { 443 } else { 80 }),
        };
        let tls = if tls {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let mut roots = rustls::RootCertStore::empty();
            let pem = ca_pem.ok_or_else(|| bad("https endpoint needs a CA certificate"))?;
            for c in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(c.map_err(|_| bad("bad CA certificate"))?)
                    .map_err(|_| bad("bad CA certificate"))?;
            }
            // caas's TLS provider: the hybrid post-quantum group first.
            let cfg = rustls::ClientConfig::builder_with_provider(caas_tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(&e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        } else {
            None
        };
        Ok(KmsClient {
            endpoint: endpoint.into(),
            host,
            port,
            tls,
            signer: Signer::new(region, "kms", access_key_id, secret),
        })
    }

    /// Calls `TrentService.<op>` with a JSON body; returns the JSON reply.
    pub async fn call(&self, op: &str, body: &Value) -> Result<Value, ClientError> {
        let body = body.to_string().into_bytes();
        let host = if (self.tls.is_some() && self.port == 443)
            || (self.tls.is_none() && self.port == 80)
        {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let target = format!("TrentService.{op}");
        let mut headers = vec![
            (
                "content-type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
            ("host".to_string(), host.clone()),
            ("x-amz-target".to_string(), target.clone()),
        ];
        let auth = self.signer.sign("POST", "/", "", &mut headers, &body)?;
        let mut builder = hyper::Request::builder().method("POST").uri("/");
        for (n, v) in &headers {
            builder = builder.header(n, v);
        }
        let req = builder
            .header("authorization", auth)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Malformed(e.to_string()))?;
        let conn_err = |r: String| ClientError::Connect {
            endpoint: self.endpoint.clone(),
            reason: r,
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let resp = if let Some(tls) = &self.tls {
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| conn_err(e.to_string()))?;
            let s = tls
                .connect(name, tcp)
                .await
                .map_err(|e| conn_err(e.to_string()))?;
            send(TokioIo::new(s), req).await.map_err(conn_err)?
        } else {
            send(TokioIo::new(tcp), req).await.map_err(conn_err)?
        };
        let (status, bytes) = resp;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| ClientError::Malformed(format!("HTTP {status}: not JSON")))?;
        if status != 200 {
            return Err(ClientError::Service {
                code: v
                    .get("__type")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown")
                    .to_string(),
                message: v
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                status,
            });
        }
        Ok(v)
    }

    /// GenerateDataKey (AES_256) under `key_id`: returns (plaintext, ciphertext blob).
    pub async fn generate_data_key(
        &self,
        key_id: &str,
        ec: &Value,
    ) -> Result<(SecretBytes, Vec<u8>), ClientError> {
        let v = self.call("GenerateDataKey", &serde_json::json!({ "KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": ec })).await?;
        Ok((
            SecretBytes::new(b64field(&v, "Plaintext")?),
            b64field(&v, "CiphertextBlob")?,
        ))
    }

    /// Decrypt a blob: returns the plaintext.
    pub async fn decrypt(&self, blob: &[u8], ec: &Value) -> Result<SecretBytes, ClientError> {
        let b = base64::engine::general_purpose::STANDARD.encode(blob);
        let v = self
            .call(
                "Decrypt",
                &serde_json::json!({ "CiphertextBlob": b, "EncryptionContext": ec }),
            )
            .await?;
        Ok(SecretBytes::new(b64field(&v, "Plaintext")?))
    }
}

/// Decodes a base64 field of a reply.
pub fn b64field(v: &Value, name: &str) -> Result<Vec<u8>, ClientError> {
    let s = v
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ClientError::Malformed(format!("missing {name}")))?;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| ClientError::Malformed(format!("{name} is not base64")))
}

async fn send<T>(io: TokioIo<T>, req: hyper::Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
