//! SIGTRAPs the kernel sent to watched processes. Under watchpoints, such a
//! signal means a debug exception the kernel could not attribute to a
//! breakpoint: the CPU or hypervisor reported no cause or a stale one (seen
//! in VMs, about once in tens of millions of traps), or the process ran an
//! `int1` of its own. Either way it is not to be risked again in that
//! process: it leaves watchpoints for per-call probes, and the operator is
//! told, since a process that does not handle SIGTRAP dies of it.

use tracing::{error, warn};

use super::Session;

/// What `si_code` says of a SIGTRAP's cause.
fn cause(code: i32) -> &'static str {
    match code {
        1 => "TRAP_BRKPT: a debug exception with no cause in DR6, or a breakpoint instruction",
        2 => "TRAP_TRACE: single-step",
        3 => "TRAP_BRANCH",
        4 => "TRAP_HWBKPT: a debug exception for a debug register with no breakpoint installed",
        0x80 => "SI_KERNEL: a breakpoint instruction where no uprobe is",
        _ => "another kernel cause",
    }
}

impl Session {
    /// The kernel sent SIGTRAP (`si_code` `code`) to thread `tid` of `pid`.
    pub(super) fn trap_signalled(&mut self, pid: u32, tid: u32, code: i32) {
        let Some(w) = self.watches.0.get_mut(&pid) else { return };
        let binary = w.process.object.path.clone();
        let cause = cause(code);
        let why = format!("the kernel sent SIGTRAP to thread {tid} ({cause}) while it was watched");
        if w.forbid_watch(&mut self.probes, &self.targets, why.clone()) {
            error!(pid, tid, binary = %binary, si_code = code, cause,
                "the kernel sent SIGTRAP to a thread under watchpoints: the process dies of it unless it handles SIGTRAP; its watchpoints are removed and its calls probed per call from now on");
            self.printer.strategy(pid, &w.mode(), &why);
        } else {
            warn!(pid, tid, binary = %binary, si_code = code, cause, strategy = w.mode(),
                "the kernel sent SIGTRAP to a watched process: the process dies of it unless it handles SIGTRAP");
        }
    }
}
