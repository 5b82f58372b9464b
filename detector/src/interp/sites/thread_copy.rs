//! Free-threaded builds: where RESUME_CHECK decides that a frame runs this
//! thread's copy of the bytecode, the branch a per-call site moves to.

use iced_x86::{ConditionCode, FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::{ResumeContext, cc_index, decoder, emulated, sets_flags};
use crate::interp::elf::ElfImage;

/// Instructions looked at past a version check for the bytecode copy's.
const THREAD_COPY_REACH: usize = 8;

/// Free-threaded builds: the branch after `branch` (a version check that
/// stays when it goes the `count_when` way) that decides whether the frame
/// runs this thread's copy of the bytecode, comparing it with
/// `frame->tlbc_index`: with its condition and which way counts (equal).
/// `block` grows by the instructions between.
pub(super) fn thread_copy_branch(
    elf: &ElfImage,
    branch: &Instruction,
    count_when: u8,
    block: &mut Vec<Instruction>,
    ctx: &ResumeContext,
) -> Option<(Instruction, u8, u8)> {
    if ctx.frame_tlbc_index == detector_common::NO_OFFSET {
        return None;
    }
    let stays = if count_when == 1 { branch.near_branch_target() } else { branch.next_ip() };
    let mut dec = decoder(elf, stays).ok()?;
    let mut between = Vec::new();
    let mut flag_setter = None;
    for _ in 0..THREAD_COPY_REACH {
        let insn = dec.decode();
        match insn.flow_control() {
            FlowControl::Next => {
                if sets_flags(&insn) {
                    flag_setter = Some(insn);
                }
                between.push(insn);
            }
            FlowControl::ConditionalBranch => {
                let compares = flag_setter.is_some_and(|f: Instruction| {
                    f.mnemonic() == Mnemonic::Cmp
                        && (0..f.op_count()).any(|i| f.op_kind(i) == OpKind::Memory)
                        && !matches!(f.memory_base(), Register::RIP | Register::RSP)
                        && f.memory_displacement64() == ctx.frame_tlbc_index as u64
                });
                let (cond, when) = match insn.condition_code() {
                    ConditionCode::e => (cc_index(ConditionCode::e), 1),
                    ConditionCode::ne => (cc_index(ConditionCode::ne), 0),
                    _ => return None,
                };
                if !compares || !emulated(&insn) {
                    return None;
                }
                block.extend(between);
                return Some((insn, cond, when));
            }
            _ => return None,
        }
    }
    None
}
