//! The control channel of `caas net serve`: typed, length-prefixed messages on the proxy's
//! stdin from the host agent (which fetched the network key from the TTP), one reply line
//! per message on its stdout. Nothing on this channel comes from the network.
//!
//! ```text
//! message = len:u32 (of what follows, ≤ 64 KiB) ‖ type:u8 ‖ body
//! 1 Key    epoch:u32 ‖ key:32 bytes
//! 2 Peers  count:u16 ‖ count × (sender:u32 ‖ family:u8 (4|6) ‖ ip:4|16 ‖ port:u16)
//! 3 Stats  (empty)            → reply "stats tx_frames=… rx_replayed=…"
//! ```
//! Replies: `ok key epoch=N`, `ok peers n=N`, `stats …`, or `error: …` (the message is
//! refused and nothing changes). End of input ends the proxy (its agent is gone).
use super::overlay::Peer;
use caas_crypto::{SecretBytes, SecretKey};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The largest control message.
pub const MAX_MESSAGE: usize = 64 * 1024;

const KEY: u8 = 1;
const PEERS: u8 = 2;
const STATS: u8 = 3;

/// A control message.
pub enum Control {
    /// The network key of an epoch.
    Key {
        /// The epoch.
        epoch: u32,
        /// The key.
        key: SecretKey,
    },
    /// The other members of the network domain (replaces the list).
    Peers(Vec<Peer>),
    /// Asks for the counters.
    Stats,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key { epoch, .. } => write!(f, "Key {{ epoch: {epoch}, .. }}"),
            Self::Peers(p) => f.debug_tuple("Peers").field(p).finish(),
            Self::Stats => f.write_str("Stats"),
        }
    }
}

/// A malformed control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad control message: {0}")]
pub struct BadMessage(pub String);

impl Control {
    /// Encodes the message with its length prefix (zeroized on drop: it may hold a key).
    #[must_use]
    pub fn encode(&self) -> SecretBytes {
        let mut body = vec![];
        match self {
            Self::Key { epoch, key } => {
                body.push(KEY);
                body.extend_from_slice(&epoch.to_be_bytes());
                body.extend_from_slice(key.expose());
            }
            Self::Peers(list) => {
                body.push(PEERS);
                let n = u16::try_from(list.len()).unwrap_or(u16::MAX);
                body.extend_from_slice(&n.to_be_bytes());
                for p in list.iter().take(usize::from(n)) {
                    body.extend_from_slice(&p.sender.to_be_bytes());
                    match p.addr.ip() {
                        IpAddr::V4(ip) => {
                            body.push(4);
                            body.extend_from_slice(&ip.octets());
                        }
                        IpAddr::V6(ip) => {
                            body.push(6);
                            body.extend_from_slice(&ip.octets());
                        }
                    }
                    body.extend_from_slice(&p.addr.port().to_be_bytes());
                }
            }
            Self::Stats => body.push(STATS),
        }
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        zeroize::Zeroize::zeroize(&mut body);
        SecretBytes::new(out)
    }

    /// Decodes a message body (type and fields, without the length prefix).
    ///
    /// # Errors
    /// [`BadMessage`] for an unknown type, a wrong length or a bad address family.
    pub fn decode(b: &[u8]) -> Result<Self, BadMessage> {
        let bad = |s: &str| BadMessage(s.to_string());
        let (&ty, rest) = b.split_first().ok_or_else(|| bad("empty message"))?;
        match ty {
            KEY => {
                if rest.len() != 4 + 32 {
                    return Err(bad("a Key message is an epoch and a 32-byte key"));
                }
                let epoch = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let key = SecretKey::from_slice(&rest[4..]).map_err(|_| bad("key length"))?;
                Ok(Self::Key { epoch, key })
            }
            PEERS => {
                if rest.len() < 2 {
                    return Err(bad("a Peers message starts with a count"));
                }
                let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let mut at = 2;
                let mut take = |k: usize| -> Result<&[u8], BadMessage> {
                    let s = rest
                        .get(at..at + k)
                        .ok_or_else(|| bad("truncated Peers message"))?;
                    at += k;
                    Ok(s)
                };
                let mut list = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let s = take(4)?;
                    let sender = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
                    let ip = match take(1)?[0] {
                        4 => {
                            let o = take(4)?;
                            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
                        }
                        6 => {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(take(16)?);
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => return Err(bad("address family is 4 or 6")),
                    };
                    let p = take(2)?;
                    list.push(Peer {
                        sender,
                        addr: SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])),
                    });
                }
                if at != rest.len() {
                    return Err(bad("trailing bytes after the peers"));
                }
                Ok(Self::Peers(list))
            }
            STATS if rest.is_empty() => Ok(Self::Stats),
            _ => Err(bad("unknown message type")),
        }
    }

    /// Reads one message; `Ok(None)` at a clean end of input.
    ///
    /// # Errors
    /// I/O errors, a truncated or oversized message ([`std::io::ErrorKind::InvalidData`]);
    /// a well-framed but malformed message is `Ok(Some(Err(_)))`.
    pub fn read(r: &mut impl Read) -> std::io::Result<Option<Result<Self, BadMessage>>> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "control message too long",
            ));
        }
        let mut buf = zeroize::Zeroizing::new(vec![0u8; len]);
        r.read_exact(&mut buf)?;
        Ok(Some(Self::decode(&buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            Control::Key {
                epoch: 3,
                key: SecretKey::from_bytes([7; 32]),
            },
            Control::Peers(vec![
                Peer {
                    sender: 1,
                    addr: "127.0.0.1:4000".parse().unwrap(),
                },
                Peer {
                    sender: 2,
                    addr: "[::1]:5000".parse().unwrap(),
                },
            ]),
            Control::Stats,
        ];
        let mut stream = vec![];
        for m in &msgs {
            stream.extend_from_slice(m.encode().expose());
        }
        let mut r = std::io::Cursor::new(stream);
        for m in &msgs {
            let got = Control::read(&mut r).unwrap().unwrap().unwrap();
            assert_eq!(format!("{got:?}"), format!("{m:?}"));
            if let (Control::Key { key: a, .. }, Control::Key { key: b, .. }) = (&got, m) {
                assert_eq!(a.expose(), b.expose());
            }
        }
        assert!(Control::read(&mut r).unwrap().is_none());
        for bad in [
            &[][..],
            &[9],
            &[1, 0, 0],
            &[2, 0, 1, 0, 0, 0, 1, 5],
            &[3, 0],
        ] {
            assert!(Control::decode(bad).is_err(), "{bad:?}");
        }
        let huge = (u32::try_from(MAX_MESSAGE).unwrap() + 1).to_be_bytes();
        assert!(Control::read(&mut std::io::Cursor::new(huge.to_vec())).is_err());
        assert!(
            !format!("{:?}", msgs[0]).contains('7'),
            "Debug hides the key"
        );
    }
}
