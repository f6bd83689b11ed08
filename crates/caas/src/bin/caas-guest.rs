//! The guest agent a tenant installs in its VM image (`caas-guest workload guest`, see
//! `scripts/build-guest-image`), and the stand-alone process workload (`caas-guest workload
//! run --spec FILE`): the same CLI as `caas workload`, without the other roles, so the guest
//! image carries a small binary.

use caas_workload::cli::WorkloadArgs;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "caas-guest", about = "caas guest agent and process workload")]
struct Cli {
    #[command(subcommand)]
    top: Top,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    /// Workload commands.
    Workload(WorkloadArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Top::Workload(args) = Cli::parse().top;
    match caas_workload::cli::run_cli(args) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("caas-guest: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
