//! The detector's eBPF programs: per-call sites in CPython's evaluation loop
//! that recognise a target's function starting, count it, and report it.
//!
//! - [`eval_entry`]: `_PyEval_EvalFrameDefault` entry on 3.11+, remembers
//!   each thread's `PyThreadState` so RESUME sites can find the frame.
//! - [`eval_call`]: `_PyEval_EvalFrameDefault` entry on 3.8-3.10, where every
//!   call passes with the frame as an argument.
//! - [`resume`]: RESUME-family handlers on 3.11+, where every call passes,
//!   inlined Python-to-Python calls included.
//! - [`watch`]: a hardware watchpoint on the unit that starts a target's
//!   body (the watch strategy, 3.11+): only that function's starts pay.
//! - [`trap_signal`]: a SIGTRAP the kernel sent to a watched process.
//! - [`tier2`]: the tier-2 optimizer (the JIT) starts in a watched process.
//! - [`func_new`]: `PyFunction_NewWithQualName` entry on 3.8-3.10, which
//!   records each code object's qualified name and module as functions are
//!   made, since 3.8-3.10 frames and code objects carry neither.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic types in core.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys go by reference on purpose: a key passed by value is copied onto
// the 512-byte BPF stack (a `TargetKey` is 256 bytes).
#![allow(clippy::needless_borrows_for_generic_args)]

mod callers;
mod code_dealloc;
mod discovery;
mod emit;
mod eval_call;
mod eval_entry;
mod func_new;
mod maps;
mod mem;
mod module_exec;
mod regs;
mod resume;
mod tier2;
mod trap_signal;
mod verdict;
mod watch;

use aya_ebpf::{
    macros::{perf_event, tracepoint, uprobe},
    programs::{PerfEventContext, ProbeContext, TracePointContext},
};

/// See [`eval_entry`].
#[uprobe]
pub fn py_eval_entry(ctx: ProbeContext) -> u32 {
    eval_entry::run(&ctx);
    0
}

/// See [`eval_call`].
#[uprobe]
pub fn py_eval_call(ctx: ProbeContext) -> u32 {
    eval_call::run(&ctx);
    0
}

/// See [`func_new`].
#[uprobe]
pub fn py_func_new(ctx: ProbeContext) -> u32 {
    func_new::run(&ctx);
    0
}

/// See [`resume`].
#[uprobe]
pub fn py_resume(ctx: ProbeContext) -> u32 {
    resume::run(&ctx);
    0
}

/// See [`module_exec`].
#[uprobe]
pub fn py_module_exec(ctx: ProbeContext) -> u32 {
    module_exec::run(&ctx);
    0
}

/// See [`code_dealloc`].
#[uprobe]
pub fn py_code_dealloc(ctx: ProbeContext) -> u32 {
    code_dealloc::run(&ctx);
    0
}

/// See [`tier2`].
#[uprobe]
pub fn py_tier2_start(_ctx: ProbeContext) -> u32 {
    tier2::run();
    0
}

/// See [`watch`].
#[perf_event]
pub fn py_watch(ctx: PerfEventContext) -> u32 {
    watch::run(&ctx);
    0
}

/// See [`discovery`].
#[tracepoint]
pub fn sched_exec(ctx: TracePointContext) -> u32 {
    discovery::exec(&ctx);
    0
}

/// See [`discovery`].
#[tracepoint]
pub fn sched_fork(ctx: TracePointContext) -> u32 {
    discovery::fork(&ctx);
    0
}

/// See [`trap_signal`].
#[tracepoint]
pub fn trap_signal(ctx: TracePointContext) -> u32 {
    trap_signal::run(&ctx);
    0
}

/// Does nothing: attached at the detector's own sites by `cargo xtask bench`
/// to measure the floor (the uprobe itself) that the detector's cost is
/// compared with.
#[uprobe]
pub fn py_empty(_ctx: ProbeContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

/// Probe-reading user memory and ring buffers are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
