//! `caas workload ...`: the process workload's entry point. The lead wires [`WorkloadArgs`]
//! into the `caas` binary as the `workload` subcommand and calls [`run_cli`].
use crate::error::Result;
use crate::spec::WorkloadSpec;
use std::path::PathBuf;

/// Arguments of `caas workload`.
#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: WorkloadCommand,
}

/// `caas workload` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WorkloadCommand {
    /// Run the process workload described by a spec file (JSON `WorkloadSpec`) until
    /// killed: take the injected τ and pk_DM (the inject file is deleted), hash the NBD
    /// disk, and answer DM challenges over TLS 1.3 with τ as the external PSK.
    Run {
        /// The workload spec (JSON).
        #[arg(long)]
        spec: PathBuf,
    },
    /// The guest agent inside a VM (the tenant installs it in the guest image): read the
    /// workload id, τ and pk_DM once from fw_cfg, hash the boot disk, sign in the crypto
    /// domain over virtio-serial, print the ready marker on the console and answer DM
    /// challenges over TLS 1.3 with τ as the external PSK.
    Guest {
        /// The boot disk.
        #[arg(long, default_value = "/dev/vda")]
        disk: PathBuf,
        /// Where the PSK channel listens.
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: std::net::SocketAddr,
        /// The crypto domain: `virtio:/dev/virtio-ports/caas.vsm` (or a UNIX socket path).
        #[arg(long)]
        vsm: Option<String>,
        /// The fw_cfg directory of the caas entries.
        #[arg(long, default_value = "/sys/firmware/qemu_fw_cfg/by_name/opt/caas")]
        fw_cfg: PathBuf,
    },
    /// Inside a VM with a data disk: write an increasing sequence to it, one durable record
    /// every interval, continuing after the last record on the disk (`caas_workload::seq`).
    Seq {
        /// The data disk (a DBSP volume).
        #[arg(long, default_value = "/dev/vdb")]
        disk: PathBuf,
        /// Blocks (4 KiB) of the ring the records go to.
        #[arg(long, default_value_t = 4096)]
        blocks: u64,
        /// Milliseconds between records.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
}

/// Runs a `caas workload` subcommand; returns the process exit code (`run` only returns
/// on error).
pub fn run_cli(args: WorkloadArgs) -> Result<i32> {
    match args.command {
        WorkloadCommand::Run { spec } => {
            let spec = WorkloadSpec::load(&spec)?;
            crate::workload::run(&spec)?;
            Ok(0)
        }
        WorkloadCommand::Guest {
            disk,
            listen,
            vsm,
            fw_cfg,
        } => {
            let cfg = crate::workload::GuestConfig {
                fw_cfg,
                disk,
                listen,
                vsm: vsm.as_deref().map(crate::vsm::VsmEndpoint::parse),
            };
            crate::workload::Workload::start_guest(&cfg)?.serve()?;
            Ok(0)
        }
        WorkloadCommand::Seq {
            disk,
            blocks,
            interval_ms,
        } => {
            crate::seq::run(&disk, blocks, std::time::Duration::from_millis(interval_ms))
                .map_err(crate::Error::io("sequence writer"))?;
            Ok(0)
        }
    }
}

/// The command line of a stand-alone binary that serves only `NAME workload ...`.
#[derive(Debug, clap::Parser)]
struct Standalone {
    #[command(subcommand)]
    top: StandaloneTop,
}

#[derive(Debug, clap::Subcommand)]
enum StandaloneTop {
    /// Workload commands.
    Workload(WorkloadArgs),
}

/// `main` of the stand-alone workload binaries (`caas-workload`, and `caas-guest`, the guest
/// agent a tenant installs in a VM image): the same CLI as `caas workload`, logs on stderr.
pub fn standalone_main(name: &'static str, about: &'static str) -> std::process::ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Standalone::command().name(name).about(about).get_matches();
    let parsed = match Standalone::from_arg_matches(&matches) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    let StandaloneTop::Workload(args) = parsed.top;
    match run_cli(args) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
