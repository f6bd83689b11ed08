//! Shared harness of the end-to-end tests: NBD exports served by `nbdkit file`, an
//! in-process crypto domain, DM keys, and a workload fixture.
#![allow(dead_code)]

use anyhow::{Context, Result, bail};
use aws_lc_rs::signature::Ed25519KeyPair;
use caas_crypto::SecretBytes;
use caas_workload::{InjectedSecrets, VsmSpec, WorkloadSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const USER_PIN: &str = "user-pin-1234";
pub const SO_PIN: &str = "so-pin-1234";

/// An `nbdkit file` export on a unix socket.
pub struct Nbdkit {
    child: Child,
    pub uri: String,
    pub file: PathBuf,
}

impl Nbdkit {
    /// Serves `file` (writable) on `dir/<name>.sock`.
    pub fn serve(dir: &Path, name: &str, file: &Path) -> Result<Self> {
        let sock = dir.join(format!("{name}.sock"));
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .context("`nbdkit` is required: install the Debian package nbdkit")?;
        let mut n = Self {
            child,
            uri: format!("nbd+unix:///{name}?socket={}", sock.display()),
            file: file.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if Instant::now() > deadline || n.child.try_wait()?.is_some() {
                bail!("nbdkit did not start on {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A crypto domain served from this test process on `dir/domc.sock`, token initialised
/// with [`SO_PIN`] / [`USER_PIN`].
pub fn crypto_domain(dir: &Path) -> Result<PathBuf> {
    let state = dir.join("domc-state");
    std::fs::create_dir_all(&state)?;
    let cfg = caas_domc::domain::DomainConfig {
        state_dir: state,
        slots: 1,
        max_pin_retries: 5,
    };
    let key = caas_domc::keysource::DomainKey::new(caas_crypto::random_array()?);
    let domain = Arc::new(caas_domc::domain::Domain::open(&cfg, key)?);
    let socket = dir.join("domc.sock");
    let listener = caas_domc::server::bind(&socket, 0o600)?;
    std::thread::spawn(move || {
        caas_domc::server::serve(domain, listener, caas_domc::server::PeerPolicy::default())
    });
    caas_domc::dev::wait_for_socket(&socket, Duration::from_secs(10))?;
    caas_domc::dev::init_token(&socket, 0, "workload-test", SO_PIN, USER_PIN)?;
    Ok(socket)
}

/// A fresh DM key pair.
pub fn dm_key() -> Result<Ed25519KeyPair> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("keygen"))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| anyhow::anyhow!("pkcs8"))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// Everything a workload needs: a served disk of known content, an inject file, a spec.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub disk: Vec<u8>,
    pub exports: Vec<Nbdkit>,
    pub spec: WorkloadSpec,
    pub tau: SecretBytes,
    pub sk_dm: Ed25519KeyPair,
}

/// Options of [`Fixture::new`].
#[derive(Default)]
pub struct Options {
    pub disk_len: usize,
    pub vsm: bool,
    pub volumes: usize,
}

impl Fixture {
    pub fn new(o: Options) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let disk = caas_crypto::random_bytes(o.disk_len)?;
        let disk_file = dir.path().join("disk.img");
        std::fs::write(&disk_file, &disk)?;
        let mut exports = vec![Nbdkit::serve(dir.path(), "disk", &disk_file)?];
        let mut volumes = Vec::new();
        for i in 0..o.volumes {
            let f = dir.path().join(format!("vol{i}.img"));
            std::fs::write(&f, vec![0u8; 64 * 1024])?;
            let n = Nbdkit::serve(dir.path(), &format!("vol{i}"), &f)?;
            volumes.push(n.uri.clone());
            exports.push(n);
        }
        let vsm = if o.vsm {
            let socket = crypto_domain(dir.path())?;
            let pin = dir.path().join("user.pin");
            std::fs::write(&pin, format!("{USER_PIN}\n"))?;
            Some(VsmSpec {
                socket,
                user_pin_file: pin,
                slot: 0,
            })
        } else {
            None
        };
        let tau = SecretBytes::new(caas_crypto::random_bytes(32)?);
        let sk_dm = dm_key()?;
        let spec = WorkloadSpec {
            vm_id: "vm-test-1".into(),
            listen: "127.0.0.1:0".parse()?,
            ready_file: dir.path().join("vm.ready"),
            inject_file: dir.path().join("vm.inject"),
            disk: exports[0].uri.clone(),
            vsm,
            volumes,
            network: None,
        };
        let f = Self {
            dir,
            disk,
            exports,
            spec,
            tau,
            sk_dm,
        };
        f.inject()?;
        Ok(f)
    }

    /// (Re)writes the inject file with this fixture's τ and pk_DM.
    pub fn inject(&self) -> Result<()> {
        InjectedSecrets {
            tau: self.tau.clone(),
            pk_dm: caas_workload::proto::public_key_bytes(&self.sk_dm),
            tls: None,
        }
        .write_to(&self.spec.inject_file)?;
        Ok(())
    }

    /// Starts the workload in this process; serves on a background thread.
    pub fn start(&self) -> Result<std::net::SocketAddr> {
        let w = caas_workload::Workload::start(&self.spec)?;
        let addr = w.addr();
        std::thread::spawn(move || w.serve());
        Ok(addr)
    }
}
