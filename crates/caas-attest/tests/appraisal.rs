//! Data-driven appraisal tests: one known-good synthetic boot (software AK, dev-host-like
//! event log, profile made from that log) and a table of mutations, each with the reason
//! codes the verdict must carry. Covers the attack list of issue 3 at the appraisal level;
//! the same attacks run against swtpm in caas-host's end-to-end tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caas_attest::eventlog::{EV_IPL, EventLog, EventLogWriter};
use caas_attest::synthetic::{SoftAk, sample_boot_log};
use caas_attest::{Evidence, HashAlg, PcrSelection, SecurityProfile, appraise};

struct Fixture {
    ak: SoftAk,
    log: Vec<u8>,
    profile: SecurityProfile,
    sel: PcrSelection,
    nonce: Vec<u8>,
}

fn fixture() -> Fixture {
    let ak = SoftAk::generate().unwrap();
    let log = sample_boot_log("v1");
    let parsed = EventLog::parse(&log).unwrap();
    let pcrs: Vec<u32> = (0..8).collect();
    let profile = SecurityProfile::from_event_log("dev", &parsed, HashAlg::Sha256, &pcrs).unwrap();
    let sel = profile.selection();
    Fixture {
        ak,
        log,
        profile,
        sel,
        nonce: b"nonce-0123456789abcdef0123456789".to_vec(),
    }
}

fn codes(f: &Fixture, ev: &Evidence) -> Vec<String> {
    let v = appraise(f.ak.public(), &f.nonce, ev, &f.profile, 0);
    assert_eq!(v.trusted, v.reasons.is_empty());
    v.reasons
        .iter()
        .map(|r| {
            serde_json::to_value(r).unwrap()["code"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn check(name: &str, mutate: impl Fn(&Fixture) -> Evidence, expect: &[&str]) {
    let f = fixture();
    let ev = mutate(&f);
    let mut got = codes(&f, &ev);
    got.dedup();
    assert_eq!(got, expect, "case {name}");
}

fn edit_log(log: &[u8], f: impl Fn(&mut EventLog)) -> Vec<u8> {
    let mut l = EventLog::parse(log).unwrap();
    f(&mut l);
    l.to_bytes()
}

/// Replayed values of `log` in selection order, with PCR `extra` extended once more.
fn values(log: &[u8], sel: &PcrSelection, extra: Option<u32>) -> Vec<Vec<u8>> {
    let r = EventLog::parse(log)
        .unwrap()
        .replay(HashAlg::Sha256)
        .unwrap();
    sel.pcrs
        .iter()
        .map(|p| {
            let v = r.get(p).cloned().unwrap_or(vec![0; 32]);
            if Some(*p) == extra {
                HashAlg::Sha256.hash_parts(&[&v, &[7u8; 32]])
            } else {
                v
            }
        })
        .collect()
}

fn quoted_with(f: &Fixture, vals: Vec<Vec<u8>>, log: Vec<u8>, report: bool) -> Evidence {
    let (quote, signature) = f.ak.quote_values(&f.nonce, &f.sel, &vals).unwrap();
    Evidence {
        quote,
        signature,
        event_log: log,
        pcr_values: if report {
            vals.iter().map(hex::encode).collect()
        } else {
            vec![]
        },
    }
}

#[test]
fn good_evidence_is_trusted() {
    check(
        "good",
        |f| f.ak.evidence(&f.nonce, &f.sel, &f.log).unwrap(),
        &[],
    );
    check(
        "good without reported values",
        |f| {
            let mut e = f.ak.evidence(&f.nonce, &f.sel, &f.log).unwrap();
            e.pcr_values.clear();
            e
        },
        &[],
    );
}

#[test]
fn attacks_and_faults_have_specific_reasons() {
    check(
        "stale nonce in quote",
        |f| f.ak.evidence(b"other nonce", &f.sel, &f.log).unwrap(),
        &["nonce_mismatch"],
    );
    check(
        "quote by another AK",
        |f| {
            SoftAk::generate()
                .unwrap()
                .evidence(&f.nonce, &f.sel, &f.log)
                .unwrap()
        },
        &["signature_invalid"],
    );
    check(
        "different PCR selection",
        |f| {
            f.ak.evidence(
                &f.nonce,
                &PcrSelection::new(HashAlg::Sha256, &[0, 1, 2, 3]).unwrap(),
                &f.log,
            )
            .unwrap()
        },
        &["pcr_selection_mismatch"],
    );
    check(
        "PCR extended after boot",
        |f| quoted_with(f, values(&f.log, &f.sel, Some(4)), f.log.clone(), true),
        &["event_log_replay_mismatch"],
    );
    check(
        "PCR extended after boot, no reported values",
        |f| quoted_with(f, values(&f.log, &f.sel, Some(4)), f.log.clone(), false),
        &["pcr_digest_mismatch"],
    );
    check(
        "edited event digest",
        |f| {
            let vals = values(&f.log, &f.sel, None);
            let log = edit_log(&f.log, |l| l.events[2].digests[0].1[0] ^= 1);
            quoted_with(f, vals, log, true)
        },
        &[
            "event_log_replay_mismatch",
            "event_not_in_profile",
            "expected_event_missing",
        ],
    );
    check(
        "truncated log (whole events dropped)",
        |f| {
            let vals = values(&f.log, &f.sel, None);
            let log = edit_log(&f.log, |l| l.events.truncate(l.events.len() - 3));
            quoted_with(f, vals, log, true)
        },
        &["event_log_replay_mismatch", "expected_event_missing"],
    );
    check(
        "truncated log (cut inside a record)",
        |f| {
            let vals = values(&f.log, &f.sel, None);
            quoted_with(f, vals, f.log[..f.log.len() - 5].to_vec(), true)
        },
        &["evidence_malformed"],
    );
    check(
        "reordered events",
        |f| {
            let vals = values(&f.log, &f.sel, None);
            let log = edit_log(&f.log, |l| l.events.swap(2, 3));
            quoted_with(f, vals, log, true)
        },
        &["event_log_replay_mismatch"],
    );
    check(
        "event not in profile (log and quote consistent)",
        |f| {
            let log = edit_log(&f.log, |l| {
                let mut w = EventLogWriter::new(&[HashAlg::Sha256]);
                w.measure(5, EV_IPL, b"rootkit", b"rootkit");
                let extra = EventLog::parse(&w.into_bytes()).unwrap().events;
                l.events.extend(extra);
            });
            f.ak.evidence(&f.nonce, &f.sel, &log).unwrap()
        },
        &["event_not_in_profile"],
    );
    check(
        "reported PCR values lie",
        |f| {
            let mut e = f.ak.evidence(&f.nonce, &f.sel, &f.log).unwrap();
            e.pcr_values[0] = hex::encode([1u8; 32]);
            e
        },
        &["pcr_values_mismatch"],
    );
    check(
        "garbage quote",
        |f| {
            let mut e = f.ak.evidence(&f.nonce, &f.sel, &f.log).unwrap();
            e.quote.truncate(10);
            e
        },
        &["evidence_malformed"],
    );
    check(
        "signature bytes flipped",
        |f| {
            let mut e = f.ak.evidence(&f.nonce, &f.sel, &f.log).unwrap();
            let n = e.signature.len();
            e.signature[n - 1] ^= 1;
            e
        },
        &["signature_invalid"],
    );
}

#[test]
fn final_value_references() {
    let mut f = fixture();
    let r = EventLog::parse(&f.log)
        .unwrap()
        .replay(HashAlg::Sha256)
        .unwrap();
    f.profile.pcrs.get_mut(&0).unwrap().values = vec![hex::encode(&r[&0])];
    let ev = f.ak.evidence(&f.nonce, &f.sel, &f.log).unwrap();
    assert!(codes(&f, &ev).is_empty());
    f.profile.pcrs.get_mut(&0).unwrap().values = vec![hex::encode([9u8; 32])];
    assert_eq!(codes(&f, &ev), ["pcr_value_not_in_profile"]);
}

#[test]
fn profile_validation() {
    let f = fixture();
    let mut p = f.profile.clone();
    p.name = "bad name".into();
    assert!(p.validate().is_err());
    let mut p = f.profile.clone();
    p.pcrs.insert(30, Default::default());
    assert!(p.validate().is_err());
    let mut p = f.profile.clone();
    p.pcrs.get_mut(&0).unwrap().events.push("abcd".into());
    assert!(p.validate().is_err());
    let json = serde_json::to_string(&f.profile).unwrap();
    let back: SecurityProfile = serde_json::from_str(&json).unwrap();
    assert_eq!(back, f.profile);
}

/// Cross-check of the event-log writer and replay with tpm2-tools' `tpm2_eventlog`.
#[test]
fn tpm2_eventlog_agrees_with_replay() {
    let dir = std::env::temp_dir().join(format!("caas-attest-evlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log.bin");
    let log = sample_boot_log("cross");
    std::fs::write(&path, &log).unwrap();
    let out = std::process::Command::new("tpm2_eventlog")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("tpm2_eventlog not runnable ({e}): install the Debian package tpm2-tools")
        });
    assert!(
        out.status.success(),
        "tpm2_eventlog failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let r = EventLog::parse(&log)
        .unwrap()
        .replay(HashAlg::Sha256)
        .unwrap();
    let pcrs_section = text
        .split("pcrs:")
        .nth(1)
        .expect("tpm2_eventlog printed no pcrs section");
    let theirs: std::collections::BTreeMap<u32, String> = pcrs_section
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() == 3 && w[1] == ":" {
                Some((
                    w[0].parse().ok()?,
                    w[2].trim_start_matches("0x").to_string(),
                ))
            } else {
                None
            }
        })
        .collect();
    assert!(!r.is_empty());
    for (pcr, v) in r {
        assert_eq!(
            theirs.get(&pcr),
            Some(&hex::encode(v)),
            "tpm2_eventlog disagrees on PCR {pcr}:\n{text}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
