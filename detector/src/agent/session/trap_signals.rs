//! SIGTRAPs the kernel sent to watched processes. Under watchpoints, such a
//! signal means a debug exception the kernel could not attribute to a
//! breakpoint: the CPU or hypervisor reported no cause or a stale one (seen
//! in VMs, about once in tens of millions of traps), or the process ran an
//! `int1` of its own. Either way it is not to be risked again in that
//! process: it leaves watchpoints for per-call probes, and the operator is
//! told, since a process that does not handle SIGTRAP dies of it.

use tracing::{debug, error, info, warn};

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
    /// The first one moves the process off watchpoints and is logged by
    /// what it means; later ones (a debugger stepping, a process trapping
    /// in a loop) are only counted.
    pub(super) fn trap_signalled(&mut self, pid: u32, tid: u32, code: i32) {
        let Some(w) = self.watches.0.get_mut(&pid) else { return };
        let cause = cause(code);
        if w.watch_forbidden.is_some() {
            debug!(pid, tid, si_code = code, cause, "another SIGTRAP from the kernel");
            return;
        }
        let binary = w.process.object.path.clone();
        let traced = tracer(pid).is_some_and(|t| t != 0);
        let why = format!("the kernel sent SIGTRAP to thread {tid} ({cause}) while it was watched");
        let had = w.forbid_watch(&mut self.probes, &self.targets, why.clone());
        let strategy = w.mode();
        if traced {
            info!(pid, tid, binary = %binary, si_code = code, cause, strategy,
                "a watched process under a debugger got SIGTRAP: watchpoints are not used in it (a debugger's breakpoints share the same four debug registers)");
        } else if had {
            error!(pid, tid, binary = %binary, si_code = code, cause, strategy,
                "the kernel sent SIGTRAP to a thread under watchpoints (a debug exception it could not attribute, or the process's own breakpoint instruction): the process dies of it unless it handles SIGTRAP; its watchpoints are removed");
        } else {
            warn!(pid, tid, binary = %binary, si_code = code, cause, strategy,
                "the kernel sent SIGTRAP to a watched process: it dies of it unless it handles SIGTRAP; watchpoints will not be used in it");
        }
        if had {
            self.printer.strategy(pid, &strategy, &why);
        }
    }
}

/// The pid of the process tracing `pid` (0: none), from its status.
fn tracer(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok())
}
