//! Errors of the Secure Device Proxy, and their mapping to NBD errnos — the one place
//! where that mapping happens.
use caas_nbd::errno;
use thiserror::Error;

/// What failed in the proxy.
#[derive(Debug, Error)]
pub enum Error {
    /// An IO operation on the ciphertext store or a socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The volume format rejected something (wrong key, tampered header, ...).
    #[error(transparent)]
    Volume(#[from] caas_volume::Error),
    /// A peer violated the NBD protocol.
    #[error("NBD protocol: {0}")]
    Protocol(#[from] caas_nbd::Error),
    /// The upstream NBD export failed a request or the negotiation.
    #[error("upstream export: {0}")]
    Upstream(String),
    /// A block failed authentication (tampered, swapped or corrupted ciphertext/metadata).
    #[error("block {index} failed authentication")]
    BlockAuth {
        /// Block index.
        index: u64,
        /// Byte offset of the block in the virtual disk.
        offset: u64,
    },
    /// Bad configuration or arguments.
    #[error("{0}")]
    Config(String),
    /// The request needs a feature this server does not offer.
    #[error("{0} is not supported")]
    NotSupported(&'static str),
    /// The volume is open read-only.
    #[error("volume is read-only")]
    ReadOnly,
    /// A deferred open ([`crate::engine::Deferred`]) has not happened within its bound, or
    /// failed: the request is refused instead of reading stale data or writing unlocked.
    #[error("volume not open: {0}")]
    NotOpen(&'static str),
}

impl Error {
    /// Wraps an IO error with context.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Error::Io { context, source }
    }

    /// The NBD errno a client sees for this error. Authentication failures are EIO: the
    /// client gets no data, never wrong data.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Error::BlockAuth { .. } | Error::Io { .. } | Error::Upstream(_) | Error::NotOpen(_) => {
                errno::EIO
            }
            Error::Volume(caas_volume::Error::NonceExhausted) => errno::ENOSPC,
            Error::Volume(_) => errno::EIO,
            Error::ReadOnly => errno::EPERM,
            Error::NotSupported(_) => errno::ENOTSUP,
            Error::Protocol(_) | Error::Config(_) => errno::EINVAL,
        }
    }

    /// The virtual-disk offset the error refers to, if any (for NBD_REPLY_TYPE_ERROR_OFFSET).
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::BlockAuth { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}
