//! Stand-alone crypto domain executable (`caas-domc domc serve ...`), the same CLI as
//! `caas domc`; used by this crate's end-to-end tests and by hosts that ship the crypto domain
//! without the full `caas` binary.

use caas_domc::cli::DomcCommand;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "caas-domc",
    about = "caas crypto domain (Virtual Security Module)"
)]
struct Cli {
    #[command(subcommand)]
    top: Top,
}

#[derive(Debug, clap::Subcommand)]
enum Top {
    /// Crypto domain commands.
    #[command(subcommand)]
    Domc(DomcCommand),
}

/// The allocator of `caas domc` (the `caas` binary), so that this binary measures and runs
/// the crypto domain as deployed; its memory is locked on fault (`caas_domc::harden`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let Top::Domc(cmd) = Cli::parse().top;
    match caas_domc::cli::run(cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caas-domc: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
