//! Process hardening of the crypto domain when it runs as a process: not dumpable (no core
//! files, no ptrace by the same user), RLIMIT_CORE 0, all memory locked where permitted
//! (so key pages never reach swap), privileges dropped when started as root, and a seccomp
//! filter that refuses the system calls a key-holding server never needs (debugging other
//! processes, loading code, mounting, rebooting...).

use crate::Error;
use nix::sys::mman::{MlockAllFlags, mlockall};
use std::collections::BTreeMap;

/// What hardening achieved (mlockall is best effort).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// PR_SET_DUMPABLE 0 applied.
    pub not_dumpable: bool,
    /// RLIMIT_CORE 0 applied.
    pub no_core: bool,
    /// mlockall succeeded.
    pub memory_locked: bool,
    /// Privileges dropped to this uid.
    pub dropped_to: Option<u32>,
    /// seccomp filter installed ([`harden_seccomp`]).
    pub seccomp: bool,
}

/// No core file and no ptrace or `/proc/PID/mem` access by processes of the same user:
/// PR_SET_DUMPABLE 0 and RLIMIT_CORE 0. Every process that holds a key applies it before the
/// key arrives: the crypto domain and the Secure Device Proxy (through [`harden`]) and the
/// host agent (at start, it unseals launch secrets).
/// The one implementation is the key service's (`caas_crypto::hardening`).
pub fn no_core_dumps() -> Result<(), Error> {
    caas_crypto::hardening::forbid_core_dumps().map_err(|e| Error::Harden(e.to_string()))
}

/// mlockall's MCL_ONFAULT: pages are locked as they are first touched. With MCL_FUTURE the
/// crypto domain locks every page mapped now and later; a page that holds a key has been
/// touched, so it is locked as with a plain mlockall, while address space reserved but never
/// used (the allocator's arenas, the unused part of thread stacks) is not populated and
/// locked up front: without it, mimalloc's large reservations under MCL_FUTURE made the
/// process fault in and lock gigabytes, and hang.
const ON_FAULT: MlockAllFlags = MlockAllFlags::from_bits_retain(libc::MCL_ONFAULT);

/// Every page mapped now and later, each locked as it is first touched.
const LOCK_ALL: MlockAllFlags = MlockAllFlags::MCL_CURRENT
    .union(MlockAllFlags::MCL_FUTURE)
    .union(ON_FAULT);

/// The hardening of a key-holding service that keeps its privileges (`who`: the key
/// service, the host agent): [`no_core_dumps`], and its memory locked (as by [`harden`])
/// where it may lock without bound — its effective set has CAP_IPC_LOCK or RLIMIT_MEMLOCK
/// is unlimited — so the HBKs, domain keys and unsealed launch secrets it holds never reach
/// swap (a host administrator reads the host's disk). Without either it locks nothing and
/// warns: under `MCL_FUTURE` a service that outgrew the limit would fail to map memory and
/// abort. Idempotent.
///
/// # Errors
/// [`Error::Harden`] when a step is refused although it was permitted.
pub fn harden_service(who: &str) -> Result<(), Error> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    no_core_dumps()?;
    let capable = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_IPC_LOCK,
    )
    .unwrap_or(false);
    let unlimited = getrlimit(Resource::RLIMIT_MEMLOCK).map(|(soft, _)| soft) == Ok(RLIM_INFINITY);
    if !(capable || unlimited) {
        tracing::warn!(
            "{who}: memory not locked (no CAP_IPC_LOCK, RLIMIT_MEMLOCK bounded); its keys may reach swap"
        );
        return Ok(());
    }
    mlockall(LOCK_ALL).map_err(|e| Error::Harden(format!("mlockall: {e}")))
}

/// Applies the process hardening of the crypto domain (before any key is loaded); the
/// seccomp filter follows once it has dropped root ([`harden_seccomp`]).
pub fn harden() -> Result<Report, Error> {
    let mut r = Report::default();
    no_core_dumps()?;
    r.not_dumpable = true;
    r.no_core = true;
    match mlockall(LOCK_ALL) {
        Ok(()) => r.memory_locked = true,
        Err(e) => tracing::warn!(error = %e, "mlockall not permitted; key memory may be swapped"),
    }
    Ok(r)
}

/// When running as root: hands `paths` (recursively) to `run_as` (default nobody) and
/// switches to it for good. Returns the uid dropped to. `run_as` 0:0 keeps root.
///
/// `mlockall(MCL_FUTURE)` ([`harden`]) stays in force after the switch, so every later
/// mapping (thread stacks, allocator arenas, buffers) is locked too. An unprivileged
/// process may lock only RLIMIT_MEMLOCK bytes, so the limit is lifted first; where it
/// cannot be (no CAP_SYS_RESOURCE, as in containers and this project's CI), the process
/// keeps **CAP_IPC_LOCK alone** across the switch: permitted = effective = {IPC_LOCK},
/// nothing inheritable or ambient. Without that capability, memory mapped after the switch
/// (e.g. the C allocations of aws-lc) would be resident and unlocked, and could reach swap.
/// Only if it cannot be kept either does the process lock what it has now, not later
/// mappings, and warn. The bounding set is emptied in every case.
///
/// Capabilities are per thread: only the calling thread keeps CAP_IPC_LOCK, so call this
/// before the process starts the threads that do its work (threads started later inherit
/// it); threads that already exist keep no capability at all.
pub fn drop_privileges(
    run_as: Option<(u32, u32)>,
    paths: &[&std::path::Path],
) -> Result<Option<u32>, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let (uid, gid) = run_as.unwrap_or((65534, 65534));
    if uid == 0 {
        return Ok(None);
    }
    for p in paths {
        chown_tree(p, uid, gid)?;
    }
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY);
    let unlimited = getrlimit(Resource::RLIMIT_MEMLOCK).map(|(soft, _)| soft) == Ok(RLIM_INFINITY);
    // An empty bounding set: no later execve can gain a capability.
    let bounded = caps::clear(None, caps::CapSet::Bounding);
    if let Err(e) = &bounded {
        tracing::warn!(error = %e, "cannot empty the capability bounding set");
    }
    let keep_ipc_lock = !unlimited
        && match bounded.and_then(|()| caps::securebits::set_keepcaps(true)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "RLIMIT_MEMLOCK cannot be lifted nor CAP_IPC_LOCK kept: locking current memory only"
                );
                let _ = nix::sys::mman::munlockall();
                let _ = mlockall(MlockAllFlags::MCL_CURRENT | ON_FAULT);
                false
            }
        };
    nix::unistd::setgroups(&[]).map_err(|e| Error::Harden(format!("setgroups: {e}")))?;
    nix::unistd::setresgid(gid.into(), gid.into(), gid.into())
        .map_err(|e| Error::Harden(format!("setresgid: {e}")))?;
    nix::unistd::setresuid(uid.into(), uid.into(), uid.into())
        .map_err(|e| Error::Harden(format!("setresuid: {e}")))?;
    if keep_ipc_lock {
        // Kept every root capability through the switch: down to IPC_LOCK, or fail.
        ipc_lock_only().map_err(|e| Error::Harden(format!("capabilities: {e}")))?;
    }
    // Changing credentials resets the dumpable flag; clear it again.
    caas_crypto::hardening::set_not_dumpable().map_err(|e| Error::Harden(e.to_string()))?;
    Ok(Some(uid))
}

/// After a switch made with SECBIT_KEEP_CAPS (which kept the permitted set): CAP_IPC_LOCK
/// permitted and effective, nothing else anywhere, and SECBIT_KEEP_CAPS off again.
fn ipc_lock_only() -> Result<(), caps::errors::CapsError> {
    use caps::{CapSet, Capability};
    let only: caps::CapsHashSet = [Capability::CAP_IPC_LOCK].into_iter().collect();
    caps::set(None, CapSet::Effective, &only)?;
    caps::set(None, CapSet::Permitted, &only)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Ambient)?;
    caps::securebits::set_keepcaps(false)
}

fn chown_tree(p: &std::path::Path, uid: u32, gid: u32) -> Result<(), Error> {
    nix::unistd::chown(p, Some(uid.into()), Some(gid.into()))
        .map_err(|e| Error::Harden(format!("chown {}: {e}", p.display())))?;
    if p.is_dir() {
        for e in std::fs::read_dir(p).map_err(Error::io("read dir", p))? {
            let e = e.map_err(Error::io("read dir", p))?;
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Installs the seccomp filter (after setup that needs the denied calls, such as the switch
/// of [`drop_privileges`]): a deny-list, these calls fail with EPERM; everything else is
/// allowed.
pub fn harden_seccomp() -> Result<(), Error> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let denied = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
    ];
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        denied.iter().map(|s| (*s, Vec::new())).collect();
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| Error::Harden(format!("seccomp arch: {e:?}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| Error::Harden(format!("seccomp filter: {e}")))?;
    let prog: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Harden(format!("seccomp compile: {e}")))?;
    // Every thread of the process (TSYNC): a filter is per thread, and a caller may have
    // started threads already.
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| Error::Harden(format!("seccomp apply: {e}")))
}
