//! The interpreter's thread states, walked from `_PyRuntime`.

use super::{ProcessError, mem::ProcessMemory};
use crate::interp::offsets::Offsets;

/// Interpreters walked at most (subinterpreters included).
const MAX_INTERPRETERS: usize = 64;
/// Threads walked at most per interpreter.
const MAX_THREADS: usize = 8192;

/// A thread known to the interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadState {
    /// Kernel thread id (`native_thread_id`).
    pub tid: u32,
    /// Address of its `PyThreadState`.
    pub tstate: u64,
}

/// Every thread state of every interpreter (3.11+, which record the native
/// thread id). `runtime` is the address of `_PyRuntime` in the process.
pub fn thread_states(mem: &ProcessMemory, o: &Offsets, runtime: u64) -> Result<Vec<ThreadState>, ProcessError> {
    let mut out = Vec::new();
    let mut interp = mem.ptr(runtime, o.runtime_interpreters_head)?;
    for _ in 0..MAX_INTERPRETERS {
        if interp == 0 {
            break;
        }
        let mut tstate = mem.ptr(interp, o.interp_threads_head)?;
        for _ in 0..MAX_THREADS {
            if tstate == 0 {
                break;
            }
            let tid = mem.ptr(tstate, o.tstate_native_thread_id)?;
            if tid != 0 && tid <= u32::MAX as u64 {
                out.push(ThreadState { tid: tid as u32, tstate });
            }
            tstate = mem.ptr(tstate, o.tstate_next)?;
        }
        interp = mem.ptr(interp, o.interp_next)?;
    }
    Ok(out)
}
