//! Per-process slots: how often a process's probes ran (for its overhead
//! budget), which strategy counts its hits (so a switch between strategies
//! counts every call once) and whether every hit is an event (reachability
//! needs only a few). The slot travels in the process's site cookies and
//! watch entries, so the hot path finds it by index.

use std::collections::HashMap;

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use detector_common::{EVENTS_EVERY, EVENTS_SPARSE, MODE_PER_CALL, NO_SLOT, Slot, capacity, maps};

use super::{BpfError, map_err};

/// The slots in use, by process, with what was written to each.
#[derive(Default)]
pub(crate) struct SlotTable {
    by_pid: HashMap<u32, (u16, Slot)>,
    next: u16,
    free: Vec<u16>,
}

impl super::Probes {
    /// The slot of `pid`, assigned (zeroed, counting per call) on first use;
    /// [`NO_SLOT`] when every slot is taken.
    pub fn slot(&mut self, pid: u32) -> u16 {
        if let Some(&(s, _)) = self.slot_table.by_pid.get(&pid) {
            return s;
        }
        let t = &mut self.slot_table;
        let slot = match t.free.pop() {
            Some(s) => s,
            None if (t.next as u32) < capacity::SLOTS => {
                t.next += 1;
                t.next - 1
            }
            None => return NO_SLOT,
        };
        let state = Slot { passes: 0, mode: MODE_PER_CALL, events: EVENTS_EVERY };
        if self.write_slot(slot, state).is_err() {
            self.slot_table.free.push(slot);
            return NO_SLOT;
        }
        self.slot_table.by_pid.insert(pid, (slot, state));
        slot
    }

    /// Probe passes (per-call) or traps (watch) of `pid` so far, summed over
    /// CPUs; `None` if it has no slot.
    pub fn passes(&self, pid: u32) -> Option<u64> {
        let (slot, _) = *self.slot_table.by_pid.get(&pid)?;
        let per_cpu = self.slots.get(&(slot as u32), 0).ok()?;
        Some(per_cpu.iter().map(|s| s.passes).sum())
    }

    /// Makes `mode` the strategy whose probes count `pid`'s hits. The pass
    /// counters restart from zero.
    pub fn set_mode(&mut self, pid: u32, mode: u32) -> Result<(), BpfError> {
        self.update_slot(pid, |s| s.mode = mode)
    }

    /// Reports only some of `pid`'s hits from now on ([`EVENTS_SPARSE`]):
    /// for reachability, which needs the first. The pass counters restart
    /// from zero.
    pub fn report_sparsely(&mut self, pid: u32) -> Result<(), BpfError> {
        self.update_slot(pid, |s| s.events = EVENTS_SPARSE)
    }

    fn update_slot(&mut self, pid: u32, change: impl FnOnce(&mut Slot)) -> Result<(), BpfError> {
        let Some(&(slot, mut state)) = self.slot_table.by_pid.get(&pid) else { return Ok(()) };
        change(&mut state);
        self.write_slot(slot, state)?;
        self.slot_table.by_pid.insert(pid, (slot, state));
        Ok(())
    }

    /// Gives `pid`'s slot back (its probes are closed).
    pub(crate) fn release_slot(&mut self, pid: u32) {
        if let Some((slot, _)) = self.slot_table.by_pid.remove(&pid) {
            self.slot_table.free.push(slot);
        }
    }

    fn write_slot(&mut self, slot: u16, state: Slot) -> Result<(), BpfError> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| BpfError::Io { what: "counting CPUs", source: e })?;
        let values = PerCpuValues::try_from(vec![Slot { passes: 0, ..state }; n])
            .map_err(|e| BpfError::Io { what: "building per-CPU slot values", source: e })?;
        self.slots.set(slot as u32, values, 0).map_err(map_err(maps::SLOTS))
    }
}

/// The map handle, taken at load.
pub(crate) type SlotMap = PerCpuArray<MapData, Slot>;
