//! The domain state (P7): a versioned document naming the domain's members (nodes, by
//! identity key), its operators (by their own Ed25519 keys) and its quorum rules, chained
//! by hash from a genesis whose hash every node pins in its configuration.
//!
//! A version `n+1` is accepted only if (checked by [`verify_next`], by every member, for
//! every version, before acting):
//! - it names the same domain, `version = n + 1` and `prev = hash(version n)`;
//! - its content is exactly version `n` with its one [`Change`] applied ([`DomainState::apply`]),
//!   so a document cannot carry more than the change the operators reviewed;
//! - it carries valid approvals from at least `rules.required(change)` distinct operators of
//!   version `n` (a newly added operator cannot approve its own admission).
//!
//! Hash: SHA-256(`"caas/kms/domain-state/v1"` ‖ document bytes). An approval is an operator's
//! Ed25519 signature over `"caas/kms/domain-approval/v1"` ‖ hash.
use super::DomainError;
use super::identity::{MemberKeys, NodeId, verify_ed25519};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// How many operator approvals each kind of change needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumRules {
    /// Adding a node.
    pub add_node: u32,
    /// Removing a node.
    pub remove_node: u32,
    /// Adding an operator.
    pub add_operator: u32,
    /// Removing an operator.
    pub remove_operator: u32,
    /// Changing these rules.
    pub set_rules: u32,
    /// Forcing a domain-key rotation.
    pub rotate: u32,
}

impl QuorumRules {
    /// The same threshold for every kind of change.
    pub fn uniform(n: u32) -> Self {
        QuorumRules {
            add_node: n,
            remove_node: n,
            add_operator: n,
            remove_operator: n,
            set_rules: n,
            rotate: n,
        }
    }

    fn max(&self) -> u32 {
        [
            self.add_node,
            self.remove_node,
            self.add_operator,
            self.remove_operator,
            self.set_rules,
            self.rotate,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    fn min(&self) -> u32 {
        [
            self.add_node,
            self.remove_node,
            self.add_operator,
            self.remove_operator,
            self.set_rules,
            self.rotate,
        ]
        .into_iter()
        .min()
        .unwrap_or(0)
    }

    /// Approvals `change` needs.
    pub fn required(&self, change: &Change) -> u32 {
        match change {
            Change::Genesis => u32::MAX,
            Change::AddNode { .. } => self.add_node,
            Change::RemoveNode { .. } => self.remove_node,
            Change::AddOperator { .. } => self.add_operator,
            Change::RemoveOperator { .. } => self.remove_operator,
            Change::SetRules { .. } => self.set_rules,
            Change::Rotate => self.rotate,
        }
    }
}

/// One change between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    /// The first version.
    Genesis,
    /// Admit a node.
    AddNode {
        /// Its public keys.
        keys: MemberKeys,
    },
    /// Remove a node (the next domain key is not sent to it).
    RemoveNode {
        /// Its id.
        node: NodeId,
    },
    /// Admit an operator.
    AddOperator {
        /// Name.
        name: String,
        /// Ed25519 public key (raw).
        #[serde(with = "crate::model::b64")]
        public: Vec<u8>,
    },
    /// Remove an operator.
    RemoveOperator {
        /// Name.
        name: String,
    },
    /// Replace the quorum rules.
    SetRules {
        /// The new rules.
        rules: QuorumRules,
    },
    /// Force a domain-key rotation.
    Rotate,
}

impl Change {
    /// Short name for audit records and `status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Genesis => "Genesis",
            Change::AddNode { .. } => "AddNode",
            Change::RemoveNode { .. } => "RemoveNode",
            Change::AddOperator { .. } => "AddOperator",
            Change::RemoveOperator { .. } => "RemoveOperator",
            Change::SetRules { .. } => "SetRules",
            Change::Rotate => "Rotate",
        }
    }
}

/// An operator's public key as the domain records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorPublic {
    /// Ed25519 public key (raw).
    #[serde(with = "crate::model::b64")]
    pub public: Vec<u8>,
}

/// One version of the domain state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    /// Domain id (chosen at `caas domain init`).
    pub domain: String,
    /// Version, 1 for the genesis.
    pub version: u64,
    /// Hex hash of the previous version ("" for the genesis).
    pub prev: String,
    /// The change that made this version.
    pub change: Change,
    /// Members by node id.
    pub members: BTreeMap<NodeId, MemberKeys>,
    /// Operators by name.
    pub operators: BTreeMap<String, OperatorPublic>,
    /// Quorum rules.
    pub rules: QuorumRules,
    /// A domain key made under a state version below this is no longer current: the next
    /// domain key must be made under this version or later (set by `RemoveNode` and `Rotate`).
    pub rotate_from: u64,
}

/// Largest number of members or operators a domain may have.
pub const MAX_PARTIES: usize = 64;

impl DomainState {
    /// A genesis document.
    pub fn genesis(
        domain: &str,
        first_member: MemberKeys,
        operators: BTreeMap<String, OperatorPublic>,
        rules: QuorumRules,
    ) -> Result<Self, DomainError> {
        first_member.check()?;
        let mut members = BTreeMap::new();
        members.insert(first_member.node_id(), first_member);
        let s = DomainState {
            domain: domain.into(),
            version: 1,
            prev: String::new(),
            change: Change::Genesis,
            members,
            operators,
            rules,
            rotate_from: 1,
        };
        s.check_shape()?;
        Ok(s)
    }

    fn check_shape(&self) -> Result<(), DomainError> {
        if self.members.is_empty() || self.members.len() > MAX_PARTIES {
            return Err(DomainError::Refused(
                "a domain needs between 1 and 64 members".into(),
            ));
        }
        if self.operators.len() > MAX_PARTIES {
            return Err(DomainError::Refused("at most 64 operators".into()));
        }
        for (id, k) in &self.members {
            k.check()?;
            if &k.node_id() != id {
                return Err(DomainError::Refused(
                    "member id does not match its keys".into(),
                ));
            }
        }
        for (name, o) in &self.operators {
            if o.public.len() != 32 || name.is_empty() || name.len() > 64 {
                return Err(DomainError::Refused("malformed operator entry".into()));
            }
        }
        if self.rules.min() < 1 {
            return Err(DomainError::Refused(
                "every kind of change needs at least one approval".into(),
            ));
        }
        if self.rules.max() as usize > self.operators.len() {
            return Err(DomainError::Refused(
                "the quorum rules need more operators than the domain has".into(),
            ));
        }
        Ok(())
    }

    /// The next version with `change` applied (refused if it makes no sense or leaves the
    /// domain unable to meet its own rules).
    pub fn apply(&self, change: &Change) -> Result<DomainState, DomainError> {
        let mut n = self.clone();
        n.version = self
            .version
            .checked_add(1)
            .ok_or_else(|| DomainError::Refused("version overflow".into()))?;
        n.prev = hex::encode(self.hash()?);
        n.change = change.clone();
        match change {
            Change::Genesis => return Err(DomainError::Refused("a second genesis".into())),
            Change::AddNode { keys } => {
                keys.check()?;
                if n.members.insert(keys.node_id(), keys.clone()).is_some() {
                    return Err(DomainError::Refused("node is already a member".into()));
                }
            }
            Change::RemoveNode { node } => {
                if n.members.remove(node).is_none() {
                    return Err(DomainError::Refused("node is not a member".into()));
                }
                n.rotate_from = n.version;
            }
            Change::AddOperator { name, public } => {
                if n.operators.contains_key(name)
                    || n.operators.values().any(|o| &o.public == public)
                {
                    return Err(DomainError::Refused("operator already present".into()));
                }
                n.operators.insert(
                    name.clone(),
                    OperatorPublic {
                        public: public.clone(),
                    },
                );
            }
            Change::RemoveOperator { name } => {
                if n.operators.remove(name).is_none() {
                    return Err(DomainError::Refused("no such operator".into()));
                }
            }
            Change::SetRules { rules } => n.rules = *rules,
            Change::Rotate => n.rotate_from = n.version,
        }
        n.check_shape()?;
        Ok(n)
    }

    /// The document bytes (what is hashed and approved).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DomainError> {
        serde_json::to_vec(self).map_err(|_| DomainError::Malformed("encode state".into()))
    }

    /// SHA-256("caas/kms/domain-state/v1" ‖ document bytes).
    pub fn hash(&self) -> Result<[u8; 32], DomainError> {
        Ok(hash_document(&self.to_bytes()?))
    }
}

/// SHA-256("caas/kms/domain-state/v1" ‖ bytes).
pub fn hash_document(bytes: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(b"caas/kms/domain-state/v1");
    ctx.update(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn approval_message(hash: &[u8; 32]) -> Vec<u8> {
    let mut m = b"caas/kms/domain-approval/v1".to_vec();
    m.extend_from_slice(hash);
    m
}

/// One operator's approval of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Operator name.
    pub operator: String,
    /// Ed25519 signature over `"caas/kms/domain-approval/v1" ‖ hash`.
    #[serde(with = "crate::model::b64")]
    pub signature: Vec<u8>,
}

/// A document as stored: its exact bytes and the approvals collected for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedState {
    /// The document bytes.
    #[serde(with = "crate::model::b64")]
    pub document: Vec<u8>,
    /// Approvals.
    pub approvals: Vec<Approval>,
}

impl SignedState {
    /// Wraps a document with no approval yet.
    pub fn new(state: &DomainState) -> Result<Self, DomainError> {
        Ok(SignedState {
            document: state.to_bytes()?,
            approvals: vec![],
        })
    }

    /// The parsed document.
    pub fn state(&self) -> Result<DomainState, DomainError> {
        serde_json::from_slice(&self.document)
            .map_err(|_| DomainError::Malformed("domain state document".into()))
    }

    /// Its hash.
    pub fn hash(&self) -> [u8; 32] {
        hash_document(&self.document)
    }

    /// Adds `key`'s approval (replacing an earlier one of the same operator).
    pub fn approve(&mut self, key: &OperatorKey) {
        let sig = key.sign(&approval_message(&self.hash()));
        self.approvals.retain(|a| a.operator != key.name);
        self.approvals.push(Approval {
            operator: key.name.clone(),
            signature: sig,
        });
    }

    /// Distinct operators of `approvers` whose approval verifies.
    pub fn valid_approvers(&self, approvers: &BTreeMap<String, OperatorPublic>) -> Vec<String> {
        let msg = approval_message(&self.hash());
        let mut ok: Vec<String> = vec![];
        for a in &self.approvals {
            if ok.contains(&a.operator) {
                continue;
            }
            if let Some(op) = approvers.get(&a.operator)
                && verify_ed25519(&op.public, &msg, &a.signature)
            {
                ok.push(a.operator.clone());
            }
        }
        ok
    }
}

/// Checks the genesis against the hash pinned in the node's configuration.
pub fn verify_genesis(signed: &SignedState, pinned: &[u8; 32]) -> Result<DomainState, DomainError> {
    if aws_lc_rs::constant_time::verify_slices_are_equal(&signed.hash(), pinned).is_err() {
        return Err(DomainError::Refused(
            "the genesis does not match the hash pinned in this node's configuration".into(),
        ));
    }
    let s = signed.state()?;
    if s.version != 1 || s.change != Change::Genesis || !s.prev.is_empty() {
        return Err(DomainError::Refused("not a genesis document".into()));
    }
    s.check_shape()?;
    Ok(s)
}

/// Checks version `n+1` against the verified version `n` (see the module documentation).
pub fn verify_next(prev: &DomainState, next: &SignedState) -> Result<DomainState, DomainError> {
    let s = next.state()?;
    if s.domain != prev.domain {
        return Err(DomainError::Refused("document of another domain".into()));
    }
    if s.version != prev.version + 1 {
        return Err(DomainError::Refused(format!(
            "version {} does not follow version {} (skipped or replayed)",
            s.version, prev.version
        )));
    }
    let expect = prev.apply(&s.change)?;
    if expect != s {
        return Err(DomainError::Refused(
            "document is not the previous version with its change applied (or names another \
             predecessor)"
                .into(),
        ));
    }
    let have = next.valid_approvers(&prev.operators).len();
    let need = prev.rules.required(&s.change) as usize;
    if have < need {
        return Err(DomainError::Refused(format!(
            "{} needs {need} operator approvals, {have} verify",
            s.change.kind()
        )));
    }
    Ok(s)
}

/// An operator's signing key (a 0600 file: `"CAASOPK1" ‖ Ed25519 seed`).
pub struct OperatorKey {
    /// Operator name.
    pub name: String,
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperatorKey({})", self.name)
    }
}

const OP_MAGIC: &[u8; 8] = b"CAASOPK1";

impl OperatorKey {
    fn from_seed(name: &str, seed: &[u8]) -> Result<Self, DomainError> {
        Ok(OperatorKey {
            name: name.into(),
            key: Ed25519KeyPair::from_seed_unchecked(seed)
                .map_err(|_| DomainError::Malformed("operator key".into()))?,
        })
    }

    /// A fresh key (not stored).
    pub fn generate(name: &str) -> Result<Self, DomainError> {
        let seed = caas_crypto::SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| DomainError::Crypto("rng"))?,
        );
        Self::from_seed(name, seed.expose())
    }

    /// Creates an operator key file (0600; fails if it exists). The name is stored with it.
    pub fn create(path: &Path, name: &str) -> Result<Self, DomainError> {
        let seed = caas_crypto::SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| DomainError::Crypto("rng"))?,
        );
        let k = Self::from_seed(name, seed.expose())?;
        let mut file = zeroize::Zeroizing::new(OP_MAGIC.to_vec());
        file.extend_from_slice(seed.expose());
        file.extend_from_slice(name.as_bytes());
        caas_crypto::fs::create_secret(path, &file, None).map_err(|e| {
            DomainError::Io(format!("cannot create the operator key file: {}", e.kind()))
        })?;
        Ok(k)
    }

    /// Reads an operator key file (mode 0600).
    pub fn load(path: &Path) -> Result<Self, DomainError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| {
                DomainError::Io(format!("operator key file unreadable: {}", e.kind()))
            })?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(DomainError::Io(
                    "operator key file must have mode 0600".into(),
                ));
            }
        }
        let bytes =
            zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
                DomainError::Io(format!("operator key file unreadable: {}", e.kind()))
            })?);
        if bytes.len() < 41 || &bytes[..8] != OP_MAGIC {
            return Err(DomainError::Malformed(
                "not a caas operator key file".into(),
            ));
        }
        let name = std::str::from_utf8(&bytes[40..])
            .map_err(|_| DomainError::Malformed("operator name".into()))?;
        Self::from_seed(name, &bytes[8..40])
    }

    /// The public half as the domain records it.
    pub fn public(&self) -> OperatorPublic {
        OperatorPublic {
            public: self.key.public_key().as_ref().to_vec(),
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg).as_ref().to_vec()
    }
}
