//! The end of a watch: a process that exits, or executes a new image, is
//! reported with its counts, its probes taken, and what the kernel and the
//! event processor hold for it forgotten once they are closed.

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::{Interest, unix::AsyncFd};

use super::{Session, walking::Announce};
use crate::{bpf::reaper::Buried, targets::Target};

/// What a watch left as it ended.
pub struct Ended {
    /// Its exact counts, by target.
    pub totals: Vec<(Target, u64)>,
    /// Its uprobes, closed once dropped.
    pub links: Vec<Buried>,
}

impl Session {
    /// A watched process is gone: reports it and its counts, detaches, and
    /// forgets it. Returns its counts.
    pub fn end(&mut self, pid: u32, status: Option<&str>) -> Vec<(Target, u64)> {
        let Ended { totals, links } = self.end_taking(pid, status);
        // Gone: its probes cannot fire any more, so closing them can wait,
        // and its pending entries went as it was reported.
        self.forget_watch(pid, false);
        for link in links {
            self.probes.bury(link);
        }
        totals
    }

    /// As [`Session::end`] for a process that lives on with a new image: its
    /// probes would fire for the new image too, so they are returned, to be
    /// closed before the new image is attached, and what the kernel knows
    /// about the process is kept until [`Session::forget`] (called once they
    /// are closed, so nothing they record outlives them).
    pub fn end_taking(&mut self, pid: u32, status: Option<&str>) -> Ended {
        self.drain();
        // Walks done meanwhile: what they resolved is in its counts.
        while let Some(walked) = self.walker.try_done() {
            self.walked(walked);
        }
        // Gone before its first look was applied: attached all the same.
        if let Some((Announce::Attached(ran_before), _)) = self.announcing.remove(&pid) {
            self.announce(pid, ran_before);
        }
        self.announcing.remove(&pid);
        self.walker.forget(pid);
        self.release_held(pid);
        self.printer.exited(pid, status);
        self.upstream_closed(pid);
        // One read of the pending map for all of its report.
        let pending = self.probes.pending(pid);
        self.unattributed(pid, &pending);
        let totals = self.totals_of(pid, &pending);
        for (t, hits) in &totals {
            self.printer.summary(pid, t, *hits);
        }
        self.probes.drop_pending(pid, &pending);
        let links = match self.watches.0.remove(&pid) {
            Some(mut w) => w.take_links(&mut self.probes),
            None => Vec::new(),
        };
        Ended { totals, links }
    }

    /// Drops everything the kernel and the event processor hold for `pid`,
    /// whose probes are closed.
    pub fn forget(&mut self, pid: u32) {
        self.forget_watch(pid, true);
    }

    fn forget_watch(&mut self, pid: u32, sweep_pending: bool) {
        let active: Vec<u32> = self.targets.iter().map(|(_, id)| id).collect();
        self.probes.forget_process(pid, active, sweep_pending);
        self.processor.forget(pid);
        self.walker.forget(pid);
        self.announcing.remove(&pid);
    }
}

/// A file descriptor that becomes readable when `pid` exits.
pub(super) fn pidfd(pid: u32) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `OwnedFd` keeps the descriptor open until dropped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)
}
