//! `caas dev`: the all-in-one local deployment in one data directory. The key service is
//! the production one (`crate::key_service::serve`, every role, every route authenticated);
//! dev only creates the first tenant and the first operator and writes their credentials.
//!
//! Layout of DIR: `node.key` (0600, the node key — outside the database, as the docs say
//! for dev mode), `node.key.audit-checkpoint` (the signed audit-head checkpoint, see
//! `caas_kms::checkpoint`), `kms.sqlite3` (the store), `dev.json` (0600: the dev tenant's account and
//! access key, the dev operator's access key), `env` (0600: shell `export` lines for every endpoint and credential, including
//! the dev tenant's secret access key — dev mode only), `dev.pid`, `dev.log` (detached).
//! Restarting on the same DIR keeps every key and the same credentials.
use anyhow::{Context, Result, bail};
use caas_kms::KmsParams;
use caas_kms::config::ServeParams;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Region of the dev deployment.
pub const DEV_REGION: &str = "us-east-1";

/// `caas dev` arguments.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// `caas dev stop` stops a detached deployment.
    #[command(subcommand)]
    pub cmd: Option<DevCmd>,
    /// Data directory (created if missing).
    #[arg(long, env = "CAAS_DEV_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Key-service listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub listen: String,
    /// Start in the background and return once it serves.
    #[arg(long)]
    pub detach: bool,
    /// Seconds between maintenance runs (scheduled deletion, automatic rotation).
    #[arg(long, default_value_t = 60)]
    pub maintenance_secs: u64,
    /// Simulated compute hosts to start (each with its own swtpm, measured boot and host
    /// agent), enrolled and continuously attested by the dev key service.
    #[arg(long, default_value_t = 0)]
    pub hosts: usize,
    /// Seconds between continuous attestations of the dev hosts.
    #[arg(long, default_value_t = 10)]
    pub attest_secs: u64,
    /// Start even though the audit chain is behind this node's checkpoint (a deliberate
    /// database restore); the acceptance is itself audited.
    #[arg(long)]
    pub accept_audit_rollback: bool,
    /// When the audit records of key use are durable: `bounded` (within 10 ms of the
    /// reply, the default) or `strict` (before the reply); see `[storage] audit_durability`.
    #[arg(long, env = "CAAS_AUDIT_DURABILITY", default_value = "bounded")]
    pub audit_durability: caas_kms::config::AuditDurability,
}

/// `caas dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Stop the detached deployment in DIR.
    Stop,
}

/// The default data directory (`./.dev`).
pub fn default_dir() -> PathBuf {
    PathBuf::from(".dev")
}

/// Says whether the dev hosts can run real VMs (the qemu driver) or only workload processes.
fn print_vm_support() {
    let qemu = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|q| q.is_file())
    });
    match qemu {
        Some(q) => println!(
            "caas dev: the hosts run real VMs with {} (`caas tenant launch --driver qemu`; \
             accelerator from CAAS_QEMU_ACCEL, TCG by default) or workload processes \
             (`--driver process`)",
            q.display()
        ),
        None => println!(
            "caas dev: qemu-system-x86_64 is not installed: the hosts run workload processes \
             only (`--driver process`); for real VMs install qemu-system-x86 with qemu-utils \
             (scripts/install-deps)"
        ),
    }
}

/// Key-service parameters of a dev data directory.
pub fn kms_params(dir: &Path) -> KmsParams {
    KmsParams {
        region: DEV_REGION.into(),
        database: format!("sqlite:{}", dir.join("kms.sqlite3").display()),
        node_key_file: dir.join("node.key"),
        create_node_key: true,
        domain_key_rotation: Some(Duration::from_secs(24 * 3600)),
        domain: None,
        audit_durability: Default::default(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DevState {
    account: String,
    access_key_id: String,
    /// Dev mode only: the dev tenant's secret, so that restarts keep the same credentials.
    secret_access_key: String,
    /// The dev operator (every permission); absent in data dirs of older versions.
    #[serde(default)]
    operator: Option<DevOperator>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DevOperator {
    access_key_id: String,
    /// Dev mode only, like the tenant's.
    secret_access_key: String,
}

/// Reads `export NAME='value'` lines of an env file.
pub fn read_env(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect())
}

fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// Runs `caas dev`.
pub async fn run(args: DevArgs) -> Result<()> {
    let dir = args.data_dir.clone().unwrap_or_else(default_dir);
    if let Some(DevCmd::Stop) = args.cmd {
        return stop(&dir).await;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if args.detach {
        return detach(&dir, &args).await;
    }
    if let Some(pid) = running_pid(&dir) {
        bail!(
            "a dev deployment (pid {pid}) is already running in {}",
            dir.display()
        );
    }
    let serve_params = ServeParams {
        kms: KmsParams {
            audit_durability: args.audit_durability,
            ..kms_params(&dir)
        },
        listen: args
            .listen
            .parse()
            .with_context(|| format!("--listen {}", args.listen))?,
        tls: None,
        maintenance_interval: Duration::from_secs(args.maintenance_secs.max(1)),
    };
    // The key service holds keys in this process: no core dumps, no ptrace (before any key).
    crate::key_service::harden()?;
    std::fs::write(dir.join("dev.pid"), std::process::id().to_string())?;
    let _ = std::fs::remove_file(dir.join("env"));
    let result = async {
        let bound = crate::key_service::bind(&serve_params, args.accept_audit_rollback).await?;
        // First start: the dev tenant and operator and their access keys; later starts
        // reuse them.
        let mut vars = prepare_tenant(&bound.kms, &dir, bound.addr).await?;
        let interval = Duration::from_secs(args.attest_secs.max(1));
        let (mut hosts, attestation, agents) = match args.hosts {
            0 => (
                None,
                crate::key_service::attest::AttestationParams {
                    interval,
                    ..Default::default()
                },
                None,
            ),
            n => {
                let (h, p, a) = crate::dev_hosts::prepare(
                    &dir,
                    n,
                    &bound.kms,
                    &format!("http://{}", bound.addr),
                    interval,
                )
                .await?;
                (Some(h), p, Some(a))
            }
        };
        let params = crate::key_service::config::KeyServiceParams {
            serve: serve_params,
            attestation,
            tl: crate::key_service::config::TlParams {
                deliver_revocations: std::env::var("CAAS_DEV_DELIVER_REVOCATIONS")
                    .map_or(true, |v| v != "0"),
                ..Default::default()
            },
            // Its agents' client is the dev PKI's (`agents` below), not a config section.
            agents: None,
        };
        let roles = crate::key_service::Roles::open(
            bound.kms.clone(),
            &params.attestation,
            &params.tl,
            agents,
        )
        .await?;
        vars.push(("CAAS_TTP_PUBLIC_KEY".into(), roles.tl.public()?.to_text()));
        let server = tokio::spawn(crate::key_service::serve(params, bound, roles.clone()));
        if let Some(h) = hosts.as_mut() {
            if let Err(e) = crate::dev_hosts::start(h, &roles).await {
                server.abort();
                return Err(e);
            }
            vars.extend(crate::dev_hosts::env(h)?);
            print_vm_support();
        }
        let roles = start_roles(&dir, &vars).await;
        let (domain, volume) = match roles {
            Ok(r) => r,
            Err(e) => {
                server.abort();
                return Err(e);
            }
        };
        vars.extend(domain.env());
        vars.extend(
            volume
                .env_lines()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        write_env(&dir, &vars)?;
        println!("caas dev: ready — `. {}/env`", dir.display());
        let served = server.await;
        let mut domain = domain;
        domain.stop();
        let _ = volume.stop().await;
        drop(hosts);
        served.map_err(|e| anyhow::anyhow!("key service task: {e}"))?
    }
    .await;
    let _ = std::fs::remove_file(dir.join("dev.pid"));
    result
}

/// Starts the dev tenant's crypto domain (VSM) and demo encrypted volume (SDP). The volume's
/// data key and the VSM's domain key come from the dev key service (under
/// `alias/caas-dev-volume`); only their wrapped forms are stored.
async fn start_roles(
    dir: &Path,
    vars: &[(String, String)],
) -> Result<(caas_domc::dev::DevDomain, caas_sdp::dev::DevVolume)> {
    let exe = std::env::current_exe()?;
    let get = |k: &str| {
        vars.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let client = caas_kms::client::KmsClient::new(
        &get("CAAS_KMS_ENDPOINT"),
        DEV_REGION,
        &get("AWS_ACCESS_KEY_ID"),
        caas_crypto::SecretBytes::new(get("AWS_SECRET_ACCESS_KEY").into_bytes()),
        None,
    )?;
    const ALIAS: &str = "alias/caas-dev-volume";
    if client
        .call("DescribeKey", &serde_json::json!({ "KeyId": ALIAS }))
        .await
        .is_err()
    {
        let k = client
            .call(
                "CreateKey",
                &serde_json::json!({ "Description": "caas dev: demo volume data keys" }),
            )
            .await?;
        client.call("CreateAlias", &serde_json::json!({ "AliasName": ALIAS, "TargetKeyId": k["KeyMetadata"]["KeyId"] })).await?;
    }
    // The VSM's domain key: wrapped under the dev key service on disk, never in plaintext.
    let key = crate::roles::dev_vsm_key(&client, ALIAS, &dir.join("domc")).await?;
    let d = dir.to_path_buf();
    let domain =
        tokio::task::spawn_blocking(move || caas_domc::dev::start_with_key(&d, &exe, Some(key)))
            .await?
            .map_err(|e| anyhow::anyhow!("dev crypto domain: {e}"))?;
    let provider = crate::roles::KmsDataKeys::new(client, ALIAS);
    let volume = caas_sdp::dev::start_dev(dir, Some(std::sync::Arc::new(provider)))
        .await
        .map_err(|e| anyhow::anyhow!("dev volume: {e}"))?;
    Ok((domain, volume))
}

async fn prepare_tenant(
    kms: &caas_kms::Kms,
    dir: &Path,
    addr: std::net::SocketAddr,
) -> Result<Vec<(String, String)>> {
    let state_path = dir.join("dev.json");
    let state = match std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<DevState>(&b).ok())
    {
        Some(s) if s.operator.is_some() => s,
        Some(mut s) => {
            s.operator = Some(create_operator(kms).await?);
            caas_crypto::fs::write_secret(
                &state_path,
                serde_json::to_string_pretty(&s)?.as_bytes(),
                None,
            )?;
            s
        }
        None => {
            let account = kms
                .create_account("dev-tenant")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (akid, secret) = kms
                .create_access_key(&account, "dev")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let s = DevState {
                account,
                access_key_id: akid,
                secret_access_key: String::from_utf8_lossy(secret.expose()).into_owned(),
                operator: Some(create_operator(kms).await?),
            };
            caas_crypto::fs::write_secret(
                &state_path,
                serde_json::to_string_pretty(&s)?.as_bytes(),
                None,
            )?;
            s
        }
    };
    let secret = state.secret_access_key.clone();
    let endpoint = format!("http://{addr}");
    let (op_id, op_secret) = state
        .operator
        .as_ref()
        .map(|o| (o.access_key_id.clone(), o.secret_access_key.clone()))
        .unwrap_or_default();
    let vars: Vec<(&str, String)> = vec![
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_ENDPOINT_URL_KMS", endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", state.access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_DEFAULT_REGION", DEV_REGION.into()),
        ("AWS_REGION", DEV_REGION.into()),
        ("CAAS_DEV_DIR", dir.display().to_string()),
        ("CAAS_KMS_ENDPOINT", endpoint),
        ("CAAS_ACCOUNT_ID", state.account.clone()),
        // The first operator (every permission): `caas attest`, `caas profile`, `caas host`.
        ("CAAS_OPERATOR_ACCESS_KEY_ID", op_id),
        ("CAAS_OPERATOR_SECRET_ACCESS_KEY", op_secret),
        (
            "CAAS_AUDIT_PUBLIC_KEY",
            kms.audit_public_key()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        ),
    ];
    println!(
        "caas dev: key service on http://{addr}; account {}",
        state.account
    );
    Ok(vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// The dev operator: every permission.
async fn create_operator(kms: &caas_kms::Kms) -> Result<DevOperator> {
    let (id, secret) = kms
        .create_operator(
            "dev-operator",
            caas_kms::operator::Permission::ALL.into_iter().collect(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(DevOperator {
        access_key_id: id,
        secret_access_key: String::from_utf8_lossy(secret.expose()).into_owned(),
    })
}

/// Writes `DIR/env` (mode 0600) once every role is up: its presence means "ready".
fn write_env(dir: &Path, vars: &[(String, String)]) -> Result<()> {
    let mut text = String::from(
        "# caas dev deployment — source this file: . ./env\n# Dev mode only: this file holds the dev tenant's and the dev operator's secret access keys and token PINs (mode 0600).\n",
    );
    for (k, v) in vars {
        text.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    Ok(caas_crypto::fs::write_secret(
        &dir.join("env"),
        text.as_bytes(),
        None,
    )?)
}

fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("dev.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Liveness via /proc (a stale pid file from a crash is ignored).
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

async fn health(dir: &Path) -> bool {
    let Ok(env) = read_env(&dir.join("env")) else {
        return false;
    };
    let Some((_, ep)) = env.iter().find(|(k, _)| k == "CAAS_KMS_ENDPOINT") else {
        return false;
    };
    let Some(hostport) = ep.strip_prefix("http://") else {
        return false;
    };
    tokio::net::TcpStream::connect(hostport).await.is_ok()
}

/// True when a deployment is serving from DIR.
pub async fn is_running(dir: &Path) -> bool {
    running_pid(dir).is_some() && health(dir).await
}

async fn detach(dir: &Path, args: &DevArgs) -> Result<()> {
    if is_running(dir).await {
        println!("caas dev: already running in {}", dir.display());
        return Ok(());
    }
    let _ = std::fs::remove_file(dir.join("dev.pid"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dev.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("dev")
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(&args.listen)
        .arg("--maintenance-secs")
        .arg(args.maintenance_secs.to_string())
        .arg("--hosts")
        .arg(args.hosts.to_string())
        .arg("--attest-secs")
        .arg(args.attest_secs.to_string())
        .arg("--audit-durability")
        .arg(args.audit_durability.as_str());
    if args.accept_audit_rollback {
        cmd.arg("--accept-audit-rollback");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // New session: the deployment survives the shell that started it (no SIGHUP).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("cannot start the dev deployment")?;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the dev deployment exited ({status}); see {}",
                dir.join("dev.log").display()
            );
        }
        if running_pid(dir).is_some() && health(dir).await {
            println!(
                "caas dev: running in the background (pid {}); `. {}/env`; stop with `caas dev stop --data-dir {}`",
                child.id(),
                dir.display(),
                dir.display()
            );
            if args.hosts > 0 {
                print_vm_support();
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the dev deployment did not come up within 60 s; see {}",
        dir.join("dev.log").display()
    )
}

async fn stop(dir: &Path) -> Result<()> {
    let Some(pid) = running_pid(dir) else {
        println!("caas dev: nothing running in {}", dir.display());
        return Ok(());
    };
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("cannot signal pid {pid}");
    }
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            println!("caas dev: stopped (pid {pid})");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("pid {pid} did not stop within 10 s")
}
