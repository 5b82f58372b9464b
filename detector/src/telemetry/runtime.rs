//! What each runtime (a watched process) has to tell the intake, kept as
//! state rather than as queued messages: an intake that is down for an
//! hour costs no more memory than one that is up, and when it is back each
//! runtime sends what changed, once.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::wire::{Application, Dependencies, Dependency, Empty, Metadata, Payload, Reached};

/// The most advisories registered per dependency (the tracer's limit).
pub(crate) const MAX_METADATA: usize = 100;

/// A catalog dependency of a runtime as it is reported: its version and
/// the advisories of the catalog that apply to that version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// Distribution name, normalized.
    pub name: String,
    /// Version installed.
    pub version: String,
    /// Ids of the advisories whose versions include it.
    pub advisories: Vec<String>,
}

/// One dependency's state: its version, and each advisory with where it was
/// first reached (the first hit wins).
#[derive(Debug, Default)]
struct Dep {
    version: String,
    advisories: BTreeMap<String, Option<Reached>>,
    /// Bumped at each change, so that a send acknowledged after a later
    /// change does not clear it.
    changes: u64,
}

/// What one request of a runtime carried, applied once the intake took it.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    started: bool,
    deps: Vec<(String, u64)>,
    heartbeat: bool,
    closing: bool,
}

/// A runtime's state.
#[derive(Debug)]
pub(crate) struct Runtime {
    /// Its application, once the process is announced.
    pub application: Option<Application>,
    /// Its last `seq_id`.
    pub seq: u64,
    /// Its process started before this agent: advisories are registered
    /// only once reached, so that a reach reported by a previous instance
    /// is never followed by an empty registration.
    adopted: bool,
    started: bool,
    deps: BTreeMap<String, Dep>,
    /// Dependencies to send, with the change they were at.
    dirty: BTreeMap<String, u64>,
    closed: bool,
    closing_sent: bool,
    next_heartbeat: Option<Instant>,
    /// When it was closed, for evicting the oldest first.
    pub closed_at: Option<Instant>,
}

impl Runtime {
    /// A runtime of which nothing is known yet.
    pub fn new() -> Self {
        Runtime {
            application: None,
            seq: 0,
            adopted: false,
            started: false,
            deps: BTreeMap::new(),
            dirty: BTreeMap::new(),
            closed: false,
            closing_sent: false,
            next_heartbeat: None,
            closed_at: None,
        }
    }

    /// The process was announced. An adopted runtime's `seq_id`s start
    /// from the clock (in milliseconds), past those a previous agent sent
    /// for it.
    pub fn start(&mut self, application: Application, adopted: bool) {
        self.application = Some(application);
        self.adopted = adopted;
        if adopted {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            self.seq = now.map(|d| d.as_millis() as u64).unwrap_or(0);
        }
    }

    /// Its catalog dependencies as last read: a new version or a newly
    /// applying advisory is to be sent. Returns the registrations dropped
    /// by the cap.
    pub fn dependencies(&mut self, found: Vec<Found>) -> u64 {
        let mut dropped = 0;
        for f in found {
            let dep = self.deps.entry(f.name.clone()).or_default();
            let mut changed = dep.version != f.version;
            dep.version = f.version;
            for id in f.advisories {
                if dep.advisories.contains_key(&id) {
                    continue;
                }
                if dep.advisories.len() >= MAX_METADATA {
                    dropped += 1;
                    continue;
                }
                dep.advisories.insert(id, None);
                changed |= !self.adopted;
            }
            if changed {
                self.changed(&f.name);
            }
        }
        dropped
    }

    /// Advisory `id` of `dependency` (at `version`, if known) was reached:
    /// the first reach is kept. Returns whether it was new (false too when
    /// the dependency has no room for another advisory).
    pub fn reached(&mut self, dependency: &str, version: Option<&str>, id: &str, at: Reached) -> bool {
        let dep = self.deps.entry(dependency.to_owned()).or_default();
        if let Some(v) = version.filter(|_| dep.version.is_empty()) {
            dep.version = v.to_owned();
        }
        if dep.advisories.len() >= MAX_METADATA && !dep.advisories.contains_key(id) {
            return false;
        }
        match dep.advisories.entry(id.to_owned()).or_default() {
            slot @ None => *slot = Some(at),
            Some(_) => return false,
        }
        self.changed(dependency);
        true
    }

    /// Whether `dependency` holds as many advisories as it may.
    pub fn full(&self, dependency: &str) -> bool {
        self.deps.get(dependency).is_some_and(|d| d.advisories.len() >= MAX_METADATA)
    }

    fn changed(&mut self, dependency: &str) {
        let dep = self.deps.get_mut(dependency).expect("changed a dependency it has");
        dep.changes += 1;
        self.dirty.insert(dependency.to_owned(), dep.changes);
    }

    /// The process ended.
    pub fn close(&mut self, now: Instant) {
        self.closed = true;
        self.closed_at.get_or_insert(now);
    }

    /// Whether everything it had to say was sent, to its end.
    pub fn done(&self) -> bool {
        self.closing_sent && self.dirty.is_empty()
    }

    /// Whether anything is to be sent now: [`Runtime::due`] without
    /// building it (asked of every runtime each second).
    pub fn is_due(&self, now: Instant) -> bool {
        self.application.is_some()
            && (!self.started
                || !self.dirty.is_empty()
                || (self.closed && !self.closing_sent)
                || (!self.closed && self.next_heartbeat.is_some_and(|t| now >= t)))
    }

    /// What to send now, if anything (`app-started` alone first, then the
    /// rest batched), and what it covers.
    pub fn due(&self, now: Instant) -> Option<(Payload, Sent)> {
        self.application.as_ref()?;
        if !self.started {
            return Some((Payload::AppStarted(Default::default()), Sent { started: true, ..Sent::default() }));
        }
        let mut items = Vec::new();
        let mut sent = Sent::default();
        if !self.dirty.is_empty() {
            let dependencies = self.dirty.keys().filter_map(|name| Some(self.dependency(name, self.deps.get(name)?)));
            items.push(Payload::AppDependenciesLoaded(Dependencies { dependencies: dependencies.collect() }));
            sent.deps = self.dirty.iter().map(|(n, c)| (n.clone(), *c)).collect();
        }
        if self.closed && !self.closing_sent {
            items.push(Payload::AppClosing(Empty {}));
            sent.closing = true;
        } else if self.next_heartbeat.is_some_and(|t| now >= t) {
            items.push(Payload::AppHeartbeat(Empty {}));
            sent.heartbeat = true;
        }
        let payload = match items.len() {
            0 => return None,
            1 => items.pop()?,
            _ => Payload::MessageBatch(items),
        };
        Some((payload, sent))
    }

    fn dependency(&self, name: &str, dep: &Dep) -> Dependency {
        let metadata = dep.advisories.iter().filter(|(_, r)| r.is_some() || !self.adopted);
        Dependency {
            name: name.to_owned(),
            version: dep.version.clone(),
            metadata: metadata.map(|(id, r)| Metadata::reachability(id, r.as_ref())).collect(),
        }
    }

    /// The intake took what `sent` covers; the next heartbeat is due
    /// `heartbeat` after it.
    pub fn sent(&mut self, sent: Sent, now: Instant, heartbeat: Duration) {
        self.started |= sent.started;
        for (name, at) in sent.deps {
            if self.dirty.get(&name) == Some(&at) {
                self.dirty.remove(&name);
            }
        }
        if sent.started || sent.heartbeat {
            self.next_heartbeat = Some(now + heartbeat);
        }
        self.closing_sent |= sent.closing;
    }

    /// The advisories it registered per dependency (for tests and logs).
    #[cfg(test)]
    fn registered(&self) -> BTreeMap<&str, std::collections::BTreeSet<&str>> {
        self.deps.iter().map(|(n, d)| (n.as_str(), d.advisories.keys().map(String::as_str).collect())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Application {
        Application {
            service_name: "svc".into(),
            env: None,
            service_version: None,
            language_name: "python".into(),
            language_version: "3.12.1".into(),
            tracer_version: "detector/0".into(),
            runtime_name: "CPython".into(),
            runtime_version: "3.12.1".into(),
        }
    }

    fn six(advisories: &[&str]) -> Vec<Found> {
        vec![Found {
            name: "six".into(),
            version: "1.16.0".into(),
            advisories: advisories.iter().map(|a| a.to_string()).collect(),
        }]
    }

    fn at() -> Reached {
        Reached { path: "app.py".into(), symbol: "main".into(), line: 3 }
    }

    /// Sends what is due and acknowledges it; returns it.
    fn send(r: &mut Runtime, now: Instant) -> Option<Payload> {
        assert_eq!(r.is_due(now), r.due(now).is_some(), "is_due agrees with due");
        let (p, sent) = r.due(now)?;
        r.sent(sent, now, Duration::from_secs(60));
        Some(p)
    }

    fn deps_of(p: &Payload) -> Vec<Dependency> {
        match p {
            Payload::AppDependenciesLoaded(d) => d.dependencies.clone(),
            Payload::MessageBatch(items) => items.iter().flat_map(deps_of).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn started_first_then_dependencies_with_every_advisory_registered() {
        let now = Instant::now();
        let mut r = Runtime::new();
        r.dependencies(six(&["a", "b"]));
        assert!(r.due(now).is_none(), "nothing before the process is announced");
        r.start(app(), false);
        assert_eq!(send(&mut r, now), Some(Payload::AppStarted(Default::default())));
        let deps = deps_of(&send(&mut r, now).unwrap());
        assert_eq!(deps.len(), 1);
        let reach: Vec<_> = deps[0].metadata.iter().filter_map(Metadata::as_reachability).collect();
        assert_eq!(reach.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(reach.iter().all(|m| m.reached.is_empty()));
        assert!(send(&mut r, now).is_none(), "sent once");
        assert!(matches!(send(&mut r, now + Duration::from_secs(61)), Some(Payload::AppHeartbeat(_))));
    }

    #[test]
    fn the_first_reach_wins_and_the_dependency_is_sent_again_whole() {
        let now = Instant::now();
        let mut r = Runtime::new();
        r.start(app(), false);
        r.dependencies(six(&["a", "b"]));
        send(&mut r, now);
        send(&mut r, now);
        assert!(r.reached("six", None, "a", at()));
        let later = Reached { line: 9, ..at() };
        assert!(!r.reached("six", None, "a", later), "the first hit wins");
        let deps = deps_of(&send(&mut r, now).unwrap());
        let reach: Vec<_> = deps[0].metadata.iter().filter_map(Metadata::as_reachability).collect();
        assert_eq!(reach.len(), 2, "all of its metadata: {reach:?}");
        assert_eq!(reach[0].reached, [at()]);
        assert!(reach[1].reached.is_empty());
    }

    #[test]
    fn a_change_while_a_send_is_on_its_way_is_sent_after_it() {
        let now = Instant::now();
        let mut r = Runtime::new();
        r.start(app(), false);
        send(&mut r, now);
        r.dependencies(six(&["a"]));
        let (_, sent) = r.due(now).unwrap();
        r.reached("six", None, "a", at());
        r.close(now);
        r.sent(sent, now, Duration::from_secs(60));
        assert!(!r.done(), "the reach is still to be sent");
        let last = send(&mut r, now).unwrap();
        assert_eq!(deps_of(&last)[0].metadata, [Metadata::reachability("a", Some(&at()))]);
        assert!(matches!(last, Payload::MessageBatch(ref items) if matches!(items[1], Payload::AppClosing(_))));
        assert!(r.done());
        assert!(send(&mut r, now).is_none(), "closed once");
    }

    #[test]
    fn an_adopted_runtime_reports_reaches_only() {
        let now = Instant::now();
        let mut r = Runtime::new();
        r.start(app(), true);
        r.dependencies(six(&["a"]));
        send(&mut r, now);
        let deps = deps_of(&send(&mut r, now).unwrap());
        assert!(deps[0].metadata.is_empty(), "{deps:?}");
        r.reached("six", None, "a", at());
        assert_eq!(deps_of(&send(&mut r, now).unwrap())[0].metadata.len(), 1);
    }

    #[test]
    fn registrations_are_capped() {
        let mut r = Runtime::new();
        let ids: Vec<String> = (0..MAX_METADATA + 5).map(|i| format!("a{i}")).collect();
        let found = vec![Found { name: "six".into(), version: "1".into(), advisories: ids }];
        assert_eq!(r.dependencies(found), 5);
        assert_eq!(r.registered()["six"].len(), MAX_METADATA);
        assert!(!r.reached("six", None, "other", at()), "no room for another");
        assert_eq!(r.registered()["six"].len(), MAX_METADATA, "nor kept");
    }
}
