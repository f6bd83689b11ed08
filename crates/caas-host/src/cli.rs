//! The attestation part of the `caas` CLI: `caas host serve|list|show|set-profile`,
//! `caas attest HOST` and `caas profile create|list|show|update|from-log`. The binary
//! crate wires these clap types in and calls the `run_*` functions; each returns the
//! process exit code. Key-service calls go to `--endpoint` (`CAAS_KMS_ENDPOINT`) with the
//! client the binary passes in: it signs them with an operator's access key (the key
//! service refuses unauthenticated operator calls).

use caas_attest::client::HttpClient;
use caas_attest::service::{AssignProfile, HostView};
use caas_attest::{EventLog, HashAlg, SecurityProfile, Verdict};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Where the key service is.
#[derive(Debug, Clone, Args)]
pub struct KeyServiceArgs {
    /// Key-service base URL.
    #[arg(
        long,
        env = "CAAS_KMS_ENDPOINT",
        default_value = "http://127.0.0.1:7300"
    )]
    pub endpoint: String,
}

impl KeyServiceArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint.trim_end_matches('/'))
    }
}

/// `caas host ...`
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Run the host agent (owns this host's TPM).
    Serve {
        /// Agent config file (TOML).
        #[arg(long, env = "CAAS_HOST_CONFIG")]
        config: PathBuf,
        /// Workload identities FIRST-LAST (overrides the config's `workload_ids`).
        #[arg(long, value_name = "FIRST-LAST")]
        workload_ids: Option<String>,
    },
    /// List hosts known to the key service: state, profile, trust and last verdict.
    List(KeyServiceArgs),
    /// Show one host as JSON.
    Show {
        /// Host name.
        name: String,
        #[command(flatten)]
        ks: KeyServiceArgs,
    },
    /// Assign a security profile to a host (it is untrusted until its next attestation).
    SetProfile {
        /// Host name.
        name: String,
        /// Profile name.
        profile: String,
        #[command(flatten)]
        ks: KeyServiceArgs,
    },
}

/// `caas attest HOST`
#[derive(Debug, Args)]
pub struct AttestArgs {
    /// Host name.
    pub host: String,
    #[command(flatten)]
    pub ks: KeyServiceArgs,
}

/// `caas profile ...`
#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Create a profile from a JSON or TOML file.
    Create {
        /// Profile file.
        file: PathBuf,
        #[command(flatten)]
        ks: KeyServiceArgs,
    },
    /// List profiles.
    List(KeyServiceArgs),
    /// Show a profile as JSON.
    Show {
        /// Profile name.
        name: String,
        #[command(flatten)]
        ks: KeyServiceArgs,
    },
    /// Replace a profile from a JSON or TOML file.
    Update {
        /// Profile file.
        file: PathBuf,
        #[command(flatten)]
        ks: KeyServiceArgs,
    },
    /// Print (locally) a profile that accepts exactly the boot recorded in an event log.
    FromLog {
        /// Profile name.
        name: String,
        /// TCG binary event log.
        log: PathBuf,
        /// PCRs to cover (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4,5,6,7")]
        pcrs: Vec<u32>,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn read_profile(file: &PathBuf) -> anyhow::Result<SecurityProfile> {
    let s = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", file.display()))?;
    let p: SecurityProfile = if s.trim_start().starts_with('{') {
        serde_json::from_str(&s)?
    } else {
        toml::from_str(&s)?
    };
    p.validate()?;
    Ok(p)
}

/// Runs `caas host ...`.
pub async fn run_host(
    cmd: HostCommand,
    operator: impl FnOnce() -> anyhow::Result<HttpClient>,
) -> anyhow::Result<i32> {
    if let HostCommand::Serve {
        config,
        workload_ids,
    } = cmd
    {
        let mut cfg = crate::config::load(&config)?;
        if let Some(ids) = workload_ids {
            cfg.workload_ids = ids.parse()?;
        }
        crate::agent::serve(cfg).await?;
        return Ok(0);
    }
    let http = operator()?;
    match cmd {
        HostCommand::Serve { .. } => {}
        HostCommand::List(ks) => {
            let hosts: Vec<HostView> = http.get(&ks.url("/v1/attest/hosts")).await?;
            println!(
                "{:<20} {:<9} {:<8} {:<16} LAST VERDICT",
                "HOST", "STATE", "TRUSTED", "PROFILE"
            );
            for h in hosts {
                let last = h.last_verdict.as_ref().map_or("-".to_string(), |v| {
                    if v.trusted {
                        "trusted".into()
                    } else {
                        caas_attest::verifier::reason_codes(v)
                    }
                });
                let state = serde_json::to_value(h.state)?
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                println!(
                    "{:<20} {:<9} {:<8} {:<16} {last}",
                    h.name,
                    state,
                    h.trusted,
                    h.profile.as_deref().unwrap_or("-")
                );
            }
        }
        HostCommand::Show { name, ks } => {
            let h: HostView = http
                .get(&ks.url(&format!("/v1/attest/hosts/{name}")))
                .await?;
            print_json(&h)?;
        }
        HostCommand::SetProfile { name, profile, ks } => {
            let h: HostView = http
                .put(
                    &ks.url(&format!("/v1/attest/hosts/{name}/profile")),
                    &AssignProfile { profile },
                )
                .await?;
            print_json(&h)?;
        }
    }
    Ok(0)
}

/// Runs `caas attest HOST`: prints the verdict; exit code 0 when trusted, 1 when not.
pub async fn run_attest(args: AttestArgs, http: HttpClient) -> anyhow::Result<i32> {
    let v: Verdict = http
        .post(
            &args
                .ks
                .url(&format!("/v1/attest/hosts/{}/attest", args.host)),
            &serde_json::json!({}),
        )
        .await?;
    print_json(&v)?;
    Ok(if v.trusted { 0 } else { 1 })
}

/// Runs `caas profile ...`.
pub async fn run_profile(
    cmd: ProfileCommand,
    operator: impl FnOnce() -> anyhow::Result<HttpClient>,
) -> anyhow::Result<i32> {
    if let ProfileCommand::FromLog { name, log, pcrs } = &cmd {
        let bytes =
            std::fs::read(log).map_err(|e| anyhow::anyhow!("read {}: {e}", log.display()))?;
        let p = SecurityProfile::from_event_log(
            name,
            &EventLog::parse(&bytes)?,
            HashAlg::Sha256,
            pcrs,
        )?;
        print_json(&p)?;
        return Ok(0);
    }
    let http = operator()?;
    match cmd {
        ProfileCommand::Create { file, ks } => {
            let p = read_profile(&file)?;
            let created: SecurityProfile = http.post(&ks.url("/v1/attest/profiles"), &p).await?;
            print_json(&created)?;
        }
        ProfileCommand::List(ks) => {
            let ps: Vec<SecurityProfile> = http.get(&ks.url("/v1/attest/profiles")).await?;
            for p in ps {
                println!(
                    "{}\t{}\tpcrs={:?}",
                    p.name,
                    p.bank.name(),
                    p.pcrs.keys().collect::<Vec<_>>()
                );
            }
        }
        ProfileCommand::Show { name, ks } => {
            let p: SecurityProfile = http
                .get(&ks.url(&format!("/v1/attest/profiles/{name}")))
                .await?;
            print_json(&p)?;
        }
        ProfileCommand::Update { file, ks } => {
            let p = read_profile(&file)?;
            let updated: SecurityProfile = http
                .put(&ks.url(&format!("/v1/attest/profiles/{}", p.name)), &p)
                .await?;
            print_json(&updated)?;
        }
        ProfileCommand::FromLog { .. } => {}
    }
    Ok(0)
}
