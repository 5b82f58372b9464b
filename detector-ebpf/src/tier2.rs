//! `_PyOptimizer_Optimize` entry: the tier-2 optimizer of a watched process
//! is about to compile a trace (3.14+ builds configured with the JIT). Only
//! a process whose JIT is on gets here, and only before its first compiled
//! trace runs: from then on calls that run in compiled code pass no RESUME
//! handler and read no bytecode, so neither strategy sees them. User space
//! is told once per process (a mark in its [`WATCHED`] value, and a record
//! that wakes it), and stops counting there, saying why.

use aya_ebpf::{bindings::BPF_RB_FORCE_WAKEUP, helpers::bpf_get_current_pid_tgid};
use detector_common::{EVENT_TIER2, EventHeader, Tier2Event, WATCHED_TIER2, stats};

use crate::maps::{EVENTS, WATCHED, bump};

pub fn run() {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // The mark is what user space relies on (it looks for marks every
    // second); the record only wakes it at once. Not marked watched yet
    // (the attach is finishing): told all the same, user space ignores a
    // repeat. Two CPUs racing here both tell.
    if let Some(flags) = WATCHED.get_ptr_mut(&tgid) {
        // SAFETY: a value of this map, valid while the program runs.
        unsafe {
            if *flags & WATCHED_TIER2 != 0 {
                return;
            }
            *flags |= WATCHED_TIER2;
        }
    }
    bump(stats::TIER2_STARTS);
    match EVENTS.reserve::<Tier2Event>(0) {
        Some(mut e) => {
            e.write(Tier2Event { header: EventHeader { kind: EVENT_TIER2, tgid }, tid: id as u32, _pad: 0 });
            e.submit(BPF_RB_FORCE_WAKEUP as u64);
        }
        None => bump(stats::RINGBUF_DROPS),
    }
}
