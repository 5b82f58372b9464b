//! Per-process slots: how often a process's probes ran (for its overhead
//! budget), which strategy counts its hits (so a switch between strategies
//! counts every call once), whether every hit is an event (reachability
//! needs only a few), and the per-CPU cells that count the per-call probes'
//! hits of its first targets. The slot travels in the process's site
//! cookies and watch entries, so the hot path finds it by index.

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use detector_common::{
    CellKey, CountKey, EVENTS_EVERY, EVENTS_SPARSE, MODE_PER_CALL, NO_SLOT, SLOT_CELLS, Slot, SlotCells, capacity, maps,
};

use super::{BpfError, map_err};

/// The slots in use, by process, with what was written to each.
#[derive(Default)]
pub(crate) struct SlotTable {
    by_pid: HashMap<u32, (u16, Slot)>,
    next: u16,
    free: Vec<u16>,
    /// The last watch instance given out.
    instances: u32,
}

impl super::Probes {
    /// The slot of `pid`, assigned (zeroed, counting per call, with a new
    /// watch instance) on first use. A process without one would not be
    /// metered, nor could its kernel entries be told from those of a later
    /// process with its pid: none is watched without one.
    pub fn slot(&mut self, pid: u32) -> Result<u16, BpfError> {
        if let Some(&(s, _)) = self.slot_table.by_pid.get(&pid) {
            return Ok(s);
        }
        let t = &mut self.slot_table;
        let slot = match t.free.pop() {
            Some(s) => s,
            None if (t.next as u32) < capacity::SLOTS && t.next != NO_SLOT => {
                t.next += 1;
                t.next - 1
            }
            None => return Err(BpfError::Full { map: maps::SLOTS, cap: capacity::SLOTS }),
        };
        // 0 is what a probe without a slot reads: never an instance.
        t.instances = t.instances.checked_add(1).unwrap_or(1);
        let state = Slot { mode: MODE_PER_CALL, events: EVENTS_EVERY, instance: t.instances, ..Slot::default() };
        // The last process's cells are still there: nothing counts in them
        // before its probes are attached, after this.
        let reset = self.write_slot(slot, state).and_then(|()| self.cells.reset(slot));
        if let Err(e) = reset.and_then(|()| self.reset_pending_room(slot)) {
            self.slot_table.free.push(slot);
            return Err(e);
        }
        self.slot_table.by_pid.insert(pid, (slot, state));
        Ok(slot)
    }

    /// The processes holding a slot: every one not forgotten yet.
    pub(crate) fn slotted(&self) -> Vec<u32> {
        self.slot_table.by_pid.keys().copied().collect()
    }

    /// The watch instance of `pid` (0 if it has no slot, which nothing
    /// watched lacks).
    pub(crate) fn instance(&self, pid: u32) -> u32 {
        self.slot_table.by_pid.get(&pid).map_or(0, |(_, s)| s.instance)
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
        // Each CPU keeps the drops it counted (one between this read and
        // the write is lost: a diagnostic, not a count).
        let now = self.slots.get(&u32::from(slot), 0).map_err(map_err(maps::SLOTS))?;
        let values: Vec<Slot> =
            now.iter().map(|cpu| Slot { passes: 0, drops: cpu.drops, refused: cpu.refused, ..state }).collect();
        let values =
            PerCpuValues::try_from(values).map_err(|e| BpfError::Io { what: "building per-CPU values", source: e })?;
        self.slots.set(u32::from(slot), values, 0).map_err(map_err(maps::SLOTS))?;
        self.slot_table.by_pid.insert(pid, (slot, state));
        Ok(())
    }

    /// Gives `pid`'s slot back (its probes are closed), with the entries
    /// its cells' claims wrote: the claims name them exactly.
    pub(crate) fn release_slot(&mut self, pid: u32) {
        for cell in 0..SLOT_CELLS as u32 {
            let claim = CellKey { tgid: pid, cell };
            if let Ok(target) = self.cells.claims.get(&claim, 0) {
                let _ = self.cells.cell_of.remove(&CountKey { tgid: pid, target });
                let _ = self.cells.claims.remove(&claim);
            }
        }
        if let Some((slot, _)) = self.slot_table.by_pid.remove(&pid) {
            self.slot_table.free.push(slot);
        }
    }

    fn write_slot(&mut self, slot: u16, state: Slot) -> Result<(), BpfError> {
        self.slots.set(slot as u32, per_cpu(Slot { passes: 0, ..state })?, 0).map_err(map_err(maps::SLOTS))
    }

    /// The slot of `pid`, if it has one.
    pub(crate) fn slot_of(&self, pid: u32) -> Option<u16> {
        self.slot_table.by_pid.get(&pid).map(|(s, _)| *s)
    }

    /// Events of process `pid` the full ring buffer dropped, and 3.8-3.10
    /// starts not counted because it held its share of the pending map,
    /// summed over CPUs.
    pub(crate) fn dropped(&self, pid: u32) -> (u64, u64) {
        let Some(slot) = self.slot_of(pid) else { return (0, 0) };
        let Ok(cpus) = self.slots.get(&u32::from(slot), 0) else { return (0, 0) };
        cpus.iter().fold((0, 0), |(d, r), s| (d + u64::from(s.drops), r + u64::from(s.refused)))
    }

    /// Hits of `key` counted in its cell, summed over CPUs (0 if it has none).
    pub(crate) fn cell_hits(&self, key: &CountKey) -> u64 {
        let Ok(cell) = self.cells.cell_of.get(key, 0) else { return 0 };
        let Some(&(slot, _)) = self.slot_table.by_pid.get(&key.tgid) else { return 0 };
        self.cells.sums(slot).map_or(0, |sums| sums.get(cell as usize).copied().unwrap_or(0))
    }

    /// Every (process, target) counted in a cell, with its hits: one read of
    /// each process's cells.
    pub(crate) fn all_cell_hits(&self) -> Vec<(CountKey, u64)> {
        let mut sums: HashMap<u16, [u64; SLOT_CELLS]> = HashMap::new();
        let mut out = Vec::new();
        for (key, cell) in self.cells.cell_of.iter().filter_map(Result::ok) {
            let Some(&(slot, _)) = self.slot_table.by_pid.get(&key.tgid) else { continue };
            if let std::collections::hash_map::Entry::Vacant(e) = sums.entry(slot) {
                e.insert(self.cells.sums(slot).unwrap_or_default());
            }
            out.push((key, sums[&slot].get(cell as usize).copied().unwrap_or(0)));
        }
        out
    }
}

/// The slots' map handle, taken at load.
pub(crate) type SlotMap = PerCpuArray<MapData, Slot>;

/// The cells' map handles, taken at load.
pub(crate) struct CellMaps {
    /// Per slot, per CPU: hits by cell.
    pub(crate) hits: PerCpuArray<MapData, SlotCells>,
    /// Which target claimed each cell of a process.
    pub(crate) claims: BpfHashMap<MapData, CellKey, u32>,
    /// Which cell counts (process, target).
    pub(crate) cell_of: BpfHashMap<MapData, CountKey, u32>,
}

impl CellMaps {
    /// Empties `slot`'s cells for a new process.
    fn reset(&mut self, slot: u16) -> Result<(), BpfError> {
        self.hits.set(slot as u32, per_cpu(SlotCells::default())?, 0).map_err(map_err(maps::CELLS))
    }

    /// `slot`'s hits by cell, summed over CPUs.
    fn sums(&self, slot: u16) -> Option<[u64; SLOT_CELLS]> {
        let per_cpu = self.hits.get(&(slot as u32), 0).ok()?;
        let mut sums = [0u64; SLOT_CELLS];
        for cpu in per_cpu.iter() {
            for (sum, hits) in sums.iter_mut().zip(cpu.hits) {
                *sum += hits;
            }
        }
        Some(sums)
    }
}

/// `value` on every CPU.
fn per_cpu<T: aya::Pod>(value: T) -> Result<PerCpuValues<T>, BpfError> {
    let n = aya::util::nr_cpus().map_err(|(_, e)| BpfError::Io { what: "counting CPUs", source: e })?;
    PerCpuValues::try_from(vec![value; n]).map_err(|e| BpfError::Io { what: "building per-CPU values", source: e })
}
