//! Which registers hold the frame, its code object and its instruction
//! pointer at a RESUME site, proven from the handler's own instructions.
//!
//! Reading a register from the probe's saved state is free; reading process
//! memory costs a `bpf_probe_read_user`, the dearest thing the eBPF program
//! does. A handler stores the instruction pointer into the frame before its
//! first branch (`mov [frame + instr_ptr], instr`), which names the frame's
//! register; many also load `frame->f_code` into a register for their
//! version check. A register counts only if nothing between that instruction
//! and the site writes it.

use detector_common::REG_NONE;
use iced_x86::{Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};

/// Registers (x86 numbering, rax = 0 ... r15 = 15; [`REG_NONE`] if unknown)
/// holding values at the site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegisterFacts {
    /// The `_PyInterpreterFrame *`.
    pub frame: u8,
    /// The frame's code object (possibly with `_PyStackRef` tag bits).
    pub code: u8,
    /// The frame's instruction pointer (the RESUME being executed).
    pub instr: u8,
}

impl RegisterFacts {
    /// Nothing known.
    pub const NONE: RegisterFacts = RegisterFacts { frame: REG_NONE, code: REG_NONE, instr: REG_NONE };

    /// What both `self` and `other` know alike: the facts at a join of two
    /// paths.
    pub fn common(&self, other: &RegisterFacts) -> RegisterFacts {
        let same = |a: u8, b: u8| if a == b { a } else { REG_NONE };
        RegisterFacts {
            frame: same(self.frame, other.frame),
            code: same(self.code, other.code),
            instr: same(self.instr, other.instr),
        }
    }
}

/// x86 number of a 64-bit general-purpose register.
fn gpr(r: Register) -> Option<u8> {
    const GPRS: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    GPRS.iter().position(|g| *g == r).map(|i| i as u8)
}

/// General-purpose registers (as x86 numbers) that `insn` may write.
fn written(factory: &mut InstructionInfoFactory, insn: &Instruction) -> Vec<u8> {
    factory
        .info(insn)
        .used_registers()
        .iter()
        .filter(|u| {
            matches!(u.access(), OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
        })
        .filter_map(|u| gpr(u.register().full_register()))
        .collect()
}

/// `mov [base + disp], src` with 64-bit registers: `(base, src)`.
fn store_to(insn: &Instruction, disp: u16) -> Option<(u8, u8)> {
    (insn.mnemonic() == Mnemonic::Mov
        && insn.op0_kind() == OpKind::Memory
        && insn.memory_index() == Register::None
        && insn.memory_displacement64() == disp as u64
        && insn.op1_kind() == OpKind::Register)
        .then(|| Some((gpr(insn.memory_base())?, gpr(insn.op1_register())?)))
        .flatten()
}

/// `mov dst, [base + disp]` with 64-bit registers: `(dst, base)`.
fn load_from(insn: &Instruction, disp: u16) -> Option<(u8, u8)> {
    (insn.mnemonic() == Mnemonic::Mov
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Memory
        && insn.memory_index() == Register::None
        && insn.memory_displacement64() == disp as u64)
        .then(|| Some((gpr(insn.op0_register())?, gpr(insn.memory_base())?)))
        .flatten()
}

/// `and reg, imm` clearing only low tag bits (`_PyStackRef` untagging).
fn untags(insn: &Instruction, reg: u8) -> bool {
    insn.mnemonic() == Mnemonic::And
        && insn.op0_kind() == OpKind::Register
        && gpr(insn.op0_register()) == Some(reg)
        && matches!(insn.op1_kind(), OpKind::Immediate8to64 | OpKind::Immediate32to64)
        && (-8..=-2).contains(&(insn.immediate(1) as i64))
}

/// Which register holds the instruction pointer stored from `instr` after
/// `after` (the instructions following the store, with the registers each
/// writes): `instr` itself if untouched, else a copy made back from it
/// (`add r13, 2` then `lea rbx, [r13 - 2]`, as a handler that moves on to
/// the next instruction early does).
fn instr_copy(after: &[Instruction], writes: &[Vec<u8>], instr: u8) -> Option<u8> {
    // Each register's value as the instruction pointer plus a delta.
    let mut delta: [Option<i64>; 16] = [None; 16];
    delta[instr as usize] = Some(0);
    for (insn, written) in after.iter().zip(writes) {
        let reg = |op: u32| (insn.op_kind(op) == OpKind::Register).then(|| gpr(insn.op_register(op))).flatten();
        let computed = match (insn.mnemonic(), reg(0)) {
            (Mnemonic::Add | Mnemonic::Sub, Some(d))
                if matches!(insn.op1_kind(), OpKind::Immediate8to64 | OpKind::Immediate32to64) =>
            {
                let imm = insn.immediate(1) as i64;
                delta[d as usize].map(|v| (d, if insn.mnemonic() == Mnemonic::Add { v + imm } else { v - imm }))
            }
            (Mnemonic::Lea, Some(d)) if insn.memory_index() == Register::None => gpr(insn.memory_base())
                .and_then(|b| delta[b as usize])
                .map(|v| (d, v + insn.memory_displacement64() as i64)),
            (Mnemonic::Mov, Some(d)) => reg(1).and_then(|src| delta[src as usize]).map(|v| (d, v)),
            _ => None,
        };
        for &w in written {
            delta[w as usize] = None;
        }
        if let Some((d, v)) = computed {
            delta[d as usize] = Some(v);
        }
    }
    if delta[instr as usize] == Some(0) {
        return Some(instr);
    }
    (0..16u8).find(|&r| r != 4 && delta[r as usize] == Some(0))
}

/// The facts at the site that follows `block` (the handler's instructions
/// before the site, in order).
pub fn at_site(block: &[Instruction], frame_instr: u16, frame_code: u16) -> RegisterFacts {
    let mut factory = InstructionInfoFactory::new();
    let writes: Vec<Vec<u8>> = block.iter().map(|i| written(&mut factory, i)).collect();
    let untouched = |reg: u8, from: usize, allow: &dyn Fn(&Instruction) -> bool| {
        (from..block.len()).all(|i| !writes[i].contains(&reg) || allow(&block[i]))
    };
    let mut facts = RegisterFacts::NONE;
    let Some((at, (frame, instr))) =
        block.iter().enumerate().rev().find_map(|(i, insn)| store_to(insn, frame_instr).map(|s| (i, s)))
    else {
        return facts;
    };
    // The frame register holds the frame across the whole block.
    if frame == 4 || !untouched(frame, 0, &|_| false) {
        return facts;
    }
    facts.frame = frame;
    facts.instr = instr_copy(&block[at + 1..], &writes[at + 1..], instr).unwrap_or(REG_NONE);
    if let Some((at, code)) =
        block.iter().enumerate().rev().find_map(|(i, insn)| {
            load_from(insn, frame_code).filter(|(_, base)| *base == frame).map(|(dst, _)| (i, dst))
        })
        && untouched(code, at + 1, &|insn| untags(insn, code))
    {
        facts.code = code;
    }
    facts
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    use super::*;

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).into_iter().collect()
    }

    #[test]
    fn frame_code_and_instr_from_a_312_style_block() {
        // lea rax,[r10+2]; mov rdi,[rbx]; mov [rbx+0x38],r10; mov [rsp+0x10],rax
        let block =
            decode(&[0x49, 0x8d, 0x42, 0x02, 0x48, 0x8b, 0x3b, 0x4c, 0x89, 0x53, 0x38, 0x48, 0x89, 0x44, 0x24, 0x10]);
        assert_eq!(at_site(&block, 0x38, 0), RegisterFacts { frame: 3, code: 7, instr: 10 });
    }

    #[test]
    fn clobbered_registers_are_unknown() {
        // mov [rbp+0x38],r15; add r15,2; mov rdx,[rbp]; mov rdx,rax
        let block = decode(&[0x4c, 0x89, 0x7d, 0x38, 0x49, 0x83, 0xc7, 0x02, 0x48, 0x8b, 0x55, 0x00, 0x48, 0x89, 0xc2]);
        assert_eq!(at_site(&block, 0x38, 0), RegisterFacts { frame: 5, code: REG_NONE, instr: REG_NONE });
    }

    #[test]
    fn untagging_keeps_the_code_register() {
        // mov rax,[rbx]; mov [rbx+0x38],r10; and rax,-2
        let block = decode(&[0x48, 0x8b, 0x03, 0x4c, 0x89, 0x53, 0x38, 0x48, 0x83, 0xe0, 0xfe]);
        assert_eq!(at_site(&block, 0x38, 0), RegisterFacts { frame: 3, code: 0, instr: 10 });
    }

    #[test]
    fn no_store_no_facts() {
        let block = decode(&[0x48, 0x8b, 0x03]);
        assert_eq!(at_site(&block, 0x38, 0), RegisterFacts::NONE);
    }

    #[test]
    fn a_join_keeps_what_both_paths_know() {
        let ours = RegisterFacts { frame: 12, code: 3, instr: 15 };
        let theirs = RegisterFacts { frame: 12, code: 3, instr: 13 };
        assert_eq!(ours.common(&theirs), RegisterFacts { frame: 12, code: 3, instr: REG_NONE });
        assert_eq!(ours.common(&RegisterFacts::NONE), RegisterFacts::NONE);
    }

    #[test]
    fn a_copy_made_back_from_the_advanced_pointer_holds_it() {
        // 3.13's RESUME: the store, then the pointer moves on and a copy of
        // the stored value is made back from it.
        let block = decode(&[
            0x4c, 0x89, 0x7d, 0x38, // mov [rbp+0x38], r15
            0x49, 0x83, 0xc7, 0x02, // add r15, 2
            0x4d, 0x8d, 0x67, 0xfe, // lea r12, [r15-2]
        ]);
        let facts = at_site(&block, 0x38, 0);
        assert_eq!((facts.frame, facts.instr), (5, 12));
        // Without the copy, nothing holds it.
        assert_eq!(at_site(&block[..2], 0x38, 0).instr, REG_NONE);
    }
}
