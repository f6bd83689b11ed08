//! The single owner of a TPM context: a dedicated thread that runs closures on the [`Tpm`]
//! one at a time, and a cheap, clonable async handle to it. Serialising all TPM use here
//! keeps the object/session slot accounting (swtpm: 3 each) simple and correct.

use crate::error::Error;
use crate::ops::Tpm;
use std::sync::mpsc;
use tokio::sync::oneshot;

type ReplySlot<T> = std::sync::Arc<std::sync::Mutex<Option<oneshot::Sender<Result<T, Error>>>>>;

struct Job {
    run: Box<dyn FnOnce(&mut Tpm) + Send>,
    fail: Box<dyn FnOnce(Error) + Send>,
}

impl Job {
    fn fail(self, e: Error) {
        (self.fail)(e)
    }
}

/// How long an idle swtpm connection stays open.
pub const SWTPM_IDLE_CLOSE: std::time::Duration = std::time::Duration::from_millis(250);

fn open_fds() -> std::collections::BTreeSet<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Opens the TPM and marks the descriptors libtss2 opened close-on-exec. Every descriptor
/// of the process is marked, not only the new ones: a descriptor number another thread
/// closed and libtss2 then reused would hide in a before/after difference. Rust's standard
/// library and tokio open everything close-on-exec already, so this only reaches what C
/// libraries opened. A child forked in the instant between libtss2's `socket()` and this
/// marking still inherits the socket: hence every spawn also goes through
/// `caas_crypto::hardening::command_without_inherited_fds`.
fn open_cloexec(tcti: &str) -> Result<Tpm, Error> {
    let t = Tpm::open(tcti)?;
    for fd in open_fds() {
        if fd > 2 {
            set_cloexec(fd);
        }
    }
    Ok(t)
}

#[allow(unsafe_code)]
fn set_cloexec(fd: i32) {
    // SAFETY: the borrow lives only for this one fcntl call. The descriptor was opened by
    // libtss2 just now and is held by the live context; if another thread opened and
    // closed a descriptor with this number meanwhile, fcntl fails with EBADF or marks an
    // unrelated descriptor close-on-exec — both harmless here (nothing relies on
    // descriptor inheritance).
    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = nix::fcntl::fcntl(
        bfd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
}

/// Async handle to the TPM owner thread.
#[derive(Debug, Clone)]
pub struct TpmHandle {
    tx: mpsc::Sender<Job>,
}

impl TpmHandle {
    /// Opens the TPM on a new owner thread. For `swtpm:` TCTIs the context is closed after
    /// an idle period (`SWTPM_IDLE_CLOSE`), because swtpm serves one connection at a time and
    /// other tools (tpm2-tools) must be able to reach the same TPM; within a burst of
    /// operations (a launch) it stays open, so the loaded AK and the persistent SRK's handle
    /// are reused. `device:` contexts (kernel resource manager) stay open. The TPM sockets
    /// libtss2 opens are marked close-on-exec, so no child process inherits them.
    pub fn open(tcti: &str) -> Result<Self, Error> {
        let keep_open = !tcti.starts_with("swtpm:");
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let tcti = tcti.to_string();
        std::thread::Builder::new()
            .name("caas-tpm".into())
            .spawn(move || {
                let mut tpm = match open_cloexec(&tcti) {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(()));
                        Some(t)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if !keep_open {
                    tpm = None;
                }
                loop {
                    let job = if keep_open || tpm.is_none() {
                        match rx.recv() {
                            Ok(j) => j,
                            Err(_) => break,
                        }
                    } else {
                        match rx.recv_timeout(SWTPM_IDLE_CLOSE) {
                            Ok(j) => j,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                tpm = None;
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    };
                    if tpm.is_none() {
                        match open_cloexec(&tcti) {
                            Ok(t) => tpm = Some(t),
                            Err(e) => {
                                job.fail(e);
                                continue;
                            }
                        }
                    }
                    if let Some(t) = tpm.as_mut() {
                        (job.run)(t);
                    }
                }
            })
            .map_err(|e| Error::Unexpected(format!("spawn TPM thread: {e}")))?;
        ready_rx.recv().map_err(|_| Error::OwnerGone)??;
        Ok(Self { tx })
    }

    /// Runs `f` on the TPM and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tpm) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (otx, orx) = oneshot::channel();
        let otx = std::sync::Arc::new(std::sync::Mutex::new(Some(otx)));
        let otx2 = otx.clone();
        let send = move |tx: &ReplySlot<T>, r| {
            if let Some(s) = tx.lock().ok().and_then(|mut g| g.take()) {
                let _ = s.send(r);
            }
        };
        let job = Job {
            run: Box::new(move |t| send(&otx, f(t))),
            fail: Box::new(move |e| send(&otx2, Err(e))),
        };
        self.tx.send(job).map_err(|_| Error::OwnerGone)?;
        orx.await.map_err(|_| Error::OwnerGone)?
    }
}
