//! Fuzzes the trusted-launch/DBSP parsers and checks at their trust boundaries: signed
//! envelopes and every message body (the TTP and the host agent parse them from the
//! network), the length-prefixed and bind-key-sealed encodings, c1 decryption by the TTP,
//! and the SC's checks of an attestation answer and of m2.
#![no_main]
use caas_tl::wire::{self, AkSigned, AttestRequest, DomKeyRequest, LaunchCall, Signed};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn keys() -> &'static (caas_tl::TtpKeys, caas_tl::TtpPublic) {
    static K: OnceLock<(caas_tl::TtpKeys, caas_tl::TtpPublic)> = OnceLock::new();
    K.get_or_init(|| {
        let k = caas_tl::TtpKeys::generate().expect("keys");
        let p = k.public().expect("public");
        (k, p)
    })
}

fuzz_target!(|data: &[u8]| {
    let (k, p) = keys();
    let _ = wire::parse::<AkSigned>("fuzz", data);
    let _ = wire::parse::<LaunchCall>("fuzz", data);
    if let Ok(s) = wire::parse::<Signed>("fuzz", data) {
        let _ = s.open::<AttestRequest>(&p.sign, wire::label::ATTESTATION);
        let _ = s.peek::<DomKeyRequest>(wire::label::DOMKEY_REQUEST);
        let _ = caas_tl::sc::check_attestation(&s, p, "host-1", &[0u8; 32]);
        if let Ok(call) = wire::parse::<LaunchCall>("fuzz", &s.body) {
            let _ = caas_tl::sc::verify_launch(&call, 0);
        }
    }
    let _ = caas_tl::crypto::split_lp(data, 2);
    let _ = caas_tl::crypto::split_bind_sealed(data);
    let _ = caas_tl::dm::SealedDomc::parse(data);
    let _ = k.open(wire::label::M1.as_bytes(), data);
    let _ = caas_tl::crypto::TtpKeys::from_secret_bytes(data);
    let _ = caas_tl::TtpPublic::from_text(&String::from_utf8_lossy(data));
    if data.len() >= 32 {
        let att = caas_tl::wire::Attestation { host: "h".into(), r: vec![0; 32], c2: data[32..].to_vec() };
        let _ = caas_tl::sc::open_m2(&data[..32], &att);
        let _ = caas_tl::dm::open_domc_config(&data[..32], "h", "img", &"0".repeat(64), &data[32..]);
    }
});
