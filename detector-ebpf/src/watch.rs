//! The watch strategy: a hardware watchpoint on the code unit that starts a
//! target's body fires when that unit is accessed, so only that function's
//! starts pay. Not every access is a start:
//! - a data breakpoint traps on writes as well as reads (x86 has no
//!   read-only kind), and the specialiser and `sys.monitoring` rewrite the
//!   unit's opcode: a trap that finds another opcode than last seen is a
//!   write, which only updates what was seen;
//! - other code reads the unit too (the specialiser scanning the bytecode,
//!   the handler reading its own unit before quickening it): a start is the
//!   dispatch loading the opcode to jump to its handler, so a trap counts
//!   only just after one of those loads (found by decoding the evaluation
//!   loop in user space, and listed per process in `DISPATCH_READS`).

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::PerfEventContext};
use detector_common::{CELL_SHARED, MODE_WATCH, WatchKey};

use crate::{
    callers, emit,
    maps::{DISPATCH_READS, LAYOUTS, WATCHES, pass},
    mem::read,
};

/// User-mode code segment selector's privilege bits.
const USER_RPL: u64 = 3;

pub fn run(ctx: &PerfEventContext) -> Option<()> {
    let data = ctx.ctx;
    // The kernel copying the process's memory (a syscall on its bytecode)
    // is not the interpreter running it.
    if unsafe { (*data).regs.cs } & 3 != USER_RPL {
        return None;
    }
    // For a breakpoint event the sample address is the watched address.
    let addr = unsafe { (*data).addr };
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let ip = unsafe { (*data).regs.rip };
    let entry = WATCHES.get_ptr_mut(&WatchKey { tgid, _pad: 0, addr })?;
    let pass = pass(unsafe { (*entry).slot }, MODE_WATCH);
    let op = read::<u8>(addr)?;
    let (code, target, slot, layout, layout_id, runtime) = unsafe {
        let e = &mut *entry;
        let seen = e.last_op;
        e.last_op = op;
        if op != seen {
            return None;
        }
        if !pass.counts || DISPATCH_READS.get(&WatchKey { tgid, _pad: 0, addr: ip }).is_none() {
            return None;
        }
        let first = e.reported == 0;
        e.reported = 1;
        (e.code, e.target, e.slot, if first { Some(e.layout) } else { None }, e.layout, e.runtime)
    };
    if let Some(l) = layout.and_then(|l| LAYOUTS.get(l)) {
        emit::code(l, tgid, target, code);
    }
    // A trap costs microseconds: the shared count is cheap enough.
    // The shared count: a cell is for a process's hottest per-call targets.
    emit::hit(slot, tgid, tid, target, CELL_SHARED, code, pass.sparse, || {
        let l = LAYOUTS.get(layout_id)?;
        Some((l, callers::running_frame(l, runtime, tid)?))
    });
    Some(())
}
