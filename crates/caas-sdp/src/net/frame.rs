//! The overlay's wire format: one UDP datagram carries one Ethernet frame of the VM,
//! sealed with AES-256-GCM (`docs/network-sdp.md` §Frame format).
//!
//! ```text
//! 0      2    3     4            12      16       20        28     36          36+n   +16
//! | "CN" | v1 | typ | domain tag | epoch | sender | session | seq  | ciphertext | tag |
//! ```
//! All integers big-endian. The 36-byte header is authenticated (it is the AAD, followed by
//! the full network-domain id, which is not sent); the nonce is `sender ‖ seq` (96 bits)
//! under a key derived per (epoch, sender, session) from the network key, so no
//! (key, nonce) pair is ever used twice: `seq` only grows within a session and every start of
//! a proxy is a new session.
use aws_lc_rs::digest;

/// Magic of an overlay datagram.
pub const MAGIC: [u8; 2] = *b"CN";
/// Format version.
pub const VERSION: u8 = 1;
/// Type of a datagram carrying an Ethernet frame.
pub const TYPE_FRAME: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 36;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes an overlay datagram adds to the Ethernet frame it carries.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The largest datagram handled (UDP's limit); larger frames are dropped.
pub const MAX_DATAGRAM: usize = 65_507;
/// The largest Ethernet frame carried.
pub const MAX_FRAME: usize = MAX_DATAGRAM - OVERHEAD;
/// The smallest Ethernet frame accepted (destination, source, EtherType).
pub const MIN_FRAME: usize = 14;

/// A network domain's identity: its name, and the 8-byte tag sent in every header (the first
/// 8 bytes of SHA-256("caas-net-domain\0" ‖ name)). The tag only sorts out frames of other
/// domains cheaply; authentication binds the full name (it is part of the AAD).
#[derive(Clone, PartialEq, Eq)]
pub struct DomainId {
    name: String,
    tag: [u8; 8],
}

impl DomainId {
    /// A domain id: 1 to 255 bytes, no control characters.
    ///
    /// # Errors
    /// When the name is empty, too long or has control characters.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err("a network domain id is 1 to 255 printable bytes".into());
        }
        let mut input = b"caas-net-domain\0".to_vec();
        input.extend_from_slice(name.as_bytes());
        let d = digest::digest(&digest::SHA256, &input);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&d.as_ref()[..8]);
        Ok(Self {
            name: name.to_string(),
            tag,
        })
    }

    /// The domain's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag sent in headers.
    #[must_use]
    pub fn tag(&self) -> [u8; 8] {
        self.tag
    }
}

impl std::fmt::Debug for DomainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DomainId({})", self.name)
    }
}

/// The header of an overlay datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's network domain tag.
    pub domain_tag: [u8; 8],
    /// The key epoch the frame is sealed under.
    pub epoch: u32,
    /// The sending crypto domain's id in the network domain.
    pub sender: u32,
    /// The sender's session (a new one at every start of its proxy; only grows).
    pub session: u64,
    /// The frame's sequence number in the session.
    pub seq: u64,
}

/// Why a datagram is not even parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than a header and a tag (plus a minimal frame).
    #[error("datagram too short")]
    TooShort,
    /// Not an overlay datagram (magic, version or type).
    #[error("not a caas overlay datagram")]
    NotOverlay,
}

impl Header {
    /// Encodes the header.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = TYPE_FRAME;
        h[4..12].copy_from_slice(&self.domain_tag);
        h[12..16].copy_from_slice(&self.epoch.to_be_bytes());
        h[16..20].copy_from_slice(&self.sender.to_be_bytes());
        h[20..28].copy_from_slice(&self.session.to_be_bytes());
        h[28..36].copy_from_slice(&self.seq.to_be_bytes());
        h
    }

    /// Parses the header of a datagram (which must also hold a minimal frame and the tag).
    ///
    /// # Errors
    /// [`FormatError`] for a datagram that is too short or not an overlay datagram.
    pub fn decode(d: &[u8]) -> Result<Self, FormatError> {
        if d.len() < HEADER_LEN + MIN_FRAME + TAG_LEN {
            return Err(FormatError::TooShort);
        }
        if d[0..2] != MAGIC || d[2] != VERSION || d[3] != TYPE_FRAME {
            return Err(FormatError::NotOverlay);
        }
        let u32_at = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut domain_tag = [0u8; 8];
        domain_tag.copy_from_slice(&d[4..12]);
        Ok(Self {
            domain_tag,
            epoch: u32_at(12),
            sender: u32_at(16),
            session: u64_at(20),
            seq: u64_at(28),
        })
    }

    /// The AES-GCM nonce: `sender ‖ seq`.
    #[must_use]
    pub fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.sender.to_be_bytes());
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        n
    }

    /// The additional authenticated data: the encoded header, then the full domain name.
    #[must_use]
    pub fn aad(&self, domain: &DomainId) -> Vec<u8> {
        let mut a = Vec::with_capacity(HEADER_LEN + domain.name.len());
        a.extend_from_slice(&self.encode());
        a.extend_from_slice(domain.name.as_bytes());
        a
    }
}

/// The KDF context of a frame key: domain name, 0, epoch, sender, session.
#[must_use]
pub fn key_context(domain: &DomainId, epoch: u32, sender: u32, session: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(domain.name.len() + 17);
    c.extend_from_slice(domain.name.as_bytes());
    c.push(0);
    c.extend_from_slice(&epoch.to_be_bytes());
    c.extend_from_slice(&sender.to_be_bytes());
    c.extend_from_slice(&session.to_be_bytes());
    c
}

/// The KDF label of frame keys.
pub const KEY_LABEL: &[u8] = b"caas-net-frame-v1";

/// Whether a MAC address is a group (broadcast or multicast) address.
#[must_use]
pub fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// Destination and source MAC of an Ethernet frame (at least [`MIN_FRAME`] bytes).
#[must_use]
pub fn macs(frame: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    if frame.len() < MIN_FRAME {
        return None;
    }
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&frame[0..6]);
    src.copy_from_slice(&frame[6..12]);
    Some((dst, src))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_nonce_is_sender_then_seq() {
        let h = Header {
            domain_tag: [1, 2, 3, 4, 5, 6, 7, 8],
            epoch: 7,
            sender: 0x0102_0304,
            session: 99,
            seq: 0x0a0b_0c0d_0e0f_1011,
        };
        let mut d = h.encode().to_vec();
        d.resize(HEADER_LEN + MIN_FRAME + TAG_LEN, 0);
        assert_eq!(Header::decode(&d), Ok(h));
        assert_eq!(
            h.nonce(),
            [1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11]
        );
        assert_eq!(Header::decode(&d[..40]), Err(FormatError::TooShort));
        d[2] = 9;
        assert_eq!(Header::decode(&d), Err(FormatError::NotOverlay));
    }

    #[test]
    fn domain_tags_differ_and_names_are_checked() {
        let a = DomainId::new("finance").unwrap();
        let b = DomainId::new("hr").unwrap();
        assert_ne!(a.tag(), b.tag());
        assert!(DomainId::new("").is_err());
        assert!(DomainId::new("a\nb").is_err());
    }
}
