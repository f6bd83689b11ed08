//! The key service's TOML configuration (`config/key-service.example.toml`): the KMS sections
//! (`[server]`, `[storage]`, `[keys]`, `[maintenance]`, validated by `caas_kms::config`)
//! and the other roles' `[attestation]`, `[ttp]` and `[scheduler]`. Unknown keys are
//! refused. Relative paths are taken relative to the config file's directory.
use super::attest::AttestationParams;
use caas_kms::config::{RawConfig, RawKeys, RawMaintenance, RawServer, RawStorage, ServeParams};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `[attestation]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAttestation {
    /// TPM vendor CA certificates (PEM or DER) the hosts' EK certificates must chain to.
    #[serde(default)]
    pub ek_ca_files: Vec<PathBuf>,
    /// Security-profile files (TOML or JSON) created at start-up when missing.
    #[serde(default)]
    pub profiles: Vec<PathBuf>,
    /// Profile given to a host at enrollment (omit: operators admit each host).
    pub default_profile: Option<String>,
    /// Seconds between continuous attestations.
    pub interval_secs: Option<u64>,
    /// Seconds an enrollment challenge stays valid.
    pub enrollment_ttl_secs: Option<u64>,
}

/// `[ttp]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTtp {
    /// Send a signed revocation notice to a host's agent when it stops being trusted
    /// (the TTP refuses the host either way).
    pub revoke_untrusted_hosts: Option<bool>,
}

/// `[scheduler]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawScheduler {
    /// Seconds to wait for a host agent's answer to a launch.
    pub agent_timeout_secs: Option<u64>,
}

/// `[agents]`: how the key service (verifier, TTP, scheduler) reaches host agents. Agents
/// serve their API over TLS only and refuse a caller without a client certificate of the
/// deployment CA carrying the `key-service` role; without this section the key service
/// cannot attest, launch on or revoke any host.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAgents {
    /// The deployment CA certificate (PEM) every agent's server certificate must chain to
    /// (agents must also carry the `host` role).
    pub ca: Option<PathBuf>,
    /// The key service's client certificate (PEM, role `key-service`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM, readable only by caas).
    pub key: Option<PathBuf>,
}

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    /// `[server]`.
    #[serde(default)]
    pub server: RawServer,
    /// `[storage]`.
    #[serde(default)]
    pub storage: RawStorage,
    /// `[keys]`.
    #[serde(default)]
    pub keys: RawKeys,
    /// `[maintenance]`.
    #[serde(default)]
    pub maintenance: RawMaintenance,
    /// `[attestation]`.
    #[serde(default)]
    pub attestation: RawAttestation,
    /// `[ttp]`.
    #[serde(default)]
    pub ttp: RawTtp,
    /// `[scheduler]`.
    #[serde(default)]
    pub scheduler: RawScheduler,
    /// `[agents]`.
    #[serde(default)]
    pub agents: RawAgents,
}

/// The TTP's and scheduler's parameters.
#[derive(Debug, Clone)]
pub struct TlParams {
    /// `[ttp] revoke_untrusted_hosts`.
    pub revoke_untrusted_hosts: bool,
    /// `[scheduler] agent_timeout_secs`.
    pub agent_timeout: Duration,
    /// Send revocation notices to the agents (always, but in `caas dev` under
    /// `CAAS_DEV_DELIVER_REVOCATIONS=0`, which stands for a host that ignores them).
    pub deliver_revocations: bool,
}

impl Default for TlParams {
    fn default() -> Self {
        Self {
            revoke_untrusted_hosts: true,
            agent_timeout: Duration::from_secs(120),
            deliver_revocations: true,
        }
    }
}

/// Validated parameters of every role.
#[derive(Debug, Clone)]
pub struct KeyServiceParams {
    /// The KMS and the listener.
    pub serve: ServeParams,
    /// Registrar and verifier.
    pub attestation: AttestationParams,
    /// TTP and scheduler.
    pub tl: TlParams,
    /// `[agents]`: the TLS client to host agents (files checked readable at validation),
    /// `None` when not configured.
    pub agents: Option<caas_tls::client::ClientTls>,
}

/// Agents' client timeout: at least the scheduler's wait for a launch.
pub const AGENT_CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

impl KeyServiceParams {
    /// The HTTPS client to host agents (`[agents]`), if configured.
    ///
    /// # Errors
    /// A file that cannot be read or parsed (named in the message).
    pub fn agent_client(&self) -> Result<Option<caas_attest::client::HttpClient>, String> {
        self.agents
            .as_ref()
            .map(|tls| {
                caas_attest::client::HttpClient::with_tls(
                    self.tl.agent_timeout.max(AGENT_CLIENT_TIMEOUT),
                    tls,
                )
                .map_err(|e| format!("[agents]: {e}"))
            })
            .transpose()
    }
}

/// Reads a config file (not yet validated).
pub fn load(path: &Path) -> Result<RawFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut raw: RawFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    raw.attestation.ek_ca_files.iter_mut().for_each(rel);
    raw.attestation.profiles.iter_mut().for_each(rel);
    for p in [
        &mut raw.agents.ca,
        &mut raw.agents.cert,
        &mut raw.agents.key,
    ]
    .into_iter()
    .flatten()
    {
        rel(p);
    }
    Ok(raw)
}

/// Reads a security-profile file (TOML or JSON).
pub fn read_profile(path: &Path) -> Result<caas_attest::SecurityProfile, String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let p: caas_attest::SecurityProfile = if s.trim_start().starts_with('{') {
        serde_json::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        toml::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))?
    };
    p.validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(p)
}

impl RawFile {
    /// Validates into parameters.
    pub fn validate(self) -> Result<KeyServiceParams, String> {
        let mut serve = RawConfig {
            server: self.server,
            storage: self.storage,
            keys: self.keys,
            maintenance: self.maintenance,
        }
        .validate()?;
        // A KMS domain node's identity sealed to its TPM (`[keys] identity_tcti`).
        if let Some(d) = serve.kms.domain.as_mut()
            && let Some(t) = &d.identity_tcti
        {
            d.sealer = Some(std::sync::Arc::new(
                crate::domain_cmd::TpmIdentitySealer::new(t),
            ));
        }
        let a = self.attestation;
        let secs = |v: Option<u64>, d: u64, what: &str| match v.unwrap_or(d) {
            0 => Err(format!("{what} must be at least 1")),
            s => Ok(Duration::from_secs(s)),
        };
        let attestation = AttestationParams {
            profiles: a
                .profiles
                .iter()
                .map(|p| read_profile(p))
                .collect::<Result<_, _>>()?,
            ek_ca_files: a.ek_ca_files,
            default_profile: a.default_profile,
            interval: secs(a.interval_secs, 60, "attestation.interval_secs")?,
            enrollment_ttl: secs(a.enrollment_ttl_secs, 60, "attestation.enrollment_ttl_secs")?,
        };
        let tl = TlParams {
            revoke_untrusted_hosts: self.ttp.revoke_untrusted_hosts.unwrap_or(true),
            agent_timeout: secs(
                self.scheduler.agent_timeout_secs,
                120,
                "scheduler.agent_timeout_secs",
            )?,
            deliver_revocations: true,
        };
        let agents = self.agents.validate()?;
        Ok(KeyServiceParams {
            serve,
            attestation,
            tl,
            agents,
        })
    }
}

impl RawAgents {
    /// All three files or none; each must be readable and hold what it should (the
    /// certificate and key are loaded into a TLS configuration here, so that a bad file
    /// stops the start, not the first attestation).
    fn validate(self) -> Result<Option<caas_tls::client::ClientTls>, String> {
        let (ca, cert, key) = match (self.ca, self.cert, self.key) {
            (None, None, None) => return Ok(None),
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => {
                return Err(
                    "[agents]: ca, cert and key are all required (or leave the section out)".into(),
                );
            }
        };
        let tls = caas_tls::client::ClientTls {
            ca,
            identity: Some(caas_tls::pki::CertFiles { cert, key }),
            server_role: Some(caas_tls::Role::Host),
        };
        tls.config().map_err(|e| format!("[agents]: {e}"))?;
        Ok(Some(tls))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid_and_names_every_section() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/key-service.example.toml");
        let p = load(&path).unwrap().validate().unwrap();
        assert_eq!(p.attestation.interval, Duration::from_secs(60));
        assert!(
            p.attestation.default_profile.is_none(),
            "operators admit hosts by default"
        );
        assert!(p.tl.revoke_untrusted_hosts);
        assert_eq!(p.tl.agent_timeout, Duration::from_secs(120));
        assert!(
            p.agents.is_none(),
            "[agents] is commented out in the example"
        );
    }

    fn with_agents(dir: &Path, agents: &str) -> Result<KeyServiceParams, String> {
        let cfg = dir.join("ks.toml");
        std::fs::write(
            &cfg,
            format!(
                "[keys]\nnode_key_file = \"node.key\"\ncreate_node_key = true\n\
                 [storage]\ndatabase = \"sqlite::memory:\"\n[agents]\n{agents}"
            ),
        )
        .unwrap();
        load(&cfg)?.validate()
    }

    #[test]
    fn the_agents_client_certificate_is_parsed_relative_to_the_file() {
        let d = tempfile::tempdir().unwrap();
        let ca = caas_tls::pki::DevCa::load_or_create(&d.path().join("pki")).unwrap();
        ca.issue("ks", &[caas_tls::Role::KeyService], &[]).unwrap();
        let p = with_agents(
            d.path(),
            "ca = \"pki/ca.pem\"\ncert = \"pki/ks.pem\"\nkey = \"pki/ks.key\"\n",
        )
        .unwrap();
        let tls = p.agents.clone().unwrap();
        assert_eq!(tls.ca, d.path().join("pki/ca.pem"));
        assert_eq!(tls.identity.unwrap().cert, d.path().join("pki/ks.pem"));
        assert_eq!(tls.server_role, Some(caas_tls::Role::Host));
        assert!(p.agent_client().unwrap().unwrap().is_tls());
    }

    #[test]
    fn a_missing_or_unreadable_agents_file_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let ca = caas_tls::pki::DevCa::load_or_create(&d.path().join("pki")).unwrap();
        ca.issue("ks", &[caas_tls::Role::KeyService], &[]).unwrap();
        // Missing key file: named.
        let e = with_agents(
            d.path(),
            "ca = \"pki/ca.pem\"\ncert = \"pki/ks.pem\"\nkey = \"pki/nope.key\"\n",
        )
        .unwrap_err();
        assert!(e.contains("[agents]") && e.contains("nope.key"), "{e}");
        // A CA file that holds no certificate: named.
        std::fs::write(d.path().join("empty.pem"), "").unwrap();
        let e = with_agents(
            d.path(),
            "ca = \"empty.pem\"\ncert = \"pki/ks.pem\"\nkey = \"pki/ks.key\"\n",
        )
        .unwrap_err();
        assert!(e.contains("empty.pem"), "{e}");
        // A directory where the certificate should be (unreadable as a file).
        let e = with_agents(
            d.path(),
            "ca = \"pki/ca.pem\"\ncert = \"pki\"\nkey = \"pki/ks.key\"\n",
        )
        .unwrap_err();
        assert!(e.contains("[agents]") && e.contains("pki"), "{e}");
        // Half a section.
        let e = with_agents(d.path(), "ca = \"pki/ca.pem\"\n").unwrap_err();
        assert!(e.contains("all required"), "{e}");
        // Unknown keys.
        assert!(with_agents(d.path(), "insecure = true\n").is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let raw: Result<RawFile, _> = toml::from_str("[attestation]\nek_ca = []\n");
        assert!(raw.is_err());
        let raw: Result<RawFile, _> = toml::from_str("[ttp]\nopen = true\n");
        assert!(raw.is_err());
    }
}
