//! Stand-alone process workload (`caas-workload workload run --spec FILE`), the same CLI as
//! `caas workload`; used by this crate's end-to-end tests of the process driver.
use caas_workload::cli::WorkloadArgs;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "caas-workload", about = "caas process workload")]
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
            eprintln!("caas-workload: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
