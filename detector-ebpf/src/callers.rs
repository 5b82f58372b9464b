//! The frames that called a target, recorded at its first hit so user space
//! can say who reached it: the frame chain is read here, as it is at the
//! start, because by the time user space could look the thread has moved
//! on. Only a target's first hit (in its counter) pays for it.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use detector_common::{
    CALLER_DEPTH, CallerFrame, CallersEvent, EVENT_CALLERS, EventHeader, FAMILY_FRAME_ARG, Layout, NO_OFFSET, NO_SLOT,
};

use crate::{
    emit::{reserve, submit_flags},
    mem::{field, object_field, read},
    resume::current_frame,
};

/// Interpreters looked through for a thread's state.
const MAX_INTERPRETERS: u32 = 4;
/// Threads looked through per interpreter.
const MAX_THREADS: u32 = 128;

/// Records the frames above `frame`, the target's own, innermost first.
/// Without room in the ring buffer it is dropped, counted as any record,
/// but not as the process's lost hit (its hit is written next).
#[inline(always)]
pub fn record(target: u32, code: u64, layout: &Layout, frame: u64) {
    let Some(mut entry) = reserve::<CallersEvent>(NO_SLOT) else { return };
    let id = bpf_get_current_pid_tgid();
    let ev = entry.as_mut_ptr();
    let frame_arg = layout.family == FAMILY_FRAME_ARG;
    unsafe {
        (*ev).header = EventHeader { kind: EVENT_CALLERS, tgid: (id >> 32) as u32 };
        (*ev).tid = id as u32;
        (*ev).target = target;
        (*ev).code = code;
        (*ev)._pad = 0;
        let mut depth = 0;
        let mut f = frame;
        for i in 0..CALLER_DEPTH {
            (*ev).frames[i] = CallerFrame::default();
            if f != 0 {
                f = field(f, layout.frame_previous).unwrap_or(0);
            }
            if f == 0 {
                continue;
            }
            let code = object_field(layout, f, layout.frame_code).unwrap_or(0);
            let instr = if frame_arg {
                read::<i32>(f + layout.frame_lasti as u64).unwrap_or(-1) as i64 as u64
            } else {
                field(f, layout.frame_instr).unwrap_or(0)
            };
            (*ev).frames[i] = CallerFrame { code, instr };
            depth += 1;
        }
        (*ev).depth = depth as u32;
    }
    entry.submit(submit_flags(size_of::<CallersEvent>() as u64));
}

/// The frame running on thread `tid`, found from `_PyRuntime` at `runtime`:
/// a watchpoint trap sees no frame. 3.8-3.11 keep the thread holding the
/// GIL, the one running bytecode; later versions are searched by thread id.
#[inline(always)]
pub fn running_frame(layout: &Layout, runtime: u64, tid: u32) -> Option<u64> {
    if runtime == 0 {
        return None;
    }
    let tstate = if layout.runtime_tstate_current != NO_OFFSET {
        field(runtime, layout.runtime_tstate_current)?
    } else {
        thread_state(layout, runtime, tid)?
    };
    if layout.family == FAMILY_FRAME_ARG { field(tstate, layout.tstate_frame) } else { current_frame(layout, tstate) }
}

/// The thread state of `tid`, among the first threads of the first
/// interpreters.
#[inline(always)]
fn thread_state(layout: &Layout, runtime: u64, tid: u32) -> Option<u64> {
    let mut interp = field(runtime, layout.runtime_interpreters_head)?;
    for _ in 0..MAX_INTERPRETERS {
        if interp == 0 {
            return None;
        }
        let mut t = field(interp, layout.interp_threads_head).unwrap_or(0);
        for _ in 0..MAX_THREADS {
            if t == 0 {
                break;
            }
            if field(t, layout.tstate_native_thread_id) == Some(tid as u64) {
                return Some(t);
            }
            t = field(t, layout.tstate_next).unwrap_or(0);
        }
        interp = field(interp, layout.interp_next)?;
    }
    None
}
