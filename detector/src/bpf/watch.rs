//! Hardware watchpoints for the watch strategy: a perf breakpoint event per
//! thread on the unit that starts a target's body, running `py_watch`.
//!
//! The events are opened here rather than through aya so that their address
//! can be moved in place (`PERF_EVENT_IOC_MODIFY_ATTRIBUTES`, which the
//! kernel applies to the inherited copies too): sharing four debug registers
//! among more body starts over time is a few ioctls, not a close and an open
//! per thread. Events are inherited by the threads a thread creates, never by
//! the processes it forks (`inherit_thread`): a forked child is watched with
//! watchpoints of its own, so no call is counted twice.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use aya::programs::{PerfEvent, TracePoint};
use detector_common::{CodeKey, WatchEntry, WatchKey, maps, programs};

use super::{BpfError, Probes, map_err, tracefs, typed_program};

/// `PERF_TYPE_BREAKPOINT`.
const PERF_TYPE_BREAKPOINT: u32 = 5;
/// `HW_BREAKPOINT_RW`: x86 has no read-only data breakpoints; the program
/// tells reads from writes.
const HW_BREAKPOINT_RW: u32 = 3;
/// `HW_BREAKPOINT_LEN_1`: the opcode only, so a build that loads opcode and
/// oparg separately traps once, not twice.
const HW_BREAKPOINT_LEN_1: u64 = 1;
/// `PERF_SAMPLE_RAW`.
const PERF_SAMPLE_RAW: u64 = 1 << 10;
/// `perf_event_attr` flag bits.
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_INHERIT: u64 = 1 << 1;
const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
/// `precise_ip = 2`, as aya sets for breakpoints.
const ATTR_PRECISE_IP_2: u64 = 2 << 15;
const ATTR_INHERIT_THREAD: u64 = 1 << 35;
/// `_IO('$', 0)`, `_IOW('$', 8, u32)`, `_IOW('$', 11, u64)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_MODIFY_ATTRIBUTES: libc::c_ulong = 0x4008_240b;

/// `struct perf_event_attr` up to `config3` (`PERF_ATTR_SIZE_VER8`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}

impl PerfEventAttr {
    fn breakpoint(addr: u64) -> Self {
        PerfEventAttr {
            type_: PERF_TYPE_BREAKPOINT,
            size: size_of::<PerfEventAttr>() as u32,
            sample_period: 1,
            sample_type: PERF_SAMPLE_RAW,
            flags: ATTR_DISABLED
                | ATTR_INHERIT
                | ATTR_INHERIT_THREAD
                | ATTR_EXCLUDE_KERNEL
                | ATTR_EXCLUDE_HV
                | ATTR_PRECISE_IP_2,
            wakeup_events: 1,
            bp_type: HW_BREAKPOINT_RW,
            bp_addr: addr,
            bp_len: HW_BREAKPOINT_LEN_1,
            ..Default::default()
        }
    }
}

/// One thread's watchpoint, running `py_watch`: closed when dropped (with
/// the copies its thread's later threads inherited).
#[derive(Debug)]
pub struct Watchpoint {
    fd: OwnedFd,
    addr: u64,
}

impl Watchpoint {
    /// Watches `addr` instead, on this thread and every copy inherited from
    /// it. On failure it still watches the old address.
    pub fn move_to(&mut self, addr: u64) -> Result<(), std::io::Error> {
        if addr == self.addr {
            return Ok(());
        }
        let mut attr = PerfEventAttr::breakpoint(addr);
        // The kernel compares every field but the breakpoint's and
        // `disabled` with the event's own, and leaves it as `disabled` says.
        attr.flags &= !ATTR_DISABLED;
        ioctl(&self.fd, PERF_EVENT_IOC_MODIFY_ATTRIBUTES, &raw const attr as libc::c_ulong)?;
        self.addr = addr;
        Ok(())
    }
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: libc::c_ulong) -> Result<(), std::io::Error> {
    // SAFETY: perf ioctls that take an integer argument, on a live descriptor.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the SIGTRAPs the kernel sends to watched processes are seen.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TrapSignals {
    /// Not tried yet: tried at the first watchpoint.
    NotYet,
    /// Attached; the offsets of `sig` and `code` in the tracepoint's record.
    Attached { sig: u32, code: u32 },
    /// Tried and failed (said once).
    Unavailable,
}

impl Probes {
    /// Watches for the SIGTRAPs the kernel sends to watched processes, once:
    /// a debug exception it cannot attribute to a breakpoint is delivered
    /// as one. Watching works without it; the failure is logged once.
    fn see_trap_signals(&mut self) {
        if !matches!(self.trap_signals, TrapSignals::NotYet) {
            return;
        }
        self.trap_signals = match self.attach_trap_signals() {
            Ok((sig, code)) => TrapSignals::Attached { sig, code },
            Err(e) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)),
                    "cannot see the SIGTRAPs the kernel sends to watched processes: a debug exception misreported by the CPU or hypervisor goes unexplained");
                TrapSignals::Unavailable
            }
        };
        if let Err(e) = self.write_config() {
            tracing::warn!(error = %e, "cannot tell the kernel where signal records hold their fields");
        }
    }

    fn attach_trap_signals(&mut self) -> Result<(u32, u32), BpfError> {
        let io = |what: &'static str| move |source: std::io::Error| BpfError::Io { what, source };
        let root = tracefs::root().map_err(io("finding tracefs"))?;
        let offset = |field| tracefs::field_offset(root, "signal", "signal_generate", field);
        let sig = offset("sig").map_err(io("reading the signal_generate format"))?;
        let code = offset("code").map_err(io("reading the signal_generate format"))?;
        let name = programs::TRAP_SIGNAL;
        let failed = |source| BpfError::Program {
            what: format!("attaching {name} to signal/signal_generate"),
            source: Box::new(source),
        };
        let prog: &mut TracePoint = typed_program(&mut self.ebpf, name)?;
        prog.load().map_err(failed)?;
        prog.attach("signal", "signal_generate").map_err(failed)?;
        Ok((sig, code))
    }

    /// Arms a watchpoint on the opcode byte at `addr` for thread `tid` and
    /// every thread it creates from now on. Fails (`ENOSPC`) when the thread
    /// has no debug register left: x86 has four.
    pub fn attach_watch(&mut self, tid: u32, addr: u64) -> Result<Watchpoint, BpfError> {
        self.see_trap_signals();
        let failed = |source: std::io::Error| BpfError::Program {
            what: format!("arming a watchpoint at {addr:#x} for thread {tid}"),
            source: Box::new(aya::programs::ProgramError::IOError(source)),
        };
        let prog = self
            .watch_program()?
            .fd()
            .map_err(|e| BpfError::Program { what: format!("program {}", programs::WATCH), source: Box::new(e) })?;
        let prog_fd = prog.as_fd().as_raw_fd();
        let attr = PerfEventAttr::breakpoint(addr);
        // SAFETY: `attr` is a valid perf_event_attr that outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &raw const attr,
                tid as libc::pid_t,
                -1,
                -1,
                libc::c_ulong::from(8u8),
            )
        };
        if fd < 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just returned by the kernel, owned from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        ioctl(&fd, PERF_EVENT_IOC_SET_BPF, prog_fd as libc::c_ulong).map_err(failed)?;
        ioctl(&fd, PERF_EVENT_IOC_ENABLE, 0).map_err(failed)?;
        Ok(Watchpoint { fd, addr })
    }

    /// Whether `e`, from [`Probes::attach_watch`], says the thread is gone
    /// or exiting (the kernel refuses a task that is on its way out even
    /// while `/proc` still lists it).
    pub fn thread_gone(e: &BpfError) -> bool {
        matches!(e, BpfError::Program { source, .. }
            if matches!(&**source, aya::programs::ProgramError::IOError(io) if io.raw_os_error() == Some(libc::ESRCH)))
    }

    /// Tells the kernel what the unit at `key` starts (and to stop counting
    /// it when its code object is deallocated).
    pub fn set_watch(&mut self, key: WatchKey, entry: WatchEntry) -> Result<(), BpfError> {
        let code = CodeKey { tgid: key.tgid, instance: self.instance(key.tgid), code: entry.code };
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
        let _ = self.watched_codes.remove(&CodeKey { tgid: key.tgid, instance: self.instance(key.tgid), code });
    }

    pub(super) fn watch_program(&mut self) -> Result<&mut PerfEvent, BpfError> {
        let name = programs::WATCH;
        let failed = |source| BpfError::Program { what: format!("program {name}"), source: Box::new(source) };
        let prog: &mut PerfEvent = typed_program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(failed)?;
        }
        Ok(prog)
    }
}
