//! Everything that crosses the kernel/user boundary: map and program names,
//! map keys and values, event records, interpreter layouts and site cookies.
//!
//! Both `detector-ebpf` and `detector` depend on this crate, so the two sides
//! cannot drift. Every type is `#[repr(C)]`, has no padding holes the verifier
//! would reject, and is `aya::Pod` when the `user` feature is on.
#![no_std]

pub mod event;
pub mod hot;
pub mod layout;
pub mod maps;
pub mod site;
pub mod stats;

pub use event::*;
pub use hot::*;
pub use layout::*;
pub use maps::*;
pub use site::*;

/// Longest module or qualified name, in bytes including the terminating NUL,
/// that the kernel compares. Targets are validated against it in user space.
pub const NAME_LEN: usize = 128;

/// Bytes of a code object's file name carried in a [`CodeEvent`].
pub const FILENAME_LEN: usize = 256;

/// Names of the eBPF programs in the object file.
pub mod programs {
    /// Entry of `_PyEval_EvalFrameDefault` on 3.11+: remembers the thread state.
    pub const EVAL_ENTRY: &str = "py_eval_entry";
    /// Entry of `_PyEval_EvalFrameDefault` on 3.8-3.10: the per-call site.
    pub const EVAL_CALL: &str = "py_eval_call";
    /// A RESUME-family handler on 3.11+: the per-call site.
    pub const RESUME: &str = "py_resume";
    /// `PyFunction_NewWithQualName` entry on 3.8-3.10: records identities.
    pub const FUNC_NEW: &str = "py_func_new";
    /// `code_dealloc` entry: forgets a code object's verdict and identity.
    pub const CODE_DEALLOC: &str = "py_code_dealloc";
    /// Tracepoint `sched/sched_process_exec`: a process to consider.
    pub const SCHED_EXEC: &str = "sched_exec";
    /// Tracepoint `sched/sched_process_fork`: a watched process's child.
    pub const SCHED_FORK: &str = "sched_fork";
    /// An empty program, for measuring the cost of the probe itself.
    pub const EMPTY: &str = "py_empty";
    /// A hardware watchpoint on the unit that starts a target's body.
    pub const WATCH: &str = "py_watch";
    /// `PyEval_EvalCode` entry: a module body (or `exec`'d code) is about to
    /// run, with its code object and globals.
    pub const MODULE_EXEC: &str = "py_module_exec";
    /// Tracepoint `signal/signal_generate`: a SIGTRAP the kernel sent to a
    /// watched process.
    pub const TRAP_SIGNAL: &str = "trap_signal";
    /// `_PyOptimizer_Optimize` entry: the tier-2 optimizer (the JIT) is about
    /// to compile in a watched process.
    pub const TIER2_START: &str = "py_tier2_start";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    macro_rules! pod {
        // SAFETY: each type is `repr(C)`, `Copy`, made of integers and
        // byte arrays only, and valid for any bit pattern.
        ($($t:ty),* $(,)?) => { $(
            // SAFETY: as above.
            unsafe impl aya::Pod for $t {}
        )* };
    }
    pod!(
        TargetKey,
        NameKey,
        ThreadEntry,
        CodeKey,
        WatchKey,
        WatchEntry,
        Verdict,
        VerdictLine,
        VerdictCache,
        SlotCells,
        CellKey,
        CountKey,
        PendingKey,
        PendingEntry,
        CodeIdentity,
        Config,
        Layout,
        Slot,
    );
}
