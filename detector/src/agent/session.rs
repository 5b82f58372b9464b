//! A detection session: the loaded eBPF object, the active targets, the
//! processes watched and the events they produce. `dump` is a session with
//! one process and fixed targets; `run` feeds it targets from its sources.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use detector_common::FAMILY_FRAME_ARG;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::{info, warn};

use super::{AttachError, ProcessWatch};
use crate::{
    bpf::{BpfError, Capacities, Probes},
    events::{EventProcessor, ProcessLookup, output::Printer, record},
    interp::cache::AnalysisCache,
    pyproc::PythonProcess,
    targets::{Target, TargetSet},
};

/// How often the ring buffer is drained when no wakeup came (the kernel
/// only wakes the reader for bursts, so a hit does not pay for a wakeup).
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

struct Watches(BTreeMap<u32, ProcessWatch>);

impl ProcessLookup for Watches {
    fn process(&self, pid: u32) -> Option<&PythonProcess> {
        self.0.get(&pid).map(|w| &w.process)
    }
}

/// What [`Session::next`] stopped for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// A watched process exited.
    Exited(u32),
    /// Standard output was closed by its reader.
    OutputClosed,
}

/// The session.
pub struct Session {
    probes: Probes,
    targets: TargetSet,
    watches: Watches,
    processor: EventProcessor,
    printer: Printer,
    ring: AsyncFd<RingBuf<MapData>>,
    exits_tx: mpsc::UnboundedSender<u32>,
    exits_rx: mpsc::UnboundedReceiver<u32>,
    tick: tokio::time::Interval,
    cache: Arc<AnalysisCache>,
}

impl Session {
    /// Loads the eBPF object; nothing is attached yet.
    pub fn new(caps: Capacities, printer: Printer) -> Result<Self, BpfError> {
        let mut probes = Probes::load(caps)?;
        let ring = probes.take_events().expect("a fresh object has its ring buffer");
        // SAFETY: the ring buffer owns its fd and keeps it open until dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| BpfError::Io { what: "polling the ring buffer", source: std::io::Error::from(e) })?;
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Ok(Session {
            probes,
            targets: TargetSet::default(),
            watches: Watches(BTreeMap::new()),
            processor: EventProcessor::default(),
            printer,
            ring,
            exits_tx,
            exits_rx,
            tick: tokio::time::interval(DRAIN_INTERVAL),
            cache: Arc::new(AnalysisCache::default()),
        })
    }

    /// The analysis cache shared by everything this session attaches.
    pub fn cache(&self) -> Arc<AnalysisCache> {
        self.cache.clone()
    }

    /// The active targets.
    pub fn targets(&self) -> &TargetSet {
        &self.targets
    }

    /// The printer.
    pub fn printer(&self) -> &Printer {
        &self.printer
    }

    /// Makes `want` the active targets. Targets that stay keep their ids and
    /// counts; new ones are matched from the next call on (and, on 3.8-3.10,
    /// looked up among the functions watched processes already have).
    /// Returns whether anything changed.
    pub fn set_targets(&mut self, want: &BTreeSet<Target>) -> Result<bool, BpfError> {
        let gone: Vec<Target> = self.targets.iter().map(|(t, _)| t.clone()).filter(|t| !want.contains(t)).collect();
        let new: Vec<Target> = want.iter().filter(|t| self.targets.id(t).is_none()).cloned().collect();
        if gone.is_empty() && new.is_empty() {
            return Ok(false);
        }
        for t in &gone {
            self.targets.remove(t);
        }
        for t in &new {
            self.targets.insert(t.clone());
        }
        self.probes.sync_targets(&self.targets)?;
        info!(added = new.len(), removed = gone.len(), active = self.targets.len(), "targets changed");
        for w in self.watches.0.values().filter(|w| w.process.analysis.layout.family == FAMILY_FRAME_ARG) {
            if let Err(e) = w.prefill_identities(&mut self.probes, &new) {
                warn!(pid = w.process.pid, error = %e, "cannot look up new targets among existing functions");
            }
        }
        Ok(true)
    }

    /// Attaches to `process` and reports it.
    pub fn watch(&mut self, process: PythonProcess) -> Result<(), AttachError> {
        let pid = process.pid;
        // Before attaching, so an exit during the attach is seen.
        let exits = self.exits_tx.clone();
        let fd = pidfd(pid).map_err(|e| AttachError::Process(crate::pyproc::ProcessError::io(pid, e)))?;
        tokio::spawn(async move {
            let _ = fd.readable().await;
            let _ = exits.send(pid);
        });
        let watch = ProcessWatch::attach(&mut self.probes, process, &self.targets)?;
        let names: Vec<&Target> = self.targets.iter().map(|(t, _)| t).collect();
        self.printer.attached(&watch, &names);
        self.watches.0.insert(pid, watch);
        Ok(())
    }

    /// Processes events until something needs the caller: a watched process
    /// exited, or nobody reads the output any more.
    pub async fn next(&mut self) -> Activity {
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    if let Ok(mut guard) = guard {
                        drain(guard.get_inner_mut(), &mut self.processor, &mut self.probes, &self.targets, &self.watches, &self.printer);
                        guard.clear_ready();
                    }
                }
                _ = self.tick.tick() => {
                    self.drain();
                    if self.printer.closed() {
                        return Activity::OutputClosed;
                    }
                }
                Some(pid) = self.exits_rx.recv() => {
                    if self.watches.0.contains_key(&pid) {
                        return Activity::Exited(pid);
                    }
                }
            }
        }
    }

    /// Handles everything waiting in the ring buffer.
    pub fn drain(&mut self) {
        drain(self.ring.get_mut(), &mut self.processor, &mut self.probes, &self.targets, &self.watches, &self.printer);
    }

    /// A watched process is gone: reports it and its counts, detaches, and
    /// forgets it.
    pub fn end(&mut self, pid: u32, status: Option<&str>) {
        self.drain();
        self.printer.exited(pid, status);
        self.summarize(pid);
        if let Some(mut w) = self.watches.0.remove(&pid) {
            w.detach(&mut self.probes);
        }
        self.probes.forget_process(pid);
        self.processor.forget(pid);
    }

    fn summarize(&mut self, pid: u32) {
        let totals = self.processor.totals(pid, &mut self.probes, &self.targets, &self.watches);
        for (t, id) in self.targets.iter() {
            self.printer.summary(pid, t, totals.get(&id).copied().unwrap_or(0));
        }
    }

    /// Reports every watched process's counts and the kernel's counters,
    /// then detaches everything.
    pub fn shutdown(mut self) {
        self.drain();
        let pids: Vec<u32> = self.watches.0.keys().copied().collect();
        for pid in pids {
            self.summarize(pid);
        }
        let stats = self.probes.stats();
        let named: Vec<(&str, u64)> =
            detector_common::stats::NAMES.iter().copied().zip(stats.iter().copied()).collect();
        self.printer.stats(&named);
        for (_, mut w) in std::mem::take(&mut self.watches.0) {
            w.detach(&mut self.probes);
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    processor: &mut EventProcessor,
    probes: &mut Probes,
    targets: &TargetSet,
    lookup: &impl ProcessLookup,
    printer: &Printer,
) {
    while let Some(item) = ring.next() {
        let Some(rec) = record::decode(&item) else { continue };
        drop(item);
        if let Some(hit) = processor.handle(rec, probes, targets, lookup) {
            printer.hit(&hit);
        }
    }
}

/// A file descriptor that becomes readable when `pid` exits.
pub fn pidfd(pid: u32) -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `OwnedFd` keeps the descriptor open until dropped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)
}
