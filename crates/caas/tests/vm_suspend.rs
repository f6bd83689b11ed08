//! Encrypted suspend and resume of a REAL VM (issue 13 items 4 and 6, seed 001 §3.4
//! "Suspension"; `docs/suspend-migrate.md`): the legacy guest image is launched through TL
//! with the qemu driver on host-1 of a `caas dev --hosts 2` cloud, suspended (`caas tenant
//! suspend`, through the scheduler; the attacks drive the agents directly with `caas host
//! suspend|resume`, as a compromised management would) into an
//! encrypted saved state in the (attacker-writable) storage, and resumed on host-2: the
//! counter the guest keeps continues where it stopped, and the guest still holds τ (the
//! tenant's PSK check succeeds on the new host; a rebooted guest would have no τ), and the
//! key pair the guest made in its VSM after launch (a token object) signs there, verified
//! with the public key the tenant read before the suspend (the VSM's token travelled,
//! imported by host-2's VSM and audited there). Refused,
//! each with an audit record in the agent's log and the TTP's chain: a tampered and a
//! truncated saved state, a replayed older one, a resume on a host outside the workload's
//! profile and on an untrusted host. No management answer carries a key or plaintext state.
//!
//! Needs qemu-system-x86 and the image tools (`scripts/install-deps`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::vm::*;
use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `caas host SUB VM --agent URL` as the operator; (success, stdout+stderr).
fn host_cmd(dev: &Dev, sub: &str, vm: &str, host: &str) -> (bool, String) {
    let key = host.to_uppercase().replace('-', "_");
    let url = &dev.env[&format!("CAAS_HOST_{key}_URL")];
    let out = Command::new(caas_bin())
        .args(["host", sub, vm, "--agent", url])
        .envs(&dev.env)
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

/// The `caas-counter N` values in a serial log, in order.
fn counters(text: &str) -> Vec<u64> {
    // Only complete lines: the suspend may cut one in two (its rest is on the next host).
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("caas-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn serial_text(root: &Path, host: &str) -> String {
    find_file(&root.join("dev/hosts").join(host), "vm1.serial.log")
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .unwrap_or_default()
}

/// The agent's audit log (`caas host audit`, verified) has a record of `op` with result
/// `code`.
fn agent_audit_has(dev: &Dev, host: &str, op: &str, code: &str) -> bool {
    let key = host.to_uppercase().replace('-', "_");
    let url = &dev.env[&format!("CAAS_HOST_{key}_URL")];
    let out = Command::new(caas_bin())
        .args(["host", "audit", "--agent", url])
        .envs(&dev.env)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text[text.find('[').unwrap_or(0)..]).unwrap_or_default();
    v.as_array().is_some_and(|a| {
        a.iter()
            .any(|e| e["op"] == json!(op) && e["result"] == json!(code))
    })
}

/// The key service's audit chain has a record of `op` with result `code`.
fn ttp_audit_has(dev: &Dev, op: &str, code: &str) -> bool {
    dev.caas(&["audit", "list", "--limit", "100000"])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|v| v["Operation"] == json!(op) && v["Result"] == json!(code))
}

fn refused(out: &(bool, String), code: &str, what: &str) {
    assert!(!out.0, "{what}: accepted:\n{}", out.1);
    assert!(out.1.contains(code), "{what}: expected {code}:\n{}", out.1);
}

/// `None` once no qemu of vm1 runs (within `t`), else its command line.
fn no_vm_within(root: &Path, t: Duration) -> Option<Vec<String>> {
    let start = Instant::now();
    loop {
        let q = qemu_cmdline(root, "vm1");
        if q.is_none() || start.elapsed() > t {
            return q;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_counter_past(root: &Path, host: &str, n: u64) -> Vec<u64> {
    let t = Instant::now();
    loop {
        let c = counters(&serial_text(root, host));
        if c.last().is_some_and(|&l| l > n) {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the guest's counter on {host} did not pass {n}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The tenant's check of the guest (`caas tenant connect`): τ, the DM's challenge, and a
/// signature by the guest's VSM key, which the tenant verifies; returns the report.
fn tenant_check(root: &Path, dev: &Dev) -> Value {
    let out = tenant(root, dev, &["connect", "--vm", "vm1"]);
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let nonce: [u8; 32] = B64
        .decode(v["nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let disk: [u8; 32] = hex::decode(v["disk_sha256"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let point = B64
        .decode(v["vsm"]["public_point"].as_str().expect("a VSM signature"))
        .unwrap();
    let sig = B64.decode(v["vsm"]["signature"].as_str().unwrap()).unwrap();
    caas_workload::vsm::verify_vsm_signature(
        &point,
        &caas_workload::proto::vsm_message("vm1", &nonce, &disk),
        &sig,
    )
    .expect("the tenant verifies the VSM signature");
    v
}

/// Records of `op` with CK_RV `rv` in the audit logs of the crypto domains under `dir`
/// (links checked: a launched VSM's key is ephemeral).
fn vsm_audit_count(dir: &Path, op: &str, rv: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.ends_with("domc/audit.log") {
                n += caas_domc::audit::verify_links_only(&p)
                    .unwrap_or_default()
                    .iter()
                    .filter(|e| e.op == op && e.rv == rv)
                    .count();
            }
        }
    }
    n
}

#[test]
fn suspended_vm_resumes_on_the_other_host_and_attacks_on_its_state_are_refused() {
    let t0 = Instant::now();
    let image = guest_image();
    let (_tmp, root, dev, storage) = provisioned_guest(&image, &["host-1", "host-2"]);
    let out = tenant(
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
            "--host",
            "host-1",
        ],
    );
    assert!(out.contains("\"host\": \"host-1\""), "{out}");
    let rec: Value =
        serde_json::from_slice(&std::fs::read(root.join("alice/vms/vm1.json")).unwrap()).unwrap();
    let tau = caas_crypto::SecretBytes::new(B64.decode(rec["tau"].as_str().unwrap()).unwrap());
    wait_counter_past(&root, "host-1", 3);
    // The guest made its key pair in its VSM (a token object) after launch.
    let key_before = tenant_check(&root, &dev)["vsm"]["public_point"].clone();

    // Suspend on host-1: the answer names the object and the counter, nothing secret. The
    // agent removes the VM's run directory (and its serial log) after the suspend: a
    // watcher keeps the last content it read.
    let log1 = find_file(&root.join("dev/hosts/host-1"), "vm1.serial.log").expect("serial log");
    let stop_watch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop_watch.clone();
        std::thread::spawn(move || {
            let mut last = String::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(b) = std::fs::read(&log1) {
                    let t = String::from_utf8_lossy(&b).into_owned();
                    if t.len() >= last.len() {
                        last = t;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            last
        })
    };
    let t = Instant::now();
    let out = tenant(&root, &dev, &["suspend", "--vm", "vm1"]);
    stop_watch.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = counters(&watcher.join().unwrap());
    eprintln!("suspend: {:?}\n{out}", t.elapsed());
    let s: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(s["counter"], json!(1));
    assert_eq!(s["object"], json!("states/vm1.state"));
    for field in ["key", "k_s", "tau", "dk", "sealed", "pin"] {
        assert!(
            !out.to_lowercase().contains(&format!("\"{field}\"")),
            "{out}"
        );
    }
    assert!(
        qemu_cmdline(&root, "vm1").is_none(),
        "the VM still runs after suspend"
    );
    let object = storage.join("states/vm1.state");
    let state1 = std::fs::read(&object).unwrap();
    // The object in the (untrusted) storage holds no guest memory in the clear: not the
    // guest agent's code, which sits in the guest's RAM.
    let agent = std::fs::read(env!("CARGO_BIN_EXE_caas-guest")).unwrap();
    let probe: Vec<&[u8]> = agent
        .chunks_exact(64)
        .filter(|c| c.iter().collect::<std::collections::HashSet<_>>().len() > 20)
        .take(200)
        .collect();
    assert!(probe.len() > 100);
    assert!(
        !probe
            .iter()
            .any(|p| state1.windows(p.len()).any(|w| w == *p)),
        "guest memory in the clear in the saved state"
    );

    // Tampered (a flipped byte) and truncated states are refused on host-2 with an audit
    // record; the guest never runs on them.
    let mut bad = state1.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&object, &bad).unwrap();
    refused(
        &host_cmd(&dev, "resume", "vm1", "host-2"),
        "state_invalid",
        "tampered saved state",
    );
    assert_eq!(
        no_vm_within(&root, Duration::from_secs(5)),
        None,
        "a VM runs on a tampered state"
    );
    std::fs::write(&object, &state1[..state1.len() - 1000]).unwrap();
    refused(
        &host_cmd(&dev, "resume", "vm1", "host-2"),
        "state_invalid",
        "truncated saved state",
    );
    assert!(agent_audit_has(
        &dev,
        "host-2",
        "ResumeWorkload",
        "state_invalid"
    ));

    // Once host-2 got the key, host-1 cannot resume the same state (no fork).
    std::fs::write(&object, &state1).unwrap();
    refused(
        &host_cmd(&dev, "resume", "vm1", "host-1"),
        "state_replayed",
        "the same state on a second host",
    );

    // The real state resumes on host-2: the counter continues where it stopped, τ is the
    // guest's still.
    let t = Instant::now();
    let out = tenant(&root, &dev, &["resume", "--vm", "vm1", "--host", "host-2"]);
    eprintln!("resume on host-2: {:?}\n{out}", t.elapsed());
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(v["host"], json!("host-2"));
    let last = *before.last().unwrap();
    let after = wait_counter_past(&root, "host-2", last + 2);
    // The next value (or the one after, when the suspend cut a line in two): neither a
    // restart from 1 nor a repeat.
    assert!(
        after[0] == last + 1 || after[0] == last + 2,
        "the counter did not continue: {last} before, {after:?} after"
    );
    for w in after.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{after:?}");
    }
    let target = serial_text(&root, "host-2");
    assert!(
        !target.contains("Linux version") && !target.contains("caas-workload ready"),
        "the guest booted again on host-2:\n{target}"
    );
    let addr: std::net::SocketAddr = v["workload"]["endpoint"].as_str().unwrap().parse().unwrap();
    caas_workload::psk::connect(std::net::TcpStream::connect(addr).unwrap(), "vm1", &tau)
        .expect("the resumed guest still holds τ");
    // The VSM's token travelled: the same key signs on host-2 (found by its CKA_ID by the
    // guest's PKCS#11 user), verified under the public key read before the suspend.
    let resumed = tenant_check(&root, &dev);
    assert_eq!(
        resumed["vsm"]["public_point"], key_before,
        "the guest's VSM key did not survive the suspend: {resumed}"
    );
    assert_eq!(
        vsm_audit_count(&root.join("dev/hosts/host-2"), "TokenImport", "0x0"),
        1,
        "host-2's VSM audits the token import"
    );

    // Replay: suspend again (counter 2), then put the older state back: refused.
    let (ok, out) = host_cmd(&dev, "suspend", "vm1", "host-2");
    assert!(ok, "second suspend failed:\n{out}");
    assert!(out.contains("\"counter\": 2"), "{out}");
    let state2 = std::fs::read(&object).unwrap();
    std::fs::write(&object, &state1).unwrap();
    refused(
        &host_cmd(&dev, "resume", "vm1", "host-1"),
        "state_replayed",
        "replayed older saved state",
    );
    assert!(agent_audit_has(
        &dev,
        "host-1",
        "ResumeWorkload",
        "state_replayed"
    ));
    assert!(ttp_audit_has(&dev, "TlResume", "state_replayed"));

    // A host outside the workload's security profile: host-1 moved to profile "other"
    // (same boot, another name) and attested there.
    std::fs::write(&object, &state2).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ops = dev.operator_http(Duration::from_secs(60));
    let ks = dev.endpoint().to_string();
    let call =
        |m: &str, p: &str, b: Option<&Value>| http_call(&rt, &ops, m, &format!("{ks}{p}"), b);
    let mut other = call("GET", "/v1/attest/profiles/dev", None).unwrap();
    other["name"] = json!("other");
    call("POST", "/v1/attest/profiles", Some(&other)).unwrap();
    call(
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        Some(&json!({ "profile": "other" })),
    )
    .unwrap();
    let verdict = call("POST", "/v1/attest/hosts/host-1/attest", None).unwrap();
    assert_eq!(verdict["trusted"], json!(true), "{verdict}");
    refused(
        &host_cmd(&dev, "resume", "vm1", "host-1"),
        "sp_mismatch",
        "resume on a host outside the profile",
    );
    assert!(ttp_audit_has(&dev, "TlResume", "sp_mismatch"));

    // An untrusted host: host-1 back in the profile, then its PCR 7 changes.
    call(
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        Some(&json!({ "profile": "dev" })),
    )
    .unwrap();
    call("POST", "/v1/attest/hosts/host-1/attest", None).unwrap();
    let mgmt = tls_client(
        Path::new(&dev.env["CAAS_PKI_CA"]),
        Some(caas_tls::pki::CertFiles {
            cert: dev.env["CAAS_OPERATOR_CERT"].clone().into(),
            key: dev.env["CAAS_OPERATOR_KEY"].clone().into(),
        }),
    );
    http_call(
        &rt,
        &mgmt,
        "POST",
        &format!("{}/v1/agent/dev/measure", dev.env["CAAS_HOST_HOST_1_URL"]),
        Some(&json!({ "pcr": 7, "data": "an unexpected kernel module" })),
    )
    .unwrap();
    let out = host_cmd(&dev, "resume", "vm1", "host-1");
    assert!(!out.0, "resume on an untrusted host accepted:\n{}", out.1);
    assert!(
        out.1.contains("attestation_failed") || out.1.contains("host_untrusted"),
        "{}",
        out.1
    );
    assert!(
        ttp_audit_has(&dev, "TlResume", "attestation_failed")
            || ttp_audit_has(&dev, "TlResume", "host_untrusted")
    );
    assert!(
        agent_audit_has(&dev, "host-1", "ResumeWorkload", "attestation_failed")
            || agent_audit_has(&dev, "host-1", "ResumeWorkload", "host_untrusted")
    );
    // The latest state is still resumable where it belongs.
    let (ok, out) = host_cmd(&dev, "resume", "vm1", "host-2");
    assert!(ok, "resume of the latest state failed:\n{out}");
    eprintln!("vm_suspend total: {:?}", t0.elapsed());
}
