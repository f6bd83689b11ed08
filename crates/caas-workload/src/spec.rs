//! What a launched workload is given: its [`WorkloadSpec`] (JSON, from the driver), the
//! injected secrets (τ and pk_DM, written by the host agent after the trusted-launch checks,
//! seed 003 §4.3), and the `ready` file through which it reports where it listens.
use crate::error::{Error, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use caas_crypto::SecretBytes;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Length of the launch token τ (bytes).
pub const TAU_LEN: usize = 32;
/// Length of a raw Ed25519 public key (bytes).
pub const PK_DM_LEN: usize = 32;
/// Largest accepted inject file (bytes; room for the launch's TLS client credentials).
const MAX_INJECT_FILE: u64 = 16 * 1024;
/// Largest accepted spec or ready file (bytes).
const MAX_SPEC_FILE: u64 = 1 << 20;

/// How the driver describes a workload to start (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The workload's identifier (`id_vm` of the seed); also the PSK identity.
    pub vm_id: String,
    /// Where the PSK channel listens (`127.0.0.1:0` picks a free port; the bound address
    /// is reported in `ready_file`).
    pub listen: SocketAddr,
    /// Where the workload writes its [`ReadyInfo`] (JSON) once it serves.
    pub ready_file: PathBuf,
    /// The injected-secrets file ([`InjectedSecrets`]); read once at start, then deleted.
    pub inject_file: PathBuf,
    /// The boot disk, `nbd+unix:///EXPORT?socket=PATH` (or `nbd://HOST:PORT/EXPORT`, or
    /// `nbds://HOST:PORT/EXPORT`: mutual TLS with the launch's injected client credentials).
    pub disk: String,
    /// The tenant's crypto domain (VSM), if the workload gets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsm: Option<VsmSpec>,
    /// Extra NBD volumes (e.g. DBSP-protected volumes served by the Secure Device Proxy).
    /// The workload uses the **last 4 KiB block** of each as its marker block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// The overlay NIC, when the VM belongs to a network domain (`docs/network-sdp.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetSpec>,
}

/// A VM's overlay NIC: a virtio-net device whose backend is the crypto domain's network
/// proxy (`caas net serve`), over a UNIX datagram socket pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// The proxy's socket (qemu sends the VM's frames there: its `remote.path`).
    pub proxy_socket: PathBuf,
    /// qemu's own socket (the proxy accepts frames only from it: its `local.path`).
    pub vm_socket: PathBuf,
    /// The NIC's MAC address.
    pub mac: MacAddr,
    /// The guest's address on the overlay.
    pub address: std::net::Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// A unicast, locally administered or assigned Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not a unicast MAC address (xx:xx:xx:xx:xx:xx)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if m[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(MacAddr(m))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Checks a workload id: 1..=128 characters of `[A-Za-z0-9-_.:]` (it is also the PSK
/// identity and a qemu option value).
pub fn validate_vm_id(vm_id: &str) -> Result<()> {
    if vm_id.is_empty()
        || vm_id.len() > crate::psk::MAX_IDENTITY_LEN
        || !vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(Error::Config(format!(
            "vm_id must be 1..={} characters of [A-Za-z0-9-_.:]",
            crate::psk::MAX_IDENTITY_LEN
        )));
    }
    Ok(())
}

/// How the workload reaches its crypto domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsmSpec {
    /// The crypto domain's VSM socket.
    pub socket: PathBuf,
    /// A file holding the token's user PIN (first line; read once at start).
    pub user_pin_file: PathBuf,
    /// Slot of the token (default 0).
    #[serde(default)]
    pub slot: u64,
}

impl WorkloadSpec {
    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = read_bounded(path, MAX_SPEC_FILE, "read workload spec")?;
        let spec: Self = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("workload spec {}: {e}", path.display())))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Writes the spec as JSON (mode 0600).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_owned(path, None)
    }

    /// Writes the spec as JSON, mode 0600 (atomically, `caas_crypto::fs`), owned by `owner`
    /// (UID, GID) when given: the workload's identity must read it.
    pub fn save_owned(&self, path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Config(format!("encode workload spec: {e}")))?;
        caas_crypto::fs::write_secret(path, &json, owner.map(Into::into))
            .map_err(Error::io("write workload spec"))
    }

    /// Checks the fields that would otherwise fail late.
    pub fn validate(&self) -> Result<()> {
        validate_vm_id(&self.vm_id)?;
        if let Some(n) = &self.network
            && n.prefix_len > 32
        {
            return Err(Error::Config(format!(
                "overlay prefix length {} is above 32",
                n.prefix_len
            )));
        }
        for uri in std::iter::once(&self.disk).chain(&self.volumes) {
            if !(uri.starts_with("nbd+unix://")
                || uri.starts_with("nbd://")
                || uri.starts_with("nbds://"))
            {
                return Err(Error::Config(format!(
                    "{uri:?} is not an NBD URI (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT or nbds://HOST:PORT/EXPORT)"
                )));
            }
        }
        Ok(())
    }
}

/// What the host agent injects into a launched workload: τ and pk_DM (seed 003 §4.3, after
/// the H1/H2 checks). On disk: JSON `{"tau": b64, "pk_dm": b64}`, mode 0600, owned by the
/// workload's identity, deleted by the workload once read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedSecrets {
    /// The launch token τ (32 bytes): the PSK of the channel to the DM.
    pub tau: SecretBytes,
    /// The DM's raw Ed25519 public key.
    pub pk_dm: [u8; PK_DM_LEN],
    /// The launch's mutual-TLS client credentials, when the crypto domain serves the
    /// workload over the network (`nbds://` disk, VSM over TCP): no other launch has them.
    pub tls: Option<TlsCredentials>,
}

/// Client credentials of one launch (PEM): the launch's CA (the server must chain to it),
/// the workload's certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredentials {
    /// The launch's CA certificate.
    pub ca_pem: Vec<u8>,
    /// The workload's client certificate.
    pub cert_pem: Vec<u8>,
    /// The workload's private key.
    pub key_pem: SecretBytes,
}

#[derive(Serialize)]
struct InjectOut<'a> {
    tau: &'a str,
    pk_dm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsOut<'a>>,
}

/// PEM in base64, so that the key borrows from the (zeroizing) buffer (no JSON escapes).
#[derive(Serialize)]
struct TlsOut<'a> {
    ca: String,
    cert: String,
    key: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectIn<'a> {
    #[serde(borrow)]
    tau: &'a str,
    pk_dm: String,
    #[serde(borrow, default)]
    tls: Option<TlsIn<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsIn<'a> {
    ca: String,
    cert: String,
    #[serde(borrow)]
    key: &'a str,
}

impl InjectedSecrets {
    /// Writes the inject file: created new (fails if it exists), mode 0600, atomically
    /// (`caas_crypto::fs::create_secret`).
    pub fn write_to(&self, path: &Path) -> Result<()> {
        self.write_to_owned(path, None)
    }

    /// [`InjectedSecrets::write_to`], the file owned by `owner` (UID, GID) when given: the
    /// workload's identity, the only one that may read it.
    pub fn write_to_owned(&self, path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
        let tau = Zeroizing::new(B64.encode(self.tau.expose()));
        let key = Zeroizing::new(
            self.tls
                .as_ref()
                .map(|t| B64.encode(t.key_pem.expose()))
                .unwrap_or_default(),
        );
        // Pre-sized so that no reallocation leaves a copy of τ or the key behind.
        let mut json = Zeroizing::new(Vec::with_capacity(MAX_INJECT_FILE as usize));
        serde_json::to_writer(
            &mut *json,
            &InjectOut {
                tau: &tau,
                pk_dm: B64.encode(self.pk_dm),
                tls: self.tls.as_ref().map(|t| TlsOut {
                    ca: B64.encode(&t.ca_pem),
                    cert: B64.encode(&t.cert_pem),
                    key: &key,
                }),
            },
        )
        .map_err(|e| Error::Inject(format!("encode: {e}")))?;
        caas_crypto::fs::create_secret(path, &json, owner.map(Into::into))
            .map_err(Error::io("write inject file"))
    }

    /// Parses the JSON form. Errors never quote the input.
    pub fn parse(json: &[u8]) -> Result<Self> {
        // Base64 strings need no JSON escapes, so `tau` is borrowed from the (zeroizing)
        // input buffer and never copied into an unzeroized string.
        let f: InjectIn<'_> = serde_json::from_slice(json).map_err(|e| {
            Error::Inject(format!(
                "not the expected JSON object (line {}, column {}: {:?})",
                e.line(),
                e.column(),
                e.classify()
            ))
        })?;
        let tau = SecretBytes::new(
            B64.decode(f.tau)
                .map_err(|_| Error::Inject("tau is not base64".into()))?,
        );
        if tau.len() != TAU_LEN {
            return Err(Error::Inject(format!(
                "tau must be {TAU_LEN} bytes, got {}",
                tau.len()
            )));
        }
        let pk = B64
            .decode(&f.pk_dm)
            .map_err(|_| Error::Inject("pk_dm is not base64".into()))?;
        let pk_dm: [u8; PK_DM_LEN] = pk.as_slice().try_into().map_err(|_| {
            Error::Inject(format!("pk_dm must be {PK_DM_LEN} bytes, got {}", pk.len()))
        })?;
        let tls = match f.tls {
            None => None,
            Some(t) => {
                let bad = |what: &str| Error::Inject(format!("tls.{what} is not base64"));
                Some(TlsCredentials {
                    ca_pem: B64.decode(&t.ca).map_err(|_| bad("ca"))?,
                    cert_pem: B64.decode(&t.cert).map_err(|_| bad("cert"))?,
                    key_pem: SecretBytes::new(B64.decode(t.key).map_err(|_| bad("key"))?),
                })
            }
        };
        Ok(Self { tau, pk_dm, tls })
    }

    /// Reads the inject file once and deletes it. Refuses a file that group or others may
    /// read (the host agent writes it 0600) or that another identity owns (the host agent
    /// gives it to the workload's identity). The file is removed even when its content is
    /// rejected, so a bad injection leaves nothing behind.
    pub fn take_from(path: &Path) -> Result<Self> {
        let meta = std::fs::symlink_metadata(path).map_err(Error::io("stat inject file"))?;
        if !meta.is_file() {
            return Err(Error::Inject("not a regular file".into()));
        }
        let me = nix::unistd::geteuid().as_raw();
        let parsed = if meta.mode() & 0o077 != 0 {
            Err(Error::Inject(format!(
                "mode {:o} lets group or others read it (must be 0600)",
                meta.mode() & 0o777
            )))
        } else if meta.uid() != me {
            Err(Error::Inject(format!(
                "owned by uid {}, not by this workload's identity (uid {me})",
                meta.uid()
            )))
        } else {
            read_bounded(path, MAX_INJECT_FILE, "read inject file").and_then(|b| Self::parse(&b))
        };
        std::fs::remove_file(path).map_err(Error::io("delete inject file"))?;
        parsed
    }
}

/// What a serving workload writes to its `ready_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// The workload's identifier.
    pub vm_id: String,
    /// The bound address of the PSK channel.
    pub addr: SocketAddr,
    /// The workload's process id.
    pub pid: u32,
    /// SHA-256 of the boot disk (hex).
    pub disk_sha256: String,
}

impl ReadyInfo {
    /// Writes the file atomically (`caas_crypto::fs::write_secret`: mode 0600, temporary
    /// file, then rename).
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::Config(format!("encode ready info: {e}")))?;
        caas_crypto::fs::write_secret(path, &json, None).map_err(Error::io("write ready file"))
    }

    /// Reads the file: `Ok(None)` while it does not exist yet.
    pub fn read_from(path: &Path) -> Result<Option<Self>> {
        match read_bounded(path, MAX_SPEC_FILE, "read ready file") {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Config(format!("ready file {}: {e}", path.display()))),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Reads at most `max` bytes into a zeroizing buffer (larger files are refused).
pub(crate) fn read_bounded(
    path: &Path,
    max: u64,
    context: &'static str,
) -> Result<Zeroizing<Vec<u8>>> {
    let f = std::fs::File::open(path).map_err(Error::io(context))?;
    // Sized for small (secret) files up front, so no reallocation leaves copies behind.
    let cap = usize::try_from(max.saturating_add(1).min(8192)).unwrap_or(8192);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(Error::io(context))?;
    if buf.len() as u64 > max {
        return Err(Error::Config(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_json_round_trip_and_defaults() -> Result<()> {
        let json = r#"{"vm_id":"vm-1","listen":"127.0.0.1:0","ready_file":"/r",
            "inject_file":"/i","disk":"nbd+unix:///d?socket=/s"}"#;
        let s: WorkloadSpec =
            serde_json::from_str(json).map_err(|e| Error::Config(e.to_string()))?;
        s.validate()?;
        assert!(s.vsm.is_none() && s.volumes.is_empty());
        let back: WorkloadSpec = serde_json::from_slice(
            &serde_json::to_vec(&s).map_err(|e| Error::Config(e.to_string()))?,
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        assert_eq!(back, s);
        // Unknown fields are refused (a typo must not silently drop a volume).
        let typo = json.replace("\"disk\"", "\"volume\":[],\"disk\"");
        assert!(serde_json::from_str::<WorkloadSpec>(&typo).is_err());
        Ok(())
    }

    #[test]
    fn injected_secrets_debug_hides_tau() {
        let s = InjectedSecrets {
            tau: SecretBytes::new(vec![0x41; 32]),
            pk_dm: [0; 32],
            tls: None,
        };
        assert!(!format!("{s:?}").contains("65"));
    }

    /// The launch's TLS client credentials survive the inject file; the key is not shown.
    #[test]
    fn injected_tls_credentials_round_trip() -> Result<()> {
        let s = InjectedSecrets {
            tau: SecretBytes::new(vec![7; 32]),
            pk_dm: [1; 32],
            tls: Some(TlsCredentials {
                ca_pem: b"-----BEGIN CERTIFICATE-----\nCA\n".to_vec(),
                cert_pem: b"-----BEGIN CERTIFICATE-----\nC\n".to_vec(),
                key_pem: SecretBytes::new(b"-----BEGIN PRIVATE KEY-----\nSECRETKEY\n".to_vec()),
            }),
        };
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let p = dir.path().join("inject.json");
        s.write_to(&p)?;
        let back = InjectedSecrets::take_from(&p)?;
        assert_eq!(back, s);
        assert!(!p.exists());
        assert!(!format!("{back:?}").contains("SECRETKEY"));
        Ok(())
    }
}
