//! Fuzzes the key service's parsers at its trust boundary: the SigV4 `Authorization`
//! header and `X-Amz-Date`, the canonical request over arbitrary headers, ciphertext blobs,
//! and key policy documents (validation and evaluation).
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
    let req = caas_kms::sigv4::Request { method: "POST", path: &text, query: &text, headers: &headers, body: data };
    let _ = caas_kms::sigv4::canonical_request(&req, &names);
    // Request bodies: JSON and the typed parameter accessors every operation uses.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let r = caas_kms::ops::Req(&v);
        let _ = r.opt_map("EncryptionContext");
        let _ = r.opt_blob("Plaintext", 4096);
        let _ = r.opt_str_list("GrantTokens");
        let _ = r.opt_int("NumberOfBytes");
        let _ = r.str("KeyId");
    }
    if caas_kms::policy::validate(&text).is_ok() {
        let req = caas_kms::policy::Request { account: "111122223333", principal: "arn:aws:iam::111122223333:user/f", action: "Encrypt", encryption_context: None };
        let _ = caas_kms::policy::evaluate(&text, &req);
    }
});
