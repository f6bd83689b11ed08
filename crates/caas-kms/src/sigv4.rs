//! AWS Signature Version 4 for the KMS endpoint: verification on the server and signing
//! for caas's own client (`caas demo`, `caas volume create`).
//!
//! Two layers, both used by [`crate::Kms::authenticate`]:
//! - [`verify_signature`] is plain SigV4 (canonical request, string to sign, HMAC chain),
//!   checked against the AWS SigV4 test suite. The payload hash is **always** computed over
//!   the received body; an `x-amz-content-sha256` header is never trusted in its place.
//! - [`check_request`] is what the KMS endpoint demands of a request before its signature
//!   counts: `host`, `x-amz-date`, `x-amz-target` and `content-type` (plus
//!   `x-amz-content-sha256` / `x-amz-security-token` when sent) are signed, sent once, and
//!   present; the credential scope is `<date of x-amz-date>/<this region>/kms/aws4_request`;
//!   the time is within ±5 minutes of the server clock; `x-amz-content-sha256`, when sent,
//!   equals the hash of the body (no `UNSIGNED-PAYLOAD` / streaming payloads).
//!
//! Comparison is constant-time. Errors name what is wrong in the words AWS uses
//! (`IncompleteSignatureException`, `InvalidSignatureException`), never a secret.
use aws_lc_rs::{digest, hmac};
use std::fmt::Write as _;

/// Allowed clock skew between client and server, in seconds.
pub const MAX_SKEW_SECS: i64 = 300;

/// Headers a KMS request must sign, besides `host` and `x-amz-date`.
pub const KMS_SIGNED_HEADERS: &[&str] = &["content-type", "x-amz-target"];

/// Headers that, when present in a request, must be signed.
const SIGNED_WHEN_PRESENT: &[&str] = &["x-amz-content-sha256", "x-amz-security-token"];

/// Headers that may appear at most once (their value selects what is executed or checked).
const SINGLE_VALUED: &[&str] = &[
    "host",
    "x-amz-date",
    "x-amz-target",
    "content-type",
    "x-amz-content-sha256",
    "x-amz-security-token",
];

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header at all (`MissingAuthenticationTokenException`).
    Missing(String),
    /// The `Authorization` header is malformed, or a required header is not signed or not
    /// sent (`IncompleteSignatureException`).
    Incomplete(String),
    /// The request contradicts its signature's scope or payload hash
    /// (`InvalidSignatureException` with this message).
    Invalid(String),
    /// The signature does not match (`InvalidSignatureException`).
    Mismatch,
    /// Timestamp out of window (`InvalidSignatureException`, "Signature expired").
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

/// One header: its lower-case name and its value as text.
pub type Header<'a> = (&'a str, std::borrow::Cow<'a, str>);

/// [`Header`]s borrowed from owned pairs (a client's, a test's).
pub fn borrowed(headers: &[(String, String)]) -> Vec<Header<'_>> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), std::borrow::Cow::Borrowed(v.as_str())))
        .collect()
}

/// The parts of an HTTP request that SigV4 covers. Header names must be lower case.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path, as sent.
    pub path: &'a str,
    /// Raw query string without `?`.
    pub query: &'a str,
    /// All headers (lower-case names); repeated names allowed. Borrowed from the HTTP
    /// request where they are UTF-8 (no copy per header per request).
    pub headers: &'a [Header<'a>],
    /// The body.
    pub body: &'a [u8],
}

/// What the endpoint expects of a request's scope and signed headers.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The endpoint's own region.
    pub region: &'a str,
    /// The service name (`kms`).
    pub service: &'a str,
    /// Headers that must be signed besides `host` and `x-amz-date`.
    pub signed: &'a [&'a str],
    /// Server time, Unix seconds.
    pub now: i64,
}

/// Parses `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=hex`.
pub fn parse_authorization(value: &str) -> Result<Authorization, AuthError> {
    let inc = |m: &str| AuthError::Incomplete(m.to_string());
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| inc("Authorization header must use the AWS4-HMAC-SHA256 algorithm."))?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let slot = if let Some(v) = part.strip_prefix("Credential=") {
            (&mut cred, v)
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            (&mut signed, v)
        } else if let Some(v) = part.strip_prefix("Signature=") {
            (&mut sig, v)
        } else {
            return Err(inc("Authorization header has an unknown parameter."));
        };
        if slot.0.replace(slot.1).is_some() {
            return Err(inc("Authorization header repeats a parameter."));
        }
    }
    let cred = cred.ok_or_else(|| inc("Authorization header requires 'Credential' parameter."))?;
    let signed =
        signed.ok_or_else(|| inc("Authorization header requires 'SignedHeaders' parameter."))?;
    let sig = sig.ok_or_else(|| inc("Authorization header requires 'Signature' parameter."))?;
    let parts: Vec<&str> = cred.split('/').collect();
    let bad_scope = || {
        inc(
            "Credential must have the form <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request.",
        )
    };
    if parts.len() != 5 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad_scope());
    }
    if parts[4] != "aws4_request" {
        return Err(AuthError::Invalid(
            "Credential should be scoped with a valid terminator: 'aws4_request'.".into(),
        ));
    }
    if parts[1].len() != 8 || !parts[1].bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_scope());
    }
    if parts[0].len() > 128 || !parts[0].bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad_scope());
    }
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(inc("Signature must be 64 hexadecimal characters."));
    }
    let mut signed_headers = Vec::new();
    for name in signed.split(';') {
        let name = name.to_ascii_lowercase();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(inc("SignedHeaders contains an invalid header name."));
        }
        if signed_headers.contains(&name) {
            return Err(inc("SignedHeaders repeats a header name."));
        }
        signed_headers.push(name);
    }
    Ok(Authorization {
        access_key_id: parts[0].to_string(),
        date: parts[1].to_string(),
        region: parts[2].to_string(),
        service: parts[3].to_string(),
        signed_headers,
        signature: sig.to_ascii_lowercase(),
    })
}

fn header_values<'a>(headers: &'a [Header<'a>], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v.as_ref())
        .collect()
}

/// Appends `v` trimmed, with each run of whitespace inside it collapsed to one space
/// (SigV4's canonical header value), without an intermediate allocation.
fn push_trim_collapse(out: &mut String, v: &str) {
    for (i, word) in v.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
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
    let mut out = String::with_capacity(64);
    push_sha256_hex(&mut out, data);
    out
}

/// Appends the lower-case hex SHA-256 of `data` to `out` (no intermediate string).
fn push_sha256_hex(out: &mut String, data: &[u8]) {
    let d = digest::digest(&digest::SHA256, data);
    let mut buf = [0u8; 64];
    if hex::encode_to_slice(d.as_ref(), &mut buf).is_ok()
        && let Ok(h) = std::str::from_utf8(&buf)
    {
        out.push_str(h);
    }
}

/// Builds the canonical request for the given signed headers; the payload hash is the
/// SHA-256 of `req.body`.
pub fn canonical_request(req: &Request<'_>, signed_headers: &[String]) -> String {
    let path = if req.path.is_empty() { "/" } else { req.path };
    let mut out = String::with_capacity(256 + req.headers.len() * 32);
    out.push_str(req.method);
    out.push('\n');
    // The path as received (already percent-encoded on the wire), encoded once more: the
    // canonical URI of every AWS SDK for services other than S3 ("double encoding").
    out.push_str(&uri_encode(path, true));
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    let mut names: Vec<&String> = signed_headers.iter().collect();
    names.sort();
    names.dedup();
    for name in &names {
        out.push_str(name);
        out.push(':');
        // Repeated headers: their values in order, comma-separated.
        for (i, (_, v)) in req.headers.iter().filter(|(n, _)| n == name).enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_trim_collapse(&mut out, v);
        }
        out.push('\n');
    }
    out.push('\n');
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        out.push_str(name);
    }
    out.push('\n');
    // Always the hash of the bytes received: a client-supplied `x-amz-content-sha256` is
    // only compared against it (see `check_request`), never used in its place.
    push_sha256_hex(&mut out, req.body);
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

/// The string to sign; `scope` in pieces (concatenated), so that no scope string is built.
fn string_to_sign<const N: usize>(amz_date: &str, scope: [&str; N], canonical: &str) -> String {
    let scope_len: usize = scope.iter().map(|p| p.len()).sum();
    let mut out = String::with_capacity(18 + amz_date.len() + scope_len + 64);
    out.push_str("AWS4-HMAC-SHA256\n");
    out.push_str(amz_date);
    out.push('\n');
    for p in scope {
        out.push_str(p);
    }
    out.push('\n');
    push_sha256_hex(&mut out, canonical.as_bytes());
    out
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

fn single<'a>(req: &Request<'a>, name: &str) -> Result<Option<&'a str>, AuthError> {
    let mut it = req
        .headers
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v.as_ref());
    let first = it.next();
    if it.next().is_some() {
        return Err(AuthError::Incomplete(format!(
            "Header '{name}' must be sent at most once."
        )));
    }
    Ok(first)
}

/// Checks everything about a request except the HMAC itself: signed-header set, scope
/// (date of `x-amz-date`, `expect.region`, `expect.service`, terminator), time window, and
/// `x-amz-content-sha256` against the body. Cheap and secret-free, so it runs before the
/// credential is even looked up.
pub fn check_request(
    req: &Request<'_>,
    auth: &Authorization,
    expect: &Expect<'_>,
) -> Result<(), AuthError> {
    for name in SINGLE_VALUED {
        single(req, name)?;
    }
    let present = |n: &str| req.headers.iter().any(|(h, _)| *h == n);
    let required = ["host", "x-amz-date"]
        .iter()
        .chain(expect.signed)
        .chain(SIGNED_WHEN_PRESENT.iter().filter(|h| present(h)));
    for name in required {
        if !auth.signed_headers.iter().any(|h| h == name) {
            return Err(AuthError::Incomplete(format!(
                "'{name}' must be a 'SignedHeader' in the AWS Authorization."
            )));
        }
    }
    for name in &auth.signed_headers {
        if !present(name) {
            return Err(AuthError::Incomplete(format!(
                "Signed header '{name}' is not in the request."
            )));
        }
    }
    let amz_date = single(req, "x-amz-date")?
        .ok_or_else(|| AuthError::Incomplete("Missing X-Amz-Date header.".into()))?;
    let t = parse_amz_date(amz_date).ok_or_else(|| {
        AuthError::Incomplete("X-Amz-Date must have the form YYYYMMDD'T'HHMMSS'Z'.".into())
    })?;
    if amz_date.get(..8) != Some(auth.date.as_str()) {
        return Err(AuthError::Invalid(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}'.",
            auth.date,
            amz_date.get(..8).unwrap_or("")
        )));
    }
    if auth.region != expect.region {
        return Err(AuthError::Invalid(format!(
            "Credential should be scoped to a valid region, not '{}'.",
            auth.region.chars().take(64).collect::<String>()
        )));
    }
    if auth.service != expect.service {
        return Err(AuthError::Invalid(format!(
            "Credential should be scoped to correct service: '{}'.",
            expect.service
        )));
    }
    if (t - expect.now).abs() > MAX_SKEW_SECS {
        return Err(AuthError::Expired);
    }
    if let Some(claimed) = single(req, "x-amz-content-sha256")? {
        if claimed == "UNSIGNED-PAYLOAD" || claimed.starts_with("STREAMING-") {
            return Err(AuthError::Invalid(
                "The payload must be signed: 'x-amz-content-sha256' must be the SHA-256 of the body."
                    .into(),
            ));
        }
        if !claimed.eq_ignore_ascii_case(&sha256_hex(req.body)) {
            return Err(AuthError::Invalid(
                "The provided 'x-amz-content-sha256' header does not match what was computed."
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Plain SigV4: recomputes the signature of `req` under `key` (from [`signing_key`] for
/// the credential scope) and compares it in constant time. Knows nothing of KMS's rules;
/// use [`verify`] (or [`check_request`] first) for an endpoint.
pub fn verify_signature(
    req: &Request<'_>,
    auth: &Authorization,
    key: &hmac::Key,
) -> Result<(), AuthError> {
    let amz_date = single(req, "x-amz-date")?
        .ok_or_else(|| AuthError::Incomplete("Missing X-Amz-Date header.".into()))?;
    let canonical = canonical_request(req, &auth.signed_headers);
    let sts = string_to_sign(
        amz_date,
        [
            auth.date.as_str(),
            "/",
            &auth.region,
            "/",
            &auth.service,
            "/aws4_request",
        ],
        &canonical,
    );
    let expect = hmac::sign(key, sts.as_bytes());
    let mut given = [0u8; 32];
    hex::decode_to_slice(&auth.signature, &mut given).map_err(|_| AuthError::Mismatch)?;
    aws_lc_rs::constant_time::verify_slices_are_equal(expect.as_ref(), &given)
        .map_err(|_| AuthError::Mismatch)
}

/// [`check_request`] then [`verify_signature`].
pub fn verify(
    req: &Request<'_>,
    auth: &Authorization,
    key: &hmac::Key,
    expect: &Expect<'_>,
) -> Result<(), AuthError> {
    check_request(req, auth, expect)?;
    verify_signature(req, auth, key)
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
    let mut names: Vec<String> = req.headers.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    names.dedup();
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let canonical = canonical_request(req, &names);
    let sts = string_to_sign(amz_date, [scope.as_str()], &canonical);
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
    const STS_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    fn hdrs<'a>(list: &[(&'a str, &'a str)]) -> Vec<Header<'a>> {
        list.iter()
            .map(|(a, b)| (*a, std::borrow::Cow::Borrowed(*b)))
            .collect()
    }

    fn now_of(d: &str) -> i64 {
        parse_amz_date(d).unwrap_or(i64::MIN / 2)
    }

    /// Cases of the AWS Signature Version 4 test suite
    /// (<https://docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html>; the
    /// suite's `.req`/`.authz` pairs, as also redistributed with `@aws-sdk/signature-v4`):
    /// credential AKIDEXAMPLE / `wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY`, scope
    /// 20150830/us-east-1/service, X-Amz-Date 20150830T123600Z. (name, method, path, query,
    /// extra headers, body, signature). The POST cases are the ones that apply to KMS.
    #[allow(clippy::type_complexity)]
    const SUITE: &[(&str, &str, &str, &str, &[(&str, &str)], &[u8], &str)] = &[
        (
            "get-vanilla",
            "GET",
            "/",
            "",
            &[],
            b"",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "get-vanilla-query-order-key-case",
            "GET",
            "/",
            "Param2=value2&Param1=value1",
            &[],
            b"",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "get-header-value-trim",
            "GET",
            "/",
            "",
            &[("my-header1", " value1"), ("my-header2", "\"a   b   c\"")],
            b"",
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        ),
        (
            "post-vanilla",
            "POST",
            "/",
            "",
            &[],
            b"",
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        ),
        (
            "post-vanilla-query",
            "POST",
            "/",
            "Param1=value1",
            &[],
            b"",
            "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
        ),
        (
            "post-header-key-sort",
            "POST",
            "/",
            "",
            &[("my-header1", "value1")],
            b"",
            "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
        ),
        (
            "post-header-value-case",
            "POST",
            "/",
            "",
            &[("my-header1", "VALUE1")],
            b"",
            "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
        ),
        (
            "post-sts-header-before",
            "POST",
            "/",
            "",
            &[("x-amz-security-token", STS_TOKEN)],
            b"",
            "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
        ),
        (
            "post-x-www-form-urlencoded",
            "POST",
            "/",
            "",
            &[("content-type", "application/x-www-form-urlencoded")],
            b"Param1=value1",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        ),
        (
            "post-x-www-form-urlencoded-parameters",
            "POST",
            "/",
            "",
            &[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf8",
            )],
            b"Param1=value1",
            "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe",
        ),
    ];

    #[test]
    fn aws_sigv4_test_suite() {
        let date = "20150830T123600Z";
        for (name, method, path, query, extra, body, sig) in SUITE {
            let mut headers = hdrs(&[("host", "example.amazonaws.com"), ("x-amz-date", date)]);
            headers.extend(hdrs(extra));
            let req = Request {
                method,
                path,
                query,
                headers: &headers,
                body,
            };
            let mut names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
            names.sort();
            let want = format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={}, Signature={sig}",
                names.join(";")
            );
            // Our signer produces the suite's Authorization header...
            assert_eq!(
                sign(&req, "AKIDEXAMPLE", SECRET, "us-east-1", "service").as_deref(),
                Ok(want.as_str()),
                "{name}"
            );
            // ...and the verifier accepts the suite's signature.
            let auth = parse_authorization(&want);
            assert!(auth.is_ok(), "{name}");
            let Ok(auth) = auth else { continue };
            let key = signing_key(SECRET, "20150830", "us-east-1", "service");
            assert_eq!(verify_signature(&req, &auth, &key), Ok(()), "{name}");
            // Plain SigV4 is not enough for KMS: the suite's requests do not sign
            // x-amz-target/content-type and are scoped to "service".
            let kms = Expect {
                region: "us-east-1",
                service: "kms",
                signed: KMS_SIGNED_HEADERS,
                now: now_of(date),
            };
            assert!(
                matches!(
                    verify(&req, &auth, &key, &kms),
                    Err(AuthError::Incomplete(_))
                ),
                "{name}"
            );
            // One byte of the body, path or a header value changed: refused.
            let mut body2 = body.to_vec();
            body2.push(b'x');
            let tampered = Request {
                body: &body2,
                ..req
            };
            assert_eq!(
                verify_signature(&tampered, &auth, &key),
                Err(AuthError::Mismatch),
                "{name}"
            );
            let tampered = Request { path: "/x", ..req };
            assert_eq!(
                verify_signature(&tampered, &auth, &key),
                Err(AuthError::Mismatch),
                "{name}"
            );
            let mut h2 = headers.clone();
            h2[0].1.to_mut().push('.');
            let tampered = Request {
                headers: &h2,
                ..req
            };
            assert_eq!(
                verify_signature(&tampered, &auth, &key),
                Err(AuthError::Mismatch),
                "{name}"
            );
        }
    }

    const NOW: &str = "20261123T160432Z";
    const EXPECT: Expect<'static> = Expect {
        region: "us-east-1",
        service: "kms",
        signed: KMS_SIGNED_HEADERS,
        now: 0,
    };

    fn kms_expect() -> Expect<'static> {
        Expect {
            now: now_of(NOW),
            ..EXPECT
        }
    }

    fn kms_headers(target: &str) -> Vec<Header<'_>> {
        hdrs(&[
            ("content-type", "application/x-amz-json-1.1"),
            ("host", "kms.example:4000"),
            ("x-amz-date", NOW),
            ("x-amz-target", target),
        ])
    }

    fn kms_req<'a>(headers: &'a [Header<'a>], body: &'a [u8]) -> Request<'a> {
        Request {
            method: "POST",
            path: "/",
            query: "",
            headers,
            body,
        }
    }

    fn signed(headers: &[Header<'_>], body: &[u8], scope: (&str, &str)) -> Authorization {
        let a = sign(
            &kms_req(headers, body),
            "AKIATEST",
            SECRET,
            scope.0,
            scope.1,
        )
        .unwrap_or_default();
        parse_authorization(&a).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn key_for(a: &Authorization) -> hmac::Key {
        signing_key(SECRET, &a.date, &a.region, &a.service)
    }

    #[test]
    fn kms_request_verifies() {
        let h = kms_headers("TrentService.Encrypt");
        let a = signed(&h, b"{}", ("us-east-1", "kms"));
        assert_eq!(
            verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &kms_expect()),
            Ok(())
        );
        let late = Expect {
            now: now_of(NOW) + MAX_SKEW_SECS + 1,
            ..kms_expect()
        };
        assert_eq!(
            verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &late),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn payload_hash_comes_from_the_body_not_the_header() {
        let body = br#"{"KeyId":"k","Plaintext":"aGk="}"#;
        let mut h = kms_headers("TrentService.Encrypt");
        h.push(("x-amz-content-sha256", sha256_hex(body).into()));
        let a = signed(&h, body, ("us-east-1", "kms"));
        assert_eq!(
            verify(&kms_req(&h, body), &a, &key_for(&a), &kms_expect()),
            Ok(())
        );
        // Replayed with another body and the original body's hash in the header.
        let other = br#"{"CiphertextBlob":"AAAA"}"#;
        assert!(matches!(
            verify(&kms_req(&h, other), &a, &key_for(&a), &kms_expect()),
            Err(AuthError::Invalid(_))
        ));
        // Even without the header check, the canonical request hashes the body received.
        assert_eq!(
            verify_signature(&kms_req(&h, other), &a, &key_for(&a)),
            Err(AuthError::Mismatch)
        );
        // Signed without the header, the header added afterwards: refused (must be signed).
        let h0 = kms_headers("TrentService.Encrypt");
        let a0 = signed(&h0, body, ("us-east-1", "kms"));
        let mut h1 = h0.clone();
        h1.push(("x-amz-content-sha256", sha256_hex(body).into()));
        assert!(matches!(
            verify(&kms_req(&h1, other), &a0, &key_for(&a0), &kms_expect()),
            Err(AuthError::Incomplete(_))
        ));
        // UNSIGNED-PAYLOAD is not accepted for KMS.
        let mut hu = kms_headers("TrentService.Encrypt");
        hu.push(("x-amz-content-sha256", "UNSIGNED-PAYLOAD".into()));
        let au = signed(&hu, body, ("us-east-1", "kms"));
        assert!(matches!(
            verify(&kms_req(&hu, body), &au, &key_for(&au), &kms_expect()),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn target_and_content_type_must_be_signed() {
        for unsigned in ["x-amz-target", "content-type", "host", "x-amz-date"] {
            let h = kms_headers("TrentService.ListKeys");
            let only: Vec<Header<'_>> = h.iter().filter(|(n, _)| *n != unsigned).cloned().collect();
            let a = if unsigned == "x-amz-date" {
                // The signer needs the date; take it out of SignedHeaders afterwards.
                let mut a = signed(&h, b"{}", ("us-east-1", "kms"));
                a.signed_headers.retain(|n| n != unsigned);
                a
            } else {
                signed(&only, b"{}", ("us-east-1", "kms"))
            };
            // The header is sent, but not signed.
            assert!(
                matches!(
                    verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &kms_expect()),
                    Err(AuthError::Incomplete(_))
                ),
                "{unsigned}"
            );
        }
        // A second X-Amz-Target beside the signed one.
        let mut h = kms_headers("TrentService.ListKeys");
        let a = signed(&h, b"{}", ("us-east-1", "kms"));
        h.push(("x-amz-target", "TrentService.ScheduleKeyDeletion".into()));
        assert!(matches!(
            verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &kms_expect()),
            Err(AuthError::Incomplete(_))
        ));
        // A signed header that is not sent.
        let h = kms_headers("TrentService.ListKeys");
        let mut a = signed(&h, b"{}", ("us-east-1", "kms"));
        a.signed_headers.push("x-absent".into());
        assert!(matches!(
            verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &kms_expect()),
            Err(AuthError::Incomplete(_))
        ));
    }

    #[test]
    fn scope_must_be_this_region_kms_and_the_request_date() {
        let h = kms_headers("TrentService.ListKeys");
        for scope in [
            ("eu-west-1", "kms"),
            ("us-east-1", "s3"),
            ("us-east-1", "KMS"),
        ] {
            let a = signed(&h, b"{}", scope);
            // Correctly signed for that scope, still refused.
            assert!(
                matches!(
                    verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &kms_expect()),
                    Err(AuthError::Invalid(_))
                ),
                "{scope:?}"
            );
        }
        let mut a = signed(&h, b"{}", ("us-east-1", "kms"));
        a.date = "20261122".into();
        assert!(matches!(
            verify(&kms_req(&h, b"{}"), &a, &key_for(&a), &kms_expect()),
            Err(AuthError::Invalid(_))
        ));
        let bad_term = "AWS4-HMAC-SHA256 Credential=AKIATEST/20261123/us-east-1/kms/aws4_reques, SignedHeaders=host;x-amz-date, Signature=".to_string() + &"0".repeat(64);
        assert!(matches!(
            parse_authorization(&bad_term),
            Err(AuthError::Invalid(_))
        ));
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
        let sig = "0".repeat(64);
        for bad in [
            String::new(),
            "AWS4-HMAC-SHA256".into(),
            "AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms, SignedHeaders=host, Signature=00".into(),
            "Basic abc".into(),
            "AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=zz".into(),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms/aws4_request, SignedHeaders=host;host, Signature={sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms/aws4_request, SignedHeaders=host;, Signature={sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/us-east-1/kms/aws4_request, Credential=B/20150830/us-east-1/kms/aws4_request, SignedHeaders=host, Signature={sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/2015083/us-east-1/kms/aws4_request, SignedHeaders=host, Signature={sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A//us-east-1/kms/aws4_request, SignedHeaders=host, Signature={sig}"),
        ] {
            assert!(parse_authorization(&bad).is_err(), "{bad}");
        }
    }
}
