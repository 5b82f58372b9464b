//! The probed thread's general-purpose registers, by x86 number.

use aya_ebpf::programs::ProbeContext;
use detector_common::REG_NONE;

/// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8 ... r15, copied from the
/// probe's `pt_regs` at constant offsets (the verifier rejects a context
/// read at a computed offset; a read of this stack copy is fine).
pub struct Gprs([u64; 16]);

impl Gprs {
    #[inline(always)]
    pub fn load(ctx: &ProbeContext) -> Gprs {
        let r = unsafe { &*ctx.regs };
        Gprs([
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15,
        ])
    }

    /// Register `n`, or `None` for [`REG_NONE`].
    #[inline(always)]
    pub fn get(&self, n: u8) -> Option<u64> {
        if n >= REG_NONE { None } else { Some(self.0[(n & 15) as usize]) }
    }
}
