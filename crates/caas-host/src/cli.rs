//! The attestation part of the `caas` CLI: `caas host serve|list|show|set-profile`,
//! `caas attest HOST` and `caas profile create|list|show|update|from-log`. The binary
//! crate wires these clap types in and calls the `run_*` functions; each returns the
//! process exit code. Key-service calls go to `--endpoint` (`CAAS_KMS_ENDPOINT`) with the
//! client the binary passes in: it signs them with an operator's access key (the key
//! service refuses unauthenticated operator calls).
//!
//! The operator's calls to a host agent (`caas host workloads|stop|suspend|resume|status|audit|
//! attestation-document|open-recipient --agent URL`) go over HTTPS with the deployment CA pinned and the operator's client certificate
//! ([`OperatorArgs`]: `CAAS_PKI_CA`, `CAAS_OPERATOR_CERT`, `CAAS_OPERATOR_KEY`, which `caas
//! dev` writes to `DIR/env`).

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

/// `DIR/env` variable: the deployment CA certificate.
pub const ENV_PKI_CA: &str = "CAAS_PKI_CA";
/// `DIR/env` variable: the operator's client certificate for host agents.
pub const ENV_OPERATOR_CERT: &str = "CAAS_OPERATOR_CERT";
/// `DIR/env` variable: its key.
pub const ENV_OPERATOR_KEY: &str = "CAAS_OPERATOR_KEY";

/// An operator's credentials for the host agents' management API.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// The deployment CA (PEM) the agent's certificate must chain to.
    #[arg(long = "pki-ca", env = ENV_PKI_CA)]
    pub ca: PathBuf,
    /// The operator's client certificate (PEM, role operator).
    #[arg(long = "operator-cert", env = ENV_OPERATOR_CERT)]
    pub cert: PathBuf,
    /// Its key (PEM).
    #[arg(long = "operator-key", env = ENV_OPERATOR_KEY)]
    pub key: PathBuf,
}

impl OperatorArgs {
    /// From `CAAS_PKI_CA`, `CAAS_OPERATOR_CERT`, `CAAS_OPERATOR_KEY`.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str| {
            std::env::var_os(k)
                .map(PathBuf::from)
                .ok_or_else(|| anyhow::anyhow!("{k} is not set (source the deployment's env)"))
        };
        Ok(Self {
            ca: var(ENV_PKI_CA)?,
            cert: var(ENV_OPERATOR_CERT)?,
            key: var(ENV_OPERATOR_KEY)?,
        })
    }

    /// An HTTPS client that presents the operator's certificate and talks only to agents
    /// (role `host`) whose certificates chain to the CA.
    pub fn client(&self) -> anyhow::Result<HttpClient> {
        Ok(HttpClient::with_tls(
            std::time::Duration::from_secs(120),
            &caas_tls::client::ClientTls {
                ca: self.ca.clone(),
                identity: Some(caas_tls::pki::CertFiles {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                }),
                server_role: Some(caas_tls::Role::Host),
            },
        )?)
    }
}

/// Where a host agent is, and the operator's credentials.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The agent's base URL (https://...).
    #[arg(long)]
    pub agent: String,
    #[command(flatten)]
    pub operator: OperatorArgs,
}

impl AgentArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.agent.trim_end_matches('/'))
    }
}

/// `caas host ...`
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Run the host agent (owns this host's TPM; HTTPS API, every route but /healthz needs
    /// a client certificate from the deployment CA with a role the route allows).
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
    /// List a host agent's workloads (operator certificate).
    Workloads(AgentArgs),
    /// Stop a workload and its crypto domain on a host agent (operator certificate).
    Stop {
        /// id_vm.
        vm: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Suspend a VM into an encrypted saved state in the storage (operator certificate;
    /// no key or plaintext state is returned).
    Suspend {
        /// id_vm.
        vm: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Resume a suspended VM on this host agent (operator certificate): the TTP releases
    /// the state key only to a trusted host of the workload's profile.
    Resume {
        /// id_vm.
        vm: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// A host agent's status (operator certificate).
    Status(AgentArgs),
    /// A host agent's hash-chained audit log, verified (operator certificate).
    Audit(AgentArgs),
    /// Make a recipient attestation document (`docs/recipient.md`): a nonce from the key
    /// service for HOST, then a fresh TPM-resident recipient key, its certification and a
    /// quote from HOST's agent. Writes the document (JSON, the bytes to pass as
    /// `Recipient.AttestationDocument`) to --out.
    AttestationDocument {
        /// The host's name at the registrar.
        #[arg(long)]
        host: String,
        /// Where to write the document.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        agent: AgentArgs,
        #[command(flatten)]
        ks: KeyServiceArgs,
    },
    /// Open a `CiphertextForRecipient` with the TPM-resident key of a document this caller
    /// asked for (the agent's TPM refuses when the PCRs changed). The secret goes to --out
    /// (created 0600) or, without --out, to stdout in base64; never to a log.
    OpenRecipient {
        /// The document (as written by `attestation-document`).
        #[arg(long)]
        document: PathBuf,
        /// The `CiphertextForRecipient` (raw bytes).
        #[arg(long)]
        ciphertext: PathBuf,
        /// Where to write the secret (raw bytes).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        agent: AgentArgs,
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
    // Calls to a host agent: the operator's client certificate, no key-service credentials.
    let cmd = match cmd {
        HostCommand::Workloads(a) => {
            let v: serde_json::Value = a
                .operator
                .client()?
                .get(&a.url("/v1/agent/workloads"))
                .await?;
            print_json(&v)?;
            return Ok(0);
        }
        HostCommand::Stop { vm, agent } => {
            let v: serde_json::Value = agent
                .operator
                .client()?
                .post(
                    &agent.url(&format!("/v1/agent/workloads/{vm}/stop")),
                    &serde_json::json!({}),
                )
                .await?;
            print_json(&v)?;
            return Ok(0);
        }
        HostCommand::Suspend { vm, agent } => {
            let v: serde_json::Value = agent
                .operator
                .client()?
                .post(
                    &agent.url(&format!("/v1/agent/workloads/{vm}/suspend")),
                    &serde_json::json!({}),
                )
                .await?;
            print_json(&v)?;
            return Ok(0);
        }
        HostCommand::Resume { vm, agent } => {
            let v: serde_json::Value = agent
                .operator
                .client()?
                .post(
                    &agent.url("/v1/agent/resume"),
                    &serde_json::json!({ "vm_id": vm }),
                )
                .await?;
            print_json(&v)?;
            return Ok(0);
        }
        HostCommand::Status(a) => {
            let v: serde_json::Value = a.operator.client()?.get(&a.url("/v1/agent/status")).await?;
            print_json(&v)?;
            return Ok(0);
        }
        HostCommand::Audit(a) => {
            let v: serde_json::Value = a.operator.client()?.get(&a.url("/v1/agent/audit")).await?;
            print_json(&v)?;
            return Ok(0);
        }
        HostCommand::OpenRecipient {
            document,
            ciphertext,
            out,
            agent,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("read {}: {e}", p.display()))
            };
            let req = crate::recipient::OpenRequest {
                document: read(&document)?,
                ciphertext: read(&ciphertext)?,
            };
            let r: crate::recipient::OpenReply = agent
                .operator
                .client()?
                .post(&agent.url("/v1/agent/recipient/open"), &req)
                .await?;
            let secret = caas_crypto::SecretBytes::new(r.plaintext);
            match out {
                Some(p) => caas_crypto::fs::write_secret(&p, secret.expose(), None)
                    .map_err(|e| anyhow::anyhow!("write {}: {e}", p.display()))?,
                None => println!("{}", caas_attest::b64::encode(secret.expose())),
            }
            return Ok(0);
        }
        other => other,
    };
    let http = operator()?;
    match cmd {
        HostCommand::Serve { .. }
        | HostCommand::Workloads(_)
        | HostCommand::Stop { .. }
        | HostCommand::Suspend { .. }
        | HostCommand::Resume { .. }
        | HostCommand::Status(_)
        | HostCommand::OpenRecipient { .. }
        | HostCommand::Audit(_) => {}
        HostCommand::AttestationDocument {
            host,
            out,
            agent,
            ks,
        } => {
            let ch: caas_attest::verifier::Challenge = http
                .post(
                    &ks.url("/v1/recipient/challenge"),
                    &serde_json::json!({ "host": host }),
                )
                .await?;
            let r: crate::recipient::DocumentReply = agent
                .operator
                .client()?
                .post(&agent.url("/v1/agent/recipient/document"), &ch)
                .await?;
            std::fs::write(&out, &r.document)
                .map_err(|e| anyhow::anyhow!("write {}: {e}", out.display()))?;
            println!("{}", out.display());
        }
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
