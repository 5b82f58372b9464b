//! 3.8-3.10: `_PyEval_EvalFrameDefault` entry, which every Python call and
//! every generator resume passes with the frame as an argument. A fresh start
//! is a frame that has not run yet (`f_lasti == -1`) entered without a
//! pending exception (`throwflag == 0`).

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use detector_common::{CodeKey, MODE_PER_CALL, SiteCookie, TARGET_NONE, TARGET_PENDING};

use crate::{
    emit,
    maps::{IDENTITIES, LAYOUTS, pass},
    mem::{field, read},
    verdict,
};

pub fn run(ctx: &ProbeContext) -> Option<()> {
    let cookie = SiteCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let pass = pass(cookie.slot, MODE_PER_CALL);
    let layout = LAYOUTS.get(cookie.layout)?;
    let (frame, throwflag) = frame_and_throwflag(ctx, layout.frame_arg);
    let code = field(frame, layout.frame_code)?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);

    let known = verdict::verdict(
        layout,
        tgid,
        cookie.slot,
        pass.instance,
        code,
        || Some(code),
        |code| {
            let name = field(code, layout.code_name)?;
            let identity = unsafe { IDENTITIES.get(&CodeKey { tgid, instance: pass.instance, code }) };
            Some(
                identity
                    .and_then(|id| verdict::classify_identity(layout, tgid, code, name, id))
                    .unwrap_or_else(|| verdict::classify_name(layout, code, name)),
            )
        },
    )?;
    let (target, resumable) = (known.target, known.resumable);
    if target == TARGET_NONE || !pass.counts {
        return None;
    }
    // A generator's frame is entered again on each resume (`f_lasti` is then
    // past -1) and by `throw()`: only a fresh entry is a start.
    if resumable && (throwflag as u32 != 0 || read::<i32>(frame + layout.frame_lasti as u64)? != -1) {
        return None;
    }
    if target == TARGET_PENDING {
        let name = field(code, layout.code_name)?;
        let globals = field(frame, layout.frame_globals).unwrap_or(0);
        emit::candidate(cookie.slot, tgid, tid, known.generation, code, name, globals);
    } else {
        emit::hit(cookie.slot, tgid, tid, target, known.cell, code, pass.sparse, || Some((layout, frame)));
    }
    Some(())
}

/// `(frame, throwflag)`: `(rdi, rsi)` on 3.8, `(rsi, rdx)` on 3.9 and 3.10.
/// All three registers are loaded at constant offsets and the values chosen
/// after: the verifier rejects a context access at a computed offset, which
/// is what choosing the address would compile to.
#[inline(always)]
fn frame_and_throwflag(ctx: &ProbeContext, frame_arg: u8) -> (u64, u64) {
    let regs = ctx.regs;
    let (rdi, rsi, rdx) = unsafe {
        (
            read_volatile(&raw const (*regs).rdi),
            read_volatile(&raw const (*regs).rsi),
            read_volatile(&raw const (*regs).rdx),
        )
    };
    if frame_arg == 0 { (rdi, rsi) } else { (rsi, rdx) }
}
