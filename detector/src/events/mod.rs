//! From ring-buffer records to hits: attaches file and line to each hit,
//! resolves 3.8-3.10 candidates, and computes exact per-target totals from
//! the kernel's counters.

pub mod output;
pub mod record;

use std::collections::{BTreeMap, HashMap};

use detector_common::{CO_RESUMABLE, TARGET_NONE};
use tracing::{debug, warn};

use crate::{
    bpf::{PendingHits, Probes},
    pyproc::{PythonProcess, mem::ProcessMemory, objects::Objects, qualname},
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
    resolutions: HashMap<(u32, u32, u64), Option<u32>>,
}

/// What the processor needs to know about the watched processes.
pub trait ProcessLookup {
    /// The process `pid`, if watched.
    fn process(&self, pid: u32) -> Option<&PythonProcess>;
}

impl EventProcessor {
    /// The hit a hit-related record makes, if any (a code object's file
    /// and line are kept for the hits that follow; other records are the
    /// caller's).
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
                let target = targets.get(h.target)?.clone();
                let info = self.info(h.header.tgid, h.code, procs);
                Some(Hit {
                    pid: h.header.tgid,
                    tid: h.tid,
                    target,
                    filename: info.filename,
                    lineno: info.lineno,
                    ts_ns: h.ts_ns,
                    seen_by: SeenBy::Probe,
                })
            }
            Record::Candidate(c) => {
                let pid = c.header.tgid;
                let id = self.resolve(pid, c.generation, c.code, c.name, c.globals, probes, targets, procs)?;
                let info = self.info(pid, c.code, procs);
                Some(Hit {
                    pid,
                    tid: c.tid,
                    target: targets.get(id)?.clone(),
                    filename: info.filename,
                    lineno: info.lineno,
                    ts_ns: c.ts_ns,
                    seen_by: SeenBy::Probe,
                })
            }
            Record::Exec { .. } | Record::Fork { .. } | Record::WatchFreed { .. } | Record::ModuleExec(_) => None,
        }
    }

    /// Resolves a 3.8-3.10 candidate (once) and tells the kernel, so later
    /// starts of the same code object count directly.
    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &mut self,
        pid: u32,
        generation: u32,
        code: u64,
        name: u64,
        globals: u64,
        probes: &mut Probes,
        targets: &TargetSet,
        procs: &impl ProcessLookup,
    ) -> Option<u32> {
        if let Some(r) = self.resolutions.get(&(pid, generation, code)) {
            return *r;
        }
        let p = procs.process(pid)?;
        let (result, resumable) = match resolve_in(p, code, name, globals, targets) {
            Ok(r) => r,
            Err(e) => {
                // Most likely the process exited; its pending hits cannot be
                // attributed, and the summary says so through the counters.
                debug!(pid, code, error = %e, "cannot resolve candidate");
                return None;
            }
        };
        bounded_insert(&mut self.resolutions, (pid, generation, code), result);
        if generation == probes.generation()
            && let Err(e) = probes.set_verdict(pid, code, generation, result.unwrap_or(TARGET_NONE), resumable)
        {
            warn!(pid, error = %e, "cannot store verdict");
        }
        result
    }

    /// File and line of a code object: from the kernel's record, else read
    /// from the process (which may be gone: then unknown).
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
        let info = self.info(pid, code, procs);
        Hit {
            pid,
            tid: 0,
            target: target.clone(),
            filename: info.filename,
            lineno: info.lineno,
            ts_ns,
            seen_by: SeenBy::WarmupMark,
        }
    }

    /// Exact hits per target id in process `pid`: the kernel's counters plus
    /// 3.8-3.10 starts counted before their code object was resolved.
    pub fn totals(
        &mut self,
        pid: u32,
        probes: &mut Probes,
        targets: &TargetSet,
        procs: &impl ProcessLookup,
    ) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = targets.iter().map(|(_, id)| (id, probes.count(pid, id))).collect();
        let pending = probes.pending(pid).into_iter().map(|p| (pid, p)).collect();
        self.add_pending(&mut out, pending, probes, targets, procs);
        out
    }

    /// Exact hits per target id summed over every process, reading each map
    /// once (for the metrics).
    pub fn totals_all(
        &mut self,
        probes: &mut Probes,
        targets: &TargetSet,
        procs: &impl ProcessLookup,
    ) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = targets.iter().map(|(_, id)| (id, 0)).collect();
        for (k, n) in probes.all_counts() {
            if let Some(total) = out.get_mut(&k.target) {
                *total += n;
            }
        }
        let pending = probes.all_pending();
        self.add_pending(&mut out, pending, probes, targets, procs);
        out
    }

    fn add_pending(
        &mut self,
        out: &mut BTreeMap<u32, u64>,
        pending: Vec<(u32, PendingHits)>,
        probes: &mut Probes,
        targets: &TargetSet,
        procs: &impl ProcessLookup,
    ) {
        for (pid, p) in pending {
            if let Some(id) = self.resolve(pid, p.generation, p.code, p.name, p.globals, probes, targets, procs)
                && let Some(n) = out.get_mut(&id)
            {
                *n += p.hits;
            }
        }
    }

    /// Forgets everything about `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.code_info.retain(|(p, _), _| *p != pid);
        self.resolutions.retain(|(p, _, _), _| *p != pid);
    }
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= MAX_CACHE {
        map.clear();
    }
    map.insert(k, v);
}

/// The target the candidate is, if any, and whether its code is resumable
/// (a generator or coroutine).
fn resolve_in(
    p: &PythonProcess,
    code: u64,
    name: u64,
    globals: u64,
    targets: &TargetSet,
) -> Result<(Option<u32>, bool), crate::pyproc::ProcessError> {
    let mem = ProcessMemory::open(p.pid)?;
    let objs = Objects::of(p, &mem);
    let co_name = objs.str(name)?;
    let candidates: Vec<(u32, &Target)> =
        targets.iter().filter(|(t, _)| t.name() == co_name).map(|(t, id)| (id, t)).collect();
    let target = qualname::resolve(&objs, code, globals, &candidates)?;
    let flags = mem.u32(code + p.analysis.table.values.code_flags as u64)?;
    Ok((target, flags & CO_RESUMABLE != 0))
}

fn read_code_info(p: &PythonProcess, code: u64) -> Result<CodeInfo, crate::pyproc::ProcessError> {
    let mem = ProcessMemory::open(p.pid)?;
    let o = &p.analysis.table.values;
    let objs = Objects::new(&mem, o, p.analysis.version.minor);
    let filename = objs.str(mem.ptr(code, o.code_filename)?).ok();
    let lineno = mem.u32(code + o.code_firstlineno as u64).ok();
    Ok(CodeInfo { filename, lineno })
}
