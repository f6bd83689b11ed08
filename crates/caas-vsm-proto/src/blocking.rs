//! Blocking frame I/O over any `Read`/`Write` stream: the thin glue shared by the module's
//! connection pool and the crypto domain's per-connection threads.

use crate::{Error, Wire, frame_len, frame_message, from_bytes};
use std::io::{Read, Write};

/// Errors of a framed stream.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The transport failed or closed.
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a malformed message.
    #[error("protocol: {0}")]
    Protocol(#[from] Error),
}

/// Writes one message as a frame.
///
/// # Errors
/// [`IoError`].
pub fn write_message<W: Write, T: Wire>(w: &mut W, msg: &T) -> Result<(), IoError> {
    let f = frame_message(msg)?;
    w.write_all(&f)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and decodes it.
///
/// # Errors
/// [`IoError`]; `Io(UnexpectedEof)` when the peer closed between frames.
pub fn read_message<R: Read, T: Wire>(r: &mut R) -> Result<T, IoError> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h)?;
    let len = frame_len(h)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(from_bytes(&buf)?)
}
