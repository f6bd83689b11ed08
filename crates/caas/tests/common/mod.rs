//! Test harness shared by the `caas` end-to-end tests: starts real `caas` processes on
//! port 0 in temporary directories and talks to them with real clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
pub mod vm;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn caas_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_caas"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The venv's bin dir with the real AWS clients; fails with an install hint when missing.
pub fn venv_bin() -> PathBuf {
    let bin = repo_root().join(".venv/bin");
    assert!(
        bin.join("aws").exists() && bin.join("python").exists(),
        "the Python venv with awscli/boto3 is missing: run scripts/install-deps (creates .venv from .ci/requirements.txt)"
    );
    bin
}

pub fn read_env(dir: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(dir.join("env")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// A `caas dev` process in the foreground (killed on drop).
#[derive(Debug)]
pub struct Dev {
    pub dir: PathBuf,
    pub child: Child,
    pub env: HashMap<String, String>,
}

impl Dev {
    pub fn start(dir: &Path) -> Dev {
        Self::start_on(dir, "127.0.0.1:0")
    }

    pub fn start_on(dir: &Path, listen: &str) -> Dev {
        Self::start_with(dir, listen, &[])
    }

    /// `caas dev` with extra arguments (e.g. `--hosts 2`).
    pub fn start_with(dir: &Path, listen: &str, extra: &[&str]) -> Dev {
        Self::start_with_env(dir, listen, extra, &[])
    }

    /// `caas dev` with extra arguments and environment variables.
    pub fn start_with_env(dir: &Path, listen: &str, extra: &[&str], envs: &[(&str, &str)]) -> Dev {
        std::fs::create_dir_all(dir).unwrap();
        let _ = std::fs::remove_file(dir.join("env"));
        let log = std::fs::File::create(dir.join("test-dev.log")).unwrap();
        let child = Command::new(caas_bin())
            .args(["dev", "--data-dir"])
            .arg(dir)
            .args(["--listen", listen, "--maintenance-secs", "1"])
            .args(extra)
            .env("CAAS_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn caas dev");
        let mut dev = Dev {
            dir: dir.to_path_buf(),
            child,
            env: HashMap::new(),
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(180) {
            let env = read_env(dir);
            if let Some(ep) = env.get("CAAS_KMS_ENDPOINT")
                && std::net::TcpStream::connect(ep.trim_start_matches("http://")).is_ok()
            {
                dev.env = env;
                return dev;
            }
            if let Ok(Some(st)) = dev.child.try_wait() {
                panic!(
                    "caas dev exited early ({st}): {}",
                    std::fs::read_to_string(dir.join("test-dev.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "caas dev did not come up: {}",
            std::fs::read_to_string(dir.join("test-dev.log")).unwrap_or_default()
        );
    }

    pub fn endpoint(&self) -> &str {
        &self.env["CAAS_KMS_ENDPOINT"]
    }

    /// SIGKILL, as a crash would; then also kills what the dead `caas dev` leaves behind
    /// (its crypto domain, swtpms), which a crash orphans.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.kill_orphans();
    }

    /// Kills every process whose command line names this deployment's directory.
    pub fn kill_orphans(&self) {
        let _ = Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(self.dir.to_string_lossy().as_ref())
            .status();
        std::thread::sleep(Duration::from_millis(100));
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    pub fn client(&self) -> caas_kms::client::KmsClient {
        caas_kms::client::KmsClient::new(
            self.endpoint(),
            "us-east-1",
            &self.env["AWS_ACCESS_KEY_ID"],
            caas_crypto::SecretBytes::new(self.env["AWS_SECRET_ACCESS_KEY"].clone().into_bytes()),
            None,
        )
        .unwrap()
    }

    /// The value `caas dev` exported as `k` (panics naming the variable when it is absent).
    pub fn var(&self, k: &str) -> String {
        self.env
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("caas dev exported no {k}"))
    }

    /// The URL of `host`'s agent (`CAAS_HOST_<HOST>_URL`, e.g. `host-1` → `CAAS_HOST_HOST_1_URL`).
    pub fn agent_url(&self, host: &str) -> String {
        self.var(&format!(
            "CAAS_HOST_{}_URL",
            host.to_uppercase().replace('-', "_")
        ))
    }

    /// The key service's endpoint (`CAAS_KMS_ENDPOINT`).
    pub fn ks_url(&self) -> String {
        self.var("CAAS_KMS_ENDPOINT")
    }

    /// A client of the host agents' operator API (mutual TLS with the dev operator's
    /// certificate, as `caas demo` uses it).
    pub fn agent_operator_http(&self) -> caas_attest::client::HttpClient {
        caas_host::cli::OperatorArgs {
            ca: self.env[caas_host::cli::ENV_PKI_CA].clone().into(),
            cert: self.env[caas_host::cli::ENV_OPERATOR_CERT].clone().into(),
            key: self.env[caas_host::cli::ENV_OPERATOR_KEY].clone().into(),
        }
        .client()
        .unwrap()
    }

    /// A JSON client of the key service's signed routes, signing as the dev operator.
    pub fn operator_http(&self, timeout: Duration) -> caas_attest::client::HttpClient {
        signed_http(
            &self.env["CAAS_OPERATOR_ACCESS_KEY_ID"],
            &self.env["CAAS_OPERATOR_SECRET_ACCESS_KEY"],
            timeout,
        )
    }

    /// A JSON client of the key service's signed routes, signing as the dev tenant.
    pub fn tenant_http(&self, timeout: Duration) -> caas_attest::client::HttpClient {
        signed_http(
            &self.env["AWS_ACCESS_KEY_ID"],
            &self.env["AWS_SECRET_ACCESS_KEY"],
            timeout,
        )
    }

    /// Runs `caas <args> --data-dir DIR` and returns stdout.
    pub fn caas(&self, args: &[&str]) -> String {
        let out = Command::new(caas_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "caas {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SIGTERM first, so that `caas dev` stops its crypto domain and volume server too.
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        self.kill_orphans();
    }
}

/// `caas <args> --config CFG` (an operator command against a key-service config), which
/// must succeed; returns its stdout.
pub fn caas_ok(args: &[&str], cfg: &Path) -> String {
    let out = Command::new(caas_bin())
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "caas {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The database administrator's tool: runs `sql` against the SQLite file `db` with the
/// real `sqlite3` CLI (stops at the first error, waits for locks); returns its output.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .args(["-bail", "-cmd", ".timeout 10000"])
        .arg(db)
        .arg(sql)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sqlite3 ({e}): apt-get install sqlite3"));
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Raw HTTP POST to the KMS endpoint (for malformed-input tests).
pub fn raw_post(endpoint: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let hostport = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "POST / HTTP/1.1\r\nhost: {hostport}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let _ = s.write_all(req.as_bytes());
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// An HTTPS client to host agents: the deployment CA `ca` pinned, presenting `identity`
/// (None: no client certificate).
pub fn tls_client(
    ca: &Path,
    identity: Option<caas_tls::pki::CertFiles>,
) -> caas_attest::client::HttpClient {
    caas_attest::client::HttpClient::with_tls(
        Duration::from_secs(120),
        &caas_tls::client::ClientTls {
            ca: ca.to_path_buf(),
            identity,
            server_role: None,
        },
    )
    .unwrap()
}

/// `method url` with a JSON body; `Err((status, code))`, status 0 when no HTTP answer came
/// (e.g. the TLS handshake was refused; code is then the client's error text).
pub fn http_call(
    rt: &tokio::runtime::Runtime,
    http: &caas_attest::client::HttpClient,
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, (u16, String)> {
    let b = body.map(|b| serde_json::to_vec(b).unwrap());
    rt.block_on(http.request::<serde_json::Value>(method, url, b, &[]))
        .map_err(|e| match e {
            caas_attest::Error::Remote { status, code, .. } => (status, code),
            other => (0, other.to_string()),
        })
}

/// caas's one SigV4 signer (`caas_kms::client::Signer`, scope `caas`) as the JSON client's
/// request signer.
#[derive(Debug)]
pub struct SigV4(pub caas_kms::client::Signer);

impl caas_attest::client::RequestSigner for SigV4 {
    fn sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &mut Vec<(String, String)>,
        body: &[u8],
    ) -> Result<(), String> {
        let auth = self
            .0
            .sign(method, path, query, headers, body)
            .map_err(|e| e.to_string())?;
        headers.push(("authorization".into(), auth));
        Ok(())
    }
}

/// A JSON client signing with these credentials (region us-east-1, scope `caas`).
pub fn signed_http(
    access_key_id: &str,
    secret: &str,
    timeout: Duration,
) -> caas_attest::client::HttpClient {
    caas_attest::client::HttpClient::new(timeout).with_signer(std::sync::Arc::new(SigV4(
        caas_kms::client::Signer::new(
            "us-east-1",
            "caas",
            access_key_id,
            caas_crypto::SecretBytes::new(secret.as_bytes().to_vec()),
        ),
    )))
}

/// Counter `name` of a network proxy's attachment (`GET /v1/agent/workloads/{vm}/net`,
/// whose `stats` reads `name=value ...`).
pub fn net_stat(net: &serde_json::Value, name: &str) -> u64 {
    let stats = net["stats"].as_str().unwrap();
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in {stats}"))
        .parse()
        .unwrap()
}

/// The soft and hard RLIMIT_CORE of `pid`, as /proc shows them ("0 0": no core file).
pub fn core_limit(pid: u32) -> String {
    let l = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    l.lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A host administrator reading the swap device finds no page of `pid`: it has locked
/// memory, and every mapping with resident pages is locked ([`unlocked_resident`]),
/// including memory mapped after it dropped root.
pub fn assert_memory_locked(pid: u32, what: &str) {
    assert!(locked_kb(pid) > 0, "{what} ({pid}): no locked memory");
    let unlocked = unlocked_resident(pid);
    assert!(
        unlocked.is_empty(),
        "{what} ({pid}): resident, unlocked mappings: {unlocked:#?}"
    );
}

/// The locked memory of `pid` in KiB (VmLck).
pub fn locked_kb(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find(|l| l.starts_with("VmLck:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// CAP_IPC_LOCK (bit 14) as a capability mask.
pub const CAP_IPC_LOCK: u64 = 1 << 14;

/// The mappings of `pid` with resident pages that are not locked (VmFlags `lo`), except
/// the kernel's special mappings, which `mlockall` never locks (VM_IO, VM_DONTEXPAND,
/// VM_PFNMAP, VM_MIXEDMAP: VmFlags `io`, `de`, `pf`, `mm`, e.g. the vDSO).
pub fn unlocked_resident(pid: u32) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    let (mut name, mut rss) = (String::new(), 0u64);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if !first.ends_with(':') {
            (name, rss) = (line.to_string(), 0);
        } else if first == "Rss:" {
            rss = f.next().and_then(|v| v.parse().ok()).unwrap();
        } else if first == "VmFlags:" {
            let flags: Vec<&str> = f.collect();
            let special = flags.iter().any(|x| ["io", "de", "pf", "mm"].contains(x));
            if rss > 0 && !special && !flags.contains(&"lo") {
                out.push(format!("{name} (Rss {rss} kB, {})", flags.join(" ")));
            }
        }
    }
    out
}

/// Every thread of `pid` holds at most CAP_IPC_LOCK (permitted, effective, inheritable,
/// ambient) and has an empty bounding set, which proves it was started after the process
/// dropped root: one started before the switch keeps no capability and could not map
/// memory once the process locks more than RLIMIT_MEMLOCK (`caas_domc::harden`).
pub fn assert_capabilities_at_most_ipc_lock(pid: u32, what: &str) {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let st = std::fs::read_to_string(t.path().join("status")).unwrap();
        for set in ["CapPrm", "CapEff", "CapInh", "CapAmb", "CapBnd"] {
            let v = st
                .lines()
                .find_map(|l| l.strip_prefix(set)?.strip_prefix(':'))
                .unwrap_or_else(|| panic!("{set} missing in thread status"));
            let mask = u64::from_str_radix(v.trim(), 16).unwrap();
            let allowed = if set == "CapBnd" { 0 } else { CAP_IPC_LOCK };
            assert_eq!(
                mask & !allowed,
                0,
                "{what} ({pid}) thread {}: {set} {mask:#x}",
                t.file_name().to_string_lossy()
            );
        }
    }
}

/// (uid, gid) of a process (real ids from /proc/PID/status).
pub fn ids_of(pid: u32) -> (u32, u32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// Every thread of `pid` runs under a seccomp filter (`Seccomp: 2`): a filter is per thread,
/// so one started before it, or a filter applied without TSYNC, leaves a thread unfiltered.
pub fn assert_every_thread_filtered(pid: u32, what: &str) {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let st = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(
            st.lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "a {what} thread runs without the seccomp filter: {st}"
        );
    }
}
