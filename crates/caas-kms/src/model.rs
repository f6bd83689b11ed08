//! Records the key service keeps in the store (JSON bodies of `caas_store::Object`s).
//! No record holds key material in plaintext: HBKs and private keys are EKTs
//! ([`crate::keyring`]), access-key secrets are sealed under the domain key.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Store kinds.
pub mod kind {
    /// KMS keys.
    pub const KEY: &str = "key";
    /// Aliases (id = alias name).
    pub const ALIAS: &str = "alias";
    /// Grants (id = grant id).
    pub const GRANT: &str = "grant";
    /// Access keys (account "-", id = access key id).
    pub const ACCESS_KEY: &str = "access_key";
    /// Accounts (account "-", id = account id).
    pub const ACCOUNT: &str = "account";
    /// Import parameters (id = import token id).
    pub const IMPORT: &str = "import";
    /// Deployment-wide singletons (account "-"): the audit signing key.
    pub const SYSTEM: &str = "system";
}

/// Serde helper: `Vec<u8>` as standard base64.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};
    /// Serialize.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Serde helper: `Option<Vec<u8>>` as base64.
pub mod b64opt {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};
    /// Serialize.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(v)),
            None => s.serialize_none(),
        }
    }
    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// One HBK version (seed 004): the key material as an EKT under a domain key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HbkVersion {
    /// 1, 2, ...
    pub version: u32,
    /// Creation time.
    pub created_ms: i64,
    /// The EKT.
    #[serde(with = "b64")]
    pub ekt: Vec<u8>,
    /// DER SubjectPublicKeyInfo for asymmetric keys.
    #[serde(with = "b64opt", default)]
    pub public_key: Option<Vec<u8>>,
}

/// A rotation of the key (ListKeyRotations).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rotation {
    /// HBK version created by the rotation.
    pub version: u32,
    /// When.
    pub date_ms: i64,
    /// ON_DEMAND or AUTOMATIC.
    pub rotation_type: String,
}

/// Imported key material state.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ImportState {
    /// KEY_MATERIAL_EXPIRES or KEY_MATERIAL_DOES_NOT_EXPIRE.
    pub expiration_model: Option<String>,
    /// Expiry of the material.
    pub valid_to_ms: Option<i64>,
    /// HMAC of the material under a domain-key-derived key: re-imports must match.
    #[serde(with = "b64opt", default)]
    pub fingerprint: Option<Vec<u8>>,
}

/// A KMS key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id (UUID).
    pub key_id: String,
    /// Owning account (12 digits).
    pub account: String,
    /// Region of the deployment.
    pub region: String,
    /// Description.
    pub description: String,
    /// Creation time.
    pub created_ms: i64,
    /// Enabled | Disabled | PendingDeletion | PendingImport.
    pub state: String,
    /// KeySpec wire name.
    pub key_spec: String,
    /// KeyUsage wire name.
    pub key_usage: String,
    /// AWS_KMS | EXTERNAL.
    pub origin: String,
    /// When PendingDeletion: when the key is deleted.
    pub deletion_date_ms: Option<i64>,
    /// Waiting period asked for.
    pub pending_window_days: Option<u32>,
    /// Automatic rotation on?
    pub rotation_enabled: bool,
    /// Automatic rotation period.
    pub rotation_period_days: u32,
    /// Next automatic rotation.
    pub next_rotation_ms: Option<i64>,
    /// Rotation history.
    pub rotations: Vec<Rotation>,
    /// HBK versions, oldest first; the last one is current.
    pub versions: Vec<HbkVersion>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Key policy JSON (policy name "default").
    pub policy: String,
    /// Imported material state (origin EXTERNAL).
    #[serde(default)]
    pub import: ImportState,
}

impl KeyRecord {
    /// The key ARN.
    pub fn arn(&self) -> String {
        format!(
            "arn:aws:kms:{}:{}:key/{}",
            self.region, self.account, self.key_id
        )
    }
    /// The current HBK version.
    pub fn current(&self) -> Option<&HbkVersion> {
        self.versions.last()
    }
    /// A specific HBK version.
    pub fn version(&self, v: u32) -> Option<&HbkVersion> {
        self.versions.iter().find(|h| h.version == v)
    }
}

/// An alias.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AliasRecord {
    /// `alias/...`.
    pub name: String,
    /// Target key id.
    pub target_key_id: String,
    /// Created.
    pub created_ms: i64,
    /// Last updated.
    pub updated_ms: i64,
}

/// A grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRecord {
    /// Grant id.
    pub grant_id: String,
    /// The key.
    pub key_id: String,
    /// Optional name.
    pub name: Option<String>,
    /// Principal ARN the grant is for.
    pub grantee: String,
    /// Principal that may retire it.
    pub retiring: Option<String>,
    /// Operations allowed.
    pub operations: Vec<String>,
    /// EncryptionContextSubset constraint.
    pub ec_subset: Option<BTreeMap<String, String>>,
    /// EncryptionContextEquals constraint.
    pub ec_equals: Option<BTreeMap<String, String>>,
    /// Who created it.
    pub issuing: String,
    /// Created.
    pub created_ms: i64,
    /// SHA-256 of the grant token (the token is returned once and never stored).
    #[serde(with = "b64")]
    pub token_hash: Vec<u8>,
}

/// An access key: the SigV4 secret sealed under the domain key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    /// Access key id.
    pub access_key_id: String,
    /// Account it acts for.
    pub account: String,
    /// Principal ARN.
    pub principal: String,
    /// Sealed secret.
    #[serde(with = "b64")]
    pub sealed_secret: Vec<u8>,
    /// Disabled keys cannot authenticate.
    pub enabled: bool,
    /// Created.
    pub created_ms: i64,
}

/// An account (tenant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRecord {
    /// 12-digit id.
    pub account: String,
    /// Human name.
    pub name: String,
    /// Created.
    pub created_ms: i64,
}

/// Parameters of a pending import (GetParametersForImport).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRecord {
    /// Import token id (the token returned to the client).
    pub token_id: String,
    /// Key it is for.
    pub key_id: String,
    /// Wrapping algorithm.
    pub wrapping_algorithm: String,
    /// Wrapping RSA private key as an EKT.
    #[serde(with = "b64")]
    pub wrapping_key_ekt: Vec<u8>,
    /// Expiry.
    pub valid_to_ms: i64,
}
