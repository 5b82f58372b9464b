//! The catalog's dependency versions in each watched process: read by a
//! walk off the loop at the attach (and when the catalog names new
//! dependencies), and turned into the targets each process leaves
//! unwatched. Until a process's versions are read, the targets that depend
//! on them are not watched there: a finding in a process whose version the
//! advisory does not affect would be false.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tracing::{info, warn};

use super::{Session, walking::Announce};
use crate::{
    agent::{
        exposure::{self, Exposure, Versions},
        walker::{Finding, Walked},
    },
    pyproc::distributions::Installed,
    targets::Target,
};

impl Session {
    /// The versions `pid` has, if they were read and cover every dependency
    /// the catalog constrains now.
    fn versions_of(&self, pid: u32) -> Option<&BTreeMap<String, Installed>> {
        let v = &self.watches.0.get(&pid)?.versions.as_ref()?.installed;
        self.dependencies.iter().all(|d| v.contains_key(d)).then_some(v)
    }

    /// Every target's exposure in `pid`, as far as its versions are known.
    pub(super) fn exposures(&self, pid: u32) -> BTreeMap<u32, Exposure> {
        exposure::exposures(&self.targets, &self.advisories, self.versions_of(pid))
    }

    /// Every constrained target's exposure in `pid`, by target name.
    pub(super) fn exposures_report(&self, pid: u32) -> BTreeMap<String, Exposure> {
        let named = self.exposures(pid).into_iter();
        named.filter_map(|(id, e)| Some((self.targets.get(id)?.to_string(), e))).collect()
    }

    /// The targets a process about to be attached leaves unwatched until
    /// its versions are read, told to the kernel before any probe is.
    pub(super) fn gate_new(&mut self, pid: u32) -> Result<BTreeSet<u32>, crate::bpf::BpfError> {
        let unwatched = exposure::unwatched(&exposure::exposures(&self.targets, &self.advisories, None));
        self.probes.set_unwatched(pid, &unwatched)?;
        Ok(unwatched)
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
    /// (as far as they are known) say, and reads them where they are not.
    pub(super) fn regate_all(&mut self) {
        let pids: Vec<u32> = self.watches.0.keys().copied().collect();
        for pid in pids {
            if self.versions_of(pid).is_none() {
                self.read_versions(pid);
            }
            self.regate(pid);
        }
    }

    /// Applies `pid`'s exposures: the kernel's gates, then the watchpoints
    /// (a target now watched is looked for).
    fn regate(&mut self, pid: u32) -> Option<u64> {
        let mut unwatched = exposure::unwatched(&self.exposures(pid));
        let w = self.watches.0.get_mut(&pid)?;
        if let Err(e) = self.probes.set_unwatched(pid, &unwatched) {
            warn!(pid, error = %e, "cannot tell the kernel which targets this process's dependency versions leave unwatched: they stay as they were");
            unwatched = w.unwatched.clone();
        }
        let job = w.set_unwatched(&mut self.probes, &self.targets, unwatched);
        job.map(|j| self.look(Some(j)))
    }

    /// Applies a versions walk: records them, logs each dependency's
    /// decision, applies the gates, and announces a process waiting for
    /// them once the look they lead to is done. A decision that changes
    /// after the attach is printed (`exposure` lines).
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
        let was = self.exposures(pid);
        let Some(w) = self.watches.0.get_mut(&pid) else { return };
        let binary = w.process.object.path.clone();
        let before = w.versions.take().map(|v| v.installed);
        for (name, found) in &installed {
            if before.as_ref().and_then(|b| b.get(name)) != Some(found) {
                info!(pid, binary = %binary, dependency = %name, installed = ?found, "dependency version");
            }
        }
        let (first, changed) = (before.is_none(), before.as_ref() != Some(&installed));
        w.versions = Some(Versions { installed, modules });
        if !changed {
            return;
        }
        for (id, e) in self.exposures(pid) {
            if was.get(&id) == Some(&e) {
                continue;
            }
            let target = self.targets.get(id).map(ToString::to_string).unwrap_or_default();
            info!(pid, target = %target, watched = e.watched(), exposure = ?e, "target exposure");
            // The attached line carries the first decisions.
            if !first {
                self.printer.exposure(pid, &target, &e);
            }
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

    /// What `pid`'s installed version of `target`'s dependency means for
    /// it, if an advisory constrains the version (it travels with hits).
    pub(super) fn exposure_of(&self, pid: u32, target: &Target) -> Option<Exposure> {
        exposure::exposure(self.advisories.get(target)?, self.versions_of(pid))
    }

    /// Records the catalog's constrained dependencies.
    pub(super) fn note_dependencies(&mut self) {
        self.dependencies = Arc::new(exposure::dependencies(&self.advisories));
    }
}
