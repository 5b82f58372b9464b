//! One debug register of every thread of a process, all on one address:
//! the agent's own perf breakpoint events, moved in place as registers
//! rotate.

use std::collections::BTreeSet;

use tracing::debug;

use super::CannotWatch;
use crate::bpf::{Probes, Watchpoint};

/// Rounds of "list the threads, arm the new ones": a thread made by one not
/// armed yet is caught by the next round.
const ARM_ROUNDS: usize = 5;

/// A debug register of every thread, all on one address: a watchpoint per
/// thread armed (the threads they make inherit it).
pub(super) struct Register {
    pub(super) addr: u64,
    pub(super) threads: Vec<Watchpoint>,
}

impl Register {
    /// A watchpoint on `addr` for every thread of `pid`.
    pub(super) fn arm(probes: &mut Probes, pid: u32, addr: u64) -> Result<Register, CannotWatch> {
        let mut reg = Register { addr, threads: Vec::new() };
        let mut done = BTreeSet::new();
        for _ in 0..ARM_ROUNDS {
            let threads: Vec<u32> = tasks(pid)?.into_iter().filter(|t| !done.contains(t)).collect();
            if threads.is_empty() {
                break;
            }
            for tid in threads {
                match probes.attach_watch(tid, addr) {
                    Ok(w) => reg.threads.push(w),
                    // The thread exited meanwhile.
                    Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {}
                    Err(e) => return Err(e.into()),
                }
                done.insert(tid);
            }
        }
        Ok(reg)
    }

    /// Moves every thread's watchpoint to `addr`. A thread's that cannot
    /// move (it exited) keeps watching the old address, where a trap is no
    /// longer counted once its unit is gone.
    pub(super) fn move_to(&mut self, addr: u64) {
        for w in &mut self.threads {
            if let Err(e) = w.move_to(addr) {
                debug!(addr, error = %e, "moving a watchpoint");
            }
        }
        self.addr = addr;
    }
}

fn tasks(pid: u32) -> Result<Vec<u32>, crate::pyproc::ProcessError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| crate::pyproc::ProcessError::io(pid, e))?;
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}
