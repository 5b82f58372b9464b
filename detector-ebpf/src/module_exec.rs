//! `PyEval_EvalCode(code, globals, locals)` entry: a module body is about to
//! run (an import, or code given to `exec`). Attached only to processes that
//! have targets not found yet, so it costs a pass per import there and
//! nothing elsewhere. The record wakes the reader at once: user space finds
//! the targets' code objects in `code.co_consts` and arms their body starts
//! while the module body is still running, before most of them can be called.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::ProbeContext,
};
use detector_common::{EVENT_MODULE_EXEC, EventHeader, ModuleExecEvent, stats};

use crate::maps::{EVENTS, bump};

pub fn run(ctx: &ProbeContext) {
    let (Some(code), Some(globals)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else { return };
    let pid_tgid = bpf_get_current_pid_tgid();
    bump(stats::MODULE_EXECS);
    let Some(mut entry) = EVENTS.reserve::<ModuleExecEvent>(0) else {
        bump(stats::RINGBUF_DROPS);
        return;
    };
    entry.write(ModuleExecEvent {
        header: EventHeader { kind: EVENT_MODULE_EXEC, tgid: (pid_tgid >> 32) as u32 },
        tid: pid_tgid as u32,
        _pad: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        code,
        globals,
    });
    // Rare, and the window until its targets are armed is what matters.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
}
