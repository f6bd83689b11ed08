//! Moving a crypto domain's tokens to another crypto domain (suspend/resume and live
//! migration of a launched workload, `docs/suspend-migrate.md`), without the host ever
//! holding a key in the clear outside the secure component's memory.
//!
//! The domain's own key (`--ephemeral-key`) never leaves its process. What leaves is an
//! **export**: every token's image (label, PIN hashes and counters, token objects with
//! their key material and usage counters — not session objects) encrypted and
//! authenticated under a **transfer key** the host agent supplies for this one export:
//!
//! ```text
//! blob = "caasTX01" ‖ nonce (12) ‖ AES-256-GCM(transfer key, nonce,
//!                                              aad = "caasTX01" ‖ u32 BE len ‖ context,
//!                                              TokenExport {slots})
//! ```
//!
//! The **context** names what the export is for (the agent builds it from the workload's
//! id and the suspend counter and stream id, or the migration id): the importing domain is
//! told the context it expects, so an export made for another suspend, another migration or
//! another workload does not authenticate there, and a flipped byte does not either (both:
//! `CKR_ENCRYPTED_DATA_INVALID`). A domain imports at most once, only while no session is
//! open on its tokens (before the workload runs on it). Export and import, refused or not,
//! are in the domain's audit log (`TokenExport`, `TokenImport`).
//!
//! The requests come over the domain's **control channel**, not over the PKCS#11 socket
//! that the workload reaches: `caas domc serve --control-stdio` reads [`ControlRequest`]
//! frames on its standard input and answers [`ControlAnswer`] frames on its standard output,
//! both pipes that only the parent (the host agent) holds. [`Control`] is the agent's end.
//! The transfer key travels only inside the agent's already encrypted channels: the
//! saved-state object under K_s, the migration stream under the session keys.

use crate::error::{Ckr, Error};
use crate::token::TokenImage;
use aws_lc_rs::{aead, rand};
use caas_vsm_proto::blocking::{read_message, write_message};
use caas_vsm_proto::{Blob, Secret, wire_enum, wire_struct};
use cryptoki_sys::{CKR_DEVICE_ERROR, CKR_ENCRYPTED_DATA_INVALID};
use std::io::{Read, Write};
use zeroize::Zeroizing;

/// Magic and version of an export.
pub const MAGIC: &[u8; 8] = b"caasTX01";
/// Length of a transfer key.
pub const KEY_LEN: usize = 32;
/// Longest context accepted.
pub const MAX_CONTEXT: usize = 4096;
const NONCE: usize = 12;

wire_struct! {
    /// What an export holds (encrypted): one image per slot, in slot order.
    pub struct TokenExport {
        /// The tokens.
        pub slots: Vec<TokenImage>,
    }
}

wire_enum! {
    /// A request on the control channel (from the host agent only).
    #[derive(Debug)]
    pub enum ControlRequest {
        /// Export every token under `key` (32 bytes) for `context`.
        Export = 0 { key: Secret, context: Blob },
        /// Import an export made for `context` under `key`, replacing the tokens.
        Import = 1 { key: Secret, context: Blob, blob: Blob },
    }
}

wire_enum! {
    /// The answer to a [`ControlRequest`].
    #[derive(Debug)]
    pub enum ControlAnswer {
        /// The export and how many token objects it holds.
        Exported = 0 { blob: Blob, objects: u64 },
        /// Imported this many token objects.
        Imported = 1 { objects: u64 },
        /// Refused with this CK_RV.
        Refused = 2 { rv: u64 },
    }
}

/// A transfer key: 32 random bytes, zeroized on drop, `Debug` redacted.
pub struct TransferKey(Zeroizing<[u8; KEY_LEN]>);

impl TransferKey {
    /// A fresh random key.
    ///
    /// # Errors
    /// [`Error::Config`] when the system has no randomness.
    pub fn generate() -> Result<Self, Error> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::fill(&mut k[..]).map_err(|_| Error::Config("rng".into()))?;
        Ok(Self(k))
    }

    /// From exactly 32 bytes.
    #[must_use]
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = b.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    /// The key bytes.
    #[must_use]
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for TransferKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransferKey([REDACTED])")
    }
}

fn aad(context: &[u8]) -> Vec<u8> {
    let mut a = MAGIC.to_vec();
    a.extend_from_slice(&(context.len() as u32).to_be_bytes());
    a.extend_from_slice(context);
    a
}

fn aead_key(key: &[u8]) -> Result<aead::LessSafeKey, Ckr> {
    Ok(aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key).map_err(|_| Ckr(CKR_DEVICE_ERROR))?,
    ))
}

/// Encrypts an export's plaintext under `key` for `context`.
pub(crate) fn seal(key: &[u8], context: &[u8], plain: &[u8]) -> Result<Vec<u8>, Ckr> {
    let mut nonce = [0u8; NONCE];
    rand::fill(&mut nonce).map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let mut buf = plain.to_vec();
    aead_key(key)?
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad(context).as_slice()),
            &mut buf,
        )
        .map_err(|_| Ckr(CKR_DEVICE_ERROR))?;
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    Ok(out)
}

/// Opens an export: `CKR_ENCRYPTED_DATA_INVALID` unless it authenticates under `key` for
/// exactly `context`.
pub(crate) fn open(key: &[u8], context: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, Ckr> {
    let bad = Ckr(CKR_ENCRYPTED_DATA_INVALID);
    let rest = blob.strip_prefix(MAGIC.as_slice()).ok_or(bad)?;
    let (nonce, ct) = rest.split_first_chunk::<NONCE>().ok_or(bad)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    let n = aead_key(key)?
        .open_in_place(
            aead::Nonce::assume_unique_for_key(*nonce),
            aead::Aad::from(aad(context).as_slice()),
            &mut buf,
        )
        .map_err(|_| bad)?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// Serves the control channel (`--control-stdio`) until the agent closes it.
pub fn serve_control<R: Read, W: Write>(domain: &crate::domain::Domain, mut r: R, mut w: W) {
    loop {
        let req: ControlRequest = match read_message(&mut r) {
            Ok(req) => req,
            Err(caas_vsm_proto::blocking::IoError::Io(_)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "malformed control request; control channel closed");
                return;
            }
        };
        let answer = match req {
            ControlRequest::Export { key, context } => {
                match domain.export_tokens(key.expose(), &context.0) {
                    Ok((blob, objects)) => ControlAnswer::Exported {
                        blob: Blob(blob),
                        objects,
                    },
                    Err(Ckr(rv)) => ControlAnswer::Refused { rv },
                }
            }
            ControlRequest::Import { key, context, blob } => {
                match domain.import_tokens(key.expose(), &context.0, &blob.0) {
                    Ok(objects) => ControlAnswer::Imported { objects },
                    Err(Ckr(rv)) => ControlAnswer::Refused { rv },
                }
            }
        };
        if write_message(&mut w, &answer).is_err() {
            return;
        }
    }
}

/// The host agent's end of a crypto domain's control channel (the child's stdin and
/// stdout).
pub struct Control {
    to: Box<dyn Write + Send>,
    from: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The domain refused (CK_RV).
    #[error("the crypto domain refused: {0}")]
    Refused(Ckr),
    /// The channel failed or the answer was not the expected one.
    #[error("control channel: {0}")]
    Channel(String),
}

impl Control {
    /// Over the child's pipes.
    #[must_use]
    pub fn new(to: impl Write + Send + 'static, from: impl Read + Send + 'static) -> Self {
        Self {
            to: Box::new(to),
            from: Box::new(from),
        }
    }

    fn call(&mut self, req: &ControlRequest) -> Result<ControlAnswer, ControlError> {
        let ch = |e: &dyn std::fmt::Display| ControlError::Channel(e.to_string());
        write_message(&mut self.to, req).map_err(|e| ch(&e))?;
        match read_message(&mut self.from).map_err(|e| ch(&e))? {
            ControlAnswer::Refused { rv } => Err(ControlError::Refused(Ckr(rv))),
            a => Ok(a),
        }
    }

    /// Exports the domain's tokens under `key` for `context`: (blob, token objects).
    ///
    /// # Errors
    /// [`ControlError`].
    pub fn export(
        &mut self,
        key: &TransferKey,
        context: &[u8],
    ) -> Result<(Vec<u8>, u64), ControlError> {
        match self.call(&ControlRequest::Export {
            key: Secret::new(key.expose().to_vec()),
            context: Blob(context.to_vec()),
        })? {
            ControlAnswer::Exported { blob, objects } => Ok((blob.0, objects)),
            _ => Err(ControlError::Channel("unexpected answer".into())),
        }
    }

    /// Imports `blob` (an export for `context` under `key`): the number of token objects.
    ///
    /// # Errors
    /// [`ControlError::Refused`] with `CKR_ENCRYPTED_DATA_INVALID` for a tampered export or
    /// one made for another context; `CKR_SESSION_EXISTS` once a session is open;
    /// `CKR_OPERATION_NOT_INITIALIZED` for a second import.
    pub fn import(
        &mut self,
        key: &TransferKey,
        context: &[u8],
        blob: &[u8],
    ) -> Result<u64, ControlError> {
        match self.call(&ControlRequest::Import {
            key: Secret::new(key.expose().to_vec()),
            context: Blob(context.to_vec()),
            blob: Blob(blob.to_vec()),
        })? {
            ControlAnswer::Imported { objects } => Ok(objects),
            _ => Err(ControlError::Channel("unexpected answer".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_opens_only_under_its_key_and_context() {
        let k = [7u8; 32];
        let blob = seal(&k, b"vm-1 counter 1", b"tokens").unwrap_or_default();
        assert_eq!(
            open(&k, b"vm-1 counter 1", &blob).map(|p| p.to_vec()),
            Ok(b"tokens".to_vec())
        );
        let bad = Err(Ckr(CKR_ENCRYPTED_DATA_INVALID));
        assert_eq!(open(&k, b"vm-1 counter 2", &blob).map(|p| p.to_vec()), bad);
        assert_eq!(
            open(&[8u8; 32], b"vm-1 counter 1", &blob).map(|p| p.to_vec()),
            bad
        );
        for i in [0, 9, 20, blob.len() - 1] {
            let mut t = blob.clone();
            t[i] ^= 1;
            assert_eq!(
                open(&k, b"vm-1 counter 1", &t).map(|p| p.to_vec()),
                bad,
                "byte {i}"
            );
        }
        assert_eq!(
            open(&k, b"vm-1 counter 1", &blob[..10]).map(|p| p.to_vec()),
            bad
        );
    }
}
