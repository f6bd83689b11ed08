//! Fuzzes the key service's parsers at its trust boundary: the SigV4 `Authorization`
//! header and `X-Amz-Date`, the canonical request and the KMS request checks over arbitrary
//! headers, ciphertext blobs, and key policy documents (validation and evaluation).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = caas_kms::sigv4::parse_authorization(&text);
    let _ = caas_kms::sigv4::parse_amz_date(&text);
    let _ = caas_kms::blob::parse(data);
    let headers: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(a, b)| (a.to_ascii_lowercase(), b.to_string()))
        .collect();
    let names: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
    let view = caas_kms::sigv4::borrowed(&headers);
    let req = caas_kms::sigv4::Request { method: "POST", path: &text, query: &text, headers: &view, body: data };
    let _ = caas_kms::sigv4::canonical_request(&req, &names);
    if let Some(auth) = headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .and_then(|(_, v)| caas_kms::sigv4::parse_authorization(v).ok())
    {
        let expect = caas_kms::sigv4::Expect { region: "us-east-1", service: "kms", signed: caas_kms::sigv4::KMS_SIGNED_HEADERS, now: 1_764_936_000 };
        let key = caas_kms::sigv4::signing_key(b"secret", &auth.date, &auth.region, &auth.service);
        let _ = caas_kms::sigv4::verify(&req, &auth, &key, &expect);
    }
    // Request bodies: JSON and the typed parameter accessors every operation uses.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let r = caas_kms::ops::Req(&v);
        let _ = r.opt_map("EncryptionContext");
        let _ = r.opt_blob("Plaintext", 4096);
        let _ = r.opt_str_list("GrantTokens");
        let _ = r.opt_int("NumberOfBytes");
        let _ = r.str("KeyId");
    }
    // Validation, and evaluation of any document (stored ones may predate validation).
    let _ = caas_kms::policy::validate(&text);
    let mut ctx = caas_kms::policy::Context::new("111122223333", "arn:aws:iam::111122223333:user/f", "Encrypt", "arn:aws:kms:us-east-1:111122223333:key/k");
    let ec: std::collections::BTreeMap<String, String> = headers.iter().cloned().collect();
    ctx.encryption_context(&ec).time(1_764_936_000_000);
    let _ = caas_kms::policy::evaluate(&text, &ctx);
});
