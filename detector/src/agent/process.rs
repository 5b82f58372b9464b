//! One watched process as a state machine: how its targets are observed
//! ([`Mode`]) and how its hits are counted ([`Counting`]: exactly, or once
//! per target), with the transitions between them.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::Instant,
};

use detector_common::{FAMILY_FRAME_ARG, MODE_WATCH};
use tracing::{info, warn};

use super::{
    AttachError, Strategy,
    attach::{self, PerCallLinks},
    budget, discovery,
    exposure::{Exposure, Versions},
    mode::{Arming, Mode, PerCall, Suspension, Watching, start},
    sampling,
    tenant::Tenant,
    walker::{Job, Look, Targets, Walked},
    walks::LoopShare,
    watchpoints::{CannotWatch, Fit},
};
use crate::{
    bpf::{Link, Probes, reaper::Buried},
    events::candidates::Ask,
    pyproc::PythonProcess,
    targets::{Target, TargetSet},
};

/// What a tick found.
#[derive(Default)]
pub(crate) struct Ticked {
    /// A look for targets a module body that ran made.
    pub look: Option<Job>,
    /// Targets whose code objects show they ran (reachability), with the
    /// code object.
    pub ran: Vec<(u32, u64)>,
}

/// How hits are counted.
pub(crate) enum Counting {
    /// Every call, exactly.
    Exact,
    /// Each target reported once, and no longer paid for once seen where
    /// the strategy allows: the targets seen so far.
    Reachability(HashSet<u32>),
}

impl Counting {
    pub(super) fn seen(&self, target: u32) -> bool {
        matches!(self, Counting::Reachability(s) if s.contains(&target))
    }

    /// How many body starts may be watched: sharing the debug registers
    /// over time is for reachability only (a miss there delays a report,
    /// it never falsifies a count).
    pub(super) fn fit(&self) -> Fit {
        match self {
            Counting::Exact => Fit::Registers,
            Counting::Reachability(_) => Fit::Rotate,
        }
    }
}

/// A process being watched: its interpreter, its mode and its counting.
pub struct ProcessWatch {
    /// The process.
    pub process: PythonProcess,
    /// The service its hits are reported for.
    pub service: discovery::Service,
    /// The pod (or cgroup) it belongs to, which its quota is counted in.
    pub tenant: Tenant,
    pub(super) mode: Mode,
    pub(super) counting: Counting,
    /// Its probe passes, for the overhead budget.
    pub meter: budget::Meter,
    /// When it was first attached.
    pub since: Instant,
    /// Its start time (clock ticks after boot): a pid reused by another
    /// process has another.
    pub start_time: Option<u64>,
    /// The last budget decision about it, with the load that caused it.
    pub budget_note: Option<String>,
    /// Reachability's sampled counts of reached targets.
    pub samples: sampling::Samples,
    /// The agent loop's time its walks may take.
    pub walks: LoopShare,
    /// Why watchpoints are not to be used in it again, if they are not.
    pub(super) watch_forbidden: Option<String>,
    /// What it has of the catalog's dependencies, once read.
    pub(crate) versions: Option<Versions>,
    /// Targets its dependency versions leave unwatched (or not read yet).
    pub(super) unwatched: BTreeSet<u32>,
    /// What its versions mean for each constrained target, as last applied.
    pub(super) exposures: BTreeMap<u32, Exposure>,
    /// Who called each target reached, as far as read.
    pub(super) callers: BTreeMap<u32, super::callers::CallerState>,
}

impl ProcessWatch {
    /// Watches `process` with `strategy` (falling back from watchpoints to
    /// per-call probes when they cannot apply), in reachability mode if
    /// `reachability`. On failure nothing stays attached.
    /// `unwatched` targets are left alone.
    pub fn attach_with(
        probes: &mut Probes,
        process: PythonProcess,
        (targets, unwatched): (&TargetSet, BTreeSet<u32>),
        strategy: Strategy,
        reachability: bool,
    ) -> Result<Self, AttachError> {
        let counting = if reachability { Counting::Reachability(HashSet::new()) } else { Counting::Exact };
        let mode = start(probes, (&process, None), (targets, &unwatched), strategy, &counting)?;
        Ok(Self::with_mode(process, mode, counting, unwatched))
    }

    fn with_mode(process: PythonProcess, mode: Mode, counting: Counting, unwatched: BTreeSet<u32>) -> Self {
        let start_time = discovery::start_time(process.pid);
        ProcessWatch {
            tenant: Tenant::of(process.pid),
            process,
            service: Default::default(),
            mode,
            counting,
            meter: Default::default(),
            since: Instant::now(),
            start_time,
            budget_note: None,
            samples: Default::default(),
            walks: Default::default(),
            watch_forbidden: None,
            versions: None,
            unwatched,
            exposures: BTreeMap::new(),
            callers: BTreeMap::new(),
        }
    }

    /// The empty program at every site the detector would use: the floor
    /// its per-hit cost is measured against (`cargo xtask bench`).
    pub fn attach_floor(probes: &mut Probes, process: PythonProcess) -> Result<Self, AttachError> {
        let links = attach::floor(probes, &process)?;
        let links = PerCallLinks { links, prefilled_threads: 0, prefilled_identities: 0 };
        let mode = Mode::PerCall(PerCall { links, guards: Vec::new(), fallback: None });
        Ok(Self::with_mode(process, mode, Counting::Exact, BTreeSet::new()))
    }

    /// Budget: moves a per-call process to watchpoints. The watchpoints are
    /// armed before the kernel is told they count and the uprobes are
    /// closed, so no call is missed or counted twice.
    pub fn switch_to_watch(&mut self, probes: &mut Probes, targets: &TargetSet) -> Result<(), CannotWatch> {
        if !matches!(self.mode, Mode::PerCall(_)) {
            return Ok(());
        }
        if let Some(why) = &self.watch_forbidden {
            return Err(CannotWatch::Forbidden(why.clone()));
        }
        let Mode::PerCall(pc) = std::mem::replace(&mut self.mode, Mode::Detached) else { unreachable!() };
        let both = (targets, &self.unwatched);
        let armed = match Watching::arm(probes, &self.process, both, &self.counting, pc.guards, Arming::Now) {
            Ok(w) => w,
            Err((e, guards)) => {
                self.mode = Mode::PerCall(PerCall { guards, ..pc });
                return Err(e);
            }
        };
        if let Err(e) = probes.set_mode(self.process.pid, MODE_WATCH) {
            let guards = armed.close(probes);
            self.mode = Mode::PerCall(PerCall { guards, ..pc });
            return Err(e.into());
        }
        attach::detach_all(probes, pc.links.links);
        self.mode = Mode::Watch(armed);
        self.meter.reset();
        Ok(())
    }

    /// Never uses watchpoints in this process again, for `why`, leaving
    /// them for per-call probes now; returns whether it had them.
    pub fn forbid_watch(&mut self, probes: &mut Probes, targets: &TargetSet, why: String) -> bool {
        let had = matches!(self.mode, Mode::Watch(_));
        self.watch_forbidden = Some(why.clone());
        self.fall_back_to_per_call(probes, targets, &CannotWatch::Forbidden(why));
        had
    }

    /// Leaves watchpoints for per-call probes (a target found late cannot be
    /// watched): the uprobes count from when they switch the mode, then the
    /// watchpoints go, so no armed target misses a call.
    fn fall_back_to_per_call(&mut self, probes: &mut Probes, targets: &TargetSet, why: &CannotWatch) {
        let Mode::Watch(w) = std::mem::replace(&mut self.mode, Mode::Detached) else { return };
        let per_call = attach::per_call(probes, &self.process, targets);
        let guards = w.close(probes);
        self.enter_per_call(probes, per_call, guards, why);
    }

    /// Per-call mode with `per_call` if they attached, else nothing.
    fn enter_per_call(
        &mut self,
        probes: &mut Probes,
        per_call: Result<PerCallLinks, AttachError>,
        guards: Vec<Link>,
        why: &CannotWatch,
    ) {
        let pid = self.process.pid;
        match per_call {
            Ok(links) => {
                let why = crate::chain(why);
                info!(pid, reason = %why, "watchpoints no longer apply; probing every call");
                self.mode = Mode::PerCall(PerCall { links, guards, fallback: Some(why) });
            }
            Err(e) => {
                attach::detach_all(probes, guards);
                if !self.process.gone() {
                    warn!(pid, error = %format!("{e:#}"), "watchpoints no longer apply and per-call probes cannot attach: not watched");
                }
            }
        }
    }

    /// A code object was deallocated while one of its units was watched
    /// (a module reloaded, a function redefined): the walk that looks for
    /// what the targets name now, or `None` if the code was not watched.
    pub fn code_freed(&mut self, probes: &mut Probes, targets: &TargetSet, code: u64) -> Option<Job> {
        let Mode::Watch(w) = &mut self.mode else { return None };
        // An exiting process frees every code object: nothing to follow.
        if !w.armed.watches_code(code) || self.process.gone() {
            return None;
        }
        w.armed.code_freed(probes, self.process.pid, code);
        w.follow_imports(probes, &self.process);
        self.rescan_pending(targets, true, "code freed")
    }

    /// Follows a change of targets. Watchpoints of targets that stay keep
    /// counting, those of targets gone are disarmed, and new targets are
    /// looked for by the walk returned. Per-call probes need nothing (they
    /// read the targets from the kernel's map) but, on 3.8-3.10, the
    /// identities of functions that already exist.
    pub fn retarget(&mut self, probes: &mut Probes, targets: &TargetSet) -> Option<Job> {
        let Mode::Watch(w) = &mut self.mode else { return None };
        let (counting, unwatched) = (&self.counting, &self.unwatched);
        let new = w
            .armed
            .follow_targets(probes, self.process.pid, targets, |id| counting.seen(id) || unwatched.contains(&id));
        w.follow_imports(probes, &self.process);
        if new { self.rescan_pending(targets, true, "targets changed") } else { None }
    }

    /// 3.8-3.10, probed per call: the walk for the functions of `new`
    /// targets that exist already.
    pub fn identities(&self, targets: &TargetSet, new: &[Target]) -> Option<Job> {
        let per_call = matches!(self.mode, Mode::PerCall(_));
        if !per_call || self.process.analysis.layout.family != FAMILY_FRAME_ARG || new.is_empty() {
            return None;
        }
        let new: Vec<_> = new.iter().filter_map(|t| Some((targets.id(t)?, t.clone()))).collect();
        Some(self.walk(Look::Identities, new.into()))
    }

    /// The walk resolving `asks` (3.8-3.10 candidates) against `targets`.
    pub fn resolution(&self, targets: Targets, asks: Vec<Ask>) -> Job {
        self.walk(Look::Candidates(asks), targets)
    }

    pub(super) fn walk(&self, look: Look, targets: Targets) -> Job {
        Job { pid: self.process.pid, since: self.since, look, process: self.process.clone(), targets, seq: 0 }
    }

    /// The walk a module body about to run asks for, if targets are
    /// pending (its module may define them).
    pub fn module_body(&self, targets: &TargetSet, code: u64, globals: u64, ts_ns: u64) -> Option<Job> {
        self.job(targets, Look::Body { code, globals, ts_ns })
    }

    /// The safety net's walk for a module body the probe did not report:
    /// a look for pending targets in `sys.modules` (if a module was
    /// imported since the last look, or in any case if `force` or a walk
    /// was deferred). `source` says why.
    pub fn rescan_pending(&mut self, targets: &TargetSet, force: bool, source: &'static str) -> Option<Job> {
        let Mode::Watch(w) = &self.mode else { return None };
        if !w.armed.follows_imports() {
            return None;
        }
        let seen = w.armed.modules_seen();
        let force = self.walks.take_deferred() || force;
        self.job(targets, Look::Modules { force, seen, source, unread: false })
    }

    fn job(&self, targets: &TargetSet, look: Look) -> Option<Job> {
        let Mode::Watch(w) = &self.mode else { return None };
        if !w.armed.follows_imports() {
            return None;
        }
        Some(self.walk(look, w.armed.looking_for(targets).into()))
    }

    /// Applies what a walk of this process found. Returns the targets armed.
    pub fn walked(&mut self, probes: &mut Probes, targets: &TargetSet, walked: Walked) -> Vec<u32> {
        self.walks.charge(walked.took);
        let Mode::Watch(w) = &mut self.mode else { return Vec::new() };
        let result = w.armed.apply(probes, &self.process, targets, &walked.look, walked.finding);
        self.after_finding(probes, targets, result)
    }

    /// What finding pending targets leads to: their ids, or, when they
    /// cannot be watched, per-call probes for the whole process.
    fn after_finding(
        &mut self,
        probes: &mut Probes,
        targets: &TargetSet,
        found: Result<Vec<u32>, CannotWatch>,
    ) -> Vec<u32> {
        match found {
            Ok(ids) => {
                if let Mode::Watch(w) = &mut self.mode {
                    w.follow_imports(probes, &self.process);
                }
                ids
            }
            // An exiting process is not worth per-call probes.
            Err(_) if self.process.gone() => Vec::new(),
            Err(e) => {
                self.fall_back_to_per_call(probes, targets, &e);
                Vec::new()
            }
        }
    }

    /// Gives the next body starts their turn on the debug registers, if
    /// they are shared and a slice is over; reads the warm-up marks of
    /// those waiting (reachability); looks for the targets of a module body
    /// that ran and were not found in it, when due.
    pub(crate) fn tick(&mut self, probes: &mut Probes, targets: &TargetSet, now: Instant) -> Ticked {
        let Mode::Watch(w) = &mut self.mode else { return Ticked::default() };
        let pid = self.process.pid;
        let ran = match self.counting {
            Counting::Reachability(_) => w.armed.marks_ran(pid, now),
            Counting::Exact => Vec::new(),
        };
        w.armed.rotate(probes, pid, now);
        let look = if w.armed.recheck_due(now) { self.rescan_pending(targets, true, "module ran") } else { None };
        Ticked { look, ran }
    }

    /// From now on each target is reported once and, where watched,
    /// disarmed once seen; `seen` are the targets already hit.
    pub fn reach(&mut self, probes: &mut Probes, seen: impl IntoIterator<Item = u32>) {
        match &mut self.counting {
            Counting::Reachability(s) => s.extend(seen),
            Counting::Exact => self.counting = Counting::Reachability(seen.into_iter().collect()),
        }
        if let Mode::Watch(w) = &mut self.mode {
            w.armed.allow_rotation();
        }
        self.disarm_reached(probes);
        // Only first hits are reported now: the kernel can skip the records.
        let pid = self.process.pid;
        if let Err(e) = probes.report_sparsely(pid) {
            warn!(pid, error = %e, "cannot make hit events sparse: every hit stays an event");
        }
        self.meter.reset();
    }

    /// Records a hit of `target`: whether it is to be reported (always when
    /// counting exactly; the first time under reachability, when its
    /// watchpoint is disarmed).
    pub fn first_reach(&mut self, probes: &mut Probes, target: u32) -> bool {
        let Counting::Reachability(seen) = &mut self.counting else { return true };
        if !seen.insert(target) {
            return false;
        }
        if self.stop_watching(probes, target) {
            info!(pid = self.process.pid, target, "reached: watchpoint disarmed");
        }
        true
    }

    /// Disarms the watchpoints of targets already seen.
    pub(crate) fn disarm_reached(&mut self, probes: &mut Probes) {
        let (Counting::Reachability(seen), Mode::Watch(w)) = (&self.counting, &mut self.mode) else { return };
        for &t in seen {
            w.armed.disarm_target(probes, self.process.pid, t);
        }
        w.follow_imports(probes, &self.process);
    }

    /// Stops watching `target` if a watchpoint watches it; returns whether
    /// one did.
    pub fn stop_watching(&mut self, probes: &mut Probes, target: u32) -> bool {
        let Mode::Watch(w) = &mut self.mode else { return false };
        let disarmed = w.armed.disarm_target(probes, self.process.pid, target);
        w.follow_imports(probes, &self.process);
        disarmed
    }

    /// Budget: detaches everything but the guards until `until`; the
    /// process stays known.
    pub fn suspend(&mut self, probes: &mut Probes, until: Instant, why: String) {
        if matches!(self.mode, Mode::Blind(_)) {
            return;
        }
        let (others, guards) = self.leave(probes);
        attach::detach_all(probes, others);
        self.mode = Mode::Suspended(Suspension { until, why, guards });
        self.meter.reset();
    }

    /// Its JIT started (`why`): calls from now on may run in compiled code
    /// that neither strategy sees. Detaches everything for good; the counts
    /// so far stand. Returns whether it was not blind already.
    pub fn blind(&mut self, probes: &mut Probes, why: String) -> bool {
        if matches!(self.mode, Mode::Blind(_)) {
            return false;
        }
        self.detach(probes);
        self.mode = Mode::Blind(why);
        self.meter.reset();
        true
    }

    /// Attaches a suspended process again with `strategy`.
    pub fn resume(&mut self, probes: &mut Probes, targets: &TargetSet, strategy: Strategy) -> Result<(), AttachError> {
        self.meter.reset();
        let strategy = if self.watch_forbidden.is_some() { Strategy::PerCall } else { strategy };
        let kept = match std::mem::replace(&mut self.mode, Mode::Detached) {
            Mode::Suspended(s) => Some(s.guards),
            other => {
                self.mode = other;
                return Ok(());
            }
        };
        match start(probes, (&self.process, kept), (targets, &self.unwatched), strategy, &self.counting) {
            Ok(mut mode) => {
                if let Mode::PerCall(pc) = &mut mode {
                    pc.fallback = pc.fallback.take().or_else(|| self.watch_forbidden.clone());
                }
                self.mode = mode;
                Ok(())
            }
            Err(e) => {
                self.mode = Mode::Detached;
                Err(e)
            }
        }
    }

    /// Detaches every probe (uprobes closed in the background).
    pub fn detach(&mut self, probes: &mut Probes) {
        for link in self.close(probes) {
            probes.detach(link);
        }
    }

    /// Takes every uprobe (they stay attached until the result is dropped)
    /// and disarms the watchpoints now.
    pub fn take_links(&mut self, probes: &mut Probes) -> Vec<Buried> {
        self.close(probes).into_iter().filter_map(|l| probes.take(l)).collect()
    }

    /// As [`ProcessWatch::leave`], every uprobe together.
    fn close(&mut self, probes: &mut Probes) -> Vec<Link> {
        let (others, guards) = self.leave(probes);
        others.into_iter().chain(guards).collect()
    }

    /// Leaves whatever mode it is in for [`Mode::Detached`]: disarms the
    /// watchpoints and returns the uprobes, the guards apart.
    fn leave(&mut self, probes: &mut Probes) -> (Vec<Link>, Vec<Link>) {
        match std::mem::replace(&mut self.mode, Mode::Detached) {
            Mode::PerCall(pc) => (pc.links.links, pc.guards),
            Mode::Watch(w) => (Vec::new(), w.close(probes)),
            Mode::Suspended(s) => (Vec::new(), s.guards),
            Mode::Blind(_) | Mode::Detached => (Vec::new(), Vec::new()),
        }
    }
}
