//! The crypto domain as a separate machine: serving the VSM over TCP with mutual TLS, and
//! the module configured by a CAAS_PKCS11_CONFIG file (`tcp`, `tls_ca`, client certificate).
//! OpenSC pkcs11-tool generates and uses a key through it; a module without a client
//! certificate, or trusting another CA, gets an error (not a crash).

mod common;

use anyhow::{Result, ensure};
use common::*;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    ok(Command::new("openssl").current_dir(dir).args(args)).map(|_| ())
}

fn issue(dir: &Path, name: &str, ext: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}

#[test]
fn module_reaches_the_domain_over_mutual_tls() -> Result<()> {
    require("openssl", "openssl")?;
    require("pkcs11-tool", "opensc")?;
    let pki = tempfile::tempdir()?;
    let p = pki.path();
    openssl(
        p,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=caas-test-ca",
        ],
    )?;
    openssl(
        p,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other.pem",
            "-days",
            "1",
            "-subj",
            "/CN=other-ca",
        ],
    )?;
    issue(
        p,
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    issue(
        p,
        "client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let f = |n: &str| p.join(n).display().to_string();
    let dom = Dom::start_initialised(
        "tls",
        &[
            "--tcp",
            &addr,
            "--tls-cert",
            &f("server.pem"),
            "--tls-key",
            &f("server.key"),
            "--tls-client-ca",
            &f("ca.pem"),
        ],
    )?;
    let conf = |name: &str, body: String| -> Result<String> {
        let path = f(name);
        std::fs::write(&path, body)?;
        Ok(path)
    };
    let good = conf(
        "good.toml",
        format!(
            "tcp = \"{addr}\"\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"\ntls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n",
            f("ca.pem"),
            f("client.pem"),
            f("client.key")
        ),
    )?;
    let tool = |cfg: &str| -> Result<Command> {
        let mut c = Command::new("pkcs11-tool");
        c.env_remove("CAAS_PKCS11_SOCKET")
            .env("CAAS_PKCS11_CONFIG", cfg)
            .arg("--module")
            .arg(module()?);
        Ok(c)
    };
    let l = ok(tool(&good)?.arg("-L"))?;
    ensure!(l.contains("token label        : tls"), "{l}");
    ok(tool(&good)?.args([
        "--login",
        "--pin",
        USER_PIN,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--id",
        "07",
        "--label",
        "over-tls",
    ]))?;
    std::fs::write(p.join("data"), b"signed over TLS")?;
    ok(tool(&good)?.args([
        "--login",
        "--pin",
        USER_PIN,
        "--sign",
        "--id",
        "07",
        "-m",
        "ECDSA-SHA256",
        "-i",
        &f("data"),
        "-o",
        &f("sig"),
    ]))?;
    let v = ok(tool(&good)?.args([
        "--login",
        "--pin",
        USER_PIN,
        "--verify",
        "--id",
        "07",
        "-m",
        "ECDSA-SHA256",
        "-i",
        &f("data"),
        "--signature-file",
        &f("sig"),
    ]))?;
    ensure!(v.contains("Signature is valid"), "{v}");
    // The key is the same one the local socket sees: one domain, two transports.
    let local = ok(caas_tool(&dom)?.args(["--login", "--pin", USER_PIN, "-O"]))?;
    ensure!(local.contains("over-tls"), "{local}");

    let no_client_cert = conf(
        "nocert.toml",
        format!(
            "tcp = \"{addr}\"\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"\n",
            f("ca.pem")
        ),
    )?;
    let wrong_ca = conf(
        "wrongca.toml",
        format!(
            "tcp = \"{addr}\"\ntls_ca = \"{}\"\ntls_server_name = \"localhost\"\ntls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n",
            f("other.pem"),
            f("client.pem"),
            f("client.key")
        ),
    )?;
    for cfg in [no_client_cert, wrong_ca] {
        let out = run(tool(&cfg)?.arg("-L"))?;
        let text = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && text.contains("CKR_DEVICE_ERROR"),
            "{cfg}: {:?} {text}",
            out.status
        );
    }
    // The client without a certificate was refused in the handshake, before any frame,
    // and the refusal is in the domain's hash-chained audit log (as is the client that
    // refused the server's certificate).
    let audit = ok(std::process::Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args(["domc", "audit", "--state-dir"])
        .arg(dom.state_dir()))?;
    let refusals: Vec<&str> = audit
        .lines()
        .filter(|l| {
            l.contains("\"op\":\"Connect\"")
                && l.contains("tls: 127.0.0.1")
                && l.contains("\"rv\":\"0x200\"")
        })
        .collect();
    ensure!(
        refusals.len() >= 2
            && refusals
                .iter()
                .any(|l| l.contains("no certificate") || l.contains("CertificateRequired")),
        "{audit}"
    );
    Ok(())
}

/// The VSM's TCP+TLS listener authenticates its clients: `--tcp` without
/// `--tls-client-ca` (server-only TLS) is refused before anything starts.
#[test]
fn tcp_listener_needs_client_authentication() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args(["domc", "serve", "--ephemeral-key", "--tcp", "127.0.0.1:0"])
        .args(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--state-dir"])
        .arg(dir.path())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--tls-client-ca"),
        "{:?} {err}",
        out.status
    );
    Ok(())
}
