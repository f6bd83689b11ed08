//! The dev hosts of `caas dev --hosts N`: each with its own swtpm, measured boot and host
//! agent, enrolled with and continuously attested by the dev key service (the same
//! [`crate::key_service::Roles`] as production; only the TPM vendor CA is the dev one and
//! the `dev` profile, matching their boot, is given at enrollment).
use crate::key_service::Roles;
use crate::key_service::attest::{AttestationParams, KmsAttestStore};
use anyhow::Result;
use std::path::Path;
use std::time::Duration;

/// Name of the dev security profile.
pub const DEV_PROFILE: &str = "dev";

/// Sets up `n` dev hosts (swtpm, measured boot) and records the `dev` profile matching
/// their boot (rewritten at every start: the measured agent may have been rebuilt).
/// Returns the hosts, the attestation parameters that trust their EK CA, and the key
/// service's HTTPS client to their agents.
///
/// The deployment CA lives in `DIR/pki`: the agents' server certificates, the key
/// service's client certificate to them and the operator's ([`env()`]). pk_TTP is configured
/// in each agent, never fetched on first use.
pub async fn prepare(
    dir: &Path,
    n: usize,
    kms: &caas_kms::Kms,
    endpoint: &str,
    interval: Duration,
) -> Result<(
    caas_host::dev::DevHosts,
    AttestationParams,
    caas_attest::client::HttpClient,
)> {
    let ttp = crate::key_service::tl::load_or_create_keys(kms).await?;
    let opts = caas_host::dev::DevOptions {
        pki_dir: Some(dir.join("pki")),
        ttp_public_key: Some(ttp.public()?),
        ..Default::default()
    };
    let hosts = caas_host::dev::DevHosts::prepare(&dir.join("hosts"), n, endpoint, opts)
        .await
        .map_err(|e| anyhow::anyhow!("dev hosts: {e}"))?;
    let agents = hosts
        .client(caas_tls::Role::KeyService)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = kms.store.clone();
    let profile = hosts
        .profile(DEV_PROFILE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    caas_attest::store::put_profile(
        &KmsAttestStore(store),
        &profile,
        "caas:dev",
        "CreateProfile",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let params = AttestationParams {
        ek_ca_files: hosts.ca_cert_files(),
        profiles: vec![],
        default_profile: Some(DEV_PROFILE.into()),
        interval,
        enrollment_ttl: Duration::from_secs(60),
    };
    Ok((hosts, params, agents))
}

/// Starts the agents (they enroll over HTTP, so the key service must be serving) and
/// attests each once.
pub async fn start(hosts: &mut caas_host::dev::DevHosts, roles: &Roles) -> Result<()> {
    hosts
        .start_agents(Duration::from_secs(90))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for h in &hosts.hosts {
        let v = roles
            .attest
            .attest(&h.name)
            .await
            .map_err(|e| anyhow::anyhow!("attesting {}: {e}", h.name))?;
        tracing::info!(host = %h.name, trusted = v.trusted, "initial attestation");
    }
    Ok(())
}

/// `DIR/env` variables of the hosts, the cloud storage, the deployment CA and the
/// operator's certificate for the agents' management API.
pub fn env(hosts: &caas_host::dev::DevHosts) -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = hosts
        .env_lines(DEV_PROFILE)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.push((
        "CAAS_STORAGE_DIR".into(),
        hosts.storage_dir().display().to_string(),
    ));
    let operator = hosts
        .issue("operator", caas_tls::Role::Operator)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = |p: &Path| p.display().to_string();
    v.push((
        caas_host::cli::ENV_PKI_CA.into(),
        path(&hosts.pki_ca_file()),
    ));
    v.push((
        caas_host::cli::ENV_OPERATOR_CERT.into(),
        path(&operator.cert),
    ));
    v.push((caas_host::cli::ENV_OPERATOR_KEY.into(), path(&operator.key)));
    Ok(v)
}
