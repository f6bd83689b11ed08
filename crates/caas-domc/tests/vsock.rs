//! The vsock transport. This sandbox has AF_VSOCK (bind/listen on VMADDR_CID_ANY work) but no
//! vsock transport to loop back through (a connection to CID 1 times out after 2 s), so the
//! tests check what can be checked here: the crypto domain binds its vsock listener next to
//! its UNIX socket (the port is then taken), the module reports an unreachable vsock domain
//! as CKR_DEVICE_REMOVED (or, where a loopback transport exists, really talks to it), and a
//! malformed `vsock:` address is a clear C_Initialize error.

mod common;

use anyhow::{Result, ensure};
use common::*;
use std::process::Command;

/// A port unlikely to clash with a parallel run.
fn test_port() -> u32 {
    20_000 + std::process::id() % 40_000
}

#[test]
fn domain_binds_its_vsock_listener_beside_the_unix_socket() -> Result<()> {
    require("pkcs11-tool", "opensc")?;
    // Where AF_VSOCK is missing altogether there is nothing to test.
    if let Err(e) = caas_domc::vsock::VsockListener::bind(caas_domc::vsock::VMADDR_PORT_ANY) {
        eprintln!("skipping: {e}");
        return Ok(());
    }
    let port = test_port();
    let dom = Dom::start_initialised(
        "vsock",
        &["--vsock", &port.to_string(), "--vsock-peer-cid", "1"],
    )?;
    // The domain holds the port: a second listener cannot bind it.
    let e = caas_domc::vsock::VsockListener::bind(port)
        .err()
        .map(|e| e.to_string());
    ensure!(
        e.as_deref().is_some_and(|m| m.contains("bind")),
        "vsock port {port} not held by the domain: {e:?}"
    );
    // ...and the UNIX socket still serves.
    let slots = ok(caas_tool(&dom)?.arg("-L"))?;
    ensure!(slots.contains("vsock"), "{slots}");

    // The module over vsock: CID 1 (local). Without a loopback transport the connection
    // times out and the call fails cleanly; with one, it reaches the domain.
    let out = run(Command::new("pkcs11-tool")
        .env("CAAS_PKCS11_SOCKET", format!("vsock:1:{port}"))
        .arg("--module")
        .arg(module()?)
        .arg("-L"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("CKR_DEVICE_REMOVED") || (out.status.success() && text.contains("vsock")),
        "unexpected result over vsock:\n{text}"
    );
    Ok(())
}

#[test]
fn a_bad_vsock_address_is_a_clear_initialize_error() -> Result<()> {
    require("pkcs11-tool", "opensc")?;
    for bad in [
        "vsock:",
        "vsock:3",
        "vsock:three:5000",
        "vsock:3:99999999999",
    ] {
        let out = run(Command::new("pkcs11-tool")
            .env("CAAS_PKCS11_SOCKET", bad)
            .arg("--module")
            .arg(module()?)
            .arg("-L"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{bad} accepted");
        ensure!(
            err.contains("bad vsock address") && err.contains("CKR_GENERAL_ERROR"),
            "{bad}: {err}"
        );
    }
    Ok(())
}

/// A vsock listener serves only the workload VM's CID: `--vsock` without
/// `--vsock-peer-cid` (which would serve any CID) is refused before anything starts.
#[test]
fn vsock_listener_needs_the_peer_cid() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args([
            "domc",
            "serve",
            "--ephemeral-key",
            "--vsock",
            "5000",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--vsock-peer-cid"),
        "{:?} {err}",
        out.status
    );
    Ok(())
}
