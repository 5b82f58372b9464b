//! Indices of the per-CPU counters in [`crate::maps::STATS`].

/// Ring-buffer reservations that failed (events lost; counts stay exact).
pub const RINGBUF_DROPS: u32 = 0;
/// RESUME hits on a thread whose thread state is unknown.
pub const UNKNOWN_THREAD: u32 = 1;
/// Reads of process memory that failed.
pub const READ_ERRORS: u32 = 2;
/// Verdicts computed (cache misses).
pub const VERDICT_MISSES: u32 = 3;
/// Hits counted.
pub const HITS: u32 = 4;
/// Counter or pending-counter insertions that failed because a map was full.
pub const MAP_FULL: u32 = 5;
/// Passes not counted because the handler re-dispatches (see `site`).
pub const REDISPATCH_SKIPS: u32 = 6;
/// Hits written to the ring buffer as records: every hit, or under
/// reachability only those whose count reached a power of two.
pub const HIT_RECORDS: u32 = 7;
/// Module executions seen (`PyEval_EvalCode` in a process with targets
/// not found yet).
pub const MODULE_EXECS: u32 = 8;
/// Classifications given up because a program that preempted this one on
/// its CPU used the scratch key meanwhile: that pass is not counted, and
/// the next pass of the code object classifies it again.
pub const SCRATCH_RACES: u32 = 9;
/// 3.8-3.10 starts not counted because their process held its share of
/// the pending map ([`crate::capacity::PENDING_PER_PROCESS`]).
pub const PENDING_REFUSED: u32 = 10;
/// SIGTRAPs the kernel itself sent to threads of watched processes.
pub const TRAP_SIGNALS: u32 = 11;
/// Entries into the tier-2 optimizer of watched processes reported (once
/// per process).
pub const TIER2_STARTS: u32 = 12;
/// Number of counters.
pub const COUNT: u32 = 13;

/// Counter names, by index, for metrics and summaries.
pub const NAMES: [&str; COUNT as usize] = [
    "ringbuf_drops",
    "unknown_thread",
    "read_errors",
    "verdict_misses",
    "hits",
    "map_full",
    "redispatch_skips",
    "hit_records",
    "module_execs",
    "scratch_races",
    "pending_refused",
    "trap_signals",
    "tier2_starts",
];
