//! A host's TLS client identity, bound to its TPM identity at enrollment.
//!
//! A deployment-CA certificate with the `host` role says only "some host of this
//! deployment": the CA may have issued one to every machine, and whoever administers host B
//! holds B's. So the key service does not trust the certificate's name alone. At
//! enrollment the agent presents its certificate on the TLS connection *and* has its AK
//! sign (a TPM quote whose qualifying data is [`binding_nonce`]) the SHA-256 of that
//! certificate's SubjectPublicKeyInfo together with the enrollment id; the registrar checks,
//! at `finish`, that
//!
//! 1. the connection's client certificate names this host (subject CN = host name) and its
//!    SPKI hash is the one in the binding (the sender holds that private key),
//! 2. the quote is by the AK whose credential this TPM just activated, over exactly that
//!    SPKI hash and enrollment id (the TPM identity endorses that TLS key),
//!
//! and records the hash with the host ([`crate::store::HostRecord::tls_spki_sha256`]).
//! From then on every host-protocol request naming the host (TL attest, DBSP domain key
//! and epoch) must come over a connection whose client certificate has that SPKI and that
//! name ([`check_request`]); anything else is refused with `tls_identity_mismatch` (and
//! audited by the caller's component). A certificate re-issued with a new key is refused
//! until the host re-enrolls, which needs its TPM (same EK, credential activation) and a
//! certificate naming it.
//!
//! Requests that arrive without TLS (the loopback plain-HTTP key service of `caas dev`)
//! carry no client identity: a host enrolled that way has no binding, and a host *with* a
//! binding is refused without one (no downgrade).

use crate::store::HostRecord;
use aws_lc_rs::digest;

/// Domain separation of the binding quote's qualifying data.
pub const LABEL: &[u8] = b"caas-enroll-tls-v1\0";

/// The verified client certificate of the connection a host request came over (put on
/// the request by the key service's authentication layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsClient {
    /// Subject common name (a host certificate names its host).
    pub cert_name: String,
    /// SHA-256 of its SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
}

/// The agent's binding, sent in [`crate::registrar::EnrollFinish::tls_binding`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsBinding {
    /// SHA-256 of the agent certificate's SubjectPublicKeyInfo (hex).
    pub spki_sha256: String,
    /// TPMS_ATTEST of a quote by the AK with qualifying data [`binding_nonce`].
    #[serde(with = "crate::b64")]
    pub quote_attest: Vec<u8>,
    /// Its TPMT_SIGNATURE.
    #[serde(with = "crate::b64")]
    pub quote_signature: Vec<u8>,
}

/// The qualifying data the AK quotes: SHA-256(LABEL ‖ len(id) ‖ id ‖ spki_sha256).
pub fn binding_nonce(enrollment_id: &str, spki_sha256: &[u8; 32]) -> [u8; 32] {
    let mut c = digest::Context::new(&digest::SHA256);
    c.update(LABEL);
    c.update(&(enrollment_id.len() as u32).to_be_bytes());
    c.update(enrollment_id.as_bytes());
    c.update(spki_sha256);
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// Why a host request's TLS identity was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable code: `tls_identity_missing`, `tls_identity_mismatch`, `tls_identity_unbound`.
    pub code: &'static str,
    /// What did not match (names and hash prefixes only).
    pub message: String,
}

fn short(h: &[u8]) -> String {
    hex::encode(&h[..h.len().min(8)])
}

/// Whether a request naming `host` may be served to the connection's `peer` (see the module
/// doc). `None`: the request came without TLS.
pub fn check_request(host: &HostRecord, peer: Option<&TlsClient>) -> Result<(), Refusal> {
    match (&host.tls_spki_sha256, peer) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(Refusal {
            code: "tls_identity_missing",
            message: format!(
                "host {} is bound to a TLS client certificate; this request came without one",
                host.name
            ),
        }),
        (None, Some(_)) => Err(Refusal {
            code: "tls_identity_unbound",
            message: format!(
                "host {} enrolled without a TLS identity; it must re-enroll over TLS",
                host.name
            ),
        }),
        (Some(bound), Some(p)) => {
            let got = hex::encode(p.spki_sha256);
            if p.cert_name != host.name || !ct_eq(bound.as_bytes(), got.as_bytes()) {
                return Err(Refusal {
                    code: "tls_identity_mismatch",
                    message: format!(
                        "the client certificate ({}, key {}…) is not the one host {} enrolled with (key {}…)",
                        p.cert_name,
                        short(&p.spki_sha256),
                        host.name,
                        bound.chars().take(16).collect::<String>()
                    ),
                });
            }
            Ok(())
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn host(bound: Option<[u8; 32]>) -> HostRecord {
        HostRecord {
            name: "host-a".into(),
            agent_url: "https://a".into(),
            state: crate::store::HostState::Enrolled,
            trusted: true,
            profile: None,
            ek_public: vec![],
            ek_cert: vec![],
            ak_public: vec![],
            ak_name: String::new(),
            bind_key: None,
            pending: None,
            last_verdict: None,
            enrolled_ms: 0,
            tls_spki_sha256: bound.map(hex::encode),
        }
    }

    #[test]
    fn only_the_enrolled_key_under_the_hosts_name_passes() {
        let a = TlsClient {
            cert_name: "host-a".into(),
            spki_sha256: [1; 32],
        };
        assert!(check_request(&host(Some([1; 32])), Some(&a)).is_ok());
        // Host B's certificate (another key, another name).
        let b = TlsClient {
            cert_name: "host-b".into(),
            spki_sha256: [2; 32],
        };
        let e = check_request(&host(Some([1; 32])), Some(&b)).unwrap_err();
        assert_eq!(e.code, "tls_identity_mismatch");
        // A certificate re-issued for host-a with a new key.
        let reissued = TlsClient {
            cert_name: "host-a".into(),
            spki_sha256: [3; 32],
        };
        let e = check_request(&host(Some([1; 32])), Some(&reissued)).unwrap_err();
        assert_eq!(e.code, "tls_identity_mismatch");
        // Host A's key under another name (a CA that signed the same key twice).
        let renamed = TlsClient {
            cert_name: "host-b".into(),
            spki_sha256: [1; 32],
        };
        assert!(check_request(&host(Some([1; 32])), Some(&renamed)).is_err());
        // No downgrade to a request without TLS; no TLS request for an unbound host.
        assert_eq!(
            check_request(&host(Some([1; 32])), None).unwrap_err().code,
            "tls_identity_missing"
        );
        assert_eq!(
            check_request(&host(None), Some(&a)).unwrap_err().code,
            "tls_identity_unbound"
        );
        assert!(check_request(&host(None), None).is_ok());
    }

    #[test]
    fn the_nonce_binds_the_enrollment_and_the_key() {
        let n = binding_nonce("e1", &[1; 32]);
        assert_ne!(n, binding_nonce("e2", &[1; 32]));
        assert_ne!(n, binding_nonce("e1", &[2; 32]));
    }
}
