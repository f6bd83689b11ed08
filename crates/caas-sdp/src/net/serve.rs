//! `caas net serve`: the overlay on real sockets. The VM's NIC backend is a UNIX datagram
//! socket pair with qemu (`-netdev dgram,local.type=unix,local.path=VM_PEER,
//! remote.type=unix,remote.path=VM_SOCKET`: each datagram one Ethernet frame); the underlay
//! one UDP socket. One thread moves the frames of both directions (VM → seal → peers;
//! peers → open → VM), the caller's thread reads the control channel ([`super::control`])
//! until end of input.
//!
//! Latency: a frame that arrives while the frame thread sleeps costs a wake-up, and the
//! overlay puts two more of them on each direction of a round trip than qemu's own socket
//! networking (VM → proxy → UDP → proxy → VM). One thread per proxy instead of one per
//! direction keeps the proxy's threads to one wake-up per burst whichever way it goes. After
//! moving frames the thread can also stay awake for a bounded spin (`CAAS_NET_SPIN_US`, off
//! by default, at most 5000 µs; [`caas_crypto::spin`]) polling both sockets, so that the
//! answer to a request (a ping's reply, a TCP segment's ACK) finds it awake. The spin yields
//! between polls and stops as soon as another thread had the CPU (a yield that took long);
//! only frames the thread moved arm it (an attacker's rejected datagrams never do), so it
//! costs at most one bound per burst and an idle proxy sleeps in `poll` (woken each 200 ms
//! tick; test `an_idle_proxy_sleeps_and_only_frames_it_moves_make_it_spin` in
//! `caas/tests/vm_net.rs`). It is off by default: on a contended host it made latency and
//! throughput worse (see `DEFAULT_SPIN_US`).
//!
//! What a frame costs here, and what was tried (2026-12-06; test `bench_proxy_round_trip`
//! in `caas/tests/vm_net.rs`: a ping-sized frame's round trip between two stand-in VMs
//! through two proxies on loopback, 1 ms apart, against one UDP hop each way; 2 cores, the
//! host busy with other builds, load 5-10):
//! - the proxies add 55-120 µs per round trip (four hops: 14-30 µs each, a wake-up and a few
//!   system calls), and use 16-37 µs of CPU per frame, the same with a release build as with
//!   the dev profile (opt-level 1): the cost is the kernel's (sleep, wake-up, context
//!   switch on a VM's vCPUs), not the sealing (AES-GCM of a frame is well under a µs). It
//!   is lower with a busy thread on every CPU (+54 µs against +111 µs idle): waking an idle
//!   vCPU is the dearest part. In the VM benchmark (`bench/vm-net.sh`, both modes in one
//!   boot) the release proxies added 0.14-0.24 ms to a 1.7-1.8 ms ping (1.08-1.14x), the
//!   dev ones 0.29 ms (1.17x);
//! - the frame thread's scheduling (tried with an experimental `CAAS_NET_SCHED`, removed):
//!   SCHED_FIFO made the round trip slower (+155-163 µs) and doubled the CPU per frame
//!   (a real-time wake-up here costs more than it saves, and a datagram flood would have
//!   a real-time thread's claim on the CPU); nice -10 and a short EEVDF slice
//!   (`sched_setattr` `sched_runtime` 100 µs) were within the noise of the default
//!   (the benchmark's latency ratio 1.10x with the slice against 1.08x without). The thread
//!   keeps the scheduler's default: no privilege needed, and a flood of datagrams gets no
//!   more than an ordinary thread's share of the CPU;
//! - not tried: `recvmmsg`/`sendmmsg` batching and fewer allocations per frame (they cut
//!   user-space work, which is not where a frame's time goes; batching helps bulk transfers,
//!   whose ratio already meets its goal), `SO_BUSY_POLL` (it polls a NIC's NAPI queue; UNIX
//!   and loopback sockets have none).
use super::control::Control;
use super::frame::DomainId;
use super::frame::MAX_DATAGRAM;
use super::overlay::{Egress, Ingress, RxDrop, Settings, Shared, session_now};
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `caas net serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The network domain (every member's proxy names the same one).
    #[arg(long)]
    pub domain: String,
    /// This crypto domain's sender id in the network domain (unique among its members;
    /// the agent assigns it with the peer list).
    #[arg(long)]
    pub sender_id: u32,
    /// The UDP address to receive the peers' datagrams on (port 0: any; the chosen address
    /// is printed in the ready line).
    #[arg(long)]
    pub listen: SocketAddr,
    /// This proxy's end of the VM's NIC: the datagram socket created here (qemu's
    /// `remote.path`).
    #[arg(long)]
    pub vm_socket: PathBuf,
    /// The VM's end: the socket qemu binds (its `local.path`); the only sender accepted.
    #[arg(long)]
    pub vm_peer: PathBuf,
    /// Owner of the VM socket when the VM runs as another user than this proxy.
    #[arg(long)]
    pub peer_uid: Option<u32>,
    /// When started as root: switch to UID:GID for good once the sockets are bound, before
    /// any frame is read (the host agent runs each proxy under its crypto domain's
    /// identity). The VM's socket must then be writable by UID or GID.
    #[arg(long, value_name = "UID:GID", value_parser = crate::cli::parse_ids)]
    pub run_as: Option<(u32, u32)>,
    /// Start sending under a newly installed epoch at the latest after this long (ms).
    #[arg(long, default_value_t = 2000)]
    pub switch_after_ms: u64,
    /// Accept the previous epoch this long after a new one was installed (ms).
    #[arg(long, default_value_t = 30_000)]
    pub retire_after_ms: u64,
}

/// A failure to start or run the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad arguments.
    #[error("{0}")]
    Config(String),
    /// An I/O failure (socket setup, control channel).
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// A running proxy's sockets and state (the frame threads stop when it is dropped).
#[derive(Debug)]
pub struct Running {
    /// The shared state (keys, peers, counters).
    pub shared: Arc<Shared>,
    /// The UDP address the proxy receives on.
    pub udp: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    vm_socket: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.vm_socket);
    }
}

fn bind_vm_socket(path: &Path, peer_uid: Option<u32>) -> Result<UnixDatagram, ServeError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(io(format!("{}", dir.display())))?;
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(ServeError::Config(format!(
            "{}: the VM socket's directory must not be writable by group or others",
            dir.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(io(format!("{}", path.display())))?;
        }
        Ok(_) => {
            return Err(ServeError::Config(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let s = UnixDatagram::bind(path).map_err(io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    if let Some(uid) = peer_uid {
        nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), None).map_err(|e| {
            ServeError::Io {
                what: format!("chown {}", path.display()),
                source: e.into(),
            }
        })?;
    }
    Ok(s)
}

fn big_buffers(fd: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(fd, sockopt::RcvBuf, &(4 << 20));
    let _ = setsockopt(fd, sockopt::SndBuf, &(4 << 20));
}

/// A proxy's sockets, bound with the privileges it was started with, its frame thread not
/// yet started ([`Bound::serve`]): `caas net serve` switches identity in between.
#[derive(Debug)]
pub struct Bound {
    shared: Arc<Shared>,
    vm: UnixDatagram,
    udp: UdpSocket,
    local: SocketAddr,
    vm_peer: PathBuf,
    vm_socket: PathBuf,
}

/// Binds the sockets and starts the frame threads.
///
/// # Errors
/// [`ServeError`] for bad arguments or sockets that cannot be set up.
pub fn start(a: &ServeArgs) -> Result<Running, ServeError> {
    bind(a)?.serve()
}

/// Checks the arguments and binds the sockets.
///
/// # Errors
/// [`ServeError`] for bad arguments or sockets that cannot be set up.
pub fn bind(a: &ServeArgs) -> Result<Bound, ServeError> {
    let domain = DomainId::new(&a.domain).map_err(ServeError::Config)?;
    if a.retire_after_ms < a.switch_after_ms {
        // Else a proxy could still send under an epoch its peers already retired.
        return Err(ServeError::Config(
            "--retire-after-ms must not be below --switch-after-ms".into(),
        ));
    }
    let shared = Shared::new(Settings {
        domain,
        sender: a.sender_id,
        session: session_now(),
        switch_after: Duration::from_millis(a.switch_after_ms),
        retire_after: Duration::from_millis(a.retire_after_ms),
    });
    let vm = bind_vm_socket(&a.vm_socket, a.peer_uid)?;
    let udp = UdpSocket::bind(a.listen).map_err(io(format!("bind udp {}", a.listen)))?;
    let local = udp.local_addr().map_err(io("udp address"))?;
    big_buffers(&vm);
    big_buffers(&udp);
    // Sends block (the VM's queue holds few datagrams: backpressure, not loss), but never
    // longer than a tick: a VM that stops reading its NIC drops its own frames only.
    vm.set_write_timeout(Some(TICK))
        .map_err(io("vm socket timeout"))?;
    vm.set_read_timeout(Some(TICK))
        .map_err(io("vm socket timeout"))?;
    udp.set_write_timeout(Some(TICK))
        .map_err(io("udp timeout"))?;
    Ok(Bound {
        shared,
        vm,
        udp,
        local,
        vm_peer: a.vm_peer.clone(),
        vm_socket: a.vm_socket.clone(),
    })
}

impl Bound {
    /// Starts the frame thread.
    ///
    /// # Errors
    /// [`ServeError::Io`] when the thread cannot be started.
    pub fn serve(self) -> Result<Running, ServeError> {
        let Bound {
            shared,
            vm,
            udp,
            local,
            vm_peer,
            vm_socket,
        } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = {
            let pump = Pump {
                eg: Egress::new(shared.clone()),
                ing: Ingress::new(shared.clone()),
                shared: shared.clone(),
                vm,
                udp,
                peer: vm_peer,
                vm_buf: vec![0u8; 65_536],
                udp_buf: vec![0u8; MAX_DATAGRAM + 1],
                logged: std::collections::HashSet::new(),
            };
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("net-frames".into())
                .spawn(move || pump.run(&stop, spin_budget()))
                .map_err(io("thread"))?
        };
        Ok(Running {
            shared,
            udp: local,
            stop,
            threads: vec![frames],
            vm_socket,
        })
    }
}

/// How long the frame thread sleeps at most between looks at the stop flag, and how long
/// a send may block.
const TICK: Duration = Duration::from_millis(200);

/// Frames read from each socket per turn before the other one gets its turn.
const BATCH: usize = 64;

/// How long the frame thread waits awake for the next frame after moving one
/// (`CAAS_NET_SPIN_US`, microseconds; 0 turns the spin off).
fn spin_budget() -> Duration {
    static B: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        caas_crypto::spin::budget_from_env("CAAS_NET_SPIN_US", DEFAULT_SPIN_US, MAX_SPIN_US)
    })
}

/// The default spin: off. Measured under contention (2 cores, two TCG guests and other
/// builds, load 11-17) a yielding spinner gave whole time slices away while frames waited
/// (`bench/vm-net.sh` overlay rounds of 17 and 63 ms and 0.09 MB/s against 4-6 ms and
/// 1.2-2.1 MB/s with it off); 2000 (about one answer's time through a TCG guest, 0.7-1.0 ms)
/// is the setting to measure on a quiet host.
const DEFAULT_SPIN_US: u64 = 0;
/// The longest spin allowed.
const MAX_SPIN_US: u64 = 5000;

/// The frame thread: both directions on one thread (VM → seal → peers; peers → open → VM).
struct Pump {
    eg: Egress,
    ing: Ingress,
    shared: Arc<Shared>,
    vm: UnixDatagram,
    udp: UdpSocket,
    peer: PathBuf,
    vm_buf: Vec<u8>,
    udp_buf: Vec<u8>,
    logged: std::collections::HashSet<&'static str>,
}

/// What one non-blocking read found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Got {
    /// Nothing queued (or a read error, reported once by the kernel).
    Nothing,
    /// A datagram that was dropped (counted).
    Dropped,
    /// A frame moved on.
    Moved,
}

impl Pump {
    /// Moves frames until `stop`. After moving frames it spins for up to `spin` for the next
    /// one before sleeping in `poll`: a request's answer (the other direction) then finds
    /// the thread awake instead of paying a sleep and a wake-up on each proxy. Only frames
    /// that were moved arm the spin — dropped datagrams (an attacker on the underlay, a
    /// stranger on the VM socket) never do — and an idle proxy sleeps (woken each tick).
    fn run(mut self, stop: &AtomicBool, spin: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut armed = false;
        while !stop.load(Ordering::Relaxed) {
            let mut read_any = false;
            for _ in 0..BATCH {
                let (v, u) = (self.pump_vm(), self.pump_udp());
                if v == Got::Nothing && u == Got::Nothing {
                    break;
                }
                read_any = true;
                armed |= v == Got::Moved || u == Got::Moved;
            }
            if read_any {
                continue;
            }
            if std::mem::take(&mut armed)
                && caas_crypto::spin::until_readable(&[self.vm.as_fd(), self.udp.as_fd()], spin)
            {
                continue;
            }
            let mut fds = [
                PollFd::new(self.vm.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.udp.as_fd(), PollFlags::POLLIN),
            ];
            // A tick without input, EINTR or a failed poll: look at the stop flag and read.
            let _ = poll(&mut fds, PollTimeout::from(200u16));
        }
    }

    /// One frame of the VM: sealed and sent to the peers it goes to.
    fn pump_vm(&mut self) -> Got {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        // Readable first, then std's `recv_from` (it parses every sender address, an unbound
        // sender's empty one included); a queued datagram is there for this, the only reader,
        // and the read timeout bounds the read should it not be.
        let mut fds = [PollFd::new(self.vm.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return Got::Nothing;
        }
        let (n, from_vm) = match self.vm.recv_from(&mut self.vm_buf) {
            Ok((n, from)) => (n, from.as_pathname() == Some(self.peer.as_path())),
            Err(_) => return Got::Nothing,
        };
        if !from_vm {
            self.shared.count_vm_refused();
            return Got::Dropped;
        }
        let Ok(out) = self.eg.seal(&self.vm_buf[..n], Instant::now()) else {
            return Got::Dropped;
        };
        for to in &out.to {
            let _ = self.udp.send_to(&out.datagram, to);
        }
        Got::Moved
    }

    /// One datagram of the underlay: opened and delivered to the VM, or dropped.
    fn pump_udp(&mut self) -> Got {
        use nix::sys::socket::{MsgFlags, SockaddrStorage, recvmsg};
        use std::os::fd::AsRawFd;
        let (n, from) = {
            let mut iov = [std::io::IoSliceMut::new(&mut self.udp_buf)];
            match recvmsg::<SockaddrStorage>(
                self.udp.as_raw_fd(),
                &mut iov,
                None,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => (m.bytes, m.address.and_then(|a| socket_addr(&a))),
                Err(_) => return Got::Nothing,
            }
        };
        let Some(from) = from else {
            return Got::Dropped;
        };
        match self.ing.open(from, &mut self.udp_buf[..n], Instant::now()) {
            Ok(r) => {
                let _ = self.vm.send_to(&self.udp_buf[r], &self.peer);
                Got::Moved
            }
            Err(why) => {
                note_drop(&mut self.logged, why, from);
                Got::Dropped
            }
        }
    }
}

fn socket_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Logs the first drop of each reason (every drop is counted; logging each would let a
/// flood fill the log).
fn note_drop(logged: &mut std::collections::HashSet<&'static str>, why: RxDrop, from: SocketAddr) {
    if logged.insert(why.as_str()) {
        tracing::warn!(reason = why.as_str(), %from, "overlay datagram dropped (further drops of this reason are only counted)");
    } else {
        tracing::debug!(reason = why.as_str(), %from, "overlay datagram dropped");
    }
}

/// Serves the control channel of a started proxy until end of input.
///
/// # Errors
/// I/O errors of the channel (a truncated message ends it).
pub fn control_loop(
    run: &Running,
    input: &mut impl Read,
    out: &mut impl Write,
) -> Result<(), ServeError> {
    while let Some(msg) = Control::read(input).map_err(io("control channel"))? {
        let reply = match msg {
            Err(e) => format!("error: {e}"),
            Ok(Control::Key { epoch, key }) => {
                match run.shared.install_key(epoch, key, Instant::now()) {
                    Ok(()) => {
                        tracing::info!(epoch, "network key installed");
                        format!("ok key epoch={epoch}")
                    }
                    Err(e) => format!("error: {e}"),
                }
            }
            Ok(Control::Peers(list)) => match run.shared.set_peers(&list) {
                Ok(()) => {
                    tracing::info!(peers = list.len(), "peer list replaced");
                    format!("ok peers n={}", list.len())
                }
                Err(e) => format!("error: {e}"),
            },
            Ok(Control::Stats) => format!("stats {}", run.shared.stats()),
        };
        writeln!(out, "{reply}").map_err(io("control reply"))?;
        out.flush().map_err(io("control reply"))?;
    }
    Ok(())
}

/// `caas net serve`: hardens the process (`hardening`, see [`super::run`]), binds the
/// sockets, switches to `--run-as` for good, installs the seccomp filter, starts the frame
/// thread, prints `net ready udp=ADDR vm=PATH`, serves the control channel on stdin/stdout
/// until end of input, then stops. No thread exists before the switch (capabilities and
/// filters are per thread, see `caas_domc::harden::drop_privileges`), and no frame or
/// datagram is read before it: a parsing bug is reached only in the unprivileged,
/// filtered process.
///
/// # Errors
/// [`ServeError`].
pub fn run(a: &ServeArgs, hardening: crate::cli::Hardening) -> Result<(), ServeError> {
    let step = |what: &str, f: Option<fn() -> Result<(), String>>| match f {
        Some(f) => f().map_err(|e| ServeError::Config(format!("{what}: {e}"))),
        None => Ok(()),
    };
    step("hardening", hardening.harden)?;
    let bound = bind(a)?;
    match (a.run_as, hardening.drop_to) {
        (Some((uid, gid)), Some(drop_to)) => drop_to(uid, gid)
            .map_err(|e| ServeError::Config(format!("--run-as {uid}:{gid}: {e}")))?,
        (Some(_), None) => {
            return Err(ServeError::Config(
                "--run-as is not supported by this binary (use caas net serve)".into(),
            ));
        }
        (None, _) => {}
    }
    step("seccomp", hardening.seccomp)?;
    let run = bound.serve()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "net ready udp={} vm={}",
        run.udp,
        a.vm_socket.display()
    )
    .and_then(|()| out.flush())
    .map_err(io("stdout"))?;
    control_loop(&run, &mut std::io::stdin().lock(), &mut out)
}
