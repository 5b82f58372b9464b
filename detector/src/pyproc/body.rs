//! Where each target's body starts, found before its first call: the code
//! objects a target names (walked from `sys.modules` through module, class
//! and function objects, and `co_consts` for `<locals>`), and in each the
//! code unit that executes exactly once when the body starts. On 3.11+ that
//! is the `RESUME` with oparg 0, which is not always unit 0: generators
//! start with `RETURN_GENERATOR`, closures with `COPY_FREE_VARS`, cells with
//! `MAKE_CELL`. This is what a hardware watchpoint would watch.

use serde::Serialize;

use super::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects, qualname};
use crate::{interp::sites::resume_opcodes, targets::Target};

/// How many code units are looked at for the body's `RESUME`: the prologue
/// before it is a few instructions at most.
const PROLOGUE_UNITS: usize = 32;

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
    let a = &process.analysis;
    let minor = a.version.minor;
    let nothing = |reason: &str| Ok(Found::Nothing { reason: reason.to_owned(), later: false });
    let not_yet = |reason: &str| Ok(Found::Nothing { reason: reason.to_owned(), later: true });
    if minor < 11 {
        return nothing("3.8-3.10: body starts are only located on 3.11+ so far");
    }
    let Some(runtime) = process.runtime() else {
        return nothing("no _PyRuntime symbol");
    };
    let mem = ProcessMemory::open(process.pid)?;
    let objs = Objects { mem: &mem, o: &a.table.values, minor };
    let Some(globals) = qualname::module_globals(&objs, runtime, target.module())? else {
        return not_yet("module not imported (yet)");
    };
    let defs = qualname::definitions(&objs, globals, target)?;
    if defs.is_empty() {
        return not_yet("no such definition in the module (made at run time, or not at all)");
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
                starts.push(BodyStart { code: d.code, unit_addr: base + 2 * i as u64, unit: i as u32, opname })
            }
            None => return nothing("no RESUME 0 in the code object's prologue"),
        }
    }
    starts.dedup_by_key(|s| s.code);
    Ok(Found::Code { starts })
}
