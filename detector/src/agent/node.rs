//! The node agent's process bookkeeping: which processes on the node were
//! considered, which are watched and why others are not. Deciding about a
//! process (its environment, its interpreter's analysis) runs on the
//! blocking pool, so a slow analysis never delays events from processes
//! already watched; only the attach itself happens on the agent loop.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{
    Strategy,
    budget::{Action, Budget},
    discovery::{self, Environ, Service},
    session::Session,
    tenant::{self, DetachBacklog, Tenant, Tenants, Watching},
    walks::{ALL_ATTACHES, LoopShare, TENANT_ATTACHES},
};
use crate::{
    bpf::reaper::Buried,
    interp::cache::AnalysisCache,
    metrics::{SharedMetrics, raise},
    pyproc::{self, ProcessError, PythonProcess},
    rc::poller,
};

/// A new image may not have its libpython mapped yet when its exec is seen
/// (the dynamic loader maps it a few milliseconds later): look again after
/// these delays (about 10 s in all).
const RETRY_DELAYS: [Duration; 10] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
    Duration::from_millis(160),
    Duration::from_millis(320),
    Duration::from_millis(640),
    Duration::from_millis(2560),
    Duration::from_millis(5120),
];

/// Decisions made at once on the blocking pool: a fork or exec storm queues
/// its decisions instead of taking a thread (and its reads of `/proc`) each.
const MAX_DECIDING: usize = 8;

/// Decisions one tenant may have waiting; more of its processes are refused
/// for now and considered again at the next rescan.
const MAX_QUEUED_PER_TENANT: usize = 64;

/// Detached probes whose closing is still pending beyond which no process is
/// attached (each holds a descriptor; the kernel closes about ten a second):
/// attaching waits for the backlog instead of growing it.
const MAX_DETACHING: usize = 4096;

/// Of those, most that one tenant's ended processes may leave: a tenant
/// whose processes come and go without end waits for its own backlog.
const MAX_DETACHING_PER_TENANT: u64 = 512;

/// What the operator decides about processes.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Watch Python processes that did not opt in too.
    pub attach_all: bool,
    /// Most processes watched at once.
    pub max_processes: usize,
    /// Most processes watched at once in one pod (or cgroup).
    pub max_per_tenant: usize,
    /// The overhead budget per process, if any.
    pub budget: Option<Budget>,
}

/// Why a process is not watched.
#[derive(Debug)]
enum Refusal {
    /// It exited before a decision.
    Gone,
    /// Not an interpreter (most processes on a node): not reported.
    NotPython { reason: String, looks_python: bool },
    /// An interpreter whose environment does not opt in.
    NotOptedIn,
    /// Another reason, reported under `reason` in the metrics.
    Other { reason: &'static str, message: String },
    /// No room now (a cap or quota): considered again at the next rescan.
    Full { reason: &'static str, message: String },
}

impl Refusal {
    fn from_process(e: ProcessError) -> Self {
        match e {
            ProcessError::NoSuchProcess { .. } => Refusal::Gone,
            ProcessError::NotPython { pid, reason } => {
                Refusal::NotPython { reason, looks_python: discovery::looks_like_python(pid) }
            }
            e @ ProcessError::Analysis { .. } => {
                Refusal::Other { reason: "unsupported_interpreter", message: format!("{:#}", anyhow::Error::from(e)) }
            }
            e @ ProcessError::PermissionDenied { .. } => {
                Refusal::Other { reason: "permission", message: e.to_string() }
            }
            // Looking again would cost the same: not retried.
            e @ ProcessError::OverBudget { .. } => Refusal::Other { reason: "over_budget", message: e.to_string() },
            e => Refusal::Other { reason: "unreadable", message: format!("{:#}", anyhow::Error::from(e)) },
        }
    }
}

/// A decision reached on the blocking pool.
pub struct Evaluated {
    pid: u32,
    start: Option<u64>,
    tenant: Tenant,
    attempt: usize,
    /// The previous image's probes were closed first: forget its state.
    new_image: bool,
    result: Result<(PythonProcess, Service), Refusal>,
}

/// A process considered and not watched (a watched one is the session's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A decision is being made; `again` if the process executed a new
    /// image meanwhile, so the decision may be about the old one.
    Deciding { again: bool },
    /// `retry` if only a cap or quota was in the way.
    Refused { retry: bool },
}

/// The agent's view of the node's processes.
pub struct Node {
    opts: NodeOptions,
    metrics: SharedMetrics,
    cache: Arc<AnalysisCache>,
    /// Every process considered and not watched, by pid, with its start
    /// time (a reused pid is a new process). A pid is here or watched by
    /// the session, never both.
    known: HashMap<u32, (Option<u64>, State)>,
    jobs: JoinSet<Evaluated>,
    /// Room for decisions being made at once.
    deciding: Arc<tokio::sync::Semaphore>,
    /// Each tenant's pending decisions.
    tenants: Tenants,
    /// Each tenant's share of the agent loop for attaching.
    attach_shares: HashMap<Tenant, LoopShare>,
    /// Every tenant's attaches' share of the loop, together.
    all_attaches: LoopShare,
    /// Each tenant's ended processes' probes still being closed.
    backlog: DetachBacklog,
    /// (tenant, reason) of cap refusals warned about since the last rescan.
    warned: std::collections::HashSet<(Tenant, &'static str)>,
    /// Hits of processes that have ended, per target, for the metrics.
    ended_hits: BTreeMap<String, u64>,
}

impl Node {
    /// Nothing considered yet.
    pub fn new(opts: NodeOptions, metrics: SharedMetrics, cache: Arc<AnalysisCache>) -> Self {
        let deciding = Arc::new(tokio::sync::Semaphore::new(MAX_DECIDING));
        Node {
            tenants: Tenants::new(opts.max_per_tenant, MAX_QUEUED_PER_TENANT),
            attach_shares: HashMap::new(),
            all_attaches: LoopShare::new(ALL_ATTACHES),
            backlog: DetachBacklog::default(),
            warned: Default::default(),
            opts,
            metrics,
            cache,
            known: HashMap::new(),
            jobs: JoinSet::new(),
            deciding,
            ended_hits: BTreeMap::new(),
        }
    }

    /// Considers every process not considered yet (at start, and as the
    /// periodic safety net behind the exec tracepoint), and forgets those
    /// that are gone.
    pub fn rescan(&mut self, session: &Session) {
        let pids = match discovery::all_pids() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot list /proc");
                return;
            }
        };
        let alive: std::collections::HashSet<u32> = pids.iter().copied().collect();
        self.known.retain(|pid, _| alive.contains(pid));
        let now = std::time::Instant::now();
        self.attach_shares.retain(|_, share| !share.is_full(now));
        self.warned.clear();
        let mut watching = Watching::default();
        for pid in pids {
            self.consider_in(session, pid, false, &mut watching);
        }
    }

    /// Decides about `pid` unless that is already done for this process;
    /// `fresh` forgets an earlier decision (the process executed a new image).
    pub fn consider(&mut self, session: &Session, pid: u32, fresh: bool) {
        self.consider_in(session, pid, fresh, &mut Watching::default());
    }

    fn consider_in(&mut self, session: &Session, pid: u32, fresh: bool, watching: &mut Watching) {
        if pid == std::process::id() {
            return;
        }
        let start = discovery::start_time(pid);
        tracing::trace!(pid, fresh, ?start, known = ?self.known.get(&pid), "considering");
        if start.is_none() {
            return; // already gone
        }
        if session.watch_of(pid).is_some_and(|w| w.start_time == start) {
            return;
        }
        match self.known.get(&pid).copied() {
            Some((s, State::Deciding { again })) if s == start => {
                self.known.insert(pid, (s, State::Deciding { again: again || fresh }));
                return;
            }
            Some((s, State::Refused { retry }))
                if s == start && !fresh && (!retry || self.still_full(session, pid, watching)) =>
            {
                return;
            }
            _ => {}
        }
        let tenant = Tenant::of(pid);
        if let Err(message) = self.tenants.may_queue(&tenant) {
            self.metrics.refused("tenant_queue_full");
            debug!(pid, %tenant, "not watching for now: {message}");
            self.known.insert(pid, (start, State::Refused { retry: true }));
            return;
        }
        self.known.insert(pid, (start, State::Deciding { again: false }));
        self.spawn(pid, start, 0, Vec::new());
    }

    /// Whether the cap or quota that refused `pid` still holds, so deciding
    /// again would be refused the same way.
    fn still_full(&self, session: &Session, pid: u32, watching: &mut Watching) -> bool {
        session.watches().count() >= self.opts.max_processes
            || self.tenants.may_watch(watching.of(session.watches().map(|w| &w.tenant), &Tenant::of(pid))).is_err()
    }

    /// Decides about `pid` once `old` (its previous image's probes) are closed.
    fn spawn(&mut self, pid: u32, start: Option<u64>, attempt: usize, old: Vec<Buried>) {
        let (cache, attach_all, deciding) = (self.cache.clone(), self.opts.attach_all, self.deciding.clone());
        let tenant = Tenant::of(pid);
        let mine = self.tenants.enqueue(&tenant);
        let delay = attempt.checked_sub(1).map(|i| RETRY_DELAYS[i]);
        let new_image = !old.is_empty();
        self.jobs.spawn(async move {
            if new_image {
                let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            }
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let _room = tenant::room(mine, deciding).await;
            let result = tokio::task::spawn_blocking(move || evaluate(pid, attach_all, &cache))
                .await
                .unwrap_or_else(|e| Err(Refusal::Other { reason: "internal", message: e.to_string() }));
            Evaluated { pid, start, tenant, attempt, new_image, result }
        });
    }

    /// The next decision, once one is reached; pending forever when none
    /// is being made.
    pub async fn decided(&mut self) -> Evaluated {
        loop {
            match self.jobs.join_next().await {
                Some(Ok(e)) => return e,
                Some(Err(e)) => warn!(error = %e, "process decision task failed"),
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Acts on a decision: attaches, retries, or records the refusal.
    pub fn settle(&mut self, session: &mut Session, e: Evaluated) {
        let Evaluated { pid, start, tenant, attempt, new_image, result } = e;
        tracing::trace!(pid, attempt, ok = result.is_ok(), "decided");
        self.tenants.done(&tenant);
        if new_image {
            session.forget(pid);
        }
        if let Some((_, State::Deciding { again: true })) = self.known.get(&pid) {
            // It executed a new image while this was decided: decide again.
            self.known.insert(pid, (start, State::Deciding { again: false }));
            self.spawn(pid, start, 0, Vec::new());
            return;
        }
        if discovery::start_time(pid) != start {
            self.known.remove(&pid); // exited (or the pid was reused) meanwhile
            if start.is_some() && discovery::start_time(pid).is_some() {
                self.consider(session, pid, true);
            }
            return;
        }
        let refusal = match result {
            // Its tenant used its share of the loop: the same decision is
            // attached a little later, not made again.
            Ok(decided) if attempt < RETRY_DELAYS.len() && !self.attach_share_allows(&tenant) => {
                self.metrics.refused("tenant_loop_share");
                debug!(pid, %tenant, attempt, "attach deferred: its pod or cgroup used its share of the agent loop");
                let mine = self.tenants.enqueue(&tenant);
                self.jobs.spawn(async move {
                    tokio::time::sleep(RETRY_DELAYS[attempt]).await;
                    drop(mine);
                    let result = Ok(decided);
                    Evaluated { pid, start, tenant, attempt: attempt + 1, new_image: false, result }
                });
                return;
            }
            Ok((process, service)) => match self.attach(session, process, service, &tenant) {
                Ok(()) => {
                    self.known.remove(&pid);
                    self.publish(session);
                    return;
                }
                Err(r) => r,
            },
            Err(r) => r,
        };
        self.refused(pid, start, &tenant, attempt, refusal);
    }

    /// Acts on a refusal of decision `attempt` about `pid`: looks again
    /// later, or records it (and says why).
    fn refused(&mut self, pid: u32, start: Option<u64>, tenant: &Tenant, attempt: usize, refusal: Refusal) {
        let binary = discovery::exe(pid);
        match refusal {
            Refusal::Gone => {
                self.known.remove(&pid);
                return;
            }
            // A read that failed may be a race with the process itself (a
            // fork's child re-initialising its runtime): looked at again.
            Refusal::Other { reason: "unreadable", message } if attempt < RETRY_DELAYS.len() => {
                debug!(pid, binary, attempt, message, "process memory unreadable; looking again");
                self.spawn(pid, start, attempt + 1, Vec::new());
                return;
            }
            Refusal::NotPython { reason, looks_python: true } if attempt < RETRY_DELAYS.len() => {
                debug!(pid, binary, attempt, reason, "no interpreter mapped yet; looking again");
                self.spawn(pid, start, attempt + 1, Vec::new());
                return;
            }
            Refusal::NotPython { reason, looks_python } => {
                if looks_python {
                    self.metrics.refused("not_python");
                    info!(pid, binary, reason, "not watching: no CPython interpreter found");
                }
            }
            Refusal::NotOptedIn => {
                self.metrics.refused("not_opted_in");
                info!(pid, binary, "not watching: {} is not true in its environment", discovery::OPT_IN);
            }
            Refusal::Other { reason, message } => {
                self.metrics.refused(reason);
                warn!(pid, binary, reason, "not watching: {message}");
            }
            Refusal::Full { reason, message } => {
                self.metrics.refused(reason);
                // Once per tenant and reason between rescans: a storm is one
                // warning, its processes are counted.
                if self.warned.insert((tenant.clone(), reason)) {
                    warn!(pid, binary, %tenant, reason, "not watching for now (more alike until the next rescan are counted, not logged): {message}");
                } else {
                    debug!(pid, binary, %tenant, reason, "not watching for now: {message}");
                }
                self.known.insert(pid, (start, State::Refused { retry: true }));
                return;
            }
        }
        self.known.insert(pid, (start, State::Refused { retry: false }));
    }

    fn attach(
        &mut self,
        session: &mut Session,
        process: PythonProcess,
        service: Service,
        tenant: &Tenant,
    ) -> Result<(), Refusal> {
        let watched = session.watches().count();
        if watched >= self.opts.max_processes {
            self.metrics.cap_reached("processes");
            return Err(Refusal::Full {
                reason: "cap_processes",
                message: format!("already watching {watched} processes (--max-processes)"),
            });
        }
        let detaching = session.detaching();
        let theirs = self.backlog.of(tenant, session.detach_sequence().1);
        if detaching >= MAX_DETACHING || theirs >= MAX_DETACHING_PER_TENANT {
            self.metrics.cap_reached("detaching");
            return Err(Refusal::Full {
                reason: "detach_backlog",
                message: format!(
                    "{detaching} detached probes ({theirs} of its pod or cgroup's processes) \
                     are still being closed by the kernel"
                ),
            });
        }
        let theirs = session.watches().filter(|w| &w.tenant == tenant).count();
        if let Err(message) = self.tenants.may_watch(theirs) {
            self.metrics.cap_reached("processes_per_tenant");
            return Err(Refusal::Full { reason: "cap_tenant", message });
        }
        let (pid, binary) = (process.pid, process.object.path.clone());
        if !self.attach_share_allows(tenant) {
            return Err(Refusal::Full {
                reason: "tenant_loop_share",
                message: "its pod or cgroup (or every tenant together) used its share of the agent loop for attaching"
                    .into(),
            });
        }
        let share = self.attach_shares.entry(tenant.clone()).or_insert_with(|| LoopShare::new(TENANT_ATTACHES));
        let started = std::time::Instant::now();
        let attached = session.watch_as(process, service.clone());
        share.charge(started.elapsed());
        self.all_attaches.charge(started.elapsed());
        attached.map_err(|e| match e {
            super::AttachError::Process(p) => Refusal::from_process(p),
            e => Refusal::Other { reason: "attach_failed", message: format!("{:#}", anyhow::Error::from(e)) },
        })?;
        info!(pid, binary, %tenant, service = service.service.as_deref().unwrap_or(""), "watching");
        Ok(())
    }

    /// Whether `tenant`'s share of the loop for attaching (and every
    /// tenant's together) allows an attach now.
    fn attach_share_allows(&mut self, tenant: &Tenant) -> bool {
        let now = std::time::Instant::now();
        let share = self.attach_shares.entry(tenant.clone()).or_insert_with(|| LoopShare::new(TENANT_ATTACHES));
        share.allows(now) && self.all_attaches.allows(now)
    }

    /// A process executed a new image: whatever was decided about it no
    /// longer holds.
    pub fn exec(&mut self, session: &mut Session, pid: u32) {
        if !session.is_watched(pid) {
            self.consider(session, pid, true);
            return;
        }
        // The old probes would count the new image too (same task): they
        // are closed first, then the new image is decided about.
        let ended = session.end_taking(pid, Some("exec"));
        self.keep_counts(ended.totals);
        let old = ended.links;
        info!(pid, "detached: executed a new image");
        self.publish(session);
        let start = discovery::start_time(pid);
        self.known.insert(pid, (start, State::Deciding { again: false }));
        self.spawn(pid, start, 0, old);
    }

    /// A watched process is gone: keeps its counts for the metrics, then
    /// detaches.
    pub fn end(&mut self, session: &mut Session, pid: u32, status: Option<&str>) {
        let tenant = session.watch_of(pid).map(|w| w.tenant.clone());
        let (from, _) = session.detach_sequence();
        let totals = session.end(pid, status);
        self.keep_counts(totals);
        if let Some(tenant) = tenant {
            self.backlog.add(tenant, (from, session.detach_sequence().0));
        }
        self.known.remove(&pid);
        info!(pid, status, "detached");
        self.publish(session);
    }

    fn keep_counts(&mut self, totals: Vec<(crate::targets::Target, u64)>) {
        for (target, hits) in totals {
            *self.ended_hits.entry(target.to_string()).or_default() += hits;
        }
    }

    /// Applies the overhead budget, then copies the agent's state into the
    /// metrics.
    pub fn refresh(&mut self, session: &mut Session, rc: Option<&poller::Stats>) {
        if let Some(budget) = &self.opts.budget {
            let changes = session.enforce(budget);
            // `/processes` first: the metrics server runs on its own thread,
            // and a reader that sees a budget action counted must find the
            // process's new state too.
            if !changes.is_empty() {
                self.publish(session);
            }
            for c in changes {
                self.metrics.budget_action(c.action.name());
                let binary = session.watches().find(|w| w.process.pid == c.pid).map(|w| w.process.object.path.clone());
                let (pid, from, to, why) = (c.pid, &c.from, &c.to, c.why.as_deref().unwrap_or(""));
                let (percent, passes_per_sec) = (c.load.share * 100.0, c.load.passes_per_sec as u64);
                if c.action == Action::Resume {
                    info!(pid, binary, from, to, why, "overhead budget: attached again after a suspension");
                } else {
                    warn!(
                        pid,
                        binary,
                        action = c.action.name(),
                        percent_of_cpu = percent,
                        budget_percent = budget.share * 100.0,
                        passes_per_sec,
                        target_hits_per_sec = c.load.hits_per_sec,
                        from,
                        to,
                        why,
                        "overhead budget exceeded: moved to a cheaper strategy"
                    );
                }
            }
        }
        let m = &self.metrics;
        let mut hits = self.ended_hits.clone();
        for (target, n) in session.all_totals() {
            *hits.entry(target.to_string()).or_default() += n;
        }
        for (target, n) in &hits {
            m.hits(target, *n);
        }
        m.targets.set(session.targets().len() as i64);
        self.publish(session);
        m.kernel(&session.kernel_stats());
        let (cache_hits, cache_misses) = self.cache.stats();
        raise(&m.analysis_cache_hits, cache_hits);
        raise(&m.analysis_cache_misses, cache_misses);
        m.cap_reached_total("analysis_cache", self.cache.resets());
        for (cap, total) in session.walks_capped() {
            m.cap_reached_total(cap, total);
        }
        if let Some(rc) = rc {
            use std::sync::atomic::Ordering::Relaxed;
            raise(&m.rc_polls, rc.polls.load(Relaxed));
            raise(&m.rc_errors, rc.errors.load(Relaxed));
        }
        m.beat();
    }

    /// Publishes what is watched: `/processes`, then its gauges (a reader
    /// that sees a gauge move finds `/processes` already agreeing).
    fn publish(&self, session: &Session) {
        let m = &self.metrics;
        let processes = session.reports();
        m.set_processes(serde_json::to_string(&processes).unwrap_or_default());
        m.processes_watched.set(session.watches().count() as i64);
        m.probes.set(session.watches().map(|w| w.probes()).sum::<usize>() as i64);
        m.detaching.set(session.detaching() as i64);
        for strategy in [Strategy::PerCall, Strategy::Watch] {
            let n = session.watches().filter(|w| w.strategy() == Some(strategy)).count();
            m.strategy(strategy.name(), n as i64);
        }
        m.strategy("suspended", session.watches().filter(|w| w.suspension().is_some()).count() as i64);
        m.strategy("blind", session.watches().filter(|w| w.blindness().is_some()).count() as i64);
        m.probe_overhead.set(session.watches().filter_map(|w| w.meter.share).sum());
    }
}

/// Decides about one process: its opt-in, then its interpreter.
fn evaluate(pid: u32, attach_all: bool, cache: &AnalysisCache) -> Result<(PythonProcess, Service), Refusal> {
    let env = match Environ::read(pid) {
        Ok(env) => env,
        // Kernel threads and foreign namespaces: only an interpreter is worth a report.
        Err(e @ ProcessError::PermissionDenied { .. }) if !discovery::looks_like_python(pid) => {
            return Err(Refusal::NotPython { reason: e.to_string(), looks_python: false });
        }
        Err(e) => return Err(Refusal::from_process(e)),
    };
    if !attach_all && !env.opted_in {
        return Err(if discovery::looks_like_python(pid) {
            Refusal::NotOptedIn
        } else {
            Refusal::NotPython { reason: "not opted in".into(), looks_python: false }
        });
    }
    let process = pyproc::locate(pid, cache).map_err(Refusal::from_process)?;
    Ok((process, env.service))
}
