//! The host agent's management audit log (`STATE/audit.jsonl`): one JSON line per
//! management call (launch, stop, list, attach, revoke, dev measure), fsynced per record,
//! hash-chained and authenticated with caas's one chain construction
//! ([`caas_crypto::chain`], domain `caas/host-agent/audit`): each line carries the previous
//! record's hash (`prev`), its own record hash over its body (`hash`) and an HMAC-SHA256 tag
//! of that hash (`tag`) under a key derived from the agent's audit seed: 32 random bytes
//! from the TPM, sealed to this TPM (`STATE/audit-key.sealed`, a TPM-wrapped blob like the
//! AK and bind key; sealed to an empty PCR selection so the log stays verifiable across
//! boots and PCR changes) and unsealed into memory at start ([`key_from_tpm`]).
//!
//! Threat model, honestly: whoever can use this TPM as the agent does — the agent, root on
//! the running host — can unseal the seed and rewrite the log. What the keyed chain gives is
//! tamper-evidence against whoever edits the log without that: a copy of the disk or a
//! backup (the sealed blob is useless without this TPM), an operator tool that rewrites
//! lines, an attacker with write access to the state files only. (The previous, unkeyed
//! chain was recomputed by any editor.) Binding the seed to the attested PCR state would
//! narrow "who can forge" further, at the price of a new log after every boot-state change.
//! A cut *tail* (the newest records removed) leaves a valid shorter chain: detecting it
//! needs the head anchored outside the file (a TPM NV counter, or the key service), which
//! the agent does not have yet.
//!
//! At start the agent verifies the existing log; a log that does not verify (edited, or from
//! before the keyed format, or its key lost) is moved aside to
//! `audit.jsonl.broken-<unix ms>` and the new log starts with an `AuditLogBroken` record
//! naming the fault, so the agent keeps serving and the break is itself audited.
//!
//! Format: the record body is the JSON of `seq`, `time_ms`, `op`, `subject`, `result`,
//! `caller` (in that order); `prev`, `hash` and `tag` are hex.

use caas_crypto::chain::{self, ChainVerifier, HmacChainKey, LogDomain, RecordSigner as _};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// One record of the agent's audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Unix ms.
    pub time_ms: u64,
    /// Operation.
    pub op: String,
    /// Subject (workload, domain, ...).
    pub subject: String,
    /// `ok` or an error code.
    pub result: String,
    /// Who called: `name[roles]@addr` from the client certificate, `anonymous@addr`,
    /// `unverified@addr` (TLS refused), or `local` (in-process).
    #[serde(default)]
    pub caller: String,
    /// Hash of the previous entry (hex; zeros for the first).
    pub prev: String,
    /// The record hash (`caas_crypto::chain::record_hash`) of this entry's body (hex).
    pub hash: String,
    /// HMAC-SHA256 of `hash` under the agent's audit key (hex).
    #[serde(default)]
    pub tag: String,
}

#[derive(serde::Serialize)]
struct Body<'a> {
    seq: u64,
    time_ms: u64,
    op: &'a str,
    subject: &'a str,
    result: &'a str,
    caller: &'a str,
}

impl AuditEntry {
    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            seq: self.seq,
            time_ms: self.time_ms,
            op: &self.op,
            subject: &self.subject,
            result: &self.result,
            caller: &self.caller,
        })
        .unwrap_or_default()
    }
}

/// The sealed audit seed of a state directory.
pub fn sealed_seed_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit-key.sealed")
}

/// The audit chain key from a 32-byte seed.
///
/// # Errors
/// A seed that is not 32 bytes.
pub fn key_from_seed(seed: &[u8]) -> Result<HmacChainKey, String> {
    if seed.len() != 32 {
        return Err("the audit seed must hold exactly 32 bytes".into());
    }
    HmacChainKey::derive(seed, LogDomain::AGENT_AUDIT).map_err(|e| format!("audit key: {e}"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SealedSeed {
    #[serde(with = "caas_attest::b64")]
    public: Vec<u8>,
    #[serde(with = "caas_attest::b64")]
    private: Vec<u8>,
}

/// The agent's audit chain key: unseals `STATE/audit-key.sealed` with the TPM, or — when it
/// is missing or this TPM cannot unseal it (a cleared or replaced TPM) — draws a new seed
/// from the TPM, seals it and stores the blob (then the old log no longer verifies and is
/// moved aside by [`AuditLog::open`]).
///
/// # Errors
/// TPM or file errors while creating a new seed.
pub async fn key_from_tpm(
    tpm: &caas_tpm::TpmHandle,
    state_dir: &Path,
) -> Result<HmacChainKey, crate::Error> {
    use caas_tpm::{KeyBlob, PcrBank};
    let path = sealed_seed_path(state_dir);
    if let Some(blob) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<SealedSeed>(&b).ok())
    {
        let blob = KeyBlob {
            public: blob.public,
            private: blob.private,
        };
        match tpm
            .run(move |t| t.unseal(&blob, PcrBank::Sha256, &[]))
            .await
            .map_err(|e| e.to_string())
            .and_then(|seed| key_from_seed(&seed))
        {
            Ok(k) => return Ok(k),
            Err(e) => tracing::error!(error = %e, path = %path.display(),
                "the audit seed does not unseal on this TPM: starting a new audit key"),
        }
    }
    let (seed, blob) = tpm
        .run(|t| {
            let seed = t.random(32)?;
            let blob = t.seal(PcrBank::Sha256, &[], &seed)?;
            Ok((seed, blob))
        })
        .await?;
    let json = serde_json::to_vec(&SealedSeed {
        public: blob.public,
        private: blob.private,
    })
    .map_err(|e| crate::Error::Config(e.to_string()))?;
    caas_crypto::fs::write_secret(&path, &json, None)
        .map_err(crate::Error::io(format!("write {}", path.display())))?;
    key_from_seed(&seed).map_err(crate::Error::Config)
}

/// The agent's append-only, keyed hash-chained audit log (JSON lines, fsync'd per entry).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    key: HmacChainKey,
    head: chain::Head,
}

impl AuditLog {
    /// Opens the log at `path`, verifying it with `key`; a log that does not verify is moved
    /// aside and the new log starts with an `AuditLogBroken` record (module doc).
    pub fn open(path: PathBuf, key: HmacChainKey) -> Self {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut log = Self {
            path,
            key,
            head: chain::Head::GENESIS,
        };
        match verify_audit_log(&text, &log.key) {
            Ok(_) => {
                // verify_audit_log checked every hash: the last one is the head.
                if let Some(e) = text
                    .lines()
                    .next_back()
                    .and_then(|l| serde_json::from_str::<AuditEntry>(l).ok())
                    && let Some(h) = chain::unhex(&e.hash).and_then(|b| b.try_into().ok())
                {
                    log.head = chain::Head {
                        seq: e.seq,
                        hash: h,
                    };
                }
            }
            Err(fault) => {
                let aside = PathBuf::from(format!(
                    "{}.broken-{}",
                    log.path.display(),
                    caas_attest::now_ms()
                ));
                tracing::error!(path = %log.path.display(), aside = %aside.display(), %fault,
                    "agent audit log does not verify: moved aside, starting a new chain");
                if let Err(e) = std::fs::rename(&log.path, &aside) {
                    tracing::error!(error = %e, "moving the broken audit log aside failed");
                }
                let subject = format!(
                    "{} ({fault})",
                    aside
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                );
                log.append("AuditLogBroken", &subject, "chain_broken", "local");
            }
        }
        log
    }

    /// The log's entries, verified with its key.
    ///
    /// # Errors
    /// The first bad record, as text.
    pub fn entries(&self) -> Result<Vec<AuditEntry>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("read {}: {e}", self.path.display())),
        };
        verify_audit_log(&text, &self.key)
    }

    /// Appends a record (errors are logged: the call it records has already happened).
    pub fn append(&mut self, op: &str, subject: &str, result: &str, caller: &str) {
        let mut e = AuditEntry {
            seq: self.head.seq + 1,
            time_ms: caas_attest::now_ms(),
            op: op.into(),
            subject: subject.chars().take(256).collect(),
            result: result.into(),
            caller: caller.chars().take(256).collect(),
            prev: String::new(),
            hash: String::new(),
            tag: String::new(),
        };
        let mut head = self.head;
        let (_, prev, hash) = head.advance(LogDomain::AGENT_AUDIT, &e.body());
        e.prev = chain::hex32(&prev);
        e.hash = chain::hex32(&hash);
        e.tag = hex::encode(self.key.sign(&hash));
        let Ok(mut line) = serde_json::to_vec(&e) else {
            tracing::error!("agent audit entry not serializable");
            return;
        };
        line.push(b'\n');
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                f.write_all(&line)?;
                f.sync_data()
            });
        match r {
            Ok(()) => self.head = head,
            Err(err) => tracing::error!(error = %err, "agent audit log write failed"),
        }
    }
}

/// Verifies an audit log's keyed chain with the shared verifier (seq, links, record hashes,
/// tags under `key`); returns its entries.
///
/// # Errors
/// The first bad record, as text (`line N: ...`).
pub fn verify_audit_log(text: &str, key: &HmacChainKey) -> Result<Vec<AuditEntry>, String> {
    let mut v = ChainVerifier::new(LogDomain::AGENT_AUDIT);
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let bad = |what: &str| format!("line {}: {what}", i + 1);
        let e: AuditEntry = serde_json::from_str(l).map_err(|e| bad(&e.to_string()))?;
        let prev = chain::unhex(&e.prev).ok_or_else(|| bad("prev is not hex"))?;
        let hash = chain::unhex(&e.hash).ok_or_else(|| bad("hash is not hex"))?;
        let tag = chain::unhex(&e.tag).ok_or_else(|| bad("tag is not hex"))?;
        v.check(
            &chain::StoredRecord {
                seq: e.seq,
                prev_hash: &prev,
                hash: &hash,
                body: &e.body(),
                tag: &tag,
            },
            &|h, t| key.verify(h, t),
        )
        .map_err(|f| bad(&format!("chain broken: {f}")))?;
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_key() -> HmacChainKey {
        key_from_seed(&[9u8; 32]).unwrap()
    }

    fn log_with(dir: &Path, n: usize) -> (PathBuf, HmacChainKey) {
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open(path.clone(), test_key());
        for i in 0..n {
            log.append("StopWorkload", &format!("vm-{i}"), "ok", "local");
        }
        (path, test_key())
    }

    #[test]
    fn log_continues_across_restarts_and_verifies() {
        let d = tempfile::tempdir().unwrap();
        let (path, key) = log_with(d.path(), 3);
        let mut again = AuditLog::open(path.clone(), test_key());
        again.append("ListWorkloads", "-", "ok", "local");
        let entries = verify_audit_log(&std::fs::read_to_string(&path).unwrap(), &key).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[3].seq, 4);
        assert!(key_from_seed(&[1u8; 31]).is_err());
    }

    /// An editor of the log file (without the TPM-sealed audit seed) turns a refused launch into an `ok`
    /// and recomputes every hash after it, as the unkeyed chain allowed.
    #[test]
    fn edited_agent_log_record_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let (path, key) = log_with(d.path(), 4);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut entries = verify_audit_log(&text, &key).unwrap();
        entries[1].result = "ok-but-edited".into();
        let mut head = chain::Head::GENESIS;
        let mut forged = String::new();
        for e in &mut entries {
            let (_, prev, hash) = head.advance(LogDomain::AGENT_AUDIT, &e.body());
            e.prev = chain::hex32(&prev);
            e.hash = chain::hex32(&hash);
            forged.push_str(&serde_json::to_string(e).unwrap());
            forged.push('\n');
        }
        let err = verify_audit_log(&forged, &key).unwrap_err();
        assert!(
            err.starts_with("line 2:") && err.contains("signature"),
            "{err}"
        );
        // The agent, restarted on the edited file, moves it aside and audits the break.
        std::fs::write(&path, &forged).unwrap();
        let mut log = AuditLog::open(path.clone(), test_key());
        log.append("ListWorkloads", "-", "ok", "local");
        let now = verify_audit_log(&std::fs::read_to_string(&path).unwrap(), &key).unwrap();
        assert_eq!(now[0].op, "AuditLogBroken");
        assert!(now[0].subject.contains("record 2"), "{}", now[0].subject);
        let aside: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("audit.jsonl.broken-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read_to_string(aside[0].path()).unwrap(), forged);
    }

    /// Removing records from the middle of the log breaks the chain. (Cutting the newest
    /// records off the end is not detected: that needs an anchor outside the file — module
    /// doc — and this test pins that limit down so a future anchor changes it knowingly.)
    #[test]
    fn truncated_agent_log_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let (path, key) = log_with(d.path(), 5);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let cut_middle = format!("{}\n{}\n{}\n", lines[0], lines[3], lines[4]);
        let err = verify_audit_log(&cut_middle, &key).unwrap_err();
        assert!(
            err.starts_with("line 2:") && err.contains("missing"),
            "{err}"
        );
        let cut_head = format!("{}\n{}\n", lines[3], lines[4]);
        assert!(verify_audit_log(&cut_head, &key).is_err());
        // Renumbering the remaining records (the editor has no key) fails on the tags.
        let mut renumbered = String::new();
        let mut head = chain::Head::GENESIS;
        for (i, l) in [lines[0], lines[3], lines[4]].iter().enumerate() {
            let mut e: AuditEntry = serde_json::from_str(l).unwrap();
            e.seq = i as u64 + 1;
            let (_, prev, hash) = head.advance(LogDomain::AGENT_AUDIT, &e.body());
            e.prev = chain::hex32(&prev);
            e.hash = chain::hex32(&hash);
            renumbered.push_str(&serde_json::to_string(&e).unwrap());
            renumbered.push('\n');
        }
        assert!(
            verify_audit_log(&renumbered, &key)
                .unwrap_err()
                .contains("signature")
        );
        // The limit: a cut tail still verifies.
        let cut_tail = format!("{}\n{}\n", lines[0], lines[1]);
        assert_eq!(verify_audit_log(&cut_tail, &key).unwrap().len(), 2);
    }

    #[test]
    fn another_hosts_key_does_not_verify() {
        let d = tempfile::tempdir().unwrap();
        let (path, _) = log_with(d.path(), 2);
        let key2 = key_from_seed(&[8u8; 32]).unwrap();
        assert!(verify_audit_log(&std::fs::read_to_string(&path).unwrap(), &key2).is_err());
    }
}
