//! The guest end of a virtio-serial port (`/dev/virtio-ports/NAME`) as a byte stream for
//! the framed protocol: inside a VM, the host's qemu connects the port to the crypto
//! domain's UNIX socket (`-chardev socket,path=…` + `virtserialport name=NAME`), so the
//! frames are exactly those of a UNIX-socket connection.
//!
//! Limits, inherent to a serial port (the module documents them for users):
//! - **One opener at a time.** The kernel refuses a second open of the port (EBUSY); the
//!   PKCS#11 module serialises its own calls on the one connection.
//! - **One connection for the VM's life.** qemu holds a single connection to the crypto
//!   domain; closing the port in the guest does not close it. So every guest process that
//!   opens the port after another one is the same *application* to the crypto domain
//!   (sessions and login state carry over until the VM stops or the domain restarts).
//! - **No framing reset.** A process killed in the middle of a request leaves the stream
//!   mid-frame; [`SerialPort::open`] discards bytes already waiting from the host (a stale
//!   answer), but a request cut in half makes the crypto domain close the connection (a
//!   malformed frame); qemu then reconnects (`reconnect=1`) and the next `Hello` starts
//!   afresh, with new sessions.
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// An open virtio-serial port with a read timeout.
#[derive(Debug)]
pub struct SerialPort {
    file: File,
    timeout: Option<Duration>,
}

impl SerialPort {
    /// Opens the character device `path` read-write and discards whatever the host already
    /// sent (an answer to a request of a previous opener). Reads wait at most `timeout`.
    ///
    /// # Errors
    /// The open's error (`EBUSY`: another process has the port), `InvalidInput` when `path`
    /// is not a character device.
    pub fn open(path: &Path, timeout: Option<Duration>) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.file_type().is_char_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a character device (expected a virtio-serial port)",
            ));
        }
        let mut port = Self { file, timeout };
        port.drain()?;
        Ok(port)
    }

    /// Reads and drops everything readable right now.
    fn drain(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        while self.readable(PollTimeout::ZERO)? {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether a read would not block (data, end of stream or an error) within `t`.
    fn readable(&self, t: PollTimeout) -> std::io::Result<bool> {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, t) {
                Ok(n) => return Ok(n > 0),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A second handle on the same open port (a buffered reader beside the writer).
    ///
    /// # Errors
    /// `dup` failed.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            timeout: self.timeout,
        })
    }
}

impl Read for SerialPort {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let t = match self.timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        if !self.readable(t)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer on the virtio-serial port",
            ));
        }
        self.file.read(buf)
    }
}

impl Write for SerialPort {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A previous opener's unread answer must not be taken for the answer to the next
    /// opener's `Hello` (it would desynchronise every later frame); a silent host must give a
    /// timeout, not a hang. A raw-mode pseudo-terminal stands in for the port.
    #[test]
    fn stale_answer_of_a_previous_opener_is_discarded_and_reads_time_out() -> std::io::Result<()> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        use std::os::fd::AsRawFd;
        let pty = nix::pty::openpty(None, None)?;
        let mut t = tcgetattr(&pty.slave)?;
        cfmakeraw(&mut t);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &t)?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))?;
        let mut host = File::from(pty.master);
        host.write_all(b"stale answer of a killed process")?;
        std::thread::sleep(Duration::from_millis(50));
        let mut port = SerialPort::open(&path, Some(Duration::from_millis(200)))?;
        host.write_all(b"fresh")?;
        let mut buf = [0u8; 5];
        port.read_exact(&mut buf)?;
        assert_eq!(&buf, b"fresh");
        let t0 = std::time::Instant::now();
        let e = port.read(&mut [0u8; 1]).err().map(|e| e.kind());
        assert_eq!(e, Some(std::io::ErrorKind::TimedOut));
        assert!(t0.elapsed() < Duration::from_secs(2));
        port.write_all(b"req")?;
        let mut back = [0u8; 3];
        host.read_exact(&mut back)?;
        assert_eq!(&back, b"req");
        Ok(())
    }

    #[test]
    fn a_regular_file_is_not_a_port() -> std::io::Result<()> {
        let p = std::env::temp_dir().join(format!("caas-serial-{}", std::process::id()));
        std::fs::write(&p, b"x").ok();
        let r = SerialPort::open(&p, None);
        let _ = std::fs::remove_file(&p);
        assert!(matches!(r, Err(e) if e.kind() == std::io::ErrorKind::InvalidInput));
        assert!(SerialPort::open(Path::new("/nonexistent/caas.vsm"), None).is_err());
        // A character device opens; its end of stream reads as 0 bytes, not a timeout.
        let mut null = SerialPort::open(Path::new("/dev/null"), Some(Duration::from_millis(10)))?;
        assert_eq!(null.read(&mut [0u8; 8])?, 0);
        Ok(())
    }
}
