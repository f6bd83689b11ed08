//! The anti-replay window of one sender's session: a 1024-bit sliding bitmap (RFC 6479's
//! ring form). A sequence number is accepted once if it is above the highest one seen, or
//! less than [`WINDOW`] below it and not seen yet; anything older is refused. The caller
//! checks before decrypting (cheap refusal) and records only after the frame authenticated,
//! so a forged frame never moves the window.

/// Window size in sequence numbers.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Already received.
    Duplicate,
    /// Older than the window.
    TooOld,
}

/// One session's window.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// The highest accepted sequence number, `None` before the first.
    highest: Option<u64>,
    /// Bit `s % WINDOW` set when `s` (within the window) was received.
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// A fresh window.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        // i < 1024, so i / 64 < 16.
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether `seq` would be accepted (does not record it).
    ///
    /// # Errors
    /// The [`Refusal`].
    pub fn check(&self, seq: u64) -> Result<(), Refusal> {
        let Some(top) = self.highest else {
            return Ok(());
        };
        if seq > top {
            return Ok(());
        }
        if top - seq >= WINDOW {
            return Err(Refusal::TooOld);
        }
        let (w, m) = Self::bit(seq);
        if self.bits[w] & m != 0 {
            Err(Refusal::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Checks and records `seq` (call after the frame authenticated).
    ///
    /// # Errors
    /// The [`Refusal`]; the window is unchanged then.
    pub fn accept(&mut self, seq: u64) -> Result<(), Refusal> {
        self.check(seq)?;
        match self.highest {
            Some(top) if seq <= top => {}
            Some(top) if seq - top >= WINDOW => {
                self.bits = [0; WORDS];
                self.highest = Some(seq);
            }
            Some(top) => {
                // Forget the sequence numbers the window slides past (top+1 ..= seq share
                // their bits with top+1-WINDOW ..= seq-WINDOW).
                let mut s = top + 1;
                while s <= seq {
                    let (w, m) = Self::bit(s);
                    if m == 1 && seq - s >= 63 {
                        self.bits[w] = 0;
                        s += 64;
                    } else {
                        self.bits[w] &= !m;
                        s += 1;
                    }
                }
                self.highest = Some(seq);
            }
            None => self.highest = Some(seq),
        }
        let (w, m) = Self::bit(seq);
        self.bits[w] |= m;
        Ok(())
    }

    /// The highest accepted sequence number.
    #[must_use]
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_is_accepted_once() {
        let mut w = ReplayWindow::new();
        for s in [0, 1, 2, 5, 3, 4] {
            assert_eq!(w.accept(s), Ok(()), "{s}");
        }
        for s in 0..=5 {
            assert_eq!(w.accept(s), Err(Refusal::Duplicate), "{s}");
        }
    }

    #[test]
    fn reordering_within_the_window_is_accepted_older_is_refused() {
        let mut w = ReplayWindow::new();
        w.accept(2000).unwrap();
        assert_eq!(w.accept(2000 - 1023), Ok(()));
        assert_eq!(w.accept(2000 - 1024), Err(Refusal::TooOld));
        assert_eq!(w.accept(1500), Ok(()));
        assert_eq!(w.accept(1500), Err(Refusal::Duplicate));
        // Sliding forward forgets exactly what leaves the window.
        w.accept(2600).unwrap();
        assert_eq!(w.accept(1500), Err(Refusal::TooOld));
        assert_eq!(w.accept(2000), Err(Refusal::Duplicate));
        assert_eq!(w.accept(2599), Ok(()));
        assert_eq!(w.accept(2600 - 1023), Ok(()));
    }

    #[test]
    fn a_big_jump_clears_the_window() {
        let mut w = ReplayWindow::new();
        for s in 0..100 {
            w.accept(s).unwrap();
        }
        w.accept(1_000_000).unwrap();
        assert_eq!(w.accept(99), Err(Refusal::TooOld));
        assert_eq!(w.accept(1_000_000 - 5), Ok(()));
        assert_eq!(w.accept(1_000_000), Err(Refusal::Duplicate));
        assert_eq!(w.highest(), Some(1_000_000));
    }

    /// Against a model (a set of everything seen): every step of a random walk agrees.
    #[test]
    fn agrees_with_a_model_on_a_random_walk() {
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut top: u64 = 0;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = match x % 4 {
                0 => top + 1 + (x >> 8) % 200,
                _ => top.saturating_sub((x >> 8) % 1300),
            };
            let highest = seen.iter().next_back().copied();
            let want = match highest {
                Some(h) if s <= h && h - s >= WINDOW => Err(Refusal::TooOld),
                _ if seen.contains(&s) => Err(Refusal::Duplicate),
                _ => Ok(()),
            };
            assert_eq!(w.accept(s), want, "seq {s}, highest {highest:?}");
            if want.is_ok() {
                seen.insert(s);
                top = top.max(s);
            }
        }
    }

    #[test]
    fn check_does_not_record() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(7), Ok(()));
        assert_eq!(w.check(7), Ok(()));
        w.accept(7).unwrap();
        assert_eq!(w.check(7), Err(Refusal::Duplicate));
    }
}
