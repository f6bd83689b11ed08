//! The learning switch of one crypto domain: which peer a unicast MAC address was last seen
//! behind (learned from the source MAC of authenticated frames only, so nobody outside the
//! network domain can steer traffic). Group and unknown destinations go to every peer.
//! Entries age out; the table is bounded (when full, nothing new is learned until entries
//! age out, and unknown destinations are flooded, which is only slower, never wrong).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a learned address is kept without being seen again.
pub const AGE: Duration = Duration::from_secs(300);
/// The most addresses learned.
pub const CAPACITY: usize = 4096;

/// Where to send a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The one peer the destination was learned behind.
    Peer(SocketAddr),
    /// Every peer (group or unknown destination).
    Flood,
}

/// MAC address → peer.
#[derive(Debug, Default)]
pub struct MacTable {
    entries: HashMap<[u8; 6], (SocketAddr, Instant)>,
}

impl MacTable {
    /// Learns that `src` is behind `peer` (group addresses are never learned).
    pub fn learn(&mut self, src: [u8; 6], peer: SocketAddr, now: Instant) {
        if super::frame::is_group(&src) {
            return;
        }
        if self.entries.len() >= CAPACITY && !self.entries.contains_key(&src) {
            self.entries
                .retain(|_, (_, t)| now.duration_since(*t) < AGE);
            if self.entries.len() >= CAPACITY {
                return;
            }
        }
        self.entries.insert(src, (peer, now));
    }

    /// Where a frame to `dst` goes.
    #[must_use]
    pub fn route(&self, dst: &[u8; 6], now: Instant) -> Route {
        if super::frame::is_group(dst) {
            return Route::Flood;
        }
        match self.entries.get(dst) {
            Some((peer, t)) if now.duration_since(*t) < AGE => Route::Peer(*peer),
            _ => Route::Flood,
        }
    }

    /// Forgets every address behind a peer that left.
    pub fn forget_peer(&mut self, peer: &SocketAddr) {
        self.entries.retain(|_, (p, _)| p != peer);
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_unicast_floods_group_and_unknown_and_ages() {
        let mut t = MacTable::default();
        let now = Instant::now();
        let p: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = [2, 0, 0, 0, 0, 1];
        assert_eq!(t.route(&a, now), Route::Flood);
        t.learn(a, p, now);
        assert_eq!(t.route(&a, now), Route::Peer(p));
        assert_eq!(t.route(&[0xff; 6], now), Route::Flood);
        t.learn([0xff; 6], p, now);
        assert_eq!(t.len(), 1, "a broadcast source is never learned");
        assert_eq!(t.route(&a, now + AGE), Route::Flood);
        t.forget_peer(&p);
        assert!(t.is_empty());
    }
}
