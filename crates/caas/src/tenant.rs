//! `caas tenant ...`: the domain manager's (tenant's) tools.
//!
//! - `init`: TL.Setup — the DM's Ed25519 key pair (`DIR/dm.pk8`, 0600).
//! - `acl`: registers the domains the DM's workloads may be given (the TTP's ACL).
//! - `provision`: seed 001 Algorithm 1 — validate each host's certified bind key, generate
//!   k, build the crypto-domain configuration with k injected, encrypt the image under k in
//!   the volume format, seal the configuration (bound to this DM's H2 and the image's H1)
//!   to each validated bind key, upload both to the cloud storage and register them under
//!   an ID (the tenant keeps H1). Only this DM's launches open the configuration.
//! - `launch`: TL.Token + the signed TL.Request, handed to the scheduler (with the DBSP
//!   volumes to attach before the workload starts).
//! - `connect`: the final step of TL — the TLS 1.3 PSK channel keyed by τ with the workload.
//!
//! Tenant state (`--dir`, default `$CAAS_DEV_DIR/tenant`): `dm.pk8`, `images/ID.json` (H1
//! and the token PINs), `vms/VM.json` (τ, host, endpoint) — all mode 0600.
use anyhow::{Context, Result, bail};
use caas_crypto::SecretBytes;
use caas_tl::TtpPublic;
use caas_tl::dm::{DomainManager, DomcConfig, HostBindInfo};
use caas_tl::wire::{LaunchCall, VolumeRequest};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `caas tenant` arguments.
#[derive(Debug, Args)]
pub struct TenantArgs {
    /// Tenant state directory (default `$CAAS_DEV_DIR/tenant`).
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    /// Key service (TTP) URL.
    #[arg(long, env = "CAAS_KMS_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// The TTP's public key (`SIGN.ENCRYPT`), as pinned by the tenant.
    #[arg(long, env = "CAAS_TTP_PUBLIC_KEY", global = true)]
    pub ttp: Option<String>,
    /// The tenant's access key id (the key service's ACL, bind-info and scheduler routes
    /// are SigV4-signed, like the KMS API).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", global = true, hide_env_values = true)]
    pub access_key_id: Option<String>,
    /// The tenant's secret access key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        global = true,
        hide_env_values = true
    )]
    pub secret_access_key: Option<String>,
    /// Subcommand.
    #[command(subcommand)]
    pub cmd: TenantCmd,
}

/// `caas tenant` subcommands.
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create the domain manager's key pair (kept if it exists).
    Init,
    /// Register the domains this DM may give its workloads (the TTP's ACL).
    Acl {
        /// Comma-separated domain names.
        #[arg(long, value_delimiter = ',')]
        domains: Vec<String>,
    },
    /// Encrypt and upload an image and its crypto-domain configuration (seed 001 Alg. 1).
    Provision {
        /// Plaintext raw image.
        #[arg(long)]
        image: PathBuf,
        /// Image ID to register.
        #[arg(long)]
        id: String,
        /// Hosts to seal the configuration to (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        /// The cloud storage directory.
        #[arg(long, env = "CAAS_STORAGE_DIR")]
        storage: PathBuf,
        /// VSM token label.
        #[arg(long, default_value = "caas-workload")]
        token_label: String,
    },
    /// Launch a workload with trusted launch.
    Launch {
        /// Image ID.
        #[arg(long)]
        id: String,
        /// Workload id (id_vm).
        #[arg(long)]
        vm: String,
        /// Security profile required.
        #[arg(long, env = "CAAS_PROFILE", default_value = "dev")]
        sp: String,
        /// Domains the workload may access (comma-separated).
        #[arg(long, value_delimiter = ',')]
        domains: Vec<String>,
        /// DBSP volumes to attach at launch, `DOMAIN/SR` (comma-separated).
        #[arg(long, value_delimiter = ',')]
        volumes: Vec<String>,
        /// Placement hint for the scheduler.
        #[arg(long)]
        host: Option<String>,
        /// Workload driver.
        #[arg(long, default_value = "process")]
        driver: String,
        /// Also serve the disk (NBD over mutual TLS) and the VSM (TCP, mutual TLS) over
        /// the network, bound to this launch: only the workload gets the client key.
        #[arg(long)]
        network: bool,
        /// Attach the VM's overlay NIC to this network domain (`docs/network-sdp.md`): its
        /// host runs the VM's network proxy with the domain's key from the TTP, released only
        /// to hosts attested in the profile and for domains the ACL grants you. The domain
        /// is added to `--domains` (the signed request's D_vm). Not to be confused with
        /// `--network` (the disk and VSM over mutual TLS).
        #[arg(long)]
        net_domain: Option<String>,
        /// The guest's address on the overlay, `A.B.C.D/PREFIX` (with `--net-domain`;
        /// default: 10.77.X.Y/16 from the VM's id).
        #[arg(long, requires = "net_domain")]
        net_addr: Option<String>,
    },
    /// Live-migrate a workload to another host: its host asks the TTP to attest the target
    /// in the workload's profile, then sends its state encrypted to the target's attested
    /// bind key (`docs/suspend-migrate.md`).
    Migrate {
        /// Workload id.
        #[arg(long)]
        vm: String,
        /// Target host.
        #[arg(long)]
        to: String,
    },
    /// Suspend a VM into an encrypted saved state in the cloud storage (through the
    /// scheduler; `docs/suspend-migrate.md`).
    Suspend {
        /// Workload id.
        #[arg(long)]
        vm: String,
    },
    /// Resume a suspended VM on an attested host of its profile (this one, or any).
    Resume {
        /// Workload id.
        #[arg(long)]
        vm: String,
        /// Placement hint.
        #[arg(long)]
        host: Option<String>,
    },
    /// Authenticate the workload over TLS 1.3 with τ as the PSK and print its report.
    Connect {
        /// Workload id.
        #[arg(long)]
        vm: String,
    },
}

/// What the tenant keeps per image.
#[derive(Serialize, Deserialize)]
pub struct ImageRecord {
    /// Image id.
    pub id: String,
    /// H1: SHA-256 of the encrypted image as uploaded (hex).
    pub h1: String,
    /// VSM token label.
    pub token_label: String,
    /// VSM user PIN (tenant secret).
    pub user_pin: String,
}

/// What the tenant keeps per launched workload.
#[derive(Serialize, Deserialize)]
pub struct VmRecord {
    /// id_vm.
    pub vm: String,
    /// τ (base64).
    pub tau: String,
    /// Host it runs on.
    pub host: String,
    /// PSK-channel endpoint.
    pub endpoint: String,
}

fn tenant_dir(a: &TenantArgs) -> Result<PathBuf> {
    match &a.dir {
        Some(d) => Ok(d.clone()),
        None => match std::env::var_os("CAAS_DEV_DIR") {
            Some(d) => Ok(PathBuf::from(d).join("tenant")),
            None => bail!("--dir or CAAS_DEV_DIR is required"),
        },
    }
}

/// A tenant secret file (DM key, image and VM records): 0600, atomic, in a created directory.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    Ok(caas_crypto::fs::write_secret(path, bytes, None)?)
}

/// Loads (or, with `create`, creates) the DM key pair.
pub fn load_dm(dir: &Path, create: bool) -> Result<DomainManager> {
    let path = dir.join("dm.pk8");
    if !path.exists() {
        if !create {
            bail!(
                "no domain manager key in {}: run `caas tenant init`",
                dir.display()
            );
        }
        let doc = caas_tl::crypto::ed25519_generate()?;
        write_private(&path, doc.expose())?;
    }
    let doc = SecretBytes::new(std::fs::read(&path)?);
    Ok(DomainManager::from_pkcs8(doc.expose())?)
}

fn endpoint(a: &TenantArgs) -> Result<String> {
    a.endpoint
        .clone()
        .map(|e| e.trim_end_matches('/').to_string())
        .context("--endpoint or CAAS_KMS_ENDPOINT is required")
}

fn ttp(a: &TenantArgs) -> Result<TtpPublic> {
    Ok(TtpPublic::from_text(a.ttp.as_deref().context(
        "--ttp or CAAS_TTP_PUBLIC_KEY is required (the TTP key the tenant pinned)",
    )?)?)
}

/// The tenant's signed client of the key service.
fn http(a: &TenantArgs) -> Result<caas_attest::client::HttpClient> {
    let id = a
        .access_key_id
        .as_deref()
        .context("--access-key-id or AWS_ACCESS_KEY_ID is required (the tenant's access key)")?;
    let secret = a
        .secret_access_key
        .as_deref()
        .context("--secret-access-key or AWS_SECRET_ACCESS_KEY is required")?;
    crate::key_service::client::signed(
        &crate::key_service::client::region(),
        id,
        SecretBytes::new(secret.as_bytes().to_vec()),
        std::time::Duration::from_secs(180),
    )
}

fn step(t: Instant, what: &str) {
    println!("  {:>9.1} ms  {what}", t.elapsed().as_secs_f64() * 1e3);
}

/// Runs `caas tenant`.
pub async fn run(a: TenantArgs) -> Result<()> {
    let dir = tenant_dir(&a)?;
    match &a.cmd {
        TenantCmd::Init => {
            let dm = load_dm(&dir, true)?;
            println!("pk_DM {}", caas_attest::b64::encode(&dm.public()));
            println!("H2    {}", dm.h2());
        }
        TenantCmd::Acl { domains } => {
            let dm = load_dm(&dir, false)?;
            // Signed by the DM key, with a fresh nonce the TTP records (seed 003 §4.4).
            let body = dm.acl_update("caas tenant", domains, caas_attest::now_ms())?;
            let v: serde_json::Value = http(&a)?
                .put(&format!("{}/v1/tl/acl", endpoint(&a)?), &body)
                .await?;
            println!("{v}");
        }
        TenantCmd::Provision {
            image,
            id,
            hosts,
            storage,
            token_label,
        } => provision(&a, &dir, image, id, hosts, storage, token_label).await?,
        TenantCmd::Launch {
            id,
            vm,
            sp,
            domains,
            volumes,
            host,
            driver,
            network,
            net_domain,
            net_addr,
        } => {
            let net = net_domain
                .as_deref()
                .map(|n| net_attach(n, net_addr.as_deref(), vm))
                .transpose()?;
            let r = launch(
                &a,
                &dir,
                id,
                vm,
                sp,
                domains,
                volumes,
                host.clone(),
                driver,
                *network,
                net,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        TenantCmd::Migrate { vm, to } => {
            let r = migrate(&a, &dir, vm, to).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        TenantCmd::Suspend { vm } => {
            let r = suspend(&a, &dir, vm).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        TenantCmd::Resume { vm, host } => {
            let r = resume(&a, &dir, vm, host.clone()).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        TenantCmd::Connect { vm } => {
            let r = connect(&dir, vm).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
    }
    Ok(())
}

/// Seed 001 Algorithm 1 (see the module doc).
#[allow(clippy::too_many_arguments)]
pub async fn provision(
    a: &TenantArgs,
    dir: &Path,
    image: &Path,
    id: &str,
    hosts: &[String],
    storage: &Path,
    token_label: &str,
) -> Result<()> {
    caas_tl::wire::check_name("image id", id)?;
    // The configuration is sealed for this DM: only its launches open it.
    let dm = load_dm(dir, false)?;
    let ep = endpoint(a)?;
    let client = http(a)?;
    // Lines 1–2: get (cert, pk_TPM) from each node and validate it.
    let t = Instant::now();
    let mut binds = Vec::new();
    for h in hosts {
        let info: HostBindInfo = client
            .get(&format!("{ep}/v1/tl/hosts/{h}/bind-info"))
            .await
            .with_context(|| format!("bind key of host {h}"))?;
        if &info.host != h {
            bail!(
                "the key service answered for host {} instead of {h}",
                info.host
            );
        }
        let public = caas_tl::dm::validate_bind_key(&info)
            .with_context(|| format!("host {h}: certified bind key does not validate"))?;
        binds.push((h.clone(), public));
    }
    step(
        t,
        &format!("validated the certified bind keys of {}", hosts.join(", ")),
    );
    // Lines 3–5: k, the crypto-domain configuration with k injected.
    let t = Instant::now();
    let k = caas_crypto::random_key()?;
    let pin = |n: usize| -> Result<String> {
        Ok(caas_crypto::random_bytes(n)?
            .iter()
            .map(|b| char::from(b'a' + b % 26))
            .collect())
    };
    let mut cfg = DomcConfig {
        image_id: id.to_string(),
        owner_h2: dm.h2(),
        image_h1: String::new(),
        image_key: k.expose().to_vec(),
        token_label: token_label.to_string(),
        user_pin: pin(16)?,
        so_pin: pin(16)?,
    };
    // Line 6: enc_u = Encrypt(domUimage, k), in the volume format.
    let img_dir = storage.join("images").join(id);
    std::fs::create_dir_all(&img_dir)?;
    let out = img_dir.join("image.caasvol");
    let _ = std::fs::remove_file(&out);
    let args = caas_sdp::cli::ImportArgs {
        raw: image.to_path_buf(),
        out: out.clone(),
        key: caas_sdp::cli::KeyArgs { key_file: None },
        dbsp: caas_sdp::cli::DbspArgs::default(),
        quiet: true,
    };
    caas_sdp::cli::import(
        &args,
        &caas_sdp::engine::KeyInput::Raw(std::sync::Arc::new(k)),
    )
    .await
    .map_err(|e| anyhow::anyhow!("encrypting the image: {e}"))?;
    let o = out.clone();
    let h1 = tokio::task::spawn_blocking(move || -> Result<String> {
        let bytes = std::fs::read(&o)?;
        Ok(hex::encode(caas_tl::crypto::sha256(&bytes)))
    })
    .await??;
    cfg.image_h1 = h1.clone();
    step(
        t,
        "generated k, encrypted the image under k (AES-256-GCM volume)",
    );
    // Line 7: enc_c = Encrypt(domCimage, pk_TPM), per host.
    let t = Instant::now();
    for (h, public) in &binds {
        let sealed = caas_tl::dm::seal_domc_config(public, h, &cfg)?;
        std::fs::write(img_dir.join(format!("domc-{h}.sealed")), sealed)?;
    }
    step(
        t,
        "sealed the crypto-domain configuration (k, token PINs, owner H2, H1) to each bind key",
    );
    // Line 8: register under ID (the tenant keeps H1 and the PINs; storage only ciphertext).
    let rec = ImageRecord {
        id: id.to_string(),
        h1: h1.clone(),
        token_label: token_label.to_string(),
        user_pin: cfg.user_pin.clone(),
    };
    write_private(
        &dir.join("images").join(format!("{id}.json")),
        &serde_json::to_vec_pretty(&rec)?,
    )?;
    std::fs::write(
        img_dir.join("manifest.json"),
        serde_json::to_vec_pretty(&serde_json::json!({ "id": id, "hosts": hosts }))?,
    )?;
    println!("image {id} registered: H1 {h1}");
    Ok(())
}

/// `--net-domain N [--net-addr A.B.C.D/P]` of a launch (default address: 10.77.X.Y/16,
/// X.Y from a hash of the VM's id, never .0 nor the broadcast).
pub fn net_attach(domain: &str, addr: Option<&str>, vm: &str) -> Result<caas_tl::wire::NetAttach> {
    let (address, prefix_len) = match addr {
        Some(a) => caas_tl::wire::NetAttach::parse_addr(a).map_err(anyhow::Error::msg)?,
        None => {
            let h = caas_tl::crypto::sha256(vm.as_bytes());
            let host = (u16::from_be_bytes([h[0], h[1]]) % 65_534) + 1;
            let [x, y] = host.to_be_bytes();
            (std::net::Ipv4Addr::new(10, 77, x, y), 16)
        }
    };
    let n = caas_tl::wire::NetAttach {
        domain: domain.to_string(),
        address,
        prefix_len,
    };
    n.check()?;
    Ok(n)
}

/// TL.Token and TL.Request, handed to the scheduler; returns the scheduler's answer.
#[allow(clippy::too_many_arguments)]
pub async fn launch(
    a: &TenantArgs,
    dir: &Path,
    id: &str,
    vm: &str,
    sp: &str,
    domains: &[String],
    volumes: &[String],
    host: Option<String>,
    driver: &str,
    network: bool,
    net: Option<caas_tl::wire::NetAttach>,
) -> Result<serde_json::Value> {
    let dm = load_dm(dir, false)?;
    // The network domain is one of the workload's domains (D_vm, in the signed request):
    // the TTP releases its key only then, and only if the ACL grants it.
    let mut domains = domains.to_vec();
    if let Some(n) = &net
        && !domains.contains(&n.domain)
    {
        domains.push(n.domain.clone());
    }
    let domains = &domains[..];
    let rec: ImageRecord = serde_json::from_slice(
        &std::fs::read(dir.join("images").join(format!("{id}.json")))
            .with_context(|| format!("image {id} was not provisioned by this tenant"))?,
    )?;
    let mut h1 = [0u8; 32];
    hex::decode_to_slice(&rec.h1, &mut h1)?;
    let t = Instant::now();
    let token = dm.token(&ttp(a)?, &h1, sp, vm, domains, caas_attest::now_ms())?;
    step(
        t,
        "TL.Token: τ, H1, H2 → c1 = Enc_pkTTP(m1); TL.Request signed (σ_DM)",
    );
    let vols = volumes
        .iter()
        .map(|v| {
            let (d, s) = v.split_once('/').context("volumes are DOMAIN/SR")?;
            Ok(VolumeRequest {
                domain: d.into(),
                sr: s.into(),
                size: 64 << 20,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let body = crate::key_service::tl::ScheduleRequest {
        call: LaunchCall {
            request: token.request.clone(),
            vm_id: vm.into(),
            image_id: id.into(),
            driver: Some(driver.into()),
            volumes: vols,
            network,
            net,
        },
        host,
    };
    let t = Instant::now();
    let r: serde_json::Value = http(a)?
        .post(&format!("{}/v1/sched/launch", endpoint(a)?), &body)
        .await?;
    step(
        t,
        "scheduler → host: TL.AttestRequest, TL.Attestation, checks, crypto domain, workload",
    );
    let host = r["host"].as_str().unwrap_or_default().to_string();
    let ep = r["workload"]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let vr = VmRecord {
        vm: vm.into(),
        tau: caas_attest::b64::encode(token.tau.expose()),
        host,
        endpoint: ep,
    };
    write_private(
        &dir.join("vms").join(format!("{vm}.json")),
        &serde_json::to_vec_pretty(&vr)?,
    )?;
    Ok(r)
}

/// Live migration through the scheduler; the VM record then names the new host.
pub async fn migrate(a: &TenantArgs, dir: &Path, vm: &str, to: &str) -> Result<serde_json::Value> {
    let path = dir.join("vms").join(format!("{vm}.json"));
    let mut rec: VmRecord = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("workload {vm} was not launched by this tenant"))?,
    )?;
    let t = Instant::now();
    let body = caas_tl::service::MigrateSchedule {
        vm_id: vm.into(),
        from: rec.host.clone(),
        to: to.into(),
    };
    let r: serde_json::Value = http(a)?
        .post(&format!("{}/v1/sched/migrate", endpoint(a)?), &body)
        .await?;
    step(
        t,
        "source → TTP (target attested) → target (session key, encrypted state)",
    );
    rec.host = to.into();
    if let Some(ep) = r["endpoint"].as_str() {
        rec.endpoint = ep.to_string();
    }
    write_private(&path, &serde_json::to_vec_pretty(&rec)?)?;
    Ok(r)
}

/// Suspend (`caas tenant suspend --vm V`): the scheduler forwards it to the agent of the
/// host the tenant's record names; the answer carries no key and no state.
pub async fn suspend(a: &TenantArgs, dir: &Path, vm: &str) -> Result<serde_json::Value> {
    let path = dir.join("vms").join(format!("{vm}.json"));
    let rec: VmRecord = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("workload {vm} was not launched by this tenant"))?,
    )?;
    let body = caas_tl::service::MoveRequest {
        vm_id: vm.into(),
        host: Some(rec.host),
    };
    Ok(http(a)?
        .post(&format!("{}/v1/sched/suspend", endpoint(a)?), &body)
        .await?)
}

/// Resume (`caas tenant resume --vm V [--host H]`): the record gets the new host and
/// endpoint (τ is the guest's still: it resumes where it stopped).
pub async fn resume(
    a: &TenantArgs,
    dir: &Path,
    vm: &str,
    host: Option<String>,
) -> Result<serde_json::Value> {
    let path = dir.join("vms").join(format!("{vm}.json"));
    let mut rec: VmRecord = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("workload {vm} was not launched by this tenant"))?,
    )?;
    let body = caas_tl::service::MoveRequest {
        vm_id: vm.into(),
        host,
    };
    let r: serde_json::Value = http(a)?
        .post(&format!("{}/v1/sched/resume", endpoint(a)?), &body)
        .await?;
    rec.host = r["host"].as_str().unwrap_or_default().to_string();
    rec.endpoint = r["workload"]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    write_private(&path, &serde_json::to_vec_pretty(&rec)?)?;
    Ok(r)
}

/// The last TL step: TLS 1.3 with τ as external PSK, the DM's signed challenge, the report.
pub async fn connect(dir: &Path, vm: &str) -> Result<caas_workload::WorkloadReport> {
    let dm = load_dm(dir, false)?;
    let rec: VmRecord = serde_json::from_slice(
        &std::fs::read(dir.join("vms").join(format!("{vm}.json")))
            .with_context(|| format!("workload {vm} was not launched by this tenant"))?,
    )?;
    let tau = SecretBytes::new(caas_attest::b64::decode(&rec.tau)?);
    let addr: std::net::SocketAddr = rec.endpoint.parse().context("workload endpoint")?;
    let vm = vm.to_string();
    let r = tokio::task::spawn_blocking(move || {
        caas_workload::challenge(addr, &vm, &tau, dm.key_pair())
    })
    .await??;
    Ok(r)
}
