//! How the host agent starts workloads: a [`Driver`] turns a [`WorkloadSpec`] into a
//! running child process. The caller prepares the [`Command`] for [`Driver::program`]
//! (the host agent spawns children without inherited TPM descriptors, e.g. with
//! `caas_tpm::swtpm::command_without_inherited_fds`), the driver adds the arguments.
//!
//! - [`ProcessDriver`]: the process workload, `<caas> workload run --spec FILE`.
//! - [`QemuDriver`]: a legacy VM (`scripts/build-guest-image`) booting its WHOLE disk from
//!   the crypto domain's NBD export (the VM sees plaintext blocks, never a key or a
//!   ciphertext), TCG by default ([`Accel`]); τ and pk_DM reach the guest through `fw_cfg`
//!   from a 0600 file deleted as soon as the guest runs (qemu reads it at start); the VSM
//!   through a virtio-serial port (`caas.vsm`) that qemu connects to the crypto domain's
//!   socket; the tenant reaches the guest's PSK responder through a loopback `hostfwd`
//!   port; the agent controls qemu through its QMP socket (`<vm>.qmp.sock` in the driver's
//!   directory, mode 0600: [`WorkloadHandle::qmp`], [`crate::qmp`]) — stop, continue, save
//!   and restore (migration streams); [`QemuDriver::incoming`] starts a VM that waits for
//!   its state (`-incoming defer`). The real boot is tested by
//!   `crates/caas/tests/real_vm.rs`.
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
    /// reachable at `addr` (user-mode network port forward). qemu's own messages go to
    /// `stderr_log`, quoted when it exits early.
    SerialMarker {
        log: PathBuf,
        addr: SocketAddr,
        stderr_log: PathBuf,
        qmp: PathBuf,
    },
}

/// A running workload. Dropping the handle stops the workload.
#[derive(Debug)]
pub struct WorkloadHandle {
    vm_id: String,
    child: Child,
    readiness: Readiness,
    /// Removed once the workload is ready or stopped, or, for a VM, as soon as the guest
    /// runs (qemu reads `fw_cfg` files at start).
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

    /// The VM's QMP socket (`None` for a process workload).
    #[must_use]
    pub fn qmp_path(&self) -> Option<&Path> {
        match &self.readiness {
            Readiness::SerialMarker { qmp, .. } => Some(qmp),
            Readiness::File(_) => None,
        }
    }

    /// The host address forwarded to the VM's PSK channel (`None` for a process
    /// workload, whose address is in its ready file).
    #[must_use]
    pub fn forwarded_addr(&self) -> Option<SocketAddr> {
        match &self.readiness {
            Readiness::SerialMarker { addr, .. } => Some(*addr),
            Readiness::File(_) => None,
        }
    }

    /// Connects to the VM's QMP socket (waiting up to `timeout` for qemu to create it) and
    /// makes the socket 0600 first (qemu creates it under its umask). A process workload
    /// has none: [`Error::Driver`].
    pub fn qmp(&self, timeout: Duration) -> Result<crate::qmp::Qmp> {
        let path = self
            .qmp_path()
            .ok_or_else(|| Error::Driver(format!("workload {} has no QMP socket", self.vm_id)))?;
        let deadline = Instant::now() + timeout;
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        restrict_socket(path);
        Ok(crate::qmp::Qmp::connect_until(path, deadline, timeout)?)
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
            // qemu reads its `-fw_cfg` files while it starts, before the guest runs: once
            // the guest has written to its console, τ, pk_DM and the PIN leave the host's
            // disk (seconds before the guest is ready).
            if let Readiness::SerialMarker { log, qmp, .. } = &self.readiness
                && !self.cleanup.is_empty()
                && std::fs::metadata(log).is_ok_and(|m| m.len() > 0)
            {
                restrict_socket(qmp);
                self.cleanup_files();
            }
            if let Some(st) = self
                .child
                .try_wait()
                .map_err(Error::io("wait for workload"))?
            {
                self.stopped = true;
                self.cleanup_files();
                let why = match &self.readiness {
                    Readiness::SerialMarker { stderr_log, .. } => tail_of(stderr_log),
                    Readiness::File(_) => String::new(),
                };
                return Err(Error::Driver(format!(
                    "workload {} exited ({st}) before it was ready{why}",
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
            Readiness::SerialMarker { log, addr, .. } => {
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

/// The last lines of a log (at most 600 bytes), as `": …"`, or nothing.
fn tail_of(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let tail = String::from_utf8_lossy(&text[text.len().saturating_sub(600)..])
        .trim()
        .to_string();
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// Makes qemu's QMP socket 0600 (only qemu's identity and root reach it; its directory is
/// the workload's own, 0700, in the host agent).
fn restrict_socket(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_symlink()) {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
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
/// `fw_cfg` name of the overlay NIC's configuration (`mac=…` and `addr=IP/PREFIX` lines).
pub const FW_CFG_NET: &str = "opt/caas/net";
/// `fw_cfg` name of the workload's id.
pub const FW_CFG_VM_ID: &str = "opt/caas/vm-id";
/// `fw_cfg` name of the crypto domain's user PIN (when the VM has a VSM).
pub const FW_CFG_VSM_PIN: &str = "opt/caas/vsm-pin";
/// virtio-serial port name of the crypto domain's VSM socket inside the guest
/// (`/dev/virtio-ports/caas.vsm`).
pub const VSM_SERIAL_PORT: &str = "caas.vsm";

/// How qemu executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works everywhere (the default).
    Tcg,
    /// Hardware virtualisation (`/dev/kvm`).
    Kvm,
    /// KVM when a probe VM boots under it within 3 s ([`kvm_works`]), else TCG. Nested KVM
    /// on some hosts stalls after the BIOS, hence the probe.
    Auto,
}

impl Accel {
    /// From `CAAS_QEMU_ACCEL` (`tcg`, `kvm`, `auto`); TCG when unset or unknown.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var("CAAS_QEMU_ACCEL").as_deref() {
            Ok("kvm") => Self::Kvm,
            Ok("auto") => Self::Auto,
            _ => Self::Tcg,
        }
    }
}

/// Boots a VM with `qemu-system-x86_64` from the NBD disk. The guest image is expected to
/// read `fw_cfg` [`FW_CFG_INJECT`] (τ, pk_DM), listen on [`QEMU_GUEST_PORT`], and print
/// [`QEMU_READY_MARKER`] on its serial console (the image of `scripts/build-guest-image`
/// does, with `caas workload guest`).
#[derive(Debug, Clone)]
pub struct QemuDriver {
    /// The qemu binary (name looked up in PATH, or a path).
    pub binary: String,
    /// Where serial logs go.
    pub dir: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// TCG, KVM, or KVM after a probe.
    pub accel: Accel,
    /// Start the VM waiting for its state (`-incoming defer -S`): the caller restores it with
    /// [`crate::qmp::Qmp::migrate_incoming`] and [`crate::qmp::Qmp::cont`]; the guest does
    /// not boot, so [`WorkloadHandle::wait_ready`] does not apply.
    pub incoming: bool,
}

impl QemuDriver {
    /// `qemu-system-x86_64`, 256 MiB, logs in `dir`, accelerator from `CAAS_QEMU_ACCEL`
    /// (TCG by default).
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            dir,
            memory_mib: 256,
            accel: Accel::from_env(),
            incoming: false,
        }
    }

    /// The accelerator this driver uses now (an [`Accel::Auto`] probe runs once per
    /// process).
    #[must_use]
    pub fn effective_accel(&self) -> Accel {
        match self.accel {
            Accel::Auto => {
                static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                if *PROBED.get_or_init(|| kvm_works(&self.binary, &self.dir)) {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            a => a,
        }
    }

    /// The serial log of a workload.
    #[must_use]
    pub fn serial_log(&self, vm_id: &str) -> PathBuf {
        per_vm(&self.dir, vm_id, "serial.log")
    }

    /// The QMP socket of a workload.
    #[must_use]
    pub fn qmp_socket(&self, vm_id: &str) -> PathBuf {
        per_vm(&self.dir, vm_id, "qmp.sock")
    }

    /// The qemu arguments for `spec`, with the PSK channel forwarded from `host_port` on
    /// the spec's listen address.
    pub fn args(&self, spec: &WorkloadSpec, host_port: u16) -> Result<Vec<OsString>> {
        spec.validate()?;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&OsStr]| a.extend(parts.iter().map(|p| p.to_os_string()));
        let log = self.serial_log(&spec.vm_id);
        let qmp = self.qmp_socket(&spec.vm_id);
        // sun_path holds 108 bytes with its NUL.
        if qmp.as_os_str().len() > 107 {
            return Err(Error::Driver(format!(
                "QMP socket path too long for a UNIX socket: {}",
                qmp.display()
            )));
        }
        let mut qmp_opt = opt("unix:", &qmp);
        qmp_opt.push(",server=on,wait=off");
        let mem = self.memory_mib.to_string();
        let (accel, cpu) = match self.effective_accel() {
            // `-cpu host` aborts on some nested hosts (an MSR qemu 7.2 cannot set); the
            // default model boots wherever KVM boots at all.
            Accel::Kvm => ("kvm", "qemu64"),
            _ => ("tcg", "max"),
        };
        push(&[
            "-name".as_ref(),
            format!("guest={}", spec.vm_id).as_ref(),
            "-accel".as_ref(),
            accel.as_ref(),
            "-cpu".as_ref(),
            cpu.as_ref(),
            "-m".as_ref(),
            mem.as_ref(),
            "-nographic".as_ref(),
            // No human monitor (with -nographic it would be on stdio); the agent's
            // machine monitor on a socket of its own.
            "-monitor".as_ref(),
            "none".as_ref(),
            "-qmp".as_ref(),
            &qmp_opt,
            "-no-reboot".as_ref(),
            "-serial".as_ref(),
            &opt("file:", &log),
            // The guest's entropy (TLS, the PSK channel's ECDHE) without waiting for jitter.
            "-device".as_ref(),
            "virtio-rng-pci".as_ref(),
        ]);
        // The boot disk is the provisioned image (bound to H1), served read-only by its
        // crypto domain; DBSP volumes are writable. With volumes, every disk gets its own
        // `-device` (in this order: the boot disk stays vda) with a fixed geometry: qemu
        // then never reads a volume to guess one when it starts, so a migration's target
        // (whose Secure Device Proxy opens the volume only after the source's commit) starts
        // without waiting for it. Source and target build the same devices.
        for (i, uri) in std::iter::once(&spec.disk).chain(&spec.volumes).enumerate() {
            let mut d = OsString::from("file=");
            d.push(escape(uri.as_ref()));
            d.push(",format=raw");
            if spec.volumes.is_empty() {
                d.push(",if=virtio");
            } else {
                d.push(format!(",if=none,id=disk{i}"));
            }
            if i == 0 {
                d.push(",readonly=on");
            }
            push(&["-drive".as_ref(), &d]);
            if !spec.volumes.is_empty() {
                let geometry = if i == 0 {
                    ""
                } else {
                    ",cyls=16383,heads=16,secs=63"
                };
                push(&[
                    "-device".as_ref(),
                    format!("virtio-blk-pci,drive=disk{i}{geometry}").as_ref(),
                ]);
            }
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
            // No option ROM: the guest never boots from the network.
            "virtio-net-pci,netdev=net0,romfile=".as_ref(),
        ]);
        if let Some(n) = &spec.network {
            // The overlay NIC: every frame is one datagram to the crypto domain's network
            // proxy, which seals it for the network domain's other VMs (docs/network-sdp.md).
            for p in [&n.vm_socket, &n.proxy_socket] {
                if p.as_os_str().len() > 107 {
                    return Err(Error::Driver(format!(
                        "overlay socket path too long for a UNIX socket: {}",
                        p.display()
                    )));
                }
            }
            let mut nd = OsString::from("dgram,id=ovl0,local.type=unix,local.path=");
            nd.push(escape(n.vm_socket.as_os_str()));
            nd.push(",remote.type=unix,remote.path=");
            nd.push(escape(n.proxy_socket.as_os_str()));
            push(&[
                "-netdev".as_ref(),
                &nd,
                "-device".as_ref(),
                format!("virtio-net-pci,netdev=ovl0,romfile=,mac={}", n.mac).as_ref(),
                "-fw_cfg".as_ref(),
                format!(
                    "name={FW_CFG_NET},string=mac={}\naddr={}/{}",
                    n.mac, n.address, n.prefix_len
                )
                .as_ref(),
            ]);
        }
        if let Some(vsm) = &spec.vsm {
            // qemu is the crypto domain's one client for the VM's life; it reconnects if the
            // domain closes the connection (a malformed frame from the guest).
            let mut chardev = OsString::from("socket,id=vsm0,reconnect=1,path=");
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
        if self.incoming {
            // -S: the guest stays paused after its state loaded, until the caller has
            // verified the whole saved state and says `cont`.
            a.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        }
        Ok(a)
    }
}

/// A boot sector that writes `K` to qemu's debug console (port 0x402), enters 32-bit
/// protected mode, writes `P`, and halts: `mov al,'K'; mov dx,0x402; out dx,al; cli;
/// lgdt [gdt_desc]; mov eax,cr0; or al,1; mov cr0,eax; jmp 0x08:pm; pm: mov al,'P'; out
/// dx,al; hlt; jmp $` with a flat GDT.
fn kvm_probe_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    let code: &[u8] = &[
        0xB0, b'K', // mov al,'K'
        0xBA, 0x02, 0x04, // mov dx,0x402
        0xEE, // out dx,al
        0xFA, // cli
        0x0F, 0x01, 0x16, 0x40, 0x7C, // lgdt [0x7c40]
        0x0F, 0x20, 0xC0, // mov eax,cr0
        0x0C, 0x01, // or al,1
        0x0F, 0x22, 0xC0, // mov cr0,eax
        0xEA, 0x1A, 0x7C, 0x08, 0x00, // jmp 0x08:0x7c1a
        0x00, // (pad to 0x1a)
        // 0x1a, 32-bit code:
        0xB0, b'P', // mov al,'P'
        0xEE, // out dx,al
        0xF4, // hlt
        0xEB, 0xFD, // jmp $-3 (hlt)
    ];
    s[..code.len()].copy_from_slice(code);
    // GDT at 0x20: null, code (0x08), data (0x10); descriptor at 0x40.
    let gdt: [[u8; 8]; 3] = [
        [0; 8],
        [0xFF, 0xFF, 0, 0, 0, 0x9A, 0xCF, 0],
        [0xFF, 0xFF, 0, 0, 0, 0x92, 0xCF, 0],
    ];
    for (i, d) in gdt.iter().enumerate() {
        s[0x20 + 8 * i..0x28 + 8 * i].copy_from_slice(d);
    }
    s[0x40..0x42].copy_from_slice(&23u16.to_le_bytes());
    s[0x42..0x46].copy_from_slice(&0x7C20u32.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// Whether a VM boots under KVM here: a probe boot sector (`kvm_probe_sector`) must reach
/// protected mode and say so on the debug console within 3 s. Nested KVM on some hosts
/// stalls after the BIOS or aborts at start; then the answer is no and the driver uses TCG.
#[must_use]
pub fn kvm_works(binary: &str, dir: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Some(program) = find_program(binary) else {
        return false;
    };
    let tag = format!("kvm-probe-{}", std::process::id());
    let (img, out) = (
        dir.join(format!("{tag}.img")),
        dir.join(format!("{tag}.out")),
    );
    let result = (|| {
        std::fs::create_dir_all(dir).ok()?;
        std::fs::write(&img, kvm_probe_sector()).ok()?;
        // Spawned by the host agent, which holds TPM connections: no inherited descriptors.
        let mut child = caas_crypto::hardening::command_without_inherited_fds(program)
            .args([
                "-accel", "kvm", "-m", "16", "-display", "none", "-monitor", "none",
            ])
            .args(["-nodefaults", "-no-reboot", "-serial", "none", "-chardev"])
            .arg(opt("file,id=dbg,path=", &out))
            .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg", "-drive"])
            .arg(opt("format=raw,if=ide,file=", &img))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut ok = false;
        while Instant::now() < deadline {
            if std::fs::read(&out).is_ok_and(|b| b.ends_with(b"KP")) {
                ok = true;
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Some(ok)
    })();
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&out);
    result.unwrap_or(false)
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
        let qmp = self.qmp_socket(&spec.vm_id);
        let _ = std::fs::remove_file(&qmp);
        let stderr_log = per_vm(&self.dir, &spec.vm_id, "qemu.log");
        let stderr = std::fs::File::create(&stderr_log).map_err(Error::io("create qemu log"))?;
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
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
                stderr_log,
                qmp,
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
            network: None,
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
        let mut d = QemuDriver::new("/var/lib/caas/vms".into());
        d.accel = Accel::Tcg;
        let a = strings(&d.args(&spec(), 40123)?);
        assert!(has(&a, "-accel", "tcg"));
        assert!(has(&a, "-m", "256"));
        assert!(a.iter().any(|x| x == "-nographic"));
        assert!(has(&a, "-monitor", "none"));
        assert!(has(
            &a,
            "-qmp",
            "unix:/var/lib/caas/vms/vm-42.qmp.sock,server=on,wait=off"
        ));
        assert!(!a.iter().any(|x| x == "-incoming"));
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
                "file=nbd+unix:///disk?socket=/run/caas/sdp,,1.sock,format=raw,if=none,id=disk0,readonly=on",
                "file=nbd+unix:///vol?socket=/run/caas/vol.sock,format=raw,if=none,id=disk1",
            ]
        );
        assert!(has(&a, "-device", "virtio-blk-pci,drive=disk0"));
        assert!(has(
            &a,
            "-device",
            "virtio-blk-pci,drive=disk1,cyls=16383,heads=16,secs=63"
        ));
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
        assert!(has(&a, "-device", "virtio-net-pci,netdev=net0,romfile="));
        assert!(has(&a, "-device", "virtio-rng-pci"));
        assert!(!a.iter().any(|x| x.contains("vsm")));
        Ok(())
    }

    /// The overlay NIC: a dgram netdev on the proxy's socket pair, its MAC, and the guest's
    /// address in fw_cfg (commas in paths escaped).
    #[test]
    fn qemu_command_line_with_an_overlay_nic() -> Result<()> {
        let mut s = spec();
        s.network = Some(crate::spec::NetSpec {
            proxy_socket: "/run/caas/net,1.sock".into(),
            vm_socket: "/run/caas/vm-42.net.sock".into(),
            mac: "52:54:00:00:00:2a".parse().map_err(Error::Config)?,
            address: std::net::Ipv4Addr::new(10, 9, 0, 42),
            prefix_len: 24,
        });
        let mut d = QemuDriver::new("/tmp".into());
        d.accel = Accel::Tcg;
        let a = strings(&d.args(&s, 1)?);
        assert!(has(
            &a,
            "-netdev",
            "dgram,id=ovl0,local.type=unix,local.path=/run/caas/vm-42.net.sock,remote.type=unix,remote.path=/run/caas/net,,1.sock"
        ));
        assert!(has(
            &a,
            "-device",
            "virtio-net-pci,netdev=ovl0,romfile=,mac=52:54:00:00:00:2a"
        ));
        assert!(has(
            &a,
            "-fw_cfg",
            "name=opt/caas/net,string=mac=52:54:00:00:00:2a\naddr=10.9.0.42/24"
        ));
        assert!(
            "01:00:5e:00:00:01".parse::<crate::spec::MacAddr>().is_err(),
            "group MAC"
        );
        if let Some(n) = s.network.as_mut() {
            n.prefix_len = 33;
        }
        assert!(d.args(&s, 1).is_err());
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
        let mut d = QemuDriver::new("/tmp".into());
        d.accel = Accel::Kvm;
        let a = strings(&d.args(&s, 1)?);
        assert!(has(&a, "-accel", "kvm"));
        assert!(has(
            &a,
            "-chardev",
            "socket,id=vsm0,reconnect=1,path=/run/caas/domc.sock"
        ));
        assert!(has(
            &a,
            "-device",
            "virtserialport,chardev=vsm0,name=caas.vsm"
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
    fn qemu_incoming_waits_for_its_state() -> Result<()> {
        let mut d = QemuDriver::new("/tmp".into());
        d.incoming = true;
        let a = strings(&d.args(&spec(), 1)?);
        assert!(has(&a, "-incoming", "defer"));
        assert!(a.iter().any(|x| x == "-S"));
        let long = QemuDriver::new(PathBuf::from("/x".repeat(60)));
        assert!(matches!(long.args(&spec(), 1), Err(Error::Driver(m)) if m.contains("too long")));
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
    fn kvm_probe_sector_is_a_boot_sector() {
        let s = kvm_probe_sector();
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        // The far jump lands on the 32-bit code.
        assert_eq!(s[0x1a], 0xB0);
        assert_eq!(&s[0x14..0x17], &[0xEA, 0x1A, 0x7C]);
    }

    /// `CAAS_QEMU_ACCEL=auto` must never hang a launch on a host whose KVM stalls (nested
    /// KVM here stops after the BIOS): the probe is bounded, and Auto means KVM only when the
    /// probe VM really ran under it.
    #[test]
    fn kvm_probe_is_bounded_and_auto_falls_back_to_tcg() {
        let dir = std::env::temp_dir().join(format!("caas-kvm-probe-{}", std::process::id()));
        let t = Instant::now();
        // Whatever the verdict (nested KVM here stalls or runs depending on the load),
        // the probe returns within its bound.
        let _ = kvm_works("qemu-system-x86_64", &dir);
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        assert!(!kvm_works("qemu-system-x86_64-not-installed", &dir));
        // Auto falls back to TCG when the probe VM did not run under KVM (the verdict is
        // kept per process, and nextest runs each test in its own).
        let mut d = QemuDriver::new(dir.clone());
        d.binary = "qemu-system-x86_64-not-installed".into();
        d.accel = Accel::Auto;
        assert_eq!(d.effective_accel(), Accel::Tcg);
        // The probe leaves nothing behind.
        let left = std::fs::read_dir(&dir).map(|r| r.count()).unwrap_or(0);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(left, 0);
    }

    #[test]
    fn process_driver_needs_its_program() {
        let d = ProcessDriver::new("/nonexistent/caas".into(), "/tmp".into());
        assert!(matches!(d.program(), Err(Error::Driver(_))));
    }
}
