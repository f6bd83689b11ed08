//! Real third-party clients through libcaas_pkcs11.so: OpenSSL's pkcs11 engine (signing,
//! `openssl req -x509`, and a TLS server whose private key never leaves the crypto domain,
//! checked with `openssl s_client`), GnuTLS `p11tool --list-all`, and python-pkcs11.

mod common;

use anyhow::{Result, bail, ensure};
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ENGINE: &str = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so";

/// A domain with an RSA and an EC key pair (token objects) made by pkcs11-tool.
fn domain_with_keys(label: &str) -> Result<Dom> {
    require("pkcs11-tool", "opensc")?;
    let dom = Dom::start_initialised(label, &[])?;
    for (kt, id, name) in [
        ("RSA:2048", "01", "tls-rsa"),
        ("EC:prime256v1", "02", "tls-ec"),
    ] {
        ok(caas_tool(&dom)?.args([
            "--login",
            "--pin",
            USER_PIN,
            "--keypairgen",
            "--key-type",
            kt,
            "--id",
            id,
            "--label",
            name,
        ]))?;
    }
    Ok(dom)
}

fn openssl_conf(dir: &Path) -> Result<PathBuf> {
    require_file(ENGINE, "libengine-pkcs11-openssl")?;
    let p = dir.join("openssl.cnf");
    std::fs::write(
        &p,
        format!(
            "openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n[engine_section]\npkcs11 = pkcs11_section\n\
             [pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {ENGINE}\nMODULE_PATH = {}\nPIN = {USER_PIN}\ninit = 0\n",
            module()?.display()
        ),
    )?;
    Ok(p)
}

fn openssl(dom: &Dom, conf: &Path) -> Command {
    let mut c = Command::new("openssl");
    c.env("OPENSSL_CONF", conf)
        .env("CAAS_PKCS11_SOCKET", &dom.socket);
    c
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn openssl_engine_signs_issues_a_certificate_and_serves_tls_with_a_token_key() -> Result<()> {
    require("openssl", "openssl")?;
    let dom = domain_with_keys("openssl")?;
    let work = tempfile::tempdir()?;
    let w = |n: &str| work.path().join(n).display().to_string();
    let conf = openssl_conf(work.path())?;
    std::fs::write(w("data"), b"to be signed through the engine")?;
    ok(openssl(&dom, &conf).args([
        "dgst",
        "-engine",
        "pkcs11",
        "-keyform",
        "engine",
        "-sign",
        "pkcs11:object=tls-rsa;type=private",
        "-sha256",
        "-out",
        &w("sig"),
        &w("data"),
    ]))?;
    ok(caas_tool(&dom)?.args([
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        "01",
        "-o",
        &w("pub.der"),
    ]))?;
    let v = ok(Command::new("openssl").args([
        "dgst",
        "-sha256",
        "-keyform",
        "DER",
        "-verify",
        &w("pub.der"),
        "-signature",
        &w("sig"),
        &w("data"),
    ]))?;
    ensure!(v.contains("Verified OK"), "{v}");

    for (key, cert) in [("tls-ec", "ec.pem"), ("tls-rsa", "rsa.pem")] {
        let uri = format!("pkcs11:object={key};type=private");
        ok(openssl(&dom, &conf).args([
            "req",
            "-new",
            "-x509",
            "-days",
            "1",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-key",
            &uri,
            "-subj",
            "/CN=localhost",
            "-out",
            &w(cert),
        ]))?;
        let v = ok(Command::new("openssl").args(["verify", "-CAfile", &w(cert), &w(cert)]))?;
        ensure!(
            v.contains(": OK"),
            "self-signed certificate does not verify: {v}"
        );

        // TLS server with the token key; the client verifies the chain and completes the
        // handshake (the server's CertificateVerify is signed inside the crypto domain).
        let port = free_port()?;
        let mut server = openssl(&dom, &conf)
            .args([
                "s_server",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-key",
                &uri,
                "-cert",
                &w(cert),
                "-accept",
                &port.to_string(),
                "-naccept",
                "1",
                "-www",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = server.kill();
                bail!("s_server did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The probe connection above counts against -naccept; restart cleanly.
        let _ = server.kill();
        let _ = server.wait();
        let port = free_port()?;
        let mut server = openssl(&dom, &conf)
            .args([
                "s_server",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-key",
                &uri,
                "-cert",
                &w(cert),
                "-accept",
                &port.to_string(),
                "-naccept",
                "1",
                "-www",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(700));
        let mut client = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-CAfile",
                &w(cert),
                "-verify_return_error",
                "-servername",
                "localhost",
                "-ign_eof",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = client.stdin.take() {
            stdin.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        }
        let out = client.wait_with_output()?;
        let _ = server.kill();
        let _ = server.wait();
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("Verify return code: 0 (ok)"),
            "TLS handshake with {key} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            text.contains("HTTP/1.0 200 ok"),
            "no HTTP response over TLS with {key}:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn gnutls_p11tool_lists_the_token_objects() -> Result<()> {
    require("p11tool", "gnutls-bin")?;
    let dom = domain_with_keys("gnutls")?;
    let out = ok(Command::new("p11tool")
        .env("CAAS_PKCS11_SOCKET", &dom.socket)
        .env("GNUTLS_PIN", USER_PIN)
        .arg(format!("--provider={}", module()?.display()))
        .args(["--login", "--list-all", "pkcs11:token=gnutls"]))?;
    for label in ["tls-rsa", "tls-ec"] {
        ensure!(
            out.contains(&format!("object={label}")),
            "p11tool did not list {label}:\n{out}"
        );
    }
    ensure!(
        out.contains("Type: Private key"),
        "no private keys listed:\n{out}"
    );
    Ok(())
}

#[test]
fn python_pkcs11_generates_keys_signs_and_encrypts() -> Result<()> {
    // The repo's .venv (scripts/install-deps), resolved to a real path so Python finds its
    // pyvenv.cfg; else whatever python3 is on PATH.
    let venv = std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin"))
        .map(|d| d.join("python"))
        .ok()
        .filter(|p| p.exists());
    let python = venv.unwrap_or_else(|| PathBuf::from("python3"));
    let probe = run(Command::new(&python).args(["-c", "import pkcs11"]))?;
    if !probe.status.success() {
        bail!(
            "python-pkcs11 is required: scripts/install-deps installs .ci/requirements.txt into .venv (pip install python-pkcs11)"
        );
    }
    let dom = Dom::start_initialised("python", &[])?;
    let script = r#"
import os, sys, pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label='python')
with token.open(user_pin=sys.argv[2], rw=True) as s:
    pub, priv = s.generate_keypair(KeyType.RSA, 2048, label='py-rsa', store=True)
    sig = priv.sign(b'python data', mechanism=Mechanism.SHA256_RSA_PKCS)
    assert pub.verify(b'python data', sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    assert not pub.verify(b'other data', sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    key = s.generate_key(KeyType.AES, 256, label='py-aes')
    iv = s.generate_random(128)
    ct = key.encrypt(b'secret payload', mechanism_param=iv)
    assert key.decrypt(ct, mechanism_param=iv) == b'secret payload'
    # SoftHSM2-parity mechanisms with their SP 800-38A / RFC 4493 / RFC 4231 known answers.
    A = pkcs11.Attribute
    k = s.create_object({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                         A.VALUE: bytes.fromhex('2b7e151628aed2a6abf7158809cf4f3c'),
                         A.ENCRYPT: True, A.DECRYPT: True, A.SIGN: True, A.VERIFY: True})
    pt = bytes.fromhex('6bc1bee22e409f96e93d7e117393172a')
    assert k.encrypt(pt, mechanism=Mechanism.AES_ECB).hex() == '3ad77bb40d7a3660a89ecaf32466ef97'
    iv = bytes(range(16))
    ct = k.encrypt(pt, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    assert ct.hex() == '7649abac8119b246cee98e9b12e9197d', ct.hex()
    assert k.decrypt(ct, mechanism=Mechanism.AES_CBC, mechanism_param=iv) == pt
    tag = k.sign(pt, mechanism=Mechanism.AES_CMAC)
    assert tag.hex() == '070a16b46b4d4144f79bdd9dd04a287c', tag.hex()
    assert k.verify(pt, tag, mechanism=Mechanism.AES_CMAC)
    hk = s.create_object({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.GENERIC_SECRET,
                          A.VALUE: b'Jefe', A.SIGN: True, A.VERIFY: True})
    mac = hk.sign(b'what do ya want for nothing?', mechanism=Mechanism.SHA224_HMAC)
    assert mac.hex() == 'a30e01098bc6dbbf45690f3a7e9e6d0f8bbea2a39e6148008fd05e44', mac.hex()
    try:
        s.seed_random(b'seed')
        raise AssertionError('C_SeedRandom accepted')
    except pkcs11.exceptions.RandomSeedNotSupported:
        pass
    found = [o.label for o in s.get_objects({pkcs11.Attribute.CLASS: ObjectClass.PRIVATE_KEY})]
    assert 'py-rsa' in found, found
print('python-pkcs11 OK')
"#;
    let out = ok(Command::new(&python)
        .env("CAAS_PKCS11_SOCKET", &dom.socket)
        .args(["-c", script])
        .arg(module()?)
        .arg(USER_PIN))?;
    ensure!(out.contains("python-pkcs11 OK"), "{out}");
    Ok(())
}
