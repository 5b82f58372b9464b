//! Whether a process runs with CPython's tier-2 optimizer on (the JIT, or
//! its uop interpreter). Code it compiles runs a hot function's body start
//! without the interpreter's RESUME handlers and without reading the
//! bytecode the watchpoints watch, so neither strategy would see those
//! calls: such a process is refused, with the reason, rather than counted
//! short.
//!
//! Two signals, either enough: `PYTHON_JIT` in the process's environment,
//! read as CPython reads it at startup (set, not empty, not starting with
//! `0`), and each interpreter's own `jit` flag (3.14+), which also covers a
//! build that turns the JIT on by default.

use std::io::Read;

use super::{ProcessError, PythonProcess, mem::ProcessMemory};
use crate::interp::AnalysisError;

/// Most bytes of a process's environment read.
const MAX_ENVIRON: u64 = 4 << 20;

/// Interpreters looked at (subinterpreters included).
const MAX_INTERPRETERS: usize = 64;

/// The environment of `pid` as it was at exec (its first [`MAX_ENVIRON`]
/// bytes: the kernel bounds it near there anyway).
pub(crate) fn environ_block(pid: u32) -> Result<Vec<u8>, ProcessError> {
    let file = std::fs::File::open(format!("/proc/{pid}/environ")).map_err(|e| ProcessError::io(pid, e))?;
    let mut block = Vec::new();
    file.take(MAX_ENVIRON).read_to_end(&mut block).map_err(|e| ProcessError::io(pid, e))?;
    Ok(block)
}

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
    let refuse = |why: String| ProcessError::Analysis {
        pid: p.pid,
        object: p.object.path.clone(),
        source: AnalysisError::Unsupported(format!(
            "CPython {} runs with the JIT on ({why}): code it compiles starts functions without the \
             interpreter's RESUME handlers or a read of their bytecode, so calls would go uncounted; \
             run it with PYTHON_JIT=0 to have it watched",
            p.analysis.version
        )),
    };
    if env_asks(&environ_block(p.pid)?) == Some(true) {
        return Err(refuse("PYTHON_JIT in its environment".into()));
    }
    let Some(flag) = tier2.jit_flag else {
        return Ok(());
    };
    if let Some(n) = interpreters_on(p, flag.offset)? {
        return Err(refuse(format!("the jit flag of {n} interpreter(s) is set")));
    }
    Ok(())
}

/// How many interpreters have their `jit` flag set (`None` for none). A
/// flag that is neither 0 nor 1 is not a `bool`: the offset is wrong for
/// this build, and the flag says nothing.
fn interpreters_on(p: &PythonProcess, flag: u64) -> Result<Option<usize>, ProcessError> {
    let o = &p.analysis.table.values;
    let Some(runtime) = p.runtime() else { return Ok(None) };
    let mem = ProcessMemory::open(p.pid)?;
    let mut interp = mem.u64(runtime + u64::from(o.runtime_interpreters_head))?;
    let mut on = 0;
    for _ in 0..MAX_INTERPRETERS {
        if interp == 0 {
            break;
        }
        match mem.u8(interp + flag)? {
            0 => {}
            1 => on += 1,
            other => {
                tracing::warn!(pid = p.pid, value = other, "the interpreter's jit flag is not a bool: not used");
                return Ok(None);
            }
        }
        interp = mem.u64(interp + u64::from(o.interp_next))?;
    }
    Ok((on > 0).then_some(on))
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
