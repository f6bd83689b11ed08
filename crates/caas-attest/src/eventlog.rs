//! The TCG PC Client Platform Firmware Profile "crypto agile" binary event log: parser,
//! replay into PCR values, and a writer (used by the dev hosts' measured boot). Layout
//! (little-endian): one TCG_PCClientPCREvent in SHA-1 format whose data is the
//! `Spec ID Event03` header listing the digest algorithms and sizes, then TCG_PCR_EVENT2
//! records {pcrIndex, eventType, TPML_DIGEST_VALUES, eventSize, event}. Pure and sans-IO;
//! sizes are bounded so a hostile log cannot make the parser allocate without limit.

use crate::error::Error;
use crate::structures::HashAlg;
use crate::wire::Reader;
use std::collections::BTreeMap;

/// EV_NO_ACTION: informational, never extended.
pub const EV_NO_ACTION: u32 = 0x0000_0003;
/// EV_SEPARATOR.
pub const EV_SEPARATOR: u32 = 0x0000_0004;
/// EV_S_CRTM_VERSION.
pub const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
/// EV_POST_CODE.
pub const EV_POST_CODE: u32 = 0x0000_0001;
/// EV_PLATFORM_CONFIG_FLAGS.
pub const EV_PLATFORM_CONFIG_FLAGS: u32 = 0x0000_000A;
/// EV_IPL.
pub const EV_IPL: u32 = 0x0000_000D;
/// EV_EFI_VARIABLE_DRIVER_CONFIG.
pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
/// EV_EFI_BOOT_SERVICES_APPLICATION.
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
/// EV_EFI_PLATFORM_FIRMWARE_BLOB.
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
/// EV_EFI_HANDOFF_TABLES.
pub const EV_EFI_HANDOFF_TABLES: u32 = 0x8000_0009;

/// Largest accepted event-log size.
pub const MAX_LOG_BYTES: usize = 16 << 20;
/// Largest accepted single event data.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Number of PCRs a log may address.
pub const NUM_PCRS: u32 = 24;

const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";

/// One extended (or informational) event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// PCR index.
    pub pcr: u32,
    /// Event type (EV_*).
    pub event_type: u32,
    /// Digests, one per algorithm in the log header, in log order.
    pub digests: Vec<(HashAlg, Vec<u8>)>,
    /// Event data.
    pub data: Vec<u8>,
}

impl Event {
    /// The digest of the given bank, if present.
    pub fn digest(&self, alg: HashAlg) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, d)| d.as_slice())
    }
}

/// A parsed crypto-agile event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    /// Algorithms (and digest sizes) declared by the Spec ID event.
    pub algorithms: Vec<(HashAlg, u16)>,
    /// Startup locality (from a StartupLocality EV_NO_ACTION event), 0 if absent.
    pub startup_locality: u8,
    /// Events after the header, in order.
    pub events: Vec<Event>,
}

impl EventLog {
    /// Parses a binary event log.
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        if buf.len() > MAX_LOG_BYTES {
            return Err(Error::malformed("event log", "larger than 16 MiB"));
        }
        let mut r = Reader::new(buf, "event log");
        // Header event, SHA-1 format.
        let pcr = r.u32_le()?;
        let ty = r.u32_le()?;
        let _sha1 = r.take(20)?;
        let size = r.u32_le()? as usize;
        if pcr != 0 || ty != EV_NO_ACTION || size > MAX_EVENT_BYTES {
            return Err(Error::malformed(
                "event log",
                "first event is not a Spec ID EV_NO_ACTION event",
            ));
        }
        let spec = r.take(size)?;
        let algorithms = parse_spec_id(spec)?;
        let mut events = Vec::new();
        let mut startup_locality = 0;
        while !r.is_empty() {
            let pcr = r.u32_le()?;
            if pcr >= NUM_PCRS {
                return Err(Error::malformed(
                    "TCG_PCR_EVENT2",
                    format!("PCR index {pcr} out of range"),
                ));
            }
            let event_type = r.u32_le()?;
            let count = r.u32_le()? as usize;
            if count != algorithms.len() {
                return Err(Error::malformed(
                    "TCG_PCR_EVENT2",
                    "digest count differs from the Spec ID header",
                ));
            }
            let mut digests = Vec::with_capacity(count);
            for _ in 0..count {
                let id = r.u16_le()?;
                let Some(&(alg, len)) = algorithms.iter().find(|(a, _)| a.tpm_id() == id) else {
                    return Err(Error::malformed(
                        "TCG_PCR_EVENT2",
                        format!("digest algorithm {id:#06x} not in header"),
                    ));
                };
                digests.push((alg, r.take(len as usize)?.to_vec()));
            }
            let size = r.u32_le()? as usize;
            if size > MAX_EVENT_BYTES {
                return Err(Error::malformed(
                    "TCG_PCR_EVENT2",
                    "event data larger than 1 MiB",
                ));
            }
            let data = r.take(size)?.to_vec();
            if event_type == EV_NO_ACTION
                && pcr == 0
                && data.len() == 17
                && data.starts_with(STARTUP_LOCALITY_SIGNATURE)
            {
                startup_locality = data[16];
            }
            events.push(Event {
                pcr,
                event_type,
                digests,
                data,
            });
        }
        Ok(Self {
            algorithms,
            startup_locality,
            events,
        })
    }

    /// Replays the log: the PCR values it implies for `bank` (only PCRs that have events,
    /// plus PCR 0 when a startup locality is set).
    pub fn replay(&self, bank: HashAlg) -> Result<BTreeMap<u32, Vec<u8>>, Error> {
        if !self.algorithms.iter().any(|(a, _)| *a == bank) {
            return Err(Error::malformed(
                "event log",
                format!("no {} bank in the log", bank.name()),
            ));
        }
        let mut pcrs: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        if self.startup_locality != 0 {
            let mut v = vec![0u8; bank.digest_len()];
            if let Some(last) = v.last_mut() {
                *last = self.startup_locality;
            }
            pcrs.insert(0, v);
        }
        for e in &self.events {
            if e.event_type == EV_NO_ACTION {
                continue;
            }
            let d = e
                .digest(bank)
                .ok_or_else(|| Error::malformed("TCG_PCR_EVENT2", "missing digest"))?;
            let cur = pcrs
                .entry(e.pcr)
                .or_insert_with(|| vec![0u8; bank.digest_len()]);
            *cur = bank.hash_parts(&[cur, d]);
        }
        Ok(pcrs)
    }

    /// Serialises the log again (header from `algorithms`, then every event).
    pub fn to_bytes(&self) -> Vec<u8> {
        let algs: Vec<HashAlg> = self.algorithms.iter().map(|(a, _)| *a).collect();
        let mut w = EventLogWriter::new(&algs);
        for e in &self.events {
            w.push(e.pcr, e.event_type, &e.digests, &e.data);
        }
        w.into_bytes()
    }
}

fn parse_spec_id(spec: &[u8]) -> Result<Vec<(HashAlg, u16)>, Error> {
    let mut r = Reader::new(spec, "Spec ID Event03");
    if r.take(16)? != SPEC_ID_SIGNATURE {
        return Err(Error::malformed(
            "Spec ID Event03",
            "bad signature (not a crypto-agile log)",
        ));
    }
    let _platform_class = r.u32_le()?;
    let _minor = r.u8()?;
    let major = r.u8()?;
    let _errata = r.u8()?;
    let uintn = r.u8()?;
    if major != 2 || !(uintn == 1 || uintn == 2) {
        return Err(Error::malformed(
            "Spec ID Event03",
            "unsupported spec version",
        ));
    }
    let n = r.u32_le()?;
    if n == 0 || n > 8 {
        return Err(Error::malformed(
            "Spec ID Event03",
            "numberOfAlgorithms out of range",
        ));
    }
    let mut algs = Vec::new();
    for _ in 0..n {
        let id = r.u16_le()?;
        let size = r.u16_le()?;
        let alg = HashAlg::from_tpm(id)?;
        if alg.digest_len() != size as usize {
            return Err(Error::malformed(
                "Spec ID Event03",
                "digest size does not match algorithm",
            ));
        }
        if algs.iter().any(|(a, _)| *a == alg) {
            return Err(Error::malformed("Spec ID Event03", "duplicate algorithm"));
        }
        algs.push((alg, size));
    }
    let vendor = r.u8()? as usize;
    r.take(vendor)?;
    r.finish()?;
    Ok(algs)
}

/// Writes a crypto-agile event log while computing the matching PCR values.
#[derive(Debug, Clone)]
pub struct EventLogWriter {
    algorithms: Vec<HashAlg>,
    out: Vec<u8>,
}

impl EventLogWriter {
    /// A log with the given banks (the Spec ID header is written immediately).
    pub fn new(algorithms: &[HashAlg]) -> Self {
        let mut spec = Vec::new();
        spec.extend_from_slice(SPEC_ID_SIGNATURE);
        spec.extend_from_slice(&0u32.to_le_bytes()); // platform class: client
        spec.extend_from_slice(&[0, 2, 0, 2]); // minor, major, errata, uintnSize (2 = 64-bit)
        spec.extend_from_slice(&(algorithms.len() as u32).to_le_bytes());
        for a in algorithms {
            spec.extend_from_slice(&a.tpm_id().to_le_bytes());
            spec.extend_from_slice(&(a.digest_len() as u16).to_le_bytes());
        }
        spec.push(0);
        let mut out = Vec::new();
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        out.extend_from_slice(&[0u8; 20]);
        out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        out.extend_from_slice(&spec);
        Self {
            algorithms: algorithms.to_vec(),
            out,
        }
    }

    /// Appends an event whose digests are the hashes of `measured` (the measured content,
    /// e.g. a file), with `data` as event data. Returns the digests to extend into the TPM.
    pub fn measure(
        &mut self,
        pcr: u32,
        event_type: u32,
        measured: &[u8],
        data: &[u8],
    ) -> Vec<(HashAlg, Vec<u8>)> {
        let digests: Vec<(HashAlg, Vec<u8>)> = self
            .algorithms
            .iter()
            .map(|a| (*a, a.hash(measured)))
            .collect();
        self.push(pcr, event_type, &digests, data);
        digests
    }

    /// Appends an event with explicit digests.
    pub fn push(&mut self, pcr: u32, event_type: u32, digests: &[(HashAlg, Vec<u8>)], data: &[u8]) {
        self.out.extend_from_slice(&pcr.to_le_bytes());
        self.out.extend_from_slice(&event_type.to_le_bytes());
        self.out
            .extend_from_slice(&(digests.len() as u32).to_le_bytes());
        for (a, d) in digests {
            self.out.extend_from_slice(&a.tpm_id().to_le_bytes());
            self.out.extend_from_slice(d);
        }
        self.out
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.out.extend_from_slice(data);
    }

    /// The log bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], expect: Result<usize, &str>) {
        match (EventLog::parse(input), expect) {
            (Ok(l), Ok(n)) => assert_eq!(l.events.len(), n),
            (Err(e), Err(want)) => {
                assert!(e.to_string().contains(want), "{e} does not contain {want}")
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    fn header_only() -> Vec<u8> {
        EventLogWriter::new(&[HashAlg::Sha256]).into_bytes()
    }

    #[test]
    fn parse_cases() {
        let mut w = EventLogWriter::new(&[HashAlg::Sha1, HashAlg::Sha256]);
        w.measure(0, EV_S_CRTM_VERSION, b"fw", b"fw");
        w.measure(7, EV_SEPARATOR, &[0; 4], &[0; 4]);
        let two = w.into_bytes();
        check(&two, Ok(2));
        check(&header_only(), Ok(0));
        check(&[], Err("truncated"));
        check(&two[..two.len() - 1], Err("truncated"));
        let mut bad_sig = two.clone();
        bad_sig[32] ^= 1; // inside "Spec ID Event03"
        check(&bad_sig, Err("bad signature"));
        let mut bad_pcr = header_only();
        bad_pcr.extend_from_slice(&30u32.to_le_bytes());
        bad_pcr.extend_from_slice(&[0; 8]);
        check(&bad_pcr, Err("out of range"));
        let mut huge = header_only();
        huge.extend_from_slice(&0u32.to_le_bytes());
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&HashAlg::Sha256.tpm_id().to_le_bytes());
        huge.extend_from_slice(&[0; 32]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        check(&huge, Err("larger than 1 MiB"));
        let mut wrong_count = header_only();
        wrong_count.extend_from_slice(&0u32.to_le_bytes());
        wrong_count.extend_from_slice(&1u32.to_le_bytes());
        wrong_count.extend_from_slice(&2u32.to_le_bytes());
        check(&wrong_count, Err("digest count"));
    }

    #[test]
    fn replay_known_answer() {
        // PCR7 = SHA256(0^32 || SHA256(00000000)), computed independently with Python's hashlib:
        // hashlib.sha256(bytes(32) + hashlib.sha256(bytes(4)).digest()).hexdigest()
        let mut w = EventLogWriter::new(&[HashAlg::Sha256]);
        w.measure(7, EV_SEPARATOR, &[0; 4], &[0; 4]);
        let log = EventLog::parse(&w.into_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let r = log
            .replay(HashAlg::Sha256)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            hex::encode(&r[&7]),
            "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"
        );
        assert!(log.replay(HashAlg::Sha384).is_err());
    }

    #[test]
    fn startup_locality_sets_pcr0_initial_value() {
        let mut w = EventLogWriter::new(&[HashAlg::Sha256]);
        let mut data = STARTUP_LOCALITY_SIGNATURE.to_vec();
        data.push(3);
        w.push(0, EV_NO_ACTION, &[(HashAlg::Sha256, vec![0; 32])], &data);
        let log = EventLog::parse(&w.into_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(log.startup_locality, 3);
        let r = log
            .replay(HashAlg::Sha256)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r[&0][31], 3);
    }

    #[test]
    fn roundtrip() {
        let b = crate::synthetic::sample_boot_log("x");
        let l = EventLog::parse(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.to_bytes(), b);
    }
}
