//! The VSM's token travels with a suspended or migrated workload (`docs/suspend-migrate.md`,
//! "The VSM's token"). The VSM's domain key never leaves its process: the agent asks the
//! VSM, over the control channel only the agent holds (the VSM's stdin/stdout,
//! [`caas_domc::transfer`]), for an export of its tokens sealed under a fresh
//! [`TransferKey`] the agent supplies, for a context naming this workload and this suspend
//! (counter, stream id) or migration (id). The key and the export travel together in a
//! [`TokenTransfer`] section, only inside the agent's encrypted channels: the saved-state
//! object (under K_s) or the migration stream (under the session keys). The target agent
//! gives both to its new VSM with the context IT expects (from the authenticated state
//! header or the TTP's migration statement): an export of another suspend, migration or
//! workload, or a tampered one, is refused by the VSM (`CKR_ENCRYPTED_DATA_INVALID`,
//! audited there as `TokenImport`) and by the agent (`token_invalid`).

use crate::error::Error;
use caas_crypto::SecretBytes;
use caas_domc::transfer::{Control, ControlError, KEY_LEN, TransferKey};
use std::sync::{Arc, Mutex};

/// The agent's end of a VSM's control channel.
pub(crate) type VsmControl = Arc<Mutex<Control>>;

/// Largest export accepted in a section (the saved state's section is bounded too).
const MAX_EXPORT: usize = 8 << 20;

/// The context of a suspend's export: the workload, the TTP's counter and the state's
/// stream id.
pub(crate) fn suspend_context(vm_id: &str, h2: &str, counter: u64, stream_id: &str) -> Vec<u8> {
    caas_tl::crypto::lp(&[
        b"caas vsm token transfer v1",
        b"suspend",
        vm_id.as_bytes(),
        h2.as_bytes(),
        &counter.to_be_bytes(),
        stream_id.as_bytes(),
    ])
}

/// The context of a live migration's export: the workload and the migration id.
pub(crate) fn migration_context(vm_id: &str, h2: &str, migration_id: &[u8]) -> Vec<u8> {
    caas_tl::crypto::lp(&[
        b"caas vsm token transfer v1",
        b"migrate",
        vm_id.as_bytes(),
        h2.as_bytes(),
        migration_id,
    ])
}

/// A token export and its transfer key (`key (32) ‖ export`), as it travels inside an
/// encrypted channel. `Debug` redacted; the key is zeroized on drop.
pub(crate) struct TokenTransfer {
    key: TransferKey,
    blob: Vec<u8>,
}

impl std::fmt::Debug for TokenTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTransfer")
            .field("export_bytes", &self.blob.len())
            .finish_non_exhaustive()
    }
}

fn invalid(why: impl Into<String>) -> Error {
    Error::Tl(caas_tl::Error::rejected("token_invalid", why))
}

fn control_err(what: &str, e: ControlError) -> Error {
    match e {
        ControlError::Refused(c) => invalid(format!("the VSM refused the token {what} ({c})")),
        ControlError::Channel(c) => Error::Domain(format!("VSM control channel: {c}")),
    }
}

impl TokenTransfer {
    /// The section's bytes.
    pub(crate) fn to_bytes(&self) -> SecretBytes {
        let mut v = Vec::with_capacity(KEY_LEN + self.blob.len());
        v.extend_from_slice(self.key.expose());
        v.extend_from_slice(&self.blob);
        SecretBytes::new(v)
    }

    /// Parses a section (bounded; the export itself is checked by the VSM).
    pub(crate) fn parse(b: &[u8]) -> Result<Self, Error> {
        if b.len() <= KEY_LEN || b.len() > KEY_LEN + MAX_EXPORT {
            return Err(invalid("malformed token section"));
        }
        let (k, blob) = b.split_at(KEY_LEN);
        let key = TransferKey::from_slice(k).ok_or_else(|| invalid("malformed token section"))?;
        Ok(Self {
            key,
            blob: blob.to_vec(),
        })
    }

    /// Blocking: asks the VSM for an export under a fresh key for `context`.
    pub(crate) fn export_blocking(ctl: &VsmControl, context: &[u8]) -> Result<Self, Error> {
        let key = TransferKey::generate().map_err(|e| Error::Domain(e.to_string()))?;
        let mut g = ctl
            .lock()
            .map_err(|_| Error::Domain("VSM control channel".into()))?;
        let (blob, _) = g
            .export(&key, context)
            .map_err(|e| control_err("export", e))?;
        Ok(Self { key, blob })
    }

    /// Asks the VSM for an export (see [`TokenTransfer::export_blocking`]).
    pub(crate) async fn export(ctl: VsmControl, context: Vec<u8>) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::export_blocking(&ctl, &context))
            .await
            .map_err(|e| Error::Domain(format!("token export task: {e}")))?
    }

    /// Gives the export to a new VSM, which imports it only for exactly `context`:
    /// the number of token objects imported.
    pub(crate) async fn import(self, ctl: VsmControl, context: Vec<u8>) -> Result<u64, Error> {
        tokio::task::spawn_blocking(move || {
            let mut g = ctl
                .lock()
                .map_err(|_| Error::Domain("VSM control channel".into()))?;
            g.import(&self.key, &context, &self.blob)
                .map_err(|e| control_err("import", e))
        })
        .await
        .map_err(|e| Error::Domain(format!("token import task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_separate_workloads_counters_and_migrations() {
        let a = suspend_context("vm-1", "h2", 1, "s");
        assert_ne!(a, suspend_context("vm-1", "h2", 2, "s"));
        assert_ne!(a, suspend_context("vm-2", "h2", 1, "s"));
        assert_ne!(a, suspend_context("vm-1", "h2", 1, "t"));
        assert_ne!(a, migration_context("vm-1", "h2", b"s"));
    }

    #[test]
    fn a_token_section_is_bounded_and_keeps_key_and_export_apart() -> Result<(), Error> {
        assert!(TokenTransfer::parse(&[0u8; KEY_LEN]).is_err());
        let t = TokenTransfer::parse(&[[1u8; KEY_LEN].as_slice(), b"export"].concat())?;
        assert_eq!(t.key.expose(), &[1u8; KEY_LEN]);
        assert_eq!(t.blob, b"export");
        assert_eq!(
            TokenTransfer::parse(t.to_bytes().expose())?.blob,
            b"export".to_vec()
        );
        assert!(!format!("{t:?}").contains("1, 1"));
        Ok(())
    }
}
