//! Reachability's sampled counts: a target seen once has its watchpoint
//! disarmed and costs nothing from then on, so how often it runs is unknown.
//! With `run --reachability-sample SECS`, each reached watched target is
//! armed again for a short window every SECS seconds; the kernel counts its
//! starts in that window exactly, and their rate is reported. Between windows
//! it costs nothing, as before.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{debug, info};

use super::ProcessWatch;
use crate::{bpf::Probes, targets::TargetSet};

/// How long a sampling window stays open.
pub const WINDOW: Duration = Duration::from_secs(1);

/// One process's sampling: the open window or when the next opens, and the
/// totals so far.
#[derive(Debug, Default)]
pub struct Samples {
    open: Option<Open>,
    next: Option<Instant>,
    /// Per target: starts counted in windows, and the windows' total length.
    pub totals: BTreeMap<u32, (u64, Duration)>,
}

#[derive(Debug)]
struct Open {
    since: Instant,
    /// Each sampled target's count when the window opened.
    base: Vec<(u32, u64)>,
}

/// A window closed: `calls` starts of `target` in `secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The target id.
    pub target: u32,
    /// Starts counted in the window.
    pub calls: u64,
    /// The window's length.
    pub secs: f64,
}

impl Samples {
    /// Starts per second of each sampled target, over every window so far.
    pub fn rates(&self) -> BTreeMap<u32, f64> {
        self.totals
            .iter()
            .filter(|(_, (_, d))| !d.is_zero())
            .map(|(&t, &(calls, d))| (t, calls as f64 / d.as_secs_f64()))
            .collect()
    }
}

impl ProcessWatch {
    /// Opens or closes this process's sampling window as `now` requires
    /// (every `every`, only under watch with reachability and targets
    /// reached); returns the samples of a window it closed.
    pub fn sample(&mut self, probes: &mut Probes, targets: &TargetSet, now: Instant, every: Duration) -> Vec<Sample> {
        let pid = self.process.pid;
        if self.strategy().is_none() {
            // Detached: a window open then counted nothing.
            self.samples.open = None;
            return Vec::new();
        }
        if let Some(open) = &self.samples.open {
            if now.duration_since(open.since) < WINDOW {
                return Vec::new();
            }
            let open = self.samples.open.take().expect("checked");
            self.disarm_reached(probes);
            self.samples.next = Some(now + every);
            let secs = now.duration_since(open.since);
            let samples: Vec<Sample> = open
                .base
                .into_iter()
                .map(|(target, base)| Sample {
                    target,
                    calls: probes.count(pid, target).saturating_sub(base),
                    secs: secs.as_secs_f64(),
                })
                .collect();
            for s in &samples {
                let total = self.samples.totals.entry(s.target).or_default();
                total.0 += s.calls;
                total.1 += secs;
            }
            return samples;
        }
        if self.seen().is_none_or(|r| r.is_empty()) || now < *self.samples.next.get_or_insert(now + every) {
            return Vec::new();
        }
        let reached = self.seen().cloned().unwrap_or_default();
        let process = self.process.clone();
        let Some(armed) = self.armed_mut() else { return Vec::new() };
        let sampled: Vec<_> = targets.iter().filter(|(_, id)| reached.contains(id) && !armed.watches(*id)).collect();
        if sampled.is_empty() {
            return Vec::new();
        }
        let base = sampled.iter().map(|&(_, id)| (id, probes.count(pid, id))).collect();
        match armed.arm_more(probes, &process, sampled) {
            Ok(()) => {
                debug!(pid, "sampling window open");
                self.samples.open = Some(Open { since: now, base });
            }
            Err(e) => {
                info!(pid, reason = %e, "cannot sample reached targets; trying again later");
                self.samples.next = Some(now + every);
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_calls_over_the_windows_total_length() {
        let mut s = Samples::default();
        s.totals.insert(1, (90, Duration::from_secs(2)));
        s.totals.insert(2, (0, Duration::ZERO));
        assert_eq!(s.rates(), BTreeMap::from([(1, 45.0)]));
    }
}
