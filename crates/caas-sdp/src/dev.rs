//! `caas dev` integration: creates (once) and serves one demo encrypted volume for the dev
//! tenant under `DIR/sdp/`, and reports the environment lines for `DIR/env`.
use crate::Error;
use crate::engine::{Backend, KeyInput, Volume};
use crate::server::{self, Listen, Listener, ServerConfig};
use crate::store::Store;
use caas_volume::DataKeyProvider;
use caas_volume::header::Dbsp;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Size of the demo volume.
pub const DEV_VOLUME_SIZE: u64 = 64 << 20;

/// A running demo volume.
#[derive(Debug)]
pub struct DevVolume {
    /// The NBD socket.
    pub socket: PathBuf,
    /// The ciphertext file.
    pub volume_file: PathBuf,
    /// `nbd+unix:///caas?socket=...`.
    pub uri: String,
    volume: Arc<Volume>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), Error>>>,
}

impl DevVolume {
    /// Lines for `DIR/env`: `CAAS_NBD_URI`, `CAAS_NBD_SOCKET`, `CAAS_VOLUME_FILE`.
    pub fn env_lines(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CAAS_NBD_URI", self.uri.clone()),
            ("CAAS_NBD_SOCKET", self.socket.display().to_string()),
            ("CAAS_VOLUME_FILE", self.volume_file.display().to_string()),
        ]
    }

    /// Stops serving and closes the volume cleanly.
    pub async fn stop(mut self) -> Result<(), Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await
                .map_err(|_| Error::Config("NBD server task failed".into()))??;
        }
        self.volume.close().await?;
        let _ = std::fs::remove_file(&self.socket);
        Ok(())
    }
}

/// Creates `DIR/sdp/demo.caasvol` if missing (data key from `provider`, or else a random
/// key kept in `DIR/sdp/demo.key`, mode 0600, for the dev deployment only) and serves it
/// on `DIR/sdp/nbd.sock`.
pub async fn start_dev(
    dir: &Path,
    provider: Option<Arc<dyn DataKeyProvider>>,
) -> Result<DevVolume, Error> {
    let sdp = dir.join("sdp");
    std::fs::create_dir_all(&sdp).map_err(Error::io("create dev sdp dir"))?;
    let volume_file = sdp.join("demo.caasvol");
    let key = match provider {
        Some(p) => KeyInput::Provider(p),
        None => {
            let key_file = sdp.join("demo.key");
            if !key_file.exists() {
                let k =
                    caas_crypto::random_key().map_err(|_| Error::Config("RNG failure".into()))?;
                caas_crypto::fs::create_secret(&key_file, k.expose(), None)
                    .map_err(Error::io("create dev key file"))?;
            }
            KeyInput::Raw(Arc::new(caas_volume::keys::read_key_file(&key_file)?))
        }
    };
    if !volume_file.exists() {
        let d = Dbsp {
            domain_id: b"dev".to_vec(),
            security_profile: b"dev".to_vec(),
            ..Dbsp::default()
        };
        crate::cli::create_file(&volume_file, DEV_VOLUME_SIZE, &key, d).await?;
    }
    let (volume, _) = Volume::open(Store::open_file(&volume_file, true, None)?, &key, true).await?;
    let socket = sdp.join("nbd.sock");
    let listener = Listener::bind(&Listen::Unix(socket.clone())).await?;
    let cfg = ServerConfig::default();
    let uri = format!(
        "nbd+unix:///{}?socket={}",
        cfg.export_name,
        socket.display()
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let backend = Backend::Encrypted(volume.clone());
    let task = tokio::spawn(server::serve(listener, backend, cfg, async {
        let _ = rx.await;
    }));
    tracing::info!(%uri, "serving the demo encrypted volume");
    Ok(DevVolume {
        socket,
        volume_file,
        uri,
        volume,
        stop: Some(tx),
        task: Some(task),
    })
}
