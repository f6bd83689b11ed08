//! Simulated compute hosts for `caas dev` and the tests. Phase 1, [`DevHosts::prepare`]:
//! a project-local swtpm_localca, per host a provisioned swtpm (EK and platform
//! certificates), the swtpm started on free ports, the host's agent config written, and the
//! measured boot run. Phase 2, after the key service trusts [`DevHosts::ca_cert_files`] and
//! is listening: [`DevHosts::start_agents`] starts one in-process host agent per host, each
//! of which enrolls. [`DevHosts::profile`] is the security profile matching the dev hosts;
//! [`DevHosts::env_lines`] the `DIR/env` lines.
//!
//! Dev hosts run the production code paths: each agent serves its API over TLS with a
//! certificate (role `host`) from the deployment CA in [`DevOptions::pki_dir`] (a
//! [`caas_tls::pki::DevCa`]), and answers only callers with certificates from it
//! ([`DevHosts::client`], [`DevHosts::agent_client`]). The TTP's public key, when given, is
//! configured in each agent (never fetched on first use).

use crate::agent::{RunningAgent, spawn};
use crate::boot::{dev_components, measured_boot, write_dev_boot_files};
use crate::config::RawConfig;
use crate::error::Error;
use caas_attest::{EventLog, HashAlg, SecurityProfile};
use caas_tls::Role;
use caas_tls::pki::DevCa;
use caas_tpm::Tpm;
use caas_tpm::swtpm::{LocalCa, Swtpm};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tls_err(e: caas_tls::Error) -> Error {
    Error::Config(format!("dev PKI: {e}"))
}

/// One simulated host.
#[derive(Debug)]
pub struct DevHost {
    /// Host name (`host-1`, ...).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its swtpm.
    pub swtpm: Swtpm,
    /// Agent config file (measured into PCR 5).
    pub config_path: PathBuf,
    /// Event log file.
    pub event_log_path: PathBuf,
    /// The running agent, after `start_agents`.
    pub agent: Option<RunningAgent>,
}

impl DevHost {
    /// TCTI of the host's swtpm.
    pub fn tcti(&self) -> String {
        self.swtpm.tcti()
    }
}

/// Options of [`DevHosts::prepare`].
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// Measured as the host-agent binary (default: the running executable).
    pub agent_binary: Option<PathBuf>,
    /// The deployment CA's directory (created if missing; default `<dir>/pki`).
    pub pki_dir: Option<PathBuf>,
    /// pk_TTP, configured in every agent (`ttp_public_key`).
    pub ttp_public_key: Option<caas_tl::TtpPublic>,
}

/// A set of simulated hosts.
#[derive(Debug)]
pub struct DevHosts {
    /// The local CA that issued the EK certificates.
    pub ca: LocalCa,
    /// The hosts.
    pub hosts: Vec<DevHost>,
    /// The cloud storage the hosts share (encrypted images, DBSP volumes).
    pub storage: PathBuf,
    /// The deployment CA's directory.
    pub pki_dir: PathBuf,
}

/// The PCRs dev profiles cover.
pub const DEV_PCRS: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

impl DevHosts {
    /// Phase 1 (blocking work runs on the blocking pool): CA, swtpms, measured boots.
    /// `key_service_url` goes into the agents' configs (it may be a placeholder that is
    /// overridden in `start_agents`, but the config file is measured, so pass the real
    /// one when known). See [`DevOptions`] for the rest.
    pub async fn prepare(
        dir: &Path,
        n: usize,
        key_service_url: &str,
        opts: DevOptions,
    ) -> Result<Self, Error> {
        let dir = dir.to_path_buf();
        let ks = key_service_url.to_string();
        tokio::task::spawn_blocking(move || Self::prepare_blocking(&dir, n, &ks, opts))
            .await
            .map_err(|e| Error::Config(format!("prepare task: {e}")))?
    }

    fn prepare_blocking(
        dir: &Path,
        n: usize,
        key_service_url: &str,
        opts: DevOptions,
    ) -> Result<Self, Error> {
        if n == 0 || n > 64 {
            return Err(Error::Config("number of dev hosts must be 1..64".into()));
        }
        let pki_dir = opts.pki_dir.clone().unwrap_or_else(|| dir.join("pki"));
        let pki = DevCa::load_or_create(&pki_dir).map_err(tls_err)?;
        let agent_binary = opts.agent_binary;
        let ca = LocalCa::create(&dir.join("tpm-ca"))?;
        let boot_dir = dir.join("boot");
        write_dev_boot_files(&boot_dir)?;
        let agent_binary = match agent_binary {
            Some(p) => p,
            None => std::env::current_exe().map_err(Error::io("current executable"))?,
        };
        let mut hosts = Vec::new();
        for i in 1..=n {
            let name = format!("host-{i}");
            let hdir = dir.join(&name);
            let state = hdir.join("tpm");
            // Reuse a provisioned TPM (same EK, same stored AK) when restarting on a DIR.
            if !state.join("tpm2-00.permall").exists() {
                ca.provision(&state)?;
            }
            let swtpm = Swtpm::start(&state)?;
            let config_path = hdir.join("agent.toml");
            let event_log_path = hdir.join("eventlog.bin");
            // The agent's server certificate (role host), re-issued at every start.
            let tls = pki
                .issue(&name, &[Role::Host], &["127.0.0.1", "localhost", &name])
                .map_err(tls_err)?;
            let raw = RawConfig {
                name: name.clone(),
                tcti: swtpm.tcti(),
                listen: "127.0.0.1:0".into(),
                advertise_url: None,
                key_service_url: key_service_url.to_string(),
                state_dir: hdir.join("agent-state"),
                event_log: event_log_path.clone(),
                ak_algorithm: "ecc-p256".into(),
                bind_pcrs: DEV_PCRS.to_vec(),
                storage_dir: Some(dir.join("storage")),
                ttp_public_key: opts.ttp_public_key.as_ref().map(|p| p.to_text()),
                dev_measure: true,
                mode: crate::config::Mode::Dev,
                tls: crate::config::RawTls {
                    ca: pki.ca_file(),
                    cert: tls.cert,
                    key: tls.key,
                    crl: None,
                },
                run_dir: None,
                workload_ids: "200000-299999".into(),
                // As root, dev hosts isolate workloads as production does; otherwise they
                // fall back to the agent's identity with a warning.
                isolation: crate::config::Isolation::BestEffort,
                net: dev_net_settings(),
            };
            let toml = toml::to_string(&raw).map_err(|e| Error::Config(e.to_string()))?;
            std::fs::write(&config_path, toml)
                .map_err(Error::io(format!("write {}", config_path.display())))?;
            let mut tpm = Tpm::open(&swtpm.tcti())?;
            measured_boot(
                &mut tpm,
                &dev_components(&boot_dir, &agent_binary, &config_path),
                &event_log_path,
            )?;
            drop(tpm);
            hosts.push(DevHost {
                name,
                dir: hdir,
                swtpm,
                config_path,
                event_log_path,
                agent: None,
            });
        }
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage)
            .map_err(Error::io(format!("create {}", storage.display())))?;
        Ok(Self {
            ca,
            hosts,
            storage,
            pki_dir,
        })
    }

    /// The deployment CA certificate (every agent's callers and the agents themselves chain
    /// to it).
    pub fn pki_ca_file(&self) -> PathBuf {
        self.pki_dir.join("ca.pem")
    }

    /// Issues a client certificate `name` with `role` from the dev CA.
    pub fn issue(&self, name: &str, role: Role) -> Result<caas_tls::pki::CertFiles, Error> {
        DevCa::load_or_create(&self.pki_dir)
            .and_then(|ca| ca.issue(name, &[role], &[]))
            .map_err(tls_err)
    }

    /// An HTTPS client to the agents holding a `role` certificate (named after the role).
    pub fn client(&self, role: Role) -> Result<caas_attest::client::HttpClient, Error> {
        Ok(caas_attest::client::HttpClient::with_tls(
            Duration::from_secs(120),
            &caas_tls::client::ClientTls {
                ca: self.pki_ca_file(),
                identity: Some(self.issue(role.name(), role)?),
                server_role: Some(Role::Host),
            },
        )?)
    }

    /// The key service's evidence source for these hosts (role `key-service`).
    pub fn agent_client(&self) -> Result<caas_attest::client::AgentClient, Error> {
        Ok(caas_attest::client::AgentClient {
            http: self.client(Role::KeyService)?,
        })
    }

    /// The shared cloud storage directory.
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// CA certificate files the registrar must trust.
    pub fn ca_cert_files(&self) -> Vec<PathBuf> {
        self.ca.ca_cert_files()
    }

    /// The registrar configuration of a dev key service: trusts this CA, gives newly
    /// enrolled hosts `default_profile`.
    pub fn registrar(
        &self,
        default_profile: &str,
    ) -> Result<caas_attest::registrar::Registrar, Error> {
        let mut ca = caas_attest::ekcert::EkCaStore::new();
        for f in self.ca_cert_files() {
            ca.add(&std::fs::read(&f).map_err(Error::io(format!("read {}", f.display())))?)?;
        }
        Ok(caas_attest::registrar::Registrar {
            ca,
            enrollment_ttl_ms: 60_000,
            default_profile: Some(default_profile.to_string()),
        })
    }

    /// A profile that accepts every dev host's boot (PCRs 0–7, sha256).
    pub fn profile(&self, name: &str) -> Result<SecurityProfile, Error> {
        let mut profile: Option<SecurityProfile> = None;
        for h in &self.hosts {
            let bytes = std::fs::read(&h.event_log_path)
                .map_err(Error::io(format!("read {}", h.event_log_path.display())))?;
            let log = EventLog::parse(&bytes)?;
            match profile.as_mut() {
                None => {
                    profile = Some(SecurityProfile::from_event_log(
                        name,
                        &log,
                        HashAlg::Sha256,
                        &DEV_PCRS,
                    )?)
                }
                Some(p) => p.merge_event_log(&log)?,
            }
        }
        let mut p = profile.ok_or_else(|| Error::Config("no hosts".into()))?;
        p.description =
            "caas dev hosts: measured firmware, bootloader, kernel, hypervisor, host agent".into();
        Ok(p)
    }

    /// Phase 2: starts every host's agent and waits (≤ `timeout`) until all are enrolled.
    pub async fn start_agents(&mut self, timeout: Duration) -> Result<(), Error> {
        for h in &mut self.hosts {
            let cfg = crate::config::load(&h.config_path)?;
            h.agent = Some(spawn(cfg).await?);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .hosts
                .iter()
                .all(|h| h.agent.as_ref().is_some_and(|a| a.agent.is_enrolled()))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let missing: Vec<&str> = self
                    .hosts
                    .iter()
                    .filter(|h| !h.agent.as_ref().is_some_and(|a| a.agent.is_enrolled()))
                    .map(|h| h.name.as_str())
                    .collect();
                return Err(Error::Config(format!(
                    "hosts not enrolled within {timeout:?}: {}",
                    missing.join(",")
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `DIR/env` lines: `CAAS_HOSTS`, `CAAS_HOST_<NAME>_TCTI`, `CAAS_HOST_<NAME>_URL`,
    /// `CAAS_PROFILE`.
    pub fn env_lines(&self, profile: &str) -> String {
        let mut s = format!(
            "CAAS_HOSTS={}\n",
            self.hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        for h in &self.hosts {
            let key = h.name.to_uppercase().replace(['-', '.'], "_");
            s.push_str(&format!("CAAS_HOST_{key}_TCTI={}\n", h.tcti()));
            if let Some(a) = &h.agent {
                s.push_str(&format!("CAAS_HOST_{key}_URL={}\n", a.url));
            }
        }
        s.push_str(&format!("CAAS_PROFILE={profile}\n"));
        s
    }
}

/// Dev hosts' `[net]`: the defaults, each overridable by `CAAS_DEV_NET_KEY_POLL_MS`,
/// `CAAS_DEV_NET_SWITCH_AFTER_MS`, `CAAS_DEV_NET_RETIRE_AFTER_MS` (tests shorten them).
fn dev_net_settings() -> crate::config::NetSettings {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let d = crate::config::NetSettings::default();
    crate::config::NetSettings {
        key_poll_ms: env("CAAS_DEV_NET_KEY_POLL_MS", d.key_poll_ms),
        switch_after_ms: env("CAAS_DEV_NET_SWITCH_AFTER_MS", d.switch_after_ms),
        retire_after_ms: env("CAAS_DEV_NET_RETIRE_AFTER_MS", d.retire_after_ms),
    }
}
