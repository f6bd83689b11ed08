//! Issue 11's multi-host acceptance test, with the production entry points only: every
//! party is a separate process in a network namespace of its own (created here: `ip netns`
//! and veth pairs on a bridge, addresses 10.199.0.0/24 assigned by the test), and every call
//! between parties goes over those addresses, TLS everywhere:
//!
//! - `ks` (10.199.0.1): `caas key-service serve --config FILE` (KMS, registrar/verifier,
//!   TTP, scheduler) with TLS, on a private PostgreSQL started in that namespace (its
//!   loopback: unreachable from the others), its `[agents]` client certificate for the
//!   agents; the first operator and the tenants made with `caas admin` on that node.
//! - `host-1`, `host-2`: `caas host serve --config FILE`, each with its own swtpm, the
//!   TTP's public key configured (fetched once over the pinned CA, never on first use),
//!   enrolling with the key service over TLS.
//! - `ops`: the operator (`caas profile`, `caas host`, `caas attest`: SigV4 to the key
//!   service, client certificate to the agents).
//! - `tn`: the tenant (`caas tenant`: SigV4): provisions an image, launches it with TL on
//!   host-1 and attaches a DBSP volume.
//! - `att`: the attacker (python3 `netns/net_tool.py`, botocore's SigV4, and
//!   `openssl s_client`): unauthenticated operator calls, a management call without
//!   operator credentials, a forged ACL update, a rogue TTP on host-2's link (policy routing
//!   sends host-2's packets for the key service's port to the attacker, who holds the key
//!   service's address), a replayed revocation. Each is refused, and its audit record is
//!   named and found (the key service's chain via `caas audit list`/`verify`, the agents'
//!   logs via `caas host audit`).
//!
//! Needs root, iproute2, swtpm, PostgreSQL and python3 (the repo's .venv); without them the
//! test fails saying what is missing (it never skips).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_tls::Role;
use caas_tls::pki::{CertFiles, DevCa};
use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NET: &str = "10.199.0";

/// Namespaces `<tag>-sw` (the bridge), and one per member with a veth into the bridge.
struct Netns {
    tag: String,
    members: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("`ip` not runnable ({e}): install the Debian package iproute2 (the test needs root)")
    });
    assert!(
        out.status.success(),
        "ip {args:?} failed: {} (network namespaces need root and iproute2)",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Members get addresses NET.1, NET.2, ... in order.
    fn create(members: &[&str]) -> Self {
        let tag = format!("caas{}", std::process::id() % 100_000);
        let n = Netns {
            tag: tag.clone(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let sw = format!("{tag}-sw");
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, m) in members.iter().enumerate() {
            let ns = n.ns(m);
            ip(&["netns", "add", &ns]);
            let (outer, inner) = (format!("{tag}o{i}"), format!("{tag}i{i}"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &outer, "netns", &sw]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["-n", &sw, "link", "set", &outer, "master", "br0", "up"]);
            let addr = format!("{}/24", n.addr(m));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        n
    }

    fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.tag)
    }

    fn addr(&self, member: &str) -> String {
        let i = self.members.iter().position(|m| m == member).unwrap();
        format!("{NET}.{}", i + 1)
    }

    /// `ip netns exec <member's namespace> program`.
    fn exec(&self, member: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(member)]).arg(program);
        // Each party gets only the environment the test gives it.
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in our namespaces (workloads, crypto domains) is ours.
        for m in &self.members {
            if let Ok(o) = Command::new("ip")
                .args(["netns", "pids", &self.ns(m)])
                .output()
            {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        for m in &self.members {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(m)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{}-sw", self.tag)])
            .status();
    }
}

/// A child process: SIGTERM on drop (an agent stops its workloads), SIGKILL after 5 s.
struct Kill(Child);

impl Kill {
    fn stop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        self.stop();
    }
}

const KS_PORT: u16 = 7300;
const AGENT_PORT: u16 = 7400;

/// Runs `cmd`, returns (success, stdout+stderr).
fn run(mut cmd: Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Polls `f` every 200 ms until it returns Some, failing with `what()` after `secs`.
fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>, what: impl Fn() -> String) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out: {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A host: its namespace's swtpm and agent.
struct Host {
    name: String,
    dir: PathBuf,
    cfg: PathBuf,
    url: String,
    _swtpm: Kill,
    agent: Kill,
}

/// The whole deployment. Fields drop in order: processes, then PostgreSQL, then the
/// namespaces.
struct World {
    hosts: Vec<Host>,
    _ks: Kill,
    _pg: caas_store::testing::PgCluster,
    net: Netns,
    dir: PathBuf,
    pki: DevCa,
    ks_cfg: PathBuf,
    ks_url: String,
    ops_env: HashMap<String, String>,
    tenant_env: HashMap<String, String>,
    mallory: (String, String),
    tool: PathBuf,
    python: PathBuf,
    _tmp: tempfile::TempDir,
}

/// `caas admin|audit ... --config KS` on the key-service node (its database is on that
/// node's loopback).
fn ks_admin(net: &Netns, cfg: &Path, args: &[&str]) -> String {
    let mut c = net.exec("ks", &caas_bin());
    c.args(args).arg("--config").arg(cfg);
    let (ok, out) = run(c);
    assert!(ok, "caas {args:?}: {out}");
    out
}

fn json_of(text: &str) -> Value {
    let start = text.find(['{', '[']).unwrap_or(0);
    serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<Value>()
        .next()
        .and_then(|r| r.ok())
        .unwrap_or_else(|| panic!("no JSON in: {text}"))
}

impl World {
    fn start() -> World {
        let tmp = tempfile::tempdir().unwrap();
        // Workload identities traverse (never list) the test directory to reach their own
        // 0700 run directories.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = tmp.path().to_path_buf();
        let python = venv_bin().join("python3");
        let tool = repo_root().join("crates/caas/tests/netns/net_tool.py");
        let net = Netns::create(&["ks", "host-1", "host-2", "att", "ops", "tn"]);
        let ks_addr = net.addr("ks");
        // The key service's private PostgreSQL, on the key-service namespace's loopback.
        let pg = caas_store::testing::PgCluster::start_in_netns(&net.ns("ks"))
            .unwrap_or_else(|e| panic!("{}", e.0));
        let db = pg
            .create_database("caas")
            .unwrap_or_else(|e| panic!("{}", e.0));
        // The deployment PKI: the key service's certificate (server, and client to agents).
        let pki = DevCa::load_or_create(&dir.join("pki")).unwrap();
        let ks_cert = pki
            .issue("key-service", &[Role::KeyService], &[&ks_addr])
            .unwrap();
        // The hosts' TPMs are manufactured first (EK certificates from the "vendor" CA,
        // whose certificates the key service is then configured to trust).
        let tpm_ca = caas_tpm::swtpm::LocalCa::create(&dir.join("tpm-ca")).unwrap();
        for h in ["host-1", "host-2"] {
            tpm_ca.provision(&dir.join(h).join("tpm")).unwrap();
        }
        assert!(
            !tpm_ca.ca_cert_files().is_empty(),
            "swtpm_localca made no CA"
        );
        let ks_dir = dir.join("ks");
        std::fs::create_dir_all(&ks_dir).unwrap();
        let ks_cfg = ks_dir.join("key-service.toml");
        let q = |p: &Path| format!("\"{}\"", p.display());
        std::fs::write(
            &ks_cfg,
            format!(
                "[server]\nlisten = \"{ks_addr}:{KS_PORT}\"\nregion = \"us-east-1\"\n\
                 tls_cert = {}\ntls_key = {}\ntls_client_ca = {}\n\
                 [storage]\ndatabase = \"{db}\"\n\
                 [keys]\nnode_key_file = {}\ncreate_node_key = true\n\
                 [attestation]\nek_ca_files = [{}]\ninterval_secs = 3600\n\
                 [agents]\nca = {}\ncert = {}\nkey = {}\n",
                q(&ks_cert.cert),
                q(&ks_cert.key),
                q(&pki.ca_file()),
                q(&ks_dir.join("node.key")),
                tpm_ca
                    .ca_cert_files()
                    .iter()
                    .map(|p| q(p))
                    .collect::<Vec<_>>()
                    .join(", "),
                q(&pki.ca_file()),
                q(&ks_cert.cert),
                q(&ks_cert.key),
            ),
        )
        .unwrap();
        // The first operator, and two tenants: alice, and mallory (who attacks alice).
        let op = json_of(&ks_admin(
            &net,
            &ks_cfg,
            &["admin", "create-operator", "ops", "--permissions", "all"],
        ));
        let tenant = |name: &str| -> (String, String) {
            let a = json_of(&ks_admin(&net, &ks_cfg, &["admin", "create-account", name]));
            let k = json_of(&ks_admin(
                &net,
                &ks_cfg,
                &[
                    "admin",
                    "create-access-key",
                    "--account",
                    a["Account"].as_str().unwrap(),
                ],
            ));
            (
                k["AccessKeyId"].as_str().unwrap().to_string(),
                k["SecretAccessKey"].as_str().unwrap().to_string(),
            )
        };
        let alice = tenant("alice");
        let mallory = tenant("mallory");
        // The key service.
        let log = std::fs::File::create(ks_dir.join("ks.log")).unwrap();
        let mut child = net
            .exec("ks", &caas_bin())
            .args(["key-service", "serve", "--config"])
            .arg(&ks_cfg)
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
        let ks = Kill(child);
        assert!(
            line.starts_with("listening on "),
            "key service did not start: {line}{}",
            std::fs::read_to_string(ks_dir.join("ks.log")).unwrap_or_default()
        );
        let ks_url = format!("https://{ks_addr}:{KS_PORT}");
        let ca = pki.ca_file().display().to_string();
        let operator_cert = pki.issue("operator", &[Role::Operator], &[]).unwrap();
        let s = |p: &Path| p.display().to_string();
        let ops_env: HashMap<String, String> = [
            ("CAAS_KMS_ENDPOINT", ks_url.clone()),
            ("AWS_CA_BUNDLE", ca.clone()),
            ("AWS_REGION", "us-east-1".into()),
            (
                "CAAS_OPERATOR_ACCESS_KEY_ID",
                op["AccessKeyId"].as_str().unwrap().into(),
            ),
            (
                "CAAS_OPERATOR_SECRET_ACCESS_KEY",
                op["SecretAccessKey"].as_str().unwrap().into(),
            ),
            ("CAAS_PKI_CA", ca.clone()),
            ("CAAS_OPERATOR_CERT", s(&operator_cert.cert)),
            ("CAAS_OPERATOR_KEY", s(&operator_cert.key)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut w = World {
            hosts: vec![],
            _ks: ks,
            _pg: pg,
            net,
            dir: dir.clone(),
            pki,
            ks_cfg,
            ks_url,
            ops_env,
            tenant_env: HashMap::new(),
            mallory,
            tool,
            python,
            _tmp: tmp,
        };
        // pk_TTP, fetched once by the operator over the pinned deployment CA, is configured
        // in every agent and given to the tenant (never taken on first use).
        let (status, body) = w.tool_call("ops", "GET", "/v1/tl/ttp", &[]);
        assert_eq!(status, 200, "{body}");
        let ttp: caas_tl::TtpPublic = serde_json::from_str(&body).unwrap();
        w.tenant_env = [
            ("CAAS_KMS_ENDPOINT", w.ks_url.clone()),
            ("AWS_CA_BUNDLE", ca),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", alice.0),
            ("AWS_SECRET_ACCESS_KEY", alice.1),
            ("CAAS_TTP_PUBLIC_KEY", ttp.to_text()),
            ("CAAS_STORAGE_DIR", s(&dir.join("storage"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for h in ["host-1", "host-2"] {
            let host = w.start_host(h, &ttp);
            w.hosts.push(host);
        }
        for i in 0..2 {
            w.wait_agent(i, true);
        }
        w
    }

    fn start_host(&self, name: &str, ttp: &caas_tl::TtpPublic) -> Host {
        let hdir = self.dir.join(name);
        let state = hdir.join("tpm");
        let swtpm = Kill(
            self.net
                .exec(name, Path::new("swtpm"))
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .args(["--server", "type=tcp,port=2321,bindaddr=127.0.0.1"])
                .args(["--ctrl", "type=tcp,port=2322,bindaddr=127.0.0.1"])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm (install the Debian packages swtpm and swtpm-tools)"),
        );
        let addr = self.net.addr(name);
        let tls = self.pki.issue(name, &[Role::Host], &[&addr]).unwrap();
        let event_log = hdir.join("eventlog.bin");
        self.measured_boot(name, &hdir, &event_log);
        let raw = caas_host::config::RawConfig {
            name: name.into(),
            tcti: "swtpm:host=127.0.0.1,port=2321".into(),
            listen: format!("{addr}:{AGENT_PORT}"),
            advertise_url: Some(format!("https://{addr}:{AGENT_PORT}")),
            key_service_url: self.ks_url.clone(),
            state_dir: hdir.join("agent-state"),
            event_log,
            ak_algorithm: "ecc-p256".into(),
            bind_pcrs: vec![0, 1, 2, 3, 4, 5, 6, 7],
            storage_dir: Some(self.dir.join("storage")),
            ttp_public_key: Some(ttp.to_text()),
            run_dir: None,
            workload_ids: "200000-299999".into(),
            isolation: caas_host::config::Isolation::BestEffort,
            net: Default::default(),
            dev_measure: false,
            // A software TPM is refused in production mode; everything else here is as in
            // production (HTTPS key service, TLS API, pinned pk_TTP).
            mode: caas_host::config::Mode::Dev,
            tls: caas_host::config::RawTls {
                ca: self.pki.ca_file(),
                cert: tls.cert,
                key: tls.key,
                crl: None,
            },
        };
        let cfg = hdir.join("agent.toml");
        std::fs::write(&cfg, toml::to_string(&raw).unwrap()).unwrap();
        let agent = self.spawn_agent(name, &cfg);
        Host {
            name: name.into(),
            dir: hdir,
            cfg,
            url: format!("https://{addr}:{AGENT_PORT}"),
            _swtpm: swtpm,
            agent,
        }
    }

    /// The host's "firmware": measures its boot components (caas_host::boot's dev files:
    /// firmware, platform config, boot loader, kernel, hypervisor, then the separators) into
    /// its swtpm with tpm2_pcrextend inside its namespace and writes the event log.
    fn measured_boot(&self, name: &str, hdir: &Path, event_log: &Path) {
        use caas_attest::eventlog::EV_SEPARATOR;
        let boot = hdir.join("boot");
        caas_host::boot::write_dev_boot_files(&boot).unwrap();
        let mut log = caas_attest::EventLogWriter::new(&[caas_attest::HashAlg::Sha256]);
        let mut extends = Vec::new();
        for c in caas_host::boot::dev_components(&boot, Path::new("-"), Path::new("-")) {
            if c.pcr >= 5 {
                continue; // the agent's binary and config: not measured here
            }
            let content = std::fs::read(&c.path).unwrap();
            for (_, d) in log.measure(c.pcr, c.event_type, &content, c.description.as_bytes()) {
                extends.push(format!("{}:sha256={}", c.pcr, hex::encode(d)));
            }
        }
        for pcr in 0..8 {
            for (_, d) in log.measure(pcr, EV_SEPARATOR, &[0; 4], &[0; 4]) {
                extends.push(format!("{pcr}:sha256={}", hex::encode(d)));
            }
        }
        std::fs::write(event_log, log.into_bytes()).unwrap();
        let tcti = "swtpm:host=127.0.0.1,port=2321";
        wait_for(
            30,
            || {
                let mut c = self.net.exec(name, Path::new("tpm2_pcrread"));
                c.arg("sha256:0").env("TPM2TOOLS_TCTI", tcti);
                run(c).0.then_some(())
            },
            || format!("{name}'s swtpm does not answer (install tpm2-tools and swtpm)"),
        );
        let mut c = self.net.exec(name, Path::new("tpm2_pcrextend"));
        c.args(&extends).env("TPM2TOOLS_TCTI", tcti);
        let (ok, out) = run(c);
        assert!(ok, "tpm2_pcrextend on {name}: {out}");
    }

    fn spawn_agent(&self, name: &str, cfg: &Path) -> Kill {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name).join("agent.log"))
            .unwrap();
        Kill(
            self.net
                .exec(name, &caas_bin())
                .args(["host", "serve", "--config"])
                .arg(cfg)
                .env("CAAS_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// Waits until host `i`'s agent answers the operator (and, with `enrolled`, has
    /// enrolled with the key service).
    fn wait_agent(&mut self, i: usize, enrolled: bool) {
        let name = self.hosts[i].name.clone();
        let url = self.hosts[i].url.clone();
        let log = self.hosts[i].dir.join("agent.log");
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = self.hosts[i].agent.0.try_wait() {
                panic!(
                    "agent {name} exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let (ok, text) = self.ops(&["host", "status", "--agent", &url]);
            if ok
                && text.contains(&format!("\"{name}\""))
                && (!enrolled || json_of(&text)["enrolled"] == json!(true))
            {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "agent {name}: {text}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `caas ARGS` as the operator, from the operator's namespace.
    fn ops(&self, args: &[&str]) -> (bool, String) {
        let mut c = self.net.exec("ops", &caas_bin());
        c.args(args).envs(&self.ops_env);
        run(c)
    }

    fn ops_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ops(args);
        assert!(ok, "operator: caas {args:?}: {out}");
        out
    }

    /// `caas tenant --dir DIR/alice ARGS` as the tenant, from the tenant's namespace.
    fn tenant(&self, args: &[&str]) -> (bool, String) {
        let mut c = self.net.exec("tn", &caas_bin());
        c.arg("tenant")
            .arg("--dir")
            .arg(self.dir.join("alice"))
            .args(args)
            .envs(&self.tenant_env);
        run(c)
    }

    fn tenant_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.tenant(args);
        assert!(ok, "tenant: caas tenant {args:?}: {out}");
        out
    }

    /// One HTTPS request from `member`'s namespace with net_tool.py (`extra`: `--body F`,
    /// `--cert C --key K`, `--sigv4 ID SECRET`); a path is on the key service, a full URL
    /// anywhere. Returns (status, body); status 0 when no HTTP answer came.
    fn tool_call(&self, member: &str, method: &str, url: &str, extra: &[&str]) -> (u16, String) {
        let url = if url.starts_with('/') {
            format!("{}{url}", self.ks_url)
        } else {
            url.to_string()
        };
        let mut c = self.net.exec(member, &self.python);
        c.arg(&self.tool)
            .args(["call", method, &url, "--ca"])
            .arg(self.pki.ca_file())
            .args(extra);
        let (_, out) = run(c);
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        (
            status
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("net_tool: {out}")),
            body.to_string(),
        )
    }

    /// The key service's audit chain (JSON lines of `caas audit list`).
    fn ks_audit(&self) -> Vec<Value> {
        ks_admin(
            &self.net,
            &self.ks_cfg,
            &["audit", "list", "--limit", "100000"],
        )
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
    }

    /// Whether the key service's audit holds a record `op` with `result` (and, if given, a
    /// principal containing `who`).
    fn ks_audited(&self, op: &str, result: &str, who: Option<&str>) -> bool {
        self.ks_audit().iter().any(|r| {
            r["Operation"] == json!(op)
                && r["Result"] == json!(result)
                && who.is_none_or(|w| r["Principal"].as_str().unwrap_or("").contains(w))
        })
    }

    /// Host `i`'s agent audit log, verified by `caas host audit` (operator certificate).
    fn agent_audit(&self, i: usize) -> Vec<Value> {
        let out = self.ops_ok(&["host", "audit", "--agent", &self.hosts[i].url]);
        json_of(&out).as_array().unwrap().clone()
    }

    fn agent_audit_count(&self, i: usize, op: &str, result: &str, caller: &str) -> usize {
        self.agent_audit(i)
            .iter()
            .filter(|e| {
                e["op"] == json!(op)
                    && e["result"] == json!(result)
                    && e["caller"].as_str().unwrap_or("").contains(caller)
            })
            .count()
    }

    fn att(&self) -> String {
        self.net.addr("att")
    }
}

/// The tenant's whole story over the network: provision, TL launch on host-1, DBSP volume.
fn tenant_provisions_launches_with_tl_and_attaches_a_dbsp_volume(w: &World) {
    w.tenant_ok(&["init"]);
    w.tenant_ok(&["acl", "--domains", "finance"]);
    let raw = w.dir.join("web.raw");
    let data: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    w.tenant_ok(&[
        "provision",
        "--image",
        raw.to_str().unwrap(),
        "--id",
        "web",
        "--hosts",
        "host-1,host-2",
    ]);
    let out = w.tenant_ok(&[
        "launch",
        "--id",
        "web",
        "--vm",
        "vm1",
        "--host",
        "host-1",
        "--sp",
        "prod",
        "--domains",
        "finance",
        "--volumes",
        "finance/db",
    ]);
    let r = json_of(&out[out.find("\n{").map_or(0, |i| i + 1)..]);
    assert_eq!(r["host"], json!("host-1"), "{out}");
    assert!(out.contains("\"vm1\""), "{out}");
    // The DBSP volume exists in the cloud storage, bound to its domain (header).
    let vol = std::fs::read(w.dir.join("storage/domains/finance/db.caasvol"))
        .unwrap_or_else(|e| panic!("DBSP volume finance/db not created ({e}): {out}"));
    assert_eq!(&vol[1120..1127], b"finance");
    // The operator sees it running on host-1.
    let wl = w.ops_ok(&["host", "workloads", "--agent", &w.hosts[0].url]);
    assert!(wl.contains("\"vm1\""), "{wl}");
    // The last TL step, from the tenant's machine: the PSK channel keyed by τ to the
    // workload on host-1's address; the workload read the tenant's image and its DBSP
    // volume.
    let ep = r["workload"]["endpoint"].as_str().unwrap_or_default();
    assert!(
        ep.starts_with(&format!("{}:", w.net.addr("host-1"))),
        "{ep}"
    );
    let rep = w.tenant_ok(&["connect", "--vm", "vm1"]);
    let v = json_of(&rep);
    assert_eq!(
        v["disk_sha256"],
        json!(hex::encode(caas_tl::crypto::sha256(&data))),
        "{rep}"
    );
    assert_eq!(
        v["volumes"][0]["ok"],
        json!(true),
        "DBSP volume in the workload: {rep}"
    );
    assert!(
        w.ks_audited("TlAttest", "Success", None),
        "TTP audit of the launch"
    );
    assert!(
        w.ks_audited("DbspDomKey", "Success", None),
        "TTP audit of the DBSP key"
    );
}

/// Attack: the operator routes of the key service called without operator credentials —
/// no signature at all (with a body that is not even JSON: refused before it is parsed),
/// and a tenant's valid signature. Audited as `HTTP PUT /v1/attest/hosts/{name}/profile`
/// with `missing_authentication` (anonymous) and `access_denied` (mallory's key).
fn attack_unauthenticated_operator_calls_to_the_key_service(w: &World) {
    let junk = w.dir.join("junk.body");
    std::fs::write(&junk, b"{\"profile\": ").unwrap();
    let (status, body) = w.tool_call(
        "att",
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        &["--body", junk.to_str().unwrap()],
    );
    assert_eq!(status, 401, "unsigned profile change: {body}");
    assert!(body.contains("missing_authentication"), "{body}");
    let (status, body) = w.tool_call("att", "GET", "/v1/attest/hosts", &[]);
    assert_eq!(status, 401, "unsigned host listing: {body}");
    let evil = w.dir.join("evil.body");
    std::fs::write(&evil, br#"{"profile": "evil"}"#).unwrap();
    let (status, body) = w.tool_call(
        "att",
        "PUT",
        "/v1/attest/hosts/host-1/profile",
        &[
            "--body",
            evil.to_str().unwrap(),
            "--sigv4",
            &w.mallory.0,
            &w.mallory.1,
        ],
    );
    assert_eq!(status, 403, "tenant-signed profile change: {body}");
    assert!(body.contains("access_denied"), "{body}");
    let h = json_of(&w.ops_ok(&["host", "show", "host-1"]));
    assert_eq!(h["profile"], json!("prod"), "host-1's profile changed: {h}");
    let op = "HTTP PUT /v1/attest/hosts/{name}/profile";
    assert!(
        w.ks_audited(op, "missing_authentication", Some("anonymous")),
        "audit of the unsigned call"
    );
    assert!(
        w.ks_audited("HTTP GET /v1/attest/hosts", "missing_authentication", None),
        "audit of the unsigned listing"
    );
    assert!(
        w.ks_audited(op, "access_denied", None),
        "audit of the tenant's call"
    );
}

/// Attack: management calls to an agent without operator credentials, from the attacker's
/// namespace — no certificate (401), a certificate of another CA (handshake refused), a
/// compromised host's certificate (403). Audited by host-1's agent with the attacker's
/// address (`ListWorkloads`/`StopWorkload` `unauthenticated`, `forbidden`,
/// `TlsHandshake` `bad_certificate`).
fn attack_management_call_to_an_agent_without_operator_credentials(w: &World) {
    let h1 = w.net.addr("host-1");
    let ca = w.pki.ca_file();
    let url = &w.hosts[0].url;
    let r = openssl_get(&w.net, "att", &h1, "/v1/agent/workloads", &ca, None);
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(r.contains("unauthenticated"), "{r}");
    let r = openssl_get(&w.net, "att", &h1, "/healthz", &ca, None);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (status, body) = w.tool_call(
        "att",
        "POST",
        &format!("{url}/v1/agent/workloads/vm1/stop"),
        &[],
    );
    assert_eq!(status, 401, "stop without a certificate: {body}");
    let rogue_ca = DevCa::load_or_create(&w.dir.join("rogue-pki")).unwrap();
    let rogue = rogue_ca.issue("rogue", &Role::ALL, &[]).unwrap();
    let r = openssl_get(&w.net, "att", &h1, "/v1/agent/workloads", &ca, Some(&rogue));
    assert!(!r.contains("HTTP/1.1"), "{r}");
    let host2 = CertFiles {
        cert: w.pki.dir().join("host-2.pem"),
        key: w.pki.dir().join("host-2.key"),
    };
    let (status, body) = w.tool_call(
        "att",
        "POST",
        &format!("{url}/v1/agent/workloads/vm1/stop"),
        &[
            "--cert",
            host2.cert.to_str().unwrap(),
            "--key",
            host2.key.to_str().unwrap(),
        ],
    );
    assert_eq!(status, 403, "stop with a host's certificate: {body}");
    let wl = w.ops_ok(&["host", "workloads", "--agent", url]);
    assert!(wl.contains("\"vm1\""), "vm1 was stopped: {wl}");
    let att = format!("@{}:", w.att());
    assert!(
        w.agent_audit_count(
            0,
            "ListWorkloads",
            "unauthenticated",
            &format!("anonymous{att}")
        ) > 0
    );
    assert!(
        w.agent_audit_count(
            0,
            "StopWorkload",
            "unauthenticated",
            &format!("anonymous{att}")
        ) > 0
    );
    assert!(
        w.agent_audit_count(
            0,
            "StopWorkload",
            "forbidden",
            &format!("host-2[host]{att}")
        ) > 0
    );
    assert!(
        w.agent_audit_count(
            0,
            "TlsHandshake",
            "bad_certificate",
            &format!("unverified{att}")
        ) > 0
    );
}

/// Attack: mallory (a tenant with her own valid SigV4 key) sends the TTP an ACL update
/// naming alice's pk_DM, signed with her own DM key. Refused (`bad_signature`), audited as
/// `TlSetAcl` `bad_signature`; alice's workloads still get only her domains.
fn attack_forged_acl_update(w: &World) {
    let alice =
        caas_tl::dm::DomainManager::from_pkcs8(&std::fs::read(w.dir.join("alice/dm.pk8")).unwrap())
            .unwrap();
    let doc = caas_tl::crypto::ed25519_generate().unwrap();
    let mallory = caas_tl::dm::DomainManager::from_pkcs8(doc.expose()).unwrap();
    let forged = caas_tl::wire::Signed::sign(
        mallory.key_pair(),
        caas_tl::wire::label::ACL_UPDATE,
        &caas_tl::wire::AclUpdate {
            pk_dm: alice.public(),
            label: "mallory".into(),
            domains: vec!["finance".into(), "payroll".into()],
            nonce: caas_crypto::random_bytes(32).unwrap(),
            time_ms: caas_attest::now_ms(),
        },
    );
    let f = w.dir.join("forged-acl.json");
    std::fs::write(&f, serde_json::to_vec(&forged).unwrap()).unwrap();
    let (status, body) = w.tool_call(
        "att",
        "PUT",
        "/v1/tl/acl",
        &[
            "--body",
            f.to_str().unwrap(),
            "--sigv4",
            &w.mallory.0,
            &w.mallory.1,
        ],
    );
    assert!(
        (400..500).contains(&status) && body.contains("bad_signature"),
        "forged ACL update: {status} {body}"
    );
    assert!(
        w.ks_audited("TlSetAcl", "bad_signature", None),
        "audit of the forged ACL update: {:?}",
        w.ks_audit()
            .iter()
            .filter(|r| r["Operation"] == json!("TlSetAcl"))
            .collect::<Vec<_>>()
    );
}

/// Attack: a TTP revocation notice of host-2 (public: it crosses the management network;
/// here read from the agent's state) replayed once host-2 is trusted again — by the
/// attacker without a certificate (401), and with a stolen key-service certificate (the
/// sequence check: 403 `revoke_replayed`). Audited by host-2's agent (`Revoke`
/// `revoke_replayed`); the key service audited the genuine notice (`TlRevoke`).
fn attack_replayed_revocation(w: &World) {
    let good = json_of(&w.ops_ok(&["profile", "show", "prod-b"]));
    let mut strict = good.clone();
    strict["pcrs"]["0"]["values"] = json!(["ff".repeat(32)]);
    let (sf, gf) = (w.dir.join("strict.json"), w.dir.join("prod-b.json"));
    std::fs::write(&sf, strict.to_string()).unwrap();
    std::fs::write(&gf, good.to_string()).unwrap();
    w.ops_ok(&["profile", "update", sf.to_str().unwrap()]);
    let (trusted, v) = w.ops(&["attest", "host-2"]);
    assert!(!trusted, "host-2 trusted under the strict profile: {v}");
    // The key service (its [agents] client certificate) revokes host-2's keys.
    let state = w.hosts[1].dir.join("agent-state/revocation.json");
    wait_for(
        30,
        || state.exists().then_some(()),
        || {
            format!(
                "no revocation applied on host-2: {}",
                std::fs::read_to_string(w.dir.join("ks/ks.log")).unwrap_or_default()
            )
        },
    );
    let kept: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let notice = w.dir.join("notice.json");
    std::fs::write(&notice, kept["notice"].to_string()).unwrap();
    w.ops_ok(&["profile", "update", gf.to_str().unwrap()]);
    let (trusted, v) = w.ops(&["attest", "host-2"]);
    assert!(trusted, "host-2 trusted again: {v}");
    let url = format!("{}/v1/agent/revoke", w.hosts[1].url);
    let (status, body) = w.tool_call("att", "POST", &url, &["--body", notice.to_str().unwrap()]);
    assert_eq!(status, 401, "replay without a certificate: {body}");
    let stolen = w.pki.issue("stolen-ks", &[Role::KeyService], &[]).unwrap();
    let (status, body) = w.tool_call(
        "att",
        "POST",
        &url,
        &[
            "--body",
            notice.to_str().unwrap(),
            "--cert",
            stolen.cert.to_str().unwrap(),
            "--key",
            stolen.key.to_str().unwrap(),
        ],
    );
    assert_eq!(status, 403, "replayed revocation: {body}");
    assert!(body.contains("revoke_replayed"), "{body}");
    let att = format!("@{}:", w.att());
    assert_eq!(
        w.agent_audit_count(1, "Revoke", "ok", ""),
        1,
        "the genuine notice"
    );
    assert_eq!(
        w.agent_audit_count(
            1,
            "Revoke",
            "revoke_replayed",
            &format!("stolen-ks[key-service]{att}")
        ),
        1,
        "audit of the replay"
    );
    assert!(w.agent_audit_count(1, "Revoke", "unauthenticated", &format!("anonymous{att}")) > 0);
    assert!(
        w.ks_audited("TlRevoke", "Success", None),
        "TTP audit of the notice"
    );
}

/// Attack: a rogue TTP on host-2's link. Policy routing in host-2's namespace sends its
/// packets for the key service's port to the attacker, who holds the key service's address
/// (MITM on the link; the key service and its other links are untouched); host-2's agent is
/// restarted so that it has no connection from before. The tenant then launches on host-2:
/// the agent's TL.AttestRequest goes to the attacker, who answers with (1) a certificate of
/// its own CA, (2) a deployment certificate of the wrong role (operator) for the key
/// service's address, (3) a stolen key-service certificate and a TL.Attestation signed by
/// its own key. Each launch is refused by the agent and audited (`LaunchWorkload`, its
/// error code; (3) is `bad_signature`: the configured pk_TTP, not the channel, decides).
fn attack_rogue_ttp_on_the_agents_link(w: &mut World) {
    let ks = w.net.addr("ks");
    let att = w.att();
    let h2 = w.net.ns("host-2");
    let a = w.net.ns("att");
    ip(&["-n", &a, "addr", "add", &format!("{ks}/32"), "dev", "lo"]);
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &a,
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.arp_ignore=1",
    ]);
    let (ok, out) = run(c);
    assert!(ok, "sysctl: {out}");
    ip(&[
        "-n",
        &h2,
        "route",
        "add",
        &format!("{ks}/32"),
        "via",
        &att,
        "table",
        "100",
    ]);
    ip(&[
        "-n",
        &h2,
        "rule",
        "add",
        "to",
        &format!("{ks}/32"),
        "ipproto",
        "tcp",
        "dport",
        &KS_PORT.to_string(),
        "lookup",
        "100",
        "pref",
        "100",
    ]);
    // Host-2's agent, restarted: every new connection to the key service's port now
    // reaches the attacker (its enrollment retries fail there; it stays enrolled and
    // attested at the key service, which reaches it as before).
    let cfg = w.hosts[1].cfg.clone();
    w.hosts[1].agent.stop();
    w.hosts[1].agent = w.spawn_agent("host-2", &cfg);
    w.wait_agent(1, false);
    let (trusted, v) = w.ops(&["attest", "host-2"]);
    assert!(trusted, "host-2 attested through its own link: {v}");
    let rogue_ca = DevCa::load_or_create(&w.dir.join("rogue-pki")).unwrap();
    let variants = [
        (
            "rogue-ca",
            rogue_ca
                .issue("rogue-ks", &[Role::KeyService], &[&ks])
                .unwrap(),
        ),
        (
            "wrong-role",
            w.pki
                .issue("mis-issued", &[Role::Operator], &[&ks])
                .unwrap(),
        ),
        (
            "stolen-ks",
            w.pki
                .issue("stolen-ks-srv", &[Role::KeyService], &[&ks])
                .unwrap(),
        ),
    ];
    let doc = caas_tl::crypto::ed25519_generate().unwrap();
    let rogue_key = caas_tl::dm::DomainManager::from_pkcs8(doc.expose()).unwrap();
    let forged = caas_tl::wire::Signed::sign(
        rogue_key.key_pair(),
        caas_tl::wire::label::ATTESTATION,
        &caas_tl::wire::Attestation {
            host: "host-2".into(),
            r: vec![0; 32],
            c2: vec![0; 300],
        },
    );
    let body = w.dir.join("rogue-attestation.json");
    std::fs::write(&body, serde_json::to_vec(&forged).unwrap()).unwrap();
    for (i, (name, cert)) in variants.iter().enumerate() {
        let log = w.dir.join(format!("rogue-{name}.log"));
        std::fs::write(&log, b"").unwrap();
        let mut child = w
            .net
            .exec("att", &w.python)
            .arg(&w.tool)
            .args(["serve", &ks, &KS_PORT.to_string()])
            .arg(&cert.cert)
            .arg(&cert.key)
            .arg(&body)
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let _rogue = Kill(child);
        assert_eq!(line.trim(), "ready", "rogue TTP ({name}) did not start");
        let before = w
            .agent_audit(1)
            .iter()
            .filter(|e| e["op"] == json!("LaunchWorkload") && e["result"] != json!("ok"))
            .count();
        let vm = format!("mitm{i}");
        let (ok, out) = w.tenant(&[
            "launch",
            "--id",
            "web",
            "--vm",
            &vm,
            "--host",
            "host-2",
            "--sp",
            "prod-b",
            "--domains",
            "finance",
        ]);
        assert!(!ok, "launch through a rogue TTP ({name}) succeeded: {out}");
        let refusals: Vec<Value> = w
            .agent_audit(1)
            .into_iter()
            .filter(|e| e["op"] == json!("LaunchWorkload") && e["result"] != json!("ok"))
            .collect();
        assert_eq!(
            refusals.len(),
            before + 1,
            "rogue TTP ({name}): the refused launch is audited by host-2: {refusals:?}\n{out}"
        );
        let rec = refusals.last().unwrap();
        assert!(
            rec["subject"].as_str().unwrap_or("").contains(&vm) || rec.to_string().contains(&vm),
            "{rec}"
        );
        // What the rogue saw (its log is written as it serves: wait for the line).
        let expect = if *name == "stolen-ks" {
            "POST /v1/tl/attest"
        } else {
            "TLS refused"
        };
        let seen = wait_for(
            10,
            || {
                let seen = std::fs::read_to_string(&log).unwrap_or_default();
                seen.contains(expect).then_some(seen)
            },
            || format!("rogue TTP ({name}) never saw `{expect}`"),
        );
        if *name == "stolen-ks" {
            // TLS passed (a deployment key-service certificate): the configured pk_TTP
            // refuses the rogue's TL.Attestation.
            assert_eq!(rec["result"], json!("bad_signature"), "{rec}");
        } else {
            // The agent refused the rogue's certificate in the handshake: no request.
            assert!(
                !seen.contains("/v1/tl/attest"),
                "{name}: the agent sent its request to a server it must not trust: {seen}"
            );
            assert_eq!(rec["result"], json!("key_service_error"), "{rec}");
        }
        eprintln!("rogue TTP {name}: refused, audited as {rec}");
    }
    let wl = w.ops_ok(&["host", "workloads", "--agent", &w.hosts[1].url]);
    assert!(!wl.contains("mitm"), "{wl}");
}

/// A raw HTTPS request from `member`'s namespace with `openssl s_client` (optionally with
/// a client certificate); returns everything the server sent (empty when the handshake
/// was refused).
fn openssl_get(
    net: &Netns,
    member: &str,
    addr: &str,
    path: &str,
    ca: &Path,
    cert: Option<&CertFiles>,
) -> String {
    let mut c = net.exec(member, Path::new("openssl"));
    c.args([
        "s_client",
        "-quiet",
        "-connect",
        &format!("{addr}:{AGENT_PORT}"),
        "-CAfile",
    ])
    .arg(ca);
    if let Some(f) = cert {
        c.arg("-cert").arg(&f.cert).arg("-key").arg(&f.key);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl (install the Debian package openssl)");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let _ = child.stdin.take().unwrap().write_all(req.as_bytes());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn multi_host_deployment_over_namespaces_refuses_and_audits_every_attack() {
    let t0 = Instant::now();
    let mut w = World::start();
    eprintln!("deployment up in {:?}", t0.elapsed());
    // The operator admits the hosts: a profile derived from the golden host's event log,
    // one per host (prod for host-1, prod-b for host-2, which the revocation test changes).
    let log = w.hosts[0].dir.join("eventlog.bin");
    let prod = w.ops_ok(&["profile", "from-log", "prod", log.to_str().unwrap()]);
    let mut p = json_of(&prod);
    for name in ["prod", "prod-b"] {
        p["name"] = json!(name);
        let f = w.dir.join(format!("{name}.profile.json"));
        std::fs::write(&f, p.to_string()).unwrap();
        w.ops_ok(&["profile", "create", f.to_str().unwrap()]);
    }
    w.ops_ok(&["host", "set-profile", "host-1", "prod"]);
    w.ops_ok(&["host", "set-profile", "host-2", "prod-b"]);
    for h in ["host-1", "host-2"] {
        let (trusted, v) = w.ops(&["attest", h]);
        assert!(trusted, "{h} not trusted after admission: {v}");
    }
    w.tenant_env.insert("CAAS_PROFILE".into(), "prod".into());
    let t = Instant::now();
    tenant_provisions_launches_with_tl_and_attaches_a_dbsp_volume(&w);
    eprintln!("tenant story in {:?}", t.elapsed());
    attack_unauthenticated_operator_calls_to_the_key_service(&w);
    attack_management_call_to_an_agent_without_operator_credentials(&w);
    attack_forged_acl_update(&w);
    attack_replayed_revocation(&w);
    attack_rogue_ttp_on_the_agents_link(&mut w);
    // Both audit trails still verify end to end.
    let v = ks_admin(&w.net, &w.ks_cfg, &["audit", "verify", "--json"]);
    assert_eq!(json_of(&v)["ok"], json!(true), "{v}");
    for i in 0..2 {
        w.agent_audit(i);
    }
    eprintln!("total {:?}", t0.elapsed());
}

/// `caas key-service serve` with an `[agents]` client key that cannot be read does not
/// start (it would serve, but reach no agent): the error names the section and the file.
#[test]
fn key_service_does_not_start_with_an_unreadable_agents_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = DevCa::load_or_create(&d.join("pki")).unwrap();
    let ks = pki.issue("key-service", &[Role::KeyService], &[]).unwrap();
    let cfg = d.join("ks.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndatabase = \"sqlite:{}\"\n\
             [keys]\nnode_key_file = \"{}\"\ncreate_node_key = true\n\
             [agents]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            d.join("kms.sqlite3").display(),
            d.join("node.key").display(),
            pki.ca_file().display(),
            ks.cert.display(),
            d.join("missing.key").display(),
        ),
    )
    .unwrap();
    let out = Command::new(caas_bin())
        .args(["key-service", "serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {err}");
    assert!(
        err.contains("[agents]") && err.contains("missing.key"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "it must not listen"
    );
}
