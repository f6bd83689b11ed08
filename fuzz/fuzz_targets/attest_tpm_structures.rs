//! Fuzz target: TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC parsers (and key derivations
//! from a parsed public area).
#![no_main]
use caas_attest::structures::{Attest, Public, Signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Attest::parse(data);
    let _ = Signature::parse(data);
    if let Ok(p) = Public::parse_tpm2b(data) {
        let _ = p.name();
        let _ = p.spki_der();
    }
    if let Ok(p) = Public::parse(data) {
        let _ = p.name();
    }
});
