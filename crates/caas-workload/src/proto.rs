//! The challenge protocol over the PSK channel (one request, one answer, each a single
//! JSON line): the DM proves its identity with an Ed25519 signature over a fresh nonce
//! ("vm verifies the authenticity of DM", seed 003 §4.3), and the workload answers with a
//! [`WorkloadReport`]. That the TLS handshake completed at all proves to the DM that the
//! workload holds τ, i.e. was launched by a secure component that passed attestation.
use crate::error::{Error, Result};
use crate::psk;
use crate::vsm::verify_vsm_signature;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use caas_crypto::SecretBytes;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Domain separation of the DM's challenge signature.
pub const CHALLENGE_CONTEXT: &[u8] = b"caas-workload challenge v1";
/// Domain separation of the workload's VSM signature.
pub const VSM_CONTEXT: &[u8] = b"caas-workload vsm v1";
/// Length of the DM's nonce.
pub const NONCE_LEN: usize = 32;
/// Longest request line the workload reads (its peer is untrusted).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Longest answer line the DM reads.
pub const MAX_ANSWER_LINE: usize = 1 << 20;
/// Error code: the DM signature did not verify under the injected pk_DM.
pub const ERR_DM_SIGNATURE: &str = "dm_signature_invalid";
/// Error code: the request was not a well-formed challenge.
pub const ERR_BAD_REQUEST: &str = "bad_request";
/// Error code: this nonce was already answered.
pub const ERR_REPLAY: &str = "nonce_replayed";

/// Timeout of the DM's TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout of the DM's session.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The bytes the DM signs: `"caas-workload challenge v1" ‖ vm_id ‖ nonce`.
#[must_use]
pub fn challenge_message(vm_id: &str, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    [CHALLENGE_CONTEXT, vm_id.as_bytes(), nonce].concat()
}

/// The bytes the workload signs in its crypto domain:
/// `"caas-workload vsm v1" ‖ nonce ‖ SHA-256(disk) ‖ vm_id`.
#[must_use]
pub fn vsm_message(vm_id: &str, nonce: &[u8; NONCE_LEN], disk_sha256: &[u8; 32]) -> Vec<u8> {
    [VSM_CONTEXT, nonce, disk_sha256, vm_id.as_bytes()].concat()
}

/// The DM's request: `{"nonce": b64, "sig": b64}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeRequest {
    /// 32 random bytes, base64.
    pub nonce: String,
    /// Ed25519 signature by sk_DM over [`challenge_message`], base64.
    pub sig: String,
}

/// The workload's answer to a verified challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// The workload's identifier.
    pub vm_id: String,
    /// The DM's nonce, echoed (base64).
    pub nonce: String,
    /// SHA-256 of the whole boot disk as read through NBD (hex).
    pub disk_sha256: String,
    /// Size of the boot disk in bytes.
    pub disk_size: u64,
    /// A signature made inside the tenant's crypto domain, when the workload has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsm: Option<VsmSignature>,
    /// The marker-block check of each extra volume.
    #[serde(default)]
    pub volumes: Vec<VolumeCheck>,
}

/// A signature by a key held in the crypto domain over [`vsm_message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsmSignature {
    /// `CKM_ECDSA_SHA256` (P-256).
    pub mechanism: String,
    /// The public key: uncompressed SEC1 point, base64.
    pub public_point: String,
    /// Raw r‖s, base64.
    pub signature: String,
}

/// Whether a marker block could be written to and read back from a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCheck {
    /// The volume's NBD URI.
    pub uri: String,
    /// True when the marker read back equals what was written.
    pub ok: bool,
    /// Which step failed (connect, size, write, flush, read, mismatch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An error answer: `{"error": CODE}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// One of the `ERR_*` codes.
    pub error: String,
}

/// Reads one `\n`-terminated line of at most `max` bytes (without the newline). EOF before
/// a newline ends the line; a longer line is an error (nothing beyond `max + 1` bytes is
/// buffered).
pub fn read_line_bounded<R: BufRead>(r: &mut R, max: usize) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    std::io::Read::take(&mut *r, max as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(Error::io("read line"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(Error::Protocol(format!("line longer than {max} bytes")));
    }
    Ok(line)
}

/// Decodes base64 into a fixed-size array.
pub(crate) fn b64_array<const N: usize>(s: &str, what: &str) -> Result<[u8; N]> {
    let v = B64
        .decode(s)
        .map_err(|_| Error::Protocol(format!("{what} is not base64")))?;
    v.as_slice()
        .try_into()
        .map_err(|_| Error::Protocol(format!("{what} must be {N} bytes, got {}", v.len())))
}

/// The DM side of the last trusted-launch step: connects to the workload over the PSK
/// channel (identity `vm_id`, PSK τ), sends a nonce signed with sk_DM, reads the report,
/// and checks that it answers this challenge (vm_id, nonce) and that the VSM signature, if
/// present, verifies. A handshake error means the peer does not hold τ.
pub fn challenge(
    addr: SocketAddr,
    vm_id: &str,
    tau: &SecretBytes,
    sk_dm: &Ed25519KeyPair,
) -> Result<WorkloadReport> {
    let nonce: [u8; NONCE_LEN] = caas_crypto::random_array().map_err(|_| Error::Rng)?;
    challenge_with_nonce(addr, vm_id, tau, sk_dm, &nonce)
}

/// [`challenge`] with a caller-chosen nonce (tests of replay protection).
pub fn challenge_with_nonce(
    addr: SocketAddr,
    vm_id: &str,
    tau: &SecretBytes,
    sk_dm: &Ed25519KeyPair,
    nonce: &[u8; NONCE_LEN],
) -> Result<WorkloadReport> {
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(Error::io("connect to workload"))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(Error::io("set timeout"))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(Error::io("set timeout"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = psk::connect(tcp, vm_id, tau)?;
    let req = ChallengeRequest {
        nonce: B64.encode(nonce),
        sig: B64.encode(sk_dm.sign(&challenge_message(vm_id, nonce))),
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| Error::Protocol(e.to_string()))?;
    line.push(b'\n');
    tls.write_all(&line).map_err(Error::io("send challenge"))?;
    tls.flush().map_err(Error::io("send challenge"))?;
    let answer = read_line_bounded(&mut BufReader::new(&mut tls), MAX_ANSWER_LINE)?;
    let _ = tls.shutdown();
    let report = parse_answer(&answer)?;
    check_report(&report, vm_id, nonce)?;
    Ok(report)
}

fn parse_answer(answer: &[u8]) -> Result<WorkloadReport> {
    if answer.is_empty() {
        return Err(Error::Protocol(
            "the workload closed without answering".into(),
        ));
    }
    if let Ok(e) = serde_json::from_slice::<ErrorAnswer>(answer) {
        return Err(match e.error.as_str() {
            ERR_DM_SIGNATURE => Error::DmSignatureInvalid,
            _ => Error::Remote(e.error.chars().take(200).collect()),
        });
    }
    serde_json::from_slice(answer).map_err(|e| Error::Protocol(format!("bad report: {e}")))
}

/// Checks that `report` answers the challenge (`vm_id`, `nonce`) and that its VSM
/// signature, if any, verifies.
pub fn check_report(report: &WorkloadReport, vm_id: &str, nonce: &[u8; NONCE_LEN]) -> Result<()> {
    if report.vm_id != vm_id {
        return Err(Error::ReportMismatch(format!(
            "report is for vm {:?}, expected {vm_id:?}",
            report.vm_id
        )));
    }
    if b64_array::<NONCE_LEN>(&report.nonce, "nonce")? != *nonce {
        return Err(Error::ReportMismatch("report answers another nonce".into()));
    }
    let disk: [u8; 32] = hex::decode(&report.disk_sha256)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Protocol("disk_sha256 is not 32 hex bytes".into()))?;
    if let Some(v) = &report.vsm {
        if v.mechanism != crate::vsm::VSM_MECHANISM {
            return Err(Error::Protocol(format!(
                "unsupported VSM mechanism {:?}",
                v.mechanism
            )));
        }
        let point = B64
            .decode(&v.public_point)
            .map_err(|_| Error::Protocol("public_point is not base64".into()))?;
        let sig = B64
            .decode(&v.signature)
            .map_err(|_| Error::Protocol("signature is not base64".into()))?;
        verify_vsm_signature(&point, &vsm_message(vm_id, nonce, &disk), &sig)?;
    }
    Ok(())
}

/// The raw public key of an Ed25519 key pair (what the host agent injects as pk_DM).
#[must_use]
pub fn public_key_bytes(sk_dm: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    let pk = sk_dm.public_key().as_ref();
    if pk.len() == 32 {
        out.copy_from_slice(pk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines() -> Result<()> {
        let mut r = std::io::Cursor::new(b"abc\ndef".to_vec());
        assert_eq!(read_line_bounded(&mut r, 8)?, b"abc");
        assert_eq!(read_line_bounded(&mut r, 8)?, b"def");
        assert_eq!(read_line_bounded(&mut r, 8)?, b"");
        let mut r = std::io::Cursor::new(vec![b'x'; 100]);
        assert!(matches!(
            read_line_bounded(&mut r, 64),
            Err(Error::Protocol(_))
        ));
        // Exactly at the bound, with its newline.
        let mut r = std::io::Cursor::new([vec![b'y'; 64], vec![b'\n']].concat());
        assert_eq!(read_line_bounded(&mut r, 64)?.len(), 64);
        Ok(())
    }

    #[test]
    fn signed_messages_are_domain_separated() {
        let n = [1u8; NONCE_LEN];
        let c = challenge_message("vm-1", &n);
        assert!(c.starts_with(CHALLENGE_CONTEXT) && c.ends_with(&n));
        let v = vsm_message("vm-1", &n, &[2u8; 32]);
        assert!(v.starts_with(VSM_CONTEXT) && v.ends_with(b"vm-1"));
        assert_ne!(challenge_message("vm-1", &n), challenge_message("vm-2", &n));
    }

    #[test]
    fn error_answers_map_to_errors() {
        assert!(matches!(
            parse_answer(br#"{"error":"dm_signature_invalid"}"#),
            Err(Error::DmSignatureInvalid)
        ));
        assert!(matches!(
            parse_answer(br#"{"error":"x"}"#),
            Err(Error::Remote(_))
        ));
        assert!(matches!(parse_answer(b""), Err(Error::Protocol(_))));
        assert!(matches!(parse_answer(b"[]"), Err(Error::Protocol(_))));
    }
}
