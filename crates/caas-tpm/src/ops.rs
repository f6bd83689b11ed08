//! The TPM operations on one owned ESYS context. Object hierarchy: the EK (persistent at
//! 0x81010001 when provisioned, else re-created from the default template) is the parent of
//! the AK, as tpm2-tools and Keylime do it; a storage root key (SRK, ECC P-256, owner
//! hierarchy, re-derived on demand) is the parent of the bind key and of sealed objects.
//! Keys leave the TPM only as TPM-wrapped blobs ([`KeyBlob`]), which are safe on disk.

use crate::PcrBank;
use crate::error::{Error, Op};
use crate::tcti::parse_tcti;
use std::convert::TryFrom;
use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EncryptedSecret, HashScheme, IdObject, KeyedHashScheme,
    PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters,
    PublicRsaParametersBuilder, RsaDecryptionScheme, RsaExponent, RsaScheme, SensitiveData,
    SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;
use zeroize::Zeroizing;

const EK_PERSISTENT_RSA: u32 = 0x8101_0001;
/// Where caas keeps its storage root key (owner hierarchy, persistent): creating the ECC
/// primary costs a TPM2_CreatePrimary per operation otherwise.
const SRK_PERSISTENT: u32 = 0x8100_0100;

/// Attestation-key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AkAlg {
    /// ECC P-256 with ECDSA-SHA256 (default: fast key generation).
    #[default]
    EccP256,
    /// RSA-2048 with RSASSA-SHA256.
    Rsa2048,
}

/// A TPM-wrapped key: its TPM2B_PUBLIC and TPM2B_PRIVATE contents. The private part is
/// encrypted by the parent inside the TPM and useless elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBlob {
    /// TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC).
    pub public: Vec<u8>,
    /// TPM2B_PRIVATE contents (the wrapped sensitive area).
    pub private: Vec<u8>,
}

/// A quote: the signed TPMS_ATTEST and its TPMT_SIGNATURE, plus the PCR values read right
/// after (in selection order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// TPMS_ATTEST.
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE.
    pub signature: Vec<u8>,
}

/// One owned TPM context.
#[derive(Debug)]
pub struct Tpm {
    ctx: Context,
    /// The most recently used AK stays loaded while this context lives (one object slot):
    /// its TPM2B_PUBLIC and handle. Flushed on drop.
    ak_cache: Option<(Vec<u8>, KeyHandle)>,
    /// The persistent SRK's ESYS handle, once found or made persistent (no TPM slot).
    srk_persistent: Option<KeyHandle>,
}

impl Drop for Tpm {
    fn drop(&mut self) {
        if let Some((_, h)) = self.ak_cache.take() {
            self.flush(h);
        }
    }
}

fn tpm2b(b: &[u8]) -> Result<Vec<u8>, Error> {
    let n =
        u16::try_from(b.len()).map_err(|_| Error::Unexpected("public area too large".into()))?;
    let mut out = n.to_be_bytes().to_vec();
    out.extend_from_slice(b);
    Ok(out)
}

fn public_to_tpm2b(p: &Public) -> Result<Vec<u8>, Error> {
    tpm2b(&p.marshall().op("marshal public")?)
}

fn public_from_tpm2b(b: &[u8]) -> Result<Public, Error> {
    use tss_esapi::traits::UnMarshall;
    if b.len() < 2 || usize::from(u16::from_be_bytes([b[0], b[1]])) != b.len() - 2 {
        return Err(Error::InvalidArgument(
            "TPM2B_PUBLIC size prefix does not match".into(),
        ));
    }
    Public::unmarshall(&b[2..]).op("unmarshal public")
}

/// Whether `p` is an object of template `t` (everything but the unique field).
fn same_template(p: &Public, t: &Public) -> bool {
    match (p, t) {
        (
            Public::Ecc {
                object_attributes: a1,
                name_hashing_algorithm: n1,
                auth_policy: ap1,
                parameters: p1,
                ..
            },
            Public::Ecc {
                object_attributes: a2,
                name_hashing_algorithm: n2,
                auth_policy: ap2,
                parameters: p2,
                ..
            },
        ) => a1 == a2 && n1 == n2 && ap1 == ap2 && p1 == p2,
        _ => false,
    }
}

fn pcr_slot(i: u32) -> Result<PcrSlot, Error> {
    if i >= 24 {
        return Err(Error::InvalidArgument(format!("PCR {i} out of range")));
    }
    PcrSlot::try_from(1u32 << i).op("PCR slot")
}

fn selection(bank: PcrBank, pcrs: &[u32]) -> Result<PcrSelectionList, Error> {
    let slots = pcrs
        .iter()
        .map(|p| pcr_slot(*p))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(bank.alg(), &slots)
        .build()
        .op("PCR selection")
}

impl Tpm {
    /// Opens the TPM named by a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=..,port=..`).
    pub fn open(tcti: &str) -> Result<Self, Error> {
        let conf = parse_tcti(tcti)?;
        let ctx = Context::new(conf).op("open context")?;
        Ok(Self {
            ctx,
            ak_cache: None,
            srk_persistent: None,
        })
    }

    fn flush(&mut self, h: impl Into<ObjectHandle>) {
        let h = h.into();
        if let Err(e) = self.ctx.flush_context(h) {
            tracing::warn!(error = %e, "flushing a TPM handle failed");
        }
    }

    fn flush_session(&mut self, s: AuthSession) {
        if let AuthSession::PolicySession(_) | AuthSession::HmacSession(_) = s {
            let h: ObjectHandle = tss_esapi::handles::SessionHandle::from(s).into();
            self.flush(h);
        }
    }

    /// The EK handle and whether it is transient (must be flushed).
    fn ek(&mut self) -> Result<(KeyHandle, bool), Error> {
        let persistent = PersistentTpmHandle::new(EK_PERSISTENT_RSA).op("EK handle")?;
        match self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
        {
            Ok(h) => Ok((KeyHandle::from(h), false)),
            Err(_) => {
                let h = ek::create_ek_object_2(
                    &mut self.ctx,
                    AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                    DefaultKey,
                )
                .op("create EK")?;
                Ok((h, true))
            }
        }
    }

    fn with_ek<T>(
        &mut self,
        f: impl FnOnce(&mut Self, KeyHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let (ek, transient) = self.ek()?;
        let r = f(self, ek);
        if transient {
            self.flush(ek);
        } else {
            // Release the ESYS_TR of the persistent object (no TPM slot involved).
            let mut h: ObjectHandle = ek.into();
            let _ = self.ctx.tr_close(&mut h);
        }
        r
    }

    /// The RSA-2048 EK's TPM2B_PUBLIC.
    pub fn ek_public(&mut self) -> Result<Vec<u8>, Error> {
        self.with_ek(|t, ek| {
            let (p, _, _) = t.ctx.read_public(ek).op("read EK public")?;
            public_to_tpm2b(&p)
        })
    }

    /// The EK certificate (DER) from NV index 0x01c00002 (RSA-2048 EK).
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>, Error> {
        ek::retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .op("read EK certificate")
    }

    /// Creates an attestation key (restricted signing) under the EK.
    pub fn create_ak(&mut self, alg: AkAlg) -> Result<KeyBlob, Error> {
        self.with_ek(|t, ek| {
            let (sel, scheme) = match alg {
                AkAlg::EccP256 => (
                    AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                    SignatureSchemeAlgorithm::EcDsa,
                ),
                AkAlg::Rsa2048 => (
                    AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                    SignatureSchemeAlgorithm::RsaSsa,
                ),
            };
            let r = ak::create_ak_2(
                &mut t.ctx,
                ek,
                HashingAlgorithm::Sha256,
                sel,
                scheme,
                None,
                DefaultKey,
            )
            .op("create AK")?;
            Ok(KeyBlob {
                public: public_to_tpm2b(&r.out_public)?,
                private: r.out_private.value().to_vec(),
            })
        })
    }

    fn load_ak(&mut self, ek: KeyHandle, blob: &KeyBlob) -> Result<KeyHandle, Error> {
        let private = Private::try_from(blob.private.clone()).op("AK private")?;
        let public = public_from_tpm2b(&blob.public)?;
        ak::load_ak(&mut self.ctx, ek, None, private, public).op("load AK")
    }

    /// The loaded AK for `blob` (cached; loading needs the EK only briefly).
    fn ak_handle(&mut self, blob: &KeyBlob) -> Result<KeyHandle, Error> {
        if let Some((public, h)) = &self.ak_cache
            && *public == blob.public
        {
            // Another client of the same TPM (tpm2-tools without a resource manager) may
            // have flushed every transient object since: check that the handle still names
            // a loaded object (TPM2_ReadPublic, about a millisecond).
            let h = *h;
            if self
                .ctx
                .execute_without_session(|c| c.read_public(h))
                .is_ok()
            {
                return Ok(h);
            }
            self.ak_cache = None;
            let mut oh: ObjectHandle = h.into();
            let _ = self.ctx.tr_close(&mut oh);
        }
        if let Some((_, h)) = self.ak_cache.take() {
            self.flush(h);
        }
        let h = self.with_ek(|t, ek| t.load_ak(ek, blob))?;
        self.ak_cache = Some((blob.public.clone(), h));
        Ok(h)
    }

    fn with_ak<T>(
        &mut self,
        blob: &KeyBlob,
        f: impl FnOnce(&mut Self, KeyHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let akh = self.ak_handle(blob)?;
        let r = f(self, akh);
        if r.is_err() {
            // Do not trust a cached handle after a failure (e.g. the TPM was reset).
            if let Some((_, h)) = self.ak_cache.take() {
                self.flush(h);
            }
        }
        r
    }

    /// Reads PCR values of `bank` (in the order of `pcrs`, which must be ascending).
    pub fn pcr_read(&mut self, bank: PcrBank, pcrs: &[u32]) -> Result<Vec<Vec<u8>>, Error> {
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted != pcrs {
            return Err(Error::InvalidArgument(
                "PCR list must be ascending without duplicates".into(),
            ));
        }
        let mut out = Vec::with_capacity(pcrs.len());
        for chunk in pcrs.chunks(8) {
            let sel = selection(bank, chunk)?;
            let (_, got_sel, digests) = self
                .ctx
                .execute_without_session(|c| c.pcr_read(sel))
                .op("PCR read")?;
            let vals = digests.value();
            if vals.len() != chunk.len() || got_sel.is_empty() {
                return Err(Error::Unexpected(format!(
                    "PCR read returned {} of {} values (bank not active?)",
                    vals.len(),
                    chunk.len()
                )));
            }
            out.extend(vals.iter().map(|d| d.value().to_vec()));
        }
        Ok(out)
    }

    /// Extends `digest` into PCR `pcr` of `bank`.
    pub fn pcr_extend(&mut self, bank: PcrBank, pcr: u32, digest: &[u8]) -> Result<(), Error> {
        if pcr >= 24 || digest.len() != bank.digest_len() {
            return Err(Error::InvalidArgument("PCR index or digest length".into()));
        }
        let handle = PcrHandle::try_from(pcr).op("PCR handle")?;
        let mut v = DigestValues::new();
        v.set(bank.alg(), Digest::try_from(digest.to_vec()).op("digest")?);
        self.ctx
            .execute_with_nullauth_session(|c| c.pcr_extend(handle, v))
            .op("PCR extend")
    }

    /// TPM2_Quote with the AK over `pcrs` of `bank`, `nonce` as qualifying data.
    pub fn quote(
        &mut self,
        ak_blob: &KeyBlob,
        nonce: &[u8],
        bank: PcrBank,
        pcrs: &[u32],
    ) -> Result<Quote, Error> {
        let sel = selection(bank, pcrs)?;
        let data = Data::try_from(nonce.to_vec()).op("qualifying data")?;
        self.with_ak(ak_blob, |t, akh| {
            let (attest, sig) = t
                .ctx
                .execute_with_nullauth_session(|c| c.quote(akh, data, SignatureScheme::Null, sel))
                .op("quote")?;
            Ok(Quote {
                attest: attest.marshall().op("marshal attest")?,
                signature: sig.marshall().op("marshal signature")?,
            })
        })
    }

    /// TPM2_ActivateCredential: recovers the secret of a credential made for the AK and EK.
    pub fn activate_credential(
        &mut self,
        ak_blob: &KeyBlob,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let id = IdObject::try_from(credential_blob.to_vec()).op("credential blob")?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).op("encrypted secret")?;
        self.with_ak(ak_blob, |t, akh| {
            t.with_ek(|t, ek| {
                let session = t
                    .ctx
                    .start_auth_session(
                        None,
                        None,
                        None,
                        SessionType::Policy,
                        SymmetricDefinition::AES_128_CFB,
                        HashingAlgorithm::Sha256,
                    )
                    .op("start EK policy session")?
                    .ok_or_else(|| Error::Unexpected("no session".into()))?;
                let r = (|| {
                    let ps = PolicySession::try_from(session).op("policy session")?;
                    t.ctx
                        .execute_with_nullauth_session(|c| {
                            c.policy_secret(
                                ps,
                                tss_esapi::handles::AuthHandle::Endorsement,
                                Default::default(),
                                Default::default(),
                                Default::default(),
                                None,
                            )
                        })
                        .op("PolicySecret(endorsement)")?;
                    t.ctx
                        .set_sessions((Some(AuthSession::Password), Some(session), None));
                    let out = t
                        .ctx
                        .activate_credential(akh, ek, id, secret)
                        .op("activate credential");
                    t.ctx.clear_sessions();
                    Ok(Zeroizing::new(out?.value().to_vec()))
                })();
                t.flush_session(session);
                r
            })
        })
    }

    /// The SRK: the persistent one at [`SRK_PERSISTENT`] when present and of our template,
    /// else a transient primary (made persistent when the owner hierarchy allows it).
    /// Returns the handle and whether it is transient (must be flushed).
    fn srk(&mut self) -> Result<(KeyHandle, bool), Error> {
        if let Some(h) = self.srk_persistent {
            return Ok((h, false));
        }
        let persistent = PersistentTpmHandle::new(SRK_PERSISTENT).op("SRK handle")?;
        if let Ok(h) = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(persistent)))
        {
            let kh = KeyHandle::from(h);
            let ours = self
                .ctx
                .execute_without_session(|c| c.read_public(kh))
                .ok()
                .zip(self.srk_template().ok())
                .is_some_and(|((p, _, _), t)| same_template(&p, &t));
            if ours {
                self.srk_persistent = Some(kh);
                return Ok((kh, false));
            }
            let mut oh: ObjectHandle = h;
            let _ = self.ctx.tr_close(&mut oh);
            return Ok((self.srk_transient()?, true));
        }
        let h = self.srk_transient()?;
        let made = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.evict_control(
                    tss_esapi::interface_types::resource_handles::Provision::Owner,
                    h.into(),
                    tss_esapi::interface_types::dynamic_handles::Persistent::Persistent(persistent),
                )
            });
        match made {
            Ok(ph) => {
                self.flush(h);
                let kh = KeyHandle::from(ph);
                self.srk_persistent = Some(kh);
                Ok((kh, false))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot persist the SRK; using a transient one");
                Ok((h, true))
            }
        }
    }

    fn srk_template(&self) -> Result<Public, Error> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .op("SRK attributes")?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_restricted_decryption_key(
                    SymmetricDefinitionObject::AES_128_CFB,
                    EccCurve::NistP256,
                )
                .build()
                .op("SRK parameters")?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .op("SRK template")
    }

    fn srk_transient(&mut self) -> Result<KeyHandle, Error> {
        let public = self.srk_template()?;
        Ok(self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .op("create SRK")?
            .key_handle)
    }

    fn with_srk<T>(
        &mut self,
        f: impl FnOnce(&mut Self, KeyHandle) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let (srk, transient) = self.srk()?;
        let r = f(self, srk);
        if transient {
            self.flush(srk);
        } else if r.is_err() {
            // Look the persistent SRK up again next time (the TPM may have been reset).
            if let Some(h) = self.srk_persistent.take() {
                let mut oh: ObjectHandle = h.into();
                let _ = self.ctx.tr_close(&mut oh);
            }
        }
        r
    }

    /// The PolicyPCR digest for `pcrs` of `bank` at their current values (or at `values`,
    /// given in PCR order), computed by a trial session.
    pub fn pcr_policy_digest(
        &mut self,
        bank: PcrBank,
        pcrs: &[u32],
        values: Option<&[Vec<u8>]>,
    ) -> Result<Vec<u8>, Error> {
        let vals = match values {
            Some(v) => v.to_vec(),
            None => self.pcr_read(bank, pcrs)?,
        };
        let alg = match bank {
            PcrBank::Sha1 => &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            PcrBank::Sha256 => &aws_lc_rs::digest::SHA256,
            PcrBank::Sha384 => &aws_lc_rs::digest::SHA384,
        };
        let mut dc = aws_lc_rs::digest::Context::new(alg);
        for v in &vals {
            dc.update(v);
        }
        let mut h = dc.finish().as_ref().to_vec();
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Trial,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .op("start trial session")?
            .ok_or_else(|| Error::Unexpected("no session".into()))?;
        let r = (|| {
            let ps = PolicySession::try_from(session).op("policy session")?;
            let d = Digest::try_from(std::mem::take(&mut h)).op("pcr digest")?;
            let sel = selection(bank, pcrs)?;
            self.ctx
                .execute_without_session(|c| c.policy_pcr(ps, d, sel))
                .op("PolicyPCR (trial)")?;
            Ok(self
                .ctx
                .execute_without_session(|c| c.policy_get_digest(ps))
                .op("policy digest")?
                .value()
                .to_vec())
        })();
        self.flush_session(session);
        r
    }

    fn policy_session_for_pcrs(
        &mut self,
        bank: PcrBank,
        pcrs: &[u32],
    ) -> Result<AuthSession, Error> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .op("start policy session")?
            .ok_or_else(|| Error::Unexpected("no session".into()))?;
        let r = (|| {
            let ps = PolicySession::try_from(session).op("policy session")?;
            let sel = selection(bank, pcrs)?;
            // Empty digest: the TPM uses the current PCR values.
            self.ctx
                .execute_without_session(|c| c.policy_pcr(ps, Digest::default(), sel))
                .op("PolicyPCR")
        })();
        if let Err(e) = r {
            self.flush_session(session);
            return Err(e);
        }
        Ok(session)
    }

    /// Creates the bind key: RSA-2048, decrypt-only, non-duplicable (fixedTPM/fixedParent),
    /// usable only under PolicyPCR over `pcrs` at their current values.
    pub fn create_bind_key(&mut self, bank: PcrBank, pcrs: &[u32]) -> Result<KeyBlob, Error> {
        let policy = self.pcr_policy_digest(bank, pcrs, None)?;
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(false)
            .with_no_da(true)
            .with_decrypt(true)
            .build()
            .op("bind key attributes")?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(Digest::try_from(policy).op("policy")?)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_scheme(RsaScheme::Null)
                    .with_key_bits(RsaKeyBits::Rsa2048)
                    .with_exponent(RsaExponent::default())
                    .with_is_decryption_key(true)
                    .with_restricted(false)
                    .build()
                    .op("bind key parameters")?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build()
            .op("bind key template")?;
        self.with_srk(|t, srk| {
            let r = t
                .ctx
                .execute_with_nullauth_session(|c| c.create(srk, public, None, None, None, None))
                .op("create bind key")?;
            Ok(KeyBlob {
                public: public_to_tpm2b(&r.out_public)?,
                private: r.out_private.value().to_vec(),
            })
        })
    }

    fn load_under_srk(&mut self, srk: KeyHandle, blob: &KeyBlob) -> Result<KeyHandle, Error> {
        let private = Private::try_from(blob.private.clone()).op("private blob")?;
        let public = public_from_tpm2b(&blob.public)?;
        self.ctx
            .execute_with_nullauth_session(|c| c.load(srk, private, public))
            .op("load key")
    }

    /// TPM2_Certify of the bind key by the AK, with `qualifying_data`: (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify_bind_key(
        &mut self,
        ak_blob: &KeyBlob,
        bind: &KeyBlob,
        qualifying_data: &[u8],
    ) -> Result<Quote, Error> {
        let data = Data::try_from(qualifying_data.to_vec()).op("qualifying data")?;
        self.with_ak(ak_blob, |t, akh| {
            t.with_srk(|t, srk| {
                let bh = t.load_under_srk(srk, bind)?;
                let r = t
                    .ctx
                    .execute_with_sessions(
                        (
                            Some(AuthSession::Password),
                            Some(AuthSession::Password),
                            None,
                        ),
                        |c| c.certify(bh.into(), akh, data, SignatureScheme::Null),
                    )
                    .op("certify");
                t.flush(bh);
                let (attest, sig) = r?;
                Ok(Quote {
                    attest: attest.marshall().op("marshal attest")?,
                    signature: sig.marshall().op("marshal signature")?,
                })
            })
        })
    }

    /// RSA-OAEP(SHA-256) decryption with the bind key, authorised by a PolicyPCR session
    /// (fails when the PCRs are not in the state the key is bound to).
    pub fn bind_decrypt(
        &mut self,
        bind: &KeyBlob,
        bank: PcrBank,
        pcrs: &[u32],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let ct = PublicKeyRsa::try_from(ciphertext.to_vec()).op("ciphertext")?;
        self.with_srk(|t, srk| {
            let bh = t.load_under_srk(srk, bind)?;
            let r = (|| {
                let session = t.policy_session_for_pcrs(bank, pcrs)?;
                let out = t
                    .ctx
                    .execute_with_session(Some(session), |c| {
                        c.rsa_decrypt(
                            bh,
                            ct,
                            RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256)),
                            Data::default(),
                        )
                    })
                    .op("policy decrypt");
                t.flush_session(session);
                Ok(Zeroizing::new(out?.value().to_vec()))
            })();
            t.flush(bh);
            r
        })
    }

    /// Seals `data` (≤ 128 bytes) under the SRK to PolicyPCR over `pcrs` at their current values.
    pub fn seal(&mut self, bank: PcrBank, pcrs: &[u32], data: &[u8]) -> Result<KeyBlob, Error> {
        let policy = self.pcr_policy_digest(bank, pcrs, None)?;
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_user_with_auth(false)
            .with_no_da(true)
            .build()
            .op("sealed object attributes")?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(Digest::try_from(policy).op("policy")?)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .op("sealed object template")?;
        let sensitive = SensitiveData::try_from(data.to_vec()).op("sealed data (max 128 bytes)")?;
        self.with_srk(|t, srk| {
            let r = t
                .ctx
                .execute_with_nullauth_session(|c| {
                    c.create(srk, public, None, Some(sensitive), None, None)
                })
                .op("seal")?;
            Ok(KeyBlob {
                public: public_to_tpm2b(&r.out_public)?,
                private: r.out_private.value().to_vec(),
            })
        })
    }

    /// Unseals a sealed object under a PolicyPCR session.
    pub fn unseal(
        &mut self,
        sealed: &KeyBlob,
        bank: PcrBank,
        pcrs: &[u32],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.with_srk(|t, srk| {
            let h = t.load_under_srk(srk, sealed)?;
            let r = (|| {
                let session = t.policy_session_for_pcrs(bank, pcrs)?;
                let out = t
                    .ctx
                    .execute_with_session(Some(session), |c| c.unseal(h.into()))
                    .op("unseal");
                t.flush_session(session);
                Ok(Zeroizing::new(out?.value().to_vec()))
            })();
            t.flush(h);
            r
        })
    }

    /// Random bytes from the TPM.
    pub fn random(&mut self, n: usize) -> Result<Zeroizing<Vec<u8>>, Error> {
        let r = self
            .ctx
            .execute_without_session(|c| c.get_random(n))
            .op("get random")?;
        Ok(Zeroizing::new(r.value().to_vec()))
    }
}
