//! The main job of the README: `caas demo` against a detached `caas dev`, every step passing
//! (with a real VM: qemu boots the tenant's encrypted guest image through the crypto domain;
//! two VMs of one network domain talk through the encrypted overlay),
//! then `caas dev stop`; and the `DIR/env` contract.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::process::Command;

#[test]
fn demo_runs_every_step_against_a_detached_dev_deployment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let out = Command::new(caas_bin())
        .args(["demo", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stop = Command::new(caas_bin())
        .args(["dev", "stop", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "caas demo failed");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    for step in [
        "KMS: encrypt",
        "SDP: write 1 MiB",
        "VSM: generate",
        "VM: the legacy guest image",
        "VM: provision the legacy guest image",
        "VM: trusted launch with the qemu driver",
        "VM: the tenant checks τ",
        "VM: the guest signs the tenant's signed challenge",
        "VM: the guest read its whole disk",
        "VM: live migration of",
        "VM (after migration): the tenant checks τ",
        "VM (after migration): the guest signs the tenant's signed challenge",
        "VM (after migration): the guest read its whole disk",
        "VM: suspend",
        "VM: resume",
        "VM (after resume): the tenant checks τ",
        "VM (after resume): the guest signs the tenant's signed challenge",
        "VM: stop",
        "Network: the DM's ACL grants the network domain demo-lan",
        "Network: trusted launch of two VMs of network domain demo-lan at once",
        "through the overlay (every Ethernet frame sealed",
        "Network: stop demo-net-a-",
        "DBSP: stop the workload and relaunch",
        "Audit:",
    ] {
        assert!(stdout.contains(step), "missing step {step}");
    }
    // Every VM and network step ran and passed (a skipped or failed one would not read "ok").
    for line in stdout
        .lines()
        .filter(|l| l.contains("  VM: ") || l.contains("  VM (") || l.contains("  Network: "))
    {
        assert!(
            line.contains("] ok ") || line.contains("not built yet"),
            "{line}"
        );
    }
    // The overlay carried the 1 MiB intact: the same SHA-256 on both sides.
    let sums = stdout
        .lines()
        .find(|l| l.contains("       sent sha256 "))
        .unwrap_or_else(|| panic!("no transfer line: {stdout}"));
    let words: Vec<&str> = sums.split_whitespace().collect();
    assert_eq!(words.get(2), words.get(8), "{sums}");
    assert!(sums.contains("received 1048576 bytes"), "{sums}");
    assert!(stop.status.success());
    let env = read_env(&dir);
    for var in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "CAAS_KMS_ENDPOINT",
        "CAAS_PKCS11_MODULE",
        "CAAS_PKCS11_SOCKET",
        "CAAS_PKCS11_TOKEN_LABEL",
        "CAAS_PKCS11_USER_PIN",
        "CAAS_PKCS11_SO_PIN",
        "CAAS_NBD_URI",
        "CAAS_NBD_SOCKET",
        "CAAS_VOLUME_FILE",
    ] {
        assert!(
            env.get(var).is_some_and(|v| !v.is_empty()),
            "{var} missing from DIR/env"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.join("env"))
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0,
        "env must be private"
    );
    assert_eq!(
        std::fs::metadata(dir.join("node.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0,
        "node key must be private"
    );
}

/// The fast variant: `caas demo --driver process` runs the same story with workload
/// processes (no VM, no guest image), every step passing, and says the VM was left out.
#[test]
fn demo_with_the_process_driver_runs_workload_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let out = Command::new(caas_bin())
        .args(["demo", "--driver", "process", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stop = Command::new(caas_bin())
        .args(["dev", "stop", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "caas demo --driver process failed");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(
        stdout.contains("[--] skip               VM: a real VM (caas demo --driver process"),
        "{stdout}"
    );
    assert!(!stdout.contains("qemu driver"), "{stdout}");
    assert!(stdout.contains("DBSP: stop the workload and relaunch"));
    assert!(stop.status.success());
}

/// No silent fallback: without qemu-system-x86_64 in PATH, `caas demo` (real VMs by default)
/// fails at once, before starting anything, saying what to install and how to run without.
#[test]
fn demo_without_qemu_fails_saying_what_to_install() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let empty = tmp.path().join("bin");
    std::fs::create_dir(&empty).unwrap();
    let out = Command::new(caas_bin())
        .args(["demo", "--data-dir"])
        .arg(&dir)
        .env("PATH", &empty)
        .env_remove("CAAS_DEMO_DRIVER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the demo ran without qemu");
    for hint in [
        "qemu-system-x86_64 is not installed",
        "qemu-system-x86 and qemu-utils",
        "scripts/install-deps",
        "--driver process",
    ] {
        assert!(stderr.contains(hint), "missing {hint:?} in: {stderr}");
    }
    assert!(!dir.join("env").exists(), "a deployment was started");
}

#[test]
fn aws_cli_just_works_after_sourcing_the_env_file() {
    let venv = venv_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let script = format!(
        ". {}/env && aws kms create-key --description from-env >/dev/null && aws kms list-keys",
        tmp.path().display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env(
            "PATH",
            format!(
                "{}:{}",
                venv.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("KeyArn"));
    drop(dev);
}

/// `caas dev`'s standalone VSM keeps its domain key only wrapped under the dev key service
/// (`DIR/domc/domain.key.kms`): no plaintext `domain.key`, no 32-byte file in its state.
/// After a restart the key service unwraps it and the token's persistent objects open.
#[test]
fn dev_vsm_keeps_no_plaintext_key_on_disk() {
    assert!(
        Command::new("pkcs11-tool")
            .arg("--version")
            .output()
            .is_ok(),
        "pkcs11-tool is needed (apt-get install opensc)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(tmp.path());
    let domc = tmp.path().join("domc");
    let no_plain_key = |when: &str| {
        assert!(
            !domc.join("domain.key").exists(),
            "{when}: plaintext key file"
        );
        let blob = std::fs::read(domc.join("domain.key.kms")).unwrap();
        assert!(
            blob.len() > 32,
            "{when}: wrapped key of {} bytes",
            blob.len()
        );
        for e in std::fs::read_dir(&domc).unwrap().flatten() {
            let md = e.metadata().unwrap();
            assert!(
                !(md.is_file() && md.len() == 32),
                "{when}: {} has the size of a key",
                e.path().display()
            );
        }
    };
    no_plain_key("first start");
    let tool = |dev: &Dev, args: &[&str]| -> String {
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&dev.env["CAAS_PKCS11_MODULE"])
            .args(["--login", "--pin", &dev.env["CAAS_PKCS11_USER_PIN"]])
            .args(args)
            .env("CAAS_PKCS11_SOCKET", &dev.env["CAAS_PKCS11_SOCKET"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pkcs11-tool {args:?}: {text}");
        text
    };
    tool(
        &dev,
        &[
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "kept-across-restarts",
            "--id",
            "09",
        ],
    );
    let mut dev = dev;
    dev.stop();
    dev.kill_orphans();
    // The old handle's Drop would kill the restarted deployment (same directory).
    std::mem::forget(dev);
    let dev = Dev::start(tmp.path());
    no_plain_key("restart");
    let objects = tool(&dev, &["-O"]);
    assert!(objects.contains("kept-across-restarts"), "{objects}");
    drop(dev);
}
