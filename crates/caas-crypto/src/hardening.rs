//! Process hygiene shared by every caas process that holds keys in memory (the key
//! service, the crypto domain): the process is made non-dumpable (`PR_SET_DUMPABLE` 0: no
//! core file, and no `ptrace` attach or `/proc/PID/mem` read by other processes of the same
//! user) and its core-file limit is set to 0 (`RLIMIT_CORE`, soft and hard, so a child or a
//! later `setrlimit` cannot raise it again). One implementation, used by both.

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
