//! A key-service node's own identity in a KMS domain (P7): an Ed25519 identity (signing) key
//! and an X25519 agreement key. The public halves are registered in the domain state by
//! operators ([`super::state::Change::AddNode`]); the private halves never leave the node.
//!
//! At rest they are one 0600 file outside the database (`[keys] identity_file`). With a TPM
//! (`[keys] identity_tcti`) the file is `"CAASNID2" ‖ blob`, the two private keys sealed by
//! an [`IdentitySealer`] (the `caas` binary's: a TPM sealed object, `fixedTPM`, under the
//! TPM's storage root key): the file alone, copied to another machine or TPM, opens nothing.
//! Without one it is `"CAASNID1" ‖ Ed25519 seed (32) ‖ X25519 private key (32)`, protected
//! only by its mode. Either way it is not an operator-copied secret: every node makes its
//! own, and nothing in it lets anyone open another node's envelopes.
use super::DomainError;
use aws_lc_rs::agreement::{self, X25519};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use caas_crypto::SecretBytes;
use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: &[u8; 8] = b"CAASNID1";
const MAGIC_SEALED: &[u8; 8] = b"CAASNID2";

/// Seals a node's identity secrets to something only this machine has (its TPM).
pub trait IdentitySealer: Send + Sync + std::fmt::Debug {
    /// Seals `secret` (64 bytes); the blob opens only on the same device.
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, DomainError>;
    /// Opens a blob made by [`IdentitySealer::seal`] on this device.
    fn unseal(&self, blob: &[u8]) -> Result<SecretBytes, DomainError>;
}

/// A node's identity id: `node-` and 32 hex digits of
/// SHA-256("caas/kms/node-id/v1" ‖ signing public key ‖ agreement public key).
pub type NodeId = String;

/// The public halves a domain state records for a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberKeys {
    /// Ed25519 identity public key (raw 32 bytes).
    #[serde(with = "crate::model::b64")]
    pub signing: Vec<u8>,
    /// X25519 agreement public key (raw 32 bytes).
    #[serde(with = "crate::model::b64")]
    pub agreement: Vec<u8>,
}

impl MemberKeys {
    /// The node id these keys name.
    pub fn node_id(&self) -> NodeId {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"caas/kms/node-id/v1");
        ctx.update(&self.signing);
        ctx.update(&self.agreement);
        let d = ctx.finish();
        format!("node-{}", hex::encode(&d.as_ref()[..16]))
    }

    /// Checks the lengths (keys come from operators and the database).
    pub fn check(&self) -> Result<(), DomainError> {
        if self.signing.len() != 32 || self.agreement.len() != 32 {
            return Err(DomainError::Malformed(
                "member keys must be 32-byte Ed25519 and X25519 public keys".into(),
            ));
        }
        Ok(())
    }

    /// Text form for `caas domain join` / `add-node` (`<signing b64>:<agreement b64>`).
    pub fn to_text(&self) -> String {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::STANDARD;
        format!("{}:{}", e.encode(&self.signing), e.encode(&self.agreement))
    }

    /// Parses [`MemberKeys::to_text`].
    pub fn from_text(s: &str) -> Result<Self, DomainError> {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::STANDARD;
        let bad = || DomainError::Malformed("expected <signing b64>:<agreement b64>".into());
        let (a, b) = s.trim().split_once(':').ok_or_else(bad)?;
        let k = MemberKeys {
            signing: e.decode(a).map_err(|_| bad())?,
            agreement: e.decode(b).map_err(|_| bad())?,
        };
        k.check()?;
        Ok(k)
    }
}

/// The node's private identity, in memory only.
pub struct NodeIdentity {
    signing: Ed25519KeyPair,
    agreement: agreement::PrivateKey,
    public: MemberKeys,
    id: NodeId,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeIdentity({})", self.id)
    }
}

impl NodeIdentity {
    fn from_secrets(seed: &[u8], agree: &[u8]) -> Result<Self, DomainError> {
        let signing = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| DomainError::Malformed("identity signing key".into()))?;
        let agreement = agreement::PrivateKey::from_private_key(&X25519, agree)
            .map_err(|_| DomainError::Malformed("identity agreement key".into()))?;
        let public = MemberKeys {
            signing: signing.public_key().as_ref().to_vec(),
            agreement: agreement
                .compute_public_key()
                .map_err(|_| DomainError::Crypto("X25519"))?
                .as_ref()
                .to_vec(),
        };
        let id = public.node_id();
        Ok(NodeIdentity {
            signing,
            agreement,
            public,
            id,
        })
    }

    /// A fresh identity (not stored).
    pub fn generate() -> Result<Self, DomainError> {
        let seed = SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| DomainError::Crypto("rng"))?,
        );
        let agree = SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| DomainError::Crypto("rng"))?,
        );
        Self::from_secrets(seed.expose(), agree.expose())
    }

    /// Creates a fresh identity file (mode 0600, fails if it exists).
    pub fn create(path: &Path) -> Result<Self, DomainError> {
        Self::create_with(path, None)
    }

    /// Creates a fresh identity file, sealed by `sealer` when given (mode 0600, fails if it
    /// exists).
    pub fn create_with(
        path: &Path,
        sealer: Option<&dyn IdentitySealer>,
    ) -> Result<Self, DomainError> {
        let seed = SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| DomainError::Crypto("rng"))?,
        );
        let agree = SecretBytes::new(
            caas_crypto::random_bytes(32).map_err(|_| DomainError::Crypto("rng"))?,
        );
        let id = Self::from_secrets(seed.expose(), agree.expose())?;
        let mut secret = zeroize::Zeroizing::new(seed.expose().to_vec());
        secret.extend_from_slice(agree.expose());
        let file = match sealer {
            Some(s) => {
                let mut f = MAGIC_SEALED.to_vec();
                f.extend_from_slice(&s.seal(&secret)?);
                zeroize::Zeroizing::new(f)
            }
            None => {
                let mut f = zeroize::Zeroizing::new(MAGIC.to_vec());
                f.extend_from_slice(&secret);
                f
            }
        };
        caas_crypto::fs::create_secret(path, &file, None).map_err(|e| {
            DomainError::Io(format!("cannot create the identity file: {}", e.kind()))
        })?;
        Ok(id)
    }

    /// Reads an identity file; refuses one readable by group or others.
    pub fn load(path: &Path) -> Result<Self, DomainError> {
        Self::load_with(path, None)
    }

    /// Reads an identity file, unsealing it with `sealer` if it is sealed (a sealed file
    /// without a sealer, or one that does not unseal on this device, is refused).
    pub fn load_with(
        path: &Path,
        sealer: Option<&dyn IdentitySealer>,
    ) -> Result<Self, DomainError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| DomainError::Io(format!("identity file unreadable: {}", e.kind())))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(DomainError::Io("identity file must have mode 0600".into()));
            }
        }
        let bytes = zeroize::Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| DomainError::Io(format!("identity file unreadable: {}", e.kind())))?,
        );
        if bytes.len() > 8 && &bytes[..8] == MAGIC_SEALED {
            let sealer = sealer.ok_or_else(|| {
                DomainError::Io(
                    "the identity file is sealed to a TPM: configure [keys] identity_tcti".into(),
                )
            })?;
            let secret = sealer.unseal(&bytes[8..])?;
            if secret.expose().len() != 64 {
                return Err(DomainError::Malformed(
                    "sealed identity has the wrong length".into(),
                ));
            }
            return Self::from_secrets(&secret.expose()[..32], &secret.expose()[32..]);
        }
        if bytes.len() != 72 || &bytes[..8] != MAGIC {
            return Err(DomainError::Malformed(
                "identity file is not a caas node identity".into(),
            ));
        }
        Self::from_secrets(&bytes[8..40], &bytes[40..72])
    }

    /// Loads the identity at `path`, creating it first if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, DomainError> {
        Self::load_or_create_with(path, None)
    }

    /// [`NodeIdentity::load_or_create`] with a sealer.
    pub fn load_or_create_with(
        path: &Path,
        sealer: Option<&dyn IdentitySealer>,
    ) -> Result<Self, DomainError> {
        if path.exists() {
            Self::load_with(path, sealer)
        } else {
            Self::create_with(path, sealer)
        }
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public halves (what `caas domain join` prints for the operators).
    pub fn public(&self) -> &MemberKeys {
        &self.public
    }

    /// Signs `message` with the identity key.
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signing.sign(message).as_ref().to_vec()
    }

    /// The agreement private key (for opening this node's own EDT envelopes).
    pub(crate) fn agreement(&self) -> &agreement::PrivateKey {
        &self.agreement
    }
}

/// Verifies a raw Ed25519 signature.
pub(crate) fn verify_ed25519(public: &[u8], message: &[u8], sig: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public)
        .verify(message, sig)
        .is_ok()
}
