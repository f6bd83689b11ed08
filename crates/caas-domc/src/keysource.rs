//! Where the crypto domain's 32-byte key (which seals token objects at rest) comes from,
//! behind [`DomainKeySource`]: a 0600 key file in the state directory (standalone domains),
//! an inherited file descriptor, or [`Ephemeral`]: a fresh key that exists only in the
//! domain's (locked, non-dumpable) memory — what the host agent uses for a launched
//! workload's domain, whose token is re-initialised from the sealed configuration at every
//! launch, so no domain key ever lies on the host's disk. Never argv or environment.

use crate::Error;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The domain key. `Debug` is redacted; the bytes are zeroized on drop.
pub struct DomainKey(Zeroizing<[u8; 32]>);

impl DomainKey {
    /// Wraps key bytes.
    #[must_use]
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key bytes.
    #[must_use]
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for DomainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainKey([REDACTED])")
    }
}

/// A source of the domain key.
pub trait DomainKeySource: std::fmt::Debug {
    /// Obtains the key.
    ///
    /// # Errors
    /// [`Error::DomainKey`] or [`Error::Io`].
    fn load(&self) -> Result<DomainKey, Error>;
}

/// A key file readable only by its owner (mode 0600 or stricter).
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// Path of the 32-byte key file.
    pub path: PathBuf,
    /// Create a fresh random key if the file does not exist (dev mode).
    pub create: bool,
}

impl KeyFile {
    /// The conventional key file of a state directory.
    #[must_use]
    pub fn in_state_dir(dir: &Path, create: bool) -> Self {
        Self {
            path: dir.join("domain.key"),
            create,
        }
    }
}

fn read_key(r: impl Read, what: &str) -> Result<DomainKey, Error> {
    let mut buf = Zeroizing::new(Vec::new());
    r.take(33)
        .read_to_end(&mut buf)
        .map_err(|e| Error::DomainKey(format!("reading {what}: {e}")))?;
    let arr: [u8; 32] = buf
        .as_slice()
        .try_into()
        .map_err(|_| Error::DomainKey(format!("{what} must hold exactly 32 bytes")))?;
    Ok(DomainKey::new(arr))
}

impl DomainKeySource for KeyFile {
    fn load(&self) -> Result<DomainKey, Error> {
        if self.create && !self.path.exists() {
            let mut key = [0u8; 32];
            aws_lc_rs::rand::fill(&mut key).map_err(|_| Error::DomainKey("rng".into()))?;
            let key = DomainKey::new(key);
            caas_crypto::fs::create_secret(&self.path, key.expose(), None)
                .map_err(Error::io("create", &self.path))?;
            return Ok(key);
        }
        let f = std::fs::File::open(&self.path).map_err(Error::io("open", &self.path))?;
        let mode = f
            .metadata()
            .map_err(Error::io("stat", &self.path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::DomainKey(format!(
                "{} is accessible by group or others (mode {:o}); chmod 600 it",
                self.path.display(),
                mode & 0o777
            )));
        }
        read_key(f, "key file")
    }
}

/// A fresh random key generated in memory and never written anywhere: token objects sealed
/// under it are unreadable once the process ends.
#[derive(Debug, Clone, Copy)]
pub struct Ephemeral;

impl DomainKeySource for Ephemeral {
    fn load(&self) -> Result<DomainKey, Error> {
        let mut key = DomainKey::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut key.0[..]).map_err(|_| Error::DomainKey("rng".into()))?;
        Ok(key)
    }
}

/// A key passed by the parent on an inherited file descriptor (read once, then closed).
#[derive(Debug, Clone, Copy)]
pub struct InheritedFd(pub i32);

impl DomainKeySource for InheritedFd {
    fn load(&self) -> Result<DomainKey, Error> {
        // Opening /proc/self/fd/N gives a fresh description of the same pipe or file without
        // taking ownership of a raw descriptor (no unsafe code needed).
        let path = PathBuf::from(format!("/proc/self/fd/{}", self.0));
        let f = std::fs::File::open(&path).map_err(Error::io("open inherited fd", &path))?;
        // The parent writes the key and closes its end; the inherited descriptor itself stays
        // open (closing a raw fd would need unsafe code) but is marked close-on-exec by the
        // server before anything else runs.
        read_key(f, "inherited fd")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_keys_are_fresh_and_never_written() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir", "/tmp"))?;
        let (a, b) = (Ephemeral.load()?, Ephemeral.load()?);
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.expose(), &[0u8; 32]);
        let files = std::fs::read_dir(dir.path())
            .map_err(Error::io("read dir", dir.path()))?
            .count();
        assert_eq!(files, 0);
        Ok(())
    }

    #[test]
    fn key_file_created_0600_and_reloaded() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir", "/tmp"))?;
        let k1 = KeyFile::in_state_dir(dir.path(), true).load()?;
        let k2 = KeyFile::in_state_dir(dir.path(), false).load()?;
        assert_eq!(k1.expose(), k2.expose());
        assert_eq!(format!("{k1:?}"), "DomainKey([REDACTED])");
        let p = dir.path().join("domain.key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .map_err(Error::io("chmod", &p))?;
        assert!(matches!(
            KeyFile::in_state_dir(dir.path(), false).load(),
            Err(Error::DomainKey(_))
        ));
        Ok(())
    }
}
