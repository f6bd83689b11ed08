//! The domain manager (DM, the tenant): TL.Setup (its Ed25519 key pair), TL.Token and the
//! signed TL.Request (seed 003 §4.3), and the client side of encrypted provisioning (seed
//! 001 Algorithm 1): validating a host's certified binding key and sealing the
//! crypto-domain configuration (with the image key k injected, bound to the owner's H2 and
//! the image's H1) to it.
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

    /// A signed ACL change (fresh nonce, `now_ms`): `PUT /v1/tl/acl` with this as the body.
    pub fn acl_update(
        &self,
        label_text: &str,
        domains: &[String],
        now_ms: u64,
    ) -> Result<crate::wire::Signed> {
        let update = crate::wire::AclUpdate {
            pk_dm: self.public(),
            label: label_text.into(),
            domains: domains.to_vec(),
            nonce: caas_crypto::random_bytes(32)?,
            time_ms: now_ms,
        };
        Ok(crate::wire::Signed::sign(
            &self.kp,
            crate::wire::label::ACL_UPDATE,
            &update,
        ))
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
/// "InjectKey(domCimage, k)"): the image key k and the VSM token's initial PINs, bound to
/// the domain manager that owns the image (H2) and to the encrypted image it opens (H1).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DomcConfig {
    /// Image id it belongs to.
    pub image_id: String,
    /// H2 of the owner (hex SHA-256 of its pk_DM): the secure component releases k only to
    /// a launch whose TTP-issued m2 carries this H2.
    pub owner_h2: String,
    /// H1 of the encrypted image this configuration opens (hex SHA-256 as uploaded).
    pub image_h1: String,
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
            .field("owner_h2", &self.owner_h2)
            .field("image_h1", &self.image_h1)
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
/// validated bind key. The result is the envelope `lp(label, H2, bind-sealed)`: the owner's
/// H2 travels in the clear (it is the hash of a public key) so that the secure component
/// refuses another DM's launch before any TPM work, and it is also in the AAD and in the
/// plaintext, so changing it only makes the configuration fail to open.
pub fn seal_domc_config(bind_public: &[u8], host: &str, cfg: &DomcConfig) -> Result<Vec<u8>> {
    check_h2(&cfg.owner_h2)?;
    let plain = SecretBytes::new(wire::to_bytes(cfg));
    let sealed = seal_to_bind_key(
        bind_public,
        &domc_config_aad(host, &cfg.image_id, &cfg.owner_h2),
        plain.expose(),
    )?;
    Ok(crate::crypto::lp(&[
        label::DOMC_CONFIG.as_bytes(),
        cfg.owner_h2.as_bytes(),
        &sealed,
    ]))
}

fn check_h2(h2: &str) -> Result<()> {
    if h2.len() == 64
        && h2
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::malformed("H2", "64 lower-case hex digits"))
    }
}

/// A sealed crypto-domain configuration as stored: its owner (in the clear, authenticated
/// by the AAD) and the part only the host's TPM can open.
#[derive(Debug, Clone, Copy)]
pub struct SealedDomc<'a> {
    /// H2 of the owner (hex).
    pub owner_h2: &'a str,
    /// The bind-key-sealed configuration (RSA part ‖ AES-GCM body).
    pub sealed: &'a [u8],
}

impl<'a> SealedDomc<'a> {
    /// Parses the envelope (untrusted bytes from the cloud storage).
    pub fn parse(b: &'a [u8]) -> Result<Self> {
        let tampered = || {
            Error::rejected(
                "config_tampered",
                "the crypto-domain configuration has a bad encoding (provisioned before v2?)",
            )
        };
        let parts = crate::crypto::split_lp(b, 3).ok_or_else(tampered)?;
        if parts[0] != label::DOMC_CONFIG.as_bytes() {
            return Err(tampered());
        }
        let owner_h2 = std::str::from_utf8(parts[1]).map_err(|_| tampered())?;
        check_h2(owner_h2).map_err(|_| tampered())?;
        crate::crypto::split_bind_sealed(parts[2]).map_err(|_| tampered())?;
        Ok(Self {
            owner_h2,
            sealed: parts[2],
        })
    }

    /// The RSA part, for the TPM.
    pub fn rsa(&self) -> Result<&'a [u8]> {
        Ok(crate::crypto::split_bind_sealed(self.sealed)?.0)
    }

    /// Refuses a launch by anyone but the owner: `h2` is SHA-256 of the launching pk_DM
    /// (hex). `owner_mismatch` — another domain manager's launch of this image.
    pub fn check_owner(&self, h2: &str) -> Result<()> {
        if crate::crypto::ct_eq(self.owner_h2.as_bytes(), h2.as_bytes()) {
            Ok(())
        } else {
            Err(Error::rejected(
                "owner_mismatch",
                "the image belongs to another domain manager",
            ))
        }
    }
}

/// AAD of a sealed crypto-domain configuration: host, image and owner.
pub fn domc_config_aad(host: &str, image_id: &str, owner_h2: &str) -> Vec<u8> {
    crate::crypto::lp(&[
        label::DOMC_CONFIG.as_bytes(),
        host.as_bytes(),
        image_id.as_bytes(),
        owner_h2.as_bytes(),
    ])
}

/// Opens a sealed configuration with the key the TPM released from its RSA part, for a
/// launch by the DM whose H2 is `h2`: refused (`owner_mismatch`) when the configuration
/// belongs to another DM, `config_tampered` when it does not open or names another image
/// or owner inside.
pub fn open_domc_config(
    tpm_key: &[u8],
    host: &str,
    image_id: &str,
    h2: &str,
    sealed: &[u8],
) -> Result<DomcConfig> {
    let env = SealedDomc::parse(sealed)?;
    env.check_owner(h2)?;
    let (_, body) = crate::crypto::split_bind_sealed(env.sealed)?;
    let plain =
        crate::crypto::open_bind_sealed(tpm_key, &domc_config_aad(host, image_id, h2), body)
            .map_err(|_| {
                Error::rejected(
                    "config_tampered",
                    "the crypto-domain configuration was altered",
                )
            })?;
    let cfg: DomcConfig = wire::parse("domc config", plain.expose())?;
    if cfg.image_id != image_id
        || cfg.image_key.len() != 32
        || !crate::crypto::ct_eq(cfg.owner_h2.as_bytes(), h2.as_bytes())
    {
        return Err(Error::rejected(
            "config_tampered",
            "the configuration is for another image or owner",
        ));
    }
    Ok(cfg)
}
