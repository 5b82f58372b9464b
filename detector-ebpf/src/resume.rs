//! 3.11+: a RESUME-family handler. Every call passes here, inlined
//! Python-to-Python calls included; a start is a RESUME whose oparg says
//! "function start".
//!
//! The common case is a call of a function that is not a target, so that
//! path is kept to the verdict lookup: the frame and usually the code object
//! come from registers the analysis proved hold them at the site (no memory
//! read at all); everything else (oparg, thread state) is read only for
//! targets.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use detector_common::{
    CHECK_BRANCH, CHECK_BRANCH_THREAD_COPY, CHECK_DEOPT_MEMORY, CHECK_NONE, CHECK_REINSTRUMENT, LAYOUT_STACKREFS,
    LAYOUT_TRACING_GATES_INSTRUMENT, LAYOUT_VERSION_IN_EVAL_BREAKER, Layout, MODE_PER_CALL, NO_OFFSET, SiteCookie,
    TARGET_PENDING, cond_holds, stats,
};

use crate::{
    emit,
    maps::{LAYOUTS, THREADS, bump, pass},
    mem::{field, object_field, read},
    regs::Gprs,
    verdict,
};

pub fn run(ctx: &ProbeContext) -> Option<()> {
    let cookie = SiteCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let pass = pass(cookie.slot, MODE_PER_CALL);
    let layout = LAYOUTS.get(cookie.layout)?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let regs = Gprs::load(ctx);

    let frame = match regs.get(cookie.frame_reg) {
        Some(f) => f,
        None => current_frame(layout, thread_state(tgid, tid, pass.instance)?)?,
    };
    // Plain values, 0 for "not in a register": an `Option` would leave the
    // verifier an uninitialised register to spill on the `None` path.
    let code_reg = match regs.get(cookie.code_reg) {
        Some(c) if layout.flags & LAYOUT_STACKREFS != 0 => c & !7,
        other => other.unwrap_or(0),
    };
    let instr_reg = regs.get(cookie.instr_reg).unwrap_or(0);
    // The cache is keyed by what costs no memory read: the code object, else
    // the RESUME's own address (inside the code object), else the code
    // object read from the frame.
    let key = if code_reg != 0 {
        code_reg
    } else if instr_reg != 0 {
        instr_reg
    } else {
        object_field(layout, frame, layout.frame_code)?
    };
    let code = || {
        if code_reg != 0 {
            Some(code_reg)
        } else if instr_reg == 0 {
            Some(key)
        } else {
            object_field(layout, frame, layout.frame_code)
        }
    };
    let known = verdict::verdict(layout, tgid, cookie.slot, pass.instance, key, code, |code| {
        Some(verdict::classify_resume(layout, tgid, frame, code))
    })?;
    let (target, code) = (known.target, known.code);
    if target >= TARGET_PENDING || !pass.counts {
        return None;
    }

    // A target: is this its start, and will the handler really run it?
    if known.resumable {
        let instr = if instr_reg != 0 { instr_reg } else { field(frame, layout.frame_instr)? };
        if read::<u8>(instr + 1)? as u16 & layout.resume_where_mask != 0 {
            return None; // resuming after yield or await
        }
    }
    let thread = (tgid, tid, pass.instance);
    if (cookie.check != CHECK_NONE && redispatches(ctx, &cookie, layout, thread, code))
        || (cookie.check != CHECK_BRANCH_THREAD_COPY && changes_bytecode(layout, frame, thread))
    {
        bump(stats::REDISPATCH_SKIPS);
        return None;
    }
    emit::hit(cookie.slot, tgid, tid, target, known.cell, code, pass.sparse, || Some((layout, frame)));
    Some(())
}

/// The thread's `PyThreadState`, recorded by `eval_entry` or pre-filled in
/// this watch of the process.
#[inline(always)]
fn thread_state(tgid: u32, tid: u32, instance: u32) -> Option<u64> {
    match unsafe { THREADS.get(&tid) } {
        Some(e) if e.tgid == tgid && e.instance == instance => Some(e.tstate),
        _ => {
            bump(stats::UNKNOWN_THREAD);
            None
        }
    }
}

/// `tstate->cframe->current_frame` (3.11, 3.12) or `tstate->current_frame`.
#[inline(always)]
pub fn current_frame(layout: &Layout, tstate: u64) -> Option<u64> {
    let base = if layout.tstate_cframe != NO_OFFSET { field(tstate, layout.tstate_cframe)? } else { tstate };
    field(base, layout.current_frame)
}

/// Free-threaded builds: whether the frame runs another thread's copy of the
/// bytecode (a new frame starts on the main copy until this thread has its
/// own), so the handler moves it to this thread's copy and dispatches the
/// same instruction again there, which then counts. RESUME_CHECK
/// de-optimises to RESUME for the same reason.
#[inline(always)]
fn changes_bytecode(layout: &Layout, frame: u64, thread: (u32, u32, u32)) -> bool {
    if layout.frame_tlbc_index == NO_OFFSET || layout.tstate_tlbc_index == NO_OFFSET {
        return false;
    }
    let (tgid, tid, instance) = thread;
    let Some(tstate) = thread_state(tgid, tid, instance) else { return false };
    let ours = read::<i32>(tstate + layout.tstate_tlbc_index as u64);
    let frames = read::<i32>(frame + layout.frame_tlbc_index as u64);
    matches!((ours, frames), (Some(a), Some(b)) if a != b)
}

/// Whether the handler will leave without starting the body and dispatch the
/// same instruction again, which then counts.
#[inline(always)]
fn redispatches(ctx: &ProbeContext, cookie: &SiteCookie, layout: &Layout, thread: (u32, u32, u32), code: u64) -> bool {
    let (tgid, tid, instance) = thread;
    match cookie.check {
        CHECK_BRANCH | CHECK_BRANCH_THREAD_COPY => {
            let flags = unsafe { (*ctx.regs).eflags };
            cond_holds(cookie.cond, flags) != (cookie.count_when == 1)
        }
        CHECK_REINSTRUMENT => {
            let Some(tstate) = thread_state(tgid, tid, instance) else { return false };
            if layout.flags & LAYOUT_TRACING_GATES_INSTRUMENT != 0
                && read::<i32>(tstate + layout.tstate_tracing as u64).unwrap_or(0) != 0
            {
                return false;
            }
            let Some(code_version) = field(code, layout.code_instr_version) else { return false };
            let global = if layout.flags & LAYOUT_VERSION_IN_EVAL_BREAKER != 0 {
                field(tstate, layout.tstate_eval_breaker).map(|v| v & !0xff)
            } else {
                field(tstate, layout.tstate_interp).and_then(|interp| field(interp, layout.interp_monitoring_version))
            };
            matches!(global, Some(g) if g != code_version)
        }
        CHECK_DEOPT_MEMORY => {
            let Some(tstate) = thread_state(tgid, tid, instance) else { return false };
            let breaker = field(tstate, layout.tstate_eval_breaker);
            let version = field(code, layout.code_instr_version);
            matches!((breaker, version), (Some(b), Some(v)) if b != v)
        }
        _ => false,
    }
}
