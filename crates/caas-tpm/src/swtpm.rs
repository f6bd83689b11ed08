//! Software TPMs for development and tests: a project-local swtpm_localca (its CA key and
//! certificates live in a directory we choose, never in /var/lib/swtpm-localca), TPM state
//! provisioning with `swtpm_setup --create-ek-cert --create-platform-cert`, and `swtpm socket`
//! processes on free localhost ports. Needs the Debian packages swtpm and swtpm-tools.

use crate::error::Error;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub use caas_crypto::hardening::command_without_inherited_fds;

fn tool_err(tool: &str, e: impl std::fmt::Display) -> Error {
    Error::Unexpected(format!(
        "{tool}: {e} (install the Debian packages swtpm and swtpm-tools)"
    ))
}

/// A project-local swtpm_localca: the CA that signs the swtpm EK certificates.
#[derive(Debug, Clone)]
pub struct LocalCa {
    dir: PathBuf,
}

impl LocalCa {
    /// Prepares (or reuses) a local CA in `dir`. The CA key pair is created by
    /// swtpm_localca on first use.
    pub fn create(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Unexpected(format!("create {}: {e}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::Unexpected(format!("{}: {e}", dir.display())))?;
        let d = dir.display();
        let files = [
            (
                "swtpm-localca.conf",
                format!(
                    "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\ncertserial = {d}/certserial\n"
                ),
            ),
            (
                "swtpm-localca.options",
                "--platform-manufacturer caas\n--platform-version 2.1\n--platform-model caas-dev\n"
                    .to_string(),
            ),
            (
                "swtpm_setup.conf",
                format!(
                    "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {d}/swtpm-localca.conf\ncreate_certs_tool_options = {d}/swtpm-localca.options\nactive_pcr_banks = sha256\n"
                ),
            ),
        ];
        for (name, body) in files {
            std::fs::write(dir.join(name), body)
                .map_err(|e| Error::Unexpected(format!("write {name}: {e}")))?;
        }
        Ok(Self { dir })
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PEM files of the CA certificates (intermediate and root) to trust for EK
    /// certificates; present after the first `provision`.
    pub fn ca_cert_files(&self) -> Vec<PathBuf> {
        ["issuercert.pem", "swtpm-localca-rootca-cert.pem"]
            .iter()
            .map(|f| self.dir.join(f))
            .filter(|p| p.exists())
            .collect()
    }

    /// Provisions a TPM state directory with EK and platform certificates from this CA.
    pub fn provision(&self, state_dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::Unexpected(format!("create {}: {e}", state_dir.display())))?;
        let out = command_without_inherited_fds("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(state_dir)
            .args([
                "--create-ek-cert",
                "--create-platform-cert",
                "--overwrite",
                "--config",
            ])
            .arg(self.dir.join("swtpm_setup.conf"))
            .output()
            .map_err(|e| tool_err("swtpm_setup", e))?;
        if !out.status.success() {
            return Err(tool_err(
                "swtpm_setup",
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        Ok(())
    }
}

/// A running `swtpm socket` process (killed on drop).
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    port: u16,
    ctrl_port: u16,
    state_dir: PathBuf,
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`; 32768 when it
/// cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Two consecutive free ports: the swtpm TCTI expects the control port at server port + 1.
///
/// Drawn at random below the kernel's ephemeral range (`ip_local_port_range`), where no
/// outgoing connection takes a local port: with ports from `bind(0)` the port after it is of
/// the parity the kernel gives outgoing connections, and on a host busy with short
/// connections (their TIME_WAIT sockets block a new listener) every try could fail.
fn free_port_pair() -> Result<(u16, u16), Error> {
    let low = ephemeral_low();
    // [10000, low - 2] when the range starts high enough; else above it, as before.
    let (from, span) = if low > 12000 {
        (10000u16, low - 10001)
    } else {
        (low.max(1024), u16::MAX - low.max(1024) - 1)
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    for _ in 0..200 {
        let r: [u8; 2] = aws_lc_rs::rand::generate(&rng)
            .map_err(|_| Error::Unexpected("no randomness".into()))?
            .expose();
        let pa = from + u16::from_le_bytes(r) % span;
        if TcpListener::bind(("127.0.0.1", pa)).is_ok()
            && TcpListener::bind(("127.0.0.1", pa + 1)).is_ok()
        {
            return Ok((pa, pa + 1));
        }
    }
    Err(Error::Unexpected("no two consecutive free ports".into()))
}

impl Swtpm {
    /// Starts swtpm on free ports over an already provisioned state directory.
    pub fn start(state_dir: &Path) -> Result<Self, Error> {
        let mut last = String::new();
        for _ in 0..5 {
            let (port, ctrl_port) = free_port_pair()?;
            let mut child = command_without_inherited_fds("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state_dir.display()))
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={ctrl_port},bindaddr=127.0.0.1"),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| tool_err("swtpm", e))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("swtpm exited with {status}");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Another process may have taken the port between our probe and the
                    // bind (parallel deployments): then this swtpm exits at once, and the
                    // listener that answered is someone else's. Make sure ours is alive.
                    std::thread::sleep(Duration::from_millis(100));
                    if let Ok(Some(status)) = child.try_wait() {
                        last = format!("swtpm exited with {status} (port taken)");
                        break;
                    }
                    return Ok(Self {
                        child,
                        port,
                        ctrl_port,
                        state_dir: state_dir.to_path_buf(),
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "swtpm did not start listening within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(tool_err("swtpm", last))
    }

    /// TCTI string for this instance.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Server port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Control port.
    pub fn ctrl_port(&self) -> u16 {
        self.ctrl_port
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Stops the process.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// swtpm's pair is taken below the ephemeral range, where no outgoing connection (nor
    /// its TIME_WAIT socket) holds a port, and both ports are free.
    #[test]
    fn port_pairs_come_from_below_the_ephemeral_range() -> Result<(), Error> {
        let low = ephemeral_low();
        for _ in 0..100 {
            let (a, b) = free_port_pair()?;
            assert_eq!(b, a + 1);
            if low > 12000 {
                assert!(
                    (10000..low).contains(&a) && b < low,
                    "{a} in the ephemeral range"
                );
            }
            TcpListener::bind(("127.0.0.1", a)).map_err(|e| Error::Unexpected(e.to_string()))?;
            TcpListener::bind(("127.0.0.1", b)).map_err(|e| Error::Unexpected(e.to_string()))?;
        }
        Ok(())
    }
}
