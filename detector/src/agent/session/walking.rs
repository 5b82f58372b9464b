//! The session's side of walks after the attach: looks are queued as
//! module bodies run and the safety net comes due, made on the blocking
//! pool within each process's share, and what they found is armed here.

use std::time::{Duration, Instant};

use super::Session;
use crate::events::monotonic_ns;
use tracing::info;

use crate::{
    agent::{
        ProcessWatch,
        walker::{Full, Job, Look, Walked},
    },
    events::{output::Printer, record::ModuleExec},
    targets::TargetSet,
};

/// What is announced about a process once a walk has armed what it found.
pub(super) enum Announce {
    /// It is attached; what it ran before (a forked child) is reported too.
    Attached(Vec<(u32, u32, u64)>),
    /// It is watching anew, and why.
    Rearmed(String),
}

impl Session {
    /// Reports `pid` attached, and what it ran before (a forked child).
    pub(super) fn announce(&mut self, pid: u32, ran_before: Vec<(u32, u32, u64)>) {
        let Some(w) = self.watches.0.get(&pid) else { return };
        let mut report = w.attached_report(&self.targets);
        report.process.exposures = self.exposures_report(pid);
        self.printer.attached(&report);
        self.upstream_started(pid);
        self.report_marked(ran_before);
    }

    /// Queues a look, and starts walks if there is room. A look that finds
    /// no room is left to the process's next look in `sys.modules`.
    /// Returns the number a walk must have reached to have looked for
    /// everything `job` asks.
    pub(super) fn look(&mut self, job: Option<Job>) -> u64 {
        let Some(job) = job else { return self.walker.next_seq() };
        let pid = job.pid;
        let seq = match self.walker.submit(job) {
            Ok(seq) => seq,
            Err(Full) => {
                if let Some(w) = self.watches.0.get_mut(&pid) {
                    w.walks.defer();
                }
                self.walker.next_seq()
            }
        };
        self.start_walks();
        seq
    }

    /// Starts the walks whose turn it is and whose process's share (and
    /// all processes' share) allows one now.
    pub(super) fn start_walks(&mut self) {
        let now = Instant::now();
        let (watches, shares) = (&mut self.watches, &mut self.walks);
        self.walker.start(|pid| {
            let Some(w) = watches.0.get_mut(&pid) else { return false };
            if !w.walks.allows(now) {
                w.walks.hold();
                return false;
            }
            shares.allows(&w.tenant, now)
        });
    }

    /// A module body is about to run in a watched process: looks for the
    /// pending targets it defines.
    pub(super) fn module_body(&mut self, e: ModuleExec) {
        let Some(w) = self.watches.0.get(&e.pid) else { return };
        tracing::debug!(
            pid = e.pid,
            seen_after_us = monotonic_ns().saturating_sub(e.ts_ns) / 1000,
            "module body event"
        );
        let job = w.module_body(&self.targets, e.code, e.globals, e.ts_ns);
        self.look(job);
    }

    /// Looks for pending targets in `sys.modules` (the safety net).
    pub(super) fn rescan_pending(&mut self) {
        self.rescanned = Instant::now();
        self.walks.prune(self.rescanned);
        let jobs: Vec<Job> =
            self.watches.0.values_mut().filter_map(|w| w.rescan_pending(&self.targets, false, "rescan")).collect();
        for job in jobs {
            self.look(Some(job));
        }
        self.recheck_versions();
    }

    /// Arms what a walk found, if its process is still the one watched.
    pub(super) fn walked(&mut self, walked: Walked) {
        let pid = walked.pid;
        self.walks.charge(self.watches.0.get(&pid).map(|w| &w.tenant), walked.took);
        let Some(w) = self.watches.0.get_mut(&pid).filter(|w| w.since == walked.since) else {
            self.start_walks();
            return;
        };
        let (source, latency, whole) = match walked.look {
            Look::Body { ts_ns, .. } => {
                ("module body", Some(Duration::from_nanos(monotonic_ns().saturating_sub(ts_ns))), false)
            }
            Look::Modules { source, force, .. } => (source, None, force),
            Look::Candidates(_) | Look::Identities => {
                w.walks.charge(walked.took);
                self.served(walked);
                self.start_walks();
                return;
            }
            Look::Versions { .. } => {
                w.walks.charge(walked.took);
                self.versions_read(walked);
                self.start_walks();
                return;
            }
            Look::Callers(_) => {
                w.walks.charge(walked.took);
                self.callers_read(walked);
                self.start_walks();
                return;
            }
        };
        let seq = walked.seq;
        let found = w.walked(&mut self.probes, &self.targets, walked);
        // Announced after a whole look in `sys.modules` asked for since
        // (the one asked for then, or one that took its place), not after a
        // module body's.
        let due = whole && self.announcing.get(&pid).is_some_and(|(_, after)| seq >= *after);
        let announce = if due { self.announcing.remove(&pid).map(|(a, _)| a) } else { None };
        match announce {
            // What the first walk armed is in the attached report.
            Some(Announce::Attached(ran_before)) => self.announce(pid, ran_before),
            // Watching anew what it found; a target defined nowhere now (an
            // exiting interpreter frees its modules' code) is pending, quietly.
            Some(Announce::Rearmed(why)) if !found.is_empty() => {
                self.printer.strategy(pid, &w.mode(), &why);
                announce_armed(w, &self.targets, &self.printer, &found, source, latency);
            }
            Some(Announce::Rearmed(why)) => tracing::debug!(pid, why, "a freed code object's target is pending"),
            None => announce_armed(w, &self.targets, &self.printer, &found, source, latency),
        }
        self.start_walks();
    }
}

/// Logs and prints targets armed after the attach (`source` found them,
/// `latency` after their module body started), if any.
pub(super) fn announce_armed(
    w: &ProcessWatch,
    targets: &TargetSet,
    printer: &Printer,
    found: &[u32],
    source: &str,
    latency: Option<Duration>,
) {
    if found.is_empty() {
        return;
    }
    let report = w.armed_report(targets, found, source, latency);
    info!(pid = report.pid, targets = %report.targets.join(", "), source, latency_us = report.latency_us,
        code_objects = ?report.code_objects, "targets found after the attach: armed");
    printer.armed(&report);
}
