//! AWS Signature Version 4 for the KMS endpoint: verification on the server and signing
//! for caas's own client (`caas demo`, `caas volume create`).
//!
//! The KMS JSON protocol only ever uses `POST /` with a body, but the canonicaliser follows
//! the general rules (path, sorted query, trimmed headers) so that any SDK's signature
//! verifies. Comparison is constant-time; a request is accepted only within ±5 minutes of
//! the server clock, and only when `host` and `x-amz-date` are among the signed headers.
use aws_lc_rs::{digest, hmac};
use std::fmt::Write as _;

/// Allowed clock skew between client and server, in seconds.
pub const MAX_SKEW_SECS: i64 = 300;

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No or malformed `Authorization` header.
    Missing(String),
    /// Signature does not match.
    Mismatch,
    /// Timestamp out of window.
    Expired,
}

/// The parsed `Authorization` header.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// Access key id.
    pub access_key_id: String,
    /// `YYYYMMDD` of the credential scope.
    pub date: String,
    /// Region of the credential scope.
    pub region: String,
    /// Service of the credential scope.
    pub service: String,
    /// Lower-case signed header names, in the order given.
    pub signed_headers: Vec<String>,
    /// The hex signature.
    pub signature: String,
}

/// The parts of an HTTP request that SigV4 covers. Header names must be lower case.
#[derive(Debug)]
pub struct Request<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path, as sent.
    pub path: &'a str,
    /// Raw query string without `?`.
    pub query: &'a str,
    /// All headers (lower-case names); repeated names allowed.
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

/// Parses `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=hex`.
pub fn parse_authorization(value: &str) -> Result<Authorization, AuthError> {
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256")
        .ok_or_else(|| AuthError::Missing("Authorization must use AWS4-HMAC-SHA256".into()))?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            cred = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            sig = Some(v);
        }
    }
    let missing = |w: &str| AuthError::Missing(format!("Authorization header lacks {w}"));
    let cred = cred.ok_or_else(|| missing("Credential"))?;
    let signed = signed.ok_or_else(|| missing("SignedHeaders"))?;
    let sig = sig.ok_or_else(|| missing("Signature"))?;
    let parts: Vec<&str> = cred.split('/').collect();
    if parts.len() != 5 || parts[4] != "aws4_request" || parts[1].len() != 8 {
        return Err(AuthError::Missing("malformed Credential scope".into()));
    }
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Missing("malformed Signature".into()));
    }
    Ok(Authorization {
        access_key_id: parts[0].to_string(),
        date: parts[1].to_string(),
        region: parts[2].to_string(),
        service: parts[3].to_string(),
        signed_headers: signed.split(';').map(|s| s.to_ascii_lowercase()).collect(),
        signature: sig.to_ascii_lowercase(),
    })
}

fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn trim_collapse(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// URI-encodes per SigV4 (unreserved characters kept; `/` kept when `keep_slash`).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hexval = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hexval(bytes[i + 1]), hexval(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical_query(q: &str) -> String {
    if q.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(String, String)> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// Builds the canonical request for the given signed headers.
pub fn canonical_request(req: &Request<'_>, signed_headers: &[String]) -> String {
    let path = if req.path.is_empty() { "/" } else { req.path };
    let mut out = String::with_capacity(256 + req.headers.len() * 32);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&uri_encode(&percent_decode(path), true));
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    let mut names: Vec<&String> = signed_headers.iter().collect();
    names.sort();
    names.dedup();
    for name in &names {
        let vals: Vec<String> = header_values(req.headers, name)
            .into_iter()
            .map(trim_collapse)
            .collect();
        let _ = writeln!(out, "{}:{}", name, vals.join(","));
    }
    out.push('\n');
    out.push_str(
        &names
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(";"),
    );
    out.push('\n');
    let payload = header_values(req.headers, "x-amz-content-sha256")
        .first()
        .map(|s| s.to_string())
        .filter(|s| s != "UNSIGNED-PAYLOAD")
        .unwrap_or_else(|| sha256_hex(req.body));
    out.push_str(&payload);
    out
}

/// The SigV4 signing key for a secret, date, region and service.
pub fn signing_key(secret: &[u8], date: &str, region: &str, service: &str) -> hmac::Key {
    let mut k = Vec::with_capacity(4 + secret.len());
    k.extend_from_slice(b"AWS4");
    k.extend_from_slice(secret);
    let k_date = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &k), date.as_bytes());
    zeroize::Zeroize::zeroize(&mut k);
    let k_region = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, k_date.as_ref()),
        region.as_bytes(),
    );
    let k_service = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, k_region.as_ref()),
        service.as_bytes(),
    );
    let k_signing = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, k_service.as_ref()),
        b"aws4_request",
    );
    hmac::Key::new(hmac::HMAC_SHA256, k_signing.as_ref())
}

fn string_to_sign(amz_date: &str, scope: &str, canonical: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    )
}

/// Parses `YYYYMMDDTHHMMSSZ` into Unix seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Formats Unix seconds as `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Verifies a request against `key` (from [`signing_key`] for the credential scope).
/// `now` is Unix seconds.
pub fn verify(
    req: &Request<'_>,
    auth: &Authorization,
    key: &hmac::Key,
    now: i64,
) -> Result<(), AuthError> {
    for required in ["host", "x-amz-date"] {
        if !auth.signed_headers.iter().any(|h| h == required) {
            return Err(AuthError::Missing(format!(
                "'{required}' must be a signed header"
            )));
        }
    }
    let amz_date = header_values(req.headers, "x-amz-date")
        .first()
        .copied()
        .ok_or_else(|| AuthError::Missing("missing X-Amz-Date".into()))?;
    let t = parse_amz_date(amz_date)
        .ok_or_else(|| AuthError::Missing("malformed X-Amz-Date".into()))?;
    if !amz_date.starts_with(&auth.date) {
        return Err(AuthError::Missing(
            "credential date does not match X-Amz-Date".into(),
        ));
    }
    if (t - now).abs() > MAX_SKEW_SECS {
        return Err(AuthError::Expired);
    }
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let canonical = canonical_request(req, &auth.signed_headers);
    let sts = string_to_sign(amz_date, &scope, &canonical);
    let expect = hmac::sign(key, sts.as_bytes());
    let given = hex::decode(&auth.signature).map_err(|_| AuthError::Mismatch)?;
    aws_lc_rs::constant_time::verify_slices_are_equal(expect.as_ref(), &given)
        .map_err(|_| AuthError::Mismatch)
}

/// Signs a request: returns the `Authorization` header value. `req.headers` must already
/// contain `host` and `x-amz-date`; every header in it is signed.
pub fn sign(
    req: &Request<'_>,
    access_key_id: &str,
    secret: &[u8],
    region: &str,
    service: &str,
) -> Result<String, AuthError> {
    let amz_date = header_values(req.headers, "x-amz-date")
        .first()
        .copied()
        .ok_or_else(|| AuthError::Missing("missing x-amz-date".into()))?;
    let date = amz_date
        .get(..8)
        .ok_or_else(|| AuthError::Missing("bad x-amz-date".into()))?;
    let mut names: Vec<String> = req.headers.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let canonical = canonical_request(req, &names);
    let sts = string_to_sign(amz_date, &scope, &canonical);
    let key = signing_key(secret, date, region, service);
    let sig = hex::encode(hmac::sign(&key, sts.as_bytes()));
    Ok(format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={sig}",
        names.join(";")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// AWS SigV4 test suite, `get-vanilla` (aws-sig-v4-test-suite).
    #[test]
    fn aws_test_suite_get_vanilla() {
        let headers = hdrs(&[
            ("host", "example.amazonaws.com"),
            ("x-amz-date", "20150830T123600Z"),
        ]);
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let auth = sign(&req, "AKIDEXAMPLE", SECRET, "us-east-1", "service").unwrap_or_default();
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        let parsed = parse_authorization(&auth);
        assert!(parsed.is_ok());
        if let Ok(p) = parsed {
            let key = signing_key(SECRET, &p.date, &p.region, &p.service);
            let now = parse_amz_date("20150830T123600Z").unwrap_or(0);
            assert_eq!(verify(&req, &p, &key, now), Ok(()));
            assert_eq!(verify(&req, &p, &key, now + 301), Err(AuthError::Expired));
            let other = hdrs(&[
                ("host", "example.amazonaws.com"),
                ("x-amz-date", "20150830T123600Z"),
                ("x-extra", "1"),
            ]);
            let tampered = Request {
                method: "POST",
                ..Request {
                    headers: &other,
                    ..req
                }
            };
            assert_eq!(verify(&tampered, &p, &key, now), Err(AuthError::Mismatch));
        }
    }

    #[test]
    fn dates_round_trip() {
        for s in [
            "19700101T000000Z",
            "20150830T123600Z",
            "20000229T235959Z",
            "20261123T160432Z",
        ] {
            let t = parse_amz_date(s);
            assert!(t.is_some(), "{s}");
            assert_eq!(format_amz_date(t.unwrap_or(0)), s);
        }
        assert_eq!(parse_amz_date("20150830T123600"), None);
        assert_eq!(parse_amz_date("2015x830T123600Z"), None);
        assert_eq!(parse_amz_date("20151330T123600Z"), None);
    }

    #[test]
    fn malformed_authorization_is_rejected() {
        for bad in [
            "",
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms, SignedHeaders=host, Signature=00",
            "Basic abc",
            "AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=zz",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad}");
        }
    }
}
