//! Signing inside the tenant's crypto domain (VSM) from the workload: log in with the user
//! PIN, find the workload's ECDSA P-256 key pair (token objects with `CKA_ID` =
//! `caas-workload`) or generate it at the first use after launch (its private key never
//! leaves the crypto domain; it travels with the token when the workload is suspended or
//! migrated, `docs/suspend-migrate.md`), and sign with `CKM_ECDSA_SHA256`. The DM verifies with the returned public point
//! ([`verify_vsm_signature`]). Inside a VM the agent reaches the crypto domain either with
//! its own client over the virtio-serial port ([`VsmEndpoint::Virtio`]) or through the
//! tenant's PKCS#11 module loaded like any application loads it ([`VsmEndpoint::Pkcs11`],
//! the module configured by `CAAS_PKCS11_CONFIG` / `CAAS_PKCS11_SOCKET`).
use crate::error::{Error, Result};
use caas_crypto::SecretBytes;
use caas_domc::client::Client;
use caas_domc::{Ckr, Error as DomcError};
use caas_vsm_proto::{Attr, AttrValue, Blob, Body, MechParam, Mechanism, Request, Secret, attr};
use cryptoki_sys::{
    CKA_CLASS, CKA_EC_PARAMS, CKA_EC_POINT, CKA_ID, CKA_LABEL, CKA_SIGN, CKA_TOKEN, CKA_VERIFY,
    CKF_RW_SESSION, CKF_SERIAL_SESSION, CKM_EC_KEY_PAIR_GEN, CKM_ECDSA_SHA256, CKO_PRIVATE_KEY,
    CKO_PUBLIC_KEY, CKR_DEVICE_ERROR, CKU_USER,
};
use std::path::{Path, PathBuf};

/// Mechanism name reported with the signature.
pub const VSM_MECHANISM: &str = "CKM_ECDSA_SHA256";
/// Label and CKA_ID of the workload's key pair in the token.
const KEY_LABEL: &[u8] = b"caas-workload";
/// Largest signature we accept back (P-256 raw r‖s is 64 bytes).
const SIG_CAP: u64 = 256;

fn unexpected() -> Error {
    Error::Vsm(DomcError::Token(Ckr(CKR_DEVICE_ERROR)))
}

/// Where the crypto domain is, seen from the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsmEndpoint {
    /// The crypto domain's UNIX socket (process workloads).
    Unix(PathBuf),
    /// A virtio-serial port inside a VM (`/dev/virtio-ports/caas.vsm`), which the host's
    /// qemu connects to the crypto domain's socket; written `virtio:PATH`.
    Virtio(PathBuf),
    /// A PKCS#11 module (`libcaas_pkcs11.so`), configured by its own environment; written
    /// `pkcs11:PATH`.
    Pkcs11(PathBuf),
}

impl VsmEndpoint {
    /// `virtio:PATH` or a socket path.
    #[must_use]
    pub fn parse(s: &str) -> Self {
        if let Some(p) = s.strip_prefix("virtio:") {
            Self::Virtio(PathBuf::from(p))
        } else if let Some(p) = s.strip_prefix("pkcs11:") {
            Self::Pkcs11(PathBuf::from(p))
        } else {
            Self::Unix(PathBuf::from(s))
        }
    }

    fn connect(&self) -> Result<Client> {
        Ok(match self {
            Self::Unix(p) => Client::connect(p)?,
            Self::Pkcs11(_) => {
                return Err(Error::Config(
                    "a PKCS#11 module endpoint is used through the module only".into(),
                ));
            }
            Self::Virtio(p) => {
                let port = caas_vsm_proto::serial::SerialPort::open(p, Some(VIRTIO_TIMEOUT))
                    .map_err(Error::io("open the VSM's virtio-serial port"))?;
                Client::over(Box::new(port))?
            }
        })
    }
}

/// How long the guest waits for one answer of the crypto domain over virtio-serial.
const VIRTIO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A logged-in session in the crypto domain with the workload's signing key.
#[derive(Debug)]
pub struct VsmSigner {
    endpoint: VsmEndpoint,
    slot: u64,
    pin: SecretBytes,
    conn: Option<Conn>,
    module: Option<ModuleSigner>,
}

/// Signing through a PKCS#11 module (`cryptoki`): the same key pair and mechanism.
struct ModuleSigner {
    session: cryptoki::session::Session,
    private: cryptoki::object::ObjectHandle,
    public_point: Vec<u8>,
    _module: cryptoki::context::Pkcs11,
}

impl std::fmt::Debug for ModuleSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSigner").finish_non_exhaustive()
    }
}

fn p11(e: cryptoki::error::Error) -> Error {
    Error::Pkcs11(e.to_string())
}

impl ModuleSigner {
    fn open(module: &Path, slot: u64, pin: &SecretBytes) -> Result<Self> {
        use cryptoki::context::{CInitializeArgs, Pkcs11};
        use cryptoki::mechanism::Mechanism as M;
        use cryptoki::object::{Attribute, AttributeType};
        use cryptoki::session::UserType;
        let ctx = Pkcs11::new(module).map_err(p11)?;
        ctx.initialize(CInitializeArgs::OsThreads).map_err(p11)?;
        let slots = ctx.get_slots_with_token().map_err(p11)?;
        let slot = usize::try_from(slot)
            .ok()
            .and_then(|i| slots.get(i).copied())
            .ok_or_else(|| Error::Pkcs11(format!("no token in slot {slot}")))?;
        let session = ctx.open_rw_session(slot).map_err(p11)?;
        let pin = std::str::from_utf8(pin.expose())
            .map_err(|_| Error::Config("the user PIN is not UTF-8".into()))?;
        session
            .login(
                UserType::User,
                Some(&cryptoki::types::AuthPin::new(pin.into())),
            )
            .map_err(p11)?;
        let find = |class| -> Result<Option<cryptoki::object::ObjectHandle>> {
            Ok(session
                .find_objects(&[
                    Attribute::Class(class),
                    Attribute::Id(KEY_LABEL.to_vec()),
                    Attribute::Token(true),
                ])
                .map_err(p11)?
                .into_iter()
                .next())
        };
        use cryptoki::object::ObjectClass;
        let (public, private) = match (
            find(ObjectClass::PUBLIC_KEY)?,
            find(ObjectClass::PRIVATE_KEY)?,
        ) {
            (Some(public), Some(private)) => (public, private),
            _ => session
                .generate_key_pair(
                    &M::EccKeyPairGen,
                    &[
                        Attribute::EcParams(caas_domc::der::OID_P256.to_vec()),
                        Attribute::Label(KEY_LABEL.to_vec()),
                        Attribute::Id(KEY_LABEL.to_vec()),
                        Attribute::Token(true),
                        Attribute::Verify(true),
                    ],
                    &[
                        Attribute::Label(KEY_LABEL.to_vec()),
                        Attribute::Id(KEY_LABEL.to_vec()),
                        Attribute::Token(true),
                        Attribute::Sign(true),
                    ],
                )
                .map_err(p11)?,
        };
        let point = match session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(p11)?
            .into_iter()
            .next()
        {
            Some(Attribute::EcPoint(p)) => p,
            _ => return Err(unexpected()),
        };
        let public_point = caas_domc::der::octet_string(&point)
            .unwrap_or(&point)
            .to_vec();
        Ok(Self {
            session,
            private,
            public_point,
            _module: ctx,
        })
    }

    fn sign(&self, msg: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let sig = self
            .session
            .sign(
                &cryptoki::mechanism::Mechanism::EcdsaSha256,
                self.private,
                msg,
            )
            .map_err(p11)?;
        Ok((sig, self.public_point.clone()))
    }
}

#[derive(Debug)]
struct Conn {
    client: Client,
    session: u64,
    private: u64,
    /// Uncompressed SEC1 point (0x04 ‖ X ‖ Y).
    public_point: Vec<u8>,
}

impl VsmSigner {
    /// Connects, logs in and generates the key pair. `pin` is the token's user PIN.
    pub fn connect(socket: &Path, slot: u64, pin: SecretBytes) -> Result<Self> {
        Self::connect_to(VsmEndpoint::Unix(socket.to_path_buf()), slot, pin)
    }

    /// [`VsmSigner::connect`] to any [`VsmEndpoint`].
    pub fn connect_to(endpoint: VsmEndpoint, slot: u64, pin: SecretBytes) -> Result<Self> {
        let mut s = Self {
            endpoint,
            slot,
            pin,
            conn: None,
            module: None,
        };
        match &s.endpoint {
            VsmEndpoint::Pkcs11(m) => s.module = Some(ModuleSigner::open(m, slot, &s.pin)?),
            _ => s.conn = Some(s.open()?),
        }
        Ok(s)
    }

    /// Reads the user PIN from the first line of `pin_file`, then [`VsmSigner::connect`].
    pub fn from_pin_file(socket: &Path, slot: u64, pin_file: &Path) -> Result<Self> {
        Self::from_pin_file_to(VsmEndpoint::Unix(socket.to_path_buf()), slot, pin_file)
    }

    /// [`VsmSigner::from_pin_file`] for any [`VsmEndpoint`].
    pub fn from_pin_file_to(endpoint: VsmEndpoint, slot: u64, pin_file: &Path) -> Result<Self> {
        let raw = crate::spec::read_bounded(pin_file, 4096, "read user PIN file")?;
        let end = raw
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(raw.len());
        if end == 0 {
            return Err(Error::Config("the user PIN file is empty".into()));
        }
        Self::connect_to(endpoint, slot, SecretBytes::from_slice(&raw[..end]))
    }

    fn open(&self) -> Result<Conn> {
        let mut client = self.endpoint.connect()?;
        let session = match client.call(Request::OpenSession {
            slot: self.slot,
            flags: CKF_SERIAL_SESSION | CKF_RW_SESSION,
        })? {
            Body::Ulong { value } => value,
            _ => return Err(unexpected()),
        };
        client.call(Request::Login {
            session,
            user_type: CKU_USER,
            pin: Secret::new(self.pin.expose().to_vec()),
        })?;
        let a = |ty, v: Vec<u8>| Attr { ty, value: Blob(v) };
        let mut find = |class: u64| -> Result<Option<u64>> {
            client.call(Request::FindObjectsInit {
                session,
                template: vec![
                    a(CKA_CLASS, attr::ulong(class)),
                    a(CKA_ID, KEY_LABEL.to_vec()),
                    a(CKA_TOKEN, attr::boolean(true)),
                ],
            })?;
            let found = client.call(Request::FindObjects { session, max: 1 })?;
            client.call(Request::FindObjectsFinal { session })?;
            match found {
                Body::Ulongs { values } => Ok(values.first().copied()),
                _ => Err(unexpected()),
            }
        };
        let found = (find(CKO_PUBLIC_KEY)?, find(CKO_PRIVATE_KEY)?);
        let (public, private) = match found {
            (Some(public), Some(private)) => (public, private),
            _ => match client.call(Request::GenerateKeyPair {
                session,
                mechanism: Mechanism {
                    mechanism: CKM_EC_KEY_PAIR_GEN,
                    param: MechParam::None {},
                },
                public_template: vec![
                    a(CKA_EC_PARAMS, caas_domc::der::OID_P256.to_vec()),
                    a(CKA_LABEL, KEY_LABEL.to_vec()),
                    a(CKA_ID, KEY_LABEL.to_vec()),
                    a(CKA_TOKEN, attr::boolean(true)),
                    a(CKA_VERIFY, attr::boolean(true)),
                ],
                private_template: vec![
                    a(CKA_LABEL, KEY_LABEL.to_vec()),
                    a(CKA_ID, KEY_LABEL.to_vec()),
                    a(CKA_TOKEN, attr::boolean(true)),
                    a(CKA_SIGN, attr::boolean(true)),
                ],
            })? {
                Body::KeyPair { public, private } => (public, private),
                _ => return Err(unexpected()),
            },
        };
        let point = match client.call(Request::GetAttributeValue {
            session,
            object: public,
            types: vec![CKA_EC_POINT],
        })? {
            Body::Attrs { values } => match values.into_iter().next() {
                Some(AttrValue::Value { value }) => value.0,
                _ => return Err(unexpected()),
            },
            _ => return Err(unexpected()),
        };
        // CKA_EC_POINT is a DER OCTET STRING around the SEC1 point.
        let public_point = caas_domc::der::octet_string(&point)
            .unwrap_or(&point)
            .to_vec();
        Ok(Conn {
            client,
            session,
            private,
            public_point,
        })
    }

    fn sign_once(conn: &mut Conn, msg: &[u8]) -> Result<Vec<u8>> {
        conn.client.call(Request::SignInit {
            session: conn.session,
            mechanism: Mechanism {
                mechanism: CKM_ECDSA_SHA256,
                param: MechParam::None {},
            },
            key: conn.private,
        })?;
        match conn.client.call(Request::Sign {
            session: conn.session,
            data: Blob(msg.to_vec()),
            cap: Some(SIG_CAP),
        })? {
            Body::Data { data } => Ok(data.0),
            _ => Err(unexpected()),
        }
    }

    /// Signs `msg` in the crypto domain; returns (signature r‖s, public point). After a
    /// failure (e.g. the crypto domain was replaced by a resume or a migration) it
    /// reconnects and finds its key pair again in the token (or makes one).
    pub fn sign(&mut self, msg: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        if let Some(m) = &self.module {
            let first = m.sign(msg);
            let VsmEndpoint::Pkcs11(path) = &self.endpoint else {
                return first;
            };
            if first.is_ok() {
                return first;
            }
            // The crypto domain was restarted or replaced (a VM migrated to another host
            // gets a new one): its sessions are gone. Finalize, initialize again, log in and
            // find the key pair in the token that travelled with it; the host side of the port may still be reconnecting
            // (qemu's chardev retries every second), so a few attempts over ~3 s.
            self.module = None;
            let path = path.clone();
            let mut last = first;
            for attempt in 0..6u32 {
                if attempt > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                match ModuleSigner::open(&path, self.slot, &self.pin) {
                    Ok(m) => {
                        let r = m.sign(msg);
                        self.module = Some(m);
                        if r.is_ok() {
                            return r;
                        }
                        self.module = None;
                        last = r;
                    }
                    Err(e) => last = Err(e),
                }
            }
            return last;
        }
        if let Some(conn) = self.conn.as_mut()
            && let Ok(sig) = Self::sign_once(conn, msg)
        {
            return Ok((sig, conn.public_point.clone()));
        }
        self.conn = None;
        let mut conn = self.open()?;
        let sig = Self::sign_once(&mut conn, msg)?;
        let point = conn.public_point.clone();
        self.conn = Some(conn);
        Ok((sig, point))
    }

    /// The current public point (uncompressed SEC1), if connected.
    #[must_use]
    pub fn public_point(&self) -> Option<&[u8]> {
        if let Some(m) = &self.module {
            return Some(&m.public_point);
        }
        self.conn.as_ref().map(|c| c.public_point.as_slice())
    }
}

/// Verifies a `CKM_ECDSA_SHA256` signature (raw r‖s) by the P-256 `public_point`.
pub fn verify_vsm_signature(public_point: &[u8], msg: &[u8], sig: &[u8]) -> Result<()> {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        public_point,
    )
    .verify(msg, sig)
    .map_err(|_| Error::VsmSignatureInvalid)
}
