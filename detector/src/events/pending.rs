//! The event processor's side of 3.8-3.10 candidates: starts held until
//! their code object is resolved, the kernel told the result, its pending
//! entry folded into user space's counts once no probe adds to it, and
//! exact totals from the kernel's counters, the entries left and what was
//! folded.

use std::collections::BTreeMap;

use detector_common::{CandidateEvent, TARGET_NONE};
use tracing::{debug, warn};

use super::{
    CodeInfo, EventProcessor, Hit, ProcessLookup, bounded_insert,
    candidates::{Ask, FOLD_AFTER, Key, Resolution, Seen},
    monotonic_ns,
};
use crate::{
    bpf::{PendingHits, Probes},
    pyproc::ProcessError,
    targets::TargetSet,
};

impl EventProcessor {
    /// A start of a code object awaiting resolution: its hit if resolved
    /// (telling the kernel again if it forgot), else it waits.
    pub(super) fn candidate(
        &mut self,
        c: CandidateEvent,
        probes: &mut Probes,
        targets: &TargetSet,
        procs: &impl ProcessLookup,
    ) -> Option<Hit> {
        let pid = c.header.tgid;
        let ask = Ask { pid, generation: c.generation, code: c.code, name: c.name, globals: c.globals, id: 0 };
        let Seen::Resolved { target, retell } = self.candidates.seen(ask, (c.tid, c.ts_ns)) else { return None };
        if retell {
            // Its verdict was evicted: told again, so that its starts count
            // directly and its entry can be folded.
            self.tell(ask, target, false, probes);
        }
        Some(self.probe_hit(pid, c.tid, c.code, c.ts_ns, targets.get(target?)?, procs))
    }

    /// Records what resolving `ask` found, tells the kernel (so later
    /// starts of the code object count directly), and returns the hits of
    /// the starts that waited for it. A failure is kept only when the walk
    /// needed more reads or bytes than a look may take (a deadline missed
    /// under load is tried again): the kernel then stops asking.
    pub fn resolved(
        &mut self,
        ask: Ask,
        result: Result<Resolution, ProcessError>,
        probes: &mut Probes,
        targets: &TargetSet,
    ) -> Vec<Hit> {
        let (target, resumable, info) = match result {
            Ok(r) => (r.target, r.resumable, Some(CodeInfo { filename: r.filename, lineno: r.lineno })),
            Err(e) if e.too_large() => {
                warn!(pid = ask.pid, code = ask.code, error = %e, "cannot resolve a candidate: its starts are not counted");
                (None, false, None)
            }
            Err(e) => {
                // Most likely the process exited; its pending starts cannot
                // be attributed, and the summary says so through the counters.
                debug!(pid = ask.pid, code = ask.code, error = %e, "cannot resolve candidate");
                self.candidates.resolved(ask, None);
                return Vec::new();
            }
        };
        // A target the process's dependency version leaves unwatched is none there.
        let target = target.filter(|id| !probes.unwatched(ask.pid, *id));
        // Not waited for any more: its code object is gone.
        let Some(starts) = self.candidates.resolved(ask, Some(target)) else { return Vec::new() };
        self.tell(ask, target, resumable, probes);
        let Some(target) = target.and_then(|id| targets.get(id)) else { return Vec::new() };
        if let Some(info) = info {
            bounded_insert(&mut self.code_info, (ask.pid, ask.code), info);
        }
        starts.into_iter().map(|(tid, ts_ns)| self.probe_hit(ask.pid, tid, ask.code, ts_ns, target, &())).collect()
    }

    /// Tells the kernel `ask`'s resolution (if of the current generation:
    /// an older one's starts are not counted under its key any more).
    fn tell(&mut self, ask: Ask, target: Option<u32>, resumable: bool, probes: &mut Probes) {
        if ask.generation == probes.generation()
            && let Err(e) =
                probes.set_verdict(ask.pid, ask.code, ask.generation, target.unwrap_or(TARGET_NONE), resumable)
        {
            warn!(pid = ask.pid, error = %e, "cannot store verdict");
        }
        // After the kernel has it: a start stamped later came after an
        // eviction of the verdict.
        self.candidates.told(ask.key(), monotonic_ns());
    }

    /// `key`'s code object was deallocated with `hits` counted while it
    /// awaited resolution: they are its target's, if it was resolved.
    pub(super) fn pending_freed(&mut self, key: Key, hits: u64) {
        if let Some(Some(id)) = self.candidates.gone(key) {
            *self.folded.entry((key.0, id)).or_default() += hits;
        }
    }

    /// Folds the pending entries whose resolution the kernel was told at
    /// least [`FOLD_AFTER`] ago into the processor's counts, and deletes
    /// them, giving their process its room back. An entry whose verdict the
    /// kernel no longer holds (evicted) is told again first: its object may
    /// still be counted there.
    pub fn fold_due(&mut self, probes: &mut Probes) {
        let before = monotonic_ns().saturating_sub(FOLD_AFTER.as_nanos() as u64);
        for ((pid, generation, code), target) in self.candidates.due(before) {
            if generation == probes.generation() && !probes.holds_verdict(pid, code, generation) {
                let ask = Ask { pid, generation, code, name: 0, globals: 0, id: 0 };
                self.tell(ask, target, false, probes);
                continue;
            }
            match probes.take_pending(pid, generation, code) {
                Ok(hits) => {
                    self.candidates.gone((pid, generation, code));
                    if let (Some(id), Some(hits)) = (target, hits) {
                        *self.folded.entry((pid, id)).or_default() += hits;
                    }
                }
                Err(e) => {
                    debug!(pid, code, error = %e, "cannot fold a pending entry: trying again");
                    self.candidates.told((pid, generation, code), monotonic_ns());
                }
            }
        }
    }

    /// Exact hits per target id in process `pid`, given its `pending`
    /// entries: the kernel's counters plus 3.8-3.10 starts counted before
    /// their code object was resolved (those of code objects not resolved
    /// are not any target's yet).
    pub fn totals(
        &self,
        pid: u32,
        pending: &[PendingHits],
        probes: &Probes,
        targets: &TargetSet,
    ) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = targets.iter().map(|(_, id)| (id, probes.count(pid, id))).collect();
        let pending: Vec<_> = pending.iter().map(|p| (pid, *p)).collect();
        self.add_pending(&mut out, &pending, |p| p == pid);
        out
    }

    /// Exact hits per target id summed over every process, reading each map
    /// once (for the metrics). Code objects the kernel counted and nobody
    /// resolved yet are asked about.
    pub fn totals_all(&mut self, probes: &Probes, targets: &TargetSet) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = targets.iter().map(|(_, id)| (id, 0)).collect();
        for (k, n) in probes.all_counts() {
            if let Some(total) = out.get_mut(&k.target) {
                *total += n;
            }
        }
        let pending = probes.all_pending();
        self.add_pending(&mut out, &pending, |_| true);
        self.candidates.ask_unresolved(&pending);
        out
    }

    /// Adds the hits of `pending` whose code objects are resolved, and
    /// those folded already of processes `of` takes.
    fn add_pending(&self, out: &mut BTreeMap<u32, u64>, pending: &[(u32, PendingHits)], of: impl Fn(u32) -> bool) {
        let resolved = pending.iter().filter_map(|(pid, p)| {
            let id = self.candidates.resolution((*pid, p.generation, p.code))??;
            Some((id, p.hits))
        });
        let folded = self.folded.iter().filter(|((pid, _), _)| of(*pid)).map(|((_, id), n)| (*id, *n));
        for (id, n) in resolved.chain(folded) {
            if let Some(total) = out.get_mut(&id) {
                *total += n;
            }
        }
    }

    /// Starts of `pending`'s code objects not resolved: not in any count.
    pub fn unattributed(&self, pid: u32, pending: &[PendingHits]) -> (u64, usize) {
        let unresolved = pending.iter().filter(|p| self.candidates.resolution((pid, p.generation, p.code)).is_none());
        unresolved.fold((0, 0), |(starts, objects), p| (starts + p.hits, objects + 1))
    }

    /// Targets `ids` were removed: their folded counts go with them.
    pub fn retire(&mut self, ids: &[u32]) {
        self.folded.retain(|(_, id), _| !ids.contains(id));
    }

    /// The code objects to resolve since the last call.
    pub fn take_asks(&mut self) -> Vec<Ask> {
        self.candidates.take_asks()
    }

    /// Asks that could not be queued, or whose walk failed.
    pub fn refused(&mut self, asks: impl IntoIterator<Item = Ask>) {
        for ask in asks {
            self.candidates.refused(ask);
        }
    }

    /// Asks a walk left for the next turn.
    pub fn requeue(&mut self, asks: Vec<Ask>) {
        self.candidates.requeue(asks);
    }

    /// Every one of `pending` not resolved yet, to resolve on the spot.
    pub fn unresolved(&mut self, pending: &[(u32, PendingHits)]) -> Vec<Ask> {
        self.candidates.unresolved(pending)
    }

    /// Starts whose lines were not kept, and times a code object was not
    /// asked about because its process had too many waiting.
    pub fn candidates_capped(&self) -> (u64, u64) {
        self.candidates.capped()
    }
}
