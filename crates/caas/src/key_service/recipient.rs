//! Attestation-gated release on the key service (`docs/recipient.md`): the
//! [`caas_kms::recipient::RecipientVerifier`] over the registrar's records and the security
//! profiles ([`caas_tl::recipient`] checks the document, caas-attest's appraisal judges the
//! quote), and the route that issues its nonces, `POST /v1/recipient/challenge`
//! (`{"host"}` → `{"nonce", "selection"}`, a tenant or an operator with `hosts:read`;
//! audited as `RecipientChallenge`).
//!
//! Nonces ([`NonceBook`]) are 32 random bytes issued for one host, valid [`NONCE_TTL_MS`]
//! (shorter with [`ENV_NONCE_TTL`]) and used at most once, kept in the key service's shared
//! store (`caas-store`, SQLite or PostgreSQL; objects of kind [`NONCE_KIND`], MAC-protected
//! like every record): a nonce issued by one node is accepted by any node of the same
//! database, survives a restart, and is consumed by the first document that names it,
//! whatever its fate, with [`caas_store::Store::take`] — a conditional delete the database
//! arbitrates, so two nodes (or two requests) presenting one document cannot both use it.
//! At most [`MAX_NONCES`] are outstanding; expired ones are swept when new ones are issued.
use super::attest::KmsAttestStore;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use caas_attest::http_error::{ErrorKind, HttpError};
use caas_attest::store::{AuditRecord, get_host, get_profile};
use caas_attest::verifier::Challenge;
use caas_kms::recipient::{Attested, BoxFuture, RecipientVerifier, Refusal};
use caas_store::{Batch, Store, Write};
use caas_tl::recipient::Document;
use std::sync::Arc;

/// How long a nonce is valid (default).
pub const NONCE_TTL_MS: u64 = 60_000;
/// Environment variable that shortens the nonce lifetime (seconds, 1–60; tests of stale
/// documents).
pub const ENV_NONCE_TTL: &str = "CAAS_RECIPIENT_NONCE_TTL_SECS";
/// Most outstanding nonces (a full book refuses new challenges until some expire).
pub const MAX_NONCES: usize = 4096;
/// Object kind of the nonces in the store.
pub const NONCE_KIND: &str = "recipient_nonce";
/// Account of the nonce objects.
const NONCE_ACCOUNT: &str = "-";

/// One issued nonce, as stored.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Issued {
    host: String,
    issued_ms: u64,
    /// The issuing node's validity end: every node judges by the issuer's lifetime.
    expires_ms: u64,
}

/// Recipient nonces in the shared store (see the module doc).
#[derive(Debug, Clone)]
pub struct NonceBook {
    store: Store,
    ttl_ms: u64,
}

impl NonceBook {
    /// Over the key service's store, with the lifetime of [`NONCE_TTL_MS`] or
    /// [`ENV_NONCE_TTL`].
    pub fn new(store: Store) -> Self {
        let ttl_ms = std::env::var(ENV_NONCE_TTL)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| (1..=60).contains(s))
            .map_or(NONCE_TTL_MS, |s| s * 1000);
        Self { store, ttl_ms }
    }

    /// With an explicit lifetime (tests).
    #[cfg(test)]
    pub fn with_ttl(store: Store, ttl_ms: u64) -> Self {
        Self { store, ttl_ms }
    }

    /// Issues a fresh nonce for `host`, durable in the store before it is returned; sweeps
    /// expired nonces (kept twice their lifetime, so that a stale document is told so).
    pub async fn issue(&self, host: &str, now_ms: u64) -> Result<[u8; 32], HttpError> {
        let all = self
            .store
            .list(NONCE_KIND, Some(NONCE_ACCOUNT))
            .await
            .map_err(|_| HttpError::internal("storage"))?;
        let mut writes = Vec::new();
        let mut live = 0usize;
        for o in all {
            let stale = serde_json::from_slice::<Issued>(&o.body).map_or(true, |i| {
                now_ms > i.expires_ms.saturating_add(self.ttl_ms + 1000)
            });
            if stale {
                writes.push(Write::Delete {
                    kind: NONCE_KIND.into(),
                    account: NONCE_ACCOUNT.into(),
                    id: o.id,
                    expect_rev: None,
                });
            } else {
                live += 1;
            }
        }
        if live >= MAX_NONCES {
            return Err(HttpError::new(
                ErrorKind::Unavailable,
                "too_many_challenges",
                "too many outstanding recipient challenges; retry later",
            ));
        }
        let nonce: [u8; 32] =
            caas_crypto::random_array().map_err(|_| HttpError::internal("random"))?;
        let body = serde_json::to_vec(&Issued {
            host: host.to_string(),
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(self.ttl_ms),
        })
        .map_err(|_| HttpError::internal("nonce record"))?;
        writes.push(Write::Put {
            kind: NONCE_KIND.into(),
            account: NONCE_ACCOUNT.into(),
            id: hex::encode(nonce),
            body,
            expect_rev: Some(0),
        });
        self.store
            .commit(Batch {
                writes,
                audit: Vec::new(),
            })
            .await
            .map_err(|_| HttpError::internal("storage"))?;
        Ok(nonce)
    }

    /// Consumes `nonce` for `host` (whatever the outcome, it cannot be used again):
    /// `nonce_unknown` if no node issued it, it was used already or was issued for another
    /// host; `nonce_expired` if it outlived the issuer's lifetime.
    pub async fn consume(&self, host: &str, nonce: &[u8], now_ms: u64) -> Result<(), Refusal> {
        if nonce.len() != 32 {
            return Err(refuse(
                "nonce_unknown",
                "nonce not issued by this key service",
            ));
        }
        let taken = self
            .store
            .take(NONCE_KIND, NONCE_ACCOUNT, &hex::encode(nonce))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot consume a recipient nonce");
                refuse("internal", "nonce records unavailable")
            })?;
        let Some(o) = taken else {
            return Err(refuse(
                "nonce_unknown",
                "nonce not issued by this key service, or already used",
            ));
        };
        let issued: Issued = serde_json::from_slice(&o.body)
            .map_err(|_| refuse("internal", "nonce record unreadable"))?;
        if issued.host != host {
            return Err(refuse(
                "nonce_unknown",
                "the nonce was issued for another host",
            ));
        }
        if now_ms > issued.expires_ms {
            return Err(refuse(
                "nonce_expired",
                format!(
                    "the nonce is older than {} s",
                    issued.expires_ms.saturating_sub(issued.issued_ms) / 1000
                ),
            ));
        }
        Ok(())
    }
}

/// The key service's recipient verifier and nonce issuer.
#[derive(Debug)]
pub struct Recipients {
    store: Arc<KmsAttestStore>,
    nonces: NonceBook,
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
    /// Over the key service's attestation store (whose store keeps the nonces too).
    pub fn new(store: Arc<KmsAttestStore>) -> Self {
        let nonces = NonceBook::new(store.0.clone());
        Self { store, nonces }
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
        let nonce = self.nonces.issue(host, now_ms).await?;
        Ok(Challenge {
            nonce: nonce.to_vec(),
            selection: profile.selection(),
        })
    }

    async fn verify_document(&self, bytes: &[u8]) -> Result<Attested, Refusal> {
        let now = caas_attest::now_ms();
        let doc = Document::parse(bytes).map_err(refusal)?;
        let host = get_host(&*self.store, &doc.host)
            .await
            .map_err(|_| refuse("internal", "registrar records unavailable"))?;
        let ak = caas_tl::recipient::check_host(&doc, host.as_ref()).map_err(refusal)?;
        self.nonces.consume(&doc.host, &doc.nonce, now).await?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Attacks on the nonces from a client's position against the key service's nonce book
    //! on a real store shared by two nodes (two `Store` handles on one database, as two
    //! key-service processes), across a restart (the handles dropped and the database
    //! reopened), on SQLite and on PostgreSQL. The refusal codes are the ones the KMS
    //! request's audit record carries (`Detail.Recipient.Code`, `caas_kms::recipient`;
    //! audited end to end in `tests/recipient_attacks.rs`).
    use super::*;
    use caas_store::HmacRecordKey;

    struct Signer;
    impl caas_store::AuditSigner for Signer {
        fn sign(&self, hash: &[u8; 32]) -> Vec<u8> {
            hash.to_vec()
        }
    }

    async fn node(url: &str, ttl_ms: u64) -> NonceBook {
        let s = Store::open(
            url,
            Arc::new(Signer),
            Arc::new(HmacRecordKey::new(b"nonce test record key, 32 bytes!")),
        )
        .await
        .unwrap();
        NonceBook::with_ttl(s, ttl_ms)
    }

    fn code(r: Result<(), Refusal>) -> String {
        r.err().map_or_else(|| "ok".into(), |e| e.code)
    }

    async fn attacks(url: &str) {
        let now = 1_000_000u64;
        let a = node(url, 60_000).await;
        let b = node(url, 60_000).await;

        // A nonce issued by node A is accepted once, by node B; its replay is refused on
        // either node.
        let n = a.issue("host-1", now).await.unwrap();
        assert_eq!(code(b.consume("host-1", &n, now + 10).await), "ok");
        assert_eq!(
            code(a.consume("host-1", &n, now + 20).await),
            "nonce_unknown"
        );
        assert_eq!(
            code(b.consume("host-1", &n, now + 20).await),
            "nonce_unknown"
        );

        // Both nodes racing one document: exactly one wins.
        let n = a.issue("host-1", now).await.unwrap();
        let (r1, r2) = tokio::join!(
            a.consume("host-1", &n, now + 1),
            b.consume("host-1", &n, now + 1)
        );
        let mut codes = [code(r1), code(r2)];
        codes.sort();
        assert_eq!(codes, ["nonce_unknown".to_string(), "ok".to_string()]);

        // Issued for another host; never issued.
        let n = a.issue("host-1", now).await.unwrap();
        assert_eq!(
            code(b.consume("host-2", &n, now + 1).await),
            "nonce_unknown"
        );
        assert_eq!(
            code(b.consume("host-1", &n, now + 1).await),
            "nonce_unknown",
            "a nonce presented for the wrong host is consumed"
        );
        assert_eq!(
            code(b.consume("host-1", &[7u8; 32], now).await),
            "nonce_unknown"
        );
        assert_eq!(
            code(b.consume("host-1", &[7u8; 5], now).await),
            "nonce_unknown"
        );

        // Expired: refused as such on the other node, then gone.
        let n = a.issue("host-1", now).await.unwrap();
        assert_eq!(
            code(b.consume("host-1", &n, now + 60_001).await),
            "nonce_expired"
        );
        assert_eq!(
            code(a.consume("host-1", &n, now + 60_002).await),
            "nonce_unknown"
        );

        // Restart: one nonce used before, one outstanding.
        let used = a.issue("host-1", now).await.unwrap();
        assert_eq!(code(a.consume("host-1", &used, now + 5).await), "ok");
        let outstanding = a.issue("host-1", now).await.unwrap();
        let stale = a.issue("host-1", now).await.unwrap();
        drop(a);
        drop(b);
        let a = node(url, 60_000).await;
        assert_eq!(
            code(a.consume("host-1", &used, now + 10).await),
            "nonce_unknown",
            "a nonce used before the restart is refused after it"
        );
        assert_eq!(
            code(a.consume("host-1", &outstanding, now + 10).await),
            "ok",
            "an outstanding nonce survives the restart"
        );
        assert_eq!(
            code(a.consume("host-1", &stale, now + 70_000).await),
            "nonce_expired",
            "an expired nonce stays expired across the restart"
        );

        // A node with a longer lifetime still judges by the issuer's.
        let short = node(url, 1_000).await;
        let n = short.issue("host-1", now).await.unwrap();
        assert_eq!(
            code(a.consume("host-1", &n, now + 1_001).await),
            "nonce_expired"
        );

        // Sweeping: long-expired nonces leave the store when new ones are issued.
        let old = a.issue("host-1", now).await.unwrap();
        let _ = a.issue("host-1", now + 10 * 60_000).await.unwrap();
        assert!(
            a.store
                .get(NONCE_KIND, NONCE_ACCOUNT, &hex::encode(old))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recipient_nonces_are_shared_single_use_and_survive_restart_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        attacks(&format!("sqlite:{}", dir.path().join("kms.db").display())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recipient_nonces_are_shared_single_use_and_survive_restart_postgres() {
        let pg = caas_store::testing::PgCluster::start().unwrap_or_else(|e| panic!("{e}"));
        let url = pg
            .create_database("nonces")
            .unwrap_or_else(|e| panic!("{e}"));
        attacks(&url).await;
    }
}
