//! Just enough DER for PKCS#11 attribute values: EC parameters (curve OIDs), EC points as
//! OCTET STRINGs, and RSA public keys built from CKA_MODULUS/CKA_PUBLIC_EXPONENT. Parsing
//! is strict and bounded; any malformed input yields `None`.

/// DER OID of prime256v1 (1.2.840.10045.3.1.7), as CKA_EC_PARAMS.
pub const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID of secp384r1 (1.3.132.0.34).
pub const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// DER OID of NIST P-521 (secp521r1, 1.3.132.0.35).
pub const OID_P521: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];
/// DER OID of Ed25519 (1.3.101.112).
pub const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// PrintableString "edwards25519" (the form OpenSC and SoftHSM also accept).
pub const NAME_ED25519: &[u8] = b"\x13\x0cedwards25519";
/// DER OID of X25519 (1.3.101.110, RFC 8410), CKA_EC_PARAMS of a CKK_EC_MONTGOMERY key.
pub const OID_X25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x6e];
/// PrintableString "curve25519" (PKCS#11 3.0 §2.3.7's name form for Montgomery keys).
pub const NAME_X25519: &[u8] = b"\x13\x0acurve25519";

/// DER OID of Ed448 (1.3.101.113, RFC 8410).
pub const OID_ED448: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x71];
/// PrintableString "edwards448" (PKCS#11 3.0 §2.3.6's name form).
pub const NAME_ED448: &[u8] = b"\x13\x0aedwards448";

/// Whether CKA_EC_PARAMS names Ed448 (OID or name).
#[must_use]
pub fn is_ed448(params: &[u8]) -> bool {
    params == OID_ED448 || params == NAME_ED448
}

/// Whether CKA_EC_PARAMS names X25519 (OID or name).
#[must_use]
pub fn is_x25519(params: &[u8]) -> bool {
    params == OID_X25519 || params == NAME_X25519
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Encodes one TLV.
#[must_use]
pub fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    out.push(tag);
    put_len(&mut out, value.len());
    out.extend_from_slice(value);
    out
}

/// Encodes an unsigned big-endian integer as a DER INTEGER.
#[must_use]
pub fn uint(be: &[u8]) -> Vec<u8> {
    let skip = be.iter().take_while(|b| **b == 0).count();
    let mut v = Vec::with_capacity(be.len() + 1);
    let digits = &be[skip..];
    if digits.first().is_none_or(|b| *b & 0x80 != 0) {
        v.push(0);
    }
    v.extend_from_slice(digits);
    tlv(0x02, &v)
}

/// PKCS#1 RSAPublicKey from modulus and exponent.
#[must_use]
pub fn rsa_public_key(n: &[u8], e: &[u8]) -> Vec<u8> {
    let mut body = uint(n);
    body.extend_from_slice(&uint(e));
    tlv(0x30, &body)
}

/// Reads one TLV from the front of `input`: (tag, value, rest).
#[must_use]
pub fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for b in &rest[..n] {
            len = (len << 8) | *b as usize;
        }
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The contents of a DER OCTET STRING that spans all of `input`.
#[must_use]
pub fn octet_string(input: &[u8]) -> Option<&[u8]> {
    match read_tlv(input)? {
        (0x04, v, []) => Some(v),
        _ => None,
    }
}

/// Unsigned big-endian value of a DER INTEGER TLV, without leading zeros.
fn read_uint(input: &[u8]) -> Option<(&[u8], &[u8])> {
    match read_tlv(input)? {
        (0x02, v, rest) => {
            let skip = v.iter().take_while(|b| **b == 0).count();
            Some((&v[skip..], rest))
        }
        _ => None,
    }
}

/// The components of an RSA private key.
#[derive(Debug)]
pub struct RsaParts<'a> {
    /// n, e, d, p, q, dp, dq, qinv, each big-endian without leading zeros.
    pub n: &'a [u8],
    /// Public exponent.
    pub e: &'a [u8],
    /// Private exponent.
    pub d: &'a [u8],
    /// First prime.
    pub p: &'a [u8],
    /// Second prime.
    pub q: &'a [u8],
    /// d mod (p-1).
    pub dp: &'a [u8],
    /// d mod (q-1).
    pub dq: &'a [u8],
    /// q^-1 mod p.
    pub qinv: &'a [u8],
}

/// Parses the RSAPrivateKey inside a PKCS#8 PrivateKeyInfo.
#[must_use]
pub fn rsa_parts_from_pkcs8(pkcs8: &[u8]) -> Option<RsaParts<'_>> {
    let (0x30, info, []) = read_tlv(pkcs8)? else {
        return None;
    };
    let (_version, rest) = read_uint(info)?;
    let (0x30, _alg, rest) = read_tlv(rest)? else {
        return None;
    };
    let (0x04, key, _) = read_tlv(rest)? else {
        return None;
    };
    let (0x30, seq, _) = read_tlv(key)? else {
        return None;
    };
    let (_v, r) = read_uint(seq)?;
    let (n, r) = read_uint(r)?;
    let (e, r) = read_uint(r)?;
    let (d, r) = read_uint(r)?;
    let (p, r) = read_uint(r)?;
    let (q, r) = read_uint(r)?;
    let (dp, r) = read_uint(r)?;
    let (dq, r) = read_uint(r)?;
    let (qinv, _) = read_uint(r)?;
    Some(RsaParts {
        n,
        e,
        d,
        p,
        q,
        dp,
        dq,
        qinv,
    })
}

/// The DigestInfo prefixes of PKCS#1 v1.5 (RFC 8017 §9.2 note 1), by hash length.
pub const DIGEST_INFO_PREFIXES: &[(&[u8], usize)] = &[
    (
        &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        32,
    ),
    (
        &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        48,
    ),
    (
        &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
        64,
    ),
];

/// Splits a DigestInfo into (hash length, hash) when it uses SHA-256/384/512.
#[must_use]
pub fn parse_digest_info(input: &[u8]) -> Option<(usize, &[u8])> {
    DIGEST_INFO_PREFIXES.iter().find_map(|(prefix, len)| {
        let rest = input.strip_prefix(*prefix)?;
        (rest.len() == *len).then_some((*len, rest))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_roundtrip_long_lengths() {
        let v = vec![7u8; 300];
        let enc = tlv(0x04, &v);
        assert_eq!(&enc[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(octet_string(&enc), Some(&v[..]));
        assert_eq!(octet_string(&enc[..enc.len() - 1]), None);
        assert_eq!(read_tlv(&[0x04, 0x85, 1, 1, 1, 1, 1]), None);
    }

    #[test]
    fn uint_adds_sign_byte() {
        assert_eq!(uint(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(
            uint(&[0x00, 0x01, 0x00, 0x01]),
            vec![0x02, 0x03, 0x01, 0x00, 0x01]
        );
    }

    #[test]
    fn digest_info_prefix() {
        let mut di = DIGEST_INFO_PREFIXES[0].0.to_vec();
        di.extend_from_slice(&[1u8; 32]);
        assert_eq!(parse_digest_info(&di), Some((32, &[1u8; 32][..])));
        assert_eq!(parse_digest_info(&di[..40]), None);
    }
}
