//! The key service core: authentication (SigV4 against issued access keys), dispatch of
//! `TrentService.<Op>` to the operation families in `ops/`, authorization (key policy and
//! grants), and the single commit per request that makes the state change and its audit
//! record durable together before anything is answered.
use crate::audit::Ed25519AuditSigner;
use crate::checkpoint::OnRollback;
use crate::error::{KmsError, KmsResult};
use crate::keyring::{Keyring, NodeKey, SYSTEM_ACCOUNT};
use crate::model::{AccessKeyRecord, AccountRecord, kind};
use crate::ops;
use crate::sigv4;
use caas_crypto::SecretBytes;
use caas_store::{AuditEntry, Batch, Store, Write};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Largest request body accepted (AWS KMS bodies are small; plaintexts are ≤ 4 KiB).
pub const MAX_BODY: usize = 64 * 1024;
const CRED_TTL: Duration = Duration::from_secs(10);

/// Validated key-service parameters.
#[derive(Debug, Clone)]
pub struct KmsParams {
    /// Region name reported in ARNs and expected in SigV4 scopes.
    pub region: String,
    /// Store URL: a path / `sqlite:PATH`, or `postgres://...`.
    pub database: String,
    /// The node key file (0600, outside the database).
    pub node_key_file: PathBuf,
    /// Create the node key file if missing (dev mode).
    pub create_node_key: bool,
    /// Domain-key rotation period (seed 004: daily). `None` disables scheduled rotation.
    pub domain_key_rotation: Option<std::time::Duration>,
    /// Member of a KMS domain (P7) instead of a single node with a node key
    /// (`node_key_file` is then the identity file, beside which the checkpoint lives).
    pub domain: Option<crate::domain::DomainParams>,
    /// When the audit records of key use are durable.
    pub audit_durability: crate::config::AuditDurability,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Account (12 digits).
    pub account: String,
    /// Principal ARN.
    pub principal: String,
    /// Access key used.
    pub access_key_id: String,
    /// Tenant or operator (with its permissions).
    pub kind: crate::operator::CallerKind,
}

/// What a derived SigV4 signing key depends on besides the secret: (date, region, service).
/// The secret's identity is the [`Cred`] the cache lives in (one access key, one loaded
/// secret; a reload after [`CRED_TTL`] starts an empty cache).
type SigningScope = (String, String, String);

/// At most this many signing keys are cached per access key (a day boundary needs two).
const MAX_SIGNING_KEYS: usize = 4;

struct Cred {
    account: String,
    principal: String,
    kind: crate::operator::CallerKind,
    /// Signing keys of scopes that have verified a request; filled only after success
    /// (at most [`MAX_SIGNING_KEYS`]: looked up by comparing borrowed strings, no key
    /// built per request).
    signing: Vec<(SigningScope, aws_lc_rs::hmac::Key)>,
    secret: SecretBytes,
    enabled: bool,
    loaded: Instant,
}

/// Per-request context handed to operations.
#[derive(Debug)]
pub struct Ctx {
    /// Caller.
    pub caller: Caller,
    /// Request id (returned in `x-amzn-RequestId` and audited).
    pub request_id: String,
    /// Key the request touched (for the audit record).
    pub key_id: Option<String>,
    /// Non-secret details for the audit record.
    pub detail: serde_json::Map<String, Value>,
}

/// How a request reached the service, for its audit record (`Detail.TlsKeyExchange`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Over TLS, with this negotiated key-exchange group (e.g. `X25519MLKEM768`).
    Tls {
        /// The group's IANA name.
        key_exchange: String,
    },
    /// Over plain HTTP (`caas dev` without TLS): no key exchange.
    PlainHttp,
    /// Called in-process ([`Kms::handle`]; tests and tools).
    InProcess,
}

impl Transport {
    /// The audit field's value: the group's name, or why there is none.
    pub fn key_exchange(&self) -> &str {
        match self {
            Transport::Tls { key_exchange } => key_exchange,
            Transport::PlainHttp => "none (plain HTTP, no TLS)",
            Transport::InProcess => "none (in-process call)",
        }
    }
}

/// Audit detail field naming the TLS key-exchange group of the request's connection.
pub const TLS_KEY_EXCHANGE_FIELD: &str = "TlsKeyExchange";

/// The result of an operation: the response body and the writes to commit with its audit record.
#[derive(Debug, Default)]
pub struct Out {
    /// JSON response.
    pub body: Value,
    /// Object writes.
    pub writes: Vec<Write>,
}

impl Out {
    /// A response with no state change.
    pub fn reply(body: Value) -> Self {
        Out {
            body,
            writes: vec![],
        }
    }
}

/// The key service.
pub struct Kms {
    /// Storage.
    pub store: Store,
    /// Domain keys.
    pub keyring: Keyring,
    /// Region.
    pub region: String,
    audit_public: Vec<u8>,
    /// Scheduled domain-key rotation period.
    pub domain_key_rotation: Option<std::time::Duration>,
    /// The node's audit checkpoint (None for read-only inspection).
    checkpoint: Option<Arc<crate::checkpoint::CheckpointWriter>>,
    /// The keeper of the node's row floors (None for read-only inspection).
    floors: Option<Arc<crate::row_floors::FloorKeeper>>,
    clock_offset_ms: AtomicI64,
    creds: RwLock<HashMap<String, Arc<Cred>>>,
    /// Parsed key policies (by document text).
    pub(crate) policies: crate::policy::PolicyCache,
    /// Key records for key use ([`crate::keycache`]: its consistency rule).
    pub(crate) key_cache: crate::keycache::KeyCache,
    /// Verifier of `Recipient` attestation documents (set once by the deployment).
    recipient: std::sync::OnceLock<Arc<dyn crate::recipient::RecipientVerifier>>,
    /// Each key's last successful cryptographic use (GetKeyLastUsage).
    pub(crate) last_usage: crate::usage::LastUsage,
    /// When the audit records of key use are durable.
    pub audit_durability: crate::config::AuditDurability,
}

/// What a serving node keeps beside its node key: the audit checkpoint and the row floors.
struct Kept {
    checkpoint: Arc<crate::checkpoint::CheckpointWriter>,
    floors: Arc<crate::row_floors::FloorKeeper>,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Kms {
    /// Opens the store and the key hierarchy; refuses a database whose audit chain is
    /// behind this node's checkpoint (see [`crate::checkpoint`]).
    pub async fn open(p: &KmsParams) -> KmsResult<Arc<Kms>> {
        Self::open_with(p, Some(OnRollback::Refuse)).await
    }

    /// Opens the store and the key hierarchy. `freshness`: check the audit chain against
    /// this node's checkpoint and keep the checkpoint from now on (what to do when it is
    /// stale), or `None` for read-only inspection (`caas audit ...`), which neither checks
    /// nor moves the checkpoint.
    pub async fn open_with(p: &KmsParams, freshness: Option<OnRollback>) -> KmsResult<Arc<Kms>> {
        if let Some(d) = &p.domain {
            return Self::open_domain(p, d, freshness).await;
        }
        let node = if p.create_node_key {
            NodeKey::load_or_create(&p.node_key_file)?
        } else {
            NodeKey::load(&p.node_key_file)?
        };
        let signer = Arc::new(node.audit_signer()?);
        let audit_public = signer.public_key();
        let records = node.record_authenticator()?;
        let store = Store::open(&p.database, signer.clone(), Arc::new(records))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot open store");
                KmsError::Internal(format!("cannot open the database: {e}"))
            })?;
        // Before anything of this process is appended to the chain, or any row read.
        let kept = match freshness {
            Some(on_rollback) => Some(
                Self::keep_freshness(
                    &store,
                    &p.node_key_file,
                    signer,
                    on_rollback,
                    // The store signs with this key too.
                    true,
                )
                .await?,
            ),
            None => None,
        };
        let keyring = Keyring::open(store.clone(), node)
            .await
            .map_err(|e| match e {
                // At start-up the operator needs the row (the store has audited it).
                KmsError::Integrity(r) => KmsError::Internal(format!(
                    "refusing to start: the stored {} record {} of account {} failed its \
                     integrity check (changed outside the key service, or a different node key); \
                     the database's audit log records it (IntegrityCheck)",
                    r.kind, r.id, r.account
                )),
                other => other,
            })?;
        Ok(Self::assemble(p, store, keyring, audit_public, kept))
    }

    /// Checks the audit chain against the node's checkpoint and loads the node's row floors
    /// (`crate::row_floors`; discarded when an operator accepts a stale chain), then keeps
    /// both from now on.
    async fn keep_freshness(
        store: &Store,
        node_key_file: &std::path::Path,
        signer: Arc<crate::audit::Ed25519AuditSigner>,
        on_rollback: OnRollback,
        record_signatures: bool,
    ) -> KmsResult<Kept> {
        let (checkpoint, found) = crate::checkpoint::attach(
            store,
            crate::checkpoint::path_for(node_key_file),
            signer.clone(),
            on_rollback,
            record_signatures,
        )
        .await?;
        let floors = crate::row_floors::attach(store, node_key_file, signer, found.is_ok())?;
        Ok(Kept { checkpoint, floors })
    }

    fn assemble(
        p: &KmsParams,
        store: Store,
        keyring: Keyring,
        audit_public: Vec<u8>,
        kept: Option<Kept>,
    ) -> Arc<Kms> {
        let (checkpoint, floors) =
            kept.map_or((None, None), |k| (Some(k.checkpoint), Some(k.floors)));
        if let Some(f) = &floors {
            crate::row_floors::FloorKeeper::spawn(f);
        }
        let kms = Arc::new(Kms {
            store,
            keyring,
            region: p.region.clone(),
            audit_public,
            domain_key_rotation: p.domain_key_rotation,
            checkpoint,
            floors,
            clock_offset_ms: AtomicI64::new(0),
            creds: RwLock::new(HashMap::new()),
            policies: crate::policy::PolicyCache::default(),
            key_cache: crate::keycache::KeyCache::default(),
            recipient: std::sync::OnceLock::new(),
            last_usage: crate::usage::LastUsage::new(crate::now_ms()),
            audit_durability: p.audit_durability,
        });
        // Writes the last key uses to the store every PERSIST_INTERVAL while the service
        // lives (see `crate::usage`).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&kms);
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(crate::usage::PERSIST_INTERVAL).await;
                    let Some(kms) = weak.upgrade() else { break };
                    if let Err(e) = kms.last_usage.persist(&kms.store).await {
                        tracing::warn!(error = %e, "cannot write the last key uses");
                    }
                }
            });
        }
        kms
    }

    /// Opens a member of a KMS domain: reads and verifies the domain chain and this node's
    /// EDTs through a read-only bootstrap handle (domain rows are authenticated by their
    /// signatures), takes the record MAC keys of every domain-key epoch it holds and the
    /// audit key derived from the domain root, then opens the store and the keyring as usual.
    async fn open_domain(
        p: &KmsParams,
        d: &crate::domain::DomainParams,
        freshness: Option<OnRollback>,
    ) -> KmsResult<Arc<Kms>> {
        use crate::domain::{DomainRecordAuth, NoAuditSigner, member::Member};
        let me = d.load_identity()?;
        let head = crate::domain::head_file(&d.identity_file);
        let member = Member::new(me, d.genesis, Some(head));
        let boot = Store::open(
            &p.database,
            Arc::new(NoAuditSigner),
            Arc::new(DomainRecordAuth::bootstrap()),
        )
        .await
        .map_err(|e| KmsError::Internal(format!("cannot open the database: {e}")))?;
        let (_, dks) = member.keys(&boot, None).await?;
        drop(boot);
        let dk1 = dks.keys.get(&1).ok_or_else(|| {
            KmsError::Internal(
                "KMS domain: this node holds no domain key yet (is it a member? a member \
                 sends the keys within one maintenance interval of its admission)"
                    .into(),
            )
        })?;
        let node = NodeKey::from_domain_root(crate::domain::domain_root(dk1)?);
        let signer = Arc::new(node.audit_signer()?);
        let audit_public = signer.public_key();
        // Record MAC keys follow the domain-key epochs (crate::domain::epoch).
        let records = member.record_auth();
        // So does the audit signature; the checkpoint stays under the epoch-1 audit key
        // (a local file, never shared with the other members).
        let epoch_signer = Arc::new(crate::domain::epoch::EpochAuditSigner(
            member.epochs_shared(),
        ));
        let store = Store::open(&p.database, epoch_signer, Arc::new(records))
            .await
            .map_err(|e| KmsError::Internal(format!("cannot open the database: {e}")))?;
        let kept = match freshness {
            Some(on_rollback) => Some(
                Self::keep_freshness(
                    &store,
                    &p.node_key_file,
                    signer,
                    on_rollback,
                    // The store signs with the domain's epoch keys.
                    false,
                )
                .await?,
            ),
            None => None,
        };
        let keyring = Keyring::open_domain(store.clone(), member).await?;
        Ok(Self::assemble(p, store, keyring, audit_public, kept))
    }

    /// Installs the verifier of `Recipient` attestation documents (once; later calls are
    /// ignored). Without one, a request with `Recipient` is refused.
    pub fn set_recipient_verifier(&self, v: Arc<dyn crate::recipient::RecipientVerifier>) {
        let _ = self.recipient.set(v);
    }

    /// The verifier of `Recipient` attestation documents, if the deployment has one.
    pub fn recipient_verifier(&self) -> Option<&Arc<dyn crate::recipient::RecipientVerifier>> {
        self.recipient.get()
    }

    /// Whether `sig` authenticates audit record `seq` with `hash`: under the audit public key
    /// for a single node; in a KMS domain under the key of the epoch the signature names,
    /// refusing epochs below the record floor after the floor's seq
    /// ([`crate::domain::epoch`]).
    pub fn audit_signature_ok(&self, seq: u64, hash: &[u8; 32], sig: &[u8]) -> bool {
        match self.keyring.domain_member() {
            Some(m) => m.epochs().verify_audit(seq, hash, sig),
            None => crate::audit::verify_signature(&self.audit_public, hash, sig),
        }
    }

    /// The audit public key (raw Ed25519).
    pub fn audit_public_key(&self) -> &[u8] {
        &self.audit_public
    }

    /// Writes the last key uses (`crate::usage`) and waits until every audit record queued
    /// so far (`bounded` key use included) is durable: at clean shutdown, before the
    /// checkpoint is synced.
    pub async fn flush_audit(&self) {
        if let Err(e) = self.last_usage.persist(&self.store).await {
            tracing::error!(error = %e, "cannot write the last key uses");
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "cannot flush the audit log");
        }
        let stats = self.store.commit_stats();
        tracing::info!(
            transactions = stats.transactions,
            batches = stats.batches,
            deferred_waited = stats.deferred_waited,
            "audit store group commits"
        );
    }

    /// Makes the audit checkpoint and the row floors durable now (at shutdown; otherwise
    /// the checkpoint is synced every [`crate::checkpoint::SYNC_INTERVAL`] and the floors
    /// written every [`crate::row_floors::PERSIST_INTERVAL`]).
    pub fn sync_audit_checkpoint(&self) {
        if let Some(c) = &self.checkpoint
            && let Err(e) = c.sync()
        {
            tracing::warn!(error = %e, "cannot sync the audit checkpoint");
        }
        if let Some(f) = &self.floors
            && let Err(e) = f.persist()
        {
            tracing::warn!(error = %e, "cannot write the row floors");
        }
    }

    /// Service clock in Unix milliseconds (tests may shift it with [`Kms::advance_clock`]).
    pub fn now_ms(&self) -> i64 {
        crate::now_ms() + self.clock_offset_ms.load(Ordering::Relaxed)
    }

    /// Moves the service clock forward (tests of scheduled deletion and rotation).
    pub fn advance_clock(&self, ms: i64) {
        self.clock_offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Creates a tenant account; returns its 12-digit id.
    pub async fn create_account(&self, name: &str) -> KmsResult<String> {
        let digits = crate::material::random(8)?;
        let n = u64::from_be_bytes(
            digits
                .try_into()
                .map_err(|_| KmsError::internal_crypto("rng"))?,
        );
        let account = format!("{:012}", n % 1_000_000_000_000);
        let rec = AccountRecord {
            account: account.clone(),
            name: name.into(),
            created_ms: self.now_ms(),
        };
        let body = serde_json::to_vec(&rec).map_err(|_| KmsError::Internal("encode".into()))?;
        let mut entry = crate::audit::system_entry("CreateAccount", name);
        entry.account = account.clone();
        self.store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: kind::ACCOUNT.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: account.clone(),
                    body,
                    expect_rev: Some(0),
                }],
                audit: vec![entry],
            })
            .await
            .map_err(KmsError::store)?;
        Ok(account)
    }

    /// Lists accounts. A record that fails its integrity check refuses the whole list.
    pub async fn list_accounts(&self) -> KmsResult<Vec<AccountRecord>> {
        let objs = self
            .store
            .list(kind::ACCOUNT, Some(SYSTEM_ACCOUNT))
            .await
            .map_err(KmsError::store)?;
        objs.iter()
            .map(|o| {
                serde_json::from_slice::<AccountRecord>(&o.body)
                    .ok()
                    .filter(|r| r.account == o.id)
                    .ok_or_else(|| KmsError::mismatch(&o.kind, &o.account, &o.id))
            })
            .collect()
    }

    /// Issues an access key for a user of an account; returns (id, secret). The secret is
    /// shown once and stored only sealed under the domain key.
    pub async fn create_access_key(
        &self,
        account: &str,
        user: &str,
    ) -> KmsResult<(String, SecretBytes)> {
        self.issue_access_key(account, user, None).await
    }

    /// Creates an operator principal `name` with `permissions` and issues its access key;
    /// returns (id, secret). Operators live in [`crate::operator::OPERATOR_ACCOUNT`]: they
    /// can call the key service's operator routes their permissions name, never the KMS API.
    pub async fn create_operator(
        &self,
        name: &str,
        permissions: std::collections::BTreeSet<crate::operator::Permission>,
    ) -> KmsResult<(String, SecretBytes)> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(KmsError::Validation(
                "operator names are 1-64 characters of [A-Za-z0-9-_.@]".into(),
            ));
        }
        if permissions.is_empty() {
            return Err(KmsError::Validation(
                "an operator needs at least one permission".into(),
            ));
        }
        self.issue_access_key(crate::operator::OPERATOR_ACCOUNT, name, Some(permissions))
            .await
    }

    async fn issue_access_key(
        &self,
        account: &str,
        user: &str,
        operator: Option<std::collections::BTreeSet<crate::operator::Permission>>,
    ) -> KmsResult<(String, SecretBytes)> {
        if operator.is_none()
            && self
                .store
                .get(kind::ACCOUNT, SYSTEM_ACCOUNT, account)
                .await
                .map_err(KmsError::store)?
                .is_none()
        {
            return Err(KmsError::NotFound(format!(
                "account {account} does not exist"
            )));
        }
        let id_raw = crate::material::random(10)?;
        let akid = format!("AKIA{}", base32(&id_raw));
        let secret_raw = crate::material::random(30)?;
        use base64::Engine as _;
        let secret = SecretBytes::new(
            base64::engine::general_purpose::STANDARD
                .encode(&secret_raw)
                .into_bytes(),
        );
        let principal = match &operator {
            None => format!("arn:aws:iam::{account}:user/{user}"),
            Some(_) => format!("arn:caas:iam::{account}:operator/{user}"),
        };
        let sealed = self.keyring.seal_internal(
            ACCESS_KEY_PURPOSE,
            &[&akid, account, &principal],
            &secret,
        )?;
        let rec = AccessKeyRecord {
            access_key_id: akid.clone(),
            account: account.into(),
            principal,
            sealed_secret: sealed,
            enabled: true,
            created_ms: self.now_ms(),
            operator: operator.clone(),
        };
        let body = serde_json::to_vec(&rec).map_err(|_| KmsError::Internal("encode".into()))?;
        let mut entry = match &operator {
            None => crate::audit::system_entry(
                "CreateAccessKey",
                &format!("{akid} for {}", rec.principal),
            ),
            Some(ps) => crate::audit::system_entry(
                "CreateOperator",
                &format!(
                    "{akid} for {} with {}",
                    rec.principal,
                    ps.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
                ),
            ),
        };
        entry.account = account.into();
        self.store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: kind::ACCESS_KEY.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: akid.clone(),
                    body,
                    expect_rev: Some(0),
                }],
                audit: vec![entry],
            })
            .await
            .map_err(KmsError::store)?;
        Ok((akid, secret))
    }

    /// Enables or disables an access key.
    pub async fn set_access_key_enabled(&self, akid: &str, enabled: bool) -> KmsResult<()> {
        let o = self
            .store
            .get(kind::ACCESS_KEY, SYSTEM_ACCOUNT, akid)
            .await
            .map_err(KmsError::store)?
            .ok_or_else(|| KmsError::NotFound("access key".into()))?;
        let mut rec = access_key_record(&o)?;
        rec.enabled = enabled;
        let body = serde_json::to_vec(&rec).map_err(|_| KmsError::Internal("encode".into()))?;
        let mut entry = crate::audit::system_entry(
            if enabled {
                "EnableAccessKey"
            } else {
                "DisableAccessKey"
            },
            akid,
        );
        entry.account = rec.account.clone();
        self.store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: kind::ACCESS_KEY.into(),
                    account: SYSTEM_ACCOUNT.into(),
                    id: akid.into(),
                    body,
                    expect_rev: Some(o.rev),
                }],
                audit: vec![entry],
            })
            .await
            .map_err(KmsError::store)?;
        if let Ok(mut g) = self.creds.write() {
            g.remove(akid);
        }
        Ok(())
    }

    /// Lists access keys (ids and principals only). A record that fails its integrity
    /// check refuses the whole list.
    pub async fn list_access_keys(&self) -> KmsResult<Vec<AccessKeyRecord>> {
        let objs = self
            .store
            .list(kind::ACCESS_KEY, Some(SYSTEM_ACCOUNT))
            .await
            .map_err(KmsError::store)?;
        objs.iter().map(access_key_record).collect()
    }

    async fn cred(&self, akid: &str) -> KmsResult<Arc<Cred>> {
        if let Some(c) = self.creds.read().ok().and_then(|g| g.get(akid).cloned())
            && c.loaded.elapsed() < CRED_TTL
        {
            return Ok(c);
        }
        // On the heap: the row read and the secret's opening would otherwise make every
        // request's future larger.
        Box::pin(self.load_cred(akid)).await
    }

    /// [`Kms::cred`] on a cache miss: reads and opens the access key, caches it.
    async fn load_cred(&self, akid: &str) -> KmsResult<Arc<Cred>> {
        let unknown = || {
            KmsError::UnrecognizedClient(
                "The security token included in the request is invalid.".into(),
            )
        };
        let o = self
            .store
            .get(kind::ACCESS_KEY, SYSTEM_ACCOUNT, akid)
            .await
            .map_err(KmsError::store)?
            .ok_or_else(unknown)?;
        let rec = access_key_record(&o)?;
        let secret = self
            .keyring
            .open_internal(
                ACCESS_KEY_PURPOSE,
                &[&rec.access_key_id, &rec.account, &rec.principal],
                &rec.sealed_secret,
            )
            .await?;
        // An operator's key is valid only in the operator account, a tenant's only outside it.
        let kind = match rec.operator {
            Some(ps) if rec.account == crate::operator::OPERATOR_ACCOUNT => {
                crate::operator::CallerKind::Operator(ps)
            }
            None if rec.account != crate::operator::OPERATOR_ACCOUNT => {
                crate::operator::CallerKind::Tenant
            }
            _ => return Err(KmsError::mismatch(&o.kind, &o.account, &o.id)),
        };
        let c = Arc::new(Cred {
            account: rec.account,
            principal: rec.principal,
            kind,
            signing: Vec::new(),
            secret,
            enabled: rec.enabled,
            loaded: Instant::now(),
        });
        if let Ok(mut g) = self.creds.write() {
            g.insert(akid.to_string(), c.clone());
        }
        Ok(c)
    }

    /// Authenticates a SigV4-signed request (see [`sigv4`] for the rules): the scope,
    /// signed headers, time and payload hash are checked before the credential is looked
    /// up; the signing key is taken from the cache or derived, and cached only once a
    /// signature verified under it.
    /// Only tenants may call the KMS API: an operator's valid signature is refused here
    /// (`AccessDeniedException`).
    pub async fn authenticate(&self, req: &sigv4::Request<'_>) -> KmsResult<Caller> {
        let caller = self
            .authenticate_scope(req, "kms", sigv4::KMS_SIGNED_HEADERS)
            .await?;
        match Self::refuse_operator(&caller) {
            Some(e) => Err(e),
            None => Ok(caller),
        }
    }

    /// The KMS API's refusal of an operator (`AccessDeniedException`); `None` for tenants.
    pub fn refuse_operator(caller: &Caller) -> Option<KmsError> {
        (caller.kind != crate::operator::CallerKind::Tenant).then(|| {
            KmsError::AccessDenied(format!(
                "{} is an operator: operators cannot call KMS operations",
                caller.principal
            ))
        })
    }

    /// Records a request of an authenticated caller refused before its operation ran (an
    /// operator calling the KMS API), naming the caller and its access key.
    pub async fn audit_refused_caller(
        &self,
        caller: &Caller,
        target: &str,
        err: &KmsError,
        request_id: &str,
        transport: &Transport,
    ) {
        let mut entry = crate::audit::system_entry(
            target.strip_prefix("TrentService.").unwrap_or("unknown"),
            "",
        );
        entry.account = caller.account.clone();
        entry.principal = caller.principal.clone();
        entry.result = err.code().into();
        entry.request_id = request_id.into();
        entry.detail = serde_json::json!({
            "detail": "authenticated caller refused before the operation",
            crate::audit::ACCESS_KEY_FIELD: caller.access_key_id,
            TLS_KEY_EXCHANGE_FIELD: transport.key_exchange(),
        })
        .to_string();
        let _ = self
            .store
            .commit(Batch {
                writes: vec![],
                audit: vec![entry],
            })
            .await;
    }

    /// Authenticates a SigV4-signed request scoped to `service` (the key service's other
    /// routes use [`crate::operator::SERVICE`]), requiring `signed` to be signed besides
    /// `host` and `x-amz-date`. Same rules and credential cache as [`Kms::authenticate`];
    /// the caller may be a tenant or an operator (see [`Caller::kind`]).
    pub async fn authenticate_scope(
        &self,
        req: &sigv4::Request<'_>,
        service: &str,
        signed: &[&str],
    ) -> KmsResult<Caller> {
        let auth_value = req
            .headers
            .iter()
            .find(|(n, _)| *n == "authorization")
            .map(|(_, v)| v.as_ref())
            .ok_or_else(|| {
                KmsError::MissingAuthentication("Missing Authentication Token".into())
            })?;
        if req
            .headers
            .iter()
            .filter(|(n, _)| *n == "authorization")
            .count()
            > 1
        {
            return Err(KmsError::IncompleteSignature(
                "Only one Authorization header may be sent.".into(),
            ));
        }
        let auth = sigv4::parse_authorization(auth_value).map_err(auth_error)?;
        let expect = sigv4::Expect {
            region: &self.region,
            service,
            signed,
            now: self.now_ms() / 1000,
        };
        sigv4::check_request(req, &auth, &expect).map_err(auth_error)?;
        let cred = self.cred(&auth.access_key_id).await?;
        if !cred.enabled {
            return Err(KmsError::UnrecognizedClient(
                "The security token included in the request is invalid.".into(),
            ));
        }
        let cached = cred
            .signing
            .iter()
            .find(|((d, r, s), _)| *d == auth.date && *r == auth.region && *s == auth.service)
            .map(|(_, k)| k.clone());
        let key = cached.clone().unwrap_or_else(|| {
            sigv4::signing_key(
                cred.secret.expose(),
                &auth.date,
                &auth.region,
                &auth.service,
            )
        });
        sigv4::verify_signature(req, &auth, &key).map_err(auth_error)?;
        if cached.is_none() {
            let scope: SigningScope =
                (auth.date.clone(), auth.region.clone(), auth.service.clone());
            self.cache_signing_key(&auth.access_key_id, &cred, scope, key);
        }
        Ok(Caller {
            account: cred.account.clone(),
            principal: cred.principal.clone(),
            access_key_id: auth.access_key_id,
            kind: cred.kind.clone(),
        })
    }

    /// Remembers a signing key that has just verified a signature, in a copy of `cred`
    /// that replaces it only if the cache still holds that same `cred` (a concurrent
    /// disable or reload wins).
    fn cache_signing_key(
        &self,
        akid: &str,
        cred: &Arc<Cred>,
        scope: SigningScope,
        key: aws_lc_rs::hmac::Key,
    ) {
        let Ok(mut g) = self.creds.write() else {
            return;
        };
        if !g.get(akid).is_some_and(|c| Arc::ptr_eq(c, cred)) {
            return;
        }
        let mut signing = if cred.signing.len() >= MAX_SIGNING_KEYS {
            Vec::new()
        } else {
            cred.signing.clone()
        };
        signing.retain(|(s, _)| *s != scope);
        signing.push((scope, key));
        g.insert(
            akid.to_string(),
            Arc::new(Cred {
                account: cred.account.clone(),
                principal: cred.principal.clone(),
                kind: cred.kind.clone(),
                signing,
                secret: cred.secret.clone(),
                enabled: cred.enabled,
                loaded: cred.loaded,
            }),
        );
    }

    /// Runs one operation for an authenticated caller and commits its writes together with
    /// its audit record. Returns the HTTP status and JSON body.
    pub async fn handle(
        &self,
        caller: Caller,
        target: &str,
        body: &[u8],
        request_id: String,
    ) -> (u16, String) {
        self.handle_on(caller, target, body, request_id, &Transport::InProcess)
            .await
    }

    /// [`Kms::handle`] for a request that arrived over `transport` (named in its audit
    /// record).
    pub async fn handle_on(
        &self,
        caller: Caller,
        target: &str,
        body: &[u8],
        request_id: String,
        transport: &Transport,
    ) -> (u16, String) {
        let op = target.strip_prefix("TrentService.").unwrap_or("");
        let mut ctx = Ctx {
            caller,
            request_id,
            key_id: None,
            detail: serde_json::Map::new(),
        };
        ctx.detail.insert(
            TLS_KEY_EXCHANGE_FIELD.into(),
            Value::String(transport.key_exchange().to_string()),
        );
        let result = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => ops::dispatch(self, &mut ctx, op, &Value::Object(m)).await,
            Ok(_) => Err(KmsError::Serialization(
                "Request body must be a JSON object".into(),
            )),
            Err(_) if body.is_empty() => {
                ops::dispatch(self, &mut ctx, op, &Value::Object(Default::default())).await
            }
            Err(_) => Err(KmsError::Serialization(
                "Request body is not valid JSON".into(),
            )),
        };
        let (writes, reply, result_code) = match result {
            Ok(out) => (out.writes, Ok(out.body), "Success".to_string()),
            Err(e) => {
                let code = e.code().to_string();
                if let Some(d) = e.integrity_detail() {
                    ctx.detail.insert("IntegrityFailure".into(), d);
                }
                (vec![], Err(e), code)
            }
        };
        // Which access key signed (CloudTrail's userIdentity.accessKeyId).
        ctx.detail.insert(
            crate::audit::ACCESS_KEY_FIELD.into(),
            Value::String(ctx.caller.access_key_id.clone()),
        );
        let time_ms = self.now_ms();
        // The record is built from `ctx` (not cloned per request): again, with another
        // result, only when the commit fails.
        let entry_with = |ctx: &Ctx, result: String| AuditEntry {
            time_ms,
            account: ctx.caller.account.clone(),
            principal: ctx.caller.principal.clone(),
            operation: prefix_chars(if op.is_empty() { target } else { op }, 64).to_owned(),
            key_id: ctx.key_id.clone(),
            result,
            request_id: ctx.request_id.clone(),
            detail: serde_json::to_string(&ctx.detail).unwrap_or_else(|_| "{}".into()),
        };
        let batch = Batch {
            writes,
            audit: vec![entry_with(&ctx, result_code)],
        };
        // Only a successful key use with no state change may be answered before its record
        // is durable (`bounded`); everything else waits.
        let deferrable = self.audit_durability == crate::config::AuditDurability::Bounded
            && reply.is_ok()
            && batch.writes.is_empty()
            && is_key_use(op);
        let committed = if deferrable {
            self.store.commit_deferred(batch).await
        } else {
            self.store.commit(batch).await.map(|_| ())
        };
        let reply = match (reply, committed) {
            (Ok(body), Ok(_)) => {
                self.last_usage.record(&ctx, op, time_ms);
                Ok(body)
            }
            (Ok(_), Err(e)) => {
                // The state change did not happen; audit the failure on its own.
                let err = KmsError::store(e);
                let failed = entry_with(&ctx, err.code().into());
                let _ = self
                    .store
                    .commit(Batch {
                        writes: vec![],
                        audit: vec![failed],
                    })
                    .await;
                Err(err)
            }
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(se)) => {
                tracing::error!(error = %se, "cannot write audit record");
                Err(e)
            }
        };
        match reply {
            // serde_json's serializer straight into a buffer (Value's Display goes through
            // core::fmt, measurably slower per request).
            Ok(body) => (
                200,
                serde_json::to_string(&body).unwrap_or_else(|_| "{}".into()),
            ),
            Err(e) => (e.status(), e.body()),
        }
    }

    /// Records a request that failed before authentication completed.
    pub async fn audit_rejected(
        &self,
        target: &str,
        err: &KmsError,
        request_id: &str,
        transport: &Transport,
    ) {
        let mut entry = crate::audit::system_entry(
            target.strip_prefix("TrentService.").unwrap_or("unknown"),
            "request rejected before authentication",
        );
        entry.principal = "anonymous".into();
        entry.result = err.code().into();
        let mut detail = serde_json::json!({
            "detail": "request rejected before authentication",
            TLS_KEY_EXCHANGE_FIELD: transport.key_exchange(),
        });
        if let Some(d) = err.integrity_detail() {
            detail["IntegrityFailure"] = d;
        }
        entry.detail = detail.to_string();
        entry.request_id = request_id.into();
        let _ = self
            .store
            .commit(Batch {
                writes: vec![],
                audit: vec![entry],
            })
            .await;
    }
}

/// Whether a successful `op` is a use of a key (or of the RNG) that changes no state, so
/// that `audit_durability = "bounded"` may make its record durable after the reply: AWS's
/// tracked key uses ([`crate::usage::TRACKED`], one list for both) and GenerateRandom.
fn is_key_use(op: &str) -> bool {
    op == "GenerateRandom" || crate::usage::TRACKED.contains(&op)
}

/// The first `n` characters of `s` (all of it when shorter), as a slice.
fn prefix_chars(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// `seal_internal` purpose of access-key secrets (owner: access key id, account, principal).
pub const ACCESS_KEY_PURPOSE: &str = "access-key";

/// Parses an access-key row; its body must name the row's id.
pub(crate) fn access_key_record(o: &caas_store::Object) -> KmsResult<AccessKeyRecord> {
    serde_json::from_slice::<AccessKeyRecord>(&o.body)
        .ok()
        .filter(|r| r.access_key_id == o.id)
        .ok_or_else(|| KmsError::mismatch(&o.kind, &o.account, &o.id))
}

/// The AWS error for a SigV4 failure.
fn auth_error(e: sigv4::AuthError) -> KmsError {
    match e {
        sigv4::AuthError::Missing(m) => KmsError::MissingAuthentication(m),
        sigv4::AuthError::Incomplete(m) => KmsError::IncompleteSignature(m),
        sigv4::AuthError::Invalid(m) => KmsError::SignatureMismatch(m),
        sigv4::AuthError::Expired => KmsError::RequestExpired(
            "Signature expired: the request time is more than 5 minutes from the server time."
                .into(),
        ),
        sigv4::AuthError::Mismatch => KmsError::SignatureMismatch(
            "The request signature we calculated does not match the signature you provided.".into(),
        ),
    }
}

fn base32(bytes: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(A[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    out
}

impl NodeKey {
    /// The key that authenticates every object row in the store (HMAC-SHA256, see
    /// `caas_store::RecordAuthenticator`), derived from the node key so the database never
    /// holds it. Nodes sharing a database share it by sharing the node key. When KMS
    /// domains exist (issue 15) it moves to the domain: derived from the domain key and
    /// rotated with it.
    pub fn record_authenticator(&self) -> KmsResult<caas_store::HmacRecordKey> {
        let k = self.derive(b"caas/kms/record-mac-key")?;
        Ok(caas_store::HmacRecordKey::new(k.expose()))
    }

    /// The audit signing key, derived from the node key.
    pub fn audit_signer(&self) -> KmsResult<Ed25519AuditSigner> {
        let seed = self.derive(b"caas/kms/audit-signing-key")?;
        Ed25519AuditSigner::from_seed(seed.expose())
            .ok_or_else(|| KmsError::internal_crypto("audit key"))
    }
}
