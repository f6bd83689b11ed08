//! `caas key-service serve`, `caas admin ...` and `caas audit ...`.
use anyhow::{Context, Result, bail};
use caas_kms::config::{self, ServeParams};
use caas_kms::{Kms, KmsParams};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

/// Where to find a key service's store: its config file, or a dev data dir.
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Key-service config file (TOML).
    #[arg(long, env = "CAAS_CONFIG", conflicts_with = "data_dir")]
    pub config: Option<PathBuf>,
    /// A `caas dev` data directory.
    #[arg(long, env = "CAAS_DEV_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL (overrides the config file).
    #[arg(long, env = "CAAS_DATABASE")]
    pub database: Option<String>,
}

impl StoreArgs {
    /// Resolves to service parameters.
    pub fn params(&self) -> Result<KmsParams> {
        let mut p = if let Some(cfg) = &self.config {
            config::load(cfg)
                .map_err(anyhow::Error::msg)?
                .validate()
                .map_err(anyhow::Error::msg)?
                .kms
        } else if let Some(dir) = &self.data_dir {
            crate::dev::kms_params(dir)
        } else {
            crate::dev::kms_params(&crate::dev::default_dir())
        };
        if let Some(db) = &self.database {
            p.database = db.clone();
        }
        Ok(p)
    }
}

/// `caas key-service ...`.
#[derive(Debug, Subcommand)]
pub enum KeyServiceCmd {
    /// Serve the AWS-KMS-compatible API.
    Serve {
        /// Config file (TOML); see config/key-service.example.toml.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// Listen address (overrides the config).
        #[arg(long, env = "CAAS_LISTEN")]
        listen: Option<String>,
        /// Database URL (overrides the config).
        #[arg(long, env = "CAAS_DATABASE")]
        database: Option<String>,
    },
}

/// `caas admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Create a tenant account.
    CreateAccount {
        #[command(flatten)]
        store: StoreArgs,
        /// Account name.
        name: String,
    },
    /// List accounts.
    ListAccounts {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Issue an access key (prints the secret once).
    CreateAccessKey {
        #[command(flatten)]
        store: StoreArgs,
        /// Account id.
        #[arg(long)]
        account: String,
        /// User name within the account.
        #[arg(long, default_value = "admin")]
        user: String,
    },
    /// List access keys.
    ListAccessKeys {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Disable an access key.
    DisableAccessKey {
        #[command(flatten)]
        store: StoreArgs,
        /// Access key id.
        access_key_id: String,
    },
    /// Rotate the domain key and re-wrap every EKT under it.
    RotateDomainKey {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `caas audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print audit records as JSON lines.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Verify the whole chain: hashes, links, sequence and signatures.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// A key service that is bound but not yet serving.
pub struct Bound {
    /// The service.
    pub kms: Arc<Kms>,
    /// Bound listener.
    pub listener: tokio::net::TcpListener,
    /// Its address.
    pub addr: std::net::SocketAddr,
}

/// Opens the store and binds the listener.
pub async fn bind(params: &ServeParams) -> Result<Bound> {
    let kms = Kms::open(&params.kms)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(params.listen)
        .await
        .with_context(|| format!("cannot listen on {}", params.listen))?;
    let addr = listener.local_addr()?;
    Ok(Bound {
        kms,
        listener,
        addr,
    })
}

/// Serves the key service until SIGINT/SIGTERM.
pub async fn serve(params: ServeParams, bound: Bound, extra: Option<axum::Router>) -> Result<()> {
    let Bound {
        kms,
        listener,
        addr,
    } = bound;
    let maint = {
        let kms = kms.clone();
        let every = params.maintenance_interval;
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                match caas_kms::ops::maintenance(&kms).await {
                    Ok((d, r)) if d + r > 0 => {
                        tracing::info!(deleted = d, rotated = r, "maintenance")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "maintenance failed"),
                }
            }
        })
    };
    tracing::info!(%addr, tls = params.tls.is_some(), "key service listening");
    caas_kms::server::serve(kms, listener, params.tls, extra, shutdown_signal()).await?;
    maint.abort();
    tracing::info!("key service stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Runs `caas key-service ...`.
pub async fn run_key_service(cmd: KeyServiceCmd) -> Result<()> {
    match cmd {
        KeyServiceCmd::Serve {
            config,
            listen,
            database,
        } => {
            let mut raw = config::load(&config).map_err(anyhow::Error::msg)?;
            if let Some(l) = listen {
                raw.server.listen = Some(l);
            }
            if let Some(d) = database {
                raw.storage.database = Some(d);
            }
            let params = raw.validate().map_err(anyhow::Error::msg)?;
            let bound = bind(&params).await?;
            println!("listening on {}", bound.addr);
            serve(params, bound, None).await
        }
    }
}

async fn open(store: &StoreArgs) -> Result<Arc<Kms>> {
    Kms::open(&store.params()?)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `caas admin ...`.
pub async fn run_admin(cmd: AdminCmd) -> Result<()> {
    match cmd {
        AdminCmd::CreateAccount { store, name } => {
            let kms = open(&store).await?;
            let a = kms
                .create_account(&name)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", serde_json::json!({ "Account": a, "Name": name }));
        }
        AdminCmd::ListAccounts { store } => {
            for a in open(&store)
                .await?
                .list_accounts()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
            {
                println!(
                    "{}",
                    serde_json::json!({ "Account": a.account, "Name": a.name })
                );
            }
        }
        AdminCmd::CreateAccessKey {
            store,
            account,
            user,
        } => {
            let kms = open(&store).await?;
            let (id, secret) = kms
                .create_access_key(&account, &user)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let secret = String::from_utf8_lossy(secret.expose()).into_owned();
            println!(
                "{}",
                serde_json::json!({ "AccessKeyId": id, "SecretAccessKey": secret, "Account": account })
            );
        }
        AdminCmd::ListAccessKeys { store } => {
            for k in open(&store)
                .await?
                .list_access_keys()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
            {
                println!(
                    "{}",
                    serde_json::json!({ "AccessKeyId": k.access_key_id, "Account": k.account, "Principal": k.principal, "Enabled": k.enabled })
                );
            }
        }
        AdminCmd::DisableAccessKey {
            store,
            access_key_id,
        } => {
            open(&store)
                .await?
                .set_access_key_enabled(&access_key_id, false)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("disabled {access_key_id}");
        }
        AdminCmd::RotateDomainKey { store } => {
            let kms = open(&store).await?;
            let (v, n) = caas_kms::ops::rotate_domain_key(&kms)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{}",
                serde_json::json!({ "DomainKeyVersion": v, "RewrappedKeys": n })
            );
        }
    }
    Ok(())
}

/// Runs `caas audit ...`.
pub async fn run_audit(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::List {
            store,
            account,
            limit,
            after,
        } => {
            let kms = open(&store).await?;
            let recs = kms
                .store
                .audit_list(account.as_deref(), after, limit)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for r in recs {
                let e = &r.entry;
                println!(
                    "{}",
                    serde_json::json!({
                        "Seq": r.seq, "TimeMs": e.time_ms, "Account": e.account, "Principal": e.principal,
                        "Operation": e.operation, "KeyId": e.key_id, "Result": e.result, "RequestId": e.request_id,
                        "Detail": serde_json::from_str::<serde_json::Value>(&e.detail).unwrap_or_default(),
                        "Hash": hex_str(&r.hash),
                    })
                );
            }
        }
        AuditCmd::Verify { store } => {
            let kms = open(&store).await?;
            let pk = kms.audit_public_key().to_vec();
            let report = kms
                .store
                .audit_verify(&|h, s| caas_kms::audit::verify_signature(&pk, h, s))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{report:?}");
            if !report.is_ok() {
                bail!("audit chain verification FAILED");
            }
        }
    }
    Ok(())
}

fn hex_str(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
