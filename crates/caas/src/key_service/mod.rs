//! The key service: one actor, one home. It owns the KMS (`caas-kms`), the registrar and
//! verifier ([`attest`], `caas-attest`), the TTP with its keys and the scheduler API
//! ([`tl`], `caas-tl`), all on one store adapter (`caas-store`, one audit chain), served by
//! the one [`serve()`] that `caas key-service serve` and `caas dev` both use, with every
//! route authenticated by [`auth`] (the route table says who may call what), and the
//! verifier of `Recipient` attestation documents ([`recipient`]). [`config`] is
//! the TOML. This module also holds the operator commands `caas admin ...` and
//! `caas audit ...`.
//!
//! The serving process is hardened first ([`harden`]: non-dumpable, no core files) and
//! refuses to start on an audit chain behind its node's checkpoint unless
//! `--accept-audit-rollback` (audited; see `caas_kms::checkpoint`). `caas audit list`,
//! `verify` (human summary or `--json`, non-zero exit on any failure, chain and checkpoint)
//! and `export` (CloudTrail-style JSON lines) only read: they neither check nor move the
//! checkpoint.
pub mod attest;
pub mod auth;
pub mod client;
pub mod config;
pub mod recipient;
mod serve;
pub mod tl;

pub use serve::{Roles, bind, harden, serve};

use anyhow::{Result, bail};
use caas_kms::checkpoint::{self, Freshness};
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
                .serve
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
    /// Serve every role of the key service on one listener: the AWS-KMS-compatible API
    /// (tenants), the registrar (Privacy CA: host enrollment) and verifier (continuous
    /// attestation, security profiles: operators), the TTP of trusted launch and DBSP (AK-
    /// signed host messages, DM-signed ACL changes) and the scheduler API (tenants). Every
    /// route but health and the public keys is authenticated; `caas key-service routes`
    /// lists who may call each.
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
        /// Start even though the audit chain is behind this node's checkpoint (a deliberate
        /// database restore); the acceptance is itself audited.
        #[arg(long)]
        accept_audit_rollback: bool,
        /// When the audit records of key use are durable, `bounded` or `strict`
        /// (overrides the config's `[storage] audit_durability`).
        #[arg(long, env = "CAAS_AUDIT_DURABILITY")]
        audit_durability: Option<caas_kms::config::AuditDurability>,
    },
    /// Print every route the key service serves and who may call it, as JSON lines.
    Routes,
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
    /// Create an operator (a principal of the cloud's administrators, apart from tenants)
    /// and issue its access key (prints the secret once). Operators call the key service's
    /// operator routes with SigV4 (scope service `caas`); they cannot call the KMS API.
    CreateOperator {
        #[command(flatten)]
        store: StoreArgs,
        /// Operator name.
        name: String,
        /// Comma-separated permissions: hosts:read, hosts:attest, hosts:admit,
        /// profiles:read, profiles:write, acl:admin, schedule (or `all`).
        #[arg(long, value_delimiter = ',', required = true)]
        permissions: Vec<String>,
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
    /// Verify the whole chain (hashes, links, sequence, signatures) and its freshness
    /// against the node's signed checkpoint; exits non-zero on any failure.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// The node's audit checkpoint (default: beside the node key file).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write audit records as CloudTrail-style JSON lines (for a SIEM).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        since_seq: u64,
    },
}

/// Runs `caas key-service ...`.
pub async fn run_key_service(cmd: KeyServiceCmd) -> Result<()> {
    match cmd {
        KeyServiceCmd::Serve {
            config,
            listen,
            database,
            accept_audit_rollback,
            audit_durability,
        } => {
            harden()?;
            let mut raw = config::load(&config).map_err(anyhow::Error::msg)?;
            if let Some(l) = listen {
                raw.server.listen = Some(l);
            }
            if let Some(d) = database {
                raw.storage.database = Some(d);
            }
            if let Some(d) = audit_durability {
                raw.storage.audit_durability = Some(d);
            }
            let params = raw.validate().map_err(anyhow::Error::msg)?;
            let bound = bind(&params.serve, accept_audit_rollback).await?;
            if params.agents.is_none() {
                tracing::warn!(
                    "no [agents] section: the key service cannot reach host agents (attestation, \
                     launches and revocations fail)"
                );
            }
            let agents = params.agent_client().map_err(anyhow::Error::msg)?;
            let roles =
                Roles::open(bound.kms.clone(), &params.attestation, &params.tl, agents).await?;
            println!("listening on {}", bound.addr);
            serve(params, bound, roles).await
        }
        KeyServiceCmd::Routes => {
            for r in auth::ROUTES {
                println!(
                    "{}",
                    serde_json::json!({ "method": r.method, "path": r.path, "access": r.access.describe() })
                );
            }
            Ok(())
        }
    }
}

async fn open(store: &StoreArgs) -> Result<Arc<Kms>> {
    Kms::open(&store.params()?)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Read-only: neither checks nor moves the node's audit checkpoint.
async fn inspect(params: &caas_kms::KmsParams) -> Result<Arc<Kms>> {
    Kms::open_with(params, None)
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
                    serde_json::json!({ "AccessKeyId": k.access_key_id, "Account": k.account, "Principal": k.principal, "Enabled": k.enabled, "Operator": k.operator })
                );
            }
        }
        AdminCmd::CreateOperator {
            store,
            name,
            permissions,
        } => {
            let perms = parse_permissions(&permissions)?;
            let kms = open(&store).await?;
            let (id, secret) = kms
                .create_operator(&name, perms.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let secret = String::from_utf8_lossy(secret.expose()).into_owned();
            println!(
                "{}",
                serde_json::json!({
                    "AccessKeyId": id, "SecretAccessKey": secret, "Operator": name,
                    "Permissions": perms.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                })
            );
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
            let kms = inspect(&store.params()?).await?;
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
        AuditCmd::Verify {
            store,
            checkpoint,
            json,
        } => {
            let params = store.params()?;
            let kms = inspect(&params).await?;
            let cp_path = checkpoint.unwrap_or_else(|| checkpoint::path_for(&params.node_key_file));
            let pk = kms.audit_public_key().to_vec();
            // Checkpoint first: a node committing meanwhile only moves the head forward.
            let fresh = checkpoint::check(&kms.store, &cp_path, &pk)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let report = kms
                .store
                .audit_verify_seq(&|q, h, s| kms.audit_signature_ok(q, h, s))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (head_seq, head_hash) = kms
                .store
                .audit_head()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let ok = report.is_ok() && fresh.is_ok();
            if json {
                println!(
                    "{}",
                    verify_json(&report, &fresh, &cp_path, head_seq, &head_hash, ok)
                );
            } else {
                print!(
                    "{}",
                    verify_text(&report, &fresh, &cp_path, head_seq, &head_hash, ok)
                );
            }
            if !ok {
                bail!("audit verification FAILED");
            }
        }
        AuditCmd::Export {
            store,
            account,
            since_seq,
        } => {
            use std::io::Write as _;
            let kms = inspect(&store.params()?).await?;
            let mut after = since_seq;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            loop {
                let recs = kms
                    .store
                    .audit_list(account.as_deref(), after, 1000)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                for r in &recs {
                    writeln!(out, "{}", caas_kms::audit::cloudtrail_event(r, &kms.region))?;
                    after = r.seq;
                }
                if recs.len() < 1000 {
                    break;
                }
            }
            out.flush()?;
        }
    }
    Ok(())
}

fn hex_str(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn freshness_json(fresh: &Freshness) -> serde_json::Value {
    use serde_json::json;
    match fresh {
        Freshness::NoCheckpoint { .. } => json!({ "status": "none" }),
        Freshness::Fresh { checkpoint, .. } => json!({
            "status": "ok", "seq": checkpoint.seq, "hash": hex_str(&checkpoint.hash),
            "time": caas_kms::audit::iso8601(checkpoint.time_ms),
        }),
        Freshness::Stale(r) => json!({
            "status": "stale",
            "seq": r.checkpoint.map(|c| c.seq),
            "hash": r.checkpoint.map(|c| hex_str(&c.hash)),
            "problem": r.to_string(),
        }),
    }
}

fn verify_json(
    report: &caas_store::AuditVerifyReport,
    fresh: &Freshness,
    cp_path: &std::path::Path,
    head_seq: u64,
    head_hash: &[u8; 32],
    ok: bool,
) -> serde_json::Value {
    let mut cp = freshness_json(fresh);
    if let Some(m) = cp.as_object_mut() {
        m.insert("file".into(), cp_path.display().to_string().into());
    }
    serde_json::json!({
        "ok": ok,
        "records_checked": report.checked,
        "head": { "seq": head_seq, "hash": hex_str(head_hash) },
        "checkpoint": cp,
        "first_bad": report.first_bad.as_ref().map(|f| serde_json::json!({
            "seq": f.seq, "reason": f.reason.to_string(),
        })),
    })
}

fn verify_text(
    report: &caas_store::AuditVerifyReport,
    fresh: &Freshness,
    cp_path: &std::path::Path,
    head_seq: u64,
    head_hash: &[u8; 32],
    ok: bool,
) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "audit chain: {} record(s) checked, head {} ({})\n",
        report.checked,
        head_seq,
        hex_str(head_hash)
    ));
    match &report.first_bad {
        None => s.push_str("chain: ok (hashes, links, sequence, signatures, head row)\n"),
        Some(f) => s.push_str(&format!(
            "chain: FAILED at record {}: {}\n",
            f.seq, f.reason
        )),
    }
    match fresh {
        Freshness::NoCheckpoint { .. } => s.push_str(&format!(
            "checkpoint: none at {} (freshness not checked)\n",
            cp_path.display()
        )),
        Freshness::Fresh { checkpoint, .. } => s.push_str(&format!(
            "checkpoint: ok, record {} ({}) of {} is in the chain\n",
            checkpoint.seq,
            hex_str(&checkpoint.hash),
            caas_kms::audit::iso8601(checkpoint.time_ms)
        )),
        Freshness::Stale(r) => s.push_str(&format!("checkpoint: FAILED: {r}\n")),
    }
    s.push_str(if ok {
        "result: OK\n"
    } else {
        "result: FAILED\n"
    });
    s
}

/// Parses `--permissions` (`all` for every one).
pub fn parse_permissions(
    names: &[String],
) -> Result<std::collections::BTreeSet<caas_kms::operator::Permission>> {
    use caas_kms::operator::Permission;
    let mut out = std::collections::BTreeSet::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if n == "all" {
            out.extend(Permission::ALL);
            continue;
        }
        out.insert(Permission::parse(n).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown permission '{n}' (known: {}, all)",
                Permission::ALL.map(|p| p.as_str()).join(", ")
            )
        })?);
    }
    if out.is_empty() {
        bail!("--permissions names no permission");
    }
    Ok(out)
}
