//! The instructions that read a code unit to dispatch it, for the watch
//! strategy. A watchpoint on a body's first unit traps on every access, and
//! not every read is a body start: the specialiser scans the bytecode, and a
//! RESUME handler reads its own unit before quickening it. A start is the
//! dispatch reading the unit's opcode to jump to its handler: a load whose
//! result becomes the index (or base) of an indirect jump a few
//! instructions later. Those loads are found here by decoding the
//! evaluation loop; the kernel counts a trap only when the instruction just
//! before it is one of them (a data breakpoint traps after the access, so
//! the trap's instruction pointer is the end of the load).
//!
//! Two dispatches read a unit that was just dispatched, so they are left
//! out: a RESUME handler's own, which re-dispatches its unit after
//! instrumenting the code object (3.12+, when tracing or `sys.monitoring` is
//! switched), and 3.11's tracing handler, which re-dispatches the real
//! opcode of every instruction while a trace function is set.
//!
//! On 3.8-3.10 one loop dispatches every instruction, so the loads that
//! count are those a new frame reaches first from the function's entry:
//! 3.10 loads the next instruction at its loop head, and again after the
//! eval-breaker or line-trace slow paths, so the first instruction of a
//! body can be read twice by a single start.

use std::collections::BTreeMap;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};
use serde::Serialize;

use super::elf::ElfImage;

/// Instructions followed from a load to its indirect jump.
const MAX_DISTANCE: usize = 24;
/// Bytes decoded after a handler that lies outside the evaluation function
/// (another text section, as GCC 16 builds of 3.14 place them).
const HANDLER_SPAN: u64 = 4096;

/// The most of the evaluation function decoded, whatever size its symbol
/// declares (the largest build seen here has it well under 1 MiB).
const MAX_EVAL_BYTES: u64 = 4 << 20;
/// More dispatch loads than this is not an evaluation loop.
pub const MAX_READS: usize = 4096;

/// Where dispatch loads end, as virtual addresses of the object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DispatchReads {
    /// The end of every dispatch load (sorted).
    #[serde(skip)]
    pub ends: Vec<u64>,
    /// How many there are (reported).
    pub count: usize,
    /// Re-dispatches left out (reported).
    pub redispatches: usize,
}

/// How the value of a load is followed to an indirect jump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Along fall-throughs and direct jumps only (3.11+: each handler ends
    /// in its own dispatch, and a handler's other loads of its unit must
    /// not qualify).
    FallThrough,
    /// Along every branch (3.8-3.10: a frame's first instruction is loaded
    /// at the loop head and dispatched after the eval-breaker and tracing
    /// checks have branched around their slow paths).
    AnyBranch,
}

/// Finds the dispatch loads in `[eval, eval + size)` and after each handler
/// start outside it, less the re-dispatches of the handlers at `redispatchers`
/// (see the module); with the dispatch `table`, also those of the functions
/// the evaluation function calls that use it. `None` if there are none or
/// implausibly many.
pub fn find(
    elf: &ElfImage,
    eval: u64,
    size: u64,
    (handlers, table): (&[u64], Option<u64>),
    redispatchers: &[u64],
) -> Option<DispatchReads> {
    let mut regions = vec![(eval, size.min(MAX_EVAL_BYTES))];
    let end = eval.saturating_add(size);
    let mut outside: Vec<u64> = handlers.iter().copied().filter(|&h| h < eval || h >= end).collect();
    outside.sort_unstable();
    outside.dedup();
    regions.extend(outside.into_iter().map(|h| (h, HANDLER_SPAN)));
    let mut ends = Vec::new();
    for (start, len) in regions {
        if len == 0 {
            continue;
        }
        // Near the end of a segment, take what there is.
        let Some(bytes) =
            (0..12).map(|k| len >> k).take_while(|&l| l > 0).find_map(|l| elf.bytes_at(start, l as usize))
        else {
            continue;
        };
        let code: Vec<Instruction> = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE).into_iter().collect();
        for ins in &code {
            let Some(dest) = opcode_load(ins) else { continue };
            if feeds_indirect_jump(|ip| decode_at(elf, ip), ins.next_ip(), dest, Follow::FallThrough) {
                ends.push(ins.next_ip());
            }
        }
    }
    // A new frame's first dispatch (`start_frame`, where inlined calls go)
    // can lie outside the function's extent and every handler's, as in
    // Debian's 3.15, whose symbol covers only the entry: it is the first
    // dispatch the entry reaches.
    ends.extend(first_dispatches(|a| decode_at(elf, a), eval, Follow::FallThrough).0);
    // Only where every handler lies outside the function: a whole
    // evaluation loop makes hundreds of calls, none into a dispatcher.
    let apart = !handlers.is_empty() && handlers.iter().all(|&h| h < eval || h >= end);
    if let Some(table) = table.filter(|_| apart) {
        ends.extend(called_dispatches(elf, eval, size, table)?);
    }
    ends.sort_unstable();
    ends.dedup();
    let redispatch: Vec<u64> = redispatchers.iter().flat_map(|&h| handler_dispatches(elf, h)).collect();
    let before = ends.len();
    ends.retain(|e| !redispatch.contains(e));
    let reads = DispatchReads { count: ends.len(), redispatches: before - ends.len(), ends };
    (reads.count > 0 && reads.count <= MAX_READS).then_some(reads)
}

/// Instructions looked at from a handler's or the evaluation function's
/// start to the first dispatches.
const MAX_WALK: usize = 2000;

/// The ends of the first dispatch loads reached from `start` along every
/// branch (but through no indirect jump, call target or return), nearest
/// first; and whether the walk stopped short of some paths.
fn first_dispatches(
    decode: impl Fn(u64) -> Option<Instruction> + Copy,
    start: u64,
    follow: Follow,
) -> (Vec<u64>, bool) {
    let mut found = Vec::new();
    let cut = walk_paths(decode, start, |ins| {
        let dispatch = opcode_load(ins).is_some_and(|dest| feeds_indirect_jump(decode, ins.next_ip(), dest, follow));
        if dispatch {
            found.push(ins.next_ip());
        }
        dispatch
    });
    (found, cut)
}

/// Visits the instructions reached from `start` along every branch (but
/// through no indirect jump, call target or return), nearest first, until
/// `stop` says a path ends at one; returns whether [`MAX_WALK`] cut it short.
fn walk_paths(
    decode: impl Fn(u64) -> Option<Instruction>,
    start: u64,
    mut stop: impl FnMut(&Instruction) -> bool,
) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut todo = std::collections::VecDeque::from([start]);
    while let Some(ip) = todo.pop_front() {
        if !seen.insert(ip) {
            continue;
        }
        if seen.len() > MAX_WALK {
            return true;
        }
        let Some(ins) = decode(ip) else { continue };
        if stop(&ins) {
            continue;
        }
        match ins.flow_control() {
            FlowControl::Next | FlowControl::Call => todo.push_back(ins.next_ip()),
            FlowControl::ConditionalBranch => {
                todo.push_back(ins.next_ip());
                todo.push_back(ins.near_branch_target());
            }
            FlowControl::UnconditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                todo.push_back(ins.near_branch_target())
            }
            _ => {}
        }
    }
    false
}

/// The most of the evaluation function decoded for the calls it makes.
const MAX_CALLER_BYTES: u64 = 64 << 10;

/// Instructions before a call looked at for the table passed to it.
const ARGUMENT_WINDOW: usize = 8;
/// Distinct functions the evaluation function may call for it to be taken
/// for a tail-calling interpreter's, whose callees are looked through.
const MAX_CALLEES: usize = 64;

/// The first dispatches of the functions the evaluation function calls
/// with the dispatch `table`: using it themselves (3.14), or given it as an
/// argument (3.15 loads it just before the call). A tail-calling interpreter
/// (clang builds of 3.14+) makes every handler a function, and enters a new
/// frame's first one from a function the evaluation function calls
/// (`start_frame`), not from the table. A helper it calls without the table
/// (one that instruments bytecode, say) is not a dispatcher, whatever its
/// loads.
fn called_dispatches(elf: &ElfImage, eval: u64, size: u64, table: u64) -> Option<Vec<u64>> {
    let len = size.min(MAX_CALLER_BYTES) as usize;
    let bytes = elf.bytes_at(eval, len)?;
    let decode = |a| decode_at(elf, a);
    let code: Vec<Instruction> = Decoder::with_ip(64, bytes, eval, DecoderOptions::NONE).into_iter().collect();
    // Each callee once, and whether some call gives it the table.
    let mut callees: BTreeMap<u64, bool> = BTreeMap::new();
    for (i, ins) in code.iter().enumerate() {
        if ins.flow_control() == FlowControl::Call && ins.op0_kind() == OpKind::NearBranch64 {
            let given = code[i.saturating_sub(ARGUMENT_WINDOW)..i].iter().any(|a| refers_to(a, table));
            *callees.entry(ins.near_branch_target()).or_default() |= given;
        }
    }
    // More than a tail-calling interpreter makes (16 in 3.15): not one.
    if callees.len() > MAX_CALLEES {
        return None;
    }
    let uses_table = |f: u64| {
        let mut uses = false;
        walk_paths(decode, f, |ins| {
            uses |= refers_to(ins, table);
            uses
        });
        uses
    };
    let mut ends = Vec::new();
    for (f, given) in callees {
        if given || uses_table(f) {
            let (found, cut) = first_dispatches(decode, f, Follow::FallThrough);
            if cut {
                return None; // a dispatch may lie beyond the walk
            }
            ends.extend(found);
        }
    }
    Some(ends)
}

/// Whether `ins` addresses memory at `addr` (RIP-relative, or absolute as
/// a non-PIE table index).
fn refers_to(ins: &Instruction, addr: u64) -> bool {
    (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory)
        && if ins.is_ip_rel_memory_operand() {
            ins.ip_rel_memory_address() == addr
        } else {
            ins.memory_displacement64() == addr
        }
}

/// The ends of the dispatch loads a handler reaches from its start.
fn handler_dispatches(elf: &ElfImage, handler: u64) -> Vec<u64> {
    first_dispatches(|a| decode_at(elf, a), handler, Follow::FallThrough).0
}

/// 3.8-3.10: the dispatch loads that read a new frame's first instruction,
/// the first reached from the evaluation function's entry. 3.10 reads an
/// instruction again after the loop head calls out (to handle the eval
/// breaker, to call a line-trace function), from other loads: only these
/// mean a body starts. `None` if there are none, or the walk was cut short
/// (a load it did not reach could be a start's).
pub fn find_from_entry(elf: &ElfImage, eval: u64) -> Option<DispatchReads> {
    let (mut ends, cut) = first_dispatches(|a| decode_at(elf, a), eval, Follow::AnyBranch);
    if cut || ends.is_empty() {
        return None;
    }
    ends.sort_unstable();
    ends.dedup();
    Some(DispatchReads { count: ends.len(), redispatches: 0, ends })
}

/// The register a one- or two-byte zero-extending load from memory writes.
fn opcode_load(ins: &Instruction) -> Option<Register> {
    matches!(ins.code(), Code::Movzx_r32_rm8 | Code::Movzx_r32_rm16 | Code::Movzx_r64_rm8 | Code::Movzx_r64_rm16)
        .then_some(())
        .filter(|_| ins.op1_kind() == OpKind::Memory)
        .map(|_| ins.op0_register().full_register())
}

/// The instruction at `ip` in `elf`.
fn decode_at(elf: &ElfImage, ip: u64) -> Option<Instruction> {
    let bytes = (1..=15).rev().find_map(|l| elf.bytes_at(ip, l))?;
    let ins = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode();
    (!ins.is_invalid()).then_some(ins)
}

/// Instructions looked at, over all paths, from one load.
const MAX_PATH_WORK: usize = 1024;

/// Whether the value in `reg` reaches an indirect jump (as its index, base or
/// target) within [`MAX_DISTANCE`] instructions from `ip`, following direct
/// jumps (a switch build, and GCC's shared dispatch tails, jump to one
/// dispatch block) and the fall-through of conditional branches, or with
/// [`Follow::AnyBranch`] both of their sides (all paths together at most
/// [`MAX_PATH_WORK`] instructions).
fn feeds_indirect_jump(decode: impl Fn(u64) -> Option<Instruction>, ip: u64, reg: Register, follow: Follow) -> bool {
    // Breadth first: the branches nearest the load are the likely ones.
    let mut todo = std::collections::VecDeque::from([(ip, vec![reg], 0usize)]);
    // The shallowest depth each (instruction, taint) was reached at: a
    // deeper arrival has less budget left and finds nothing new.
    let mut seen = std::collections::HashMap::new();
    let mut work = 0;
    while let Some((mut ip, mut tainted, mut depth)) = todo.pop_front() {
        while depth < MAX_DISTANCE && work < MAX_PATH_WORK {
            tainted.sort_unstable();
            match seen.entry((ip, tainted.clone())) {
                std::collections::hash_map::Entry::Occupied(e) if *e.get() <= depth => break,
                e => {
                    e.insert_entry(depth);
                }
            }
            work += 1;
            depth += 1;
            let Some(ins) = decode(ip) else { break };
            let reads_tainted = reads_any(&ins, &tainted);
            ip = ins.next_ip();
            match ins.flow_control() {
                FlowControl::IndirectBranch if reads_tainted => return true,
                FlowControl::Next => {}
                FlowControl::ConditionalBranch => {
                    if follow == Follow::AnyBranch {
                        todo.push_back((ins.near_branch_target(), tainted.clone(), depth));
                    }
                }
                FlowControl::UnconditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                    ip = ins.near_branch_target();
                    continue;
                }
                _ => break,
            }
            for w in written(&ins) {
                tainted.retain(|&t| t != w);
                if reads_tainted {
                    tainted.push(w);
                }
            }
            if tainted.is_empty() {
                break;
            }
        }
    }
    false
}

fn reads_any(ins: &Instruction, regs: &[Register]) -> bool {
    let mem = ins.op_count() > 0
        && (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory)
        && (regs.contains(&ins.memory_base().full_register()) || regs.contains(&ins.memory_index().full_register()));
    let operands = (0..ins.op_count()).any(|i| {
        // The destination of a plain move is written, not read.
        let dest_only = i == 0 && matches!(ins.mnemonic(), iced_x86::Mnemonic::Mov | iced_x86::Mnemonic::Movzx);
        ins.op_kind(i) == OpKind::Register && !dest_only && regs.contains(&ins.op_register(i).full_register())
    });
    mem || operands
}

fn written(ins: &Instruction) -> Vec<Register> {
    if ins.op_count() > 0
        && ins.op0_kind() == OpKind::Register
        && !matches!(ins.mnemonic(), iced_x86::Mnemonic::Cmp | iced_x86::Mnemonic::Test)
    {
        vec![ins.op0_register().full_register()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).into_iter().collect()
    }

    /// Whether the load ending at instruction `i` of `code` feeds a jump.
    fn feeds(code: &[Instruction], i: usize, reg: Register) -> bool {
        let at = |ip| code.iter().find(|c| c.ip() == ip).copied();
        feeds_indirect_jump(at, code[i].next_ip(), reg, Follow::FallThrough)
    }

    #[test]
    fn a_dispatch_load_feeds_the_indirect_jump() {
        // movzx eax, byte [r13]; movzx ecx, byte [r13+1]; jmp [rdx+rax*8]
        let code = decode(&[0x41, 0x0f, 0xb6, 0x45, 0x00, 0x41, 0x0f, 0xb6, 0x4d, 0x01, 0xff, 0x24, 0xc2]);
        assert_eq!(opcode_load(&code[0]), Some(Register::RAX));
        assert!(feeds(&code, 0, Register::RAX));
        // The oparg load does not.
        assert!(!feeds(&code, 1, Register::RCX));
    }

    #[test]
    fn a_load_overwritten_before_the_jump_does_not() {
        // movzx eax, word [rbx]; mov byte [rbx], 0xcf; movzx eax, byte [r13]; jmp [rdx+rax*8]
        let code = decode(&[0x0f, 0xb7, 0x03, 0xc6, 0x03, 0xcf, 0x41, 0x0f, 0xb6, 0x45, 0x00, 0xff, 0x24, 0xc2]);
        assert!(!feeds(&code, 0, Register::RAX));
        assert!(feeds(&code, 2, Register::RAX));
    }

    #[test]
    fn through_a_table_load_and_a_bounds_check() {
        // movzx eax, byte [r13]; cmp eax, 0xff; ja +0; mov rax, [rdx+rax*8]; jmp rax
        let code = decode(&[
            0x41, 0x0f, 0xb6, 0x45, 0x00, 0x3d, 0xff, 0x00, 0x00, 0x00, 0x77, 0x00, 0x48, 0x8b, 0x04, 0xc2, 0xff, 0xe0,
        ]);
        assert!(feeds(&code, 0, Register::RAX));
    }

    #[test]
    fn through_a_direct_jump_to_a_shared_dispatch_block() {
        // movzx eax, byte [r13]; jmp +2; int3; int3; jmp [rdx+rax*8]
        let code = decode(&[0x41, 0x0f, 0xb6, 0x45, 0x00, 0xeb, 0x02, 0xcc, 0xcc, 0xff, 0x24, 0xc2]);
        assert!(feeds(&code, 0, Register::RAX));
    }

    #[test]
    fn past_a_taken_branch_around_a_slow_path() {
        // movzx eax, word [r15]; test edx, edx; jne +5; call +0; jmp rax:
        // the 3.8-3.10 loop head, dispatching once the checks branch away.
        let code = decode(&[0x41, 0x0f, 0xb7, 0x07, 0x85, 0xd2, 0x75, 0x05, 0xe8, 0, 0, 0, 0, 0xff, 0xe0]);
        assert!(!feeds(&code, 0, Register::RAX));
        let at = |ip| code.iter().find(|c| c.ip() == ip).copied();
        assert!(feeds_indirect_jump(at, code[0].next_ip(), Register::RAX, Follow::AnyBranch));
    }

    #[test]
    fn a_new_frame_dispatches_from_the_first_load_after_the_entry() {
        // movzx r9d, word [r15]; test eax, eax; jne slow; jmp r9;
        // slow: call +0; movzx r9d, word [r11]; jmp r9
        // (the 3.10 loop head, and its reload after the eval-breaker call).
        let code = decode(&[
            0x45, 0x0f, 0xb7, 0x0f, 0x85, 0xc0, 0x75, 0x03, 0x41, 0xff, 0xe1, 0xe8, 0, 0, 0, 0, 0x45, 0x0f, 0xb7, 0x0b,
            0x41, 0xff, 0xe1,
        ]);
        let at = |ip| code.iter().find(|c| c.ip() == ip).copied();
        // Both are dispatch loads; only the head is where a frame starts.
        assert!(feeds_indirect_jump(at, code[5].next_ip(), Register::R9, Follow::FallThrough));
        assert_eq!(first_dispatches(at, 0x1000, Follow::AnyBranch), (vec![code[0].next_ip()], false));
    }
}
