//! The real-VM fixtures shared by `real_vm.rs`, `vm_migrate.rs` and `vm_suspend.rs`: the
//! tools check and the guest image of `scripts/build-guest-image` built with this build's
//! guest agent and PKCS#11 module, the tenant CLI, and finding a VM's qemu and files.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fails (never skips) when a tool the real VM needs is missing.
pub fn require_tools() {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("syslinux", "syslinux"),
        ("mcopy", "mtools"),
        ("mkfs.fat", "dosfstools"),
        ("cpio", "cpio"),
        ("strip", "binutils"),
    ]
    .into_iter()
    .filter(|(tool, _)| {
        !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(tool).is_file())
    })
    .map(|(_, pkg)| pkg)
    .collect();
    assert!(
        missing.is_empty() && Path::new("/usr/lib/syslinux/mbr/mbr.bin").is_file(),
        "the real-VM test needs the Debian packages {missing:?} and syslinux-common: run \
         scripts/install-deps (installs qemu-system-x86 together with qemu-utils)"
    );
}

/// Builds (or takes from the cache) the guest image with this build's guest agent and
/// PKCS#11 module; returns its path.
pub fn guest_image() -> PathBuf {
    build_guest_image(false)
}

/// The guest image with the tenant's overlay traffic role baked in
/// (`scripts/build-guest-image --net-demo`).
pub fn net_demo_guest_image() -> PathBuf {
    build_guest_image(true)
}

/// The `--net-demo` image whose sender moves `bytes` (`--net-demo-bytes`, the benchmark).
pub fn net_demo_guest_image_bytes(bytes: u64) -> PathBuf {
    build_guest_image_with(true, Some(bytes))
}

fn build_guest_image(net_demo: bool) -> PathBuf {
    build_guest_image_with(net_demo, None)
}

fn build_guest_image_with(net_demo: bool, bytes: Option<u64>) -> PathBuf {
    require_tools();
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_caas-guest"));
    // The module as `cargo build -p caas` uplifts it, or as `cargo test` leaves it in deps/
    // (a dependency's cdylib is not uplifted): the newer one.
    let pkcs11 = [
        caas_bin().with_file_name("libcaas_pkcs11.so"),
        caas_bin().with_file_name("deps").join("libcaas_pkcs11.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
    .expect("libcaas_pkcs11.so is built with caas");
    let mut cmd = Command::new(repo_root().join("scripts/build-guest-image"));
    cmd.arg("--agent").arg(&agent).arg("--pkcs11").arg(&pkcs11);
    if net_demo {
        cmd.arg("--net-demo");
    }
    if let Some(n) = bytes {
        cmd.arg("--net-demo-bytes").arg(n.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "scripts/build-guest-image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn tenant(root: &Path, dev: &Dev, args: &[&str]) -> String {
    let out = Command::new(caas_bin())
        .arg("tenant")
        .arg("--dir")
        .arg(root.join("alice"))
        .args(args)
        .envs(&dev.env)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "caas tenant {args:?} failed:\n{text}");
    text
}

/// The command line of the qemu process whose `-name` is `guest=VM` and that belongs to the
/// deployment under `root` (an argument names a path under it: tests run in parallel and
/// each names its VM `vm1`).
pub fn qemu_cmdline(root: &Path, vm: &str) -> Option<Vec<String>> {
    qemu_cmdlines(root, vm).into_iter().next()
}

/// The command lines of every qemu of `vm` under `root` (a migration's source and target
/// while both exist).
pub fn qemu_cmdlines(root: &Path, vm: &str) -> Vec<Vec<String>> {
    let want = format!("guest={vm}");
    let root = root.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (args.first()?.contains("qemu-system")
                && args.contains(&want)
                && args.iter().any(|a| a.contains(&root)))
            .then_some(args)
        })
        .collect()
}

/// `caas tenant launch` of the provisioned image as `vm` on `host` by trusted launch under
/// qemu, with the overlay NIC of network domain `lan` at `addr`; the CLI's output.
pub fn launch_on_lan(root: &Path, dev: &Dev, vm: &str, host: &str, addr: &str) -> String {
    tenant(
        root,
        dev,
        &[
            "launch",
            "--id",
            "legacy",
            "--vm",
            vm,
            "--host",
            host,
            "--driver",
            "qemu",
            "--domains",
            "finance",
            "--net-domain",
            "lan",
            "--net-addr",
            addr,
        ],
    )
}

pub fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, suffix) {
                return Some(f);
            }
        } else if p.to_string_lossy().ends_with(suffix) {
            return Some(p);
        }
    }
    None
}

/// A `caas dev` deployment with one host per name in `hosts` ("host-1", "host-2", …, in
/// order), in a fresh temporary root (mode 0711, so the workloads' own uids reach their
/// files), where the tenant `alice` made her DM key, was granted domain `finance`, and
/// provisioned `image` as `legacy` to every host (Algorithm 1). Returns the root's guard
/// (declare it first: it must outlive the deployment), the root, the deployment and its
/// untrusted storage directory.
pub fn provisioned_guest(
    image: &Path,
    hosts: &[&str],
) -> (tempfile::TempDir, PathBuf, Dev, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let root = tmp.path().to_path_buf();
    let dev = Dev::start_with(
        &root.join("dev"),
        "127.0.0.1:0",
        &["--hosts", &hosts.len().to_string(), "--attest-secs", "3600"],
    );
    let storage = PathBuf::from(&dev.env["CAAS_STORAGE_DIR"]);
    let raw = root.join("guest.raw");
    std::fs::copy(image, &raw).unwrap();
    tenant(&root, &dev, &["init"]);
    tenant(&root, &dev, &["acl", "--domains", "finance"]);
    tenant(
        &root,
        &dev,
        &[
            "provision",
            "--image",
            raw.to_str().unwrap(),
            "--id",
            "legacy",
            "--hosts",
            &hosts.join(","),
        ],
    );
    (tmp, root, dev, storage)
}
