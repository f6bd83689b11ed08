//! `caas domc ...`: run a crypto domain (`serve`) and read its audit log (`audit`). The lead
//! wires [`DomcCommand`] into the `caas` binary as the `domc` subcommand and calls [`run`].

use crate::domain::{Domain, DomainConfig};
use crate::error::Error;
use crate::keysource::{DomainKeySource, InheritedFd, KeyFile};
use std::path::PathBuf;
use std::sync::Arc;

/// `caas domc` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DomcCommand {
    /// Run a crypto domain serving the Virtual Security Module (PKCS#11) on a UNIX socket.
    Serve(ServeArgs),
    /// Verify the hash chain of a crypto domain's audit log and print its entries as JSON lines.
    Audit(AuditArgs),
}

/// Arguments of `caas domc serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// State directory: sealed token files, audit log, and (with --key-file mode) domain.key.
    #[arg(long, env = "CAAS_DOMC_STATE_DIR")]
    pub state_dir: PathBuf,
    /// UNIX socket to serve on.
    #[arg(long, env = "CAAS_DOMC_SOCKET")]
    pub socket: PathBuf,
    /// Read the 32-byte domain key from this inherited file descriptor instead of
    /// STATE_DIR/domain.key.
    #[arg(long)]
    pub key_fd: Option<i32>,
    /// Create STATE_DIR/domain.key (mode 0600) with a random key if it does not exist.
    #[arg(long)]
    pub create_key: bool,
    /// Number of slots (one token each).
    #[arg(long, default_value_t = 1)]
    pub slots: u64,
    /// Wrong PINs before a PIN is locked.
    #[arg(long, default_value_t = 5)]
    pub max_pin_retries: u64,
    /// Socket permission bits (octal).
    #[arg(long, default_value = "660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// When started as root: UID:GID to drop to after setup (default 65534:65534; 0:0 stays root).
    #[arg(long, value_parser = parse_ids)]
    pub run_as: Option<(u32, u32)>,
    /// Do not install the seccomp filter.
    #[arg(long)]
    pub no_seccomp: bool,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| e.to_string())
}

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        u.parse().map_err(|e| format!("uid: {e}"))?,
        g.parse().map_err(|e| format!("gid: {e}"))?,
    ))
}

/// Arguments of `caas domc audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// State directory of the crypto domain.
    #[arg(long)]
    pub state_dir: PathBuf,
}

/// Runs a `caas domc` subcommand (blocking; `serve` runs until killed).
pub fn run(cmd: DomcCommand) -> Result<(), Error> {
    match cmd {
        DomcCommand::Serve(a) => serve(a),
        DomcCommand::Audit(a) => {
            let entries = crate::audit::verify(&a.state_dir.join("audit.log"))?;
            for e in &entries {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            }
            eprintln!("audit chain intact: {} entries", entries.len());
            Ok(())
        }
    }
}

fn serve(a: ServeArgs) -> Result<(), Error> {
    // Harden first, so nothing below (key, token objects) can be dumped or swapped.
    let mut report = crate::harden::harden(false)?;
    std::fs::create_dir_all(&a.state_dir).map_err(Error::io("create", &a.state_dir))?;
    let key = match a.key_fd {
        Some(fd) => InheritedFd(fd).load()?,
        None => KeyFile::in_state_dir(&a.state_dir, a.create_key).load()?,
    };
    let cfg = DomainConfig {
        state_dir: a.state_dir.clone(),
        slots: a.slots,
        max_pin_retries: a.max_pin_retries,
    };
    let domain = Arc::new(Domain::open(&cfg, key)?);
    let listener = crate::server::bind(&a.socket, a.socket_mode)?;
    report.dropped_to =
        crate::harden::drop_privileges(a.run_as, &[a.state_dir.as_path(), a.socket.as_path()])?;
    if !a.no_seccomp {
        crate::harden::harden_seccomp()?;
    }
    tracing::info!(socket = %a.socket.display(), ?report, seccomp = !a.no_seccomp, "crypto domain serving");
    eprintln!(
        "caas domc: serving {} (state {})",
        a.socket.display(),
        a.state_dir.display()
    );
    crate::server::serve(domain, listener)
}
