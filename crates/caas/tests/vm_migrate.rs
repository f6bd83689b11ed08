//! Live migration to an attested host (issue 13 item 5; `docs/suspend-migrate.md` "Live
//! migration") against a real `caas dev --hosts 2` (swtpm TPMs, host agents, the TTP in the
//! key service, crypto-domain processes): the workload moves with its DBSP volume, the
//! source's crypto domain is destroyed, the tenant's τ check succeeds on the target; and the
//! refusals, each with its audit records: a target outside the workload's profile (nothing
//! reaches the target), a tampered migration stream, a replayed offer and a replayed stream.
//!
//! The attacker is the seed's ADV: it controls the management (which names the target's
//! URL) and the network between the agents — here a relay holding a host-role certificate of
//! the deployment (as a compromised host would), which sees, alters and replays every byte
//! the agents exchange over their TLS link. It controls neither the TPMs nor the TTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_attest::client::HttpClient;
use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

struct Cloud {
    /// The (untrusted) cloud management: key-service and operator roles.
    mgmt: HttpClient,
    pki: caas_tls::pki::DevCa,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dev: Dev,
    rt: tokio::runtime::Runtime,
}

type Reply = Result<Value, (u16, String)>;

impl Cloud {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let root = tmp.path().to_path_buf();
        let dev = Dev::start_with(
            &root.join("dev"),
            "127.0.0.1:0",
            &["--hosts", "2", "--attest-secs", "3600"],
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // The deployment CA, in a directory of the test's own: certificates it issues must
        // not overwrite the dev agents' files in dev/pki.
        let own = root.join("test-pki");
        std::fs::create_dir_all(&own).unwrap();
        for f in ["ca.key", "ca.pem"] {
            std::fs::copy(root.join("dev/pki").join(f), own.join(f)).unwrap();
        }
        let pki = caas_tls::pki::DevCa::load_or_create(&own).unwrap();
        let mgmt = tls_client(
            &pki.ca_file(),
            Some(
                pki.issue(
                    "cloud-management",
                    &[caas_tls::Role::KeyService, caas_tls::Role::Operator],
                    &[],
                )
                .unwrap(),
            ),
        );
        Cloud {
            mgmt,
            pki,
            _tmp: tmp,
            root,
            dev,
            rt,
        }
    }

    fn tenant(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(caas_bin())
            .arg("tenant")
            .arg("--dir")
            .arg(self.root.join("alice"))
            .args(args)
            .envs(&self.dev.env)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn tenant_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.tenant(args);
        assert!(ok, "caas tenant {args:?} failed:\n{text}");
        text
    }

    /// alice with domain finance and image "web" sealed to both hosts, launched as vm1 on
    /// host-1 (process driver) with finance/db attached.
    fn launch_vm1(&self) {
        self.tenant_ok(&["init"]);
        self.tenant_ok(&["acl", "--domains", "finance"]);
        let raw = self.root.join("web.raw");
        let data: Vec<u8> = (0..(2 << 20))
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&raw, &data).unwrap();
        self.tenant_ok(&[
            "provision",
            "--image",
            raw.to_str().unwrap(),
            "--id",
            "web",
            "--hosts",
            "host-1,host-2",
        ]);
        self.tenant_ok(&[
            "launch",
            "--id",
            "web",
            "--vm",
            "vm1",
            "--host",
            "host-1",
            "--domains",
            "finance",
            "--volumes",
            "finance/db",
        ]);
    }

    fn agent(&self, host: &str) -> String {
        self.dev.agent_url(host)
    }

    fn ks(&self) -> String {
        self.dev.ks_url()
    }

    fn call(&self, method: &str, url: &str, body: Option<&Value>) -> Reply {
        if url.starts_with("https://") {
            return http_call(&self.rt, &self.mgmt, method, url, body);
        }
        let http = self.dev.operator_http(std::time::Duration::from_secs(120));
        http_call(&self.rt, &http, method, url, body)
    }

    /// The management's migration request to the source agent, naming the target's URL.
    fn migrate(&self, vm: &str, from: &str, to: &str, to_url: &str) -> Reply {
        self.call(
            "POST",
            &format!("{}/v1/agent/workloads/{vm}/migrate", self.agent(from)),
            Some(&json!({ "to": to, "to_url": to_url })),
        )
    }

    fn workloads(&self, host: &str) -> Vec<String> {
        self.call(
            "GET",
            &format!("{}/v1/agent/workloads", self.agent(host)),
            None,
        )
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["vm_id"].as_str().unwrap().to_string())
        .collect()
    }

    /// `host`'s agent audit log: (op, result) of every record.
    fn agent_audit(&self, host: &str) -> Vec<(String, String)> {
        self.call("GET", &format!("{}/v1/agent/audit", self.agent(host)), None)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["op"].as_str().unwrap_or_default().to_string(),
                    e["result"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn agent_audit_has(&self, host: &str, op: &str, result: &str) -> bool {
        self.agent_audit(host)
            .iter()
            .any(|(o, r)| o == op && r == result)
    }

    /// How many of the key service's audit records have `op` and `result`.
    fn ks_audit_count(&self, op: &str, result: &str) -> usize {
        self.dev
            .caas(&["audit", "list", "--limit", "100000"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["Operation"] == json!(op) && v["Result"] == json!(result))
            .count()
    }

    fn ks_audit_has(&self, op: &str, result: &str) -> bool {
        self.ks_audit_count(op, result) > 0
    }

    /// host-2 appraised under another profile than the workload's ("dev").
    fn move_to_other_profile(&self, host: &str) {
        let mut p = self
            .call(
                "GET",
                &format!("{}/v1/attest/profiles/dev", self.ks()),
                None,
            )
            .unwrap();
        p["name"] = json!("other");
        self.call(
            "POST",
            &format!("{}/v1/attest/profiles", self.ks()),
            Some(&p),
        )
        .unwrap();
        self.call(
            "PUT",
            &format!("{}/v1/attest/hosts/{host}/profile", self.ks()),
            Some(&json!({ "profile": "other" })),
        )
        .unwrap();
        let v = self
            .call(
                "POST",
                &format!("{}/v1/attest/hosts/{host}/attest", self.ks()),
                None,
            )
            .unwrap();
        assert_eq!(v["trusted"], json!(true), "{host} trusted under other: {v}");
    }
}

fn assert_refused(r: &Reply, code: &str, what: &str) {
    match r {
        Err((s, c)) if c == code && *s >= 400 => {}
        other => panic!("{what}: expected {code}, got {other:?}"),
    }
}

/// What the relay does to the records it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    None,
    /// Flip one bit of the first batch at this offset.
    Flip(usize),
    /// Flip one bit of the n-th batch (0-based) at this offset: for a VM, batch 1 on
    /// carry qemu's stream.
    FlipBatch(usize, usize),
}

/// Everything the relay saw.
#[derive(Default)]
struct Seen {
    requests: usize,
    offers: Vec<Value>,
    batches: Vec<(String, Vec<u8>)>,
}

/// A man in the middle between the two agents: a TLS server with a host-role certificate
/// (the source requires the `host` role of whoever it reaches) that forwards to the real
/// target as the source would (a certificate named like the source), recording — and
/// optionally altering — every offer and record batch.
struct Relay {
    url: String,
    seen: Arc<Mutex<Seen>>,
    _task: tokio::task::JoinHandle<()>,
}

fn relay(c: &Cloud, target_url: &str, tamper: Tamper) -> Relay {
    use axum::extract::{Path as AxPath, State};
    use axum::response::IntoResponse;
    use axum::routing::post;
    let server = c
        .pki
        .issue("relay", &[caas_tls::Role::Host], &["127.0.0.1"])
        .unwrap();
    let as_source = c.pki.issue("host-1", &[caas_tls::Role::Host], &[]).unwrap();
    let client = tls_client(&c.pki.ca_file(), Some(as_source));
    #[derive(Clone)]
    struct St {
        client: HttpClient,
        target: String,
        tamper: Tamper,
        seen: Arc<Mutex<Seen>>,
    }
    fn answer(r: Result<Value, caas_attest::Error>) -> axum::response::Response {
        match r {
            Ok(v) => axum::Json(v).into_response(),
            Err(caas_attest::Error::Remote {
                status,
                code,
                message,
                ..
            }) => (
                axum::http::StatusCode::from_u16(status).unwrap(),
                axum::Json(json!({ "code": code, "message": message })),
            )
                .into_response(),
            Err(e) => (
                axum::http::StatusCode::BAD_GATEWAY,
                axum::Json(json!({ "code": "relay", "message": e.to_string() })),
            )
                .into_response(),
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let st = St {
        client,
        target: target_url.trim_end_matches('/').to_string(),
        tamper,
        seen: seen.clone(),
    };
    let app = axum::Router::new()
        .route(
            "/v1/agent/migrations",
            post(|State(s): State<St>, axum::Json(o): axum::Json<Value>| async move {
                {
                    let mut g = s.seen.lock().unwrap();
                    g.requests += 1;
                    g.offers.push(o.clone());
                }
                answer(
                    s.client
                        .post::<_, Value>(&format!("{}/v1/agent/migrations", s.target), &o)
                        .await,
                )
            }),
        )
        .route(
            "/v1/agent/migrations/{id}/records",
            post(
                |State(s): State<St>, AxPath(id): AxPath<String>, body: axum::body::Bytes| async move {
                    let mut b = body.to_vec();
                    {
                        let mut g = s.seen.lock().unwrap();
                        g.requests += 1;
                        match s.tamper {
                            Tamper::Flip(at) if g.batches.is_empty() => b[at] ^= 0x01,
                            Tamper::FlipBatch(n, at) if g.batches.len() == n && at < b.len() => {
                                b[at] ^= 0x01
                            }
                            _ => {}
                        }
                        g.batches.push((id.clone(), body.to_vec()));
                    }
                    answer(
                        s.client
                            .request::<Value>(
                                "POST",
                                &format!("{}/v1/agent/migrations/{id}/records", s.target),
                                Some(b),
                                &[],
                            )
                            .await,
                    )
                },
            )
            // The network forwards whatever the source sends (a VM stream's batches are up
            // to several MiB).
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        )
        .with_state(st);
    let tls = caas_tls::server::server_config(&caas_tls::server::ServerTls {
        cert: server.cert,
        key: server.key,
        client_ca: Some(c.pki.ca_file()),
        crl: None,
    })
    .unwrap();
    let listener =
        c.rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = c.rt.spawn(async move {
        let _ = caas_tls::server::serve(listener, app, tls, None, std::future::pending()).await;
    });
    Relay {
        url: format!("https://{addr}"),
        seen,
        _task: task,
    }
}

/// Records of `op` with CK_RV `rv` in the audit logs of the crypto domains under `dir`
/// (links checked: a launched VSM's key is ephemeral).
fn vsm_audit_count(dir: &std::path::Path, op: &str, rv: &str) -> usize {
    let mut files = Vec::new();
    find_files(dir, "domc/audit.log", &mut files);
    files
        .iter()
        .map(|p| {
            caas_domc::audit::verify_links_only(p)
                .unwrap_or_default()
                .iter()
                .filter(|e| e.op == op && e.rv == rv)
                .count()
        })
        .sum()
}

/// The VM record the tenant keeps (τ, host, endpoint).
fn vm_record(c: &Cloud) -> Value {
    serde_json::from_slice(&std::fs::read(c.root.join("alice/vms/vm1.json")).unwrap()).unwrap()
}

fn connect_ok(c: &Cloud) -> Value {
    let out = c.tenant_ok(&["connect", "--vm", "vm1"]);
    serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap()
}

fn find_files(dir: &std::path::Path, suffix: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            find_files(&p, suffix, out);
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
}

/// The legacy guest image provisioned for both hosts and booted as vm1 on host-1 with the
/// qemu driver; returns the plaintext image.
fn launch_real_vm(c: &Cloud) -> Vec<u8> {
    let image = common::vm::guest_image();
    let plain = std::fs::read(&image).unwrap();
    let raw = c.root.join("guest.raw");
    std::fs::copy(&image, &raw).unwrap();
    c.tenant_ok(&["init"]);
    c.tenant_ok(&["acl", "--domains", "finance"]);
    c.tenant_ok(&[
        "provision",
        "--image",
        raw.to_str().unwrap(),
        "--id",
        "legacy",
        "--hosts",
        "host-1,host-2",
    ]);
    c.tenant_ok(&[
        "launch",
        "--id",
        "legacy",
        "--vm",
        "vm1",
        "--driver",
        "qemu",
        "--host",
        "host-1",
        "--domains",
        "finance",
    ]);
    plain
}

/// The tenant's check of a report: the VSM signature over (vm, nonce, disk hash) verifies.
fn verify_vsm(v: &Value, disk: &[u8; 32]) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let nonce: [u8; 32] = b64
        .decode(v["nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let msg = caas_workload::proto::vsm_message("vm1", &nonce, disk);
    let point = b64
        .decode(v["vsm"]["public_point"].as_str().unwrap())
        .unwrap();
    let sig = b64.decode(v["vsm"]["signature"].as_str().unwrap()).unwrap();
    caas_workload::vsm::verify_vsm_signature(&point, &msg, &sig)
        .expect("the tenant verifies the VSM signature");
}

/// The real VM (the legacy guest image, booted from the crypto domain's NBD export) moves
/// live: qemu's migration stream travels in the encrypted records, the guest continues on
/// the target without booting again, still proves τ and signs with its VSM there.
#[test]
fn real_vm_live_migrates_to_attested_host() {
    let t0 = std::time::Instant::now();
    let c = Cloud::start();
    let plain = launch_real_vm(&c);
    let disk = caas_tl::crypto::sha256(&plain);
    let before = connect_ok(&c);
    assert_eq!(before["disk_sha256"], json!(hex::encode(disk)));
    verify_vsm(&before, &disk);
    let t = std::time::Instant::now();
    let out = c.tenant_ok(&["migrate", "--vm", "vm1", "--to", "host-2"]);
    eprintln!("live migration: {:?}\n{out}", t.elapsed());
    let r: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert!(
        r["bytes"][1].as_u64().unwrap() > 1 << 20,
        "qemu's stream: {r}"
    );
    assert!(c.workloads("host-1").is_empty());
    assert_eq!(c.workloads("host-2"), vec!["vm1".to_string()]);
    // Only the target's run directory is left (the source removes its copy in the
    // background after its answer); the target's serial log has no second boot.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let logs = loop {
        let mut logs = Vec::new();
        find_files(&c.root.join("dev"), "vm1.serial.log", &mut logs);
        if logs.len() == 1 || std::time::Instant::now() > deadline {
            break logs;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(logs.len(), 1, "{logs:?}");
    let console = std::fs::read_to_string(&logs[0]).unwrap_or_default();
    assert!(
        !console.contains("caas-workload ready") && !console.contains("Linux version"),
        "the guest booted again on the target: {console}"
    );
    // The tenant's τ check and the DM's challenge on the target; the disk through the
    // target's crypto domain.
    let after = connect_ok(&c);
    assert_eq!(after["disk_sha256"], before["disk_sha256"], "{after}");
    // The VSM answers on the target (the target's crypto domain, over virtio-serial) with
    // the key pair the guest made in its VSM after launch: the token travelled in the
    // stream, the same key signs, verified under the public key read before.
    verify_vsm(&after, &disk);
    assert_eq!(
        after["vsm"]["public_point"], before["vsm"]["public_point"],
        "the guest's VSM key did not travel: {after}"
    );
    assert_eq!(
        vsm_audit_count(&c.root.join("dev/hosts/host-2"), "TokenImport", "0x0"),
        1,
        "the target's VSM audits the token import"
    );
    assert!(
        r["timings"].to_string().contains("VSM token exported"),
        "{r}"
    );
    assert!(c.agent_audit_has("host-1", "MigrateWorkload", "ok"));
    assert!(c.agent_audit_has("host-2", "MigrationRecords", "ok"));
    assert!(c.ks_audit_has("TlMigrate", "Success"));
    eprintln!("real VM migration test: {:?}", t0.elapsed());
}

/// A bit of qemu's stream flipped on the way: the target refuses the record, stops the
/// qemu that was waiting for it (the guest never runs there), the source cancels its
/// migration and the guest keeps running on the source.
#[test]
fn real_vm_tampered_migration_stream_is_refused_and_the_vm_runs_on() {
    let c = Cloud::start();
    let plain = launch_real_vm(&c);
    let relay = relay(&c, &c.agent("host-2"), Tamper::FlipBatch(2, 5000));
    let r = c.migrate("vm1", "host-1", "host-2", &relay.url);
    assert_refused(&r, "stream_tampered", "tampered qemu stream");
    assert!(relay.seen.lock().unwrap().batches.len() >= 3);
    assert!(c.agent_audit_has("host-2", "MigrationRecords", "stream_tampered"));
    assert!(c.agent_audit_has("host-1", "MigrateWorkload", "stream_tampered"));
    assert!(c.workloads("host-2").is_empty());
    assert_eq!(c.workloads("host-1"), vec!["vm1".to_string()]);
    // The guest on the source runs on: τ, disk and VSM.
    let v = connect_ok(&c);
    verify_vsm(&v, &caas_tl::crypto::sha256(&plain));
}

/// A VM's qemu starts streaming into the source's local buffer while the TTP attests the
/// target: when the target is outside the profile, none of it leaves the host (the relay
/// in front of the target sees no request), qemu's migration is cancelled and the guest
/// runs on at the source (τ, disk, VSM), audited at the source and the TTP.
#[test]
fn real_vm_migration_outside_the_profile_sends_nothing_and_the_guest_runs_on() {
    let c = Cloud::start();
    let plain = launch_real_vm(&c);
    connect_ok(&c);
    c.move_to_other_profile("host-2");
    let relay = relay(&c, &c.agent("host-2"), Tamper::None);
    let r = c.migrate("vm1", "host-1", "host-2", &relay.url);
    assert_refused(&r, "sp_mismatch", "VM to a target outside the profile");
    assert_eq!(
        relay.seen.lock().unwrap().requests,
        0,
        "bytes of the VM reached the target before it was attested"
    );
    assert!(c.agent_audit_has("host-1", "MigrateWorkload", "sp_mismatch"));
    assert!(c.ks_audit_has("TlMigrate", "sp_mismatch"));
    assert!(c.workloads("host-2").is_empty());
    assert_eq!(c.workloads("host-1"), vec!["vm1".to_string()]);
    // The guest was not left stopped by the cancelled stream: τ, disk and VSM answer.
    let v = connect_ok(&c);
    verify_vsm(&v, &caas_tl::crypto::sha256(&plain));
}

/// The crypto domain keeps its own audit log in the workload's run directory (chained
/// under its ephemeral domain key), which goes with the workload: its records are appended
/// to the agent's audit first — on the source after the migration (the VSM's token export
/// among them), on the target when the operator stops the workload (the import).
#[test]
fn domain_audit_is_shipped_to_the_agent_audit_before_the_run_directory_goes() {
    let c = Cloud::start();
    c.launch_vm1();
    connect_ok(&c);
    c.tenant_ok(&["migrate", "--vm", "vm1", "--to", "host-2"]);
    let entries = |host: &str| -> Vec<(String, String, String)> {
        c.call("GET", &format!("{}/v1/agent/audit", c.agent(host)), None)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let f = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (f("op"), f("subject"), f("result"))
            })
            .collect()
    };
    let shipped = |log: &[(String, String, String)], call: &str| {
        log.iter().any(|(op, s, r)| {
            op == "DomainAudit" && s.starts_with("vm1 #") && s.contains(call) && r == "0x0"
        })
    };
    let src = entries("host-1");
    assert!(shipped(&src, "TokenExport"), "source: {src:?}");
    assert!(
        src.iter()
            .any(|(op, s, r)| op == "DomainAuditShipped" && s.starts_with("vm1 ") && r == "ok"),
        "{src:?}"
    );
    // The source's run directory is gone with its copy of the domain's log.
    let mut files = Vec::new();
    find_files(
        &c.root.join("dev/hosts/host-1"),
        "domc/audit.log",
        &mut files,
    );
    assert!(files.is_empty(), "{files:?}");
    // The target's domain imported the token; stopping the workload ships its log too.
    assert!(!shipped(&entries("host-2"), "TokenImport"));
    c.call(
        "POST",
        &format!("{}/v1/agent/workloads/vm1/stop", c.agent("host-2")),
        Some(&json!({})),
    )
    .unwrap();
    let dst = entries("host-2");
    assert!(shipped(&dst, "TokenImport"), "target: {dst:?}");
}

#[test]
fn workload_migrates_to_attested_host_with_its_volume_and_tau() {
    let c = Cloud::start();
    c.launch_vm1();
    let before = connect_ok(&c);
    assert_eq!(c.workloads("host-1"), vec!["vm1".to_string()]);
    let epochs = c.ks_audit_count("DbspEpoch", "Success");
    // The tenant's request, through the (untrusted) scheduler.
    let out = c.tenant_ok(&["migrate", "--vm", "vm1", "--to", "host-2"]);
    eprintln!("{out}");
    let r: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(r["target"], json!("host-2"), "{r}");
    // The management's answer carries no key and no state.
    let text = r.to_string();
    let tau = vm_record(&c)["tau"].as_str().unwrap().to_string();
    assert!(!text.contains(&tau), "τ in the migration answer: {text}");
    for k in ["\"dk\"", "\"tau\"", "\"key\"", "\"secret\""] {
        assert!(!text.contains(k), "{k} in the migration answer: {text}");
    }
    // The source's crypto domain and workload are gone; the target runs it.
    assert!(c.workloads("host-1").is_empty());
    assert_eq!(c.workloads("host-2"), vec!["vm1".to_string()]);
    assert_eq!(vm_record(&c)["host"], json!("host-2"));
    // The tenant's τ check, the DM's challenge, the VSM and the DBSP volume on the target
    // (the workload writes and reads back its volume through the target's crypto domain).
    let after = connect_ok(&c);
    assert_eq!(after["disk_sha256"], before["disk_sha256"], "{after}");
    assert!(after["vsm"]["signature"].is_string(), "{after}");
    // Audited on both agents and at the TTP.
    assert!(c.agent_audit_has("host-1", "MigrateWorkload", "ok"));
    assert!(c.agent_audit_has("host-2", "AcceptMigration", "ok"));
    assert!(c.agent_audit_has("host-2", "MigrationRecords", "ok"));
    assert!(c.ks_audit_has("TlMigrate", "Success"));
    // The volume's single writer is the target: it opened the volume at a new epoch and
    // reported it under the workload's new session (the anchor rises, so the source's
    // older epoch is refused from now on).
    assert_eq!(c.ks_audit_count("DbspEpoch", "Success"), epochs + 1);
    assert!(c.ks_audit_has("DbspDomKey", "Success"));
}

/// A process workload's VSM token travels too: the key pair its signer made in the token
/// before the migration (found by `CKA_ID` after it) signs on the target, and the tenant
/// verifies that signature under the public key it saw before; the source's VSM audited
/// the export, the target's the import.
#[test]
fn process_workload_vsm_key_made_before_migration_signs_on_the_target() {
    let c = Cloud::start();
    c.launch_vm1();
    let before = connect_ok(&c);
    let key_before = before["vsm"]["public_point"].clone();
    assert!(key_before.is_string(), "{before}");
    let out = c.tenant_ok(&["migrate", "--vm", "vm1", "--to", "host-2"]);
    assert_eq!(c.workloads("host-2"), vec!["vm1".to_string()]);
    let after = connect_ok(&c);
    assert_eq!(
        after["vsm"]["public_point"], key_before,
        "the target's VSM made a new key instead of using the one that travelled: {after}"
    );
    let disk: [u8; 32] = hex::decode(after["disk_sha256"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    verify_vsm(&after, &disk);
    // (The source's VSM and its audit log went with its crypto domain.)
    assert!(out.contains("VSM token exported"), "{out}");
    assert_eq!(
        vsm_audit_count(&c.root.join("dev/hosts/host-2"), "TokenImport", "0x0"),
        1,
        "the target's VSM audits the token import"
    );
}

#[test]
fn migration_to_host_outside_the_profile_is_refused_before_any_state_is_sent() {
    let c = Cloud::start();
    c.launch_vm1();
    c.move_to_other_profile("host-2");
    // The target's URL goes through a relay that counts every request reaching it.
    let relay = relay(&c, &c.agent("host-2"), Tamper::None);
    let before = c.agent_audit("host-2").len();
    let r = c.migrate("vm1", "host-1", "host-2", &relay.url);
    assert_refused(&r, "sp_mismatch", "target outside the workload's profile");
    assert_eq!(
        relay.seen.lock().unwrap().requests,
        0,
        "bytes reached the target before it was attested"
    );
    let target_log = c.agent_audit("host-2");
    assert!(
        target_log[before..]
            .iter()
            .all(|(op, _)| !op.contains("Migrat")),
        "the target saw a migration call: {target_log:?}"
    );
    assert_eq!(c.workloads("host-1"), vec!["vm1".to_string()]);
    assert!(c.workloads("host-2").is_empty());
    assert!(c.agent_audit_has("host-1", "MigrateWorkload", "sp_mismatch"));
    assert!(c.ks_audit_has("TlMigrate", "sp_mismatch"));
    // The tenant's CLI gets the same refusal.
    let (ok, text) = c.tenant(&["migrate", "--vm", "vm1", "--to", "host-2"]);
    assert!(!ok && text.contains("sp_mismatch"), "{text}");
}

#[test]
fn tampered_migration_stream_is_refused() {
    let c = Cloud::start();
    c.launch_vm1();
    // One bit of the first record's ciphertext (past its 14-byte header).
    let relay = relay(&c, &c.agent("host-2"), Tamper::Flip(20));
    let r = c.migrate("vm1", "host-1", "host-2", &relay.url);
    assert_refused(&r, "stream_tampered", "tampered stream");
    assert!(c.agent_audit_has("host-2", "MigrationRecords", "stream_tampered"));
    assert!(c.agent_audit_has("host-1", "MigrateWorkload", "stream_tampered"));
    // Nothing runs on the target; the source never released the workload.
    assert!(c.workloads("host-2").is_empty());
    assert_eq!(c.workloads("host-1"), vec!["vm1".to_string()]);
    connect_ok(&c);
}

#[test]
fn replayed_migration_offer_and_stream_are_refused() {
    let c = Cloud::start();
    c.launch_vm1();
    let relay = relay(&c, &c.agent("host-2"), Tamper::None);
    c.migrate("vm1", "host-1", "host-2", &relay.url).unwrap();
    assert_eq!(c.workloads("host-2"), vec!["vm1".to_string()]);
    let (offer, batches) = {
        let g = relay.seen.lock().unwrap();
        (g.offers[0].clone(), g.batches.clone())
    };
    assert!(batches.len() >= 2, "state, then commit + end");
    // The relay (as the source, by certificate) replays what it recorded to the target.
    let as_source = tls_client(
        &c.pki.ca_file(),
        Some(c.pki.issue("host-1", &[caas_tls::Role::Host], &[]).unwrap()),
    );
    let target = c.agent("host-2");
    let r = http_call(
        &c.rt,
        &as_source,
        "POST",
        &format!("{target}/v1/agent/migrations"),
        Some(&offer),
    );
    assert_refused(&r, "migration_replayed", "replayed offer");
    assert!(c.agent_audit_has("host-2", "AcceptMigration", "migration_replayed"));
    for (id, b) in &batches {
        let r = c.rt.block_on(as_source.request::<Value>(
            "POST",
            &format!("{target}/v1/agent/migrations/{id}/records"),
            Some(b.clone()),
            &[],
        ));
        assert!(
            matches!(&r, Err(caas_attest::Error::Remote { code, .. }) if code == "no_migration"),
            "replayed stream: {r:?}"
        );
    }
    assert!(c.agent_audit_has("host-2", "MigrationRecords", "no_migration"));
    assert_eq!(c.workloads("host-2"), vec!["vm1".to_string()]);
}

/// Migration ids outlive the target agent: an offer replayed to the target after it
/// restarted (the statement still fresh) is refused, audited.
#[test]
fn restarted_target_refuses_a_replayed_migration_offer() {
    let mut c = Cloud::start();
    c.launch_vm1();
    let relay = relay(&c, &c.agent("host-2"), Tamper::None);
    c.migrate("vm1", "host-1", "host-2", &relay.url).unwrap();
    let offer = relay.seen.lock().unwrap().offers[0].clone();
    // The whole deployment restarts (agents, key service): the target's memory is gone,
    // its state directory stays.
    c.dev.stop();
    let restarted = Dev::start_with(
        &c.root.join("dev"),
        "127.0.0.1:0",
        &["--hosts", "2", "--attest-secs", "3600"],
    );
    // The stopped one is not dropped: its drop would clean up the deployment's directory's
    // processes, the new ones included.
    std::mem::forget(std::mem::replace(&mut c.dev, restarted));
    // The agents come up after the key service (they enroll with it).
    let t = std::time::Instant::now();
    let listed = loop {
        c.dev.env = read_env(&c.root.join("dev"));
        let r = c.call(
            "GET",
            &format!("{}/v1/agent/workloads", c.agent("host-2")),
            None,
        );
        if r.is_ok() || t.elapsed() > std::time::Duration::from_secs(120) {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(c.root.join("dev/test-dev.log")).unwrap_or_default();
    assert_eq!(
        listed.unwrap_or_else(|e| panic!("host-2's agent is back: {e:?}\n{log}")),
        json!([]),
        "the workload does not survive the restart"
    );
    let as_source = tls_client(
        &c.pki.ca_file(),
        Some(c.pki.issue("host-1", &[caas_tls::Role::Host], &[]).unwrap()),
    );
    let r = http_call(
        &c.rt,
        &as_source,
        "POST",
        &format!("{}/v1/agent/migrations", c.agent("host-2")),
        Some(&offer),
    );
    assert_refused(
        &r,
        "migration_replayed",
        "offer replayed to a restarted target",
    );
    assert!(c.agent_audit_has("host-2", "AcceptMigration", "migration_replayed"));
    assert!(c.workloads("host-2").is_empty());
}

#[test]
fn management_cannot_pose_as_a_host_in_a_migration() {
    let c = Cloud::start();
    c.launch_vm1();
    // The management's certificate (key-service, operator) is not a host's: the target's
    // migration routes refuse it, audited.
    let r = c.call(
        "POST",
        &format!("{}/v1/agent/migrations", c.agent("host-2")),
        Some(&json!({})),
    );
    assert_refused(&r, "forbidden", "management offering a migration");
    assert!(c.agent_audit_has("host-2", "AcceptMigration", "forbidden"));
    let r = c.call(
        "POST",
        &format!("{}/v1/agent/migrations/00/records", c.agent("host-2")),
        Some(&json!({})),
    );
    assert_refused(&r, "forbidden", "management feeding migration records");
}
