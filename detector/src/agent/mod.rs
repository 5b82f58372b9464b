//! Attaching to processes: per process, the probe sites of its interpreter,
//! scoped to that process so others pay nothing.

pub mod budget;
pub mod discovery;
pub mod node;
pub mod sampling;
pub mod session;
pub mod spawn;
pub mod watchpoints;

pub use session::Session;

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use detector_common::{FAMILY_FRAME_ARG, MODE_PER_CALL, MODE_WATCH, SiteCookie};
use tracing::{debug, info, warn};

use crate::{
    bpf::{BpfError, Link, ProbeKind, Probes, reaper::Buried},
    interp::sites::SiteRole,
    pyproc::{ProcessError, PythonProcess, body, mem::ProcessMemory, objects::Objects, qualname, threads},
    targets::{Target, TargetSet},
};

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Reading the process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The kernel refused.
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// How a process's targets are watched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// The cheapest exact strategy for the process and targets at hand:
    /// watch where it applies, per-call elsewhere.
    #[default]
    Auto,
    /// Uprobes at the interpreter's per-call sites: every Python call pays
    /// about a microsecond; exact on every build.
    PerCall,
    /// A hardware watchpoint on each target's body start: calls of other
    /// functions pass no probe, a target's call costs tens of microseconds.
    /// Targets whose module is not imported yet cost nothing until it is.
    /// More than four body starts share the debug registers over time under
    /// reachability; counting exactly, they are probed per call. Falls back
    /// to per-call, saying why, when it cannot apply.
    Watch,
}

impl Strategy {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::PerCall => "per-call",
            Strategy::Watch => "watch",
        }
    }
}

/// A process being watched: its interpreter and its probes.
pub struct ProcessWatch {
    /// The process.
    pub process: PythonProcess,
    links: Vec<Link>,
    armed: Option<watchpoints::Armed>,
    /// Why the watch strategy was asked for and not used.
    pub fallback: Option<String>,
    /// Threads whose state was pre-filled at attach time.
    pub prefilled_threads: usize,
    /// 3.8-3.10 target functions whose identity was pre-filled.
    pub prefilled_identities: usize,
    /// The service its hits are reported for.
    pub service: discovery::Service,
    /// Reachability: the targets already seen (each reported once, and
    /// disarmed where the strategy allows); `None` when counting exactly.
    pub reached: Option<HashSet<u32>>,
    /// Its probe passes, for the overhead budget.
    pub meter: budget::Meter,
    /// When it was first attached.
    pub since: Instant,
    /// Detached for being over budget: until when, and why.
    pub suspended: Option<(Instant, String)>,
    /// The last budget decision about it, with the load that caused it.
    pub budget_note: Option<String>,
    /// Reachability's sampled counts of reached targets.
    pub samples: sampling::Samples,
}

impl ProcessWatch {
    fn new(process: PythonProcess) -> Self {
        ProcessWatch {
            process,
            links: Vec::new(),
            armed: None,
            fallback: None,
            prefilled_threads: 0,
            prefilled_identities: 0,
            service: Default::default(),
            reached: None,
            meter: Default::default(),
            since: Instant::now(),
            suspended: None,
            budget_note: None,
            samples: Default::default(),
        }
    }

    /// Watches `process` with `strategy` (falling back from watchpoints to
    /// per-call probes when they cannot apply), in reachability mode if
    /// `reachability`. On failure nothing stays attached.
    pub fn attach_with(
        probes: &mut Probes,
        process: PythonProcess,
        targets: &TargetSet,
        strategy: Strategy,
        reachability: bool,
    ) -> Result<Self, AttachError> {
        let mut w = ProcessWatch::new(process);
        if reachability {
            w.reached = Some(HashSet::new());
        }
        w.start(probes, targets, strategy)?;
        Ok(w)
    }

    /// How many body starts it may have watched: sharing the registers
    /// over time is for reachability only.
    fn fit(&self) -> watchpoints::Fit {
        if self.reached.is_some() { watchpoints::Fit::Rotate } else { watchpoints::Fit::Registers }
    }

    /// Arms watchpoints on what `targets` name now, reached targets left
    /// out, and follows module executions while any target is pending.
    fn arm(&mut self, probes: &mut Probes, targets: &TargetSet) -> Result<(), watchpoints::CannotWatch> {
        let reached = self.reached.as_ref();
        let unreached = targets.iter().filter(|(_, id)| !reached.is_some_and(|r| r.contains(id)));
        let armed = watchpoints::Armed::arm(probes, &self.process, unreached, self.fit())?;
        self.armed = Some(armed);
        self.follow_imports(probes);
        Ok(())
    }

    /// Attaches the module-execution probe while targets are pending, and
    /// detaches it once none is.
    fn follow_imports(&mut self, probes: &mut Probes) {
        let pending = self.armed.as_ref().is_some_and(|a| !a.pending().is_empty());
        let attached = self.links.iter().any(|l| l.kind() == ProbeKind::ModuleExec);
        let pid = self.process.pid;
        if pending && !attached {
            let layout = match probes.layout_id(&self.process.analysis.layout) {
                Ok(l) => l,
                Err(e) => return warn!(pid, error = %e, "cannot follow imports"),
            };
            let _attaching = probes.attaching();
            if let Err(e) = self.attach_role(probes, layout, SiteRole::ModuleExec, ProbeKind::ModuleExec)
                && !self.process.gone()
            {
                warn!(pid, error = %format!("{e:#}"), "cannot follow imports: pending targets are found by the rescan only");
            }
        } else if !pending && attached {
            let (close, keep): (Vec<_>, Vec<_>) = self.links.drain(..).partition(|l| l.kind() == ProbeKind::ModuleExec);
            self.links = keep;
            for link in close {
                probes.detach(link);
            }
            debug!(pid, "every target found: no longer following imports");
        }
    }

    fn start(&mut self, probes: &mut Probes, targets: &TargetSet, strategy: Strategy) -> Result<(), AttachError> {
        if strategy == Strategy::PerCall {
            return self.attach_or_nothing(probes, targets);
        }
        let pid = self.process.pid;
        match self.arm(probes, targets) {
            Ok(()) => {
                let armed = self.armed.as_ref().expect("just armed");
                let (units, threads, pending) = (armed.units(), armed.threads, armed.pending().len());
                let counting = self.watch_deallocations(probes).and_then(|()| Ok(probes.set_mode(pid, MODE_WATCH)?));
                if let Err(e) = counting {
                    self.detach(probes);
                    return Err(e);
                }
                info!(
                    pid,
                    binary = %self.process.object.path,
                    units,
                    threads,
                    pending,
                    "watching process with hardware watchpoints"
                );
                self.fallback = None;
                Ok(())
            }
            Err(e) => {
                info!(pid, reason = %e, "watch strategy does not apply; probing every call");
                self.attach_or_nothing(probes, targets)?;
                self.fallback = Some(e.to_string());
                Ok(())
            }
        }
    }

    fn attach_or_nothing(&mut self, probes: &mut Probes, targets: &TargetSet) -> Result<(), AttachError> {
        let _attaching = probes.attaching();
        self.attach_all(probes, targets).inspect_err(|_| self.detach(probes))
    }

    /// Budget: moves a per-call process to watchpoints. The watchpoints are
    /// armed before the kernel is told they count and the uprobes are
    /// closed, so no call is missed or counted twice.
    pub fn switch_to_watch(
        &mut self,
        probes: &mut Probes,
        targets: &TargetSet,
    ) -> Result<(), watchpoints::CannotWatch> {
        self.arm(probes, targets)?;
        probes.set_mode(self.process.pid, MODE_WATCH)?;
        let (keep, close): (Vec<_>, Vec<_>) = self.links.drain(..).partition(|l| !l.kind().per_call());
        self.links = keep;
        for link in close {
            probes.detach(link);
        }
        self.meter.reset();
        self.watch_deallocations(probes).map_err(|e| match e {
            AttachError::Bpf(b) => watchpoints::CannotWatch::Bpf(b),
            AttachError::Process(p) => watchpoints::CannotWatch::Process(p),
        })
    }

    /// Under watchpoints, the deallocation probe alone: a watched code
    /// object that goes away stops being counted in the kernel at once, and
    /// its target is looked for again (see [`ProcessWatch::code_freed`]).
    /// Deallocations are rare next to calls.
    fn watch_deallocations(&mut self, probes: &mut Probes) -> Result<(), AttachError> {
        if self.links.iter().any(|l| l.kind() == ProbeKind::CodeDealloc) {
            return Ok(());
        }
        let _attaching = probes.attaching();
        let layout = probes.layout_id(&self.process.analysis.layout)?;
        self.attach_role(probes, layout, SiteRole::CodeDealloc, ProbeKind::CodeDealloc)
    }

    /// A code object was deallocated while one of its units was watched
    /// (a module reloaded, a function redefined): re-arms on what the
    /// targets name now, or probes per call until they are found again.
    /// Returns whether the code was watched here.
    pub fn code_freed(&mut self, probes: &mut Probes, targets: &TargetSet, code: u64) -> Result<bool, AttachError> {
        // An exiting process frees every code object: nothing to follow.
        if !self.armed.as_ref().is_some_and(|a| a.watches_code(code)) || self.process.gone() {
            return Ok(false);
        }
        self.retarget(probes, targets)?;
        Ok(true)
    }

    /// A module body is about to run: arms the pending targets it defines.
    /// Returns their ids (none if the module has no pending target).
    pub fn module_body(&mut self, probes: &mut Probes, targets: &TargetSet, code: u64, globals: u64) -> Vec<u32> {
        let pid = self.process.pid;
        let Some(armed) = &mut self.armed else { return Vec::new() };
        if armed.pending().is_empty() {
            return Vec::new();
        }
        let module = match body::module_name(&self.process, globals) {
            Ok(Some(m)) => m,
            Ok(None) => return Vec::new(),
            Err(e) => {
                debug!(pid, error = %e, "cannot read a module body's name");
                return Vec::new();
            }
        };
        if !armed.pending_modules(targets).contains(module.as_str()) {
            return Vec::new();
        }
        let result = armed.module_body(probes, &self.process, targets, &module, code);
        self.after_finding(probes, targets, result)
    }

    /// The safety net for a module body the probe did not report: looks for
    /// pending targets in `sys.modules` (if a module was imported since the
    /// last look, or at once if `force`). Returns the targets armed.
    pub fn rescan_pending(&mut self, probes: &mut Probes, targets: &TargetSet, force: bool) -> Vec<u32> {
        let Some(armed) = &mut self.armed else { return Vec::new() };
        if armed.pending().is_empty() {
            return Vec::new();
        }
        let result = armed.rescan(probes, &self.process, targets, force);
        self.after_finding(probes, targets, result)
    }

    /// What finding pending targets leads to: their ids, or, when they
    /// cannot be watched, per-call probes for the whole process.
    fn after_finding(
        &mut self,
        probes: &mut Probes,
        targets: &TargetSet,
        found: Result<Vec<u32>, watchpoints::CannotWatch>,
    ) -> Vec<u32> {
        let pid = self.process.pid;
        match found {
            Ok(ids) => {
                self.follow_imports(probes);
                ids
            }
            Err(e) => {
                info!(pid, reason = %e, "a target found late cannot be watched; probing every call");
                self.fallback = Some(e.to_string());
                // Per-call probes count from when they switch the mode, then
                // the watchpoints go: no armed target misses a call.
                if let Err(e) = self.attach_or_nothing(probes, targets) {
                    warn!(pid, error = %format!("{e:#}"), "cannot probe per call either: the process is not watched");
                }
                self.disarm(probes);
                self.follow_imports(probes);
                Vec::new()
            }
        }
    }

    /// Gives the next body starts their turn on the debug registers, if
    /// they are shared and a slice is over; looks for the targets of a
    /// module body that ran and were not found in it, when due. Returns the
    /// targets armed.
    pub fn tick(&mut self, probes: &mut Probes, targets: &TargetSet, now: Instant) -> Vec<u32> {
        let Some(a) = &mut self.armed else { return Vec::new() };
        a.rotate(probes, self.process.pid, now);
        if a.recheck_due(now) { self.rescan_pending(probes, targets, true) } else { Vec::new() }
    }

    /// Budget: from now on each target is reported once and, where watched,
    /// disarmed once seen; `seen` are the targets already hit.
    pub fn reach(&mut self, probes: &mut Probes, seen: impl IntoIterator<Item = u32>) {
        self.reached.get_or_insert_with(HashSet::new).extend(seen);
        self.disarm_reached(probes);
        // Only first hits are reported now: the kernel can skip the records.
        let pid = self.process.pid;
        probes.slot(pid);
        if let Err(e) = probes.report_sparsely(pid) {
            warn!(pid, error = %e, "cannot make hit events sparse: every hit stays an event");
        }
        self.meter.reset();
    }

    /// Records a hit of `target` in reachability mode: whether it is the
    /// first (to be reported; its watchpoint is disarmed). Always true when
    /// counting exactly.
    pub fn first_reach(&mut self, probes: &mut Probes, target: u32) -> bool {
        let Some(seen) = &mut self.reached else { return true };
        if !seen.insert(target) {
            return false;
        }
        if self.stop_watching(probes, target) {
            info!(pid = self.process.pid, target, "reached: watchpoint disarmed");
        }
        true
    }

    fn disarm_reached(&mut self, probes: &mut Probes) {
        let (Some(seen), Some(armed)) = (&self.reached, &mut self.armed) else { return };
        for &t in seen {
            armed.disarm_target(probes, self.process.pid, t);
        }
        self.follow_imports(probes);
    }

    /// Budget: detaches everything until `until`; the process stays known.
    pub fn suspend(&mut self, probes: &mut Probes, until: Instant, why: String) {
        self.detach(probes);
        self.suspended = Some((until, why));
        self.meter.reset();
    }

    /// Attaches a suspended process again with `strategy`.
    pub fn resume(&mut self, probes: &mut Probes, targets: &TargetSet, strategy: Strategy) -> Result<(), AttachError> {
        self.suspended = None;
        self.meter.reset();
        self.start(probes, targets, strategy)
    }

    /// Follows a change of targets: watchpoints are re-armed on the new body
    /// starts, or, where that is no longer possible, the process is probed
    /// per call from now on. Per-call probes need nothing (they read the
    /// targets from the kernel's map).
    pub fn retarget(&mut self, probes: &mut Probes, targets: &TargetSet) -> Result<(), AttachError> {
        let Some(mut old) = self.armed.take() else { return Ok(()) };
        old.disarm(probes);
        if let Err(e) = self.arm(probes, targets) {
            info!(pid = self.process.pid, reason = %e, "watch strategy no longer applies; probing every call");
            self.fallback = Some(e.to_string());
            self.follow_imports(probes);
            self.attach_or_nothing(probes, targets)?;
        }
        Ok(())
    }

    /// Stops watching `target` if a watchpoint watches it; returns whether
    /// one did.
    pub fn stop_watching(&mut self, probes: &mut Probes, target: u32) -> bool {
        let pid = self.process.pid;
        let disarmed = self.armed.as_mut().is_some_and(|a| a.disarm_target(probes, pid, target));
        self.follow_imports(probes);
        disarmed
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        if self.armed.is_some() { Strategy::Watch } else { Strategy::PerCall }
    }

    /// How `target` is observed in this process: `watch`, `per-call`,
    /// `pending` (its module has not run yet: found when it does),
    /// `reached` (seen, and no longer paid for) or `none` (suspended).
    pub fn target_strategy(&self, target: u32) -> &'static str {
        if self.armed.as_ref().is_some_and(|a| a.watches(target)) {
            "watch"
        } else if self.armed.as_ref().is_some_and(|a| a.pending().contains_key(&target)) {
            "pending"
        } else if self.probed_per_call() {
            "per-call"
        } else if self.reached.as_ref().is_some_and(|r| r.contains(&target)) {
            "reached"
        } else {
            "none"
        }
    }

    /// How many of its `targets` are observed each way (as
    /// [`ProcessWatch::target_strategy`] says), without a pass over them:
    /// a node may have thousands of targets and processes.
    pub fn targets_by_strategy(&self, targets: usize) -> BTreeMap<&'static str, usize> {
        let watched = self.armed.as_ref().map_or(0, |a| a.targets());
        let pending = self.armed.as_ref().map_or(0, |a| a.pending().len());
        let rest = targets.saturating_sub(watched + pending);
        // Reached targets are disarmed, so none of them is among the watched.
        let reached = if self.probed_per_call() { 0 } else { self.reached.as_ref().map_or(0, |r| r.len().min(rest)) };
        let other = if self.probed_per_call() { "per-call" } else { "none" };
        [("watch", watched), ("pending", pending), ("reached", reached), (other, rest - reached)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Whether per-call probes are attached (under watch only the
    /// deallocation and module-execution probes are).
    fn probed_per_call(&self) -> bool {
        self.links.iter().any(|l| l.kind().per_call())
    }

    /// Whether its watchpoints share the debug registers over time.
    pub fn rotating(&self) -> bool {
        self.armed.as_ref().is_some_and(|a| a.rotating())
    }

    /// Targets waiting for their module to run.
    pub fn pending_targets(&self) -> usize {
        self.armed.as_ref().map_or(0, |a| a.pending().len())
    }

    /// What it is watched with, as reported: the strategy, `suspended`,
    /// and `+reachability` when targets are disarmed once seen.
    pub fn mode(&self) -> String {
        let base = if self.suspended.is_some() { "suspended" } else { self.strategy().name() };
        if self.reached.is_some() { format!("{base}+reachability") } else { base.to_owned() }
    }

    /// Attaches every probe site of the process's interpreter. On failure
    /// nothing stays attached.
    pub fn attach(probes: &mut Probes, process: PythonProcess, targets: &TargetSet) -> Result<Self, AttachError> {
        Self::attach_with(probes, process, targets, Strategy::PerCall, false)
    }

    /// Attaches the empty program at every site the detector would use: the
    /// floor the detector's per-hit cost is measured against.
    pub fn attach_floor(probes: &mut Probes, process: PythonProcess) -> Result<Self, AttachError> {
        let _attaching = probes.attaching();
        let mut watch = ProcessWatch::new(process);
        let roles = [SiteRole::CodeDealloc, SiteRole::FunctionNew, SiteRole::EvalEntry, SiteRole::Resume];
        let layout = probes.layout_id(&watch.process.analysis.layout)?;
        for role in roles {
            if let Err(e) = watch.attach_role(probes, layout, role, ProbeKind::Empty) {
                watch.detach(probes);
                return Err(e);
            }
        }
        Ok(watch)
    }

    fn attach_all(&mut self, probes: &mut Probes, targets: &TargetSet) -> Result<(), AttachError> {
        let a = self.process.analysis.clone();
        let layout = probes.layout_id(&a.layout)?;
        // Deallocations first: no verdict may outlive its code object.
        self.watch_deallocations(probes)?;
        if a.layout.family == FAMILY_FRAME_ARG {
            // Definitions first, then pre-fill, then calls: a function made
            // in between is recorded by the definition probe.
            self.attach_role(probes, layout, SiteRole::FunctionNew, ProbeKind::FuncNew)?;
            self.prefilled_identities = self.prefill_identities(probes, targets.iter().map(|(t, _)| t))?;
            self.attach_role(probes, layout, SiteRole::EvalEntry, ProbeKind::EvalCall)?;
        } else {
            // Entry first, then pre-fill, then RESUME sites: a thread that
            // starts in between is recorded by the entry probe.
            self.attach_role(probes, layout, SiteRole::EvalEntry, ProbeKind::EvalEntry)?;
            self.prefilled_threads = self.prefill_threads(probes)?;
            self.attach_role(probes, layout, SiteRole::Resume, ProbeKind::Resume)?;
        }
        probes.set_mode(self.process.pid, MODE_PER_CALL)?;
        info!(
            pid = self.process.pid,
            binary = %self.process.object.path,
            version = %a.version,
            sites = self.links.len(),
            prefilled_threads = self.prefilled_threads,
            prefilled_identities = self.prefilled_identities,
            "watching process"
        );
        Ok(())
    }

    fn attach_role(
        &mut self,
        probes: &mut Probes,
        layout: u32,
        role: SiteRole,
        kind: ProbeKind,
    ) -> Result<(), AttachError> {
        let a = self.process.analysis.clone();
        let (pid, path) = (self.process.pid, self.process.object.open_path.clone());
        let slot = probes.slot(pid);
        for site in a.sites.iter().filter(|s| s.role == role) {
            let cookie = SiteCookie {
                layout,
                slot,
                check: site.check,
                cond: site.cond,
                count_when: site.count_when,
                frame_reg: site.registers.frame,
                code_reg: site.registers.code,
                instr_reg: site.registers.instr,
            };
            self.links.push(probes.attach(kind, &path, site.file_offset, pid, cookie)?);
            debug!(pid, binary = %self.process.object.path, site = %site.handler, addr = site.addr, "attached");
        }
        Ok(())
    }

    /// 3.8-3.10: records the identity of target functions that already
    /// exist (modules imported before the attach), so the kernel matches
    /// them exactly from their first call. Returns how many were found.
    pub fn prefill_identities<'a>(
        &self,
        probes: &mut Probes,
        targets: impl IntoIterator<Item = &'a Target>,
    ) -> Result<usize, AttachError> {
        let p = &self.process;
        let Some(runtime) = p.runtime() else {
            return Ok(0);
        };
        let mem = ProcessMemory::open(p.pid)?;
        let objs = Objects::of(p, &mem);
        let mut found = 0;
        for target in targets {
            let Some(globals) = qualname::module_globals(&objs, runtime, target.module())? else {
                continue;
            };
            for def in qualname::definitions(&objs, globals, target)? {
                let Some(func) = def.function else { continue };
                let name = mem.ptr(func, objs.o.func_qualname)?;
                let func_globals = mem.ptr(func, objs.o.func_globals)?;
                probes.set_identity(p.pid, def.code, name, func_globals)?;
                found += 1;
            }
        }
        Ok(found)
    }

    /// Records the thread state of every thread already known to the
    /// interpreter, for threads that are deep in Python and will not enter
    /// `_PyEval_EvalFrameDefault` again.
    fn prefill_threads(&self, probes: &mut Probes) -> Result<usize, AttachError> {
        let Some(runtime) = self.process.runtime() else {
            return Ok(0);
        };
        let mem = ProcessMemory::open(self.process.pid)?;
        let states = threads::thread_states(&mem, &self.process.analysis.table.values, runtime)?;
        for t in &states {
            probes.set_thread(t.tid, self.process.pid, t.tstate)?;
        }
        Ok(states.len())
    }

    /// Whether a uprobe is attached at the sites of `role`.
    pub fn probes_role(&self, role: SiteRole) -> bool {
        self.links.iter().any(|l| match l.kind() {
            ProbeKind::EvalEntry | ProbeKind::EvalCall => role == SiteRole::EvalEntry,
            ProbeKind::Resume => role == SiteRole::Resume,
            ProbeKind::FuncNew => role == SiteRole::FunctionNew,
            ProbeKind::CodeDealloc => role == SiteRole::CodeDealloc,
            ProbeKind::ModuleExec => role == SiteRole::ModuleExec,
            ProbeKind::Empty => true,
        })
    }

    /// Number of uprobes attached (watchpoints are counted apart).
    pub fn probes(&self) -> usize {
        self.links.len()
    }

    /// Units under a watchpoint.
    pub fn watched_units(&self) -> usize {
        self.armed.as_ref().map_or(0, |a| a.units())
    }

    /// Detaches every probe (uprobes closed in the background).
    pub fn detach(&mut self, probes: &mut Probes) {
        self.disarm(probes);
        for link in self.links.drain(..) {
            probes.detach(link);
        }
    }

    /// Takes every uprobe (they stay attached until the result is dropped)
    /// and disarms the watchpoints now.
    pub fn take_links(&mut self, probes: &mut Probes) -> Vec<Buried> {
        self.disarm(probes);
        self.links.drain(..).filter_map(|l| probes.take(l)).collect()
    }

    fn disarm(&mut self, probes: &mut Probes) {
        if let Some(mut a) = self.armed.take() {
            a.disarm(probes);
        }
    }
}
