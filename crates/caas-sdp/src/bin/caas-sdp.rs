//! `caas-sdp`: the `caas volume` subcommands as a standalone binary, used by the
//! integration tests (which must start and SIGKILL a real server process) and by
//! `bench/sdp-bench.sh`. It has no KMS: keys come from `--key-file`.
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "caas-volume",
    about = "caas encrypted volumes and the Secure Device Proxy (NBD)"
)]
struct Args {
    #[command(subcommand)]
    cmd: caas_sdp::cli::VolumeCommand,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAAS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(caas_sdp::cli::run(args.cmd, None)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
