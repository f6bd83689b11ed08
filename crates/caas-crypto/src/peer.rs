//! Who may connect to a crypto-domain listener (the VSM and the Secure Device Proxies share
//! this one policy). On a UNIX socket the kernel's peer credentials (SO_PEERCRED, recorded
//! at connect time, not forgeable by the peer) must name the listener's own effective uid
//! or an allowed uid (the launched workload's identity, the host agent's); a vsock peer
//! must have the workload VM's CID. TCP listeners authenticate their clients by mutual
//! TLS instead (a certificate of the launch's own CA), checked by the servers.

use std::os::fd::AsFd;

/// Who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// UNIX-socket peers allowed besides the listener's own effective uid.
    pub uids: Vec<u32>,
    /// The only vsock peer served (the workload VM's CID); `None` refuses every vsock peer.
    pub vsock_cid: Option<u32>,
}

impl Default for PeerPolicy {
    /// The listener's own uid and root (which can ptrace anything anyway); no vsock peer.
    fn default() -> Self {
        Self {
            uids: vec![0],
            vsock_cid: None,
        }
    }
}

impl PeerPolicy {
    /// Whether a UNIX-socket peer with `uid` may connect (own effective uid or listed).
    #[must_use]
    pub fn allows_uid(&self, uid: u32) -> bool {
        uid == nix::unistd::geteuid().as_raw() || self.uids.contains(&uid)
    }

    /// Why the peer of a connected UNIX socket is refused, or `None` when it may connect.
    #[must_use]
    pub fn unix_refusal(&self, sock: &impl AsFd) -> Option<String> {
        match peer_uid(sock) {
            Ok(uid) if self.allows_uid(uid) => None,
            Ok(uid) => Some(format!("unix peer uid {uid} not allowed")),
            Err(e) => Some(format!("unix peer without credentials ({e})")),
        }
    }

    /// Why a vsock peer with `cid` is refused, or `None` when it may connect.
    #[must_use]
    pub fn vsock_refusal(&self, cid: u32) -> Option<String> {
        match self.vsock_cid {
            Some(allowed) if allowed == cid => None,
            Some(allowed) => Some(format!("vsock peer CID {cid} is not {allowed}")),
            None => Some(format!("vsock peer CID {cid}: no vsock peer configured")),
        }
    }
}

/// The uid of a UNIX-socket peer, as the kernel recorded it at connect time.
///
/// # Errors
/// The OS error of getsockopt(SO_PEERCRED).
pub fn peer_uid(sock: &impl AsFd) -> std::io::Result<u32> {
    let c = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(c.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_uid_listed_uids_and_one_cid() {
        let p = PeerPolicy {
            uids: vec![4242],
            vsock_cid: Some(7),
        };
        assert!(p.allows_uid(nix::unistd::geteuid().as_raw()));
        assert!(p.allows_uid(4242));
        assert!(!p.allows_uid(4243) || nix::unistd::geteuid().as_raw() == 4243);
        assert_eq!(p.vsock_refusal(7), None);
        assert!(p.vsock_refusal(8).is_some());
        assert!(PeerPolicy::default().vsock_refusal(7).is_some());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.unix_refusal(&a), None);
        let strict = PeerPolicy {
            uids: vec![],
            vsock_cid: None,
        };
        if !nix::unistd::geteuid().is_root() {
            assert_eq!(strict.unix_refusal(&a), None, "own uid");
        }
    }
}
