//! The messages of TL (seed 003 §4.3, Fig. 2) and DBSP (§4.4, Fig. 3), as JSON with
//! base64 byte fields. Signed messages carry the exact body bytes next to the signature
//! ([`Signed`], [`AkSigned`]): the signature is checked on those bytes before they are
//! parsed, so there is no canonicalisation to get wrong.
//!
//! Names follow the seed: `tau` (τ), `h1` (hash of the workload image), `h2` (hash of
//! pk_DM), `sp` (security profile), `r` (the DM's nonce), `dk` (the TL domain key DK_i
//! between SC and TTP — unrelated to the KMS domain keys), `c1`…`c4`, `mu` (μ).
use crate::error::{Error, Result};
use caas_attest::Evidence;
use caas_attest::b64;
use serde::de::DeserializeOwned;

/// Signature labels (domain separation), one per message type.
pub mod label {
    /// TL.Request, signed by the DM.
    pub const LAUNCH_REQUEST: &str = "caas-tl launch-request v1";
    /// TL.AttestRequest, signed by the AK (quote over its digest).
    pub const ATTEST_REQUEST: &str = "caas-tl attest-request v1";
    /// TL.Attestation, signed by the TTP.
    pub const ATTESTATION: &str = "caas-tl attestation v1";
    /// DBSP.DomKeyReq, signed by the AK.
    pub const DOMKEY_REQUEST: &str = "caas-tl domkey-request v1";
    /// DBSP.DomKeyGen response, signed by the TTP.
    pub const DOMKEY_RESPONSE: &str = "caas-tl domkey-response v1";
    /// Revocation notice (host untrusted), signed by the TTP.
    pub const REVOKE: &str = "caas-tl revoke v1";
    /// An ACL change for a DM, signed by that DM (the TTP authenticates the DM, §4.4).
    pub const ACL_UPDATE: &str = "caas-tl acl-update v1";
    /// AAD of c1 (m1 encrypted to pk_TTP).
    pub const M1: &str = "caas-tl m1 v1";
    /// AAD prefix of c2 (m2 sealed to the bind key).
    pub const M2: &str = "caas-tl m2 v1";
    /// AAD prefix of the DomKeyReq payload under DK_i.
    pub const DOMKEY_INNER: &str = "caas-tl domkey-inner v1";
    /// AAD prefix of c3.
    pub const C3: &str = "caas-tl c3 v1";
    /// AAD prefix of c4.
    pub const C4: &str = "caas-tl c4 v1";
    /// AAD label (and envelope tag) of a crypto-domain configuration sealed to a host's
    /// bind key (seed 001 Alg. 1). v2: bound to its owner's H2 and the image's H1.
    pub const DOMC_CONFIG: &str = "caas-tl domc-config v2";
    /// DBSP epoch report, AK-signed by the SC.
    pub const EPOCH_REPORT: &str = "caas-tl epoch-report v1";
    /// Live migration: the source SC's request to the TTP, AK-signed.
    pub const MIGRATE_REQUEST: &str = "caas-tl migrate-request v1";
    /// Live migration: the TTP's statement on the target, signed by sk_TTP.
    pub const MIGRATE_STATEMENT: &str = "caas-tl migrate-statement v1";
    /// AAD prefix of the target's DK_i in a migration statement.
    pub const MIGRATE_DK: &str = "caas-tl migrate-dk v1";
    /// AAD prefix of the session secret sealed to the target's bind key.
    pub const MIGRATE_OFFER: &str = "caas-tl migrate-offer v1";
    /// KDF label and transcript tag of a migration session.
    pub const MIGRATE_SESSION: &str = "caas-tl migrate-session v1";
    /// AAD prefix of the migration stream's records.
    pub const MIGRATE_STREAM: &str = "caas-tl migrate-stream v1";
    /// Suspend: the SC asks for a fresh state key (AK-signed).
    pub const SUSPEND_REQUEST: &str = "caas-tl suspend-request v1";
    /// Resume: the SC of the target host asks for a saved state's key (AK-signed).
    pub const RESUME_REQUEST: &str = "caas-tl resume-request v1";
    /// The TTP's grant of a state key (sealed to the host's bind key), TTP-signed.
    pub const STATE_KEY: &str = "caas-tl state-key v1";
    /// AAD prefix of the sealed state key.
    pub const STATE_KEY_SEALED: &str = "caas-tl state-key sealed v1";
    /// Network key request (the SDP's overlay key of a network domain), AK-signed.
    pub const NETKEY_REQUEST: &str = "caas-tl netkey-request v1";
    /// AAD prefix of the network key request's payload under DK_i.
    pub const NETKEY_INNER: &str = "caas-tl netkey-inner v1";
    /// The TTP's grant of a network key, TTP-signed.
    pub const NETKEY_GRANT: &str = "caas-tl netkey-grant v1";
    /// AAD prefix of the network key sealed to the host's bind key.
    pub const NETKEY_SEALED: &str = "caas-tl netkey sealed v1";
    /// A workload's network membership ends (its VM stopped or suspended), AK-signed.
    pub const NETLEAVE_REQUEST: &str = "caas-tl netleave-request v1";
    /// AAD prefix of the leave's proof under DK_i.
    pub const NETLEAVE_INNER: &str = "caas-tl netleave-inner v1";
    /// The TTP's answer to a leave, TTP-signed.
    pub const NETLEAVE_ACK: &str = "caas-tl netleave-ack v1";
}

/// Maximum size of any protocol body (bytes).
pub const MAX_BODY: usize = 256 * 1024;
/// Freshness window for timestamps (ms): messages older or further in the future are refused.
pub const FRESHNESS_MS: u64 = 5 * 60 * 1000;

/// Parses JSON from untrusted bytes.
pub fn parse<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T> {
    if b.len() > MAX_BODY {
        return Err(Error::malformed(what, "too large"));
    }
    serde_json::from_slice(b).map_err(|e| Error::malformed(what, e))
}

/// Serialises to JSON.
pub fn to_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A body signed with Ed25519 (by the DM or the TTP).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signed {
    /// The exact signed JSON bytes.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    /// Ed25519 signature over `lp(label, body)`.
    #[serde(with = "b64")]
    pub sig: Vec<u8>,
}

impl Signed {
    /// Signs `value` with `kp`.
    pub fn sign<T: serde::Serialize>(
        kp: &aws_lc_rs::signature::Ed25519KeyPair,
        label: &str,
        value: &T,
    ) -> Self {
        let body = to_bytes(value);
        let sig = crate::crypto::ed25519_sign(kp, label, &body);
        Self { body, sig }
    }

    /// Verifies with `pk`, then parses.
    pub fn open<T: DeserializeOwned>(&self, pk: &[u8], label: &'static str) -> Result<T> {
        crate::crypto::ed25519_verify(pk, label, &self.body, &self.sig)?;
        parse(label, &self.body)
    }

    /// Parses without verifying (only to find out who claims to have signed).
    pub fn peek<T: DeserializeOwned>(&self, label: &'static str) -> Result<T> {
        parse(label, &self.body)
    }
}

/// A body signed by a host's AK: a TPM quote whose qualifying data is
/// [`crate::crypto::ak_nonce`]`(label, body)` — one TPM operation is both `σ_AIK` over the
/// message and a fresh attestation (with the event log) of the host's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AkSigned {
    /// The exact signed JSON bytes.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    /// Quote, signature, event log, PCR values.
    pub evidence: Evidence,
}

/// An ACL change: the domains `pk_dm`'s workloads may be given. Signed by sk_DM ([`Signed`],
/// label [`label::ACL_UPDATE`]); `nonce` is consumed by the TTP (a replay is refused) and
/// `time_ms` must be within [`FRESHNESS_MS`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AclUpdate {
    /// pk_DM (Ed25519, 32 bytes).
    #[serde(with = "b64")]
    pub pk_dm: Vec<u8>,
    /// Free text.
    #[serde(default)]
    pub label: String,
    /// Domains.
    pub domains: Vec<String>,
    /// 32 random bytes, single use.
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// Unix ms when the DM signed it.
    pub time_ms: u64,
}

/// m1 = τ‖H1‖H2‖SP‖id_vm‖D_vm (TL.Token), encrypted to pk_TTP as c1.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct M1 {
    /// τ, 32 random bytes.
    #[serde(with = "b64")]
    pub tau: Vec<u8>,
    /// H1: SHA-256 of the workload image (hex).
    pub h1: String,
    /// H2: SHA-256 of pk_DM (hex).
    pub h2: String,
    /// SP: the security profile required.
    pub sp: String,
    /// id_vm.
    pub vm_id: String,
    /// D_vm: the storage domains the workload may access.
    pub domains: Vec<String>,
}

impl std::fmt::Debug for M1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("M1")
            .field("tau", &"[REDACTED]")
            .field("h1", &self.h1)
            .field("h2", &self.h2)
            .field("sp", &self.sp)
            .field("vm_id", &self.vm_id)
            .field("domains", &self.domains)
            .finish()
    }
}

/// TL.Request ⟨c1, SP, pk_DM, r⟩, signed by sk_DM (σ_DM).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaunchRequest {
    /// c1 = Enc_pkTTP(m1).
    #[serde(with = "b64")]
    pub c1: Vec<u8>,
    /// SP.
    pub sp: String,
    /// pk_DM (Ed25519, 32 bytes).
    #[serde(with = "b64")]
    pub pk_dm: Vec<u8>,
    /// r: 32-byte nonce.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// Creation time (Unix ms), for the freshness window.
    pub t_ms: u64,
}

/// What the (untrusted) scheduler hands a host agent to launch a workload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LaunchCall {
    /// The DM's signed TL.Request, forwarded unchanged.
    pub request: Signed,
    /// id_vm as the scheduler claims it.
    pub vm_id: String,
    /// Image id in the cloud storage.
    pub image_id: String,
    /// Workload driver: `process` (default) or `qemu`.
    #[serde(default)]
    pub driver: Option<String>,
    /// DBSP volumes to attach before the workload starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeRequest>,
    /// Serve the workload's disk (NBD STARTTLS) and VSM (TCP) over the network as well,
    /// with mutual TLS bound to this launch (a CA of its own; only the workload gets the
    /// client key).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// Attach the VM's overlay NIC to a network domain (`docs/network-sdp.md`): the agent
    /// runs the VM's network proxy with the domain's key from the TTP (which releases it
    /// only when N is in the DM-signed request's domains and the DM's ACL grants it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetAttach>,
}

/// A VM's attachment to a network domain's overlay: the domain N and the guest's address
/// on it (the tenant's choice; the overlay is one Ethernet segment per N).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetAttach {
    /// The network domain N (must be in the launch's domains D_vm).
    pub domain: String,
    /// The guest's IPv4 address on the overlay.
    pub address: std::net::Ipv4Addr,
    /// Its prefix length (1..=30).
    pub prefix_len: u8,
}

/// A member of a network domain as the scheduler tells the others (public: where its
/// proxy receives sealed frames and under which sender id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetMember {
    /// id_vm.
    pub vm_id: String,
    /// Its proxy's sender id in N.
    pub sender: u32,
    /// Its proxy's underlay UDP address.
    pub udp: std::net::SocketAddr,
}

/// `POST /v1/agent/net/peers` (the scheduler → each member's agent): N's members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetPeers {
    /// N.
    pub net_domain: String,
    /// Every member (each agent leaves out its own VMs).
    pub members: Vec<NetMember>,
}

impl NetAttach {
    /// Checks N's name and the address.
    ///
    /// # Errors
    /// [`crate::Error::Malformed`].
    pub fn check(&self) -> crate::Result<()> {
        check_name("net_domain", &self.domain)?;
        if !(1..=30).contains(&self.prefix_len) {
            return Err(crate::Error::malformed("net", "prefix_len must be 1..=30"));
        }
        let a = self.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(crate::Error::malformed(
                "net",
                "the overlay address must be a unicast host address",
            ));
        }
        Ok(())
    }

    /// Parses `A.B.C.D/P`.
    ///
    /// # Errors
    /// A message naming the expected form.
    pub fn parse_addr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected A.B.C.D/PREFIX"))?;
        let a = a
            .parse()
            .map_err(|_| format!("{s:?}: not an IPv4 address"))?;
        let p = p.parse().map_err(|_| format!("{s:?}: bad prefix length"))?;
        Ok((a, p))
    }
}

/// A DBSP storage resource to attach to a workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRequest {
    /// Domain D.
    pub domain: String,
    /// Storage resource SR (the volume's name in the domain).
    pub sr: String,
    /// Size of a new volume (bytes); ignored when it exists.
    #[serde(default = "default_volume_size")]
    pub size: u64,
}

fn default_volume_size() -> u64 {
    64 << 20
}

/// TL.AttestRequest body ⟨c1, r, AttestData⟩ (σ_AIK: the quote over its digest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttestRequest {
    /// Host name (as enrolled).
    pub host: String,
    /// The DM's signed TL.Request (carries c1, SP, pk_DM, r and σ_DM).
    pub launch: Signed,
    /// pk_TPM: the bind key (TPM2B_PUBLIC), with TPM2_Certify by the AK (TPM_CERTIFY_INFO and σ_TCI).
    pub bind: caas_attest::store::BindKeyRecord,
    /// SC's time (Unix ms).
    pub t_ms: u64,
}

/// m2 = τ‖H1‖H2‖DK_i‖id_vm, sealed to the host's bind key as c2.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct M2 {
    /// τ.
    #[serde(with = "b64")]
    pub tau: Vec<u8>,
    /// H1 (hex).
    pub h1: String,
    /// H2 (hex).
    pub h2: String,
    /// DK_i: the SC↔TTP key for this workload's DBSP requests.
    #[serde(with = "b64")]
    pub dk: Vec<u8>,
    /// id_vm.
    pub vm_id: String,
}

impl Drop for M2 {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.tau);
        zeroize::Zeroize::zeroize(&mut self.dk);
    }
}

impl Drop for M1 {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.tau);
    }
}

impl std::fmt::Debug for M2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("M2")
            .field("h1", &self.h1)
            .field("h2", &self.h2)
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

/// TL.Attestation ⟨c2, r⟩, signed by sk_TTP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attestation {
    /// Host it is for.
    pub host: String,
    /// r of the request.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// c2 = AttestToken(b, m2, AttestData).
    #[serde(with = "b64")]
    pub c2: Vec<u8>,
}

/// meta = {D, SP}: the domain and the security profile required to access it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// Domain identifier D.
    pub domain: String,
    /// SP.
    pub sp: String,
}

/// The part of DBSP.DomKeyReq protected with DK_i.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomKeyInner {
    /// meta.
    pub meta: Meta,
    /// c4 from the domain header when re-creating keys.
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub c4: Option<Vec<u8>>,
    /// μ from the domain header when re-creating keys.
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub mu: Option<Vec<u8>>,
}

/// DBSP.DomKeyReq body (σ_AIK: the quote over its digest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomKeyRequest {
    /// Host name.
    pub host: String,
    /// The workload (TL session) asking.
    pub vm_id: String,
    /// Target storage resource SR.
    pub sr: String,
    /// H2 of the DM that launched the workload (hex).
    pub h2: String,
    /// r of the TL.Request that launched the workload: with host and id_vm it names the
    /// TTP's session, so a later launch of the same id_vm cannot take this one's place.
    #[serde(with = "b64")]
    pub launch_r: Vec<u8>,
    /// Fresh nonce.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
    /// [`DomKeyInner`] under DK_i (AES-256-GCM, AAD [`DomKeyRequest::inner_aad`]).
    #[serde(with = "b64")]
    pub enc: Vec<u8>,
}

impl DomKeyRequest {
    /// AAD of `enc`: binds host, workload, its launch, SR and nonce.
    pub fn inner_aad(&self) -> Vec<u8> {
        crate::crypto::lp(&[
            label::DOMKEY_INNER.as_bytes(),
            self.host.as_bytes(),
            self.vm_id.as_bytes(),
            &self.launch_r,
            self.sr.as_bytes(),
            &self.r,
        ])
    }
}

/// DBSP.DomKeyGen response ⟨c3, c4, μ, meta, r⟩, signed by sk_TTP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomKeyResponse {
    /// Host.
    pub host: String,
    /// Workload.
    pub vm_id: String,
    /// SR.
    pub sr: String,
    /// r of the request.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// meta.
    pub meta: Meta,
    /// c3 = Enc_pkTPM(K‖IK).
    #[serde(with = "b64")]
    pub c3: Vec<u8>,
    /// c4 = Enc(K_TTP, n‖SP).
    #[serde(with = "b64")]
    pub c4: Vec<u8>,
    /// μ = MAC(K_TTP, D‖n‖SP).
    #[serde(with = "b64")]
    pub mu: Vec<u8>,
    /// The volume's anchored epoch: the highest epoch an SC reported having opened it at
    /// (0 for a new volume). The SC serves the volume only if its authenticated epoch is
    /// at least this (`--min-epoch`), so storage cannot roll the whole volume back.
    #[serde(default)]
    pub min_epoch: u32,
}

/// The SC's report of the epoch a DBSP volume was opened at (AK-signed, label
/// [`label::EPOCH_REPORT`]); the TTP keeps the highest per volume as its anchor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpochReport {
    /// Host name.
    pub host: String,
    /// The workload the volume is attached to.
    pub vm_id: String,
    /// r of its TL.Request (names the TTP's session).
    #[serde(with = "b64")]
    pub launch_r: Vec<u8>,
    /// Domain D.
    pub domain: String,
    /// Storage resource SR.
    pub sr: String,
    /// The volume's c4 (names the volume instance: a volume created anew gets another).
    #[serde(with = "b64")]
    pub c4: Vec<u8>,
    /// The epoch the Secure Device Proxy opened the volume at.
    pub epoch: u32,
    /// Fresh nonce.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
}

impl DomKeyResponse {
    /// AAD of c3.
    pub fn c3_aad(host: &str, vm_id: &str, sr: &str, r: &[u8]) -> Vec<u8> {
        crate::crypto::lp(&[
            label::C3.as_bytes(),
            host.as_bytes(),
            vm_id.as_bytes(),
            sr.as_bytes(),
            r,
        ])
    }
}

/// The TTP tells a host to drop the keys of its crypto domains (it is no longer trusted).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoke {
    /// Host.
    pub host: String,
    /// Sequence number, strictly increasing per host (the TTP issues
    /// `max(last + 1, now_ms)`): the agent durably refuses a notice whose `seq` is not
    /// above the last one it accepted, so a recorded notice cannot be replayed.
    pub seq: u64,
    /// Time (Unix ms).
    pub t_ms: u64,
    /// Why (verdict reason codes).
    pub reason: String,
}

/// AAD of c2.
pub fn m2_aad(host: &str, r: &[u8]) -> Vec<u8> {
    crate::crypto::lp(&[label::M2.as_bytes(), host.as_bytes(), r])
}

/// Suspend (seed 001 §3.4 "Suspension"): the SC of the host running a launched workload
/// asks the TTP for a fresh state key; AK-signed (σ_AIK over its digest, with a fresh
/// attestation). `docs/suspend-migrate.md`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspendRequest {
    /// The host (as enrolled).
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// r of the launch (names the TTP's session) on this host.
    #[serde(with = "b64")]
    pub launch_r: Vec<u8>,
    /// H2 of the workload's owner.
    pub h2: String,
    /// Fresh nonce.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
}

/// Resume: the SC of a host that is to run a suspended workload asks for the key of the
/// saved state named by (id_vm, H2, counter); AK-signed, with its bind key certified by the
/// AK (the key is sealed to it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// The host (as enrolled).
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// H2 of the workload's owner (from the saved state's header).
    pub h2: String,
    /// The suspend counter of the saved state (from its header).
    pub counter: u64,
    /// pk_TPM with its TPM2_Certify by the AK.
    pub bind: caas_attest::store::BindKeyRecord,
    /// Fresh nonce; it also names the TL session the TTP opens for the resumed workload.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
}

/// The TTP's answer to a suspend or resume: the state key K_s (and, for a resume, the new
/// session's DK_i) sealed to the host's bind key; TTP-signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateKeyGrant {
    /// Host it is for.
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// H2 of the owner.
    pub h2: String,
    /// The suspend counter the key belongs to.
    pub counter: u64,
    /// The workload's security profile.
    pub sp: String,
    /// Its domains (D_vm).
    pub domains: Vec<String>,
    /// r of the request.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// Enc_pkTPM(K_s) (suspend) or Enc_pkTPM(K_s ‖ DK_i) (resume).
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
}

impl StateKeyGrant {
    /// AAD of `sealed`.
    #[must_use]
    pub fn sealed_aad(host: &str, vm_id: &str, counter: u64, r: &[u8]) -> Vec<u8> {
        crate::crypto::lp(&[
            label::STATE_KEY_SEALED.as_bytes(),
            host.as_bytes(),
            vm_id.as_bytes(),
            &counter.to_be_bytes(),
            r,
        ])
    }
}

/// NetKeyReq (`docs/network-sdp.md` §Keys): the SC of a host running a launched workload
/// asks for the current key of network domain `net_domain`; AK-signed (σ_AIK over its
/// digest, with a fresh attestation), its payload `enc` = [`Meta`] {N, SP} under the
/// workload's DK_i, as DBSP's DomKeyReq.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetKeyRequest {
    /// The host (as enrolled).
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// r of the launch (names the TTP's session) on this host.
    #[serde(with = "b64")]
    pub launch_r: Vec<u8>,
    /// H2 of the workload's owner.
    pub h2: String,
    /// The network domain N (in clear for routing and audit; must equal the one in `enc`).
    pub net_domain: String,
    /// Fresh nonce.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
    /// [`Meta`] {N, SP} under DK_i (AES-256-GCM, AAD [`NetKeyRequest::inner_aad`]).
    #[serde(with = "b64")]
    pub enc: Vec<u8>,
}

impl NetKeyRequest {
    /// AAD of `enc`: binds host, workload, its launch, N and the nonce.
    #[must_use]
    pub fn inner_aad(&self) -> Vec<u8> {
        crate::crypto::lp(&[
            label::NETKEY_INNER.as_bytes(),
            self.host.as_bytes(),
            self.vm_id.as_bytes(),
            &self.launch_r,
            self.net_domain.as_bytes(),
            &self.r,
        ])
    }
}

/// NetLeave (`docs/network-sdp.md` §Keys): the SC of a host whose workload stopped or was
/// suspended ends that workload's TL session there, and with it its membership of every
/// network domain (each gets a new epoch the session is never given). AK-signed (fresh
/// attestation); `enc` proves DK_i of the session (AES-256-GCM of [`label::NETLEAVE_INNER`]
/// under DK_i, AAD [`NetLeaveRequest::inner_aad`]): only the session's own host, holding its
/// DK_i, ends it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetLeaveRequest {
    /// The host (as enrolled).
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// r of the launch (names the TTP's session) on this host.
    #[serde(with = "b64")]
    pub launch_r: Vec<u8>,
    /// H2 of the workload's owner.
    pub h2: String,
    /// Why (`stopped`, `suspended`; audited, at most 64 characters).
    pub why: String,
    /// Fresh nonce.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// SC's time (Unix ms).
    pub t_ms: u64,
    /// The proof of DK_i.
    #[serde(with = "b64")]
    pub enc: Vec<u8>,
}

impl NetLeaveRequest {
    /// AAD of `enc`: binds host, workload, its launch, the reason and the nonce.
    #[must_use]
    pub fn inner_aad(&self) -> Vec<u8> {
        crate::crypto::lp(&[
            label::NETLEAVE_INNER.as_bytes(),
            self.host.as_bytes(),
            self.vm_id.as_bytes(),
            &self.launch_r,
            self.why.as_bytes(),
            &self.r,
        ])
    }
}

/// The TTP's answer to a [`NetLeaveRequest`] (label [`label::NETLEAVE_ACK`]): the session is
/// retired; the network domains that got a new epoch because of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetLeft {
    /// Host.
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// r of the request.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// The network domains rekeyed (or marked to rekey at their next request).
    pub rekeyed: Vec<String>,
}

/// The TTP's answer to a NetKeyReq: K_{N,e} sealed to the session's bind key; TTP-signed
/// (label [`label::NETKEY_GRANT`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetKeyGrant {
    /// Host it is for.
    pub host: String,
    /// id_vm.
    pub vm_id: String,
    /// The network domain N.
    pub net_domain: String,
    /// The key's epoch e (strictly increasing per N).
    pub epoch: u64,
    /// When the TTP rekeys N at the latest (Unix ms): fetch again before.
    pub rekey_at_ms: u64,
    /// r of the request.
    #[serde(with = "b64")]
    pub r: Vec<u8>,
    /// Enc_pkTPM(K_{N,e}) (32 bytes).
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
}

impl NetKeyGrant {
    /// AAD of `sealed`.
    #[must_use]
    pub fn sealed_aad(host: &str, vm_id: &str, net_domain: &str, epoch: u64, r: &[u8]) -> Vec<u8> {
        crate::crypto::lp(&[
            label::NETKEY_SEALED.as_bytes(),
            host.as_bytes(),
            vm_id.as_bytes(),
            net_domain.as_bytes(),
            &epoch.to_be_bytes(),
            r,
        ])
    }
}

/// Checks a timestamp against `now_ms` and the freshness window.
pub fn check_fresh(t_ms: u64, now_ms: u64) -> Result<()> {
    if t_ms.abs_diff(now_ms) > FRESHNESS_MS {
        return Err(Error::rejected(
            "stale_message",
            "timestamp outside the 5-minute freshness window",
        ));
    }
    Ok(())
}

/// Serde helper for optional base64 fields.
pub mod opt_b64 {
    /// Serialises.
    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&caas_attest::b64::encode(b)),
            None => s.serialize_none(),
        }
    }
    /// Deserialises.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let v: Option<String> = serde::Deserialize::deserialize(d)?;
        v.map(|s| caas_attest::b64::decode(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Checks a name-like field (`[A-Za-z0-9._-]{1,64}`).
pub fn check_name(what: &'static str, v: &str) -> Result<()> {
    if caas_attest::registrar::valid_name(v) {
        Ok(())
    } else {
        Err(Error::malformed(what, "must match [A-Za-z0-9._-]{1,64}"))
    }
}
