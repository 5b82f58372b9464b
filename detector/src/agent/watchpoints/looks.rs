//! Targets not found yet, and the walks that look for them: what a walk
//! looks for, what it found is armed, and when to look again.

use std::time::Instant;

use tracing::debug;

use super::{Armed, CannotWatch, Fit, Made, RECHECKS, dispatch_of};
use crate::{
    agent::walker::{Finding, Look},
    bpf::Probes,
    pyproc::{PythonProcess, body::Found, mem::ProcessMemory},
    targets::{Target, TargetSet},
};

/// Why a target is pending before any walk looked for it.
const NOT_LOOKED_FOR: &str = "not looked for yet";

impl Armed {
    /// Watches nothing yet: each of `targets` is pending until a walk (off
    /// the agent loop) finds it. Fails only where watchpoints cannot apply
    /// whatever the walk finds.
    pub fn pending_all<'a>(
        probes: &mut Probes,
        process: &PythonProcess,
        targets: impl IntoIterator<Item = (&'a Target, u32)>,
        fit: Fit,
    ) -> Result<Armed, CannotWatch> {
        dispatch_of(process)?;
        let mut armed = Armed::empty(fit);
        armed.pending = targets.into_iter().map(|(_, id)| (id, NOT_LOOKED_FOR.to_owned())).collect();
        // Now, not when a pending target is found: its module body is
        // running then, and every microsecond is a call that may be missed.
        if let Err(e) = armed.mark_dispatch_reads(probes, process) {
            armed.disarm(probes);
            return Err(e);
        }
        Ok(armed)
    }

    /// Follows a change of targets: units of targets that stay keep
    /// counting, those of targets gone are disarmed, and new ones (unless
    /// `seen`) are pending. Returns whether there is anything to look for.
    pub fn follow_targets(
        &mut self,
        probes: &mut Probes,
        pid: u32,
        targets: &TargetSet,
        seen: impl Fn(u32) -> bool,
    ) -> bool {
        let known = self.unreached();
        for &id in known.iter().filter(|id| targets.get(**id).is_none()) {
            self.disarm_target(probes, pid, id);
        }
        let mut new = false;
        for (_, id) in targets.iter().filter(|(_, id)| !seen(*id) && !known.contains(id)) {
            self.pending.insert(id, NOT_LOOKED_FOR.to_owned());
            new = true;
        }
        new
    }

    /// A watched code object was deallocated (a module reloaded, a
    /// function redefined): its units are gone (the kernel removed their
    /// entries), and a target left without one is pending again, to be
    /// looked for in what the process defines now.
    pub fn code_freed(&mut self, probes: &mut Probes, pid: u32, code: u64) {
        let freed: Vec<u32> = self.units.iter().filter(|u| u.code == code).map(|u| u.target).collect();
        self.units.retain(|u| {
            if u.code != code {
                return true;
            }
            probes.remove_watch(&u.key, u.code);
            false
        });
        for id in freed {
            if !self.units.iter().any(|u| u.target == id) {
                self.pending.insert(id, "its code object was deallocated".to_owned());
            }
        }
        // Its registers go to the next units waiting for a turn.
        if let Ok(mem) = ProcessMemory::open(pid)
            && let Err(e) = self.assign(probes, pid, &mem)
        {
            debug!(pid, code, error = %e, "giving a freed unit's registers to others");
        }
    }

    /// The targets a walk looks for: those not reached, with their ids.
    pub fn looking_for(&self, targets: &TargetSet) -> Vec<(u32, Target)> {
        self.unreached().into_iter().filter_map(|id| Some((id, targets.get(id)?.clone()))).collect()
    }

    /// How many modules `sys.modules` held at the last look there.
    pub fn modules_seen(&self) -> Option<i64> {
        self.modules_seen
    }

    /// Arms what a walk found (a module body's code objects, or the
    /// definitions in `sys.modules`). Returns the targets armed.
    pub fn apply(
        &mut self,
        probes: &mut Probes,
        p: &PythonProcess,
        targets: &TargetSet,
        look: &Look,
        finding: Result<Finding, crate::pyproc::ProcessError>,
    ) -> Result<Vec<u32>, CannotWatch> {
        let in_body = matches!(look, Look::Body { .. });
        // Bodies whose looks were folded into this one may have been
        // running as it walked: a target they define in another
        // interpreter (or again) is looked for once they are done.
        if matches!(look, Look::Modules { unread: true, .. }) {
            self.recheck();
        }
        let (found, modules) = match finding {
            Ok(Finding::Found { found, modules }) => (found, modules),
            // Only the per-call looks find candidates or identities.
            Ok(
                Finding::Nothing
                | Finding::Resolved { .. }
                | Finding::Identities(_)
                | Finding::Versions { .. }
                | Finding::Callers(_),
            ) => {
                return Ok(Vec::new());
            }
            // A read that fails (the process exiting, a body gone) leaves
            // them pending; a body is looked for in `sys.modules` next.
            Err(e) => {
                debug!(pid = p.pid, error = %e, "looking for pending targets");
                if in_body {
                    self.recheck();
                }
                return Ok(Vec::new());
            }
        };
        if !in_body {
            self.modules_seen = modules;
        }
        // Targets changed or reached meanwhile are not this walk's to arm.
        let unreached = self.unreached();
        let found: Vec<(u32, Target, Found)> =
            found.into_iter().filter(|(id, t, _)| unreached.contains(id) && targets.get(*id) == Some(t)).collect();
        let wanted = found.len();
        let mut starts = Vec::new();
        let mut armed = Vec::new();
        for (id, t, found) in found {
            match found {
                Found::Code { starts: s } => {
                    starts.extend(s.into_iter().map(|s| (id, s)));
                    armed.push(id);
                }
                Found::Nothing { later: true, .. } => {}
                Found::Nothing { reason, later: false } => {
                    return Err(CannotWatch::Refused { target: t.to_string(), reason });
                }
            }
        }
        self.add_units(probes, p, starts, Made::AfterAttach)?;
        // A target whose code objects were freed before they were watched
        // stays pending.
        armed.retain(|id| self.units.iter().any(|u| u.target == *id));
        for id in &armed {
            self.pending.remove(id);
        }
        if in_body && armed.len() < wanted {
            // The body may have ended (and its code object gone) before the
            // walk read it, or made a function some other way: its module
            // is looked up in `sys.modules` at the next tick, and later again.
            self.recheck();
        }
        Ok(armed)
    }

    /// Looks in `sys.modules` again [`RECHECKS`] from now: a module body
    /// ran that could not be read whole.
    pub fn recheck(&mut self) {
        let now = Instant::now();
        self.rechecks.extend(RECHECKS.iter().map(|d| now + *d));
    }

    /// Whether a module body that ran left targets to look for again now.
    pub fn recheck_due(&mut self, now: Instant) -> bool {
        let before = self.rechecks.len();
        self.rechecks.retain(|at| *at >= now);
        self.rechecks.len() != before && self.follows_imports()
    }
}
