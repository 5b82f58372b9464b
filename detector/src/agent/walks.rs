//! The agent loop's time one watched process's walks may take. Walking a
//! process's objects after its attach (a module body ran, the safety net's
//! look at `sys.modules`) happens on the agent loop; each walk is bounded
//! by its own budget, and this bounds how often: a process whose modules
//! keep running (or whose walks are slow) waits its turn, and its walks are
//! deferred to the safety net rather than taken from other processes.

use std::time::{Duration, Instant};

/// Loop time a process earns per second for its walks (5% of the loop).
const EARNED_PER_SEC: Duration = Duration::from_millis(50);

/// Most time saved up, so a quiet process can still walk at once.
const MAX_CREDIT: Duration = Duration::from_millis(200);

/// A process's walk time: spending beyond its credit defers its walks.
#[derive(Debug)]
pub struct WalkBudget {
    /// Credit in nanoseconds (negative: time owed).
    credit_ns: i128,
    at: Instant,
    /// A walk was deferred: the safety net looks at once when it may.
    deferred: bool,
    /// Walks deferred so far.
    pub deferrals: u64,
}

impl Default for WalkBudget {
    fn default() -> Self {
        WalkBudget { credit_ns: MAX_CREDIT.as_nanos() as i128, at: Instant::now(), deferred: false, deferrals: 0 }
    }
}

impl WalkBudget {
    /// Whether a walk may run now; if not, it is counted as deferred.
    pub fn allows(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_nanos() * EARNED_PER_SEC.as_nanos() / 1_000_000_000;
        self.credit_ns = (self.credit_ns + earned as i128).min(MAX_CREDIT.as_nanos() as i128);
        self.at = now;
        if self.credit_ns > 0 {
            return true;
        }
        self.deferred = true;
        self.deferrals += 1;
        false
    }

    /// A walk took `took`.
    pub fn charge(&mut self, took: Duration) {
        self.credit_ns -= took.as_nanos() as i128;
    }

    /// Whether a walk was deferred since the last call.
    pub fn take_deferred(&mut self) -> bool {
        std::mem::take(&mut self.deferred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_walk_is_paid_back_before_the_next() {
        let t0 = Instant::now();
        let mut b = WalkBudget::default();
        assert!(b.allows(t0));
        b.charge(Duration::from_millis(500));
        assert!(!b.allows(t0 + Duration::from_secs(1)), "300 ms owed, 50 earned");
        assert!(b.take_deferred() && !b.take_deferred());
        assert!(b.allows(t0 + Duration::from_millis(6100)), "paid back after about 6 s");
        assert_eq!(b.deferrals, 1);
    }

    #[test]
    fn credit_is_capped() {
        let t0 = Instant::now();
        let mut b = WalkBudget::default();
        assert!(b.allows(t0 + Duration::from_secs(3600)));
        b.charge(Duration::from_millis(250));
        assert!(!b.allows(t0 + Duration::from_secs(3600)), "an hour's quiet saves 200 ms, not 3 minutes");
    }
}
