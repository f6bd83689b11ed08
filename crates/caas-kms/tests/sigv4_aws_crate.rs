//! Randomised cross-check of the SigV4 verifier against the official AWS Rust signer, the
//! `aws-sigv4` crate (`http_request::sign` with `SigningSettings::default()`, which signs
//! every header it is given except `authorization`, `user-agent`, `x-amzn-trace-id` and
//! `transfer-encoding`, and adds and signs `host`, `x-amz-date` and, for temporary
//! credentials, `x-amz-security-token`): a few hundred KMS requests (`POST /`,
//! `x-amz-target: TrentService.<Op>`, `content-type: application/x-amz-json-1.1`, random
//! JSON bodies, random credentials, session tokens, hosts, regions and times, sometimes
//! `x-amz-content-sha256` and an unsigned `user-agent`) are accepted by the verifier
//! exactly as `Kms::authenticate` runs it, and every one of them with one character changed
//! anywhere that is signed — method, path, any signed header's name or value (`x-amz-date`
//! included), the Authorization header (scope date, region, service, terminator,
//! signed-header list, signature, access key id), one byte of the body — is refused.
//!
//! `CAAS_SIGV4_SEED` fixes the seed (it is printed), `CAAS_SIGV4_COUNT` the number.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use caas_kms::sigv4;
use common::Signed;
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime};

/// splitmix64: enough randomness for test inputs, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn chars(&mut self, alphabet: &str, len: usize) -> String {
        let a: Vec<char> = alphabet.chars().collect();
        (0..len).map(|_| *self.pick(&a)).collect()
    }
}

const OPS: &[&str] = &[
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "Sign",
    "Verify",
    "CreateKey",
    "DescribeKey",
    "ListKeys",
    "ListAliases",
    "CreateAlias",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "GetPublicKey",
    "GenerateRandom",
];
const REGIONS: &[&str] = &["us-east-1", "eu-west-3", "ap-southeast-2", "us-gov-west-1"];
const UPPER_DIGITS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Characters for JSON strings: ASCII, characters JSON escapes, non-ASCII.
const TEXT: &str = "abcxyzABCXYZ0189 -_.:/+=\"\\\n\t\u{1}é€😀中";

fn json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(2)),
        2 => Value::from(rng.next() as i64 >> rng.below(64)),
        3 => {
            let len = rng.below(40);
            Value::String(rng.chars(TEXT, len))
        }
        4 => Value::Array((0..rng.below(4)).map(|_| json(rng, depth - 1)).collect()),
        _ => Value::Object(
            (0..rng.below(5))
                .map(|_| {
                    let len = 1 + rng.below(12);
                    (rng.chars(TEXT, len), json(rng, depth - 1))
                })
                .collect(),
        ),
    }
}

/// A KMS-shaped request body: an object with KMS-like fields and random extra ones.
fn body(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(10) {
        return b"{}".to_vec();
    }
    let mut m = Map::new();
    if rng.chance(2) {
        m.insert(
            "KeyId".into(),
            Value::String(format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                rng.next() as u32,
                rng.next() as u16,
                rng.next() & 0xfff,
                rng.next() & 0xfff,
                rng.next() & 0xffff_ffff_ffff
            )),
        );
    }
    if rng.chance(2) {
        let len = rng.below(80);
        m.insert("Plaintext".into(), Value::String(rng.chars(B64, len)));
    }
    for _ in 0..rng.below(4) {
        let len = 1 + rng.below(10);
        m.insert(rng.chars(TEXT, len), json(rng, 3));
    }
    serde_json::to_vec(&Value::Object(m)).unwrap()
}

/// One random KMS request, signed by `aws-sigv4`.
fn signed_request(rng: &mut Rng) -> Signed {
    let region = rng.pick(REGIONS).to_string();
    let host = match rng.below(4) {
        0 => format!("kms.{region}.amazonaws.com"),
        1 => "localhost:8443".to_string(),
        2 => "127.0.0.1:4443".to_string(),
        _ => "kms.caas.example.internal".to_string(),
    };
    let akid = format!("AKIA{}", rng.chars(UPPER_DIGITS, 16));
    let secret = rng.chars(B64, 40);
    let token = rng.chance(3).then(|| {
        let len = 100 + rng.below(300);
        rng.chars(B64, len)
    });
    // 2015 … 2040, with a sub-second part that the signer drops.
    let now = 1_420_070_400 + (rng.next() % (25 * 365 * 86_400)) as i64;
    let time = SystemTime::UNIX_EPOCH
        + Duration::from_secs(now as u64)
        + Duration::from_nanos(rng.next() % 1_000_000_000);
    let body = body(rng);
    let target = format!("TrentService.{}", rng.pick(OPS));

    let mut given: Vec<(String, String)> = vec![
        ("host".into(), host.clone()),
        ("content-type".into(), "application/x-amz-json-1.1".into()),
        ("x-amz-target".into(), target),
    ];
    if rng.chance(2) {
        given.push(("content-length".into(), body.len().to_string()));
    }
    if rng.chance(2) {
        given.push((
            "user-agent".into(),
            format!("aws-sdk-rust/1.{} os/linux lang/rust", rng.below(100)),
        ));
    }
    if rng.chance(4) {
        given.push(("x-amz-user-agent".into(), "aws-sdk-rust/1.0 api/kms".into()));
    }

    let mut settings = SigningSettings::default();
    if rng.chance(3) {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let identity = Credentials::new(&akid, &secret, token, None, "caas-conformance-test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name("kms")
        .time(time)
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let signable = SignableRequest::new(
        "POST",
        format!("https://{host}/"),
        given.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        SignableBody::Bytes(&body),
    )
    .unwrap();
    let (instructions, _signature) = sign(signable, &params).unwrap().into_parts();
    let mut headers = given;
    for (name, value) in instructions.headers() {
        headers.push((name.to_ascii_lowercase(), value.to_string()));
    }
    // Header order on the wire is irrelevant to SigV4.
    for i in (1..headers.len()).rev() {
        headers.swap(i, rng.below(i + 1));
    }
    Signed {
        method: "POST".into(),
        path: "/".into(),
        query: String::new(),
        headers,
        body,
        secret,
        region,
        akid,
        now,
    }
}

#[test]
fn aws_sigv4_signed_requests_verify_and_every_one_char_change_is_refused() {
    let (seed, n) = common::seed_and_count();
    let mut rng = Rng(seed);
    let (mut accepted, mut refused, mut tokens, mut hashes) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..n {
        let s = signed_request(&mut rng);
        // aws-sigv4 signs what KMS requires (and the session token / content hash it adds).
        let authz = &s
            .headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1;
        let auth = sigv4::parse_authorization(authz).unwrap();
        for h in ["host", "x-amz-date"]
            .iter()
            .chain(sigv4::KMS_SIGNED_HEADERS)
        {
            assert!(
                auth.signed_headers.iter().any(|s| s == h),
                "request {i} (seed {seed}): aws-sigv4 did not sign {h}: {authz}"
            );
        }
        assert!(!auth.signed_headers.iter().any(|h| h == "user-agent"));
        let signed = |h: &str| auth.signed_headers.iter().any(|s| s == h);
        tokens += usize::from(signed("x-amz-security-token"));
        hashes += usize::from(signed("x-amz-content-sha256"));
        refused += common::check_accepted_and_every_change_refused("aws-sigv4", i, seed, &s);
        accepted += 1;
    }
    println!(
        "{accepted} aws-sigv4-signed requests accepted ({tokens} with a session token, {hashes} with x-amz-content-sha256), {refused} one-change variants refused"
    );
    assert!(refused > accepted * 100);
    assert!(n < 30 || (tokens > 0 && hashes > 0));
}
