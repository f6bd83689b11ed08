//! The primitive encoding: little-endian integers, length-prefixed blobs and lists, and the
//! `wire_struct!`/`wire_enum!` macros that derive the codec for message types. Decoding never
//! trusts a length: allocations are bounded by the bytes actually present.

use crate::Error;
use zeroize::Zeroizing;

/// A value with a wire encoding.
pub trait Wire: Sized {
    /// Appends the encoding of `self` to `out`.
    fn put(&self, out: &mut Vec<u8>);
    /// Reads one value from `r`.
    ///
    /// # Errors
    /// Any [`Error`] when the input is malformed.
    fn get(r: &mut Reader<'_>) -> Result<Self, Error>;
}

/// A cursor over untrusted input.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    #[must_use]
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet consumed.
    #[must_use]
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes `n` bytes.
    ///
    /// # Errors
    /// [`Error::Truncated`] when fewer than `n` bytes remain.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::Truncated {
                what,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// Fails unless all input was consumed.
    ///
    /// # Errors
    /// [`Error::TrailingBytes`].
    pub fn finish(&self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes(self.buf.len()))
        }
    }

    fn len_prefix(&mut self, what: &'static str) -> Result<usize, Error> {
        let n = u32::get(self)? as usize;
        if n > self.buf.len() {
            return Err(Error::Truncated {
                what,
                needed: n - self.buf.len(),
            });
        }
        Ok(n)
    }
}

impl Wire for u8 {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(r.array::<1>("u8")?[0])
    }
}

impl Wire for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        match u8::get(r)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::InvalidBool(b)),
        }
    }
}

impl Wire for u32 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(u32::from_le_bytes(r.array("u32")?))
    }
}

impl Wire for u64 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(u64::from_le_bytes(r.array("u64")?))
    }
}

impl Wire for [u8; 16] {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        r.array("id")
    }
}

impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_len(out, self.len());
        out.extend_from_slice(self.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        let n = r.len_prefix("string")?;
        let b = r.take(n, "string")?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::InvalidUtf8)
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Frames are limited to MAX_FRAME (< 4 GiB), so a length always fits.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    n.put(out);
}

impl<T: Wire> Wire for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.put(out);
            }
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        match u8::get(r)? {
            0 => Ok(None),
            1 => Ok(Some(T::get(r)?)),
            tag => Err(Error::UnknownTag {
                what: "option",
                tag,
            }),
        }
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        put_len(out, self.len());
        for v in self {
            v.put(out);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        let n = u32::get(r)? as usize;
        // Every element takes at least one byte: never pre-allocate more than the input.
        let mut v = Vec::with_capacity(n.min(r.remaining()));
        for _ in 0..n {
            v.push(T::get(r)?);
        }
        Ok(v)
    }
}

/// An opaque byte string (data, signatures, attribute values, IVs). `Debug` shows only the
/// length, so data never reaches a log through a derived `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl From<&[u8]> for Blob {
    fn from(v: &[u8]) -> Self {
        Self(v.to_vec())
    }
}

impl Wire for Blob {
    fn put(&self, out: &mut Vec<u8>) {
        put_len(out, self.0.len());
        out.extend_from_slice(&self.0);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        let n = r.len_prefix("blob")?;
        Ok(Blob(r.take(n, "blob")?.to_vec()))
    }
}

/// A secret byte string (PINs, plaintext of decryption): zeroized on drop, `Debug` redacted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes.
    #[must_use]
    pub fn new(v: Vec<u8>) -> Self {
        Self(Zeroizing::new(v))
    }

    /// The secret bytes.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Wire for Secret {
    fn put(&self, out: &mut Vec<u8>) {
        put_len(out, self.0.len());
        out.extend_from_slice(&self.0);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, Error> {
        let n = r.len_prefix("secret")?;
        Ok(Secret::new(r.take(n, "secret")?.to_vec()))
    }
}

/// Derives [`Wire`] for a struct with named fields, encoded as its fields in order.
#[macro_export]
macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        impl $crate::Wire for $name {
            fn put(&self, out: &mut Vec<u8>) {
                $( $crate::Wire::put(&self.$f, out); )*
                let _ = out;
            }
            fn get(r: &mut $crate::Reader<'_>) -> Result<Self, $crate::Error> {
                let _ = &r;
                Ok(Self { $($f: <$t as $crate::Wire>::get(r)?),* })
            }
        }
    };
}

/// Derives [`Wire`] for an enum of struct-like variants, each with an explicit tag byte.
#[macro_export]
macro_rules! wire_enum {
    ($(#[$m:meta])* pub enum $name:ident {
        $($(#[$vm:meta])* $var:ident = $tag:literal { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }),* $(,)?
    }) => {
        $(#[$m])*
        pub enum $name { $($(#[$vm])* $var { $($(#[$fm])* $f: $t),* }),* }
        impl $crate::Wire for $name {
            fn put(&self, out: &mut Vec<u8>) {
                match self {
                    $( $name::$var { $($f),* } => {
                        out.push($tag);
                        $( $crate::Wire::put($f, out); )*
                    } )*
                }
            }
            fn get(r: &mut $crate::Reader<'_>) -> Result<Self, $crate::Error> {
                let tag = <u8 as $crate::Wire>::get(r)?;
                match tag {
                    $( $tag => Ok($name::$var { $($f: <$t as $crate::Wire>::get(r)?),* }), )*
                    tag => Err($crate::Error::UnknownTag { what: stringify!($name), tag }),
                }
            }
        }
    };
}

/// Encodes a message into a fresh buffer (without frame header).
#[must_use]
pub fn to_bytes<T: Wire>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    v.put(&mut out);
    out
}

/// Decodes exactly one message from `buf`.
///
/// # Errors
/// Any [`Error`] when `buf` is not exactly one well-formed message.
pub fn from_bytes<T: Wire>(buf: &[u8]) -> Result<T, Error> {
    let mut r = Reader::new(buf);
    let v = T::get(&mut r)?;
    r.finish()?;
    Ok(v)
}
