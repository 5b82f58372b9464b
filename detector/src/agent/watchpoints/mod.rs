//! The watch strategy for one process: hardware watchpoints on target body
//! starts, on every thread, instead of per-call uprobes, so calls of every
//! other function pass no probe.
//!
//! A target is in one of three states here:
//! - *armed*: its body starts are known (a unit each) and the kernel counts
//!   a trap at one as a start. x86 gives each thread four debug registers:
//!   up to four units are watched all the time; beyond that (reachability
//!   only, where a miss delays a report but never falsifies a count) the
//!   registers rotate over the units, [`ROTATION_SLICE`] each;
//! - *pending*: its module is not imported yet, or its definition not made:
//!   it costs nothing. A probe on module execution (`PyEval_EvalCode`,
//!   once per import, held by the caller while anything is pending) reports
//!   each module body before it runs, and its targets' code objects, already
//!   in the module's `co_consts`, are armed at once;
//! - *refused*: a body start that cannot be told from other reads (3.10's
//!   shared bytecode, a loop back to the first instruction): the caller
//!   probes the process per call instead.

mod looks;
mod plan;
mod register;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use detector_common::{WatchEntry, WatchKey};
use tracing::debug;

pub use plan::plan;
use register::Register;

use crate::{
    bpf::{BpfError, Probes},
    pyproc::{PythonProcess, body::BodyStart, mem::ProcessMemory, objects::Objects, warmup},
    targets::Target,
};

/// Debug registers per x86 thread.
pub const DEBUG_REGISTERS: usize = 4;

/// How long each group of units holds the registers when a process has more
/// unreached body starts than registers.
pub const ROTATION_SLICE: Duration = Duration::from_millis(100);

/// How often the code objects' warm-up marks are read (reachability): a
/// body that ran while no register watched it is reported at most this
/// long after, plus one tick.
pub const MARKS_EVERY: Duration = Duration::from_millis(100);

/// When a module body ran and some of its targets were not found in it
/// (its code object may be gone before it is read: a short body ends long
/// before the agent can look), `sys.modules` is looked at again after
/// these delays: at once (the next tick), and once the body has surely
/// made its functions.
const RECHECKS: [Duration; 3] = [Duration::ZERO, Duration::from_millis(100), Duration::from_secs(1)];

/// How many body starts a process may have watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// At most one per debug register, watched all the time: exact counts.
    Registers,
    /// Any number, sharing the registers over time: reachability, where a
    /// target needs to be seen once.
    Rotate,
}

/// Why a process cannot be watched with watchpoints.
#[derive(Debug, thiserror::Error)]
pub enum CannotWatch {
    /// A target's body start cannot be told from other reads.
    #[error("{target}: {reason}")]
    Refused {
        /// The target.
        target: String,
        /// Why.
        reason: String,
    },
    /// The loads that dispatch a code unit were not found in the binary.
    #[error(
        "the evaluation loop's opcode dispatch is not known well enough to tell starts from other reads \
         (`detector inspect` says why)"
    )]
    NoDispatch,
    /// Each thread of a free-threaded build runs its own copy of a body's
    /// bytecode, made when it first runs it.
    #[error(
        "free-threaded build: each thread runs its own copy of a function's bytecode, and a watchpoint on one copy \
         does not see calls made from another"
    )]
    ThreadLocalBytecode,
    /// More body starts than debug registers, and counts must be exact.
    #[error(
        "{0} body starts to watch and {DEBUG_REGISTERS} debug registers per thread (exact counts cannot share them)"
    )]
    TooMany(usize),
    /// Watchpoints are not to be used in this process again.
    #[error("{0}")]
    Forbidden(String),
    /// Reading the process failed.
    #[error(transparent)]
    Process(#[from] crate::pyproc::ProcessError),
    /// The kernel refused (a thread without a free debug register among them).
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// The loads that dispatch a code unit in `p`'s interpreter, if a
/// watchpoint on a body's start can tell its start there.
fn dispatch_of(p: &PythonProcess) -> Result<&crate::interp::dispatch::DispatchReads, CannotWatch> {
    if p.analysis.flavour == crate::interp::version::Flavour::FreeThreaded {
        return Err(CannotWatch::ThreadLocalBytecode);
    }
    p.analysis.dispatch.as_ref().ok_or(CannotWatch::NoDispatch)
}

/// One known body start: its target and code object, and what the kernel
/// has at its address.
struct Unit {
    target: u32,
    code: u64,
    key: WatchKey,
    entry: WatchEntry,
    /// The code object's warm-up mark, where its version leaves one.
    mark: Option<warmup::Watched>,
    /// When it was armed.
    armed_at: Instant,
}

/// When a unit's code object was made, as far as the agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Made {
    /// Before the attach, or unknown: its mark may show runs from before.
    BeforeAttach,
    /// After the attach (its module was not imported then).
    AfterAttach,
}

/// The watchpoints of one process, and its targets not found yet.
pub struct Armed {
    units: Vec<Unit>,
    registers: Vec<Register>,
    reads: Vec<WatchKey>,
    pending: BTreeMap<u32, String>,
    fit: Fit,
    /// Index of the unit the first register watches.
    cursor: usize,
    rotated: Instant,
    /// Rotations so far.
    pub rotations: u64,
    /// When to look in `sys.modules` again for targets of a module body
    /// that ran ([`RECHECKS`] after it).
    rechecks: Vec<Instant>,
    /// How many modules `sys.modules` held at the last rescan.
    modules_seen: Option<i64>,
    /// Threads armed.
    pub threads: usize,
    /// Units whose marks showed a run, as (target, code): reported once a
    /// drain of the ring buffer has shown the code object was not freed
    /// (its memory reused) before the read.
    suspects: Vec<(u32, u64)>,
    /// When the marks were last read.
    marked: Instant,
}

impl Armed {
    /// Watches every found target's body start in `process` and keeps the
    /// others pending, or arms nothing.
    pub fn arm<'a>(
        probes: &mut Probes,
        process: &PythonProcess,
        targets: impl IntoIterator<Item = (&'a Target, u32)>,
        fit: Fit,
    ) -> Result<Armed, CannotWatch> {
        let mut armed = Armed::empty(fit);
        let result = plan(process, targets, fit).and_then(|plan| {
            armed.pending = plan.pending;
            // Now, not when a pending target is found: its module body is
            // running then, and every microsecond is a call that may be missed.
            armed.mark_dispatch_reads(probes, process)?;
            armed.add_units(probes, process, plan.starts, Made::BeforeAttach)
        });
        match result {
            Ok(()) => Ok(armed),
            Err(e) => {
                armed.disarm(probes);
                Err(e)
            }
        }
    }

    fn empty(fit: Fit) -> Armed {
        Armed {
            units: Vec::new(),
            registers: Vec::new(),
            reads: Vec::new(),
            pending: BTreeMap::new(),
            fit,
            cursor: 0,
            rotated: Instant::now(),
            rotations: 0,
            rechecks: Vec::new(),
            modules_seen: None,
            threads: 0,
            suspects: Vec::new(),
            marked: Instant::now(),
        }
    }

    /// Tells the kernel about `starts` and gives them registers (or a turn
    /// on them).
    fn add_units(
        &mut self,
        probes: &mut Probes,
        p: &PythonProcess,
        starts: Vec<(u32, BodyStart)>,
        made: Made,
    ) -> Result<(), CannotWatch> {
        // Body starts already armed (found again by a later look) are not new.
        let mut starts = starts;
        let mut seen = BTreeSet::new();
        starts.retain(|(_, s)| !self.units.iter().any(|u| u.code == s.code) && seen.insert(s.code));
        let total = self.units.len() + starts.len();
        if self.fit == Fit::Registers && total > DEBUG_REGISTERS {
            return Err(CannotWatch::TooMany(total));
        }
        if starts.is_empty() {
            return Ok(());
        }
        self.mark_dispatch_reads(probes, p)?;
        let layout = probes.layout_id(&p.analysis.layout)?;
        let slot = probes.slot(p.pid)?;
        let mem = ProcessMemory::open(p.pid)?;
        let objs = Objects::of(p, &mem);
        let runtime = p.runtime().unwrap_or(0);
        let mut new = Vec::new();
        for (target, s) in starts {
            let key = WatchKey { tgid: p.pid, _pad: 0, addr: s.unit_addr };
            // What is there now: a trap that finds it is a read, a start. A
            // unit that cannot be read (its code object freed and its memory
            // returned) is looked for again, like one freed and reused.
            let Ok(last_op) = mem.u8(s.unit_addr) else {
                self.recheck();
                continue;
            };
            let entry = WatchEntry { code: s.code, target, layout, last_op, reported: 0, slot, _pad: [0; 4], runtime };
            probes.set_watch(key, entry)?;
            // Its deallocation is reported from now on; one before is seen here.
            if !s.still_there(&objs) {
                debug!(pid = p.pid, target, code = s.code, "a code object found was freed before it was watched");
                probes.remove_watch(&key, s.code);
                self.recheck();
                continue;
            }
            let mark = self.start_mark(p, &mem, &s, target, made);
            new.push(Unit { target, code: s.code, key, entry, mark, armed_at: Instant::now() });
        }
        // New units take the next turn: a module's functions are often
        // called while the code that imported it sets up.
        let at = if self.units.is_empty() { 0 } else { self.cursor % self.units.len() };
        self.units.splice(at..at, new);
        self.rotated = Instant::now();
        self.assign(probes, p.pid, &mem)
    }

    /// Starts reading `s`'s warm-up mark. Code made after the attach whose
    /// mark shows it ran already ran in this process since the attach
    /// (before the agent could look): a suspect at once.
    fn start_mark(
        &mut self,
        p: &PythonProcess,
        mem: &ProcessMemory,
        s: &BodyStart,
        target: u32,
        made: Made,
    ) -> Option<warmup::Watched> {
        match warmup::Watched::start(p, mem, s) {
            Ok(Some((mark, ran))) => {
                if made == Made::AfterAttach && ran == Some(true) && self.fit == Fit::Rotate {
                    self.suspects.push((target, s.code));
                }
                Some(mark)
            }
            Ok(None) => None,
            Err(e) => {
                debug!(pid = p.pid, code = s.code, error = %e, "cannot read a warm-up mark");
                None
            }
        }
    }

    /// Targets whose bodies ran while no register may have watched them,
    /// as their code objects' warm-up marks show (reachability). Marks are
    /// read every [`MARKS_EVERY`]; what they show is returned at the next
    /// call, after the caller drained the ring buffer, and only for units
    /// still armed: a code object freed before the read (its memory
    /// reused, its bytes changed for reasons of their own) is gone by then.
    /// Returns (target, code object) pairs, one per target.
    pub fn marks_ran(&mut self, pid: u32, now: Instant) -> Vec<(u32, u64)> {
        let mut ran: Vec<(u32, u64)> = Vec::new();
        for (target, code) in std::mem::take(&mut self.suspects) {
            if self.units.iter().any(|u| u.code == code && u.target == target) && !ran.iter().any(|r| r.0 == target) {
                ran.push((target, code));
            }
        }
        if self.fit != Fit::Rotate || now.duration_since(self.marked) < MARKS_EVERY {
            return ran;
        }
        self.marked = now;
        // Units under a register too: one may have got it after the call.
        let (ids, mut marks): (Vec<(u32, u64)>, Vec<&mut warmup::Watched>) =
            self.units.iter_mut().filter_map(|u| Some(((u.target, u.code), u.mark.as_mut()?))).unzip();
        if marks.is_empty() {
            return ran;
        }
        let Ok(mem) = ProcessMemory::open(pid) else { return ran };
        for (id, shown) in ids.into_iter().zip(warmup::ran_all(&mem, &mut marks)) {
            if shown == Some(true) {
                self.suspects.push(id);
            }
        }
        ran
    }

    /// The warm-up mark of the unit at `addr` of `code`, if it was armed
    /// before `before`.
    pub(crate) fn mark_armed_before(&self, code: u64, addr: u64, before: Instant) -> Option<&warmup::Watched> {
        let u = self.units.iter().find(|u| u.code == code && u.key.addr == addr && u.armed_at < before)?;
        u.mark.as_ref()
    }

    /// Tells the kernel, once, which loads of the process dispatch a unit.
    fn mark_dispatch_reads(&mut self, probes: &mut Probes, p: &PythonProcess) -> Result<(), CannotWatch> {
        let dispatch = dispatch_of(p)?;
        if self.reads.is_empty() {
            for end in &dispatch.ends {
                let key = WatchKey { tgid: p.pid, _pad: 0, addr: end + p.bias };
                probes.set_dispatch_read(key)?;
                self.reads.push(key);
            }
        }
        Ok(())
    }

    /// Points the registers at the units whose turn it is: all of them when
    /// they fit, else the [`DEBUG_REGISTERS`] from the cursor on. A register
    /// already on one of them stays; the others move to the rest. Two
    /// registers are never on one address, even between two moves: each
    /// would trap, and one start would count twice.
    fn assign(&mut self, probes: &mut Probes, pid: u32, mem: &ProcessMemory) -> Result<(), CannotWatch> {
        let n = self.units.len();
        if n == 0 {
            self.registers.clear();
            self.cursor = 0;
            return Ok(());
        }
        self.cursor %= n;
        let mut turn: Vec<usize> = Vec::with_capacity(DEBUG_REGISTERS);
        for u in (0..n).map(|i| (self.cursor + i) % n) {
            if turn.len() == DEBUG_REGISTERS {
                break;
            }
            if !turn.iter().any(|&t| self.units[t].key.addr == self.units[u].key.addr) {
                turn.push(u);
            }
        }
        let on: Vec<u64> = self.registers.iter().map(|r| r.addr).collect();
        let addrs: Vec<u64> = turn.iter().map(|&u| self.units[u].key.addr).collect();
        let moves = register::reassign(&on, &addrs);
        let mut old: Vec<Option<Register>> = std::mem::take(&mut self.registers).into_iter().map(Some).collect();
        self.registers = moves.kept.iter().filter_map(|&i| old[i].take()).collect();
        for (from, addr) in moves.moves {
            let u = turn[addrs.iter().position(|a| *a == addr).expect("a move goes to a unit whose turn it is")];
            // It may have been rewritten while no register watched it.
            if let Ok(op) = mem.u8(addr)
                && op != self.units[u].entry.last_op
            {
                self.units[u].entry.last_op = op;
                probes.set_watch(self.units[u].key, self.units[u].entry)?;
            }
            let r = match from.and_then(|i| old[i].take()) {
                Some(mut r) => {
                    r.move_to(addr);
                    r
                }
                None => Register::arm(probes, pid, addr)?,
            };
            self.threads = self.threads.max(r.threads.len());
            self.registers.push(r);
        }
        Ok(())
    }

    /// Gives the next units their turn if a slice is over; returns whether
    /// it rotated.
    pub fn rotate(&mut self, probes: &mut Probes, pid: u32, now: Instant) -> bool {
        if !self.rotating() || now.duration_since(self.rotated) < ROTATION_SLICE {
            return false;
        }
        self.rotated = now;
        self.cursor = (self.cursor + self.registers.len()) % self.units.len();
        self.rotations += 1;
        let Ok(mem) = ProcessMemory::open(pid) else { return false };
        if let Err(e) = self.assign(probes, pid, &mem) {
            debug!(pid, error = %e, "rotating watchpoints");
        }
        true
    }

    /// Lets more body starts than registers share them over time from now
    /// on (the process moved to reachability).
    pub fn allow_rotation(&mut self) {
        self.fit = Fit::Rotate;
    }

    /// Whether the registers are shared over time.
    pub fn rotating(&self) -> bool {
        self.units.len() > self.registers.len() && !self.registers.is_empty()
    }

    /// Targets not found yet.
    pub fn pending(&self) -> &BTreeMap<u32, String> {
        &self.pending
    }

    /// Targets not reached: pending, or armed. A module body that runs may
    /// define any of them anew (an interpreter of its own importing it, a
    /// reload).
    fn unreached(&self) -> BTreeSet<u32> {
        self.pending.keys().copied().chain(self.units.iter().map(|u| u.target)).collect()
    }

    /// Whether module bodies are to be reported: a target is not reached.
    pub fn follows_imports(&self) -> bool {
        !self.pending.is_empty() || !self.units.is_empty()
    }

    /// Arms `targets` too (reachability's samples of reached targets); on
    /// failure what it armed is disarmed again.
    pub fn arm_more<'a>(
        &mut self,
        probes: &mut Probes,
        process: &PythonProcess,
        targets: impl IntoIterator<Item = (&'a Target, u32)>,
    ) -> Result<(), CannotWatch> {
        let targets: Vec<_> = targets.into_iter().collect();
        let ids: Vec<u32> = targets.iter().map(|(_, id)| *id).collect();
        let result = plan(process, targets, Fit::Rotate)
            .and_then(|plan| self.add_units(probes, process, plan.starts, Made::BeforeAttach));
        if result.is_err() {
            for id in ids {
                self.disarm_target(probes, process.pid, id);
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

    /// The code objects `target` is watched in, in the order armed.
    pub fn code_objects(&self, target: u32) -> Vec<u64> {
        self.units.iter().filter(|u| u.target == target).map(|u| u.code).collect()
    }

    /// How many targets are under a watchpoint.
    pub fn targets(&self) -> usize {
        self.units.iter().map(|u| u.target).collect::<BTreeSet<_>>().len()
    }

    /// Whether `target` is under a watchpoint.
    pub fn watches(&self, target: u32) -> bool {
        self.units.iter().any(|u| u.target == target)
    }

    /// Stops watching `target` (reachability: it was seen; or it is no
    /// longer a target). Returns whether anything was armed for it.
    pub fn disarm_target(&mut self, probes: &mut Probes, pid: u32, target: u32) -> bool {
        self.pending.remove(&target);
        let before = self.units.len();
        self.units.retain(|u| {
            if u.target != target {
                return true;
            }
            probes.remove_watch(&u.key, u.code);
            false
        });
        if self.units.len() == before {
            return false;
        }
        // Its registers go to the next units waiting for a turn.
        if let Ok(mem) = ProcessMemory::open(pid)
            && let Err(e) = self.assign(probes, pid, &mem)
        {
            debug!(pid, target, error = %e, "giving a disarmed target's registers to others");
        }
        true
    }

    /// Disarms everything.
    pub fn disarm(&mut self, probes: &mut Probes) {
        self.registers.clear();
        for u in self.units.drain(..) {
            probes.remove_watch(&u.key, u.code);
        }
        for key in self.reads.drain(..) {
            probes.remove_dispatch_read(&key);
        }
    }
}
