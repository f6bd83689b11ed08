//! Shared helpers of the SDP integration tests: locating required third-party tools
//! (failing with an install hint when missing), starting the `caas-sdp` server as a
//! child process, and a minimal raw NBD client for protocol-level checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
use caas_nbd::handshake as hs;
use caas_nbd::transmission::{self as tx, Command, Request};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_caas-sdp");

/// Asserts that `tool` is on PATH; panics with what to install otherwise.
pub fn require(tool: &str, package: &str) {
    let ok = Proc::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success());
    assert!(
        ok.unwrap_or(false),
        "required tool `{tool}` not found: install the Debian package `{package}` (listed in .ci/apt-packages.txt)"
    );
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &mut Proc) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Writes a random 32-byte key file.
pub fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("key");
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut k)
        .unwrap();
    std::fs::write(&p, k).unwrap();
    p
}

/// Fills a file with `len` random bytes.
pub fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    std::fs::write(path, &data).unwrap();
    data
}

/// A `caas-sdp serve` child process.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr: PathBuf,
}

impl Server {
    /// Starts `caas-sdp serve ARGS --socket SOCK` and waits for the socket.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Server {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Proc::new(BIN)
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env("CAAS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let s = Server {
            child,
            socket,
            stderr,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&s.socket).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "server did not start: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }
    pub fn uri(&self) -> String {
        format!("nbd+unix:///caas?socket={}", self.socket.display())
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    /// SIGTERM and wait (clean shutdown: the volume is closed).
    pub fn stop(mut self) {
        run(Proc::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string()));
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "server exited with {status}: {}",
            self.log()
        );
    }
    /// SIGKILL and wait (a crash).
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies).
pub struct RawClient {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

impl RawClient {
    pub fn connect(sock: &Path) -> RawClient {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = [0u8; hs::GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        hs::parse_server_greeting(&g).unwrap();
        let mut out = hs::client_flags().to_vec();
        hs::encode_option(caas_nbd::opt::GO, &hs::encode_go_payload("", &[]), &mut out);
        s.write_all(&out).unwrap();
        let mut export = None;
        loop {
            let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
            s.read_exact(&mut h).unwrap();
            let (_, typ, len) = hs::parse_option_reply_header(&h).unwrap();
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            if typ == caas_nbd::rep::INFO {
                if let Some(e) = hs::parse_info_export(&d).unwrap() {
                    export = Some(e);
                }
            } else if typ == caas_nbd::rep::ACK {
                break;
            } else {
                panic!("option error {typ:#x}");
            }
        }
        let (size, flags) = export.unwrap();
        RawClient {
            s,
            size,
            flags,
            cookie: 0,
        }
    }

    /// Sends a request (and payload) without waiting; returns the cookie.
    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        self.cookie += 1;
        let r = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(payload).unwrap();
        self.cookie
    }

    /// Receives one simple reply; reads `data_len` bytes of data on success.
    pub fn recv(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; tx::SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).unwrap();
        let r = tx::Reply::parse_simple(&h).unwrap();
        let mut d = Vec::new();
        if r.error == 0 && data_len > 0 {
            d.resize(data_len, 0);
            self.s.read_exact(&mut d).unwrap();
        }
        (r.cookie, r.error, d)
    }

    /// One request, one reply: returns (errno, data).
    pub fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        let c = self.send(command, flags, offset, length, payload);
        let dl = if command == Command::Read {
            length as usize
        } else {
            0
        };
        let (cookie, e, d) = self.recv(dl);
        assert_eq!(cookie, c);
        (e, d)
    }
}

/// Creates a volume file of `size` bytes with `key`.
pub fn create_volume(vol: &Path, key: &Path, size: &str) {
    run(Proc::new(BIN)
        .args(["create", "--size", size, "--out"])
        .arg(vol)
        .arg("--key-file")
        .arg(key));
}
