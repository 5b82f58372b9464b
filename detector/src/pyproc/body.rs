//! Where each target's body starts, found before its first call: the code
//! objects a target names (walked from `sys.modules` through module, class
//! and function objects, and `co_consts` for `<locals>`), and in each the
//! code unit that executes exactly once when the body starts. On 3.11+ that
//! is the `RESUME` with oparg 0, which is not always unit 0: generators
//! start with `RETURN_GENERATOR`, closures with `COPY_FREE_VARS`, cells with
//! `MAKE_CELL`. On 3.8-3.10 it is the first instruction of `co_code`, unless
//! a jump leads back there (a loop at the top of the function): its reads
//! are then not all starts. This is what a hardware watchpoint watches.

use serde::Serialize;

use super::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects, qualname};
use crate::{interp::sites::resume_opcodes, targets::Target};

/// How many code units are looked at for the body's `RESUME`: the prologue
/// before it is a few instructions at most.
const PROLOGUE_UNITS: usize = 32;

/// Most `co_code` bytes scanned for jumps back to the start (3.8-3.10); a
/// longer function is not watched.
const MAX_CO_CODE: usize = 1 << 16;

/// 3.8-3.10 opcodes whose argument is an absolute jump target:
/// JUMP_IF_FALSE_OR_POP, JUMP_IF_TRUE_OR_POP, JUMP_ABSOLUTE,
/// POP_JUMP_IF_FALSE, POP_JUMP_IF_TRUE, and JUMP_IF_NOT_EXC_MATCH (3.9+).
/// Relative jumps only go forward, so never to the first instruction.
const ABSOLUTE_JUMPS: [u8; 6] = [111, 112, 113, 114, 115, 121];
/// EXTENDED_ARG.
const EXTENDED_ARG: u8 = 144;

/// Whether an instruction of `code` (3.8-3.10 `co_code`) jumps to its
/// first one. Arguments are byte offsets on 3.8 and 3.9, unit indices on
/// 3.10; zero is zero either way.
fn jumps_to_start(minor: u8, code: &[u8]) -> bool {
    let mut ext: u32 = 0;
    // Code is `co_code` truncated to MAX_CO_CODE: unknown means "may".
    if code.len() >= MAX_CO_CODE {
        return true;
    }
    for unit in code.chunks_exact(2) {
        let (op, arg) = (unit[0], (ext << 8) | u32::from(unit[1]));
        if op == EXTENDED_ARG {
            ext = arg;
            continue;
        }
        ext = 0;
        if ABSOLUTE_JUMPS.contains(&op) && (op != 121 || minor >= 9) && arg == 0 {
            return true;
        }
    }
    false
}

/// The start of one definition's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BodyStart {
    /// The code object.
    pub code: u64,
    /// Address of the code unit that starts the body.
    pub unit_addr: u64,
    /// Its index among the code object's units.
    pub unit: u32,
    /// The opcode there now (quickening and instrumentation rewrite it).
    pub opname: &'static str,
    /// What its code object was when read.
    #[serde(skip)]
    pub seen: CodeSeen,
}

/// A code object's type, name, file and first line as read: read again
/// once its unit is watched (from then on its deallocation is reported), so
/// that one freed since the walk, its memory on a free list or reused, is
/// never watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeSeen {
    ty: u64,
    name: u64,
    filename: u64,
    firstlineno: u32,
}

impl CodeSeen {
    fn of(objs: &Objects<'_>, code: u64) -> Result<Self, ProcessError> {
        Ok(CodeSeen {
            ty: objs.type_of(code)?,
            name: objs.mem.ptr(code, objs.o.code_name)?,
            filename: objs.mem.ptr(code, objs.o.code_filename)?,
            firstlineno: objs.mem.u32(
                code.checked_add(u64::from(objs.o.code_firstlineno))
                    .ok_or(ProcessError::BadAddress { pid: objs.mem.pid(), addr: code })?,
            )?,
        })
    }
}

impl BodyStart {
    /// Whether its code object is still the one read. A free list writes a
    /// link over a freed object's reference count (the word before its
    /// type), which in a live one fits 32 bits (immortal ones included); an
    /// object reused has another type, name, file or first line.
    pub fn still_there(&self, objs: &Objects<'_>) -> bool {
        let at = u64::from(objs.o.object_type).checked_sub(8).and_then(|off| self.code.checked_add(off));
        let refs = at.map(|at| objs.mem.u64(at));
        matches!(refs, Some(Ok(1..=0xFFFF_FFFF))) && CodeSeen::of(objs, self.code).is_ok_and(|seen| seen == self.seen)
    }
}

/// What was found for one target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "found", rename_all = "snake_case")]
pub enum Found {
    /// Every definition the target names today, each with its body start.
    Code {
        /// The body starts.
        starts: Vec<BodyStart>,
    },
    /// Nothing to watch; the per-call strategy is what can see it.
    Nothing {
        /// Why.
        reason: String,
        /// Whether it may be found later: its module is not imported yet,
        /// or the definition not made yet.
        later: bool,
    },
}

/// Finds where `target`'s body starts in `process`, reading its memory only.
pub fn find(process: &PythonProcess, target: &Target) -> Result<Found, ProcessError> {
    Ok(find_all(process, &[target])?.pop().expect("one answer per target"))
}

/// [`find`] for each of `targets`, looking their modules up in one pass
/// over `sys.modules`.
pub fn find_all(process: &PythonProcess, targets: &[&Target]) -> Result<Vec<Found>, ProcessError> {
    let Some(runtime) = process.runtime() else {
        let nothing = Found::Nothing { reason: "no _PyRuntime symbol".into(), later: false };
        return Ok(vec![nothing; targets.len()]);
    };
    let mem = ProcessMemory::open(process.pid)?;
    let objs = Objects::of(process, &mem);
    let mut names: Vec<&str> = targets.iter().map(|t| t.module()).collect();
    names.sort_unstable();
    names.dedup();
    let modules = qualname::modules_globals(&objs, runtime, &names)?;
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        out.push(match modules.get(t.module()) {
            Some(all) => {
                // One definition per interpreter that imported the module.
                let mut defs = Vec::new();
                for &globals in all {
                    defs.extend(qualname::definitions(&objs, globals, t)?);
                }
                starts_of(&objs, &defs)?
            }
            None => Found::Nothing { reason: NOT_IMPORTED.into(), later: true },
        });
    }
    Ok(out)
}

/// How many modules the interpreters' `sys.modules` hold (0 before one
/// exists): while it stays the same, no module was imported.
pub fn modules_count(process: &PythonProcess) -> Result<i64, ProcessError> {
    let Some(runtime) = process.runtime() else { return Ok(0) };
    let mem = ProcessMemory::open(process.pid)?;
    let objs = Objects::of(process, &mem);
    let mut n = 0;
    for modules in qualname::sys_modules(&objs, runtime)? {
        n += objs.dict_len(modules)?;
    }
    Ok(n)
}

/// Why a target whose module is not in `sys.modules` is not found.
pub const NOT_IMPORTED: &str = "module not imported (yet)";

/// The module a module body about to run defines: `__name__` of its
/// globals, if it is a string.
pub fn module_name(process: &PythonProcess, globals: u64) -> Result<Option<String>, ProcessError> {
    let mem = ProcessMemory::open(process.pid)?;
    let objs = Objects::of(process, &mem);
    match objs.dict_get(globals, "__name__")? {
        Some(name) if objs.type_name(name)? == "str" => Ok(Some(objs.str(name)?)),
        _ => Ok(None),
    }
}

/// Finds where `target`'s body starts among the code objects of a module
/// body about to run (`code`, the module's code object): they exist before
/// any function is made from them.
pub fn find_in_body(process: &PythonProcess, code: u64, target: &Target) -> Result<Found, ProcessError> {
    let mem = ProcessMemory::open(process.pid)?;
    let objs = Objects::of(process, &mem);
    let defs = qualname::definitions_in_body(&objs, code, target)?;
    starts_of(&objs, &defs)
}

/// The body start of each definition, or why one cannot be watched.
fn starts_of(objs: &Objects<'_>, defs: &[qualname::Definition]) -> Result<Found, ProcessError> {
    let nothing = |reason: &str| Ok(Found::Nothing { reason: reason.to_owned(), later: false });
    if defs.is_empty() {
        return Ok(Found::Nothing {
            reason: "no such definition in the module (made at run time, or not at all)".into(),
            later: true,
        });
    }
    let (mem, minor) = (objs.mem, objs.minor);
    if minor < 11 {
        let mut starts = Vec::new();
        for d in defs {
            let bytes = mem.ptr(d.code, objs.o.code_code)?;
            // 3.10 shares one `co_code` between code objects whose bytecode
            // is identical (a module's `return 1` functions): a read of it
            // may be any of them.
            let refs = mem.i64(bytes)?;
            if refs != 1 {
                return nothing(&format!(
                    "its bytecode object is shared with {} other reference(s) (identical bytecode elsewhere): \
                     a read there is not always its start",
                    refs - 1
                ));
            }
            let len = mem.i64(bytes + u64::from(objs.o.tuple_size))?.clamp(0, MAX_CO_CODE as i64) as usize;
            let base = bytes + u64::from(objs.o.bytes_sval);
            if jumps_to_start(minor, &mem.bytes(base, len)?) {
                return nothing("a jump leads back to its first instruction (a loop at the top of the function)");
            }
            let seen = CodeSeen::of(objs, d.code)?;
            starts.push(BodyStart { code: d.code, unit_addr: base, unit: 0, opname: "co_code[0]", seen });
        }
        starts.dedup_by_key(|s| s.code);
        return Ok(Found::Code { starts });
    }
    let resumes = resume_opcodes(minor);
    let mut starts = Vec::new();
    for d in defs {
        let base = d.code + u64::from(objs.o.code_adaptive);
        // A code object is a variable-size object of `ob_size` code units:
        // read no further than its end.
        let size = mem.i64(d.code + u64::from(objs.o.tuple_size))?.clamp(0, PROLOGUE_UNITS as i64) as usize;
        let units = mem.bytes(base, size * 2)?;
        let start = units.chunks_exact(2).enumerate().find_map(|(i, u)| {
            let name = resumes.iter().find(|(_, op)| *op == u[0]).map(|(n, _)| *n)?;
            (u[1] == 0).then_some((i, name))
        });
        match start {
            Some((i, opname)) => {
                let seen = CodeSeen::of(objs, d.code)?;
                starts.push(BodyStart { code: d.code, unit_addr: base + 2 * i as u64, unit: i as u32, opname, seen })
            }
            None => return nothing("no RESUME 0 in the code object's prologue"),
        }
    }
    starts.dedup_by_key(|s| s.code);
    Ok(Found::Code { starts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_back_to_the_first_instruction_is_seen() {
        // 3.8 `def f():\n while True:\n  g()`: LOAD_GLOBAL, CALL_FUNCTION,
        // POP_TOP, JUMP_ABSOLUTE 0.
        assert!(jumps_to_start(8, &[116, 0, 131, 0, 1, 0, 113, 0]));
        // `return 1`.
        assert!(!jumps_to_start(8, &[100, 1, 83, 0]));
        // JUMP_ABSOLUTE 256 (EXTENDED_ARG 1): not the start.
        assert!(!jumps_to_start(10, &[144, 1, 113, 0]));
        // 121 is JUMP_IF_NOT_EXC_MATCH from 3.9 on only.
        assert!(jumps_to_start(9, &[121, 0]));
        assert!(!jumps_to_start(8, &[121, 0]));
    }
}
