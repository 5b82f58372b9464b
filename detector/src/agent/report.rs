//! What the agent says about a watched process: one type for each entry of
//! `/processes` and the body of the `attached` event, so the two never
//! disagree and the tests read them typed.

use std::{collections::BTreeMap, time::Instant};

use serde::{Deserialize, Serialize};

use super::{ProcessWatch, discovery::Service};
use crate::targets::TargetSet;

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
}
