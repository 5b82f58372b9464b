//! Reading the ring buffer: every waiting record, sorted by what the
//! session does with it.

use aya::maps::{MapData, RingBuf};

use super::{Activity, Watches};
use crate::{
    bpf::Probes,
    events::{
        EventProcessor, Hit,
        record::{self, Callers, ModuleExec, Record},
    },
    targets::TargetSet,
};

/// What the ring buffer held.
#[derive(Default)]
pub(super) struct Drained {
    /// Processes to consider.
    pub(super) found: Vec<Activity>,
    /// Hits to report.
    pub(super) hits: Vec<Hit>,
    /// Watched code objects deallocated: (process, code).
    pub(super) freed: Vec<(u32, u64)>,
    /// Module bodies about to run.
    pub(super) module_bodies: Vec<ModuleExec>,
    /// SIGTRAPs the kernel sent to watched processes: (process, thread,
    /// `si_code`).
    pub(super) trap_signals: Vec<(u32, u32, i32)>,
    /// Frames above targets at their first hits.
    pub(super) callers: Vec<Callers>,
    /// Watched processes whose tier-2 optimizer started: (process, thread).
    pub(super) tier2: Vec<(u32, u32)>,
}

/// Reads every waiting record.
pub(super) fn drain(
    ring: &mut RingBuf<MapData>,
    processor: &mut EventProcessor,
    probes: &mut Probes,
    targets: &TargetSet,
    watches: &Watches,
) -> Drained {
    let mut d = Drained::default();
    while let Some(item) = ring.next() {
        let Some(rec) = record::decode(&item) else { continue };
        drop(item);
        match rec {
            Record::Exec { pid } => d.found.push(Activity::Exec(pid)),
            Record::Fork { parent, child } => d.found.push(Activity::Fork { parent, child }),
            Record::WatchFreed { pid, code } => d.freed.push((pid, code)),
            Record::ModuleExec(e) => d.module_bodies.push(e),
            Record::TrapSignal { pid, tid, code } => d.trap_signals.push((pid, tid, code)),
            Record::Callers(c) => d.callers.push(c),
            Record::Tier2 { pid, tid } => d.tier2.push((pid, tid)),
            other => d.hits.extend(processor.hit(other, probes, targets, watches)),
        }
    }
    d
}
