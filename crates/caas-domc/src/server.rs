//! The VSM server: accepts connections on a UNIX socket and serves each on its own thread
//! (crypto is CPU-bound and blocking; one thread per pooled module connection lets calls on
//! different connections run in parallel). Each connection starts with `Hello`; a malformed
//! frame closes that connection only.

use crate::domain::Domain;
use crate::error::Error;
use caas_vsm_proto::blocking::{IoError, read_message, write_message};
use caas_vsm_proto::{PROTOCOL_VERSION, Request, Response};
use cryptoki_sys::CKR_GENERAL_ERROR;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// Binds the socket (replacing a stale one) with mode `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    if path.exists() {
        std::fs::remove_file(path).map_err(Error::io("remove stale socket", path))?;
    }
    let l = UnixListener::bind(path).map_err(Error::io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod", path))?;
    Ok(l)
}

/// Serves connections forever.
pub fn serve(domain: Arc<Domain>, listener: UnixListener) -> Result<(), Error> {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let d = domain.clone();
                let spawned = std::thread::Builder::new()
                    .name("vsm-conn".into())
                    .spawn(move || serve_conn(&d, stream));
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start connection thread");
                }
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(())
}

/// Serves one connection until it closes.
pub fn serve_conn(domain: &Domain, mut stream: UnixStream) {
    // Buffered reads: one syscall usually brings a whole frame (header and body).
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, read_half);
    let app = match read_message::<_, Request>(&mut reader) {
        Ok(Request::Hello { version, app }) if version == PROTOCOL_VERSION => app,
        Ok(_) | Err(_) => {
            let _ = write_message(&mut stream, &Response::rv(CKR_GENERAL_ERROR));
            return;
        }
    };
    let app = domain.attach(app);
    if write_message(&mut stream, &Response::ok(caas_vsm_proto::Body::Empty {})).is_ok() {
        loop {
            let req: Request = match read_message(&mut reader) {
                Ok(r) => r,
                Err(IoError::Io(_)) => break,
                Err(IoError::Protocol(e)) => {
                    tracing::warn!(error = %e, "malformed request; closing connection");
                    break;
                }
            };
            tracing::trace!(?req, "request");
            let resp = domain.handle(&app, req);
            tracing::trace!(rv = resp.rv, "response");
            if write_message(&mut stream, &resp).is_err() {
                break;
            }
        }
    }
    domain.detach(&app);
}
