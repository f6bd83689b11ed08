//! `caas pki init|issue|revoke`: a deployment CA in a directory, the role certificates of
//! its endpoints (host agents: `host`; the key service: `key-service`; operators:
//! `operator`) and their revocation (`DIR/crl.pem`, which the key service
//! (`[server] tls_crl`) and the host agents (`[tls] crl`) load and enforce).
//! For small deployments and tests; an operator with a CA of their own issues the same
//! certificates with it (common name = holder, SAN URI `caas:role:<role>`, and for servers
//! the DNS names / IP addresses clients connect to).
use anyhow::Result;
use caas_tls::Role;
use caas_tls::pki::DevCa;
use clap::Subcommand;
use std::path::PathBuf;

/// `caas pki ...`
#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create the CA in DIR (`ca.pem`, `ca.key` 0600); an existing CA is kept.
    Init {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue `DIR/NAME.pem` and `DIR/NAME.key` (0600) with the given roles.
    Issue {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Holder name (common name): [A-Za-z0-9._-]{1,64}.
        #[arg(long)]
        name: String,
        /// Role(s): key-service, operator, host.
        #[arg(long = "role", required = true)]
        roles: Vec<Role>,
        /// DNS name or IP address the holder serves on (server certificates).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Revoke `DIR/NAME.pem`: add its serial number to `DIR/revoked.txt` and write the
    /// CA-signed revocation list `DIR/crl.pem` anew. Copy it to every key-service node
    /// (`[server] tls_crl`) and host agent (`[tls] crl`) and restart them.
    Revoke {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Holder name of the certificate to revoke.
        #[arg(long)]
        name: String,
    },
}

/// Runs `caas pki ...`.
pub fn run(cmd: PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Init { dir } => {
            let ca = DevCa::load_or_create(&dir)?;
            println!("{}", ca.ca_file().display());
        }
        PkiCmd::Issue {
            dir,
            name,
            roles,
            hosts,
        } => {
            if !dir.join("ca.pem").exists() {
                anyhow::bail!("no CA in {} (run `caas pki init` first)", dir.display());
            }
            let ca = DevCa::load_or_create(&dir)?;
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let f = ca.issue(&name, &roles, &hosts)?;
            println!("{}\n{}", f.cert.display(), f.key.display());
        }
        PkiCmd::Revoke { dir, name } => {
            if !dir.join("ca.pem").exists() {
                anyhow::bail!("no CA in {} (run `caas pki init` first)", dir.display());
            }
            let ca = DevCa::load_or_create(&dir)?;
            println!("{}", ca.revoke(&name)?.display());
        }
    }
    Ok(())
}
