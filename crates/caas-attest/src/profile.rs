//! Security profiles: named sets of reference values per PCR — the event digests a PCR's
//! events may have (and must all show up), and/or the final PCR values allowed. A profile
//! also fixes the PCR bank and, through its PCR list, the selection a quote must cover.

use crate::error::Error;
use crate::eventlog::{EV_NO_ACTION, EventLog};
use crate::structures::{HashAlg, PcrSelection};
use std::collections::BTreeMap;

/// Reference values for one PCR.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcrReference {
    /// Allowed event digests (hex). When non-empty, every event the log records for this
    /// PCR must have one of these digests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Required event digests (hex): each must appear in the log for this PCR.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// Allowed final PCR values (hex). When non-empty, the quoted value must be one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A named security profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityProfile {
    /// Unique name (`[A-Za-z0-9._-]{1,64}`).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// PCR bank the reference values are for.
    #[serde(default = "default_bank")]
    pub bank: HashAlg,
    /// Reference values per PCR; the keys are also the PCR selection quotes must cover.
    pub pcrs: BTreeMap<u32, PcrReference>,
}

fn default_bank() -> HashAlg {
    HashAlg::Sha256
}

impl SecurityProfile {
    /// Checks names, PCR indices and digest encodings.
    pub fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(Error::InvalidRequest(
                "profile name must match [A-Za-z0-9._-]{1,64}".into(),
            ));
        }
        if self.pcrs.is_empty() {
            return Err(Error::InvalidRequest(
                "a profile must name at least one PCR".into(),
            ));
        }
        for (pcr, r) in &self.pcrs {
            if *pcr >= 24 {
                return Err(Error::InvalidRequest(format!("PCR {pcr} out of range")));
            }
            for d in r.events.iter().chain(&r.required).chain(&r.values) {
                let b = hex::decode(d)
                    .map_err(|_| Error::InvalidRequest(format!("PCR {pcr}: '{d}' is not hex")))?;
                if b.len() != self.bank.digest_len() {
                    return Err(Error::InvalidRequest(format!(
                        "PCR {pcr}: digest length is not {}",
                        self.bank.digest_len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The PCR selection a quote under this profile covers.
    pub fn selection(&self) -> PcrSelection {
        PcrSelection {
            hash: self.bank,
            pcrs: self.pcrs.keys().copied().collect(),
        }
    }

    /// A profile that accepts exactly the events of `log` for `pcrs` and requires all of
    /// them (reference measurement of a known-good host).
    pub fn from_event_log(
        name: &str,
        log: &EventLog,
        bank: HashAlg,
        pcrs: &[u32],
    ) -> Result<Self, Error> {
        let mut map: BTreeMap<u32, PcrReference> =
            pcrs.iter().map(|p| (*p, PcrReference::default())).collect();
        for e in &log.events {
            if e.event_type == EV_NO_ACTION {
                continue;
            }
            if let Some(r) = map.get_mut(&e.pcr) {
                let d = e
                    .digest(bank)
                    .ok_or_else(|| Error::malformed("event log", "missing bank"))?;
                let h = hex::encode(d);
                if !r.events.contains(&h) {
                    r.events.push(h.clone());
                    r.required.push(h);
                }
            }
        }
        let p = Self {
            name: name.to_string(),
            description: String::new(),
            bank,
            pcrs: map,
        };
        p.validate()?;
        Ok(p)
    }

    /// Widens the profile to also accept the known-good host behind `log`: its events are
    /// added to the allowed ones, and only events common to all merged logs stay required.
    pub fn merge_event_log(&mut self, log: &EventLog) -> Result<(), Error> {
        let pcrs: Vec<u32> = self.pcrs.keys().copied().collect();
        let other = Self::from_event_log(&self.name, log, self.bank, &pcrs)?;
        for (pcr, r) in self.pcrs.iter_mut() {
            let Some(o) = other.pcrs.get(pcr) else {
                continue;
            };
            for e in &o.events {
                if !r.events.contains(e) {
                    r.events.push(e.clone());
                }
            }
            r.required.retain(|d| o.required.contains(d));
        }
        Ok(())
    }
}
