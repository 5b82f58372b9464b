//! `code_dealloc(PyCodeObject *)` entry: a code object is going away, so its
//! verdict, identity and starts awaiting resolution must not outlive it and
//! be inherited by whatever is allocated at the same address next; nor may
//! a watchpoint on one of its units keep counting whatever bytecode is put
//! there next.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use detector_common::{CodeKey, SiteCookie, WatchKey};

use crate::{
    emit,
    maps::{IDENTITIES, VERDICTS, WATCHED_CODES, WATCHES, instance},
    verdict,
};

pub fn run(ctx: &ProbeContext) {
    let Some(code) = ctx.arg::<u64>(0) else { return };
    let cookie = SiteCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = CodeKey { tgid, instance: instance(cookie.slot), code };
    let _ = VERDICTS.remove(&key);
    // Even without a verdict (the LRU may have dropped it), a CPU may cache one.
    verdict::code_freed();
    let _ = IDENTITIES.remove(&key);
    emit::pending_freed(cookie.slot, tgid, code);
    if let Some(&addr) = unsafe { WATCHED_CODES.get(&key) } {
        let _ = WATCHES.remove(&WatchKey { tgid, _pad: 0, addr });
        let _ = WATCHED_CODES.remove(&key);
        emit::freed(cookie.slot, tgid, code);
    }
}
