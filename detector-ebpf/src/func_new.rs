//! 3.8-3.10: `PyFunction_NewWithQualName(code, globals, qualname)` entry.
//! Every `def`, `lambda` and closure creation passes here (MAKE_FUNCTION), so
//! the kernel learns each code object's qualified name and module before its
//! first call and can match it exactly, even if the process exits at once.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid},
    programs::ProbeContext,
};
use detector_common::{CodeIdentity, CodeKey, SiteCookie};

use crate::maps::{IDENTITIES, instance};

pub fn run(ctx: &ProbeContext) {
    let (Some(code), Some(globals), Some(qualname)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2)) else {
        return;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let cookie = SiteCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let key = CodeKey { tgid, instance: instance(cookie.slot), code };
    let identity = CodeIdentity { qualname, globals };
    // Closures are made again on every call of their outer function; the
    // identity is the same, so skip the (dearer) update.
    if let Some(known) = unsafe { IDENTITIES.get(&key) }
        && *known == identity
    {
        return;
    }
    let _ = IDENTITIES.insert(&key, &identity, 0);
}
