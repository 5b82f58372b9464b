//! The session's side of 3.8-3.10 per-call probes' walks: the code objects
//! the kernel asks about are resolved off the loop, within their process's
//! share, and the starts that waited are reported once they are; the
//! functions of new targets that exist already are found the same way.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::warn;

use super::Session;
use crate::{
    agent::{
        attach::Identity,
        walker::{Finding, Walked},
    },
    events::candidates::{self, Ask},
    targets::Target,
};

/// How long stopping may spend resolving what is still unresolved.
const RESOLVE_AT_STOP: Duration = Duration::from_secs(2);

impl Session {
    /// Queues walks resolving the code objects asked about since the last
    /// call: one per process, taking later asks while it waits.
    pub(super) fn ask(&mut self) {
        let asks = self.processor.candidates.take_asks();
        if asks.is_empty() {
            return;
        }
        let mut by_process: BTreeMap<u32, Vec<Ask>> = BTreeMap::new();
        for ask in asks {
            by_process.entry(ask.pid).or_default().push(ask);
        }
        for (pid, asks) in by_process {
            let Some(w) = self.watches.0.get(&pid) else {
                self.processor.candidates.forget(pid);
                continue;
            };
            if self.walker.submit(w.resolution(&self.targets, asks.clone())).is_err() {
                // Asked again at the next totals, by when there may be room.
                for ask in asks {
                    self.processor.candidates.refused(ask);
                }
            }
        }
        self.start_walks();
    }

    /// Queues the walk for the functions of `new` targets that exist
    /// already in each process probed per call on 3.8-3.10.
    pub(super) fn identify(&mut self, new: &[Target]) {
        let jobs: Vec<_> = self.watches.0.values().filter_map(|w| w.identities(&self.targets, new)).collect();
        for job in jobs {
            let pid = job.pid;
            if self.walker.submit(job).is_err() {
                // Their calls are resolved as candidates instead.
                tracing::debug!(pid, "no room to look up new targets among existing functions");
            }
        }
        self.start_walks();
    }

    /// Applies what a resolution or identities walk found for the process
    /// watched now.
    pub(super) fn served(&mut self, walked: Walked) {
        let pid = walked.pid;
        match walked.finding {
            Ok(Finding::Resolved { done, left }) => {
                for (ask, result) in done {
                    let hits = self.processor.resolved(ask, result, &mut self.probes, &self.targets);
                    self.report(hits);
                }
                if !left.is_empty() {
                    self.processor.candidates.requeue(left);
                    self.ask();
                }
            }
            Ok(Finding::Identities(found)) => self.identified(pid, &found),
            Ok(_) => {}
            Err(e) => warn!(pid, error = %e, "cannot look up new targets among existing functions"),
        }
    }

    fn identified(&mut self, pid: u32, found: &[Identity]) {
        for i in found {
            if let Err(e) = self.probes.set_identity(pid, i.code, i.qualname, i.globals) {
                warn!(pid, error = %e, "cannot record the identity of a target's function");
                return;
            }
        }
    }

    /// Says how many starts `pid`, gone, made of code objects not resolved
    /// in time: they are not in its counts.
    pub(super) fn unattributed(&self, pid: u32) {
        let pending = self.probes.pending(pid);
        let candidates = &self.processor.candidates;
        let unresolved: Vec<_> =
            pending.iter().filter(|p| candidates.resolution((pid, p.generation, p.code)).is_none()).collect();
        let starts: u64 = unresolved.iter().map(|p| p.hits).sum();
        if starts > 0 {
            warn!(
                pid,
                starts,
                code_objects = unresolved.len(),
                "the process exited before code objects named like targets were resolved: their starts are not counted"
            );
        }
    }

    /// Resolves, on the spot and for a bounded time, what the kernel
    /// counted and nobody resolved yet: stopping leaves no later turn.
    pub(super) fn resolve_now(&mut self) {
        let until = Instant::now() + RESOLVE_AT_STOP;
        let pending = self.probes.all_pending();
        for ask in self.processor.candidates.unresolved(&pending) {
            let Some(w) = self.watches.0.get(&ask.pid) else { continue };
            if Instant::now() >= until {
                warn!(pid = ask.pid, "stopped before every candidate was resolved: their starts are not counted");
                return;
            }
            let targets: Vec<_> = self.targets.iter().map(|(t, id)| (id, t.clone())).collect();
            let result = candidates::resolve(&w.process, &ask, &targets);
            let hits = self.processor.resolved(ask, result, &mut self.probes, &self.targets);
            self.report(hits);
        }
    }
}
