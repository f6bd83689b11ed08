//! Key-service configuration: the raw TOML shape (`deny_unknown_fields`) and its validation
//! into [`ServeParams`]. Precedence: defaults < TOML file < `CAAS_*` environment < flags
//! (the binary applies the last two). See `config/key-service.example.toml`.
use crate::service::KmsParams;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `[server]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Listen address.
    pub listen: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// TLS certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The deployment CA (PEM) host agents' client certificates must chain to. Without it
    /// no client certificate is requested and host-protocol routes are refused over TLS
    /// (hosts authenticate by the certificate their enrollment bound to their TPM).
    pub tls_client_ca: Option<PathBuf>,
    /// Revocation list(s) of that CA (PEM, `caas pki revoke`): a listed client certificate
    /// fails the handshake. Loaded at start-up.
    pub tls_crl: Option<PathBuf>,
}

/// `[storage]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// Database URL.
    pub database: Option<String>,
    /// When the audit records of key use are durable (see [`AuditDurability`]).
    pub audit_durability: Option<AuditDurability>,
}

/// When the audit record of a *key use* (Encrypt, Decrypt, ReEncrypt, GenerateDataKey*,
/// Sign, Verify, GenerateMac, VerifyMac, GenerateRandom, DeriveSharedSecret, Encapsulate, Decapsulate — a successful
/// request that changes no state) is durable. Every state change (CreateKey, policies,
/// grants, deletion, rotation, import, …), every refusal and every failure is durable with
/// its record before its reply in both modes.
///
/// - `strict`: the record is durable before the reply (one group-committed fsync per
///   request's wait).
/// - `bounded` (default): the reply goes out as soon as the record is queued; it is
///   appended in request order to the same hash chain, signed like every record, and
///   durable within [`caas_store::DEFERRED_WINDOW`] (10 ms) under normal operation. On
///   SQLite the writer starts a group led by such a record at most every 4 ms, so the key
///   uses of that interval share one transaction, fsync and group signature (a state
///   change queued behind one waits that long too). When
///   the writer falls behind (oldest queued record older than 7 ms, or thousands queued) or
///   a deferred commit failed, requests wait for durability as in `strict` (a stalled or
///   failing disk slows or refuses key use rather than widening the window). A clean
///   shutdown flushes the queue; a crash (kill -9, power loss) loses at most the records
///   of the last window, never a state change, and the chain stays intact (no gap, no fork:
///   the lost records were never written).
///
/// Why `bounded` is the default: a key use changes nothing that the record would be needed
/// to explain later, and its record's purpose is after-the-fact visibility — the same
/// reason AWS delivers CloudTrail records of KMS calls asynchronously (minutes) and HSMs
/// buffer their audit logs. The cost is that the records of the last ≤ 10 ms of key use
/// before a crash can be missing; deployments that need "no reply without a durable
/// record" set `strict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDurability {
    /// Durable before the reply.
    Strict,
    /// Durable within [`caas_store::DEFERRED_WINDOW`] of the reply.
    #[default]
    Bounded,
}

impl AuditDurability {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Bounded => "bounded",
        }
    }
}

impl std::str::FromStr for AuditDurability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Self::Strict),
            "bounded" => Ok(Self::Bounded),
            other => Err(format!(
                "audit durability '{other}' is not one of: strict, bounded"
            )),
        }
    }
}

/// `[keys]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    /// Node key file.
    pub node_key_file: Option<PathBuf>,
    /// Create it if missing.
    pub create_node_key: Option<bool>,
    /// KMS domain (P7): this node's identity file (0600, outside the database). With it,
    /// there is no node key: the domain keys come from this node's EDTs.
    pub identity_file: Option<PathBuf>,
    /// KMS domain: the genesis hash (hex) printed by `caas domain init`, pinned here.
    pub domain_genesis: Option<String>,
    /// KMS domain: the TPM (TCTI string, e.g. `device:/dev/tpmrm0`) this node's identity
    /// is sealed to. Without it the identity is a plain 0600 file.
    pub identity_tcti: Option<String>,
}

/// `[maintenance]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMaintenance {
    /// Seconds between runs of scheduled deletion / rotation.
    pub interval_secs: Option<u64>,
    /// Hours between domain-key rotations (seed 004: daily); 0 disables.
    pub domain_key_rotation_hours: Option<u64>,
}

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Server.
    #[serde(default)]
    pub server: RawServer,
    /// Storage.
    #[serde(default)]
    pub storage: RawStorage,
    /// Keys.
    #[serde(default)]
    pub keys: RawKeys,
    /// Maintenance.
    #[serde(default)]
    pub maintenance: RawMaintenance,
}

/// Validated parameters of `caas key-service serve`.
#[derive(Debug, Clone)]
pub struct ServeParams {
    /// Service parameters.
    pub kms: KmsParams,
    /// Listen address.
    pub listen: SocketAddr,
    /// TLS files.
    pub tls: Option<crate::server::TlsFiles>,
    /// Maintenance interval.
    pub maintenance_interval: std::time::Duration,
}

/// Reads a TOML config file.
pub fn load(path: &Path) -> Result<RawConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl RawConfig {
    /// Validates into parameters.
    pub fn validate(self) -> Result<ServeParams, String> {
        let listen = self
            .server
            .listen
            .unwrap_or_else(|| "127.0.0.1:7300".into());
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| format!("server.listen: '{listen}' is not an address:port"))?;
        let tls = match (self.server.tls_cert, self.server.tls_key) {
            (Some(_), Some(_))
                if self.server.tls_crl.is_some() && self.server.tls_client_ca.is_none() =>
            {
                return Err("server.tls_crl needs server.tls_client_ca".into());
            }
            (Some(cert), Some(key)) => Some(crate::server::TlsFiles {
                cert,
                key,
                client_ca: self.server.tls_client_ca,
                crl: self.server.tls_crl,
            }),
            (None, None) if self.server.tls_client_ca.is_some() => {
                return Err("server.tls_client_ca needs server.tls_cert and tls_key".into());
            }
            (None, None) => None,
            _ => return Err("server.tls_cert and server.tls_key must be given together".into()),
        };
        let database = self
            .storage
            .database
            .ok_or("storage.database is required")?;
        let domain = match (self.keys.identity_file, self.keys.domain_genesis) {
            (Some(identity_file), Some(g)) => {
                if self.keys.node_key_file.is_some() {
                    return Err(
                        "keys.node_key_file and keys.identity_file exclude each other (a node \
                         of a KMS domain has no node key)"
                            .into(),
                    );
                }
                let genesis = caas_crypto::chain::unhex(g.trim())
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or("keys.domain_genesis must be 64 hex digits")?;
                Some(crate::domain::DomainParams {
                    identity_file,
                    genesis,
                    identity_tcti: self.keys.identity_tcti,
                    sealer: None,
                })
            }
            (None, None) => None,
            _ => return Err("keys.identity_file and keys.domain_genesis go together".into()),
        };
        let node_key_file = match &domain {
            Some(d) => d.identity_file.clone(),
            None => self
                .keys
                .node_key_file
                .ok_or("keys.node_key_file is required")?,
        };
        let region = self.server.region.unwrap_or_else(|| "us-east-1".into());
        if region.is_empty()
            || region.len() > 32
            || !region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(format!("server.region: '{region}' is not a region name"));
        }
        let secs = self.maintenance.interval_secs.unwrap_or(60);
        if secs == 0 {
            return Err("maintenance.interval_secs must be at least 1".into());
        }
        Ok(ServeParams {
            kms: KmsParams {
                region,
                database,
                node_key_file,
                create_node_key: self.keys.create_node_key.unwrap_or(false) && domain.is_none(),
                domain,
                audit_durability: self.storage.audit_durability.unwrap_or_default(),
                domain_key_rotation: match self.maintenance.domain_key_rotation_hours.unwrap_or(24)
                {
                    0 => None,
                    h => Some(std::time::Duration::from_secs(h * 3600)),
                },
            },
            listen,
            tls,
            maintenance_interval: std::time::Duration::from_secs(secs),
        })
    }
}
