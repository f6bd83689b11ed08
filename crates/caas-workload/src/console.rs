//! Reading a VM's serial console (`VM.serial.log`, written by [`crate::driver::QemuDriver`])
//! from the host, and the overlay traffic role of the tenant's demo image
//! (`scripts/build-guest-image --net-demo`): what `caas demo` and the real-VM tests both check.
//!
//! The console is untrusted text (the guest writes it): it is only searched for marker lines,
//! never interpreted further; only complete lines count (qemu may have written half of the
//! last one).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The sender's line once its first ping of the receiver (.1) got an answer.
pub const NET_PING_OK: &str = "caas-net-ping-ok";
/// The sender's line `caas-net-rtt round-trip min/avg/max = A/B/C ms` (busybox ping -c 3).
pub const NET_RTT: &str = "caas-net-rtt";
/// The sender's line `caas-net-sent SHA256` (hex digest of the 1 MiB it sends).
pub const NET_SENT: &str = "caas-net-sent ";
/// The sender's line as its TCP stream starts (the host times the stream from here to
/// [`NET_RECV`]).
pub const NET_GO: &str = "caas-net-go";
/// The receiver's line `caas-net-recv SHA256 BYTES` once it has the whole stream.
pub const NET_RECV: &str = "caas-net-recv ";
/// The sender's line when its first ping never got an answer.
pub const NET_PING_FAILED: &str = "caas-net-ping-failed";
/// Bytes the demo image's sender transfers (`scripts/build-guest-image --net-demo` without
/// `--net-demo-bytes`).
pub const NET_TRANSFER_BYTES: u64 = 1 << 20;

/// The file named `name` anywhere under `dir` (a host's run directory holds each VM's
/// files in the workload directory the agent made for it).
#[must_use]
pub fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// The complete lines of `vm`'s serial console found under `dir` (empty when there is none
/// yet).
#[must_use]
pub fn console(dir: &Path, vm: &str) -> String {
    let text = find_file(dir, &format!("{vm}.serial.log"))
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].to_string()
}

/// The first line of `text` containing `marker`, from the marker on (trailing space cut).
#[must_use]
pub fn find_marker(text: &str, marker: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.find(marker).map(|i| l[i..].trim_end().to_string()))
}

/// Waits (polling every 50 ms, blocking) for the first complete console line of `vm` under
/// `dir` containing `marker`; returns it from the marker on. A line containing one of
/// `fail` ends the wait at once with an error. The error names the console's last lines.
pub fn wait_marker(
    dir: &Path,
    vm: &str,
    marker: &str,
    fail: &[&str],
    timeout: Duration,
) -> crate::Result<String> {
    let t = Instant::now();
    loop {
        let text = console(dir, vm);
        if let Some(l) = find_marker(&text, marker) {
            return Ok(l);
        }
        let failed = fail.iter().find_map(|f| find_marker(&text, f));
        if failed.is_some() || t.elapsed() > timeout {
            let tail: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("caas-counter") && !l.contains("caas-seq"))
                .collect();
            let tail = tail[tail.len().saturating_sub(15)..].join("\n");
            return Err(crate::Error::Driver(format!(
                "{vm}: {} instead of {marker:?}; console:\n{tail}",
                failed.unwrap_or_else(|| format!("nothing after {timeout:?}"))
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A transfer of the demo image's traffic role, as both sides saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetTransfer {
    /// SHA-256 (hex) of what the sender sent.
    pub sent_sha256: String,
    /// SHA-256 (hex) of what the receiver received.
    pub recv_sha256: String,
    /// Bytes received.
    pub recv_bytes: u64,
}

impl NetTransfer {
    /// Parses the sender's [`NET_SENT`] line and the receiver's [`NET_RECV`] line.
    pub fn parse(sent: &str, recv: &str) -> crate::Result<Self> {
        let bad = |l: &str| crate::Error::Protocol(format!("unexpected console line {l:?}"));
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let sent_sha256 = sent
            .strip_prefix(NET_SENT)
            .map(str::trim)
            .filter(|s| hex64(s))
            .ok_or_else(|| bad(sent))?
            .to_string();
        let mut r = recv
            .strip_prefix(NET_RECV)
            .ok_or_else(|| bad(recv))?
            .split_whitespace();
        let recv_sha256 = r
            .next()
            .filter(|s| hex64(s))
            .ok_or_else(|| bad(recv))?
            .to_string();
        let recv_bytes = r
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(recv))?;
        Ok(Self {
            sent_sha256,
            recv_sha256,
            recv_bytes,
        })
    }

    /// Ok when the receiver got all [`NET_TRANSFER_BYTES`] and its digest is the sender's.
    pub fn check(&self) -> crate::Result<()> {
        self.check_size(NET_TRANSFER_BYTES)
    }

    /// Ok when the receiver got all `bytes` (the image's `--net-demo-bytes`) and its digest
    /// is the sender's.
    pub fn check_size(&self, bytes: u64) -> crate::Result<()> {
        if self.recv_bytes != bytes || self.recv_sha256 != self.sent_sha256 {
            return Err(crate::Error::ReportMismatch(format!(
                "sent {bytes} bytes with SHA-256 {}, received {} bytes with SHA-256 {}",
                self.sent_sha256, self.recv_bytes, self.recv_sha256
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: &str = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4";
    const B: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn only_complete_lines_are_read_and_markers_are_found_mid_line() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("w/vm-a");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join("vm-a.serial.log"),
            format!("boot\r\n[ 1.2] {NET_RECV}{A} 1048576\r\n{NET_SENT}{B}"),
        )
        .unwrap();
        let text = console(dir.path(), "vm-a");
        assert_eq!(
            find_marker(&text, NET_RECV).unwrap(),
            format!("{NET_RECV}{A} 1048576")
        );
        assert_eq!(find_marker(&text, NET_SENT), None, "half a line");
        let e = wait_marker(
            dir.path(),
            "vm-a",
            NET_PING_OK,
            &["boot"],
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(e.to_string().contains("boot"), "{e}");
    }

    #[test]
    fn a_transfer_passes_only_with_the_whole_stream_and_the_same_digest() {
        let ok = NetTransfer::parse(&format!("{NET_SENT}{A}"), &format!("{NET_RECV}{A} 1048576"))
            .unwrap();
        ok.check().unwrap();
        let other =
            NetTransfer::parse(&format!("{NET_SENT}{A}"), &format!("{NET_RECV}{B} 1048576"))
                .unwrap();
        assert!(other.check().is_err());
        let short =
            NetTransfer::parse(&format!("{NET_SENT}{A}"), &format!("{NET_RECV}{A} 1000")).unwrap();
        assert!(short.check().is_err());
        for (s, r) in [
            (format!("{NET_SENT}xyz"), format!("{NET_RECV}{A} 1048576")),
            (format!("{NET_SENT}{A}"), format!("{NET_RECV}{A}")),
            (format!("{NET_SENT}{A}"), format!("{NET_RECV}{A} -1")),
        ] {
            assert!(NetTransfer::parse(&s, &r).is_err(), "{s} / {r}");
        }
    }
}
