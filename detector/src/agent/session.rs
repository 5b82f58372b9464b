//! A detection session: the loaded eBPF object, the active targets, the
//! processes watched and the events they produce. `dump` is a session with
//! one process and fixed targets; `run` feeds it targets from its sources.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

mod callers;
mod drain;
mod ending;
mod enforce;
mod reachability;
mod resolving;
mod tier2;
mod trap_signals;
mod upstream;
mod versions;
mod walking;

use walking::Announce;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::{info, warn};

use super::{
    AttachError, ProcessWatch, Strategy, callers::Held, discovery::Service, fork, report::ProcessReport,
    walker::Walker, walks::WalkShares,
};
use crate::{
    bpf::{BpfError, Capacities, PendingHits, Probes},
    events::{EventProcessor, Hit, ProcessLookup, output::Printer},
    interp::cache::AnalysisCache,
    pyproc::PythonProcess,
    sources::catalog::Advisory,
    targets::{Target, TargetSet},
};

/// How often the ring buffer is drained when no wakeup came (the kernel
/// only wakes the reader for bursts, so a hit does not pay for a wakeup).
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// How often targets not found yet are looked for in `sys.modules`: the
/// safety net behind the module-execution probe, which finds them as their
/// module runs (see [`ProcessWatch::rescan_pending`]).
const RESCAN_PENDING: Duration = Duration::from_secs(10);

/// How long stopping may spend reading the callers still being read.
const SETTLE_CALLERS: Duration = Duration::from_secs(2);

/// Children of watched processes remembered until they are attached.
const MAX_FORKS_AWAITING: usize = 4096;

/// How long a stopping session waits for the kernel to unregister its probes
/// (about 90 ms each here); past it, the kernel finishes after the exit.
const SETTLE_AT_EXIT: Duration = Duration::from_secs(20);

struct Watches(BTreeMap<u32, ProcessWatch>);

impl ProcessLookup for Watches {
    fn process(&self, pid: u32) -> Option<&PythonProcess> {
        self.0.get(&pid).map(|w| &w.process)
    }
}

impl Watches {
    fn service(&self, pid: u32) -> Option<&Service> {
        self.0.get(&pid).map(|w| &w.service)
    }
}

/// What [`Session::next`] stopped for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// A watched process exited.
    Exited(u32),
    /// Standard output was closed by its reader.
    OutputClosed,
    /// A process executed a new image (any process on the node, once
    /// discovery is on).
    Exec(u32),
    /// A watched process forked.
    Fork {
        /// The watched process.
        parent: u32,
        /// Its child.
        child: u32,
    },
}

/// The session.
pub struct Session {
    probes: Probes,
    targets: TargetSet,
    /// The advisories naming each target: they travel with its hits.
    advisories: BTreeMap<Target, Vec<Advisory>>,
    /// The dependencies (normalized) whose versions the advisories
    /// constrain: read in each process.
    dependencies: Arc<BTreeSet<String>>,
    /// Targets some config names with no advisory: never gated.
    unconditional: BTreeSet<Target>,
    watches: Watches,
    processor: EventProcessor,
    printer: Printer,
    ring: AsyncFd<RingBuf<MapData>>,
    exits_tx: mpsc::UnboundedSender<u32>,
    exits_rx: mpsc::UnboundedReceiver<u32>,
    tick: tokio::time::Interval,
    cache: Arc<AnalysisCache>,
    discovered: VecDeque<Activity>,
    strategy: Strategy,
    /// Reachability mode for every process attached.
    reachability: bool,
    /// Reachability: how often reached targets are sampled, if at all.
    sample_every: Option<Duration>,
    /// When pending targets were last looked for.
    rescanned: Instant,
    /// The walks' shares of the pool: each tenant's, and all together.
    walks: WalkShares,
    /// Walks after the attach, made on the blocking pool.
    walker: Walker,
    /// Processes whose walk has not been applied yet: what is to be
    /// announced once a look numbered at least this has been.
    announcing: BTreeMap<u32, (Announce, u64)>,
    /// Children of watched processes not attached yet: their parent, and
    /// when the fork was seen.
    forks: BTreeMap<u32, (u32, Instant)>,
    /// Reporting to the telemetry intake, if on.
    upstream: Option<upstream::Upstream>,
    /// When hits waiting for their callers were last looked at.
    callers_checked: Option<Instant>,
    /// When the kernel's marks of optimizers' starts were last looked for.
    tier2_checked: Instant,
}

impl Session {
    /// Loads the eBPF object; nothing is attached yet.
    pub fn new(caps: Capacities, printer: Printer) -> Result<Self, BpfError> {
        let mut probes = Probes::load(caps)?;
        let ring = probes.take_events().expect("a fresh object has its ring buffer");
        // SAFETY: the ring buffer owns its fd and keeps it open until dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| BpfError::Io { what: "polling the ring buffer", source: std::io::Error::from(e) })?;
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Ok(Session {
            probes,
            targets: TargetSet::default(),
            advisories: BTreeMap::new(),
            dependencies: Default::default(),
            unconditional: BTreeSet::new(),
            watches: Watches(BTreeMap::new()),
            processor: EventProcessor::default(),
            printer,
            ring,
            exits_tx,
            exits_rx,
            tick: tokio::time::interval(DRAIN_INTERVAL),
            cache: Arc::new(AnalysisCache::default()),
            discovered: VecDeque::new(),
            strategy: Strategy::default(),
            reachability: false,
            sample_every: None,
            rescanned: Instant::now(),
            walks: WalkShares::default(),
            walker: Walker::default(),
            announcing: BTreeMap::new(),
            forks: BTreeMap::new(),
            upstream: None,
            callers_checked: None,
            tier2_checked: Instant::now(),
        })
    }

    /// Watches processes attached from now on with `strategy`.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Reachability mode: report each target once per process, and stop
    /// paying for it where the strategy allows (watchpoints are disarmed).
    /// Counts then say how often it was seen before that, not how often it
    /// ran.
    pub fn with_reachability(mut self, on: bool) -> Self {
        self.reachability = on;
        self
    }

    /// Reachability: arms each reached watched target again for a short
    /// window every `every` and reports how often it ran then.
    pub fn with_reachability_sample(mut self, every: Option<Duration>) -> Self {
        self.sample_every = every;
        self
    }

    /// Uses `cache` for the analyses of everything this session attaches.
    pub fn with_cache(mut self, cache: Arc<AnalysisCache>) -> Self {
        self.cache = cache;
        self
    }

    /// The analysis cache shared by everything this session attaches.
    pub fn cache(&self) -> Arc<AnalysisCache> {
        self.cache.clone()
    }

    /// The active targets.
    pub fn targets(&self) -> &TargetSet {
        &self.targets
    }

    /// The printer.
    pub fn printer(&self) -> &Printer {
        &self.printer
    }

    /// The watched processes.
    pub fn watches(&self) -> impl Iterator<Item = &ProcessWatch> {
        self.watches.0.values()
    }

    /// Whether `pid` is watched.
    pub fn is_watched(&self, pid: u32) -> bool {
        self.watches.0.contains_key(&pid)
    }

    /// The watch of `pid`, if watched.
    pub fn watch_of(&self, pid: u32) -> Option<&ProcessWatch> {
        self.watches.0.get(&pid)
    }

    /// Probes detached and not yet unregistered by the kernel.
    pub fn detaching(&self) -> usize {
        self.probes.detaching()
    }

    /// Probes detached so far, and closed so far, in the order detached.
    pub fn detach_sequence(&self) -> (u64, u64) {
        self.probes.detach_sequence()
    }

    /// The kernel's counters, by name.
    pub fn kernel_stats(&self) -> Vec<(&'static str, u64)> {
        let stats = self.probes.stats();
        detector_common::stats::NAMES.iter().copied().zip(stats.iter().copied()).collect()
    }

    /// Every watched process as reported, with the events of each that the
    /// kernel dropped.
    pub fn reports(&self) -> Vec<ProcessReport> {
        let reports = self.watches.0.values().map(|w| w.report(&self.targets));
        reports
            .map(|r| {
                let (events_dropped, starts_refused) = self.probes.dropped(r.pid);
                let exposures = self.exposures_report(r.pid);
                ProcessReport { events_dropped, starts_refused, exposures, ..r }
            })
            .collect()
    }

    /// Caps of the walks reached so far, by name: a process's walk queue
    /// full (its looks folded into one), looks refused because too many
    /// processes had looks waiting, 3.8-3.10 starts whose lines were not
    /// held for their resolution, and code objects not asked about then.
    pub fn walks_capped(&self) -> [(&'static str, u64); 4] {
        let (unheld, deferred) = self.processor.candidates_capped();
        [
            ("walk_queue", self.walker.folded),
            ("walk_processes", self.walker.refused),
            ("candidate_starts", unheld),
            ("candidates_waiting", deferred),
        ]
    }

    /// Exact hits of every target in `pid` so far.
    pub fn totals(&self, pid: u32) -> Vec<(Target, u64)> {
        self.totals_of(pid, &self.probes.pending(pid))
    }

    /// Exact hits of every target in `pid`, given its pending entries.
    fn totals_of(&self, pid: u32, pending: &[PendingHits]) -> Vec<(Target, u64)> {
        let totals = self.processor.totals(pid, pending, &self.probes, &self.targets);
        self.targets.iter().map(|(t, id)| (t.clone(), totals.get(&id).copied().unwrap_or(0))).collect()
    }

    /// Exact hits of every target summed over the watched processes.
    pub fn all_totals(&mut self) -> Vec<(Target, u64)> {
        let totals = self.processor.totals_all(&self.probes, &self.targets);
        self.ask();
        self.targets.iter().map(|(t, id)| (t.clone(), totals.get(&id).copied().unwrap_or(0))).collect()
    }

    /// Reports execs of any process and forks of watched ones as
    /// [`Activity::Exec`] and [`Activity::Fork`] from now on.
    pub fn discover(&mut self) -> Result<(), BpfError> {
        self.probes.attach_discovery()
    }

    /// Makes `want` the active targets. Targets that stay keep their ids and
    /// counts; new ones are matched from the next call on (and, on 3.8-3.10,
    /// looked up among the functions watched processes already have).
    /// Returns whether anything changed.
    pub fn set_targets(&mut self, want: &BTreeSet<Target>) -> Result<bool, BpfError> {
        let gone: Vec<Target> = self.targets.iter().map(|(t, _)| t.clone()).filter(|t| !want.contains(t)).collect();
        let new: Vec<Target> = want.iter().filter(|t| self.targets.id(t).is_none()).cloned().collect();
        if gone.is_empty() && new.is_empty() {
            return Ok(false);
        }
        // The kernel's maps first; the agent's set only once they took it.
        let mut next = self.targets.clone();
        let retired: Vec<u32> = gone.iter().filter_map(|t| next.remove(t)).collect();
        for t in &new {
            next.insert(t.clone());
        }
        // New targets are gated where versions say before the kernel has them.
        self.pregate(&next);
        if let Err(e) = self.probes.sync_targets(&next) {
            // Put back what a partial write changed (best effort: it is
            // what the maps held a moment ago).
            let _ = self.probes.sync_targets(&self.targets);
            return Err(e);
        }
        self.targets = next;
        self.probes.retire_targets(&retired);
        self.processor.retire(&retired);
        info!(added = new.len(), removed = gone.len(), active = self.targets.len(), "targets changed");
        self.identify(&new);
        // Retargets each process, leaving alone what its versions say.
        self.regate_all();
        Ok(true)
    }

    /// Makes `advisories` those that travel with each target's hits.
    /// `unconditional` targets are named by a config with no advisory.
    pub fn set_advisories(&mut self, advisories: BTreeMap<Target, Vec<Advisory>>, unconditional: BTreeSet<Target>) {
        if self.advisories == advisories && self.unconditional == unconditional {
            return;
        }
        self.advisories = advisories;
        self.unconditional = unconditional;
        self.note_dependencies();
        self.regate_all();
    }

    /// Attaches to `process` and reports it.
    pub fn watch(&mut self, process: PythonProcess) -> Result<(), AttachError> {
        self.watch_as(process, Service::default())
    }

    /// Attaches to `process`, whose hits carry `service`, and reports it.
    pub fn watch_as(&mut self, process: PythonProcess, service: Service) -> Result<(), AttachError> {
        let pid = process.pid;
        // Before attaching, so an exit during the attach is seen.
        let exits = self.exits_tx.clone();
        let fd = ending::pidfd(pid).map_err(|e| AttachError::Process(crate::pyproc::ProcessError::io(pid, e)))?;
        tokio::spawn(async move {
            let _ = fd.readable().await;
            let _ = exits.send(pid);
        });
        // The kernel knows what its versions leave unwatched before any probe.
        let (unwatched, exposures) = self.gate_new(pid);
        let both = (&self.targets, unwatched);
        let mut watch =
            match ProcessWatch::attach_with(&mut self.probes, process, both, self.strategy, self.reachability) {
                Ok(w) => w,
                Err(e) => {
                    self.probes.clear_gates(pid);
                    return Err(e);
                }
            };
        watch.exposures = exposures;
        watch.service = service;
        if self.reachability {
            watch.reach(&mut self.probes, []);
        }
        // What a forked child ran before this attach: reachability only.
        let fork = self.forks.remove(&pid);
        let ran_before = match fork {
            Some((parent, forked)) if self.reachability => match self.watches.0.get(&parent) {
                Some(p) => fork::runs_since_fork(&watch.process, p, forked, &self.targets),
                None => Vec::new(),
            },
            _ => Vec::new(),
        };
        let inherited = fork.and_then(|(parent, _)| self.inherited_blindness(parent, &watch));
        if let Err(e) = self.probes.set_watched(pid, true) {
            watch.detach(&mut self.probes);
            self.probes.clear_gates(pid);
            return Err(e.into());
        }
        let ran_before: Vec<(u32, u32, u64)> =
            ran_before.into_iter().map(|(target, code)| (pid, target, code)).collect();
        self.watches.0.insert(pid, watch);
        // Its versions first, when the catalog constrains any: the look for
        // the targets they leave watched comes after, and the announcement
        // after that.
        if let Some(after) = self.read_versions(pid) {
            self.announcing.insert(pid, (Announce::Attached(ran_before), after));
            return Ok(());
        }
        // Under watchpoints the targets are found by a walk off the loop:
        // the process is announced once it has armed what it found.
        let first_look = self.watches.0.get_mut(&pid).and_then(|w| w.rescan_pending(&self.targets, true, "attach"));
        match first_look {
            Some(job) => {
                let after = self.look(Some(job));
                self.announcing.insert(pid, (Announce::Attached(ran_before), after));
            }
            None => self.announce(pid, ran_before),
        }
        if let Some(why) = inherited {
            self.go_blind(pid, why);
        }
        Ok(())
    }

    /// Processes events until something needs the caller: a watched process
    /// exited, or nobody reads the output any more.
    pub async fn next(&mut self) -> Activity {
        loop {
            if let Some(a) = self.discovered.pop_front() {
                return a;
            }
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    if let Ok(mut guard) = guard {
                        let drained = drain::drain(guard.get_inner_mut(), &mut self.processor, &mut self.probes, &self.targets, &self.watches);
                        guard.clear_ready();
                        drop(guard);
                        self.handle(drained);
                    }
                }
                _ = self.tick.tick() => {
                    self.drain();
                    self.tick();
                    if self.rescanned.elapsed() >= RESCAN_PENDING {
                        self.rescan_pending();
                    }
                    if self.tier2_checked.elapsed() >= tier2::TIER2_CHECK {
                        self.tier2_marks();
                    }
                    if let Some(every) = self.sample_every {
                        self.sample(every);
                    }
                    if self.printer.closed() {
                        return Activity::OutputClosed;
                    }
                }
                walked = self.walker.done() => self.walked(walked),
                Some(pid) = self.exits_rx.recv() => {
                    if self.watches.0.contains_key(&pid) {
                        return Activity::Exited(pid);
                    }
                }
            }
        }
    }

    /// Gives body starts waiting for a debug register their turn, and
    /// arms targets that a module body made and the probe did not find.
    fn tick(&mut self) {
        let now = Instant::now();
        let mut marked = Vec::new();
        let mut looks = Vec::new();
        for (&pid, w) in self.watches.0.iter_mut() {
            let ticked = w.tick(&mut self.probes, &self.targets, now);
            looks.extend(ticked.look);
            marked.extend(ticked.ran.into_iter().map(|(target, code)| (pid, target, code)));
        }
        self.report_marked(marked);
        for job in looks {
            self.look(Some(job));
        }
        self.processor.fold_due(&mut self.probes);
        self.start_walks();
    }

    /// Handles everything waiting in the ring buffer.
    pub fn drain(&mut self) {
        let drained =
            drain::drain(self.ring.get_mut(), &mut self.processor, &mut self.probes, &self.targets, &self.watches);
        self.handle(drained);
    }

    fn handle(&mut self, mut drained: drain::Drained) {
        for a in &drained.found {
            // A new image is no fork's copy any more.
            if let Activity::Exec(pid) = *a {
                self.forks.remove(&pid);
            }
            if let Activity::Fork { parent, child } = *a {
                if self.forks.len() >= MAX_FORKS_AWAITING {
                    // A child not attached by now never will be (refused, or gone).
                    self.forks.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
                    if self.forks.len() >= MAX_FORKS_AWAITING {
                        self.forks.pop_first();
                    }
                }
                self.forks.insert(child, (parent, Instant::now()));
            }
        }
        self.discovered.extend(drained.found);
        for e in drained.module_bodies {
            self.module_body(e);
        }
        for (pid, tid, code) in std::mem::take(&mut drained.trap_signals) {
            self.trap_signalled(pid, tid, code);
        }
        for (pid, tid) in std::mem::take(&mut drained.tier2) {
            self.tier2_started(pid, Some(tid));
        }
        // Hits first: a target they reach is disarmed, and its code object
        // freed since (a process exiting frees them all) needs nothing.
        let hits = std::mem::take(&mut drained.hits);
        self.callers_recorded(std::mem::take(&mut drained.callers));
        self.report(hits);
        self.release_overdue();
        for (pid, code) in drained.freed {
            let Some(w) = self.watches.0.get_mut(&pid) else { continue };
            if let Some(job) = w.code_freed(&mut self.probes, &self.targets, code) {
                info!(
                    pid,
                    code,
                    strategy = w.mode(),
                    "a watched code object was deallocated: looking for its target anew"
                );
                let why = format!("watched code object {code:#x} deallocated");
                let after = self.look(Some(job));
                // One line for a burst (an exiting interpreter frees them
                // all), once the last look is armed.
                let (_, due) = self.announcing.entry(pid).or_insert((Announce::Rearmed(why), after));
                *due = after;
            }
        }
        self.ask();
    }

    /// Prints hits. In reachability mode only a target's first hit in a
    /// process is reported, and a watchpoint stops costing anything once its
    /// target has been seen: it is disarmed. A hit whose target's caller is
    /// being read waits for it.
    fn report(&mut self, hits: Vec<Hit>) {
        for hit in hits {
            let (Some(w), Some(id)) = (self.watches.0.get_mut(&hit.pid), self.targets.id(&hit.target)) else {
                self.hit_out(hit, None);
                continue;
            };
            if !w.first_reach(&mut self.probes, id) {
                continue;
            }
            if let Held::Now(hit, caller) = w.hold(hit, id) {
                self.hit_out(hit, caller);
            }
        }
    }

    /// Reports every watched process's counts and the kernel's counters,
    /// then detaches everything.
    pub fn shutdown(mut self) {
        self.drain();
        self.resolve_now();
        self.callers_now(Instant::now() + SETTLE_CALLERS);
        let pids: Vec<u32> = self.watches.0.keys().copied().collect();
        for pid in pids {
            for (t, hits) in self.totals(pid) {
                self.printer.summary(pid, &t, hits);
            }
        }
        self.printer.stats(&self.kernel_stats());
        for (_, mut w) in std::mem::take(&mut self.watches.0) {
            w.detach(&mut self.probes);
        }
        if !self.probes.settle(SETTLE_AT_EXIT) {
            warn!(
                left = self.probes.detaching(),
                "the kernel is still unregistering probes; it finishes after this process exits"
            );
        }
    }
}
