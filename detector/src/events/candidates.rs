//! 3.8-3.10 candidates: starts of code objects whose `co_name` is a
//! target's, but whose module and class the kernel cannot tell. Each code
//! object is resolved once, by a walk of its process off the agent loop
//! ([`resolve`]); until then the kernel counts its starts exactly and its
//! start events wait here, a bounded number per process. A resolution lives
//! as long as the kernel's entry of the code object's starts: until it is
//! folded into user space's counts a little after the kernel was told, or
//! handed over as the code object is deallocated.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    time::Duration,
};

use detector_common::CO_RESUMABLE;

use crate::{
    bpf::PendingHits,
    pyproc::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects, qualname},
    targets::Target,
};

/// Starts held per process while their code objects are resolved; the
/// kernel still counts the rest, only their lines are not printed.
const MAX_HELD_PER_PROCESS: usize = 1024;

/// Code objects awaiting resolution per process; more are asked about
/// again later (the kernel keeps their counts meanwhile).
const MAX_WAITING_PER_PROCESS: usize = 256;

/// How long after the kernel was told a resolution its entry is folded: a
/// probe that read the code object's verdict just before adds to the entry
/// within microseconds.
pub const FOLD_AFTER: Duration = Duration::from_millis(250);

/// A code object of a process, in a generation of the targets.
pub type Key = (u32, u32, u64);

/// A code object to resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// Process.
    pub pid: u32,
    /// Generation of the targets the kernel counted it in.
    pub generation: u32,
    /// Code object.
    pub code: u64,
    /// Its `co_name`.
    pub name: u64,
    /// The globals it started with.
    pub globals: u64,
    /// Which wait for the code object it is: a resolution made for an
    /// earlier code object at the same address is not this one's.
    pub id: u64,
}

impl Ask {
    /// Its code object's key.
    pub fn key(&self) -> Key {
        (self.pid, self.generation, self.code)
    }
}

/// What a resolution found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The target the code object is, if any.
    pub target: Option<u32>,
    /// A generator or coroutine: its frame is entered again on each resume.
    pub resumable: bool,
    /// `co_filename`, if it could be read.
    pub filename: Option<String>,
    /// `co_firstlineno`, if it could be read.
    pub lineno: Option<u32>,
}

/// A start waiting for its code object's resolution: (thread, time).
pub type Start = (u32, u64);

/// What is known of a code object a start was of.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Resolved to the target, if any; `retell` if the start came after
    /// the kernel was told (its verdict was evicted since).
    Resolved { target: Option<u32>, retell: bool },
    /// Waiting for its resolution.
    Waiting,
}

/// A code object's resolution, and when the kernel was told it.
#[derive(Clone, Copy, Debug)]
struct Resolved {
    target: Option<u32>,
    /// `None` until the kernel is told.
    told_ns: Option<u64>,
}

/// A code object waiting for its resolution.
struct Waiting {
    id: u64,
    starts: Vec<Start>,
}

/// Candidates resolved, and those waiting with their starts.
#[derive(Default)]
pub struct Candidates {
    resolutions: HashMap<Key, Resolved>,
    waiting: HashMap<Key, Waiting>,
    /// Per process: code objects waiting, and starts held.
    per_process: HashMap<u32, (usize, usize)>,
    asks: Vec<Ask>,
    /// Resolutions told to the kernel, in order: folded once due.
    folding: VecDeque<(Key, u64)>,
    next_id: u64,
    /// Starts whose lines were not kept (their counts are).
    unheld: u64,
    /// Times a code object was not asked about because its process had
    /// too many waiting.
    deferred: u64,
}

impl Candidates {
    /// The resolution of `key`, if made.
    pub fn resolution(&self, key: Key) -> Option<Option<u32>> {
        self.resolutions.get(&key).map(|r| r.target)
    }

    /// A start of `ask`'s code object at `start`: its resolution, or it
    /// waits for one (held within its process's bound, asked about once).
    pub fn seen(&mut self, ask: Ask, start: Start) -> Seen {
        if let Some(r) = self.resolutions.get(&ask.key()) {
            let retell = r.told_ns.is_some_and(|told| start.1 > told);
            return Seen::Resolved { target: r.target, retell };
        }
        self.wait(ask, start);
        Seen::Waiting
    }

    fn wait(&mut self, ask: Ask, start: Start) {
        if !self.enter(ask) {
            self.unheld += 1;
            return;
        }
        let per = self.per_process.entry(ask.pid).or_default();
        match self.waiting.get_mut(&ask.key()) {
            Some(waiting) if per.1 < MAX_HELD_PER_PROCESS => {
                per.1 += 1;
                waiting.starts.push(start);
            }
            _ => self.unheld += 1,
        }
    }

    /// Waits for `ask`'s code object, asking about it if it is new; false
    /// if its process has too many waiting already.
    fn enter(&mut self, ask: Ask) -> bool {
        let per = self.per_process.entry(ask.pid).or_default();
        match self.waiting.entry(ask.key()) {
            Entry::Occupied(_) => true,
            Entry::Vacant(_) if per.0 >= MAX_WAITING_PER_PROCESS => {
                self.deferred += 1;
                false
            }
            Entry::Vacant(e) => {
                per.0 += 1;
                self.next_id += 1;
                self.asks.push(Ask { id: self.next_id, ..ask });
                e.insert(Waiting { id: self.next_id, starts: Vec::new() });
                true
            }
        }
    }

    /// Asks about every pending code object of the kernel's neither
    /// resolved nor waiting: one whose ask found no room, whose start
    /// event the full ring buffer dropped, or whose resolution failed.
    pub fn ask_unresolved(&mut self, pending: &[(u32, PendingHits)]) {
        for (pid, p) in pending {
            let key = (*pid, p.generation, p.code);
            if !self.resolutions.contains_key(&key) && !self.waiting.contains_key(&key) {
                self.enter(Ask {
                    pid: *pid,
                    generation: p.generation,
                    code: p.code,
                    name: p.name,
                    globals: p.globals,
                    id: 0,
                });
            }
        }
    }

    /// Every one of `pending` not resolved, waiting or not, each waited
    /// for now (within its process's bound), to resolve on the spot.
    pub fn unresolved(&mut self, pending: &[(u32, PendingHits)]) -> Vec<Ask> {
        self.ask_unresolved(pending);
        self.asks.clear();
        let waiting = pending.iter().filter_map(|(pid, p)| {
            let key = (*pid, p.generation, p.code);
            let w = self.waiting.get(&key).filter(|_| !self.resolutions.contains_key(&key))?;
            Some(Ask { pid: *pid, generation: p.generation, code: p.code, name: p.name, globals: p.globals, id: w.id })
        });
        waiting.collect()
    }

    /// Asks about `asks` again (a walk left them for the next turn).
    pub fn requeue(&mut self, asks: Vec<Ask>) {
        self.asks.extend(asks);
    }

    /// The code objects to resolve since the last call.
    pub fn take_asks(&mut self) -> Vec<Ask> {
        std::mem::take(&mut self.asks)
    }

    /// An ask that could not be queued, or whose walk failed: asked again
    /// by the next [`Candidates::ask_unresolved`], its held starts dropped.
    pub fn refused(&mut self, ask: Ask) {
        if let Some(starts) = self.leave(ask) {
            self.unheld += starts.len() as u64;
        }
    }

    /// Records what resolving `ask` found (a failure, `None`, is not kept:
    /// the code object is asked about again) and returns the starts that
    /// waited for it; `None` if it is no longer waited for (its code object
    /// was deallocated, or its process forgotten).
    pub fn resolved(&mut self, ask: Ask, target: Option<Option<u32>>) -> Option<Vec<Start>> {
        let starts = self.leave(ask)?;
        match target {
            Some(target) => {
                self.resolutions.insert(ask.key(), Resolved { target, told_ns: None });
            }
            None => self.unheld += starts.len() as u64,
        }
        Some(if target.is_some() { starts } else { Vec::new() })
    }

    /// The kernel was told `key`'s resolution at `at_ns`: its entry is
    /// folded once [`FOLD_AFTER`] has passed.
    pub fn told(&mut self, key: Key, at_ns: u64) {
        if let Some(r) = self.resolutions.get_mut(&key) {
            r.told_ns = Some(at_ns);
            self.folding.push_back((key, at_ns));
        }
    }

    /// Resolutions told by `before`, with their targets: their entries are
    /// due to be folded.
    pub fn due(&mut self, before: u64) -> Vec<(Key, Option<u32>)> {
        let mut due = Vec::new();
        while let Some(&(key, at)) = self.folding.front().filter(|(_, at)| *at <= before) {
            self.folding.pop_front();
            // Told again since: due then.
            if let Some(r) = self.resolutions.get(&key).filter(|r| r.told_ns == Some(at)) {
                due.push((key, r.target));
            }
        }
        due
    }

    /// `key`'s entry left the kernel's map (folded, or handed over as its
    /// code object was deallocated): its resolution goes with it, which it
    /// returns. A code object still waiting loses its held starts.
    pub fn gone(&mut self, key: Key) -> Option<Option<u32>> {
        if let Some(w) = self.waiting.get(&key) {
            let ask = Ask { pid: key.0, generation: key.1, code: key.2, name: 0, globals: 0, id: w.id };
            self.refused(ask);
        }
        self.resolutions.remove(&key).map(|r| r.target)
    }

    fn leave(&mut self, ask: Ask) -> Option<Vec<Start>> {
        let Entry::Occupied(e) = self.waiting.entry(ask.key()) else { return None };
        if e.get().id != ask.id {
            return None;
        }
        let starts = e.remove().starts;
        if let Some(per) = self.per_process.get_mut(&ask.pid) {
            per.0 = per.0.saturating_sub(1);
            per.1 = per.1.saturating_sub(starts.len());
        }
        Some(starts)
    }

    /// Starts whose lines were not kept, and times a code object was not
    /// asked about because its process had too many waiting.
    pub fn capped(&self) -> (u64, u64) {
        (self.unheld, self.deferred)
    }

    /// Forgets everything about `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.resolutions.retain(|(p, _, _), _| *p != pid);
        self.waiting.retain(|(p, _, _), _| *p != pid);
        self.asks.retain(|a| a.pid != pid);
        self.folding.retain(|((p, _, _), _)| *p != pid);
        self.per_process.remove(&pid);
    }
}

/// Resolves `ask` in `p`, reading through `mem`: which of `targets` (with
/// their ids) its code object is, with the code object's file and line.
pub fn resolve(
    p: &PythonProcess,
    mem: &ProcessMemory,
    ask: &Ask,
    targets: &[(u32, Target)],
) -> Result<Resolution, ProcessError> {
    let objs = Objects::of(p, mem);
    let co_name = objs.str(ask.name)?;
    let candidates: Vec<(u32, &Target)> =
        targets.iter().filter(|(_, t)| t.name() == co_name).map(|(id, t)| (*id, t)).collect();
    let target = qualname::resolve(&objs, ask.code, ask.globals, &candidates)?;
    let o = &p.analysis.table.values;
    let flags = mem.u32(ask.code + o.code_flags as u64)?;
    let filename = mem.ptr(ask.code, o.code_filename).and_then(|f| objs.str(f)).ok();
    let lineno = mem.u32(ask.code + o.code_firstlineno as u64).ok();
    Ok(Resolution { target, resumable: flags & CO_RESUMABLE != 0, filename, lineno })
}

#[cfg(test)]
#[path = "candidates_tests.rs"]
mod tests;
