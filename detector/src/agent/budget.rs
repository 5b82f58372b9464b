//! The overhead budget: what each watched process pays for being watched,
//! and what to do when that exceeds the operator's bound.
//!
//! A process's cost is its probe passes per second (every Python call under
//! the per-call strategy, every watchpoint trap under watch; counted in the
//! kernel in the process's slot) times the cost of one pass, measured on this
//! node when the agent starts. Over budget, a process moves down a ladder of
//! cheaper strategies: per-call -> watch -> watch with reachability (a target
//! is disarmed once seen) -> suspended (nothing attached, tried again later).

use std::{collections::VecDeque, time::Duration, time::Instant};

use tracing::info;

use super::Strategy;
use crate::bpf::{BpfError, ProbeKind, Probes};

/// Samples kept per process: the rate is taken over about this many seconds.
const WINDOW: usize = 6;
/// The shortest span a rate is computed over, so an import burst at start
/// (seconds of dense calls) does not decide alone.
const MIN_SPAN: Duration = Duration::from_secs(3);

/// The detector's per-pass cost above the empty probe's: the bench measures
/// 1.06-1.15x for a miss (nearly every pass) and up to 1.27x for a hit
/// (docs/BENCHMARKS.md).
const PER_CALL_OVER_FLOOR: f64 = 1.15;

/// Calls made per calibration: enough for a stable mean, tens of ms each.
const EMULATED_CALLS: u32 = 20_000;
const STEPPED_CALLS: u32 = 2_000;
const WATCH_READS: u32 = 2_000;

/// What one probe pass costs the watched process, in ns.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Costs {
    /// A pass of a per-call probe: an emulated uprobe site with the
    /// detector's program (the empty probe's cost times the bench's ratio).
    pub per_call_ns: f64,
    /// A watchpoint trap with the watch program.
    pub watch_ns: f64,
    /// The empty program at a site the kernel emulates (the detector's
    /// sites are such).
    pub uprobe_emulated_ns: f64,
    /// The empty program at a site the kernel must single-step out of line.
    pub uprobe_stepped_ns: f64,
}

impl Costs {
    /// Measured on the machine of docs/BENCHMARKS.md, for when calibration
    /// cannot run.
    pub const FALLBACK: Costs =
        Costs { per_call_ns: 450.0, watch_ns: 14_000.0, uprobe_emulated_ns: 390.0, uprobe_stepped_ns: 14_000.0 };

    /// Measures them on this node: uprobes running the empty program on two
    /// functions of the agent itself (one the kernel emulates, one it
    /// single-steps) and a watchpoint on one of its own bytes, each timed
    /// against the same loop unprobed. About 0.5 s.
    pub fn calibrate(probes: &mut Probes) -> Result<Costs, BpfError> {
        let uprobe_emulated_ns = uprobe_cost(probes, emulated_site, EMULATED_CALLS)?;
        let uprobe_stepped_ns = uprobe_cost(probes, stepped_site, STEPPED_CALLS)?;

        static WATCHED_BYTE: u8 = 0;
        // SAFETY: no arguments, cannot fail.
        let tid = unsafe { libc::gettid() } as u32;
        let addr = &raw const WATCHED_BYTE as u64;
        let base = time_reads(&WATCHED_BYTE, WATCH_READS);
        let watchpoint = probes.attach_watch(tid, addr)?;
        let trapped = time_reads(&WATCHED_BYTE, WATCH_READS);
        drop(watchpoint);

        let costs = Costs {
            per_call_ns: uprobe_emulated_ns * PER_CALL_OVER_FLOOR,
            watch_ns: ((trapped - base) / WATCH_READS as f64).max(1.0),
            uprobe_emulated_ns,
            uprobe_stepped_ns,
        };
        info!(
            per_call_ns = costs.per_call_ns,
            watch_ns = costs.watch_ns,
            uprobe_stepped_ns = costs.uprobe_stepped_ns,
            "measured the cost of a probe pass"
        );
        Ok(costs)
    }

    /// The cost of one pass under `strategy`.
    pub fn of(&self, strategy: Strategy) -> f64 {
        match strategy {
            Strategy::PerCall => self.per_call_ns,
            Strategy::Watch | Strategy::Auto => self.watch_ns,
        }
    }
}

/// A site the kernel emulates (`nop`), like the detector's.
#[unsafe(naked)]
extern "C" fn emulated_site() {
    core::arch::naked_asm!("nop", "ret")
}

/// A site the kernel cannot emulate (a store): it copies the instruction
/// out of line and single-steps it, a second trap.
#[unsafe(naked)]
extern "C" fn stepped_site() {
    core::arch::naked_asm!("mov qword ptr [rsp - 8], rdi", "ret")
}

/// ns per call that a uprobe with the empty program adds to `site`.
fn uprobe_cost(probes: &mut Probes, site: extern "C" fn(), n: u32) -> Result<f64, BpfError> {
    let not_found = |what| BpfError::Io { what, source: std::io::ErrorKind::NotFound.into() };
    let offset = own_file_offset(site as *const () as u64).ok_or(not_found("finding a calibration site"))?;
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|source| BpfError::Io { what: "reading /proc/self/exe", source })?;
    let base = time_calls(site, n);
    let cookie = detector_common::SiteCookie::new(0, detector_common::CHECK_NONE);
    let link = probes.attach(ProbeKind::Empty, &exe, offset, std::process::id(), cookie)?;
    let probed = time_calls(site, n);
    probes.detach(link);
    Ok(((probed - base) / n as f64).max(1.0))
}

fn time_calls(site: extern "C" fn(), n: u32) -> f64 {
    let site = std::hint::black_box(site);
    let t = Instant::now();
    for _ in 0..n {
        site();
    }
    t.elapsed().as_nanos() as f64
}

fn time_reads(byte: &u8, n: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: a reference is valid to read.
        unsafe { std::ptr::read_volatile(byte) };
    }
    t.elapsed().as_nanos() as f64
}

/// File offset in this executable of the code at `addr`.
fn own_file_offset(addr: u64) -> Option<u64> {
    let maps = crate::pyproc::maps::read(std::process::id()).ok()?;
    let m = maps.iter().find(|m| m.start <= addr && addr < m.end && m.is_file())?;
    Some(addr - m.start + m.offset)
}

/// The operator's bound and what a pass costs.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Most a process may pay, as a share of one CPU (0.01 is 1%).
    pub share: f64,
    /// Per-pass costs.
    pub costs: Costs,
    /// How long a suspended process waits before it is probed again.
    pub retry: Duration,
}

/// What a process over budget is moved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Within budget.
    Keep,
    /// Per-call -> watchpoints on the targets' body starts.
    Watch,
    /// Per-call -> watchpoints, with each target disarmed once seen (its
    /// calls alone would exceed the budget under watch).
    WatchReach,
    /// Watch -> each target disarmed once seen.
    Reach,
    /// Nothing cheaper applies: detach, try again after [`Budget::retry`].
    Suspend,
    /// A suspended process's wait is over: attached again.
    Resume,
}

impl Action {
    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Watch => "watch",
            Action::WatchReach => "watch_reachability",
            Action::Reach => "reachability",
            Action::Suspend => "suspend",
            Action::Resume => "resume",
        }
    }
}

/// What a process is paying now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    /// Probe passes per second.
    pub passes_per_sec: f64,
    /// Target hits per second, averaged since the process was attached.
    pub hits_per_sec: f64,
    /// Share of one CPU spent in its probes.
    pub share: f64,
}

/// The next step down for a process that pays `load` under `strategy`
/// (`reaching`: targets are already disarmed once seen).
pub fn decide(budget: &Budget, strategy: Strategy, reaching: bool, load: &Load) -> Action {
    if load.share <= budget.share {
        return Action::Keep;
    }
    match strategy {
        Strategy::PerCall if reaching => Action::WatchReach,
        Strategy::PerCall => {
            let under_watch = load.hits_per_sec * budget.costs.watch_ns * 1e-9;
            if under_watch <= budget.share { Action::Watch } else { Action::WatchReach }
        }
        Strategy::Watch | Strategy::Auto if !reaching => Action::Reach,
        Strategy::Watch | Strategy::Auto => Action::Suspend,
    }
}

/// A process's probe passes over the last few seconds.
#[derive(Debug, Default)]
pub struct Meter {
    samples: VecDeque<(Instant, u64)>,
    /// The share of a CPU last measured.
    pub share: Option<f64>,
}

impl Meter {
    /// Starts over (the strategy changed, so the passes counted changed meaning).
    pub fn reset(&mut self) {
        self.samples.clear();
        self.share = None;
    }

    /// Records the pass counter read now; returns passes per second over the
    /// window once it spans long enough.
    pub fn sample(&mut self, now: Instant, passes: u64) -> Option<f64> {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((now, passes));
        let (&(t0, p0), &(t1, p1)) = (self.samples.front()?, self.samples.back()?);
        let span = t1.duration_since(t0);
        (span >= MIN_SPAN).then(|| p1.saturating_sub(p0) as f64 / span.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        share: 0.01,
        costs: Costs { per_call_ns: 600.0, watch_ns: 30_000.0, uprobe_emulated_ns: 500.0, uprobe_stepped_ns: 0.0 },
        retry: Duration::from_secs(300),
    };

    fn load(passes: f64, hits: f64, strategy: Strategy) -> Load {
        Load { passes_per_sec: passes, hits_per_sec: hits, share: passes * BUDGET.costs.of(strategy) * 1e-9 }
    }

    #[test]
    fn a_process_within_budget_is_left_alone() {
        // 10,000 calls/s at 600 ns is 0.6% of a CPU.
        assert_eq!(decide(&BUDGET, Strategy::PerCall, false, &load(10_000.0, 10.0, Strategy::PerCall)), Action::Keep);
    }

    #[test]
    fn per_call_over_budget_moves_to_watch_when_targets_are_rare() {
        // 1M calls/s: 60%; its 10 target calls/s would cost 0.03% watched.
        let l = load(1e6, 10.0, Strategy::PerCall);
        assert_eq!(decide(&BUDGET, Strategy::PerCall, false, &l), Action::Watch);
        // 1,000 target calls/s would cost 3% watched: disarm once seen.
        let l = load(1e6, 1_000.0, Strategy::PerCall);
        assert_eq!(decide(&BUDGET, Strategy::PerCall, false, &l), Action::WatchReach);
    }

    #[test]
    fn watch_over_budget_reaches_then_suspends() {
        let l = load(1_000.0, 1_000.0, Strategy::Watch);
        assert_eq!(decide(&BUDGET, Strategy::Watch, false, &l), Action::Reach);
        assert_eq!(decide(&BUDGET, Strategy::Watch, true, &l), Action::Suspend);
    }

    #[test]
    fn the_rate_waits_for_a_long_enough_window() {
        let mut m = Meter::default();
        let t = Instant::now();
        assert_eq!(m.sample(t, 0), None);
        assert_eq!(m.sample(t + Duration::from_secs(1), 1_000), None);
        assert_eq!(m.sample(t + Duration::from_secs(4), 4_000), Some(1_000.0));
        m.reset();
        assert_eq!(m.sample(t + Duration::from_secs(5), 9_000), None);
    }
}
