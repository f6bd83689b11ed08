//! Writing secret files: the one implementation every caas process uses for a file that
//! holds a key, a credential, a PIN, a sealed blob or security state (ARCHITECTURE.md,
//! "one secret-file writer").
//!
//! [`write_secret`] creates or atomically replaces a file; [`create_secret`] atomically
//! creates one and fails with [`std::io::ErrorKind::AlreadyExists`] if the name is taken
//! (keys that must never be overwritten: a node key, a domain key). Both:
//!
//! 1. refuse a target that is a symbolic link (or a directory) — a planted link never
//!    redirects the write, and the caller hears about it instead of silently replacing it;
//! 2. write into a fresh temporary file in the target's directory with an unpredictable
//!    name, opened `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 set through the descriptor
//!    (whatever the umask), and — with an [`Owner`] — handed to that UID:GID through the
//!    descriptor *before* any byte is written;
//! 3. `fsync` the content, then publish it in one step: `rename` over the target
//!    ([`write_secret`]) or `link` to the target name, which fails if it exists
//!    ([`create_secret`]); a reader sees the old file or the whole new one, never a partial
//!    one, and a crash leaves the old file (or no file) plus at most a stray `.caas-secret-*.tmp`;
//! 4. `fsync` the directory, so that the new name is durable when the call returns.
//!
//! [`open_secret_in_place`] is for the one file updated in place rather than replaced (the
//! key service's two-slot checkpoint): created by [`create_secret`], opened `O_NOFOLLOW`.
//!
//! The parent directory itself is trusted: whoever may write into it can delete or replace
//! the file anyway (keep secret files in 0700 directories of their owner).

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The mode of every secret file: read and write for its owner only.
pub const SECRET_FILE_MODE: u32 = 0o600;

/// Who owns a secret file written for another identity (a workload's UID:GID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric group id.
    pub gid: u32,
}

impl Owner {
    /// `uid:gid`.
    #[must_use]
    pub fn new(uid: u32, gid: u32) -> Self {
        Self { uid, gid }
    }
}

impl From<(u32, u32)> for Owner {
    fn from((uid, gid): (u32, u32)) -> Self {
        Self { uid, gid }
    }
}

/// Writes `bytes` to `path` (mode 0600, owned by `owner` when given), replacing an existing
/// file atomically. Refuses a symbolic link or directory at `path`. See the module doc.
///
/// # Errors
/// The I/O error of the step that failed, with that step named in its message; the target
/// is then unchanged and no temporary file is left behind.
pub fn write_secret(path: &Path, bytes: &[u8], owner: Option<Owner>) -> io::Result<()> {
    write(path, bytes, owner, Publish::Replace)
}

/// Creates `path` holding `bytes` (mode 0600, owned by `owner` when given), atomically; fails
/// with [`io::ErrorKind::AlreadyExists`] if anything (a file, a symbolic link, even a dangling
/// one) already has that name. See the module doc.
///
/// # Errors
/// As [`write_secret`]; `AlreadyExists` when the name is taken.
pub fn create_secret(path: &Path, bytes: &[u8], owner: Option<Owner>) -> io::Result<()> {
    write(path, bytes, owner, Publish::CreateNew)
}

/// Opens `path` for reading and writing in place (a file updated slot by slot, like the key
/// service's checkpoint file), creating it empty with mode 0600 first if missing
/// ([`create_secret`]). Never follows a symbolic link at `path`.
///
/// # Errors
/// The I/O error of the create or open step (`ELOOP` for a symbolic link).
pub fn open_secret_in_place(path: &Path) -> io::Result<File> {
    match create_secret(path, &[], None) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
        .map_err(step("open", path))
}

#[derive(Clone, Copy)]
enum Publish {
    Replace,
    CreateNew,
}

fn step<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8], owner: Option<Owner>, publish: Publish) -> io::Result<()> {
    path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(io::Error::new(
                match publish {
                    Publish::CreateNew => io::ErrorKind::AlreadyExists,
                    Publish::Replace => io::ErrorKind::InvalidInput,
                },
                format!(
                    "refusing to write a secret through the symbolic link {}",
                    path.display()
                ),
            ));
        }
        Ok(m) if m.is_dir() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a directory", path.display()),
            ));
        }
        Ok(_) if matches!(publish, Publish::CreateNew) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(step("inspect", path)(e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let suffix: [u8; 12] =
        crate::random_array().map_err(|_| io::Error::other("random number generator failure"))?;
    // Fixed length (any target name fits), unpredictable, and recognisable as ours.
    let tmp = dir.join(format!(".caas-secret-{}.tmp", hex(&suffix)));

    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SECRET_FILE_MODE)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(&tmp)
        .map_err(step("create a temporary file for", path))?;
    let r = fill(&mut f, bytes, owner, path).and_then(|()| {
        drop(f);
        match publish {
            Publish::Replace => std::fs::rename(&tmp, path).map_err(step("rename onto", path)),
            Publish::CreateNew => {
                let r = std::fs::hard_link(&tmp, path).map_err(step("create", path));
                let _ = std::fs::remove_file(&tmp);
                r
            }
        }
    });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(step("sync the directory of", path))
}

/// Mode, owner, content, fsync: in that order, all through the descriptor.
fn fill(f: &mut File, bytes: &[u8], owner: Option<Owner>, path: &Path) -> io::Result<()> {
    // The open mode is masked by the umask; set it exactly (never wider than 0600).
    f.set_permissions(std::fs::Permissions::from_mode(SECRET_FILE_MODE))
        .map_err(step("chmod 600 the temporary file for", path))?;
    if let Some(o) = owner {
        std::os::unix::fs::fchown(&*f, Some(o.uid), Some(o.gid))
            .map_err(step("chown the temporary file for", path))?;
    }
    f.write_all(bytes).map_err(step("write", path))?;
    f.sync_all().map_err(step("sync", path))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn secret_file_is_0600_with_the_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        write_secret(&p, b"k1", None).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"k1");
        // Replacing a file that was world-readable leaves a 0600 file.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&p, b"k2", None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"k2");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn secret_file_gets_its_owner() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pin");
        // As root, a foreign identity (what the host agent does for a workload); otherwise
        // the caller's own (an unprivileged process cannot give files away).
        let me = Owner::new(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let owner = if nix::unistd::geteuid().is_root() {
            Owner::new(54_321, 54_322)
        } else {
            me
        };
        write_secret(&p, b"1234", Some(owner)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (owner.uid, owner.gid));
        assert_eq!(m.mode() & 0o7777, 0o600);
        create_secret(&d.path().join("pin2"), b"5678", Some(owner)).unwrap();
        let m = std::fs::metadata(d.path().join("pin2")).unwrap();
        assert_eq!((m.uid(), m.gid()), (owner.uid, owner.gid));
    }

    #[test]
    fn replacing_never_writes_into_the_existing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        write_secret(&p, b"old contents", None).unwrap();
        // A reader holding the old file (and a hard link to its inode) keeps the old bytes:
        // the new content went into a new inode that replaced the name in one step.
        let witness = d.path().join("witness");
        std::fs::hard_link(&p, &witness).unwrap();
        let old_ino = std::fs::metadata(&p).unwrap().ino();
        write_secret(&p, b"new", None).unwrap();
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), old_ino);
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read(&witness).unwrap(), b"old contents");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn symlink_at_the_target_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"do not touch").unwrap();
        let p = d.path().join("key");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = write_secret(&p, b"secret", None).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = create_secret(&p, b"secret", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // A dangling link is refused too (it would create its target).
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
        assert!(write_secret(&dangling, b"s", None).is_err());
        assert!(create_secret(&dangling, b"s", None).is_err());
        assert!(!d.path().join("nowhere").exists());
    }

    /// The old writers used the predictable name `PATH.tmp`, opened with `O_TRUNC` and
    /// following links: a link planted there wrote the secret into the attacker's file.
    #[test]
    fn planted_symlink_at_the_old_temporary_name_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let loot = d.path().join("loot");
        std::fs::write(&loot, b"").unwrap();
        let p = d.path().join("env");
        std::os::unix::fs::symlink(&loot, p.with_extension("tmp")).unwrap();
        write_secret(&p, b"SECRET", None).unwrap();
        assert_eq!(std::fs::read(&loot).unwrap(), b"");
        assert_eq!(std::fs::read(&p).unwrap(), b"SECRET");
    }

    #[test]
    fn create_secret_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("node.key");
        create_secret(&p, b"first", None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        let e = create_secret(&p, b"second", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn in_place_file_is_created_0600_and_never_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("checkpoint");
        let mut f = open_secret_in_place(&p).unwrap();
        f.write_all(b"slot").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        drop(f);
        // Reopening keeps the content (no truncation).
        drop(open_secret_in_place(&p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"slot");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"x").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(open_secret_in_place(&link).is_err());
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        assert!(write_secret(Path::new("/"), b"x", None).is_err());
        assert!(write_secret(Path::new(""), b"x", None).is_err());
    }
}
