//! Test support (feature `testing`): a private, throw-away PostgreSQL cluster started with
//! Debian's `initdb` + `pg_ctl` (package `postgresql-15`) in a temporary directory, stopped
//! when the guard is dropped (also when a test panics).
//!
//! ```no_run
//! # fn main() -> Result<(), caas_store::testing::HarnessError> {
//! let pg = caas_store::testing::PgCluster::start()?;      // fails: "apt-get install postgresql-15"
//! let url = pg.create_database("kms_test")?;              // postgres://postgres@127.0.0.1:PORT/kms_test
//! // Store::open(&url, signer).await ... ; a second Store::open(&url, ..) acts as a second node.
//! # Ok(()) }
//! ```
//!
//! When the process runs as root (as here), the cluster runs as the `postgres` user via
//! `runuser`, since `initdb` refuses root. It listens on 127.0.0.1 on a free port and on a
//! unix socket in its temporary directory, with `trust` authentication. Override the
//! binaries' directory with `CAAS_PG_BIN`. [`PgCluster::start_in_netns`] runs the server in
//! a network namespace (`ip netns exec`): its 127.0.0.1 is then that namespace's loopback.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Why the harness could not provide a cluster; the message says what to do.
#[derive(Debug)]
pub struct HarnessError(pub String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn herr(msg: impl Into<String>) -> HarnessError {
    HarnessError(msg.into())
}

/// A running private PostgreSQL cluster; dropping it stops the server and deletes its files.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
    /// The network namespace the server runs in (`ip netns exec`), if any.
    netns: Option<String>,
}

/// Finds the PostgreSQL server binaries (`initdb`, `pg_ctl`).
pub fn pg_bin_dir() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("CAAS_PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
        return Err(herr(format!(
            "CAAS_PG_BIN={} has no initdb: apt-get install postgresql-15 and unset CAAS_PG_BIN",
            dir.display()
        )));
    }
    let preferred = Path::new("/usr/lib/postgresql/15/bin");
    if preferred.join("initdb").exists() {
        return Ok(preferred.to_owned());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    found.sort();
    found.pop().ok_or_else(|| {
        herr(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin: \
             apt-get install postgresql-15 (or set CAAS_PG_BIN)",
        )
    })
}

fn running_as_root() -> bool {
    // /proc/self belongs to the effective uid of this process.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn check(what: &str, out: std::io::Result<Output>) -> Result<Output, HarnessError> {
    let out = out.map_err(|e| herr(format!("cannot run {what}: {e}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(herr(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn free_port() -> Result<u16, HarnessError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| herr(format!("cannot find a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| herr(format!("cannot find a free port: {e}")))
}

impl PgCluster {
    /// `initdb` + `pg_ctl start` in a new temporary directory. Takes about a second.
    /// Blocking: from async code call it directly (it is short) or via `spawn_blocking`.
    pub fn start() -> Result<PgCluster, HarnessError> {
        Self::start_with(None)
    }

    /// As [`PgCluster::start`], the server running in network namespace `netns` (created
    /// by the caller, e.g. `ip netns add`, with its `lo` up): 127.0.0.1 in the URLs is that
    /// namespace's loopback, reachable only from processes in it. `psql`/`pg_dump` use the
    /// unix socket and work from anywhere.
    pub fn start_in_netns(netns: &str) -> Result<PgCluster, HarnessError> {
        Self::start_with(Some(netns.to_string()))
    }

    fn start_with(netns: Option<String>) -> Result<PgCluster, HarnessError> {
        let bin = pg_bin_dir()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("caas-pg-")
            .tempdir()
            .map_err(|e| herr(format!("cannot create a temporary directory: {e}")))?;
        if as_postgres {
            let out = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .output();
            check(
                "chown postgres: <tempdir> (is there a `postgres` user?)",
                out,
            )?;
        }
        let mut cluster = PgCluster {
            dir,
            bin,
            port: 0,
            as_postgres,
            running: false,
            netns,
        };
        let data = cluster.data_dir();
        let out = cluster
            .pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output();
        check("initdb", out)?;
        let mut last_err = herr("pg_ctl start was not tried");
        for _ in 0..5 {
            let port = free_port()?;
            let conf = format!(
                "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 max_connections = 200\nfsync = on\nlog_min_messages = warning\n",
                cluster.dir.path().display()
            );
            let conf_path = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf_path)
                .map_err(|e| herr(format!("cannot read postgresql.conf: {e}")))?;
            text.push_str(&conf);
            std::fs::write(&conf_path, text)
                .map_err(|e| herr(format!("cannot write postgresql.conf: {e}")))?;
            let out = cluster
                .server_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.path().join("server.log"))
                .args(["-w", "-t", "60", "start"])
                .output();
            match check("pg_ctl start", out) {
                Ok(_) => {
                    cluster.port = port;
                    cluster.running = true;
                    return Ok(cluster);
                }
                Err(e) => {
                    let log = std::fs::read_to_string(cluster.dir.path().join("server.log"))
                        .unwrap_or_default();
                    last_err = herr(format!("{e}\nserver log:\n{log}"));
                }
            }
        }
        Err(last_err)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command for one of the cluster's binaries, run as `postgres` when we are root.
    fn pg_command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// A command that starts the server: in its network namespace, if any.
    fn server_command(&self, name: &str) -> Command {
        let Some(ns) = &self.netns else {
            return self.pg_command(name);
        };
        let inner = self.pg_command(name);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(inner.get_program());
        c.args(inner.get_args());
        c
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Directory of the PostgreSQL binaries in use (for `psql`, `pg_dump`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// URL of database `db` as superuser `postgres` (trust authentication, no password).
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// URL of the default `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Creates database `name` (letters, digits, `_`) and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, HarnessError> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(herr(format!("bad database name {name:?}")));
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url_for(name))
    }

    /// Runs SQL with `psql` against database `db`; returns its stdout (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, HarnessError> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .output();
        let out = check("psql", out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `pg_dump` of database `db` (plain SQL format), e.g. to search it for secrets.
    pub fn dump(&self, db: &str) -> Result<Vec<u8>, HarnessError> {
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["-U", "postgres", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", db])
            .output();
        Ok(check("pg_dump", out)?.stdout)
    }

    /// Restarts the server (`pg_ctl restart -m fast`), dropping every client connection;
    /// the port and data stay.
    pub fn restart(&self) -> Result<(), HarnessError> {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .output();
        check("pg_ctl restart", out).map(|_| ())
    }

    /// Stops the server now (`pg_ctl stop -m fast`); also done on drop.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .output();
        check("pg_ctl stop", out).map(|_| ())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            // Last resort: immediate shutdown so no server outlives the test.
            let _ = self
                .pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "stop"])
                .output();
            tracing::warn!(error = %e, "stopping the private PostgreSQL cluster");
        }
    }
}
