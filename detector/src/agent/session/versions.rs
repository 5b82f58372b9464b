//! The catalog's dependency versions in each watched process: read by a
//! walk off the loop at the attach (and when the catalog names new
//! dependencies), and turned into the targets each process leaves
//! unwatched. Until a process's version of a dependency is read, the
//! targets that depend on it are not watched there: a finding in a process
//! whose version the advisory does not affect would be false.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use super::{Session, walking::Announce};
use crate::{
    agent::{
        exposure::{self, Exposure, Versions},
        walker::{Finding, Walked},
    },
    pyproc::distributions::Installed,
    targets::{Target, TargetSet},
};

impl Session {
    /// Every constrained target's exposure in `pid`, as far as its
    /// versions are known now.
    fn exposures(&self, pid: u32) -> BTreeMap<u32, Exposure> {
        let installed = self.watches.0.get(&pid).and_then(|w| w.versions.as_ref()).map(|v| &v.installed);
        exposure::exposures(&self.targets, &self.advisories, &self.unconditional, installed)
    }

    /// The exposures last applied to `pid`, by target name.
    pub(super) fn exposures_report(&self, pid: u32) -> BTreeMap<String, Exposure> {
        let Some(w) = self.watches.0.get(&pid) else { return BTreeMap::new() };
        let named = self.targets.iter().filter_map(|(t, id)| Some((t.to_string(), w.exposures.get(&id)?.clone())));
        named.collect()
    }

    /// What `pid`'s version of `target`'s dependency means for it, if an
    /// advisory constrains the version (it travels with hits).
    pub(super) fn exposure_of(&self, pid: u32, target: &Target) -> Option<Exposure> {
        self.watches.0.get(&pid)?.exposures.get(&self.targets.id(target)?).cloned()
    }

    /// The targets a process about to be attached leaves unwatched until
    /// its versions are read, told to the kernel before any probe is (a new
    /// watch has no verdict yet: nothing to make again). A kernel map too
    /// full to hold them leaves them watched, said and counted.
    pub(super) fn gate_new(&mut self, pid: u32) -> (BTreeSet<u32>, BTreeMap<u32, Exposure>) {
        let exposures = exposure::exposures(&self.targets, &self.advisories, &self.unconditional, None);
        let unwatched = exposure::unwatched(&exposures);
        match self.probes.gate_new(pid, &unwatched) {
            Ok(()) => (unwatched, exposures),
            Err(e) => {
                warn!(pid, error = %e, "cannot hold off the targets whose dependency version is not read yet: they are watched in this process whatever its version");
                (BTreeSet::new(), BTreeMap::new())
            }
        }
    }

    /// Before `next` becomes the target set: leaves each process's new
    /// targets unwatched where its versions (as far as known) say, so that
    /// none counts before [`Session::regate_all`] settles them.
    pub(super) fn pregate(&mut self, next: &TargetSet) {
        for (&pid, w) in &self.watches.0 {
            let installed = w.versions.as_ref().map(|v| &v.installed);
            let mut unwatched =
                exposure::unwatched(&exposure::exposures(next, &self.advisories, &self.unconditional, installed));
            unwatched.extend(&w.unwatched);
            if let Err(e) = self.probes.set_unwatched(pid, &unwatched) {
                warn!(pid, error = %e, "cannot hold off new targets this process's dependency versions may leave unwatched");
            }
        }
    }

    /// The walk reading `pid`'s versions, if the catalog constrains any.
    pub(super) fn read_versions(&mut self, pid: u32) -> Option<u64> {
        if self.dependencies.is_empty() {
            return None;
        }
        let job = self.watches.0.get(&pid)?.versions_job(self.dependencies.clone(), false);
        Some(self.look(Some(job)))
    }

    /// Reads again the versions of processes where a dependency was not
    /// found (or not found out), if they imported a module since: it may be
    /// the dependency, from a path added since, or the interpreter may have
    /// been caught before its `sys.path` was set up.
    pub(super) fn recheck_versions(&mut self) {
        let unsettled = self.watches.0.values().filter(|w| w.versions.as_ref().is_some_and(|v| v.unsettled()));
        let jobs: Vec<_> = unsettled.map(|w| w.versions_job(self.dependencies.clone(), true)).collect();
        for job in jobs {
            self.look(Some(job));
        }
    }

    /// Makes each process leave unwatched exactly the targets its versions
    /// (as far as they are known) say, and reads them where a dependency
    /// the catalog constrains was not read.
    pub(super) fn regate_all(&mut self) {
        let pids: Vec<u32> = self.watches.0.keys().copied().collect();
        for pid in pids {
            let read = self.watches.0.get(&pid).and_then(|w| w.versions.as_ref());
            if !read.is_some_and(|v| self.dependencies.iter().all(|d| v.installed.contains_key(d))) {
                self.read_versions(pid);
            }
            self.regate(pid);
        }
    }

    /// Applies `pid`'s exposures: the kernel's gates, then the watchpoints
    /// (a target now unwatched is disarmed, one now watched looked for).
    /// Decisions that changed after its attach are printed.
    fn regate(&mut self, pid: u32) -> Option<u64> {
        let now = self.exposures(pid);
        let announced = !matches!(self.announcing.get(&pid), Some((Announce::Attached(_), _)));
        let mut unwatched = exposure::unwatched(&now);
        let w = self.watches.0.get_mut(&pid)?;
        if let Err(e) = self.probes.set_unwatched(pid, &unwatched) {
            warn!(pid, error = %e, "cannot tell the kernel which targets this process's dependency versions leave unwatched: they stay as they were");
            unwatched = w.unwatched.clone();
        }
        let changed: Vec<(u32, Exposure)> =
            now.iter().filter(|(id, e)| w.exposures.get(id) != Some(*e)).map(|(id, e)| (*id, e.clone())).collect();
        w.exposures = now;
        let job = w.set_unwatched(&mut self.probes, &self.targets, unwatched);
        for (id, e) in changed {
            let target = self.targets.get(id).map(ToString::to_string).unwrap_or_default();
            info!(pid, target = %target, watched = e.watched(), exposure = ?e, "target exposure");
            // The attached line carries the decisions made before it.
            if announced {
                self.printer.exposure(pid, &target, &e);
            }
        }
        self.upstream_dependencies(pid);
        job.map(|j| self.look(Some(j)))
    }

    /// Applies a versions walk: records them, logs each dependency found,
    /// applies the gates, and announces a process waiting for them once the
    /// look they lead to is done.
    pub(super) fn versions_read(&mut self, walked: Walked) {
        let pid = walked.pid;
        let (installed, modules) = match walked.finding {
            Ok(Finding::Versions { installed, modules }) => (installed, modules),
            Ok(_) => return,
            Err(e) => {
                let why = format!("reading them failed: {e}");
                (self.dependencies.iter().map(|d| (d.clone(), Installed::Unknown { why: why.clone() })).collect(), None)
            }
        };
        let Some(w) = self.watches.0.get_mut(&pid) else { return };
        let binary = w.process.object.path.clone();
        let before = w.versions.take().map(|v| v.installed);
        for (name, found) in &installed {
            if before.as_ref().and_then(|b| b.get(name)) != Some(found) {
                info!(pid, binary = %binary, dependency = %name, installed = ?found, "dependency version");
            }
        }
        let changed = before.as_ref() != Some(&installed);
        w.versions = Some(Versions { installed, modules });
        if !changed {
            return;
        }
        let after = match self.regate(pid) {
            Some(seq) => Some(seq),
            // Watchpoints look for what is watched now.
            None => {
                let job =
                    self.watches.0.get_mut(&pid).and_then(|w| w.rescan_pending(&self.targets, true, "versions read"));
                job.map(|j| self.look(Some(j)))
            }
        };
        self.announce_after(pid, after);
    }

    /// A process waiting for its versions is announced once the look they
    /// led to (`after`) is done, or now if none.
    fn announce_after(&mut self, pid: u32, after: Option<u64>) {
        let Some((Announce::Attached(_), due)) = self.announcing.get_mut(&pid) else { return };
        match after {
            Some(seq) => *due = seq,
            None => {
                let Some((Announce::Attached(ran), _)) = self.announcing.remove(&pid) else { return };
                self.announce(pid, ran);
            }
        }
    }

    /// Records the catalog's constrained dependencies.
    pub(super) fn note_dependencies(&mut self) {
        self.dependencies = std::sync::Arc::new(exposure::dependencies(&self.advisories));
    }
}
