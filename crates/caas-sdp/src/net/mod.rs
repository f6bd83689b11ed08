//! The network half of the Secure Device Proxy: the crypto domain as the VM's NIC backend
//! (`docs/network-sdp.md`). Each Ethernet frame of the VM is sealed with AES-256-GCM under
//! its network domain's key and sent over UDP to the crypto domains of the domain's other
//! VMs, a small L2 overlay that learns MAC addresses as a switch does; frames of other
//! domains, unauthenticated or replayed ones are dropped and counted.
//!
//! - [`frame`]: the datagram format (header, nonce, AAD, key derivation);
//! - [`replay`]: the 1024-bit sliding replay window;
//! - [`switch`]: the MAC learning table;
//! - [`overlay`]: keys with seamless rekey, peers, sealing and opening, without I/O;
//! - [`control`]: the typed control channel (keys and peers from the host agent);
//! - [`serve`]: `caas net serve` on real sockets.
pub mod control;
pub mod frame;
pub mod overlay;
pub mod replay;
pub mod serve;
pub mod switch;

/// `caas net` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum NetCommand {
    /// Serve a VM's network: the NIC backend (a datagram socket with qemu) and the
    /// encrypted overlay (UDP); keys and peers on stdin.
    Serve(serve::ServeArgs),
}

/// Runs a `caas net` command. `hardening` is the process hardening the binary supplies (one
/// implementation, `caas_domc::harden`, as for `caas volume serve`): applied first, before
/// any thread or key exists; the switch to `--run-as` and the seccomp filter follow once
/// the sockets are bound ([`serve::run`]).
///
/// # Errors
/// [`serve::ServeError`].
pub fn run(cmd: &NetCommand, hardening: crate::cli::Hardening) -> Result<(), serve::ServeError> {
    match cmd {
        NetCommand::Serve(a) => serve::run(a, hardening),
    }
}
