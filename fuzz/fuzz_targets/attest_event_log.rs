//! Fuzz target: the TCG PC Client crypto-agile event-log parser and replay.
#![no_main]
use caas_attest::{EventLog, HashAlg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(log) = EventLog::parse(data) {
        let _ = log.replay(HashAlg::Sha256);
        let _ = log.replay(HashAlg::Sha1);
        // A parsed log re-serialises to something that parses to the same log.
        let again = EventLog::parse(&log.to_bytes());
        assert_eq!(again.ok().map(|l| l.events), Some(log.events));
    }
});
