//! `caas domain ...`: the operator's commands of a KMS domain (P7, `docs/kms-domains.md`).
//!
//! Every change is proposed first (`add-node`, `remove-node`, `add-operator`, `rotate`,
//! `set-quorum`), shown for review with its hash, and takes effect only when enough operators
//! have run `approve --hash HASH` with their own key file. Commands that write run on a member
//! node's host with that node's config (`--config`): they open the store as the node does.
use anyhow::{Context, Result, anyhow, bail};
use caas_kms::Kms;
use caas_kms::domain::identity::{MemberKeys, NodeIdentity};
use caas_kms::domain::member::{self, Approved, Pending};
use caas_kms::domain::state::{Change, OperatorKey, OperatorPublic, QuorumRules};
use caas_kms::domain::{self, DomainRecordAuth, NoAuditSigner};
use clap::Subcommand;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// `caas domain ...`.
#[derive(Debug, Subcommand)]
pub enum DomainCmd {
    /// Create an operator's signing key file (0600) and print its public key.
    OperatorKey {
        /// Operator name.
        #[arg(long)]
        name: String,
        /// Key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create this node's identity (if missing) and print the public keys an operator
    /// passes to `add-node`.
    Join {
        /// The node's identity file (`[keys] identity_file`).
        #[arg(long)]
        identity: PathBuf,
        /// Seal it to this TPM (`[keys] identity_tcti`, e.g. `device:/dev/tpmrm0`).
        #[arg(long)]
        tcti: Option<String>,
    },
    /// Create a new domain with this node as its first member; prints the genesis hash that
    /// every node pins (`[keys] domain_genesis`).
    Init {
        /// Database URL.
        #[arg(long)]
        database: String,
        /// This node's identity file (created if missing).
        #[arg(long)]
        identity: PathBuf,
        /// Seal it to this TPM (`[keys] identity_tcti`).
        #[arg(long)]
        tcti: Option<String>,
        /// Operators: `NAME=PUBLIC_KEY_BASE64` (from `operator-key`), repeated.
        #[arg(long = "operator", required = true)]
        operators: Vec<String>,
        /// Approvals every kind of change needs.
        #[arg(long, default_value_t = 2)]
        quorum: u32,
    },
    /// The verified domain state, this node's domain keys and the pending change.
    Status {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
    },
    /// Propose admitting a node (its `join` output).
    AddNode {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// `SIGNING_B64:AGREEMENT_B64` as printed by `caas domain join`.
        keys: String,
    },
    /// Propose removing a node (the next domain key is not sent to it).
    RemoveNode {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// Node id.
        node: String,
    },
    /// Propose admitting an operator.
    AddOperator {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// Name.
        name: String,
        /// Public key (base64, from `operator-key`).
        public: String,
    },
    /// Propose removing an operator.
    RemoveOperator {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// Name.
        name: String,
    },
    /// Propose one approval threshold for every kind of change.
    SetQuorum {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// Approvals needed.
        quorum: u32,
    },
    /// Propose a forced domain-key rotation.
    Rotate {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
    },
    /// Show the pending change; with `--hash` (what you reviewed), approve it with your key.
    Approve {
        /// Node config file.
        #[arg(long, env = "CAAS_CONFIG")]
        config: PathBuf,
        /// Your operator key file.
        #[arg(long)]
        operator_key: PathBuf,
        /// The hash shown for the change you reviewed.
        #[arg(long)]
        hash: Option<String>,
    },
}

/// Seals a node identity to a TPM: a sealed data object under the TPM's storage root key
/// (`fixedTPM`, `fixedParent`, no authorisation value: usable only through this TPM, with
/// an empty PCR policy so that it survives reboots and firmware updates). The blob is
/// `u32 BE len(TPM2B_PUBLIC) ‖ TPM2B_PUBLIC ‖ TPM2B_PRIVATE`; on another TPM it does not load.
#[derive(Debug)]
pub struct TpmIdentitySealer {
    tcti: String,
}

/// PCRs the identity is sealed to (none: bound to the TPM, not to the boot state).
const IDENTITY_PCRS: &[u32] = &[];

impl TpmIdentitySealer {
    /// The sealer of the TPM named by `tcti`.
    pub fn new(tcti: &str) -> Self {
        TpmIdentitySealer { tcti: tcti.into() }
    }

    fn tpm(&self) -> Result<caas_tpm::Tpm, caas_kms::domain::DomainError> {
        caas_tpm::Tpm::open(&self.tcti)
            .map_err(|e| caas_kms::domain::DomainError::Io(format!("identity TPM: {e}")))
    }
}

impl caas_kms::domain::identity::IdentitySealer for TpmIdentitySealer {
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, caas_kms::domain::DomainError> {
        let blob = self
            .tpm()?
            .seal(caas_tpm::PcrBank::Sha256, IDENTITY_PCRS, secret)
            .map_err(|e| caas_kms::domain::DomainError::Io(format!("identity TPM: {e}")))?;
        let len = u32::try_from(blob.public.len())
            .map_err(|_| caas_kms::domain::DomainError::Malformed("sealed public".into()))?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&blob.public);
        out.extend_from_slice(&blob.private);
        Ok(out)
    }

    fn unseal(
        &self,
        blob: &[u8],
    ) -> Result<caas_crypto::SecretBytes, caas_kms::domain::DomainError> {
        let bad = || caas_kms::domain::DomainError::Malformed("sealed identity blob".into());
        let len = blob
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(bad)?;
        let public = blob.get(4..4 + len).ok_or_else(bad)?.to_vec();
        let private = blob.get(4 + len..).ok_or_else(bad)?.to_vec();
        let out = self
            .tpm()?
            .unseal(
                &caas_tpm::KeyBlob { public, private },
                caas_tpm::PcrBank::Sha256,
                IDENTITY_PCRS,
            )
            .map_err(|_| {
                caas_kms::domain::DomainError::Refused(
                    "the identity does not unseal on this TPM (copied from another machine?)"
                        .into(),
                )
            })?;
        Ok(caas_crypto::SecretBytes::new(out.to_vec()))
    }
}

fn sealer(tcti: &Option<String>) -> Option<TpmIdentitySealer> {
    tcti.as_deref().map(TpmIdentitySealer::new)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn params(config: &std::path::Path) -> Result<caas_kms::KmsParams> {
    let p = crate::key_service::config::load(config)
        .map_err(anyhow::Error::msg)?
        .validate()
        .map_err(anyhow::Error::msg)?
        .serve
        .kms;
    if p.domain.is_none() {
        bail!(
            "{}: not a KMS domain node ([keys] identity_file and domain_genesis)",
            config.display()
        );
    }
    Ok(p)
}

async fn member_store(config: &std::path::Path) -> Result<(Arc<Kms>, [u8; 32])> {
    let p = params(config)?;
    let genesis = p.domain.as_ref().map(|d| d.genesis).unwrap_or_default();
    let kms = Kms::open_with(&p, None).await.map_err(|e| anyhow!("{e}"))?;
    Ok((kms, genesis))
}

fn show(p: &Pending) -> String {
    serde_json::json!({
        "Pending": {
            "Version": p.state.version,
            "Change": p.state.change,
            "Hash": hex::encode(p.signed.hash()),
            "ApprovedBy": p.approved_by,
            "Required": p.required,
            "MembersAfter": p.state.members.keys().collect::<Vec<_>>(),
            "OperatorsAfter": p.state.operators.keys().collect::<Vec<_>>(),
            "RulesAfter": p.state.rules,
        }
    })
    .to_string()
}

async fn propose(config: &std::path::Path, change: Change) -> Result<()> {
    let (kms, genesis) = member_store(config).await?;
    let p = member::propose(&kms.store, &genesis, change)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    println!("{}", show(&p));
    eprintln!(
        "review it, then each operator runs: caas domain approve --config ... --operator-key KEY --hash {}",
        hex::encode(p.signed.hash())
    );
    Ok(())
}

/// Runs a `caas domain` command.
pub async fn run(cmd: DomainCmd) -> Result<()> {
    use base64::Engine as _;
    match cmd {
        DomainCmd::OperatorKey { name, out } => {
            let k = OperatorKey::create(&out, &name).map_err(|e| anyhow!("{e}"))?;
            println!("{}={}", name, b64().encode(k.public().public));
        }
        DomainCmd::Join { identity, tcti } => {
            let s = sealer(&tcti);
            let id = NodeIdentity::load_or_create_with(
                &identity,
                s.as_ref()
                    .map(|s| s as &dyn caas_kms::domain::identity::IdentitySealer),
            )
            .map_err(|e| anyhow!("{e}"))?;
            println!(
                "{}",
                serde_json::json!({ "Node": id.id(), "Keys": id.public().to_text() })
            );
        }
        DomainCmd::Init {
            database,
            identity,
            tcti,
            operators,
            quorum,
        } => {
            let s = sealer(&tcti);
            let me = NodeIdentity::load_or_create_with(
                &identity,
                s.as_ref()
                    .map(|s| s as &dyn caas_kms::domain::identity::IdentitySealer),
            )
            .map_err(|e| anyhow!("{e}"))?;
            let mut ops = BTreeMap::new();
            for o in operators {
                let (name, public) = o
                    .split_once('=')
                    .context("--operator NAME=PUBLIC_KEY_BASE64")?;
                let public = b64()
                    .decode(public.trim())
                    .context("operator public key: base64")?;
                ops.insert(name.to_string(), OperatorPublic { public });
            }
            let g = domain::init(&database, &me, ops, QuorumRules::uniform(quorum))
                .await
                .map_err(|e| anyhow!("{e}"))?;
            println!(
                "{}",
                serde_json::json!({ "Node": me.id(), "Genesis": hex::encode(g) })
            );
            eprintln!(
                "pin it in every node's config: [keys] identity_file = \"{}\", domain_genesis = \"{}\"",
                identity.display(),
                hex::encode(g)
            );
        }
        DomainCmd::Status { config } => {
            let p = params(&config)?;
            let d = p.domain.as_ref().context("not a KMS domain node")?;
            let me = d.load_identity().map_err(|e| anyhow!("{e}"))?;
            let m = member::Member::new(me, d.genesis, None);
            let boot = caas_store::Store::open(
                &p.database,
                Arc::new(NoAuditSigner),
                Arc::new(DomainRecordAuth::bootstrap()),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
            let (chain, keys) = m.keys(&boot, None).await.map_err(|e| anyhow!("{e}"))?;
            let s = chain.latest();
            let pending = member::pending(&boot, &d.genesis).await.ok().flatten();
            println!(
                "{}",
                serde_json::json!({
                    "Domain": s.domain,
                    "Version": s.version,
                    "Node": m.identity().id(),
                    "Member": s.members.contains_key(m.identity().id()),
                    "Members": s.members.keys().collect::<Vec<_>>(),
                    "Operators": s.operators.keys().collect::<Vec<_>>(),
                    "Rules": s.rules,
                    "DomainKeysHeld": keys.keys.keys().collect::<Vec<_>>(),
                    "SealingDomainKey": keys.sealing,
                    "RotationPending": keys.needs_rotation,
                    "RecordEpoch": keys.record_epoch,
                    "RecordFloor": keys.record_floor,
                    "Refused": chain.refused.map(|(row, why)| serde_json::json!({"Row": row, "Reason": why})),
                    "Pending": pending.map(|p| serde_json::from_str::<serde_json::Value>(&show(&p)).unwrap_or_default()["Pending"].clone()),
                })
            );
        }
        DomainCmd::AddNode { config, keys } => {
            let keys = MemberKeys::from_text(&keys).map_err(|e| anyhow!("{e}"))?;
            propose(&config, Change::AddNode { keys }).await?;
        }
        DomainCmd::RemoveNode { config, node } => {
            propose(&config, Change::RemoveNode { node }).await?;
        }
        DomainCmd::AddOperator {
            config,
            name,
            public,
        } => {
            let public = b64().decode(public.trim()).context("public key: base64")?;
            propose(&config, Change::AddOperator { name, public }).await?;
        }
        DomainCmd::RemoveOperator { config, name } => {
            propose(&config, Change::RemoveOperator { name }).await?;
        }
        DomainCmd::SetQuorum { config, quorum } => {
            propose(
                &config,
                Change::SetRules {
                    rules: QuorumRules::uniform(quorum),
                },
            )
            .await?;
        }
        DomainCmd::Rotate { config } => propose(&config, Change::Rotate).await?,
        DomainCmd::Approve {
            config,
            operator_key,
            hash,
        } => {
            let key = OperatorKey::load(&operator_key).map_err(|e| anyhow!("{e}"))?;
            let (kms, genesis) = member_store(&config).await?;
            let p = member::pending(&kms.store, &genesis)
                .await
                .map_err(|e| anyhow!("{e}"))?
                .context("no pending domain change")?;
            println!("{}", show(&p));
            let Some(hash) = hash else {
                eprintln!("review the change above; approve it with --hash HASH");
                return Ok(());
            };
            let reviewed: [u8; 32] = hex::decode(hash.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .context("--hash: 64 hex digits")?;
            match member::approve(&kms.store, &genesis, &key, &reviewed)
                .await
                .map_err(|e| anyhow!("{e}"))?
            {
                Approved::Recorded { have, need } => {
                    println!(
                        "{}",
                        serde_json::json!({ "Approvals": have, "Required": need })
                    );
                }
                Approved::Published(v) => {
                    println!("{}", serde_json::json!({ "Published": v }));
                }
            }
        }
    }
    Ok(())
}
