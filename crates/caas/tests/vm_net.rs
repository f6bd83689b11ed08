//! The network Secure Device Proxy with real VMs (issue 16): two qemu guests (the image of
//! `scripts/build-guest-image`) whose overlay NICs are backed by two `caas net serve`
//! processes of network domain "finance". Between the proxies sits an on-path relay (the
//! underlay attacker: it records every UDP datagram, and replays and injects from the
//! peers' own addresses). The guests ping each other and transfer a known stream over TCP;
//! the receiver's SHA-256 must match, the capture must hold no 16-byte run of the
//! plaintext, and the replayed and injected datagrams must be dropped and counted.
//!
//! `bench_overlay_vs_direct` (ignored; `bench/vm-net.sh`) measures throughput and latency
//! through the overlay against the same guests joined directly by qemu's `-netdev dgram`:
//! each guest has both NICs in one boot and the two modes are measured alternately.
//! `bench_proxy_round_trip` (ignored; `MICRO=1 bench/vm-net.sh`) times the proxies alone:
//! round trips of a frame between two stand-in VMs through two proxies on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_crypto::SecretKey;
use caas_sdp::net::control::Control;
use caas_sdp::net::overlay::Peer;
use common::vm::*;
use common::*;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MARKER: &str = "PLAINTEXT-MARKER the tenant's confidential transfer 0123456789";
const MAC_A: &str = "52:54:00:16:00:01";
const MAC_B: &str = "52:54:00:16:00:02";

/// A `caas net serve` child with its control channel.
struct Proxy {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    udp: SocketAddr,
    sock: PathBuf,
    vm_sock: PathBuf,
}

impl Proxy {
    fn start(dir: &Path, name: &str, sender: u32) -> Proxy {
        Self::start_with_spin(dir, name, sender, None)
    }

    /// With `spin`, the proxy's spin bound (`CAAS_NET_SPIN_US`) instead of its default.
    fn start_with_spin(dir: &Path, name: &str, sender: u32, spin: Option<u64>) -> Proxy {
        Self::start_bin(dir, name, sender, spin, &caas_bin())
    }

    /// `caas net serve` of the binary `bin` (the benchmark's may be a release build).
    fn start_bin(dir: &Path, name: &str, sender: u32, spin: Option<u64>, bin: &Path) -> Proxy {
        let spin = spin.map(|us| us.to_string());
        let envs: Vec<(&str, &str)> = spin
            .as_deref()
            .map(|us| ("CAAS_NET_SPIN_US", us))
            .into_iter()
            .collect();
        Self::start_env(dir, name, sender, bin, &envs)
    }

    /// `caas net serve` of `bin` with the environment settings `envs`.
    fn start_env(dir: &Path, name: &str, sender: u32, bin: &Path, envs: &[(&str, &str)]) -> Proxy {
        let sock = dir.join(format!("{name}.net.sock"));
        let vm_sock = dir.join(format!("{name}.vm.sock"));
        let mut child = Command::new(bin)
            .args([
                "net",
                "serve",
                "--domain",
                "finance",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--sender-id")
            .arg(sender.to_string())
            .arg("--vm-socket")
            .arg(&sock)
            .arg("--vm-peer")
            .arg(&vm_sock)
            .env("CAAS_LOG", "warn")
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let udp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("udp="))
            .unwrap_or_else(|| panic!("no ready line from caas net serve: {line:?}"))
            .parse()
            .unwrap();
        Proxy {
            child,
            stdin,
            stdout,
            udp,
            sock,
            vm_sock,
        }
    }

    fn send(&mut self, m: &Control) -> String {
        self.stdin.write_all(m.encode().expose()).unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn setup(&mut self, peer_sender: u32, peer: SocketAddr) {
        let r = self.send(&Control::Key {
            epoch: 1,
            key: SecretKey::from_bytes([0x5a; 32]),
        });
        assert_eq!(r, "ok key epoch=1");
        let r = self.send(&Control::Peers(vec![Peer {
            sender: peer_sender,
            addr: peer,
        }]));
        assert_eq!(r, "ok peers n=1");
    }

    /// The counter `name` of the proxy's stats.
    fn stat(&mut self, name: &str) -> u64 {
        let line = self.send(&Control::Stats);
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The on-path relay: A's peer address for B is `for_b`, B's for A is `for_a`; every
/// datagram is recorded and forwarded.
struct Relay {
    for_a: UdpSocket,
    for_b: UdpSocket,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn relay(a: SocketAddr, b: SocketAddr) -> Relay {
    let for_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let for_b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let seen = Arc::new(Mutex::new(vec![]));
    for (inp, out, to) in [
        (for_b.try_clone().unwrap(), for_a.try_clone().unwrap(), b),
        (for_a.try_clone().unwrap(), for_b.try_clone().unwrap(), a),
    ] {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, _)) = inp.recv_from(&mut buf) {
                seen.lock().unwrap().push(buf[..n].to_vec());
                let _ = out.send_to(&buf[..n], to);
            }
        });
    }
    Relay { for_a, for_b, seen }
}

/// How a guest's overlay NIC is connected.
enum Nic<'a> {
    /// Through its proxy.
    Proxy(&'a Proxy),
    /// Directly to the other guest's qemu (`-netdev dgram` over UDP).
    Direct { local: u16, remote: u16 },
}

struct Guest {
    child: Child,
    log: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The accelerator the qemu driver would use: `CAAS_QEMU_ACCEL` (TCG by default; nested
/// KVM here can pass the driver's probe and still stall after the BIOS).
fn accel() -> &'static str {
    let d = caas_workload::driver::QemuDriver::new(std::env::temp_dir());
    match d.effective_accel() {
        caas_workload::driver::Accel::Kvm => "kvm",
        _ => "tcg",
    }
}

fn boot(
    dir: &Path,
    image: &Path,
    name: &str,
    mac: &str,
    addr: &str,
    nic: &Nic,
    script: &str,
) -> Guest {
    boot_nics(dir, image, name, &[(mac, nic)], addr, script)
}

/// The qemu `-netdev` of `nic` under the id `id`.
fn netdev(id: &str, nic: &Nic) -> String {
    match nic {
        Nic::Proxy(p) => format!(
            "dgram,id={id},local.type=unix,local.path={},remote.type=unix,remote.path={}",
            p.vm_sock.display(),
            p.sock.display()
        ),
        Nic::Direct { local, remote } => format!(
            "dgram,id={id},local.type=inet,local.host=127.0.0.1,local.port={local},\
             remote.type=inet,remote.host=127.0.0.1,remote.port={remote}"
        ),
    }
}

/// Boots a guest with one virtio NIC per `(mac, nic)` of `nics` after its ordinary eth0;
/// the image's init gives the first of them `addr` (fw_cfg `opt/caas/net`), `script`
/// configures any other.
fn boot_nics(
    dir: &Path,
    image: &Path,
    name: &str,
    nics: &[(&str, &Nic)],
    addr: &str,
    script: &str,
) -> Guest {
    let log = dir.join(format!("{name}.serial.log"));
    // qemu appends to an existing log: a round must not read the previous round's lines.
    let _ = std::fs::remove_file(&log);
    let run = dir.join(format!("{name}.run.sh"));
    std::fs::write(&run, script).unwrap();
    let accel = accel();
    let cpu = if accel == "kvm" { "qemu64" } else { "max" };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-name", &format!("guest={name}")])
        .args(["-accel", accel, "-cpu", cpu, "-m", "256", "-smp", "1"])
        .args(["-nographic", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            image.display()
        ))
        .args(["-device", "virtio-rng-pci"])
        // eth0: the guest's ordinary NIC (user networking, nothing forwarded).
        .args([
            "-netdev",
            "user,id=n0,restrict=on",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]);
    for (i, (mac, nic)) in nics.iter().enumerate() {
        let id = format!("ovl{i}");
        cmd.args(["-netdev", &netdev(&id, nic)]).args([
            "-device",
            &format!("virtio-net-pci,netdev={id},romfile=,mac={mac}"),
        ]);
    }
    let child = cmd
        .arg("-fw_cfg")
        .arg(format!(
            "name=opt/caas/net,string=mac={}\naddr={addr}",
            nics[0].0
        ))
        .arg("-fw_cfg")
        .arg(format!("name=opt/caas/run,file={}", run.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Guest { child, log }
}

fn serial(g: &Guest) -> String {
    String::from_utf8_lossy(&std::fs::read(&g.log).unwrap_or_default()).into_owned()
}

/// Waits until a line of `g`'s console starts with `prefix`; returns it and when it was seen.
fn wait_line(g: &mut Guest, prefix: &str, timeout: Duration) -> (String, Instant) {
    let t = Instant::now();
    loop {
        // Only complete lines: qemu may have written half of the last one. (The console's
        // escape sequences may precede a line's text.)
        let console = serial(g);
        let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(l) = complete
            .lines()
            .find_map(|l| l.find(prefix).map(|i| &l[i..]))
        {
            return (l.to_string(), Instant::now());
        }
        if let Ok(Some(st)) = g.child.try_wait() {
            panic!(
                "qemu exited ({st}) before {prefix:?}; console:\n{}",
                serial(g)
            );
        }
        assert!(
            t.elapsed() < timeout,
            "no {prefix:?} after {timeout:?}; console:\n{}",
            serial(g)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The receiver: the stream's first SIZE bytes through sha256sum, then its digest (busybox
/// nc hangs up when its own stdin ends: it gets one that does not).
fn receiver_script(size: u64) -> String {
    format!(
        "( sleep 3600 | nc -l -p 5000 | head -c {size} | sha256sum > /tmp/sum ) &\n\
         while [ ! -s /tmp/sum ]; do sleep 0.01; done\n\
         echo caas-xfer-done\n\
         echo \"caas-sha $(cut -d' ' -f1 /tmp/sum)\"\n"
    )
}

/// The sender: waits for the peer to answer, measures the round trip, then sends SIZE bytes
/// of the marker stream.
fn sender_script(peer: &str, pings: u32, size: u64) -> String {
    format!(
        "i=0\n\
         until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 120 ] && {{ echo caas-ping-failed; exit 1; }}; done\n\
         echo caas-ping-ok\n\
         ping -c {pings} -i 0.2 {peer} | sed -n 's/^round-trip/caas-rtt round-trip/p'\n\
         sleep 1\n\
         echo caas-xfer-go\n\
         yes \"{MARKER}\" | head -c {size} | nc {peer} 5000\n\
         sleep 3600\n"
    )
}

/// The marker stream's first `size` bytes.
fn marker_stream(size: u64) -> Vec<u8> {
    let line = format!("{MARKER}\n");
    line.bytes()
        .cycle()
        .take(usize::try_from(size).unwrap())
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref())
}

#[test]
fn two_vms_talk_through_the_overlay_and_the_underlay_sees_no_plaintext() {
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let mut pa = Proxy::start(dir.path(), "a", 1);
    let mut pb = Proxy::start(dir.path(), "b", 2);
    let r = relay(pa.udp, pb.udp);
    pa.setup(2, r.for_b.local_addr().unwrap());
    pb.setup(1, r.for_a.local_addr().unwrap());

    let size: u64 = 2 << 20;
    let mut b = boot(
        dir.path(),
        &image,
        "netB",
        MAC_B,
        "10.9.0.2/24",
        &Nic::Proxy(&pb),
        &receiver_script(size),
    );
    let mut a = boot(
        dir.path(),
        &image,
        "netA",
        MAC_A,
        "10.9.0.1/24",
        &Nic::Proxy(&pa),
        &sender_script("10.9.0.2", 3, size),
    );
    let boot_limit = Duration::from_secs(240);
    wait_line(&mut a, "caas-net up", boot_limit);
    wait_line(&mut b, "caas-net up", boot_limit);
    // ICMP both ways (echo and reply) through the overlay.
    wait_line(&mut a, "caas-ping-ok", Duration::from_secs(120));
    let (rtt, _) = wait_line(&mut a, "caas-rtt", Duration::from_secs(60));
    eprintln!("overlay ping: {rtt}");
    // The TCP transfer, checked end to end.
    let (sha, _) = wait_line(&mut b, "caas-sha", Duration::from_secs(240));
    assert_eq!(
        sha.trim_start_matches("caas-sha ").trim(),
        sha256_hex(&marker_stream(size)),
        "the receiver got other bytes than were sent"
    );

    // The capture: every datagram between the proxies, none with 16 bytes of the stream.
    let runs: HashSet<&[u8]> = {
        let twice = format!("{MARKER}\n{MARKER}\n");
        let leaked: &'static str = Box::leak(twice.into_boxed_str());
        leaked.as_bytes().windows(16).collect()
    };
    let seen = r.seen.lock().unwrap().clone();
    let bytes: usize = seen.iter().map(Vec::len).sum();
    assert!(
        bytes as u64 > size,
        "the capture holds the transfer ({bytes} bytes)"
    );
    for (i, d) in seen.iter().enumerate() {
        if let Some(w) = d.windows(16).find(|w| runs.contains(w)) {
            panic!(
                "datagram {i} carries plaintext: {:?}",
                String::from_utf8_lossy(w)
            );
        }
    }
    assert!(pb.stat("rx_frames") > 100);

    // The attacker replays a captured datagram and injects altered ones, from A's address.
    let before = (
        pb.stat("rx_replayed"),
        pb.stat("rx_auth_failed"),
        pb.stat("rx_frames"),
    );
    // A's datagrams (sender id 1, bytes 16..20 of the header).
    let to_b: Vec<Vec<u8>> = seen
        .iter()
        .filter(|d| d.len() > 200 && d[16..20] == 1u32.to_be_bytes())
        .take(3)
        .cloned()
        .collect();
    r.for_a.send_to(&to_b[0], pb.udp).unwrap();
    let mut flipped = to_b[1].clone();
    let n = flipped.len();
    flipped[n - 30] ^= 0x80;
    r.for_a.send_to(&flipped, pb.udp).unwrap();
    let mut forged = to_b[2].clone();
    forged[28..36].copy_from_slice(&u64::MAX.to_be_bytes());
    r.for_a.send_to(&forged, pb.udp).unwrap();
    let t = Instant::now();
    loop {
        let now = (pb.stat("rx_replayed"), pb.stat("rx_auth_failed"));
        // The replay and the flipped copy (its sequence number was seen: the window refuses
        // it before decryption); the forged sequence number fails authentication.
        if now.0 >= before.0 + 2 && now.1 > before.1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "drops not counted: {now:?} vs {before:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // An outsider (not a peer address) gets nothing through either.
    let outsider = UdpSocket::bind("127.0.0.1:0").unwrap();
    outsider.send_to(&to_b[0], pb.udp).unwrap();
    let t = Instant::now();
    while pb.stat("rx_unknown_peer") == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "outsider not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        pb.stat("rx_frames"),
        before.2,
        "nothing of the attacker's reached the VM"
    );
}

/// CPU time a process has used (all its threads; scheduler accounting, nanoseconds).
fn cpu_time(pid: u32) -> Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(t.unwrap().path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

/// A stand-in for the VM of `p`: bound where qemu's socket would be, sending to the proxy.
fn stand_in_vm(p: &Proxy) -> std::os::unix::net::UnixDatagram {
    let vm = std::os::unix::net::UnixDatagram::bind(&p.vm_sock).unwrap();
    vm.connect(&p.sock).unwrap();
    vm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    vm
}

/// The proxies' spin (`CAAS_NET_SPIN_US`, a bounded wait awake after moving frames) must
/// cost nothing while the VM is quiet, at most one bound per burst of traffic, and nothing
/// for an attacker on the underlay: datagrams that are dropped never arm it (else a stranger
/// sending one datagram per spin bound would keep the proxy spinning for free).
#[test]
fn an_idle_proxy_sleeps_and_only_frames_it_moves_make_it_spin() {
    let dir = tempfile::tempdir().unwrap();
    // The spin on, 2 ms (it is off by default).
    let mut pa = Proxy::start_with_spin(dir.path(), "ia", 1, Some(2000));
    let mut pb = Proxy::start_with_spin(dir.path(), "ib", 2, Some(2000));
    pa.setup(2, pb.udp);
    pb.setup(1, pa.udp);
    let (vm_a, vm_b) = (stand_in_vm(&pa), stand_in_vm(&pb));
    let frame = |dst: u8, src: u8| {
        let mut f = vec![
            0x52, 0x54, 0, 0x16, 0, dst, 0x52, 0x54, 0, 0x16, 0, src, 0x08, 0,
        ];
        f.extend_from_slice(&[0x33; 100]);
        f
    };
    let mut buf = vec![0u8; 2048];
    for _ in 0..20 {
        vm_a.send(&frame(2, 1)).unwrap();
        assert_eq!(vm_b.recv(&mut buf).unwrap(), 114);
        vm_b.send(&frame(1, 2)).unwrap();
        assert_eq!(vm_a.recv(&mut buf).unwrap(), 114);
    }
    let pid = pa.child.id();
    // Quiet: the spin after the last frame is over long before; the proxy sleeps.
    std::thread::sleep(Duration::from_millis(50));
    let c0 = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(1));
    let idle = cpu_time(pid) - c0;
    assert!(
        idle < Duration::from_millis(5),
        "an idle proxy used {idle:?} of CPU in 1 s"
    );
    // One frame buys at most one bound (2 ms) of spinning, plus the frame's own work.
    let c0 = cpu_time(pid);
    vm_a.send(&frame(2, 1)).unwrap();
    assert_eq!(vm_b.recv(&mut buf).unwrap(), 114);
    std::thread::sleep(Duration::from_millis(100));
    let one = cpu_time(pid) - c0;
    assert!(
        one < Duration::from_millis(10),
        "one frame cost the proxy {one:?} of CPU"
    );
    // The attacker: 200 datagrams from outside the peer list, 3 ms apart (each would buy a
    // full 2 ms spin if dropped datagrams armed it: ~400 ms of CPU).
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let junk = vec![0x43u8; 200];
    let c0 = cpu_time(pid);
    for _ in 0..200 {
        stranger.send_to(&junk, pa.udp).unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    std::thread::sleep(Duration::from_millis(50));
    let attacked = cpu_time(pid) - c0;
    let dropped = pa.stat("rx_malformed") + pa.stat("rx_unknown_peer");
    assert_eq!(
        dropped, 200,
        "every stranger's datagram is dropped and counted"
    );
    assert!(
        attacked < Duration::from_millis(100),
        "200 dropped datagrams cost the proxy {attacked:?} of CPU: they armed the spin"
    );
    eprintln!(
        "proxy CPU: idle 1 s {idle:?}, one frame {one:?}, 200 dropped datagrams {attacked:?}"
    );
}

/// A stand-in VM frame from MAC ..:src to MAC ..:dst (114 bytes, as a ping's).
fn test_frame(dst: u8, src: u8) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0, 0x16, 0, dst, 0x52, 0x54, 0, 0x16, 0, src, 0x08, 0,
    ];
    f.extend_from_slice(&[0x33; 100]);
    f
}

/// Round trips of `n` frames from `send` to an echo behind it, `gap` apart (a ping's
/// pace lets every thread on the path fall asleep): the sorted RTTs in µs.
fn round_trips(
    send: &dyn Fn(&[u8]),
    recv: &dyn Fn(&mut [u8]) -> usize,
    n: usize,
    gap: Duration,
) -> Vec<f64> {
    let mut buf = vec![0u8; 2048];
    let f = test_frame(2, 1);
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            std::thread::sleep(gap);
            let t = Instant::now();
            send(&f);
            assert_eq!(recv(&mut buf), f.len());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Busy threads that compete for the CPUs (the TCG guests of the VM benchmark) until the
/// flag is set.
fn hogs(n: usize, stop: &Arc<std::sync::atomic::AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
            })
        })
        .collect()
}

/// The proxies' own cost without qemu: round trips of a ping-sized frame between two
/// stand-in VMs through two `caas net serve` on loopback (VM → proxy → UDP → proxy → VM and
/// back: the overlay's four extra hops) against the same echo over one UDP hop each way
/// (what qemu's `-netdev dgram` does), idle and with `CAAS_NET_MICRO_HOGS` busy threads
/// (default: one per CPU, as the two TCG guests), `CAAS_NET_MICRO_N` round trips 1 ms apart,
/// and the proxies' CPU per frame. `CAAS_NET_MICRO_ENV="K=V,K=V;K=V"`: one run of the
/// proxies per `;`-separated set of environment settings (e.g. `CAAS_NET_SPIN_US=2000`).
/// The proxies are `CAAS_NET_BENCH_BIN` when set, else the test's `caas`.
#[test]
#[ignore = "a benchmark: bench/vm-net.sh MICRO=1"]
fn bench_proxy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let n: usize = std::env::var("CAAS_NET_MICRO_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let nhogs: usize = std::env::var("CAAS_NET_MICRO_HOGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cpus);
    let sets: Vec<Vec<(String, String)>> = std::env::var("CAAS_NET_MICRO_ENV")
        .unwrap_or_default()
        .split(';')
        .map(|set| {
            set.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .collect();
    let (bin, which) = bench_proxy_bin();
    println!(
        "proxy-rtt proxy={} ({which}) n={n} gap=1ms hogs={nhogs}",
        bin.display()
    );
    let gap = Duration::from_millis(1);
    let stats = |v: &[f64]| {
        format!(
            "median {:.1} µs, p10 {:.1}, p90 {:.1}, p99 {:.1}",
            quantile(v, 0.5),
            quantile(v, 0.1),
            quantile(v, 0.9),
            quantile(v, 0.99)
        )
    };
    for load in [0, nhogs] {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = hogs(load, &stop);
        // Direct: one UDP hop each way to an echo thread.
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let echo = {
            let b = b.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 2048];
                while let Ok(k) = b.recv(&mut buf) {
                    if k == 1 {
                        break;
                    }
                    let _ = b.send(&buf[..k]);
                }
            })
        };
        let direct = round_trips(
            &|f| {
                a.send(f).unwrap();
            },
            &|buf| a.recv(buf).unwrap(),
            n,
            gap,
        );
        a.send(&[0]).unwrap();
        echo.join().unwrap();
        println!("proxy-rtt load={load} direct (udp):   {}", stats(&direct));
        for (i, set) in sets.iter().enumerate() {
            let envs: Vec<(&str, &str)> =
                set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut pa = Proxy::start_env(dir.path(), &format!("m{load}{i}a"), 1, &bin, &envs);
            let mut pb = Proxy::start_env(dir.path(), &format!("m{load}{i}b"), 2, &bin, &envs);
            pa.setup(2, pb.udp);
            pb.setup(1, pa.udp);
            let (vm_a, vm_b) = (stand_in_vm(&pa), stand_in_vm(&pb));
            let echo = {
                let vm_b = vm_b.try_clone().unwrap();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 2048];
                    while let Ok(k) = vm_b.recv(&mut buf) {
                        if k == 15 {
                            break;
                        }
                        // The reply: from B to A.
                        buf[..12].copy_from_slice(&test_frame(1, 2)[..12]);
                        let _ = vm_b.send(&buf[..k]);
                    }
                })
            };
            let c0 = cpu_time(pa.child.id()) + cpu_time(pb.child.id());
            let overlay = round_trips(
                &|f| {
                    vm_a.send(f).unwrap();
                },
                &|buf| vm_a.recv(buf).unwrap(),
                n,
                gap,
            );
            let cpu = cpu_time(pa.child.id()) + cpu_time(pb.child.id()) - c0;
            let mut stop_echo = test_frame(2, 1);
            stop_echo.truncate(15);
            vm_a.send(&stop_echo).unwrap();
            echo.join().unwrap();
            let label = if set.is_empty() {
                "default".to_string()
            } else {
                set.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            #[allow(clippy::cast_precision_loss)]
            let per_frame = cpu.as_secs_f64() * 1e6 / (4 * n) as f64;
            println!(
                "proxy-rtt load={load} overlay [{label}]: {} (+{:.1} µs median); proxies' CPU {per_frame:.1} µs per frame",
                stats(&overlay),
                quantile(&overlay, 0.5) - quantile(&direct, 0.5),
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in busy {
            h.join().unwrap();
        }
    }
}

/// The MACs and addresses of the benchmark's direct NICs (the overlay NICs are `MAC_A`,
/// `MAC_B` on 10.9.1.0/24).
const DIRECT_MAC_A: &str = "52:54:00:16:01:01";
const DIRECT_MAC_B: &str = "52:54:00:16:01:02";

/// The benchmark's guest scripts: the shell lines that give the direct NIC (found by its
/// MAC) its address; `<>` on a FIFO gives busybox nc an input that never ends (it hangs up
/// when its own stdin does).
fn bench_prelude(mac: &str, addr: &str) -> String {
    format!(
        "d=\"\"; for n in /sys/class/net/*; do [ \"$(cat $n/address)\" = \"{mac}\" ] && d=${{n##*/}}; done\n\
         if [ -n \"$d\" ] && ip addr add {addr} dev $d && ip link set $d up; then echo \"caas-direct up $d {addr}\"; \
         else echo \"caas-bench-failed no direct NIC {mac}\"; exit 1; fi\n\
         mkfifo /tmp/hold; exec 3<>/tmp/hold\n"
    )
}

/// The benchmark's receiver (B): for each transfer, a listener on port 5000 (either NIC)
/// whose stream's first SIZE bytes go through sha256sum, then "ready" on port 5001 to the
/// sender once the listener is up (netstat), then "caas-xfer-done K SHA256 ." when the stream ended.
fn bench_receiver_script(size: u64) -> String {
    format!(
        "{}k=0\n\
         while :; do\n\
           k=$((k+1))\n\
           ( nc -l -p 5000 <&3 | head -c {size} | sha256sum > /tmp/sum ) &\n\
           until netstat -ltn | grep -q ':5000 '; do sleep 0.02; done\n\
           echo ready | nc -l -p 5001\n\
           wait $!\n\
           echo \"caas-xfer-done $k $(cut -d' ' -f1 /tmp/sum) .\"\n\
         done\n",
        bench_prelude(DIRECT_MAC_B, "10.9.0.2/24")
    )
}

/// The benchmark's sender (A): ROUNDS interleaved rounds, each BURSTS pairs of
/// `ping -c PINGS -i 0.2` bursts, one to B's direct address (10.9.0.2) and one to its
/// overlay address (10.9.1.2), then one TCP transfer of SIZE bytes to each; odd rounds
/// start with the direct mode, even rounds with the overlay (so a drift of the guests'
/// speed over the run weighs on both alike). Every reply's time is printed
/// ("caas-rtt ROUND MODE MS ."), each transfer announced ("caas-xfer-go ROUND MODE .") once
/// the receiver is listening.
fn bench_sender_script(rounds: usize, bursts: usize, pings: usize, size: u64) -> String {
    format!(
        "{}for p in 10.9.0.2 10.9.1.2; do\n\
           i=0; until ping -c 1 -W 1 $p >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 120 ] && {{ echo \"caas-ping-failed $p\"; exit 1; }}; done\n\
         done\n\
         echo caas-ping-ok\n\
         addr() {{ if [ $1 = dir ]; then echo 10.9.0.2; else echo 10.9.1.2; fi; }}\n\
         r=0\n\
         while [ $r -lt {rounds} ]; do\n\
           r=$((r+1))\n\
           if [ $((r % 2)) = 1 ]; then order=\"dir ovl\"; else order=\"ovl dir\"; fi\n\
           b=0\n\
           while [ $b -lt {bursts} ]; do\n\
             b=$((b+1))\n\
             for m in $order; do\n\
               ping -c {pings} -i 0.2 $(addr $m) | sed -n \"s/.*time=\\([0-9.]*\\) ms.*/caas-rtt $r $m \\1 ./p\"\n\
             done\n\
           done\n\
           for m in $order; do\n\
             p=$(addr $m); i=0\n\
             until nc $p 5001 <&3 2>/dev/null | grep -q ready; do i=$((i+1)); [ $i -gt 600 ] && {{ echo caas-bench-failed no receiver; exit 1; }}; sleep 0.1; done\n\
             echo \"caas-xfer-go $r $m .\"\n\
             yes \"{MARKER}\" | head -c {size} | nc $p 5000\n\
           done\n\
         done\n\
         echo caas-bench-end\n\
         sleep 3600\n",
        bench_prelude(DIRECT_MAC_A, "10.9.0.1/24")
    )
}

/// The benchmark's two modes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Overlay,
}

impl Mode {
    fn tag(self) -> &'static str {
        match self {
            Mode::Direct => "dir",
            Mode::Overlay => "ovl",
        }
    }

    /// The order of the modes in `round` (as the sender script alternates them).
    fn order(round: usize) -> [Mode; 2] {
        if round % 2 == 1 {
            [Mode::Direct, Mode::Overlay]
        } else {
            [Mode::Overlay, Mode::Direct]
        }
    }
}

/// One boot's samples: per round, per mode (direct, overlay), the transfer's MB/s and
/// every ping's RTT (ms).
struct BootSamples {
    rounds: Vec<[(f64, Vec<f64>); 2]>,
}

/// The RTT samples ("caas-rtt ROUND MODE MS .") of a console, as (round, mode, ms).
fn rtt_samples(console: &str) -> Vec<(usize, Mode, f64)> {
    console
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l[l.find("caas-rtt ")?..].split_whitespace().collect();
            let mode = match *w.get(2)? {
                "dir" => Mode::Direct,
                "ovl" => Mode::Overlay,
                _ => return None,
            };
            (w.len() == 5 && w[4] == ".").then_some(())?;
            Some((w[1].parse().ok()?, mode, w[3].parse().ok()?))
        })
        .collect()
}

/// The proxies the benchmark measures: `CAAS_NET_BENCH_BIN` (bench/vm-net.sh sets it to a
/// release build of `caas`), else this test's own (dev-profile) `caas`.
fn bench_proxy_bin() -> (PathBuf, &'static str) {
    match std::env::var_os("CAAS_NET_BENCH_BIN").filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "CAAS_NET_BENCH_BIN={} is not a file (cargo build --release -p caas --bin caas)",
                p.display()
            );
            (p, "CAAS_NET_BENCH_BIN")
        }
        None => (caas_bin(), "the test's dev-profile build"),
    }
}

/// One boot of the benchmark: both guests with a direct NIC (10.9.0.0/24, qemu's
/// `-netdev dgram` over UDP) and an overlay NIC (10.9.1.0/24, two `caas net serve` of `bin`
/// with the spin bound `spin`), the sender's interleaved rounds timed (transfers on the
/// host, from A's "caas-xfer-go" to B's "caas-xfer-done") and checked (B's digest).
#[allow(clippy::too_many_arguments)]
fn bench_boot(
    dir: &Path,
    image: &Path,
    bin: &Path,
    spin: Option<u64>,
    rounds: usize,
    bursts: usize,
    pings: usize,
    size: u64,
) -> BootSamples {
    let mut pa = Proxy::start_bin(dir, "ba", 1, spin, bin);
    let mut pb = Proxy::start_bin(dir, "bb", 2, spin, bin);
    pa.setup(2, pb.udp);
    pb.setup(1, pa.udp);
    let free = || {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port_a, port_b) = (free(), free());
    let direct_a = Nic::Direct {
        local: port_a,
        remote: port_b,
    };
    let direct_b = Nic::Direct {
        local: port_b,
        remote: port_a,
    };
    let (ovl_a, ovl_b) = (Nic::Proxy(&pa), Nic::Proxy(&pb));
    let mut b = boot_nics(
        dir,
        image,
        "benchB",
        &[(MAC_B, &ovl_b), (DIRECT_MAC_B, &direct_b)],
        "10.9.1.2/24",
        &bench_receiver_script(size),
    );
    let mut a = boot_nics(
        dir,
        image,
        "benchA",
        &[(MAC_A, &ovl_a), (DIRECT_MAC_A, &direct_a)],
        "10.9.1.1/24",
        &bench_sender_script(rounds, bursts, pings, size),
    );
    wait_line(&mut a, "caas-ping-ok", Duration::from_secs(400));
    let want = sha256_hex(&marker_stream(size));
    // A round's pings take bursts × 2 × pings × 0.2 s (and the guests' own time).
    let round_limit = Duration::from_secs(120 + u64::try_from(bursts * pings).unwrap_or(0));
    let mut xfer = vec![];
    let mut k = 0;
    for round in 1..=rounds {
        let mut mbps = [0.0; 2];
        for mode in Mode::order(round) {
            let (_, go) = wait_line(
                &mut a,
                &format!("caas-xfer-go {round} {} .", mode.tag()),
                round_limit,
            );
            k += 1;
            let (done, t) = wait_line(
                &mut b,
                &format!("caas-xfer-done {k} "),
                Duration::from_secs(600),
            );
            assert!(
                done.contains(&want),
                "transfer {k} ({mode:?}): the receiver got other bytes than were sent: {done}"
            );
            #[allow(clippy::cast_precision_loss)]
            let v = size as f64 / t.duration_since(go).as_secs_f64() / 1e6;
            mbps[mode as usize] = v;
        }
        xfer.push(mbps);
    }
    wait_line(&mut a, "caas-bench-end", Duration::from_secs(60));
    let samples = rtt_samples(&serial(&a));
    drop(a);
    drop(b);
    let rounds = xfer
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let of = |mode: Mode| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.0 == i + 1 && s.1 == mode)
                    .map(|s| s.2)
                    .collect();
                assert!(
                    v.len() + 2 >= bursts * pings,
                    "round {}: only {} of {} {mode:?} pings answered",
                    i + 1,
                    v.len(),
                    bursts * pings
                );
                (m[mode as usize], v)
            };
            [of(Mode::Direct), of(Mode::Overlay)]
        })
        .collect();
    BootSamples { rounds }
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// The median of `v` (the mean of the middle two of an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

/// `bench/vm-net.sh`: throughput and latency between two VMs through the overlay vs the same
/// VMs joined directly by qemu's own `-netdev dgram` (goal: ≥ 0.8× throughput, ≤ 1.2×
/// latency). Both NICs are in the SAME boot of the same two guests (a TCG guest's own
/// round trip varies 2x from one boot to the next; within a boot the two modes are
/// measured alternately, so both see the same guests and the same host load):
/// `CAAS_NET_BENCH_ROUNDS` rounds of `CAAS_NET_BENCH_BURSTS` pairs of 20-ping bursts and
/// one transfer of `CAAS_NET_BENCH_BYTES` each way, the modes' order alternating between
/// rounds; `CAAS_NET_BENCH_BOOTS` boots. Latency: the median of all RTT samples of a mode
/// (p10, p90 shown); throughput: the median of its transfers. The proxies are
/// `CAAS_NET_BENCH_BIN` when set (the script's release build), else the test's `caas`;
/// `CAAS_NET_BENCH_SPIN=US` runs them with the spin (`CAAS_NET_SPIN_US`) on.
#[test]
#[ignore = "a benchmark: bench/vm-net.sh"]
fn bench_overlay_vs_direct() {
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let size = env("CAAS_NET_BENCH_BYTES", 16 << 20);
    let as_usize = |v: u64| usize::try_from(v).unwrap().max(1);
    let rounds = as_usize(env("CAAS_NET_BENCH_ROUNDS", 3));
    let bursts = as_usize(env("CAAS_NET_BENCH_BURSTS", 3));
    let pings = as_usize(env("CAAS_NET_BENCH_PINGS", 20));
    let boots = as_usize(env("CAAS_NET_BENCH_BOOTS", 1));
    let spin: Option<u64> = std::env::var("CAAS_NET_BENCH_SPIN")
        .ok()
        .and_then(|v| v.parse().ok());
    let (bin, which) = bench_proxy_bin();
    println!(
        "vm-net accel={} bytes={size} rounds={rounds} bursts={bursts}x{pings} pings boots={boots} \
         proxy={} ({which}){}",
        accel(),
        bin.display(),
        spin.map(|us| format!(" CAAS_NET_SPIN_US={us}"))
            .unwrap_or_default()
    );
    let (mut rtt, mut mbps) = ([vec![], vec![]], [vec![], vec![]]);
    let mut n = 0;
    for boot in 1..=boots {
        let s = bench_boot(dir.path(), &image, &bin, spin, rounds, bursts, pings, size);
        for r in &s.rounds {
            n += 1;
            let (d, o) = (&r[0], &r[1]);
            let (dl, ol) = (median(&d.1), median(&o.1));
            println!(
                "round {n}: direct {:.2} MB/s {dl:.3} ms, overlay {:.2} MB/s {ol:.3} ms \
                 ({:.2}x, {:.2}x; boot {boot}, rtt medians of {} and {} pings)",
                d.0,
                o.0,
                o.0 / d.0,
                ol / dl,
                d.1.len(),
                o.1.len()
            );
            for m in 0..2 {
                mbps[m].push(r[m].0);
                rtt[m].extend_from_slice(&r[m].1);
            }
        }
    }
    let line = |m: usize| {
        format!(
            "throughput {:.2} MB/s (median of {}, {:.2}-{:.2}), rtt {:.3} ms (median of {}; p10 {:.3}, p90 {:.3})",
            median(&mbps[m]),
            mbps[m].len(),
            quantile(&mbps[m], 0.0),
            quantile(&mbps[m], 1.0),
            median(&rtt[m]),
            rtt[m].len(),
            quantile(&rtt[m], 0.1),
            quantile(&rtt[m], 0.9),
        )
    };
    println!("direct  (qemu -netdev dgram): {}", line(0));
    println!("overlay (caas net serve):     {}", line(1));
    println!(
        "ratios: throughput {:.2}x (goal >= 0.8), latency {:.2}x (goal <= 1.2)",
        median(&mbps[1]) / median(&mbps[0]),
        median(&rtt[1]) / median(&rtt[0])
    );
}
