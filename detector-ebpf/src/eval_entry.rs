//! 3.11+: `_PyEval_EvalFrameDefault(tstate, frame, throwflag)` entry. Records
//! the thread's `PyThreadState` so RESUME sites, which see no arguments, can
//! find the current frame. User space pre-fills threads that were already
//! running Python when the probes were attached.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use detector_common::{SiteCookie, ThreadEntry};

use crate::maps::{THREADS, instance};

pub fn run(ctx: &ProbeContext) {
    let Some(tstate) = ctx.arg::<u64>(0) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let instance = instance(SiteCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }).slot);
    let entry = ThreadEntry { tgid, instance, tstate };
    // Look before writing: an update costs far more than a lookup, and a
    // thread's state rarely changes.
    if unsafe { THREADS.get(&tid) }.is_some_and(|e| *e == entry) {
        return;
    }
    let _ = THREADS.insert(&tid, &entry, 0);
}
