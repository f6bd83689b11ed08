//! OpenSC `pkcs11-tool` against libcaas_pkcs11.so and a real crypto domain: token life cycle,
//! key generation, signatures (cross-checked with OpenSSL), encryption, wrapping, ECDH and
//! digests; and `pkcs11-tool --test` compared with the same run against SoftHSM2.

mod common;

use anyhow::{Result, bail, ensure};
use common::*;
use std::process::Command;

fn has(text: &str, needle: &str) -> Result<()> {
    ensure!(text.contains(needle), "expected {needle:?} in:\n{text}");
    Ok(())
}

#[test]
fn pkcs11_tool_token_lifecycle_keys_and_mechanisms() -> Result<()> {
    require("pkcs11-tool", "opensc")?;
    require("openssl", "openssl")?;
    let dom = Dom::start(&[])?;
    let work = tempfile::tempdir()?;
    let w = |n: &str| work.path().join(n).display().to_string();
    let t = || caas_tool(&dom);

    has(&ok(t()?.arg("-I"))?, "caas VSM PKCS#11 module")?;
    // The same through a config file named by CAAS_PKCS11_CONFIG.
    std::fs::write(
        w("p11.toml"),
        format!(
            "socket = {:?}\ntimeout_secs = 30\n",
            dom.socket.display().to_string()
        ),
    )?;
    has(
        &ok(Command::new("pkcs11-tool")
            .env_remove("CAAS_PKCS11_SOCKET")
            .env("CAAS_PKCS11_CONFIG", w("p11.toml"))
            .arg("--module")
            .arg(module()?)
            .arg("-L"))?,
        "caas crypto domain slot 0",
    )?;
    // Without any configuration C_Initialize fails cleanly (no crash).
    let unconfigured = run(Command::new("pkcs11-tool")
        .env_remove("CAAS_PKCS11_SOCKET")
        .env_remove("CAAS_PKCS11_CONFIG")
        .arg("--module")
        .arg(module()?)
        .arg("-L"))?;
    ensure!(
        unconfigured.status.code() == Some(1),
        "unconfigured module: {unconfigured:?}"
    );
    has(&ok(t()?.arg("-L"))?, "uninitialized")?;
    ok(t()?.args(["--init-token", "--label", "e2e", "--so-pin", SO_PIN]))?;
    ok(t()?.args(["--init-pin", "--login", "--so-pin", SO_PIN, "--pin", "1111"]))?;
    let l = ok(t()?.arg("-L"))?;
    has(&l, "token label        : e2e")?;
    has(&l, "PIN initialized")?;
    ok(t()?.args([
        "--change-pin",
        "--login",
        "--pin",
        "1111",
        "--new-pin",
        USER_PIN,
    ]))?;
    ensure!(
        !run(t()?.args(["--login", "--pin", "1111", "-O"]))?
            .status
            .success(),
        "old PIN still accepted"
    );
    let m = ok(t()?.arg("-M"))?;
    for mech in [
        "RSA-PKCS-KEY-PAIR-GEN",
        "RSA-PKCS-PSS",
        "RSA-PKCS-OAEP",
        "ECDSA-SHA256",
        "EDDSA",
        "AES-GCM",
        "AES-CBC-PAD",
        "SHA256-HMAC",
        "ECDH1-DERIVE",
        "SHA512",
    ] {
        has(&m, mech)?;
    }
    let u = || -> Result<Command> {
        let mut c = t()?;
        c.args(["--login", "--pin", USER_PIN]);
        Ok(c)
    };
    ok(u()?.args([
        "--keypairgen",
        "--key-type",
        "RSA:2048",
        "--id",
        "01",
        "--label",
        "rsa",
    ]))?;
    ok(u()?.args([
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--id",
        "02",
        "--label",
        "ec",
    ]))?;
    ok(u()?.args([
        "--keypairgen",
        "--key-type",
        "EC:edwards25519",
        "--id",
        "03",
        "--label",
        "ed",
    ]))?;
    std::fs::write(w("data"), b"signed by the crypto domain\n")?;
    for (id, mech) in [
        ("01", "SHA256-RSA-PKCS"),
        ("01", "SHA256-RSA-PKCS-PSS"),
        ("02", "ECDSA-SHA256"),
        ("02", "ECDSA"),
        ("03", "EDDSA"),
    ] {
        let sig = w(&format!("sig-{id}-{mech}"));
        ok(u()?.args([
            "--sign",
            "--id",
            id,
            "-m",
            mech,
            "-i",
            &w("data"),
            "-o",
            &sig,
        ]))?;
        has(
            &ok(u()?.args([
                "--verify",
                "--id",
                id,
                "-m",
                mech,
                "-i",
                &w("data"),
                "--signature-file",
                &sig,
            ]))?,
            "Signature is valid",
        )?;
    }
    // Cross-check an RSA signature with OpenSSL using the exported public key.
    ok(u()?.args([
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        "01",
        "-o",
        &w("pub01.der"),
    ]))?;
    has(
        &ok(Command::new("openssl").args([
            "dgst",
            "-sha256",
            "-keyform",
            "DER",
            "-verify",
            &w("pub01.der"),
            "-signature",
            &w("sig-01-SHA256-RSA-PKCS"),
            &w("data"),
        ]))?,
        "Verified OK",
    )?;
    let objs = ok(u()?.arg("-O"))?;
    for label in ["rsa", "ec", "ed"] {
        has(&objs, &format!("label:      {label}"))?;
    }
    has(&objs, "never extractable")?;

    // RSA-OAEP: OpenSSL encrypts to the token's public key, the token decrypts.
    std::fs::write(w("pt32"), [7u8; 32])?;
    ok(Command::new("openssl").args([
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-keyform",
        "DER",
        "-inkey",
        &w("pub01.der"),
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
        "-in",
        &w("pt32"),
        "-out",
        &w("ct.oaep"),
    ]))?;
    ok(u()?.args([
        "--decrypt",
        "--id",
        "01",
        "-m",
        "RSA-PKCS-OAEP",
        "--hash-algorithm",
        "SHA256",
        "--mgf",
        "MGF1-SHA256",
        "-i",
        &w("ct.oaep"),
        "-o",
        &w("pt.oaep"),
    ]))?;
    ensure!(std::fs::read(w("pt.oaep"))? == [7u8; 32], "OAEP round trip");

    // AES: keygen, CBC-PAD round trip (pkcs11-tool 0.23 has no AES-GCM; see the cryptoki tests).
    ok(u()?.args([
        "--keygen",
        "--key-type",
        "AES:32",
        "--id",
        "10",
        "--label",
        "data-key",
        "--extractable",
    ]))?;
    ok(u()?.args([
        "--keygen",
        "--key-type",
        "AES:32",
        "--id",
        "11",
        "--label",
        "kek",
        "--usage-wrap",
    ]))?;
    std::fs::write(w("pt"), vec![0x42u8; 100])?;
    let iv = "000102030405060708090a0b0c0d0e0f";
    ok(u()?.args([
        "--encrypt",
        "--id",
        "10",
        "-m",
        "AES-CBC-PAD",
        "--iv",
        iv,
        "-i",
        &w("pt"),
        "-o",
        &w("ct.cbc"),
    ]))?;
    ok(u()?.args([
        "--decrypt",
        "--id",
        "10",
        "-m",
        "AES-CBC-PAD",
        "--iv",
        iv,
        "-i",
        &w("ct.cbc"),
        "-o",
        &w("pt.cbc"),
    ]))?;
    ensure!(
        std::fs::read(w("pt.cbc"))? == vec![0x42u8; 100],
        "CBC-PAD round trip"
    );
    ensure!(
        std::fs::metadata(w("ct.cbc"))?.len() == 112,
        "CBC-PAD ciphertext length"
    );

    // Wrap the extractable key with AES key wrap with padding (0x210A), unwrap it as a new
    // key, and show both keys encrypt identically.
    ok(u()?.args([
        "--wrap",
        "-m",
        "0x210A",
        "--id",
        "11",
        "--application-id",
        "10",
        "-o",
        &w("wrapped"),
    ]))?;
    ensure!(
        std::fs::metadata(w("wrapped"))?.len() == 40,
        "KWP of a 32-byte key is 40 bytes"
    );
    ok(u()?.args([
        "--unwrap",
        "-m",
        "0x210A",
        "--id",
        "11",
        "-i",
        &w("wrapped"),
        "--key-type",
        "AES:",
        "--application-id",
        "20",
        "--application-label",
        "unwrapped",
    ]))?;
    ok(u()?.args([
        "--encrypt",
        "--id",
        "20",
        "-m",
        "AES-CBC-PAD",
        "--iv",
        iv,
        "-i",
        &w("pt"),
        "-o",
        &w("ct.cbc2"),
    ]))?;
    ensure!(
        std::fs::read(w("ct.cbc"))? == std::fs::read(w("ct.cbc2"))?,
        "unwrapped key differs"
    );
    // The KEK itself is not extractable: wrapping it fails.
    ensure!(
        !run(u()?.args([
            "--wrap",
            "-m",
            "AES-KEY-WRAP",
            "--id",
            "10",
            "--application-id",
            "11",
            "-o",
            &w("nope")
        ]))?
        .status
        .success(),
        "unextractable key was wrapped"
    );

    // ECDH with a peer key made by OpenSSL: both sides derive the same secret.
    ok(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &w("peer.pem"),
    ]))?;
    ok(Command::new("openssl").args([
        "pkey",
        "-in",
        &w("peer.pem"),
        "-pubout",
        "-outform",
        "DER",
        "-out",
        &w("peer.der"),
    ]))?;
    ok(u()?.args([
        "--derive",
        "-m",
        "ECDH1-DERIVE",
        "--id",
        "02",
        "-i",
        &w("peer.der"),
        "-o",
        &w("z"),
    ]))?;
    ok(u()?.args([
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        "02",
        "-o",
        &w("pub02.der"),
    ]))?;
    ok(Command::new("openssl").args([
        "pkeyutl",
        "-derive",
        "-inkey",
        &w("peer.pem"),
        "-peerkey",
        &w("pub02.der"),
        "-peerform",
        "DER",
        "-out",
        &w("z2"),
    ]))?;
    ensure!(
        std::fs::read(w("z"))? == std::fs::read(w("z2"))?,
        "ECDH secrets differ"
    );

    // Digest.
    ok(u()?.args(["--hash", "-m", "SHA256", "-i", &w("pt"), "-o", &w("h")]))?;
    let h = std::fs::read(w("h"))?;
    ensure!(
        h.len() == 32 && h == openssl_sha256(&[0x42u8; 100])?,
        "SHA-256 digest mismatch"
    );
    Ok(())
}

fn openssl_sha256(data: &[u8]) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("in");
    std::fs::write(&p, data)?;
    let out = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-binary"])
        .arg(&p))?;
    Ok(out.stdout)
}

/// Lines of a `pkcs11-tool --test` run that report a failure.
fn failures(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.contains("ERR") || l.contains("failed") || l.contains("error:"))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn pkcs11_tool_test_has_no_failure_that_softhsm_lacks() -> Result<()> {
    require("pkcs11-tool", "opensc")?;
    let dom = Dom::start_initialised("caas", &[])?;
    let soft = SoftHsm::new("soft")?;
    let mut runs = Vec::new();
    for (name, mut base) in [("caas", caas_tool(&dom)?), ("softhsm", soft.tool())] {
        // The same keys on both tokens.
        let keygen = |args: &[&str]| -> Result<()> {
            let mut c = if name == "caas" {
                caas_tool(&dom)?
            } else {
                soft.tool()
            };
            ok(c.args(["--login", "--pin", USER_PIN]).args(args)).map(|_| ())
        };
        keygen(&[
            "--keypairgen",
            "--key-type",
            "RSA:2048",
            "--id",
            "01",
            "--label",
            "rsa",
        ])?;
        keygen(&[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--id",
            "02",
            "--label",
            "ec",
        ])?;
        let out = run(base.args(["--test", "--login", "--pin", USER_PIN]))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("===== pkcs11-tool --test against {name} =====\n{text}");
        runs.push(text);
    }
    let (caas, softhsm) = (&runs[0], &runs[1]);
    ensure!(
        caas.contains("Digests:") && caas.contains("Signatures"),
        "--test did not run its suites:\n{caas}"
    );
    let soft_fail = failures(softhsm);
    let extra: Vec<String> = failures(caas)
        .into_iter()
        .filter(|f| !soft_fail.contains(f))
        .collect();
    if !extra.is_empty() {
        bail!("failures against caas that SoftHSM2 does not have: {extra:#?}");
    }
    Ok(())
}
