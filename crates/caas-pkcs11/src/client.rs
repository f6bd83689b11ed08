//! The module's side of the connection to the crypto domain: configuration and a pool of
//! UNIX-socket connections. A call takes an idle connection (or opens one), sends one request,
//! reads one response and puts the connection back; the pool lock is held only to pop and
//! push, so calls from many threads run concurrently on separate connections. A transport
//! failure drops that connection and yields CKR_DEVICE_ERROR (CKR_DEVICE_REMOVED when the
//! domain cannot be reached at all); nothing here can crash the host process.

use crate::Error;
use caas_vsm_proto::blocking::{IoError, read_message};
use caas_vsm_proto::{PROTOCOL_VERSION, Request, Response, frame_message};
use cryptoki_sys::{CK_RV, CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_GENERAL_ERROR};
use nix::sys::socket::{MsgFlags, send};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Raw config file (`CAAS_PKCS11_CONFIG`, TOML).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Socket of the crypto domain.
    socket: PathBuf,
    /// Seconds to wait for one answer (default 300).
    timeout_secs: Option<u64>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket of the crypto domain.
    pub socket: PathBuf,
    /// Read timeout per call.
    pub timeout: Duration,
}

impl Config {
    /// From the environment: CAAS_PKCS11_SOCKET wins over CAAS_PKCS11_CONFIG.
    pub fn from_env() -> Result<Self, Error> {
        if let Some(s) = std::env::var_os("CAAS_PKCS11_SOCKET") {
            return Ok(Self {
                socket: PathBuf::from(s),
                timeout: Duration::from_secs(300),
            });
        }
        let path = std::env::var("CAAS_PKCS11_CONFIG").map_err(|_| Error::NotConfigured)?;
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            socket: raw.socket,
            timeout: Duration::from_secs(raw.timeout_secs.unwrap_or(300)),
        })
    }
}

/// One pooled connection: the stream (for writes) and a buffered reader over a clone of it.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    reader: std::io::BufReader<UnixStream>,
}

/// The connection pool of one C_Initialize.
#[derive(Debug)]
pub struct Client {
    cfg: Config,
    app: [u8; 16],
    idle: Mutex<Vec<Conn>>,
    pid: u32,
}

fn send_all(s: &UnixStream, mut buf: &[u8]) -> Result<(), CK_RV> {
    while !buf.is_empty() {
        // MSG_NOSIGNAL: a dead peer must give EPIPE, not kill the host process with SIGPIPE.
        match send(s.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(CKR_DEVICE_ERROR),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Err(CKR_DEVICE_ERROR),
        }
    }
    Ok(())
}

fn exchange(c: &mut Conn, req: &Request) -> Result<Response, CK_RV> {
    let frame = frame_message(req).map_err(|_| cryptoki_sys::CKR_DATA_LEN_RANGE)?;
    send_all(&c.stream, &frame)?;
    match read_message::<_, Response>(&mut c.reader) {
        Ok(r) => Ok(r),
        Err(IoError::Io(_)) => Err(CKR_DEVICE_ERROR),
        Err(IoError::Protocol(_)) => Err(CKR_DEVICE_ERROR),
    }
}

impl Client {
    /// A pool for `cfg` with a fresh application id.
    pub fn new(cfg: Config) -> Result<Self, CK_RV> {
        // The application id only needs to be unique, not secret; the module links no
        // crypto library, so it comes straight from the kernel.
        let mut app = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|_| CKR_GENERAL_ERROR)?,
            &mut app,
        )
        .map_err(|_| CKR_GENERAL_ERROR)?;
        Ok(Self {
            cfg,
            app,
            idle: Mutex::new(Vec::new()),
            pid: std::process::id(),
        })
    }

    fn connect(&self) -> Result<Conn, CK_RV> {
        let s = UnixStream::connect(&self.cfg.socket).map_err(|_| CKR_DEVICE_REMOVED)?;
        s.set_read_timeout(Some(self.cfg.timeout))
            .map_err(|_| CKR_DEVICE_ERROR)?;
        let reader = std::io::BufReader::with_capacity(
            64 * 1024,
            s.try_clone().map_err(|_| CKR_DEVICE_ERROR)?,
        );
        let mut s = Conn { stream: s, reader };
        let r = exchange(
            &mut s,
            &Request::Hello {
                version: PROTOCOL_VERSION,
                app: self.app,
            },
        )?;
        if r.rv != 0 {
            return Err(CKR_DEVICE_ERROR);
        }
        Ok(s)
    }

    /// Opens one connection up front so the domain sees this application.
    pub fn warm_up(&self) {
        if let Ok(s) = self.connect() {
            self.put_back(s);
        }
    }

    fn put_back(&self, s: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s);
    }

    /// Whether this pool was created by the current process (a forked child must call
    /// C_Initialize itself and never share the parent's connections).
    #[must_use]
    pub fn owned_by_this_process(&self) -> bool {
        self.pid == std::process::id()
    }

    /// Sends one request and returns the response.
    pub fn call(&self, req: &Request) -> Result<Response, CK_RV> {
        if !self.owned_by_this_process() {
            return Err(cryptoki_sys::CKR_CRYPTOKI_NOT_INITIALIZED);
        }
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut s = match pooled {
            Some(s) => s,
            None => self.connect()?,
        };
        let r = exchange(&mut s, req)?;
        self.put_back(s);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_are_refused() {
        let raw: Result<RawConfig, _> = toml::from_str(include_str!("../caas-pkcs11.toml.example"));
        assert!(raw.is_ok(), "{raw:?}");
        let bad: Result<RawConfig, _> = toml::from_str("socket = \"/x\"\nsokcet = 1\n");
        assert!(bad.is_err());
    }
}
