//! Process discovery: `sched_process_exec` reports every process that
//! executes a new image (it may be a Python interpreter to watch, or a
//! watched one that stopped being one); `sched_process_fork` reports the
//! children of watched processes only, filtered here.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::TracePointContext};
use detector_common::{EVENT_EXEC, EVENT_FORK, EventHeader, ProcessEvent, stats};

use crate::maps::{CONFIG, EVENTS, WATCHED, bump};

fn emit(kind: u32, tgid: u32, parent: u32) {
    match EVENTS.reserve::<ProcessEvent>(0) {
        Some(mut e) => {
            e.write(ProcessEvent { header: EventHeader { kind, tgid }, parent, _pad: 0 });
            // The reader's timer picks it up within milliseconds.
            e.submit(aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64);
        }
        None => bump(stats::RINGBUF_DROPS),
    }
}

pub fn exec(_ctx: &TracePointContext) {
    // The exec'ing task is current; its tgid is its pid after exec.
    emit(EVENT_EXEC, (bpf_get_current_pid_tgid() >> 32) as u32, 0);
}

pub fn fork(ctx: &TracePointContext) {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { WATCHED.get(&parent) }.is_none() {
        return;
    }
    let Some(off) = CONFIG.get(0).map(|c| c.fork_child_pid) else { return };
    if let Ok(child) = unsafe { ctx.read_at::<i32>(off as usize) } {
        emit(EVENT_FORK, child as u32, parent);
    }
}
