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
}

/// The TTP's and scheduler's parameters.
#[derive(Debug, Clone)]
pub struct TlParams {
    /// `[ttp] revoke_untrusted_hosts`.
    pub revoke_untrusted_hosts: bool,
    /// `[scheduler] agent_timeout_secs`.
    pub agent_timeout: Duration,
}

impl Default for TlParams {
    fn default() -> Self {
        Self {
            revoke_untrusted_hosts: true,
            agent_timeout: Duration::from_secs(120),
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
        let serve = RawConfig {
            server: self.server,
            storage: self.storage,
            keys: self.keys,
            maintenance: self.maintenance,
        }
        .validate()?;
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
        };
        Ok(KeyServiceParams {
            serve,
            attestation,
            tl,
        })
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
    }

    #[test]
    fn unknown_keys_are_refused() {
        let raw: Result<RawFile, _> = toml::from_str("[attestation]\nek_ca = []\n");
        assert!(raw.is_err());
        let raw: Result<RawFile, _> = toml::from_str("[ttp]\nopen = true\n");
        assert!(raw.is_err());
    }
}
