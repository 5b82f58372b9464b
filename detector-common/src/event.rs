//! Records the eBPF programs write to the [`crate::maps::EVENTS`] ring buffer.
//!
//! Every record starts with an [`EventHeader`]; user space dispatches on its
//! `kind` and decodes with `read_unaligned`.

use crate::FILENAME_LEN;

/// A target's function body started: see [`HitEvent`].
pub const EVENT_HIT: u32 = 1;
/// First match of a code object in a process: see [`CodeEvent`].
pub const EVENT_CODE: u32 = 2;
/// 3.8-3.10: a code object whose name matches a target started: see
/// [`CandidateEvent`].
pub const EVENT_CANDIDATE: u32 = 3;

/// A process executed a new image: see [`ProcessEvent`].
pub const EVENT_EXEC: u32 = 4;
/// A watched process forked: see [`ProcessEvent`].
pub const EVENT_FORK: u32 = 5;

/// A code object under a watchpoint was deallocated: see [`FreedEvent`].
pub const EVENT_WATCH_FREED: u32 = 6;

/// A module body (or code given to `exec`) is about to run: see
/// [`ModuleExecEvent`].
pub const EVENT_MODULE_EXEC: u32 = 7;

/// 3.8-3.10: a code object with starts awaiting resolution was
/// deallocated: see [`PendingFreedEvent`].
pub const EVENT_PENDING_FREED: u32 = 8;

/// The kernel sent SIGTRAP to a thread of a watched process: see
/// [`TrapSignalEvent`].
pub const EVENT_TRAP_SIGNAL: u32 = 9;

/// A target's first hit in a process (or on a CPU): the frames that called
/// it, see [`CallersEvent`].
pub const EVENT_CALLERS: u32 = 10;

/// A watched process's tier-2 optimizer is about to compile: see
/// [`Tier2Event`].
pub const EVENT_TIER2: u32 = 11;

/// Frames above a target's recorded at its first hit.
pub const CALLER_DEPTH: usize = 8;

/// Common prefix of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `EVENT_*`.
    pub kind: u32,
    /// Process.
    pub tgid: u32,
}

/// One hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HitEvent {
    /// `kind == EVENT_HIT`.
    pub header: EventHeader,
    /// Thread.
    pub tid: u32,
    /// Target id.
    pub target: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Code object.
    pub code: u64,
}

/// Where a matched code object comes from, sent once when its verdict is
/// computed so the reader does not have to read a process that may be gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeEvent {
    /// `kind == EVENT_CODE`.
    pub header: EventHeader,
    /// Target id.
    pub target: u32,
    /// `co_firstlineno`.
    pub firstlineno: u32,
    /// Code object.
    pub code: u64,
    /// `co_filename`, NUL-terminated, truncated to fit.
    pub filename: [u8; FILENAME_LEN],
}

/// A 3.8-3.10 start of a code object that may be a target (its `co_name`
/// matches one); user space resolves it and writes the verdict back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CandidateEvent {
    /// `kind == EVENT_CANDIDATE`.
    pub header: EventHeader,
    /// Thread.
    pub tid: u32,
    /// Generation of the target set the kernel saw.
    pub generation: u32,
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// Code object.
    pub code: u64,
    /// `co_name`.
    pub name: u64,
    /// The frame's `f_globals`: the module the code was defined in.
    pub globals: u64,
}

/// A process to consider: one that executed a new image (`EVENT_EXEC`, for
/// every process on the node) or the child of a watched process
/// (`EVENT_FORK`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    /// `kind` and the process concerned (the exec'ing one, or the child).
    pub header: EventHeader,
    /// The parent, for a fork.
    pub parent: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// A watched code object is being deallocated: the kernel has stopped
/// counting its unit (whatever is allocated there next is not the target);
/// user space disarms it and looks for the target again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreedEvent {
    /// `kind == EVENT_WATCH_FREED`, and the process.
    pub header: EventHeader,
    /// The code object.
    pub code: u64,
}

/// 3.8-3.10: a code object whose starts the kernel counted in
/// [`crate::maps::PENDING`] is being deallocated. Its entry is taken out of
/// the map and handed over here, so that a code object allocated at its
/// address next counts apart from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingFreedEvent {
    /// `kind == EVENT_PENDING_FREED`, and the process.
    pub header: EventHeader,
    /// Generation of the targets the starts were counted in.
    pub generation: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// The code object.
    pub code: u64,
    /// Its starts counted.
    pub hits: u64,
}

/// The kernel itself sent SIGTRAP to a thread of a watched process (a
/// debug exception or breakpoint it could not attribute): unless the
/// process handles the signal, it dies of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapSignalEvent {
    /// `kind == EVENT_TRAP_SIGNAL`, and the process.
    pub header: EventHeader,
    /// Thread.
    pub tid: u32,
    /// `si_code`: `TRAP_BRKPT` (1), `TRAP_TRACE` (2), `TRAP_HWBKPT` (4),
    /// `SI_KERNEL` (0x80)...
    pub code: i32,
}

/// A watched process entered its tier-2 optimizer (`_PyOptimizer_Optimize`):
/// its JIT is on, and code it compiles from here on starts functions
/// without the interpreter's RESUME handlers or a read of their bytecode.
/// Sent once per process (see [`crate::maps::WATCHED_TIER2`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tier2Event {
    /// `kind == EVENT_TIER2`, and the process.
    pub header: EventHeader,
    /// Thread.
    pub tid: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// `PyEval_EvalCode(code, globals, locals)` was entered in a process that
/// has targets not found yet: the code objects its functions will be made
/// from are in `code.co_consts` (recursively) before any of them exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleExecEvent {
    /// `kind == EVENT_MODULE_EXEC`, and the process.
    pub header: EventHeader,
    /// Thread.
    pub tid: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the entry.
    pub ts_ns: u64,
    /// The code object about to run.
    pub code: u64,
    /// Its globals: `__name__` names the module.
    pub globals: u64,
}

/// A frame above a target's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerFrame {
    /// Its code object (0 if unreadable).
    pub code: u64,
    /// Where it is: its instruction pointer (3.11+), or `f_lasti` (3.8-3.10).
    pub instr: u64,
}

/// The frames that called a target at its first hit, innermost first;
/// written just before that hit's [`HitEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallersEvent {
    /// `kind == EVENT_CALLERS`, and the process.
    pub header: EventHeader,
    /// Thread.
    pub tid: u32,
    /// Target id.
    pub target: u32,
    /// The target's code object.
    pub code: u64,
    /// Frames filled in `frames`.
    pub depth: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// The calling frames.
    pub frames: [CallerFrame; CALLER_DEPTH],
}
