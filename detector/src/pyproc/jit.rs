//! Whether a process runs with CPython's tier-2 optimizer on (the JIT, or
//! its uop interpreter) when it is attached. Code it compiles runs a hot
//! function's body start without the interpreter's RESUME handlers and
//! without reading the bytecode the watchpoints watch, so neither strategy
//! would see those calls: such a process is refused, with the reason,
//! rather than counted short. One whose optimizer starts after the attach
//! is caught by the probe at the optimizer's entry (see `interp::tier2`).
//!
//! The main interpreter's own `jit` flag (3.14+; only the main interpreter
//! runs it) says so once it is set, which CPython does after importing
//! `site`: that is what decides, since CPython may have ignored the
//! environment (`-E`, `-I`, an embedder) or turned the JIT off (perf
//! profiling). Where the flag's offset is not known, or before the
//! interpreter exists, `PYTHON_JIT` in the process's environment decides,
//! read as CPython reads it at startup; where neither tells and the start
//! would not be seen (3.13, an inlined entry), the process is refused.

use super::{ProcessError, PythonProcess, environ::environ_block, mem::ProcessMemory};
use crate::interp::{AnalysisError, tier2::StartSeen};

/// What `PYTHON_JIT` in an environment block asks for, if it is set and
/// not empty (the first of repeated entries, as glibc's `getenv` finds it).
fn env_asks(block: &[u8]) -> Option<bool> {
    block.split(|&b| b == 0).find_map(|e| e.strip_prefix(b"PYTHON_JIT=")).and_then(|v| v.first()).map(|&c| c != b'0')
}

/// Refuses `p` if its interpreter can run tier-2 code and does.
pub(crate) fn refuse_if_on(p: &PythonProcess) -> Result<(), ProcessError> {
    let Some(tier2) = &p.analysis.tier2 else {
        return Ok(());
    };
    let refuse = |why: &str| ProcessError::Analysis {
        pid: p.pid,
        object: p.object.path.clone(),
        source: AnalysisError::Unsupported(format!(
            "CPython {} runs with the JIT on ({why}): code it compiles starts functions without the \
             interpreter's RESUME handlers or a read of their bytecode, so calls would go uncounted; \
             run it with PYTHON_JIT=0 to have it watched",
            p.analysis.version
        )),
    };
    let flag = match tier2.jit_flag {
        Some(f) => main_flag(p, f.offset)?,
        None => None,
    };
    // Where the optimizer's start is probed, a JIT that starts later is seen.
    let seen_later = matches!(tier2.start, StartSeen::Probed { calls } if calls > 0);
    match flag {
        Some(true) => Err(refuse("its main interpreter's jit flag is set")),
        Some(false) if seen_later => Ok(()),
        _ => match env_asks(&environ_block(p.pid)?) {
            Some(true) => Err(refuse("PYTHON_JIT in its environment")),
            Some(false) => Ok(()),
            None if seen_later => Ok(()),
            // A build may turn it on by default, and its start would go unseen.
            None => Err(ProcessError::Analysis {
                pid: p.pid,
                object: p.object.path.clone(),
                source: AnalysisError::Unsupported(format!(
                    "CPython {} has the JIT built in, and neither whether it is on nor when it starts can be \
                     seen in this build: run it with PYTHON_JIT=0 to have it watched",
                    p.analysis.version
                )),
            }),
        },
    }
}

/// The main interpreter's `jit` flag, or `None` before the interpreter
/// exists. A flag that is neither 0 nor 1 is not a `bool`: the offset is
/// wrong for this build, and the flag says nothing.
fn main_flag(p: &PythonProcess, flag: u64) -> Result<Option<bool>, ProcessError> {
    /// `_PyRuntimeState.interpreters.main`, after `head` (3.14, 3.15).
    const MAIN_AFTER_HEAD: u16 = 8;
    let o = &p.analysis.table.values;
    let Some(runtime) = p.runtime() else { return Ok(None) };
    let mem = ProcessMemory::open(p.pid)?;
    let Some(main_at) = o.runtime_interpreters_head.checked_add(MAIN_AFTER_HEAD) else { return Ok(None) };
    let main = mem.ptr(runtime, main_at)?;
    let Some(at) = main.checked_add(flag).filter(|_| main != 0) else {
        return Ok(None);
    };
    match mem.u8(at)? {
        0 => Ok(Some(false)),
        1 => Ok(Some(true)),
        other => {
            tracing::warn!(pid = p.pid, value = other, "the interpreter's jit flag is not a bool: not used");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_jit_is_read_as_cpython_reads_it() {
        assert_eq!(env_asks(b"PATH=/bin\0PYTHON_JIT=1\0"), Some(true));
        assert_eq!(env_asks(b"PYTHON_JIT=yes\0"), Some(true));
        assert_eq!(env_asks(b"PYTHON_JIT=0\0"), Some(false));
        assert_eq!(env_asks(b"PYTHON_JIT=00\0"), Some(false));
        assert_eq!(env_asks(b"PYTHON_JIT=\0"), None, "empty: the build's default");
        assert_eq!(env_asks(b"PYTHON_JIT_STRESS=1\0"), None);
        assert_eq!(env_asks(b"PYTHON_JIT=1\0PYTHON_JIT=0\0"), Some(true), "the first wins");
    }
}
