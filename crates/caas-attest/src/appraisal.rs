//! Appraisal: the pure core of the verifier. Given an enrolled AK, the nonce and PCR
//! selection that were asked for, the evidence (quote, signature, event log, reported PCR
//! values) and a security profile, it returns a verdict with machine-readable reasons.
//! Steps: parse → AK signature → quote type, nonce, selection → replay the event log and
//! tie it to the quoted PCR digest → compare events and values with the profile.

use crate::eventlog::{EV_NO_ACTION, EventLog};
use crate::profile::SecurityProfile;
use crate::quote::verify_signature;
use crate::structures::{Attest, Attested, PcrSelection, Public, Signature};
use std::collections::BTreeMap;

/// Evidence a host agent returns for a challenge.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// TPMS_ATTEST of TPM2_Quote.
    #[serde(with = "crate::b64")]
    pub quote: Vec<u8>,
    /// TPMT_SIGNATURE over it.
    #[serde(with = "crate::b64")]
    pub signature: Vec<u8>,
    /// TCG PC Client crypto-agile binary event log.
    #[serde(with = "crate::b64")]
    pub event_log: Vec<u8>,
    /// PCR values (hex) in selection order as read by the agent — untrusted, but bound by the
    /// quote's PCR digest; they let the verifier name the PCR that differs.
    #[serde(default)]
    pub pcr_values: Vec<String>,
}

/// Why a host is not trusted. Serialised as `{"code": "...", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reason {
    /// A part of the evidence does not parse.
    EvidenceMalformed {
        /// `quote`, `signature`, `event_log` or `pcr_values`.
        part: String,
        /// Parser message.
        detail: String,
    },
    /// The quote is not signed by the host's enrolled AK.
    SignatureInvalid {
        /// Verifier message.
        detail: String,
    },
    /// The signed structure is not a quote.
    NotAQuote,
    /// The quote's extraData is not the nonce asked for.
    NonceMismatch,
    /// The nonce was never issued for this host.
    NonceUnknown,
    /// The nonce was issued too long ago.
    NonceExpired,
    /// The nonce was already used.
    NonceReplayed,
    /// The quote covers other PCRs than asked for.
    PcrSelectionMismatch {
        /// Asked for.
        expected: PcrSelection,
        /// In the quote.
        quoted: Vec<PcrSelection>,
    },
    /// The reported PCR values do not hash to the quoted digest.
    PcrValuesMismatch,
    /// The event log does not replay to the quoted value of this PCR (edited, truncated or
    /// reordered log, or a PCR extended outside the log).
    EventLogReplayMismatch {
        /// PCR index.
        pcr: u32,
        /// Value the log replays to (hex).
        replayed: String,
        /// Value the TPM quoted (hex).
        quoted: String,
    },
    /// The log replays to a different PCR digest than quoted (no per-PCR values reported).
    PcrDigestMismatch,
    /// An event whose digest is not among the profile's reference values.
    EventNotInProfile {
        /// PCR index.
        pcr: u32,
        /// Position of the event in the log (0 = first after the header).
        index: usize,
        /// EV_* type.
        event_type: u32,
        /// Digest (hex).
        digest: String,
    },
    /// A reference event that the log does not contain.
    ExpectedEventMissing {
        /// PCR index.
        pcr: u32,
        /// Digest (hex).
        digest: String,
    },
    /// A final PCR value not allowed by the profile.
    PcrValueNotInProfile {
        /// PCR index.
        pcr: u32,
        /// Value (hex).
        value: String,
    },
    /// The host is not enrolled (or its enrollment was not completed).
    HostNotEnrolled,
    /// The host's profile does not exist.
    ProfileNotFound {
        /// Profile name.
        name: String,
    },
    /// The host agent could not be reached or answered with an error.
    HostUnreachable {
        /// Transport or agent message.
        detail: String,
    },
}

/// The result of one appraisal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Whether the host is trusted under the profile.
    pub trusted: bool,
    /// Profile appraised against.
    pub profile: String,
    /// Why not (empty when trusted).
    pub reasons: Vec<Reason>,
    /// PCR values the log replays to (hex), for the selected PCRs.
    #[serde(default)]
    pub pcrs: BTreeMap<u32, String>,
    /// TPM reset count at quote time.
    #[serde(default)]
    pub reset_count: u32,
    /// Unix time in milliseconds of the appraisal.
    #[serde(default)]
    pub time_ms: u64,
}

impl Verdict {
    /// A failed verdict with a single reason (no evidence appraised).
    pub fn fail(profile: &str, reason: Reason, time_ms: u64) -> Self {
        Self {
            trusted: false,
            profile: profile.to_string(),
            reasons: vec![reason],
            pcrs: BTreeMap::new(),
            reset_count: 0,
            time_ms,
        }
    }
}

/// Appraises `evidence` (see the module doc). `nonce` and `selection` are what was asked.
pub fn appraise(
    ak: &Public,
    nonce: &[u8],
    evidence: &Evidence,
    profile: &SecurityProfile,
    time_ms: u64,
) -> Verdict {
    let mut v = Verdict {
        trusted: false,
        profile: profile.name.clone(),
        reasons: Vec::new(),
        pcrs: BTreeMap::new(),
        reset_count: 0,
        time_ms,
    };
    let malformed = |part: &str, e: crate::Error| Reason::EvidenceMalformed {
        part: part.into(),
        detail: e.to_string(),
    };
    let attest = match Attest::parse(&evidence.quote) {
        Ok(a) => a,
        Err(e) => return done(v, malformed("quote", e)),
    };
    let sig = match Signature::parse(&evidence.signature) {
        Ok(s) => s,
        Err(e) => return done(v, malformed("signature", e)),
    };
    if let Err(e) = verify_signature(ak, &evidence.quote, &sig) {
        return done(
            v,
            Reason::SignatureInvalid {
                detail: e.to_string(),
            },
        );
    }
    v.reset_count = attest.clock_info.reset_count;
    let Attested::Quote {
        selection,
        pcr_digest,
    } = &attest.attested
    else {
        return done(v, Reason::NotAQuote);
    };
    if !constant_time_eq(&attest.extra_data, nonce) {
        v.reasons.push(Reason::NonceMismatch);
    }
    let expected = profile.selection();
    if selection.len() != 1 || selection[0] != expected {
        v.reasons.push(Reason::PcrSelectionMismatch {
            expected,
            quoted: selection.clone(),
        });
        return v;
    }
    let log = match EventLog::parse(&evidence.event_log) {
        Ok(l) => l,
        Err(e) => return done(v, malformed("event_log", e)),
    };
    let replay = match log.replay(profile.bank) {
        Ok(r) => r,
        Err(e) => return done(v, malformed("event_log", e)),
    };
    let zero = vec![0u8; profile.bank.digest_len()];
    let replayed: Vec<&[u8]> = expected
        .pcrs
        .iter()
        .map(|p| replay.get(p).map_or(zero.as_slice(), |x| x.as_slice()))
        .collect();
    for (p, val) in expected.pcrs.iter().zip(&replayed) {
        v.pcrs.insert(*p, hex::encode(val));
    }
    let quote_hash = sig.hash();
    // Quoted per-PCR values, when the reported ones are bound by the quote digest.
    let mut quoted: Option<Vec<Vec<u8>>> = None;
    if !evidence.pcr_values.is_empty() {
        let parsed: Result<Vec<Vec<u8>>, _> = evidence.pcr_values.iter().map(hex::decode).collect();
        match parsed {
            Ok(vals)
                if vals.len() == expected.pcrs.len()
                    && vals.iter().all(|x| x.len() == profile.bank.digest_len()) =>
            {
                let refs: Vec<&[u8]> = vals.iter().map(|x| x.as_slice()).collect();
                if quote_hash.hash_parts(&refs) == *pcr_digest {
                    quoted = Some(vals);
                } else {
                    v.reasons.push(Reason::PcrValuesMismatch);
                }
            }
            _ => v.reasons.push(Reason::EvidenceMalformed {
                part: "pcr_values".into(),
                detail: "wrong count or length".into(),
            }),
        }
    }
    match &quoted {
        Some(vals) => {
            for ((p, r), q) in expected.pcrs.iter().zip(&replayed).zip(vals) {
                if *r != q.as_slice() {
                    v.reasons.push(Reason::EventLogReplayMismatch {
                        pcr: *p,
                        replayed: hex::encode(r),
                        quoted: hex::encode(q),
                    });
                }
            }
        }
        None => {
            if quote_hash.hash_parts(&replayed) != *pcr_digest {
                v.reasons.push(Reason::PcrDigestMismatch);
            }
        }
    }
    // Profile: events.
    for (pcr, reference) in &profile.pcrs {
        if !reference.events.is_empty() || !reference.required.is_empty() {
            let mut seen = vec![false; reference.required.len()];
            for (i, e) in log.events.iter().enumerate() {
                if e.pcr != *pcr || e.event_type == EV_NO_ACTION {
                    continue;
                }
                let d = e.digest(profile.bank).map(hex::encode).unwrap_or_default();
                if let Some(k) = reference
                    .required
                    .iter()
                    .position(|r| r.eq_ignore_ascii_case(&d))
                {
                    seen[k] = true;
                }
                if !reference.events.is_empty()
                    && !reference.events.iter().any(|r| r.eq_ignore_ascii_case(&d))
                {
                    v.reasons.push(Reason::EventNotInProfile {
                        pcr: *pcr,
                        index: i,
                        event_type: e.event_type,
                        digest: d,
                    });
                }
            }
            for (k, s) in seen.iter().enumerate() {
                if !s {
                    v.reasons.push(Reason::ExpectedEventMissing {
                        pcr: *pcr,
                        digest: reference.required[k].clone(),
                    });
                }
            }
        }
        if !reference.values.is_empty() {
            let idx = expected.pcrs.iter().position(|p| p == pcr);
            let val = match (&quoted, idx) {
                (Some(q), Some(i)) => q.get(i).map(hex::encode),
                (None, Some(i)) => replayed.get(i).map(hex::encode),
                _ => None,
            }
            .unwrap_or_default();
            if !reference
                .values
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&val))
            {
                v.reasons.push(Reason::PcrValueNotInProfile {
                    pcr: *pcr,
                    value: val,
                });
            }
        }
    }
    v.trusted = v.reasons.is_empty();
    v
}

fn done(mut v: Verdict, r: Reason) -> Verdict {
    v.reasons.push(r);
    v.trusted = false;
    v
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
