//! Workload identities: one crypto domain, one identity. When the host agent runs as root,
//! each launch gets two uids (= gids) of its own, drawn at random from the configured range
//! and not used by any running process ([`LaunchIds`]): one for its crypto-domain processes
//! (its Secure Device Proxies, disk and network, and its VSM), one for the workload, so the
//! workload can neither signal nor trace its own crypto domain (nor read its memory). The
//! run directory ([`fresh_dirs`]) is `<vm>/` (the agent's, 0711) with `<vm>/domain/` (the
//! crypto domain's, group the workload's, 0710: the workload reaches its sockets by name
//! but can neither list nor create entries), `<vm>/workload/` (the workload's, 0700) and
//! `<vm>/net/` (the VM's NIC sockets: the workload's, group the crypto domain's, 02710,
//! so that the network proxy, which runs as the crypto domain, reaches qemu's socket). The
//! sockets accept only the workload's uid and the agent's (SO_PEERCRED), so a co-tenant
//! can neither reach the directory nor, through another path to a socket, connect. With
//! `isolation = "required"` (production) a launch that cannot get its own identities is
//! refused; `best-effort` (dev) falls back to the agent's identity with a printed warning.

use crate::config::{IdRange, Isolation};
use crate::error::Error;
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Hands out workload identities.
#[derive(Debug)]
pub struct Identities {
    range: IdRange,
    isolation: Isolation,
    run_dir: PathBuf,
    taken: Arc<Mutex<HashSet<u32>>>,
}

/// The identity a workload and its crypto domain run under. Dropping it returns the uid.
#[derive(Debug)]
pub struct Identity {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Whether this is an identity of the workload's own (false: the agent's, dev fallback).
    pub own: bool,
    taken: Option<Arc<Mutex<HashSet<u32>>>>,
}

/// What a spawned process needs of an [`Identity`].
#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// An identity of the workload's own (false: the agent's).
    pub own: bool,
}

impl Identity {
    /// The copyable part.
    #[must_use]
    pub fn run_as(&self) -> RunAs {
        RunAs {
            uid: self.uid,
            gid: self.gid,
            own: self.own,
        }
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        if let Some(t) = &self.taken
            && let Ok(mut t) = t.lock()
        {
            t.remove(&self.uid);
        }
    }
}

/// The two identities of a launch, as its processes are started with them.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    /// The crypto domain's.
    pub domain: RunAs,
    /// The workload's.
    pub workload: RunAs,
}

impl Ids {
    /// The copyable part of a launch's identities.
    #[must_use]
    pub fn of(l: &LaunchIds) -> Self {
        Self {
            domain: l.domain.run_as(),
            workload: l.workload.run_as(),
        }
    }

    /// `--peer-uid` arguments of a crypto-domain server: the agent and the workload.
    pub(crate) fn peer_args(&self) -> [String; 4] {
        [
            "--peer-uid".into(),
            agent_ids().0.to_string(),
            "--peer-uid".into(),
            self.workload.uid.to_string(),
        ]
    }
}

/// The two identities of one launch (module doc).
#[derive(Debug)]
pub struct LaunchIds {
    /// The crypto domain's (Secure Device Proxies, VSM).
    pub domain: Identity,
    /// The workload's.
    pub workload: Identity,
}

/// Where one launch runs ([`fresh_dirs`]).
#[derive(Debug, Clone)]
pub struct RunDirs {
    /// `<vm>/`, the agent's.
    pub root: PathBuf,
    /// `<vm>/domain/`: the crypto domain's sockets and state.
    pub domain: PathBuf,
    /// `<vm>/workload/`: the workload's spec, injected secrets and ready file.
    pub workload: PathBuf,
    /// `<vm>/net/`: the VM's NIC, the datagram sockets of qemu and of the network proxy
    /// (the workload's, group the crypto domain's, 02710: the proxy, which runs as the
    /// crypto domain, reaches qemu's socket by name but can neither list nor create
    /// entries; new entries take the crypto domain's group, and qemu runs with umask 007 so
    /// that its socket is group-writable). Once the workload is up it is the agent's, 0711
    /// ([`seal_net_dir`]).
    pub net: PathBuf,
}

/// The agent's own effective uid and gid.
#[must_use]
pub fn agent_ids() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

impl Identities {
    /// Identities from `range` for run directories under `run_dir`.
    #[must_use]
    pub fn new(range: IdRange, isolation: Isolation, run_dir: PathBuf) -> Self {
        Self {
            range,
            isolation,
            run_dir,
            taken: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Why workloads cannot get identities of their own here, if they cannot.
    fn unavailable(&self) -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("the host agent does not run as root".into());
        }
        unreachable_ancestor(&self.run_dir).map(|p| {
            format!(
                "{} is not traversable by other users (needs o+x), so a workload identity \
                 could not reach its sockets under {}",
                p.display(),
                self.run_dir.display()
            )
        })
    }

    /// Fresh identities for a launch: the crypto domain's and the workload's (module doc).
    ///
    /// # Errors
    /// [`Error::Isolation`] as [`Identities::allocate`].
    pub fn allocate_launch(&self) -> Result<LaunchIds, Error> {
        let domain = self.allocate()?;
        let workload = self.allocate()?;
        Ok(LaunchIds { domain, workload })
    }

    /// A fresh identity (module doc).
    ///
    /// # Errors
    /// [`Error::Isolation`] when isolation is required and unavailable, or the range is
    /// exhausted.
    pub fn allocate(&self) -> Result<Identity, Error> {
        if let Some(why) = self.unavailable() {
            return match self.isolation {
                Isolation::Required => Err(Error::Isolation(format!(
                    "a workload must run under its own identity: {why}"
                ))),
                Isolation::BestEffort => {
                    eprintln!(
                        "caas host: WARNING: workload and crypto domain share the agent's \
                         identity (dev fallback): {why}"
                    );
                    tracing::warn!(reason = %why, "workload isolation unavailable (dev fallback)");
                    let (uid, gid) = agent_ids();
                    Ok(Identity {
                        uid,
                        gid,
                        own: false,
                        taken: None,
                    })
                }
            };
        }
        let span = u64::from(self.range.last - self.range.first) + 1;
        let mut taken = self
            .taken
            .lock()
            .map_err(|_| Error::Isolation("identity table poisoned".into()))?;
        for _ in 0..256 {
            let r = caas_crypto::random_bytes(8)
                .map_err(|_| Error::Isolation("no randomness".into()))?;
            let mut b = [0u8; 8];
            b.copy_from_slice(&r);
            let off = u32::try_from(u64::from_le_bytes(b) % span).unwrap_or(0);
            let uid = self.range.first + off;
            if taken.contains(&uid) || uid_in_use(uid) {
                continue;
            }
            taken.insert(uid);
            return Ok(Identity {
                uid,
                gid: uid,
                own: true,
                taken: Some(self.taken.clone()),
            });
        }
        Err(Error::Isolation(format!(
            "no free workload identity in {}-{}",
            self.range.first, self.range.last
        )))
    }
}

/// The first directory on the way to `dir` (inclusive) that other users cannot traverse.
fn unreachable_ancestor(dir: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    dir.ancestors()
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o001 == 0)
                .unwrap_or(true)
        })
        .map(Path::to_path_buf)
}

/// Whether any running process has `uid` as its real, effective, saved or filesystem uid
/// (a stopped workload's or an earlier agent's orphan must not share a new workload's uid).
fn uid_in_use(uid: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    let want = uid.to_string();
    procs.flatten().any(|e| {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().skip(1).any(|u| u == want))
        })
    })
}

/// Creates the run directories of a launch afresh under `dir` (module doc): `dir` 0711 of
/// the agent, `dir/domain` 0710 of the crypto domain with the workload's group,
/// `dir/workload` 0700 of the workload.
///
/// # Errors
/// [`Error::Io`] naming the step.
pub fn fresh_dirs(dir: &Path, ids: &LaunchIds) -> Result<RunDirs, Error> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(Error::io("create the run directory"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(Error::io("chmod the run directory"))?;
    let dirs = RunDirs {
        root: dir.to_path_buf(),
        domain: dir.join("domain"),
        workload: dir.join("workload"),
        net: dir.join("net"),
    };
    let (d, w) = (ids.domain.run_as(), ids.workload.run_as());
    std::fs::create_dir(&dirs.domain).map_err(Error::io("create the crypto-domain directory"))?;
    std::fs::set_permissions(&dirs.domain, std::fs::Permissions::from_mode(0o710))
        .map_err(Error::io("chmod the crypto-domain directory"))?;
    if d.own {
        std::os::unix::fs::chown(&dirs.domain, Some(d.uid), Some(w.gid))
            .map_err(Error::io("chown the crypto-domain directory"))?;
    }
    fresh_dir(&dirs.workload, w)?;
    std::fs::create_dir(&dirs.net).map_err(Error::io("create the network directory"))?;
    let mode = if d.own && w.own {
        std::os::unix::fs::chown(&dirs.net, Some(w.uid), Some(d.gid))
            .map_err(Error::io("chown the network directory"))?;
        0o2710
    } else {
        0o700
    };
    // After the chown, which may clear the set-group-ID bit.
    std::fs::set_permissions(&dirs.net, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod the network directory"))?;
    Ok(dirs)
}

/// Closes the launch's network directory ([`RunDirs::net`]) once its workload is up (qemu
/// has bound its NIC socket, `net-vm.sock`, at its start): the directory becomes the
/// agent's, mode 0711, so the workload can no longer create, remove or rename entries in it. Without this, a
/// compromised workload, the directory's owner, could replace its socket with a symlink to
/// another datagram socket the crypto domain may write (a log socket, another service's),
/// and the network proxy, which sends to that path, would deliver the VM's inbound frames
/// there. The sockets' own modes still guard them (the proxy's 0600 the workload's, qemu's
/// writable by the crypto domain's group); a socket entry that is not a socket of the
/// workload's (a symlink planted before) fails the launch. Nothing to do without identities
/// of the launch's own.
///
/// # Errors
/// [`Error::Domain`] for a planted entry, [`Error::Io`] naming the step.
pub fn seal_net_dir(net_dir: &Path, ids: Ids) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let Ids {
        domain: d,
        workload: w,
    } = ids;
    if !(d.own && w.own) {
        return Ok(());
    }
    let vm_socket = net_dir.join(NET_VM_SOCKET);
    match std::fs::symlink_metadata(&vm_socket) {
        Ok(m) if m.file_type().is_socket() && m.uid() == w.uid => {}
        Ok(_) => {
            return Err(Error::Domain(
                "the VM's NIC socket is not a socket of the workload's".into(),
            ));
        }
        // A process workload has no NIC (a stand-in may bind one later, as root).
        Err(_) => {}
    }
    let (uid, gid) = agent_ids();
    std::os::unix::fs::chown(net_dir, Some(uid), Some(gid))
        .map_err(Error::io("chown the network directory"))?;
    std::fs::set_permissions(net_dir, std::fs::Permissions::from_mode(0o711))
        .map_err(Error::io("chmod the network directory"))
}

/// qemu's end of the VM's NIC in [`RunDirs::net`] (its `local.path`).
pub const NET_VM_SOCKET: &str = "net-vm.sock";
/// The network proxy's end of the VM's NIC in [`RunDirs::net`] (qemu's `remote.path`).
pub const NET_PROXY_SOCKET: &str = "net.sock";

/// Creates `dir` afresh for `id`: owned by it, mode 0700.
///
/// # Errors
/// [`Error::Io`] naming the step.
pub fn fresh_dir(dir: &Path, id: RunAs) -> Result<(), Error> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(Error::io("create the workload directory"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("chmod the workload directory"))?;
    if id.own {
        std::os::unix::fs::chown(dir, Some(id.uid), Some(id.gid))
            .map_err(Error::io("chown the workload directory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_ancestor_names_the_closed_directory() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let inner = t.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("{e}"));
        let closed = unreachable_ancestor(&inner);
        assert_eq!(
            closed.as_deref(),
            std::fs::canonicalize(t.path()).ok().as_deref()
        );
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711))
            .unwrap_or_else(|e| panic!("{e}"));
        for p in [t.path().join("a"), inner.clone()] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // Every ancestor of a tempdir (/, /tmp) is traversable.
        assert_eq!(unreachable_ancestor(&inner), None);
    }

    /// Production refuses a launch whose identity could not reach its run directory; dev
    /// falls back to the agent's identity.
    #[test]
    fn required_isolation_refuses_an_unreachable_run_dir() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("{e}"));
        let run = t.path().join("run");
        std::fs::create_dir(&run).unwrap_or_else(|e| panic!("{e}"));
        let range = IdRange {
            first: 290_100,
            last: 290_199,
        };
        let strict = Identities::new(range, Isolation::Required, run.clone());
        match strict.allocate() {
            Err(Error::Isolation(m)) => assert!(
                m.contains("own identity")
                    && (m.contains("not run as root") || m.contains("traversable")),
                "{m}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let dev = Identities::new(range, Isolation::BestEffort, run);
        let id = dev.allocate().unwrap_or_else(|e| panic!("{e}"));
        assert!(!id.own);
        assert_eq!((id.uid, id.gid), agent_ids());
    }

    #[test]
    fn identities_are_distinct_and_returned() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711))
            .unwrap_or_else(|e| panic!("{e}"));
        let ids = Identities::new(
            IdRange {
                first: 290_000,
                last: 290_001,
            },
            Isolation::Required,
            t.path().to_path_buf(),
        );
        if !nix::unistd::geteuid().is_root() {
            assert!(matches!(ids.allocate(), Err(Error::Isolation(_))));
            return;
        }
        let a = ids.allocate().unwrap_or_else(|e| panic!("{e}"));
        let b = ids.allocate().unwrap_or_else(|e| panic!("{e}"));
        assert!(a.own && b.own && a.uid != b.uid);
        assert!(matches!(ids.allocate(), Err(Error::Isolation(_))));
        assert!(matches!(ids.allocate_launch(), Err(Error::Isolation(_))));
        let freed = a.uid;
        drop(a);
        let c = ids.allocate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.uid, freed);
    }

    /// A workload that planted a symlink where its NIC socket belongs fails its launch; a
    /// real socket of its own passes, and the directory is then the agent's, 0711.
    #[test]
    fn sealing_the_network_directory_refuses_a_planted_entry() {
        use std::os::unix::fs::MetadataExt as _;
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (workload identities are separate uids)"
        );
        let (d, w) = (
            RunAs {
                uid: 290_010,
                gid: 290_010,
                own: true,
            },
            RunAs {
                uid: 290_011,
                gid: 290_011,
                own: true,
            },
        );
        let ids = Ids {
            domain: d,
            workload: w,
        };
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let net = t.path().join("net");
        std::fs::create_dir(&net).unwrap_or_else(|e| panic!("{e}"));
        let vm_socket = net.join(NET_VM_SOCKET);
        std::os::unix::fs::symlink("/dev/log", &vm_socket).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::lchown(&vm_socket, Some(w.uid), Some(w.gid))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(seal_net_dir(&net, ids), Err(Error::Domain(_))));
        std::fs::remove_file(&vm_socket).unwrap_or_else(|e| panic!("{e}"));
        let _bound =
            std::os::unix::net::UnixDatagram::bind(&vm_socket).unwrap_or_else(|e| panic!("{e}"));
        // Bound, but not the workload's.
        assert!(matches!(seal_net_dir(&net, ids), Err(Error::Domain(_))));
        std::os::unix::fs::chown(&vm_socket, Some(w.uid), Some(d.gid))
            .unwrap_or_else(|e| panic!("{e}"));
        seal_net_dir(&net, ids).unwrap_or_else(|e| panic!("{e}"));
        let m = std::fs::metadata(&net).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.uid(), m.mode() & 0o7777), (agent_ids().0, 0o711));
    }
}
