//! Attestation-gated release on the key service (`docs/recipient.md`): the
//! [`caas_kms::recipient::RecipientVerifier`] over the registrar's records and the security
//! profiles ([`caas_tl::recipient`] checks the document, caas-attest's appraisal judges the
//! quote), and the route that issues its nonces, `POST /v1/recipient/challenge`
//! (`{"host"}` → `{"nonce", "selection"}`, a tenant or an operator with `hosts:read`;
//! audited as `RecipientChallenge`).
//!
//! Nonces are 32 random bytes issued for one host, valid [`NONCE_TTL_MS`] (shorter with
//! [`ENV_NONCE_TTL`]) and used at most
//! once (consumed by the first document that names them, whatever its fate), kept in this
//! process's memory (at most [`MAX_NONCES`] outstanding): a document is accepted only by
//! the key-service process that issued its nonce, and a restart voids every nonce.
use super::attest::KmsAttestStore;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use caas_attest::http_error::{ErrorKind, HttpError};
use caas_attest::store::{AuditRecord, get_host, get_profile};
use caas_attest::verifier::Challenge;
use caas_kms::recipient::{Attested, BoxFuture, RecipientVerifier, Refusal};
use caas_tl::recipient::Document;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How long a nonce is valid (default).
pub const NONCE_TTL_MS: u64 = 60_000;
/// Environment variable that shortens the nonce lifetime (seconds, 1–60; tests of stale
/// documents).
pub const ENV_NONCE_TTL: &str = "CAAS_RECIPIENT_NONCE_TTL_SECS";
/// Most outstanding nonces (a full table refuses new challenges until some expire).
pub const MAX_NONCES: usize = 4096;

#[derive(Debug)]
struct Issued {
    host: String,
    issued_ms: u64,
}

/// The key service's recipient verifier and nonce issuer.
#[derive(Debug)]
pub struct Recipients {
    store: Arc<KmsAttestStore>,
    nonces: Mutex<HashMap<[u8; 32], Issued>>,
    ttl_ms: u64,
}

fn refusal(e: caas_tl::Error) -> Refusal {
    Refusal {
        code: e.code().to_string(),
        message: e.to_string(),
    }
}

fn refuse(code: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        code: code.into(),
        message: message.into(),
    }
}

impl Recipients {
    /// Over the key service's attestation store.
    pub fn new(store: Arc<KmsAttestStore>) -> Self {
        let ttl_ms = std::env::var(ENV_NONCE_TTL)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| (1..=60).contains(s))
            .map_or(NONCE_TTL_MS, |s| s * 1000);
        Self {
            store,
            nonces: Mutex::new(HashMap::new()),
            ttl_ms,
        }
    }

    /// Issues a nonce for an enrolled host with a profile, and the PCR selection of its
    /// profile (what the quote and the recipient key's policy must cover).
    pub async fn challenge(&self, host: &str, now_ms: u64) -> Result<Challenge, HttpError> {
        let h = get_host(&*self.store, host)
            .await
            .map_err(|_| HttpError::internal("storage"))?
            .filter(|h| h.state == caas_attest::store::HostState::Enrolled)
            .ok_or_else(|| {
                HttpError::new(ErrorKind::NotFound, "host_unknown", "no such enrolled host")
            })?;
        let pname = h.profile.clone().ok_or_else(|| {
            HttpError::new(
                ErrorKind::BadRequest,
                "no_profile",
                "the host has no security profile",
            )
        })?;
        let profile = get_profile(&*self.store, &pname)
            .await
            .map_err(|_| HttpError::internal("storage"))?
            .ok_or_else(|| {
                HttpError::new(ErrorKind::NotFound, "profile_unknown", "no such profile")
            })?;
        let nonce: [u8; 32] = caas_crypto::random_bytes(32)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| HttpError::internal("random"))?;
        {
            let mut m = self
                .nonces
                .lock()
                .map_err(|_| HttpError::internal("nonce table"))?;
            // Expired nonces stay a while, so that a stale document is told so.
            m.retain(|_, e| now_ms.saturating_sub(e.issued_ms) <= 2 * self.ttl_ms + 1000);
            if m.len() >= MAX_NONCES {
                return Err(HttpError::new(
                    ErrorKind::Unavailable,
                    "too_many_challenges",
                    "too many outstanding recipient challenges; retry later",
                ));
            }
            m.insert(
                nonce,
                Issued {
                    host: host.to_string(),
                    issued_ms: now_ms,
                },
            );
        }
        Ok(Challenge {
            nonce: nonce.to_vec(),
            selection: profile.selection(),
        })
    }

    /// Consumes `nonce` for `host`.
    fn consume(&self, host: &str, nonce: &[u8], now_ms: u64) -> Result<(), Refusal> {
        let key: [u8; 32] = nonce
            .try_into()
            .map_err(|_| refuse("nonce_unknown", "nonce not issued by this key service"))?;
        let mut m = self
            .nonces
            .lock()
            .map_err(|_| refuse("internal", "nonce table unavailable"))?;
        match m.remove(&key) {
            None => Err(refuse(
                "nonce_unknown",
                "nonce not issued by this key service, or already used",
            )),
            Some(e) if e.host != host => Err(refuse(
                "nonce_unknown",
                "the nonce was issued for another host",
            )),
            Some(e) if now_ms.saturating_sub(e.issued_ms) > self.ttl_ms => Err(refuse(
                "nonce_expired",
                format!("the nonce is older than {} s", self.ttl_ms / 1000),
            )),
            Some(_) => Ok(()),
        }
    }

    async fn verify_document(&self, bytes: &[u8]) -> Result<Attested, Refusal> {
        let now = caas_attest::now_ms();
        let doc = Document::parse(bytes).map_err(refusal)?;
        let host = get_host(&*self.store, &doc.host)
            .await
            .map_err(|_| refuse("internal", "registrar records unavailable"))?;
        let ak = caas_tl::recipient::check_host(&doc, host.as_ref()).map_err(refusal)?;
        self.consume(&doc.host, &doc.nonce, now)?;
        let pname = host
            .and_then(|h| h.profile)
            .ok_or_else(|| refuse("attestation_failed", "the host has no security profile"))?;
        let profile = get_profile(&*self.store, &pname)
            .await
            .map_err(|_| refuse("internal", "profiles unavailable"))?
            .ok_or_else(|| refuse("attestation_failed", "the host's profile does not exist"))?;
        let v = caas_tl::recipient::verify(&doc, &ak, &profile, now).map_err(refusal)?;
        Ok(Attested {
            host: v.host,
            profile: v.profile,
            pcrs: v.pcrs,
            recipient_public: v.recipient_public,
        })
    }
}

impl RecipientVerifier for Recipients {
    fn verify<'a>(&'a self, document: &'a [u8]) -> BoxFuture<'a, Result<Attested, Refusal>> {
        Box::pin(self.verify_document(document))
    }

    fn seal(&self, recipient: &Attested, secret: &[u8]) -> Result<Vec<u8>, Refusal> {
        caas_tl::recipient::seal(&recipient.recipient_public, secret).map_err(refusal)
    }
}

/// Body of `POST /v1/recipient/challenge`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// The host whose TPM will hold the recipient key.
    pub host: String,
}

/// `POST /v1/recipient/challenge`.
pub async fn challenge_route(
    State(r): State<Arc<Recipients>>,
    p: Option<Extension<caas_attest::service::Principal>>,
    Json(req): Json<ChallengeRequest>,
) -> Response {
    let who = p.map_or_else(|| "anonymous".to_string(), |Extension(p)| p.0);
    if !caas_attest::registrar::valid_name(&req.host) {
        return HttpError::new(ErrorKind::BadRequest, "bad_host", "invalid host name")
            .into_response();
    }
    let now = caas_attest::now_ms();
    let res = r.challenge(&req.host, now).await;
    let audit = AuditRecord {
        time_ms: now,
        principal: who,
        operation: "RecipientChallenge".into(),
        subject: req.host.clone(),
        result: match &res {
            Ok(_) => "ok".into(),
            Err(e) => e.body().code.clone(),
        },
        detail: String::new(),
    };
    use caas_attest::store::AttestStore as _;
    if let Err(e) = r.store.audit(audit).await {
        tracing::error!(error = %e, "cannot audit a recipient challenge");
        return HttpError::internal("audit").into_response();
    }
    match res {
        Ok(c) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}
