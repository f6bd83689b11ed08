//! How the host agent starts workloads: a [`Driver`] turns a [`WorkloadSpec`] into a
//! running child process. The caller prepares the [`Command`] for [`Driver::program`]
//! (the host agent spawns children without inherited TPM descriptors, e.g. with
//! `caas_tpm::swtpm::command_without_inherited_fds`), the driver adds the arguments.
//!
//! - [`ProcessDriver`]: the process workload, `<caas> workload run --spec FILE`.
//! - [`QemuDriver`]: a TCG VM booting from the NBD disk, τ and pk_DM injected through
//!   `fw_cfg`. Only its command line is tested here (no qemu-system on the build hosts).
use crate::error::{Error, Result};
use crate::spec::{ReadyInfo, WorkloadSpec};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Starts workloads.
pub trait Driver: std::fmt::Debug + Send + Sync {
    /// Short name (`process`, `qemu`).
    fn name(&self) -> &'static str;
    /// The executable the caller must prepare a [`Command`] for; a clear error when it is
    /// not installed.
    fn program(&self) -> Result<PathBuf>;
    /// Starts the workload: `cmd` is a prepared command for [`Driver::program`] (no
    /// arguments yet); the driver adds its arguments and spawns it.
    fn start(&self, spec: &WorkloadSpec, cmd: Command) -> Result<WorkloadHandle>;
}

/// How a handle learns that its workload serves.
#[derive(Debug)]
enum Readiness {
    /// The process workload writes its [`ReadyInfo`] to this file.
    File(PathBuf),
    /// A VM prints [`QEMU_READY_MARKER`] on its serial console; the PSK channel is
    /// reachable at `addr` (user-mode network port forward).
    SerialMarker { log: PathBuf, addr: SocketAddr },
}

/// A running workload. Dropping the handle stops the workload.
#[derive(Debug)]
pub struct WorkloadHandle {
    vm_id: String,
    child: Child,
    readiness: Readiness,
    /// Removed once the workload is ready or stopped (qemu reads `fw_cfg` files at start).
    cleanup: Vec<PathBuf>,
    stopped: bool,
}

impl WorkloadHandle {
    /// The workload's identifier.
    #[must_use]
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// The child's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the workload serves its PSK channel and returns the address. Fails if
    /// the child exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(addr) = self.probe()? {
                self.cleanup_files();
                return Ok(addr);
            }
            if let Some(st) = self
                .child
                .try_wait()
                .map_err(Error::io("wait for workload"))?
            {
                self.stopped = true;
                self.cleanup_files();
                return Err(Error::Driver(format!(
                    "workload {} exited ({st}) before it was ready",
                    self.vm_id
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Driver(format!(
                    "workload {} not ready after {timeout:?}",
                    self.vm_id
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn probe(&self) -> Result<Option<SocketAddr>> {
        match &self.readiness {
            Readiness::File(path) => Ok(ReadyInfo::read_from(path)?
                .filter(|r| r.vm_id == self.vm_id)
                .map(|r| r.addr)),
            Readiness::SerialMarker { log, addr } => {
                let mut text = Vec::new();
                if let Ok(f) = std::fs::File::open(log) {
                    f.take(16 << 20)
                        .read_to_end(&mut text)
                        .map_err(Error::io("read serial log"))?;
                }
                let marker = QEMU_READY_MARKER.as_bytes();
                Ok(text
                    .windows(marker.len())
                    .any(|w| w == marker)
                    .then_some(*addr))
            }
        }
    }

    /// The exit status, if the workload has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(Error::io("wait for workload"))
    }

    /// Stops the workload (SIGKILL) and reaps it. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        self.cleanup_files();
        if self.stopped {
            return Ok(());
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        self.child.wait().map_err(Error::io("reap workload"))?;
        self.stopped = true;
        Ok(())
    }

    fn cleanup_files(&mut self) {
        for p in self.cleanup.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for WorkloadHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// File name of a per-workload file in a driver directory.
fn per_vm(dir: &Path, vm_id: &str, suffix: &str) -> PathBuf {
    dir.join(format!("{vm_id}.{suffix}"))
}

/// Runs the process workload: `<program> workload run --spec DIR/<vm_id>.workload.json`.
#[derive(Debug, Clone)]
pub struct ProcessDriver {
    program: PathBuf,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
}

impl ProcessDriver {
    /// `program` is the `caas` executable (or anything accepting `workload run --spec`);
    /// spec files are written into `dir`.
    #[must_use]
    pub fn new(program: PathBuf, dir: PathBuf) -> Self {
        Self {
            program,
            dir,
            owner: None,
        }
    }

    /// The spec file is given to UID:GID, the identity the caller starts the workload
    /// under (with `CommandExt::uid`/`gid` on the prepared command).
    #[must_use]
    pub fn owned_by(mut self, uid: u32, gid: u32) -> Self {
        self.owner = Some((uid, gid));
        self
    }

    /// Uses the running executable as the `caas` program.
    pub fn current_exe(dir: PathBuf) -> Result<Self> {
        let exe = std::env::current_exe().map_err(Error::io("locate the caas executable"))?;
        Ok(Self::new(exe, dir))
    }
}

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn program(&self) -> Result<PathBuf> {
        if !self.program.is_file() {
            return Err(Error::Driver(format!(
                "workload program {} does not exist",
                self.program.display()
            )));
        }
        Ok(self.program.clone())
    }

    fn start(&self, spec: &WorkloadSpec, mut cmd: Command) -> Result<WorkloadHandle> {
        spec.validate()?;
        std::fs::create_dir_all(&self.dir).map_err(Error::io("create driver directory"))?;
        let spec_path = per_vm(&self.dir, &spec.vm_id, "workload.json");
        spec.save_owned(&spec_path, self.owner)?;
        let _ = std::fs::remove_file(&spec.ready_file);
        let child = cmd
            .arg("workload")
            .arg("run")
            .arg("--spec")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| Error::Driver(format!("spawn the process workload: {e}")))?;
        Ok(WorkloadHandle {
            vm_id: spec.vm_id.clone(),
            child,
            readiness: Readiness::File(spec.ready_file.clone()),
            cleanup: Vec::new(),
            stopped: false,
        })
    }
}

/// The line a guest prints on its serial console once it serves the PSK channel.
pub const QEMU_READY_MARKER: &str = "caas-workload ready";
/// The port the guest's PSK channel listens on (forwarded from the host).
pub const QEMU_GUEST_PORT: u16 = 7000;
/// `fw_cfg` name of the injected secrets (the inject file's JSON).
pub const FW_CFG_INJECT: &str = "opt/caas/inject";
/// `fw_cfg` name of the workload's id.
pub const FW_CFG_VM_ID: &str = "opt/caas/vm-id";
/// `fw_cfg` name of the crypto domain's user PIN (when the VM has a VSM).
pub const FW_CFG_VSM_PIN: &str = "opt/caas/vsm-pin";
/// virtio-serial port name of the crypto domain's VSM socket inside the guest.
pub const VSM_SERIAL_PORT: &str = "org.caas.vsm";

/// Boots a VM with `qemu-system-x86_64` (TCG) from the NBD disk. The guest image is
/// expected to read `fw_cfg` [`FW_CFG_INJECT`] (τ, pk_DM), listen on
/// [`QEMU_GUEST_PORT`], and print [`QEMU_READY_MARKER`] on its serial console.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    /// The qemu binary (name looked up in PATH, or a path).
    pub binary: String,
    /// Where serial logs go.
    pub dir: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
}

impl QemuDriver {
    /// `qemu-system-x86_64`, 256 MiB, logs in `dir`.
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            dir,
            memory_mib: 256,
        }
    }

    /// The serial log of a workload.
    #[must_use]
    pub fn serial_log(&self, vm_id: &str) -> PathBuf {
        per_vm(&self.dir, vm_id, "serial.log")
    }

    /// The qemu arguments for `spec`, with the PSK channel forwarded from `host_port` on
    /// the spec's listen address.
    pub fn args(&self, spec: &WorkloadSpec, host_port: u16) -> Result<Vec<OsString>> {
        spec.validate()?;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&OsStr]| a.extend(parts.iter().map(|p| p.to_os_string()));
        let log = self.serial_log(&spec.vm_id);
        let mem = self.memory_mib.to_string();
        push(&[
            "-name".as_ref(),
            format!("guest={}", spec.vm_id).as_ref(),
            "-accel".as_ref(),
            "tcg".as_ref(),
            "-m".as_ref(),
            mem.as_ref(),
            "-nographic".as_ref(),
            "-monitor".as_ref(),
            "none".as_ref(),
            "-no-reboot".as_ref(),
            "-serial".as_ref(),
            &opt("file:", &log),
        ]);
        for uri in std::iter::once(&spec.disk).chain(&spec.volumes) {
            let mut d = OsString::from("file=");
            d.push(escape(uri.as_ref()));
            d.push(",format=raw,if=virtio");
            push(&["-drive".as_ref(), &d]);
        }
        let mut inject = OsString::from(format!("name={FW_CFG_INJECT},file="));
        inject.push(escape(spec.inject_file.as_os_str()));
        push(&[
            "-fw_cfg".as_ref(),
            &inject,
            "-fw_cfg".as_ref(),
            format!("name={FW_CFG_VM_ID},string={}", spec.vm_id).as_ref(),
        ]);
        let ip = spec.listen.ip();
        let host = if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        push(&[
            "-netdev".as_ref(),
            format!("user,id=net0,hostfwd=tcp:{host}:{host_port}-:{QEMU_GUEST_PORT}").as_ref(),
            "-device".as_ref(),
            "virtio-net-pci,netdev=net0".as_ref(),
        ]);
        if let Some(vsm) = &spec.vsm {
            let mut chardev = OsString::from("socket,id=vsm0,path=");
            chardev.push(escape(vsm.socket.as_os_str()));
            let mut pin = OsString::from(format!("name={FW_CFG_VSM_PIN},file="));
            pin.push(escape(vsm.user_pin_file.as_os_str()));
            push(&[
                "-chardev".as_ref(),
                &chardev,
                "-device".as_ref(),
                "virtio-serial-pci".as_ref(),
                "-device".as_ref(),
                format!("virtserialport,chardev=vsm0,name={VSM_SERIAL_PORT}").as_ref(),
                "-fw_cfg".as_ref(),
                &pin,
            ]);
        }
        Ok(a)
    }
}

/// `prefix` followed by the escaped path.
fn opt(prefix: &str, path: &Path) -> OsString {
    let mut o = OsString::from(prefix);
    o.push(escape(path.as_os_str()));
    o
}

/// Escapes a value for a qemu option list (a ',' is written ',,').
fn escape(v: &OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(v.len());
    for &b in v.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Looks `name` up in PATH (or checks it as a path).
fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port(ip: std::net::IpAddr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).map_err(Error::io("reserve a port"))?;
    Ok(l.local_addr().map_err(Error::io("reserve a port"))?.port())
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn program(&self) -> Result<PathBuf> {
        find_program(&self.binary).ok_or_else(|| {
            Error::Driver(format!(
                "{} is not installed (not found in PATH): install the Debian package \
                 qemu-system-x86, or use the process driver",
                self.binary
            ))
        })
    }

    fn start(&self, spec: &WorkloadSpec, mut cmd: Command) -> Result<WorkloadHandle> {
        self.program()?;
        std::fs::create_dir_all(&self.dir).map_err(Error::io("create driver directory"))?;
        let host_port = match spec.listen.port() {
            0 => free_port(spec.listen.ip())?,
            p => p,
        };
        let args = self.args(spec, host_port)?;
        let log = self.serial_log(&spec.vm_id);
        let _ = std::fs::remove_file(&log);
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| Error::Driver(format!("spawn {}: {e}", self.binary)))?;
        let mut cleanup = vec![spec.inject_file.clone()];
        if let Some(v) = &spec.vsm {
            cleanup.push(v.user_pin_file.clone());
        }
        Ok(WorkloadHandle {
            vm_id: spec.vm_id.clone(),
            child,
            readiness: Readiness::SerialMarker {
                log,
                addr: SocketAddr::new(spec.listen.ip(), host_port),
            },
            cleanup,
            stopped: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VsmSpec;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            vm_id: "vm-42".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ready_file: "/run/caas/vm-42.ready".into(),
            inject_file: "/run/caas/vm,42.inject".into(),
            disk: "nbd+unix:///disk?socket=/run/caas/sdp,1.sock".into(),
            vsm: None,
            volumes: vec!["nbd+unix:///vol?socket=/run/caas/vol.sock".into()],
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// True when `flag` is immediately followed by `value`.
    fn has(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn qemu_command_line() -> Result<()> {
        let d = QemuDriver::new("/var/lib/caas/vms".into());
        let a = strings(&d.args(&spec(), 40123)?);
        assert!(has(&a, "-accel", "tcg"));
        assert!(has(&a, "-m", "256"));
        assert!(a.iter().any(|x| x == "-nographic"));
        assert!(has(&a, "-monitor", "none"));
        assert!(has(&a, "-name", "guest=vm-42"));
        assert!(has(
            &a,
            "-serial",
            "file:/var/lib/caas/vms/vm-42.serial.log"
        ));
        // The boot disk first, then the volumes; commas in paths are doubled.
        let drives: Vec<&String> = a
            .windows(2)
            .filter(|w| w[0] == "-drive")
            .map(|w| &w[1])
            .collect();
        assert_eq!(
            drives,
            [
                "file=nbd+unix:///disk?socket=/run/caas/sdp,,1.sock,format=raw,if=virtio",
                "file=nbd+unix:///vol?socket=/run/caas/vol.sock,format=raw,if=virtio",
            ]
        );
        assert!(has(
            &a,
            "-fw_cfg",
            "name=opt/caas/inject,file=/run/caas/vm,,42.inject"
        ));
        assert!(has(&a, "-fw_cfg", "name=opt/caas/vm-id,string=vm-42"));
        assert!(has(
            &a,
            "-netdev",
            "user,id=net0,hostfwd=tcp:127.0.0.1:40123-:7000"
        ));
        assert!(has(&a, "-device", "virtio-net-pci,netdev=net0"));
        assert!(!a.iter().any(|x| x.contains("vsm")));
        Ok(())
    }

    #[test]
    fn qemu_command_line_with_vsm() -> Result<()> {
        let mut s = spec();
        s.vsm = Some(VsmSpec {
            socket: "/run/caas/domc.sock".into(),
            user_pin_file: "/run/caas/pin".into(),
            slot: 0,
        });
        s.volumes.clear();
        let a = strings(&QemuDriver::new("/tmp".into()).args(&s, 1)?);
        assert!(has(
            &a,
            "-chardev",
            "socket,id=vsm0,path=/run/caas/domc.sock"
        ));
        assert!(has(
            &a,
            "-device",
            "virtserialport,chardev=vsm0,name=org.caas.vsm"
        ));
        assert!(has(
            &a,
            "-fw_cfg",
            "name=opt/caas/vsm-pin,file=/run/caas/pin"
        ));
        assert_eq!(a.iter().filter(|x| *x == "-drive").count(), 1);
        Ok(())
    }

    #[test]
    fn qemu_rejects_a_bad_spec() {
        let mut s = spec();
        s.vm_id = "vm,42".into();
        assert!(QemuDriver::new("/tmp".into()).args(&s, 1).is_err());
        let mut s = spec();
        s.disk = "/dev/sda".into();
        assert!(QemuDriver::new("/tmp".into()).args(&s, 1).is_err());
    }

    #[test]
    fn missing_qemu_is_a_clear_error() {
        let mut d = QemuDriver::new("/tmp".into());
        d.binary = "qemu-system-x86_64-not-installed".into();
        let e = d.program();
        assert!(
            matches!(&e, Err(Error::Driver(m)) if m.contains("not installed") && m.contains("qemu-system-x86")),
            "{e:?}"
        );
        let e = d.start(&spec(), Command::new("true"));
        assert!(matches!(&e, Err(Error::Driver(m)) if m.contains("not installed")));
    }

    #[test]
    fn process_driver_needs_its_program() {
        let d = ProcessDriver::new("/nonexistent/caas".into(), "/tmp".into());
        assert!(matches!(d.program(), Err(Error::Driver(_))));
    }
}
