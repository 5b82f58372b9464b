//! `code_dealloc(PyCodeObject *)` entry: a code object is going away, so its
//! verdict and identity must not outlive it and be inherited by whatever is
//! allocated at the same address next.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::ProbeContext};
use detector_common::CodeKey;

use crate::maps::{IDENTITIES, VERDICTS};

pub fn run(ctx: &ProbeContext) {
    let Some(code) = ctx.arg::<u64>(0) else { return };
    let key = CodeKey { tgid: (bpf_get_current_pid_tgid() >> 32) as u32, _pad: 0, code };
    let _ = VERDICTS.remove(&key);
    let _ = IDENTITIES.remove(&key);
}
