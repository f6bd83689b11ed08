//! TLS (NBD_OPT_STARTTLS, always mutual) against real clients: nbdcopy/nbdinfo (libnbd)
//! and qemu-img with x509 credentials. Certificates are made with the `openssl` command
//! line: a CA, a server certificate for "localhost" and a client certificate, plus an
//! unrelated CA for the wrong-CA cases.
//!
//! Note: libnbd 1.14 (Debian 12) does not verify the server certificate against
//! `tls-certificates=DIR` for `nbds+unix://` URIs in our runs (a wrong CA directory still
//! connects), so the wrong-CA check uses qemu-img, which verifies the chain and the
//! hostname (`tls-hostname=localhost`).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use caas_nbd::handshake as hs;
use caas_nbd::{opt, rep};
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::Duration;

struct Certs {
    /// DIR with ca-cert.pem of the CA that signed the server certificate, and a client
    /// certificate of that CA (client-cert.pem, client-key.pem).
    ca_dir: PathBuf,
    /// DIR with ca-cert.pem of an unrelated CA.
    wrong_ca_dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Proc::new("openssl").current_dir(dir).args(args));
}

fn make_certs(dir: &Path) -> Certs {
    require("openssl", "openssl");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_dir = dir.join("ca");
    let wrong_ca_dir = dir.join("wrong-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::create_dir_all(&wrong_ca_dir).unwrap();
    for (d, cn) in [(&ca_dir, "caas-test-ca"), (&wrong_ca_dir, "someone-else")] {
        let mut a = vec!["req", "-x509"];
        a.extend_from_slice(&ec);
        let subj = format!("/CN={cn}");
        let ca = d.join("ca-cert.pem");
        let cakey = d.join("ca-key.pem");
        a.extend_from_slice(&[
            "-keyout",
            cakey.to_str().unwrap(),
            "-out",
            ca.to_str().unwrap(),
            "-days",
            "2",
            "-subj",
            &subj,
        ]);
        openssl(dir, &a);
    }
    let mut a = vec!["req"];
    a.extend_from_slice(&ec);
    a.extend_from_slice(&[
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ca = ca_dir.join("ca-cert.pem");
    let cakey = ca_dir.join("ca-key.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            cakey.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            "server-cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    issue_client(dir, &ca_dir, "workload", &ca_dir);
    // The wrong-CA directory holds a good client certificate: the only thing wrong with
    // it is the CA it trusts for the server.
    issue_client(dir, &ca_dir, "wrong-ca-client", &wrong_ca_dir);
    Certs {
        ca_dir,
        wrong_ca_dir,
        cert: dir.join("server-cert.pem"),
        key: dir.join("server-key.pem"),
    }
}

fn tls_uri(srv: &Server, ca_dir: &Path) -> String {
    format!(
        "nbds+unix:///caas?socket={}&tls-certificates={}",
        srv.socket.display(),
        ca_dir.display()
    )
}

/// qemu-img info over TLS with x509 credentials from `ca_dir` (verifies chain + hostname).
fn qemu_info(srv: &Server, ca_dir: &Path) -> std::process::Output {
    Proc::new("qemu-img")
        .arg("info")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            ca_dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=caas,tls-creds=tls0,tls-hostname=localhost",
            srv.socket.display()
        ))
        .output()
        .unwrap()
}

fn start(dir: &Path, name: &str, certs: &Certs) -> (Server, PathBuf) {
    let key = key_file(dir);
    let vol = dir.join(format!("{name}.caasvol"));
    create_volume(&vol, &key, "16M");
    let args = vec![
        vol.to_str().unwrap().to_string(),
        "--key-file".into(),
        key.to_str().unwrap().into(),
        "--tls-cert".into(),
        certs.cert.to_str().unwrap().into(),
        "--tls-key".into(),
        certs.key.to_str().unwrap().into(),
        "--tls-client-ca".into(),
        certs.ca_dir.join("ca-cert.pem").to_str().unwrap().into(),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    (Server::start(dir, name, &a), vol)
}

/// nbdcopy a random image into the export over TLS and back out; the bytes match.
fn roundtrip(dir: &Path, uri: &str) {
    let raw = dir.join("image.raw");
    let data = random_file(&raw, 4 << 20);
    run(Proc::new("nbdcopy").arg(&raw).arg(uri));
    let back = dir.join("back.raw");
    run(Proc::new("nbdcopy").arg(uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert!(
        got[..data.len()] == data[..],
        "data differs after TLS round trip"
    );
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn tls_roundtrip_with_nbdcopy_and_qemu() {
    require("nbdcopy", "libnbd-bin");
    require("nbdinfo", "libnbd-bin");
    require("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (srv, _vol) = start(dir.path(), "opt", &certs);
    let uri = tls_uri(&srv, &certs.ca_dir);
    let info = run(Proc::new("nbdinfo").arg(&uri));
    assert!(info.contains("with TLS"), "{info}");
    roundtrip(dir.path(), &uri);
    // TLS is not optional: a plaintext client is not served.
    let out = Proc::new("nbdinfo").arg(srv.uri()).output().unwrap();
    assert!(!out.status.success(), "plaintext client was served");
    // qemu (GnuTLS, verifying the CA and the hostname) connects too.
    let out = qemu_info(&srv, &certs.ca_dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("16777216"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop();
}

#[test]
fn required_tls_refuses_plaintext_and_wrong_ca() {
    require("nbdcopy", "libnbd-bin");
    require("nbdinfo", "libnbd-bin");
    require("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (srv, _vol) = start(dir.path(), "req", &certs);

    // A plaintext client is refused cleanly.
    let out = Proc::new("nbdinfo").arg(srv.uri()).output().unwrap();
    assert!(!out.status.success(), "plaintext client was served");

    // At the protocol level: every option but STARTTLS/ABORT gets NBD_REP_ERR_TLS_REQD.
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; hs::GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    hs::parse_server_greeting(&g).unwrap();
    s.write_all(&hs::client_flags()).unwrap();
    let reply = |s: &mut UnixStream, option: u32, data: &[u8]| {
        let mut out = Vec::new();
        hs::encode_option(option, data, &mut out);
        s.write_all(&out).unwrap();
        let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let (o, typ, len) = hs::parse_option_reply_header(&h).unwrap();
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        assert_eq!(o, option);
        typ
    };
    let go = hs::encode_go_payload("", &[]);
    assert_eq!(reply(&mut s, opt::GO, &go), rep::ERR_TLS_REQD);
    assert_eq!(reply(&mut s, opt::INFO, &go), rep::ERR_TLS_REQD);
    assert_eq!(reply(&mut s, opt::LIST, &[]), rep::ERR_TLS_REQD);
    assert_eq!(reply(&mut s, opt::STRUCTURED_REPLY, &[]), rep::ERR_TLS_REQD);
    assert_eq!(reply(&mut s, opt::ABORT, &[]), rep::ACK);
    drop(s);

    // A client trusting another CA fails the TLS handshake.
    let out = qemu_info(&srv, &certs.wrong_ca_dir);
    assert!(!out.status.success(), "wrong CA accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("issuer") || err.contains("certificate"),
        "{err}"
    );
    // The right CA works, and the data round trip through TLS matches.
    let out = qemu_info(&srv, &certs.ca_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    roundtrip(dir.path(), &tls_uri(&srv, &certs.ca_dir));
    srv.stop();
}

#[test]
fn bad_tls_files_are_clear_errors_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let key = key_file(dir.path());
    let vol = dir.path().join("v.caasvol");
    create_volume(&vol, &key, "1M");
    let bad_key = dir.path().join("bad-key.pem");
    std::fs::write(
        &bad_key,
        "-----BEGIN PRIVATE KEY-----\nSECRETSECRET!!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let serve = |cert: &Path, tls_key: &Path| {
        Proc::new(BIN)
            .arg("serve")
            .arg(&vol)
            .arg("--key-file")
            .arg(&key)
            .arg("--socket")
            .arg(dir.path().join("x.sock"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(tls_key)
            .arg("--tls-client-ca")
            .arg(certs.ca_dir.join("ca-cert.pem"))
            .output()
            .unwrap()
    };
    for (cert, k, want) in [
        (&certs.cert, &bad_key, "bad-key.pem"),
        (&certs.cert, &certs.cert, "server-cert.pem"),
        (&certs.cert, &dir.path().join("missing.pem"), "missing.pem"),
        (&certs.key, &certs.key, "server-key.pem"),
    ] {
        let out = serve(cert, k);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "served with {cert:?} {k:?}");
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        assert!(!err.contains("BEGIN"), "{err}");
    }
    // --tls-key without --tls-cert is a usage error.
    let out = Proc::new(BIN)
        .arg("serve")
        .arg(&vol)
        .arg("--socket")
        .arg(dir.path().join("y.sock"))
        .arg("--tls-key")
        .arg(&certs.key)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A raw rustls client: STARTTLS, then a second STARTTLS is refused with ERR_INVALID,
/// then GO and a READ over TLS. Also: EXPORT_NAME before required TLS closes the
/// connection (the option has no error reply).
#[test]
fn raw_starttls_client_and_export_name_before_tls() {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (srv, _vol) = start(dir.path(), "raw", &certs);

    // EXPORT_NAME in the clear: the server closes.
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; hs::GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    let mut out = hs::client_flags().to_vec();
    hs::encode_option(opt::EXPORT_NAME, b"caas", &mut out);
    s.write_all(&out).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "server answered EXPORT_NAME before TLS");

    // STARTTLS.
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut g).unwrap();
    let mut out = hs::client_flags().to_vec();
    hs::encode_option(opt::STARTTLS, &[], &mut out);
    s.write_all(&out).unwrap();
    let read_reply = |s: &mut dyn Read| {
        let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let (o, typ, len) = hs::parse_option_reply_header(&h).unwrap();
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        (o, typ, d)
    };
    assert_eq!(read_reply(&mut s).1, rep::ACK);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.ca_dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        CertificateDer::pem_file_iter(certs.ca_dir.join("client-cert.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        rustls::pki_types::PrivateKeyDer::from_pem_file(certs.ca_dir.join("client-key.pem"))
            .unwrap(),
    )
    .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut t = rustls::StreamOwned::new(conn, s);
    let mut out = Vec::new();
    hs::encode_option(opt::STARTTLS, &[], &mut out);
    t.write_all(&out).unwrap();
    let (o, typ, _) = read_reply(&mut t);
    assert_eq!((o, typ), (opt::STARTTLS, rep::ERR_INVALID));
    assert_eq!(
        t.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut out = Vec::new();
    hs::encode_option(opt::GO, &hs::encode_go_payload("caas", &[]), &mut out);
    t.write_all(&out).unwrap();
    loop {
        let (_, typ, _) = read_reply(&mut t);
        if typ == rep::ACK {
            break;
        }
        assert_eq!(typ, rep::INFO);
    }
    let req = caas_nbd::transmission::Request {
        flags: 0,
        command: caas_nbd::transmission::Command::Read,
        cookie: 7,
        offset: 4096,
        length: 8192,
    };
    t.write_all(&req.encode()).unwrap();
    let mut h = [0u8; caas_nbd::transmission::SIMPLE_REPLY_LEN];
    t.read_exact(&mut h).unwrap();
    let r = caas_nbd::transmission::Reply::parse_simple(&h).unwrap();
    assert_eq!((r.cookie, r.error), (7, 0));
    let mut data = vec![1u8; 8192];
    t.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0), "fresh volume reads zeros");
    drop(t);
    srv.stop();
}

/// A client certificate for `cn` issued by the CA in `ca_dir`, in a qemu x509 credentials
/// directory `out` (with the server's CA to verify the server).
fn client_creds(dir: &Path, certs: &Certs, ca_dir: &Path, cn: &str, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(certs.ca_dir.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    issue_client(dir, ca_dir, cn, out);
}

/// `out/client-cert.pem` and `out/client-key.pem` for `cn`, issued by the CA in `ca_dir`.
fn issue_client(dir: &Path, ca_dir: &Path, cn: &str, out: &Path) {
    let key = out.join("client-key.pem");
    let csr = dir.join(format!("{cn}.csr"));
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let ext = dir.join("client-ext.cnf");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            ca_dir.join("ca-cert.pem").to_str().unwrap(),
            "-CAkey",
            ca_dir.join("ca-key.pem").to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            out.join("client-cert.pem").to_str().unwrap(),
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
}

/// NBD_OPT_STARTTLS, the TLS handshake with `cert`/`key` (trusting `ca` for the server),
/// then NBD_OPT_GO: `Ok` if the export was served.
fn rustls_client_attempt(sock: &Path, ca: &Path, cert: &Path, key: &Path) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    use std::sync::Arc;
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; hs::GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    let mut out = hs::client_flags().to_vec();
    hs::encode_option(opt::STARTTLS, &[], &mut out);
    s.write_all(&out).unwrap();
    let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let (_, typ, len) = hs::parse_option_reply_header(&h).unwrap();
    assert_eq!((typ, len), (rep::ACK, 0));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        PrivateKeyDer::from_pem_file(key).unwrap(),
    )
    .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut t = rustls::StreamOwned::new(conn, s);
    let mut out = Vec::new();
    hs::encode_option(opt::GO, &hs::encode_go_payload("caas", &[]), &mut out);
    t.write_all(&out).map_err(|e| e.to_string())?;
    let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
    t.read_exact(&mut h).map_err(|e| e.to_string())?;
    Ok(())
}

/// TLS is always mutual. A proxy offering TLS without a client CA does not start; a
/// network client without a certificate of the client CA (for a launch: the launch's own
/// CA) — none at all, or one of another CA — fails the handshake, which the proxy logs
/// and counts; plaintext is refused; the right client is served.
#[test]
fn tls_transport_without_client_certificate_is_refused() {
    require("qemu-img", "qemu-utils");
    require("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let key = key_file(dir.path());
    let vol = dir.path().join("mtls.caasvol");
    create_volume(&vol, &key, "16M");
    // TLS without client authentication is not a configuration the proxy accepts.
    let out = Proc::new(BIN)
        .arg("serve")
        .arg(&vol)
        .arg("--key-file")
        .arg(&key)
        .arg("--socket")
        .arg(dir.path().join("noca.sock"))
        .arg("--tls-cert")
        .arg(&certs.cert)
        .arg("--tls-key")
        .arg(&certs.key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served TLS without a client CA");
    assert!(err.contains("tls-client-ca"), "{err}");
    let (srv, _vol) = start(dir.path(), "mtls-srv", &certs);
    let other = dir.path().join("creds-other");
    client_creds(dir.path(), &certs, &certs.wrong_ca_dir, "co-tenant", &other);
    let none = dir.path().join("creds-none");
    std::fs::create_dir_all(&none).unwrap();
    std::fs::copy(certs.ca_dir.join("ca-cert.pem"), none.join("ca-cert.pem")).unwrap();
    // No client certificate (qemu, GnuTLS): refused.
    let out = qemu_info(&srv, &none);
    assert!(!out.status.success(), "no client certificate: served");
    // A certificate of another CA. qemu checks its own credentials against the CA it is
    // given and never connects with it, so a raw rustls client (which sends whatever it
    // has) plays the co-tenant: refused in the handshake.
    let r = rustls_client_attempt(
        &srv.socket,
        &certs.ca_dir.join("ca-cert.pem"),
        &other.join("client-cert.pem"),
        &other.join("client-key.pem"),
    );
    assert!(r.is_err(), "another CA's client certificate: served");
    // Plaintext: refused.
    let out = Proc::new("nbdinfo").arg(srv.uri()).output().unwrap();
    assert!(!out.status.success(), "plaintext client was served");
    // The right client is served.
    let out = qemu_info(&srv, &certs.ca_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both refusals were logged with their reason and counted.
    let log = srv.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NBD connection refused") && l.contains("TLS handshake failed"))
        .collect();
    assert!(
        refused.len() == 2 && refused[1].contains("refused=2"),
        "{log}"
    );
    srv.stop();
}
