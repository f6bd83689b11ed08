//! Shared harness of the end-to-end tests: starts real crypto domain processes
//! (`caas-domc domc serve`) on temp dirs, locates `libcaas_pkcs11.so`, and runs third-party
//! tools, failing with an install hint when one is missing.
#![allow(dead_code)]

pub mod ck;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

pub const SO_PIN: &str = "so-pin-1234";
pub const USER_PIN: &str = "user-1234";

/// A crypto domain process.
pub struct Dom {
    pub child: Child,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub socket: PathBuf,
    pub extra: Vec<String>,
}

impl Dom {
    /// Starts a fresh domain (uninitialised token) in a new temp dir.
    pub fn start(extra: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut d = Self::start_in(tmp.path(), extra)?;
        d._tmp = Some(tmp);
        Ok(d)
    }

    /// Starts a domain in `dir` (socket `dir/domc.sock`, state `dir/state`).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Result<Self> {
        let socket = dir.join("domc.sock");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn(dir, &socket, &extra)?;
        Ok(Self {
            child,
            dir: dir.to_path_buf(),
            _tmp: None,
            socket,
            extra,
        })
    }

    /// Starts a domain and initialises slot 0 with label `label` and the test PINs.
    pub fn start_initialised(label: &str, extra: &[&str]) -> Result<Self> {
        let d = Self::start(extra)?;
        caas_domc::dev::init_token(&d.socket, 0, label, SO_PIN, USER_PIN)?;
        Ok(d)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Starts the process again on the same state and socket.
    pub fn restart(&mut self) -> Result<()> {
        self.child = spawn(&self.dir, &self.socket, &self.extra)?;
        Ok(())
    }

    /// Environment for a module user.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "CAAS_PKCS11_SOCKET".into(),
            self.socket.display().to_string(),
        )]
    }
}

impl Drop for Dom {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, socket: &Path, extra: &[String]) -> Result<Child> {
    let child = Command::new(env!("CARGO_BIN_EXE_caas-domc"))
        .args([
            "domc",
            "serve",
            "--create-key",
            "--run-as",
            "0:0",
            "--state-dir",
        ])
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .spawn()
        .context("spawning caas-domc")?;
    caas_domc::dev::wait_for_socket(socket, Duration::from_secs(10))?;
    Ok(child)
}

/// Absolute path of the module built as this crate's dev-dependency.
pub fn module() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("test binary dir")?;
    for p in [
        deps.join("libcaas_pkcs11.so"),
        deps.join("../libcaas_pkcs11.so"),
    ] {
        if p.exists() {
            return Ok(p.canonicalize()?);
        }
    }
    bail!("libcaas_pkcs11.so not found next to {}", exe.display())
}

/// Fails with an install hint when `tool` is missing.
pub fn require(tool: &str, package: &str) -> Result<()> {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        bail!(
            "`{tool}` is required: install the Debian package `{package}` (listed in .ci/apt-packages.txt)"
        );
    }
    Ok(())
}

/// Fails with an install hint when a file is missing.
pub fn require_file(path: &str, package: &str) -> Result<()> {
    if !Path::new(path).exists() {
        bail!("{path} is required: install the Debian package `{package}`");
    }
    Ok(())
}

/// Runs a command, returning its output (not checking status).
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

/// Runs a command and fails unless it succeeded; returns stdout+stderr.
pub fn ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token in a temp dir (for side-by-side comparisons).
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

impl SoftHsm {
    pub fn new(label: &str) -> Result<Self> {
        require_file(SOFTHSM_MODULE, "softhsm2")?;
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("tokens"))?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )?;
        let s = Self { dir, conf };
        require("softhsm2-util", "softhsm2")?;
        ok(Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &s.conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ]))?;
        Ok(s)
    }

    pub fn tool(&self) -> Command {
        let mut c = Command::new("pkcs11-tool");
        c.env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", SOFTHSM_MODULE]);
        c
    }
}

/// pkcs11-tool against the caas module of `dom`.
pub fn caas_tool(dom: &Dom) -> Result<Command> {
    let mut c = Command::new("pkcs11-tool");
    c.env("CAAS_PKCS11_SOCKET", &dom.socket)
        .arg("--module")
        .arg(module()?);
    Ok(c)
}

/// The directory a child test process works in (set by [`run_in_child`]).
pub fn child_dir() -> Option<PathBuf> {
    std::env::var_os("CAAS_TEST_CHILD_DIR").map(PathBuf::from)
}

/// Runs test `name` again in a child copy of this test binary with CAAS_PKCS11_SOCKET set to
/// `dir/domc.sock` (the module reads its configuration at C_Initialize, and changing the
/// environment of a running multi-threaded test process is not sound). The child finds
/// `dir` via [`child_dir`].
pub fn run_in_child(name: &str) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = Command::new(std::env::current_exe()?)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("CAAS_TEST_CHILD_DIR", tmp.path())
        .env("CAAS_PKCS11_SOCKET", tmp.path().join("domc.sock"))
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    if !out.status.success() || !text.contains("1 passed") {
        bail!("child test {name} failed ({}):\n{text}", out.status);
    }
    Ok(())
}
