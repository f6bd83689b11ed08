//! Ciphertext stores behind the proxy: a local file or block device, or an upstream NBD
//! export served by the untrusted storage host (the chained front-end/back-end of seed 001
//! §3.1). The store only ever sees ciphertext, metadata and the header.
use crate::Error;
use caas_nbd::handshake as hs;
use caas_nbd::transmission::{self as tx, Command, Request};
use caas_nbd::{opt, rep};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// A ciphertext store.
#[derive(Debug, Clone)]
pub enum Store {
    /// A local file or block device.
    File(Arc<FileStore>),
    /// An upstream NBD export.
    Nbd(Arc<NbdStore>),
}

impl Store {
    /// Opens a local file (`create_len`: create or extend it sparsely to this length).
    pub fn open_file(path: &Path, writable: bool, create_len: Option<u64>) -> Result<Self, Error> {
        let store = Self::open_file_unlocked(path, writable, create_len.is_some())?;
        store.lock(writable)?;
        if let (Some(len), Store::File(f)) = (create_len, &store) {
            f.file
                .set_len(len)
                .map_err(Error::io("size ciphertext file"))?;
        }
        Ok(store)
    }

    /// Opens a local file without its lock (the deferred open: the file is opened with the
    /// proxy's start privileges, locked by [`Store::lock`] when the previous writer has
    /// released it). Nothing may be read from or written to it before the lock is held.
    pub fn open_file_unlocked(path: &Path, writable: bool, create: bool) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(Error::io("open ciphertext file"))?;
        Ok(Store::File(Arc::new(FileStore {
            file: Arc::new(file),
            path: path.to_path_buf(),
        })))
    }

    /// Takes the file's lock. One writer at a time: two proxies writing one volume (two
    /// hosts attaching the same DBSP volume, or a second `caas volume serve`) would reuse
    /// nonces and corrupt it. Writers take an exclusive lock, readers a shared one; it lives
    /// as long as the file is open. An upstream export is locked by its server.
    pub fn lock(&self, writable: bool) -> Result<(), Error> {
        let Store::File(f) = self else {
            return Ok(());
        };
        let locked = if writable {
            f.file.try_lock()
        } else {
            f.file.try_lock_shared()
        };
        locked.map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => {
                Error::Config(format!("{} is in use by another proxy", f.path.display()))
            }
            std::fs::TryLockError::Error(e) => Error::io("lock ciphertext file")(e),
        })
    }

    /// Connects to an upstream export given as `nbd+unix:///NAME?socket=PATH` or
    /// `nbd://HOST:PORT/NAME`.
    pub async fn connect_nbd(uri: &str) -> Result<Self, Error> {
        Ok(Store::Nbd(Arc::new(NbdStore::connect(uri, None).await?)))
    }

    /// Connects to a mutual-TLS export `nbds://HOST:PORT/NAME` (NBD_OPT_STARTTLS, TLS 1.3)
    /// with the client credentials `tls` (for a launched workload: those of its launch).
    pub async fn connect_nbd_tls(uri: &str, tls: &TlsClient) -> Result<Self, Error> {
        Ok(Store::Nbd(Arc::new(
            NbdStore::connect(uri, Some(tls)).await?,
        )))
    }

    /// Size of the store in bytes.
    pub async fn byte_len(&self) -> Result<u64, Error> {
        match self {
            Store::File(f) => Ok(f
                .file
                .metadata()
                .map_err(Error::io("stat ciphertext file"))?
                .len()),
            Store::Nbd(n) => Ok(n.size),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        match self {
            // Positional IO on a local file completes from the page cache in microseconds;
            // doing it inline avoids a thread hop per request.
            Store::File(f) => f
                .file
                .read_exact_at(buf, offset)
                .map_err(Error::io("read ciphertext")),
            Store::Nbd(n) => n.read(offset, buf).await,
        }
    }

    /// Writes all of `buf` at `offset`.
    pub async fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        match self {
            Store::File(f) => f
                .file
                .write_all_at(buf, offset)
                .map_err(Error::io("write ciphertext")),
            Store::Nbd(n) => n.write(offset, buf).await,
        }
    }

    /// Makes all completed writes durable.
    pub async fn sync(&self) -> Result<(), Error> {
        match self {
            Store::File(f) => {
                let file = f.file.clone();
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .map_err(|_| Error::Config("sync task failed".into()))?
                    .map_err(Error::io("sync ciphertext file"))
            }
            Store::Nbd(n) => n.flush().await,
        }
    }

    /// A short description for logs (never contains secrets).
    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => format!("file {}", f.path.display()),
            Store::Nbd(n) => format!("upstream {}", n.uri),
        }
    }
}

/// A local file store.
#[derive(Debug)]
pub struct FileStore {
    file: Arc<std::fs::File>,
    path: PathBuf,
}

/// Client side of mutual TLS to an NBD export: the CA the server's certificate must chain
/// to and the client's own certificate and key.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// From PEM: the server CA, the client certificate chain and the client private key.
    /// Error messages never quote the key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str| Error::Config(format!("TLS client credentials: malformed {what}"));
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots
                .add(c.map_err(|_| bad("CA"))?)
                .map_err(|_| bad("CA"))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|_| bad("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| bad("key"))?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Error::Config(format!("TLS client credentials: {e}")))?;
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, Error>>>>;

/// A client of an upstream NBD export (fixed newstyle, NBD_OPT_GO, simple replies),
/// pipelining requests over one connection.
pub struct NbdStore {
    uri: String,
    size: u64,
    flags: u16,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Arc<Pending>,
    next_cookie: AtomicU64,
    // Lengths of outstanding reads, so the reply reader knows how much data follows.
    read_lens: Arc<Mutex<HashMap<u64, usize>>>,
}

impl std::fmt::Debug for NbdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStore")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Parses an NBD URI into (unix socket path or tcp address, export name).
fn parse_uri(uri: &str) -> Result<(Option<String>, Option<String>, String), Error> {
    let bad = || {
        Error::Config(format!(
            "unsupported NBD URI {uri:?}: use nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME"
        ))
    };
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').ok_or_else(bad)?;
        let name = path.strip_prefix('/').unwrap_or(path).to_string();
        let sock = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(bad)?;
        Ok((Some(sock.to_string()), None, name))
    } else if let Some(rest) = uri.strip_prefix("nbd://") {
        let (hostport, name) = rest.split_once('/').unwrap_or((rest, ""));
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:10809")
        };
        Ok((None, Some(hostport), name.to_string()))
    } else {
        Err(bad())
    }
}

impl NbdStore {
    async fn connect(uri: &str, tls: Option<&TlsClient>) -> Result<Self, Error> {
        type Halves = (
            Box<dyn AsyncRead + Send + Unpin>,
            Box<dyn AsyncWrite + Send + Unpin>,
        );
        let (reader, writer): Halves = if let Some(rest) = uri.strip_prefix("nbds://") {
            let tls =
                tls.ok_or_else(|| Error::Config(format!("{uri:?} needs TLS client credentials")))?;
            let (hostport, _) = rest.split_once('/').unwrap_or((rest, ""));
            let s = tokio::net::TcpStream::connect(hostport)
                .await
                .map_err(Error::io("connect upstream"))?;
            let _ = s.set_nodelay(true);
            let host = hostport
                .rsplit_once(':')
                .map_or(hostport, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| Error::Config(format!("bad TLS server name in {uri:?}")))?;
            let s = starttls(s, tls, name).await?;
            let (r, w) = tokio::io::split(s);
            (Box::new(r), Box::new(w))
        } else if tls.is_some() {
            return Err(Error::Config(format!(
                "{uri:?}: TLS credentials need an nbds:// URI"
            )));
        } else {
            let (sock, tcp, _) = parse_uri(uri)?;
            if let Some(path) = sock {
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(Error::io("connect upstream socket"))?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            } else {
                let addr = tcp.unwrap_or_default();
                let s = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(Error::io("connect upstream"))?;
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let name = match uri.strip_prefix("nbds://") {
            Some(rest) => rest.split_once('/').map_or("", |(_, n)| n).to_string(),
            None => parse_uri(uri)?.2,
        };
        let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, reader);
        let mut writer = writer;
        let (size, flags) = match tls {
            // The greeting and the client flags went before TLS.
            Some(_) => go(&mut reader, &mut writer, &name, Vec::new()).await?,
            None => negotiate(&mut reader, &mut writer, &name).await?,
        };
        let pending: Arc<Pending> = Arc::new(Mutex::new(HashMap::new()));
        let read_lens: Arc<Mutex<HashMap<u64, usize>>> = Arc::new(Mutex::new(HashMap::new()));
        let (p, l) = (pending.clone(), read_lens.clone());
        tokio::spawn(async move {
            let err = reply_loop(&mut reader, &p, &l).await;
            // Fail everything outstanding: the connection is gone.
            let waiters: Vec<_> = p
                .lock()
                .map(|mut m| m.drain().collect())
                .unwrap_or_default();
            for (_, tx) in waiters {
                let _ = tx.send(Err(Error::Upstream(format!("connection lost: {err}"))));
            }
        });
        tracing::info!(uri, size, "connected to upstream NBD export");
        Ok(Self {
            uri: uri.to_string(),
            size,
            flags,
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_cookie: AtomicU64::new(1),
            read_lens,
        })
    }

    async fn submit(
        &self,
        command: Command,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| Error::Upstream("poisoned".into()))?
            .insert(cookie, tx);
        if command == Command::Read {
            self.read_lens
                .lock()
                .map_err(|_| Error::Upstream("poisoned".into()))?
                .insert(cookie, length as usize);
        }
        let req = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        {
            let mut w = self.writer.lock().await;
            w.write_all(&req.encode())
                .await
                .map_err(Error::io("send upstream request"))?;
            if !payload.is_empty() {
                w.write_all(payload)
                    .await
                    .map_err(Error::io("send upstream payload"))?;
            }
        }
        rx.await
            .map_err(|_| Error::Upstream("connection lost".into()))?
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        for (i, chunk) in buf.chunks_mut(MAX_UPSTREAM).enumerate() {
            let off = offset + (i * MAX_UPSTREAM) as u64;
            let data = self
                .submit(Command::Read, off, chunk.len() as u32, &[])
                .await?;
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        if self.flags & caas_nbd::tflags::READ_ONLY != 0 {
            return Err(Error::ReadOnly);
        }
        for (i, chunk) in buf.chunks(MAX_UPSTREAM).enumerate() {
            let off = offset + (i * MAX_UPSTREAM) as u64;
            self.submit(Command::Write, off, chunk.len() as u32, chunk)
                .await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), Error> {
        if self.flags & caas_nbd::tflags::SEND_FLUSH != 0 {
            self.submit(Command::Flush, 0, 0, &[]).await?;
        }
        Ok(())
    }
}

/// Largest request sent upstream.
const MAX_UPSTREAM: usize = 4 << 20;

/// Greeting, NBD_OPT_STARTTLS and the TLS 1.3 handshake with client certificate.
async fn starttls(
    mut s: tokio::net::TcpStream,
    tls: &TlsClient,
    name: rustls::pki_types::ServerName<'static>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Error> {
    let mut greeting = [0u8; hs::GREETING_LEN];
    s.read_exact(&mut greeting)
        .await
        .map_err(Error::io("read upstream greeting"))?;
    hs::parse_server_greeting(&greeting)?;
    let mut out = hs::client_flags().to_vec();
    hs::encode_option(opt::STARTTLS, &[], &mut out);
    s.write_all(&out)
        .await
        .map_err(Error::io("send upstream options"))?;
    let mut hdr = [0u8; hs::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut hdr)
        .await
        .map_err(Error::io("read upstream option reply"))?;
    let (_, typ, len) = hs::parse_option_reply_header(&hdr)?;
    if len > 4096 {
        return Err(Error::Upstream("oversized STARTTLS reply".into()));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)
        .await
        .map_err(Error::io("read upstream option reply"))?;
    if typ != rep::ACK {
        return Err(Error::Upstream(format!(
            "STARTTLS refused (NBD_REP {typ:#x})"
        )));
    }
    tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, s)
        .await
        .map_err(Error::io("TLS handshake with upstream"))
}

async fn negotiate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    name: &str,
) -> Result<(u64, u16), Error> {
    let mut greeting = [0u8; hs::GREETING_LEN];
    r.read_exact(&mut greeting)
        .await
        .map_err(Error::io("read upstream greeting"))?;
    hs::parse_server_greeting(&greeting)?;
    go(r, w, name, hs::client_flags().to_vec()).await
}

/// NBD_OPT_GO for `name` (after `prefix`, the client flags when not yet sent).
async fn go<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    name: &str,
    prefix: Vec<u8>,
) -> Result<(u64, u16), Error> {
    let mut out = prefix;
    hs::encode_option(opt::GO, &hs::encode_go_payload(name, &[]), &mut out);
    w.write_all(&out)
        .await
        .map_err(Error::io("send upstream options"))?;
    let mut export = None;
    loop {
        let mut hdr = [0u8; hs::OPTION_REPLY_HEADER_LEN];
        r.read_exact(&mut hdr)
            .await
            .map_err(Error::io("read upstream option reply"))?;
        let (_, typ, len) = hs::parse_option_reply_header(&hdr)?;
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)
            .await
            .map_err(Error::io("read upstream option reply"))?;
        match typ {
            rep::INFO => {
                if let Some(e) = hs::parse_info_export(&data)? {
                    export = Some(e);
                }
            }
            rep::ACK => break,
            t if t & (1 << 31) != 0 => {
                return Err(Error::Upstream(format!(
                    "export {name:?} refused (NBD_REP error {:#x}: {})",
                    t,
                    String::from_utf8_lossy(&data)
                )));
            }
            _ => {}
        }
    }
    export.ok_or_else(|| Error::Upstream("server sent no NBD_INFO_EXPORT".into()))
}

async fn reply_loop<R: AsyncRead + Unpin>(
    r: &mut R,
    pending: &Pending,
    read_lens: &Mutex<HashMap<u64, usize>>,
) -> String {
    loop {
        let mut hdr = [0u8; tx::SIMPLE_REPLY_LEN];
        if let Err(e) = r.read_exact(&mut hdr).await {
            return e.to_string();
        }
        let reply = match tx::Reply::parse_simple(&hdr) {
            Ok(r) => r,
            Err(e) => return e.to_string(),
        };
        let len = read_lens
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&reply.cookie));
        let mut data = Vec::new();
        if reply.error == 0
            && let Some(len) = len
        {
            data.resize(len, 0);
            if let Err(e) = r.read_exact(&mut data).await {
                return e.to_string();
            }
        }
        let Some(tx) = pending
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&reply.cookie))
        else {
            return format!("reply for unknown cookie {}", reply.cookie);
        };
        let result = if reply.error == 0 {
            Ok(data)
        } else {
            Err(Error::Upstream(format!("errno {}", reply.error)))
        };
        let _ = tx.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = parse_uri("nbd+unix:///disk?socket=/tmp/s.sock").ok();
        assert_eq!(u, Some((Some("/tmp/s.sock".into()), None, "disk".into())));
        let u = parse_uri("nbd://127.0.0.1:1234/x").ok();
        assert_eq!(u, Some((None, Some("127.0.0.1:1234".into()), "x".into())));
        let u = parse_uri("nbd://host").ok();
        assert_eq!(u, Some((None, Some("host:10809".into()), "".into())));
        assert!(parse_uri("http://x").is_err());
        assert!(parse_uri("nbd+unix:///x").is_err());
    }
}
