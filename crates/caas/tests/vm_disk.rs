//! A REAL VM with a DBSP volume across encrypted suspend/resume and live migration (issue 13
//! acceptance; `docs/suspend-migrate.md`): the legacy guest image writes an increasing
//! sequence of durable records to its data disk (`/dev/vdb`, a DBSP volume served by the
//! crypto domain's Secure Device Proxy; `caas_workload::seq`). After a suspend → resume on the
//! other host, and after a live migration during which the guest keeps writing, the sequence
//! read back through the target's crypto domain continues with no gap, repeat or fork, and
//! the storage holds only ciphertext. Attacks: a malicious (still trusted) source agent that
//! asks the TTP about the volume after the migration (its session is retired: refused and
//! audited), and a resume on a volume the storage rolled back (its epoch is below the TTP's
//! anchor: refused and audited).
//!
//! Needs qemu-system-x86 and the image tools (`scripts/install-deps`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use common::vm::*;
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The ring of records the guest writes (`caas-guest workload seq`'s default).
const RING: usize = 4096 * caas_workload::seq::BLOCK;

struct Cloud {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dev: Dev,
    storage: PathBuf,
    rt: tokio::runtime::Runtime,
    mgmt: caas_attest::client::HttpClient,
}

impl Cloud {
    /// Two hosts, the guest image provisioned to both, vm1 launched on host-1 with the
    /// qemu driver and the volume finance/data.
    fn start() -> Self {
        let image = guest_image();
        let (tmp, root, dev, storage) = provisioned_guest(&image, &["host-1", "host-2"]);
        tenant(
            &root,
            &dev,
            &[
                "launch",
                "--id",
                "legacy",
                "--vm",
                "vm1",
                "--driver",
                "qemu",
                "--domains",
                "finance",
                "--volumes",
                "finance/data",
                "--host",
                "host-1",
            ],
        );
        let mgmt = tls_client(
            Path::new(&dev.env["CAAS_PKI_CA"]),
            Some(caas_tls::pki::CertFiles {
                cert: dev.env["CAAS_OPERATOR_CERT"].clone().into(),
                key: dev.env["CAAS_OPERATOR_KEY"].clone().into(),
            }),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Cloud {
            _tmp: tmp,
            root,
            dev,
            storage,
            rt,
            mgmt,
        }
    }

    fn agent(&self, host: &str) -> String {
        self.dev.agent_url(host)
    }

    /// `caas host SUB vm1 --agent URL` as the operator; (success, output).
    fn host_cmd(&self, sub: &str, host: &str) -> (bool, String) {
        let out = Command::new(caas_bin())
            .args(["host", sub, "vm1", "--agent", &self.agent(host)])
            .envs(&self.dev.env)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The guest's serial console on `host` (its run directory's log).
    fn console(&self, host: &str) -> String {
        find_file(&self.root.join("dev/hosts").join(host), "vm1.serial.log")
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the guest on `host` printed `caas-seq N` with N > `n`; returns N.
    fn wait_seq_past(&self, host: &str, n: u64) -> u64 {
        let t = Instant::now();
        loop {
            let last = seqs(&self.console(host)).last().copied().unwrap_or(0);
            if last > n {
                return last;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "the guest's sequence on {host} did not pass {n}:\n{}",
                self.console(host)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// vm1's volume URI on `host` (the agent's workload view).
    fn volume_uri(&self, host: &str) -> String {
        let v = http_call(
            &self.rt,
            &self.mgmt,
            "GET",
            &format!("{}/v1/agent/workloads", self.agent(host)),
            None,
        )
        .unwrap();
        v.as_array()
            .and_then(|a| a.iter().find(|w| w["vm_id"] == json!("vm1")))
            .and_then(|w| w["volumes"][0]["uri"].as_str())
            .unwrap_or_else(|| panic!("vm1 has no volume on {host}: {v}"))
            .to_string()
    }

    /// The guest's records as the crypto domain on `host` serves them (this test runs as
    /// the agent's uid, one of the proxy's allowed peers): the tenant's view of the volume.
    fn read_ring(&self, host: &str) -> Vec<u8> {
        let uri = self.volume_uri(host);
        self.rt.block_on(async {
            let st = caas_sdp::store::Store::connect_nbd(&uri).await.unwrap();
            let mut out = vec![0u8; RING];
            for (i, c) in out.chunks_mut(1 << 20).enumerate() {
                st.read_at((i << 20) as u64, c).await.unwrap();
            }
            out
        })
    }

    fn volume_file(&self) -> PathBuf {
        caas_host::tl::TlHost::volume_path(&self.storage, "finance", "data")
    }

    fn ks_audit(&self) -> Vec<Value> {
        self.dev
            .caas(&["audit", "list", "--limit", "100000"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    fn ks_audit_has(&self, op: &str, result: &str) -> bool {
        self.ks_audit()
            .iter()
            .any(|v| v["Operation"] == json!(op) && v["Result"] == json!(result))
    }

    fn agent_audit_has(&self, host: &str, op: &str, result: &str) -> bool {
        let v = http_call(
            &self.rt,
            &self.mgmt,
            "GET",
            &format!("{}/v1/agent/audit", self.agent(host)),
            None,
        )
        .unwrap();
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["op"] == json!(op) && e["result"] == json!(result))
        })
    }
}

/// The `caas-seq N` values of a console, in order (complete lines only).
fn seqs(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("caas-seq "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// No 16-byte run of any record is in the storage's copy of the volume.
fn assert_ciphertext_only(file: &Path) {
    let stored = std::fs::read(file).unwrap();
    assert!(
        !stored.windows(8).any(|w| w == b"caasSEQ1"),
        "a plaintext record of the guest is in the storage"
    );
}

#[test]
fn vm_with_a_volume_resumes_on_the_other_host_and_its_disk_sequence_continues() {
    let t0 = Instant::now();
    let c = Cloud::start();
    c.wait_seq_past("host-1", 20);
    // The storage's copy of the volume now (the attacker's snapshot for later).
    let snapshot = std::fs::read(c.volume_file()).unwrap();
    let before = c.wait_seq_past("host-1", 30);
    let t = Instant::now();
    let out = tenant(&c.root, &c.dev, &["suspend", "--vm", "vm1"]);
    eprintln!("suspend with a volume: {:?}\n{out}", t.elapsed());
    assert!(
        qemu_cmdline(&c.root, "vm1").is_none(),
        "the VM runs after suspend"
    );
    assert_ciphertext_only(&c.volume_file());

    let t = Instant::now();
    let out = tenant(
        &c.root,
        &c.dev,
        &["resume", "--vm", "vm1", "--host", "host-2"],
    );
    eprintln!("resume with a volume on host-2: {:?}\n{out}", t.elapsed());
    let after = c.wait_seq_past("host-2", before + 20);
    let console = c.console("host-2");
    assert!(
        !console.contains("caas-seq start") && !console.contains("Linux version"),
        "the guest or its writer restarted on host-2:\n{console}"
    );
    // The disk, read through host-2's crypto domain: one unbroken chain from the first
    // record written on host-1 to the records written on host-2.
    let (first, last) = caas_workload::seq::check(&c.read_ring("host-2")).unwrap();
    assert_eq!(first, 1);
    assert!(last >= after, "{last} < {after}");
    // The resumed session anchored the volume's new epoch and retired the suspended one.
    assert!(c.ks_audit_has("TlSessionRetired", "Success"));

    // Rollback: suspend again (the volume is now at a higher epoch), the storage puts the
    // old snapshot back; a resume (on host-1) opens it below the TTP's anchor: refused.
    let (ok, out) = c.host_cmd("suspend", "host-2");
    assert!(ok, "second suspend: {out}");
    let current = std::fs::read(c.volume_file()).unwrap();
    std::fs::write(c.volume_file(), &snapshot).unwrap();
    let out = c.host_cmd("resume", "host-1");
    assert!(!out.0, "a rolled-back volume was resumed:\n{}", out.1);
    assert!(out.1.contains("volume_rollback"), "{}", out.1);
    assert!(c.agent_audit_has("host-1", "ResumeWorkload", "volume_rollback"));
    assert!(
        qemu_cmdline(&c.root, "vm1").is_none(),
        "a VM runs on a rolled-back volume"
    );
    // The storage puts the real volume back: the resume goes through, the chain goes on.
    std::fs::write(c.volume_file(), &current).unwrap();
    let (ok, out) = c.host_cmd("resume", "host-1");
    assert!(ok, "resume of the real volume: {out}");
    let again = c.wait_seq_past("host-1", last + 10);
    let (first, last) = caas_workload::seq::check(&c.read_ring("host-1")).unwrap();
    assert_eq!(first, 1);
    assert!(last >= again);
    eprintln!("vm_disk suspend test: {:?}", t0.elapsed());
}

#[test]
fn vm_with_a_volume_live_migrates_while_writing_and_the_old_source_gets_no_volume_key() {
    let t0 = Instant::now();
    let c = Cloud::start();
    let before = c.wait_seq_past("host-1", 20);
    let t = Instant::now();
    let out = tenant(
        &c.root,
        &c.dev,
        &["migrate", "--vm", "vm1", "--to", "host-2"],
    );
    eprintln!("live migration with a volume: {:?}\n{out}", t.elapsed());
    let after = c.wait_seq_past("host-2", before + 20);
    let console = c.console("host-2");
    assert!(
        !console.contains("caas-seq start") && !console.contains("Linux version"),
        "the guest or its writer restarted on host-2:\n{console}"
    );
    let (first, last) = caas_workload::seq::check(&c.read_ring("host-2")).unwrap();
    assert_eq!(first, 1);
    assert!(last >= after);
    assert_ciphertext_only(&c.volume_file());
    // The target became the single writer under its session; the source's is retired.
    assert!(c.ks_audit_has("TlSessionRetired", "Success"));

    // The malicious source: host-1's agent (its TPM's AK, its TLS identity, the old
    // session's launch r) asks about the volume after the migration.
    let launch_r = old_launch_r(&c);
    let (c4, _) = volume_c4(&c);
    let source = MaliciousHost::new(&c, "host-1");
    let report = caas_tl::wire::EpochReport {
        host: "host-1".into(),
        vm_id: "vm1".into(),
        launch_r: launch_r.clone(),
        domain: "finance".into(),
        sr: "data".into(),
        c4: c4.clone(),
        // Raising the anchor past every real epoch would lock the tenant out.
        epoch: 1_000_000,
        r: caas_crypto::random_bytes(32).unwrap(),
        t_ms: caas_attest::now_ms(),
    };
    let r = source.post(
        &c,
        caas_tl::wire::label::EPOCH_REPORT,
        "/v1/tl/epoch",
        caas_tl::wire::to_bytes(&report),
    );
    assert_eq!(r.unwrap_err().1, "session_retired");
    assert!(c.ks_audit_has("DbspEpoch", "session_retired"));
    // DomKeyReq for the volume's keys under the old session.
    let req = caas_tl::sc::domkey_request(
        "host-1",
        "vm1",
        &launch_r,
        "data",
        &source_h2(&c),
        &[7u8; 32],
        caas_tl::wire::Meta {
            domain: "finance".into(),
            sp: "dev".into(),
        },
        Some(volume_c4(&c)),
        caas_attest::now_ms(),
    )
    .unwrap();
    let r = source.post(
        &c,
        caas_tl::wire::label::DOMKEY_REQUEST,
        "/v1/tl/domkey",
        caas_tl::wire::to_bytes(&req),
    );
    assert_eq!(r.unwrap_err().1, "session_retired");
    assert!(c.ks_audit_has("DbspDomKey", "session_retired"));
    // The guest on host-2 writes on undisturbed.
    let more = c.wait_seq_past("host-2", last + 10);
    let (_, last) = caas_workload::seq::check(&c.read_ring("host-2")).unwrap();
    assert!(last >= more);
    eprintln!("vm_disk migration test: {:?}", t0.elapsed());
}

/// The r of vm1's launch on host-1 (the TTP's `TlAttest` record names it).
fn old_launch_r(c: &Cloud) -> Vec<u8> {
    let rec = c
        .ks_audit()
        .into_iter()
        .find(|v| v["Operation"] == json!("TlAttest") && v["Result"] == json!("Success"))
        .expect("the launch's TlAttest record");
    let text = rec.to_string();
    let i = text
        .find("session launch r ")
        .expect("launch r in the record")
        + 17;
    hex::decode(&text[i..i + 64]).unwrap()
}

/// H2 of alice's DM (public: SHA-256 of her pk_DM).
fn source_h2(c: &Cloud) -> String {
    caas_tl::dm::DomainManager::from_pkcs8(&std::fs::read(c.root.join("alice/dm.pk8")).unwrap())
        .unwrap()
        .h2()
}

/// The volume's (c4, μ) from its header in the storage.
fn volume_c4(c: &Cloud) -> (Vec<u8>, Vec<u8>) {
    c.rt.block_on(async {
        let st =
            caas_sdp::store::Store::open_file_unlocked(&c.volume_file(), false, false).unwrap();
        let (h, _) = caas_sdp::engine::inspect(&st).await.unwrap();
        (h.dbsp.c4.clone(), h.dbsp.mu.clone())
    })
}

/// A host agent turned malicious: it signs with its TPM's AK (quotes over its bind PCRs,
/// as the honest agent does) and calls the TTP as the agent does.
struct MaliciousHost {
    tpm: caas_tpm::TpmHandle,
    ak: caas_tpm::KeyBlob,
    pcrs: Vec<u32>,
    event_log: Vec<u8>,
    http: caas_attest::client::HttpClient,
}

impl MaliciousHost {
    fn new(c: &Cloud, host: &str) -> Self {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let hdir = c.root.join("dev/hosts").join(host);
        let keys: Value =
            serde_json::from_slice(&std::fs::read(hdir.join("agent-state/tpm-keys.json")).unwrap())
                .unwrap();
        let ak = caas_tpm::KeyBlob {
            public: b64.decode(keys["ak_public"].as_str().unwrap()).unwrap(),
            private: b64.decode(keys["ak_private"].as_str().unwrap()).unwrap(),
        };
        let pcrs = keys["bind_pcrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u32)
            .collect();
        let tcti = &c.dev.env[&format!("CAAS_HOST_{}_TCTI", host.to_uppercase().replace('-', "_"))];
        // The key service as the agents reach it (in dev: the plain endpoint; with TLS the
        // host's certificate would be the agent's own, which a malicious agent holds).
        let http = caas_attest::client::HttpClient::new(Duration::from_secs(60));
        MaliciousHost {
            tpm: caas_tpm::TpmHandle::open(tcti).unwrap(),
            ak,
            pcrs,
            event_log: std::fs::read(hdir.join("eventlog.bin")).unwrap(),
            http,
        }
    }

    fn post(
        &self,
        c: &Cloud,
        label: &str,
        route: &str,
        body: Vec<u8>,
    ) -> Result<Value, (u16, String)> {
        let nonce = caas_tl::crypto::ak_nonce(label, &body).to_vec();
        let (ak, pcrs) = (self.ak.clone(), self.pcrs.clone());
        let q =
            c.rt.block_on(
                self.tpm
                    .run(move |t| t.quote(&ak, &nonce, caas_tpm::PcrBank::Sha256, &pcrs)),
            )
            .unwrap();
        let signed = caas_tl::wire::AkSigned {
            body,
            evidence: caas_attest::Evidence {
                quote: q.attest,
                signature: q.signature,
                event_log: self.event_log.clone(),
                pcr_values: Vec::new(),
            },
        };
        http_call(
            &c.rt,
            &self.http,
            "POST",
            &format!("{}{route}", c.dev.endpoint()),
            Some(&serde_json::to_value(&signed).unwrap()),
        )
    }
}
