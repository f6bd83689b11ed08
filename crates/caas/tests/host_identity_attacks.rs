//! A host's TLS client identity is bound to its TPM identity at enrollment
//! (`caas_attest::tls_binding`), with real processes: `caas key-service serve --config FILE`
//! with TLS and the deployment CA as client CA, host agents `caas host serve --config FILE`
//! on swtpm TPMs whose EK certificates chain to the configured vendor CA.
//!
//! The attacker administers host B: it holds host B's valid deployment certificate (role
//! `host`) and a genuine TPM, and wants to act as host A. Or it obtained a certificate
//! named host A from the CA (a re-issue or mis-issue, with a key of its own). Every attempt
//! is refused and audited in the key service's chain.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_tls::Role;
use caas_tls::pki::{CertFiles, DevCa};
use caas_tpm::swtpm::{LocalCa, Swtpm};
use common::*;
use serde_json::Value;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Deployment {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    pki: DevCa,
    tpm_ca: LocalCa,
    cfg: PathBuf,
    url: String,
    crl: Option<PathBuf>,
    _ks: Proc,
    rt: tokio::runtime::Runtime,
}

/// A host: its swtpm and its agent process.
struct Host {
    _tpm: Swtpm,
    agent: Option<Proc>,
    state: PathBuf,
    /// The agent's API.
    url: String,
}

impl Deployment {
    fn start() -> Self {
        Self::start_with(|_| None)
    }

    /// `prep` may issue and revoke certificates before the key service starts and return
    /// the revocation list it loads (`[server] tls_crl`).
    fn start_with(prep: impl FnOnce(&DevCa) -> Option<PathBuf>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = DevCa::load_or_create(&dir.join("pki")).unwrap();
        let crl_file = prep(&pki);
        let crl = crl_file
            .as_ref()
            .map(|p| format!("tls_crl = {:?}\n", p.display().to_string()))
            .unwrap_or_default();
        let ks_cert = pki
            .issue("key-service", &[Role::KeyService], &["127.0.0.1"])
            .unwrap();
        let tpm_ca = LocalCa::create(&dir.join("tpm-ca")).unwrap();
        // Provision one TPM first so that the vendor CA's certificates exist.
        tpm_ca.provision(&dir.join("tpm-probe")).unwrap();
        let ek_cas: Vec<String> = tpm_ca
            .ca_cert_files()
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        assert!(!ek_cas.is_empty(), "swtpm_localca made no CA certificate");
        let cfg = dir.join("key-service.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n{}\
                 [storage]\ndatabase = \"sqlite:{}\"\n[keys]\nnode_key_file = {:?}\ncreate_node_key = true\n\
                 [attestation]\nek_ca_files = [{}]\ninterval_secs = 3600\n",
                ks_cert.cert.display().to_string(),
                ks_cert.key.display().to_string(),
                pki.ca_file().display().to_string(),
                crl,
                dir.join("ks.sqlite3").display(),
                dir.join("node.key").display().to_string(),
                ek_cas.join(", "),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("ks.log")).unwrap();
        let mut child = Command::new(caas_bin())
            .args(["key-service", "serve", "--config"])
            .arg(&cfg)
            .env("CAAS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "key service did not start: {line}{}",
                    std::fs::read_to_string(dir.join("ks.log")).unwrap_or_default()
                )
            });
        let url = format!("https://{addr}");
        Deployment {
            dir,
            _tmp: tmp,
            pki,
            tpm_ca,
            cfg,
            url,
            crl: crl_file,
            _ks: Proc(child),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// A host named `name` (its agent enrolls under that name) on a TPM of its own,
    /// presenting `cert` to the key service.
    fn host(&self, dir_name: &str, name: &str, cert: &CertFiles) -> Host {
        let hdir = self.dir.join(dir_name);
        let state = hdir.join("tpm");
        self.tpm_ca.provision(&state).unwrap();
        let tpm = Swtpm::start(&state).unwrap();
        let mut h = Host {
            _tpm: tpm,
            agent: None,
            state: hdir,
            url: String::new(),
        };
        self.start_agent(&mut h, name, cert);
        h
    }

    fn start_agent(&self, h: &mut Host, name: &str, cert: &CertFiles) {
        h.agent = None;
        let event_log = h.state.join("eventlog.bin");
        std::fs::write(&event_log, b"").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        h.url = format!("https://127.0.0.1:{port}");
        let raw = caas_host::config::RawConfig {
            name: name.into(),
            tcti: h._tpm.tcti(),
            listen: format!("127.0.0.1:{port}"),
            advertise_url: None,
            key_service_url: self.url.clone(),
            state_dir: h.state.join("agent-state"),
            event_log,
            ak_algorithm: "ecc-p256".into(),
            bind_pcrs: vec![0],
            storage_dir: Some(self.dir.join("storage")),
            ttp_public_key: None,
            run_dir: None,
            workload_ids: "200000-299999".into(),
            isolation: caas_host::config::Isolation::BestEffort,
            net: Default::default(),
            dev_measure: false,
            mode: caas_host::config::Mode::Dev,
            tls: caas_host::config::RawTls {
                ca: self.pki.ca_file(),
                cert: cert.cert.clone(),
                key: cert.key.clone(),
                crl: self.crl.clone(),
            },
        };
        let cfg = h.state.join("agent.toml");
        std::fs::write(&cfg, toml::to_string(&raw).unwrap()).unwrap();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(h.state.join("agent.log"))
            .unwrap();
        h.agent = Some(Proc(
            Command::new(caas_bin())
                .args(["host", "serve", "--config"])
                .arg(&cfg)
                .env("CAAS_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
    }

    /// The key service's audit records.
    fn audit(&self) -> Vec<Value> {
        caas_ok(&["audit", "list", "--limit", "100000"], &self.cfg)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until an audit record matches.
    fn wait_audit(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(90) {
            if let Some(r) = self.audit().into_iter().find(&f) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "no audit record {what}: {:#?}\nkey service log: {}",
            self.audit(),
            std::fs::read_to_string(self.dir.join("ks.log")).unwrap_or_default()
        );
    }

    /// `POST /v1/tl/epoch` naming `host`, over a connection presenting `identity`: the
    /// message a compromised host's administrator forges to act for another host.
    fn epoch_report_as(
        &self,
        host: &str,
        identity: Option<CertFiles>,
    ) -> Result<Value, (u16, String)> {
        let report = caas_tl::wire::EpochReport {
            host: host.into(),
            vm_id: "vm-1".into(),
            launch_r: vec![7; 32],
            domain: "d1".into(),
            sr: "sr-1".into(),
            c4: vec![1; 32],
            epoch: 0,
            r: caas_crypto::random_bytes(32).unwrap(),
            t_ms: caas_attest::now_ms(),
        };
        let msg = caas_tl::wire::AkSigned {
            body: serde_json::to_vec(&report).unwrap(),
            evidence: caas_attest::Evidence {
                quote: vec![0; 64],
                signature: vec![0; 64],
                event_log: vec![],
                pcr_values: vec![],
            },
        };
        let http = tls_client(&self.pki.ca_file(), identity);
        http_call(
            &self.rt,
            &http,
            "POST",
            &format!("{}/v1/tl/epoch", self.url),
            Some(&serde_json::to_value(&msg).unwrap()),
        )
    }
}

fn spki_hex(cert: &Path) -> String {
    hex::encode(caas_tls::spki_sha256_of_file(cert).unwrap())
}

fn is(r: &Value, op: &str, subject: &str, result: &str) -> bool {
    r["Operation"] == op && r["KeyId"] == subject && r["Result"] == result
}

/// Host B's administrator runs an agent on a genuine TPM under the name `host-a`,
/// presenting host B's valid deployment certificate: before, the registrar enrolled that TPM
/// as host-a (any host certificate would do); now the certificate must name the host it
/// enrolls, so the enrollment is refused and audited — and the real host-a then enrolls,
/// its record bound to its own certificate's key.
#[test]
fn another_hosts_certificate_cannot_enroll_a_host_name() {
    let d = Deployment::start();
    let cert_a = d
        .pki
        .issue("host-a", &[Role::Host], &["127.0.0.1"])
        .unwrap();
    let cert_b = d
        .pki
        .issue("host-b", &[Role::Host], &["127.0.0.1"])
        .unwrap();
    let mut mallory = d.host("mallory", "host-a", &cert_b);
    let refused = d.wait_audit("refusing host-b's certificate for host-a", |r| {
        is(r, "EnrollHost", "host-a", "tls_identity_mismatch")
    });
    assert!(
        refused["Detail"]["detail"]
            .as_str()
            .unwrap()
            .contains("host-b"),
        "{refused}"
    );
    mallory.agent = None;
    assert!(
        !d.audit()
            .iter()
            .any(|r| is(r, "EnrollHost", "host-a", "Success")),
        "host-a must not have been enrolled with host-b's certificate"
    );
    let _a = d.host("a", "host-a", &cert_a);
    let ok = d.wait_audit("host-a enrolled", |r| {
        is(r, "EnrollHost", "host-a", "Success")
    });
    let detail = ok["Detail"]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("tls_spki_sha256={}", spki_hex(&cert_a.cert))),
        "the enrollment records host-a's certificate key: {detail}"
    );
}

/// Once host-a is enrolled, requests naming it must come over its enrolled certificate:
/// host B's valid certificate, a certificate re-issued for host-a with another key (as a
/// CA mis-issue to the attacker would give), no certificate and an operator's certificate
/// are each refused and audited. The real host-a re-enrolls with a re-issued certificate
/// (same TPM) and its binding moves to the new key: the old certificate is then refused.
#[test]
fn host_requests_need_the_certificate_the_host_enrolled_with() {
    let d = Deployment::start();
    // Keep copies: issuing again under the same name overwrites the CA directory's files.
    let keep = |c: &CertFiles, tag: &str| {
        let k = CertFiles {
            cert: d.dir.join(format!("{tag}.pem")),
            key: d.dir.join(format!("{tag}.key")),
        };
        std::fs::copy(&c.cert, &k.cert).unwrap();
        std::fs::copy(&c.key, &k.key).unwrap();
        k
    };
    let cert_a = keep(
        &d.pki
            .issue("host-a", &[Role::Host], &["127.0.0.1"])
            .unwrap(),
        "host-a-orig",
    );
    let mut a = d.host("a", "host-a", &cert_a);
    d.wait_audit("host-a enrolled", |r| {
        is(r, "EnrollHost", "host-a", "Success")
    });
    let cert_b = d
        .pki
        .issue("host-b", &[Role::Host], &["127.0.0.1"])
        .unwrap();
    let reissued = keep(
        &d.pki
            .issue("host-a", &[Role::Host], &["127.0.0.1"])
            .unwrap(),
        "host-a-reissued",
    );
    let operator = d.pki.issue("ops", &[Role::Operator], &[]).unwrap();

    // The genuine certificate passes the channel check (the forged message then fails on
    // its missing AK signature, a later check).
    let (_, code) = d
        .epoch_report_as("host-a", Some(cert_a.clone()))
        .unwrap_err();
    assert_ne!(code, "tls_identity_mismatch");

    let (status, code) = d.epoch_report_as("host-a", Some(cert_b)).unwrap_err();
    assert_eq!(
        (status, code.as_str()),
        (403, "tls_identity_mismatch"),
        "host B's certificate"
    );
    let (status, code) = d
        .epoch_report_as("host-a", Some(reissued.clone()))
        .unwrap_err();
    assert_eq!(
        (status, code.as_str()),
        (403, "tls_identity_mismatch"),
        "a re-issued host-a certificate (another key)"
    );
    let (status, code) = d.epoch_report_as("host-a", None).unwrap_err();
    assert_eq!((status, code.as_str()), (401, "host_certificate_required"));
    let (status, code) = d.epoch_report_as("host-a", Some(operator)).unwrap_err();
    assert_eq!((status, code.as_str()), (403, "host_role_required"));

    let audit = d.audit();
    let mismatches: Vec<&Value> = audit
        .iter()
        .filter(|r| r["Operation"] == "DbspEpoch" && r["Result"] == "tls_identity_mismatch")
        .collect();
    assert_eq!(mismatches.len(), 2, "{audit:#?}");
    assert!(
        mismatches[0]["Detail"]["detail"]
            .as_str()
            .unwrap()
            .contains("host-b"),
        "the refusal names the certificate presented: {:?}",
        mismatches[0]
    );
    for code in ["host_certificate_required", "host_role_required"] {
        assert!(
            audit
                .iter()
                .any(|r| r["Operation"] == "HTTP POST /v1/tl/epoch" && r["Result"] == code),
            "{code} audited"
        );
    }

    // The owner of host-a's TPM re-enrolls with the re-issued certificate.
    d.start_agent(&mut a, "host-a", &reissued);
    let new_key = spki_hex(&reissued.cert);
    d.wait_audit("host-a re-enrolled with the re-issued certificate", |r| {
        is(r, "EnrollHost", "host-a", "Success")
            && r["Detail"]["detail"]
                .as_str()
                .is_some_and(|s| s.contains(&new_key))
    });
    let (_, code) = d.epoch_report_as("host-a", Some(reissued)).unwrap_err();
    assert_ne!(code, "tls_identity_mismatch");
    let (_, code) = d.epoch_report_as("host-a", Some(cert_a)).unwrap_err();
    assert_eq!(code, "tls_identity_mismatch", "the old certificate");
}

/// `caas pki revoke` through the real CLI; returns the CRL it wrote.
fn revoke(pki: &DevCa, name: &str) -> PathBuf {
    let out = Command::new(caas_bin())
        .args(["pki", "revoke", "--dir"])
        .arg(pki.dir())
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "caas pki revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A host certificate the CA revoked (`caas pki revoke`, e.g. after the host was
/// compromised or decommissioned) no longer gets through the key service's TLS handshake
/// (`[server] tls_crl`), whatever it claims; the refusal is audited (`TlsHandshake`,
/// `bad_certificate`). Other certificates of the same CA still pass.
#[test]
fn a_revoked_host_certificate_is_refused_at_the_handshake() {
    let d = Deployment::start_with(|pki| {
        pki.issue("host-b", &[Role::Host], &["127.0.0.1"]).unwrap();
        Some(revoke(pki, "host-b"))
    });
    let cert_b = CertFiles {
        cert: d.pki.dir().join("host-b.pem"),
        key: d.pki.dir().join("host-b.key"),
    };
    let cert_a = d
        .pki
        .issue("host-a", &[Role::Host], &["127.0.0.1"])
        .unwrap();
    let (status, err) = d.epoch_report_as("host-b", Some(cert_b)).unwrap_err();
    assert_eq!(status, 0, "no HTTP answer to a revoked certificate: {err}");
    let refused = d.wait_audit("the refused handshake", |r| {
        r["Operation"] == "TlsHandshake" && r["Result"] == "bad_certificate"
    });
    assert!(
        refused["Detail"]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("revoked"),
        "{refused}"
    );
    // host-a's certificate passes the handshake (and is refused later: not enrolled).
    let (status, code) = d.epoch_report_as("host-a", Some(cert_a)).unwrap_err();
    assert_eq!((status, code.as_str()), (403, "host_unknown"));
}

/// A leaked operator certificate, revoked: the host agent (`[tls] crl`) refuses it at the
/// handshake and audits the refusal in its log; another operator still manages the agent.
#[test]
fn a_revoked_operator_certificate_is_refused_by_the_host_agent() {
    let d = Deployment::start_with(|pki| {
        pki.issue("ops-bob", &[Role::Operator], &[]).unwrap();
        Some(revoke(pki, "ops-bob"))
    });
    let cert_a = d
        .pki
        .issue("host-a", &[Role::Host], &["127.0.0.1"])
        .unwrap();
    let a = d.host("a", "host-a", &cert_a);
    d.wait_audit("host-a enrolled (its agent serves)", |r| {
        is(r, "EnrollHost", "host-a", "Success")
    });
    let bob = CertFiles {
        cert: d.pki.dir().join("ops-bob.pem"),
        key: d.pki.dir().join("ops-bob.key"),
    };
    let alice = d.pki.issue("ops-alice", &[Role::Operator], &[]).unwrap();
    let call = |who: CertFiles, path: &str| {
        http_call(
            &d.rt,
            &tls_client(&d.pki.ca_file(), Some(who)),
            "GET",
            &format!("{}{path}", a.url),
            None,
        )
    };
    let (status, err) = call(bob, "/v1/agent/status").unwrap_err();
    assert_eq!(status, 0, "no HTTP answer to a revoked certificate: {err}");
    call(alice.clone(), "/v1/agent/status").expect("a valid operator certificate works");
    let audit = call(alice, "/v1/agent/audit").unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["op"] == "TlsHandshake"
                && e["result"] == "bad_certificate"
                && e.to_string().to_lowercase().contains("revoked")),
        "{audit}"
    );
}
