//! The host side of attestation-gated release (`docs/recipient.md`): the agent makes
//! recipient attestation documents and opens `CiphertextForRecipient` in its TPM.
//!
//! `POST /v1/agent/recipient/document` (body: the key service's challenge, `POST
//! /v1/recipient/challenge`) creates a fresh recipient key in the TPM — RSA-2048,
//! decrypt-only, fixedTPM/fixedParent, under the storage root key, usable only under
//! PolicyPCR over the challenge's PCR selection at their current values — certifies it with
//! the enrolled AK and quotes those PCRs, both with `caas_tl::recipient::binding(nonce,
//! key)` as qualifying data, and returns the document with the event log. The key's
//! TPM-wrapped blob stays in the agent's memory, owned by the caller's client certificate
//! (its SPKI hash), for [`KEY_TTL_MS`].
//!
//! `POST /v1/agent/recipient/open` (`{"document", "ciphertext"}`) opens a
//! `CiphertextForRecipient` (AWS's CMS EnvelopedData, `caas_tl::cms`: the RSA-OAEP content
//! key in the TPM, the AES-256-CBC content here) for the key of that document: only for the certificate that
//! asked for the document, only while the PCRs are in the state the key is bound to (the
//! TPM refuses otherwise), once (the key is forgotten after a successful open). The secret
//! goes back only in the answer, never to a log or the audit record. Both calls are
//! audited in the agent's log (`RecipientDocument`, `RecipientOpen`).
use crate::agent::Agent;
use crate::error::Error;
use caas_attest::store::BindKeyRecord;
use caas_attest::verifier::Challenge;
use caas_attest::{Evidence, HashAlg};
use caas_crypto::SecretBytes;
use caas_tl::recipient::{Document, FORMAT, VERSION, binding};
use caas_tpm::{KeyBlob, PcrBank};
use std::collections::HashMap;
use std::sync::Mutex;

/// How long the agent keeps a recipient key for its document's opener.
pub const KEY_TTL_MS: u64 = 10 * 60 * 1000;
/// Most recipient keys kept at once.
pub const MAX_KEYS: usize = 256;

#[derive(Debug, Clone)]
struct HeldKey {
    blob: KeyBlob,
    bank: PcrBank,
    pcrs: Vec<u32>,
    owner: [u8; 32],
    created_ms: u64,
}

/// Recipient keys held for their documents' callers, by SHA-256 of the key's TPM2B_PUBLIC.
#[derive(Debug, Default)]
pub struct RecipientKeys(Mutex<HashMap<[u8; 32], HeldKey>>);

/// The answer of `POST /v1/agent/recipient/document`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DocumentReply {
    /// The document (JSON bytes), base64 — the `AttestationDocument` to pass to the KMS.
    #[serde(with = "caas_attest::b64")]
    pub document: Vec<u8>,
}

/// Body of `POST /v1/agent/recipient/open`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// The document the ciphertext was made for.
    #[serde(with = "caas_attest::b64")]
    pub document: Vec<u8>,
    /// `CiphertextForRecipient`.
    #[serde(with = "caas_attest::b64")]
    pub ciphertext: Vec<u8>,
}

/// The answer of `POST /v1/agent/recipient/open`: the secret.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OpenReply {
    /// The secret, base64.
    #[serde(with = "caas_attest::b64")]
    pub plaintext: Vec<u8>,
}

fn bank(h: HashAlg) -> Result<PcrBank, Error> {
    match h {
        HashAlg::Sha1 => Ok(PcrBank::Sha1),
        HashAlg::Sha256 => Ok(PcrBank::Sha256),
        HashAlg::Sha384 => Ok(PcrBank::Sha384),
        HashAlg::Sha512 => Err(Error::InvalidRequest(
            "sha512 PCR bank not supported".into(),
        )),
    }
}

fn owner_of(peer: Option<&caas_tls::server::Peer>) -> Result<[u8; 32], Error> {
    peer.and_then(|p| p.identity.as_ref())
        .map(|i| i.spki_sha256)
        .ok_or_else(|| Error::InvalidRequest("a client certificate is required".into()))
}

impl Agent {
    /// Makes a recipient attestation document for the key service's challenge.
    pub async fn recipient_document(
        &self,
        ch: &Challenge,
        peer: Option<&caas_tls::server::Peer>,
    ) -> Result<DocumentReply, Error> {
        let owner = owner_of(peer)?;
        if ch.nonce.len() != 32 {
            return Err(Error::InvalidRequest("the nonce must be 32 bytes".into()));
        }
        let b = bank(ch.selection.hash)?;
        let pcrs = ch.selection.pcrs.clone();
        if pcrs.is_empty() || pcrs.iter().any(|p| *p >= 24) || pcrs.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(Error::InvalidRequest(
                "PCR selection must be ascending indices < 24".into(),
            ));
        }
        let ak = self.ak_blob();
        let nonce = ch.nonce.clone();
        let sel = pcrs.clone();
        let (key, cert, quote, vals) = self
            .tpm()
            .run(move |t| {
                let key = t.create_bind_key(b, &sel)?;
                let bind = binding(&nonce, &key.public);
                let cert = t.certify_bind_key(&ak, &key, &bind)?;
                let quote = t.quote(&ak, &bind, b, &sel)?;
                let vals = t.pcr_read(b, &sel)?;
                Ok((key, cert, quote, vals))
            })
            .await?;
        let event_log = tokio::fs::read(&self.cfg.event_log)
            .await
            .map_err(Error::io(format!(
                "read event log {}",
                self.cfg.event_log.display()
            )))?;
        let doc = Document {
            format: FORMAT.into(),
            version: VERSION,
            host: self.cfg.name.clone(),
            nonce: ch.nonce.clone(),
            ak_public: self.ak_blob().public,
            recipient: BindKeyRecord {
                public: key.public.clone(),
                certify_attest: cert.attest,
                certify_signature: cert.signature,
            },
            evidence: Evidence {
                quote: quote.attest,
                signature: quote.signature,
                event_log,
                pcr_values: vals.iter().map(hex::encode).collect(),
            },
        };
        let now = caas_attest::now_ms();
        let id = caas_tl::crypto::sha256(&key.public);
        {
            let mut m = self
                .recipients
                .0
                .lock()
                .map_err(|_| Error::InvalidRequest("recipient key table unavailable".into()))?;
            m.retain(|_, k| now.saturating_sub(k.created_ms) <= KEY_TTL_MS);
            if m.len() >= MAX_KEYS {
                return Err(Error::InvalidRequest(
                    "too many outstanding recipient keys; retry later".into(),
                ));
            }
            m.insert(
                id,
                HeldKey {
                    blob: key,
                    bank: b,
                    pcrs,
                    owner,
                    created_ms: now,
                },
            );
        }
        Ok(DocumentReply {
            document: doc.to_bytes(),
        })
    }

    /// Opens a `CiphertextForRecipient` made for the key of `req.document`.
    pub async fn recipient_open(
        &self,
        req: &OpenRequest,
        peer: Option<&caas_tls::server::Peer>,
    ) -> Result<OpenReply, Error> {
        let owner = owner_of(peer)?;
        let doc = Document::parse(&req.document)?;
        let id = caas_tl::crypto::sha256(&doc.recipient.public);
        let now = caas_attest::now_ms();
        let held = {
            let m = self
                .recipients
                .0
                .lock()
                .map_err(|_| Error::InvalidRequest("recipient key table unavailable".into()))?;
            m.get(&id)
                .filter(|k| now.saturating_sub(k.created_ms) <= KEY_TTL_MS)
                .filter(|k| caas_tl::crypto::ct_eq(&k.owner, &owner))
                .cloned()
        }
        .ok_or_else(|| {
            Error::Tl(caas_tl::Error::rejected(
                "recipient_key_unknown",
                "no recipient key of this document is held for this caller",
            ))
        })?;
        let env = caas_tl::cms::parse(&req.ciphertext)?;
        let spki = caas_tl::recipient::recipient_spki(&doc.recipient.public)?;
        if !caas_tl::crypto::ct_eq(
            &env.subject_key_identifier,
            &caas_tl::cms::subject_key_identifier(&spki)?,
        ) {
            return Err(Error::Tl(caas_tl::Error::rejected(
                "recipient_key_unknown",
                "the ciphertext is not for this document's recipient key",
            )));
        }
        let rsa = env.encrypted_key.clone();
        let h2 = held.clone();
        let k = self
            .tpm()
            .run(move |t| t.bind_decrypt(&h2.blob, h2.bank, &h2.pcrs, &rsa))
            .await
            .map_err(|e| {
                Error::Tl(if e.is_policy_failure() {
                    caas_tl::Error::rejected(
                        "pcr_state_changed",
                        "the TPM refuses the recipient key: the PCRs changed",
                    )
                } else {
                    caas_tl::Error::rejected("decryption_failed", "the TPM cannot decrypt")
                })
            })?;
        let secret: SecretBytes = env.open_content(&k)?;
        if let Ok(mut m) = self.recipients.0.lock() {
            m.remove(&id);
        }
        Ok(OpenReply {
            plaintext: secret.expose().to_vec(),
        })
    }
}
