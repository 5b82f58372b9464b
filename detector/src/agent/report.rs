//! What the agent says about a watched process: one type for each entry of
//! `/processes` and the body of the `attached` event, so the two never
//! disagree and the tests read them typed.

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    ProcessWatch, Strategy,
    discovery::Service,
    process::{Counting, Mode},
    watchpoints::Armed,
};
use crate::{
    bpf::{Link, ProbeKind},
    interp::sites::SiteRole,
    targets::TargetSet,
};

/// A watched process, as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// The process.
    pub pid: u32,
    /// The interpreter's binary (as the process names it).
    pub binary: String,
    /// CPython version.
    pub version: String,
    /// `per-call`, `watch`, `suspended` or `detached`, with `+reachability`
    /// when each target is reported once.
    pub strategy: String,
    /// How many targets are observed each way: `watch`, `pending`,
    /// `per-call`, `reached`, `none`.
    pub targets_by_strategy: BTreeMap<String, usize>,
    /// Uprobes attached.
    pub probes: usize,
    /// Body starts known under watchpoints.
    pub watched_units: usize,
    /// Whether those share the debug registers over time.
    pub rotating: bool,
    /// Targets whose module has not run yet.
    pub pending_targets: usize,
    /// Why watchpoints were asked for and not used.
    pub watch_fallback: Option<String>,
    /// Its probes' cost, as the overhead budget measured it.
    pub overhead_percent: Option<f64>,
    /// The last budget decision about it.
    pub budget: Option<String>,
    /// Over budget: nothing attached, every target blind until it is tried
    /// again.
    pub suspended: Option<Suspended>,
    /// Reachability's sampled call rates of reached targets.
    pub sampled_calls_per_sec: BTreeMap<String, f64>,
    /// The service its hits are reported for.
    pub service: Service,
}

/// A suspension, as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suspended {
    /// Seconds until it is tried again.
    pub for_secs: u64,
    /// Why.
    pub why: String,
}

impl ProcessWatch {
    /// This process as reported, `targets` being the active set.
    pub fn report(&self, targets: &TargetSet) -> ProcessReport {
        let now = Instant::now();
        ProcessReport {
            pid: self.process.pid,
            binary: self.process.object.path.clone(),
            version: self.process.analysis.version.to_string(),
            strategy: self.mode(),
            targets_by_strategy: self
                .targets_by_strategy(targets.len())
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            probes: self.probes(),
            watched_units: self.watched_units(),
            rotating: self.rotating(),
            pending_targets: self.pending_targets(),
            watch_fallback: self.fallback().map(str::to_owned),
            overhead_percent: self.meter.share.map(|s| s * 100.0),
            budget: self.budget_note.clone(),
            suspended: self.suspension().map(|(until, why)| Suspended {
                for_secs: until.saturating_duration_since(now).as_secs(),
                why: why.to_owned(),
            }),
            sampled_calls_per_sec: self
                .samples
                .rates()
                .into_iter()
                .filter_map(|(t, r)| Some((targets.get(t)?.to_string(), r)))
                .collect(),
            service: self.service.clone(),
        }
    }

    /// The strategy its probes use, if any are attached.
    pub fn strategy(&self) -> Option<Strategy> {
        match self.mode {
            Mode::PerCall(_) => Some(Strategy::PerCall),
            Mode::Watch(_) => Some(Strategy::Watch),
            Mode::Suspended(_) | Mode::Detached => None,
        }
    }

    /// Whether it is in reachability mode.
    pub fn reachability(&self) -> bool {
        matches!(self.counting, Counting::Reachability(_))
    }

    /// When a suspended process is tried again, and why it was suspended.
    pub fn suspension(&self) -> Option<(Instant, &str)> {
        match &self.mode {
            Mode::Suspended(s) => Some((s.until, &s.why)),
            _ => None,
        }
    }

    /// Why watchpoints were asked for and not used.
    pub fn fallback(&self) -> Option<&str> {
        match &self.mode {
            Mode::PerCall(pc) => pc.fallback.as_deref(),
            _ => None,
        }
    }

    /// Threads and 3.8-3.10 functions pre-filled for per-call probes.
    pub fn prefilled(&self) -> (usize, usize) {
        match &self.mode {
            Mode::PerCall(pc) => (pc.links.prefilled_threads, pc.links.prefilled_identities),
            _ => (0, 0),
        }
    }

    /// The watchpoints, under watch.
    pub(crate) fn armed_mut(&mut self) -> Option<&mut Armed> {
        match &mut self.mode {
            Mode::Watch(w) => Some(&mut w.armed),
            _ => None,
        }
    }

    pub(super) fn armed(&self) -> Option<&Armed> {
        match &self.mode {
            Mode::Watch(w) => Some(&w.armed),
            _ => None,
        }
    }

    /// The targets seen, under reachability.
    pub(crate) fn seen(&self) -> Option<&HashSet<u32>> {
        match &self.counting {
            Counting::Reachability(s) => Some(s),
            Counting::Exact => None,
        }
    }

    /// How `target` is observed in this process: `watch`, `per-call`,
    /// `pending` (its module has not run yet: found when it does),
    /// `reached` (seen, and no longer paid for) or `none` (suspended).
    pub fn target_strategy(&self, target: u32) -> &'static str {
        match &self.mode {
            Mode::Watch(w) if w.armed.watches(target) => "watch",
            Mode::Watch(w) if w.armed.pending().contains_key(&target) => "pending",
            Mode::PerCall(_) => "per-call",
            _ if self.counting.seen(target) => "reached",
            _ => "none",
        }
    }

    /// How many of its `targets` are observed each way (as
    /// [`ProcessWatch::target_strategy`] says), without a pass over them:
    /// a node may have thousands of targets and processes.
    pub fn targets_by_strategy(&self, targets: usize) -> BTreeMap<&'static str, usize> {
        let (watched, pending) = self.armed().map_or((0, 0), |a| (a.targets(), a.pending().len()));
        let rest = targets.saturating_sub(watched + pending);
        let per_call = matches!(self.mode, Mode::PerCall(_));
        // Reached targets are disarmed, so none of them is among the watched.
        let reached = if per_call { 0 } else { self.seen().map_or(0, |r| r.len().min(rest)) };
        let other = if per_call { "per-call" } else { "none" };
        [("watch", watched), ("pending", pending), ("reached", reached), (other, rest - reached)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Whether its watchpoints share the debug registers over time.
    pub fn rotating(&self) -> bool {
        self.armed().is_some_and(|a| a.rotating())
    }

    /// Targets waiting for their module to run.
    pub fn pending_targets(&self) -> usize {
        self.armed().map_or(0, |a| a.pending().len())
    }

    /// Units under a watchpoint.
    pub fn watched_units(&self) -> usize {
        self.armed().map_or(0, |a| a.units())
    }

    /// What it is watched with, as reported: `per-call`, `watch`,
    /// `suspended` or `detached`, and `+reachability` when targets are
    /// reported once.
    pub fn mode(&self) -> String {
        let base = match self.mode {
            Mode::PerCall(_) => "per-call",
            Mode::Watch(_) => "watch",
            Mode::Suspended(_) => "suspended",
            Mode::Detached => "detached",
        };
        if self.reachability() { format!("{base}+reachability") } else { base.to_owned() }
    }

    fn links(&self) -> Vec<&Link> {
        match &self.mode {
            Mode::PerCall(pc) => pc.links.links.iter().chain(&pc.dealloc).collect(),
            Mode::Watch(w) => w.dealloc.iter().chain(&w.imports).collect(),
            Mode::Suspended(_) | Mode::Detached => Vec::new(),
        }
    }

    /// Number of uprobes attached (watchpoints are counted apart).
    pub fn probes(&self) -> usize {
        self.links().len()
    }

    /// Whether a uprobe is attached at the sites of `role`.
    pub fn probes_role(&self, role: SiteRole) -> bool {
        self.links().iter().any(|l| match l.kind() {
            ProbeKind::EvalEntry | ProbeKind::EvalCall => role == SiteRole::EvalEntry,
            ProbeKind::Resume => role == SiteRole::Resume,
            ProbeKind::FuncNew => role == SiteRole::FunctionNew,
            ProbeKind::CodeDealloc => role == SiteRole::CodeDealloc,
            ProbeKind::ModuleExec => role == SiteRole::ModuleExec,
            ProbeKind::Empty => true,
        })
    }
}
