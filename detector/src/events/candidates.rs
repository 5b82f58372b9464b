//! 3.8-3.10 candidates: starts of code objects whose `co_name` is a
//! target's, but whose module and class the kernel cannot tell. Each code
//! object is resolved once, by a walk of its process off the agent loop
//! ([`resolve`]); until then the kernel counts its starts exactly and its
//! start events wait here, a bounded number per process.

use std::collections::{HashMap, hash_map::Entry};

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

/// Entries in the resolution cache before it starts over.
const MAX_RESOLUTIONS: usize = 1 << 16;

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
}

impl Ask {
    fn key(&self) -> Key {
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

/// A code object's resolution, and when the kernel was told it.
#[derive(Clone, Copy, Debug)]
struct Resolved {
    target: Option<u32>,
    at_ns: u64,
}

/// Candidates resolved, and those waiting with their starts.
#[derive(Default)]
pub struct Candidates {
    resolutions: HashMap<Key, Resolved>,
    waiting: HashMap<Key, Vec<Start>>,
    /// Per process: code objects waiting, and starts held.
    per_process: HashMap<u32, (usize, usize)>,
    asks: Vec<Ask>,
    /// Starts whose lines were not kept (their counts are).
    pub unheld: u64,
    /// Code objects not asked about now because their process had too
    /// many waiting.
    pub deferred: u64,
}

impl Candidates {
    /// The resolution of `key`, if made.
    pub fn resolution(&self, key: Key) -> Option<Option<u32>> {
        self.resolutions.get(&key).map(|r| r.target)
    }

    /// The resolution of `key`, if the kernel was told it before `ns`.
    pub fn resolved_before(&self, key: Key, ns: u64) -> Option<Option<u32>> {
        self.resolutions.get(&key).filter(|r| r.at_ns < ns).map(|r| r.target)
    }

    /// The resolution of `key` for a start at `ts_ns`, if made before it.
    /// The kernel asks about a code object only while it has no verdict:
    /// a start after the kernel was told is of a code object the kernel
    /// forgot (deallocated, its address since reused by another), and is
    /// resolved anew.
    pub fn resolution_at(&mut self, key: Key, ts_ns: u64) -> Option<Option<u32>> {
        let r = *self.resolutions.get(&key)?;
        if ts_ns > r.at_ns {
            self.resolutions.remove(&key);
            return None;
        }
        Some(r.target)
    }

    /// A start of `ask`'s code object at `start`, not resolved yet: held
    /// (within the process's bound) until it is, and asked about once.
    pub fn wait(&mut self, ask: Ask, start: Start) {
        let per = self.per_process.entry(ask.pid).or_default();
        let held = match self.waiting.entry(ask.key()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if per.0 >= MAX_WAITING_PER_PROCESS => {
                self.deferred += 1;
                self.unheld += 1;
                return;
            }
            Entry::Vacant(e) => {
                per.0 += 1;
                self.asks.push(ask);
                e.insert(Vec::new())
            }
        };
        if per.1 >= MAX_HELD_PER_PROCESS {
            self.unheld += 1;
            return;
        }
        per.1 += 1;
        held.push(start);
    }

    /// Asks about every pending code object of the kernel's neither
    /// resolved nor waiting: one whose ask found no room, or whose
    /// resolution failed while its process lived.
    pub fn ask_unresolved(&mut self, pending: &[(u32, PendingHits)]) {
        for (pid, p) in pending {
            let key = (*pid, p.generation, p.code);
            let per = self.per_process.entry(*pid).or_default();
            if self.resolutions.contains_key(&key) || self.waiting.contains_key(&key) {
                continue;
            }
            if per.0 >= MAX_WAITING_PER_PROCESS {
                self.deferred += 1;
                continue;
            }
            per.0 += 1;
            self.waiting.insert(key, Vec::new());
            self.asks.push(Ask { pid: *pid, generation: p.generation, code: p.code, name: p.name, globals: p.globals });
        }
    }

    /// Every pending code object of the kernel's not resolved, waiting or
    /// not.
    pub fn unresolved(&self, pending: &[(u32, PendingHits)]) -> Vec<Ask> {
        let unresolved =
            pending.iter().filter(|(pid, p)| !self.resolutions.contains_key(&(*pid, p.generation, p.code)));
        unresolved
            .map(|(pid, p)| Ask { pid: *pid, generation: p.generation, code: p.code, name: p.name, globals: p.globals })
            .collect()
    }

    /// Asks about `asks` again (a walk left them for the next turn).
    pub fn requeue(&mut self, asks: Vec<Ask>) {
        self.asks.extend(asks);
    }

    /// The code objects to resolve since the last call.
    pub fn take_asks(&mut self) -> Vec<Ask> {
        std::mem::take(&mut self.asks)
    }

    /// An ask that could not be queued: asked again by the next
    /// [`Candidates::ask_unresolved`], its held starts dropped.
    pub fn refused(&mut self, ask: Ask) {
        self.unheld += self.leave(ask.key()).len() as u64;
    }

    /// Records what resolving `ask` found, told to the kernel at `at_ns`
    /// (a failure is not kept: the code object is asked about again), and
    /// returns its held starts.
    pub fn resolved(&mut self, ask: Ask, target: Option<Option<u32>>, at_ns: u64) -> Vec<Start> {
        if let Some(target) = target {
            if self.resolutions.len() >= MAX_RESOLUTIONS {
                self.resolutions.clear();
            }
            self.resolutions.insert(ask.key(), Resolved { target, at_ns });
        }
        self.leave(ask.key())
    }

    fn leave(&mut self, key: Key) -> Vec<Start> {
        let Some(starts) = self.waiting.remove(&key) else { return Vec::new() };
        if let Some(per) = self.per_process.get_mut(&key.0) {
            per.0 = per.0.saturating_sub(1);
            per.1 = per.1.saturating_sub(starts.len());
        }
        starts
    }

    /// Forgets everything about `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.resolutions.retain(|(p, _, _), _| *p != pid);
        self.waiting.retain(|(p, _, _), _| *p != pid);
        self.asks.retain(|a| a.pid != pid);
        self.per_process.remove(&pid);
    }
}

/// Resolves `ask` in `p`: which of `targets` (with their ids) its code
/// object is, with the code object's file and line.
pub fn resolve(p: &PythonProcess, ask: &Ask, targets: &[(u32, Target)]) -> Result<Resolution, ProcessError> {
    let mem = ProcessMemory::open(p.pid)?;
    let objs = Objects::of(p, &mem);
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
mod tests {
    use super::*;

    fn ask(pid: u32, code: u64) -> Ask {
        Ask { pid, generation: 1, code, name: 0x10, globals: 0x20 }
    }

    #[test]
    fn a_code_object_is_asked_about_once_and_its_starts_come_back_resolved() {
        let mut c = Candidates::default();
        c.wait(ask(7, 0x100), (1, 10));
        c.wait(ask(7, 0x100), (2, 20));
        assert_eq!(c.take_asks(), vec![ask(7, 0x100)]);
        assert_eq!(c.resolved(ask(7, 0x100), Some(Some(3)), 30), vec![(1, 10), (2, 20)]);
        assert_eq!(c.resolution_at((7, 1, 0x100), 25), Some(Some(3)));
        assert!(c.take_asks().is_empty());
    }

    #[test]
    fn a_start_after_the_kernel_was_told_is_of_another_code_object_at_that_address() {
        let mut c = Candidates::default();
        c.wait(ask(7, 0x100), (1, 10));
        c.resolved(ask(7, 0x100), Some(Some(3)), 30);
        assert_eq!(c.resolution_at((7, 1, 0x100), 40), None);
        c.wait(ask(7, 0x100), (1, 40));
        assert_eq!(c.take_asks(), vec![ask(7, 0x100), ask(7, 0x100)]);
    }

    #[test]
    fn a_process_holds_a_bounded_number_of_starts_and_code_objects() {
        let mut c = Candidates::default();
        for i in 0..MAX_HELD_PER_PROCESS as u64 + 5 {
            c.wait(ask(7, 0x100), (1, i));
        }
        assert_eq!(c.unheld, 5);
        for code in 0..MAX_WAITING_PER_PROCESS as u64 + 3 {
            c.wait(ask(8, 0x1000 + code), (1, 0));
        }
        assert_eq!(c.deferred, 3);
        // Another process is not held back by either.
        c.wait(ask(9, 0x100), (1, 0));
        assert_eq!(c.take_asks().iter().filter(|a| a.pid == 9).count(), 1);
    }

    #[test]
    fn a_failed_or_refused_resolution_is_asked_about_again() {
        let mut c = Candidates::default();
        c.wait(ask(7, 0x100), (1, 10));
        c.take_asks();
        assert_eq!(c.resolved(ask(7, 0x100), None, 30), vec![(1, 10)]);
        let pending = PendingHits { generation: 1, code: 0x100, name: 0x10, globals: 0x20, hits: 1 };
        c.ask_unresolved(&[(7, pending)]);
        assert_eq!(c.take_asks(), vec![ask(7, 0x100)]);
        c.refused(ask(7, 0x100));
        c.ask_unresolved(&[(7, pending)]);
        assert_eq!(c.take_asks(), vec![ask(7, 0x100)]);
    }
}
