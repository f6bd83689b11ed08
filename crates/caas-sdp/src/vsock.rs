//! The vsock (AF_VSOCK) listener: `caas volume serve FILE --vsock PORT` listens on
//! `VMADDR_CID_ANY:PORT`, so a VM reaches the proxy on its host (or the proxy runs in a
//! micro-VM) without a network stack; the server serves only the workload VM's CID
//! (`--vsock-peer-cid`). Same approach as the crypto domain's listener
//! (`caas-domc`, nix sockets), but non-blocking and driven by tokio's reactor through
//! [`AsyncFd`]. Note: a host without a vsock transport (no VM, no `vsock_loopback`) can
//! still bind and listen, but nothing can connect to it.
use crate::Error;
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, Shutdown, SockFlag, SockType, VsockAddr, accept4, bind,
    listen, recv, send, shutdown, socket,
};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Any CID (every vsock interface of this VM/host).
pub const VMADDR_CID_ANY: u32 = u32::MAX;

/// A listening vsock socket registered with the tokio reactor.
#[derive(Debug)]
pub struct VsockListener(AsyncFd<OwnedFd>);

impl VsockListener {
    /// Binds `VMADDR_CID_ANY:port` and listens. Must run inside a tokio runtime.
    pub fn bind(port: u32) -> Result<Self, Error> {
        let err =
            |what: &str, e: nix::Error| Error::Config(format!("vsock port {port}: {what}: {e}"));
        if port == u32::MAX {
            return Err(Error::Config(format!(
                "vsock port {port}: not a valid port (VMADDR_PORT_ANY)"
            )));
        }
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| err("socket (is AF_VSOCK available?)", e))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port)).map_err(|e| err("bind", e))?;
        listen(&fd, Backlog::MAXCONN).map_err(|e| err("listen", e))?;
        let fd = register(fd, Interest::READABLE)
            .map_err(|e| Error::Config(format!("vsock port {port}: register: {e}")))?;
        Ok(Self(fd))
    }

    /// The bound port.
    pub fn port(&self) -> io::Result<u32> {
        let a: VsockAddr = nix::sys::socket::getsockname(self.0.get_ref().as_raw_fd())?;
        Ok(a.port())
    }

    /// Waits for the next connection; returns it with the peer's CID.
    pub async fn accept(&self) -> io::Result<(VsockStream, u32)> {
        let fd = self
            .0
            .async_io(Interest::READABLE, |fd| {
                accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
            })
            .await?;
        let fd = owned(fd);
        let peer: VsockAddr = nix::sys::socket::getpeername(fd.as_raw_fd())?;
        let fd = register(fd, Interest::READABLE | Interest::WRITABLE)?;
        Ok((VsockStream(Arc::new(fd)), peer.cid()))
    }
}

/// Registers an owned descriptor with the tokio reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd holds an open descriptor and moves into the AsyncFd, which owns
    // it from now on: nothing else replaces or closes it while it is registered.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

/// Takes ownership of a descriptor that accept4 just returned.
#[allow(unsafe_code)]
fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by a successful accept4 call a moment ago: it is open, and
    // nothing else owns it or will close it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One accepted, non-blocking vsock connection. Clones share the socket, so one clone can
/// read while another writes (the connection's two halves).
#[derive(Debug, Clone)]
pub struct VsockStream(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                recv(fd.get_ref().as_raw_fd(), unfilled, MsgFlags::MSG_DONTWAIT)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            // MSG_NOSIGNAL: a vanished peer is an error, not a SIGPIPE.
            match guard.try_io(|fd| {
                send(
                    fd.get_ref().as_raw_fd(),
                    buf,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                )
                .map_err(io::Error::from)
            }) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            shutdown(self.0.get_ref().as_raw_fd(), Shutdown::Write).map_err(io::Error::from),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_and_reports_bad_ports() {
        // VMADDR_PORT_ANY is refused with a clear message.
        match VsockListener::bind(u32::MAX) {
            Err(Error::Config(m)) => assert!(m.contains("not a valid port"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        // Binding works where AF_VSOCK exists (nothing can connect without a transport).
        let port = 40_000 + (std::process::id() % 20_000);
        match VsockListener::bind(port) {
            Ok(l) => {
                assert_eq!(l.port().ok(), Some(port));
                // The same port twice is a clear error naming the port.
                match VsockListener::bind(port) {
                    Err(Error::Config(m)) => assert!(m.contains(&port.to_string()), "{m}"),
                    other => panic!("second bind: {other:?}"),
                }
            }
            Err(Error::Config(m)) => assert!(m.contains("vsock port"), "{m}"),
            Err(e) => panic!("{e}"),
        }
    }
}
