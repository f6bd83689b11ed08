//! Exported domain tokens (seed 004 "DK Encryption Details"): the only form in which a domain
//! key leaves the member that generated it.
//!
//! For domain key `DK_d`, made (or re-exported) under domain state version `s` by member `S`:
//! - a fresh token key `K` and a fresh X25519 pair `(r, e^r)`;
//! - `wrapped = AES-256-GCM(K, aad = ctx("dk"), DK_d)`;
//! - for each recipient `P_i` (exactly the members of version `s`, or the named joiners of a
//!   re-export): `K_i = KDF(ECDH(r, pk_i))` with the SP 800-108 KDF of `caas_crypto::kdf`,
//!   label `"caas/kms/edt/envelope/v1"`, context `ctx(P_i) ‖ F(e^r) ‖ F(pk_i)`, and
//!   `C_i = AES-256-GCM(K_i, aad = ctx(P_i), K)`;
//! - the body (all of the above, JSON) is signed by `S`'s identity key:
//!   Ed25519 over `"caas/kms/edt/v1" ‖ SHA-256(body)`.
//!
//! `ctx(x) = F(domain) ‖ dk version (u32 BE) ‖ state version (u64 BE) ‖ F(sender) ‖ F(x)`, so an
//! envelope moved to another domain, key version, state, sender or recipient fails to open.
//! A member opens its own envelope in memory ([`open`]); only the [`SecretKey`] remains.
use super::DomainError;
use super::identity::{NodeId, NodeIdentity, verify_ed25519};
use super::state::DomainState;
use aws_lc_rs::agreement::{self, X25519};
use caas_crypto::{SecretKey, aead};
use serde::{Deserialize, Serialize};

/// One recipient's envelope of the token key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Recipient node id.
    pub recipient: NodeId,
    /// `AES-256-GCM(K_i, ctx(recipient), K)`.
    #[serde(with = "crate::model::b64")]
    pub sealed: Vec<u8>,
}

/// The signed part of an EDT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdtBody {
    /// Domain id.
    pub domain: String,
    /// Domain key version.
    pub dk_version: u32,
    /// Domain state version the sender acted under (its members are the recipients).
    pub state_version: u64,
    /// Sender node id.
    pub sender: NodeId,
    /// State version under which the domain key was first made (= `state_version` for the
    /// original EDT; carried unchanged by re-exports to joiners).
    pub origin_state: u64,
    /// The member that first made the domain key (carried unchanged by re-exports).
    pub origin_sender: NodeId,
    /// Creation time (ms).
    pub created_ms: i64,
    /// Sender's ephemeral X25519 public value `e^r`.
    #[serde(with = "crate::model::b64")]
    pub ephemeral: Vec<u8>,
    /// `AES-256-GCM(K, ctx("dk"), DK)`.
    #[serde(with = "crate::model::b64")]
    pub wrapped: Vec<u8>,
    /// Per-recipient envelopes of `K`.
    pub envelopes: Vec<Envelope>,
}

/// An EDT as stored: body bytes and the sender's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edt {
    /// The body (JSON bytes of [`EdtBody`]).
    #[serde(with = "crate::model::b64")]
    pub body: Vec<u8>,
    /// Sender's Ed25519 signature over `"caas/kms/edt/v1" ‖ SHA-256(body)`.
    #[serde(with = "crate::model::b64")]
    pub signature: Vec<u8>,
}

fn sig_message(body: &[u8]) -> Vec<u8> {
    let mut m = b"caas/kms/edt/v1".to_vec();
    m.extend_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body).as_ref());
    m
}

fn f(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

fn ctx(b: &EdtBody, x: &str) -> Vec<u8> {
    let mut c = b"caas/kms/edt/ctx/v1".to_vec();
    f(&mut c, b.domain.as_bytes());
    c.extend_from_slice(&b.dk_version.to_be_bytes());
    c.extend_from_slice(&b.state_version.to_be_bytes());
    f(&mut c, b.sender.as_bytes());
    f(&mut c, x.as_bytes());
    c
}

fn envelope_key(
    sk: &agreement::PrivateKey,
    peer: &[u8],
    ephemeral: &[u8],
    recipient_pub: &[u8],
    context: &[u8],
) -> Result<SecretKey, DomainError> {
    let mut kdf_ctx = context.to_vec();
    f(&mut kdf_ctx, ephemeral);
    f(&mut kdf_ctx, recipient_pub);
    agreement::agree(
        sk,
        agreement::UnparsedPublicKey::new(&X25519, peer),
        DomainError::Crypto("X25519 agreement"),
        |z| {
            caas_crypto::kdf::derive_key(z, b"caas/kms/edt/envelope/v1", &kdf_ctx)
                .map_err(|_| DomainError::Crypto("KDF"))
        },
    )
}

/// Seals `dk` (version `dk_version`) for `recipients` (ids of members of `state`), signed
/// by `sender`, which must itself be a member of `state`.
pub fn seal(
    sender: &NodeIdentity,
    state: &DomainState,
    dk_version: u32,
    dk: &SecretKey,
    recipients: &[NodeId],
    origin: Option<(u64, NodeId)>,
) -> Result<Edt, DomainError> {
    if !state.members.contains_key(sender.id()) {
        return Err(DomainError::Refused(
            "this node is not a member of the domain".into(),
        ));
    }
    let k = caas_crypto::random_key().map_err(|_| DomainError::Crypto("rng"))?;
    let eph =
        agreement::PrivateKey::generate(&X25519).map_err(|_| DomainError::Crypto("X25519"))?;
    let eph_pub = eph
        .compute_public_key()
        .map_err(|_| DomainError::Crypto("X25519"))?
        .as_ref()
        .to_vec();
    let mut body = EdtBody {
        domain: state.domain.clone(),
        dk_version,
        state_version: state.version,
        sender: sender.id().into(),
        origin_state: origin.as_ref().map_or(state.version, |o| o.0),
        origin_sender: origin.map_or_else(|| sender.id().to_string(), |o| o.1),
        created_ms: crate::now_ms(),
        ephemeral: eph_pub.clone(),
        wrapped: vec![],
        envelopes: vec![],
    };
    body.wrapped =
        aead::seal(&k, &ctx(&body, "dk"), dk.expose()).map_err(|_| DomainError::Crypto("seal"))?;
    for r in recipients {
        let keys = state
            .members
            .get(r)
            .ok_or_else(|| DomainError::Refused(format!("{r} is not a member")))?;
        let c = ctx(&body, r);
        let ki = envelope_key(&eph, &keys.agreement, &eph_pub, &keys.agreement, &c)?;
        let sealed = aead::seal(&ki, &c, k.expose()).map_err(|_| DomainError::Crypto("seal"))?;
        body.envelopes.push(Envelope {
            recipient: r.clone(),
            sealed,
        });
    }
    let bytes =
        serde_json::to_vec(&body).map_err(|_| DomainError::Malformed("encode edt".into()))?;
    let signature = sender.sign(&sig_message(&bytes));
    Ok(Edt {
        body: bytes,
        signature,
    })
}

impl Edt {
    /// Parses the body without checking anything.
    pub fn body(&self) -> Result<EdtBody, DomainError> {
        serde_json::from_slice(&self.body).map_err(|_| DomainError::Malformed("EDT body".into()))
    }

    /// Checks the sender's signature against `state` (the verified domain state version the
    /// body names) and returns the body. Refuses a sender who is not a member of that
    /// version, a signature that does not verify, or an EDT of another domain.
    pub fn verify(&self, state: &DomainState) -> Result<EdtBody, DomainError> {
        let b = self.body()?;
        if b.domain != state.domain || b.state_version != state.version {
            return Err(DomainError::Refused(
                "EDT names another domain or state version".into(),
            ));
        }
        let sender = state.members.get(&b.sender).ok_or_else(|| {
            DomainError::Refused("EDT sender is not a member of the state it names".into())
        })?;
        if !verify_ed25519(&sender.signing, &sig_message(&self.body), &self.signature) {
            return Err(DomainError::Refused(
                "EDT signature does not verify (forged or altered)".into(),
            ));
        }
        if b.origin_state > b.state_version {
            return Err(DomainError::Refused(
                "EDT origin after its own state".into(),
            ));
        }
        if b.ephemeral.len() != 32 {
            return Err(DomainError::Malformed("EDT ephemeral key".into()));
        }
        Ok(b)
    }
}

/// Opens `me`'s envelope of a verified EDT body (see [`Edt::verify`]) and returns the
/// domain key. Refused if the EDT has no envelope for `me` (an EDT for another node) or if
/// anything does not open.
pub fn open(me: &NodeIdentity, b: &EdtBody) -> Result<SecretKey, DomainError> {
    let env = b
        .envelopes
        .iter()
        .find(|e| e.recipient == me.id())
        .ok_or_else(|| DomainError::Refused("EDT has no envelope for this node".into()))?;
    let c = ctx(b, me.id());
    let ki = envelope_key(
        me.agreement(),
        &b.ephemeral,
        &b.ephemeral,
        &me.public().agreement,
        &c,
    )?;
    let k = aead::open(&ki, &c, &env.sealed)
        .map_err(|_| DomainError::Refused("EDT envelope does not open".into()))?;
    let k = SecretKey::from_slice(k.expose()).map_err(|_| DomainError::Crypto("token key"))?;
    let dk = aead::open(&k, &ctx(b, "dk"), &b.wrapped)
        .map_err(|_| DomainError::Refused("EDT domain key does not open".into()))?;
    SecretKey::from_slice(dk.expose()).map_err(|_| DomainError::Crypto("domain key length"))
}
