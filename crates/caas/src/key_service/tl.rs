//! The key service as the TTP of trusted launch and DBSP (seed 003 §4.3, §4.4), and the
//! (untrusted) scheduler. The TTP's secrets (sk_TTP, its X25519 key, K_TTP) are generated
//! once, stored only sealed under the key service's domain key (like the access-key
//! secrets), and held in memory by [`caas_tl::ttp::Ttp`].
//!
//! The routes are `caas_tl::service::router` (TTP + scheduler), mounted by
//! [`super::serve()`] behind [`super::auth`].
use anyhow::Result;
use caas_crypto::SecretBytes;
use caas_store::{Batch, Write};
use caas_tl::TtpKeys;

/// The TTP and scheduler on the key service's store.
pub type TlService = caas_tl::service::TlService<super::attest::KmsAttestStore>;
pub use caas_tl::service::ScheduleRequest;

const KIND_TTP_KEYS: &str = "tl_ttp_keys";
const PURPOSE: &str = "tl-ttp-keys";
/// The sealed keys are bound to the one row that holds them (kind, account, id).
const OWNER: &[&str] = &[KIND_TTP_KEYS, "-", "current"];

/// Loads the TTP keys from the store (sealed under the domain key), creating them on first use.
pub async fn load_or_create_keys(kms: &caas_kms::Kms) -> Result<TtpKeys> {
    let store = &kms.store;
    if store.get(KIND_TTP_KEYS, "-", "current").await?.is_none() {
        let keys = TtpKeys::generate()?;
        let sealed = kms
            .keyring
            .seal_internal(PURPOSE, OWNER, &keys.to_secret_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Must not exist yet: if another node raced us, its keys win and are read below.
        let _ = store
            .commit(Batch {
                writes: vec![Write::Put {
                    kind: KIND_TTP_KEYS.into(),
                    account: "-".into(),
                    id: "current".into(),
                    body: sealed,
                    expect_rev: Some(0),
                }],
                audit: vec![],
            })
            .await;
    }
    let obj = store
        .get(KIND_TTP_KEYS, "-", "current")
        .await?
        .ok_or_else(|| anyhow::anyhow!("TTP keys missing after creation"))?;
    let secret: SecretBytes = kms
        .keyring
        .open_internal(PURPOSE, OWNER, &obj.body)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(TtpKeys::from_secret_bytes(secret.expose())?)
}
