//! The network proxy on real sockets: two proxies of one network domain, each with a
//! stand-in for its VM (a UNIX datagram socket where qemu's would be), and an on-path relay
//! between them that records every underlay datagram (the attacker's position: it can read,
//! replay and inject, from the very addresses the peers use).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use caas_crypto::SecretKey;
use caas_sdp::net::control::Control;
use caas_sdp::net::overlay::{Peer, Stats};
use caas_sdp::net::serve::{self, Running, ServeArgs};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Node {
    run: Running,
    vm: UnixDatagram,
}

fn node(dir: &Path, name: &str, domain: &str, sender: u32) -> Node {
    let args = ServeArgs {
        domain: domain.into(),
        sender_id: sender,
        listen: "127.0.0.1:0".parse().unwrap(),
        vm_socket: dir.join(format!("{name}.proxy.sock")),
        vm_peer: dir.join(format!("{name}.vm.sock")),
        peer_uid: None,
        run_as: None,
        switch_after_ms: 2000,
        retire_after_ms: 30_000,
    };
    let run = serve::start(&args).unwrap();
    let vm = UnixDatagram::bind(&args.vm_peer).unwrap();
    vm.connect(&args.vm_socket).unwrap();
    vm.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    Node { run, vm }
}

fn control(n: &Node, msgs: &[Control]) -> String {
    let mut input = vec![];
    for m in msgs {
        input.extend_from_slice(m.encode().expose());
    }
    let mut out = vec![];
    serve::control_loop(&n.run, &mut std::io::Cursor::new(input), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn stats(n: &Node) -> Stats {
    n.run.shared.stats()
}

/// An on-path relay: `a_side` is where B's datagrams appear to come from for A (and vice
/// versa); every datagram passing is recorded.
struct Relay {
    for_a: UdpSocket,
    for_b: UdpSocket,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn relay(a: SocketAddr, b: SocketAddr) -> Relay {
    // A's peer "B" is for_b's address: A sends there, the relay forwards from for_a to B,
    // so B sees A's datagrams come from for_a (its peer "A"), and the other way round.
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

fn eth(dst: u8, src: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src, 0x08, 0x00];
    f.extend_from_slice(payload);
    f
}

fn recv(vm: &UnixDatagram) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 65_536];
    let n = vm.recv(&mut b).ok()?;
    Some(b[..n].to_vec())
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two proxies of "finance" joined through a relay, with key epoch 1.
fn finance_pair(dir: &Path) -> (Node, Node, Relay) {
    let a = node(dir, "a", "finance", 1);
    let b = node(dir, "b", "finance", 2);
    let r = relay(a.run.udp, b.run.udp);
    let key = || Control::Key {
        epoch: 1,
        key: SecretKey::from_bytes([0x42; 32]),
    };
    let ra = control(
        &a,
        &[
            key(),
            Control::Peers(vec![Peer {
                sender: 2,
                addr: r.for_b.local_addr().unwrap(),
            }]),
        ],
    );
    let rb = control(
        &b,
        &[
            key(),
            Control::Peers(vec![Peer {
                sender: 1,
                addr: r.for_a.local_addr().unwrap(),
            }]),
        ],
    );
    assert_eq!(ra, "ok key epoch=1\nok peers n=1\n");
    assert_eq!(rb, ra);
    (a, b, r)
}

const SECRET: &[u8] = b"PLAINTEXT-MARKER the tenant's confidential payload, 0123456789abcdef";

#[test]
fn frames_cross_encrypted_and_the_underlay_never_carries_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, r) = finance_pair(dir.path());
    let f = eth(0xbb, 0xaa, SECRET);
    a.vm.send(&f).unwrap();
    assert_eq!(recv(&b.vm).unwrap(), f);
    let back = eth(0xaa, 0xbb, SECRET);
    b.vm.send(&back).unwrap();
    assert_eq!(recv(&a.vm).unwrap(), back);
    let seen = r.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for d in &seen {
        assert!(
            !d.windows(16).any(|w| SECRET.windows(16).any(|p| p == w)),
            "a 16-byte run of the plaintext on the underlay"
        );
    }
    assert_eq!(stats(&b).rx_frames, 1);
    assert_eq!(stats(&a).tx_frames, 1);
}

#[test]
fn a_replayed_or_injected_datagram_from_the_peers_own_address_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, r) = finance_pair(dir.path());
    a.vm.send(&eth(0xbb, 0xaa, SECRET)).unwrap();
    recv(&b.vm).unwrap();
    let captured = r.seen.lock().unwrap()[0].clone();
    // Replay from A's address as B knows it.
    r.for_a.send_to(&captured, b.run.udp).unwrap();
    // Injection: a frame of the attacker's own making, and a captured one with one bit flipped.
    let mut flipped = captured.clone();
    let last = flipped.len() - 20;
    flipped[last] ^= 1;
    r.for_a.send_to(&flipped, b.run.udp).unwrap();
    let mut forged = captured.clone();
    forged[28..36].copy_from_slice(&999u64.to_be_bytes());
    r.for_a.send_to(&forged, b.run.udp).unwrap();
    wait_for("three drops counted", || {
        let s = stats(&b);
        // The flipped copy still carries a sequence number B has seen: the window refuses
        // it before any decryption. The one with a new sequence number fails authentication
        // (and moves no window).
        s.rx_replayed == 2 && s.rx_auth_failed == 1
    });
    assert!(recv_nothing(&b.vm), "nothing reached the VM");
    assert_eq!(stats(&b).rx_frames, 1);
    // And from an address that is not a peer at all.
    let outsider = UdpSocket::bind("127.0.0.1:0").unwrap();
    outsider.send_to(&captured, b.run.udp).unwrap();
    wait_for("outsider counted", || stats(&b).rx_unknown_peer == 1);
}

fn recv_nothing(vm: &UnixDatagram) -> bool {
    vm.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let r = recv(vm).is_none();
    vm.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    r
}

#[test]
fn a_vm_of_another_domain_gets_nothing_through() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, b, r) = finance_pair(dir.path());
    // An "hr" proxy that knows the finance proxy's address and even uses the same key bytes,
    // sending from A's relay address.
    let hr = node(dir.path(), "hr", "hr", 1);
    control(
        &hr,
        &[
            Control::Key {
                epoch: 1,
                key: SecretKey::from_bytes([0x42; 32]),
            },
            Control::Peers(vec![Peer {
                sender: 2,
                addr: r.for_b.local_addr().unwrap(),
            }]),
        ],
    );
    hr.vm.send(&eth(0xff, 0xcc, SECRET)).unwrap();
    wait_for("foreign frame counted", || {
        stats(&b).rx_unknown_peer + stats(&b).rx_foreign_domain >= 1
    });
    assert!(recv_nothing(&b.vm));
    assert_eq!(stats(&b).rx_frames, 0);
}

#[test]
fn only_the_vm_may_send_on_the_vm_socket_and_bad_control_messages_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _r) = finance_pair(dir.path());
    // A local process other than qemu writes frames to the proxy's VM socket.
    let intruder = UnixDatagram::bind(dir.path().join("intruder.sock")).unwrap();
    intruder
        .send_to(&eth(0xbb, 0xaa, SECRET), dir.path().join("a.proxy.sock"))
        .unwrap();
    UnixDatagram::unbound()
        .unwrap()
        .send_to(&eth(0xbb, 0xaa, SECRET), dir.path().join("a.proxy.sock"))
        .unwrap();
    wait_for("intruders counted", || stats(&a).vm_refused == 2);
    assert!(recv_nothing(&b.vm));
    let mode = std::fs::metadata(dir.path().join("a.proxy.sock")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // An older epoch, a peer list naming the proxy itself, garbage: refused, nothing changes.
    let reply = control(
        &a,
        &[
            Control::Key {
                epoch: 0,
                key: SecretKey::from_bytes([1; 32]),
            },
            Control::Peers(vec![Peer {
                sender: 1,
                addr: "127.0.0.1:1".parse().unwrap(),
            }]),
            Control::Stats,
        ],
    );
    let lines: Vec<&str> = reply.lines().collect();
    assert!(
        lines[0].starts_with("error: key epoch 0 is not above"),
        "{reply}"
    );
    assert!(lines[1].starts_with("error: bad peer list"), "{reply}");
    assert!(lines[2].starts_with("stats tx_frames=0 "), "{reply}");
    assert!(lines[2].contains("vm_refused=2"), "{reply}");
    assert_eq!(a.run.shared.epochs(), vec![1]);
    a.vm.send(&eth(0xbb, 0xaa, b"still works")).unwrap();
    assert!(recv(&b.vm).is_some());
}

#[test]
fn rekey_while_traffic_flows_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _r) = finance_pair(dir.path());
    let k2 = || Control::Key {
        epoch: 2,
        key: SecretKey::from_bytes([0x43; 32]),
    };
    // B gets epoch 2 first, A later: every frame either way still arrives.
    let mut sent = 0;
    for round in 0..3 {
        if round == 1 {
            assert_eq!(control(&b, &[k2()]), "ok key epoch=2\n");
        }
        if round == 2 {
            control(&a, &[k2()]);
        }
        for _ in 0..5 {
            a.vm.send(&eth(0xbb, 0xaa, b"a to b")).unwrap();
            assert!(recv(&b.vm).is_some(), "round {round}");
            b.vm.send(&eth(0xaa, 0xbb, b"b to a")).unwrap();
            assert!(recv(&a.vm).is_some(), "round {round}");
            sent += 1;
        }
    }
    assert_eq!(stats(&b).rx_frames, sent);
    // A saw B use epoch 2 (B switched at once: A had it too by then? B still waits for its
    // own switch_after or a frame under 2): after A installed it, both end on epoch 2.
    wait_for("both send under epoch 2", || {
        a.vm.send(&eth(0xbb, 0xaa, b"x")).unwrap();
        let _ = recv(&b.vm);
        b.vm.send(&eth(0xaa, 0xbb, b"y")).unwrap();
        let _ = recv(&a.vm);
        a.run.shared.send_epoch(Instant::now()) == Some(2)
            && b.run.shared.send_epoch(Instant::now()) == Some(2)
    });
    assert_eq!(stats(&a).rx_auth_failed + stats(&b).rx_auth_failed, 0);
}

#[test]
fn bad_arguments_are_refused_before_any_socket_exists() {
    let dir = tempfile::tempdir().unwrap();
    let args = |domain: &str, switch: u64, retire: u64| ServeArgs {
        domain: domain.into(),
        sender_id: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        vm_socket: dir.path().join("p.sock"),
        vm_peer: dir.path().join("v.sock"),
        peer_uid: None,
        run_as: None,
        switch_after_ms: switch,
        retire_after_ms: retire,
    };
    for (a, want) in [
        (args("", 1, 2), "network domain id"),
        (args("finance", 2000, 1000), "--retire-after-ms"),
    ] {
        let e = serve::start(&a).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(!dir.path().join("p.sock").exists());
    // A VM socket in a directory others may write is refused (they could plant qemu's end).
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut a = args("finance", 1, 2);
    a.vm_socket = open.join("p.sock");
    let e = serve::start(&a).unwrap_err().to_string();
    assert!(e.contains("must not be writable"), "{e}");
}

/// Round trips of a 98-byte frame (a ping's size) between two stand-in VMs, `gap` apart
/// (so every thread on the path is asleep when a frame comes, as between a guest's pings):
/// through two proxies joined directly, and through a plain UDP pair (the direct baseline).
/// Returns (overlay, direct) round trips in microseconds, measured interleaved.
fn round_trips(dir: &Path, n: usize, gap: Duration, echo: Duration) -> (Vec<f64>, Vec<f64>) {
    let a = node(dir, "la", "finance", 1);
    let b = node(dir, "lb", "finance", 2);
    let key = || Control::Key {
        epoch: 1,
        key: SecretKey::from_bytes([0x42; 32]),
    };
    let peer = |sender, addr| Control::Peers(vec![Peer { sender, addr }]);
    control(&a, &[key(), peer(2, b.run.udp)]);
    control(&b, &[key(), peer(1, a.run.udp)]);
    // B's VM and the direct pair's far end echo every frame back (MACs swapped).
    let vm_b = b.vm.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = vm_b.recv(&mut buf) {
            std::thread::sleep(echo);
            let mut f = buf[..n].to_vec();
            f[..12].rotate_left(6);
            let _ = vm_b.send(&f);
        }
    });
    let (ua, ub) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    ua.connect(ub.local_addr().unwrap()).unwrap();
    ub.connect(ua.local_addr().unwrap()).unwrap();
    ua.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = ub.recv(&mut buf) {
            std::thread::sleep(echo);
            let _ = ub.send(&buf[..n]);
        }
    });
    let f = eth(0xbb, 0xaa, &[0x5a; 84]);
    let mut buf = vec![0u8; 2048];
    let (mut o, mut d) = (vec![], vec![]);
    for _ in 0..n {
        std::thread::sleep(gap);
        let t = Instant::now();
        a.vm.send(&f).unwrap();
        a.vm.recv(&mut buf).unwrap();
        o.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(gap);
        let t = Instant::now();
        ua.send(&f).unwrap();
        ua.recv(&mut buf).unwrap();
        d.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (o, d)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The proxies' added latency on this host (`cargo test -p caas-sdp --test net -- --ignored
/// --nocapture proxy_round_trip`): the overlay's extra four hops per round trip.
#[test]
#[ignore = "a measurement"]
fn proxy_round_trip_latency() {
    let dir = tempfile::tempdir().unwrap();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    // Between rounds every thread sleeps; the far end answers after `echo` (a TCG guest
    // takes ~0.6 ms).
    let gap = Duration::from_millis(env("GAP_MS", 20));
    let echo = Duration::from_micros(env("ECHO_US", 500));
    let (mut o, mut d) = round_trips(dir.path(), 200, gap, echo);
    let (mo, md) = (median(&mut o), median(&mut d));
    println!(
        "round trip (median of 200, {gap:?} apart, echo {echo:?}): overlay {mo:.0} us, direct udp {md:.0} us, \
         added {:.0} us; overlay p10/p90 {:.0}/{:.0}, direct p10/p90 {:.0}/{:.0}",
        mo - md,
        o[20],
        o[180],
        d[20],
        d[180]
    );
}
