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
mod common;

use base64::Engine as _;
use caas_kms::sigv4::{self, AuthError, Expect, Request};
use common::Signed;
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

#[test]
fn botocore_signed_requests_verify_and_every_one_char_change_is_refused() {
    let (seed, n) = common::seed_and_count();
    let reqs = load(n, seed);
    assert_eq!(reqs.len(), n);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for (i, s) in reqs.iter().enumerate() {
        refused += common::check_accepted_and_every_change_refused("botocore", i, seed, s);
        accepted += 1;
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
            headers: &sigv4::borrowed(&s.headers),
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
