//! Operator principals: the cloud's administrators of the key service's other roles
//! (registrar and verifier, TTP, scheduler). An operator authenticates with SigV4 like a
//! tenant, but its access key lives in the reserved account [`OPERATOR_ACCOUNT`] and carries
//! a set of [`Permission`]s; it can never call the KMS API (so never touch a tenant's keys),
//! and a tenant's access key never passes an operator check. Created by
//! `caas admin create-operator NAME --permissions ...` (the first one at bootstrap).
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The reserved account that holds operators' access keys (not a 12-digit tenant account,
/// so it can never be created by `CreateAccount` nor named in a key ARN).
pub const OPERATOR_ACCOUNT: &str = "operator";

/// SigV4 credential-scope service of the key service's routes outside the KMS API
/// (attestation, TTP, scheduler). The KMS API keeps `kms`.
pub const SERVICE: &str = "caas";

/// What an operator may do. Kept apart from tenants' KMS rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    /// List and show hosts and their verdicts; read a host's bind info.
    #[serde(rename = "hosts:read")]
    HostsRead,
    /// Run an attestation of a host now.
    #[serde(rename = "hosts:attest")]
    HostsAttest,
    /// Admit a host: assign its security profile.
    #[serde(rename = "hosts:admit")]
    HostsAdmit,
    /// List and show security profiles.
    #[serde(rename = "profiles:read")]
    ProfilesRead,
    /// Create and change security profiles.
    #[serde(rename = "profiles:write")]
    ProfilesWrite,
    /// Administer the TTP's ACL (the change itself must still be signed by the DM's key).
    #[serde(rename = "acl:admin")]
    AclAdmin,
    /// Place workloads through the scheduler.
    #[serde(rename = "schedule")]
    Schedule,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 7] = [
        Permission::HostsRead,
        Permission::HostsAttest,
        Permission::HostsAdmit,
        Permission::ProfilesRead,
        Permission::ProfilesWrite,
        Permission::AclAdmin,
        Permission::Schedule,
    ];

    /// The name (`hosts:read`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::HostsRead => "hosts:read",
            Permission::HostsAttest => "hosts:attest",
            Permission::HostsAdmit => "hosts:admit",
            Permission::ProfilesRead => "profiles:read",
            Permission::ProfilesWrite => "profiles:write",
            Permission::AclAdmin => "acl:admin",
            Permission::Schedule => "schedule",
        }
    }

    /// Parses a name; `None` for an unknown one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who an authenticated caller is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CallerKind {
    /// A tenant principal (KMS rights by key policy and grants).
    #[default]
    Tenant,
    /// An operator with these permissions.
    Operator(BTreeSet<Permission>),
}

impl CallerKind {
    /// True for an operator holding `p`.
    pub fn allows(&self, p: Permission) -> bool {
        matches!(self, CallerKind::Operator(ps) if ps.contains(&p))
    }
}
