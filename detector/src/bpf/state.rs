//! Reading and writing the kernel's state: targets, counts, pending 3.8-3.10
//! hits, verdicts, thread states and counters.

use std::{collections::HashMap as StdHashMap, hash::Hash};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};

use detector_common::{
    CELL_UNKNOWN, CodeIdentity, CodeKey, CountKey, NameKey, PendingKey, TargetKey, ThreadEntry, Verdict, fixed_name,
    maps, stats,
};

use super::{BpfError, Probes, map_err};
use crate::targets::{Target, TargetSet};

/// Hits of one code object counted while it awaited resolution (3.8-3.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingHits {
    /// Generation they were counted in.
    pub generation: u32,
    /// Code object.
    pub code: u64,
    /// Its `co_name`.
    pub name: u64,
    /// The frame's globals.
    pub globals: u64,
    /// Starts counted.
    pub hits: u64,
}

/// The kernel's key for a target.
pub fn target_key(t: &Target) -> TargetKey {
    // Validation bounds both parts below NAME_LEN.
    TargetKey {
        module: fixed_name(t.module().as_bytes()).expect("validated target"),
        qualname: fixed_name(t.qualname().as_bytes()).expect("validated target"),
    }
}

fn name_key(t: &Target) -> NameKey {
    NameKey { name: fixed_name(t.name().as_bytes()).expect("validated target") }
}

impl Probes {
    /// Makes the kernel's targets equal `set`; if anything changed, starts a
    /// new generation so cached verdicts are recomputed. Returns whether it
    /// changed.
    pub fn sync_targets(&mut self, set: &TargetSet) -> Result<bool, BpfError> {
        let cap = self.capacities().targets;
        if set.len() > cap as usize {
            return Err(BpfError::Full { map: maps::TARGETS, cap });
        }
        let want: StdHashMap<TargetKey, u32> = set.iter().map(|(t, id)| (target_key(t), id)).collect();
        let mut want_names: StdHashMap<NameKey, u32> = StdHashMap::new();
        for (t, _) in set.iter() {
            *want_names.entry(name_key(t)).or_default() += 1;
        }
        let changed = sync_map(&mut self.targets, &want, maps::TARGETS)?;
        let changed = sync_map(&mut self.names, &want_names, maps::NAMES)? || changed;
        if changed {
            self.bump_generation()?;
        }
        Ok(changed)
    }

    /// Hits of `target` counted in process `pid` (not including pending ones).
    pub fn count(&self, pid: u32, target: u32) -> u64 {
        let key = CountKey { tgid: pid, target };
        self.counts.get(&key, 0).unwrap_or(0) + self.cell_hits(&key)
    }

    /// Records one hit of `target` in `pid` seen by user space, unless the
    /// kernel counted one already.
    pub fn note_reached(&mut self, pid: u32, target: u32) -> Result<(), BpfError> {
        let key = CountKey { tgid: pid, target };
        if self.count(pid, target) > 0 {
            return Ok(());
        }
        // BPF_NOEXIST: a hit the kernel counts meanwhile wins.
        match self.counts.insert(key, 1, 1) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(map_err(maps::COUNTS)(e)),
        }
    }

    /// Pending hits of process `pid`.
    pub fn pending(&self, pid: u32) -> Vec<PendingHits> {
        self.all_pending().into_iter().filter(|(p, _)| *p == pid).map(|(_, h)| h).collect()
    }

    /// Pending hits of every process, in one pass over the map.
    pub fn all_pending(&self) -> Vec<(u32, PendingHits)> {
        self.pending
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let hits = PendingHits {
                    generation: k.generation,
                    code: k.code,
                    name: v.name,
                    globals: v.globals,
                    hits: v.hits,
                };
                (k.tgid, hits)
            })
            .collect()
    }

    /// Every (process, target) count, in one pass over the map: a metrics
    /// refresh reads the entries that exist, not processes times targets.
    pub fn all_counts(&self) -> Vec<(CountKey, u64)> {
        let mut all: StdHashMap<CountKey, u64> = self.counts.iter().filter_map(Result::ok).collect();
        for (key, hits) in self.all_cell_hits() {
            *all.entry(key).or_default() += hits;
        }
        all.into_iter().collect()
    }

    /// Records user space's verdict on a 3.8-3.10 code object.
    pub fn set_verdict(
        &mut self,
        pid: u32,
        code: u64,
        generation: u32,
        target: u32,
        resumable: bool,
    ) -> Result<(), BpfError> {
        let key = CodeKey { tgid: pid, instance: self.instance(pid), code };
        // The kernel picks the cell on the target's next hit.
        let verdict = Verdict { generation, target, resumable: resumable as u32, cell: CELL_UNKNOWN };
        self.verdicts.insert(key, verdict, 0).map_err(map_err(maps::VERDICTS))
    }

    /// Tells the kernel which thread state a thread runs (pre-fill for
    /// threads that were in Python before the probes were attached).
    pub fn set_thread(&mut self, tid: u32, pid: u32, tstate: u64) -> Result<(), BpfError> {
        let entry = ThreadEntry { tgid: pid, instance: self.instance(pid), tstate };
        self.threads.insert(tid, entry, 0).map_err(map_err(maps::THREADS))
    }

    /// Records what a 3.8-3.10 code object is (pre-fill for functions made
    /// before the probes were attached).
    pub fn set_identity(&mut self, pid: u32, code: u64, qualname: u64, globals: u64) -> Result<(), BpfError> {
        let key = CodeKey { tgid: pid, instance: self.instance(pid), code };
        self.identities.insert(key, CodeIdentity { qualname, globals }, 0).map_err(map_err(maps::IDENTITIES))
    }

    /// The kernel's counters, summed over CPUs, indexed as `detector_common::stats`.
    pub fn stats(&self) -> [u64; stats::COUNT as usize] {
        let mut out = [0; stats::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.stats.get(&(i as u32), 0) {
                *v = per_cpu.iter().sum();
            }
        }
        out
    }

    /// Deletes `pid`'s pending entry of `code` in `generation`, resolved
    /// long enough ago that no probe adds to it any more, and returns its
    /// hits (`None` if it is gone already); the process gets its room in
    /// the map back.
    pub fn take_pending(&mut self, pid: u32, generation: u32, code: u64) -> Result<Option<u64>, BpfError> {
        let key = PendingKey { tgid: pid, generation, code };
        let Ok(entry) = self.pending.get(&key, 0) else { return Ok(None) };
        self.pending.remove(&key).map_err(map_err(maps::PENDING))?;
        if let Some(slot) = self.slot_of(pid) {
            let folded = self.pending_folded.get(&u32::from(slot), 0).unwrap_or(0);
            // Best effort: the hits are taken either way; a miss here only
            // leaves the process a little less room.
            if let Err(e) = self.pending_folded.set(u32::from(slot), folded + 1, 0) {
                tracing::debug!(pid, error = %e, "cannot give a pending entry's room back");
            }
        }
        Ok(Some(entry.hits))
    }

    /// Deletes `pid`'s pending entries `pending` (it exited or executed a
    /// new image: nothing adds to them any more).
    pub fn drop_pending(&mut self, pid: u32, pending: &[PendingHits]) {
        for p in pending {
            let _ = self.pending.remove(&PendingKey { tgid: pid, generation: p.generation, code: p.code });
        }
    }

    /// Whether the kernel holds a verdict of `generation` on `pid`'s `code`.
    pub fn holds_verdict(&self, pid: u32, code: u64, generation: u32) -> bool {
        let key = CodeKey { tgid: pid, instance: self.instance(pid), code };
        self.verdicts.get(&key, 0).is_ok_and(|v| v.generation == generation)
    }

    /// Gives a new holder of `slot` the whole of its room in the pending map.
    pub(crate) fn reset_pending_room(&mut self, slot: u16) -> Result<(), BpfError> {
        self.pending_made.set(u32::from(slot), 0, 0).map_err(map_err(maps::PENDING_MADE))?;
        self.pending_folded.set(u32::from(slot), 0, 0).map_err(map_err(maps::PENDING_FOLDED))
    }

    /// Ends the watch of process `pid`, whose probes are closed, deleting
    /// the keys it wrote, found without a sweep of the maps: its counters of
    /// the active targets (those of targets removed earlier went then), the
    /// cells it claimed, and its slot. Its verdicts, identities and threads
    /// are keyed or stamped by the watch instance, which no later watch
    /// shares, and age out of their LRU maps; its watched units went when
    /// its watchpoints were disarmed. Its pending hits (3.8-3.10) are swept
    /// if `sweep_pending` (probes that could still add to them were closed
    /// only now; an exited process's were deleted as it was reported).
    pub fn forget_process(&mut self, pid: u32, targets: impl IntoIterator<Item = u32>, sweep_pending: bool) {
        for target in targets {
            let _ = self.counts.remove(&CountKey { tgid: pid, target });
        }
        if sweep_pending {
            remove_where(&mut self.pending, |k, _| k.tgid == pid);
        }
        let _ = self.watched.remove(&pid);
        self.clear_gates(pid);
        self.release_slot(pid);
        // The CPUs' cached verdicts may name the pid, which may come back.
        self.cache_stamp = self.cache_stamp.wrapping_add(1);
        if let Err(e) = self.write_config() {
            tracing::warn!(pid, error = %e, "could not invalidate cached verdicts");
        }
    }

    /// Targets `ids` were removed: deletes their counters in every process
    /// not forgotten yet, so that forgetting one needs only the active ids.
    pub fn retire_targets(&mut self, ids: &[u32]) {
        for pid in self.slotted() {
            for &target in ids {
                let _ = self.counts.remove(&CountKey { tgid: pid, target });
            }
        }
    }
}

/// Makes `map` hold exactly `want`; returns whether anything changed.
fn sync_map<K: Pod + Eq + Hash>(
    map: &mut HashMap<MapData, K, u32>,
    want: &StdHashMap<K, u32>,
    name: &'static str,
) -> Result<bool, BpfError> {
    let have: StdHashMap<K, u32> = map.iter().filter_map(Result::ok).collect();
    let mut changed = false;
    for (k, v) in &have {
        if want.get(k) != Some(v) {
            map.remove(k).map_err(map_err(name))?;
            changed = true;
        }
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(map_err(name))?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Removes the entries of `map` for which `pred` holds (best effort: an
/// entry another CPU removed first is already gone).
fn remove_where<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, pred: impl Fn(&K, &V) -> bool) {
    let doomed: Vec<K> = map.iter().filter_map(Result::ok).filter(|(k, v)| pred(k, v)).map(|(k, _)| k).collect();
    for k in doomed {
        let _ = map.remove(&k);
    }
}
