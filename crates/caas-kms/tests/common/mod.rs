//! Shared by the SigV4 cross-checks against external signers (`sigv4_botocore.rs`,
//! `sigv4_aws_crate.rs`): a signed request as it reaches the service, the service's
//! verdict on it, and the one-change-anywhere refusal check.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use caas_kms::sigv4::{self, Expect, Request};

/// A request as signed by an external signer, with what the "service" knows.
pub struct Signed {
    pub method: String,
    pub path: String,
    pub query: String,
    /// All headers sent, lower-case names, including `authorization`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub secret: String,
    pub region: String,
    /// The signer's access key id: the only one the "service" knows.
    pub akid: String,
    /// Server time: the signing time.
    pub now: i64,
}

/// `CAAS_SIGV4_SEED` (default: the clock) and `CAAS_SIGV4_COUNT` (default 300), printed.
pub fn seed_and_count() -> (u64, usize) {
    let seed: u64 = std::env::var("CAAS_SIGV4_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| caas_kms::now_ms() as u64);
    let n: usize = std::env::var("CAAS_SIGV4_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    println!("CAAS_SIGV4_SEED={seed} CAAS_SIGV4_COUNT={n}");
    (seed, n)
}

/// What the key service does with a request: parse, check, look up the credential (only
/// the signer's access key id is known), verify.
pub fn service_verdict(
    s: &Signed,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), String> {
    let view = sigv4::borrowed(headers);
    let req = Request {
        method,
        path,
        query,
        headers: &view,
        body,
    };
    let mut auths = headers.iter().filter(|(n, _)| n == "authorization");
    let auth = auths.next().ok_or("no authorization")?;
    let auth = sigv4::parse_authorization(&auth.1).map_err(|e| format!("{e:?}"))?;
    let expect = Expect {
        region: &s.region,
        service: "kms",
        signed: sigv4::KMS_SIGNED_HEADERS,
        now: s.now,
    };
    sigv4::check_request(&req, &auth, &expect).map_err(|e| format!("{e:?}"))?;
    if auth.access_key_id != s.akid {
        return Err("unknown access key".into());
    }
    let key = sigv4::signing_key(s.secret.as_bytes(), &auth.date, &auth.region, &auth.service);
    sigv4::verify_signature(&req, &auth, &key).map_err(|e| format!("{e:?}"))
}

pub fn percent_decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && s.is_char_boundary(i + 3)
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Every variant of `s` with one character replaced.
pub fn one_char_changes(s: &str) -> Vec<String> {
    s.char_indices()
        .map(|(i, c)| {
            let r = if c == 'a' { 'b' } else { 'a' };
            let mut out = String::with_capacity(s.len());
            out.push_str(&s[..i]);
            out.push(r);
            out.push_str(&s[i + c.len_utf8()..]);
            out
        })
        .collect()
}

/// Request `i` (signed by `signer`) is accepted, and every variant of it with one
/// character changed in the method, path, query, a signed header's name or value (the
/// `Authorization` header's scope, signed-header list and signature included), one byte of
/// the body, the body's length, a header dropped, a second `x-amz-target`, or an added
/// `x-amz-content-sha256` is refused; changing the unsigned `user-agent` changes nothing.
/// Returns the number of variants refused.
pub fn check_accepted_and_every_change_refused(
    signer: &str,
    i: usize,
    seed: u64,
    s: &Signed,
) -> usize {
    let mut refused = 0usize;
    let verdict =
        |method: &str, path: &str, query: &str, headers: &[(String, String)], body: &[u8]| {
            service_verdict(s, method, path, query, headers, body)
        };
    let ok = verdict(&s.method, &s.path, &s.query, &s.headers, &s.body);
    assert_eq!(
        ok,
        Ok(()),
        "request {i} (seed {seed}) signed by {signer} is refused"
    );
    let mut must_refuse = |what: &str, r: Result<(), String>| {
        assert!(
            r.is_err(),
            "request {i} (seed {seed}, signed by {signer}): changed {what} is accepted"
        );
        refused += 1;
    };
    for m in one_char_changes(&s.method) {
        must_refuse(
            "method",
            verdict(&m, &s.path, &s.query, &s.headers, &s.body),
        );
    }
    for p in one_char_changes(&s.path) {
        must_refuse(
            "path",
            verdict(&s.method, &p, &s.query, &s.headers, &s.body),
        );
    }
    // A change of case in a percent-escape of the query (`%3A` → `%3a`) names the same
    // query (SigV4 canonicalises it): not a change of the request.
    for q in one_char_changes(&s.query) {
        if percent_decoded(&q) != percent_decoded(&s.query) {
            must_refuse(
                "query",
                verdict(&s.method, &s.path, &q, &s.headers, &s.body),
            );
        }
    }
    for b in 0..s.body.len() {
        let mut body = s.body.clone();
        body[b] ^= 0x01;
        must_refuse(
            "body",
            verdict(&s.method, &s.path, &s.query, &s.headers, &body),
        );
    }
    let mut longer = s.body.clone();
    longer.push(b' ');
    must_refuse(
        "body length",
        verdict(&s.method, &s.path, &s.query, &s.headers, &longer),
    );
    for (h, (name, value)) in s.headers.iter().enumerate() {
        let unsigned = name == "user-agent";
        for v in one_char_changes(value) {
            let mut headers = s.headers.clone();
            headers[h].1 = v;
            let r = verdict(&s.method, &s.path, &s.query, &headers, &s.body);
            if unsigned {
                assert_eq!(
                    r,
                    Ok(()),
                    "request {i} (seed {seed}, signed by {signer}): unsigned user-agent matters"
                );
            } else {
                must_refuse(&format!("header {name} value"), r);
            }
        }
        if unsigned {
            continue;
        }
        for nn in one_char_changes(name) {
            let mut headers = s.headers.clone();
            headers[h].0 = nn;
            must_refuse(
                &format!("header name {name}"),
                verdict(&s.method, &s.path, &s.query, &headers, &s.body),
            );
        }
        // Dropped.
        let mut headers = s.headers.clone();
        headers.remove(h);
        must_refuse(
            &format!("header {name} dropped"),
            verdict(&s.method, &s.path, &s.query, &headers, &s.body),
        );
    }
    let mut twice = s.headers.clone();
    twice.push((
        "x-amz-target".into(),
        "TrentService.ScheduleKeyDeletion".into(),
    ));
    must_refuse(
        "second x-amz-target",
        verdict(&s.method, &s.path, &s.query, &twice, &s.body),
    );
    // Unsigned, or (when the signer sent one) sent twice.
    let mut extra = s.headers.clone();
    extra.push(("x-amz-content-sha256".into(), sigv4::sha256_hex(&s.body)));
    must_refuse(
        "x-amz-content-sha256 added",
        verdict(&s.method, &s.path, &s.query, &extra, &s.body),
    );
    refused
}
