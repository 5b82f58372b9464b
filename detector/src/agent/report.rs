//! What the agent says about a watched process: one type for each entry of
//! `/processes` and the body of the `attached` event, so the two never
//! disagree and the tests read them typed.

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    ProcessWatch, Strategy, discovery::Service, exposure::Exposure, mode::Mode, process::Counting, watchpoints::Armed,
};
use crate::{
    bpf::{Link, ProbeKind},
    interp::sites::SiteRole,
    pyproc::distributions::Installed,
    targets::TargetSet,
};

/// A watched process, as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// The process.
    pub pid: u32,
    /// Its runtime id at the telemetry intake.
    pub runtime_id: String,
    /// The interpreter's binary (as the process names it).
    pub binary: String,
    /// CPython version.
    pub version: String,
    /// The mode's name, with `+reachability` when each target is reported
    /// once: a summary for people and the metrics.
    pub strategy: String,
    /// How it is observed now, with what that mode has.
    pub mode: ModeReport,
    /// Each target is reported once, not counted at every call.
    pub reachability: bool,
    /// How many targets are observed each way.
    pub targets_by_strategy: BTreeMap<TargetStrategy, usize>,
    /// Uprobes attached.
    pub probes: usize,
    /// Its probes' cost, as the overhead budget measured it.
    pub overhead_percent: Option<f64>,
    /// The last budget decision about it.
    pub budget: Option<String>,
    /// Reachability's sampled call rates of reached targets.
    pub sampled_calls_per_sec: BTreeMap<String, f64>,
    /// The service its hits are reported for.
    pub service: Service,
    /// The pod (or cgroup) it belongs to, which its quota is counted in.
    pub tenant: String,
    /// Times walks of its objects waited because it had used its share
    /// of the walkers' time, or were left to the safety net.
    pub walks_deferred: u64,
    /// Its events (hits, mostly) the full ring buffer dropped: reported
    /// late or not at all, while its counts stay exact.
    pub events_dropped: u64,
    /// 3.8-3.10 starts of code objects awaiting resolution that were not
    /// counted: it held its share of the kernel's map of them.
    pub starts_refused: u64,
    /// What it has of the dependencies whose versions the catalog
    /// constrains (normalized names), once read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<BTreeMap<String, Installed>>,
    /// For each target whose advisory constrains its dependency's version,
    /// what that version means here (whether it is watched, and why).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposures: BTreeMap<String, Exposure>,
    /// Who first called each target reached, where user code did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub callers: BTreeMap<String, super::callers::Caller>,
}

/// A process's mode, as reported: each carries only what it has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum ModeReport {
    /// Uprobes at every per-call site.
    PerCall {
        /// Why watchpoints were asked for and not used.
        watch_fallback: Option<String>,
        /// Threads whose state was pre-filled (3.11+).
        prefilled_threads: usize,
        /// Target functions whose identity was pre-filled (3.8-3.10).
        prefilled_identities: usize,
    },
    /// Hardware watchpoints on the targets' body starts.
    Watch {
        /// Body starts known under watchpoints.
        watched_units: usize,
        /// Whether those share the debug registers over time.
        rotating: bool,
        /// Targets whose module has not run yet.
        pending_targets: usize,
    },
    /// Over budget: only the guards attached, every target blind until it
    /// is tried again.
    Suspended {
        /// Seconds until it is tried again.
        for_secs: u64,
        /// Why.
        why: String,
    },
    /// Its JIT started: nothing attached, nothing counted from then on.
    Blind {
        /// Why.
        why: String,
    },
    /// Nothing attached any more.
    Detached,
}

/// How one target is observed in one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetStrategy {
    /// Its body start is under a watchpoint.
    Watch,
    /// Its module has not run yet: found when it does.
    Pending,
    /// Every call is probed.
    PerCall,
    /// Seen, and no longer paid for.
    Reached,
    /// Not observed: the version of its dependency here is not one its
    /// advisory affects (or is being read).
    Unwatched,
    /// Not observed (suspended, blind, or not found).
    None,
}

/// The `attached` event: the process's report, and how each target is
/// observed, at which sites.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttachedReport {
    /// The process.
    #[serde(flatten)]
    pub process: ProcessReport,
    /// The active targets.
    pub targets: Vec<String>,
    /// How each is observed.
    pub target_strategies: BTreeMap<String, TargetStrategy>,
    /// The sites probed now (under watchpoints, the rare-event ones only).
    pub sites: Vec<SiteReport>,
}

/// The `armed` event: targets found after the attach, now watched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmedReport {
    /// The process.
    pub pid: u32,
    /// The targets armed.
    pub targets: Vec<String>,
    /// The code objects each target is watched in now (hex addresses): one
    /// per interpreter that defines it.
    pub code_objects: BTreeMap<String, Vec<String>>,
    /// What found them: their module's body, or a look in `sys.modules`
    /// and why it was made.
    pub source: String,
    /// How long after their module body started they were armed.
    pub latency_us: Option<u64>,
}

/// A probed site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    /// The interpreter function or handler it is in.
    pub handler: String,
    /// Its address in the binary.
    pub addr: u64,
    /// Its address in the process.
    pub runtime_addr: u64,
    /// The instruction probed.
    pub instruction: String,
    /// Whether the kernel emulates it (no single-step).
    pub emulated: bool,
}

impl ProcessWatch {
    /// This process as reported, `targets` being the active set.
    pub fn report(&self, targets: &TargetSet) -> ProcessReport {
        ProcessReport {
            pid: self.process.pid,
            runtime_id: self.runtime_id().to_string(),
            binary: self.process.object.path.clone(),
            version: self.process.analysis.version.to_string(),
            strategy: self.mode(),
            mode: self.mode_report(),
            reachability: self.reachability(),
            targets_by_strategy: self.targets_by_strategy(targets.len()),
            probes: self.probes(),
            overhead_percent: self.meter.share.map(|s| s * 100.0),
            budget: self.budget_note.clone(),
            sampled_calls_per_sec: self
                .samples
                .rates()
                .into_iter()
                .filter_map(|(t, r)| Some((targets.get(t)?.to_string(), r)))
                .collect(),
            service: self.service.clone(),
            tenant: self.tenant.to_string(),
            walks_deferred: self.walks.deferrals,
            events_dropped: 0,
            starts_refused: 0,
            dependencies: self.versions.as_ref().map(|v| v.installed.clone()),
            exposures: BTreeMap::new(),
            callers: self.callers_report(targets),
        }
    }

    /// The `attached` event for this process.
    pub fn attached_report(&self, targets: &TargetSet) -> AttachedReport {
        let bias = self.process.bias;
        let sites = (self.process.analysis.sites.iter())
            .filter(|s| self.probes_role(s.role))
            .map(|s| SiteReport {
                handler: s.handler.clone(),
                addr: s.addr,
                runtime_addr: bias.wrapping_add(s.addr),
                instruction: s.instruction.clone(),
                emulated: s.emulated,
            })
            .collect();
        AttachedReport {
            process: self.report(targets),
            targets: targets.iter().map(|(t, _)| t.to_string()).collect(),
            target_strategies: targets.iter().map(|(t, id)| (t.to_string(), self.target_strategy(id))).collect(),
            sites,
        }
    }

    fn mode_report(&self) -> ModeReport {
        match &self.mode {
            Mode::PerCall(pc) => ModeReport::PerCall {
                watch_fallback: pc.fallback.clone(),
                prefilled_threads: pc.links.prefilled_threads,
                prefilled_identities: pc.links.prefilled_identities,
            },
            Mode::Watch(w) => ModeReport::Watch {
                watched_units: w.armed.units(),
                rotating: w.armed.rotating(),
                pending_targets: w.armed.pending().len(),
            },
            Mode::Suspended(s) => ModeReport::Suspended {
                for_secs: s.until.saturating_duration_since(Instant::now()).as_secs(),
                why: s.why.clone(),
            },
            Mode::Blind(why) => ModeReport::Blind { why: why.clone() },
            Mode::Detached => ModeReport::Detached,
        }
    }

    /// The strategy its probes use, if any are attached.
    pub fn strategy(&self) -> Option<Strategy> {
        match self.mode {
            Mode::PerCall(_) => Some(Strategy::PerCall),
            Mode::Watch(_) => Some(Strategy::Watch),
            Mode::Suspended(_) | Mode::Blind(_) | Mode::Detached => None,
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

    /// Whether a JIT that starts in it is seen (its optimizer's entry is
    /// probed while it is attached).
    pub(crate) fn tier2_probed(&self) -> bool {
        let start = self.process.analysis.tier2.as_ref().map(|t| t.start);
        matches!(start, Some(crate::interp::tier2::StartSeen::Probed { .. }))
    }

    /// Why it is blind (its JIT started), if it is.
    pub fn blindness(&self) -> Option<&str> {
        match &self.mode {
            Mode::Blind(why) => Some(why),
            _ => None,
        }
    }

    /// The watchpoints, under watch.
    pub(crate) fn armed_mut(&mut self) -> Option<&mut Armed> {
        match &mut self.mode {
            Mode::Watch(w) => Some(&mut w.armed),
            _ => None,
        }
    }

    /// The `armed` event for `found` (ids of `targets`), found by `source`
    /// `latency` after their module body started.
    pub(crate) fn armed_report(
        &self,
        targets: &TargetSet,
        found: &[u32],
        source: &str,
        latency: Option<std::time::Duration>,
    ) -> ArmedReport {
        let named: Vec<(u32, String)> =
            found.iter().filter_map(|id| Some((*id, targets.get(*id)?.to_string()))).collect();
        let code_objects = named
            .iter()
            .map(|(id, name)| {
                let codes = self.armed().map(|a| a.code_objects(*id)).unwrap_or_default();
                (name.clone(), codes.into_iter().map(|c| format!("{c:#x}")).collect())
            })
            .collect();
        ArmedReport {
            pid: self.process.pid,
            targets: named.into_iter().map(|(_, name)| name).collect(),
            code_objects,
            source: source.to_owned(),
            latency_us: latency.map(|l| l.as_micros() as u64),
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

    /// How `target` is observed in this process.
    pub fn target_strategy(&self, target: u32) -> TargetStrategy {
        match &self.mode {
            _ if self.unwatched.contains(&target) => TargetStrategy::Unwatched,
            Mode::Watch(w) if w.armed.watches(target) => TargetStrategy::Watch,
            Mode::Watch(w) if w.armed.pending().contains_key(&target) => TargetStrategy::Pending,
            Mode::PerCall(_) => TargetStrategy::PerCall,
            _ if self.counting.seen(target) => TargetStrategy::Reached,
            _ => TargetStrategy::None,
        }
    }

    /// How many of its `targets` are observed each way (as
    /// [`ProcessWatch::target_strategy`] says), without a pass over them:
    /// a node may have thousands of targets and processes.
    pub fn targets_by_strategy(&self, targets: usize) -> BTreeMap<TargetStrategy, usize> {
        let (watched, pending) = self.armed().map_or((0, 0), |a| (a.targets(), a.pending().len()));
        let unwatched = self.unwatched.len();
        let rest = targets.saturating_sub(watched + pending + unwatched);
        let per_call = matches!(self.mode, Mode::PerCall(_));
        // Reached targets are disarmed, so none of them is among the watched.
        let reached = if per_call { 0 } else { self.seen().map_or(0, |r| r.len().min(rest)) };
        let other = if per_call { TargetStrategy::PerCall } else { TargetStrategy::None };
        [
            (TargetStrategy::Watch, watched),
            (TargetStrategy::Pending, pending),
            (TargetStrategy::Reached, reached),
            (TargetStrategy::Unwatched, unwatched),
            (other, rest - reached),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }

    /// What it is watched with, as reported: `per-call`, `watch`,
    /// `suspended` or `detached`, and `+reachability` when targets are
    /// reported once.
    pub fn mode(&self) -> String {
        let base = match self.mode {
            Mode::PerCall(_) => "per-call",
            Mode::Watch(_) => "watch",
            Mode::Suspended(_) => "suspended",
            Mode::Blind(_) => "blind",
            Mode::Detached => "detached",
        };
        if self.reachability() { format!("{base}+reachability") } else { base.to_owned() }
    }

    fn links(&self) -> Vec<&Link> {
        match &self.mode {
            Mode::PerCall(pc) => pc.links.links.iter().chain(&pc.guards).collect(),
            Mode::Watch(w) => w.guards.iter().chain(&w.imports).collect(),
            Mode::Suspended(s) => s.guards.iter().collect(),
            Mode::Blind(_) | Mode::Detached => Vec::new(),
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
            ProbeKind::Tier2Start => role == SiteRole::Tier2Start,
            ProbeKind::Empty => true,
        })
    }
}
