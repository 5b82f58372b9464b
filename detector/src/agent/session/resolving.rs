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
        walker::{Finding, Look, Targets, Walked},
    },
    bpf::PendingHits,
    events::candidates::{self, Ask},
    pyproc::mem::ProcessMemory,
    targets::Target,
};

/// How long stopping may spend resolving what is still unresolved.
const RESOLVE_AT_STOP: Duration = Duration::from_secs(2);

impl Session {
    /// The active targets with their ids, as walks take them.
    fn walk_targets(&self) -> Targets {
        let targets: Vec<_> = self.targets.iter().map(|(t, id)| (id, t.clone())).collect();
        targets.into()
    }

    /// Queues walks resolving the code objects asked about since the last
    /// call: one per process, taking later asks while it waits.
    pub(super) fn ask(&mut self) {
        let asks = self.processor.take_asks();
        if asks.is_empty() {
            return;
        }
        let mut by_process: BTreeMap<u32, Vec<Ask>> = BTreeMap::new();
        for ask in asks {
            by_process.entry(ask.pid).or_default().push(ask);
        }
        let targets = self.walk_targets();
        for (pid, asks) in by_process {
            let Some(w) = self.watches.0.get(&pid) else {
                self.processor.refused(asks);
                continue;
            };
            if self.walker.submit(w.resolution(targets.clone(), asks.clone())).is_err() {
                // Asked again at the next totals, by when there may be room.
                self.processor.refused(asks);
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
        match (walked.finding, walked.look) {
            (Ok(Finding::Resolved { done, left }), _) => {
                for (ask, result) in done {
                    let hits = self.processor.resolved(ask, result, &mut self.probes, &self.targets);
                    self.report(hits);
                }
                if !left.is_empty() {
                    self.processor.requeue(left);
                    self.ask();
                }
            }
            (Ok(Finding::Identities(found)), _) => self.identified(pid, &found),
            // Asked again at the next totals.
            (Err(e), Look::Candidates(asks)) => {
                tracing::debug!(pid, error = %e, "cannot resolve candidates");
                self.processor.refused(asks);
            }
            (Err(e), _) => warn!(pid, error = %e, "cannot look up new targets among existing functions"),
            (Ok(_), _) => {}
        }
    }

    /// Records the identities found, each once its function is read again
    /// and still made from that code object: one freed since the walk read
    /// it may be another's address now.
    fn identified(&mut self, pid: u32, found: &[Identity]) {
        let Some(w) = self.watches.0.get(&pid) else { return };
        let Ok(mem) = ProcessMemory::open(pid) else { return };
        let func_code = w.process.analysis.table.values.func_code;
        for i in found {
            if mem.ptr(i.function, func_code).ok() != Some(i.code) {
                continue;
            }
            if let Err(e) = self.probes.set_identity(pid, i.code, i.qualname, i.globals) {
                warn!(pid, error = %e, "cannot record the identity of a target's function");
                return;
            }
        }
    }

    /// Says how many starts `pid`, gone, made of code objects not resolved
    /// in time (its `pending` entries): they are not in its counts.
    pub(super) fn unattributed(&self, pid: u32, pending: &[PendingHits]) {
        let (starts, code_objects) = self.processor.unattributed(pid, pending);
        if starts > 0 {
            warn!(
                pid,
                starts,
                code_objects,
                "the process exited before code objects named like targets were resolved: their starts are not counted"
            );
        }
    }

    /// Resolves, on the spot and for a bounded time, what the kernel
    /// counted and nobody resolved yet: stopping leaves no later turn.
    pub(super) fn resolve_now(&mut self) {
        let until = Instant::now() + RESOLVE_AT_STOP;
        let pending = self.probes.all_pending();
        let targets = self.walk_targets();
        for ask in self.processor.unresolved(&pending) {
            let Some(w) = self.watches.0.get(&ask.pid) else { continue };
            if Instant::now() >= until {
                warn!(pid = ask.pid, "stopped before every candidate was resolved: their starts are not counted");
                return;
            }
            let result =
                ProcessMemory::open(ask.pid).and_then(|mem| candidates::resolve(&w.process, &mem, &ask, &targets));
            let hits = self.processor.resolved(ask, result, &mut self.probes, &self.targets);
            self.report(hits);
        }
    }
}
