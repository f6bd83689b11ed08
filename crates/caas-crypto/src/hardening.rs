//! Process hygiene shared by every caas process that holds keys in memory (the key
//! service, the crypto domain): the process is made non-dumpable (`PR_SET_DUMPABLE` 0: no
//! core file, and no `ptrace` attach or `/proc/PID/mem` read by other processes of the same
//! user) and its core-file limit is set to 0 (`RLIMIT_CORE`, soft and hard, so a child or a
//! later `setrlimit` cannot raise it again). One implementation, used by both.
//!
//! Children start with no inherited descriptors ([`command_without_inherited_fds`]): every
//! process caas spawns from a process that may hold a TPM connection (the host agent, `caas
//! dev`) goes through it.

/// A hardening step the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {errno}")]
pub struct HardeningError {
    /// Which step failed (`PR_SET_DUMPABLE`, `RLIMIT_CORE`).
    pub step: &'static str,
    /// The kernel's answer.
    pub errno: nix::errno::Errno,
}

/// Clears the dumpable flag (again after a credential change, which resets it).
pub fn set_not_dumpable() -> Result<(), HardeningError> {
    nix::sys::prctl::set_dumpable(false).map_err(|errno| HardeningError {
        step: "PR_SET_DUMPABLE",
        errno,
    })
}

/// Non-dumpable and no core files: call before any key is loaded.
pub fn forbid_core_dumps() -> Result<(), HardeningError> {
    set_not_dumpable()?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0).map_err(
        |errno| HardeningError {
            step: "RLIMIT_CORE",
            errno,
        },
    )
}

/// A `Command` for `program` that starts with no inherited file descriptors beyond
/// stdin/stdout/stderr. libtss2 opens its TPM sockets without close-on-exec, so a child
/// spawned while a TPM connection is being opened would keep that connection alive; swtpm
/// serves one connection at a time, so the next connection of the TPM's owner then waits
/// forever behind the child's copy (seen: `caas dev`'s own crypto domain, spawned while a
/// host agent enrolled, stalled that host's TPM for good). Everything a process that may
/// hold a TPM connection spawns goes through here.
/// (No redirection around the loop: bash saves the redirected stderr on a high descriptor,
/// the loop closed that copy, and the child then ran with stderr on /dev/null — crypto
/// domains' warnings, refusals included, were lost.)
pub fn command_without_inherited_fds(
    program: impl AsRef<std::ffi::OsStr>,
) -> std::process::Command {
    let mut c = std::process::Command::new("bash");
    c.arg("-c").arg(CLOSE_AND_EXEC).arg(program);
    c
}

/// [`command_without_inherited_fds`] with the child's file-creation mask set to `umask`
/// (e.g. 0o007 for qemu, whose NIC socket its crypto domain's group must be able to write).
pub fn command_without_inherited_fds_and_umask(
    program: impl AsRef<std::ffi::OsStr>,
    umask: u32,
) -> std::process::Command {
    let mut c = std::process::Command::new("bash");
    c.arg("-c")
        .arg(format!("umask {:04o}; {CLOSE_AND_EXEC}", umask & 0o777))
        .arg(program);
    c
}

/// Closes every descriptor above 2, then runs `$0 "$@"`.
const CLOSE_AND_EXEC: &str = r#"for p in /proc/$$/fd/*; do n=${p##*/}; if [ "$n" -gt 2 ] && [ -e "$p" ]; then eval "exec $n>&-"; fi; done; exec "$0" "$@""#;
