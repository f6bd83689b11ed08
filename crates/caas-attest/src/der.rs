//! A minimal DER writer for SubjectPublicKeyInfo, enough to turn TPM public keys into the
//! form X.509 certificates and aws-lc-rs use (RSA and NIST P-256/P-384 EC keys).

use crate::error::Error;
use crate::structures::{PublicKey, curve};

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = (n as u64)
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(body);
    out
}

fn uint(v: &[u8]) -> Vec<u8> {
    let v: Vec<u8> = v.iter().copied().skip_while(|&b| b == 0).collect();
    let mut body = Vec::with_capacity(v.len() + 1);
    if v.first().is_none_or(|&b| b & 0x80 != 0) {
        body.push(0);
    }
    body.extend_from_slice(&v);
    tlv(0x02, &body)
}

/// PKCS#1 RSAPublicKey DER.
pub fn rsa_public_key(n: &[u8], e: &[u8]) -> Vec<u8> {
    tlv(0x30, &[uint(n), uint(e)].concat())
}

/// Uncompressed EC point 04||x||y with coordinates left-padded to the curve size.
pub fn ec_point(curve_id: u16, x: &[u8], y: &[u8]) -> Result<Vec<u8>, Error> {
    let size = match curve_id {
        curve::NIST_P256 => 32,
        curve::NIST_P384 => 48,
        other => {
            return Err(Error::Unsupported {
                what: "ECC curve",
                value: other,
            });
        }
    };
    if x.len() > size || y.len() > size {
        return Err(Error::malformed(
            "TPMS_ECC_POINT",
            "coordinate longer than the curve size",
        ));
    }
    let mut p = vec![0x04];
    p.extend(std::iter::repeat_n(0, size - x.len()));
    p.extend_from_slice(x);
    p.extend(std::iter::repeat_n(0, size - y.len()));
    p.extend_from_slice(y);
    Ok(p)
}

/// SubjectPublicKeyInfo DER for a TPM public key.
pub fn spki(key: &PublicKey) -> Result<Vec<u8>, Error> {
    let (alg_id, bits) = match key {
        PublicKey::Rsa { n, e, .. } => (
            tlv(0x30, &[tlv(0x06, OID_RSA), vec![0x05, 0x00]].concat()),
            rsa_public_key(n, e),
        ),
        PublicKey::Ecc { curve: c, x, y } => {
            let oid = if *c == curve::NIST_P256 {
                OID_P256
            } else {
                OID_P384
            };
            let point = ec_point(*c, x, y)?;
            (
                tlv(0x30, &[tlv(0x06, OID_EC), tlv(0x06, oid)].concat()),
                point,
            )
        }
        PublicKey::Other => {
            return Err(Error::malformed("TPMT_PUBLIC", "object has no public key"));
        }
    };
    let mut bs = vec![0u8];
    bs.extend_from_slice(&bits);
    Ok(tlv(0x30, &[alg_id, tlv(0x03, &bs)].concat()))
}
