//! Host-agent configuration (TOML, `caas host serve --config FILE`): a raw serde struct
//! with `deny_unknown_fields`, validated into [`AgentConfig`]. See
//! `config/host-agent.example.toml` (every field, commented).
//!
//! Two modes. `production` (the default): the TPM is a device TCTI, the key service is
//! reached over HTTPS (its certificate must chain to the deployment CA and carry the
//! `key-service` role), and the dev-only PCR-extend route cannot be enabled — each refused
//! here, at load. `dev` (`caas dev`, tests): a swtpm TCTI and a plain-HTTP loopback key
//! service are allowed, and so is `dev_measure`. In both modes the agent's API is served
//! over TLS only, with client certificates from the deployment CA (`[tls]`, required).

use crate::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The file as written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Host name registered with the key service.
    pub name: String,
    /// TCTI string of the host's TPM.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// Listen address of the agent API (`127.0.0.1:0` picks a free port).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// URL under which the key service reaches this agent (default: `http://<listen>`).
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// Base URL of the key service.
    pub key_service_url: String,
    /// Directory for TPM-wrapped key blobs (nothing else is stored).
    pub state_dir: PathBuf,
    /// TCG binary event log of this host's boot.
    #[serde(default = "default_event_log")]
    pub event_log: PathBuf,
    /// AK algorithm: `ecc-p256` (default) or `rsa-2048`.
    #[serde(default = "default_ak")]
    pub ak_algorithm: String,
    /// PCRs (sha256 bank) the bind key is bound to.
    #[serde(default = "default_bind_pcrs")]
    pub bind_pcrs: Vec<u32>,
    /// The cloud storage the workloads' encrypted images and domain volumes live in
    /// (untrusted: it only ever holds ciphertext). Default: `<state_dir>/storage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_dir: Option<PathBuf>,
    /// The TTP's public keys (`SIGN.ENCRYPT`, base64). Without it the agent fetches them
    /// from the key service over HTTPS (the deployment CA pinned, `key-service` role
    /// required) and keeps them in memory only; over plain HTTP it refuses (never trust on
    /// first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttp_public_key: Option<String>,
    /// Where each workload gets its run directory (sockets, its crypto domain's state);
    /// every ancestor must be traversable (o+x) by the workload identities. Default:
    /// `<state_dir>/run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
    /// Identities of launched workloads, `FIRST-LAST`: when the agent runs as root, each
    /// workload's crypto-domain processes and the workload itself run under a uid (= gid)
    /// of its own from this range, in a 0700 run directory owned by it.
    #[serde(default = "default_workload_ids")]
    pub workload_ids: String,
    /// `required` (default, production): a launch is refused unless the workload gets its
    /// own identity. `best-effort` (dev): without root (or with an unreachable run
    /// directory) workloads share the agent's identity, with a printed warning.
    #[serde(default)]
    pub isolation: Isolation,
    /// Dev/test hosts only: allow `POST /v1/agent/dev/measure` (extend a PCR with a runtime
    /// measurement, standing for a host whose state changes after enrollment).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dev_measure: bool,
    /// `production` (default) or `dev` (module doc).
    #[serde(default)]
    pub mode: Mode,
    /// The agent API's TLS (required).
    pub tls: RawTls,
    /// `[net]`: the VMs' network proxies (`docs/network-sdp.md`).
    #[serde(default)]
    pub net: NetSettings,
}

/// `[net]`: how the agent runs its VMs' network proxies (`caas net serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSettings {
    /// How often each network proxy's key is asked for again (ms; also before the TTP's
    /// `rekey_at`): a rekey on revocation or on an operator's demand reaches the members
    /// within this long.
    #[serde(default = "default_key_poll_ms")]
    pub key_poll_ms: u64,
    /// The proxy's `--switch-after-ms`.
    #[serde(default = "default_switch_after_ms")]
    pub switch_after_ms: u64,
    /// The proxy's `--retire-after-ms` (how long the previous epoch is still accepted).
    #[serde(default = "default_retire_after_ms")]
    pub retire_after_ms: u64,
}

fn default_key_poll_ms() -> u64 {
    60_000
}
fn default_switch_after_ms() -> u64 {
    2_000
}
fn default_retire_after_ms() -> u64 {
    30_000
}

impl Default for NetSettings {
    fn default() -> Self {
        Self {
            key_poll_ms: default_key_poll_ms(),
            switch_after_ms: default_switch_after_ms(),
            retire_after_ms: default_retire_after_ms(),
        }
    }
}

/// `[tls]`: the deployment PKI as this agent uses it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The deployment CA certificate (PEM): every caller's client certificate must chain to
    /// it, and so must the key service's server certificate.
    pub ca: PathBuf,
    /// This agent's certificate (PEM, role `host`), served on its API and presented to
    /// the key service.
    pub cert: PathBuf,
    /// Its private key (PEM, keep it 0600).
    pub key: PathBuf,
    /// The deployment CA's revocation list (PEM, `caas pki revoke`): a caller whose client
    /// certificate is listed fails the handshake. Loaded at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// Production or dev.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Device TPM, HTTPS key service, no dev routes.
    #[default]
    Production,
    /// swtpm and a loopback HTTP key service allowed; `dev_measure` allowed.
    Dev,
}

/// Whether a launch needs its own workload identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Refuse a launch that cannot get its own uid (production).
    #[default]
    Required,
    /// Fall back to the agent's identity with a warning (dev).
    BestEffort,
}

/// A range of uids (used as gids too) for workload identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id.
    pub first: u32,
    /// Last id (inclusive).
    pub last: u32,
}

impl std::str::FromStr for IdRange {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Config(format!(
                "workload_ids '{s}': expected FIRST-LAST, 1000 ≤ FIRST ≤ LAST < 2^31"
            ))
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first < 1000 || first > last || last >= 1 << 31 {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

fn default_workload_ids() -> String {
    "200000-299999".into()
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}
fn default_listen() -> String {
    "127.0.0.1:7400".into()
}
fn default_event_log() -> PathBuf {
    PathBuf::from("/sys/kernel/security/tpm0/binary_bios_measurements")
}
fn default_ak() -> String {
    "ecc-p256".into()
}
fn default_bind_pcrs() -> Vec<u32> {
    (0..8).collect()
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Host name.
    pub name: String,
    /// TCTI.
    pub tcti: String,
    /// Listen address.
    pub listen: SocketAddr,
    /// Advertised URL (None: derived from the bound address).
    pub advertise_url: Option<String>,
    /// Key service base URL (no trailing slash).
    pub key_service_url: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Event log path.
    pub event_log: PathBuf,
    /// AK algorithm.
    pub ak_alg: caas_tpm::AkAlg,
    /// Bind-key PCRs.
    pub bind_pcrs: Vec<u32>,
    /// Cloud storage directory.
    pub storage_dir: PathBuf,
    /// Pinned TTP public keys, if configured.
    pub ttp_public_key: Option<caas_tl::TtpPublic>,
    /// Whether the dev measurement route is enabled.
    pub dev_measure: bool,
    /// Parent of the workloads' run directories.
    pub run_dir: PathBuf,
    /// Workload identities.
    pub workload_ids: IdRange,
    /// Whether a launch needs its own identity.
    pub isolation: Isolation,
    /// Production or dev.
    pub mode: Mode,
    /// The agent's TLS files (server certificate, client CA).
    pub tls: caas_tls::server::ServerTls,
    /// `[net]`.
    pub net: NetSettings,
}

impl AgentConfig {
    /// The client the agent reaches the key service with: over HTTPS, the deployment CA
    /// pinned, the `key-service` role required and the agent's own certificate presented;
    /// plain HTTP only for a dev agent's `http://` key service.
    pub fn key_service_client(
        &self,
        timeout: std::time::Duration,
    ) -> Result<caas_attest::client::HttpClient, Error> {
        if self.key_service_url.starts_with("https://") {
            let ca = self
                .tls
                .client_ca
                .clone()
                .ok_or_else(|| Error::Config("tls.ca is required".into()))?;
            Ok(caas_attest::client::HttpClient::with_tls(
                timeout,
                &caas_tls::client::ClientTls {
                    ca,
                    identity: Some(caas_tls::pki::CertFiles {
                        cert: self.tls.cert.clone(),
                        key: self.tls.key.clone(),
                    }),
                    server_role: Some(caas_tls::Role::KeyService),
                },
            )?)
        } else {
            Ok(caas_attest::client::HttpClient::new(timeout))
        }
    }
}

impl RawConfig {
    /// Parses TOML.
    pub fn from_toml(s: &str) -> Result<Self, Error> {
        toml::from_str(s).map_err(|e| Error::Config(e.to_string()))
    }

    /// Validates.
    pub fn validate(self) -> Result<AgentConfig, Error> {
        if !caas_attest::registrar::valid_name(&self.name) {
            return Err(Error::Config("name must match [A-Za-z0-9._-]{1,64}".into()));
        }
        caas_tpm::parse_tcti(&self.tcti).map_err(|e| Error::Config(e.to_string()))?;
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| Error::Config(format!("listen '{}' is not HOST:PORT", self.listen)))?;
        if !self.key_service_url.starts_with("http://")
            && !self.key_service_url.starts_with("https://")
        {
            return Err(Error::Config(
                "key_service_url must be an http(s) URL".into(),
            ));
        }
        if let Some(u) = &self.advertise_url
            && !u.starts_with("https://")
        {
            return Err(Error::Config(format!(
                "advertise_url '{u}': the agent API is served over HTTPS only"
            )));
        }
        if self.advertise_url.is_none() && listen.ip().is_unspecified() {
            return Err(Error::Config(format!(
                "listen {listen} is a wildcard address: set advertise_url to the https:// URL \
                 (a name or address in the agent's certificate) the key service should use"
            )));
        }
        if self.mode == Mode::Production {
            if !self.tcti.starts_with("device:") {
                return Err(Error::Config(format!(
                    "tcti '{}': production mode needs the host's TPM (device:/dev/tpmrm0); \
                     a software TPM is for mode = \"dev\" only",
                    self.tcti
                )));
            }
            if !self.key_service_url.starts_with("https://") {
                return Err(Error::Config(
                    "key_service_url must be https:// in production mode".into(),
                ));
            }
        }
        if self.dev_measure && (self.mode != Mode::Dev || self.tcti.starts_with("device:")) {
            return Err(Error::Config(
                "dev_measure (POST /v1/agent/dev/measure, extend a PCR) is for dev hosts on a \
                 software TPM only: it cannot be enabled in production mode or with a device TPM"
                    .into(),
            ));
        }
        let ak_alg = match self.ak_algorithm.as_str() {
            "ecc-p256" => caas_tpm::AkAlg::EccP256,
            "rsa-2048" => caas_tpm::AkAlg::Rsa2048,
            o => {
                return Err(Error::Config(format!(
                    "ak_algorithm '{o}': expected ecc-p256 or rsa-2048"
                )));
            }
        };
        let mut bind_pcrs = self.bind_pcrs.clone();
        bind_pcrs.sort_unstable();
        bind_pcrs.dedup();
        if bind_pcrs.is_empty() || bind_pcrs.iter().any(|p| *p >= 24) {
            return Err(Error::Config("bind_pcrs must list PCRs 0..23".into()));
        }
        let ttp_public_key = self
            .ttp_public_key
            .as_deref()
            .map(caas_tl::TtpPublic::from_text)
            .transpose()
            .map_err(|e| Error::Config(format!("ttp_public_key: {e}")))?;
        let storage_dir = self
            .storage_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("storage"));
        let workload_ids: IdRange = self.workload_ids.parse()?;
        let run_dir = self
            .run_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("run"));
        let tls = caas_tls::server::ServerTls {
            cert: self.tls.cert,
            key: self.tls.key,
            client_ca: Some(self.tls.ca),
            crl: self.tls.crl,
        };
        if self.net.key_poll_ms < 100 || self.net.retire_after_ms < self.net.switch_after_ms {
            return Err(Error::Config(
                "[net]: key_poll_ms must be at least 100 and retire_after_ms at least \
                 switch_after_ms"
                    .into(),
            ));
        }
        Ok(AgentConfig {
            net: self.net,
            mode: self.mode,
            tls,
            run_dir,
            workload_ids,
            isolation: self.isolation,
            storage_dir,
            ttp_public_key,
            dev_measure: self.dev_measure,
            name: self.name,
            tcti: self.tcti,
            listen,
            advertise_url: self.advertise_url,
            key_service_url: self.key_service_url.trim_end_matches('/').to_string(),
            state_dir: self.state_dir,
            event_log: self.event_log,
            ak_alg,
            bind_pcrs,
        })
    }
}

/// Reads and validates a config file.
pub fn load(path: &std::path::Path) -> Result<AgentConfig, Error> {
    let s = std::fs::read_to_string(path).map_err(Error::io(format!("read {}", path.display())))?;
    RawConfig::from_toml(&s)?.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str, expect: Result<(), &str>) {
        let r = RawConfig::from_toml(toml).and_then(|r| r.validate());
        match (r, expect) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e} !~ {want}"),
            (r, want) => panic!("{r:?} vs {want:?}"),
        }
    }

    #[test]
    fn config_cases() {
        let tls = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/h.pem\"\nkey = \"/p/h.key\"\n";
        let base = "name = \"h1\"\nmode = \"dev\"\nkey_service_url = \"http://127.0.0.1:1\"\nstate_dir = \"/tmp/x\"\n";
        let check = |head: &str, expect: Result<(), &str>| check(&format!("{head}{tls}"), expect);
        check(base, Ok(()));
        check(
            &format!("{base}tcti = \"swtpm:host=127.0.0.1,port=2321\"\n"),
            Ok(()),
        );
        check(&format!("{base}tcti = \"mssim:\"\n"), Err("TCTI"));
        check(&format!("{base}bogus = 1\n"), Err("unknown field"));
        check(
            &format!("{base}ak_algorithm = \"dsa\"\n"),
            Err("ak_algorithm"),
        );
        check(&format!("{base}bind_pcrs = [30]\n"), Err("bind_pcrs"));
        check(&format!("{base}workload_ids = \"5000-6000\"\n"), Ok(()));
        for bad in ["6000-5000", "10-20", "x-y", "5000"] {
            check(
                &format!("{base}workload_ids = \"{bad}\"\n"),
                Err("workload_ids"),
            );
        }
        check(&format!("{base}isolation = \"best-effort\"\n"), Ok(()));
        check(&format!("{base}isolation = \"none\"\n"), Err("isolation"));
        check(
            "name = \"bad name\"\nkey_service_url = \"http://x\"\nstate_dir = \"/x\"\n",
            Err("name"),
        );
    }

    #[test]
    fn production_mode_refuses_dev_settings() {
        let tls = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/h.pem\"\nkey = \"/p/h.key\"\n";
        let prod = "name = \"h1\"\nkey_service_url = \"https://ks:7300\"\nstate_dir = \"/x\"\n";
        check(&format!("{prod}{tls}"), Ok(()));
        // The example is a production config and loads as is.
        check(
            include_str!("../../../config/host-agent.example.toml"),
            Ok(()),
        );
        let cfg = RawConfig::from_toml(include_str!("../../../config/host-agent.example.toml"))
            .and_then(RawConfig::validate)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.mode, Mode::Production);
        assert!(!cfg.dev_measure);
        assert_eq!(cfg.tcti, "device:/dev/tpmrm0");
        // No TLS: refused (the API is never served in the clear).
        check(prod, Err("missing field `tls`"));
        check(
            &format!("{prod}tcti = \"swtpm:host=127.0.0.1,port=2321\"\n{tls}"),
            Err("production mode needs the host's TPM"),
        );
        check(
            &format!(
                "name = \"h1\"\nkey_service_url = \"http://ks:7300\"\nstate_dir = \"/x\"\n{tls}"
            ),
            Err("https"),
        );
        check(
            &format!("{prod}advertise_url = \"http://h1:7400\"\n{tls}"),
            Err("HTTPS only"),
        );
        check(
            &format!("{prod}listen = \"0.0.0.0:7400\"\n{tls}"),
            Err("advertise_url"),
        );
    }

    /// The PCR-extend route stands for "the host's state changed": on a real host it would
    /// let the management network make the TPM's PCRs say anything afterwards. It is refused
    /// at load in production mode and with a device TPM even in dev mode.
    #[test]
    fn dev_pcr_extend_route_cannot_be_enabled_outside_dev() {
        let tls = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/h.pem\"\nkey = \"/p/h.key\"\n";
        let prod = "name = \"h1\"\nkey_service_url = \"https://ks:7300\"\nstate_dir = \"/x\"\n";
        check(
            &format!("{prod}dev_measure = true\n{tls}"),
            Err("dev_measure"),
        );
        check(
            &format!("{prod}mode = \"production\"\ndev_measure = true\n{tls}"),
            Err("dev_measure"),
        );
        // Dev mode on the host's real TPM: still refused.
        check(
            &format!(
                "{prod}mode = \"dev\"\ntcti = \"device:/dev/tpmrm0\"\ndev_measure = true\n{tls}"
            ),
            Err("dev_measure"),
        );
        check(
            &format!(
                "{prod}mode = \"dev\"\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\ndev_measure = true\n{tls}"
            ),
            Ok(()),
        );
    }
}
