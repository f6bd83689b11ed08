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

/// Builds a DBSP.DomKeyReq body (to be AK-signed by a quote over its digest). `header` is
/// (c4, μ) from an existing domain header.
#[allow(clippy::too_many_arguments)]
pub fn domkey_request(
    host: &str,
    vm_id: &str,
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
        r: random32()?.to_vec(),
        t_ms: now_ms,
        enc: Vec::new(),
    };
    req.enc = caas_crypto::aead::seal(&dk, &req.inner_aad(), &wire::to_bytes(&inner))?;
    Ok(req)
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

/// Verifies a revocation notice from the TTP.
pub fn check_revoke(notice: &Signed, ttp: &TtpPublic, host: &str, now_ms: u64) -> Result<Revoke> {
    let r: Revoke = notice.open(&ttp.sign, label::REVOKE)?;
    if r.host != host {
        return Err(Error::rejected(
            "wrong_host",
            "the notice is for another host",
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
