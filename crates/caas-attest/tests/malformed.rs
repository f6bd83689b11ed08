//! Malformed evidence is rejected without a panic: every truncation and many single-bit
//! flips of valid quotes, signatures, public areas and event logs go through the parsers and
//! the appraisal (a deterministic complement to the cargo-fuzz targets in `fuzz/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caas_attest::structures::{Attest, Public, Signature};
use caas_attest::synthetic::{SoftAk, sample_boot_log};
use caas_attest::{EventLog, HashAlg, SecurityProfile, appraise};

#[test]
fn truncations_and_bit_flips_never_panic_and_never_pass() {
    let ak = SoftAk::generate().unwrap();
    let log = sample_boot_log("m");
    let profile = SecurityProfile::from_event_log(
        "m",
        &EventLog::parse(&log).unwrap(),
        HashAlg::Sha256,
        &[0, 1, 2, 3, 4, 5, 6, 7],
    )
    .unwrap();
    let good = ak.evidence(b"n", &profile.selection(), &log).unwrap();
    assert!(appraise(ak.public(), b"n", &good, &profile, 0).trusted);
    let public = ak.public().to_tpm2b().unwrap();

    let mut variants: Vec<(usize, Vec<u8>)> = Vec::new();
    for (which, bytes) in [&good.quote, &good.signature, &good.event_log, &public]
        .into_iter()
        .enumerate()
    {
        for cut in 0..bytes.len() {
            variants.push((which, bytes[..cut].to_vec()));
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1 << (i % 8);
            variants.push((which, b));
        }
    }
    for (which, b) in variants {
        let _ = Attest::parse(&b);
        let _ = Signature::parse(&b);
        let _ = Public::parse_tpm2b(&b).map(|p| (p.name(), p.spki_der()));
        if let Ok(l) = EventLog::parse(&b) {
            let _ = l.replay(HashAlg::Sha256);
        }
        let mut ev = good.clone();
        match which {
            0 => ev.quote = b,
            1 => ev.signature = b,
            2 => ev.event_log = b,
            _ => continue,
        }
        let v = appraise(ak.public(), b"n", &ev, &profile, 0);
        // Flipping a bit inside the event data of a record (not its digest) keeps the log
        // consistent: data is not measured content. Everything else must fail.
        if v.trusted {
            assert_eq!(which, 2, "a modified quote or signature was accepted");
            let l = EventLog::parse(&ev.event_log).unwrap();
            let orig = EventLog::parse(&good.event_log).unwrap();
            assert_eq!(
                l.events.iter().map(|e| &e.digests).collect::<Vec<_>>(),
                orig.events.iter().map(|e| &e.digests).collect::<Vec<_>>()
            );
        }
    }
}
