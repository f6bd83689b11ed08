//! The vsock (AF_VSOCK) transport: a crypto domain running in its own micro-VM, or a
//! workload VM reaching the crypto domain on its host, without a network stack. The domain
//! listens on `VMADDR_CID_ANY:PORT` (`caas domc serve --vsock PORT`); the PKCS#11 module
//! connects to `vsock:CID:PORT`. The stream carries exactly the same frames as the UNIX
//! socket; the server serves only the peer CID it was told (`--vsock-peer-cid`). Note: a host without a vsock transport driver (no VM around, no `vsock_loopback`)
//! can still bind and listen, but connections to it time out.

use crate::error::Error;
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, VsockAddr, accept4, bind, listen, recv,
    send, socket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Any CID (listen on every vsock interface of this VM/host).
pub const VMADDR_CID_ANY: u32 = u32::MAX;
/// Let the kernel choose the port.
pub const VMADDR_PORT_ANY: u32 = u32::MAX;

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

/// One accepted vsock connection.
#[derive(Debug)]
pub struct VsockStream(OwnedFd);

impl VsockListener {
    /// Binds `VMADDR_CID_ANY:port` and listens.
    ///
    /// # Errors
    /// [`Error::Config`] naming the port and the OS error (no vsock support, port in use).
    pub fn bind(port: u32) -> Result<Self, Error> {
        let err =
            |what: &str, e: nix::Error| Error::Config(format!("vsock port {port}: {what}: {e}"));
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err("socket (is AF_VSOCK available?)", e))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port)).map_err(|e| err("bind", e))?;
        listen(&fd, Backlog::MAXCONN).map_err(|e| err("listen", e))?;
        Ok(Self(fd))
    }

    /// The port actually bound (useful with [`VMADDR_PORT_ANY`]).
    ///
    /// # Errors
    /// The OS error of getsockname.
    pub fn port(&self) -> std::io::Result<u32> {
        let a: VsockAddr = nix::sys::socket::getsockname(self.0.as_raw_fd())?;
        Ok(a.port())
    }

    /// Waits for the next connection; returns it with the peer's CID.
    ///
    /// # Errors
    /// The OS error of accept or getpeername.
    pub fn accept(&self) -> std::io::Result<(VsockStream, u32)> {
        loop {
            match accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    let s = VsockStream(owned(fd));
                    let peer: VsockAddr = nix::sys::socket::getpeername(s.0.as_raw_fd())?;
                    return Ok((s, peer.cid()));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Takes ownership of a descriptor that accept4 just returned.
#[allow(unsafe_code)]
fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by a successful accept4 call a moment ago: it is open, and
    // nothing else owns it or will close it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl VsockStream {
    /// A second handle on the same connection (for a buffered reader beside the writer).
    ///
    /// # Errors
    /// The OS error of dup.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl std::io::Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match recv(self.0.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl std::io::Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            // MSG_NOSIGNAL: a vanished peer is an error, not a SIGPIPE.
            match send(self.0.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binding works wherever AF_VSOCK exists (no transport needed); a taken port is a
    /// clear error naming the port.
    #[test]
    fn binds_and_reports_a_taken_port() {
        let l = match VsockListener::bind(VMADDR_PORT_ANY) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: no AF_VSOCK here ({e})");
                return;
            }
        };
        let port = l.port().unwrap_or(0);
        assert!(port != 0 && port != VMADDR_PORT_ANY, "port {port}");
        let e = VsockListener::bind(port).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains(&format!("vsock port {port}: bind"))),
            "{e:?}"
        );
    }
}
