//! 3.11+: a RESUME-family handler. Every call passes here, inlined
//! Python-to-Python calls included; a start is a RESUME whose oparg says
//! "function start". The frame comes from the thread state recorded by
//! `eval_entry`, because registers at a handler are build-specific.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use detector_common::{
    CHECK_BRANCH, CHECK_DEOPT_MEMORY, CHECK_REINSTRUMENT, LAYOUT_TRACING_GATES_INSTRUMENT,
    LAYOUT_VERSION_IN_EVAL_BREAKER, Layout, NO_OFFSET, SiteCookie, TARGET_PENDING, VerdictKey,
    cond_holds, stats,
};

use crate::{
    emit,
    maps::{LAYOUTS, THREADS, bump},
    mem::{field, object_field, read},
    verdict,
};

pub fn run(ctx: &ProbeContext) -> Option<()> {
    let cookie = SiteCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let layout = LAYOUTS.get(cookie.layout)?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let tstate = match unsafe { THREADS.get(&tid) } {
        Some(e) if e.tgid == tgid => e.tstate,
        _ => {
            bump(stats::UNKNOWN_THREAD);
            return None;
        }
    };

    let frame = current_frame(layout, tstate)?;
    let instr = field(frame, layout.frame_instr)?;
    let oparg = read::<u8>(instr + 1)?;
    if oparg as u16 & layout.resume_where_mask != 0 {
        return None; // resuming after yield or await
    }
    let code = object_field(layout, frame, layout.frame_code)?;
    let qualname = field(code, layout.code_qualname)?;

    let key = VerdictKey {
        tgid,
        _pad: 0,
        code,
        name: qualname,
    };
    let generation = verdict::generation();
    let target = match verdict::cached(&key, generation) {
        Some(t) => t,
        None => {
            let t = verdict::classify_resume(layout, tgid, frame, code, qualname);
            verdict::store(&key, generation, t);
            t
        }
    };
    if target >= TARGET_PENDING {
        return None;
    }
    if redispatches(ctx, &cookie, layout, tstate, code) {
        bump(stats::REDISPATCH_SKIPS);
        return None;
    }
    emit::hit(tgid, tid, target, code);
    Some(())
}

/// `tstate->cframe->current_frame` (3.11, 3.12) or `tstate->current_frame`.
#[inline(always)]
fn current_frame(layout: &Layout, tstate: u64) -> Option<u64> {
    let base = if layout.tstate_cframe != NO_OFFSET {
        field(tstate, layout.tstate_cframe)?
    } else {
        tstate
    };
    field(base, layout.current_frame)
}

/// Whether the handler will leave without starting the body and dispatch the
/// same instruction again, which then counts. Only evaluated for matches.
#[inline(always)]
fn redispatches(
    ctx: &ProbeContext,
    cookie: &SiteCookie,
    layout: &Layout,
    tstate: u64,
    code: u64,
) -> bool {
    match cookie.check {
        CHECK_REINSTRUMENT => {
            if layout.flags & LAYOUT_TRACING_GATES_INSTRUMENT != 0
                && read::<i32>(tstate + layout.tstate_tracing as u64).unwrap_or(0) != 0
            {
                return false;
            }
            let Some(code_version) = field(code, layout.code_instr_version) else {
                return false;
            };
            let global = if layout.flags & LAYOUT_VERSION_IN_EVAL_BREAKER != 0 {
                field(tstate, layout.tstate_eval_breaker).map(|v| v & !0xff)
            } else {
                field(tstate, layout.tstate_interp)
                    .and_then(|interp| field(interp, layout.interp_monitoring_version))
            };
            matches!(global, Some(g) if g != code_version)
        }
        CHECK_BRANCH => {
            let flags = unsafe { (*ctx.regs).eflags };
            cond_holds(cookie.cond, flags) != (cookie.count_when == 1)
        }
        CHECK_DEOPT_MEMORY => {
            let breaker = field(tstate, layout.tstate_eval_breaker);
            let version = field(code, layout.code_instr_version);
            matches!((breaker, version), (Some(b), Some(v)) if b != v)
        }
        _ => false,
    }
}
