//! The secure component's (SC, the host agent's) checks of TL and DBSP, without the TPM:
//! the agent does the TPM steps (quote, bind-key decryption) and calls these for everything
//! else. Seed 003 §4.3: "SC verifies message integrity and TL.Token freshness by checking
//! respectively the signature σ_DM and nonce r"; after unsealing m2, "SC calculates the
//! hash (H1') of the VM image … verifies that its identifier matches … H1 = H1' … H2 = H2'".
use crate::crypto::{TtpPublic, ct_eq, lp, random32, sha256, split_bind_sealed};
use crate::error::{Error, Result};
use crate::wire::{
    self, Attestation, DomKeyInner, DomKeyRequest, DomKeyResponse, LaunchCall, LaunchRequest, M2,
    Meta, Revoke, Signed, check_fresh, check_name, label,
};
use caas_crypto::SecretKey;
use std::collections::HashMap;
use std::sync::Mutex;

/// Step 1 on the host: σ_DM and freshness of TL.Request. Returns the request.
pub fn verify_launch(call: &LaunchCall, now_ms: u64) -> Result<LaunchRequest> {
    check_name("vm_id", &call.vm_id)?;
    check_name("image_id", &call.image_id)?;
    let claimed: LaunchRequest = call.request.peek(label::LAUNCH_REQUEST)?;
    if claimed.pk_dm.len() != 32 {
        return Err(Error::malformed(
            "pk_DM",
            "Ed25519 public keys are 32 bytes",
        ));
    }
    let req: LaunchRequest = call.request.open(&claimed.pk_dm, label::LAUNCH_REQUEST)?;
    check_fresh(req.t_ms, now_ms)?;
    if req.r.len() != 32 {
        return Err(Error::malformed("r", "nonces are 32 bytes"));
    }
    Ok(req)
}

/// A host-local replay cache of nonces within the freshness window (the TTP keeps the
/// durable record; this refuses a replay before any TPM work).
#[derive(Debug, Default)]
pub struct ReplayCache(Mutex<HashMap<Vec<u8>, u64>>);

impl ReplayCache {
    /// Records `r`; refuses one seen within the window.
    pub fn check(&self, r: &[u8], now_ms: u64) -> Result<()> {
        let mut m = self
            .0
            .lock()
            .map_err(|_| Error::Storage("replay cache poisoned".into()))?;
        m.retain(|_, t| now_ms.saturating_sub(*t) <= 2 * wire::FRESHNESS_MS);
        if m.contains_key(r) {
            return Err(Error::rejected(
                "nonce_replayed",
                "this launch request was already seen",
            ));
        }
        m.insert(r.to_vec(), now_ms);
        Ok(())
    }
}

/// Verifies TL.Attestation (σ_TTP, host, r); returns the RSA part of c2 (for the TPM) and
/// the rest.
pub fn check_attestation(
    resp: &Signed,
    ttp: &TtpPublic,
    host: &str,
    r: &[u8],
) -> Result<Attestation> {
    let a: Attestation = resp.open(&ttp.sign, label::ATTESTATION)?;
    if a.host != host || !ct_eq(&a.r, r) {
        return Err(Error::rejected(
            "nonce_mismatch",
            "the attestation answers another request",
        ));
    }
    split_bind_sealed(&a.c2)?;
    Ok(a)
}

/// Opens m2 with the key the TPM released from c2's RSA part.
pub fn open_m2(tpm_key: &[u8], att: &Attestation) -> Result<M2> {
    let (_, body) = split_bind_sealed(&att.c2)?;
    let plain = crate::crypto::open_bind_sealed(tpm_key, &wire::m2_aad(&att.host, &att.r), body)?;
    let m2: M2 = wire::parse("m2", plain.expose())?;
    if m2.tau.len() != 32 || m2.dk.len() != 32 {
        return Err(Error::malformed("m2", "τ and DK are 32 bytes"));
    }
    Ok(m2)
}

/// The SC's final TL checks: id_vm, H1 = H1' (SHA-256 of the image as supplied), H2 = H2'
/// (SHA-256 of pk_DM as supplied by the cloud provider).
pub fn check_m2(m2: &M2, vm_id: &str, image_sha256: &[u8; 32], pk_dm: &[u8]) -> Result<()> {
    if m2.vm_id != vm_id {
        return Err(Error::rejected(
            "vm_id_mismatch",
            "the token is for another workload",
        ));
    }
    if !ct_eq(m2.h1.as_bytes(), hex::encode(image_sha256).as_bytes()) {
        return Err(Error::rejected(
            "h1_mismatch",
            "the workload image is not the one the domain manager launched",
        ));
    }
    if !ct_eq(m2.h2.as_bytes(), hex::encode(sha256(pk_dm)).as_bytes()) {
        return Err(Error::rejected(
            "h2_mismatch",
            "pk_DM was replaced: it is not the key the domain manager registered",
        ));
    }
    Ok(())
}

/// The crypto-domain configuration belongs to the launch: its owner is the DM the TTP
/// vouched for in m2 (`owner_mismatch` otherwise — another DM, or the scheduler with a DM
/// key of its own, launching someone else's image) and it was made for the encrypted image
/// being launched (`config_tampered` — a stale configuration of an older upload).
pub fn check_config(cfg: &crate::dm::DomcConfig, m2: &M2, image_sha256: &[u8; 32]) -> Result<()> {
    if !ct_eq(cfg.owner_h2.as_bytes(), m2.h2.as_bytes()) {
        return Err(Error::rejected(
            "owner_mismatch",
            "the image belongs to another domain manager",
        ));
    }
    if !ct_eq(
        cfg.image_h1.as_bytes(),
        hex::encode(image_sha256).as_bytes(),
    ) {
        return Err(Error::rejected(
            "config_tampered",
            "the crypto-domain configuration was made for another upload of the image",
        ));
    }
    Ok(())
}

/// Builds a DBSP.DomKeyReq body (to be AK-signed by a quote over its digest). `header` is
/// (c4, μ) from an existing domain header; `launch_r` is the r of the workload's TL.Request
/// (it names the TTP's session).
#[allow(clippy::too_many_arguments)]
pub fn domkey_request(
    host: &str,
    vm_id: &str,
    launch_r: &[u8],
    sr: &str,
    h2: &str,
    dk: &[u8],
    meta: Meta,
    header: Option<(Vec<u8>, Vec<u8>)>,
    now_ms: u64,
) -> Result<DomKeyRequest> {
    check_name("sr", sr)?;
    let dk = SecretKey::from_slice(dk).map_err(|_| Error::malformed("DK", "32 bytes"))?;
    let (c4, mu) = match header {
        Some((c4, mu)) => (Some(c4), Some(mu)),
        None => (None, None),
    };
    let inner = DomKeyInner { meta, c4, mu };
    let mut req = DomKeyRequest {
        host: host.into(),
        vm_id: vm_id.into(),
        sr: sr.into(),
        h2: h2.into(),
        launch_r: launch_r.to_vec(),
        r: random32()?.to_vec(),
        t_ms: now_ms,
        enc: Vec::new(),
    };
    req.enc = caas_crypto::aead::seal(&dk, &req.inner_aad(), &wire::to_bytes(&inner))?;
    Ok(req)
}

/// Builds a NetKeyReq body for network domain `net_domain` ([`crate::wire::NetKeyRequest`];
/// the agent quotes over it with its AK). `dk`: the workload's DK_i; `sp`: its profile.
#[allow(clippy::too_many_arguments)]
pub fn netkey_request(
    host: &str,
    vm_id: &str,
    launch_r: &[u8],
    h2: &str,
    dk: &[u8],
    net_domain: &str,
    sp: &str,
    now_ms: u64,
) -> Result<crate::wire::NetKeyRequest> {
    check_name("net_domain", net_domain)?;
    let dk = SecretKey::from_slice(dk).map_err(|_| Error::malformed("DK", "32 bytes"))?;
    let mut req = crate::wire::NetKeyRequest {
        host: host.into(),
        vm_id: vm_id.into(),
        launch_r: launch_r.to_vec(),
        h2: h2.into(),
        net_domain: net_domain.into(),
        r: random32()?.to_vec(),
        t_ms: now_ms,
        enc: Vec::new(),
    };
    let meta = Meta {
        domain: net_domain.into(),
        sp: sp.into(),
    };
    req.enc = caas_crypto::aead::seal(&dk, &req.inner_aad(), &wire::to_bytes(&meta))?;
    Ok(req)
}

/// NetLeave (`docs/network-sdp.md` §Keys): ends the workload's TL session on this host
/// (its VM stopped or was suspended) — its network domains get a new epoch. `enc` proves
/// DK_i. `why`: `stopped`, `suspended`.
///
/// # Errors
/// A DK_i that is not 32 bytes; no randomness.
pub fn netleave_request(
    host: &str,
    vm_id: &str,
    launch_r: &[u8],
    h2: &str,
    dk: &[u8],
    why: &str,
    now_ms: u64,
) -> Result<crate::wire::NetLeaveRequest> {
    let dk = SecretKey::from_slice(dk).map_err(|_| Error::malformed("DK", "32 bytes"))?;
    let mut req = crate::wire::NetLeaveRequest {
        host: host.into(),
        vm_id: vm_id.into(),
        launch_r: launch_r.to_vec(),
        h2: h2.into(),
        why: why.into(),
        r: random32()?.to_vec(),
        t_ms: now_ms,
        enc: Vec::new(),
    };
    req.enc = caas_crypto::aead::seal(&dk, &req.inner_aad(), label::NETLEAVE_INNER.as_bytes())?;
    Ok(req)
}

/// Checks the TTP's answer to a leave (σ_TTP, and that it answers `req`).
///
/// # Errors
/// A bad signature or an answer to another request (`nonce_mismatch`).
pub fn check_netleave_ack(
    resp: &Signed,
    ttp: &TtpPublic,
    req: &crate::wire::NetLeaveRequest,
) -> Result<crate::wire::NetLeft> {
    let l: crate::wire::NetLeft = resp.open(&ttp.sign, label::NETLEAVE_ACK)?;
    if l.host != req.host || l.vm_id != req.vm_id || !ct_eq(&l.r, &req.r) {
        return Err(Error::rejected(
            "nonce_mismatch",
            "the answer is to another request",
        ));
    }
    Ok(l)
}

/// Checks the TTP's network key grant (σ_TTP, and that it answers `req`).
pub fn check_netkey_grant(
    resp: &Signed,
    ttp: &TtpPublic,
    req: &crate::wire::NetKeyRequest,
) -> Result<crate::wire::NetKeyGrant> {
    let g: crate::wire::NetKeyGrant = resp.open(&ttp.sign, label::NETKEY_GRANT)?;
    if g.host != req.host
        || g.vm_id != req.vm_id
        || g.net_domain != req.net_domain
        || !ct_eq(&g.r, &req.r)
    {
        return Err(Error::rejected(
            "nonce_mismatch",
            "the grant answers another request",
        ));
    }
    split_bind_sealed(&g.sealed)?;
    Ok(g)
}

/// Opens a network key grant: `tpm_key` is what the TPM's bind key decrypted of the
/// RSA-OAEP part of `g.sealed`. Returns K_{N,e}.
pub fn open_netkey(tpm_key: &[u8], g: &crate::wire::NetKeyGrant) -> Result<SecretKey> {
    let (_, body) = split_bind_sealed(&g.sealed)?;
    let plain = crate::crypto::open_bind_sealed(
        tpm_key,
        &crate::wire::NetKeyGrant::sealed_aad(&g.host, &g.vm_id, &g.net_domain, g.epoch, &g.r),
        body,
    )?;
    SecretKey::from_slice(plain.expose()).map_err(|_| Error::malformed("network key", "32 bytes"))
}

/// Verifies the DomKeyGen response against the request.
pub fn check_domkey_response(
    resp: &Signed,
    ttp: &TtpPublic,
    req: &DomKeyRequest,
) -> Result<DomKeyResponse> {
    let d: DomKeyResponse = resp.open(&ttp.sign, label::DOMKEY_RESPONSE)?;
    if d.host != req.host || d.vm_id != req.vm_id || d.sr != req.sr || !ct_eq(&d.r, &req.r) {
        return Err(Error::rejected(
            "nonce_mismatch",
            "the response answers another request",
        ));
    }
    split_bind_sealed(&d.c3)?;
    Ok(d)
}

/// Checks the TTP's state-key grant (σ_TTP, and that it answers this host's request for
/// `vm_id` with nonce `r`).
pub fn check_state_grant(
    resp: &Signed,
    ttp: &TtpPublic,
    host: &str,
    vm_id: &str,
    r: &[u8],
) -> Result<crate::wire::StateKeyGrant> {
    let g: crate::wire::StateKeyGrant = resp.open(&ttp.sign, label::STATE_KEY)?;
    if g.host != host || g.vm_id != vm_id || !ct_eq(&g.r, r) {
        return Err(Error::rejected(
            "nonce_mismatch",
            "the grant answers another request",
        ));
    }
    split_bind_sealed(&g.sealed)?;
    Ok(g)
}

/// Opens a state-key grant with the key the TPM released: K_s, and for a resume the new
/// session's DK_i.
pub fn open_state_grant(
    tpm_key: &[u8],
    g: &crate::wire::StateKeyGrant,
) -> Result<(SecretKey, Option<SecretKey>)> {
    let (_, body) = split_bind_sealed(&g.sealed)?;
    let plain = crate::crypto::open_bind_sealed(
        tpm_key,
        &crate::wire::StateKeyGrant::sealed_aad(&g.host, &g.vm_id, g.counter, &g.r),
        body,
    )?;
    let b = plain.expose();
    let k_s = SecretKey::from_slice(&b[..b.len().min(32)]).map_err(|_| Error::Crypto("K_s"))?;
    match b.len() {
        32 => Ok((k_s, None)),
        64 => Ok((
            k_s,
            Some(SecretKey::from_slice(&b[32..]).map_err(|_| Error::Crypto("DK"))?),
        )),
        _ => Err(Error::malformed(
            "state key",
            "K_s[‖DK_i] is 32 or 64 bytes",
        )),
    }
}

/// Opens c3 with the key the TPM released; returns (K, IK).
pub fn open_c3(tpm_key: &[u8], d: &DomKeyResponse) -> Result<(SecretKey, SecretKey)> {
    let (_, body) = split_bind_sealed(&d.c3)?;
    let plain = crate::crypto::open_bind_sealed(
        tpm_key,
        &DomKeyResponse::c3_aad(&d.host, &d.vm_id, &d.sr, &d.r),
        body,
    )?;
    let b = plain.expose();
    if b.len() != 64 {
        return Err(Error::malformed("c3", "K‖IK is 64 bytes"));
    }
    Ok((
        SecretKey::from_slice(&b[..32]).map_err(|_| Error::Crypto("K"))?,
        SecretKey::from_slice(&b[32..]).map_err(|_| Error::Crypto("IK"))?,
    ))
}

/// The key the disk encryption subsystem (the Secure Device Proxy's AES-256-GCM volume
/// format) uses for a DBSP domain: both K and IK are its inputs (the AEAD gives integrity
/// under one key, so IK is mixed in through the KDF rather than used for a separate MAC).
pub fn volume_key(k: &SecretKey, ik: &SecretKey, domain: &str, sr: &str) -> Result<SecretKey> {
    Ok(caas_crypto::kdf::derive_key(
        k.expose(),
        b"caas-tl dbsp volume key v1",
        &lp(&[ik.expose(), domain.as_bytes(), sr.as_bytes()]),
    )?)
}

/// Verifies a revocation notice from the TTP: σ_TTP, the host, a sequence number above
/// `last_seq` (the highest this host accepted; `revoke_replayed` otherwise) and freshness.
/// The caller records the accepted `seq` durably before acting on the notice.
pub fn check_revoke(
    notice: &Signed,
    ttp: &TtpPublic,
    host: &str,
    last_seq: u64,
    now_ms: u64,
) -> Result<Revoke> {
    let r: Revoke = notice.open(&ttp.sign, label::REVOKE)?;
    if r.host != host {
        return Err(Error::rejected(
            "wrong_host",
            "the notice is for another host",
        ));
    }
    if r.seq <= last_seq {
        return Err(Error::rejected(
            "revoke_replayed",
            "this revocation (or a later one) was already applied",
        ));
    }
    check_fresh(r.t_ms, now_ms)?;
    Ok(r)
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn m2(vm: &str, image: &[u8; 32], pk: &[u8]) -> M2 {
        M2 {
            tau: vec![1; 32],
            h1: hex::encode(image),
            h2: hex::encode(sha256(pk)),
            dk: vec![2; 32],
            vm_id: vm.into(),
        }
    }

    #[test]
    fn m2_checks_name_the_failing_element() {
        let (img, pk) = ([7u8; 32], [9u8; 32]);
        let m = m2("vm1", &img, &pk);
        assert!(check_m2(&m, "vm1", &img, &pk).is_ok());
        let code = |r: Result<()>| r.err().map(|e| e.code()).unwrap_or("ok");
        assert_eq!(code(check_m2(&m, "vm2", &img, &pk)), "vm_id_mismatch");
        assert_eq!(code(check_m2(&m, "vm1", &[8u8; 32], &pk)), "h1_mismatch");
        assert_eq!(code(check_m2(&m, "vm1", &img, &[0u8; 32])), "h2_mismatch");
    }

    fn cfg(owner: &str, h1: &[u8; 32]) -> crate::dm::DomcConfig {
        crate::dm::DomcConfig {
            image_id: "img".into(),
            owner_h2: owner.into(),
            image_h1: hex::encode(h1),
            image_key: vec![3; 32],
            token_label: "t".into(),
            user_pin: "u".into(),
            so_pin: "s".into(),
        }
    }

    #[test]
    fn configuration_opens_only_for_its_owner_and_its_upload() {
        let (img, pk, other_pk) = ([7u8; 32], [9u8; 32], [10u8; 32]);
        let owner = hex::encode(sha256(&pk));
        let code = |r: Result<()>| r.err().map(|e| e.code()).unwrap_or("ok");
        // The owner's launch: m2 (from the TTP) names the owner.
        assert_eq!(
            code(check_config(
                &cfg(&owner, &img),
                &m2("vm1", &img, &pk),
                &img
            )),
            "ok"
        );
        // Another DM's launch of the same image: its m2 carries its own H2.
        assert_eq!(
            code(check_config(
                &cfg(&owner, &img),
                &m2("vm1", &img, &other_pk),
                &img
            )),
            "owner_mismatch"
        );
        // A stale configuration of an older upload of the image.
        assert_eq!(
            code(check_config(
                &cfg(&owner, &[1u8; 32]),
                &m2("vm1", &img, &pk),
                &img
            )),
            "config_tampered"
        );
    }

    #[test]
    fn sealed_configuration_names_its_owner_in_clear_aad_and_plaintext() {
        let key = [5u8; 32];
        let (pk, other_pk) = ([9u8; 32], [10u8; 32]);
        let owner = hex::encode(sha256(&pk));
        let other = hex::encode(sha256(&other_pk));
        // The envelope as `seal_domc_config` builds it, with a known AES key standing in
        // for the RSA part the TPM would open.
        let seal = |clear_owner: &str, aad_owner: &str, inner_owner: &str| {
            let c = cfg(inner_owner, &[7u8; 32]);
            let k = SecretKey::from_slice(&key).expect("key");
            let body = caas_crypto::aead::seal(
                &k,
                &crate::dm::domc_config_aad("h", "img", aad_owner),
                &wire::to_bytes(&c),
            )
            .expect("seal");
            lp(&[
                label::DOMC_CONFIG.as_bytes(),
                clear_owner.as_bytes(),
                &lp(&[b"rsa", &body]),
            ])
        };
        let open = |sealed: &[u8], h2: &str| {
            crate::dm::open_domc_config(&key, "h", "img", h2, sealed)
                .err()
                .map(|e| e.code())
                .unwrap_or("ok")
        };
        let good = seal(&owner, &owner, &owner);
        assert_eq!(open(&good, &owner), "ok");
        assert_eq!(
            crate::dm::SealedDomc::parse(&good).expect("parse").owner_h2,
            owner
        );
        // Another DM: refused by name before any decryption.
        assert_eq!(open(&good, &other), "owner_mismatch");
        // Storage rewrites the clear owner: the AAD no longer matches.
        let relabelled = {
            let mut b = good.clone();
            let at = 4 + label::DOMC_CONFIG.len() + 4;
            b[at..at + 64].copy_from_slice(other.as_bytes());
            b
        };
        assert_eq!(open(&relabelled, &other), "config_tampered");
        // A configuration whose plaintext names another owner than its AAD.
        assert_eq!(
            open(&seal(&owner, &owner, &other), &owner),
            "config_tampered"
        );
        // v1 configurations (no envelope) are refused, not misread.
        assert_eq!(open(&lp(&[b"rsa", b"body"]), &owner), "config_tampered");
    }

    #[tokio::test]
    async fn revocations_carry_increasing_sequence_numbers_and_replays_are_refused() {
        let store = std::sync::Arc::new(caas_attest::store::MemoryStore::new());
        let keys = crate::TtpKeys::generate().expect("ttp");
        let ttp = crate::ttp::Ttp::new(store.clone(), keys);
        let pk = ttp.public().expect("pk");
        let now = 1_000_000;
        let first = ttp.revoke_notice("host-1", "pcr 7", now).await.expect("n1");
        let r1 = check_revoke(&first, &pk, "host-1", 0, now).expect("accepted");
        // The same notice again: refused whatever the freshness window says.
        assert_eq!(
            check_revoke(&first, &pk, "host-1", r1.seq, now)
                .err()
                .map(|e| e.code()),
            Some("revoke_replayed")
        );
        // A later notice at the same millisecond still gets a higher number.
        let second = ttp.revoke_notice("host-1", "pcr 7", now).await.expect("n2");
        let r2 = check_revoke(&second, &pk, "host-1", r1.seq, now).expect("accepted");
        assert!(r2.seq > r1.seq);
        assert_eq!(
            check_revoke(&first, &pk, "host-1", r2.seq, now)
                .err()
                .map(|e| e.code()),
            Some("revoke_replayed")
        );
        assert_eq!(
            check_revoke(&second, &pk, "host-2", 0, now)
                .err()
                .map(|e| e.code()),
            Some("wrong_host")
        );
        // Every notice is in the TTP's audit trail with its number.
        let audit = store.audit_trail();
        let revokes: Vec<_> = audit
            .iter()
            .filter(|a| a.operation == "TlRevoke" && a.subject == "host-1")
            .collect();
        assert_eq!(revokes.len(), 2);
        assert!(revokes[1].detail.contains(&r2.seq.to_string()));
    }

    #[test]
    fn replay_cache_refuses_a_nonce_twice_within_the_window() {
        let c = ReplayCache::default();
        assert!(c.check(b"r1", 1_000).is_ok());
        assert_eq!(
            c.check(b"r1", 2_000).err().map(|e| e.code()),
            Some("nonce_replayed")
        );
        assert!(c.check(b"r2", 2_000).is_ok());
    }

    #[test]
    fn launch_requests_are_verified_and_fresh() {
        let doc = crate::crypto::ed25519_generate().expect("key");
        let dm = crate::dm::DomainManager::from_pkcs8(doc.expose()).expect("dm");
        let keys = crate::TtpKeys::generate().expect("ttp");
        let now = 10_000_000;
        let t = dm
            .token(
                &keys.public().expect("pk"),
                &[1; 32],
                "dev",
                "vm1",
                &[],
                now,
            )
            .expect("token");
        let call = LaunchCall {
            request: t.request.clone(),
            vm_id: "vm1".into(),
            image_id: "img".into(),
            driver: None,
            volumes: vec![],
            network: false,
            net: None,
        };
        assert!(verify_launch(&call, now).is_ok());
        let stale = verify_launch(&call, now + wire::FRESHNESS_MS + 1);
        assert_eq!(stale.err().map(|e| e.code()), Some("stale_message"));
        let mut forged = call.clone();
        forged.request.body[5] ^= 1;
        assert!(verify_launch(&forged, now).is_err());
        let mut bad_name = call;
        bad_name.vm_id = "../etc".into();
        assert_eq!(
            verify_launch(&bad_name, now).err().map(|e| e.code()),
            Some("malformed")
        );
        // The TTP (and only it) opens c1 and finds τ, H2 = hash(pk_DM).
        let lr: LaunchRequest = t.request.peek(label::LAUNCH_REQUEST).expect("peek");
        let m1 = keys.open(label::M1.as_bytes(), &lr.c1).expect("open c1");
        let m1: wire::M1 = wire::parse("m1", m1.expose()).expect("m1");
        assert_eq!(m1.tau, t.tau.expose());
        assert_eq!(m1.h2, dm.h2());
    }
}
