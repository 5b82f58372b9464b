//! Targets left unwatched in one process by its dependency versions: the
//! kernel classifies such a target's code objects as no target there. A
//! mirror in user space answers without a map lookup (3.8-3.10 resolutions
//! consult it too).

use std::collections::{BTreeMap, BTreeSet};

use detector_common::{CountKey, capacity, maps};

use super::{BpfError, Probes, map_err};

/// The mirror of the kernel's map: each process's unwatched targets, and
/// how many pairs there are in all.
#[derive(Default)]
pub(crate) struct Gates {
    by_pid: BTreeMap<u32, BTreeSet<u32>>,
    pairs: usize,
}

impl Probes {
    /// Makes `unwatched` the targets of `pid` left unwatched; returns
    /// whether anything changed. A change starts a new generation, so that
    /// verdicts made before it are made again.
    pub fn set_unwatched(&mut self, pid: u32, unwatched: &BTreeSet<u32>) -> Result<bool, BpfError> {
        let now = self.gates.by_pid.get(&pid).cloned().unwrap_or_default();
        if &now == unwatched {
            return Ok(false);
        }
        let result = self.write_gates(pid, &now, unwatched);
        // Whatever was written counts: verdicts made before it may be wrong.
        self.bump_generation()?;
        result.map(|()| true)
    }

    fn write_gates(&mut self, pid: u32, now: &BTreeSet<u32>, want: &BTreeSet<u32>) -> Result<(), BpfError> {
        for &target in now.difference(want) {
            let _ = self.unaffected.remove(&CountKey { tgid: pid, target });
            self.gates.unset(pid, target);
        }
        for &target in want.difference(now) {
            if self.gates.pairs >= capacity::UNAFFECTED as usize {
                return Err(BpfError::Full { map: maps::UNAFFECTED, cap: capacity::UNAFFECTED });
            }
            self.unaffected.insert(CountKey { tgid: pid, target }, 1, 0).map_err(map_err(maps::UNAFFECTED))?;
            self.gates.set(pid, target);
        }
        Ok(())
    }

    /// Leaves `unwatched` targets of `pid`, a process not watched before,
    /// unwatched: its new watch instance has no verdict to make again.
    pub fn gate_new(&mut self, pid: u32, unwatched: &BTreeSet<u32>) -> Result<(), BpfError> {
        self.clear_gates(pid);
        let result = self.write_gates(pid, &BTreeSet::new(), unwatched);
        if result.is_err() {
            self.clear_gates(pid);
        }
        result
    }

    /// Whether `target` is left unwatched in `pid`.
    pub fn unwatched(&self, pid: u32, target: u32) -> bool {
        self.gates.by_pid.get(&pid).is_some_and(|t| t.contains(&target))
    }

    /// Forgets `pid`'s unwatched targets (it is no longer watched, or its
    /// watch did not begin).
    pub fn clear_gates(&mut self, pid: u32) {
        for target in self.gates.by_pid.remove(&pid).unwrap_or_default() {
            let _ = self.unaffected.remove(&CountKey { tgid: pid, target });
            self.gates.pairs -= 1;
        }
    }
}

impl Gates {
    fn set(&mut self, pid: u32, target: u32) {
        if self.by_pid.entry(pid).or_default().insert(target) {
            self.pairs += 1;
        }
    }

    fn unset(&mut self, pid: u32, target: u32) {
        if let Some(t) = self.by_pid.get_mut(&pid)
            && t.remove(&target)
        {
            self.pairs -= 1;
            if t.is_empty() {
                self.by_pid.remove(&pid);
            }
        }
    }
}
