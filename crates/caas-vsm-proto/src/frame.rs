//! Framing: each message travels as a 4-byte big-endian length followed by that many bytes.
//! [`FrameDecoder`] is sans-IO: feed it bytes as they arrive, take complete frames out.

use crate::Error;

/// Largest accepted frame (16 MiB): bigger inputs are refused before any allocation.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Prepends the frame header to an encoded message.
///
/// # Errors
/// [`Error::FrameTooLarge`] when the message exceeds [`MAX_FRAME`].
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, Error> {
    if payload.len() > MAX_FRAME {
        return Err(Error::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(payload.len() + 4);
    // MAX_FRAME fits in u32.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Parses the 4-byte header, returning the payload length.
///
/// # Errors
/// [`Error::FrameTooLarge`] when the declared length exceeds [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Incremental frame decoder.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete frame's payload, if any.
    ///
    /// # Errors
    /// [`Error::FrameTooLarge`]: the stream is unusable afterwards.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let Some(header) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_len(*header)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(payload))
    }
}
