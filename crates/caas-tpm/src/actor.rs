//! The single owner of a TPM context: a dedicated thread that runs closures on the [`Tpm`]
//! one at a time, and a cheap, clonable async handle to it. Serialising all TPM use here
//! keeps the object/session slot accounting (swtpm: 3 each) simple and correct.

use crate::error::Error;
use crate::ops::Tpm;
use std::sync::mpsc;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&mut Tpm) + Send>;

/// Async handle to the TPM owner thread.
#[derive(Debug, Clone)]
pub struct TpmHandle {
    tx: mpsc::Sender<Job>,
}

impl TpmHandle {
    /// Opens the TPM on a new owner thread.
    pub fn open(tcti: &str) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let tcti = tcti.to_string();
        std::thread::Builder::new()
            .name("caas-tpm".into())
            .spawn(move || {
                let mut tpm = match Tpm::open(&tcti) {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(()));
                        t
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut tpm);
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
        self.tx
            .send(Box::new(move |t| {
                let _ = otx.send(f(t));
            }))
            .map_err(|_| Error::OwnerGone)?;
        orx.await.map_err(|_| Error::OwnerGone)?
    }
}
