//! Walks of watched processes' objects after their attach, on the blocking
//! pool: a module body about to run (the constants of its code object), and
//! the look in `sys.modules` for targets not found yet. A walk only reads
//! the process; the agent loop applies what it found (a few map writes),
//! after checking that each code object found is still the one read.
//!
//! One walk per process at a time, [`MAX_RUNNING`] in all, taken from the
//! processes in turn, each within its share of the pool's time
//! ([`super::walks`]): a process that imports without end waits for its
//! own walks, never another's. Looks wait in bounded queues; a process
//! whose queue is full has its looks folded into one look in `sys.modules`.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use detector_common::CallerFrame;
use tokio::sync::mpsc;

use crate::{
    agent::attach::{Identity, identities},
    events::candidates::{self, Ask, Resolution},
    pyproc::{
        ProcessError, PythonProcess,
        body::{self, Found},
        callers::{self, Caller},
        distributions::{self, Installed},
        mem::ProcessMemory,
    },
    targets::Target,
};

/// Walks running at once: the pool also decides about new processes and
/// analyses interpreters, and a node agent gets a core or two.
const MAX_RUNNING: usize = 2;

/// Looks waiting per process; more fold into one look in `sys.modules`.
const MAX_WAITING_PER_PROCESS: usize = 8;

/// Processes with looks waiting; the looks of more are left to the safety
/// net's next look (the caller defers them).
const MAX_WAITING_PROCESSES: usize = 4096;

/// How long one walk resolves candidates before it leaves the rest to
/// the process's next turn.
const RESOLVING_TURN: Duration = Duration::from_millis(50);

/// What a walk looks at.
#[derive(Clone, Debug)]
pub(crate) enum Look {
    /// A module body about to run: its code object and globals, and when
    /// the kernel saw it start.
    Body { code: u64, globals: u64, ts_ns: u64 },
    /// The targets' modules in `sys.modules`: always if `force`, else only
    /// if the modules are not the `seen` ones any more. `source` says why;
    /// `unread` if it stands for module bodies whose looks were folded
    /// into it (they may still be running when it walks).
    Modules { force: bool, seen: Option<i64>, source: &'static str, unread: bool },
    /// 3.8-3.10 code objects started under a target's name: which target
    /// each is, if any.
    Candidates(Vec<Ask>),
    /// 3.8-3.10, probed per call: the functions of the job's targets that
    /// exist already, so the kernel knows them from their next call.
    Identities,
    /// The versions of these distributions (normalized names) the process
    /// has installed, along its `sys.path`: only if `sys.modules` no longer
    /// holds `seen` modules (a module was imported), when given.
    Versions { names: Arc<BTreeSet<String>>, seen: Option<i64> },
    /// Who called these targets at their first hits.
    Callers(Vec<CallerAsk>),
}

/// The frames the kernel recorded above a target at its first hit.
#[derive(Clone, Debug)]
pub(crate) struct CallerAsk {
    /// The target's id.
    pub(crate) target: u32,
    /// Its module.
    pub(crate) module: String,
    /// Its code object.
    pub(crate) code: u64,
    /// The frames above it, innermost first.
    pub(crate) frames: Vec<CallerFrame>,
}

impl Look {
    /// Whether it arms watchpoints (the other looks serve per-call probes).
    pub(crate) fn arms(&self) -> bool {
        matches!(self, Look::Body { .. } | Look::Modules { .. })
    }

    /// Whether a waiting look of this kind takes `newer`'s work instead of
    /// queueing another walk (resolutions and identities; a look in
    /// `sys.modules` is handled by [`Walker::submit`]).
    fn absorbs(&self, newer: &Look) -> bool {
        matches!(
            (self, newer),
            (Look::Candidates(_), Look::Candidates(_))
                | (Look::Identities, Look::Identities)
                | (Look::Versions { .. }, Look::Versions { .. })
                | (Look::Callers(_), Look::Callers(_))
        )
    }
}

/// Targets with their ids, shared by the jobs that look for the same ones.
pub(crate) type Targets = Arc<[(u32, Target)]>;

/// A walk to make.
pub(crate) struct Job {
    pub(crate) pid: u32,
    /// When the watch it is for began: a pid reused by a new process is
    /// another watch, and the walk's findings are not its.
    pub(crate) since: Instant,
    pub(crate) look: Look,
    pub(crate) process: PythonProcess,
    /// The targets looked for, with their ids.
    pub(crate) targets: Targets,
    /// Its number, given when queued.
    pub(crate) seq: u64,
}

impl Job {
    /// Takes `newer`'s work (of a kind [`Look::absorbs`]): its asks, or its
    /// targets.
    fn absorb(&mut self, newer: Job) {
        self.seq = newer.seq;
        match (&mut self.look, newer.look) {
            (Look::Candidates(asks), Look::Candidates(more)) => {
                asks.extend(more);
                // Resolved against the targets as they are now.
                self.targets = newer.targets;
            }
            (Look::Callers(asks), Look::Callers(more)) => asks.extend(more),
            (Look::Versions { names, seen }, Look::Versions { names: more, seen: theirs }) => {
                *names = Arc::new(names.iter().chain(more.iter()).cloned().collect());
                // Either one asked unconditionally: so is the merged look.
                *seen = seen.and(theirs);
            }
            _ => {
                let mut targets = self.targets.to_vec();
                targets.extend(newer.targets.iter().filter(|t| !self.targets.contains(t)).cloned());
                self.targets = targets.into();
            }
        }
    }
}

/// What a walk found.
pub(crate) enum Finding {
    /// Nothing to look at: the body is not a target's module, or no module
    /// was imported since the last look.
    Nothing,
    /// What was found for each target looked for, and how many modules
    /// `sys.modules` held (a look there only).
    Found { found: Vec<(u32, Target, Found)>, modules: Option<i64> },
    /// What each candidate resolved to, and those left for another walk
    /// (this one had run long enough).
    Resolved { done: Vec<(Ask, Result<Resolution, ProcessError>)>, left: Vec<Ask> },
    /// Functions of the targets that exist.
    Identities(Vec<Identity>),
    /// What the process has of each distribution asked for, and how many
    /// modules `sys.modules` held when it was read.
    Versions { installed: BTreeMap<String, Installed>, modules: Option<i64> },
    /// Each target's first caller of user code, if one was found.
    Callers(Vec<(u32, Option<Caller>)>),
}

/// A walk done.
pub(crate) struct Walked {
    pub(crate) pid: u32,
    pub(crate) since: Instant,
    pub(crate) look: Look,
    /// The number of the job it made.
    pub(crate) seq: u64,
    pub(crate) finding: Result<Finding, ProcessError>,
    /// How long it took: charged to the process's share.
    pub(crate) took: Duration,
}

/// Why a look was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

/// The queues of looks and the walks running.
pub(crate) struct Walker {
    waiting: BTreeMap<u32, VecDeque<Job>>,
    /// Processes with a walk running: one at a time each.
    running: BTreeSet<u32>,
    /// The process whose looks were taken last: the next turn is the one after.
    last: u32,
    /// The last look's number: looks are numbered as they are asked for.
    seq: u64,
    tx: mpsc::Sender<Walked>,
    rx: mpsc::Receiver<Walked>,
    /// Times a process's queue was full and its looks folded into one.
    pub(crate) folded: u64,
    /// Looks refused because too many processes had looks waiting.
    pub(crate) refused: u64,
}

impl Default for Walker {
    fn default() -> Self {
        // Each running walk sends one result, taken before the next starts.
        let (tx, rx) = mpsc::channel(MAX_RUNNING);
        let (waiting, running) = (BTreeMap::new(), BTreeSet::new());
        Walker { waiting, running, last: 0, seq: 0, tx, rx, folded: 0, refused: 0 }
    }
}

impl Walker {
    /// Queues `job` and returns its number: a walk whose number is at least
    /// that has looked for everything the job asked. A look in `sys.modules`
    /// waiting takes the newer job's targets instead of queueing another,
    /// and a process with a full queue gets one forced look in `sys.modules`
    /// instead, which finds what their module bodies defined by then and
    /// has `sys.modules` looked at again after them (they may be running).
    pub(crate) fn submit(&mut self, mut job: Job) -> Result<u64, Full> {
        if !self.waiting.contains_key(&job.pid) && self.waiting.len() >= MAX_WAITING_PROCESSES {
            self.refused += 1;
            return Err(Full);
        }
        self.seq += 1;
        job.seq = self.seq;
        let queue = self.waiting.entry(job.pid).or_default();
        // Looks for an earlier watch of the pid (another process, or an
        // image since replaced) are not this one's.
        queue.retain(|j| j.since == job.since);
        if let Some(queued) = queue.iter_mut().find(|j| j.look.absorbs(&job.look)) {
            queued.absorb(job);
            return Ok(self.seq);
        }
        if matches!(job.look, Look::Modules { .. })
            && let Some(queued) = queue.iter_mut().find(|j| matches!(j.look, Look::Modules { .. }))
        {
            let (was_forced, was_unread) = match queued.look {
                Look::Modules { force, unread, .. } => (force, unread),
                _ => (false, false),
            };
            *queued = job;
            if let Look::Modules { force, unread, .. } = &mut queued.look {
                *force |= was_forced;
                *unread |= was_unread;
            }
            return Ok(self.seq);
        }
        if job.look.arms() && queue.iter().filter(|j| j.look.arms()).count() >= MAX_WAITING_PER_PROCESS {
            self.folded += 1;
            queue.retain(|j| !j.look.arms());
            let look = Look::Modules { force: true, seen: None, source: "module ran", unread: true };
            queue.push_back(Job { look, ..job });
            return Ok(self.seq);
        }
        queue.push_back(job);
        Ok(self.seq)
    }

    /// The number the next job will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq + 1
    }

    /// Drops the looks waiting for `pid` (it is no longer watched).
    pub(crate) fn forget(&mut self, pid: u32) {
        self.waiting.remove(&pid);
    }

    /// Starts walks while there is room: the processes take turns, one walk
    /// each at a time, and one whose share does not allow a walk now
    /// (`allows`) waits.
    pub(crate) fn start(&mut self, mut allows: impl FnMut(u32) -> bool) {
        while self.running.len() < MAX_RUNNING {
            let after = self.waiting.range(self.last + 1..).chain(self.waiting.range(..=self.last));
            let mut turn = after.map(|(p, _)| *p).filter(|p| !self.running.contains(p));
            let Some(pid) = turn.find(|&pid| allows(pid)) else { return };
            self.last = pid;
            let Some(queue) = self.waiting.get_mut(&pid) else { return };
            let Some(job) = queue.pop_front() else { return };
            if queue.is_empty() {
                self.waiting.remove(&pid);
            }
            self.running.insert(pid);
            let tx = self.tx.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                // A walk that panics on what it read fails that walk alone;
                // its result still comes, so its slot is free again.
                let finding = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| walk(&job)))
                    .unwrap_or_else(|_| Err(ProcessError::io(job.pid, std::io::Error::other("the walk panicked"))));
                let Job { pid, since, look, seq, .. } = job;
                let _ = tx.try_send(Walked { pid, since, look, seq, finding, took: started.elapsed() });
            });
        }
    }

    /// The next walk done.
    pub(crate) async fn done(&mut self) -> Walked {
        let walked = self.rx.recv().await.expect("the walker holds a sender");
        self.running.remove(&walked.pid);
        walked
    }

    /// A walk done already, if any.
    pub(crate) fn try_done(&mut self) -> Option<Walked> {
        let walked = self.rx.try_recv().ok()?;
        self.running.remove(&walked.pid);
        Some(walked)
    }
}

/// Makes the walk `job` asks for.
fn walk(job: &Job) -> Result<Finding, ProcessError> {
    let p = &job.process;
    match job.look {
        Look::Body { code, globals, .. } => {
            let Some(module) = body::module_name(p, globals)? else { return Ok(Finding::Nothing) };
            let found: Vec<(u32, Target, Found)> = job
                .targets
                .iter()
                .filter(|(_, t)| t.module() == module)
                .map(|(id, t)| {
                    // A read that fails, or a refusal read from a body that
                    // may be gone (its memory reused), is left to the look
                    // in `sys.modules`, which reads live objects.
                    let found = match body::find_in_body(p, code, t) {
                        Ok(Found::Code { starts }) => Found::Code { starts },
                        Ok(Found::Nothing { reason, .. }) => Found::Nothing { reason, later: true },
                        Err(e) => Found::Nothing { reason: e.to_string(), later: true },
                    };
                    (*id, t.clone(), found)
                })
                .collect();
            Ok(if found.is_empty() { Finding::Nothing } else { Finding::Found { found, modules: None } })
        }
        Look::Candidates(ref asks) => resolve(p, asks, &job.targets),
        Look::Identities => {
            let targets = job.targets.iter().map(|(_, t)| t);
            identities(p, targets).map(Finding::Identities)
        }
        Look::Versions { ref names, seen } => {
            let modules = body::modules_count(p).ok();
            if seen.is_some() && modules == seen {
                return Ok(Finding::Nothing);
            }
            let installed = distributions::installed(p, names)?;
            Ok(Finding::Versions { installed, modules })
        }
        Look::Callers(ref asks) => {
            let read =
                asks.iter().map(|a| {
                    let caller = callers::first_user_caller(p, &a.module, a.code, &a.frames);
                    (a.target, caller.unwrap_or_else(|e| {
                    tracing::debug!(pid = p.pid, target = a.target, error = %e, "cannot read who called a target");
                    None
                }))
                });
            Ok(Finding::Callers(read.collect()))
        }
        Look::Modules { force, seen, .. } => {
            let modules = body::modules_count(p).ok();
            if !force && modules.is_some() && modules == seen {
                return Ok(Finding::Nothing);
            }
            let ts: Vec<&Target> = job.targets.iter().map(|(_, t)| t).collect();
            let found = body::find_all(p, &ts)?;
            let found = job.targets.iter().zip(found).map(|((id, t), f)| (*id, t.clone(), f)).collect();
            Ok(Finding::Found { found, modules })
        }
    }
}

/// Resolves `asks` in turn until the turn is over, through one look at the
/// process's memory: an ask that finds the look's budget spent by those
/// before it is left for the next turn with the rest.
fn resolve(p: &PythonProcess, asks: &[Ask], targets: &[(u32, Target)]) -> Result<Finding, ProcessError> {
    let started = Instant::now();
    let mem = ProcessMemory::open(p.pid)?;
    let mut done = Vec::new();
    for (i, ask) in asks.iter().enumerate() {
        let result = candidates::resolve(p, &mem, ask, targets);
        if i > 0 && matches!(result, Err(ProcessError::OverBudget { .. })) {
            return Ok(Finding::Resolved { done, left: asks[i..].to_vec() });
        }
        done.push((*ask, result));
        if started.elapsed() >= RESOLVING_TURN {
            return Ok(Finding::Resolved { done, left: asks[i + 1..].to_vec() });
        }
    }
    Ok(Finding::Resolved { done, left: Vec::new() })
}
