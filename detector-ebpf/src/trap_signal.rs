//! SIGTRAPs the kernel itself sends to watched processes. A debug exception
//! the kernel cannot attribute to an installed breakpoint (a status the CPU
//! or hypervisor misreported, or an `int1`/`int3` of the process's own) is
//! delivered as SIGTRAP, which kills a process that does not handle it.
//! Such a signal in a process under watchpoints is reported, so that user
//! space can say so and stop using them there.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::TracePointContext};
use detector_common::{EVENT_TRAP_SIGNAL, EventHeader, TrapSignalEvent, stats};

use crate::maps::{CONFIG, EVENTS, WATCHED, bump};

const SIGTRAP: i32 = 5;

pub fn run(ctx: &TracePointContext) {
    let Some(cfg) = CONFIG.get(0) else { return };
    let (sig_at, code_at) = (cfg.signal_sig as usize, cfg.signal_code as usize);
    if sig_at == 0 || unsafe { ctx.read_at::<i32>(sig_at) } != Ok(SIGTRAP) {
        return;
    }
    // The kernel raises these in the thread that trapped: current.
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if unsafe { WATCHED.get(&tgid) }.is_none() {
        return;
    }
    // Positive codes only: kill(2), tgkill(2) and sigqueue(3) to another
    // process give zero or less. (A process may send itself a positive
    // code: that affects only its own watch.)
    let Ok(code) = (unsafe { ctx.read_at::<i32>(code_at) }) else { return };
    if code <= 0 {
        return;
    }
    bump(stats::TRAP_SIGNALS);
    match EVENTS.reserve::<TrapSignalEvent>(0) {
        Some(mut e) => {
            e.write(TrapSignalEvent { header: EventHeader { kind: EVENT_TRAP_SIGNAL, tgid }, tid: id as u32, code });
            // Rare and urgent: the reader is woken.
            e.submit(0);
        }
        None => bump(stats::RINGBUF_DROPS),
    }
}
