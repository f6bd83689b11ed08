//! Conformance as OpenSSL 3 applications see it: the real `openssl` CLI with the
//! pkcs11-provider (`-provider default -provider pkcs11`, `PKCS11_PROVIDER_MODULE` =
//! libcaas_pkcs11.so) against a live crypto domain. Keys are made inside the domain
//! (`C_GenerateKeyPair` over the VSM protocol, token objects) and used through `pkcs11:`
//! URIs: public-key export, signatures (RSA PKCS#1 v1.5 and PSS, ECDSA P-256/P-384, Ed25519,
//! Ed448) checked by plain OpenSSL with the exported key, RSA encryption, ECDH compared
//! with a local derive, a TLS server (1.3 and 1.2), CMS signing and decryption (RSA and
//! ECDH with the X9.63 KDF in the domain), a demo CA, a forking process, the
//! provider's random generator, and a wrong PIN / missing key refused.
//!
//! Needs the Debian package `pkcs11-provider` (Debian 12: from bookworm-backports, version
//! 1.0; `scripts/install-deps` installs it). Provider 1.0 has no X25519/X448 key management,
//! so X25519 through the provider is covered by the upstream suite's `ecxc` test
//! (`tests/pkcs11-provider/README.md`, provider 1.2) and by `mech_parity.rs` here.

mod common;

use anyhow::{Context, Result, bail, ensure};
use caas_domc::client::Client;
use caas_vsm_proto::{Attr, Blob, Body, MechParam, Mechanism, Request, Secret, attr};
use common::*;
use cryptoki_sys::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's pkcs11-provider puts the provider (OpenSSL's MODULESDIR).
const PROVIDER: &str = "/usr/lib/x86_64-linux-gnu/ossl-modules/pkcs11.so";

fn require_provider() -> Result<()> {
    require("openssl", "openssl")?;
    if !Path::new(PROVIDER).exists() {
        bail!(
            "{PROVIDER} is missing: install pkcs11-provider (the OpenSSL 3 provider; Debian 12 \
             has it in bookworm-backports: run scripts/install-deps, which enables that suite \
             for this one package)"
        );
    }
    Ok(())
}

/// A key made in the domain: label (= `object=` in the URI) and kind.
#[derive(Clone, Copy)]
enum Key {
    Rsa(&'static str, u64),
    Ec(&'static str, &'static [u8]),
    Ed25519(&'static str),
    Ed448(&'static str),
}

impl Key {
    fn label(self) -> &'static str {
        match self {
            Key::Rsa(l, _) | Key::Ec(l, _) | Key::Ed25519(l) | Key::Ed448(l) => l,
        }
    }
}

const RSA: Key = Key::Rsa("rsa2048", 2048);
const RSA3072: Key = Key::Rsa("rsa3072", 3072);
const P256: Key = Key::Ec("p256", caas_domc::der::OID_P256);
const P384: Key = Key::Ec("p384", caas_domc::der::OID_P384);
const ED25519: Key = Key::Ed25519("ed25519");
const ED448: Key = Key::Ed448("ed448");

/// A domain with keys, a work dir, and the `openssl` command line wired to the provider.
struct Prov {
    dom: Dom,
    work: tempfile::TempDir,
}

fn call(c: &mut Client, req: Request) -> Result<Body> {
    c.call(req).map_err(|e| anyhow::anyhow!("{e:?}"))
}

impl Prov {
    fn new(label: &str, keys: &[Key]) -> Result<Self> {
        require_provider()?;
        let dom = Dom::start_initialised(label, &[])?;
        let mut c = Client::connect(&dom.socket).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let session = match call(
            &mut c,
            Request::OpenSession {
                slot: 0,
                flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
            },
        )? {
            Body::Ulong { value } => value,
            b => bail!("OpenSession: {b:?}"),
        };
        call(
            &mut c,
            Request::Login {
                session,
                user_type: CKU_USER,
                pin: Secret::new(USER_PIN.as_bytes().to_vec()),
            },
        )?;
        let a = |ty, v: Vec<u8>| Attr { ty, value: Blob(v) };
        let t = || attr::boolean(true);
        for (i, k) in keys.iter().enumerate() {
            let id = vec![0xca, i as u8 + 1];
            let label = k.label().as_bytes().to_vec();
            let mut public = vec![
                a(CKA_TOKEN, t()),
                a(CKA_ID, id.clone()),
                a(CKA_LABEL, label.clone()),
                a(CKA_VERIFY, t()),
            ];
            let mut private = vec![
                a(CKA_TOKEN, t()),
                a(CKA_PRIVATE, t()),
                a(CKA_SENSITIVE, t()),
                a(CKA_ID, id),
                a(CKA_LABEL, label),
                a(CKA_SIGN, t()),
            ];
            let mechanism = match *k {
                Key::Rsa(_, bits) => {
                    public.push(a(CKA_MODULUS_BITS, attr::ulong(bits)));
                    public.push(a(CKA_PUBLIC_EXPONENT, vec![1, 0, 1]));
                    public.push(a(CKA_ENCRYPT, t()));
                    private.push(a(CKA_DECRYPT, t()));
                    CKM_RSA_PKCS_KEY_PAIR_GEN
                }
                Key::Ec(_, oid) => {
                    public.push(a(CKA_EC_PARAMS, oid.to_vec()));
                    private.push(a(CKA_DERIVE, t()));
                    CKM_EC_KEY_PAIR_GEN
                }
                Key::Ed25519(_) => {
                    public.push(a(CKA_EC_PARAMS, caas_domc::der::OID_ED25519.to_vec()));
                    CKM_EC_EDWARDS_KEY_PAIR_GEN
                }
                Key::Ed448(_) => {
                    public.push(a(CKA_EC_PARAMS, caas_domc::der::OID_ED448.to_vec()));
                    CKM_EC_EDWARDS_KEY_PAIR_GEN
                }
            };
            match call(
                &mut c,
                Request::GenerateKeyPair {
                    session,
                    mechanism: Mechanism {
                        mechanism,
                        param: MechParam::None {},
                    },
                    public_template: public,
                    private_template: private,
                },
            )? {
                Body::KeyPair { .. } => {}
                b => bail!("GenerateKeyPair {}: {b:?}", k.label()),
            }
        }
        call(&mut c, Request::CloseSession { session })?;
        Ok(Self {
            dom,
            work: tempfile::tempdir()?,
        })
    }

    /// A path in the work dir.
    fn p(&self, name: &str) -> String {
        self.work.path().join(name).display().to_string()
    }

    /// `openssl SUB -provider default -provider pkcs11` reaching this domain. The default
    /// provider comes first (as in the upstream suite's openssl.cnf): with pkcs11 first,
    /// OpenSSL 3.0 also fetches plain digests from the token, and a TLS handshake hash must
    /// then be duplicated mid-operation (`C_GetOperationState`, served by neither caas nor
    /// SoftHSM2; SoftHSM2, itself built on OpenSSL, even deadlocks in that setup). Key
    /// operations go to the provider that holds the key either way.
    fn ossl(&self, sub: &str) -> Result<Command> {
        let mut c = Command::new("openssl");
        c.arg(sub)
            .args(["-provider", "default", "-provider", "pkcs11"])
            .env("PKCS11_PROVIDER_MODULE", module()?)
            .env("CAAS_PKCS11_SOCKET", &self.dom.socket)
            .current_dir(self.work.path());
        Ok(c)
    }

    /// Exports the public key of `k` through the provider (PEM file `LABEL.pub`).
    fn export_pub(&self, k: Key) -> Result<String> {
        let out = self.p(&format!("{}.pub", k.label()));
        ok(self
            .ossl("pkey")?
            .args(["-pubin", "-in", &pub_uri(k), "-pubout", "-out", &out]))?;
        Ok(out)
    }

    /// A self-signed certificate for `k` made through the provider (CN=localhost).
    fn self_signed(&self, k: Key, name: &str) -> Result<String> {
        let out = self.p(name);
        ok(self.ossl("req")?.args([
            "-new",
            "-x509",
            "-days",
            "2",
            "-key",
            &priv_uri(k),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-out",
            &out,
        ]))?;
        Ok(out)
    }
}

fn priv_uri(k: Key) -> String {
    format!(
        "pkcs11:object={};type=private?pin-value={USER_PIN}",
        k.label()
    )
}

fn pub_uri(k: Key) -> String {
    format!("pkcs11:object={};type=public", k.label())
}

/// Plain OpenSSL (default provider only, no token).
fn plain(sub: &str) -> Command {
    let mut c = Command::new("openssl");
    c.arg(sub);
    c
}

/// Runs `cmd`, expecting failure; returns its output.
fn fails(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!out.status.success(), "{cmd:?} should have failed:\n{text}");
    Ok(text)
}

/// Signing options per key type for `pkeyutl -sign/-verify -rawin`.
fn sign_opts(k: Key, pss: bool) -> Vec<&'static str> {
    match k {
        Key::Rsa(..) if pss => vec![
            "-digest",
            "sha256",
            "-pkeyopt",
            "rsa_padding_mode:pss",
            "-pkeyopt",
            "rsa_pss_saltlen:digest",
        ],
        Key::Rsa(..) => vec!["-digest", "sha256", "-pkeyopt", "rsa_padding_mode:pkcs1"],
        Key::Ec(_, oid) if oid == caas_domc::der::OID_P384 => vec!["-digest", "sha384"],
        Key::Ec(..) => vec!["-digest", "sha256"],
        Key::Ed25519(_) | Key::Ed448(_) => vec![],
    }
}

#[test]
fn provider_exports_the_public_key_of_every_key_type_made_in_the_vsm() -> Result<()> {
    let keys = [RSA, RSA3072, P256, P384, ED25519, ED448];
    let p = Prov::new("pubkeys", &keys)?;
    for (k, want) in keys.iter().zip([
        "Public-Key: (2048 bit)",
        "Public-Key: (3072 bit)",
        "NIST CURVE: P-256",
        "NIST CURVE: P-384",
        "ED25519 Public-Key",
        "ED448 Public-Key",
    ]) {
        let pem = p.export_pub(*k)?;
        // Plain OpenSSL parses what the provider exported, as the right key type.
        let text = ok(plain("pkey").args(["-pubin", "-in", &pem, "-noout", "-text"]))?;
        ensure!(
            text.contains(want),
            "{}: want {want:?} in {text}",
            k.label()
        );
        // The private key's URI yields the same public key (compared as DER: provider 1.0
        // writes an RSA key reached that way as PKCS#1 "RSA PUBLIC KEY").
        let from_priv = p.p(&format!("{}.from-priv.pem", k.label()));
        ok(p.ossl("pkey")?
            .args(["-in", &priv_uri(*k), "-pubout", "-out", &from_priv]))?;
        let der = |f: &str| -> Result<Vec<u8>> {
            let out = run(plain("pkey").args(["-pubin", "-in", f, "-outform", "DER"]))?;
            ensure!(
                out.status.success() && !out.stdout.is_empty(),
                "{f}: not a public key"
            );
            Ok(out.stdout)
        };
        ensure!(
            der(&from_priv)? == der(&pem)?,
            "{}: public key from the private key's URI differs",
            k.label()
        );
        // And no private key material leaves through the private key's URI.
        let export = run(p.ossl("pkey")?.args(["-in", &priv_uri(*k)]))?;
        let text = String::from_utf8_lossy(&export.stdout);
        ensure!(
            !text.contains("PRIVATE KEY-----"),
            "{}: the provider exported a private key:\n{text}",
            k.label()
        );
    }
    Ok(())
}

#[test]
fn provider_signs_with_vsm_keys_and_plain_openssl_verifies() -> Result<()> {
    let keys = [RSA, P256, P384, ED25519, ED448];
    let p = Prov::new("sign", &keys)?;
    std::fs::write(
        p.p("data"),
        b"signed inside the crypto domain through the provider",
    )?;
    std::fs::write(
        p.p("tampered"),
        b"signed inside the crypto domain through the provideR",
    )?;
    let mut cases: Vec<(Key, bool)> = keys.iter().map(|k| (*k, false)).collect();
    cases.push((RSA, true));
    for (k, pss) in cases {
        let what = format!("{}{}", k.label(), if pss { " PSS" } else { "" });
        let pem = p.export_pub(k)?;
        let sig = p.p(&format!("{}{}.sig", k.label(), pss));
        ok(p.ossl("pkeyutl")?
            .args([
                "-sign",
                "-rawin",
                "-inkey",
                &priv_uri(k),
                "-in",
                "data",
                "-out",
                &sig,
            ])
            .args(sign_opts(k, pss)))
        .with_context(|| what.clone())?;
        ensure!(
            std::fs::metadata(&sig)?.len() > 0,
            "{what}: empty signature"
        );
        // Plain OpenSSL with the exported public key.
        let v = ok(plain("pkeyutl")
            .args([
                "-verify", "-rawin", "-pubin", "-inkey", &pem, "-sigfile", &sig,
            ])
            .args(["-in", &p.p("data")])
            .args(sign_opts(k, pss)))
        .with_context(|| what.clone())?;
        ensure!(v.contains("Signature Verified Successfully"), "{what}: {v}");
        // Verification through the provider with the token's public key object.
        let v = ok(p
            .ossl("pkeyutl")?
            .args([
                "-verify",
                "-rawin",
                "-pubin",
                "-inkey",
                &pub_uri(k),
                "-sigfile",
                &sig,
            ])
            .args(["-in", "data"])
            .args(sign_opts(k, pss)))
        .with_context(|| what.clone())?;
        ensure!(v.contains("Signature Verified Successfully"), "{what}: {v}");
        // Other data does not verify (the signature binds the data).
        let bad = fails(
            plain("pkeyutl")
                .args([
                    "-verify", "-rawin", "-pubin", "-inkey", &pem, "-sigfile", &sig,
                ])
                .args(["-in", &p.p("tampered")])
                .args(sign_opts(k, pss)),
        )?;
        ensure!(
            bad.contains("Signature Verification Failure"),
            "{what}: {bad}"
        );
    }
    // A PSS signature is not a PKCS#1 v1.5 one (the padding really was PSS).
    fails(
        plain("pkeyutl")
            .args(["-verify", "-rawin", "-pubin", "-inkey", &p.p("rsa2048.pub")])
            .args(["-sigfile", &p.p("rsa2048true.sig"), "-in", &p.p("data")])
            .args(sign_opts(RSA, false)),
    )?;
    Ok(())
}

#[test]
fn provider_decrypts_in_the_vsm_what_plain_openssl_encrypted() -> Result<()> {
    let p = Prov::new("rsaenc", &[RSA])?;
    let pem = p.export_pub(RSA)?;
    let secret = b"a session key for the crypto domain".as_slice();
    std::fs::write(p.p("plain"), secret)?;
    for pad in [
        vec!["-pkeyopt", "rsa_padding_mode:pkcs1"],
        // The provider passes the OAEP hash and MGF only when they are given (without them
        // it sends hashAlg 0, which a token must refuse), so both are named.
        vec![
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha1",
            "-pkeyopt",
            "rsa_mgf1_md:sha1",
        ],
        vec![
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ],
    ] {
        let what = pad.join(" ");
        // Encrypted by plain OpenSSL with the exported key, decrypted inside the domain.
        ok(plain("pkeyutl")
            .args(["-encrypt", "-pubin", "-inkey", &pem, "-in", &p.p("plain")])
            .args(["-out", &p.p("ct")])
            .args(&pad))?;
        ok(p.ossl("pkeyutl")?
            .args([
                "-decrypt",
                "-inkey",
                &priv_uri(RSA),
                "-in",
                "ct",
                "-out",
                "pt",
            ])
            .args(&pad))
        .with_context(|| what.clone())?;
        ensure!(
            std::fs::read(p.p("pt"))? == secret,
            "{what}: wrong plaintext"
        );
        // Encrypted through the provider with the token's public key object, too.
        ok(p.ossl("pkeyutl")?
            .args([
                "-encrypt",
                "-pubin",
                "-inkey",
                &pub_uri(RSA),
                "-in",
                "plain",
            ])
            .args(["-out", "ct2"])
            .args(&pad))
        .with_context(|| what.clone())?;
        ok(p.ossl("pkeyutl")?
            .args([
                "-decrypt",
                "-inkey",
                &priv_uri(RSA),
                "-in",
                "ct2",
                "-out",
                "pt2",
            ])
            .args(&pad))
        .with_context(|| what.clone())?;
        ensure!(
            std::fs::read(p.p("pt2"))? == secret,
            "{what}: wrong plaintext"
        );
    }
    // A corrupted ciphertext is refused, not "decrypted" to something.
    let mut ct = std::fs::read(p.p("ct"))?;
    ct[10] ^= 0x40;
    std::fs::write(p.p("ct"), ct)?;
    fails(p.ossl("pkeyutl")?.args([
        "-decrypt",
        "-inkey",
        &priv_uri(RSA),
        "-in",
        "ct",
        "-out",
        "pt3",
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
    ]))?;
    Ok(())
}

#[test]
fn provider_ecdh_derives_the_secret_a_local_derive_gets() -> Result<()> {
    let p = Prov::new("ecdh", &[P256, P384])?;
    for (k, curve) in [(P256, "P-256"), (P384, "P-384")] {
        let vsm_pub = p.export_pub(k)?;
        let peer = p.p(&format!("peer-{curve}.key"));
        let peer_pub = p.p(&format!("peer-{curve}.pub"));
        ok(plain("genpkey").args([
            "-algorithm",
            "EC",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
            "-out",
            &peer,
        ]))?;
        ok(plain("pkey").args(["-in", &peer, "-pubout", "-out", &peer_pub]))?;
        // Inside the domain: the VSM key with the peer's public key.
        ok(p.ossl("pkeyutl")?.args([
            "-derive",
            "-inkey",
            &priv_uri(k),
            "-peerkey",
            &peer_pub,
            "-out",
            "z-vsm",
        ]))?;
        // Locally: the peer's key with the VSM key's public key.
        ok(plain("pkeyutl").args([
            "-derive",
            "-inkey",
            &peer,
            "-peerkey",
            &vsm_pub,
            "-out",
            &p.p("z-local"),
        ]))?;
        let (a, b) = (std::fs::read(p.p("z-vsm"))?, std::fs::read(p.p("z-local"))?);
        ensure!(a.len() >= 32, "{curve}: short secret ({} bytes)", a.len());
        ensure!(
            a == b,
            "{curve}: the domain's ECDH secret differs from the local one"
        );
    }
    Ok(())
}

/// An `openssl s_server`, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `s_server` with the VSM key `k` and certificate `cert`; waits for the port.
fn tls_server(p: &Prov, k: Key, cert: &str, proto: &str) -> Result<(Server, u16)> {
    let port = free_port()?;
    let child = p
        .ossl("s_server")?
        .args(["-key", &priv_uri(k), "-cert", cert, "-accept"])
        .arg(port.to_string())
        .args([proto, "-www", "-quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Server(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("s_server with {} did not start", k.label());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((server, port))
}

/// `s_client` verifying `ca` and sending an HTTP request; returns its output.
fn tls_client(port: u16, ca: &str, proto: &str) -> Result<String> {
    let mut client = plain("s_client")
        .args(["-connect", &format!("127.0.0.1:{port}"), "-CAfile", ca])
        .args(["-verify_return_error", "-verify_hostname", "localhost"])
        .args(["-servername", "localhost", proto, "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    client
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let out = client.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "s_client failed:\n{text}");
    Ok(text)
}

#[test]
fn provider_tls_server_with_the_key_in_the_vsm_tls13_and_tls12() -> Result<()> {
    let p = Prov::new("tls", &[RSA, P256, ED25519])?;
    for (k, protos) in [
        (P256, &["-tls1_3", "-tls1_2"][..]),
        (RSA, &["-tls1_3", "-tls1_2"][..]),
        (ED25519, &["-tls1_3"][..]),
    ] {
        let cert = p.self_signed(k, &format!("{}.crt", k.label()))?;
        for proto in protos {
            let (_server, port) = tls_server(&p, k, &cert, proto)?;
            let text = tls_client(port, &cert, proto)?;
            let what = format!("{} {proto}", k.label());
            let version = if *proto == "-tls1_3" {
                "TLSv1.3"
            } else {
                "TLSv1.2"
            };
            ensure!(
                text.contains(&format!("New, {version}, Cipher is")),
                "{what}: not a {version} session:\n{text}"
            );
            ensure!(
                text.contains("Verify return code: 0 (ok)"),
                "{what}: chain not verified:\n{text}"
            );
            ensure!(
                text.contains("HTTP/1.0 200 ok"),
                "{what}: no HTTP answer:\n{text}"
            );
        }
    }
    // A client that trusts another certificate refuses the server.
    let other = p.p("other.crt");
    ok(plain("req").args([
        "-new",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p.p("other.key"),
        "-subj",
        "/CN=localhost",
        "-out",
        &other,
    ]))?;
    let (_server, port) = tls_server(&p, P256, &p.p("p256.crt"), "-tls1_3")?;
    ensure!(
        tls_client(port, &other, "-tls1_3").is_err(),
        "a client trusting another certificate accepted the server"
    );
    Ok(())
}

#[test]
fn provider_cms_signs_with_a_vsm_key_and_plain_openssl_verifies() -> Result<()> {
    let p = Prov::new("cms", &[RSA, P256])?;
    std::fs::write(
        p.p("msg"),
        b"a CMS message signed inside the crypto domain\n",
    )?;
    std::fs::write(
        p.p("msg2"),
        b"a CMS message signed inside the crypto domain!\n",
    )?;
    for k in [RSA, P256] {
        let cert = p.self_signed(k, &format!("{}.crt", k.label()))?;
        let sig = format!("{}.cms", k.label());
        ok(p.ossl("cms")?.args([
            "-sign",
            "-binary",
            "-in",
            "msg",
            "-signer",
            &cert,
            "-inkey",
            &priv_uri(k),
            "-outform",
            "DER",
            "-out",
            &sig,
        ]))?;
        let out = p.p(&format!("{}.out", k.label()));
        ok(plain("cms").args([
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            &p.p(&sig),
            "-content",
            &p.p("msg"),
            "-CAfile",
            &cert,
            "-purpose",
            "any",
            "-out",
            &out,
        ]))?;
        ensure!(
            std::fs::read(&out)? == std::fs::read(p.p("msg"))?,
            "{}: verified content differs",
            k.label()
        );
        let bad = fails(plain("cms").args([
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            &p.p(&sig),
            "-content",
            &p.p("msg2"),
            "-CAfile",
            &cert,
            "-purpose",
            "any",
            "-out",
            &p.p("bad.out"),
        ]))?;
        ensure!(
            bad.contains("Verification failure") || bad.contains("digest failure"),
            "{}: {bad}",
            k.label()
        );
    }
    Ok(())
}

#[test]
fn provider_cms_decrypts_in_the_vsm_what_plain_openssl_encrypted() -> Result<()> {
    // RSA key transport and ECDH key agreement (X9.63 KDF inside the domain).
    let p = Prov::new("cmsenc", &[RSA, P256])?;
    let msg = b"a CMS message for the key in the crypto domain\n";
    std::fs::write(p.p("msg"), msg)?;
    for k in [RSA, P256] {
        let what = k.label();
        let cert = p.self_signed(k, &format!("{what}.crt"))?;
        let enc = p.p(&format!("{what}.enc"));
        ok(plain("cms")
            .args(["-encrypt", "-binary", "-aes-256-cbc", "-in", &p.p("msg")])
            .args(["-recip", &cert, "-out", &enc]))?;
        let dec = format!("{what}.dec");
        ok(p.ossl("cms")?
            .args(["-decrypt", "-binary", "-in", &enc, "-recip", &cert])
            .args(["-inkey", &priv_uri(k), "-out", &dec]))
        .with_context(|| what.to_string())?;
        ensure!(std::fs::read(p.p(&dec))? == msg, "{what}: wrong plaintext");
    }
    Ok(())
}

#[test]
fn provider_demo_ca_with_vsm_keys_issues_a_certificate_that_verifies() -> Result<()> {
    let p = Prov::new("democa", &[P384, RSA])?;
    let ca = P384;
    ok(p.ossl("req")?.args([
        "-new",
        "-x509",
        "-days",
        "30",
        "-key",
        &priv_uri(ca),
        "-subj",
        "/O=caas/CN=caas demo CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "ca.crt",
    ]))?;
    // The leaf's key is in the VSM too; its CSR is signed there.
    ok(p.ossl("req")?.args([
        "-new",
        "-key",
        &priv_uri(RSA),
        "-subj",
        "/O=caas/CN=leaf.example",
        "-out",
        "leaf.csr",
    ]))?;
    let v = ok(plain("req").args(["-verify", "-noout", "-in", &p.p("leaf.csr")]))?;
    ensure!(v.contains("verify OK"), "CSR self-signature: {v}");
    std::fs::write(
        p.p("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:leaf.example\n",
    )?;
    ok(p.ossl("x509")?.args([
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        &priv_uri(ca),
        "-CAserial",
        "ca.srl",
        "-CAcreateserial",
        "-days",
        "7",
        "-sha384",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.crt",
    ]))?;
    let v = ok(plain("verify").args([
        "-CAfile",
        &p.p("ca.crt"),
        "-purpose",
        "sslserver",
        &p.p("leaf.crt"),
    ]))?;
    ensure!(v.contains("leaf.crt: OK"), "chain: {v}");
    let text = ok(plain("x509").args(["-in", &p.p("leaf.crt"), "-noout", "-text"]))?;
    ensure!(
        text.contains("Issuer: O = caas, CN = caas demo CA") && text.contains("ecdsa-with-SHA384"),
        "leaf certificate: {text}"
    );
    // Against another CA with the same name (key outside the VSM), the chain fails.
    ok(plain("req").args([
        "-new",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-nodes",
        "-keyout",
        &p.p("fake.key"),
        "-subj",
        "/O=caas/CN=caas demo CA",
        "-out",
        &p.p("fake.crt"),
    ]))?;
    fails(plain("verify").args(["-CAfile", &p.p("fake.crt"), &p.p("leaf.crt")]))?;
    Ok(())
}

#[test]
fn provider_process_forks_and_signs_in_parent_and_child() -> Result<()> {
    require("cc", "build-essential")?;
    require_file("/usr/include/openssl/provider.h", "libssl-dev")?;
    let p = Prov::new("fork", &[P256])?;
    let pem = p.export_pub(P256)?;
    let exe = p.p("fork");
    ok(Command::new("cc")
        .args(["-Wall", "-O1", "-o", &exe])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openssl_provider_fork.c"
        ))
        .arg("-lcrypto"))?;
    let out = run(Command::new(&exe)
        .arg(priv_uri(P256))
        .arg(&pem)
        .env("PKCS11_PROVIDER_MODULE", module()?)
        .env("CAAS_PKCS11_SOCKET", &p.dom.socket))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    ensure!(
        out.status.success()
            && text.contains("parent: signature verified")
            && text.contains("child: signature verified")
            && text.contains("parent after fork: signature verified"),
        "fork test failed ({}):\n{text}",
        out.status
    );
    Ok(())
}

/// An openssl.cnf that loads the provider early and makes its PKCS11-RAND the default
/// random generator (as the upstream suite's `rand` test does).
fn rand_conf(p: &Prov) -> Result<PathBuf> {
    let conf = p.work.path().join("rand.cnf");
    std::fs::write(
        &conf,
        format!(
            "openssl_conf = init\n[init]\nproviders = prov\nrandom = random\n\
             [prov]\ndefault = default_sect\npkcs11 = pkcs11_sect\n\
             [default_sect]\nactivate = 1\n\
             [pkcs11_sect]\nmodule = {PROVIDER}\npkcs11-module-path = {}\n\
             pkcs11-module-load-behavior = early\nactivate = 1\n\
             [random]\nrandom = PKCS11-RAND\n",
            module()?.display()
        ),
    )?;
    Ok(conf)
}

#[test]
fn provider_random_comes_from_the_vsm() -> Result<()> {
    let mut p = Prov::new("rand", &[])?;
    let conf = rand_conf(&p)?;
    let rand = |p: &Prov| {
        let mut c = Command::new("openssl");
        c.args(["rand", "-hex", "32"])
            .env("OPENSSL_CONF", &conf)
            .env("CAAS_PKCS11_SOCKET", &p.dom.socket);
        c
    };
    let a = ok(&mut rand(&p))?;
    let b = ok(&mut rand(&p))?;
    let hex = |s: &str| s.trim().to_string();
    ensure!(
        hex(&a).len() == 64 && hex(&a).chars().all(|c| c.is_ascii_hexdigit()),
        "not 32 random bytes: {a}"
    );
    ensure!(hex(&a) != hex(&b), "two draws are equal: {a}");
    // With the domain gone the generator fails: the bytes came from the VSM.
    p.dom.kill()?;
    let e = fails(&mut rand(&p))?;
    ensure!(!e.trim().chars().all(|c| c.is_ascii_hexdigit()), "{e}");
    Ok(())
}

#[test]
fn provider_refuses_a_wrong_pin_and_a_missing_key() -> Result<()> {
    let p = Prov::new("refuse", &[P256])?;
    std::fs::write(p.p("data"), b"data")?;
    let sign = |uri: &str, out: &str| -> Result<Command> {
        let mut c = p.ossl("pkeyutl")?;
        c.args([
            "-sign", "-rawin", "-digest", "sha256", "-inkey", uri, "-in", "data",
        ])
        .args(["-out", out]);
        Ok(c)
    };
    let wrong = "pkcs11:object=p256;type=private?pin-value=not-the-pin";
    let e = fails(&mut sign(wrong, "sig-wrong")?)?;
    ensure!(
        std::fs::metadata(p.p("sig-wrong"))
            .map(|m| m.len())
            .unwrap_or(0)
            == 0,
        "a signature was written with a wrong PIN: {e}"
    );
    // The domain audited the provider's failed login (hash-chained log, verified).
    let entries = caas_domc::audit::verify_with_key_file(
        &p.dom.state_dir().join("audit.log"),
        &p.dom.state_dir().join("domain.key"),
    )?;
    let incorrect = format!("{CKR_PIN_INCORRECT:#x}");
    ensure!(
        entries
            .iter()
            .any(|e| e.op == "C_Login(user)" && e.rv == incorrect),
        "no audit record of the wrong PIN"
    );
    // No PIN at all: the private key is not usable.
    let none = "pkcs11:object=p256;type=private";
    let mut c = sign(none, "sig-none")?;
    fails(c.stdin(Stdio::null()))?;
    ensure!(
        std::fs::metadata(p.p("sig-none"))
            .map(|m| m.len())
            .unwrap_or(0)
            == 0,
        "a signature was written without a PIN"
    );
    // A key that does not exist, and a token that does not exist.
    let pin = format!("pin-value={USER_PIN}");
    for uri in [
        format!("pkcs11:object=no-such-key;type=private?{pin}"),
        format!("pkcs11:token=no-such-token;object=p256;type=private?{pin}"),
    ] {
        let e = fails(&mut sign(&uri, "sig-missing")?)?;
        ensure!(e.contains("Could not") || e.contains("error"), "{uri}: {e}");
    }
    // The right PIN still works afterwards (the failures above did not lock the token).
    ok(&mut sign(&priv_uri(P256), "sig-ok")?)?;
    ensure!(std::fs::metadata(p.p("sig-ok"))?.len() > 0, "no signature");
    Ok(())
}
