//! The host agent's management audit log (`STATE/audit.jsonl`): one JSON line per
//! management call (launch, stop, list, attach, revoke, dev measure), fsynced per record,
//! hash-chained and authenticated with caas's one chain construction
//! ([`caas_crypto::chain`], domain `caas/host-agent/audit`): each line carries the previous
//! record's hash (`prev`), its own record hash over its body (`hash`) and an HMAC-SHA256 tag
//! of that hash (`tag`) under a key derived from the agent's audit state key
//! (`STATE/audit.key`, 32 random bytes, 0600, written by the one secret-file writer).
//!
//! Threat model, honestly: the key is a state file of the agent. Whoever can read it — the
//! agent, root on the host — can rewrite the log. What the keyed chain gives is
//! tamper-evidence against whoever edits the log without that key: a copy of the log or a
//! backup that excludes the key, an operator tool that rewrites lines, an attacker with write
//! access to the log file only. (The previous, unkeyed chain was recomputed by any editor.)
//! Sealing the key to the TPM would narrow "who can forge" to code running on this host in
//! the attested state; it is not done yet. A cut *tail* (the newest records removed) leaves a
//! valid shorter chain: detecting it needs the head anchored outside the file (a TPM NV
//! counter, or the key service), which the agent does not have yet.
//!
//! At start the agent verifies the existing log; a log that does not verify (edited, or from
//! before the keyed format, or its key lost) is moved aside to
//! `audit.jsonl.broken-<unix ms>` and the new log starts with an `AuditLogBroken` record
//! naming the fault, so the agent keeps serving and the break is itself audited.
//!
//! Format: the record body is the JSON of `seq`, `time_ms`, `op`, `subject`, `result` (in
//! that order); `prev`, `hash` and `tag` are hex.

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
}

impl AuditEntry {
    fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            seq: self.seq,
            time_ms: self.time_ms,
            op: &self.op,
            subject: &self.subject,
            result: &self.result,
        })
        .unwrap_or_default()
    }
}

/// The audit key file of a state directory.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.key")
}

/// Loads the agent's audit chain key from `STATE/audit.key`, creating the file (32 random
/// bytes, 0600, atomically) if it does not exist.
///
/// # Errors
/// The key file cannot be read or created, or does not hold 32 bytes.
pub fn load_or_create_key(state_dir: &Path) -> Result<HmacChainKey, String> {
    let path = key_path(state_dir);
    if !path.exists() {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("create {}: {e}", state_dir.display()))?;
        let k = caas_crypto::random_key().map_err(|e| format!("audit key: {e}"))?;
        match caas_crypto::fs::create_secret(&path, k.expose(), None) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("create {}: {e}", path.display())),
        }
    }
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?,
    );
    if bytes.len() != 32 {
        return Err(format!("{} must hold exactly 32 bytes", path.display()));
    }
    HmacChainKey::derive(&bytes, LogDomain::AGENT_AUDIT).map_err(|e| format!("audit key: {e}"))
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
                log.append("AuditLogBroken", &subject, "chain_broken");
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
    pub fn append(&mut self, op: &str, subject: &str, result: &str) {
        let mut e = AuditEntry {
            seq: self.head.seq + 1,
            time_ms: caas_attest::now_ms(),
            op: op.into(),
            subject: subject.chars().take(256).collect(),
            result: result.into(),
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

    fn log_with(dir: &Path, n: usize) -> (PathBuf, HmacChainKey) {
        let key = load_or_create_key(dir).unwrap();
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open(path.clone(), load_or_create_key(dir).unwrap());
        for i in 0..n {
            log.append("StopWorkload", &format!("vm-{i}"), "ok");
        }
        (path, key)
    }

    #[test]
    fn log_continues_across_restarts_and_verifies() {
        let d = tempfile::tempdir().unwrap();
        let (path, key) = log_with(d.path(), 3);
        let mut again = AuditLog::open(path.clone(), load_or_create_key(d.path()).unwrap());
        again.append("ListWorkloads", "-", "ok");
        let entries = verify_audit_log(&std::fs::read_to_string(&path).unwrap(), &key).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[3].seq, 4);
        let m = std::fs::metadata(key_path(d.path())).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
            0o600
        );
    }

    /// An editor of the log file (without `audit.key`) turns a refused launch into an `ok`
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
        let mut log = AuditLog::open(path.clone(), load_or_create_key(d.path()).unwrap());
        log.append("ListWorkloads", "-", "ok");
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
        let other = tempfile::tempdir().unwrap();
        let key2 = load_or_create_key(other.path()).unwrap();
        assert!(verify_audit_log(&std::fs::read_to_string(&path).unwrap(), &key2).is_err());
    }
}
