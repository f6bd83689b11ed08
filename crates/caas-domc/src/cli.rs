//! `caas domc ...`: run a crypto domain (`serve`) and read its audit log (`audit`). The lead
//! wires [`DomcCommand`] into the `caas` binary as the `domc` subcommand and calls [`run`].

use crate::domain::{Domain, DomainConfig};
use crate::error::Error;
use crate::keysource::{DomainKeySource, Ephemeral, InheritedFd, KeyFile};
use std::path::PathBuf;
use std::sync::Arc;

/// `caas domc` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DomcCommand {
    /// Run a crypto domain serving the Virtual Security Module (PKCS#11) on a UNIX socket,
    /// vsock and/or TCP+TLS.
    Serve(Box<ServeArgs>),
    /// Verify the keyed hash chain of a crypto domain's audit log (needs the domain key) and
    /// print its entries as JSON lines.
    Audit(AuditArgs),
}

/// Arguments of `caas domc serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// State directory: sealed token files, audit log, and (with --key-file mode) domain.key.
    #[arg(long, env = "CAAS_DOMC_STATE_DIR")]
    pub state_dir: PathBuf,
    /// UNIX socket to serve on.
    #[arg(long, env = "CAAS_DOMC_SOCKET", required_unless_present_any = ["tcp", "vsock"])]
    pub socket: Option<PathBuf>,
    /// Also (or only) serve on this vsock port, for workloads in VMs on this host or a
    /// crypto domain in its own micro-VM; modules connect to `vsock:CID:PORT`. Only the peer
    /// named by --vsock-peer-cid is served. Binding needs only AF_VSOCK; connections need a
    /// vsock transport (a hypervisor, or the vsock_loopback module for CID 1): without one
    /// they time out after 2 s.
    #[arg(long, requires = "vsock_peer_cid")]
    pub vsock: Option<u32>,
    /// The only vsock peer served: the workload VM's CID (others are refused and audited).
    #[arg(long)]
    pub vsock_peer_cid: Option<u32>,
    /// UNIX-socket peers allowed besides the domain's own uid (checked with SO_PEERCRED on
    /// every connection; refusals are audited). Repeatable; default 0 (root, which can
    /// ptrace anything anyway). The host agent passes its own uid.
    #[arg(long = "peer-uid", default_values_t = [0u32])]
    pub peer_uids: Vec<u32>,
    /// Also (or only) serve TLS on this TCP address (HOST:PORT), e.g. when the crypto domain
    /// runs as its own VM; needs --tls-cert, --tls-key and --tls-client-ca: clients must
    /// authenticate (mutual TLS).
    #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    pub tcp: Option<String>,
    /// TLS server certificate chain (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// TLS server private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM): mutual TLS.
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// Read the 32-byte domain key from this inherited file descriptor instead of
    /// STATE_DIR/domain.key.
    #[arg(long)]
    pub key_fd: Option<i32>,
    /// Create STATE_DIR/domain.key (mode 0600) with a random key if it does not exist.
    #[arg(long, conflicts_with = "key_fd")]
    pub create_key: bool,
    /// Generate the domain key in memory and never store it: token objects do not survive
    /// the process (launched workloads: the token is re-initialised at every launch, and no
    /// domain key lies on the host's disk).
    #[arg(long, conflicts_with_all = ["key_fd", "create_key"])]
    pub ephemeral_key: bool,
    /// Serve the host agent's control channel on standard input/output (token export and
    /// import for suspend and migration, `caas_domc::transfer`): pipes only the parent
    /// holds, never the PKCS#11 socket the workload reaches.
    #[arg(long)]
    pub control_stdio: bool,
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
    /// Allow 1024-bit RSA keys (generation, import and PKCS#1 v1.5 signing). Off by default:
    /// they are below the 2048-bit policy and exist only for comparisons with legacy setups
    /// (the seed's ods-hsmspeed RSA-1024 benchmark). Without it such keys are refused with
    /// CKR_KEY_SIZE_RANGE.
    #[arg(long)]
    pub allow_legacy_rsa_1024: bool,
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
    /// The domain key file (32 bytes, 0600): the log's records are authenticated with a key
    /// derived from the domain key. Default: STATE_DIR/domain.key if it exists; without a
    /// key only the hashes and links are checked (and the output says so).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// Runs a `caas domc` subcommand (blocking; `serve` runs until killed).
pub fn run(cmd: DomcCommand) -> Result<(), Error> {
    match cmd {
        DomcCommand::Serve(a) => serve(*a),
        DomcCommand::Audit(a) => {
            let log = a.state_dir.join("audit.log");
            let default_key = a.state_dir.join("domain.key");
            let (entries, keyed) = match &a.key_file {
                Some(k) => (crate::audit::verify_with_key_file(&log, k)?, true),
                None if default_key.exists() => (
                    crate::audit::verify_with_key_file(&log, &default_key)?,
                    true,
                ),
                None => (crate::audit::verify_links_only(&log)?, false),
            };
            for e in &entries {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
            }
            if keyed {
                eprintln!(
                    "audit chain intact (hashes, links and tags under the domain key): {} entries",
                    entries.len()
                );
            } else {
                eprintln!(
                    "audit chain links intact: {} entries; tags NOT verified (no domain key: \
                     give --key-file; an --ephemeral-key domain's key is gone)",
                    entries.len()
                );
            }
            Ok(())
        }
    }
}

fn serve(a: ServeArgs) -> Result<(), Error> {
    // Harden first, so nothing below (key, token objects) can be dumped or swapped.
    let mut report = crate::harden::harden()?;
    std::fs::create_dir_all(&a.state_dir).map_err(Error::io("create", &a.state_dir))?;
    let key = match a.key_fd {
        Some(fd) => InheritedFd(fd).load()?,
        None if a.ephemeral_key => Ephemeral.load()?,
        None => KeyFile::in_state_dir(&a.state_dir, a.create_key).load()?,
    };
    let cfg = DomainConfig {
        state_dir: a.state_dir.clone(),
        slots: a.slots,
        max_pin_retries: a.max_pin_retries,
    };
    let domain = Arc::new(Domain::open(&cfg, key)?.allow_legacy_rsa_1024(a.allow_legacy_rsa_1024));
    let listener = match &a.socket {
        Some(p) => Some(crate::server::bind(p, a.socket_mode)?),
        None => None,
    };
    let tls = match (&a.tcp, &a.tls_cert, &a.tls_key) {
        (Some(addr), Some(cert), Some(key)) => {
            let ca = a.tls_client_ca.as_deref().ok_or_else(|| {
                Error::Config("--tcp needs --tls-client-ca (clients must authenticate)".into())
            })?;
            let cfg = crate::server::tls_config(cert, key, ca)?;
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| Error::Config(format!("binding {addr}: {e}")))?;
            Some((l, cfg))
        }
        _ => None,
    };
    let vsock = match (a.vsock, a.vsock_peer_cid) {
        (Some(port), Some(cid)) => Some((crate::vsock::VsockListener::bind(port)?, cid)),
        (Some(_), None) => {
            return Err(Error::Config(
                "--vsock needs --vsock-peer-cid (the workload VM's CID)".into(),
            ));
        }
        (None, _) => None,
    };
    let vsock_port = vsock.as_ref().and_then(|(l, _)| l.port().ok());
    let mut owned: Vec<&std::path::Path> = vec![a.state_dir.as_path()];
    if let Some(p) = &a.socket {
        owned.push(p);
    }
    report.dropped_to = crate::harden::drop_privileges(a.run_as, &owned)?;
    if !a.no_seccomp {
        crate::harden::harden_seccomp()?;
        report.seccomp = true;
    }
    tracing::info!(?report, "crypto domain serving");
    eprintln!(
        "caas domc: serving {}{}{} (state {}){}",
        a.socket
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        a.tcp
            .as_ref()
            .map(|t| format!(" tls://{t}"))
            .unwrap_or_default(),
        vsock_port
            .map(|p| format!(" vsock:{}:{p}", a.vsock_peer_cid.unwrap_or_default()))
            .unwrap_or_default(),
        a.state_dir.display(),
        if a.allow_legacy_rsa_1024 {
            "; legacy RSA-1024 keys allowed"
        } else {
            ""
        }
    );
    // Every listener but the last runs on its own accept thread.
    let mut servers: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    if a.control_stdio {
        let d = domain.clone();
        std::thread::Builder::new()
            .name("vsm-control".into())
            .spawn(move || crate::transfer::serve_control(&d, std::io::stdin(), std::io::stdout()))
            .map_err(|e| Error::Config(format!("control thread: {e}")))?;
    }
    if let Some((t, cfg)) = tls {
        let d = domain.clone();
        servers.push(Box::new(move || crate::server::serve_tls(d, t, cfg)));
    }
    let policy = crate::server::PeerPolicy {
        uids: a.peer_uids.clone(),
        vsock_cid: a.vsock_peer_cid,
    };
    if let Some((v, _)) = vsock {
        let (d, policy) = (domain.clone(), policy.clone());
        servers.push(Box::new(move || crate::server::serve_vsock(d, v, policy)));
    }
    if let Some(l) = listener {
        let d = domain.clone();
        servers.push(Box::new(move || {
            if let Err(e) = crate::server::serve(d, l, policy) {
                tracing::error!(error = %e, "UNIX socket server stopped");
            }
        }));
    }
    let Some(last) = servers.pop() else {
        return Err(Error::Config(
            "nothing to serve: give --socket, --vsock or --tcp".into(),
        ));
    };
    for s in servers {
        std::thread::Builder::new()
            .name("vsm-accept".into())
            .spawn(s)
            .map_err(|e| Error::Config(format!("accept thread: {e}")))?;
    }
    last();
    Ok(())
}
