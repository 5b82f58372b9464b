//! Shares of time: how much a process, a tenant, or all of them together
//! may take. Walks after an attach (a module body ran, the safety net's
//! look at `sys.modules`, 3.8-3.10 resolutions) run on the blocking pool
//! ([`super::walker`]): 5% of it per process, 10% per tenant, 25% for all. Attaches run on the agent loop: 20%
//! of it per tenant, 50% for all, so at least half of the loop stays for
//! events, Remote Configuration and the tap. Beyond its share a process's
//! walks wait, a tenant's attaches are retried later.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::tenant::Tenant;

/// A process's walks: 5% of a core, 200 ms at once.
pub const PROCESS_WALKS: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(200));

/// Every process's walks together: 25% of a core, a second at once.
pub const ALL_WALKS: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(1));

/// A tenant's walks: 10% of a core, 400 ms at once, so the processes of one
/// pod cannot take all processes' share between them.
pub const TENANT_WALKS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_millis(400));

/// Every tenant's attaches together: 50% of the loop, two seconds at once.
pub const ALL_ATTACHES: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(2));

/// A tenant's attaches: 20% of the loop, a second at once (a prefork
/// server's forty workers attach at once at about 10 ms each).
pub const TENANT_ATTACHES: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(1));

/// Loop time earned per second and saved up to a most: spending beyond the
/// credit defers the owner's work.
#[derive(Debug)]
pub struct LoopShare {
    earned_per_sec: Duration,
    max_credit: Duration,
    /// Credit in nanoseconds (negative: time owed).
    credit_ns: i128,
    at: Instant,
    /// A walk was deferred: the safety net looks at once when it may.
    deferred: bool,
    /// Work is waiting for the share now.
    held: bool,
    /// Walks deferred so far.
    pub deferrals: u64,
}

impl Default for LoopShare {
    fn default() -> Self {
        LoopShare::new(PROCESS_WALKS)
    }
}

impl LoopShare {
    /// A share earning `earned_per_sec` per second of loop time, up to `max_credit`; full at first.
    pub fn new((earned_per_sec, max_credit): (Duration, Duration)) -> Self {
        LoopShare {
            earned_per_sec,
            max_credit,
            credit_ns: max_credit.as_nanos() as i128,
            at: Instant::now(),
            deferred: false,
            held: false,
            deferrals: 0,
        }
    }

    /// Whether, at `now`, nothing is owed and the credit is whole again.
    pub fn is_full(&self, now: Instant) -> bool {
        self.credit_ns + self.earned_since(now) >= self.max_credit.as_nanos() as i128
    }

    fn earned_since(&self, now: Instant) -> i128 {
        (now.saturating_duration_since(self.at).as_nanos() * self.earned_per_sec.as_nanos() / 1_000_000_000) as i128
    }

    /// Whether work may run now.
    pub fn allows(&mut self, now: Instant) -> bool {
        self.credit_ns = (self.credit_ns + self.earned_since(now)).min(self.max_credit.as_nanos() as i128);
        self.at = now;
        self.credit_ns > 0
    }

    /// Work waits for the share: counted once until the next [`LoopShare::charge`].
    pub fn hold(&mut self) {
        if !self.held {
            self.held = true;
            self.deferrals += 1;
        }
    }

    /// Work was put off: counted, and remembered for [`LoopShare::take_deferred`].
    pub fn defer(&mut self) {
        self.deferred = true;
        self.deferrals += 1;
    }

    /// A walk took `took`.
    pub fn charge(&mut self, took: Duration) {
        self.held = false;
        self.credit_ns -= took.as_nanos() as i128;
    }

    /// Whether a walk was deferred since the last call.
    pub fn take_deferred(&mut self) -> bool {
        std::mem::take(&mut self.deferred)
    }
}

/// The walks' shares of the pool above a process's own: each tenant's, and
/// every process's together.
pub struct WalkShares {
    all: LoopShare,
    tenants: HashMap<Tenant, LoopShare>,
}

impl Default for WalkShares {
    fn default() -> Self {
        WalkShares { all: LoopShare::new(ALL_WALKS), tenants: HashMap::new() }
    }
}

impl WalkShares {
    /// Whether a walk of a process of `tenant` may run at `now`.
    pub fn allows(&mut self, tenant: &Tenant, now: Instant) -> bool {
        let theirs = self.tenants.entry(tenant.clone()).or_insert_with(|| LoopShare::new(TENANT_WALKS));
        theirs.allows(now) && self.all.allows(now)
    }

    /// A walk (of a process of `tenant`, if known) took `took`.
    pub fn charge(&mut self, tenant: Option<&Tenant>, took: Duration) {
        self.all.charge(took);
        if let Some(share) = tenant.and_then(|t| self.tenants.get_mut(t)) {
            share.charge(took);
        }
    }

    /// Forgets the tenants that owe nothing: a share starts full.
    pub fn prune(&mut self, now: Instant) {
        self.tenants.retain(|_, share| !share.is_full(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_walk_is_paid_back_before_the_next() {
        let t0 = Instant::now();
        let mut b = LoopShare::default();
        assert!(b.allows(t0));
        b.charge(Duration::from_millis(500));
        assert!(!b.allows(t0 + Duration::from_secs(1)), "300 ms owed, 50 earned");
        b.defer();
        assert!(b.take_deferred() && !b.take_deferred());
        assert!(b.allows(t0 + Duration::from_millis(6100)), "paid back after about 6 s");
        assert_eq!(b.deferrals, 1);
    }

    #[test]
    fn a_share_is_full_again_once_paid_back() {
        let t0 = Instant::now();
        let mut b = LoopShare::new(TENANT_ATTACHES);
        assert!(b.allows(t0));
        b.charge(Duration::from_millis(400));
        assert!(!b.is_full(t0 + Duration::from_secs(1)));
        assert!(b.is_full(t0 + Duration::from_secs(3)), "400 ms paid back at 200 ms a second");
    }

    #[test]
    fn credit_is_capped() {
        let t0 = Instant::now();
        let mut b = LoopShare::default();
        assert!(b.allows(t0 + Duration::from_secs(3600)));
        b.charge(Duration::from_millis(250));
        assert!(!b.allows(t0 + Duration::from_secs(3600)), "an hour's quiet saves 200 ms, not 3 minutes");
    }
}
