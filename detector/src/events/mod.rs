//! From ring-buffer records to hits: attaches file and line to each hit,
//! holds 3.8-3.10 candidates until a walk off the loop resolves them, and
//! computes exact per-target totals from the kernel's counters.

pub mod candidates;
pub mod output;
pub mod record;

use std::collections::{BTreeMap, HashMap};

use candidates::{Ask, Candidates, Resolution};
use detector_common::TARGET_NONE;
use tracing::{debug, warn};

use crate::{
    bpf::{PendingHits, Probes},
    pyproc::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects},
    targets::{Target, TargetSet},
};
use record::Record;

/// Entries kept in each user-space cache before it starts over.
const MAX_CACHE: usize = 1 << 16;

/// How long after its resolution a pending entry is folded: a probe that
/// read the code object's verdict just before it was told adds to the
/// entry within microseconds.
const FOLD_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A hit, ready to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// The target that started.
    pub target: Target,
    /// `co_filename`, when known.
    pub filename: Option<String>,
    /// `co_firstlineno`, when known.
    pub lineno: Option<u32>,
    /// Kernel monotonic time of the start (of the look, for a warm-up mark).
    pub ts_ns: u64,
    /// How it was seen.
    pub seen_by: SeenBy,
}

/// How a hit was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeenBy {
    /// A probe or watchpoint, as the body started.
    Probe,
    /// The code object's warm-up mark, read by the agent after the body
    /// ran: no thread, and the time is the look's.
    WarmupMark,
}

#[derive(Clone, Debug)]
struct CodeInfo {
    filename: Option<String>,
    lineno: Option<u32>,
}

/// Turns records into hits for a set of watched processes.
#[derive(Default)]
pub struct EventProcessor {
    code_info: HashMap<(u32, u64), CodeInfo>,
    /// 3.8-3.10 code objects resolved, and those waiting.
    pub candidates: Candidates,
    /// Hits of pending entries folded out of the kernel's map, by process
    /// and target.
    folded: HashMap<(u32, u32), u64>,
}

/// What the processor needs to know about the watched processes.
pub trait ProcessLookup {
    /// The process `pid`, if watched.
    fn process(&self, pid: u32) -> Option<&PythonProcess>;
}

impl EventProcessor {
    /// The hit a hit-related record makes, if any (a code object's file
    /// and line are kept for the hits that follow; a candidate not resolved
    /// yet waits for its resolution; other records are the caller's).
    pub fn hit(&mut self, rec: Record, targets: &TargetSet, procs: &impl ProcessLookup) -> Option<Hit> {
        match rec {
            Record::Code { pid, code, filename, lineno } => {
                bounded_insert(&mut self.code_info, (pid, code), CodeInfo { filename, lineno: Some(lineno) });
                None
            }
            Record::Hit(h) => {
                Some(self.probe_hit(h.header.tgid, h.tid, h.code, h.ts_ns, targets.get(h.target)?, procs))
            }
            Record::Candidate(c) => {
                let pid = c.header.tgid;
                let ask = Ask { pid, generation: c.generation, code: c.code, name: c.name, globals: c.globals };
                match self.candidates.resolution_at((pid, c.generation, c.code), c.ts_ns) {
                    Some(id) => Some(self.probe_hit(pid, c.tid, c.code, c.ts_ns, targets.get(id?)?, procs)),
                    None => {
                        self.candidates.wait(ask, (c.tid, c.ts_ns));
                        None
                    }
                }
            }
            Record::Exec { .. } | Record::Fork { .. } | Record::WatchFreed { .. } | Record::ModuleExec(_) => None,
        }
    }

    /// Records what resolving `ask` found, tells the kernel (so later
    /// starts of the code object count directly), and returns the hits of
    /// the starts that waited for it. A failure is kept only when the walk
    /// ran out of budget: the kernel then stops asking about it.
    pub fn resolved(
        &mut self,
        ask: Ask,
        result: Result<Resolution, ProcessError>,
        probes: &mut Probes,
        targets: &TargetSet,
    ) -> Vec<Hit> {
        let (target, resumable) = match result {
            Ok(r) => {
                let info = CodeInfo { filename: r.filename, lineno: r.lineno };
                bounded_insert(&mut self.code_info, (ask.pid, ask.code), info);
                (r.target, r.resumable)
            }
            Err(e @ ProcessError::OverBudget { .. }) => {
                warn!(pid = ask.pid, code = ask.code, error = %e, "cannot resolve a candidate: its starts are not counted");
                (None, false)
            }
            Err(e) => {
                // Most likely the process exited; its pending starts cannot
                // be attributed, and the summary says so through the counters.
                debug!(pid = ask.pid, code = ask.code, error = %e, "cannot resolve candidate");
                self.candidates.resolved(ask, None, 0);
                return Vec::new();
            }
        };
        // Before the kernel is told: a start stamped later is of a code
        // object the kernel forgot since.
        let starts = self.candidates.resolved(ask, Some(target), monotonic_ns());
        if ask.generation == probes.generation()
            && let Err(e) =
                probes.set_verdict(ask.pid, ask.code, ask.generation, target.unwrap_or(TARGET_NONE), resumable)
        {
            warn!(pid = ask.pid, error = %e, "cannot store verdict");
        }
        let Some(target) = target.and_then(|id| targets.get(id)) else { return Vec::new() };
        starts.into_iter().map(|(tid, ts_ns)| self.probe_hit(ask.pid, tid, ask.code, ts_ns, target, &())).collect()
    }

    /// A start of `code`, the code of `target`, seen by a probe.
    fn probe_hit(
        &mut self,
        pid: u32,
        tid: u32,
        code: u64,
        ts_ns: u64,
        target: &Target,
        procs: &impl ProcessLookup,
    ) -> Hit {
        let info = self.info(pid, code, procs);
        let (filename, lineno) = (info.filename, info.lineno);
        Hit { pid, tid, target: target.clone(), filename, lineno, ts_ns, seen_by: SeenBy::Probe }
    }

    /// File and line of a code object: from the kernel's record or a
    /// resolution, else read from the process (which may be gone: then
    /// unknown).
    fn info(&mut self, pid: u32, code: u64, procs: &impl ProcessLookup) -> CodeInfo {
        if let Some(i) = self.code_info.get(&(pid, code)) {
            return i.clone();
        }
        let info = procs
            .process(pid)
            .and_then(|p| read_code_info(p, code).ok())
            .unwrap_or(CodeInfo { filename: None, lineno: None });
        bounded_insert(&mut self.code_info, (pid, code), info.clone());
        info
    }

    /// A hit of `target` in `pid` seen from `code`'s warm-up mark at `ts_ns`.
    pub fn marked_hit(&mut self, pid: u32, target: &Target, code: u64, ts_ns: u64, procs: &impl ProcessLookup) -> Hit {
        Hit { tid: 0, seen_by: SeenBy::WarmupMark, ..self.probe_hit(pid, 0, code, ts_ns, target, procs) }
    }

    /// Exact hits per target id in process `pid`: the kernel's counters plus
    /// 3.8-3.10 starts counted before their code object was resolved (those
    /// of code objects not resolved are not any target's yet).
    pub fn totals(&mut self, pid: u32, probes: &Probes, targets: &TargetSet) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = targets.iter().map(|(_, id)| (id, probes.count(pid, id))).collect();
        let pending: Vec<_> = probes.pending(pid).into_iter().map(|p| (pid, p)).collect();
        self.add_pending(&mut out, &pending, |p| p == pid);
        out
    }

    /// Exact hits per target id summed over every process, reading each map
    /// once (for the metrics). Pending entries resolved a while ago are
    /// folded into the processor's counts, which frees their room in the
    /// kernel's map, and code objects the kernel counted and nobody
    /// resolved yet are asked about.
    pub fn totals_all(&mut self, probes: &mut Probes, targets: &TargetSet) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = targets.iter().map(|(_, id)| (id, 0)).collect();
        for (k, n) in probes.all_counts() {
            if let Some(total) = out.get_mut(&k.target) {
                *total += n;
            }
        }
        let pending = self.fold(probes, probes.all_pending());
        self.add_pending(&mut out, &pending, |_| true);
        self.candidates.ask_unresolved(&pending);
        out
    }

    /// Folds the pending entries resolved at least [`FOLD_AFTER`] ago (no
    /// probe adds to them any more) into `folded`; returns the others.
    fn fold(&mut self, probes: &mut Probes, pending: Vec<(u32, PendingHits)>) -> Vec<(u32, PendingHits)> {
        let before = monotonic_ns().saturating_sub(FOLD_AFTER.as_nanos() as u64);
        let mut left = Vec::new();
        for (pid, p) in pending {
            let Some(target) = self.candidates.resolved_before((pid, p.generation, p.code), before) else {
                left.push((pid, p));
                continue;
            };
            if let Err(e) = probes.fold_pending(pid, &p) {
                debug!(pid, code = p.code, error = %e, "cannot fold a pending entry");
                left.push((pid, p));
                continue;
            }
            if let Some(id) = target {
                *self.folded.entry((pid, id)).or_default() += p.hits;
            }
        }
        left
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

    /// Targets `ids` were removed: their folded counts go with them.
    pub fn retire(&mut self, ids: &[u32]) {
        self.folded.retain(|(_, id), _| !ids.contains(id));
    }

    /// Forgets everything about `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.code_info.retain(|(p, _), _| *p != pid);
        self.folded.retain(|(p, _), _| *p != pid);
        self.candidates.forget(pid);
    }
}

/// No process to read from: what is not known already stays unknown.
impl ProcessLookup for () {
    fn process(&self, _: u32) -> Option<&PythonProcess> {
        None
    }
}

/// Now on the clock the kernel stamps records with.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= MAX_CACHE {
        map.clear();
    }
    map.insert(k, v);
}

fn read_code_info(p: &PythonProcess, code: u64) -> Result<CodeInfo, ProcessError> {
    let mem = ProcessMemory::open(p.pid)?;
    let o = &p.analysis.table.values;
    let objs = Objects::new(&mem, o, p.analysis.version.minor);
    let filename = objs.str(mem.ptr(code, o.code_filename)?).ok();
    let lineno = mem.u32(code + o.code_firstlineno as u64).ok();
    Ok(CodeInfo { filename, lineno })
}
