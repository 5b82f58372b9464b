//! From ring-buffer records to hits: attaches file and line to each hit,
//! holds 3.8-3.10 candidates until a walk off the loop resolves them, and
//! computes exact per-target totals from the kernel's counters.

pub mod candidates;
pub mod output;
mod pending;
pub mod record;

use std::collections::HashMap;

use candidates::Candidates;

use crate::{
    bpf::Probes,
    pyproc::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects},
    targets::{Target, TargetSet},
};
use record::Record;

/// Entries kept in each user-space cache before it starts over.
const MAX_CACHE: usize = 1 << 16;

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
    candidates: Candidates,
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
    pub fn hit(
        &mut self,
        rec: Record,
        probes: &mut Probes,
        targets: &TargetSet,
        procs: &impl ProcessLookup,
    ) -> Option<Hit> {
        match rec {
            Record::Code { pid, code, filename, lineno } => {
                bounded_insert(&mut self.code_info, (pid, code), CodeInfo { filename, lineno: Some(lineno) });
                None
            }
            Record::Hit(h) => {
                Some(self.probe_hit(h.header.tgid, h.tid, h.code, h.ts_ns, targets.get(h.target)?, procs))
            }
            Record::Candidate(c) => self.candidate(c, probes, targets, procs),
            Record::PendingFreed { pid, generation, code, hits } => {
                self.pending_freed((pid, generation, code), hits);
                None
            }
            Record::Exec { .. }
            | Record::Fork { .. }
            | Record::WatchFreed { .. }
            | Record::ModuleExec(_)
            | Record::Callers(_)
            | Record::TrapSignal { .. }
            | Record::Tier2 { .. } => None,
        }
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
    let objs = Objects::of(p, &mem);
    let filename = objs.str(mem.ptr(code, o.code_filename)?).ok();
    let lineno = mem.u32(code + o.code_firstlineno as u64).ok();
    Ok(CodeInfo { filename, lineno })
}
