//! A minimal blocking client of the VSM protocol, for the dev bootstrap (initialising the
//! token), tests and the guest agent of a VM (over a virtio-serial port,
//! [`Client::over`]). The PKCS#11 module has its own pooled client.

use crate::error::{Ckr, Error};
use caas_vsm_proto::blocking::{read_message, write_message};
use caas_vsm_proto::{Body, PROTOCOL_VERSION, Request, Response};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A byte stream carrying the frames (a UNIX socket, a virtio-serial port, ...).
pub trait Stream: Read + Write + Send + std::fmt::Debug {}
impl<T: Read + Write + Send + std::fmt::Debug> Stream for T {}

/// One connection (one application instance).
#[derive(Debug)]
pub struct Client {
    stream: Box<dyn Stream>,
}

impl Client {
    /// Connects and says hello with a fresh application id.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let stream = UnixStream::connect(path).map_err(Error::io("connect", path))?;
        Self::over(Box::new(stream))
    }

    /// Says hello over an established stream (e.g. a
    /// [`caas_vsm_proto::serial::SerialPort`] inside a VM).
    pub fn over(stream: Box<dyn Stream>) -> Result<Self, Error> {
        let mut app = [0u8; 16];
        aws_lc_rs::rand::fill(&mut app).map_err(|_| Error::Config("rng".into()))?;
        let mut c = Self { stream };
        c.call(Request::Hello {
            version: PROTOCOL_VERSION,
            app,
        })?;
        Ok(c)
    }

    /// Sends a request; a non-OK CK_RV becomes [`Error::Token`].
    pub fn call(&mut self, req: Request) -> Result<Body, Error> {
        write_message(&mut self.stream, &req).map_err(|e| Error::Config(e.to_string()))?;
        let r: Response =
            read_message(&mut self.stream).map_err(|e| Error::Config(e.to_string()))?;
        if r.rv != 0 {
            return Err(Error::Token(Ckr(r.rv)));
        }
        Ok(r.body)
    }
}
