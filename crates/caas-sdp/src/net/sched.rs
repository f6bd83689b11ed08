//! How the proxy's frame thread asks the kernel to run it soon after a wake-up
//! (`CAAS_NET_SCHED`). Every frame of the overlay wakes the frame thread of two proxies (one
//! each side); on a host whose CPUs are busy (the guests themselves) a woken thread may wait
//! for a running one's time slice before it gets a CPU, and the VM's round trip pays that
//! four times. The choices:
//! - `default`: the scheduler's default for the thread (SCHED_OTHER, nice 0, default slice);
//! - `slice:US`: SCHED_OTHER with a short time slice requested with `sched_setattr`
//!   (`sched_runtime`, Linux ≥ 6.12, EEVDF): the thread's virtual deadline comes sooner, so its
//!   wake-up preempts a thread using a long slice. Its share of the CPU is unchanged (nice 0):
//!   a flood of datagrams gets no more CPU than under `default`. No privilege needed;
//! - `nice:N`: a lower nice value (N < 0 needs `CAP_SYS_NICE`): a larger share of the CPU,
//!   which an attacker's flood of datagrams would get too;
//! - `fifo:P`: SCHED_FIFO priority P (needs `CAP_SYS_NICE`): preempts every ordinary thread
//!   at once. The frame thread never busy-loops (it sleeps in `poll`; the optional spin is
//!   refused with it), and the caller keeps it within a CPU budget ([`CpuGuard`]): a thread
//!   that used more than its budget of the last window (an attacker's flood of datagrams, a
//!   VM's bulk transfer) is demoted to `default` until a window passes within budget.
//!
//! A request the kernel refuses (no privilege, an older kernel) falls back to `default` and
//! is reported once in the log.
use std::time::{Duration, Instant};

/// The frame thread's scheduling request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameSched {
    /// The scheduler's default.
    Default,
    /// SCHED_OTHER with this time slice (EEVDF's custom slice, 100 µs to 100 ms).
    Slice(Duration),
    /// This nice value.
    Nice(i32),
    /// SCHED_FIFO at this priority (1..=99), within a CPU budget.
    Fifo(i32),
}

impl FrameSched {
    /// Parses `default`, `slice:US`, `nice:N` or `fifo:P`.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(s: &str) -> Result<FrameSched, String> {
        let s = s.trim();
        let bad = || format!("CAAS_NET_SCHED={s:?}: want default, slice:US, nice:N or fifo:P");
        if s.is_empty() || s == "default" {
            return Ok(FrameSched::Default);
        }
        let (kind, v) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "slice" => {
                let us: u64 = v.parse().map_err(|_| bad())?;
                if !(100..=100_000).contains(&us) {
                    return Err(format!("{}: the slice is 100 to 100000 µs", bad()));
                }
                Ok(FrameSched::Slice(Duration::from_micros(us)))
            }
            "nice" => {
                let n: i32 = v.parse().map_err(|_| bad())?;
                if !(-20..=19).contains(&n) {
                    return Err(format!("{}: nice is -20 to 19", bad()));
                }
                Ok(FrameSched::Nice(n))
            }
            "fifo" => {
                let p: i32 = v.parse().map_err(|_| bad())?;
                if !(1..=99).contains(&p) {
                    return Err(format!("{}: the priority is 1 to 99", bad()));
                }
                Ok(FrameSched::Fifo(p))
            }
            _ => Err(bad()),
        }
    }

    /// The request of `CAAS_NET_SCHED` (`default` when unset; an unreadable one is logged
    /// and ignored).
    #[must_use]
    pub fn from_env() -> FrameSched {
        match std::env::var("CAAS_NET_SCHED") {
            Err(_) => FrameSched::Default,
            Ok(v) => FrameSched::parse(&v).unwrap_or_else(|e| {
                tracing::warn!("{e}; using the default");
                FrameSched::Default
            }),
        }
    }

    /// Applies the request to the calling thread.
    ///
    /// # Errors
    /// The kernel's refusal (the thread keeps its scheduling).
    pub fn apply(self) -> std::io::Result<()> {
        match self {
            FrameSched::Default => set_other(),
            FrameSched::Slice(d) => set_slice(d),
            FrameSched::Nice(n) => set_nice(n),
            FrameSched::Fifo(p) => set_fifo(p),
        }
    }
}

/// The calling thread back to SCHED_OTHER (nice and slice as they were set).
fn set_other() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0 is the caller.
    #[allow(unsafe_code)]
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &raw const param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_fifo(prio: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: as in `set_other`.
    #[allow(unsafe_code)]
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_nice(n: i32) -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    #[allow(clippy::cast_sign_loss)]
    let who = tid as libc::id_t;
    // SAFETY: plain integer arguments; on Linux PRIO_PROCESS with a thread id sets that
    // thread's nice value only.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, n) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `struct sched_attr` of `sched_setattr(2)` (its first version, 56 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

fn set_slice(d: Duration) -> std::io::Result<()> {
    let nice = {
        // SAFETY: plain integer arguments (the caller's own thread).
        #[allow(unsafe_code)]
        let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        n
    };
    let attr = SchedAttr {
        size: u32::try_from(std::mem::size_of::<SchedAttr>()).unwrap_or(56),
        sched_policy: 0, // SCHED_OTHER
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
        sched_util_min: 0,
        sched_util_max: 0,
    };
    // SAFETY: `attr` is a valid sched_attr whose `size` field is its size; pid 0 is the
    // calling thread; flags 0.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's CPU time (user and system).
fn thread_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(Duration::ZERO, |u| {
        let us = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
        };
        us(u.user_time()) + us(u.system_time())
    })
}

/// Keeps a SCHED_FIFO frame thread within a CPU budget: [`CpuGuard::check`] after each
/// turn of work demotes the thread to SCHED_OTHER when it used more than `budget` of the
/// current `window`, and restores the priority once a window ended within budget.
#[derive(Debug)]
pub struct CpuGuard {
    prio: i32,
    window: Duration,
    budget: Duration,
    start: Instant,
    cpu_at_start: Duration,
    demoted: bool,
    demotions: u64,
}

impl CpuGuard {
    /// A guard for a thread running SCHED_FIFO at `prio`.
    #[must_use]
    pub fn new(prio: i32, window: Duration, budget: Duration) -> CpuGuard {
        CpuGuard {
            prio,
            window,
            budget,
            start: Instant::now(),
            cpu_at_start: thread_cpu(),
            demoted: false,
            demotions: 0,
        }
    }

    /// Whether the thread runs demoted now.
    #[must_use]
    pub fn demoted(&self) -> bool {
        self.demoted
    }

    /// How often the thread was demoted.
    #[must_use]
    pub fn demotions(&self) -> u64 {
        self.demotions
    }

    /// Looks at the thread's CPU time of the current window (call it after work, not on
    /// every frame: a `getrusage` is a system call).
    pub fn check(&mut self, now: Instant) {
        let cpu = thread_cpu();
        let used = cpu.saturating_sub(self.cpu_at_start);
        if now.duration_since(self.start) >= self.window {
            if self.demoted && used <= self.budget {
                self.demoted = set_fifo(self.prio).is_err();
            }
            self.start = now;
            self.cpu_at_start = cpu;
        } else if !self.demoted && used > self.budget {
            if set_other().is_ok() {
                self.demoted = true;
                self.demotions += 1;
                tracing::warn!(
                    used_us = u64::try_from(used.as_micros()).unwrap_or(u64::MAX),
                    "the frame thread went over its CPU budget: running it without real-time priority for a while"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_requests_and_refuses_the_rest() {
        assert_eq!(FrameSched::parse(""), Ok(FrameSched::Default));
        assert_eq!(FrameSched::parse("default"), Ok(FrameSched::Default));
        assert_eq!(
            FrameSched::parse("slice:300"),
            Ok(FrameSched::Slice(Duration::from_micros(300)))
        );
        assert_eq!(FrameSched::parse("nice:-5"), Ok(FrameSched::Nice(-5)));
        assert_eq!(FrameSched::parse("fifo:10"), Ok(FrameSched::Fifo(10)));
        for bad in [
            "slice:10", "slice:x", "nice:-21", "nice:20", "fifo:0", "fifo:100", "rr:5", "fifo",
        ] {
            assert!(FrameSched::parse(bad).is_err(), "{bad}");
        }
    }
}
