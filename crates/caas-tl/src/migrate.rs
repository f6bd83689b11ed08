//! Live migration of a workload to an attested host (seed 001 §3.4 "Suspension and
//! migration", seed 002 TCCP "VM Migrate"; `docs/suspend-migrate.md` "Live migration").
//!
//! Three parts, all pure (no TPM, no I/O):
//!
//! 1. **The TTP's statement.** The source SC sends [`MigrateRequest`] (AK-signed, label
//!    [`label::MIGRATE_REQUEST`]) to the TTP, which checks the source (trusted, fresh quote,
//!    the workload's live session), and the target: enrolled, trusted by its latest
//!    attestation, appraised under *the workload's* security profile, and its bind key
//!    certified by its AK and bound (PolicyPCR) to the attested PCR values. It answers a
//!    [`MigrationStatement`] signed by sk_TTP (label [`label::MIGRATE_STATEMENT`]) that binds
//!    the migration id, both host names, the workload and the target's attested bind key.
//!    The source sends nothing to the target before it holds a statement that verifies
//!    under the TTP's configured key ([`verify_statement`]).
//! 2. **The session key.** The bind key is a TPM RSA decrypt key (no ECDH with it), so the
//!    exchange is TPM-backed: the source picks a 32-byte secret `s` and seals it to the
//!    target's bind key ([`crate::crypto::seal_to_bind_key`], the offer's hash-bound AAD);
//!    only the target's TPM in the attested PCR state can open it. Both sides add an
//!    ephemeral X25519 exchange (forward secrecy: a later compromise of the bind key does not
//!    open a recorded stream). Keys = SP 800-108 KDF(s ‖ X25519(e_s, e_t)) over the
//!    transcript (migration id, source, target, SHA-256 of the bind key and of the
//!    statement, both ephemeral keys); one key per direction, one for each side's key
//!    confirmation. The target's [`MigrateAccept`] carries its confirmation: the source
//!    streams nothing until it verifies ([`Initiator::complete`]). The source is
//!    authenticated to the target by the agent-to-agent mutual TLS (its certificate's host
//!    name must be the statement's source) and the migration id is accepted once.
//! 3. **The record stream** ([`StreamSealer`], [`StreamOpener`]): every chunk of qemu's
//!    migration stream and of the crypto domain's state is an AES-256-GCM record whose
//!    nonce is its sequence number, with the direction, migration id, channel, kind, sequence
//!    number and length in the AAD; the last record ([`RecordKind::End`]) carries the record
//!    count and byte counts. A tampered record is refused (`stream_tampered`), a reordered,
//!    dropped or replayed one (`stream_out_of_order`), a stream that stops before its end
//!    record (`stream_truncated`), a record after it (`stream_after_end`); a stream recorded
//!    in one migration does not open in another (other keys).
use crate::crypto::{ct_eq, hmac, lp, random32, seal_to_bind_key, sha256, split_bind_sealed};
use crate::error::{Error, Result};
use crate::wire::{self, Signed, check_fresh, check_name, label};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, X25519};
use caas_attest::b64;
use caas_crypto::{SecretBytes, SecretKey};
use zeroize::Zeroizing;

/// The source SC's request to the TTP (AK-signed, label [`label::MIGRATE_REQUEST`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrateRequest {
    /// Source host (the signer).
    pub source: String,
    /// The workload.
    pub vm_id: String,
    /// r of the TL.Request that launched it on the source (names the TTP's session).
    #[serde(with = "b64")]
    pub launch_r: Vec<u8>,
    /// H2 of the launching DM.
    pub h2: String,
    /// The host the workload is to move to.
    pub target: String,
    /// Fresh nonce (consumed by the TTP).
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
}

/// The TTP's answer (signed by sk_TTP, label [`label::MIGRATE_STATEMENT`]): the target is
/// attested in the workload's profile and this is its bind key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationStatement {
    /// 32 random bytes chosen by the TTP; it is also the `launch_r` of the workload's new
    /// TTP session on the target (DBSP requests name it).
    #[serde(with = "b64")]
    pub migration_id: Vec<u8>,
    /// Source host.
    pub source: String,
    /// Target host.
    pub target: String,
    /// The workload.
    pub vm_id: String,
    /// H2 of its DM.
    pub h2: String,
    /// The workload's security profile (the target's appraised profile).
    pub sp: String,
    /// D_vm (carried over from the source's session).
    pub domains: Vec<String>,
    /// The target's bind key (TPM2B_PUBLIC): certified by the target's AK and bound to the
    /// PCR values of its trusted attestation.
    #[serde(with = "b64")]
    pub target_bind: Vec<u8>,
    /// DK_i of the target's session, sealed to `target_bind` (AAD [`dk_aad`]).
    #[serde(with = "b64")]
    pub c_dk: Vec<u8>,
    /// r of the request.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// TTP's time (Unix ms): the target refuses a statement outside the freshness window.
    pub t_ms: u64,
}

/// AAD of the target's DK_i sealed in a statement.
pub fn dk_aad(target: &str, migration_id: &[u8]) -> Vec<u8> {
    lp(&[
        label::MIGRATE_DK.as_bytes(),
        target.as_bytes(),
        migration_id,
    ])
}

/// Source → target: the statement, the source's ephemeral X25519 key and `s` sealed to the
/// target's bind key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrateOffer {
    /// The TTP's signed [`MigrationStatement`], as received.
    pub statement: Signed,
    /// The source's ephemeral X25519 public key.
    #[serde(with = "b64")]
    pub eph: Vec<u8>,
    /// `s` sealed to the statement's bind key, AAD [`offer_aad`].
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
}

/// AAD of the sealed `s`: bound to the exact statement and the source's ephemeral key.
pub fn offer_aad(statement_body: &[u8], eph: &[u8]) -> Vec<u8> {
    lp(&[
        label::MIGRATE_OFFER.as_bytes(),
        &sha256(statement_body),
        eph,
    ])
}

/// Target → source: the target's ephemeral key and its key confirmation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrateAccept {
    /// The migration.
    #[serde(with = "b64")]
    pub migration_id: Vec<u8>,
    /// The target's ephemeral X25519 public key.
    #[serde(with = "b64")]
    pub eph: Vec<u8>,
    /// HMAC-SHA256(K_confirm_target, transcript).
    #[serde(with = "b64")]
    pub confirm: Vec<u8>,
}

/// Verifies a statement with pk_TTP (signature) and checks it names `source`, `target`,
/// `vm_id` and is fresh. Used by the source (before anything leaves it) and the target.
pub fn verify_statement(
    signed: &Signed,
    ttp_sign: &[u8],
    source: &str,
    target: &str,
    vm_id: &str,
    now_ms: u64,
) -> Result<MigrationStatement> {
    let st: MigrationStatement = signed.open(ttp_sign, label::MIGRATE_STATEMENT)?;
    check_fresh(st.t_ms, now_ms)?;
    if st.source != source || st.target != target {
        return Err(Error::rejected(
            "host_mismatch",
            "the statement is for another pair of hosts",
        ));
    }
    if st.vm_id != vm_id {
        return Err(Error::rejected(
            "vm_id_mismatch",
            "the statement is for another workload",
        ));
    }
    if st.migration_id.len() != 32 {
        return Err(Error::malformed("statement", "migration ids are 32 bytes"));
    }
    check_name("vm_id", &st.vm_id)?;
    Ok(st)
}

fn transcript(st_body: &[u8], st: &MigrationStatement, eph_s: &[u8], eph_t: &[u8]) -> Vec<u8> {
    lp(&[
        label::MIGRATE_SESSION.as_bytes(),
        &st.migration_id,
        st.source.as_bytes(),
        st.target.as_bytes(),
        &sha256(&st.target_bind),
        &sha256(st_body),
        eph_s,
        eph_t,
    ])
}

/// The keys of one migration session.
pub struct SessionKeys {
    migration_id: Vec<u8>,
    s2t: SecretKey,
    t2s: SecretKey,
    confirm_t: SecretKey,
    transcript_hash: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("migration_id", &hex::encode(&self.migration_id))
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    fn derive(
        s: &[u8],
        z: &[u8],
        st_body: &[u8],
        st: &MigrationStatement,
        eph_s: &[u8],
        eph_t: &[u8],
    ) -> Result<Self> {
        let mut ikm = Zeroizing::new(Vec::with_capacity(64));
        ikm.extend_from_slice(s);
        ikm.extend_from_slice(z);
        let th = sha256(&transcript(st_body, st, eph_s, eph_t));
        let prk = caas_crypto::kdf::derive_key(&ikm, label::MIGRATE_SESSION.as_bytes(), &th)?;
        let k = |purpose: &str| -> Result<SecretKey> {
            Ok(caas_crypto::kdf::derive_key(
                prk.expose(),
                purpose.as_bytes(),
                &th,
            )?)
        };
        Ok(Self {
            migration_id: st.migration_id.clone(),
            s2t: k("stream source->target")?,
            t2s: k("stream target->source")?,
            confirm_t: k("confirm target")?,
            transcript_hash: th,
        })
    }

    /// The migration id.
    pub fn migration_id(&self) -> &[u8] {
        &self.migration_id
    }

    fn confirm(&self) -> [u8; 32] {
        hmac(self.confirm_t.expose(), &self.transcript_hash)
    }

    /// The two streams of `role`'s side: it seals in its sending direction and opens in
    /// the other. The keys are consumed, so no second stream under the same key (and
    /// sequence-number nonces) can exist.
    pub fn into_streams(self, role: Role) -> Result<(StreamSealer, StreamOpener)> {
        let (send, recv, sd, rd) = match role {
            Role::Source => (
                &self.s2t,
                &self.t2s,
                Direction::SourceToTarget,
                Direction::TargetToSource,
            ),
            Role::Target => (
                &self.t2s,
                &self.s2t,
                Direction::TargetToSource,
                Direction::SourceToTarget,
            ),
        };
        Ok((
            StreamSealer::new(send, sd, &self.migration_id)?,
            StreamOpener::new(recv, rd, &self.migration_id)?,
        ))
    }
}

/// Which side of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host the workload leaves.
    Source,
    /// The host it moves to.
    Target,
}

fn x25519_ephemeral() -> Result<(agreement::PrivateKey, Vec<u8>)> {
    let sk = agreement::PrivateKey::generate(&X25519).map_err(|_| Error::Crypto("X25519"))?;
    let pk = sk
        .compute_public_key()
        .map_err(|_| Error::Crypto("X25519"))?
        .as_ref()
        .to_vec();
    Ok((sk, pk))
}

fn x25519(sk: &agreement::PrivateKey, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if peer.len() != 32 {
        return Err(Error::malformed(
            "ephemeral key",
            "X25519 public keys are 32 bytes",
        ));
    }
    agreement::agree(
        sk,
        agreement::UnparsedPublicKey::new(&X25519, peer),
        Error::rejected("key_agreement_failed", "X25519 agreement failed"),
        |z| Ok(Zeroizing::new(z.to_vec())),
    )
}

/// The source's half of the key agreement, between its offer and the target's accept.
pub struct Initiator {
    statement_body: Vec<u8>,
    statement: MigrationStatement,
    s: Zeroizing<[u8; 32]>,
    eph_sk: agreement::PrivateKey,
    eph_pk: Vec<u8>,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator").finish_non_exhaustive()
    }
}

impl Initiator {
    /// Builds the offer for a statement that [`verify_statement`] accepted.
    pub fn offer(signed: &Signed, st: MigrationStatement) -> Result<(Self, MigrateOffer)> {
        let s = Zeroizing::new(random32()?);
        let (eph_sk, eph_pk) = x25519_ephemeral()?;
        let sealed = seal_to_bind_key(&st.target_bind, &offer_aad(&signed.body, &eph_pk), &s[..])?;
        let offer = MigrateOffer {
            statement: signed.clone(),
            eph: eph_pk.clone(),
            sealed,
        };
        Ok((
            Self {
                statement_body: signed.body.clone(),
                statement: st,
                s,
                eph_sk,
                eph_pk,
            },
            offer,
        ))
    }

    /// Checks the target's confirmation (it proves the target's TPM opened `s` under the
    /// attested PCR policy) and returns the session keys.
    pub fn complete(self, accept: &MigrateAccept) -> Result<SessionKeys> {
        if !ct_eq(&accept.migration_id, &self.statement.migration_id) {
            return Err(Error::rejected(
                "confirmation_failed",
                "the answer is for another migration",
            ));
        }
        let z = x25519(&self.eph_sk, &accept.eph)?;
        let keys = SessionKeys::derive(
            &self.s[..],
            &z,
            &self.statement_body,
            &self.statement,
            &self.eph_pk,
            &accept.eph,
        )?;
        if !ct_eq(&keys.confirm(), &accept.confirm) {
            return Err(Error::rejected(
                "confirmation_failed",
                "the target did not prove it holds the attested bind key",
            ));
        }
        Ok(keys)
    }
}

/// The target's checks of an offer before any TPM work: the statement verifies under
/// pk_TTP, names this host as target and `peer` (the mutual-TLS identity of the caller) as
/// source, and is fresh. Returns the statement and the RSA part for the TPM.
pub fn check_offer<'a>(
    offer: &'a MigrateOffer,
    ttp_sign: &[u8],
    me: &str,
    peer: &str,
    vm_id: &str,
    now_ms: u64,
) -> Result<(MigrationStatement, &'a [u8])> {
    let st = verify_statement(&offer.statement, ttp_sign, peer, me, vm_id, now_ms)?;
    if offer.eph.len() != 32 {
        return Err(Error::malformed("offer", "X25519 public keys are 32 bytes"));
    }
    let (rsa, _) = split_bind_sealed(&offer.sealed)?;
    Ok((st, rsa))
}

/// The target's key agreement: `tpm_key` is what its TPM decrypted from the offer's RSA
/// part (under the bind key's PCR policy). Returns the session keys and the accept.
pub fn accept_offer(
    offer: &MigrateOffer,
    st: &MigrationStatement,
    tpm_key: &[u8],
) -> Result<(SessionKeys, MigrateAccept)> {
    let (_, body) = split_bind_sealed(&offer.sealed)?;
    let s: SecretBytes = crate::crypto::open_bind_sealed(
        tpm_key,
        &offer_aad(&offer.statement.body, &offer.eph),
        body,
    )
    .map_err(|_| Error::rejected("offer_invalid", "the sealed session secret does not open"))?;
    if s.len() != 32 {
        return Err(Error::rejected(
            "offer_invalid",
            "the session secret has a bad length",
        ));
    }
    let (eph_sk, eph_pk) = x25519_ephemeral()?;
    let z = x25519(&eph_sk, &offer.eph)?;
    let keys = SessionKeys::derive(
        s.expose(),
        &z,
        &offer.statement.body,
        st,
        &offer.eph,
        &eph_pk,
    )?;
    let accept = MigrateAccept {
        migration_id: st.migration_id.clone(),
        eph: eph_pk,
        confirm: keys.confirm().to_vec(),
    };
    Ok((keys, accept))
}

/// Which way a stream flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source to target (the VM's and crypto domain's state).
    SourceToTarget,
    /// Target to source (acknowledgements).
    TargetToSource,
}

impl Direction {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::SourceToTarget => b"source->target",
            Self::TargetToSource => b"target->source",
        }
    }
}

/// Logical channels multiplexed on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Control messages (JSON).
    Control = 0,
    /// qemu's live-migration stream.
    Vm = 1,
    /// The crypto domain's state.
    Domain = 2,
}

impl Channel {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Control),
            1 => Some(Self::Vm),
            2 => Some(Self::Domain),
            _ => None,
        }
    }
}

/// Record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Payload bytes of a channel.
    Data = 0,
    /// The last record: record count and bytes per channel.
    End = 1,
}

/// Header: kind (1) ‖ channel (1) ‖ seq (8, BE) ‖ ciphertext length (4, BE).
pub const HEADER_LEN: usize = 14;
/// Largest payload of one record.
pub const MAX_RECORD: usize = 1 << 20;
const TAG_LEN: usize = 16;

fn header(kind: RecordKind, ch: Channel, seq: u64, ct_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1] = ch as u8;
    h[2..10].copy_from_slice(&seq.to_be_bytes());
    h[10..14].copy_from_slice(&ct_len.to_be_bytes());
    h
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn stream_key(k: &SecretKey) -> Result<LessSafeKey> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, k.expose()).map_err(|_| Error::Crypto("AES-GCM"))?,
    ))
}

fn aad(prefix: &[u8], h: &[u8; HEADER_LEN]) -> Vec<u8> {
    let mut a = prefix.to_vec();
    a.extend_from_slice(h);
    a
}

/// What the end record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Data records before the end record.
    pub records: u64,
    /// Bytes per channel (control, vm, domain).
    pub bytes: [u64; 3],
}

impl Totals {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&self.records.to_be_bytes());
        for (i, n) in self.bytes.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&n.to_be_bytes());
        }
        b
    }
    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 32 {
            return None;
        }
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Some(Self {
            records: u(0),
            bytes: [u(8), u(16), u(24)],
        })
    }
    fn add(&mut self, ch: Channel, n: usize) {
        self.records += 1;
        self.bytes[ch as usize] = self.bytes[ch as usize].saturating_add(n as u64);
    }
}

/// The sealing end of a migration stream.
pub struct StreamSealer {
    key: LessSafeKey,
    prefix: Vec<u8>,
    seq: u64,
    totals: Totals,
    ended: bool,
}

impl std::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSealer")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn prefix(dir: Direction, migration_id: &[u8]) -> Vec<u8> {
    lp(&[label::MIGRATE_STREAM.as_bytes(), dir.tag(), migration_id])
}

impl StreamSealer {
    fn new(k: &SecretKey, dir: Direction, migration_id: &[u8]) -> Result<Self> {
        Ok(Self {
            key: stream_key(k)?,
            prefix: prefix(dir, migration_id),
            seq: 0,
            totals: Totals::default(),
            ended: false,
        })
    }

    fn seal(&mut self, kind: RecordKind, ch: Channel, payload: &[u8]) -> Result<Vec<u8>> {
        if self.ended {
            return Err(Error::rejected("stream_after_end", "the stream has ended"));
        }
        if payload.len() > MAX_RECORD {
            return Err(Error::malformed("record", "too large"));
        }
        let ct_len = u32::try_from(payload.len() + TAG_LEN)
            .map_err(|_| Error::malformed("record", "too large"))?;
        let h = header(kind, ch, self.seq, ct_len);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(&h);
        out.extend_from_slice(payload);
        let mut body = out.split_off(HEADER_LEN);
        self.key
            .seal_in_place_append_tag(nonce(self.seq), Aad::from(aad(&self.prefix, &h)), &mut body)
            .map_err(|_| Error::Crypto("AES-GCM"))?;
        out.extend_from_slice(&body);
        self.seq += 1;
        Ok(out)
    }

    /// One record of `ch` carrying `payload` (at most [`MAX_RECORD`] bytes).
    pub fn data(&mut self, ch: Channel, payload: &[u8]) -> Result<Vec<u8>> {
        let r = self.seal(RecordKind::Data, ch, payload)?;
        self.totals.add(ch, payload.len());
        Ok(r)
    }

    /// What was sealed so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The end record; nothing can be sealed after it.
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let t = self.totals.encode();
        let r = self.seal(RecordKind::End, Channel::Control, &t)?;
        self.ended = true;
        Ok(r)
    }
}

/// A parsed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    raw: [u8; HEADER_LEN],
    /// Ciphertext length that follows (payload + 16-byte tag).
    pub ct_len: usize,
}

/// Parses a header (untrusted: only the length is used before authentication, and it is
/// bounded by [`MAX_RECORD`]).
pub fn parse_header(raw: [u8; HEADER_LEN]) -> Result<Header> {
    let ct_len = u32::from_be_bytes([raw[10], raw[11], raw[12], raw[13]]) as usize;
    if !(TAG_LEN..=MAX_RECORD + TAG_LEN).contains(&ct_len) {
        return Err(Error::rejected(
            "stream_tampered",
            "a record has an impossible length",
        ));
    }
    Ok(Header { raw, ct_len })
}

/// One opened record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// Payload of a channel.
    Data(Channel, Vec<u8>),
    /// The stream ended with these totals (checked against what was received).
    End(Totals),
}

/// The opening end of a migration stream: records must arrive authentic, in order, once,
/// and the stream must end with its end record.
pub struct StreamOpener {
    key: LessSafeKey,
    prefix: Vec<u8>,
    seq: u64,
    totals: Totals,
    ended: bool,
}

impl std::fmt::Debug for StreamOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOpener")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl StreamOpener {
    fn new(k: &SecretKey, dir: Direction, migration_id: &[u8]) -> Result<Self> {
        Ok(Self {
            key: stream_key(k)?,
            prefix: prefix(dir, migration_id),
            seq: 0,
            totals: Totals::default(),
            ended: false,
        })
    }

    /// Whether the end record was received.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Opens the record with header `h` and ciphertext `ct`.
    pub fn open(&mut self, h: &Header, mut ct: Vec<u8>) -> Result<Record> {
        if self.ended {
            return Err(Error::rejected(
                "stream_after_end",
                "a record arrived after the end of the stream",
            ));
        }
        if ct.len() != h.ct_len {
            return Err(Error::rejected(
                "stream_truncated",
                "the stream stopped inside a record",
            ));
        }
        let mut seq_b = [0u8; 8];
        seq_b.copy_from_slice(&h.raw[2..10]);
        let seq = u64::from_be_bytes(seq_b);
        // Only the expected record may come next: one from elsewhere in this stream
        // (reordered, dropped before, replayed) is refused by its header; one whose header
        // was rewritten to the expected number does not authenticate (the nonce and AAD are
        // those of the expected number), nor does one from another stream.
        if seq != self.seq {
            return Err(Error::rejected(
                "stream_out_of_order",
                format!(
                    "record {seq} arrived where record {} was expected (reordered, dropped \
                     or replayed)",
                    self.seq
                ),
            ));
        }
        let plain = self
            .key
            .open_in_place(
                nonce(self.seq),
                Aad::from(aad(&self.prefix, &h.raw)),
                &mut ct,
            )
            .map_err(|_| Error::rejected("stream_tampered", "a record does not authenticate"))?;
        let plain = plain.to_vec();
        self.seq += 1;
        let ch = Channel::from_u8(h.raw[1])
            .ok_or_else(|| Error::rejected("stream_tampered", "unknown channel"))?;
        match h.raw[0] {
            0 => {
                self.totals.add(ch, plain.len());
                Ok(Record::Data(ch, plain))
            }
            1 => {
                let t = Totals::decode(&plain)
                    .ok_or_else(|| Error::rejected("stream_tampered", "bad end record"))?;
                if t != self.totals {
                    return Err(Error::rejected(
                        "stream_truncated",
                        "the end record does not match what was received",
                    ));
                }
                self.ended = true;
                Ok(Record::End(t))
            }
            _ => Err(Error::rejected("stream_tampered", "unknown record kind")),
        }
    }

    /// Reads and opens one record from `r` (blocking). EOF before the end record is
    /// `stream_truncated`.
    pub fn read_from<R: std::io::Read>(&mut self, r: &mut R) -> Result<Record> {
        let mut raw = [0u8; HEADER_LEN];
        read_exact_or_truncated(r, &mut raw)?;
        let h = parse_header(raw)?;
        let mut ct = vec![0u8; h.ct_len];
        read_exact_or_truncated(r, &mut ct)?;
        self.open(&h, ct)
    }
}

fn read_exact_or_truncated<R: std::io::Read>(r: &mut R, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::rejected(
                "stream_truncated",
                "the stream stopped before its end record",
            )
        } else {
            Error::rejected("stream_io", "reading the stream failed")
        }
    })
}

/// The record after `h` in a buffer of concatenated records (for tests and tools):
/// `(header, ciphertext, rest)`.
pub fn split_record(b: &[u8]) -> Result<(Header, &[u8], &[u8])> {
    if b.len() < HEADER_LEN {
        return Err(Error::rejected(
            "stream_truncated",
            "the stream stopped inside a header",
        ));
    }
    let mut raw = [0u8; HEADER_LEN];
    raw.copy_from_slice(&b[..HEADER_LEN]);
    let h = parse_header(raw)?;
    let rest = &b[HEADER_LEN..];
    if rest.len() < h.ct_len {
        return Err(Error::rejected(
            "stream_truncated",
            "the stream stopped inside a record",
        ));
    }
    Ok((h, &rest[..h.ct_len], &rest[h.ct_len..]))
}

/// Serialises `v` for a control record.
pub fn control<T: serde::Serialize>(v: &T) -> Vec<u8> {
    wire::to_bytes(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn statement() -> MigrationStatement {
        MigrationStatement {
            migration_id: vec![7; 32],
            source: "host-1".into(),
            target: "host-2".into(),
            vm_id: "vm1".into(),
            h2: "00".repeat(32),
            sp: "dev".into(),
            domains: vec![],
            target_bind: b"bind".to_vec(),
            c_dk: vec![],
            r: vec![1; 32],
            t_ms: 1,
        }
    }

    /// The keys of session `n` as both sides derive them (the TPM half stubbed by a fixed
    /// `s`; the X25519 half real).
    fn keys(n: u8) -> SessionKeys {
        let st = statement();
        let body = wire::to_bytes(&st);
        SessionKeys::derive(&[n; 32], &[5; 32], &body, &st, &[1; 32], &[2; 32]).unwrap()
    }

    fn stream(n: u8, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let (mut s, _) = keys(n).into_streams(Role::Source).unwrap();
        let mut out: Vec<Vec<u8>> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ch = if i % 2 == 0 {
                    Channel::Vm
                } else {
                    Channel::Domain
                };
                s.data(ch, c).unwrap()
            })
            .collect();
        out.push(s.finish().unwrap());
        out
    }

    /// What the target makes of `bytes` (session `n`), records until the end record, then
    /// whatever follows.
    fn read_all(n: u8, bytes: &[u8]) -> Result<Vec<Record>> {
        let (_, mut o) = keys(n).into_streams(Role::Target)?;
        let mut r = bytes;
        let mut got = Vec::new();
        while !o.ended() {
            got.push(o.read_from(&mut r)?);
        }
        if !r.is_empty() {
            let (h, ct, _) = split_record(r)?;
            o.open(&h, ct.to_vec())?;
        }
        Ok(got)
    }

    #[test]
    fn both_sides_derive_the_same_keys_with_real_x25519() {
        let st = statement();
        let body = wire::to_bytes(&st);
        let (ska, pka) = x25519_ephemeral().unwrap();
        let (skb, pkb) = x25519_ephemeral().unwrap();
        let za = x25519(&ska, &pkb).unwrap();
        let zb = x25519(&skb, &pka).unwrap();
        let a = SessionKeys::derive(&[9; 32], &za, &body, &st, &pka, &pkb).unwrap();
        let b = SessionKeys::derive(&[9; 32], &zb, &body, &st, &pka, &pkb).unwrap();
        assert!(ct_eq(&a.confirm(), &b.confirm()));
        let (mut s, _) = a.into_streams(Role::Source).unwrap();
        let (_, mut o) = b.into_streams(Role::Target).unwrap();
        let rec = s.data(Channel::Vm, b"x").unwrap();
        let (h, ct, _) = split_record(&rec).unwrap();
        assert_eq!(
            o.open(&h, ct.to_vec()).unwrap(),
            Record::Data(Channel::Vm, b"x".to_vec())
        );
    }

    #[test]
    fn migration_stream_round_trips_with_totals() {
        let recs = stream(1, &[b"qemu state", b"domain state", b""]);
        let got = read_all(1, &recs.concat()).unwrap();
        assert_eq!(got[0], Record::Data(Channel::Vm, b"qemu state".to_vec()));
        assert_eq!(
            got[1],
            Record::Data(Channel::Domain, b"domain state".to_vec())
        );
        assert_eq!(
            got[3],
            Record::End(Totals {
                records: 3,
                bytes: [0, 10, 12]
            })
        );
    }

    #[test]
    fn tampered_migration_record_is_refused() {
        let recs = stream(1, &[b"qemu state", b"domain state"]);
        let all = recs.concat();
        // Every bit position class of every byte: header (kind, channel, seq, length),
        // ciphertext, tag, and the end record.
        for i in 0..all.len() {
            for bit in [0x01, 0x80] {
                let mut t = all.clone();
                t[i] ^= bit;
                let e = read_all(1, &t).expect_err(&format!("byte {i} flipped was accepted"));
                assert!(
                    matches!(
                        e.code(),
                        "stream_tampered" | "stream_out_of_order" | "stream_truncated"
                    ),
                    "byte {i}: {e}"
                );
            }
        }
    }

    #[test]
    fn reordered_dropped_or_replayed_migration_record_is_refused() {
        let r = stream(1, &[b"one", b"two", b"three"]);
        let swapped = [r[1].clone(), r[0].clone(), r[2].clone(), r[3].clone()].concat();
        assert_eq!(
            read_all(1, &swapped).unwrap_err().code(),
            "stream_out_of_order"
        );
        let dropped = [r[0].clone(), r[2].clone(), r[3].clone()].concat();
        assert_eq!(
            read_all(1, &dropped).unwrap_err().code(),
            "stream_out_of_order"
        );
        let replayed = [r[0].clone(), r[0].clone(), r[1].clone()].concat();
        assert_eq!(
            read_all(1, &replayed).unwrap_err().code(),
            "stream_out_of_order"
        );
        // A record appended after the end record.
        let after = [r.concat(), r[1].clone()].concat();
        assert_eq!(read_all(1, &after).unwrap_err().code(), "stream_after_end");
    }

    #[test]
    fn truncated_migration_stream_is_refused() {
        let all = stream(1, &[b"one", b"two"]).concat();
        // Cut anywhere, including exactly at a record boundary before the end record.
        for cut in 0..all.len() {
            let e = read_all(1, &all[..cut]).expect_err(&format!("cut at {cut}"));
            assert_eq!(e.code(), "stream_truncated", "cut at {cut}: {e}");
        }
    }

    #[test]
    fn migration_stream_replayed_into_another_session_is_refused() {
        let r = stream(1, &[b"qemu state"]);
        assert_eq!(
            read_all(2, &r.concat()).unwrap_err().code(),
            "stream_tampered"
        );
        // Reflected back to the source as if the target had sent it.
        let (_, mut o) = keys(1).into_streams(Role::Source).unwrap();
        let (h, ct, _) = split_record(&r[0]).unwrap();
        assert_eq!(
            o.open(&h, ct.to_vec()).unwrap_err().code(),
            "stream_tampered"
        );
    }

    #[test]
    fn oversized_record_length_is_refused_before_allocation() {
        let mut raw = [0u8; HEADER_LEN];
        raw[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_header(raw).unwrap_err().code(), "stream_tampered");
    }

    #[test]
    fn target_without_the_bind_key_cannot_confirm() {
        let st = statement();
        let (eph_sk, eph_pk) = x25519_ephemeral().unwrap();
        let init = Initiator {
            statement_body: wire::to_bytes(&st),
            statement: st.clone(),
            s: Zeroizing::new([3; 32]),
            eph_sk,
            eph_pk,
        };
        let (_, t_pk) = x25519_ephemeral().unwrap();
        // An impostor target that cannot open `s` (no attested bind key) cannot compute
        // the confirmation, whatever ephemeral key it sends.
        let e = init
            .complete(&MigrateAccept {
                migration_id: st.migration_id.clone(),
                eph: t_pk,
                confirm: vec![0; 32],
            })
            .unwrap_err();
        assert_eq!(e.code(), "confirmation_failed");
    }
}
