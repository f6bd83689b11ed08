//! `caas net serve`: the overlay on real sockets. The VM's NIC backend is a UNIX datagram
//! socket pair with qemu (`-netdev dgram,local.type=unix,local.path=VM_PEER,
//! remote.type=unix,remote.path=VM_SOCKET`: each datagram one Ethernet frame); the underlay
//! one UDP socket. Two threads move frames (VM → seal → peers; peers → open → VM), the
//! caller's thread reads the control channel ([`super::control`]) until end of input.
//!
//! Socket hygiene as the disk proxy's: the VM socket is created 0600 (owned by
//! `--peer-uid` when the VM runs as another user) in a directory nobody else may write, and
//! a datagram on it counts only when the kernel names its sender as the VM's own socket
//! path (`--vm-peer`); anything else is dropped and counted (`vm_refused`).
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

/// Binds the sockets and starts the frame threads.
///
/// # Errors
/// [`ServeError`] for bad arguments or sockets that cannot be set up.
pub fn start(a: &ServeArgs) -> Result<Running, ServeError> {
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
    let tick = Some(Duration::from_millis(200));
    vm.set_read_timeout(tick).map_err(io("vm socket timeout"))?;
    udp.set_read_timeout(tick).map_err(io("udp timeout"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let vm_rx = vm.try_clone().map_err(io("vm socket"))?;
    let udp_rx = udp.try_clone().map_err(io("udp socket"))?;

    // VM → seal → peers.
    let tx = {
        let (shared, stop, peer) = (shared.clone(), stop.clone(), a.vm_peer.clone());
        std::thread::Builder::new()
            .name("net-tx".into())
            .spawn(move || {
                let mut eg = Egress::new(shared.clone());
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = vm.recv_from(&mut buf) else {
                        continue;
                    };
                    if from.as_pathname() != Some(peer.as_path()) {
                        shared.count_vm_refused();
                        continue;
                    }
                    if let Ok(out) = eg.seal(&buf[..n], Instant::now()) {
                        for to in &out.to {
                            let _ = udp.send_to(&out.datagram, to);
                        }
                    }
                }
            })
            .map_err(io("thread"))?
    };
    // Peers → open → VM.
    let rx = {
        let (shared, stop, peer) = (shared.clone(), stop.clone(), a.vm_peer.clone());
        std::thread::Builder::new()
            .name("net-rx".into())
            .spawn(move || {
                let mut ing = Ingress::new(shared);
                let mut buf = vec![0u8; MAX_DATAGRAM + 1];
                let mut logged = std::collections::HashSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp_rx.recv_from(&mut buf) else {
                        continue;
                    };
                    match ing.open(from, &mut buf[..n], Instant::now()) {
                        Ok(r) => {
                            let _ = vm_rx.send_to(&buf[r], &peer);
                        }
                        Err(why) => note_drop(&mut logged, why, from),
                    }
                }
            })
            .map_err(io("thread"))?
    };
    Ok(Running {
        shared,
        udp: local,
        stop,
        threads: vec![tx, rx],
        vm_socket: a.vm_socket.clone(),
    })
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

/// `caas net serve`: hardens the process, starts the proxy, prints
/// `net ready udp=ADDR vm=PATH`, serves the control channel on stdin/stdout until end of
/// input, then stops.
///
/// # Errors
/// [`ServeError`].
pub fn run(a: &ServeArgs) -> Result<(), ServeError> {
    caas_crypto::hardening::set_not_dumpable()
        .and_then(|()| caas_crypto::hardening::forbid_core_dumps())
        .map_err(|e| ServeError::Config(format!("hardening: {e}")))?;
    let run = start(a)?;
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
