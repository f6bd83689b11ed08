//! Errors of the VSM wire codec: every way an untrusted byte string can fail to decode.

/// A frame or message that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The input ended before the field `what` was complete.
    #[error("truncated message: {what} needs {needed} more bytes")]
    Truncated {
        /// Which field was being read.
        what: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// An enum tag that this protocol version does not know.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// The enum being decoded.
        what: &'static str,
        /// The tag byte found.
        tag: u8,
    },
    /// A boolean byte other than 0 or 1.
    #[error("invalid boolean byte {0}")]
    InvalidBool(u8),
    /// Bytes left over after a complete message.
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    /// A frame whose declared length exceeds [`crate::MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Declared frame length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string field that is not UTF-8.
    #[error("string field is not UTF-8")]
    InvalidUtf8,
}
