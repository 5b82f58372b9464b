//! Map definitions. Names, key and value types come from `detector-common`;
//! each static is named exactly as the constant user space opens it by.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use detector_common::{
    CellKey, CodeIdentity, CodeKey, Config, CountKey, EVENTS_SPARSE, Layout, NameKey, PendingEntry, PendingKey,
    Scratch, Slot, SlotCells, TargetKey, ThreadEntry, Verdict, VerdictCache, WatchEntry, WatchKey, capacity, stats,
};

#[map]
pub static THREADS: LruHashMap<u32, ThreadEntry> = LruHashMap::with_max_entries(capacity::THREADS, 0);

#[map]
pub static LAYOUTS: Array<Layout> = Array::with_max_entries(capacity::LAYOUTS, 0);

#[map]
pub static TARGETS: HashMap<TargetKey, u32> = HashMap::with_max_entries(capacity::TARGETS, 0);

#[map]
pub static NAMES: HashMap<NameKey, u32> = HashMap::with_max_entries(capacity::TARGETS, 0);

#[map]
pub static VERDICTS: LruHashMap<CodeKey, Verdict> = LruHashMap::with_max_entries(capacity::VERDICTS, 0);

#[map]
pub static VERDICT_CACHE: PerCpuArray<VerdictCache> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static CODE_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static CELLS: PerCpuArray<SlotCells> = PerCpuArray::with_max_entries(capacity::SLOTS, 0);

#[map]
pub static CELL_CLAIMS: HashMap<CellKey, u32> = HashMap::with_max_entries(capacity::COUNTS, 0);

#[map]
pub static CELL_OF: HashMap<CountKey, u32> = HashMap::with_max_entries(capacity::COUNTS, 0);

/// See [`maps::UNAFFECTED`].
#[map]
pub static UNAFFECTED: HashMap<CountKey, u8> = HashMap::with_max_entries(capacity::UNAFFECTED, 0);

#[map]
pub static COUNTS: HashMap<CountKey, u64> = HashMap::with_max_entries(capacity::COUNTS, 0);

#[map]
pub static PENDING: HashMap<PendingKey, PendingEntry> = HashMap::with_max_entries(capacity::PENDING, 0);

#[map]
pub static PENDING_MADE: Array<u64> = Array::with_max_entries(capacity::SLOTS, 0);

#[map]
pub static PENDING_FOLDED: Array<u64> = Array::with_max_entries(capacity::SLOTS, 0);

#[map]
pub static IDENTITIES: LruHashMap<CodeKey, CodeIdentity> = LruHashMap::with_max_entries(capacity::IDENTITIES, 0);

#[map]
pub static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(capacity::WATCHED, 0);

#[map]
pub static WATCHES: HashMap<WatchKey, WatchEntry> = HashMap::with_max_entries(capacity::WATCHES, 0);

#[map]
pub static WATCHED_CODES: HashMap<CodeKey, u64> = HashMap::with_max_entries(capacity::WATCHES, 0);

#[map]
pub static DISPATCH_READS: HashMap<WatchKey, u8> = HashMap::with_max_entries(capacity::DISPATCH_READS, 0);

#[map]
pub static SLOTS: PerCpuArray<Slot> = PerCpuArray::with_max_entries(capacity::SLOTS, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// `*p += 1` as one atomic instruction (the BPF target has no `AtomicU64`);
/// returns `*p` as read just after. Per-CPU values too: a program may be
/// preempted on its CPU by another that adds to the same one.
#[inline(always)]
pub fn atomic_add(p: *mut u64) -> u64 {
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, 1);
        core::ptr::read_volatile(p)
    }
}

/// Adds one to a per-CPU diagnostic counter. A plain add: an increment
/// lost to a program preempting this one on its CPU costs a diagnostic one
/// count, while an atomic add measured 3% more per hit (`HITS` and
/// `HIT_RECORDS` are bumped on every hit). Hit counts themselves are
/// atomic ([`atomic_add`]).
#[inline(always)]
pub fn bump(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        unsafe { *p += 1 };
    }
}

/// An event of the process in `slot` (or of none: [`detector_common::NO_SLOT`])
/// was dropped: the ring buffer is full.
#[inline(always)]
pub fn dropped(slot: u16) {
    bump(stats::RINGBUF_DROPS);
    if let Some(p) = SLOTS.get_ptr_mut(slot as u32) {
        unsafe { (*p).drops = (*p).drops.wrapping_add(1) };
    }
}

/// Whether the process in `slot` may make another [`PENDING`] entry: it
/// holds fewer than its share (entries user space folded are no longer
/// held). Two CPUs may both see the last room: a share is exceeded by at
/// most a CPU's count.
#[inline(always)]
pub fn pending_room(slot: u16) -> bool {
    let made = PENDING_MADE.get(slot as u32).copied().unwrap_or(0);
    let folded = PENDING_FOLDED.get(slot as u32).copied().unwrap_or(0);
    made.saturating_sub(folded) < capacity::PENDING_PER_PROCESS
}

/// The process in `slot` made a [`PENDING`] entry.
#[inline(always)]
pub fn pending_made(slot: u16) {
    if let Some(p) = PENDING_MADE.get_ptr_mut(slot as u32) {
        atomic_add(p);
    }
}

/// The process in `slot` handed a [`PENDING`] entry over (its code object
/// was deallocated): it holds one fewer.
#[inline(always)]
pub fn pending_unmade(slot: u16) {
    if let Some(p) = PENDING_MADE.get_ptr_mut(slot as u32) {
        // Adding the two's complement of one: an atomic subtraction.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, u64::MAX)
        };
    }
}

/// A start of the process in `slot` was not counted: it holds its share of
/// [`PENDING`].
#[inline(always)]
pub fn pending_refused(slot: u16) {
    bump(stats::PENDING_REFUSED);
    if let Some(p) = SLOTS.get_ptr_mut(slot as u32) {
        unsafe { (*p).refused = (*p).refused.wrapping_add(1) };
    }
}

/// What a process's slot says about one pass of its probes.
#[derive(Clone, Copy)]
pub struct Pass {
    /// The passing probe's strategy is the one that counts hits.
    pub counts: bool,
    /// Hits are reported sparsely ([`EVENTS_SPARSE`]).
    pub sparse: bool,
    /// The watch instance ([`detector_common::Slot::instance`]).
    pub instance: u32,
}

/// Counts a pass of process `slot`'s probes, made by a probe of strategy
/// `mode`. A process without a slot counts every hit and reports it.
#[inline(always)]
pub fn pass(slot: u16, mode: u32) -> Pass {
    match SLOTS.get_ptr_mut(slot as u32) {
        // A plain add, on every call of a process probed per call: the
        // passes are the budget's rate estimate, and an increment lost to a
        // preempting program on this CPU moves it by one in millions, where
        // an atomic add would cost every call.
        Some(p) => unsafe {
            (*p).passes += 1;
            Pass { counts: (*p).mode == mode, sparse: (*p).events == EVENTS_SPARSE, instance: (*p).instance }
        },
        None => Pass { counts: true, sparse: false, instance: 0 },
    }
}

/// The watch instance holding `slot`, for probes that count no pass.
#[inline(always)]
pub fn instance(slot: u16) -> u32 {
    SLOTS.get(slot as u32).map_or(0, |s| s.instance)
}
