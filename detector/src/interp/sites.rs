//! Probe sites: where in the interpreter's machine code every call passes,
//! chosen so the kernel can emulate the probed instruction.
//!
//! A uprobe on an instruction the kernel emulates (relative `jmp`/`jcc`/`call`,
//! `push`) costs about 0.6 us per hit here; any other instruction is
//! single-stepped out of line for about 10 us. So a RESUME handler is probed
//! at its first relative branch, found by decoding its straight-line block.

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic,
    OpKind, Register,
};

use super::{
    AnalysisError,
    elf::ElfImage,
    registers::{self, RegisterFacts},
};
use detector_common::{CHECK_BRANCH, CHECK_BRANCH_THREAD_COPY, CHECK_DEOPT_MEMORY, CHECK_NONE, CHECK_REINSTRUMENT};

mod deopt;
mod thread_copy;
pub(crate) use deopt::deopt_sites;
use thread_copy::thread_copy_branch;

/// Instructions decoded from a handler before giving up on finding a branch.
const MAX_STRAIGHT_LINE: usize = 64;
/// Handlers a real dispatch table has at the very least.
const MIN_DISTINCT_HANDLERS: usize = 64;
/// Opcodes that may share a handler with another one (aliases such as
/// `JUMP_BACKWARD_NO_INTERRUPT`) in a table found by scanning.
const MAX_SHARED_HANDLERS: usize = 8;

/// How opcode handlers were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerSource {
    /// `TARGET_<OPCODE>` labels in DWARF.
    DwarfLabels,
    /// `_TAIL_CALL_<OPCODE>` functions in `.symtab` (3.14's tail-calling
    /// interpreter, where each handler is a function of its own).
    TailCallFunctions,
    /// The dispatch table at the local symbol `opcode_targets.N` (3.15:
    /// `opcode_targets_table.N`) in `.symtab`.
    Symtab,
    /// A dispatch table found by scanning data sections for 256 code
    /// pointers shaped like one.
    Scan,
}

/// The 256-entry dispatch table: `entries[opcode]` is the handler's address.
#[derive(Clone, Debug)]
pub struct HandlerTable {
    /// Virtual address of the table.
    pub addr: u64,
    /// How it was found.
    pub source: HandlerSource,
    /// Handler addresses by opcode.
    pub entries: Vec<u64>,
    /// The handler of unknown opcodes (the most common entry).
    pub unknown: u64,
}

/// What a probe site is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteRole {
    /// `_PyEval_EvalFrameDefault` entry: the per-call site on 3.8-3.10, the
    /// thread-state recorder on 3.11+.
    EvalEntry,
    /// A RESUME-family handler (3.11+).
    Resume,
    /// `PyFunction_NewWithQualName` entry (3.8-3.10): records identities.
    FunctionNew,
    /// `code_dealloc` entry: forgets a dying code object's verdict.
    CodeDealloc,
    /// `PyEval_EvalCode` entry: a module body starts (imports, `exec`).
    ModuleExec,
    /// `_PyOptimizer_Optimize` entry: the tier-2 optimizer (the JIT) starts.
    Tier2Start,
}

/// A probe site.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Site {
    /// What it is for.
    pub role: SiteRole,
    /// The function or opcode handler it is in.
    pub handler: String,
    /// Virtual address of the function or handler start.
    pub handler_addr: u64,
    /// Virtual address of the probed instruction.
    pub addr: u64,
    /// Its file offset, where the uprobe is attached.
    pub file_offset: u64,
    /// The probed instruction, in Intel syntax.
    pub instruction: String,
    /// Whether the kernel emulates it (else it is single-stepped, ~16x dearer).
    pub emulated: bool,
    /// `CHECK_*` from `detector_common::site`.
    pub check: u8,
    /// For `CHECK_BRANCH`: the condition code and whether to count when it holds.
    pub cond: u8,
    /// See `cond`.
    pub count_when: u8,
    /// Registers known to hold the frame, code object and instruction pointer.
    pub registers: RegisterFacts,
}

/// The RESUME-family opcodes of a minor version, by name.
pub fn resume_opcodes(minor: u8) -> &'static [(&'static str, u8)] {
    match minor {
        11 => &[("RESUME", 151), ("RESUME_QUICK", 150)],
        12 => &[("RESUME", 151), ("INSTRUMENTED_RESUME", 240)],
        13 => &[("RESUME", 149), ("RESUME_CHECK", 207), ("INSTRUMENTED_RESUME", 236)],
        14 => &[("RESUME", 128), ("RESUME_CHECK", 196), ("INSTRUMENTED_RESUME", 245)],
        // RESUME_CHECK_JIT is what RESUME becomes while the JIT is on.
        15 => &[("RESUME", 128), ("RESUME_CHECK", 200), ("RESUME_CHECK_JIT", 201), ("INSTRUMENTED_RESUME", 244)],
        _ => &[],
    }
}

/// Finds the dispatch table of a 3.`minor` interpreter: `.symtab` first,
/// then a scan of data sections.
pub fn handler_table(elf: &ElfImage, minor: u8) -> Result<HandlerTable, AnalysisError> {
    // 3.15 renamed the computed-goto table (`opcode_targets_table.N`).
    let named = elf.local_symbols("opcode_targets").chain(elf.local_symbols("opcode_targets_table"));
    for (_, sym) in named {
        if sym.size == 256 * 8
            && let Some(t) = table_at(elf, sym.addr, HandlerSource::Symtab, 256)
        {
            return Ok(t);
        }
    }
    let mut best: Option<HandlerTable> = None;
    let mut ambiguous = false;
    // A non-PIE build keeps the table, which is not `const`, in `.data`.
    for name in [".data.rel.ro", ".rodata", ".data"] {
        let Some(section) = elf.section(name) else {
            continue;
        };
        let mut addr = section.addr.saturating_add(7) & !7;
        while addr.saturating_add(256 * 8) <= section.addr.saturating_add(section.size) {
            // Cheap rejection before reading the whole candidate.
            if elf.pointer_at(addr).is_some_and(|p| elf.is_code(p))
                && let Some(t) = table_at(elf, addr, HandlerSource::Scan, MAX_SHARED_HANDLERS)
                && has_resume_handlers(&t, minor)
            {
                let n = distinct(&t.entries);
                match &best {
                    Some(b) if distinct(&b.entries) == n => ambiguous = true,
                    Some(b) if distinct(&b.entries) > n => {}
                    _ => {
                        ambiguous = false;
                        best = Some(t);
                    }
                }
            }
            addr += 8;
        }
    }
    match best {
        Some(_) if ambiguous => {
            Err(AnalysisError::Unsupported("two candidate opcode dispatch tables in data sections".into()))
        }
        Some(t) => Ok(t),
        None => Err(AnalysisError::Unsupported(
            "cannot find the opcode handlers: no DWARF `TARGET_*` labels, no `opcode_targets` \
             symbol, and no dispatch table in data sections (a build without computed gotos has \
             none); installing the interpreter's debug symbols would make it analysable"
                .into(),
        )),
    }
}

fn distinct(entries: &[u64]) -> usize {
    let mut v = entries.to_vec();
    v.sort_unstable();
    v.dedup();
    v.len()
}

/// Reads 256 code pointers at `addr` if they are shaped like a dispatch
/// table: every entry in code, and every opcode without a handler sharing one
/// "unknown opcode" target, so (distinct - 1) + (count of the most common) is
/// 256 less the few opcodes that alias another's handler (at most `shared`).
fn table_at(elf: &ElfImage, addr: u64, source: HandlerSource, shared: usize) -> Option<HandlerTable> {
    let mut entries = Vec::with_capacity(256);
    for i in 0..256 {
        let p = elf.pointer_at(addr.checked_add(i * 8)?)?;
        if !elf.is_code(p) {
            return None;
        }
        entries.push(p);
    }
    let mut sorted = entries.clone();
    sorted.sort_unstable();
    let (mut best, mut best_count, mut run) = (sorted[0], 0usize, 0usize);
    for (i, v) in sorted.iter().enumerate() {
        run = if i > 0 && sorted[i - 1] == *v { run + 1 } else { 1 };
        if run > best_count {
            best_count = run;
            best = *v;
        }
    }
    let distinct = distinct(&entries);
    let aliased = 256 - (distinct - 1 + best_count);
    (distinct >= MIN_DISTINCT_HANDLERS && best_count >= 2 && aliased <= shared).then_some(HandlerTable {
        addr,
        source,
        entries,
        unknown: best,
    })
}

/// Whether `t` has a handler for each RESUME-family opcode and, from 3.14
/// on, none for the unused opcodes just below RESUME (121-127): a window
/// one entry off a real table has the same handlers, shifted onto them.
/// (RESUME_CHECK_JIT may share RESUME_CHECK's code in a build without the
/// JIT, so handlers need not be distinct.)
fn has_resume_handlers(t: &HandlerTable, minor: u8) -> bool {
    let resumes = resume_opcodes(minor).iter().all(|(_, op)| t.entries[*op as usize] != t.unknown);
    resumes && (minor < 14 || (121..128).all(|op| t.entries[op] == t.unknown))
}

/// The instructions of `elf` starting at `addr`.
fn decoder(elf: &ElfImage, addr: u64) -> Result<Decoder<'_>, AnalysisError> {
    let bytes = (0..=12)
        .rev()
        .find_map(|shift| elf.bytes_at(addr, 16 << shift))
        .ok_or_else(|| AnalysisError::Unsupported(format!("no code bytes at {addr:#x}")))?;
    Ok(Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE))
}

fn format(insn: &Instruction) -> String {
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

/// Whether the kernel emulates a uprobe on `insn` instead of single-stepping.
fn emulated(insn: &Instruction) -> bool {
    insn.is_jcc_short_or_near()
        || insn.is_jmp_short_or_near()
        || insn.is_call_near()
        || (insn.mnemonic() == Mnemonic::Push && insn.op0_kind() == OpKind::Register)
        || insn.mnemonic() == Mnemonic::Nop
}

/// A function-entry site: the function's first instruction the kernel
/// emulates, as long as nothing before it touches the argument registers
/// (only `endbr64` and `nop` are skipped).
pub fn function_entry(elf: &ElfImage, name: &str, addr: u64, role: SiteRole) -> Result<Site, AnalysisError> {
    let mut dec = decoder(elf, addr)?;
    let mut first: Option<Instruction> = None;
    for _ in 0..8 {
        let insn = dec.decode();
        if insn.is_invalid() {
            break;
        }
        first.get_or_insert(insn);
        if emulated(&insn) && insn.mnemonic() != Mnemonic::Nop {
            return Ok(entry_site(name, role, addr, &insn, true));
        }
        if !matches!(insn.mnemonic(), Mnemonic::Endbr64 | Mnemonic::Nop) {
            break;
        }
    }
    let insn = first.ok_or_else(|| AnalysisError::Unsupported(format!("cannot decode {name} at {addr:#x}")))?;
    Ok(entry_site(name, role, addr, &insn, false))
}

fn entry_site(name: &str, role: SiteRole, func: u64, insn: &Instruction, emulated: bool) -> Site {
    Site {
        role,
        handler: name.into(),
        handler_addr: func,
        addr: insn.ip(),
        file_offset: 0,
        instruction: format(insn),
        emulated,
        check: CHECK_NONE,
        cond: 0,
        count_when: 0,
        registers: RegisterFacts::NONE,
    }
}

/// Offsets a RESUME site needs to be chosen and checked.
pub struct ResumeContext {
    /// Minor version.
    pub minor: u8,
    /// Frame field holding the code object.
    pub frame_code: u16,
    /// Frame field holding the current instruction.
    pub frame_instr: u16,
    /// `_co_instrumentation_version` (3.12+).
    pub code_instr_version: u16,
    /// The frame's bytecode copy index (free-threaded builds), or
    /// [`detector_common::NO_OFFSET`].
    pub frame_tlbc_index: u16,
}

impl Site {
    /// A RESUME-family site at the branch `insn` of the handler (name,
    /// address), decided by `(check, cond, count_when)`.
    fn resume(
        (handler, handler_addr): (String, u64),
        insn: &Instruction,
        decided: (u8, u8, u8),
        registers: RegisterFacts,
    ) -> Site {
        let (check, cond, count_when) = decided;
        Site {
            role: SiteRole::Resume,
            handler,
            handler_addr,
            addr: insn.ip(),
            file_offset: 0,
            instruction: format(insn),
            emulated: true,
            check,
            cond,
            count_when,
            registers,
        }
    }
}

/// Where another handler's uncounted pass goes on, and that handler.
pub type UncountedEdge = (u64, u64);

/// The site of the RESUME-family handler `name` at `handler`: its first
/// relative branch, which must come after the handler stored the frame's
/// instruction pointer (the eBPF program reads the oparg through it).
pub fn resume_site(
    elf: &ElfImage,
    (name, handler): (&str, u64),
    ctx: &ResumeContext,
    uncounted: &[UncountedEdge],
) -> Result<Site, AnalysisError> {
    let refuse = |why: String| AnalysisError::Unsupported(format!("{name} handler at {handler:#x}: {why}"));
    let mut dec = decoder(elf, handler)?;
    let mut stored_instr = false;
    let mut flag_setter: Option<Instruction> = None;
    let mut block = Vec::new();
    // Where the block joins another handler's uncounted pass, and whose.
    let mut joined: Option<(usize, u64)> = None;
    for _ in 0..MAX_STRAIGHT_LINE {
        let insn = dec.decode();
        if insn.is_invalid() {
            return Err(refuse(format!("undecodable instruction at {:#x}", insn.ip())));
        }
        let joins = (insn.op0_kind() == OpKind::NearBranch64)
            .then(|| uncounted.iter().find(|(edge, _)| *edge == insn.near_branch_target()))
            .flatten();
        match insn.flow_control() {
            FlowControl::Next => {
                stored_instr |= stores_to_displacement(&insn, ctx.frame_instr);
                if sets_flags(&insn) {
                    flag_setter = Some(insn);
                }
                block.push(insn);
            }
            // The handler's body lies where another handler's uncounted
            // pass continues (GCC's link-time optimisation puts RESUME's
            // after RESUME_CHECK, whose de-optimisation jumps into it): the
            // site must be there, where both pass.
            FlowControl::UnconditionalBranch if stored_instr && joined.is_none() && joins.is_some() => {
                let &(edge, partner) = joins.expect("checked");
                joined = Some((block.len(), partner));
                // The other pass comes with flags of its own.
                flag_setter = None;
                dec = decoder(elf, edge)?;
            }
            FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
                if emulated(&insn) =>
            {
                if !stored_instr {
                    return Err(refuse(format!(
                        "first branch at {:#x} comes before the store of the frame's instruction \
                         pointer (+{:#x})",
                        insn.ip(),
                        ctx.frame_instr
                    )));
                }
                let (mut check, mut cond, mut count_when) =
                    resume_check(name, &insn, (flag_setter.as_ref(), &block), ctx);
                let mut insn = insn;
                if check == CHECK_BRANCH
                    && let Some((branch, c, when)) = thread_copy_branch(elf, &insn, count_when, &mut block, ctx)
                {
                    (insn, check, cond, count_when) = (branch, CHECK_BRANCH_THREAD_COPY, c, when);
                }
                let registers = joined_facts(elf, &block, joined, ctx)?;
                return Ok(Site::resume((name.to_owned(), handler), &insn, (check, cond, count_when), registers));
            }
            other => {
                return Err(refuse(format!(
                    "leaves at {:#x} ({:?}: {}) before any relative branch",
                    insn.ip(),
                    other,
                    format(&insn)
                )));
            }
        }
    }
    Err(refuse(format!("no relative branch in its first {MAX_STRAIGHT_LINE} instructions")))
}

/// What registers hold at a site reached by `block`: where it joined
/// another handler's pass, only what holds on that path too.
fn joined_facts(
    elf: &ElfImage,
    block: &[Instruction],
    joined: Option<(usize, u64)>,
    ctx: &ResumeContext,
) -> Result<RegisterFacts, AnalysisError> {
    let ours = registers::at_site(block, ctx.frame_instr, ctx.frame_code);
    let Some((join, partner)) = joined else { return Ok(ours) };
    let mut theirs = straight_line(elf, partner)?;
    theirs.extend_from_slice(&block[join..]);
    Ok(ours.common(&registers::at_site(&theirs, ctx.frame_instr, ctx.frame_code)))
}

/// The instructions of a handler before its first branch.
fn straight_line(elf: &ElfImage, handler: u64) -> Result<Vec<Instruction>, AnalysisError> {
    let mut dec = decoder(elf, handler)?;
    let mut block = Vec::new();
    for _ in 0..MAX_STRAIGHT_LINE {
        let insn = dec.decode();
        if insn.is_invalid() || insn.flow_control() != FlowControl::Next {
            break;
        }
        block.push(insn);
    }
    Ok(block)
}

/// Where a pass that `site` does not count goes on (a de-optimisation, say),
/// if its branch decides that from the flags: for a site at the bytecode
/// copy's branch, where the version branch before it de-optimises.
pub fn uncounted_edge(elf: &ElfImage, site: &Site) -> Option<u64> {
    let (branch, count_when) = match site.check {
        CHECK_BRANCH => (decoder(elf, site.addr).ok()?.decode(), site.count_when),
        CHECK_BRANCH_THREAD_COPY => {
            let block = straight_line(elf, site.handler_addr).ok()?;
            let at = block.last().map_or(site.handler_addr, |i| i.next_ip());
            let version = decoder(elf, at).ok()?.decode();
            // It stays on equal, as `resume_check` has it.
            (version, u8::from(version.condition_code() == ConditionCode::e))
        }
        _ => return None,
    };
    Some(if count_when == 1 { branch.next_ip() } else { branch.near_branch_target() })
}

/// How a RESUME site tells a real start from a pass the handler undoes.
///
/// 3.12+ handlers compare the code object's instrumentation version with the
/// current one and, when they differ, re-instrument (RESUME, 3.12's
/// INSTRUMENTED_RESUME) or de-optimise (RESUME_CHECK) and dispatch the same
/// instruction again. When the site is that comparison's branch, the live
/// flags say exactly which way it goes (no memory read, no race). 3.13+
/// INSTRUMENTED_RESUME only re-instruments outside tracing, and other sites
/// come before the comparison: those recompute it from memory.
fn resume_check(
    name: &str,
    branch: &Instruction,
    (flag_setter, block): (Option<&Instruction>, &[Instruction]),
    ctx: &ResumeContext,
) -> (u8, u8, u8) {
    if ctx.minor < 12 {
        return (CHECK_NONE, 0, 0);
    }
    let version = ctx.code_instr_version as u64;
    // The version compared from memory, or from the register it was just
    // loaded into (a free-threaded build's atomic load).
    let compares_version = flag_setter.is_some_and(|f| {
        f.mnemonic() == Mnemonic::Cmp
            && (0..f.op_count()).any(|i| match f.op_kind(i) {
                OpKind::Memory => f.memory_displacement64() == version,
                OpKind::Register => loaded_from(block, f, f.op_register(i), version),
                _ => false,
            })
    });
    let flags_decide = compares_version && (name == "RESUME_CHECK" || ctx.minor == 12);
    match branch.condition_code() {
        ConditionCode::e if flags_decide => (CHECK_BRANCH, cc_index(ConditionCode::e), 1),
        ConditionCode::ne if flags_decide => (CHECK_BRANCH, cc_index(ConditionCode::ne), 0),
        _ if name == "RESUME_CHECK" => (CHECK_DEOPT_MEMORY, 0, 0),
        _ => (CHECK_REINSTRUMENT, 0, 0),
    }
}

/// Whether the last write to `reg` in `block` before `user` loads it from
/// memory at displacement `disp`.
fn loaded_from(block: &[Instruction], user: &Instruction, reg: Register, disp: u64) -> bool {
    let full = reg.full_register();
    let writes = |i: &&Instruction| {
        i.op_count() > 0
            && i.op0_kind() == OpKind::Register
            && i.op0_register().full_register() == full
            && !matches!(i.mnemonic(), Mnemonic::Cmp | Mnemonic::Test)
    };
    let mut before = block.iter().rev().skip_while(|i| i.ip() != user.ip()).skip(1);
    before.find(writes).is_some_and(|i| {
        i.mnemonic() == Mnemonic::Mov
            && i.op_count() == 2
            && i.op1_kind() == OpKind::Memory
            && !matches!(i.memory_base(), Register::RIP | Register::RSP)
            && i.memory_displacement64() == disp
    })
}

/// The `Jcc` condition nibble (0 = O ... 15 = G) of an iced condition code.
fn cc_index(cc: ConditionCode) -> u8 {
    (cc as u8).saturating_sub(1)
}

fn stores_to_displacement(insn: &Instruction, disp: u16) -> bool {
    insn.mnemonic() == Mnemonic::Mov
        && insn.op0_kind() == OpKind::Memory
        && insn.memory_base() != Register::RIP
        && insn.memory_base() != Register::RSP
        && insn.memory_displacement64() == disp as u64
}

fn sets_flags(insn: &Instruction) -> bool {
    insn.rflags_modified() != 0 && insn.code() != Code::INVALID
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_nibbles_match_jcc_encoding() {
        assert_eq!(cc_index(ConditionCode::o), 0);
        assert_eq!(cc_index(ConditionCode::e), 4);
        assert_eq!(cc_index(ConditionCode::ne), 5);
        assert_eq!(cc_index(ConditionCode::g), 15);
    }

    #[test]
    fn emulation_classes() {
        let decode = |bytes: &[u8]| Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode();
        assert!(emulated(&decode(&[0x41, 0x57]))); // push r15
        assert!(emulated(&decode(&[0x74, 0x10]))); // je
        assert!(emulated(&decode(&[0x0f, 0x85, 0, 1, 0, 0]))); // jne rel32
        assert!(emulated(&decode(&[0xe9, 0, 1, 0, 0]))); // jmp rel32
        assert!(!emulated(&decode(&[0x48, 0x89, 0xc3]))); // mov rbx, rax
        assert!(!emulated(&decode(&[0xff, 0xe0]))); // jmp rax
    }

    #[test]
    fn a_version_compared_from_the_register_it_was_loaded_into() {
        // A free-threaded RESUME_CHECK: the eval breaker and the code's
        // version are loaded (atomically), then compared as registers.
        let bytes = [
            0x49, 0x8b, 0x56, 0x18, // mov rdx, [r14+0x18]
            0x48, 0x8b, 0x80, 0xb8, 0, 0, 0, // mov rax, [rax+0xb8]
            0x48, 0x39, 0xd0, // cmp rax, rdx
        ];
        let block: Vec<Instruction> = Decoder::with_ip(64, &bytes, 0x1000, DecoderOptions::NONE).into_iter().collect();
        let cmp = &block[2];
        assert!(loaded_from(&block, cmp, Register::RAX, 0xb8));
        assert!(loaded_from(&block, cmp, Register::RDX, 0x18));
        assert!(!loaded_from(&block, cmp, Register::RDX, 0xb8));
        // Only what comes before the instruction that uses it.
        assert!(!loaded_from(&block, &block[1], Register::RAX, 0xb8));
    }
}
