//! The loaded eBPF object: programs, typed map handles and probe links. One
//! instance serves every watched process; maps are keyed by process.

mod gates;
pub mod reaper;
mod slots;
mod state;
pub mod tracefs;
mod watch;

use std::{num::NonZeroU32, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        ProgramError, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use detector_common::{
    CodeIdentity, CodeKey, Config, CountKey, Layout, NameKey, PendingEntry, PendingKey, SiteCookie, TargetKey,
    ThreadEntry, Verdict, WatchEntry, WatchKey, capacity, maps, programs,
};

pub use state::PendingHits;
pub use watch::Watchpoint;

/// The eBPF object `cargo xtask build` embedded in this binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector.bpf.o"));

/// Failures of the kernel side, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Built without `cargo xtask build`.
    #[error("this detector binary has no eBPF object embedded: build it with `cargo xtask build`")]
    NoObject,
    /// Loading the object or a program failed.
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program would not load or attach.
    #[error("{what}")]
    Program {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error("map {map}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A file-descriptor operation on the object failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A map is full.
    #[error("map {map} is full ({cap} entries)")]
    Full {
        /// Map name.
        map: &'static str,
        /// Its capacity.
        cap: u32,
    },
}

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |e| BpfError::Map { map, source: Box::new(e) }
}

/// Capacities of the maps, set at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    /// Threads across processes.
    pub threads: u32,
    /// Targets.
    pub targets: u32,
    /// Cached verdicts.
    pub verdicts: u32,
    /// (process, target) counters.
    pub counts: u32,
    /// 3.8-3.10 starts awaiting resolution, by code object: room for every
    /// watched process's share ([`capacity::PENDING_PER_PROCESS`]).
    pub pending: u32,
    /// Ring buffer bytes.
    pub events_bytes: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            threads: capacity::THREADS,
            targets: capacity::TARGETS,
            verdicts: capacity::VERDICTS,
            counts: capacity::COUNTS,
            pending: capacity::PENDING,
            events_bytes: capacity::EVENTS_BYTES,
        }
    }
}

/// Which program a link belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `_PyEval_EvalFrameDefault` entry, 3.11+.
    EvalEntry,
    /// `_PyEval_EvalFrameDefault` entry, 3.8-3.10.
    EvalCall,
    /// RESUME handlers, 3.11+.
    Resume,
    /// `PyFunction_NewWithQualName` entry, 3.8-3.10.
    FuncNew,
    /// `code_dealloc` entry.
    CodeDealloc,
    /// `PyEval_EvalCode` entry: module bodies starting.
    ModuleExec,
    /// `_PyOptimizer_Optimize` entry: the JIT starting.
    Tier2Start,
    /// Does nothing (benchmark floor).
    Empty,
}

impl ProbeKind {
    /// Every program in the object.
    pub const ALL: [ProbeKind; 8] = [
        ProbeKind::EvalEntry,
        ProbeKind::EvalCall,
        ProbeKind::Resume,
        ProbeKind::FuncNew,
        ProbeKind::CodeDealloc,
        ProbeKind::ModuleExec,
        ProbeKind::Tier2Start,
        ProbeKind::Empty,
    ];

    fn name(self) -> &'static str {
        match self {
            ProbeKind::EvalEntry => programs::EVAL_ENTRY,
            ProbeKind::EvalCall => programs::EVAL_CALL,
            ProbeKind::Resume => programs::RESUME,
            ProbeKind::FuncNew => programs::FUNC_NEW,
            ProbeKind::CodeDealloc => programs::CODE_DEALLOC,
            ProbeKind::ModuleExec => programs::MODULE_EXEC,
            ProbeKind::Tier2Start => programs::TIER2_START,
            ProbeKind::Empty => programs::EMPTY,
        }
    }
}

/// An attached probe.
#[derive(Debug)]
pub struct Link {
    program: ProbeKind,
    id: UProbeLinkId,
}

impl Link {
    /// The program it runs.
    pub fn kind(&self) -> ProbeKind {
        self.program
    }
}

/// The loaded programs and maps.
pub struct Probes {
    ebpf: Ebpf,
    layouts: Vec<Layout>,
    generation: u32,
    cache_stamp: u32,
    wakeup_bytes: u32,
    fork_child_pid: u32,
    trap_signals: watch::TrapSignals,
    reaper: reaper::Reaper,
    caps: Capacities,
    pub(crate) targets: HashMap<MapData, TargetKey, u32>,
    pub(crate) names: HashMap<MapData, NameKey, u32>,
    pub(crate) verdicts: HashMap<MapData, CodeKey, Verdict>,
    pub(crate) counts: HashMap<MapData, CountKey, u64>,
    pub(crate) pending: HashMap<MapData, PendingKey, PendingEntry>,
    /// Per slot: pending entries made (by the kernel) and folded (by us).
    pending_made: Array<MapData, u64>,
    pending_folded: Array<MapData, u64>,
    pub(crate) threads: HashMap<MapData, u32, ThreadEntry>,
    pub(crate) identities: HashMap<MapData, CodeKey, CodeIdentity>,
    pub(crate) watched: HashMap<MapData, u32, u8>,
    unaffected: HashMap<MapData, CountKey, u8>,
    gates: gates::Gates,
    pub(crate) watches: HashMap<MapData, WatchKey, WatchEntry>,
    pub(crate) dispatch_reads: HashMap<MapData, WatchKey, u8>,
    pub(crate) watched_codes: HashMap<MapData, CodeKey, u64>,
    layout_map: Array<MapData, Layout>,
    config: Array<MapData, Config>,
    pub(crate) stats: PerCpuArray<MapData, u64>,
    slots: slots::SlotMap,
    cells: slots::CellMaps,
    slot_table: slots::SlotTable,
    events: Option<RingBuf<MapData>>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, BpfError> {
    let map = ebpf
        .take_map(name)
        .ok_or(BpfError::Map { map: name, source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }) })?;
    T::try_from(map).map_err(map_err(name))
}

impl Probes {
    /// Loads the embedded object and its programs (nothing is attached yet).
    pub fn load(caps: Capacities) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::THREADS, caps.threads)
            .map_max_entries(maps::TARGETS, caps.targets)
            .map_max_entries(maps::NAMES, caps.targets)
            .map_max_entries(maps::VERDICTS, caps.verdicts)
            .map_max_entries(maps::COUNTS, caps.counts)
            .map_max_entries(maps::CELL_OF, caps.counts)
            .map_max_entries(maps::CELL_CLAIMS, caps.counts)
            .map_max_entries(maps::PENDING, caps.pending)
            .map_max_entries(maps::EVENTS, caps.events_bytes)
            .load(OBJECT)
            .map_err(|e| BpfError::Load(Box::new(e)))?;
        for kind in ProbeKind::ALL {
            let prog: &mut UProbe = program(&mut ebpf, kind)?;
            prog.load().map_err(|e| BpfError::Program {
                what: format!("loading program {}", kind.name()),
                source: Box::new(e),
            })?;
        }
        let mut probes = Probes {
            targets: take(&mut ebpf, maps::TARGETS)?,
            names: take(&mut ebpf, maps::NAMES)?,
            verdicts: take(&mut ebpf, maps::VERDICTS)?,
            counts: take(&mut ebpf, maps::COUNTS)?,
            pending: take(&mut ebpf, maps::PENDING)?,
            pending_made: take(&mut ebpf, maps::PENDING_MADE)?,
            pending_folded: take(&mut ebpf, maps::PENDING_FOLDED)?,
            threads: take(&mut ebpf, maps::THREADS)?,
            identities: take(&mut ebpf, maps::IDENTITIES)?,
            watched: take(&mut ebpf, maps::WATCHED)?,
            unaffected: take(&mut ebpf, maps::UNAFFECTED)?,
            gates: Default::default(),
            watches: take(&mut ebpf, maps::WATCHES)?,
            dispatch_reads: take(&mut ebpf, maps::DISPATCH_READS)?,
            watched_codes: take(&mut ebpf, maps::WATCHED_CODES)?,
            layout_map: take(&mut ebpf, maps::LAYOUTS)?,
            config: take(&mut ebpf, maps::CONFIG)?,
            stats: take(&mut ebpf, maps::STATS)?,
            slots: take(&mut ebpf, maps::SLOTS)?,
            cells: slots::CellMaps {
                hits: take(&mut ebpf, maps::CELLS)?,
                claims: take(&mut ebpf, maps::CELL_CLAIMS)?,
                cell_of: take(&mut ebpf, maps::CELL_OF)?,
            },
            slot_table: Default::default(),
            events: Some(take(&mut ebpf, maps::EVENTS)?),
            ebpf,
            layouts: Vec::new(),
            generation: 1,
            cache_stamp: 0,
            fork_child_pid: 0,
            trap_signals: watch::TrapSignals::NotYet,
            reaper: reaper::Reaper::start(),
            // A quarter full: the reader's timer drains long before that
            // unless hits arrive in a burst.
            wakeup_bytes: caps.events_bytes / 4,
            caps,
        };
        probes.write_config()?;
        // Loaded now, not at the first arming: the verifier takes about a
        // millisecond, which a late import would wait for.
        probes.watch_program()?;
        Ok(probes)
    }

    /// Map capacities in use.
    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// Takes the ring buffer (once) for the event reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The id of `layout` in the layouts map, registering it if new.
    pub fn layout_id(&mut self, layout: &Layout) -> Result<u32, BpfError> {
        if let Some(i) = self.layouts.iter().position(|l| l == layout) {
            return Ok(i as u32);
        }
        let id = self.layouts.len() as u32;
        if id >= capacity::LAYOUTS {
            return Err(BpfError::Full { map: maps::LAYOUTS, cap: capacity::LAYOUTS });
        }
        self.layout_map.set(id, *layout, 0).map_err(map_err(maps::LAYOUTS))?;
        self.layouts.push(*layout);
        Ok(id)
    }

    /// The current target-set generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Starts a new generation: every cached verdict is recomputed on use.
    pub(crate) fn bump_generation(&mut self) -> Result<(), BpfError> {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.cache_stamp = self.cache_stamp.wrapping_add(1);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), BpfError> {
        let (signal_sig, signal_code) = match self.trap_signals {
            watch::TrapSignals::Attached { sig, code } => (sig, code),
            watch::TrapSignals::NotYet | watch::TrapSignals::Unavailable => (0, 0),
        };
        let cfg = Config {
            generation: self.generation,
            wakeup_bytes: self.wakeup_bytes,
            fork_child_pid: self.fork_child_pid,
            cache_stamp: self.cache_stamp,
            signal_sig,
            signal_code,
        };
        self.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
    }

    /// Loads and attaches the process-discovery tracepoints (exec of any
    /// process, fork of a watched one), mounting tracefs if needed. They stay
    /// attached for the object's lifetime.
    pub fn attach_discovery(&mut self) -> Result<(), BpfError> {
        let io = |what: &'static str| move |source: std::io::Error| BpfError::Io { what, source };
        let root = tracefs::root().map_err(io("finding tracefs"))?;
        self.fork_child_pid = tracefs::field_offset(root, "sched", "sched_process_fork", "child_pid")
            .map_err(io("reading the sched_process_fork format"))?;
        self.write_config()?;
        for (name, event) in
            [(programs::SCHED_EXEC, "sched_process_exec"), (programs::SCHED_FORK, "sched_process_fork")]
        {
            let failed = |source| BpfError::Program {
                what: format!("attaching {name} to sched/{event}"),
                source: Box::new(source),
            };
            let prog: &mut TracePoint = typed_program(&mut self.ebpf, name)?;
            prog.load().map_err(failed)?;
            prog.attach("sched", event).map_err(failed)?;
        }
        Ok(())
    }

    /// Marks a process as watched (its forks are reported) or not.
    pub fn set_watched(&mut self, pid: u32, watched: bool) -> Result<(), BpfError> {
        if watched {
            self.watched.insert(pid, detector_common::WATCHED_YES, 0).map_err(map_err(maps::WATCHED))
        } else {
            let _ = self.watched.remove(&pid);
            Ok(())
        }
    }

    /// Whether the tier-2 optimizer's entry marked `pid` (its JIT started).
    pub fn tier2_marked(&self, pid: u32) -> bool {
        self.watched.get(&pid, 0).is_ok_and(|v| v & detector_common::WATCHED_TIER2 != 0)
    }

    /// Attaches `kind` at file offset `offset` of `path` for process `pid`.
    pub fn attach(
        &mut self,
        kind: ProbeKind,
        path: &Path,
        offset: u64,
        pid: u32,
        cookie: SiteCookie,
    ) -> Result<Link, BpfError> {
        let prog = program(&mut self.ebpf, kind)?;
        let point =
            UProbeAttachPoint { location: UProbeAttachLocation::AbsoluteOffset(offset), cookie: Some(cookie.encode()) };
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid 0 is never watched"));
        let id = prog.attach(point, path, scope).map_err(|e| {
            let hint = crate::privileges::attach_hint(&e).map(|h| format!(" ({h})")).unwrap_or_default();
            BpfError::Program {
                what: format!("attaching {} at {}+{offset:#x} for pid {pid}{hint}", kind.name(), path.display()),
                source: Box::new(e),
            }
        })?;
        Ok(Link { program: kind, id })
    }

    /// Detaches a probe: it is taken from its program at once and closed by
    /// the reaper (see [`reaper`]). It may fire until then, but only for a
    /// task that no longer exists (exit) or is no longer watched.
    pub fn detach(&mut self, link: Link) {
        if let Some(owned) = self.take(link) {
            self.bury(owned);
        }
    }

    /// Closes a taken probe in the background.
    pub fn bury(&self, link: reaper::Buried) {
        self.reaper.bury(link);
    }

    /// Takes a probe from its program: it stays attached until the returned
    /// value is dropped.
    pub fn take(&mut self, link: Link) -> Option<reaper::Buried> {
        let prog = program(&mut self.ebpf, link.program).ok()?;
        // Fails only if already detached, which is what we want.
        prog.take_link(link.id).ok().map(|l| Box::new(l) as reaper::Buried)
    }

    /// Waits (at most `limit`) for the kernel to unregister every detached
    /// probe, so a stopping agent leaves nothing behind when it exits.
    pub fn settle(&self, limit: std::time::Duration) -> bool {
        self.reaper.wait_empty(limit)
    }

    /// Holds back closing detached probes while a process is being attached.
    pub fn attaching(&self) -> reaper::Attaching {
        self.reaper.attaching()
    }

    /// Probes detached whose kernel unregistration has not run yet.
    pub fn detaching(&self) -> usize {
        self.reaper.pending()
    }

    /// Probes detached so far, and closed so far, in the order detached.
    pub fn detach_sequence(&self) -> (u64, u64) {
        self.reaper.sequence()
    }
}

fn program(ebpf: &mut Ebpf, kind: ProbeKind) -> Result<&mut UProbe, BpfError> {
    typed_program(ebpf, kind.name())
}

/// The object's program `name`, as its type.
pub(crate) fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let failed = |source| BpfError::Program { what: format!("program {name}"), source: Box::new(source) };
    ebpf.program_mut(name).ok_or_else(|| failed(ProgramError::UnexpectedProgramType))?.try_into().map_err(failed)
}
