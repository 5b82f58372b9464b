//! The watch strategy for one process: a hardware watchpoint per target body
//! start, on every thread, instead of per-call uprobes, so calls of every
//! other function pass no probe. It applies when every target's body start is
//! found (module imported, definition present) and they fit the four
//! debug registers x86 gives each thread; otherwise the caller falls back to
//! the per-call strategy.

use aya::programs::perf_event::PerfEventLinkId;
use detector_common::{WatchEntry, WatchKey};

use crate::{
    bpf::{BpfError, Probes},
    pyproc::{
        PythonProcess,
        body::{self, BodyStart, Found},
        mem::ProcessMemory,
    },
    targets::{Target, TargetSet},
};

/// Debug registers per x86 thread.
pub const DEBUG_REGISTERS: usize = 4;

/// Rounds of "list the threads, arm the new ones": a thread made by one not
/// armed yet is caught by the next round.
const ARM_ROUNDS: usize = 5;

impl CannotWatch {
    /// Whether trying again later may succeed (a target's module is not
    /// imported yet, or its definition not made yet).
    pub fn later(&self) -> bool {
        matches!(self, CannotWatch::NotFound { later: true, .. })
    }
}

/// Why a process cannot be watched with watchpoints.
#[derive(Debug, thiserror::Error)]
pub enum CannotWatch {
    /// A target's body start is unknown.
    #[error("{target}: {reason}")]
    NotFound {
        /// The target.
        target: String,
        /// Why.
        reason: String,
        /// Whether it may be found later (a late import).
        later: bool,
    },
    /// The loads that dispatch a code unit were not found in the binary.
    #[error("no opcode dispatch found in the evaluation loop: reads cannot be told from starts")]
    NoDispatch,
    /// More body starts than debug registers.
    #[error("at least {0} body starts to watch and {DEBUG_REGISTERS} debug registers per thread")]
    TooMany(usize),
    /// Reading the process failed.
    #[error(transparent)]
    Process(#[from] crate::pyproc::ProcessError),
    /// The kernel refused (a thread without a free debug register among them).
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// One watched body start: its target, its code object and unit, a
/// watchpoint per thread.
struct Unit {
    target: u32,
    code: u64,
    key: WatchKey,
    links: Vec<PerfEventLinkId>,
}

/// The armed watchpoints of one process.
#[derive(Default)]
pub struct Armed {
    units: Vec<Unit>,
    reads: Vec<WatchKey>,
    /// Threads armed.
    pub threads: usize,
}

impl Armed {
    /// Watches every target's body start in `process`, or arms nothing.
    pub fn arm(probes: &mut Probes, process: &PythonProcess, targets: &TargetSet) -> Result<Armed, CannotWatch> {
        let mut armed = Armed::default();
        match armed.arm_all(probes, process, targets) {
            Ok(()) => Ok(armed),
            Err(e) => {
                armed.disarm(probes);
                Err(e)
            }
        }
    }

    fn arm_all(&mut self, probes: &mut Probes, p: &PythonProcess, targets: &TargetSet) -> Result<(), CannotWatch> {
        let starts = plan(p, targets.iter())?;
        self.arm_starts(probes, p, starts)
    }

    fn arm_starts(
        &mut self,
        probes: &mut Probes,
        p: &PythonProcess,
        starts: Vec<(u32, BodyStart)>,
    ) -> Result<(), CannotWatch> {
        let Some(dispatch) = &p.analysis.dispatch else {
            return Err(CannotWatch::NoDispatch);
        };
        // Once: more targets may be armed later (reachability's samples).
        if self.reads.is_empty() {
            for end in &dispatch.ends {
                let key = WatchKey { tgid: p.pid, _pad: 0, addr: end + p.bias };
                probes.set_dispatch_read(key)?;
                self.reads.push(key);
            }
        }
        let layout = probes.layout_id(&p.analysis.layout)?;
        let slot = probes.slot(p.pid);
        let mem = ProcessMemory::open(p.pid)?;
        for (target, s) in &starts {
            let key = WatchKey { tgid: p.pid, _pad: 0, addr: s.unit_addr };
            // What is there now: a trap that finds it is a read, a start.
            let last_op = mem.u8(s.unit_addr)?;
            let entry = WatchEntry { code: s.code, target: *target, layout, last_op, reported: 0, slot, _pad: [0; 4] };
            probes.set_watch(key, entry)?;
            self.units.push(Unit { target: *target, code: s.code, key, links: Vec::new() });
        }
        let mut done = std::collections::BTreeSet::new();
        for _ in 0..ARM_ROUNDS {
            let threads: Vec<u32> = tasks(p.pid)?.into_iter().filter(|t| !done.contains(t)).collect();
            if threads.is_empty() {
                break;
            }
            for tid in threads {
                for unit in &mut self.units {
                    match probes.attach_watch(tid, unit.key.addr) {
                        Ok(link) => unit.links.push(link),
                        // The thread exited meanwhile.
                        Err(_) if !std::path::Path::new(&format!("/proc/{}/task/{tid}", p.pid)).exists() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                done.insert(tid);
            }
        }
        self.threads = done.len();
        Ok(())
    }

    /// Arms `targets` too, next to what is armed; on failure what it armed
    /// is disarmed again.
    pub fn arm_more<'a>(
        &mut self,
        probes: &mut Probes,
        process: &PythonProcess,
        targets: impl IntoIterator<Item = (&'a Target, u32)>,
    ) -> Result<(), CannotWatch> {
        let targets: Vec<_> = targets.into_iter().collect();
        let ids: Vec<u32> = targets.iter().map(|(_, id)| *id).collect();
        let result = plan(process, targets).and_then(|starts| self.arm_starts(probes, process, starts));
        if result.is_err() {
            for id in ids {
                self.disarm_target(probes, id);
            }
        }
        result
    }

    /// Watched units.
    pub fn units(&self) -> usize {
        self.units.len()
    }

    /// Whether `code`'s unit is under a watchpoint.
    pub fn watches_code(&self, code: u64) -> bool {
        self.units.iter().any(|u| u.code == code)
    }

    /// How many targets are under a watchpoint.
    pub fn targets(&self) -> usize {
        let mut ids: Vec<u32> = self.units.iter().map(|u| u.target).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Whether `target` is under a watchpoint.
    pub fn watches(&self, target: u32) -> bool {
        self.units.iter().any(|u| u.target == target)
    }

    /// Stops watching `target` (reachability: it was seen). Returns whether
    /// anything was armed for it.
    pub fn disarm_target(&mut self, probes: &mut Probes, target: u32) -> bool {
        let before = self.units.len();
        self.units.retain_mut(|u| {
            if u.target != target {
                return true;
            }
            disarm_unit(probes, u);
            false
        });
        self.units.len() != before
    }

    /// Disarms everything.
    pub fn disarm(&mut self, probes: &mut Probes) {
        for mut u in self.units.drain(..) {
            disarm_unit(probes, &mut u);
        }
        for key in self.reads.drain(..) {
            probes.remove_dispatch_read(&key);
        }
    }
}

/// What watching `targets` in `p` would take: each target's body starts,
/// with the target's id; or why watchpoints cannot apply (the per-call
/// strategy is then used for all of them).
pub fn plan<'a, Id: Copy>(
    p: &PythonProcess,
    targets: impl IntoIterator<Item = (&'a Target, Id)>,
) -> Result<Vec<(Id, BodyStart)>, CannotWatch> {
    let targets: Vec<_> = targets.into_iter().collect();
    // Every target has a body start at least: more targets than registers
    // never fit, and need no walk to say so.
    if targets.len() > DEBUG_REGISTERS {
        return Err(CannotWatch::TooMany(targets.len()));
    }
    let mut starts = Vec::new();
    for (t, id) in targets {
        match body::find(p, t)? {
            Found::Code { starts: s } => starts.extend(s.into_iter().map(|s| (id, s))),
            Found::Nothing { reason, later } => {
                return Err(CannotWatch::NotFound { target: t.to_string(), reason, later });
            }
        }
    }
    if starts.len() > DEBUG_REGISTERS {
        return Err(CannotWatch::TooMany(starts.len()));
    }
    if p.analysis.dispatch.is_none() {
        return Err(CannotWatch::NoDispatch);
    }
    Ok(starts)
}

fn disarm_unit(probes: &mut Probes, u: &mut Unit) {
    for link in u.links.drain(..) {
        probes.detach_watch(link);
    }
    probes.remove_watch(&u.key, u.code);
}

fn tasks(pid: u32) -> Result<Vec<u32>, crate::pyproc::ProcessError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| crate::pyproc::ProcessError::io(pid, e))?;
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}
