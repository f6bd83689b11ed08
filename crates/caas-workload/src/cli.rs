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
    }
}
