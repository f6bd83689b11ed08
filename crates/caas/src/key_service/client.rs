//! The caas tools' side of the key service's signed routes: the JSON HTTP client
//! (`caas_attest::client::HttpClient`) with caas's one SigV4 signer
//! (`caas_kms::client::Signer`, scope service `caas`) plugged in, for a tenant
//! (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`) or an operator
//! (`CAAS_OPERATOR_ACCESS_KEY_ID`/`CAAS_OPERATOR_SECRET_ACCESS_KEY`), over HTTPS with the
//! deployment CA pinned when `CAAS_KMS_CA` names it.
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

/// A client signing with these credentials (scope `region`/`caas`). With `CAAS_KMS_CA`
/// set (the deployment CA, PEM) it speaks HTTPS only, pins that CA and requires the
/// server's `key-service` role (a production key service); without it, plain HTTP (the
/// loopback dev key service). Not `AWS_CA_BUNDLE`: that one often names the system's
/// roots, which must not be trusted for the key service.
pub fn signed(
    region: &str,
    access_key_id: &str,
    secret: SecretBytes,
    timeout: Duration,
) -> Result<HttpClient> {
    let http = match env(ENV_CA_BUNDLE) {
        Some(ca) => HttpClient::with_tls(
            timeout,
            &caas_tls::client::ClientTls {
                ca: ca.into(),
                identity: None,
                server_role: Some(caas_tls::Role::KeyService),
            },
        )
        .map_err(|e| anyhow::anyhow!("{ENV_CA_BUNDLE}: {e}"))?,
        None => HttpClient::new(timeout),
    };
    Ok(
        http.with_signer(Arc::new(SigV4(caas_kms::client::Signer::new(
            region,
            caas_kms::operator::SERVICE,
            access_key_id,
            secret,
        )))),
    )
}

/// The deployment CA a tenant's or operator's caas tools pin for an HTTPS key service.
pub const ENV_CA_BUNDLE: &str = "CAAS_KMS_CA";

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
