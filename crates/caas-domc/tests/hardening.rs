//! Process hardening of a real crypto domain process: seccomp filter installed, core dumps
//! off, and — when started as root — privileges dropped to nobody while it keeps serving
//! (regression: locked memory used to starve the unprivileged process of thread stacks).

use anyhow::{Context, Result, ensure};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn domain_process_is_hardened_and_serves_after_dropping_privileges() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let socket = dir.path().join("domc.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args(["domc", "serve", "--create-key", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .spawn()?;
    let result = (|| -> Result<()> {
        caas_domc::dev::wait_for_socket(&socket, Duration::from_secs(10))?;
        caas_domc::dev::init_token(&socket, 0, "hard", "so-pin-1", "user-pin-1")?;
        caas_domc::dev::demo_sign(&socket, "user-pin-1")?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        ensure!(
            status.contains("Seccomp:\t2"),
            "no seccomp filter:\n{status}"
        );
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id()))?;
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .context("no core limit line")?;
        ensure!(
            core.split_whitespace().nth(4) == Some("0"),
            "core dumps not disabled: {core}"
        );
        if nix::unistd::geteuid().is_root() {
            let uid = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .context("no Uid line")?;
            ensure!(
                uid.split_whitespace().skip(1).all(|u| u == "65534"),
                "still privileged: {uid}"
            );
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
