//! A small client of qemu's JSON machine protocol (QMP) over the per-VM UNIX socket the
//! [`QemuDriver`](crate::driver::QemuDriver) gives qemu (`-qmp unix:PATH,server=on,wait=off`):
//! the host agent stops, continues, saves (outgoing migration), restores (incoming
//! migration) and quits its VMs through it.
//!
//! qemu is the workload's process and runs as the workload's identity, so everything it says
//! is untrusted input: every reply line is bounded ([`MAX_LINE`]), every read has a deadline,
//! a malformed reply is an error ([`QmpError::Malformed`]), never a panic, and a reply is
//! matched to its command by the `id` the client sent. Asynchronous events (`STOP`,
//! `RESUME`, `MIGRATION`, ...) met while waiting for a reply are kept (the last
//! [`MAX_EVENTS`]).
//!
//! Migration targets ([`MigrationUri`]): `fd:NAME` (a descriptor given to qemu first with
//! [`Qmp::getfd`], SCM_RIGHTS: the agent reads or writes the stream itself, so the
//! plaintext state never reaches a file), `unix:PATH`, `exec:CMD`, `file:PATH` (qemu ≥ 8.2).
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest reply or event line accepted from qemu.
pub const MAX_LINE: usize = 1 << 20;
/// Events kept (oldest dropped first).
pub const MAX_EVENTS: usize = 256;
/// Lines read while waiting for one reply (events included) before giving up.
const MAX_LINES_PER_REPLY: usize = 4096;

/// What went wrong talking to qemu. Messages quote qemu's error class and description
/// (bounded), never migration data.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP {context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No complete reply before the deadline.
    #[error("QMP: no reply to {0} in time")]
    Timeout(String),
    /// qemu closed the connection.
    #[error("QMP: qemu closed the connection")]
    Closed,
    /// A line longer than [`MAX_LINE`], or too many lines without the reply.
    #[error("QMP: reply too long")]
    TooLong,
    /// Not QMP: bad JSON, no greeting, a reply without `return`/`error`, a wrong type.
    #[error("QMP: malformed reply: {0}")]
    Malformed(String),
    /// qemu refused the command.
    #[error("QMP: {command} refused ({class}): {desc}")]
    Command {
        /// The command.
        command: String,
        /// qemu's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// qemu's description.
        desc: String,
    },
    /// A migration ended in `failed` or `cancelled`.
    #[error("QMP: migration {status}: {desc}")]
    Migration {
        /// The final status.
        status: String,
        /// qemu's `error-desc`, if any.
        desc: String,
    },
}

impl QmpError {
    fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { context, source }
    }
}

/// Result of a QMP call.
pub type QmpResult<T> = std::result::Result<T, QmpError>;

/// Where a migration stream goes to (outgoing) or comes from (incoming).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A descriptor handed to qemu with [`Qmp::getfd`] under this name.
    Fd(String),
    /// A UNIX socket (qemu connects when outgoing, listens when incoming).
    Unix(PathBuf),
    /// A shell command qemu runs (its stdin/stdout carry the stream).
    Exec(String),
    /// A file (qemu ≥ 8.2).
    File(PathBuf),
}

impl MigrationUri {
    /// The URI qemu takes.
    #[must_use]
    pub fn to_uri(&self) -> String {
        match self {
            Self::Fd(n) => format!("fd:{n}"),
            Self::Unix(p) => format!("unix:{}", p.display()),
            Self::Exec(c) => format!("exec:{c}"),
            Self::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// `query-migrate`'s `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration yet (`none`).
    None,
    /// `setup`.
    Setup,
    /// `active`, `pre-switchover`, `device`, `wait-unplug`, `postcopy-*`: still running.
    Active(String),
    /// `completed`.
    Completed,
    /// `failed`.
    Failed,
    /// `cancelling`.
    Cancelling,
    /// `cancelled`.
    Cancelled,
}

impl MigrationStatus {
    fn parse(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "setup" => Self::Setup,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            other => Self::Active(bounded(other)),
        }
    }

    /// Whether the migration has ended (completed, failed or cancelled).
    #[must_use]
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// What `query-migrate` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    /// The status.
    pub status: MigrationStatus,
    /// qemu's `error-desc` when it failed.
    pub error_desc: Option<String>,
    /// `total-time` in ms, when given.
    pub total_time_ms: Option<u64>,
    /// `downtime` in ms, when given.
    pub downtime_ms: Option<u64>,
    /// `ram.transferred` in bytes, when given.
    pub ram_transferred: Option<u64>,
}

impl MigrationInfo {
    fn from_value(v: &Value) -> QmpResult<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| QmpError::Malformed("query-migrate: not an object".into()))?;
        // Before any migration qemu answers `{}`.
        let status = match obj.get("status") {
            None => MigrationStatus::None,
            Some(Value::String(s)) => MigrationStatus::parse(s),
            Some(_) => {
                return Err(QmpError::Malformed(
                    "query-migrate: status is not a string".into(),
                ));
            }
        };
        let num = |k: &str| obj.get(k).and_then(Value::as_u64);
        Ok(Self {
            status,
            error_desc: obj.get("error-desc").and_then(Value::as_str).map(bounded),
            total_time_ms: num("total-time"),
            downtime_ms: num("downtime"),
            ram_transferred: obj
                .get("ram")
                .and_then(|r| r.get("transferred"))
                .and_then(Value::as_u64),
        })
    }
}

/// An asynchronous event qemu sent.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Its name (`STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, ...).
    pub name: String,
    /// Its `data`, or `null`.
    pub data: Value,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    /// Whether the guest's CPUs run.
    pub running: bool,
    /// qemu's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub status: String,
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    timeout: Duration,
    events: std::collections::VecDeque<QmpEvent>,
    version: String,
}

/// A string from qemu, cut to 200 characters for messages.
fn bounded(s: &str) -> String {
    s.chars().take(200).collect()
}

impl Qmp {
    /// Connects to qemu's QMP socket, reads the greeting and negotiates capabilities.
    /// `timeout` bounds each later reply too.
    pub fn connect(path: &Path, timeout: Duration) -> QmpResult<Self> {
        let stream = UnixStream::connect(path).map_err(QmpError::io("connect"))?;
        Self::handshake(stream, timeout)
    }

    /// Like [`Qmp::connect`], retrying until `deadline` while the socket does not exist yet
    /// or refuses (qemu creates it shortly after it starts).
    pub fn connect_until(path: &Path, deadline: Instant, timeout: Duration) -> QmpResult<Self> {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Self::handshake(s, timeout),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(QmpError::io("connect")(e)),
            }
        }
    }

    /// Negotiates over a connected stream: the greeting `{"QMP": {...}}`, then
    /// `qmp_capabilities`.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> QmpResult<Self> {
        let mut q = Self {
            stream,
            buf: Vec::new(),
            next_id: 1,
            timeout,
            events: std::collections::VecDeque::new(),
            version: String::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = q.read_value(deadline, "the greeting")?;
        let info = greeting
            .get("QMP")
            .ok_or_else(|| QmpError::Malformed("no QMP greeting".into()))?;
        q.version = info
            .get("version")
            .and_then(|v| v.get("qemu"))
            .map(|v| {
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                format!("{}.{}.{}", n("major"), n("minor"), n("micro"))
            })
            .unwrap_or_default();
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// qemu's version from the greeting (`major.minor.micro`), empty when not given.
    #[must_use]
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Events received so far (oldest first), removed from the client.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> QmpResult<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg)
            .map_err(|e| QmpError::Malformed(format!("encode {command}: {e}")))?;
        line.push(b'\n');
        self.stream
            .set_write_timeout(Some(self.timeout))
            .map_err(QmpError::io("set timeout"))?;
        self.stream
            .write_all(&line)
            .map_err(QmpError::io("send a command"))?;
        self.reply(command, id)
    }

    fn reply(&mut self, command: &str, id: u64) -> QmpResult<Value> {
        let deadline = Instant::now() + self.timeout;
        for _ in 0..MAX_LINES_PER_REPLY {
            let v = self.read_value(deadline, command)?;
            let obj = v
                .as_object()
                .ok_or_else(|| QmpError::Malformed("a line that is not an object".into()))?;
            if let Some(name) = obj.get("event") {
                let name = name
                    .as_str()
                    .ok_or_else(|| QmpError::Malformed("event name".into()))?;
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(QmpEvent {
                    name: bounded(name),
                    data: obj.get("data").cloned().unwrap_or(Value::Null),
                });
                continue;
            }
            // A reply to another command (an id we did not send now) is skipped.
            if obj.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(r) = obj.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = obj.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).map(bounded);
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class").unwrap_or_else(|| "unknown".into()),
                    desc: s("desc").unwrap_or_default(),
                });
            }
            return Err(QmpError::Malformed(format!(
                "reply to {command} has neither return nor error"
            )));
        }
        Err(QmpError::TooLong)
    }

    /// Reads one JSON line before `deadline`.
    fn read_value(&mut self, deadline: Instant, what: &str) -> QmpResult<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                if nl > MAX_LINE {
                    return Err(QmpError::TooLong);
                }
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text)
                    .map_err(|e| QmpError::Malformed(format!("not JSON: {e}")));
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::TooLong);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(bounded(what)));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(QmpError::io("set timeout"))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout(bounded(what)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(QmpError::io("read a reply")(e)),
            }
        }
    }

    /// Pauses the guest's CPUs.
    pub fn stop(&mut self) -> QmpResult<()> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the guest's CPUs.
    pub fn cont(&mut self) -> QmpResult<()> {
        self.execute("cont", None).map(drop)
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> QmpResult<RunState> {
        let v = self.execute("query-status", None)?;
        Ok(RunState {
            running: v
                .get("running")
                .and_then(Value::as_bool)
                .ok_or_else(|| QmpError::Malformed("query-status: running".into()))?,
            status: v
                .get("status")
                .and_then(Value::as_str)
                .map(bounded)
                .ok_or_else(|| QmpError::Malformed("query-status: status".into()))?,
        })
    }

    /// Ends qemu (`quit`). qemu may close the connection before or after it answers.
    pub fn quit(&mut self) -> QmpResult<()> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hands `fd` to qemu under `name` (`getfd` with the descriptor in SCM_RIGHTS), for a
    /// [`MigrationUri::Fd`].
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> QmpResult<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "execute": "getfd", "arguments": { "fdname": name }, "id": id });
        let mut line = serde_json::to_vec(&msg)
            .map_err(|e| QmpError::Malformed(format!("encode getfd: {e}")))?;
        line.push(b'\n');
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        // The descriptor rides on the first byte; the rest of the line follows.
        let first = [std::io::IoSlice::new(&line[..1])];
        sendmsg::<UnixAddr>(
            self.stream.as_raw_fd(),
            &first,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| QmpError::io("send a descriptor")(e.into()))?;
        self.stream
            .write_all(&line[1..])
            .map_err(QmpError::io("send a command"))?;
        self.reply("getfd", id).map(drop)
    }

    /// Sets migration capabilities (`migrate-set-capabilities`), e.g. `("events", true)`.
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> QmpResult<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// Starts an outgoing migration to `uri` (returns at once; poll
    /// [`Qmp::query_migrate`] or [`Qmp::wait_migration`]).
    pub fn migrate(&mut self, uri: &MigrationUri) -> QmpResult<()> {
        self.execute("migrate", Some(json!({ "uri": uri.to_uri() })))
            .map(drop)
    }

    /// Starts listening for an incoming migration on a qemu started with `-incoming defer`.
    pub fn migrate_incoming(&mut self, uri: &MigrationUri) -> QmpResult<()> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri.to_uri() })))
            .map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> QmpResult<MigrationInfo> {
        let v = self.execute("query-migrate", None)?;
        MigrationInfo::from_value(&v)
    }

    /// Polls [`Qmp::query_migrate`] every `poll` until the migration has ended; `Ok` only
    /// when it completed, [`QmpError::Migration`] when it failed or was cancelled,
    /// [`QmpError::Timeout`] after `timeout`.
    pub fn wait_migration(
        &mut self,
        timeout: Duration,
        poll: Duration,
    ) -> QmpResult<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            match info.status {
                MigrationStatus::Completed => return Ok(info),
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    return Err(QmpError::Migration {
                        status: if info.status == MigrationStatus::Failed {
                            "failed".into()
                        } else {
                            "cancelled".into()
                        },
                        desc: info.error_desc.unwrap_or_default(),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout("the migration".into()));
            }
            std::thread::sleep(poll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    /// A fake qemu: answers each command line with `answer(command, id, arguments)`
    /// (lines to send; `None` closes the connection). Returns the socket path and the
    /// commands it saw.
    fn fake(
        answer: impl Fn(&str, u64, &Value) -> Option<Vec<String>> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let Ok((mut s, _)) = l.accept() else {
                return seen;
            };
            let _ = s.write_all(format!("{GREETING}\r\n").as_bytes());
            let mut r = BufReader::new(s.try_clone().unwrap_or_else(|e| panic!("{e}")));
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return seen;
                }
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}"));
                let cmd = v["execute"].as_str().unwrap_or("").to_string();
                let id = v["id"].as_u64().unwrap_or(0);
                seen.push(cmd.clone());
                match answer(&cmd, id, &v["arguments"]) {
                    Some(lines) => {
                        for l in lines {
                            let _ = s.write_all(format!("{l}\r\n").as_bytes());
                        }
                    }
                    None => return seen,
                }
            }
        });
        (dir, path, h)
    }

    fn ok(id: u64) -> Option<Vec<String>> {
        Some(vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)])
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn negotiates_and_runs_stop_cont_quit() {
        let (_d, path, h) = fake(|cmd, id, _| match cmd {
            "stop" => Some(vec![
                r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#
                    .into(),
                format!(r#"{{"return": {{}}, "id": {id}}}"#),
            ]),
            "query-status" => Some(vec![format!(
                r#"{{"return": {{"running": false, "status": "paused"}}, "id": {id}}}"#
            )]),
            "quit" => None,
            _ => ok(id),
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.version(), "7.2.0");
        q.stop().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            q.query_status().unwrap_or_else(|e| panic!("{e}")),
            RunState {
                running: false,
                status: "paused".into()
            }
        );
        q.cont().unwrap_or_else(|e| panic!("{e}"));
        let ev = q.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].name, "STOP");
        // qemu closes the connection on quit: that is success.
        q.quit().unwrap_or_else(|e| panic!("{e}"));
        let seen = h.join().unwrap_or_else(|_| panic!("fake qemu"));
        assert_eq!(
            seen,
            ["qmp_capabilities", "stop", "query-status", "cont", "quit"]
        );
    }

    #[test]
    fn migrate_and_poll_until_completed() {
        let polls = std::sync::atomic::AtomicU32::new(0);
        let (_d, path, h) = fake(move |cmd, id, args| match cmd {
            "migrate" => {
                assert_eq!(args["uri"], "fd:state");
                ok(id)
            }
            "query-migrate" => {
                let n = polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Some(vec![if n < 2 {
                    format!(r#"{{"return": {{"status": "active"}}, "id": {id}}}"#)
                } else {
                    format!(
                        r#"{{"return": {{"status": "completed", "total-time": 120, "downtime": 7, "ram": {{"transferred": 4096}}}}, "id": {id}}}"#
                    )
                }])
            }
            _ => ok(id),
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        q.migrate(&MigrationUri::Fd("state".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let info = q
            .wait_migration(T, Duration::from_millis(1))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.status, MigrationStatus::Completed);
        assert_eq!(info.total_time_ms, Some(120));
        assert_eq!(info.downtime_ms, Some(7));
        assert_eq!(info.ram_transferred, Some(4096));
        drop(q);
        let seen = h.join().unwrap_or_else(|_| panic!("fake qemu"));
        assert_eq!(
            seen,
            [
                "qmp_capabilities",
                "migrate",
                "query-migrate",
                "query-migrate",
                "query-migrate"
            ]
        );
    }

    #[test]
    fn failed_migration_is_an_error_with_qemus_reason() {
        let (_d, path, _h) = fake(|cmd, id, _| match cmd {
            "query-migrate" => Some(vec![format!(
                r#"{{"return": {{"status": "failed", "error-desc": "Unable to write to socket"}}, "id": {id}}}"#
            )]),
            _ => ok(id),
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        let e = q.wait_migration(T, Duration::from_millis(1));
        assert!(
            matches!(&e, Err(QmpError::Migration { status, desc }) if status == "failed" && desc.contains("Unable")),
            "{e:?}"
        );
    }

    #[test]
    fn command_error_is_typed() {
        let (_d, path, _h) = fake(|cmd, id, _| match cmd {
            "migrate-incoming" => Some(vec![format!(
                r#"{{"error": {{"class": "GenericError", "desc": "'-incoming' was not specified"}}, "id": {id}}}"#
            )]),
            _ => ok(id),
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        let e = q.migrate_incoming(&MigrationUri::Unix("/run/x.sock".into()));
        assert!(
            matches!(&e, Err(QmpError::Command { command, class, .. }) if command == "migrate-incoming" && class == "GenericError"),
            "{e:?}"
        );
    }

    #[test]
    fn getfd_passes_a_descriptor() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        let h = std::thread::spawn(move || {
            use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
            let (mut s, _) = l.accept().unwrap_or_else(|e| panic!("{e}"));
            s.write_all(format!("{GREETING}\n").as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            let mut got_fd = false;
            let mut text = Vec::new();
            let mut answered = 0;
            while answered < 2 {
                let mut b = [0u8; 4096];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut b)];
                let m = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                    .unwrap_or_else(|e| panic!("{e}"));
                for c in m.cmsgs().unwrap_or_else(|e| panic!("{e}")) {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        got_fd = fds.len() == 1;
                        for fd in fds {
                            let _ = nix::unistd::close(fd);
                        }
                    }
                }
                let n = m.bytes;
                text.extend_from_slice(&b[..n]);
                while let Some(nl) = text.iter().position(|&c| c == b'\n') {
                    let line: Vec<u8> = text.drain(..=nl).collect();
                    let v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| panic!("{e}"));
                    let id = v["id"].as_u64().unwrap_or(0);
                    s.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                        .unwrap_or_else(|e| panic!("{e}"));
                    answered += 1;
                }
            }
            got_fd
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        let f = std::fs::File::open("/dev/null").unwrap_or_else(|e| panic!("{e}"));
        use std::os::fd::AsFd;
        q.getfd("state", f.as_fd())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(h.join().unwrap_or_else(|_| panic!("fake qemu")));
    }

    /// qemu runs as the workload: a hostile one must not make the agent panic, hang or
    /// buffer without bound.
    #[test]
    fn malformed_and_hostile_replies_are_errors() {
        // Not JSON.
        let (_d, path, _h) = fake(|_, _, _| Some(vec!["{not json".into()]));
        let e = Qmp::connect(&path, T);
        assert!(matches!(e, Err(QmpError::Malformed(_))), "{e:?}");
        // A reply with neither return nor error.
        let (_d, path, _h) = fake(|_, id, _| Some(vec![format!(r#"{{"id": {id}}}"#)]));
        assert!(matches!(
            Qmp::connect(&path, T),
            Err(QmpError::Malformed(_))
        ));
        // A reply that is not an object, and a status of the wrong type.
        let (_d, path, _h) = fake(|cmd, id, _| match cmd {
            "query-migrate" => Some(vec![format!(
                r#"{{"return": {{"status": 7}}, "id": {id}}}"#
            )]),
            "query-status" => Some(vec![format!(r#"{{"return": [], "id": {id}}}"#)]),
            "stop" => Some(vec!["[1,2]".into()]),
            _ => ok(id),
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(q.query_migrate(), Err(QmpError::Malformed(_))));
        assert!(matches!(q.query_status(), Err(QmpError::Malformed(_))));
        assert!(matches!(q.stop(), Err(QmpError::Malformed(_))));
        // An endless line: bounded.
        let (_d, path, _h) = fake(|_, _, _| Some(vec!["x".repeat(MAX_LINE + 10)]));
        assert!(matches!(Qmp::connect(&path, T), Err(QmpError::TooLong)));
        // No greeting at all: a timeout, not a hang.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("mute.sock");
        let l = UnixListener::bind(&p).unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let e = Qmp::connect(&p, Duration::from_millis(200));
        assert!(matches!(e, Err(QmpError::Timeout(_))), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(l);
        // A greeting that is not QMP.
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let mut b2 = b;
        b2.write_all(b"{\"hello\": 1}\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(Qmp::handshake(a, T), Err(QmpError::Malformed(_))));
        // Closed connection.
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        drop(b);
        assert!(matches!(Qmp::handshake(a, T), Err(QmpError::Closed)));
    }

    #[test]
    fn events_are_bounded_and_other_ids_skipped() {
        let (_d, path, _h) = fake(|cmd, id, _| match cmd {
            "cont" => {
                let mut v: Vec<String> = (0..MAX_EVENTS + 10)
                    .map(|i| format!(r#"{{"event": "E{i}", "data": {{}}}}"#))
                    .collect();
                v.push(r#"{"return": {}, "id": 999}"#.into());
                v.push(format!(r#"{{"return": {{}}, "id": {id}}}"#));
                Some(v)
            }
            _ => ok(id),
        });
        let mut q = Qmp::connect(&path, T).unwrap_or_else(|e| panic!("{e}"));
        q.cont().unwrap_or_else(|e| panic!("{e}"));
        let ev = q.take_events();
        assert_eq!(ev.len(), MAX_EVENTS);
        assert_eq!(ev[0].name, "E10");
    }

    #[test]
    fn migration_uris() {
        assert_eq!(MigrationUri::Fd("s".into()).to_uri(), "fd:s");
        assert_eq!(MigrationUri::Unix("/a/b".into()).to_uri(), "unix:/a/b");
        assert_eq!(MigrationUri::Exec("cat".into()).to_uri(), "exec:cat");
        assert_eq!(MigrationUri::File("/a".into()).to_uri(), "file:/a");
    }
}
