//! A bounded spin before a blocking wait for the key-holding processes' socket loops: the
//! network proxy (`caas_sdp::net::serve`) uses it. The crypto domain's connection threads
//! (`caas_domc::server`) and the PKCS#11 module's pipes (`caas_pkcs11::mux`, which does not
//! depend on this crate) still have their own `MSG_PEEK` equivalent of one socket, without
//! the contention cut-off below. A thread that expects more input soon polls its sockets without
//! blocking, yielding the CPU between polls (a thread woken onto this very CPU gets it), for
//! at most a bound, and only then sleeps: when the input comes within the bound it pays
//! neither the sleep nor a wake-up (which on a VM's idle vCPU is an exit to the hypervisor),
//! and when it does not the thread has burnt at most the bound. The callers decide when a
//! spin is worth it (only after work, never when idle).
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// A spin bound read once from the environment variable `var` (microseconds; 0 turns the
/// spin off), `default_us` when unset or unreadable, never above `max_us`.
#[must_use]
pub fn budget_from_env(var: &str, default_us: u64, max_us: u64) -> Duration {
    Duration::from_micros(
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default_us)
            .min(max_us),
    )
}

/// A poll and a yield that took longer than this mean another thread had the CPU meanwhile.
const CONTENDED: Duration = Duration::from_micros(100);

/// Polls `fds` without blocking until one of them is readable (or has hung up or failed:
/// the caller's read then reports it) or `budget` has passed, or the CPU turns out to be
/// wanted by other threads (a yield that took long). Returns whether one became ready; a
/// zero budget returns `false` at once.
#[must_use]
pub fn until_readable(fds: &[BorrowedFd<'_>], budget: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let mut last = start;
    loop {
        match poll(&mut pfds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => return true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // A poll that fails otherwise (EINVAL, ENOMEM): let the blocking wait decide.
            Err(_) => return false,
        }
        let now = Instant::now();
        if now.duration_since(start) >= budget || now.duration_since(last) >= CONTENDED {
            // Out of budget, or the last yield gave the CPU to another thread for a while:
            // the CPU is wanted, and a blocked thread is woken sooner than a yielding one
            // gets it back.
            return false;
        }
        last = now;
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_spin_sees_input_and_is_bounded_without_it() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let t = Instant::now();
        assert!(!until_readable(&[a.as_fd()], Duration::from_millis(5)));
        let waited = t.elapsed();
        // At most the bound (or less when the CPU was wanted), plus a little scheduling.
        assert!(waited < Duration::from_millis(500), "{waited:?}");
        assert!(!until_readable(&[a.as_fd()], Duration::ZERO));
        b.send(b"x").unwrap();
        assert!(until_readable(
            &[b.as_fd(), a.as_fd()],
            Duration::from_millis(5)
        ));
    }

    #[test]
    fn the_bound_comes_from_the_environment_and_is_capped() {
        // A variable nobody sets: the default.
        assert_eq!(
            budget_from_env("CAAS_TEST_SPIN_UNSET_9f3", 50, 1000),
            Duration::from_micros(50)
        );
    }
}
