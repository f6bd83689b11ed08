//! The network Secure Device Proxy run by the host agents (issue 16, `docs/network-sdp.md`)
//! against a real `caas dev --hosts 2` (swtpm TPMs, host agents, the TTP and the scheduler in
//! the key service): `caas tenant launch --net-domain` on two hosts, each agent starting its
//! VM's `caas net serve` keyed with the domain's key from the TTP (TPM-opened), the scheduler
//! telling each proxy the other members. The VM's NIC is played by the test, bound to the
//! socket qemu would bind (the process driver starts no qemu): every frame it writes goes
//! through the real proxies and the real UDP underlay.
//!
//! The attacker: the untrusted management (it names placements and peer lists, holds a
//! key-service certificate of the deployment), a host that leaves the workload's profile or
//! is revoked and keeps its proxy (its revocation notice is not delivered:
//! `CAAS_DEV_DELIVER_REVOCATIONS=0`), and a VM of another network domain.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_attest::client::HttpClient;
use common::*;
use serde_json::{Value, json};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The proxies' timing in these tests: keys asked for every 500 ms, a new epoch used after
/// 300 ms, the previous one accepted for 3 s.
const RETIRE_MS: u64 = 3000;

struct Cloud {
    mgmt: HttpClient,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dev: Dev,
    rt: tokio::runtime::Runtime,
}

type Reply = Result<Value, (u16, String)>;

impl Cloud {
    fn start(deliver_revocations: bool) -> Self {
        Self::start_hosts(deliver_revocations, 2)
    }

    fn start_hosts(deliver_revocations: bool, hosts: usize) -> Self {
        Self::start_with(deliver_revocations, hosts, &[])
    }

    /// `caas dev` with `extra` in its (and its agents') environment.
    fn start_with(deliver_revocations: bool, hosts: usize, extra: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let root = tmp.path().to_path_buf();
        let retire = RETIRE_MS.to_string();
        let mut env = vec![
            ("CAAS_DEV_NET_KEY_POLL_MS", "500"),
            ("CAAS_DEV_NET_SWITCH_AFTER_MS", "300"),
            ("CAAS_DEV_NET_RETIRE_AFTER_MS", &retire),
            (
                "CAAS_DEV_DELIVER_REVOCATIONS",
                if deliver_revocations { "1" } else { "0" },
            ),
        ];
        env.extend_from_slice(extra);
        let dev = Dev::start_with_env(
            &root.join("dev"),
            "127.0.0.1:0",
            &["--hosts", &hosts.to_string(), "--attest-secs", "3600"],
            &env,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
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
        let c = Cloud {
            mgmt,
            _tmp: tmp,
            root,
            dev,
            rt,
        };
        c.tenant_ok(&["init"]);
        c.tenant_ok(&["acl", "--domains", "finance,lan,other"]);
        let raw = c.root.join("web.raw");
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        let names: Vec<String> = (1..=hosts).map(|i| format!("host-{i}")).collect();
        c.tenant_ok(&[
            "provision",
            "--image",
            raw.to_str().unwrap(),
            "--id",
            "web",
            "--hosts",
            &names.join(","),
        ]);
        c
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

    /// `caas tenant launch --net-domain` of `vm` on `host` (process driver).
    fn launch(&self, vm: &str, host: &str, net: &str, addr: &str) {
        self.tenant_ok(&[
            "launch",
            "--id",
            "web",
            "--vm",
            vm,
            "--host",
            host,
            "--domains",
            "finance",
            "--net-domain",
            net,
            "--net-addr",
            addr,
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
        let http = self.dev.operator_http(Duration::from_secs(120));
        http_call(&self.rt, &http, method, url, body)
    }

    /// The agent's view of `vm`'s network attachment, with its proxy's counters.
    fn net(&self, host: &str, vm: &str) -> Value {
        self.call(
            "GET",
            &format!("{}/v1/agent/workloads/{vm}/net", self.agent(host)),
            None,
        )
        .unwrap()
    }

    fn stat(&self, host: &str, vm: &str, name: &str) -> u64 {
        common::net_stat(&self.net(host, vm), name)
    }

    /// `host`'s agent audit log: (op, subject, result).
    fn agent_audit(&self, host: &str) -> Vec<(String, String, String)> {
        self.call("GET", &format!("{}/v1/agent/audit", self.agent(host)), None)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("op"), s("subject"), s("result"))
            })
            .collect()
    }

    fn agent_audited(&self, host: &str, op: &str, subject: &str, result: &str) -> bool {
        self.agent_audit(host)
            .iter()
            .any(|(o, s, r)| o == op && s.contains(subject) && r == result)
    }

    /// The key service's (TTP's) audit records.
    fn ttp_audited(&self, op: &str, result: &str) -> bool {
        self.dev
            .caas(&["audit", "list", "--limit", "100000"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| v["Operation"] == json!(op) && v["Result"] == json!(result))
    }

    /// The scheduler request `caas tenant ARGS` makes, captured by a stand-in for the
    /// scheduler (it answers 500): the management's view of a launch.
    fn captured_launch(&self, args: &[&str]) -> Value {
        use std::io::{BufRead, BufReader, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = format!("http://{}", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).unwrap();
            let mut s = s;
            let _ = s.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n");
            body
        });
        let out = Command::new(caas_bin())
            .arg("tenant")
            .arg("--dir")
            .arg(self.root.join("alice"))
            .args(args)
            .envs(&self.dev.env)
            .env("CAAS_KMS_ENDPOINT", &ep)
            .output()
            .unwrap();
        assert!(!out.status.success());
        serde_json::from_slice(&t.join().unwrap()).unwrap()
    }

    /// Waits until `f` holds (panics with `what` after `secs`).
    fn wait(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The VM's NIC as the test plays it: bound where qemu binds (`vm_socket`), writing to the
/// proxy's socket.
struct Nic {
    sock: UnixDatagram,
    proxy: PathBuf,
    mac: [u8; 6],
}

impl Nic {
    fn attach(net: &Value) -> Nic {
        let vm = PathBuf::from(net["vm_socket"].as_str().unwrap());
        let _ = std::fs::remove_file(&vm);
        let sock = UnixDatagram::bind(&vm).unwrap();
        // As qemu creates it, before the agent closes the directory (umask 007, group the
        // directory's, the crypto domain's): writable by the proxy, which runs as the
        // crypto domain (the owner of `<vm>/domain`, whose uid is its gid).
        let run = vm.parent().and_then(Path::parent).unwrap();
        let domain_gid = std::fs::metadata(run.join("domain")).unwrap().uid();
        std::os::unix::fs::chown(&vm, None, Some(domain_gid)).unwrap();
        std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o770)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mac: Vec<u8> = net["mac"]
            .as_str()
            .unwrap()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        Nic {
            sock,
            proxy: PathBuf::from(net["proxy_socket"].as_str().unwrap()),
            mac: mac.try_into().unwrap(),
        }
    }

    /// A broadcast frame from this NIC (EtherType 0x88B5, local experimental) carrying `tag`.
    fn frame(&self, tag: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(tag);
        f.resize(f.len().max(60), 0);
        f
    }

    fn send(&self, tag: &[u8]) {
        self.sock.send_to(&self.frame(tag), &self.proxy).unwrap();
    }

    /// Frames received within `ms` whose payload starts with `tag`.
    fn received(&self, tag: &[u8], ms: u64) -> usize {
        let t = Instant::now();
        let mut n = 0;
        let mut buf = vec![0u8; 65536];
        while t.elapsed() < Duration::from_millis(ms) {
            if let Ok(k) = self.sock.recv(&mut buf)
                && k >= 14 + tag.len()
                && &buf[14..14 + tag.len()] == tag
            {
                n += 1;
            }
        }
        n
    }

    /// Sends `tag` until `peer` receives it (the peer list may still be on its way).
    fn reaches(&self, peer: &Nic, tag: &[u8], secs: u64) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            self.send(tag);
            if peer.received(tag, 200) > 0 {
                return true;
            }
        }
        false
    }
}

/// A frame tagged `TAG-b` from `a` reaches `b` and one tagged `TAG-a` from `b` reaches `a`
/// (each within 20 s: the peer lists may still be on their way).
fn exchange(a: &Nic, b: &Nic, tag: &str, a_name: &str, b_name: &str) {
    assert!(
        a.reaches(b, format!("{tag}-b").as_bytes(), 20),
        "a frame from {a_name} never reached {b_name}"
    );
    assert!(
        b.reaches(a, format!("{tag}-a").as_bytes(), 20),
        "a frame from {b_name} never reached {a_name}"
    );
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn net_pid(c: &Cloud, host: &str, vm: &str) -> u32 {
    let ws = c
        .call(
            "GET",
            &format!("{}/v1/agent/workloads", c.agent(host)),
            None,
        )
        .unwrap();
    ws.as_array()
        .unwrap()
        .iter()
        .find(|w| w["vm_id"] == json!(vm))
        .and_then(|w| {
            w["processes"]
                .as_array()?
                .iter()
                .find_map(|p| p.as_str()?.strip_prefix("net:")?.parse().ok())
        })
        .unwrap_or_else(|| panic!("{vm} has no network proxy: {ws}"))
}

/// vm-a on host-1 and vm-b on host-2 in network domain `lan`, both keyed, each told the
/// other; their NICs (played by the test) exchange a frame both ways.
fn two_members(c: &Cloud) -> (Nic, Nic) {
    c.launch("vm-a", "host-1", "lan", "10.9.0.1/24");
    c.launch("vm-b", "host-2", "lan", "10.9.0.2/24");
    let (na, nb) = (c.net("host-1", "vm-a"), c.net("host-2", "vm-b"));
    assert_eq!(na["epoch"], json!(1), "{na}");
    assert_eq!(nb["epoch"], json!(1), "{nb}");
    let (a, b) = (Nic::attach(&na), Nic::attach(&nb));
    exchange(&a, &b, "hello", "vm-a", "vm-b");
    (a, b)
}

#[test]
fn members_on_two_hosts_are_keyed_by_their_agents_and_exchange_frames() {
    let c = Cloud::start(true);
    let (a, b) = two_members(&c);
    for (host, vm) in [("host-1", "vm-a"), ("host-2", "vm-b")] {
        assert!(c.agent_audited(host, "NetProxyStart", &format!("{vm}/lan"), "ok"));
        assert!(c.agent_audited(host, "NetKey", &format!("{vm}/lan epoch 1"), "ok"));
        assert!(c.agent_audited(host, "NetPeers", &format!("{vm}/lan n=1"), "ok"));
    }
    assert!(c.ttp_audited("NetKey", "Success"));
    assert!(c.stat("host-2", "vm-b", "rx_frames") >= 1);
    // The key never appears in the management API's answers nor in the proxy's arguments.
    let pid = net_pid(&c, "host-1", "vm-a");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("net serve") && !cmdline.contains("key"),
        "{cmdline}"
    );
    // The proxy holds the domain's key: no core file, and a host administrator reading the
    // swap device finds none of its pages (every resident mapping locked).
    assert_eq!(core_limit(pid), "0 0", "network proxy: core limit");
    assert_memory_locked(pid, "network proxy");
    // It parses what the VM and the network send, so a parsing bug is the attacker's code
    // in it: it runs as its crypto domain (the owner of `<vm>/domain`), neither root nor the
    // workload (the owner of `<vm>/net`, qemu's socket's directory), with no capability but
    // CAP_IPC_LOCK in any thread, and every thread under the seccomp filter (no ptrace, no
    // module loading, no mount, no exec...).
    let net_dir = Path::new(a.sock.local_addr().unwrap().as_pathname().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let run = net_dir.parent().unwrap();
    let (du, workload) = (
        std::fs::metadata(run.join("domain")).unwrap().uid(),
        std::fs::metadata(run.join("workload")).unwrap(),
    );
    let (wu, wg) = (workload.uid(), workload.gid());
    let (pu, pg) = ids_of(pid);
    assert!(
        pu != 0 && pu != wu,
        "network proxy uid {pu} (workload {wu})"
    );
    assert_eq!(
        (pu, pg),
        (du, du),
        "the network proxy runs as its crypto domain"
    );
    assert_capabilities_at_most_ipc_lock(pid, "network proxy");
    assert_every_thread_filtered(pid, "network proxy");
    // A compromised workload cannot re-point its NIC: once it is up its network directory
    // is the agent's, 0711, so it can neither put a symlink to another datagram socket the
    // proxy may write where qemu's socket is, nor move or remove the sockets.
    let m = std::fs::metadata(&net_dir).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o7777),
        (0, 0o711),
        "{}",
        net_dir.display()
    );
    let d = net_dir.display();
    for attack in [
        format!("ln -s /dev/log {d}/evil.sock"),
        format!("mv {d}/net-vm.sock {d}/old.sock"),
        format!("rm -f {d}/net.sock"),
    ] {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={wu}"),
                &format!("--regid={wg}"),
                "--clear-groups",
                "sh",
                "-c",
                &attack,
            ])
            .output()
            .expect("setpriv is needed (util-linux)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Permission denied"),
            "the workload could `{attack}`: {err}"
        );
    }
    // Stopping the VM stops its proxy (audited); the other member's frames go nowhere.
    c.call(
        "POST",
        &format!("{}/v1/agent/workloads/vm-a/stop", c.agent("host-1")),
        Some(&json!({})),
    )
    .unwrap();
    assert!(c.agent_audited("host-1", "NetProxyStop", "vm-a/lan", "ok"));
    c.wait(5, "the proxy exits with its VM", || !pid_alive(pid));
    b.send(b"after-stop");
    assert_eq!(a.received(b"after-stop", 500), 0);
}

/// Four members of `lan` launched at once, two per host (as `caas demo` launches its two
/// VMs): their agents' NetKeyReqs meet at the TTP, which serves one request of a domain at a
/// time and lets the others wait for it (busy, `rekey_in_progress`, only beyond 2 s: then
/// the agents retry), so every
/// launch succeeds with the same epoch, and the scheduler's peer lists, pushed one at a
/// time, leave every proxy with the three others.
#[test]
fn members_launched_at_once_are_all_keyed_and_told_of_each_other() {
    let c = Cloud::start(true);
    let vms = [
        ("vm-a", "host-1", "10.9.0.1/24"),
        ("vm-b", "host-2", "10.9.0.2/24"),
        ("vm-c", "host-1", "10.9.0.3/24"),
        ("vm-d", "host-2", "10.9.0.4/24"),
    ];
    let launches: Vec<_> = vms
        .iter()
        .map(|(vm, host, addr)| {
            Command::new(caas_bin())
                .arg("tenant")
                .arg("--dir")
                .arg(c.root.join("alice"))
                .args(["launch", "--id", "web", "--vm", vm, "--host", host])
                .args([
                    "--domains",
                    "finance",
                    "--net-domain",
                    "lan",
                    "--net-addr",
                    addr,
                ])
                .envs(&c.dev.env)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for ((vm, _, _), p) in vms.iter().zip(launches) {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "launch of {vm}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (vm, host, _) in vms {
        let n = c.net(host, vm);
        assert_eq!(n["epoch"], json!(1), "{vm}: {n}");
        c.wait(10, "every proxy is told of the three others", || {
            c.agent_audited(host, "NetPeers", &format!("{vm}/lan n=3"), "ok")
        });
    }
    let (a, b) = (
        Nic::attach(&c.net("host-1", "vm-a")),
        Nic::attach(&c.net("host-2", "vm-b")),
    );
    exchange(&a, &b, "hello", "vm-a", "vm-b");
}

/// A VM of another network domain: its proxy, told by the (untrusted) management that vm-a
/// is its peer, sends vm-a's proxy frames sealed under `other`'s key — all dropped as
/// foreign, none reaches vm-a; and the management attaching a VM launched for `other` to
/// `lan` gets it no key of `lan` (the TTP refuses: `lan` is not in its signed domains).
#[test]
fn a_vm_of_another_network_domain_gets_nothing_through() {
    let c = Cloud::start(true);
    let (a, _b) = two_members(&c);
    c.launch("vm-c", "host-2", "other", "10.9.0.3/24");
    let nc = c.net("host-2", "vm-c");
    let na = c.net("host-1", "vm-a");
    let cnic = Nic::attach(&nc);
    // The management's lie: vm-a is a member of `other` (and vm-c one of `lan`).
    for (host, n, m) in [("host-2", "other", &na), ("host-1", "lan", &nc)] {
        c.call(
            "POST",
            &format!("{}/v1/agent/net/peers", c.agent(host)),
            Some(&json!({ "net_domain": n, "members": [m["member"]] })),
        )
        .unwrap();
    }
    let before = c.stat("host-1", "vm-a", "rx_foreign_domain");
    let rx = c.stat("host-1", "vm-a", "rx_frames");
    for _ in 0..20 {
        cnic.send(b"from-other");
    }
    assert_eq!(
        a.received(b"from-other", 1000),
        0,
        "a foreign frame got through"
    );
    c.wait(5, "foreign frames counted", || {
        c.stat("host-1", "vm-a", "rx_foreign_domain") >= before + 20
    });
    assert_eq!(c.stat("host-1", "vm-a", "rx_frames"), rx);
    // The management attaches a VM the DM launched for `other` to `lan` instead: the TTP
    // refuses `lan`'s key (not in the signed request's domains), the launch fails, both
    // audited.
    let mut call = c.captured_launch(&[
        "launch",
        "--id",
        "web",
        "--vm",
        "vm-e",
        "--host",
        "host-2",
        "--domains",
        "finance",
        "--net-domain",
        "other",
        "--net-addr",
        "10.9.0.5/24",
    ]);
    call["net"]["domain"] = json!("lan");
    call.as_object_mut().unwrap().remove("host");
    let r = c.call(
        "POST",
        &format!("{}/v1/agent/workloads", c.agent("host-2")),
        Some(&call),
    );
    assert!(r.is_err(), "launched with another domain's network: {r:?}");
    assert!(c.agent_audited("host-2", "NetKey", "vm-e/lan", "acl_denied"));
    assert!(c.ttp_audited("NetKey", "acl_denied"));
    assert!(c.agent_audited("host-2", "NetProxyStop", "vm-e/lan", "ok"));
}

/// Shared by the two ways a member leaves: `leave` takes host-2 out (and makes the TTP
/// rekey `lan`); host-2's agent keeps asking and is refused with `code` (audited by the TTP
/// and by the agent), its proxy stays at epoch 1 while vm-a's moves on, and once vm-a's
/// proxy retires epoch 1 nothing of host-2's gets through in either direction.
fn leaving_member_is_cut_off(c: &Cloud, leave: impl FnOnce(&Cloud), code: &str) {
    let (a, b) = two_members(c);
    leave(c);
    c.wait(20, "vm-a's proxy gets epoch 2", || {
        c.net("host-1", "vm-a")["epoch"] == json!(2)
    });
    assert!(c.agent_audited("host-1", "NetKey", "vm-a/lan epoch 2 (rekey)", "ok"));
    c.wait(20, "host-2's request refused", || {
        c.agent_audited("host-2", "NetKey", "vm-b/lan", code)
    });
    assert!(c.ttp_audited("NetKey", code), "TTP audit of {code}");
    assert_eq!(
        c.net("host-2", "vm-b")["epoch"],
        json!(1),
        "host-2 got a new key"
    );
    // The overlap: vm-a's proxy still accepts epoch 1 for RETIRE_MS after epoch 2 came.
    std::thread::sleep(Duration::from_millis(RETIRE_MS + 1000));
    let before = c.stat("host-1", "vm-a", "rx_unknown_epoch");
    for _ in 0..10 {
        b.send(b"after-retire");
    }
    assert_eq!(
        a.received(b"after-retire", 1000),
        0,
        "host-2's frame accepted"
    );
    c.wait(5, "host-2's frames refused as of an unknown epoch", || {
        c.stat("host-1", "vm-a", "rx_unknown_epoch") >= before + 10
    });
    for _ in 0..10 {
        a.send(b"to-b");
    }
    assert_eq!(b.received(b"to-b", 1000), 0, "host-2 read epoch 2 traffic");
}

/// Continuous attestation finds host-2 changed; the TTP revokes it (the notice does not
/// reach it: it keeps its proxy, as a compromised host would) and rekeys `lan`.
#[test]
fn revoked_host_gets_no_new_network_key_and_its_frames_stop_after_the_overlap() {
    let c = Cloud::start(false);
    leaving_member_is_cut_off(
        &c,
        |c| {
            c.call(
                "POST",
                &format!("{}/v1/agent/dev/measure", c.agent("host-2")),
                Some(&json!({ "pcr": 7, "data": "an unexpected kernel module" })),
            )
            .unwrap();
            let v = c
                .call(
                    "POST",
                    &format!("{}/v1/attest/hosts/host-2/attest", c.ks()),
                    None,
                )
                .unwrap();
            assert_eq!(v["trusted"], json!(false), "{v}");
        },
        "host_untrusted",
    );
}

/// host-2 is moved to another security profile (it still attests, under that profile):
/// outside the profile of vm-b's launch, it gets no key of the next epoch (`sp_mismatch`);
/// the operator's rekey moves the others on.
#[test]
fn host_outside_the_profile_gets_no_new_network_key_and_its_frames_stop() {
    let c = Cloud::start(true);
    leaving_member_is_cut_off(
        &c,
        |c| {
            let mut p = c
                .call("GET", &format!("{}/v1/attest/profiles/dev", c.ks()), None)
                .unwrap();
            p["name"] = json!("other");
            c.call("POST", &format!("{}/v1/attest/profiles", c.ks()), Some(&p))
                .unwrap();
            c.call(
                "PUT",
                &format!("{}/v1/attest/hosts/host-2/profile", c.ks()),
                Some(&json!({ "profile": "other" })),
            )
            .unwrap();
            let v = c
                .call(
                    "POST",
                    &format!("{}/v1/attest/hosts/host-2/attest", c.ks()),
                    None,
                )
                .unwrap();
            assert_eq!(v["trusted"], json!(true), "{v}");
            c.call(
                "POST",
                &format!("{}/v1/tl/netkey/rekey", c.ks()),
                Some(&json!({ "net_domain": "lan" })),
            )
            .unwrap();
        },
        "sp_mismatch",
    );
    // A new VM of `lan` on host-2 under the old profile is not launched at all.
    let (ok, out) = c.tenant(&[
        "launch",
        "--id",
        "web",
        "--vm",
        "vm-d",
        "--host",
        "host-2",
        "--domains",
        "finance",
        "--net-domain",
        "lan",
    ]);
    assert!(!ok, "{out}");
}

/// The attacker's recording of what a member's proxy sealed under the current epoch: the
/// untrusted management tells `host`'s agent that N's only other member is a socket of its
/// own (a "spy"), so `nic`'s frames are sealed (fresh sequence numbers no real peer saw)
/// and sent there. Returns the sealed datagrams and the proxy's underlay address they
/// came from.
fn record_sealed_frames(
    c: &Cloud,
    host: &str,
    vm: &str,
    nic: &Nic,
    tag: &[u8],
) -> (Vec<Vec<u8>>, std::net::SocketAddr) {
    let spy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    spy.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let me = c.net(host, vm)["member"].clone();
    let from: std::net::SocketAddr = me["udp"].as_str().unwrap().parse().unwrap();
    c.call(
        "POST",
        &format!("{}/v1/agent/net/peers", c.agent(host)),
        Some(&json!({ "net_domain": "lan", "members": [
            me,
            { "vm_id": "spy", "sender": 7, "udp": spy.local_addr().unwrap().to_string() },
        ] })),
    )
    .unwrap();
    let mut sealed = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..10 {
        nic.send(tag);
        if let Ok((n, src)) = spy.recv_from(&mut buf) {
            assert_eq!(src, from);
            sealed.push(buf[..n].to_vec());
        }
    }
    assert!(
        sealed.len() >= 5,
        "the spy recorded {} frames",
        sealed.len()
    );
    (sealed, from)
}

/// After the member left (its proxy gone, the overlap over), the attacker holding what its
/// proxy sealed under the retired epoch sends it to `host`/`vm`'s proxy from the departed
/// member's own underlay address, which the (lying) management lists as a member of `lan`
/// under its sender id: nothing reaches the VM, every datagram is dropped as of an unknown
/// epoch (it passed the peer check: the epoch is what stops it).
fn replayed_old_epoch_frames_are_dropped(
    c: &Cloud,
    host: &str,
    vm: &str,
    nic: &Nic,
    old: (&[Vec<u8>], std::net::SocketAddr),
    member: Value,
    tag: &[u8],
) {
    let (sealed, from) = old;
    c.call(
        "POST",
        &format!("{}/v1/agent/net/peers", c.agent(host)),
        Some(&json!({ "net_domain": "lan", "members": [member] })),
    )
    .unwrap();
    let to: std::net::SocketAddr = c.net(host, vm)["member"]["udp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let sock = std::net::UdpSocket::bind(from).expect("the departed proxy's address is free");
    let before = c.stat(host, vm, "rx_unknown_epoch");
    let rx = c.stat(host, vm, "rx_frames");
    for d in sealed {
        sock.send_to(d, to).unwrap();
    }
    assert_eq!(nic.received(tag, 1000), 0, "an old-epoch frame got through");
    c.wait(5, "old-epoch frames dropped as of an unknown epoch", || {
        c.stat(host, vm, "rx_unknown_epoch") >= before + sealed.len() as u64
    });
    assert_eq!(c.stat(host, vm, "rx_frames"), rx);
}

/// A member's VM is stopped through its agent: the agent's NetLeave ends its session at the
/// TTP (audited by both), the scheduler drops it from `lan`'s peer list and tells the other
/// member's agent, `lan` moves to epoch 2, which the other member picks up; once the
/// overlap is over, frames the stopped member's proxy sealed under epoch 1 (recorded by the
/// attacker, never seen by the peer) are dropped even sent from its own address.
#[test]
fn stopped_member_is_rekeyed_out_and_its_old_epoch_frames_stop_after_the_overlap() {
    let c = Cloud::start(true);
    let (a, b) = two_members(&c);
    let old_b = c.net("host-2", "vm-b")["member"].clone();
    let (sealed, from) = record_sealed_frames(&c, "host-2", "vm-b", &b, b"old-epoch");
    let pid = net_pid(&c, "host-2", "vm-b");
    c.call(
        "POST",
        &format!("{}/v1/agent/workloads/vm-b/stop", c.agent("host-2")),
        Some(&json!({})),
    )
    .unwrap();
    c.wait(5, "vm-b's proxy exits with its VM", || !pid_alive(pid));
    assert!(c.agent_audited("host-2", "NetProxyStop", "vm-b/lan", "ok"));
    assert!(
        c.agent_audited("host-2", "NetLeave", "vm-b stopped: rekeyed [lan]", "ok"),
        "{:?}",
        c.agent_audit("host-2")
    );
    assert!(c.ttp_audited("NetLeave", "Success"));
    assert!(c.ttp_audited("TlSessionRetired", "Success"));
    // The accepted leave also takes vm-b out of the scheduler's peer list of `lan` at once,
    // and vm-a's agent is told (vm-b no longer named as a place to send frames to): the
    // last list host-1's agent got names no peer.
    c.wait(10, "vm-a's agent is told that vm-b left", || {
        c.agent_audit("host-1")
            .iter()
            .rev()
            .find(|(op, subject, _)| op == "NetPeers" && subject.starts_with("vm-a/lan"))
            .is_some_and(|(_, subject, r)| subject == "vm-a/lan n=0" && r == "ok")
    });
    c.wait(20, "vm-a's proxy gets epoch 2", || {
        c.net("host-1", "vm-a")["epoch"] == json!(2)
    });
    std::thread::sleep(Duration::from_millis(RETIRE_MS + 1000));
    replayed_old_epoch_frames_are_dropped(
        &c,
        "host-1",
        "vm-a",
        &a,
        (&sealed, from),
        old_b,
        b"old-epoch",
    );
}

/// A member's VM fails to start after its proxy was keyed (here host-2's qemu exits at
/// once; a host administrator can make any launch fail there): the agent tears the proxy
/// down and its NetLeave ends the failed launch's session at the TTP (audited by both), so
/// `lan` moves to epoch 2, which the surviving member picks up — the key host-2's proxy
/// held is not left current until the scheduled rekey.
#[test]
fn a_member_whose_vm_fails_to_start_leaves_and_the_domain_is_rekeyed() {
    let bin = tempfile::tempdir().unwrap();
    let qemu = bin.path().join("qemu-system-x86_64");
    std::fs::write(&qemu, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let c = Cloud::start_with(true, 2, &[("PATH", &path)]);
    c.launch("vm-a", "host-1", "lan", "10.9.0.1/24");
    assert_eq!(c.net("host-1", "vm-a")["epoch"], json!(1));
    let (ok, out) = c.tenant(&[
        "launch",
        "--id",
        "web",
        "--vm",
        "vm-b",
        "--host",
        "host-2",
        "--domains",
        "finance",
        "--net-domain",
        "lan",
        "--net-addr",
        "10.9.0.2/24",
        "--driver",
        "qemu",
    ]);
    assert!(!ok, "the launch with a failing qemu succeeded:\n{out}");
    let audit = c.agent_audit("host-2");
    assert!(
        c.agent_audited("host-2", "NetKey", "vm-b/lan epoch 1", "ok"),
        "vm-b's proxy was keyed before its VM failed: {audit:?}"
    );
    assert!(
        c.agent_audited("host-2", "NetProxyStop", "vm-b/lan", "ok"),
        "{audit:?}"
    );
    assert!(
        c.agent_audited(
            "host-2",
            "NetLeave",
            "vm-b launch failed: rekeyed [lan]",
            "ok"
        ),
        "{audit:?}"
    );
    assert!(c.ttp_audited("NetLeave", "Success"));
    assert!(c.ttp_audited("TlSessionRetired", "Success"));
    c.wait(20, "vm-a's proxy gets epoch 2", || {
        c.net("host-1", "vm-a")["epoch"] == json!(2)
    });
}

/// vm-a (of `lan`, with vm-b on host-2) is live-migrated from host-1 to host-3 through the
/// scheduler: host-3's agent starts vm-a's proxy keyed under host-3's own session (its
/// first key retires host-1's session at the TTP: `lan` moves to epoch 2), host-1's proxy
/// stops with the source VM, the scheduler moves vm-a's member and tells both, and frames
/// flow between the migrated vm-a and vm-b. After the overlap, what host-1's proxy sealed
/// under epoch 1 gets nothing through, even with the management listing host-1's address.
#[test]
fn migrated_member_talks_from_its_new_host_and_the_source_key_stops_after_the_overlap() {
    let c = Cloud::start_hosts(true, 3);
    let (a, b) = two_members(&c);
    let old_a = c.net("host-1", "vm-a")["member"].clone();
    let (sealed, from) = record_sealed_frames(&c, "host-1", "vm-a", &a, b"old-epoch");
    let pid = net_pid(&c, "host-1", "vm-a");
    let out = c.tenant_ok(&["migrate", "--vm", "vm-a", "--to", "host-3"]);
    let r: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(r["target"], json!("host-3"), "{r}");
    assert_eq!(r["net"]["domain"], json!("lan"), "{r}");
    assert!(!r.to_string().contains("\"key\""), "{r}");
    // The source's proxy stopped with its VM; the target's runs, at the new epoch.
    c.wait(5, "host-1's proxy exits", || !pid_alive(pid));
    assert!(c.agent_audited("host-1", "NetProxyStop", "vm-a/lan", "ok"));
    assert!(c.agent_audited("host-3", "NetProxyStart", "vm-a/lan", "ok"));
    let na = c.net("host-3", "vm-a");
    assert_eq!(na["epoch"], json!(2), "{na}");
    assert_eq!(na["member"]["sender"], old_a["sender"]);
    assert_ne!(na["member"]["udp"], old_a["udp"]);
    assert!(c.agent_audited("host-3", "NetKey", "vm-a/lan epoch 2", "ok"));
    assert!(c.ttp_audited("TlSessionRetired", "Success"));
    assert!(c.ttp_audited("NetRekey", "Success"));
    // The scheduler told host-2 (vm-a's new address) and host-3; vm-b moves to epoch 2.
    c.wait(20, "vm-b's proxy gets epoch 2", || {
        c.net("host-2", "vm-b")["epoch"] == json!(2)
    });
    let a2 = Nic::attach(&na);
    exchange(&a2, &b, "after-migration", "the migrated vm-a", "vm-b");
    std::thread::sleep(Duration::from_millis(RETIRE_MS + 1000));
    replayed_old_epoch_frames_are_dropped(
        &c,
        "host-2",
        "vm-b",
        &b,
        (&sealed, from),
        old_a,
        b"old-epoch",
    );
}
