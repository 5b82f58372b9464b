//! Map names, default capacities, and the keys and values stored in them.

use crate::NAME_LEN;

/// `LruHashMap<u32 tid, ThreadEntry>`: each thread's `PyThreadState` (3.11+).
pub const THREADS: &str = "THREADS";
/// `Array<Layout>`: interpreter layouts, indexed by the layout id in a site cookie.
pub const LAYOUTS: &str = "LAYOUTS";
/// `HashMap<TargetKey, u32>`: the targets, by module and qualified name (3.11+).
pub const TARGETS: &str = "TARGETS";
/// `HashMap<NameKey, u32>`: last components of target qualnames (3.8-3.10 prefilter).
pub const NAMES: &str = "NAMES";
/// `LruHashMap<CodeKey, Verdict>`: per (process, code object) match verdicts.
pub const VERDICTS: &str = "VERDICTS";
/// `PerCpuArray<crate::VerdictCache>` with one entry: each CPU's most
/// recent verdicts, in front of [`VERDICTS`].
pub const VERDICT_CACHE: &str = "VERDICT_CACHE";
/// `Array<u32>` with one entry: bumped whenever a code object with a verdict
/// is deallocated, which empties every [`VERDICT_CACHE`].
pub const CODE_EPOCH: &str = "CODE_EPOCH";
/// `PerCpuArray<crate::SlotCells>` indexed by slot: each process's hit
/// counters, per CPU, for its first [`crate::SLOT_CELLS`] targets hit.
pub const CELLS: &str = "CELLS";
/// `HashMap<CellKey, u32>`: which target took each cell of a process (an
/// insert that fails if it exists is the kernel's atomic claim).
pub const CELL_CLAIMS: &str = "CELL_CLAIMS";
/// `HashMap<CountKey, u32>`: which cell counts (process, target).
pub const CELL_OF: &str = "CELL_OF";
/// `HashMap<CountKey, u64>`: exact hits per (process, target) not counted
/// in a cell (watchpoint traps; targets beyond a process's cells).
pub const COUNTS: &str = "COUNTS";
/// `HashMap<PendingKey, PendingEntry>`: hits of 3.8-3.10 code objects
/// awaiting resolution.
pub const PENDING: &str = "PENDING";
/// `Array<u64>`: per slot, the [`PENDING`] entries its process's probes
/// hold: made, less those handed over at deallocation (changed atomically
/// by the kernel only).
pub const PENDING_MADE: &str = "PENDING_MADE";
/// `Array<u64>`: per slot, the [`PENDING`] entries of its process that user
/// space resolved, folded into its own counts and deleted (written by user
/// space only).
pub const PENDING_FOLDED: &str = "PENDING_FOLDED";
/// `LruHashMap<CodeKey, CodeIdentity>`: what a 3.8-3.10 code object is,
/// recorded when a function is made from it (or pre-filled by user space).
pub const IDENTITIES: &str = "IDENTITIES";
/// `HashMap<CountKey, u8>`: targets a process's installed dependency leaves
/// unwatched (its version is not one the target's advisory affects, or is
/// being read): classified as no target there.
pub const UNAFFECTED: &str = "UNAFFECTED";
/// `HashMap<u32 tgid, u8>`: processes being watched (forks of these are
/// reported), with [`WATCHED_YES`] and, once seen, [`WATCHED_TIER2`].
pub const WATCHED: &str = "WATCHED";
/// A [`WATCHED`] value's bit: the process is watched.
pub const WATCHED_YES: u8 = 1;
/// A [`WATCHED`] value's bit: its tier-2 optimizer's entry was reported.
pub const WATCHED_TIER2: u8 = 2;
/// `HashMap<WatchKey, WatchEntry>`: code units under a hardware watchpoint
/// (the watch strategy), by process and address.
pub const WATCHES: &str = "WATCHES";
/// `HashMap<CodeKey, u64>`: the code objects under a watchpoint and their
/// watched unit's address, so their deallocation stops the counting.
pub const WATCHED_CODES: &str = "WATCHED_CODES";
/// `HashMap<WatchKey, u8>`: per process, the runtime addresses just after
/// each load that dispatches a code unit: only a trap there is a start.
pub const DISPATCH_READS: &str = "DISPATCH_READS";
/// `PerCpuArray<Slot>`: per watched process (its slot, carried in its site
/// cookies and watch entries), probe passes and which strategy counts.
pub const SLOTS: &str = "SLOTS";
/// `Array<Config>` with one entry: the global generation and tunables.
pub const CONFIG: &str = "CONFIG";
/// `PerCpuArray<u64>`: counters indexed by [`crate::stats`].
pub const STATS: &str = "STATS";
/// `PerCpuArray<Scratch>`: per-CPU buffer to build map keys too large for the stack.
pub const SCRATCH: &str = "SCRATCH";
/// `RingBuf`: [`crate::event`] records.
pub const EVENTS: &str = "EVENTS";

/// Default capacities; user space may override them at load time.
pub mod capacity {
    /// Threads across all watched processes.
    pub const THREADS: u32 = 65_536;
    /// Distinct interpreter builds loaded at once.
    pub const LAYOUTS: u32 = 64;
    /// Targets in the active set.
    pub const TARGETS: u32 = 4_096;
    /// (process, code object) verdicts cached.
    pub const VERDICTS: u32 = 131_072;
    /// (process, target) counters.
    pub const COUNTS: u32 = 65_536;
    /// (process, target) pairs left unwatched by dependency versions.
    pub const UNAFFECTED: u32 = 65_536;
    /// (process, code object, generation) pending counters.
    pub const PENDING: u32 = 16_384;
    /// Pending counters one process may hold at once: a process that makes
    /// code objects named like targets without end fills its share, never
    /// another's (the node agent sizes the map to hold every watched
    /// process's share).
    pub const PENDING_PER_PROCESS: u64 = 64;
    /// (process, code object) identities (3.8-3.10).
    pub const IDENTITIES: u32 = 131_072;
    /// Processes watched at once.
    pub const WATCHED: u32 = 4096;
    /// Code units under a watchpoint, across processes.
    pub const WATCHES: u32 = 16_384;
    /// Dispatch loads, across processes watched with watchpoints.
    pub const DISPATCH_READS: u32 = 262_144;
    /// Per-process slots (pass counters and counting mode): one per process
    /// watched at once.
    pub const SLOTS: u32 = WATCHED;
    /// Ring buffer bytes (power-of-two multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
}

/// A target as the kernel compares it: module and qualified name, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// `__module__` of the function.
    pub module: [u8; NAME_LEN],
    /// `co_qualname` of the code object.
    pub qualname: [u8; NAME_LEN],
}

/// The last component of a target's qualified name (`co_name` on 3.8-3.10).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NameKey {
    /// NUL-padded name.
    pub name: [u8; NAME_LEN],
}

/// What the kernel knows of a thread that entered the interpreter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadEntry {
    /// Process the thread belongs to (guards against tid reuse).
    pub tgid: u32,
    /// The watch instance that wrote it ([`Slot::instance`]): an entry of
    /// an earlier watch of the same pid is stale.
    pub instance: u32,
    /// Address of the thread's `PyThreadState`.
    pub tstate: u64,
}

/// Key of the verdict cache and of the identities: a code object in one
/// watch of a process. Entries are deleted when the code object is
/// deallocated (a probe on `code_dealloc`), so a reused address never
/// inherits a verdict; those of a watch that ended are never looked up
/// again (a later watch of the same pid has another instance) and age out
/// of the LRU maps, so ending a watch deletes nothing here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CodeKey {
    /// Process.
    pub tgid: u32,
    /// The watch instance ([`Slot::instance`]).
    pub instance: u32,
    /// Address of the code object.
    pub code: u64,
}

/// A verdict: which target a code object is, valid for one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Generation of the target set the verdict was computed for.
    pub generation: u32,
    /// Target id, [`TARGET_NONE`] or [`TARGET_PENDING`].
    pub target: u32,
    /// Non-zero for generators and coroutines, whose body is entered again
    /// after each `yield`/`await`: only for them must a pass be checked to
    /// be a start. A plain function's body is entered once per call.
    pub resumable: u32,
    /// Where a target's hits are counted: a cell of the process's slot,
    /// [`crate::CELL_SHARED`], or [`crate::CELL_UNKNOWN`] (not yet chosen).
    pub cell: u32,
}

/// `co_flags` of code whose frames are resumed: generators, coroutines,
/// iterable coroutines and async generators.
pub const CO_RESUMABLE: u32 = 0x20 | 0x80 | 0x100 | 0x200;

/// Not a target.
pub const TARGET_NONE: u32 = u32::MAX;
/// 3.8-3.10: the name matches a target; user space resolves the rest.
pub const TARGET_PENDING: u32 = u32::MAX - 1;

/// The qualified name and module of a 3.8-3.10 code object, which neither
/// the code nor its frame carries: taken from `PyFunction_NewWithQualName`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeIdentity {
    /// The function's `__qualname__` (`str`), or 0 when it is `co_name`.
    pub qualname: u64,
    /// The function's globals, whose `__name__` is its module.
    pub globals: u64,
}

/// Key of the hit counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CountKey {
    /// Process.
    pub tgid: u32,
    /// Target id.
    pub target: u32,
}

/// Key of the pending counters (3.8-3.10).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingKey {
    /// Process.
    pub tgid: u32,
    /// Generation the hits were seen in.
    pub generation: u32,
    /// Code object.
    pub code: u64,
}

/// Hits of a 3.8-3.10 code object counted before user space resolved it,
/// with what resolving it needs (so a dropped event loses nothing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEntry {
    /// Starts counted (atomically incremented).
    pub hits: u64,
    /// `co_name`.
    pub name: u64,
    /// The frame's `f_globals`.
    pub globals: u64,
}

/// Global settings, entry 0 of [`CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bumped by user space whenever the target set changes; older verdicts
    /// are recomputed on their next use.
    pub generation: u32,
    /// Wake the ring-buffer reader once this many bytes are waiting; below
    /// it the reader polls on a timer, so a hit does not pay for a wakeup.
    pub wakeup_bytes: u32,
    /// Offset of `child_pid` in the `sched_process_fork` record (from its
    /// tracefs format: it moved between kernels).
    pub fork_child_pid: u32,
    /// Bumped by user space whenever lines of the CPUs' verdict caches may
    /// have gone stale: a new generation, or a process forgotten (its pid
    /// may come back as another process).
    pub cache_stamp: u32,
    /// Offsets of `sig` and `code` in the `signal_generate` record; zero
    /// until that tracepoint is attached.
    pub signal_sig: u32,
    /// See `signal_sig`.
    pub signal_code: u32,
}

/// A code unit under a watchpoint: the key of [`WATCHES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchKey {
    /// Process.
    pub tgid: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// Address of the unit (its opcode byte).
    pub addr: u64,
}

/// What a watched unit starts, and the opcode last seen there: a trap that
/// finds another opcode is a write (quickening, instrumentation), not a start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchEntry {
    /// The code object.
    pub code: u64,
    /// The target it is.
    pub target: u32,
    /// Layout id, for reading the code object's file and line.
    pub layout: u32,
    /// Opcode last seen at the unit.
    pub last_op: u8,
    /// Whether the code object's file and line were reported.
    pub reported: u8,
    /// The process's slot in [`SLOTS`].
    pub slot: u16,
    /// Reserved, zero.
    pub _pad: [u8; 4],
    /// `_PyRuntime` in the process: where a trap finds the thread's state,
    /// for the frames that called a target.
    pub runtime: u64,
}

/// No slot: the process's passes are not counted (more processes than slots).
pub const NO_SLOT: u16 = u16::MAX;

/// The per-call probes count hits (the slot's default, zero).
pub const MODE_PER_CALL: u32 = 0;
/// The watchpoints count hits; per-call probes still attached are passed
/// through, so a switch between strategies counts every call once.
pub const MODE_WATCH: u32 = 1;

/// Every hit is an event (the slot's default, zero): each call is reported.
pub const EVENTS_EVERY: u32 = 0;
/// Reachability: a hit is an event only when its exact count (on a CPU, for
/// per-call hits) becomes a power of two (1, 2, 4, ...). The first reports the target; the rest are cheap
/// signs of life, and a dropped first record is made good by the next.
pub const EVENTS_SPARSE: u32 = 1;

/// One process's slot, per CPU: how often its probes ran, and which of them
/// count, and how hits are reported. User space sums the passes over CPUs and
/// sets the rest on every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Per-call probe passes or watchpoint traps, whichever is attached.
    pub passes: u64,
    /// [`MODE_PER_CALL`] or [`MODE_WATCH`].
    pub mode: u32,
    /// [`EVENTS_EVERY`] or [`EVENTS_SPARSE`].
    pub events: u32,
    /// Which watch of which process holds the slot: unique over the agent's
    /// life, never 0 (what a process without a slot reads).
    pub instance: u32,
    /// Events of this process dropped on this CPU because the ring buffer
    /// was full (a plain add: a drop is rare, and a lost one is a count
    /// of a diagnostic).
    pub drops: u32,
    /// 3.8-3.10 starts of this process not counted on this CPU because it
    /// held its share of the pending map (a plain add, as `drops`).
    pub refused: u32,
}

/// Per-CPU scratch space for keys that do not fit on the eBPF stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    /// Written by each program before it builds a key here: a program that
    /// preempted it on its CPU and used the space leaves another value, and
    /// the first then knows its key may have changed under its lookup.
    pub claim: u64,
    /// Key being built.
    pub key: TargetKey,
}

/// Copies `s` into a NUL-padded fixed-size name, or `None` if it does not fit
/// (the last byte is always NUL).
pub fn fixed_name(s: &[u8]) -> Option<[u8; NAME_LEN]> {
    if s.len() >= NAME_LEN || s.contains(&0) {
        return None;
    }
    let mut out = [0u8; NAME_LEN];
    out[..s.len()].copy_from_slice(s);
    Some(out)
}

/// The bytes of a NUL-padded name up to its first NUL.
pub fn name_bytes(name: &[u8]) -> &[u8] {
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    &name[..end]
}
