//! Hardware watchpoints for the watch strategy: a perf breakpoint event per
//! thread on the unit that starts a target's body, running `py_watch`.
//! Events are inherited, so threads (and their threads) created after arming
//! are watched too. Closing one is cheap: breakpoints are not trace events.

use aya::programs::{
    PerfEvent,
    perf_event::{
        BreakpointConfig, PerfBreakpointLength, PerfBreakpointType, PerfEventConfig, PerfEventLinkId, PerfEventScope,
        SamplePolicy,
    },
};
use detector_common::{CodeKey, WatchEntry, WatchKey, maps, programs};

use super::{BpfError, Probes, map_err};

impl Probes {
    /// Arms a watchpoint on the opcode byte at `addr` for thread `tid` and
    /// every thread it creates from now on. Fails (`ENOSPC`) when the thread
    /// has no debug register left: x86 has four.
    pub fn attach_watch(&mut self, tid: u32, addr: u64) -> Result<PerfEventLinkId, BpfError> {
        let failed = |source| BpfError::Program {
            what: format!("arming a watchpoint at {addr:#x} for thread {tid}"),
            source: Box::new(source),
        };
        let prog = self.watch_program()?;
        // Read/write: x86 has no read-only data breakpoints; the program
        // tells reads from writes. One byte: the opcode, so a build that
        // loads opcode and oparg separately traps once, not twice.
        let bp = BreakpointConfig::Data {
            r#type: PerfBreakpointType::ReadWrite,
            address: addr,
            length: PerfBreakpointLength::Len1,
        };
        let scope = PerfEventScope::OneProcess { pid: tid, cpu: None };
        prog.attach(PerfEventConfig::Breakpoint(bp), scope, SamplePolicy::Period(1), true).map_err(failed)
    }

    /// Disarms a watchpoint (and its inherited copies).
    pub fn detach_watch(&mut self, id: PerfEventLinkId) {
        if let Ok(prog) = self.watch_program() {
            let _ = prog.detach(id);
        }
    }

    /// Tells the kernel what the unit at `key` starts (and to stop counting
    /// it when its code object is deallocated).
    pub fn set_watch(&mut self, key: WatchKey, entry: WatchEntry) -> Result<(), BpfError> {
        let code = CodeKey { tgid: key.tgid, _pad: 0, code: entry.code };
        self.watched_codes.insert(code, key.addr, 0).map_err(map_err(maps::WATCHED_CODES))?;
        self.watches.insert(key, entry, 0).map_err(map_err(maps::WATCHES))
    }

    /// Marks the instruction at `key.addr` as one that dispatches a code unit.
    pub fn set_dispatch_read(&mut self, key: WatchKey) -> Result<(), BpfError> {
        self.dispatch_reads.insert(key, 1, 0).map_err(map_err(maps::DISPATCH_READS))
    }

    /// Unmarks a dispatch load.
    pub fn remove_dispatch_read(&mut self, key: &WatchKey) {
        let _ = self.dispatch_reads.remove(key);
    }

    /// Forgets a watched unit.
    pub fn remove_watch(&mut self, key: &WatchKey, code: u64) {
        let _ = self.watches.remove(key);
        let _ = self.watched_codes.remove(&CodeKey { tgid: key.tgid, _pad: 0, code });
    }

    fn watch_program(&mut self) -> Result<&mut PerfEvent, BpfError> {
        let name = programs::WATCH;
        let failed = |source| BpfError::Program { what: format!("program {name}"), source: Box::new(source) };
        let prog: &mut PerfEvent = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| failed(aya::programs::ProgramError::UnexpectedProgramType))?
            .try_into()
            .map_err(failed)?;
        if prog.fd().is_err() {
            prog.load().map_err(failed)?;
        }
        Ok(prog)
    }
}
