//! Probe-site cookies: what a site knows and must check before it counts.
//!
//! A uprobe's BPF cookie carries the layout id (high 16 bits) and the
//! process's slot (the next 16 bits, see [`crate::SLOTS`]); how to tell a
//! real function start from a pass that the handler will undo by
//! re-dispatching the same instruction; and which registers hold the frame,
//! its code object and its instruction pointer at the site, so the program
//! reads registers instead of process memory.

/// No register is known to hold the value.
pub const REG_NONE: u8 = 16;

/// Count every start seen at this site.
pub const CHECK_NONE: u8 = 0;
/// The handler re-instruments the code object and re-dispatches when the
/// code's instrumentation version is stale (3.12+ RESUME, INSTRUMENTED_RESUME):
/// do not count that pass, the re-dispatched one counts.
pub const CHECK_REINSTRUMENT: u8 = 1;
/// The site is the conditional branch that decides whether the handler
/// re-instruments or de-optimises and re-dispatches (3.12 RESUME and
/// INSTRUMENTED_RESUME, 3.13+ RESUME_CHECK): count only when the branch goes
/// the way that stays, as computed from the live flags.
pub const CHECK_BRANCH: u8 = 2;
/// As [`CHECK_BRANCH`], but the site is not that branch, so the condition is
/// recomputed from memory (`eval_breaker != version`): exact unless another
/// thread changes `eval_breaker` between the probe and the handler's load.
pub const CHECK_DEOPT_MEMORY: u8 = 3;
/// Free-threaded builds: as [`CHECK_BRANCH`], at the branch that decides
/// whether the frame runs this thread's copy of the bytecode, which the
/// handler reaches only once the version branch stayed. The flags decide
/// both, so the copy is not checked from memory.
pub const CHECK_BRANCH_THREAD_COPY: u8 = 4;

/// A decoded site cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteCookie {
    /// Index into the layouts map (16 bits).
    pub layout: u32,
    /// The process's slot, or [`crate::NO_SLOT`].
    pub slot: u16,
    /// One of the `CHECK_*` constants.
    pub check: u8,
    /// [`CHECK_BRANCH`]: x86 condition code (the low nibble of `Jcc`'s opcode).
    pub cond: u8,
    /// [`CHECK_BRANCH`]: count when the condition holds (1) or fails (0).
    pub count_when: u8,
    /// Register (x86 number, rax = 0 ... r15 = 15) holding the frame, or [`REG_NONE`].
    pub frame_reg: u8,
    /// Register holding the frame's code object, or [`REG_NONE`].
    pub code_reg: u8,
    /// Register holding the frame's instruction pointer, or [`REG_NONE`].
    pub instr_reg: u8,
}

impl SiteCookie {
    /// A cookie with only a layout and a check, and no registers known.
    pub const fn new(layout: u32, check: u8) -> SiteCookie {
        SiteCookie {
            layout,
            slot: crate::NO_SLOT,
            check,
            cond: 0,
            count_when: 0,
            frame_reg: REG_NONE,
            code_reg: REG_NONE,
            instr_reg: REG_NONE,
        }
    }

    /// Packs the cookie into the 64-bit value attached to the uprobe.
    pub const fn encode(&self) -> u64 {
        ((self.layout as u64 & 0xffff) << 48)
            | ((self.slot as u64) << 32)
            | ((self.instr_reg as u64 & 0x1f) << 23)
            | ((self.code_reg as u64 & 0x1f) << 18)
            | ((self.frame_reg as u64 & 0x1f) << 13)
            | ((self.count_when as u64 & 1) << 12)
            | ((self.cond as u64 & 0xf) << 8)
            | self.check as u64
    }

    /// Unpacks a cookie.
    pub const fn decode(v: u64) -> SiteCookie {
        SiteCookie {
            layout: (v >> 48) as u32,
            slot: (v >> 32) as u16,
            check: v as u8,
            cond: ((v >> 8) & 0xf) as u8,
            count_when: ((v >> 12) & 1) as u8,
            frame_reg: ((v >> 13) & 0x1f) as u8,
            code_reg: ((v >> 18) & 0x1f) as u8,
            instr_reg: ((v >> 23) & 0x1f) as u8,
        }
    }
}

/// Bits of x86 `RFLAGS`.
pub mod rflags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
}

/// Whether the x86 condition `cc` (0 = O ... 15 = G, as in `Jcc`) holds for
/// the flags `f`. Written branch-light so the verifier sees a short program.
#[inline(always)]
pub const fn cond_holds(cc: u8, f: u64) -> bool {
    let cf = f & rflags::CF != 0;
    let pf = f & rflags::PF != 0;
    let zf = f & rflags::ZF != 0;
    let sf = f & rflags::SF != 0;
    let of = f & rflags::OF != 0;
    let base = match cc >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || (sf != of),
    };
    // Odd condition codes are the negations of the even ones.
    base != (cc & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_round_trip() {
        let c = SiteCookie {
            layout: 63,
            slot: 4095,
            check: CHECK_BRANCH,
            cond: 5,
            count_when: 1,
            frame_reg: 3,
            code_reg: 15,
            instr_reg: REG_NONE,
        };
        assert_eq!(SiteCookie::decode(c.encode()), c);
        assert_eq!(SiteCookie::decode(SiteCookie::new(1, CHECK_NONE).encode()), SiteCookie::new(1, CHECK_NONE));
    }

    #[test]
    fn conditions_follow_the_flags() {
        assert!(cond_holds(4, rflags::ZF)); // e
        assert!(!cond_holds(5, rflags::ZF)); // ne
        assert!(cond_holds(5, 0));
        assert!(cond_holds(12, rflags::SF)); // l: SF != OF
        assert!(!cond_holds(12, rflags::SF | rflags::OF));
        assert!(cond_holds(7, 0)); // a: !CF && !ZF
        assert!(!cond_holds(7, rflags::CF));
    }
}
