//! The registrar (Privacy CA) side of host enrollment, protocol P1: validate the EK
//! certificate against the configured TPM-vendor CAs, check that the EK is the certified
//! key and that the AK is a restricted, non-duplicable signing key, issue a credential with
//! software MakeCredential bound to the AK's Name, and — when the host proves it could
//! activate it — record the host, its EK, AK and (AK-certified) bind key, and, when the
//! host enrolls over TLS, the client certificate its AK endorsed ([`crate::tls_binding`]:
//! the certificate must name the host, and later host requests must present the same key).

use crate::credential::make_credential;
use crate::ekcert::{EkCaStore, ek_matches_certificate};
use crate::error::Error;
use crate::quote::verify_signature;
use crate::store::{
    AttestStore, AuditRecord, BindKeyRecord, HostRecord, HostState, PendingEnrollment, get_host,
    put_host,
};
use crate::structures::{Attest, Attested, Public, PublicKey, Signature, attr};
use crate::tls_binding::{TlsBinding, TlsClient, binding_nonce};
use aws_lc_rs::{digest, rand};

/// Enrollment step 1, host → registrar.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// Host name (`[A-Za-z0-9._-]{1,64}`).
    pub name: String,
    /// Where the verifier reaches the host agent.
    pub agent_url: String,
    /// EK TPM2B_PUBLIC.
    #[serde(with = "crate::b64")]
    pub ek_public: Vec<u8>,
    /// EK certificate DER (from the TPM's NV).
    #[serde(with = "crate::b64")]
    pub ek_cert: Vec<u8>,
    /// AK TPM2B_PUBLIC.
    #[serde(with = "crate::b64")]
    pub ak_public: Vec<u8>,
}

/// Enrollment step 1 answer: the credential to activate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EnrollChallenge {
    /// Id to quote in step 2.
    pub enrollment_id: String,
    /// TPM2B_ID_OBJECT contents.
    #[serde(with = "crate::b64")]
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents.
    #[serde(with = "crate::b64")]
    pub encrypted_secret: Vec<u8>,
}

/// Enrollment step 2, host → registrar: the activated secret and the bind key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollFinish {
    /// Host name.
    pub name: String,
    /// From the challenge.
    pub enrollment_id: String,
    /// The secret recovered with TPM2_ActivateCredential.
    #[serde(with = "crate::b64")]
    pub secret: Vec<u8>,
    /// The TPM-bound decrypt key, certified by the AK.
    pub bind_key: Option<BindKeyRecord>,
    /// The AK's endorsement of the agent's TLS client certificate (required when the
    /// enrollment comes over TLS; [`crate::tls_binding`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_binding: Option<TlsBinding>,
}

/// Registrar configuration.
#[derive(Debug, Clone)]
pub struct Registrar {
    /// Trusted TPM-vendor CAs.
    pub ca: EkCaStore,
    /// How long an issued credential may be activated.
    pub enrollment_ttl_ms: u64,
    /// Profile given to newly enrolled hosts.
    pub default_profile: Option<String>,
}

fn fail(code: &'static str, message: impl Into<String>) -> Error {
    Error::Enrollment {
        code,
        message: message.into(),
    }
}

/// Validates a host name.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks that `ak` is a restricted signing key that cannot leave its TPM.
pub fn check_ak_attributes(ak: &Public) -> Result<(), Error> {
    let need = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::RESTRICTED
        | attr::SIGN_ENCRYPT;
    if !ak.has(need) || ak.has(attr::DECRYPT) || matches!(ak.key, PublicKey::Other) {
        return Err(fail(
            "ak_attributes",
            "the AK must be a restricted, fixedTPM/fixedParent signing key",
        ));
    }
    Ok(())
}

/// Verifies a bind key certification by the AK; returns the bind key's public area.
pub fn check_bind_key(ak: &Public, bind: &BindKeyRecord) -> Result<Public, Error> {
    let public =
        Public::parse_tpm2b(&bind.public).map_err(|e| fail("bind_key_invalid", e.to_string()))?;
    let need = attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::DECRYPT;
    if !public.has(need)
        || public.has(attr::SIGN_ENCRYPT)
        || public.has(attr::RESTRICTED)
        || public.has(attr::USER_WITH_AUTH)
        || public.auth_policy.is_empty()
    {
        return Err(fail(
            "bind_key_invalid",
            "bind key must be a non-duplicable decrypt key under a policy",
        ));
    }
    let attest =
        Attest::parse(&bind.certify_attest).map_err(|e| fail("bind_key_invalid", e.to_string()))?;
    let sig = Signature::parse(&bind.certify_signature)
        .map_err(|e| fail("bind_key_invalid", e.to_string()))?;
    verify_signature(ak, &bind.certify_attest, &sig)
        .map_err(|e| fail("bind_key_certify_signature", e.to_string()))?;
    match attest.attested {
        Attested::Certify { name, .. } if name == public.name() => Ok(public),
        _ => Err(fail("bind_key_invalid", "certification is not of this key")),
    }
}

impl Registrar {
    /// Step 1: validate the EK and AK, store a pending host, return the credential.
    ///
    /// `peer`: the connection's verified client certificate (`None` without TLS); it must
    /// name the host being enrolled.
    pub async fn start<S: AttestStore>(
        &self,
        store: &S,
        req: &EnrollRequest,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<EnrollChallenge, Error> {
        let audit_fail = |code: &str, detail: String| AuditRecord {
            time_ms: now_ms,
            principal: format!("host:{}", req.name),
            operation: "EnrollHost".into(),
            subject: req.name.clone(),
            result: code.to_string(),
            detail,
        };
        let r = self
            .check_start(req, now_ms)
            .and_then(|x| check_peer_name(&req.name, peer).map(|()| x));
        let (ek, ak) = match r {
            Ok(x) => x,
            Err(e) => {
                if let Error::Enrollment { code, message } = &e
                    && valid_name(&req.name)
                {
                    store.audit(audit_fail(code, message.clone())).await?;
                }
                return Err(e);
            }
        };
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        rand::fill(secret.as_mut()).map_err(|_| Error::Crypto("random"))?;
        let made = make_credential(&ek, &ak.name(), secret.as_ref())?;
        let mut idb = [0u8; 16];
        rand::fill(&mut idb).map_err(|_| Error::Crypto("random"))?;
        let enrollment_id = hex::encode(idb);
        let pending = PendingEnrollment {
            id: enrollment_id.clone(),
            secret_sha256: hex::encode(digest::digest(&digest::SHA256, secret.as_ref())),
            expires_ms: now_ms + self.enrollment_ttl_ms,
            agent_url: req.agent_url.clone(),
            ek_public: req.ek_public.clone(),
            ek_cert: req.ek_cert.clone(),
            ak_public: req.ak_public.clone(),
        };
        // An enrolled host keeps its record (and trust) until the new enrollment completes;
        // its name stays bound to its EK: another TPM cannot take it over.
        let existing = get_host(store, &req.name).await?;
        if let Some(h) = &existing
            && h.tls_spki_sha256.is_some()
            && peer.is_none()
        {
            let msg = "the host is bound to a TLS client certificate; enroll over TLS";
            store
                .audit(audit_fail("tls_identity_missing", msg.into()))
                .await?;
            return Err(fail("tls_identity_missing", msg));
        }
        let rec = match existing {
            Some(mut h) if h.state == HostState::Enrolled => {
                if h.ek_public != req.ek_public {
                    let msg = "the host name is enrolled with another TPM (EK)";
                    store
                        .audit(audit_fail("host_name_taken", msg.into()))
                        .await?;
                    return Err(fail("host_name_taken", msg));
                }
                h.pending = Some(pending);
                h
            }
            existing => HostRecord {
                name: req.name.clone(),
                agent_url: req.agent_url.clone(),
                state: HostState::Pending,
                trusted: false,
                profile: existing
                    .and_then(|h| h.profile)
                    .or_else(|| self.default_profile.clone()),
                ek_public: req.ek_public.clone(),
                ek_cert: req.ek_cert.clone(),
                ak_public: req.ak_public.clone(),
                ak_name: hex::encode(ak.name()),
                bind_key: None,
                pending: Some(pending),
                last_verdict: None,
                enrolled_ms: 0,
                tls_spki_sha256: None,
            },
        };
        put_host(store, &rec, None).await?;
        Ok(EnrollChallenge {
            enrollment_id,
            credential_blob: made.credential_blob,
            encrypted_secret: made.encrypted_secret,
        })
    }

    fn check_start(&self, req: &EnrollRequest, now_ms: u64) -> Result<(Public, Public), Error> {
        if !valid_name(&req.name) {
            return Err(Error::InvalidRequest(
                "host name must match [A-Za-z0-9._-]{1,64}".into(),
            ));
        }
        if !(req.agent_url.starts_with("http://") || req.agent_url.starts_with("https://")) {
            return Err(Error::InvalidRequest(
                "agent_url must be an http(s) URL".into(),
            ));
        }
        let spki = self.ca.validate(&req.ek_cert, now_ms / 1000).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("not a configured TPM vendor CA") {
                fail("ek_cert_untrusted", msg)
            } else {
                fail("ek_cert_invalid", msg)
            }
        })?;
        let ek =
            Public::parse_tpm2b(&req.ek_public).map_err(|e| fail("ek_invalid", e.to_string()))?;
        ek_matches_certificate(&ek, &spki).map_err(|e| fail("ek_mismatch", e.to_string()))?;
        let ak =
            Public::parse_tpm2b(&req.ak_public).map_err(|e| fail("ak_invalid", e.to_string()))?;
        check_ak_attributes(&ak)?;
        Ok((ek, ak))
    }

    /// Step 2: check the activated secret, the bind key and (over TLS) the AK's
    /// endorsement of the connection's client certificate; the host becomes enrolled.
    pub async fn finish<S: AttestStore>(
        &self,
        store: &S,
        req: &EnrollFinish,
        peer: Option<&TlsClient>,
        now_ms: u64,
    ) -> Result<HostRecord, Error> {
        let mut host = get_host(store, &req.name)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "host",
                id: req.name.clone(),
            })?;
        let audit = |result: &str, detail: String| AuditRecord {
            time_ms: now_ms,
            principal: format!("host:{}", req.name),
            operation: "EnrollHost".into(),
            subject: req.name.clone(),
            result: result.to_string(),
            detail,
        };
        let Some(p) = host.pending.clone() else {
            return Err(fail(
                "no_pending_enrollment",
                "no enrollment in progress for this host",
            ));
        };
        let got = hex::encode(digest::digest(&digest::SHA256, &req.secret));
        let ok_id = p.id == req.enrollment_id;
        let ok_secret = got.len() == p.secret_sha256.len()
            && got
                .bytes()
                .zip(p.secret_sha256.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if !ok_id || p.expires_ms < now_ms || !ok_secret {
            let (code, msg) = if !ok_id {
                ("enrollment_unknown", "unknown enrollment id")
            } else if p.expires_ms < now_ms {
                (
                    "enrollment_expired",
                    "the credential expired before activation",
                )
            } else {
                (
                    "ak_activation_failed",
                    "the returned secret is not the credential (AK not activated by the EK's TPM)",
                )
            };
            host.pending = None;
            put_host(store, &host, Some(audit(code, msg.into()))).await?;
            return Err(fail(code, msg));
        }
        let ak = Public::parse_tpm2b(&p.ak_public)?;
        if let Some(b) = &req.bind_key
            && let Err(e) = check_bind_key(&ak, b)
        {
            host.pending = None;
            put_host(store, &host, Some(audit("bind_key_invalid", e.to_string()))).await?;
            return Err(e);
        }
        // Over TLS: the certificate names this host and the AK endorsed exactly its key for
        // this enrollment. Without TLS: no binding (and none may be replaced by nothing).
        let tls_spki = match peer {
            Some(peer) => match check_peer_name(&req.name, Some(peer))
                .and_then(|()| check_tls_binding(&ak, &p.id, peer, req.tls_binding.as_ref()))
            {
                Ok(()) => Some(hex::encode(peer.spki_sha256)),
                Err(e) => {
                    let code = match &e {
                        Error::Enrollment { code, .. } => *code,
                        _ => "tls_binding_invalid",
                    };
                    host.pending = None;
                    put_host(store, &host, Some(audit(code, e.to_string()))).await?;
                    return Err(e);
                }
            },
            None if host.tls_spki_sha256.is_some() => {
                let msg = "the host is bound to a TLS client certificate; enroll over TLS";
                host.pending = None;
                put_host(
                    store,
                    &host,
                    Some(audit("tls_identity_missing", msg.into())),
                )
                .await?;
                return Err(fail("tls_identity_missing", msg));
            }
            None => None,
        };
        host.tls_spki_sha256 = tls_spki;
        host.bind_key = req.bind_key.clone();
        host.agent_url = p.agent_url.clone();
        host.ek_public = p.ek_public.clone();
        host.ek_cert = p.ek_cert.clone();
        host.ak_public = p.ak_public.clone();
        host.ak_name = hex::encode(ak.name());
        host.pending = None;
        host.state = HostState::Enrolled;
        host.trusted = false;
        host.enrolled_ms = now_ms;
        let detail = match &host.tls_spki_sha256 {
            Some(k) => format!("ak_name={} tls_spki_sha256={k}", host.ak_name),
            None => format!("ak_name={} tls=none", host.ak_name),
        };
        put_host(store, &host, Some(audit("ok", detail))).await?;
        Ok(host)
    }
}

/// Over TLS, the client certificate must name the host it enrolls (a host certificate
/// names its host: host B's certificate cannot enroll, nor re-enroll, host A).
fn check_peer_name(host: &str, peer: Option<&TlsClient>) -> Result<(), Error> {
    match peer {
        Some(p) if p.cert_name != host => Err(fail(
            "tls_identity_mismatch",
            format!(
                "the client certificate names '{}', not the host '{host}' being enrolled",
                p.cert_name.chars().take(64).collect::<String>()
            ),
        )),
        _ => Ok(()),
    }
}

/// The AK's quote over [`binding_nonce`]`(enrollment id, the connection's SPKI hash)`.
fn check_tls_binding(
    ak: &Public,
    enrollment_id: &str,
    peer: &TlsClient,
    binding: Option<&TlsBinding>,
) -> Result<(), Error> {
    let b = binding.ok_or_else(|| {
        fail(
            "tls_binding_missing",
            "an enrollment over TLS must carry the AK's endorsement of the client certificate",
        )
    })?;
    if b.spki_sha256 != hex::encode(peer.spki_sha256) {
        return Err(fail(
            "tls_identity_mismatch",
            "the endorsed key is not the client certificate of this connection",
        ));
    }
    let sig = Signature::parse(&b.quote_signature)
        .map_err(|e| fail("tls_binding_invalid", e.to_string()))?;
    verify_signature(ak, &b.quote_attest, &sig)
        .map_err(|e| fail("tls_binding_invalid", format!("AK signature: {e}")))?;
    let attest =
        Attest::parse(&b.quote_attest).map_err(|e| fail("tls_binding_invalid", e.to_string()))?;
    if !matches!(attest.attested, Attested::Quote { .. })
        || attest.extra_data != binding_nonce(enrollment_id, &peer.spki_sha256)
    {
        return Err(fail(
            "tls_binding_invalid",
            "the AK's quote is not over this enrollment and client certificate",
        ));
    }
    Ok(())
}
