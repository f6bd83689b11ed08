//! The host agent's API against callers without the right credentials, with real processes:
//! `caas dev --hosts 1` (its agent serves HTTPS with a certificate from the dev deployment CA
//! in `DIR/pki`) and `caas host serve --config FILE`. The attacker sits on the management
//! network: it can reach every agent port, run its own CA, hold a certificate of another
//! role (e.g. a compromised host's), and answer the agent's first fetch of the TTP's key.
//! Each refusal is checked in the agent's hash-chained audit log with the caller's identity.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_host::agent::{Access, ROUTES};
use caas_tls::Role;
use caas_tls::pki::DevCa;
use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

struct Deployment {
    _tmp: tempfile::TempDir,
    dev: Dev,
    rt: tokio::runtime::Runtime,
}

impl Deployment {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Dev::start_with(
            &tmp.path().join("dev"),
            "127.0.0.1:0",
            &["--hosts", "1", "--attest-secs", "3600"],
        );
        Deployment {
            _tmp: tmp,
            dev,
            rt: rt(),
        }
    }

    fn agent(&self) -> String {
        self.dev.env["CAAS_HOST_HOST_1_URL"].clone()
    }

    fn ca(&self) -> PathBuf {
        PathBuf::from(&self.dev.env["CAAS_PKI_CA"])
    }

    /// The dev deployment's CA (to issue certificates of chosen roles, as a compromised
    /// endpoint of that role would hold).
    fn pki(&self) -> DevCa {
        DevCa::load_or_create(&self.dev.dir.join("pki")).unwrap()
    }

    fn operator(&self) -> caas_attest::client::HttpClient {
        tls_client(
            &self.ca(),
            Some(caas_tls::pki::CertFiles {
                cert: self.dev.env["CAAS_OPERATOR_CERT"].clone().into(),
                key: self.dev.env["CAAS_OPERATOR_KEY"].clone().into(),
            }),
        )
    }

    fn call(
        &self,
        http: &caas_attest::client::HttpClient,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, (u16, String)> {
        http_call(
            &self.rt,
            http,
            method,
            &format!("{}{path}", self.agent()),
            body,
        )
    }

    /// The agent's audit log (read with the operator's certificate).
    fn audit(&self) -> Vec<Value> {
        let v = self
            .call(&self.operator(), "GET", "/v1/agent/audit", None)
            .expect("the operator reads the agent's audit log");
        v.as_array().unwrap().clone()
    }

    fn audit_has(&self, op: &str, result: &str, caller_contains: &str) -> bool {
        self.audit().iter().any(|e| {
            e["op"] == op
                && e["result"] == result
                && e["caller"].as_str().unwrap_or("").contains(caller_contains)
        })
    }
}

/// A concrete path for a route pattern.
fn concrete(path: &str) -> String {
    path.replace("{vm}", "vm-x")
}

/// Every route of the agent's router (the router is built from `ROUTES`, so a route added
/// without an entry there does not exist, and one added with `Access::Public` fails the
/// first assertion), called with no client certificate, with a certificate from another
/// CA, and with a certificate of the deployment CA but a role the route does not allow.
#[test]
fn every_agent_route_refuses_unauthenticated_callers() {
    let d = Deployment::start();
    let public: Vec<&str> = ROUTES
        .iter()
        .filter(|r| r.access == Access::Public)
        .map(|r| r.path)
        .collect();
    assert_eq!(public, ["/healthz"], "only /healthz may be public");

    // Plain HTTP is not served at all.
    let plain = caas_attest::client::HttpClient::new(Duration::from_secs(10));
    let plain_url = d.agent().replacen("https://", "http://", 1);
    assert!(
        http_call(
            &d.rt,
            &plain,
            "GET",
            &format!("{plain_url}/v1/agent/workloads"),
            None
        )
        .is_err_and(|(status, _)| status == 0),
        "the agent answered plain HTTP"
    );

    // The attacker's own CA, with a certificate claiming every role.
    let other = tempfile::tempdir().unwrap();
    let rogue_ca = DevCa::load_or_create(&other.path().join("pki")).unwrap();
    let rogue = rogue_ca.issue("rogue", &Role::ALL, &["127.0.0.1"]).unwrap();
    // Pinning the real CA for the server, presenting the rogue certificate.
    let anonymous = tls_client(&d.ca(), None);
    let foreign = tls_client(&d.ca(), Some(rogue));
    let pki = d.pki();
    let body = json!({});
    let mut checked = 0;
    for r in ROUTES {
        let path = concrete(r.path);
        let what = format!("{} {}", r.method, r.path);
        let roles = match r.access {
            Access::Public => {
                assert!(d.call(&anonymous, r.method, &path, None).is_ok(), "{what}");
                continue;
            }
            Access::Roles(roles) => roles,
        };
        let b = (r.method == "POST").then_some(&body);
        match d.call(&anonymous, r.method, &path, b) {
            Err((401, code)) => assert_eq!(code, "unauthenticated", "{what}"),
            other => panic!("{what} without a client certificate: {other:?}"),
        }
        match d.call(&foreign, r.method, &path, b) {
            Err((0, msg)) => assert!(
                msg.contains("connect") || msg.contains("certificate") || msg.contains("alert"),
                "{what} with another CA's certificate: {msg}"
            ),
            other => panic!("{what} with another CA's certificate got an HTTP answer: {other:?}"),
        }
        // Every role the route does not allow (only a migration's routes allow the host
        // role; none allows every role).
        let wrong: Vec<Role> = Role::ALL
            .into_iter()
            .filter(|x| !roles.contains(x))
            .collect();
        assert!(!wrong.is_empty(), "{what}");
        let name = format!(
            "wrong-{}",
            wrong.iter().map(|r| r.name()).collect::<Vec<_>>().join("-")
        );
        let files = pki.issue(&name, &wrong, &[]).unwrap();
        let intruder = tls_client(&d.ca(), Some(files));
        match d.call(&intruder, r.method, &path, b) {
            Err((403, code)) => assert_eq!(code, "forbidden", "{what}"),
            other => panic!("{what} with role(s) {wrong:?}: {other:?}"),
        }
        // With an allowed role the route exists (no 404/405) and authorization passes (a
        // 403 may only be the handler's own refusal, e.g. `no_migration` for an unknown
        // migration id): the table matches the router.
        let allowed = pki.issue("allowed", roles, &[]).unwrap();
        let ok = tls_client(&d.ca(), Some(allowed));
        if let Err((status, code)) = d.call(&ok, r.method, &path, b) {
            let refused_by_authorization =
                status == 403 && ["forbidden", "unauthenticated"].contains(&code.as_str());
            assert!(
                ![401, 404, 405].contains(&status) && !refused_by_authorization,
                "{what} with an allowed role: {status} {code}"
            );
        }
        checked += 1;
        // The agent records at most 50 refusals a second (then counts them in one
        // `RefusalsSuppressed` record): keep each second's refusals under that budget so
        // every one of this test's refusals is recorded by name.
        if checked % 10 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }
    assert!(checked >= 11, "only {checked} routes checked");
    // A path outside the table does not exist, for anyone.
    assert!(matches!(
        d.call(&d.operator(), "GET", "/v1/agent/keys", None),
        Err((404, _))
    ));

    // Every refusal is in the agent's audit log, with who was refused; the handshake
    // refused on the foreign certificate too.
    let audit = d.audit();
    let count = |result: &str| audit.iter().filter(|e| e["result"] == result).count();
    assert!(count("unauthenticated") >= checked, "{audit:?}");
    assert!(count("forbidden") >= checked, "{audit:?}");
    assert!(
        audit
            .iter()
            .any(|e| e["op"] == "TlsHandshake" && e["result"] == "bad_certificate"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .all(|e| !e["caller"].as_str().unwrap_or("").is_empty())
    );
}

/// The cloud management's calls (list, stop) without the operator's certificate: refused
/// without one, and with a certificate of another role (a compromised host's, the key
/// service's), each refusal audited naming the caller; the operator's call is audited with
/// the operator's name.
#[test]
fn management_call_without_operator_credentials_is_refused() {
    let d = Deployment::start();
    let anonymous = tls_client(&d.ca(), None);
    let pki = d.pki();
    let host2 = tls_client(
        &d.ca(),
        Some(pki.issue("host-2", &[Role::Host], &["127.0.0.1"]).unwrap()),
    );
    let ks = tls_client(
        &d.ca(),
        Some(
            pki.issue("key-service-x", &[Role::KeyService], &[])
                .unwrap(),
        ),
    );
    for (client, who, status) in [
        (&anonymous, "anonymous@", 401),
        (&host2, "host-2[host]@", 403),
        (&ks, "key-service-x[key-service]@", 403),
    ] {
        assert!(
            matches!(d.call(client, "GET", "/v1/agent/workloads", None), Err((s, _)) if s == status),
            "{who} list"
        );
        assert!(
            matches!(
                d.call(client, "POST", "/v1/agent/workloads/vm1/stop", Some(&json!({}))),
                Err((s, _)) if s == status
            ),
            "{who} stop"
        );
        let result = if status == 401 {
            "unauthenticated"
        } else {
            "forbidden"
        };
        assert!(
            d.audit_has("ListWorkloads", result, who),
            "{who}: {:?}",
            d.audit()
        );
        assert!(
            d.audit_has("StopWorkload", result, who),
            "{who}: {:?}",
            d.audit()
        );
    }
    // Suspend and resume (they move a VM's encrypted state, never a key): only the key
    // service and operators; refusals audited.
    for (client, who, status) in [
        (&anonymous, "anonymous@", 401),
        (&host2, "host-2[host]@", 403),
    ] {
        let result = if status == 401 {
            "unauthenticated"
        } else {
            "forbidden"
        };
        assert!(
            matches!(
                d.call(client, "POST", "/v1/agent/workloads/vm1/suspend", Some(&json!({}))),
                Err((s, _)) if s == status
            ),
            "{who} suspend"
        );
        assert!(
            matches!(
                d.call(client, "POST", "/v1/agent/resume", Some(&json!({ "vm_id": "vm1" }))),
                Err((s, _)) if s == status
            ),
            "{who} resume"
        );
        assert!(
            d.audit_has("SuspendWorkload", result, who),
            "{who}: {:?}",
            d.audit()
        );
        assert!(
            d.audit_has("ResumeWorkload", result, who),
            "{who}: {:?}",
            d.audit()
        );
    }
    // The operator may: the call is audited with the operator's certificate name.
    let list = d
        .call(&d.operator(), "GET", "/v1/agent/workloads", None)
        .unwrap();
    assert_eq!(list, json!([]));
    assert!(d.audit_has("ListWorkloads", "ok", "operator[operator]@127.0.0.1"));
    // The audit log's chain still verifies (the agent serves it only verified).
    assert!(d.audit().len() >= 7);
}

/// A fake key service answers the agent's first fetch of the TTP's public key with the
/// attacker's key, then the attacker sends a "revocation" signed with it. Before, the
/// agent pinned whatever answered (`ttp.pub`) and obeyed; now the key is configured or
/// fetched only over the authenticated channel, and the agent refuses (audited).
#[test]
fn rogue_ttp_is_not_trusted_on_first_use() {
    let rt = rt();
    let tmp = tempfile::tempdir().unwrap();
    // The rogue "key service": plain HTTP, serves its own TTP's public key.
    let store = std::sync::Arc::new(caas_attest::store::MemoryStore::new());
    let rogue_keys = caas_tl::TtpKeys::generate().unwrap();
    let rogue = std::sync::Arc::new(caas_tl::service::TlService::new(store, rogue_keys));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let rogue_url = format!("http://{}", listener.local_addr().unwrap());
    let app = caas_tl::service::router(rogue.clone());
    rt.spawn(async move { axum::serve(listener, app).await });

    // A dev host (swtpm, measured boot, TLS from its CA) whose agent is pointed at the
    // rogue, with no TTP key configured; run as a real `caas host serve` process.
    let hosts = rt
        .block_on(caas_host::dev::DevHosts::prepare(
            &tmp.path().join("hosts"),
            1,
            &rogue_url,
            caas_host::dev::DevOptions {
                agent_binary: Some(caas_bin()),
                ..Default::default()
            },
        ))
        .unwrap();
    let cfg = &hosts.hosts[0].config_path;
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(!text.contains("ttp_public_key"));
    let port = free_port();
    std::fs::write(
        cfg,
        text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
    let mut agent = ChildGuard(
        Command::new(caas_bin())
            .args(["host", "serve", "--config"])
            .arg(cfg)
            .env("CAAS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = format!("https://127.0.0.1:{port}");
    let ks_client = hosts.client(Role::KeyService).unwrap();
    let t = Instant::now();
    while http_call(&rt, &ks_client, "GET", &format!("{url}/healthz"), None).is_err() {
        assert!(
            agent.0.try_wait().unwrap().is_none(),
            "agent exited: {}",
            std::fs::read_to_string(tmp.path().join("agent.log")).unwrap()
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "agent did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The attacker's notice, signed by its own "TTP", delivered with a key-service
    // certificate (the attacker controls that link too: the TTP's signature is the check).
    let notice = rt
        .block_on(
            rogue
                .ttp
                .revoke_notice("host-1", "rogue", caas_attest::now_ms()),
        )
        .unwrap();
    let r = http_call(
        &rt,
        &ks_client,
        "POST",
        &format!("{url}/v1/agent/revoke"),
        Some(&serde_json::to_value(&notice).unwrap()),
    );
    assert!(
        matches!(&r, Err((403, code)) if code == "ttp_key_unauthenticated"),
        "the agent trusted the rogue TTP: {r:?}"
    );
    let state = hosts.hosts[0].dir.join("agent-state");
    assert!(!state.join("ttp.pub").exists(), "a TTP key was pinned");
    let ops = hosts.client(Role::Operator).unwrap();
    let audit = http_call(&rt, &ops, "GET", &format!("{url}/v1/agent/audit"), None).unwrap();
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["op"] == "Revoke"
            && e["result"] == "ttp_key_unauthenticated"
            && e["caller"].as_str().unwrap().contains("[key-service]")),
        "{audit}"
    );
    drop(agent);
}

/// `POST /v1/agent/dev/measure` extends a PCR on request: on a real host the management
/// network could then make the TPM report anything. It is refused at configuration load in
/// production mode and with a device TPM, and it is not routed on a dev host without it.
#[test]
fn dev_pcr_extend_route_cannot_be_enabled_outside_dev() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = "[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/h.pem\"\nkey = \"/nonexistent/h.key\"\n";
    let cases = [
        // Production mode (the default) with dev_measure.
        "name = \"h1\"\nkey_service_url = \"https://ks.internal:7300\"\nstate_dir = \"S\"\ndev_measure = true\n",
        // Dev mode on the host's real TPM.
        "name = \"h1\"\nmode = \"dev\"\ntcti = \"device:/dev/tpmrm0\"\nkey_service_url = \"https://ks.internal:7300\"\nstate_dir = \"S\"\ndev_measure = true\n",
    ];
    for (i, c) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("agent-{i}.toml"));
        let state = tmp.path().join(format!("state-{i}"));
        std::fs::write(
            &path,
            format!(
                "{}{tls}",
                c.replace("\"S\"", &format!("\"{}\"", state.display()))
            ),
        )
        .unwrap();
        let out = Command::new(caas_bin())
            .args(["host", "serve", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "case {i} started: {text}");
        assert!(text.contains("dev_measure"), "case {i}: {text}");
        assert!(
            !state.exists(),
            "case {i}: the agent got as far as its state directory"
        );
    }

    // A dev host without dev_measure: the route is not in its router.
    let dev = |extra: &str| {
        caas_host::config::RawConfig::from_toml(&format!(
            "name = \"h1\"\nmode = \"dev\"\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n\
             key_service_url = \"http://127.0.0.1:1\"\nstate_dir = \"/x\"\n{extra}{tls}"
        ))
        .and_then(|r| r.validate())
        .unwrap()
    };
    let routed = |cfg: &caas_host::config::AgentConfig| {
        caas_host::agent::routes(cfg).any(|r| r.path == "/v1/agent/dev/measure")
    };
    assert!(!routed(&dev("")));
    assert!(routed(&dev("dev_measure = true\n")));
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
