//! The TLS 1.3 external-PSK channel: Rust ↔ Rust, rejection of a wrong PSK or identity in
//! both directions, and interop with the real `openssl s_server` / `openssl s_client`.
use anyhow::{Context, Result, anyhow, bail};
use caas_crypto::SecretBytes;
use caas_workload::psk;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

fn key(b: u8) -> SecretBytes {
    SecretBytes::new((0..32).map(|i| b ^ i).collect())
}

/// A one-connection Rust PSK server: reads a line, answers `pong:<line>`.
fn rust_server(
    identity: &str,
    k: &SecretBytes,
) -> Result<(SocketAddr, JoinHandle<caas_workload::Result<String>>)> {
    let acceptor = psk::server_acceptor(identity, k)?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let h = std::thread::spawn(move || {
        let (tcp, _) = l.accept().map_err(caas_workload::Error::io("accept"))?;
        tcp.set_read_timeout(Some(TIMEOUT))
            .map_err(caas_workload::Error::io("timeout"))?;
        let mut s = psk::accept(&acceptor, tcp)?;
        let mut line = String::new();
        BufReader::new(&mut s)
            .read_line(&mut line)
            .map_err(caas_workload::Error::io("read"))?;
        let line = line.trim_end().to_string();
        s.write_all(format!("pong:{line}\n").as_bytes())
            .map_err(caas_workload::Error::io("write"))?;
        let _ = s.shutdown();
        Ok(line)
    });
    Ok((addr, h))
}

fn rust_client(addr: SocketAddr, identity: &str, k: &SecretBytes) -> caas_workload::Result<String> {
    let tcp = TcpStream::connect(addr).map_err(caas_workload::Error::io("connect"))?;
    tcp.set_read_timeout(Some(TIMEOUT))
        .map_err(caas_workload::Error::io("timeout"))?;
    let mut s = psk::connect(tcp, identity, k)?;
    s.write_all(b"ping\n")
        .map_err(caas_workload::Error::io("write"))?;
    let mut line = String::new();
    BufReader::new(&mut s)
        .read_line(&mut line)
        .map_err(caas_workload::Error::io("read"))?;
    Ok(line.trim_end().to_string())
}

fn join<T>(h: JoinHandle<T>) -> Result<T> {
    h.join().map_err(|_| anyhow!("server thread panicked"))
}

#[test]
fn rust_round_trip() -> Result<()> {
    let (addr, h) = rust_server("vm-1", &key(1))?;
    assert_eq!(rust_client(addr, "vm-1", &key(1))?, "pong:ping");
    assert_eq!(join(h)??, "ping");
    Ok(())
}

#[test]
fn wrong_psk_fails_on_both_sides() -> Result<()> {
    let (addr, h) = rust_server("vm-1", &key(1))?;
    let c = rust_client(addr, "vm-1", &key(2));
    assert!(
        matches!(c, Err(caas_workload::Error::Handshake(_))),
        "{c:?}"
    );
    let s = join(h)?;
    assert!(
        matches!(s, Err(caas_workload::Error::Handshake(_))),
        "{s:?}"
    );
    Ok(())
}

#[test]
fn wrong_identity_fails_on_both_sides() -> Result<()> {
    let (addr, h) = rust_server("vm-1", &key(1))?;
    let c = rust_client(addr, "vm-2", &key(1));
    assert!(
        matches!(c, Err(caas_workload::Error::Handshake(_))),
        "{c:?}"
    );
    let s = join(h)?;
    assert!(
        matches!(s, Err(caas_workload::Error::Handshake(_))),
        "{s:?}"
    );
    Ok(())
}

#[test]
fn errors_and_debug_never_show_the_psk() -> Result<()> {
    let canary = SecretBytes::new(b"canary-canary-canary-canary-0123".to_vec());
    let (addr, h) = rust_server("vm-1", &key(1))?;
    let c = rust_client(addr, "vm-1", &canary);
    let s = join(h)?;
    for text in [format!("{c:?}"), format!("{s:?}")] {
        assert!(!text.contains("canary") && !text.contains(&hex::encode(canary.expose())));
    }
    // Bad parameters are refused without echoing the key.
    let short = psk::server_acceptor("vm-1", &SecretBytes::new(b"canary".to_vec()));
    let Err(e) = short else {
        bail!("a 6-byte PSK was accepted")
    };
    assert!(!format!("{e:?} {e}").contains("canary"));
    assert!(psk::server_acceptor("", &key(1)).is_err());
    assert!(psk::server_acceptor("a\0b", &key(1)).is_err());
    Ok(())
}

#[test]
fn client_rejects_a_certificate_server() -> Result<()> {
    // A server with a certificate and no PSK (what an impostor without τ would run).
    let dir = tempfile::tempdir()?;
    let (cert, keyf) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=impostor", "-days", "1", "-keyout"])
        .arg(&keyf)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    assert!(st.success());
    let mut server = SServer::start(&[
        "-cert".as_ref(),
        cert.as_os_str(),
        "-key".as_ref(),
        keyf.as_os_str(),
    ])?;
    let tcp = TcpStream::connect(server.addr)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let r = psk::connect(tcp, "vm-1", &key(1));
    assert!(
        matches!(r, Err(caas_workload::Error::Handshake(_))),
        "{r:?}"
    );
    server.stop();
    Ok(())
}

/// `openssl s_server -rev` (answers each line reversed).
struct SServer {
    child: Child,
    addr: SocketAddr,
}

impl SServer {
    fn start(extra: &[&std::ffi::OsStr]) -> Result<Self> {
        let mut child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                "127.0.0.1:0",
                "-tls1_3",
                "-naccept",
                "1",
                "-rev",
            ])
            .args(["-ciphersuites", psk::CIPHERSUITE])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("openssl s_server")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(out).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                let _ = child.kill();
                bail!("s_server exited before ACCEPT");
            };
            if let Some(a) = line?.strip_prefix("ACCEPT ") {
                break a.trim().parse()?;
            }
        };
        // Drain the rest so s_server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, addr })
    }
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn s_server_psk(identity: &str, k: &SecretBytes) -> Result<SServer> {
    let hexkey = hex::encode(k.expose());
    SServer::start(&[
        "-nocert".as_ref(),
        "-psk".as_ref(),
        hexkey.as_ref(),
        "-psk_identity".as_ref(),
        identity.as_ref(),
    ])
}

#[test]
fn rust_client_with_openssl_s_server() -> Result<()> {
    let mut server = s_server_psk("vm-7", &key(7))?;
    let tcp = TcpStream::connect(server.addr)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let mut s = psk::connect(tcp, "vm-7", &key(7))?;
    s.write_all(b"hello psk\n")?;
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line)?;
    assert_eq!(line.trim_end(), "ksp olleh");
    server.stop();
    Ok(())
}

#[test]
fn rust_client_with_wrong_psk_or_identity_fails_against_s_server() -> Result<()> {
    for (id, k) in [("vm-7", key(8)), ("vm-8", key(7))] {
        let mut server = s_server_psk("vm-7", &key(7))?;
        let tcp = TcpStream::connect(server.addr)?;
        tcp.set_read_timeout(Some(TIMEOUT))?;
        let r = psk::connect(tcp, id, &k);
        assert!(
            matches!(r, Err(caas_workload::Error::Handshake(_))),
            "{id}: {r:?}"
        );
        server.stop();
    }
    Ok(())
}

/// Runs `openssl s_client` with `-ign_eof`, sends `input`, and returns its stdout once the
/// server closes the connection.
fn s_client(addr: SocketAddr, identity: &str, k: &SecretBytes, input: &[u8]) -> Result<String> {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_3",
            "-ign_eof",
        ])
        .args(["-ciphersuites", psk::CIPHERSUITE])
        .args(["-psk", &hex::encode(k.expose()), "-psk_identity", identity])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("openssl s_client")?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("s_client did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    join(reader)
}

#[test]
fn openssl_s_client_with_rust_server() -> Result<()> {
    let (addr, h) = rust_server("vm-9", &key(9))?;
    let out = s_client(addr, "vm-9", &key(9), b"hi\n")?;
    assert_eq!(join(h)??, "hi");
    assert!(out.contains("pong:hi"), "{out}");
    // The external PSK was used ("Reused"), with an ephemeral X25519 exchange on top
    // (psk_dhe_ke: forward secrecy).
    assert!(
        out.contains("Reused, TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256"),
        "{out}"
    );
    assert!(out.contains("Server Temp Key: X25519"), "{out}");
    Ok(())
}

#[test]
fn openssl_s_client_with_wrong_psk_or_identity_is_rejected() -> Result<()> {
    for (id, k) in [("vm-9", key(10)), ("vm-10", key(9))] {
        let (addr, h) = rust_server("vm-9", &key(9))?;
        let out = s_client(addr, id, &k, b"hi\n")?;
        let s = join(h)?;
        assert!(
            matches!(s, Err(caas_workload::Error::Handshake(_))),
            "{id}: {s:?}"
        );
        assert!(!out.contains("pong"), "{out}");
    }
    Ok(())
}
