//! 3.11+: `_PyEval_EvalFrameDefault(tstate, frame, throwflag)` entry. Records
//! the thread's `PyThreadState` so RESUME sites, which see no arguments, can
//! find the current frame. User space pre-fills threads that were already
//! running Python when the probes were attached.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::ProbeContext};
use detector_common::ThreadEntry;

use crate::maps::THREADS;

pub fn run(ctx: &ProbeContext) {
    let Some(tstate) = ctx.arg::<u64>(0) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Look before writing: an update costs far more than a lookup, and a
    // thread's state rarely changes.
    if let Some(e) = unsafe { THREADS.get(&tid) }
        && e.tgid == tgid
        && e.tstate == tstate
    {
        return;
    }
    let _ = THREADS.insert(&tid, &ThreadEntry { tgid, _pad: 0, tstate }, 0);
}
