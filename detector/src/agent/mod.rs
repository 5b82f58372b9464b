//! Attaching to processes: per process, the probe sites of its interpreter,
//! scoped to that process so others pay nothing.

pub mod discovery;
pub mod node;
pub mod session;
pub mod spawn;
pub mod watchpoints;

pub use session::Session;

use detector_common::{FAMILY_FRAME_ARG, SiteCookie};
use tracing::{debug, info};

use crate::{
    bpf::{BpfError, Link, ProbeKind, Probes, reaper::Buried},
    interp::sites::SiteRole,
    pyproc::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects, qualname, threads},
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
    /// Uprobes at the interpreter's per-call sites: every Python call pays
    /// about a microsecond; exact on every build.
    #[default]
    PerCall,
    /// A hardware watchpoint on each target's body start (3.11+, up to four
    /// body starts, modules imported): calls of other functions cost
    /// nothing. Falls back to per-call, saying why, when it cannot apply.
    Watch,
}

impl Strategy {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
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
        }
    }

    /// Watches `process` with `strategy` (falling back from watchpoints to
    /// per-call probes when they cannot apply). On failure nothing stays
    /// attached.
    pub fn attach_with(
        probes: &mut Probes,
        process: PythonProcess,
        targets: &TargetSet,
        strategy: Strategy,
    ) -> Result<Self, AttachError> {
        if strategy == Strategy::Watch {
            match watchpoints::Armed::arm(probes, &process, targets) {
                Ok(armed) => {
                    info!(
                        pid = process.pid,
                        binary = %process.object.path,
                        units = armed.units(),
                        threads = armed.threads,
                        "watching process with hardware watchpoints"
                    );
                    let mut w = ProcessWatch::new(process);
                    w.armed = Some(armed);
                    return Ok(w);
                }
                Err(e) => {
                    info!(pid = process.pid, reason = %e, "watch strategy does not apply; probing every call");
                    let mut w = ProcessWatch::attach(probes, process, targets)?;
                    w.fallback = Some(e.to_string());
                    return Ok(w);
                }
            }
        }
        ProcessWatch::attach(probes, process, targets)
    }

    /// Follows a change of targets: watchpoints are re-armed on the new body
    /// starts, or, where that is no longer possible, the process is probed
    /// per call from now on. Per-call probes need nothing (they read the
    /// targets from the kernel's map).
    pub fn retarget(&mut self, probes: &mut Probes, targets: &TargetSet) -> Result<(), AttachError> {
        let Some(mut old) = self.armed.take() else { return Ok(()) };
        old.disarm(probes);
        match watchpoints::Armed::arm(probes, &self.process, targets) {
            Ok(armed) => self.armed = Some(armed),
            Err(e) => {
                info!(pid = self.process.pid, reason = %e, "watch strategy no longer applies; probing every call");
                self.fallback = Some(e.to_string());
                let _attaching = probes.attaching();
                if let Err(e) = self.attach_all(probes, targets) {
                    self.detach(probes);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Stops watching `target` if a watchpoint watches it; returns whether
    /// one did.
    pub fn stop_watching(&mut self, probes: &mut Probes, target: u32) -> bool {
        self.armed.as_mut().is_some_and(|a| a.disarm_target(probes, target))
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        if self.armed.is_some() { Strategy::Watch } else { Strategy::PerCall }
    }

    /// Attaches every probe site of the process's interpreter. On failure
    /// nothing stays attached.
    pub fn attach(probes: &mut Probes, process: PythonProcess, targets: &TargetSet) -> Result<Self, AttachError> {
        let _attaching = probes.attaching();
        let mut watch = ProcessWatch::new(process);
        match watch.attach_all(probes, targets) {
            Ok(()) => Ok(watch),
            Err(e) => {
                watch.detach(probes);
                Err(e)
            }
        }
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
        self.attach_role(probes, layout, SiteRole::CodeDealloc, ProbeKind::CodeDealloc)?;
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
        for site in a.sites.iter().filter(|s| s.role == role) {
            let cookie = SiteCookie {
                layout,
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
        let objs = Objects { mem: &mem, o: &p.analysis.table.values, minor: p.analysis.version.minor };
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
