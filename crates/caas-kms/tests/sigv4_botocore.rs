//! Randomised cross-check of the SigV4 verifier against botocore's signer
//! (`botocore.auth.SigV4Auth`, via `tests/python/sigv4_sign.py` in the repository's
//! `.venv`): hundreds of KMS-shaped requests with random bodies, extra headers, queries,
//! paths, credentials, session tokens, regions and times are accepted by
//! `caas_kms::sigv4::verify`, and every one of them with one character changed anywhere
//! that is signed — method, path, query, any signed header's name or value, the
//! Authorization header (scope date, region, service, terminator, signed-header list,
//! signature, access key id), or one byte of the body — is refused. Changing an unsigned
//! header (`user-agent`) changes nothing.
//!
//! `CAAS_SIGV4_SEED` fixes the seed (it is printed), `CAAS_SIGV4_COUNT` the number.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use base64::Engine as _;
use caas_kms::sigv4::{self, AuthError, Expect, Request};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let py = root.join(".venv/bin/python3");
    assert!(
        py.exists(),
        "the Python venv with botocore is missing: run scripts/install-deps (creates .venv from .ci/requirements.txt)"
    );
    py
}

struct Signed {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    secret: String,
    region: String,
    /// The signer's access key id: the only one the "service" knows.
    akid: String,
    /// Server time: the signing time.
    now: i64,
}

fn load(n: usize, seed: u64) -> Vec<Signed> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/sigv4_sign.py");
    let out = Command::new(python())
        .arg(&script)
        .args(["random", &n.to_string(), &seed.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sigv4_sign.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let header = |name: &str| {
                r["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|h| h[0] == name)
                    .map(|h| h[1].as_str().unwrap().to_string())
                    .unwrap()
            };
            (r, header("authorization"), header("x-amz-date"))
        })
        .map(|(r, authz, date)| Signed {
            akid: sigv4::parse_authorization(&authz).unwrap().access_key_id,
            now: sigv4::parse_amz_date(&date).unwrap(),
            method: r["method"].as_str().unwrap().into(),
            path: r["path"].as_str().unwrap().into(),
            query: r["query"].as_str().unwrap().into(),
            headers: r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_string(),
                        h[1].as_str().unwrap().to_string(),
                    )
                })
                .collect(),
            body: base64::engine::general_purpose::STANDARD
                .decode(r["body_b64"].as_str().unwrap())
                .unwrap(),
            secret: r["secret"].as_str().unwrap().into(),
            region: r["region"].as_str().unwrap().into(),
        })
        .collect()
}

/// What the key service does with a request: parse, check, look up the credential (only
/// the signer's access key id is known), verify.
fn service_verdict(
    s: &Signed,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), String> {
    let req = Request {
        method,
        path,
        query,
        headers,
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

fn percent_decoded(s: &str) -> Vec<u8> {
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
fn one_char_changes(s: &str) -> Vec<String> {
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

#[test]
fn botocore_signed_requests_verify_and_every_one_char_change_is_refused() {
    let seed: u64 = std::env::var("CAAS_SIGV4_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| caas_kms::now_ms() as u64);
    let n: usize = std::env::var("CAAS_SIGV4_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    println!("CAAS_SIGV4_SEED={seed} CAAS_SIGV4_COUNT={n}");
    let reqs = load(n, seed);
    assert_eq!(reqs.len(), n);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for (i, s) in reqs.iter().enumerate() {
        let verdict =
            |method: &str, path: &str, query: &str, headers: &[(String, String)], body: &[u8]| {
                service_verdict(s, method, path, query, headers, body)
            };
        let ok = verdict(&s.method, &s.path, &s.query, &s.headers, &s.body);
        assert_eq!(
            ok,
            Ok(()),
            "request {i} (seed {seed}) signed by botocore is refused"
        );
        accepted += 1;
        let mut must_refuse = |what: &str, r: Result<(), String>| {
            assert!(
                r.is_err(),
                "request {i} (seed {seed}): changed {what} is accepted"
            );
            refused += 1;
        };
        for m in one_char_changes(&s.method) {
            must_refuse(
                "method",
                verdict(&m, &s.path, &s.query, &s.headers, &s.body),
            );
        }
        // A change of case in a percent-escape of the query (`%3A` → `%3a`) names the same
        // query (SigV4 canonicalises it): not a change of the request.
        for p in one_char_changes(&s.path) {
            must_refuse(
                "path",
                verdict(&s.method, &p, &s.query, &s.headers, &s.body),
            );
        }
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
                    assert_eq!(r, Ok(()), "request {i}: unsigned user-agent matters");
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
            // Dropped, or sent twice.
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
        let mut extra = s.headers.clone();
        extra.push(("x-amz-content-sha256".into(), sigv4::sha256_hex(&s.body)));
        must_refuse(
            "x-amz-content-sha256 added",
            verdict(&s.method, &s.path, &s.query, &extra, &s.body),
        );
    }
    println!("{accepted} botocore-signed requests accepted, {refused} one-change variants refused");
    assert!(refused > accepted * 100);
}

/// The AWS error kinds for a request signed by botocore for another scope.
#[test]
fn botocore_requests_for_another_scope_are_refused_as_invalid_signature() {
    let reqs = load(40, 42);
    for s in &reqs {
        let get = |name: &str| {
            s.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let auth = sigv4::parse_authorization(&get("authorization")).unwrap();
        let req = Request {
            method: &s.method,
            path: &s.path,
            query: &s.query,
            headers: &s.headers,
            body: &s.body,
        };
        let now = sigv4::parse_amz_date(&get("x-amz-date")).unwrap();
        let elsewhere = Expect {
            region: "xx-nowhere-1",
            service: "kms",
            signed: sigv4::KMS_SIGNED_HEADERS,
            now,
        };
        assert!(matches!(
            sigv4::check_request(&req, &auth, &elsewhere),
            Err(AuthError::Invalid(_))
        ));
        let later = Expect {
            region: &s.region,
            now: now + sigv4::MAX_SKEW_SECS + 1,
            ..elsewhere
        };
        assert_eq!(
            sigv4::check_request(&req, &auth, &later),
            Err(AuthError::Expired)
        );
    }
}
