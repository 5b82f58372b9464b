//! The session's side of reporting upstream: each watched process is a
//! runtime of its own at the telemetry intake, announced with the catalog
//! dependencies it has, told when an advisory's target is first reached
//! in it, and closed when it ends.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::Session;
use crate::{
    agent::{ProcessWatch, callers::Caller, discovery, exposure::Installed},
    events::Hit,
    sources::{
        affected::{Affected, affected, normalize},
        catalog::Advisory,
    },
    targets::Target,
    telemetry::{
        self, Event, TRACER_VERSION, Telemetry,
        runtime::Found,
        wire::{Application, Reached},
    },
};

/// The tracers' name for a service that sets no `DD_SERVICE`.
const UNNAMED: &str = "unnamed-python-service";

/// The sender, and what was told to it.
pub(super) struct Upstream {
    telemetry: Telemetry,
    /// Targets reported reached, per process (counting every call, a
    /// target hits many times; only its first is news).
    reported: HashMap<u32, HashSet<u32>>,
    /// This agent's start time (clock ticks after boot): processes that
    /// started before it are adopted.
    started: Option<u64>,
}

impl Session {
    /// Reports every watched process to the telemetry intake through
    /// `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        let started = discovery::start_time(std::process::id());
        self.upstream = Some(Upstream { telemetry, reported: HashMap::new(), started });
        self
    }

    /// `pid` is announced: its runtime starts, with its dependencies.
    pub(super) fn upstream_started(&mut self, pid: u32) {
        let (Some(up), Some(w)) = (&self.upstream, self.watches.0.get(&pid)) else { return };
        let adopted = matches!((w.start_time, up.started), (Some(p), Some(a)) if p < a);
        up.telemetry.send(Event::Started { runtime: w.runtime_id(), application: application(w), adopted });
        self.upstream_dependencies(pid);
    }

    /// `pid`'s catalog dependencies, as last read, to the intake.
    pub(super) fn upstream_dependencies(&self, pid: u32) {
        let (Some(up), Some(w)) = (&self.upstream, self.watches.0.get(&pid)) else { return };
        let Some(versions) = &w.versions else { return };
        let found = found(&self.advisories, &versions.installed);
        if !found.is_empty() {
            up.telemetry.send(Event::Dependencies { runtime: w.runtime_id(), found });
        }
    }

    /// A hit: the first of its target in its process reaches each of the
    /// target's advisories, from `caller` if known.
    pub(super) fn upstream_reached(&mut self, hit: &Hit, caller: Option<Caller>) {
        let (Some(up), Some(w)) = (&mut self.upstream, self.watches.0.get(&hit.pid)) else { return };
        let Some(id) = self.targets.id(&hit.target) else { return };
        if !up.reported.entry(hit.pid).or_default().insert(id) {
            return;
        }
        let Some(installed) = w.versions.as_ref().map(|v| &v.installed) else { return };
        let at = caller.unwrap_or_else(|| fallback(&hit.target));
        for (dependency, version, advisory) in reached(self.advisories.get(&hit.target), installed) {
            let at = at.clone();
            up.telemetry.send(Event::Reached {
                runtime: w.runtime_id(),
                dependency,
                version: Some(version),
                advisory,
                at,
            });
        }
    }

    /// `pid` ended: its runtime closes.
    pub(super) fn upstream_closed(&mut self, pid: u32) {
        let (Some(up), Some(w)) = (&mut self.upstream, self.watches.0.get(&pid)) else { return };
        up.reported.remove(&pid);
        up.telemetry.send(Event::Closed { runtime: w.runtime_id() });
    }
}

impl ProcessWatch {
    /// Its runtime id at the telemetry intake.
    pub fn runtime_id(&self) -> uuid::Uuid {
        telemetry::runtime_id(self.process.pid, self.start_time, &self.process.object.path)
    }
}

/// The application `w` runs, from its environment and interpreter.
fn application(w: &ProcessWatch) -> Application {
    let version = w.process.analysis.version.to_string();
    Application {
        service_name: w.service.service.clone().unwrap_or_else(|| UNNAMED.into()),
        env: w.service.env.clone(),
        service_version: w.service.version.clone(),
        language_name: "python".into(),
        language_version: version.clone(),
        tracer_version: TRACER_VERSION.into(),
        runtime_name: "CPython".into(),
        runtime_version: version,
    }
}

/// Where a target was reached from when its caller is not known: its own
/// module and name, line 0, as the tracer reports it then.
fn fallback(target: &Target) -> Reached {
    Reached { path: target.module().to_owned(), symbol: target.qualname().to_owned(), line: 0 }
}

/// The id an advisory is reported under: its entry's, else its
/// vulnerability's.
fn report_id(a: &Advisory) -> Option<String> {
    a.id.clone().or_else(|| a.vulnerability.as_ref()?.id.clone())
}

/// The advisories a target's hit reaches: those whose dependency the
/// process has at a version they affect, as (dependency, version, id). A
/// version not known says nothing the backend could place.
fn reached(
    advisories: Option<&Vec<Advisory>>,
    installed: &BTreeMap<String, Installed>,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for a in advisories.into_iter().flatten() {
        let (Some(id), Some(dependency)) = (report_id(a), a.dependency.as_deref()) else { continue };
        let dependency = normalize(dependency);
        let Some(Installed::Found { version, .. }) = installed.get(&dependency) else { continue };
        if matches!(affected(&a.versions, version), Affected::Yes { .. }) {
            out.push((dependency, version.clone(), id));
        }
    }
    out
}

/// The catalog's dependencies found in a process, each with the advisories
/// its version is affected by.
fn found(advisories: &BTreeMap<Target, Vec<Advisory>>, installed: &BTreeMap<String, Installed>) -> Vec<Found> {
    let mut by_name: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for a in advisories.values().flatten() {
        let Some(name) = a.dependency.as_deref().map(normalize) else { continue };
        let Some(Installed::Found { version, .. }) = installed.get(&name) else { continue };
        let (_, ids) = by_name.entry(name).or_insert_with(|| (version.clone(), BTreeSet::new()));
        if let (Some(id), Affected::Yes { .. }) = (report_id(a), affected(&a.versions, version)) {
            ids.insert(id);
        }
    }
    let found = by_name.into_iter().map(|(name, (version, ids))| Found {
        name,
        version,
        advisories: ids.into_iter().collect(),
    });
    found.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advisory(id: &str, dependency: &str, versions: &[&str]) -> Advisory {
        Advisory {
            id: Some(id.into()),
            dependency: Some(dependency.into()),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_dependency_lists_the_advisories_its_version_is_affected_by() {
        let mut advisories = BTreeMap::new();
        let t = |s: &str| Target::parse(s).unwrap();
        advisories.insert(t("six:a"), vec![advisory("old", "Six", &["<1.17"]), advisory("new", "six", &[">=1.17"])]);
        advisories.insert(t("six:b"), vec![advisory("old", "six", &["<1.17"])]);
        advisories.insert(t("gone:c"), vec![advisory("x", "gone", &["<1"])]);
        let installed: BTreeMap<String, Installed> = [
            ("six".to_string(), Installed::Found { version: "1.16.0".into(), metadata: "/m".into() }),
            ("gone".to_string(), Installed::Missing),
        ]
        .into();
        let f = found(&advisories, &installed);
        assert_eq!(f, [Found { name: "six".into(), version: "1.16.0".into(), advisories: vec!["old".into()] }]);
        // A hit reaches only the advisory its version is affected by.
        let hit = reached(advisories.get(&t("six:a")), &installed);
        assert_eq!(hit, [("six".to_string(), "1.16.0".to_string(), "old".to_string())]);
        assert!(reached(advisories.get(&t("gone:c")), &installed).is_empty(), "not installed: nothing to place");
    }
}
