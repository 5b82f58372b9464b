//! Targets left unwatched in one process by its dependency versions: the
//! kernel classifies such a target's code objects as no target there. A
//! mirror in user space answers without a map lookup (3.8-3.10 resolutions
//! consult it too).

use std::collections::{BTreeSet, HashSet};

use detector_common::{CountKey, capacity, maps};

use super::{BpfError, Probes, map_err};

/// The mirror of the kernel's map: (process, target) pairs unwatched.
#[derive(Default)]
pub(crate) struct Gates(HashSet<(u32, u32)>);

impl Probes {
    /// Makes `unwatched` the targets of `pid` left unwatched; returns
    /// whether anything changed. A change starts a new generation, so that
    /// verdicts made before it are made again.
    pub fn set_unwatched(&mut self, pid: u32, unwatched: &BTreeSet<u32>) -> Result<bool, BpfError> {
        let now: Vec<u32> = self.gates.0.iter().filter(|(p, _)| *p == pid).map(|(_, t)| *t).collect();
        let gone: Vec<u32> = now.iter().copied().filter(|t| !unwatched.contains(t)).collect();
        let new: Vec<u32> = unwatched.iter().copied().filter(|t| !self.gates.0.contains(&(pid, *t))).collect();
        if gone.is_empty() && new.is_empty() {
            return Ok(false);
        }
        if self.gates.0.len() + new.len() > capacity::UNAFFECTED as usize {
            return Err(BpfError::Full { map: maps::UNAFFECTED, cap: capacity::UNAFFECTED });
        }
        for target in new {
            self.unaffected.insert(CountKey { tgid: pid, target }, 1, 0).map_err(map_err(maps::UNAFFECTED))?;
            self.gates.0.insert((pid, target));
        }
        for target in gone {
            let _ = self.unaffected.remove(&CountKey { tgid: pid, target });
            self.gates.0.remove(&(pid, target));
        }
        self.bump_generation()?;
        Ok(true)
    }

    /// Whether `target` is left unwatched in `pid`.
    pub fn unwatched(&self, pid: u32, target: u32) -> bool {
        self.gates.0.contains(&(pid, target))
    }

    /// Forgets `pid`'s unwatched targets (it is no longer watched).
    pub(super) fn forget_gates(&mut self, pid: u32) {
        let mine: Vec<u32> = self.gates.0.iter().filter(|(p, _)| *p == pid).map(|(_, t)| *t).collect();
        for target in mine {
            let _ = self.unaffected.remove(&CountKey { tgid: pid, target });
            self.gates.0.remove(&(pid, target));
        }
    }
}
