//! The caas tools' side of the key service's signed routes: the JSON HTTP client
//! (`caas_attest::client::HttpClient`) with caas's one SigV4 signer
//! (`caas_kms::client::Signer`, scope service `caas`) plugged in, for a tenant
//! (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`) or an operator
//! (`CAAS_OPERATOR_ACCESS_KEY_ID`/`CAAS_OPERATOR_SECRET_ACCESS_KEY`).
//!
//! A key service served over TLS (`https://` endpoint): `AWS_CA_BUNDLE` names the
//! deployment CA (PEM) its certificate must chain to, and the certificate must carry the
//! `key-service` role (so that another endpoint of the deployment, e.g. a host agent,
//! cannot pose as it); without `AWS_CA_BUNDLE` an `https://` endpoint is refused (no
//! system roots). An `http://` endpoint (the loopback key service of `caas dev`) is
//! reached in the clear either way.
use anyhow::{Context, Result};
use caas_attest::client::{HttpClient, RequestSigner};
use caas_crypto::SecretBytes;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
struct SigV4(caas_kms::client::Signer);

impl RequestSigner for SigV4 {
    fn sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &mut Vec<(String, String)>,
        body: &[u8],
    ) -> Result<(), String> {
        let auth = self
            .0
            .sign(method, path, query, headers, body)
            .map_err(|e| e.to_string())?;
        headers.push(("authorization".into(), auth));
        Ok(())
    }
}

/// The environment variable naming the CA bundle of a TLS key service.
pub const ENV_CA_BUNDLE: &str = "AWS_CA_BUNDLE";

/// The unsigned client of the key service: `https://` pinned to `AWS_CA_BUNDLE` (server
/// role `key-service` required) when it is set, `http://` in the clear.
///
/// # Errors
/// The CA bundle cannot be read or parsed (named in the message).
pub fn base(timeout: Duration) -> Result<HttpClient> {
    match env(ENV_CA_BUNDLE) {
        None => Ok(HttpClient::new(timeout)),
        Some(ca) => HttpClient::with_tls_for_https(
            timeout,
            &caas_tls::client::ClientTls {
                ca: ca.into(),
                identity: None,
                server_role: Some(caas_tls::Role::KeyService),
            },
        )
        .with_context(|| format!("{ENV_CA_BUNDLE}: the key service's CA")),
    }
}

/// A client signing with these credentials (scope `region`/`caas`); TLS as [`base`].
///
/// # Errors
/// As [`base`].
pub fn signed(
    region: &str,
    access_key_id: &str,
    secret: SecretBytes,
    timeout: Duration,
) -> Result<HttpClient> {
    Ok(
        base(timeout)?.with_signer(Arc::new(SigV4(caas_kms::client::Signer::new(
            region,
            caas_kms::operator::SERVICE,
            access_key_id,
            secret,
        )))),
    )
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The region of the environment (`AWS_REGION`, `AWS_DEFAULT_REGION`, else `us-east-1`).
pub fn region() -> String {
    env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into())
}

/// The operator's client, credentials from the environment.
pub fn operator(timeout: Duration) -> Result<HttpClient> {
    let id = env("CAAS_OPERATOR_ACCESS_KEY_ID").context(
        "CAAS_OPERATOR_ACCESS_KEY_ID and CAAS_OPERATOR_SECRET_ACCESS_KEY are required \
         (an operator's access key: `caas admin create-operator`; `caas dev` writes one to DIR/env)",
    )?;
    let secret = env("CAAS_OPERATOR_SECRET_ACCESS_KEY")
        .context("CAAS_OPERATOR_SECRET_ACCESS_KEY is required")?;
    signed(
        &region(),
        &id,
        SecretBytes::new(secret.into_bytes()),
        timeout,
    )
}
