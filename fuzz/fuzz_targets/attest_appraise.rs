//! Fuzz target: whole-evidence appraisal with attacker-controlled quote, signature and log
//! (split from the input) against a fixed AK and profile; must never panic.
#![no_main]
use caas_attest::synthetic::{SoftAk, sample_boot_log};
use caas_attest::{Evidence, EventLog, HashAlg, SecurityProfile, appraise};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn fixture() -> Option<&'static (SoftAk, SecurityProfile)> {
    static F: OnceLock<Option<(SoftAk, SecurityProfile)>> = OnceLock::new();
    F.get_or_init(|| {
        let ak = SoftAk::generate().ok()?;
        let log = EventLog::parse(&sample_boot_log("fuzz")).ok()?;
        let p = SecurityProfile::from_event_log("fuzz", &log, HashAlg::Sha256, &[0, 1, 2, 3, 4, 5, 6, 7]).ok()?;
        Some((ak, p))
    })
    .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some((ak, profile)) = fixture() else { return };
    if data.len() < 4 {
        return;
    }
    let a = usize::from(data[0]) * 2;
    let b = usize::from(data[1]);
    let rest = &data[2..];
    let a = a.min(rest.len());
    let b = b.min(rest.len() - a);
    let ev = Evidence {
        quote: rest[..a].to_vec(),
        signature: rest[a..a + b].to_vec(),
        event_log: rest[a + b..].to_vec(),
        pcr_values: vec![],
    };
    let v = appraise(ak.public(), b"nonce", &ev, profile, 0);
    assert!(!v.trusted);
});
