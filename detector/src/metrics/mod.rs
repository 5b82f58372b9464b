//! The agent's Prometheus metrics, and the HTTP server for `/metrics`,
//! `/healthz` and `/processes`. Everything here is read by the server task and
//! written by the agent loop; values that live elsewhere (kernel counters, the
//! RC poller's, the analysis cache's) are copied in on each refresh.

pub mod server;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Active targets.
    pub targets: Gauge,
    /// Processes with probes attached.
    pub processes_watched: Gauge,
    /// Watched processes by strategy.
    strategies: Family<Labels, Gauge>,
    /// Processes considered and not watched, by reason.
    refused: Family<Labels, Counter>,
    /// Probes (uprobe links) attached.
    pub probes: Gauge,
    /// Probes detached whose unregistration the kernel has not finished.
    pub detaching: Gauge,
    /// Exact hits per target, over this agent run.
    hits: Family<Labels, Counter>,
    /// Kernel counters (ring-buffer drops among them), by name.
    kernel: Family<Labels, Counter>,
    /// Records the ring buffer could not take.
    pub ringbuf_drops: Counter,
    /// Remote Configuration polls and failed polls.
    pub rc_polls: Counter,
    /// Remote Configuration polls that failed or were rejected.
    pub rc_errors: Counter,
    /// Interpreter analyses answered from the cache, and computed.
    pub analysis_cache_hits: Counter,
    /// Interpreter analyses computed.
    pub analysis_cache_misses: Counter,
    /// Times a configured cap stopped something, by cap.
    caps: Family<Labels, Counter>,
    /// Overhead-budget decisions, by action.
    budget_actions: Family<Labels, Counter>,
    /// Requests to the telemetry intake, by result.
    telemetry_requests: Family<Labels, Counter>,
    /// Telemetry reports dropped, by reason.
    telemetry_dropped: Family<Labels, Counter>,
    /// Runtimes the telemetry sender holds state for.
    pub telemetry_runtimes: Gauge,
    /// Estimated CPU (in cores) the watched processes spend in probes.
    pub probe_overhead: Gauge<f64, AtomicU64>,
    /// What `/processes` serves: the watched processes, as JSON.
    processes: Mutex<String>,
    /// Last time (seconds since the epoch) the agent loop went round.
    heartbeat: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("detector"),
            targets: Gauge::default(),
            processes_watched: Gauge::default(),
            strategies: Family::default(),
            refused: Family::default(),
            probes: Gauge::default(),
            detaching: Gauge::default(),
            hits: Family::default(),
            kernel: Family::default(),
            ringbuf_drops: Counter::default(),
            rc_polls: Counter::default(),
            rc_errors: Counter::default(),
            analysis_cache_hits: Counter::default(),
            analysis_cache_misses: Counter::default(),
            caps: Family::default(),
            budget_actions: Family::default(),
            telemetry_requests: Family::default(),
            telemetry_dropped: Family::default(),
            telemetry_runtimes: Gauge::default(),
            probe_overhead: Gauge::default(),
            processes: Mutex::new("[]".into()),
            heartbeat: AtomicU64::new(now()),
        };
        let r = &mut m.registry;
        r.register("targets", "Active targets", m.targets.clone());
        r.register("processes_watched", "Python processes with probes attached", m.processes_watched.clone());
        r.register("processes_by_strategy", "Watched processes by strategy", m.strategies.clone());
        r.register("processes_refused", "Processes considered and not watched, by reason", m.refused.clone());
        r.register("probes_attached", "Uprobes attached", m.probes.clone());
        r.register(
            "probes_detaching",
            "Uprobes detached and waiting for the kernel to unregister them",
            m.detaching.clone(),
        );
        r.register("hits", "Exact starts of each target's body, over this agent run", m.hits.clone());
        r.register("kernel_events", "The eBPF programs' counters, by name", m.kernel.clone());
        r.register("ringbuf_drops", "Records lost because the ring buffer was full", m.ringbuf_drops.clone());
        r.register("rc_polls", "Remote Configuration polls", m.rc_polls.clone());
        r.register("rc_errors", "Remote Configuration polls that failed or were rejected", m.rc_errors.clone());
        r.register(
            "analysis_cache_hits",
            "Interpreter analyses answered from the cache",
            m.analysis_cache_hits.clone(),
        );
        r.register("analysis_cache_misses", "Interpreter analyses computed", m.analysis_cache_misses.clone());
        r.register("cap_reached", "Times a configured cap refused something, by cap", m.caps.clone());
        r.register(
            "budget_actions",
            "Processes moved to a cheaper strategy (or suspended, or resumed) by the overhead budget, by action",
            m.budget_actions.clone(),
        );
        r.register(
            "telemetry_requests",
            "Requests to the Datadog Agent's telemetry intake, by result (ok, failed and retried, rejected)",
            m.telemetry_requests.clone(),
        );
        r.register(
            "telemetry_dropped",
            "Telemetry reports dropped, by reason (queue_full, runtimes_cap, metadata_cap, rejected)",
            m.telemetry_dropped.clone(),
        );
        r.register(
            "telemetry_runtimes",
            "Runtimes (watched processes, and ended ones with reports still to send) the telemetry sender holds",
            m.telemetry_runtimes.clone(),
        );
        r.register(
            "probe_overhead_cpus",
            "Estimated CPU, in cores, that the watched processes spend in probes (passes/s x measured cost)",
            m.probe_overhead.clone(),
        );
        m
    }
}

impl Metrics {
    /// A process was considered and not watched.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&vec![("reason", reason.to_owned())]).inc();
    }

    /// A cap stopped something.
    pub fn cap_reached(&self, cap: &'static str) {
        self.caps.get_or_create(&vec![("cap", cap.to_owned())]).inc();
    }

    /// The overhead budget acted on a process.
    pub fn budget_action(&self, action: &'static str) {
        self.budget_actions.get_or_create(&vec![("action", action.to_owned())]).inc();
    }

    /// A request to the telemetry intake ended with `result`.
    pub fn telemetry_request(&self, result: &'static str) {
        self.telemetry_requests.get_or_create(&vec![("result", result.to_owned())]).inc();
    }

    /// `n` telemetry reports were dropped for `reason`.
    pub fn telemetry_dropped(&self, reason: &'static str, n: u64) {
        self.telemetry_dropped.get_or_create(&vec![("reason", reason.to_owned())]).inc_by(n);
    }

    /// Sets how many watched processes use `strategy`.
    pub fn strategy(&self, strategy: &'static str, processes: i64) {
        self.strategies.get_or_create(&vec![("strategy", strategy.to_owned())]).set(processes);
    }

    /// Raises the count of `cap` to a total kept elsewhere.
    pub fn cap_reached_total(&self, cap: &'static str, total: u64) {
        raise(&self.caps.get_or_create(&vec![("cap", cap.to_owned())]), total);
    }

    /// Raises the hit counter of `target` to `total`.
    pub fn hits(&self, target: &str, total: u64) {
        raise(&self.hits.get_or_create(&vec![("target", target.to_owned())]), total);
    }

    /// Copies in the kernel's counters.
    pub fn kernel(&self, stats: &[(&str, u64)]) {
        for (name, value) in stats {
            raise(&self.kernel.get_or_create(&vec![("counter", (*name).to_owned())]), *value);
            if *name == detector_common::stats::NAMES[detector_common::stats::RINGBUF_DROPS as usize] {
                raise(&self.ringbuf_drops, *value);
            }
        }
    }

    /// Replaces what `/processes` serves.
    pub fn set_processes(&self, json: String) {
        *self.processes.lock().unwrap() = json;
    }

    /// The agent loop is alive.
    pub fn beat(&self) {
        self.heartbeat.store(now(), Ordering::Relaxed);
    }

    /// Seconds since the agent loop last went round.
    pub fn since_beat(&self) -> u64 {
        now().saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    fn processes(&self) -> String {
        self.processes.lock().unwrap().clone()
    }
}

/// Raises a counter to a total kept elsewhere (counters only go up).
pub fn raise(c: &Counter, total: u64) {
    let have = c.get();
    if total > have {
        c.inc_by(total - have);
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Shared between the agent loop and the server.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::default();
        m.refused("not_opted_in");
        m.refused("not_opted_in");
        m.hits("a.b:f", 3);
        m.hits("a.b:f", 2); // a total, never lowered
        m.cap_reached("processes");
        let text = m.encode();
        assert!(text.contains("detector_processes_refused_total{reason=\"not_opted_in\"} 2"), "{text}");
        assert!(text.contains("detector_hits_total{target=\"a.b:f\"} 3"), "{text}");
        assert!(text.contains("detector_cap_reached_total{cap=\"processes\"} 1"), "{text}");
        assert!(text.contains("# TYPE detector_processes_watched gauge"), "{text}");
    }
}
