//! The 4 KiB volume header: an immutable part (magic, version, suite, volume id, size,
//! layout, key source and wrapped key, DBSP fields, key check value; in v2 the 256-bit
//! volume salt) authenticated by a header tag, and a mutable 512-byte state sector (dirty
//! flag; v2: the epoch and a MAC; v1: the nonce reservation, unauthenticated) that is
//! rewritten in place. Parsing is strict: every length is bounded, every padding byte
//! must be zero, and the layout fields must match the size.
use crate::cipher::VolumeCipher;
use crate::layout::Layout;
use crate::{BLOCK_SIZE, ENTRY_SIZE, Error, HEADER_SIZE, Version};

/// Magic at offset 0.
pub const MAGIC: &[u8; 8] = b"CAASVOL\0";
/// Magic of the state sector.
pub const STATE_MAGIC: &[u8; 8] = b"CAASSTAT";
/// Format version written by this crate.
pub const VERSION: u16 = 2;
/// Cipher suite 1: AES-256-GCM per 4 KiB block, 3-slot metadata entries of 128 bytes.
pub const SUITE_AES256GCM_4K: u16 = 1;
/// Offset of the state sector.
pub const STATE_OFFSET: usize = 3584;
/// Length of the state sector.
pub const STATE_LEN: usize = 512;
/// Bytes of the state sector covered by its MAC (v2); the MAC follows.
pub const STATE_BODY_LEN: usize = 480;
/// Bytes of the header covered by the header tag.
pub const TAGGED_LEN: usize = 3568;

/// Field limits.
pub const MAX_WRAPPED: usize = 1024;
/// Maximum DBSP domain id length.
pub const MAX_DOMAIN_ID: usize = 128;
/// Maximum DBSP security profile length.
pub const MAX_SECURITY_PROFILE: usize = 256;
/// Maximum DBSP c4 length.
pub const MAX_C4: usize = 1024;
/// Maximum DBSP μ length.
pub const MAX_MU: usize = 128;

const OFF_WRAPPED: usize = 96;
const OFF_DOMAIN_ID: usize = OFF_WRAPPED + MAX_WRAPPED; // 1120
const OFF_SP: usize = OFF_DOMAIN_ID + MAX_DOMAIN_ID; // 1248
const OFF_C4: usize = OFF_SP + MAX_SECURITY_PROFILE; // 1504
const OFF_MU: usize = OFF_C4 + MAX_C4; // 2528
/// Offset of the v2 volume salt (reserved and zero in v1).
pub const OFF_SALT: usize = OFF_MU + MAX_MU; // 2656
const OFF_RESERVED_V2: usize = OFF_SALT + 32; // 2688

/// Where the data key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Supplied by the operator (raw key file); nothing stored.
    External,
    /// A data key wrapped by the tenant's KMS; the blob is stored here.
    Wrapped(Vec<u8>),
}

/// The domain-based storage protection fields of the domain header (seed 003 §4.4),
/// carried as opaque bytes at this stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dbsp {
    /// Domain identifier D.
    pub domain_id: Vec<u8>,
    /// Security profile SP.
    pub security_profile: Vec<u8>,
    /// c4 = Enc(K_TTP, n‖SP).
    pub c4: Vec<u8>,
    /// μ = MAC(K_TTP, n‖SP).
    pub mu: Vec<u8>,
}

/// The immutable header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: Version,
    /// Random volume id (bound into every block's associated data and every derivation).
    pub volume_id: [u8; 16],
    /// v2: random 256-bit salt every key of the volume is derived with (zero in v1).
    pub salt: [u8; 32],
    /// Layout derived from the size.
    pub layout: Layout,
    /// Key source.
    pub key_source: KeySource,
    /// DBSP fields.
    pub dbsp: Dbsp,
    /// Key check value.
    pub kcv: [u8; 16],
    /// Tag over the first [`TAGGED_LEN`] bytes.
    pub tag: [u8; 16],
}

/// The mutable state sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// Set while the volume is open for writing; a set flag at open means a crash and
    /// triggers recovery.
    pub dirty: bool,
    /// v2: the epoch of the latest writable session (every writable open increments it
    /// before writing anything; `create` is epoch 1). 0 in v1.
    pub epoch: u32,
    /// v1 only: every write counter below this value may have been used.
    pub nonce_reserved: u64,
    /// v2: HMAC over the header tag and the state sector's first 480 bytes.
    pub mac: [u8; 32],
}

impl State {
    /// Encodes the 512-byte state sector of a volume of version `v`.
    pub fn encode(&self, v: Version) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[..8].copy_from_slice(STATE_MAGIC);
        b[8..12].copy_from_slice(&u32::from(self.dirty).to_be_bytes());
        match v {
            Version::V1 => b[16..24].copy_from_slice(&self.nonce_reserved.to_be_bytes()),
            Version::V2 => {
                b[12..16].copy_from_slice(&self.epoch.to_be_bytes());
                b[STATE_BODY_LEN..].copy_from_slice(&self.mac);
            }
        }
        b
    }

    fn decode(b: &[u8], v: Version) -> Result<Self, Error> {
        if b.len() != STATE_LEN || &b[..8] != STATE_MAGIC {
            return Err(Error::InvalidHeader("bad state sector magic"));
        }
        let flags = be32(b, 8);
        if flags > 1 {
            return Err(Error::InvalidHeader("unknown state flags"));
        }
        let mut st = State {
            dirty: flags == 1,
            ..State::default()
        };
        match v {
            Version::V1 => {
                if b[12..16] != [0; 4] || b[24..].iter().any(|&x| x != 0) {
                    return Err(Error::InvalidHeader("unknown state flags"));
                }
                st.nonce_reserved = be64(b, 16);
            }
            Version::V2 => {
                if b[16..STATE_BODY_LEN].iter().any(|&x| x != 0) {
                    return Err(Error::InvalidHeader("non-zero reserved state bytes"));
                }
                st.epoch = be32(b, 12);
                st.mac.copy_from_slice(&b[STATE_BODY_LEN..]);
            }
        }
        Ok(st)
    }
}

fn check_len(what: &'static str, v: &[u8], max: usize) -> Result<(), Error> {
    if v.len() > max {
        return Err(Error::FieldTooLong {
            what,
            len: v.len(),
            max,
        });
    }
    Ok(())
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Builds and tags a new (version 2) header for the cipher's volume id and salt.
    pub fn new(
        cipher: &VolumeCipher,
        size: u64,
        key_source: KeySource,
        dbsp: Dbsp,
    ) -> Result<Self, Error> {
        if cipher.version() != Version::V2 {
            return Err(Error::V1ReadOnly);
        }
        let layout = Layout::new(size)?;
        if let KeySource::Wrapped(w) = &key_source {
            check_len("wrapped key", w, MAX_WRAPPED)?;
        }
        check_len("domain id", &dbsp.domain_id, MAX_DOMAIN_ID)?;
        check_len(
            "security profile",
            &dbsp.security_profile,
            MAX_SECURITY_PROFILE,
        )?;
        check_len("c4", &dbsp.c4, MAX_C4)?;
        check_len("mu", &dbsp.mu, MAX_MU)?;
        let mut h = Header {
            version: Version::V2,
            volume_id: cipher.volume_id(),
            salt: cipher.salt(),
            layout,
            key_source,
            dbsp,
            kcv: cipher.kcv()?,
            tag: [0; 16],
        };
        let bytes = h.encode_immutable();
        h.tag = cipher.header_tag(&bytes[..TAGGED_LEN])?;
        Ok(h)
    }

    fn encode_immutable(&self) -> Vec<u8> {
        let mut b = vec![0u8; STATE_OFFSET];
        b[..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&self.version.number().to_be_bytes());
        b[10..12].copy_from_slice(&SUITE_AES256GCM_4K.to_be_bytes());
        b[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..40].copy_from_slice(&self.layout.size.to_be_bytes());
        b[40..48].copy_from_slice(&self.layout.blocks.to_be_bytes());
        b[48..56].copy_from_slice(&self.layout.meta_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.layout.data_offset.to_be_bytes());
        b[64..68].copy_from_slice(&(ENTRY_SIZE as u32).to_be_bytes());
        let (src, wrapped): (u16, &[u8]) = match &self.key_source {
            KeySource::External => (1, &[]),
            KeySource::Wrapped(w) => (2, w),
        };
        b[68..70].copy_from_slice(&src.to_be_bytes());
        b[70..72].copy_from_slice(&(wrapped.len() as u16).to_be_bytes());
        b[72..88].copy_from_slice(&self.kcv);
        let d = &self.dbsp;
        b[88..90].copy_from_slice(&(d.domain_id.len() as u16).to_be_bytes());
        b[90..92].copy_from_slice(&(d.security_profile.len() as u16).to_be_bytes());
        b[92..94].copy_from_slice(&(d.c4.len() as u16).to_be_bytes());
        b[94..96].copy_from_slice(&(d.mu.len() as u16).to_be_bytes());
        b[OFF_WRAPPED..OFF_WRAPPED + wrapped.len()].copy_from_slice(wrapped);
        b[OFF_DOMAIN_ID..OFF_DOMAIN_ID + d.domain_id.len()].copy_from_slice(&d.domain_id);
        b[OFF_SP..OFF_SP + d.security_profile.len()].copy_from_slice(&d.security_profile);
        b[OFF_C4..OFF_C4 + d.c4.len()].copy_from_slice(&d.c4);
        b[OFF_MU..OFF_MU + d.mu.len()].copy_from_slice(&d.mu);
        if self.version == Version::V2 {
            b[OFF_SALT..OFF_RESERVED_V2].copy_from_slice(&self.salt);
        }
        b[TAGGED_LEN..STATE_OFFSET].copy_from_slice(&self.tag);
        b
    }

    /// Encodes the full 4 KiB header with `state`.
    pub fn encode(&self, state: &State) -> Vec<u8> {
        let mut b = self.encode_immutable();
        b.extend_from_slice(&state.encode(self.version));
        b
    }

    /// Parses a header of version 1 or 2 (structure only: call [`Header::verify`] and
    /// [`Header::verify_state`] with the key next).
    pub fn decode(b: &[u8]) -> Result<(Self, State), Error> {
        if b.len() < HEADER_SIZE {
            return Err(Error::InvalidHeader("shorter than 4096 bytes"));
        }
        if &b[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = match be16(b, 8) {
            1 => Version::V1,
            2 => Version::V2,
            v => return Err(Error::UnsupportedVersion(v)),
        };
        let suite = be16(b, 10);
        if suite != SUITE_AES256GCM_4K {
            return Err(Error::UnsupportedSuite(suite));
        }
        if be32(b, 12) as usize != BLOCK_SIZE || be32(b, 64) as usize != ENTRY_SIZE {
            return Err(Error::InvalidHeader("block or entry size"));
        }
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[16..32]);
        let layout = Layout::new(be64(b, 32))?;
        if be64(b, 40) != layout.blocks
            || be64(b, 48) != layout.meta_offset
            || be64(b, 56) != layout.data_offset
        {
            return Err(Error::InvalidHeader("layout fields do not match the size"));
        }
        let wrapped_len = be16(b, 70) as usize;
        let key_source = match be16(b, 68) {
            1 if wrapped_len == 0 => KeySource::External,
            2 if wrapped_len > 0 && wrapped_len <= MAX_WRAPPED => {
                KeySource::Wrapped(b[OFF_WRAPPED..OFF_WRAPPED + wrapped_len].to_vec())
            }
            _ => return Err(Error::InvalidHeader("key source")),
        };
        let mut kcv = [0u8; 16];
        kcv.copy_from_slice(&b[72..88]);
        let field = |len_off: usize,
                     off: usize,
                     max: usize,
                     what: &'static str|
         -> Result<Vec<u8>, Error> {
            let len = be16(b, len_off) as usize;
            if len > max {
                return Err(Error::FieldTooLong { what, len, max });
            }
            if b[off + len..off + max].iter().any(|&x| x != 0) {
                return Err(Error::InvalidHeader("non-zero padding"));
            }
            Ok(b[off..off + len].to_vec())
        };
        let dbsp = Dbsp {
            domain_id: field(88, OFF_DOMAIN_ID, MAX_DOMAIN_ID, "domain id")?,
            security_profile: field(90, OFF_SP, MAX_SECURITY_PROFILE, "security profile")?,
            c4: field(92, OFF_C4, MAX_C4, "c4")?,
            mu: field(94, OFF_MU, MAX_MU, "mu")?,
        };
        let mut salt = [0u8; 32];
        let reserved_from = match version {
            Version::V1 => OFF_SALT,
            Version::V2 => {
                salt.copy_from_slice(&b[OFF_SALT..OFF_RESERVED_V2]);
                OFF_RESERVED_V2
            }
        };
        if b[OFF_WRAPPED + wrapped_len..OFF_DOMAIN_ID]
            .iter()
            .any(|&x| x != 0)
            || b[reserved_from..TAGGED_LEN].iter().any(|&x| x != 0)
        {
            return Err(Error::InvalidHeader("non-zero padding"));
        }
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&b[TAGGED_LEN..STATE_OFFSET]);
        let state = State::decode(&b[STATE_OFFSET..HEADER_SIZE], version)?;
        Ok((
            Header {
                version,
                volume_id,
                salt,
                layout,
                key_source,
                dbsp,
                kcv,
                tag,
            },
            state,
        ))
    }

    /// The cipher of this volume under the data key `key` (not yet verified: see
    /// [`Header::verify`]).
    pub fn cipher(&self, key: &caas_crypto::SecretKey) -> Result<VolumeCipher, Error> {
        match self.version {
            Version::V1 => VolumeCipher::new_v1(key, self.volume_id),
            Version::V2 => VolumeCipher::new_v2(key, self.volume_id, self.salt),
        }
    }

    /// Checks the key (key check value) and then the header tag.
    pub fn verify(&self, cipher: &VolumeCipher) -> Result<(), Error> {
        if cipher.version() != self.version
            || cipher.volume_id() != self.volume_id
            || cipher.salt() != self.salt
            || cipher.kcv()? != self.kcv
        {
            return Err(Error::WrongKey);
        }
        let bytes = self.encode_immutable();
        let tag = cipher.header_tag(&bytes[..TAGGED_LEN])?;
        if !constant_time_eq(&tag, &self.tag) {
            return Err(Error::HeaderTampered);
        }
        Ok(())
    }

    /// A v2 state sector with its MAC (binding it to this header).
    pub fn seal_state(
        &self,
        cipher: &VolumeCipher,
        dirty: bool,
        epoch: u32,
    ) -> Result<State, Error> {
        if self.version != Version::V2 {
            return Err(Error::V1ReadOnly);
        }
        let mut st = State {
            dirty,
            epoch,
            ..State::default()
        };
        let body = st.encode(Version::V2);
        st.mac = cipher.state_mac(&self.tag, &body[..STATE_BODY_LEN])?;
        Ok(st)
    }

    /// Verifies a v2 state sector's MAC ([`Error::StateTampered`] when it was edited or
    /// comes from another volume). A v1 state sector is not authenticated (nothing to
    /// check; v1 volumes are only read).
    pub fn verify_state(&self, cipher: &VolumeCipher, st: &State) -> Result<(), Error> {
        match self.version {
            Version::V1 => Ok(()),
            Version::V2 => {
                let body = st.encode(Version::V2);
                cipher.verify_state_mac(&self.tag, &body[..STATE_BODY_LEN], &st.mac)
            }
        }
    }
}

fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use caas_crypto::SecretKey;

    fn cipher(k: u8) -> VolumeCipher {
        VolumeCipher::new_v2(&SecretKey::from_bytes([k; 32]), [1u8; 16], [2u8; 32])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn sample() -> Header {
        let dbsp = Dbsp {
            domain_id: b"dom".to_vec(),
            security_profile: b"sp".to_vec(),
            c4: vec![4; 40],
            mu: vec![5; 32],
        };
        Header::new(&cipher(1), 1 << 20, KeySource::Wrapped(vec![9; 100]), dbsp)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn roundtrip_and_verify() {
        let h = sample();
        let st = h
            .seal_state(&cipher(1), true, 77)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = h.encode(&st);
        assert_eq!(b.len(), HEADER_SIZE);
        assert_eq!(&b[..16], b"CAASVOL\0\x00\x02\x00\x01\x00\x00\x10\x00");
        assert_eq!(&b[OFF_SALT..OFF_SALT + 32], &[2u8; 32]);
        let (h2, st2) = Header::decode(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((&h2, st2), (&h, st));
        assert_eq!(h2.verify(&cipher(1)), Ok(()));
        assert_eq!(h2.verify_state(&cipher(1), &st2), Ok(()));
        assert_eq!(h2.verify(&cipher(2)), Err(Error::WrongKey));
        assert_eq!(h2.verify_state(&cipher(2), &st2), Err(Error::StateTampered));
    }

    #[test]
    fn every_immutable_byte_is_authenticated_or_rejected() {
        let h = sample();
        let b = h.encode(&State::default());
        for i in 0..STATE_OFFSET {
            let mut t = b.clone();
            t[i] ^= 0x01;
            let ok = Header::decode(&t).and_then(|(h, _)| h.verify(&cipher(1)));
            assert!(ok.is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn every_state_byte_is_authenticated_or_rejected() {
        let h = sample();
        let c = cipher(1);
        let st = h.seal_state(&c, false, 5).unwrap_or_else(|e| panic!("{e}"));
        let b = h.encode(&st);
        for i in STATE_OFFSET..HEADER_SIZE {
            let mut t = b.clone();
            t[i] ^= 0x01;
            let ok = Header::decode(&t).and_then(|(h, st)| h.verify_state(&c, &st));
            assert!(ok.is_err(), "flip at state byte {i} went unnoticed");
        }
        // A state sector of another volume under the same key does not verify here.
        let other = VolumeCipher::new_v2(&SecretKey::from_bytes([1; 32]), [1u8; 16], [3u8; 32])
            .unwrap_or_else(|e| panic!("{e}"));
        let h_other = Header::new(&other, 1 << 20, KeySource::External, Dbsp::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let st_other = h_other
            .seal_state(&other, false, 5)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.verify_state(&c, &st_other), Err(Error::StateTampered));
    }

    #[test]
    fn state_sector_is_strict() {
        let h = sample();
        let mut b = h.encode(&State::default());
        b[STATE_OFFSET + 11] = 2;
        assert!(Header::decode(&b).is_err());
        let mut b = h.encode(&State::default());
        b[STATE_OFFSET + 100] = 1;
        assert!(Header::decode(&b).is_err());
        let b = h.encode(&State::default());
        assert!(Header::decode(&b[..4095]).is_err());
        let mut b2 = b.clone();
        b2[0] = b'X';
        assert_eq!(Header::decode(&b2).err(), Some(Error::BadMagic));
        let mut b3 = b.clone();
        b3[9] = 3;
        assert_eq!(
            Header::decode(&b3).err(),
            Some(Error::UnsupportedVersion(3))
        );
    }

    #[test]
    fn oversized_fields_are_refused() {
        let dbsp = Dbsp {
            mu: vec![0; MAX_MU + 1],
            ..Dbsp::default()
        };
        assert!(matches!(
            Header::new(&cipher(1), 4096, KeySource::External, dbsp),
            Err(Error::FieldTooLong { what: "mu", .. })
        ));
    }
}
