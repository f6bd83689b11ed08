//! Roles and peer identities. A caas certificate names its holder in the subject's common
//! name and its role(s) as subject-alternative-name URIs `caas:role:<role>`; only a
//! certificate that chained to the deployment CA during the handshake is ever parsed here.
//!
//! A peer is also identified by the SHA-256 of its certificate's SubjectPublicKeyInfo
//! ([`PeerIdentity::spki_sha256`], [`spki_sha256`]): a host's enrollment binds that hash
//! to its TPM identity, so that a role certificate alone (which the deployment CA may have
//! issued to any host) does not let its holder speak for another host.

use crate::Error;
use x509_cert::der::Decode;
use x509_cert::der::oid::AssociatedOid;

/// A role in a caas deployment (what a certificate's holder may do is decided per route
/// by the server, from these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The key service: verifier (quotes), scheduler (launch), TTP (revocations, DBSP).
    KeyService,
    /// A cloud operator: lists, stops, reads status and audit.
    Operator,
    /// A host agent (its server certificate; its calls to the key service).
    Host,
}

/// Prefix of the SAN URI that carries a role.
pub const ROLE_URI_PREFIX: &str = "caas:role:";

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::KeyService, Role::Operator, Role::Host];

    /// The role's name (`key-service`, `operator`, `host`).
    pub fn name(self) -> &'static str {
        match self {
            Role::KeyService => "key-service",
            Role::Operator => "operator",
            Role::Host => "host",
        }
    }

    /// The SAN URI that grants it.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }

    /// Parses a role name.
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Role::from_name(s).ok_or_else(|| {
            Error::Certificate(format!(
                "unknown role '{s}' (expected key-service, operator or host)"
            ))
        })
    }
}

/// The verified identity of a peer: its certificate's common name, roles and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject common name (empty when the certificate has none).
    pub name: String,
    /// Roles granted by the certificate (unknown `caas:role:` URIs are ignored).
    pub roles: Vec<Role>,
    /// SHA-256 of the certificate's DER SubjectPublicKeyInfo: the key the peer proved it
    /// holds in the handshake (a re-issued certificate with a new key has another hash).
    pub spki_sha256: [u8; 32],
}

/// SHA-256 of the DER SubjectPublicKeyInfo of the certificate `der`.
pub fn spki_sha256(der: &[u8]) -> Result<[u8; 32], Error> {
    use x509_cert::der::Encode as _;
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| Error::Certificate(format!("not an X.509 certificate: {e}")))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| Error::Certificate(format!("subjectPublicKeyInfo: {e}")))?;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

/// The SPKI hash of the first certificate of the PEM file `path` (an endpoint's own
/// certificate, e.g. the host agent's, which it binds at enrollment).
pub fn spki_sha256_of_file(path: &std::path::Path) -> Result<[u8; 32], Error> {
    let certs = crate::read_certs(path)?;
    let first = certs
        .first()
        .ok_or_else(|| Error::Certificate(format!("{}: no certificate", path.display())))?;
    spki_sha256(first)
}

impl PeerIdentity {
    /// Reads name and roles from a DER certificate. Call only on a certificate whose chain
    /// was verified.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        use x509_cert::ext::pkix::SubjectAltName;
        use x509_cert::ext::pkix::name::GeneralName;
        let cert = x509_cert::Certificate::from_der(der)
            .map_err(|e| Error::Certificate(format!("not an X.509 certificate: {e}")))?;
        let tbs = &cert.tbs_certificate;
        let mut name = String::new();
        for rdn in tbs.subject.0.iter() {
            for atv in rdn.0.iter() {
                if atv.oid == x509_cert::der::oid::db::rfc4519::CN {
                    name = atv
                        .value
                        .decode_as::<x509_cert::der::asn1::Utf8StringRef<'_>>()
                        .map(|s| s.as_str().to_string())
                        .or_else(|_| {
                            atv.value
                                .decode_as::<x509_cert::der::asn1::PrintableStringRef<'_>>()
                                .map(|s| s.as_str().to_string())
                        })
                        .unwrap_or_default();
                }
            }
        }
        let mut roles = Vec::new();
        for ext in tbs.extensions.iter().flatten() {
            if ext.extn_id != SubjectAltName::OID {
                continue;
            }
            let san = SubjectAltName::from_der(ext.extn_value.as_bytes())
                .map_err(|e| Error::Certificate(format!("subjectAltName: {e}")))?;
            for g in san.0 {
                if let GeneralName::UniformResourceIdentifier(uri) = g
                    && let Some(r) = uri
                        .as_str()
                        .strip_prefix(ROLE_URI_PREFIX)
                        .and_then(Role::from_name)
                    && !roles.contains(&r)
                {
                    roles.push(r);
                }
            }
        }
        roles.sort();
        Ok(Self {
            name,
            roles,
            spki_sha256: spki_sha256(der)?,
        })
    }

    /// Whether the certificate grants `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

impl std::fmt::Display for PeerIdentity {
    /// `name[role,role]`, e.g. `ops-alice[operator]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        write!(f, "{}[{}]", self.name, roles.join(","))
    }
}
