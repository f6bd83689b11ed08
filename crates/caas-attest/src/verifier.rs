//! The verifier, protocol P2: issue a fresh nonce and the profile's PCR selection, obtain
//! evidence from the host agent, check that the nonce was issued to that host, is fresh and
//! unused, appraise the evidence against the host's security profile, and store the verdict
//! (a host is trusted only while its latest attestation passes). Trust changes are audited.

use crate::appraisal::{Evidence, Reason, Verdict, appraise};
use crate::error::Error;
use crate::store::{
    AttestStore, AuditRecord, HostRecord, HostState, get_host, get_profile, put_host,
};
use crate::structures::{PcrSelection, Public};
use aws_lc_rs::rand;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// A challenge for one host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Challenge {
    /// Fresh nonce (becomes the quote's extraData).
    #[serde(with = "crate::b64")]
    pub nonce: Vec<u8>,
    /// PCRs to quote.
    pub selection: PcrSelection,
}

/// Where evidence comes from (the host agent over HTTP in production).
pub trait EvidenceSource: Send + Sync + 'static {
    /// Asks the host for evidence answering `challenge`.
    fn fetch(
        &self,
        host: &HostRecord,
        challenge: &Challenge,
    ) -> impl Future<Output = Result<Evidence, String>> + Send;
}

#[derive(Debug, Clone)]
struct NonceEntry {
    host: String,
    issued_ms: u64,
    used: bool,
}

/// A change of a host's trust state (for audit hooks and key revocation).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrustEvent {
    /// Host name.
    pub host: String,
    /// New state.
    pub trusted: bool,
    /// The verdict that caused it.
    pub verdict: Verdict,
}

/// The verifier.
#[derive(Debug)]
pub struct Verifier<S> {
    store: Arc<S>,
    nonces: Mutex<HashMap<Vec<u8>, NonceEntry>>,
    /// Maximum age of a nonce, ms.
    pub nonce_ttl_ms: u64,
}

impl<S: AttestStore> Verifier<S> {
    /// A verifier over `store`.
    pub fn new(store: Arc<S>, nonce_ttl_ms: u64) -> Self {
        Self {
            store,
            nonces: Mutex::new(HashMap::new()),
            nonce_ttl_ms,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Issues a challenge for an enrolled host with a profile.
    pub async fn challenge(&self, host: &str, now_ms: u64) -> Result<Challenge, Error> {
        let h = get_host(&*self.store, host)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "host",
                id: host.into(),
            })?;
        let pname = h
            .profile
            .clone()
            .ok_or_else(|| Error::InvalidRequest(format!("host {host} has no security profile")))?;
        let profile = get_profile(&*self.store, &pname)
            .await?
            .ok_or(Error::NotFound {
                kind: "profile",
                id: pname,
            })?;
        let mut nonce = vec![0u8; 32];
        rand::fill(&mut nonce).map_err(|_| Error::Crypto("random"))?;
        let mut m = self
            .nonces
            .lock()
            .map_err(|_| Error::Storage("nonce table poisoned".into()))?;
        let ttl = self.nonce_ttl_ms;
        m.retain(|_, e| e.issued_ms + 2 * ttl + 1000 > now_ms);
        m.insert(
            nonce.clone(),
            NonceEntry {
                host: host.into(),
                issued_ms: now_ms,
                used: false,
            },
        );
        Ok(Challenge {
            nonce,
            selection: profile.selection(),
        })
    }

    fn consume_nonce(
        &self,
        host: &str,
        nonce: &[u8],
        now_ms: u64,
    ) -> Result<Option<Reason>, Error> {
        let mut m = self
            .nonces
            .lock()
            .map_err(|_| Error::Storage("nonce table poisoned".into()))?;
        Ok(match m.get_mut(nonce) {
            None => Some(Reason::NonceUnknown),
            Some(e) if e.host != host => Some(Reason::NonceUnknown),
            Some(e) if e.used => Some(Reason::NonceReplayed),
            Some(e) => {
                e.used = true;
                if now_ms.saturating_sub(e.issued_ms) > self.nonce_ttl_ms {
                    Some(Reason::NonceExpired)
                } else {
                    None
                }
            }
        })
    }

    /// Appraises evidence answering the challenge with `nonce`; stores and returns the
    /// verdict, and the trust change if there was one.
    pub async fn verify(
        &self,
        host: &str,
        nonce: &[u8],
        evidence: &Evidence,
        now_ms: u64,
    ) -> Result<(Verdict, Option<TrustEvent>), Error> {
        let mut h = get_host(&*self.store, host)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "host",
                id: host.into(),
            })?;
        let pname = h.profile.clone().unwrap_or_default();
        let verdict = if h.state != HostState::Enrolled {
            Verdict::fail(&pname, Reason::HostNotEnrolled, now_ms)
        } else if let Some(r) = self.consume_nonce(host, nonce, now_ms)? {
            Verdict::fail(&pname, r, now_ms)
        } else {
            match get_profile(&*self.store, &pname).await? {
                None => Verdict::fail(
                    &pname,
                    Reason::ProfileNotFound {
                        name: pname.clone(),
                    },
                    now_ms,
                ),
                Some(profile) => {
                    let ak = Public::parse_tpm2b(&h.ak_public)?;
                    appraise(&ak, nonce, evidence, &profile, now_ms)
                }
            }
        };
        let event = self.record(&mut h, verdict.clone(), now_ms).await?;
        Ok((verdict, event))
    }

    /// Stores a verdict on the host record, auditing a change of trust.
    pub async fn record(
        &self,
        h: &mut HostRecord,
        verdict: Verdict,
        now_ms: u64,
    ) -> Result<Option<TrustEvent>, Error> {
        let changed = h.trusted != verdict.trusted;
        h.trusted = verdict.trusted;
        h.last_verdict = Some(verdict.clone());
        let audit = changed.then(|| AuditRecord {
            time_ms: now_ms,
            principal: "system".into(),
            operation: if verdict.trusted {
                "HostTrusted".into()
            } else {
                "HostUntrusted".into()
            },
            subject: h.name.clone(),
            result: if verdict.trusted {
                "ok".into()
            } else {
                reason_codes(&verdict)
            },
            detail: serde_json::to_string(&verdict.reasons).unwrap_or_default(),
        });
        put_host(&*self.store, h, audit).await?;
        Ok(changed.then(|| TrustEvent {
            host: h.name.clone(),
            trusted: verdict.trusted,
            verdict,
        }))
    }

    /// Runs one attestation now: challenge → evidence from `source` → verdict.
    pub async fn attest<E: EvidenceSource>(
        &self,
        source: &E,
        host: &str,
    ) -> Result<(Verdict, Option<TrustEvent>), Error> {
        let now = crate::now_ms();
        let h = get_host(&*self.store, host)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "host",
                id: host.into(),
            })?;
        if h.state != HostState::Enrolled {
            let mut h = h;
            let v = Verdict::fail(
                h.profile.as_deref().unwrap_or(""),
                Reason::HostNotEnrolled,
                now,
            );
            let ev = self.record(&mut h, v.clone(), now).await?;
            return Ok((v, ev));
        }
        let ch = match self.challenge(host, now).await {
            Ok(c) => c,
            Err(Error::NotFound {
                kind: "profile",
                id,
            }) => {
                let mut h = h;
                let v = Verdict::fail(&id, Reason::ProfileNotFound { name: id.clone() }, now);
                let ev = self.record(&mut h, v.clone(), now).await?;
                return Ok((v, ev));
            }
            Err(e) => return Err(e),
        };
        match source.fetch(&h, &ch).await {
            Ok(ev) => self.verify(host, &ch.nonce, &ev, crate::now_ms()).await,
            Err(detail) => {
                let mut h = h;
                let v = Verdict::fail(
                    h.profile.as_deref().unwrap_or(""),
                    Reason::HostUnreachable { detail },
                    now,
                );
                let ev = self.record(&mut h, v.clone(), now).await?;
                Ok((v, ev))
            }
        }
    }
}

/// Comma-separated reason codes of a verdict.
pub fn reason_codes(v: &Verdict) -> String {
    v.reasons
        .iter()
        .map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|j| j.get("code").and_then(|c| c.as_str().map(String::from)))
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(",")
}
