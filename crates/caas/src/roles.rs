//! Wiring of the other roles' commands into the binary: `caas volume` (with a KMS-backed
//! data-key provider), and the exit-code convention of `caas host/attest/profile`.
use anyhow::{Result, bail};
use caas_crypto::{SecretBytes, SecretKey};
use caas_kms::client::KmsClient;
use caas_volume::DataKeyProvider;
use clap::Args;
use serde_json::json;
use std::sync::Arc;

/// `caas volume [--kms-key-id KEY] <command>`.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// KMS key (id, ARN or alias) whose data keys protect volumes created without
    /// `--key-file`. The KMS endpoint and credentials come from the standard AWS variables
    /// (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`),
    /// as `. DIR/env` of `caas dev` sets them.
    #[arg(long, env = "CAAS_VOLUME_KMS_KEY", global = true)]
    pub kms_key_id: Option<String>,
    #[command(subcommand)]
    pub cmd: caas_sdp::cli::VolumeCommand,
}

/// Encryption context bound to every volume data key.
const VOLUME_CONTEXT: &str = "caas:volume";

/// Data keys from the KMS: GenerateDataKey to create, Decrypt to open. The provider trait
/// is synchronous; calls run on the current multi-threaded runtime via `block_in_place`.
pub struct KmsDataKeys {
    client: KmsClient,
    key_id: String,
}

impl std::fmt::Debug for KmsDataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsDataKeys")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KmsDataKeys {
    /// A provider over an existing client.
    pub fn new(client: KmsClient, key_id: &str) -> Self {
        KmsDataKeys {
            client,
            key_id: key_id.to_string(),
        }
    }

    /// From the standard AWS environment variables, when all are set.
    pub fn from_env(key_id: &str) -> Result<Self> {
        let var = |k: &str| {
            std::env::var(k).map_err(|_| {
                anyhow::anyhow!(
                    "{k} is not set (source the env file of `caas dev`, or pass --key-file)"
                )
            })
        };
        let endpoint =
            std::env::var("AWS_ENDPOINT_URL_KMS").or_else(|_| var("AWS_ENDPOINT_URL"))?;
        let region = std::env::var("AWS_DEFAULT_REGION").or_else(|_| var("AWS_REGION"))?;
        let secret = SecretBytes::new(var("AWS_SECRET_ACCESS_KEY")?.into_bytes());
        let ca = std::env::var("AWS_CA_BUNDLE")
            .ok()
            .map(std::fs::read)
            .transpose()?;
        let client = KmsClient::new(
            &endpoint,
            &region,
            &var("AWS_ACCESS_KEY_ID")?,
            secret,
            ca.as_deref(),
        )?;
        Ok(KmsDataKeys {
            client,
            key_id: key_id.to_string(),
        })
    }

    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, caas_kms::client::ClientError>>,
    ) -> Result<T, caas_volume::Error> {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
            .map_err(|e| caas_volume::Error::KeyProvider(format!("KMS: {e}")))
    }
}

impl DataKeyProvider for KmsDataKeys {
    fn generate(&self) -> Result<(SecretKey, Vec<u8>), caas_volume::Error> {
        let (plain, blob) = self.block(
            self.client
                .generate_data_key(&self.key_id, &json!({ VOLUME_CONTEXT: "data-key" })),
        )?;
        let key = SecretKey::from_slice(plain.expose()).map_err(|_| {
            caas_volume::Error::KeyProvider("KMS returned a data key of the wrong size".into())
        })?;
        Ok((key, blob))
    }

    fn unwrap(&self, blob: &[u8]) -> Result<SecretKey, caas_volume::Error> {
        let plain = self.block(
            self.client
                .decrypt(blob, &json!({ VOLUME_CONTEXT: "data-key" })),
        )?;
        SecretKey::from_slice(plain.expose()).map_err(|_| {
            caas_volume::Error::KeyProvider("KMS returned a data key of the wrong size".into())
        })
    }
}

/// Encryption context of the dev VSM's domain key.
const VSM_CONTEXT: &str = "caas:vsm";

/// The dev VSM's domain key, kept on disk only wrapped under the dev key service
/// (`STATE/domain.key.kms`, a KMS ciphertext blob): unwrapped with Decrypt at every start,
/// made with GenerateDataKey at the first and written atomically and durably. The key goes
/// to the VSM over a pipe. A plaintext `STATE/domain.key` (a dev directory from before the
/// wrapped key, whose audit log no longer verifies either) is refused, not migrated:
/// recreate the dev directory.
///
/// # Errors
/// KMS or file errors (never with key material).
pub async fn dev_vsm_key(
    client: &KmsClient,
    key_id: &str,
    state: &std::path::Path,
) -> Result<caas_domc::keysource::DomainKey> {
    use anyhow::Context as _;
    let ec = json!({ VSM_CONTEXT: "domain-key" });
    let blob_path = state.join("domain.key.kms");
    let legacy = state.join("domain.key");
    if legacy.exists() {
        anyhow::bail!(
            "{} is a plaintext VSM key from an older caas dev: recreate the dev directory",
            legacy.display()
        );
    }
    std::fs::create_dir_all(state)?;
    let plain = if let Ok(blob) = std::fs::read(&blob_path) {
        client
            .decrypt(&blob, &ec)
            .await
            .context("unwrap the VSM domain key")?
    } else {
        let (plain, blob) = client
            .generate_data_key(key_id, &ec)
            .await
            .context("make the VSM domain key")?;
        caas_crypto::fs::write_secret(&blob_path, &blob, None)
            .with_context(|| format!("write {}", blob_path.display()))?;
        plain
    };
    let arr: [u8; 32] = plain
        .expose()
        .try_into()
        .map_err(|_| anyhow::anyhow!("the VSM domain key must be 32 bytes"))?;
    Ok(caas_domc::keysource::DomainKey::new(arr))
}

/// Runs `caas volume ...`.
pub async fn run_volume(a: VolumeArgs) -> Result<()> {
    let provider: Option<Arc<dyn DataKeyProvider>> = match &a.kms_key_id {
        Some(k) => Some(Arc::new(KmsDataKeys::from_env(k)?)),
        None => match KmsDataKeys::from_env("") {
            // Opening a KMS-wrapped volume needs no key id: the blob names its key.
            Ok(p) => Some(Arc::new(p)),
            Err(_) => None,
        },
    };
    caas_sdp::cli::run_hardened(a.cmd, provider, device_proxy_hardening())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Maps the `i32` exit convention of the host commands.
pub fn exit_code(r: anyhow::Result<i32>) -> Result<()> {
    match r? {
        0 => Ok(()),
        code => bail!("exit status {code}"),
    }
}

/// The Secure Device Proxies' process hardening (`caas volume serve`, `caas net serve`):
/// they hold their domain's keys and parse what the workload and the network send, so the
/// crypto domain's hardening applies (one implementation, `caas_domc::harden`): no core,
/// memory locked, then root dropped for `--run-as` and the seccomp filter, before the
/// serving threads start.
pub(crate) fn device_proxy_hardening() -> caas_sdp::cli::Hardening {
    caas_sdp::cli::Hardening {
        harden: Some(|| {
            caas_domc::harden::harden()
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
        drop_to: Some(|uid, gid| {
            caas_domc::harden::drop_privileges(Some((uid, gid)), &[])
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
        seccomp: Some(|| caas_domc::harden::harden_seccomp().map_err(|e| e.to_string())),
    }
}
