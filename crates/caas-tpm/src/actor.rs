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

/// Async handle to the TPM owner thread.
#[derive(Debug, Clone)]
pub struct TpmHandle {
    tx: mpsc::Sender<Job>,
}

impl TpmHandle {
    /// Opens the TPM on a new owner thread. For `swtpm:` TCTIs the context is opened per
    /// operation and closed after it, because swtpm serves one connection at a time and
    /// other tools (tpm2-tools) must be able to reach the same TPM; `device:` contexts
    /// (kernel resource manager) stay open.
    pub fn open(tcti: &str) -> Result<Self, Error> {
        let keep_open = !tcti.starts_with("swtpm:");
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let tcti = tcti.to_string();
        std::thread::Builder::new()
            .name("caas-tpm".into())
            .spawn(move || {
                let mut tpm = match Tpm::open(&tcti) {
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
                while let Ok(job) = rx.recv() {
                    if tpm.is_none() {
                        match Tpm::open(&tcti) {
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
                    if !keep_open {
                        tpm = None;
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
