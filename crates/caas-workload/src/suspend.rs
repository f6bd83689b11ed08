//! The VM side of encrypted suspend and resume (seed 001 §3.4; `docs/suspend-migrate.md`):
//! [`save_vm`] stops a VM and streams its qemu state through a pipe straight into a
//! [`StateWriter`] (the plaintext state never reaches a file); [`restore_vm`] feeds a
//! [`StateReader`] into a qemu started with `-incoming defer -S` and continues the guest
//! only after the whole stream, final chunk included, authenticated.
//!
//! qemu receives the pipe's end through QMP `getfd` (SCM_RIGHTS) and migrates to or from
//! `fd:caas-state`. A tampered or truncated state stops the copy at the first bad chunk;
//! qemu then sees an early end of its stream and the caller kills it: the guest never runs
//! on a partial or forged state.
use crate::qmp::{MigrationUri, Qmp, QmpError};
use crate::state::{StateError, StateReader, StateWriter, unwrap_state};
use std::io::{Read, Write};
use std::os::fd::AsFd as _;
use std::time::{Duration, Instant};

/// The name under which qemu holds the state pipe.
const FD_NAME: &str = "caas-state";

/// Why a save or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// qemu refused or failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The saved state was refused (tampered, truncated, ...) or could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The pipe to qemu failed.
    #[error("state pipe: {0}")]
    Pipe(std::io::Error),
    /// qemu did not reach the expected state.
    #[error("qemu: {0}")]
    Qemu(String),
}

/// What a save or restore measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timing {
    /// Bytes of qemu's migration stream.
    pub stream_bytes: u64,
    /// Milliseconds the guest was stopped before the stream started (save) or until it was
    /// continued (restore).
    pub millis: u64,
}

/// Stops the VM and writes its migration stream into `out` (after the caller wrote the
/// crypto-domain section). The VM stays stopped; the caller finishes the writer and quits
/// qemu.
pub fn save_vm<W: Write>(
    qmp: &mut Qmp,
    out: &mut StateWriter<W>,
    timeout: Duration,
) -> Result<Timing, SuspendError> {
    let t = Instant::now();
    qmp.stop()?;
    let (mut r, w) = std::io::pipe().map_err(SuspendError::Pipe)?;
    qmp.getfd(FD_NAME, w.as_fd())?;
    // qemu holds its own copy now; ours must go, or the read below never sees the end.
    drop(w);
    if let Err(e) = qmp.migrate(&MigrationUri::Fd(FD_NAME.into())) {
        // qemu keeps the descriptor it was given until told to close it.
        let _ = qmp.execute("closefd", Some(serde_json::json!({ "fdname": FD_NAME })));
        return Err(e.into());
    }
    // qemu closes its end when the stream is complete (or failed).
    let bytes = std::io::copy(&mut r, out).map_err(SuspendError::Pipe)?;
    let info = qmp.wait_migration(timeout, Duration::from_millis(10))?;
    if qmp.query_status()?.running {
        return Err(SuspendError::Qemu(
            "the VM runs after its state was saved".into(),
        ));
    }
    tracing::debug!(bytes, ?info, "VM state saved");
    Ok(Timing {
        stream_bytes: bytes,
        millis: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Feeds the rest of `input` (after the crypto-domain section) to a qemu started with
/// `-incoming defer -S`, checks that the stream authenticated to its final chunk and that
/// qemu loaded it, then continues the guest. On any error the guest has not run; the
/// caller kills qemu.
pub fn restore_vm<R: Read>(
    qmp: &mut Qmp,
    input: &mut StateReader<R>,
    timeout: Duration,
) -> Result<Timing, SuspendError> {
    let t = Instant::now();
    let (r, mut w) = std::io::pipe().map_err(SuspendError::Pipe)?;
    qmp.getfd(FD_NAME, r.as_fd())?;
    drop(r);
    qmp.migrate_incoming(&MigrationUri::Fd(FD_NAME.into()))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Tampered or cut: stop here; qemu gets an early EOF when `w` drops.
            Err(e) => return Err(unwrap_state(e).into()),
        };
        w.write_all(&buf[..n]).map_err(SuspendError::Pipe)?;
        bytes += n as u64;
    }
    zeroize::Zeroize::zeroize(&mut buf);
    if !input.finished() {
        return Err(StateError::Truncated(0).into());
    }
    drop(w);
    // qemu loads the stream; with -S it stays paused afterwards.
    let deadline = Instant::now() + timeout;
    loop {
        let st = qmp.query_status()?;
        match st.status.as_str() {
            "inmigrate" | "restore-vm" => {}
            "paused" | "prelaunch" => break,
            other => {
                return Err(SuspendError::Qemu(format!(
                    "after loading the state qemu is {other}"
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(SuspendError::Qemu("loading the state timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = qmp.query_migrate()?;
    if info.status != crate::qmp::MigrationStatus::Completed {
        return Err(SuspendError::Qemu(format!(
            "incoming migration ended as {:?}",
            info.status
        )));
    }
    qmp.cont()?;
    Ok(Timing {
        stream_bytes: bytes,
        millis: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}
