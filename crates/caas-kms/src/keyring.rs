//! The key hierarchy of seed 004 as the service holds it in memory:
//!
//! ```text
//! node key (0600 file outside the database in dev; TPM-sealed in production, issue 3)
//!   └─ wraps domain keys DK_v (stored wrapped in the database, kind "domain_key")
//!        └─ wraps EKTs: each HBK version of each KMS key (stored in the key's record)
//!             └─ derives a fresh per-request key (SP 800-108 KDF, 256-bit nonce)
//! ```
//!
//! Single node (and `caas dev`): the domain keys are wrapped by the node key as above. In a
//! KMS domain (P7, [`crate::domain`]) there is no shared node key: the domain keys come only
//! from this node's exported domain tokens ([`Keyring::open_domain`]), every reload verifies
//! the domain chain first, and new EKTs are sealed under the newest domain key the domain
//! rules allow ([`crate::domain::member::DomainKeys::sealing`]). Domain keys are rotated with [`Keyring::rotate_domain_key`], which re-wraps
//! every EKT under the new version; old versions stay loaded so that nothing is lost if a
//! re-wrap is interrupted.
//!
//! Every sealed value names its owner in its AAD, so that a database administrator cannot
//! move it to another owner (copy a victim's key record into their own account, re-point an
//! access key): an EKT's AAD is ([`ekt_aad`]) the account, the key id and the HBK version;
//! a service-internal secret's ([`Keyring::seal_internal`]) is its purpose and its owner's
//! names (an access key: access key id, account and principal). The rows holding them are
//! also MAC'd by the store (`caas_store::RecordAuthenticator`), so an edit is refused before
//! any unwrap is tried; the AADs keep the key hierarchy itself from being re-pointed should
//! the record MAC ever be bypassed.
use crate::error::{KmsError, KmsResult};
use caas_crypto::{SecretBytes, SecretKey, aead};
use caas_store::{Batch, Store, Write};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::RwLock;

/// Store kind of wrapped domain keys.
pub const DOMAIN_KEY_KIND: &str = "domain_key";
/// Account name used for deployment-wide records.
pub const SYSTEM_ACCOUNT: &str = "-";

/// The node's own key, which wraps the domain keys.
#[derive(Debug)]
pub struct NodeKey(SecretKey);

impl NodeKey {
    /// Reads a node key file (32 raw bytes); refuses files readable by group or others.
    pub fn load(path: &Path) -> KmsResult<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| {
                KmsError::Internal(format!("node key file unreadable: {}", e.kind()))
            })?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(KmsError::Internal(
                    "node key file must have mode 0600".into(),
                ));
            }
        }
        let bytes =
            zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
                KmsError::Internal(format!("node key file unreadable: {}", e.kind()))
            })?);
        SecretKey::from_slice(&bytes)
            .map(NodeKey)
            .map_err(|_| KmsError::Internal("node key file must hold exactly 32 bytes".into()))
    }

    /// Creates a fresh node key file with mode 0600, atomically (fails if it exists).
    pub fn create(path: &Path) -> KmsResult<Self> {
        let key = caas_crypto::random_key().map_err(|_| KmsError::internal_crypto("rng"))?;
        caas_crypto::fs::create_secret(path, key.expose(), None).map_err(|e| {
            KmsError::Internal(format!("cannot create node key file: {}", e.kind()))
        })?;
        Ok(NodeKey(key))
    }

    /// Loads the key at `path`, creating it first if missing.
    pub fn load_or_create(path: &Path) -> KmsResult<Self> {
        if path.exists() {
            Self::load(path)
        } else {
            Self::create(path)
        }
    }
}

#[derive(Serialize, Deserialize)]
struct DomainKeyRecord {
    version: u32,
    created_ms: i64,
    #[serde(with = "crate::model::b64")]
    wrapped: Vec<u8>,
}

fn dk_aad(version: u32) -> Vec<u8> {
    format!("caas/kms/domain-key/v{version}").into_bytes()
}

fn field(a: &mut Vec<u8>, bytes: &[u8]) {
    a.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    a.extend_from_slice(bytes);
}

/// AAD of an EKT: `"caas/kms/ekt/v2" ‖ F(account) ‖ F(key id) ‖ HBK version (u32 BE)`,
/// `F(x)` = length as u64 BE ‖ x.
pub fn ekt_aad(account: &str, key_id: &str, hbk_version: u32) -> Vec<u8> {
    let mut a = b"caas/kms/ekt/v2".to_vec();
    field(&mut a, account.as_bytes());
    field(&mut a, key_id.as_bytes());
    a.extend_from_slice(&hbk_version.to_be_bytes());
    a
}

/// AAD of a service-internal secret: `"caas/kms/internal/v2" ‖ F(purpose) ‖ F(owner…)`.
fn internal_aad(purpose: &str, owner: &[&str]) -> Vec<u8> {
    let mut a = b"caas/kms/internal/v2".to_vec();
    field(&mut a, purpose.as_bytes());
    a.extend_from_slice(&(owner.len() as u64).to_be_bytes());
    for o in owner {
        field(&mut a, o.as_bytes());
    }
    a
}

/// Where the domain keys come from.
#[derive(Debug)]
enum Source {
    /// Wrapped by this node's key in the database (single node, `caas dev`).
    NodeKey(NodeKey),
    /// This node's EDTs of a KMS domain.
    Domain(Box<crate::domain::member::Member>),
}

/// The domain keys loaded in memory.
#[derive(Debug)]
pub struct Keyring {
    source: Source,
    store: Store,
    keys: RwLock<BTreeMap<u32, SecretKey>>,
    created: RwLock<BTreeMap<u32, i64>>,
    /// In a domain: the version new EKTs are sealed under (None: the newest).
    sealing: RwLock<Option<u32>>,
}

impl Keyring {
    /// Loads every domain key from the store, creating version 1 on first start.
    pub async fn open(store: Store, node: NodeKey) -> KmsResult<Self> {
        let kr = Keyring {
            source: Source::NodeKey(node),
            store,
            keys: RwLock::new(BTreeMap::new()),
            created: RwLock::new(BTreeMap::new()),
            sealing: RwLock::new(None),
        };
        kr.reload().await?;
        if kr.current_version().is_none() {
            match kr.add_version(1).await {
                Ok(()) | Err(KmsError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
            kr.reload().await?;
        }
        if kr.current_version().is_none() {
            return Err(KmsError::Internal("no domain key available".into()));
        }
        Ok(kr)
    }

    /// A keyring fed by this node's EDTs of a KMS domain (see [`crate::domain`]).
    pub async fn open_domain(
        store: Store,
        member: crate::domain::member::Member,
    ) -> KmsResult<Self> {
        let kr = Keyring {
            source: Source::Domain(Box::new(member)),
            store,
            keys: RwLock::new(BTreeMap::new()),
            created: RwLock::new(BTreeMap::new()),
            sealing: RwLock::new(None),
        };
        kr.reload().await?;
        if kr.current_version().is_none() {
            return Err(KmsError::Internal(
                "KMS domain: this node holds no usable domain key (not a member yet?)".into(),
            ));
        }
        Ok(kr)
    }

    /// The domain membership, if this keyring belongs to a KMS domain.
    pub fn domain_member(&self) -> Option<&crate::domain::member::Member> {
        match &self.source {
            Source::Domain(m) => Some(&**m),
            Source::NodeKey(_) => None,
        }
    }

    async fn add_version(&self, version: u32) -> KmsResult<()> {
        let Source::NodeKey(node) = &self.source else {
            return Err(KmsError::Internal(
                "domain keys of a KMS domain come from EDTs".into(),
            ));
        };
        let dk = caas_crypto::random_key().map_err(|_| KmsError::internal_crypto("rng"))?;
        let wrapped = aead::seal(&node.0, &dk_aad(version), dk.expose())
            .map_err(|_| KmsError::internal_crypto("wrap domain key"))?;
        let rec = DomainKeyRecord {
            version,
            created_ms: crate::now_ms(),
            wrapped,
        };
        let body = serde_json::to_vec(&rec).map_err(|_| KmsError::internal_crypto("encode"))?;
        let batch = Batch {
            writes: vec![Write::Put {
                kind: DOMAIN_KEY_KIND.into(),
                account: SYSTEM_ACCOUNT.into(),
                id: format!("{version:010}"),
                body,
                expect_rev: Some(0),
            }],
            audit: vec![crate::audit::system_entry(
                "CreateDomainKey",
                &format!("version {version}"),
            )],
        };
        self.store.commit(batch).await.map_err(KmsError::store)?;
        Ok(())
    }

    /// Re-reads the domain keys (after another node rotated them).
    pub async fn reload(&self) -> KmsResult<()> {
        let node = match &self.source {
            Source::NodeKey(n) => n,
            Source::Domain(m) => {
                let dks = m.sync(&self.store).await?;
                if let Ok(mut g) = self.keys.write() {
                    *g = dks.keys;
                }
                if let Ok(mut g) = self.created.write() {
                    *g = dks.created;
                }
                if let Ok(mut g) = self.sealing.write() {
                    *g = dks.sealing;
                }
                return Ok(());
            }
        };
        let objs = self
            .store
            .list(DOMAIN_KEY_KIND, Some(SYSTEM_ACCOUNT))
            .await
            .map_err(KmsError::store)?;
        let mut map = BTreeMap::new();
        let mut created = BTreeMap::new();
        for o in objs {
            let rec: DomainKeyRecord = serde_json::from_slice(&o.body)
                .map_err(|_| KmsError::internal_crypto("domain key record"))?;
            let raw = aead::open(&node.0, &dk_aad(rec.version), &rec.wrapped).map_err(|_| {
                KmsError::Internal("a domain key cannot be unwrapped with this node key (wrong node key for this database?)".into())
            })?;
            created.insert(rec.version, rec.created_ms);
            map.insert(
                rec.version,
                SecretKey::from_slice(raw.expose())
                    .map_err(|_| KmsError::internal_crypto("domain key length"))?,
            );
        }
        if let Ok(mut g) = self.keys.write() {
            *g = map;
        }
        if let Ok(mut g) = self.created.write() {
            *g = created;
        }
        Ok(())
    }

    /// Creation time of the current domain key version.
    pub fn current_created_ms(&self) -> Option<i64> {
        let v = self.current_version()?;
        self.created.read().ok().and_then(|g| g.get(&v).copied())
    }

    /// The domain key version new EKTs are sealed under (the newest one; in a domain, the
    /// newest one the domain rules allow).
    pub fn current_version(&self) -> Option<u32> {
        if let Source::Domain(_) = &self.source {
            return self.sealing.read().ok().and_then(|g| *g);
        }
        self.keys
            .read()
            .ok()
            .and_then(|g| g.keys().next_back().copied())
    }

    /// Seals an HBK (or other key material) into an EKT under the current domain key:
    /// `dk_version (u32 BE) ‖ AES-256-GCM(DK, aad = ekt_aad(account, key id, HBK version), material)`.
    pub fn seal_ekt(
        &self,
        account: &str,
        key_id: &str,
        hbk_version: u32,
        material: &SecretBytes,
    ) -> KmsResult<Vec<u8>> {
        self.seal_aad(&ekt_aad(account, key_id, hbk_version), material)
    }

    fn seal_aad(&self, aad: &[u8], material: &SecretBytes) -> KmsResult<Vec<u8>> {
        let v = self
            .current_version()
            .ok_or_else(|| KmsError::internal_crypto("no domain key"))?;
        let g = self
            .keys
            .read()
            .map_err(|_| KmsError::internal_crypto("keyring lock"))?;
        let dk = g
            .get(&v)
            .ok_or_else(|| KmsError::internal_crypto("no domain key"))?;
        let mut out = v.to_be_bytes().to_vec();
        out.extend(
            aead::seal(dk, aad, material.expose())
                .map_err(|_| KmsError::internal_crypto("seal ekt"))?,
        );
        Ok(out)
    }

    /// Opens an EKT; reloads domain keys once if it names an unknown version.
    pub async fn open_ekt(
        &self,
        account: &str,
        key_id: &str,
        hbk_version: u32,
        ekt: &[u8],
    ) -> KmsResult<SecretBytes> {
        self.open_aad(&ekt_aad(account, key_id, hbk_version), ekt)
            .await
    }

    async fn open_aad(&self, aad: &[u8], ekt: &[u8]) -> KmsResult<SecretBytes> {
        match self.open_aad_cached(aad, ekt) {
            Err(KmsError::NotFound(_)) => {
                self.reload().await?;
                self.open_aad_cached(aad, ekt)
                    .map_err(|_| KmsError::internal_crypto("ekt under unknown domain key"))
            }
            other => other,
        }
    }

    /// Opens an EKT with the loaded domain keys only (no store access).
    pub fn open_ekt_cached(
        &self,
        account: &str,
        key_id: &str,
        hbk_version: u32,
        ekt: &[u8],
    ) -> KmsResult<SecretBytes> {
        self.open_aad_cached(&ekt_aad(account, key_id, hbk_version), ekt)
    }

    fn open_aad_cached(&self, aad: &[u8], ekt: &[u8]) -> KmsResult<SecretBytes> {
        let (v, body) = ekt
            .split_at_checked(4)
            .ok_or_else(|| KmsError::internal_crypto("short ekt"))?;
        let v = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        let g = self
            .keys
            .read()
            .map_err(|_| KmsError::internal_crypto("keyring lock"))?;
        let dk = g
            .get(&v)
            .ok_or_else(|| KmsError::NotFound("domain key version".into()))?;
        aead::open(dk, aad, body).map_err(|_| KmsError::internal_crypto("open ekt"))
    }

    /// A key for keyed fingerprints (imported material), derived from the first domain key,
    /// which is never retired.
    pub fn fingerprint_key(&self) -> KmsResult<SecretBytes> {
        let g = self
            .keys
            .read()
            .map_err(|_| KmsError::internal_crypto("keyring lock"))?;
        let (_, dk) = g
            .iter()
            .next()
            .ok_or_else(|| KmsError::internal_crypto("no domain key"))?;
        caas_crypto::kdf::derive(dk.expose(), b"caas/kms/import-fingerprint", b"", 32)
            .map_err(|_| KmsError::internal_crypto("kdf"))
    }

    /// Domain key version an EKT is sealed under.
    pub fn ekt_version(ekt: &[u8]) -> Option<u32> {
        ekt.get(..4)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// Seals a service-internal secret under the current domain key, bound to its purpose
    /// and its owner: e.g. `("access-key", [akid, account, principal])`,
    /// `("import-wrapping-key", [account, key id, token id])`, `("tl-ttp-keys", ["-", "current"])`.
    /// Opening it under any other purpose or owner fails.
    pub fn seal_internal(
        &self,
        purpose: &str,
        owner: &[&str],
        secret: &SecretBytes,
    ) -> KmsResult<Vec<u8>> {
        self.seal_aad(&internal_aad(purpose, owner), secret)
    }

    /// Opens what [`Keyring::seal_internal`] sealed for the same purpose and owner.
    pub async fn open_internal(
        &self,
        purpose: &str,
        owner: &[&str],
        sealed: &[u8],
    ) -> KmsResult<SecretBytes> {
        self.open_aad(&internal_aad(purpose, owner), sealed).await
    }

    /// Re-wraps a service-internal secret under the current domain key (None: it already is).
    pub async fn rewrap_internal(
        &self,
        purpose: &str,
        owner: &[&str],
        sealed: &[u8],
    ) -> KmsResult<Option<Vec<u8>>> {
        if Self::ekt_version(sealed) == self.current_version() {
            return Ok(None);
        }
        let m = self.open_internal(purpose, owner, sealed).await?;
        self.seal_internal(purpose, owner, &m).map(Some)
    }

    /// In a KMS domain: acknowledge this node's record epochs and, after a removal or a
    /// forced rotation, re-MAC every row and raise the record floor once every member can
    /// ([`crate::domain::member::Member::reseal`]). Nothing to do for a single node.
    pub async fn reseal_domain_records(&self) -> KmsResult<Option<u32>> {
        match &self.source {
            Source::Domain(m) => Ok(m.reseal(&self.store).await?),
            Source::NodeKey(_) => Ok(None),
        }
    }

    /// Creates a new domain key version (seed 004: daily rotation). The caller re-wraps EKTs.
    pub async fn rotate_domain_key(&self) -> KmsResult<u32> {
        if let Source::Domain(m) = &self.source {
            match m.rotate(&self.store).await {
                Ok(_) | Err(crate::domain::DomainError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.reload().await?;
            return self
                .current_version()
                .ok_or_else(|| KmsError::internal_crypto("no domain key"));
        }
        self.reload().await?;
        let next = self.current_version().unwrap_or(0) + 1;
        self.add_version(next).await?;
        self.reload().await?;
        Ok(next)
    }

    /// Re-wraps an EKT under the current domain key (no-op if it already is).
    pub async fn rewrap_ekt(
        &self,
        account: &str,
        key_id: &str,
        hbk_version: u32,
        ekt: &[u8],
    ) -> KmsResult<Option<Vec<u8>>> {
        if Self::ekt_version(ekt) == self.current_version() {
            return Ok(None);
        }
        let m = self.open_ekt(account, key_id, hbk_version, ekt).await?;
        self.seal_ekt(account, key_id, hbk_version, &m).map(Some)
    }
}

impl NodeKey {
    /// In a KMS domain, what all members share in place of a node key: the domain root
    /// ([`crate::domain::domain_root`]), from which the record MAC and audit keys derive.
    pub fn from_domain_root(root: SecretKey) -> Self {
        NodeKey(root)
    }

    /// Derives a purpose-bound 256-bit secret from the node key.
    pub(crate) fn derive(&self, label: &[u8]) -> KmsResult<SecretBytes> {
        caas_crypto::kdf::derive(self.0.expose(), label, b"", 32)
            .map_err(|_| KmsError::internal_crypto("kdf"))
    }
}
