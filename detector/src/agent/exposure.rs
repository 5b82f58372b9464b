//! Whether a target is watched in a process, given the version of the
//! target's dependency that process has installed: a catalog entry names
//! the dependency and the versions it affects, and a process running a
//! version outside them cannot reach the vulnerable code, so reporting it
//! would be a false finding. A version that cannot be known keeps the
//! target watched, flagged, so that nothing is missed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    ProcessWatch,
    mode::Mode,
    walker::{Job, Look},
};
use crate::{
    bpf::Probes,
    sources::{
        affected::{Affected, affected, normalize},
        catalog::Advisory,
    },
    targets::{Target, TargetSet},
};

pub use crate::pyproc::distributions::Installed;

/// What a process has of the catalog's dependencies, as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    /// Each dependency (normalized) and what the process has of it.
    pub installed: BTreeMap<String, Installed>,
    /// How many modules `sys.modules` held then: a change means a module
    /// was imported, which may be a dependency found where it was not.
    pub modules: Option<i64>,
}

impl Versions {
    /// Whether a dependency was not found, or not found out: worth reading
    /// again once a module is imported.
    pub fn unsettled(&self) -> bool {
        self.installed.values().any(|i| !matches!(i, Installed::Found { .. }))
    }
}

/// What a process's installed dependency means for one target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Exposure {
    /// The process's versions are being read: not watched until they are.
    Reading {
        /// The dependency.
        dependency: String,
    },
    /// Watched: the version installed is one the advisory affects.
    Affected {
        /// The dependency.
        dependency: String,
        /// Its version.
        version: String,
    },
    /// Not watched: the version installed is not one the advisory affects.
    NotAffected {
        /// The dependency.
        dependency: String,
        /// Its version.
        version: String,
    },
    /// Watched, flagged: no directory of the process's `sys.path` has it.
    NotInstalled {
        /// The dependency.
        dependency: String,
    },
    /// Watched, flagged: its version could not be known.
    Unknown {
        /// The dependency.
        dependency: String,
        /// Why.
        why: String,
    },
}

impl Exposure {
    /// Whether the target is watched.
    pub fn watched(&self) -> bool {
        !matches!(self, Exposure::Reading { .. } | Exposure::NotAffected { .. })
    }

    /// Which of two readings of one target wins: any that watches it.
    fn rank(&self) -> u8 {
        match self {
            Exposure::Affected { .. } => 4,
            Exposure::Unknown { .. } => 3,
            Exposure::NotInstalled { .. } => 2,
            Exposure::Reading { .. } => 1,
            Exposure::NotAffected { .. } => 0,
        }
    }
}

/// The dependencies (normalized) whose versions decide whether a target is
/// watched: those of advisories that name both a dependency and versions.
pub fn dependencies(advisories: &BTreeMap<Target, Vec<Advisory>>) -> BTreeSet<String> {
    advisories.values().flatten().filter_map(constrained).map(|(d, _)| normalize(d)).collect()
}

/// The dependency and version sets of an advisory that constrains versions.
fn constrained(a: &Advisory) -> Option<(&str, &[String])> {
    let dependency = a.dependency.as_deref()?;
    (!a.versions.is_empty()).then_some((dependency, a.versions.as_slice()))
}

/// What `installed` (none before it is read) means for a target named by
/// `advisories`; `None` if one of them does not constrain versions
/// (watched whatever they are).
pub fn exposure(advisories: &[Advisory], installed: Option<&BTreeMap<String, Installed>>) -> Option<Exposure> {
    let constrained: Option<Vec<_>> = advisories.iter().map(constrained).collect();
    constrained?.into_iter().map(|(dependency, sets)| one(dependency, sets, installed)).max_by_key(Exposure::rank)
}

fn one(dependency: &str, sets: &[String], installed: Option<&BTreeMap<String, Installed>>) -> Exposure {
    let dependency_name = dependency.to_owned();
    let Some(installed) = installed else { return Exposure::Reading { dependency: dependency_name } };
    match installed.get(&normalize(dependency)) {
        Some(Installed::Found { version, .. }) => match affected(sets, version) {
            Affected::Yes { version } => Exposure::Affected { dependency: dependency_name, version },
            Affected::No { version } => Exposure::NotAffected { dependency: dependency_name, version },
            Affected::Unknown { why } => Exposure::Unknown { dependency: dependency_name, why },
        },
        Some(Installed::Missing) => Exposure::NotInstalled { dependency: dependency_name },
        Some(Installed::Unknown { why }) => Exposure::Unknown { dependency: dependency_name, why: why.clone() },
        // A dependency the catalog named after the last read.
        None => Exposure::Reading { dependency: dependency_name },
    }
}

/// Every target's exposure in a process. Targets no advisory constrains,
/// or that a config names `unconditional`ly, are left out: they are
/// watched.
pub fn exposures(
    targets: &TargetSet,
    advisories: &BTreeMap<Target, Vec<Advisory>>,
    unconditional: &BTreeSet<Target>,
    installed: Option<&BTreeMap<String, Installed>>,
) -> BTreeMap<u32, Exposure> {
    let constrained = targets.iter().filter(|(t, _)| !unconditional.contains(t));
    constrained.filter_map(|(t, id)| Some((id, exposure(advisories.get(t)?, installed)?))).collect()
}

/// The targets `exposures` leaves unwatched.
pub fn unwatched(exposures: &BTreeMap<u32, Exposure>) -> BTreeSet<u32> {
    exposures.iter().filter(|(_, e)| !e.watched()).map(|(id, _)| *id).collect()
}

impl ProcessWatch {
    /// Leaves `unwatched` targets alone from now on (and watches those it
    /// left alone before): the look for targets now to watch, if any.
    pub fn set_unwatched(&mut self, probes: &mut Probes, targets: &TargetSet, unwatched: BTreeSet<u32>) -> Option<Job> {
        if let Mode::Watch(w) = &mut self.mode {
            for &t in unwatched.difference(&self.unwatched) {
                w.armed.disarm_target(probes, self.process.pid, t);
            }
        }
        self.unwatched = unwatched;
        self.retarget(probes, targets)
    }

    /// The walk reading the versions of `names` (normalized distribution
    /// names) the process has installed: only once a module was imported
    /// since they were last read, if `recheck`.
    pub fn versions_job(&self, names: Arc<BTreeSet<String>>, recheck: bool) -> Job {
        let seen = if recheck { self.versions.as_ref().and_then(|v| v.modules) } else { None };
        self.walk(Look::Versions { names, seen }, Arc::from(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advisory(dependency: &str, versions: &[&str]) -> Advisory {
        Advisory {
            dependency: Some(dependency.into()),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            ..Default::default()
        }
    }

    fn has(entries: &[(&str, Installed)]) -> BTreeMap<String, Installed> {
        entries.iter().map(|(n, i)| (n.to_string(), i.clone())).collect()
    }

    fn found(version: &str) -> Installed {
        Installed::Found { version: version.into(), metadata: "/m".into() }
    }

    #[test]
    fn a_version_outside_the_advisory_is_not_watched() {
        let a = [advisory("Requests", &["<2.32.0"])];
        let old = has(&[("requests", found("2.31.0"))]);
        let new = has(&[("requests", found("2.32.3"))]);
        assert!(matches!(exposure(&a, Some(&old)), Some(Exposure::Affected { version, .. }) if version == "2.31.0"));
        let e = exposure(&a, Some(&new)).unwrap();
        assert!(matches!(&e, Exposure::NotAffected { dependency, .. } if dependency == "Requests"), "{e:?}");
        assert!(!e.watched());
    }

    #[test]
    fn reading_missing_and_unknown() {
        let a = [advisory("six", &["<1.17"])];
        assert_eq!(exposure(&a, None), Some(Exposure::Reading { dependency: "six".into() }));
        assert!(!exposure(&a, None).unwrap().watched());
        let missing = has(&[("six", Installed::Missing)]);
        assert_eq!(exposure(&a, Some(&missing)), Some(Exposure::NotInstalled { dependency: "six".into() }));
        let odd = has(&[("six", found("weird"))]);
        assert!(exposure(&a, Some(&odd)).unwrap().watched());
    }

    #[test]
    fn any_advisory_that_watches_wins_and_unconstrained_ones_are_left_out() {
        let two = [advisory("six", &["<1.0"]), advisory("six", &[">=1.16,<1.17"])];
        let installed = has(&[("six", found("1.16.0"))]);
        assert!(matches!(exposure(&two, Some(&installed)), Some(Exposure::Affected { .. })));
        assert_eq!(exposure(&[advisory("six", &[])], Some(&installed)), None);
        // An entry without versions next to one with: watched whatever they are.
        let mixed = [advisory("six", &[">=2"]), Advisory::default()];
        assert_eq!(exposure(&mixed, Some(&installed)), None);
        // A dependency named after the read is being read.
        let other = exposure(&[advisory("other", &["<1"])], Some(&installed));
        assert!(matches!(other, Some(Exposure::Reading { .. })), "{other:?}");
        assert_eq!(exposure(&[Advisory::default()], Some(&installed)), None);
        let mut by_target = BTreeMap::new();
        by_target.insert(Target::parse("six:a").unwrap(), two.to_vec());
        by_target.insert(Target::parse("zope.x:b").unwrap(), vec![advisory("Zope.Interface", &["<6"])]);
        assert_eq!(dependencies(&by_target), ["six", "zope-interface"].map(String::from).into());
    }
}
