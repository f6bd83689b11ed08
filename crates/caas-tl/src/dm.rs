//! The domain manager (DM, the tenant): TL.Setup (its Ed25519 key pair), TL.Token and the
//! signed TL.Request (seed 003 §4.3), and the client side of encrypted provisioning (seed
//! 001 Algorithm 1): validating a host's certified binding key and sealing the
//! crypto-domain configuration (with the image key k injected) to it.
use crate::crypto::{
    TtpPublic, ed25519_from_pkcs8, ed25519_public, policy_pcr_digest, random32, seal_to_bind_key,
    seal_to_ttp, sha256,
};
use crate::error::{Error, Result};
use crate::wire::{self, LaunchRequest, M1, Signed, check_name, label};
use aws_lc_rs::signature::Ed25519KeyPair;
use caas_attest::structures::{PcrSelection, Public};
use caas_crypto::{SecretBytes, SecretKey};
use std::collections::BTreeMap;

/// A domain manager's key pair.
pub struct DomainManager {
    kp: Ed25519KeyPair,
}

impl std::fmt::Debug for DomainManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainManager")
            .field("h2", &self.h2())
            .finish_non_exhaustive()
    }
}

/// What the DM keeps after creating a token: τ (for the PSK channel) and r.
pub struct Token {
    /// τ.
    pub tau: SecretBytes,
    /// r.
    pub r: Vec<u8>,
    /// The signed TL.Request to hand to the scheduler.
    pub request: Signed,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").finish_non_exhaustive()
    }
}

impl DomainManager {
    /// From a PKCS#8 Ed25519 document.
    pub fn from_pkcs8(doc: &[u8]) -> Result<Self> {
        Ok(Self {
            kp: ed25519_from_pkcs8(doc)?,
        })
    }

    /// The key pair (for the PSK-channel challenge signature).
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.kp
    }

    /// pk_DM.
    pub fn public(&self) -> Vec<u8> {
        ed25519_public(&self.kp)
    }

    /// H2 = SHA-256(pk_DM), hex.
    pub fn h2(&self) -> String {
        hex::encode(sha256(&self.public()))
    }

    /// TL.Token plus the signed TL.Request ⟨c1, SP, pk_DM, r⟩.
    pub fn token(
        &self,
        ttp: &TtpPublic,
        image_sha256: &[u8; 32],
        sp: &str,
        vm_id: &str,
        domains: &[String],
        now_ms: u64,
    ) -> Result<Token> {
        check_name("vm_id", vm_id)?;
        check_name("sp", sp)?;
        for d in domains {
            check_name("domain", d)?;
        }
        let tau = SecretBytes::new(random32()?.to_vec());
        let m1 = M1 {
            tau: tau.expose().to_vec(),
            h1: hex::encode(image_sha256),
            h2: self.h2(),
            sp: sp.into(),
            vm_id: vm_id.into(),
            domains: domains.to_vec(),
        };
        let m1_bytes = SecretBytes::new(wire::to_bytes(&m1));
        drop(m1);
        let c1 = seal_to_ttp(&ttp.encrypt, label::M1.as_bytes(), m1_bytes.expose())?;
        let r = random32()?.to_vec();
        let req = LaunchRequest {
            c1,
            sp: sp.into(),
            pk_dm: self.public(),
            r: r.clone(),
            t_ms: now_ms,
        };
        Ok(Token {
            tau,
            r,
            request: Signed::sign(&self.kp, label::LAUNCH_REQUEST, &req),
        })
    }
}

/// The crypto-domain configuration of seed 001 Algorithm 1 ("CreateCustomDomCImage",
/// "InjectKey(domCimage, k)"): the image key k and the VSM token's initial PINs.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DomcConfig {
    /// Image id it belongs to.
    pub image_id: String,
    /// k: the key the workload image is encrypted under.
    #[serde(with = "caas_attest::b64")]
    pub image_key: Vec<u8>,
    /// VSM token label.
    pub token_label: String,
    /// VSM user PIN.
    pub user_pin: String,
    /// VSM SO PIN.
    pub so_pin: String,
}

impl std::fmt::Debug for DomcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomcConfig")
            .field("image_id", &self.image_id)
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

impl Drop for DomcConfig {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.image_key);
        zeroize::Zeroize::zeroize(&mut self.user_pin);
        zeroize::Zeroize::zeroize(&mut self.so_pin);
    }
}

impl DomcConfig {
    /// k as a key.
    pub fn key(&self) -> Result<SecretKey> {
        SecretKey::from_slice(&self.image_key)
            .map_err(|_| Error::malformed("domc config", "k is 32 bytes"))
    }
}

/// What the TTP publishes about a host for Algorithm 1 line 1: `(cert, pk_TPM)` — the AK
/// (certified by the key service's Privacy CA at enrollment), the bind key and its
/// TPM2_Certify by the AK, and the PCR values of its latest trusted attestation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostBindInfo {
    /// Host.
    pub host: String,
    /// Its security profile.
    pub profile: String,
    /// AK TPM2B_PUBLIC.
    #[serde(with = "caas_attest::b64")]
    pub ak_public: Vec<u8>,
    /// Bind key and certification.
    pub bind: caas_attest::store::BindKeyRecord,
    /// PCR selection of the profile.
    pub selection: PcrSelection,
    /// Trusted PCR values (hex) by index.
    pub pcrs: BTreeMap<u32, String>,
}

/// Algorithm 1 line 2, `Validate(cert, pk_TPM)`: the bind key is certified by the host's AK
/// as a non-duplicable, policy-bound decrypt key, and its policy is PolicyPCR over the
/// trusted PCR values of the host's profile. Returns the bind key's TPM2B_PUBLIC.
pub fn validate_bind_key(info: &HostBindInfo) -> Result<Vec<u8>> {
    let ak = Public::parse_tpm2b(&info.ak_public)?;
    caas_attest::registrar::check_ak_attributes(&ak)?;
    let bind = caas_attest::registrar::check_bind_key(&ak, &info.bind)?;
    let mut values = Vec::new();
    for p in &info.selection.pcrs {
        values.push(
            info.pcrs
                .get(p)
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| {
                    Error::rejected("bind_key_not_bound", "trusted PCR values missing")
                })?,
        );
    }
    if !crate::crypto::ct_eq(
        &bind.auth_policy,
        &policy_pcr_digest(&info.selection, &values),
    ) {
        return Err(Error::rejected(
            "bind_key_not_bound",
            "the host's bind key is not bound to its trusted state",
        ));
    }
    Ok(info.bind.public.clone())
}

/// Algorithm 1 line 7, `Encrypt(domCimage, pk_TPM)`: seals the configuration to a
/// validated bind key.
pub fn seal_domc_config(bind_public: &[u8], host: &str, cfg: &DomcConfig) -> Result<Vec<u8>> {
    let plain = SecretBytes::new(wire::to_bytes(cfg));
    seal_to_bind_key(
        bind_public,
        &domc_config_aad(host, &cfg.image_id),
        plain.expose(),
    )
}

/// AAD of a sealed crypto-domain configuration.
pub fn domc_config_aad(host: &str, image_id: &str) -> Vec<u8> {
    crate::crypto::lp(&[
        label::DOMC_CONFIG.as_bytes(),
        host.as_bytes(),
        image_id.as_bytes(),
    ])
}

/// Opens a sealed configuration with the key the TPM released from its RSA part.
pub fn open_domc_config(
    tpm_key: &[u8],
    host: &str,
    image_id: &str,
    sealed: &[u8],
) -> Result<DomcConfig> {
    let (_, body) = crate::crypto::split_bind_sealed(sealed)?;
    let plain = crate::crypto::open_bind_sealed(tpm_key, &domc_config_aad(host, image_id), body)
        .map_err(|_| {
            Error::rejected(
                "config_tampered",
                "the crypto-domain configuration was altered",
            )
        })?;
    let cfg: DomcConfig = wire::parse("domc config", plain.expose())?;
    if cfg.image_id != image_id || cfg.image_key.len() != 32 {
        return Err(Error::rejected(
            "config_tampered",
            "the configuration is for another image",
        ));
    }
    Ok(cfg)
}
