//! Synthetic evidence made in software: an ECDSA P-256 "attestation key" that produces
//! TPM-format quotes (TPMS_ATTEST + TPMT_SIGNATURE) over PCR values replayed from an event
//! log. Used by unit tests, fuzz seeds and the verifier benchmark's scale-out input; the
//! end-to-end tests use real quotes from swtpm.

use crate::appraisal::Evidence;
use crate::error::Error;
use crate::eventlog::EventLog;
use crate::structures::{
    HashAlg, PcrSelection, Public, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE, alg, attr, curve,
    encode_pcr_selection_list,
};
use crate::wire::put_tpm2b;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// A software attestation key (ECDSA P-256, SHA-256).
#[derive(Debug)]
pub struct SoftAk {
    key: EcdsaKeyPair,
    public: Public,
}

/// Encodes a TPMT_PUBLIC for an ECC P-256 restricted signing key with ECDSA-SHA256.
pub fn ecc_ak_public(x: &[u8], y: &[u8]) -> Result<Public, Error> {
    let mut t = Vec::new();
    t.extend_from_slice(&alg::ECC.to_be_bytes());
    t.extend_from_slice(&alg::SHA256.to_be_bytes());
    let a = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::USER_WITH_AUTH
        | attr::RESTRICTED
        | attr::SIGN_ENCRYPT;
    t.extend_from_slice(&a.to_be_bytes());
    put_tpm2b(&mut t, &[])?;
    t.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
    t.extend_from_slice(&alg::ECDSA.to_be_bytes());
    t.extend_from_slice(&alg::SHA256.to_be_bytes());
    t.extend_from_slice(&curve::NIST_P256.to_be_bytes());
    t.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
    put_tpm2b(&mut t, x)?;
    put_tpm2b(&mut t, y)?;
    Public::parse(&t)
}

impl SoftAk {
    /// A fresh key.
    pub fn generate() -> Result<Self, Error> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| Error::Crypto("keygen"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| Error::Crypto("key"))?;
        let p = key.public_key().as_ref();
        if p.len() != 65 {
            return Err(Error::Crypto("unexpected EC point encoding"));
        }
        let public = ecc_ak_public(&p[1..33], &p[33..65])?;
        Ok(Self { key, public })
    }

    /// The TPMT_PUBLIC.
    pub fn public(&self) -> &Public {
        &self.public
    }

    /// Signs `message` and returns a TPMT_SIGNATURE.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let sig = self
            .key
            .sign(&SystemRandom::new(), message)
            .map_err(|_| Error::Crypto("sign"))?;
        let s = sig.as_ref();
        let mut out = Vec::new();
        out.extend_from_slice(&alg::ECDSA.to_be_bytes());
        out.extend_from_slice(&alg::SHA256.to_be_bytes());
        put_tpm2b(&mut out, &s[..32])?;
        put_tpm2b(&mut out, &s[32..])?;
        Ok(out)
    }

    /// A quote over explicit PCR values (in selection order) with `nonce` as extraData.
    pub fn quote_values(
        &self,
        nonce: &[u8],
        selection: &PcrSelection,
        values: &[Vec<u8>],
    ) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
        let digest = HashAlg::Sha256.hash_parts(&refs);
        let mut a = Vec::new();
        a.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        a.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        put_tpm2b(&mut a, &self.public.name())?;
        put_tpm2b(&mut a, nonce)?;
        a.extend_from_slice(&1234u64.to_be_bytes());
        a.extend_from_slice(&1u32.to_be_bytes());
        a.extend_from_slice(&0u32.to_be_bytes());
        a.push(1);
        a.extend_from_slice(&0x2024u64.to_be_bytes());
        a.extend_from_slice(&encode_pcr_selection_list(std::slice::from_ref(selection)));
        put_tpm2b(&mut a, &digest)?;
        let sig = self.sign(&a)?;
        Ok((a, sig))
    }

    /// Evidence for `log`: quote over the PCR values the log replays to.
    pub fn evidence(
        &self,
        nonce: &[u8],
        selection: &PcrSelection,
        log: &[u8],
    ) -> Result<Evidence, Error> {
        let parsed = EventLog::parse(log)?;
        let replay = parsed.replay(selection.hash)?;
        let values: Vec<Vec<u8>> = selection
            .pcrs
            .iter()
            .map(|p| {
                replay
                    .get(p)
                    .cloned()
                    .unwrap_or_else(|| vec![0u8; selection.hash.digest_len()])
            })
            .collect();
        let (quote, signature) = self.quote_values(nonce, selection, &values)?;
        Ok(Evidence {
            quote,
            signature,
            event_log: log.to_vec(),
            pcr_values: values.iter().map(hex::encode).collect(),
        })
    }
}

/// A dev-host-like boot log: firmware, bootloader, kernel, hypervisor, agent and config
/// contents measured into PCRs 0–7 (the same layout as the dev hosts' boot step).
pub fn sample_boot_log(seed: &str) -> Vec<u8> {
    use crate::eventlog::*;
    let mut w = EventLogWriter::new(&[HashAlg::Sha256]);
    w.measure(
        0,
        EV_POST_CODE,
        format!("firmware {seed}").as_bytes(),
        b"firmware",
    );
    w.measure(
        1,
        EV_PLATFORM_CONFIG_FLAGS,
        b"platform config",
        b"platform-config",
    );
    w.measure(4, EV_IPL, b"bootloader", b"bootloader");
    w.measure(4, EV_IPL, b"kernel", b"kernel");
    w.measure(4, EV_IPL, b"hypervisor", b"hypervisor");
    w.measure(5, EV_IPL, b"agent config", b"agent-config");
    w.measure(6, EV_IPL, b"agent binary", b"agent-binary");
    for pcr in 0..8 {
        w.measure(pcr, EV_SEPARATOR, &[0, 0, 0, 0], &[0, 0, 0, 0]);
    }
    w.into_bytes()
}
