//! Errors of the NBD codec: what was malformed in a peer's message and why.
use thiserror::Error;

/// A message from the peer violated the NBD protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// A magic number did not match.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A message was shorter than its fixed layout.
    #[error("{what} truncated: {len} bytes, need {need}")]
    Truncated {
        /// Which message.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An option's payload was longer than this implementation accepts.
    #[error("option payload of {len} bytes exceeds the limit of {max}")]
    OptionTooLong {
        /// Announced length.
        len: u32,
        /// Our limit.
        max: u32,
    },
    /// An option payload's inner lengths were inconsistent.
    #[error("malformed {what}")]
    Malformed {
        /// Which field.
        what: &'static str,
    },
    /// A string was not UTF-8 or contained NUL.
    #[error("{what} is not a valid NBD string")]
    BadString {
        /// Which field.
        what: &'static str,
    },
    /// The client did not set the fixed-newstyle flag or set unknown flags.
    #[error("unsupported client flags {0:#x}")]
    ClientFlags(u32),
    /// A structured reply chunk had an unknown type or inconsistent length.
    #[error("bad reply chunk: {0}")]
    BadReply(&'static str),
}
