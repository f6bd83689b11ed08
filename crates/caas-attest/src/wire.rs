//! Bounds-checked readers and writers for the two byte orders attestation evidence uses:
//! TPM structures are big-endian, the TCG PC Client event log is little-endian. Every read
//! returns `Error::Truncated` instead of panicking, so untrusted input can be fed straight in.

use crate::error::Error;

/// A cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the structure in error messages.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether everything was consumed.
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.remaining() < n {
            return Err(Error::Truncated {
                what: self.what,
                offset: self.pos,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.arr::<1>()?[0])
    }
    /// Big-endian u16.
    pub fn u16_be(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    /// Big-endian u32.
    pub fn u32_be(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    /// Big-endian u64.
    pub fn u64_be(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    /// Little-endian u16.
    pub fn u16_le(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    /// Little-endian u32.
    pub fn u32_le(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    /// A TPM2B: big-endian u16 size followed by that many bytes.
    pub fn tpm2b(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16_be()? as usize;
        self.take(n)
    }
    /// Fails unless everything was consumed.
    pub fn finish(&self) -> Result<(), Error> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Error::Malformed {
                what: self.what,
                reason: format!("{} trailing bytes", self.remaining()),
            })
        }
    }
}

/// Appends a TPM2B (u16 big-endian size + bytes); fails if `b` exceeds 65535 bytes.
pub fn put_tpm2b(out: &mut Vec<u8>, b: &[u8]) -> Result<(), Error> {
    let n = u16::try_from(b.len()).map_err(|_| Error::Malformed {
        what: "TPM2B",
        reason: "too long".into(),
    })?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}
