//! `caas volume ...`: create, import, export, serve, check, inspect and upgrade encrypted
//! volumes.
//! The lead wires [`VolumeCommand`] into the `caas` binary and calls [`run`].
use crate::Error;
use crate::engine::{self, Backend, KeyInput, OpenOptions, Volume};
use crate::server::{self, Listen, Listener, ServerConfig};
use crate::store::Store;
use caas_volume::header::{Dbsp, KeySource};
use caas_volume::{DataKeyProvider, Layout};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `caas volume` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Create an empty encrypted volume.
    Create(CreateArgs),
    /// Encrypt an existing raw image into a new volume.
    Import(ImportArgs),
    /// Decrypt a volume into a raw image (verifying every block).
    Export(ExportArgs),
    /// Serve a volume over NBD (the standalone crypto-domain disk).
    Serve(ServeArgs),
    /// Verify every block; exits with an error if any block fails authentication.
    Check(CheckArgs),
    /// Print the volume header.
    Info(InfoArgs),
    /// Re-encrypt a format v1 volume as format v2 (same key and header fields). Without
    /// --out, the file is replaced atomically once the new volume is complete. (`serve`
    /// does this by itself before serving a v1 volume file for writing.)
    Upgrade(UpgradeArgs),
}

/// Key source options.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// File holding the raw 32-byte data key (standalone use). Without it, the data key
    /// comes from the configured KMS (GenerateDataKey / Decrypt).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
}

/// Where the ciphertext lives.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The volume (ciphertext) file or block device.
    #[arg(value_name = "FILE", required_unless_present = "upstream")]
    pub file: Option<PathBuf>,
    /// Keep the ciphertext on an upstream NBD export instead
    /// (`nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`).
    #[arg(long, value_name = "URI", conflicts_with = "file")]
    pub upstream: Option<String>,
}

/// DBSP fields stored opaquely in the header.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DbspArgs {
    /// DBSP domain id D.
    #[arg(long, default_value = "")]
    pub domain_id: String,
    /// DBSP security profile SP.
    #[arg(long, default_value = "")]
    pub security_profile: String,
    /// DBSP c4 (hex).
    #[arg(long, default_value = "")]
    pub c4: String,
    /// DBSP μ (hex).
    #[arg(long, default_value = "")]
    pub mu: String,
}

/// `caas volume create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Virtual size (bytes, or with a K/M/G/T suffix); rounded up to 4 KiB.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Output volume file.
    #[arg(long, value_name = "FILE", required_unless_present = "upstream")]
    pub out: Option<PathBuf>,
    /// Create the volume on an upstream NBD export instead.
    #[arg(long, value_name = "URI", conflicts_with = "out")]
    pub upstream: Option<String>,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub dbsp: DbspArgs,
}

/// `caas volume import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The plaintext raw image.
    pub raw: PathBuf,
    /// Output volume file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub dbsp: DbspArgs,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// `caas volume export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Output raw image.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `caas volume serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Listen on this UNIX socket.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["tcp", "vsock"])]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address.
    #[arg(long, value_name = "ADDR", conflicts_with = "socket")]
    pub tcp: Option<SocketAddr>,
    /// Listen on this AF_VSOCK port, for a client in a VM on this host or for a proxy
    /// running in a micro-VM; only --vsock-peer-cid is served. A host without a vsock
    /// transport (no VM, no vsock_loopback) can bind the port but nothing can connect to it.
    #[arg(long, value_name = "PORT", conflicts_with_all = ["socket", "tcp"], requires = "vsock_peer_cid")]
    pub vsock: Option<u32>,
    /// The only vsock peer served: the workload VM's CID (others are refused and logged).
    #[arg(long, value_name = "CID")]
    pub vsock_peer_cid: Option<u32>,
    /// UNIX-socket peers allowed besides the proxy's own uid (SO_PEERCRED, checked on every
    /// connection; refusals are logged and counted). Repeatable; default 0 (root).
    #[arg(long = "peer-uid", value_name = "UID", default_values_t = [0u32])]
    pub peer_uids: Vec<u32>,
    /// Permission bits of the --socket file (octal, e.g. 666 when its directory and the
    /// peer check guard it); default: as created.
    #[arg(long, value_name = "MODE", value_parser = parse_socket_mode, requires = "socket")]
    pub socket_mode: Option<u32>,
    /// When started as root: switch to UID:GID for good once the volume is open and the key
    /// read (the host agent runs each workload's proxies under the workload's identity);
    /// the UNIX socket is then created by that identity.
    #[arg(long, value_name = "UID:GID", value_parser = parse_ids)]
    pub run_as: Option<(u32, u32)>,
    /// Export name.
    #[arg(long, default_value = "caas")]
    pub export_name: String,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Benchmark baseline only: serve FILE as plain bytes, no encryption or integrity.
    #[arg(long)]
    pub plaintext: bool,
    /// Serve over TLS 1.3 (NBD_OPT_STARTTLS) with this PEM certificate chain; needs
    /// --tls-key and --tls-client-ca (clients always authenticate).
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (read from this file only).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS (mandatory with --tls-cert): clients must present a certificate issued
    /// by this CA (PEM); others fail the handshake, logged and counted.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Accepted for compatibility: with --tls-cert, TLS is always required (clients that
    /// do not upgrade get NBD_REP_ERR_TLS_REQD).
    #[arg(long, requires = "tls_cert")]
    pub tls_required: bool,
    /// Refuse to serve a volume whose epoch (the number of writable opens, from its
    /// authenticated state sector) is below N: the anchor against whole-volume rollback,
    /// recorded by the caller from a previous run's audit record
    /// (`target=caas_sdp::audit event=volume_open epoch=N`, at log level info).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_epoch: u32,
    /// Write the outcome of the open to this new file (0600) for the caller (the host
    /// agent anchors DBSP volumes with it): `epoch N` once the volume is open, or
    /// `volume_rollback` when --min-epoch refused it.
    #[arg(long, value_name = "PATH")]
    pub report_epoch: Option<PathBuf>,
    /// Deferred open (a migration's or a resume's target, `docs/suspend-migrate.md`): serve
    /// the NBD handshake at once (size and mode from the volume's header) but open and lock
    /// the volume only when one byte `o` follows the 32-byte key on --key-file (a pipe from
    /// the host agent, sent once the previous writer released the volume); requests wait
    /// until then (at most --defer-wait). End of file instead: the volume is never opened.
    #[arg(long, requires = "key_file", conflicts_with_all = ["plaintext", "upstream"])]
    pub defer_open: bool,
    /// With --defer-open: how long a request waits for the open before it fails (EIO).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub defer_wait: u64,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `caas volume upgrade`.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The format v1 volume file.
    pub file: PathBuf,
    /// Write the v2 volume here and keep FILE (default: replace FILE).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `caas volume check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `caas volume info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Also verify the key check value and the header tag with this key.
    #[command(flatten)]
    pub key: KeyArgs,
}

pub(crate) fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        u.parse().map_err(|e| format!("uid: {e}"))?,
        g.parse().map_err(|e| format!("gid: {e}"))?,
    ))
}

/// Switches the process to UID:GID for good.
pub type DropTo = fn(u32, u32) -> Result<(), String>;

/// Process hardening of the Secure Device Proxies (`caas volume serve`, `caas net serve`),
/// supplied by the binary so that there is one implementation (`caas_domc::harden`): they
/// hold their domain's keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hardening {
    /// Applied first, before the key is read: not dumpable (no core file, no ptrace by the
    /// same user), RLIMIT_CORE 0, memory locked where permitted.
    pub harden: Option<fn() -> Result<(), String>>,
    /// Switches to UID:GID for good (`--run-as`).
    pub drop_to: Option<DropTo>,
    /// The seccomp deny-list, installed after the switch (it denies the switch's calls)
    /// and before any thread that parses input starts.
    pub seccomp: Option<fn() -> Result<(), String>>,
}

/// Parses "4096", "64M", "1G", ...
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

fn key_input(k: &KeyArgs, provider: &Option<Arc<dyn DataKeyProvider>>) -> Result<KeyInput, Error> {
    if let Some(p) = &k.key_file {
        return Ok(KeyInput::Raw(Arc::new(caas_volume::keys::read_key_file(
            p,
        )?)));
    }
    match provider {
        Some(p) => Ok(KeyInput::Provider(p.clone())),
        None => Err(Error::Config(
            "no key source: pass --key-file PATH or configure the KMS".into(),
        )),
    }
}

fn dbsp(a: &DbspArgs) -> Result<Dbsp, Error> {
    let hex = |s: &str, what: &str| {
        hex::decode(s).map_err(|_| Error::Config(format!("--{what} must be hex")))
    };
    Ok(Dbsp {
        domain_id: a.domain_id.as_bytes().to_vec(),
        security_profile: a.security_profile.as_bytes().to_vec(),
        c4: hex(&a.c4, "c4")?,
        mu: hex(&a.mu, "mu")?,
    })
}

async fn open_store(s: &StoreArgs, writable: bool) -> Result<Store, Error> {
    match (&s.file, &s.upstream) {
        (_, Some(uri)) => Store::connect_nbd(uri).await,
        (Some(f), None) => Store::open_file(f, writable, None),
        (None, None) => Err(Error::Config("pass a volume FILE or --upstream URI".into())),
    }
}

/// Creates a volume file of `size` bytes (rounded up to 4 KiB).
pub async fn create_file(
    path: &Path,
    size: u64,
    key: &KeyInput,
    d: Dbsp,
) -> Result<caas_volume::Header, Error> {
    if path.exists() {
        return Err(Error::Config(format!("{} already exists", path.display())));
    }
    let size = size.div_ceil(4096) * 4096;
    let layout = Layout::new(size)?;
    let store = Store::open_file(path, true, Some(layout.store_len()))?;
    engine::create(&store, key, size, d, false).await
}

/// Runs a `caas volume` subcommand. `provider` is the KMS-backed data-key provider when
/// the caller has one configured (used when no `--key-file` is given).
pub async fn run(
    cmd: VolumeCommand,
    provider: Option<Arc<dyn DataKeyProvider>>,
) -> Result<(), Error> {
    run_hardened(cmd, provider, Hardening::default()).await
}

/// [`run`], with `serve` hardened by `hardening`.
pub async fn run_hardened(
    cmd: VolumeCommand,
    provider: Option<Arc<dyn DataKeyProvider>>,
    hardening: Hardening,
) -> Result<(), Error> {
    match cmd {
        VolumeCommand::Create(a) => {
            let key = key_input(&a.key, &provider)?;
            let d = dbsp(&a.dbsp)?;
            let h = match (&a.out, &a.upstream) {
                (_, Some(uri)) => {
                    let store = Store::connect_nbd(uri).await?;
                    engine::create(&store, &key, a.size.div_ceil(4096) * 4096, d, true).await?
                }
                (Some(out), None) => create_file(out, a.size, &key, d).await?,
                (None, None) => {
                    return Err(Error::Config("pass --out FILE or --upstream URI".into()));
                }
            };
            println!(
                "created volume {} ({} bytes)",
                hex::encode(h.volume_id),
                h.layout.size
            );
            Ok(())
        }
        VolumeCommand::Import(a) => import(&a, &key_input(&a.key, &provider)?).await,
        VolumeCommand::Export(a) => {
            let key = key_input(&a.key, &provider)?;
            let (vol, _) = Volume::open(open_store(&a.store, false).await?, &key, false).await?;
            let mut out = std::fs::File::create(&a.out).map_err(Error::io("create raw image"))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < vol.size() {
                let n = (vol.size() - off).min(buf.len() as u64) as usize;
                vol.read(off, &mut buf[..n]).await?;
                std::io::Write::write_all(&mut out, &buf[..n])
                    .map_err(Error::io("write raw image"))?;
                off += n as u64;
            }
            out.sync_all().map_err(Error::io("sync raw image"))?;
            Ok(())
        }
        VolumeCommand::Serve(a) => serve_cmd(a, provider, hardening).await,
        VolumeCommand::Check(a) => {
            let key = key_input(&a.key, &provider)?;
            let store = open_store(&a.store, false).await?;
            let (_, state) = engine::inspect(&store).await?;
            let (vol, _) = Volume::open(store, &key, false).await?;
            let r = vol.scan(false).await?;
            println!(
                "blocks: {}  ok: {}  interrupted writes: {}  bad: {}",
                r.blocks,
                r.blocks - r.bad_count,
                r.torn,
                r.bad_count
            );
            if state.dirty {
                println!("volume was not closed cleanly; the next writable open runs recovery");
            }
            if r.bad_count > 0 {
                println!(
                    "bad blocks: {:?}{}",
                    r.bad,
                    if r.bad_count > r.bad.len() as u64 {
                        " ..."
                    } else {
                        ""
                    }
                );
                return Err(Error::Config(format!(
                    "{} block(s) failed authentication",
                    r.bad_count
                )));
            }
            Ok(())
        }
        VolumeCommand::Upgrade(a) => upgrade_file(&a, &key_input(&a.key, &provider)?).await,
        VolumeCommand::Info(a) => {
            let store = open_store(&a.store, false).await?;
            let (h, st) = engine::inspect(&store).await?;
            println!(
                "format:            caas volume v{}, AES-256-GCM per 4 KiB block, 3-slot metadata{}",
                h.version.number(),
                match h.version {
                    caas_volume::Version::V1 => " (read-only: run `caas volume upgrade`)",
                    caas_volume::Version::V2 => ", per-session keys",
                }
            );
            println!("volume id:         {}", hex::encode(h.volume_id));
            if h.version == caas_volume::Version::V2 {
                println!("volume salt:       {}", hex::encode(h.salt));
            }
            println!(
                "size:              {} bytes ({} blocks)",
                h.layout.size, h.layout.blocks
            );
            println!("metadata offset:   {}", h.layout.meta_offset);
            println!("data offset:       {}", h.layout.data_offset);
            match &h.key_source {
                KeySource::External => println!("key source:        external (key file)"),
                KeySource::Wrapped(b) => println!(
                    "key source:        KMS data key ({} byte wrapped blob)",
                    b.len()
                ),
            }
            println!("key check value:   {}", hex::encode(h.kcv));
            println!(
                "domain id:         {}",
                String::from_utf8_lossy(&h.dbsp.domain_id)
            );
            println!(
                "security profile:  {}",
                String::from_utf8_lossy(&h.dbsp.security_profile)
            );
            println!("c4:                {}", hex::encode(&h.dbsp.c4));
            println!("mu:                {}", hex::encode(&h.dbsp.mu));
            println!(
                "state:             {}",
                if st.dirty {
                    "open or not closed cleanly"
                } else {
                    "clean"
                }
            );
            match h.version {
                caas_volume::Version::V1 => {
                    println!("nonce reserved:    {}", st.nonce_reserved)
                }
                caas_volume::Version::V2 => println!(
                    "epoch:             {} (state sector MAC {})",
                    st.epoch,
                    if a.key.key_file.is_some() || provider.is_some() {
                        "checked below"
                    } else {
                        "not checked without the key"
                    }
                ),
            }
            if a.key.key_file.is_some() || provider.is_some() {
                let key = key_input(&a.key, &provider)?;
                Volume::open(store, &key, false).await?;
                println!(
                    "key:               verified (key check value, header tag{} match)",
                    if h.version == caas_volume::Version::V2 {
                        ", state sector MAC"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
    }
}

/// Encrypts the raw image `a.raw` into a new volume `a.out` under `key` (seed 001 Algorithm 1 line 6).
pub async fn import(a: &ImportArgs, key: &KeyInput) -> Result<(), Error> {
    use std::io::Read;
    let mut raw = std::fs::File::open(&a.raw).map_err(Error::io("open raw image"))?;
    let len = raw.metadata().map_err(Error::io("stat raw image"))?.len();
    if len == 0 {
        return Err(Error::Config("raw image is empty".into()));
    }
    create_file(&a.out, len, key, dbsp(&a.dbsp)?).await?;
    let (vol, _) = Volume::open(Store::open_file(&a.out, true, None)?, key, true).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut last_pct = u64::MAX;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        raw.read_exact(&mut buf[..n])
            .map_err(Error::io("read raw image"))?;
        // A fresh volume already reads as zeroes: skip all-zero chunks.
        if buf[..n].iter().any(|&b| b != 0) {
            vol.write(off, &mut buf[..n], false).await?;
        }
        off += n as u64;
        let pct = off * 100 / len;
        if !a.quiet && pct != last_pct {
            last_pct = pct;
            let bar = "#".repeat((pct / 2) as usize);
            eprint!("\rimporting [{bar:<50}] {pct:3}%");
        }
    }
    buf.fill(0);
    vol.close().await?;
    if !a.quiet {
        eprintln!();
    }
    Ok(())
}

/// `caas volume upgrade`: re-encrypts a v1 volume file as v2, into `--out` or (default)
/// into a temporary file next to it that then atomically replaces it. The source is held
/// under the writer lock throughout, so no proxy serves it meanwhile.
pub async fn upgrade_file(a: &UpgradeArgs, key: &KeyInput) -> Result<(), Error> {
    let src = Store::open_file(&a.file, true, None)?;
    let (path, new) = upgrade_locked(src, &a.file, a.out.as_deref(), key).await?;
    println!(
        "upgraded volume to format v2: {} (volume id {})",
        path.display(),
        hex::encode(new.volume_id)
    );
    Ok(())
}

/// [`upgrade_file`] with the source already open under the writer lock.
async fn upgrade_locked(
    src: Store,
    file: &Path,
    out: Option<&Path>,
    key: &KeyInput,
) -> Result<(PathBuf, caas_volume::Header), Error> {
    let (h, _) = engine::inspect(&src).await?;
    let (out, replace) = match out {
        Some(o) => (o.to_path_buf(), false),
        None => {
            let mut name = file
                .file_name()
                .ok_or_else(|| Error::Config("FILE has no file name".into()))?
                .to_os_string();
            name.push(".upgrade-tmp");
            (file.with_file_name(name), true)
        }
    };
    if out.exists() {
        if !replace {
            return Err(Error::Config(format!("{} already exists", out.display())));
        }
        // Left by an interrupted upgrade of this file (we hold its writer lock): restart.
        std::fs::remove_file(&out).map_err(Error::io("remove an interrupted upgrade"))?;
    }
    let dst = Store::open_file(&out, true, Some(h.layout.store_len()))?;
    if let Ok(m) = std::fs::metadata(file) {
        std::fs::set_permissions(&out, m.permissions())
            .map_err(Error::io("copy the volume file's permissions"))?;
    }
    let r = engine::upgrade(src.clone(), &dst, key, false).await;
    let new = match r {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            return Err(e);
        }
    };
    drop(dst);
    if replace {
        std::fs::rename(&out, file).map_err(Error::io("replace the volume file"))?;
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(Error::io("sync the volume directory"))?;
        }
    }
    drop(src);
    Ok((if replace { file.to_path_buf() } else { out }, new))
}

async fn serve_cmd(
    a: ServeArgs,
    provider: Option<Arc<dyn DataKeyProvider>>,
    hardening: Hardening,
) -> Result<(), Error> {
    // Hardened before anything secret is read.
    if let Some(h) = hardening.harden {
        h().map_err(|e| Error::Config(format!("hardening: {e}")))?;
    }
    if a.run_as.is_some() && hardening.drop_to.is_none() {
        return Err(Error::Config(
            "--run-as is not supported by this binary (use caas volume serve)".into(),
        ));
    }
    // aws-lc seeds its RNG with jitter entropy on first use (~60 ms on these machines): do
    // it now, before possibly waiting for the key on a pipe (the host agent starts the
    // proxy while it is still fetching the key).
    let _ = caas_crypto::random_bytes(1);
    let tls = match (&a.tls_cert, &a.tls_key, &a.tls_client_ca) {
        (Some(c), Some(k), Some(ca)) => Some(server::TlsSettings::from_pem_files(c, k, ca)?),
        (None, None, None) => None,
        (Some(_), Some(_), None) => {
            return Err(Error::Config(
                "--tls-cert needs --tls-client-ca (clients must authenticate)".into(),
            ));
        }
        _ => {
            return Err(Error::Config(
                "--tls-cert, --tls-key and --tls-client-ca go together".into(),
            ));
        }
    };
    if a.defer_open {
        return serve_deferred(a, hardening, tls).await;
    }
    // The store and the key (a pipe from the host agent) are opened with the privileges
    // the proxy was started with, then it switches to its workload's identity for good.
    let mut store = open_store(&a.store, !a.read_only).await?;
    let key = match a.plaintext {
        true => None,
        false => Some(key_input(&a.key, &provider)?),
    };
    // Automatic upgrade for writers: a format v1 volume file is re-encrypted as v2 (into a
    // temporary file that then replaces it) before it is served for writing — still with
    // the privileges the volume file needs.
    if let Some(key) = &key
        && !a.read_only
        && engine::inspect(&store).await?.0.version == caas_volume::Version::V1
    {
        let Some(file) = &a.store.file else {
            return Err(caas_volume::Error::V1ReadOnly.into());
        };
        eprintln!("upgrading format v1 volume {} to v2", file.display());
        upgrade_locked(store, file, None, key).await?;
        store = open_store(&a.store, true).await?;
    }
    drop_privileges(&a, hardening)?;
    on_serving_threads(serve_opened(a, store, key, tls)).await
}

/// Switches to `--run-as` for good (when given), then installs the seccomp filter (when
/// the binary supplies one): before the serving threads start and the first NBD request
/// from the workload is parsed.
fn drop_privileges(a: &ServeArgs, hardening: Hardening) -> Result<(), Error> {
    if let (Some((uid, gid)), Some(drop_to)) = (a.run_as, hardening.drop_to) {
        drop_to(uid, gid).map_err(|e| Error::Config(format!("--run-as {uid}:{gid}: {e}")))?;
    }
    if let Some(seccomp) = hardening.seccomp {
        seccomp().map_err(|e| Error::Config(format!("seccomp: {e}")))?;
    }
    Ok(())
}

/// Runs `work` (the serving) to its end on a multi-thread runtime whose threads are created
/// now, from this thread, which has dropped root when `--run-as` is given. Capabilities are
/// per thread: the drop leaves CAP_IPC_LOCK, which lets the process keep mapping locked
/// memory past its RLIMIT_MEMLOCK (mlockall's MCL_FUTURE stays in force), to the calling
/// thread alone, and threads that existed before it keep none; threads started from this
/// one inherit it. `caas volume serve` therefore runs on one thread until here.
async fn on_serving_threads<F>(work: F) -> Result<(), Error>
where
    F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::io("start the serving runtime"))?;
    let r = rt.spawn(work).await;
    rt.shutdown_background();
    r.map_err(|e| Error::Config(format!("the serving task failed: {e}")))?
}

/// `serve` once the store is open and the key read: opens the volume and serves it.
async fn serve_opened(
    a: ServeArgs,
    store: Store,
    key: Option<KeyInput>,
    tls: Option<server::TlsSettings>,
) -> Result<(), Error> {
    let (backend, vol) = match key {
        None => {
            tracing::warn!(
                "serving PLAINTEXT passthrough: no encryption, no integrity (benchmark baseline)"
            );
            (Backend::plain(store).await?, None)
        }
        Some(key) => {
            let opts = OpenOptions {
                writable: !a.read_only,
                min_epoch: a.min_epoch,
            };
            let opened = Volume::open_with(store, &key, opts).await;
            if let Some(path) = &a.report_epoch {
                let line = match &opened {
                    Ok((v, _)) => format!("epoch {}\n", v.epoch()),
                    Err(Error::Volume(caas_volume::Error::EpochBehind { .. })) => {
                        "volume_rollback\n".to_string()
                    }
                    Err(_) => "open_refused\n".to_string(),
                };
                write_report(path, &line)?;
            }
            let (vol, report) = opened?;
            tracing::info!(
                target: "caas_sdp::audit",
                event = "volume_open",
                epoch = vol.epoch(),
                writable = !a.read_only,
                "volume opened at epoch {}",
                vol.epoch()
            );
            if let Some(r) = report {
                eprintln!(
                    "recovered after unclean shutdown: {} interrupted writes repaired, {} bad blocks",
                    r.torn, r.bad_count
                );
            }
            (Backend::Encrypted(vol.clone()), Some(vol))
        }
    };
    let listener = bind(&a, tls.is_some()).await?;
    let cfg = server_config(&a, tls);
    server::serve(listener, backend, cfg, shutdown_signal()).await?;
    if let Some(v) = vol {
        v.close().await?;
    }
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Binds the listener of `a` and prints the URI it serves.
async fn bind(a: &ServeArgs, tls: bool) -> Result<Listener, Error> {
    let (listen, uri) = match (&a.socket, a.tcp, a.vsock) {
        (Some(p), _, _) => (
            Listen::Unix(p.clone()),
            format!("nbd+unix:///{}?socket={}", a.export_name, p.display()),
        ),
        (None, Some(t), _) => (Listen::Tcp(t), String::new()),
        (None, None, Some(port)) => (
            Listen::Vsock(port),
            format!("nbd+vsock://CID:{port}/{}", a.export_name),
        ),
        (None, None, None) => {
            return Err(Error::Config(
                "pass --socket PATH, --tcp ADDR or --vsock PORT".into(),
            ));
        }
    };
    let listener = Listener::bind(&listen).await?;
    if let (Some(mode), Some(p)) = (a.socket_mode, &a.socket) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io("chmod NBD socket"))?;
    }
    let uri = match listener.tcp_addr() {
        Some(addr) => format!("nbd://{addr}/{}", a.export_name),
        None => uri,
    };
    let uri = match tls {
        true => uri
            .replacen("nbd+unix://", "nbds+unix://", 1)
            .replacen("nbd+vsock://", "nbds+vsock://", 1)
            .replacen("nbd://", "nbds://", 1),
        false => uri,
    };
    println!("serving {uri}");
    Ok(listener)
}

fn server_config(a: &ServeArgs, tls: Option<server::TlsSettings>) -> ServerConfig {
    ServerConfig {
        export_name: a.export_name.clone(),
        tls,
        peers: server::PeerPolicy {
            uids: a.peer_uids.clone(),
            vsock_cid: a.vsock_peer_cid,
        },
        ..ServerConfig::default()
    }
}

/// `serve --defer-open`: the file is opened (not locked) and the key read with the start
/// privileges, the listener serves at once, and the volume is opened and locked — refused
/// below --min-epoch, reported to --report-epoch — only on the go byte (see [`ServeArgs`]).
async fn serve_deferred(
    a: ServeArgs,
    hardening: Hardening,
    tls: Option<server::TlsSettings>,
) -> Result<(), Error> {
    use std::io::Read as _;
    let (Some(file), Some(key_path)) = (&a.store.file, &a.key.key_file) else {
        return Err(Error::Config(
            "--defer-open needs a volume FILE and --key-file".into(),
        ));
    };
    let store = Store::open_file_unlocked(file, !a.read_only, false)?;
    let mut key_src = std::fs::File::open(key_path).map_err(Error::io("open the key file"))?;
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    key_src
        .read_exact(&mut raw[..])
        .map_err(|_| Error::Config("the key file must start with 32 raw bytes".into()))?;
    let key = KeyInput::Raw(Arc::new(
        caas_crypto::SecretKey::from_slice(&raw[..])
            .map_err(|_| Error::Config("bad key".into()))?,
    ));
    drop(raw);
    drop_privileges(&a, hardening)?;
    on_serving_threads(serve_deferred_opened(a, store, key, key_src, tls)).await
}

/// `serve --defer-open` once the file is open and the key read.
async fn serve_deferred_opened(
    a: ServeArgs,
    store: Store,
    key: KeyInput,
    mut key_src: std::fs::File,
    tls: Option<server::TlsSettings>,
) -> Result<(), Error> {
    use std::io::Read as _;
    // The size and mode the handshake advertises come from the header as stored (not yet
    // authenticated): the open refuses a volume that does not match them.
    let (header, _) = engine::inspect(&store).await?;
    let (deferred, opener) = engine::Deferred::new(
        header.layout.size,
        a.read_only,
        std::time::Duration::from_secs(a.defer_wait),
    );
    let listener = bind(&a, tls.is_some()).await?;
    let opts = OpenOptions {
        writable: !a.read_only,
        min_epoch: a.min_epoch,
    };
    let report = a.report_epoch.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let open_task = tokio::spawn(async move {
        let go = tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            matches!(key_src.read(&mut b), Ok(1) if b[0] == b'o')
        })
        .await
        .unwrap_or(false);
        let opened = match go {
            false => Err(Error::Config("deferred open abandoned".into())),
            true => match store.lock(opts.writable) {
                Ok(()) => Volume::open_with(store, &key, opts).await,
                Err(e) => Err(e),
            },
        };
        drop(key);
        if let Some(path) = &report {
            let line = match &opened {
                Ok((v, _)) => format!("epoch {}\n", v.epoch()),
                Err(Error::Volume(caas_volume::Error::EpochBehind { .. })) => {
                    "volume_rollback\n".to_string()
                }
                Err(_) => "open_refused\n".to_string(),
            };
            if let Err(e) = write_report(path, &line) {
                tracing::error!(error = %e, "epoch report");
            }
        }
        let r = match opened {
            Ok((vol, _)) => {
                tracing::info!(
                    target: "caas_sdp::audit",
                    event = "volume_open",
                    epoch = vol.epoch(),
                    writable = opts.writable,
                    deferred = true,
                    "volume opened at epoch {}",
                    vol.epoch()
                );
                opener.open(vol)
            }
            Err(e) => {
                opener.fail();
                Err(e)
            }
        };
        if let Err(e) = &r {
            eprintln!("deferred open refused: {e}");
            // Nothing to serve: the proxy ends.
            let _ = done_tx.send(());
        }
    });
    let shutdown = async move {
        // A refused open ends the proxy; a successful one drops the sender (no signal).
        let refused = async {
            if done_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = refused => {}
        }
    };
    let cfg = server_config(&a, tls);
    server::serve(listener, Backend::Deferred(deferred.clone()), cfg, shutdown).await?;
    if let Some(v) = deferred.opened() {
        v.close().await?;
    }
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    // Ended by a refused open: the caller sees a failure (and the report's reason).
    match deferred.failed() {
        true => Err(Error::Config("the deferred open was refused".into())),
        false => {
            open_task.abort();
            Ok(())
        }
    }
}

/// Writes `line` to a new 0600 file `path` (never through a planted file or link).
fn write_report(path: &Path, line: &str) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("create the epoch report"))?;
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(Error::io("write the epoch report"))
}

fn parse_socket_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
