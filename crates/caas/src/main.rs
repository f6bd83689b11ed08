//! `caas`: one binary, a subcommand per role.
//!
//! - `caas dev` / `caas dev stop`: the all-in-one local deployment (`dev.rs`)
//! - `caas demo`: the tenant story against a dev deployment (`demo.rs`)
//! - `caas key-service serve|routes`: the key service in production mode, every role
//!   (KMS, registrar/verifier, TTP, scheduler) behind one authentication layer
//!   (`key_service/`, the same `serve()` as `caas dev`)
//! - `caas domain ...`: KMS domains of several key-service nodes (`domain_cmd.rs`)
//! - `caas admin ...`, `caas audit ...`: operator tools on a key service's store
//!   (`caas admin create-operator`: operator principals)
//! - `caas tenant ...`: the domain manager (TL, DBSP, encrypted provisioning; `tenant.rs`),
//!   with the key service's TTP and scheduler side in `key_service/tl.rs`
//! - `caas host|attest|profile ...`: operator commands, signed with
//!   `CAAS_OPERATOR_ACCESS_KEY_ID`/`CAAS_OPERATOR_SECRET_ACCESS_KEY`
//! - `caas workload run`: the process workload started by a host agent
//! - `caas pki init|issue|revoke`: a deployment CA, its role certificates and its
//!   revocation list (`pki.rs`)
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod demo;
#[cfg(test)]
mod deploy_files;
mod dev;
mod dev_hosts;
mod domain_cmd;
mod key_service;
mod pki;
mod roles;
mod tenant;

/// caas — client-controlled Cryptography-as-a-Service.
#[derive(Debug, Parser)]
#[command(name = "caas", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the all-in-one local deployment (key service with every role, dev hosts, crypto
    /// domain, volume).
    Dev(dev::DevArgs),
    /// Run the tenant story against the dev deployment in DIR (starting one if needed).
    Demo(demo::DemoArgs),
    /// The key service: KMS, registrar and verifier, TTP, scheduler.
    #[command(name = "key-service", subcommand)]
    KeyService(key_service::KeyServiceCmd),
    /// Operator administration of a key service: accounts, access keys, operators, domain keys.
    #[command(subcommand)]
    Admin(key_service::AdminCmd),
    /// Read and verify the key service's audit log.
    #[command(subcommand)]
    Audit(key_service::AuditCmd),
    /// KMS domains: node identities, members, operators and quorum (docs/kms-domains.md).
    #[command(subcommand)]
    Domain(domain_cmd::DomainCmd),
    /// Encrypted volumes of the Secure Device Proxy: create, import, export, serve, check, info.
    Volume(roles::VolumeArgs),
    /// The crypto domain (Virtual Security Module behind the PKCS#11 module).
    #[command(subcommand)]
    Domc(caas_domc::cli::DomcCommand),
    /// The network Secure Device Proxy: a VM's NIC backend and its encrypted overlay
    /// (docs/network-sdp.md).
    #[command(subcommand)]
    Net(caas_sdp::net::NetCommand),
    /// Compute hosts: the host agent and the key service's view of enrolled hosts.
    #[command(subcommand)]
    Host(caas_host::cli::HostCommand),
    /// Attest a host now; prints the verdict as JSON, exits non-zero when not trusted.
    Attest(caas_host::cli::AttestArgs),
    /// Security profiles (reference values for attestation).
    #[command(subcommand)]
    Profile(caas_host::cli::ProfileCommand),
    /// The tenant (domain manager): keys, ACL, encrypted provisioning, trusted launch.
    Tenant(tenant::TenantArgs),
    /// A launched workload (the process driver's entry point).
    Workload(caas_workload::cli::WorkloadArgs),
    /// A deployment CA and the role certificates of its endpoints (TLS between them).
    #[command(subcommand)]
    Pki(pki::PkiCmd),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAAS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// mimalloc instead of glibc's malloc: the key service's request path allocates and frees
/// small buffers on the tokio workers and frees its audit records on the store's writer
/// thread, and glibc spent ~13 % of a bounded Encrypt's CPU in malloc/free (arena locks
/// taken across threads, `malloc_consolidate` on hyper's read buffers); with mimalloc server
/// CPU per request fell from ~32 to ~27 us (bench/kms-bench.sh). The crypto domain runs in
/// this binary too: it locks its memory with `MCL_ONFAULT` (see `caas_domc::harden`), so the
/// address space mimalloc reserves but never touches is not populated by `mlockall`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How many tasks a tokio worker runs between two polls of the I/O driver (tokio's default
/// is 61). With two workers, the one holding the driver polled it only every 61 tasks while
/// the other slept, so replies and new requests waited and a fifth of the CPUs stayed idle
/// at 16 connections (vmstat). Polling after every task costs one non-blocking epoll_wait:
/// bounded Encrypt 64 B at 16 connections went from 45.7 k to 53.3-53.7 k req/s, GET
/// /healthz unchanged within noise (bench/kms-bench.sh header, 2026-12-06).
const EVENT_INTERVAL: u32 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // The crypto domain is a synchronous, hardened process of its own: no async runtime
    // (no thread exists when it drops root, so none escapes its capability set).
    let cmd = match cli.cmd {
        Cmd::Domc(c) => {
            return match caas_domc::cli::run(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("caas domc: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        // The network proxy is synchronous too: one frame thread and its control channel.
        // It holds its network domain's keys and parses frames from the VM and datagrams
        // from the network: the crypto domain's hardening, then (`--run-as`) its identity
        // and the seccomp filter before the frame thread starts (caas_sdp::net::serve::run).
        Cmd::Net(c) => {
            return match caas_sdp::net::run(&c, roles::device_proxy_hardening()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("caas net: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        // The process workload runs its own small runtime (it stands for a VM).
        Cmd::Workload(w) => {
            return match caas_workload::cli::run_cli(w) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("caas workload: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        other => other,
    };
    // `volume serve` drops root and then serves on a runtime it starts after the drop
    // (capabilities are per thread: caas_sdp::cli): until then, one thread.
    let mut builder = match &cmd {
        Cmd::Volume(v) if matches!(v.cmd, caas_sdp::cli::VolumeCommand::Serve(_)) => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().event_interval(EVENT_INTERVAL).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caas: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cmd {
            Cmd::Dev(a) => dev::run(a).await,
            Cmd::Demo(a) => demo::run(a).await,
            Cmd::KeyService(c) => key_service::run_key_service(c).await,
            Cmd::Admin(c) => key_service::run_admin(c).await,
            Cmd::Audit(c) => key_service::run_audit(c).await,
            Cmd::Domain(c) => domain_cmd::run(c).await,
            Cmd::Volume(a) => roles::run_volume(a).await,
            Cmd::Host(c) => roles::exit_code(caas_host::cli::run_host(c, operator_client).await),
            Cmd::Attest(a) => roles::exit_code(match operator_client() {
                Ok(http) => caas_host::cli::run_attest(a, http).await,
                Err(e) => Err(e),
            }),
            Cmd::Profile(c) => {
                roles::exit_code(caas_host::cli::run_profile(c, operator_client).await)
            }
            Cmd::Tenant(a) => tenant::run(a).await,
            Cmd::Pki(c) => pki::run(c),
            Cmd::Domc(_) | Cmd::Net(_) | Cmd::Workload(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caas: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The operator's signed client of the key service (`caas host`, `caas attest`, `caas profile`).
fn operator_client() -> anyhow::Result<caas_attest::client::HttpClient> {
    key_service::client::operator(std::time::Duration::from_secs(30))
}
