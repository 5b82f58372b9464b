//! Where targets come from: Remote Configuration, payload files (the
//! embedded default among them) and `--target` flags. Each source publishes
//! its configs; the active target set is the union of every config that
//! parsed, and each target remembers which configs name it.

pub mod affected;
pub mod catalog;
pub mod file;
pub mod payload;

use std::collections::{BTreeMap, BTreeSet};

use crate::targets::Target;
use catalog::{Advisory, Catalog};

/// Where a config comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Datadog Remote Configuration, product `SCA_DETECTION`.
    RemoteConfig,
    /// A payload file (or the embedded default).
    File,
    /// `--target` flags.
    Flags,
}

/// A config: a named set of targets, or why it was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Its source.
    pub origin: Origin,
    /// Its name: the RC path, the file path, or `--target`.
    pub name: String,
    /// Its version, where the source has one (RC `custom.v`).
    pub version: Option<u64>,
    /// What it says, or the error that rejected it (it then adds nothing).
    pub targets: Result<Catalog, String>,
}

/// Every config of one origin, replacing what it had before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The origin.
    pub origin: Origin,
    /// All its configs now.
    pub configs: Vec<Config>,
}

/// An update on its way to the agent loop, with where to say whether the
/// kernel took its targets: Remote Configuration acknowledges a config only
/// once it is applied.
#[derive(Debug)]
pub struct Delivery {
    /// The update.
    pub update: Update,
    /// Told whether its targets are applied, or why not.
    pub applied: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl From<Update> for Delivery {
    fn from(update: Update) -> Self {
        Delivery { update, applied: None }
    }
}

/// Every config from every source.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    configs: BTreeMap<(Origin, String), Config>,
}

impl Sources {
    /// Replaces one origin's configs; returns whether anything changed.
    pub fn apply(&mut self, update: Update) -> bool {
        let before: Vec<&Config> = self.configs.values().filter(|c| c.origin == update.origin).collect();
        let unchanged = before.len() == update.configs.len() && update.configs.iter().all(|c| before.contains(&c));
        if unchanged {
            return false;
        }
        self.configs.retain(|(o, _), _| *o != update.origin);
        for c in update.configs {
            self.configs.insert((c.origin, c.name.clone()), c);
        }
        true
    }

    /// Every config, ordered by origin and name.
    pub fn configs(&self) -> impl Iterator<Item = &Config> {
        self.configs.values()
    }

    /// The active targets, each with the names of the configs that name it.
    pub fn effective(&self) -> BTreeMap<Target, BTreeSet<String>> {
        let mut out: BTreeMap<Target, BTreeSet<String>> = BTreeMap::new();
        for c in self.configs.values() {
            for t in c.targets.iter().flat_map(|c| &c.targets) {
                out.entry(t.clone()).or_default().insert(c.name.clone());
            }
        }
        out
    }

    /// The advisories naming each active target, over every config, each
    /// once.
    pub fn advisories(&self) -> BTreeMap<Target, Vec<Advisory>> {
        let mut out: BTreeMap<Target, Vec<Advisory>> = BTreeMap::new();
        for (t, advisories) in self.configs.values().filter_map(|c| c.targets.as_ref().ok()).flat_map(|c| &c.advisories)
        {
            let all = out.entry(t.clone()).or_default();
            for a in advisories {
                if !all.contains(a) {
                    all.push(a.clone());
                }
            }
        }
        out
    }

    /// The active targets some config names with no advisory: watched
    /// whatever a process's versions (the active set is the union).
    pub fn unconditional(&self) -> BTreeSet<Target> {
        let catalogs = self.configs.values().filter_map(|c| c.targets.as_ref().ok());
        let bare = catalogs.flat_map(|c| c.targets.iter().filter(|t| c.advisories.get(*t).is_none_or(Vec::is_empty)));
        bare.cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(origin: Origin, name: &str, targets: &[&str]) -> Config {
        Config {
            origin,
            name: name.into(),
            version: None,
            targets: Ok(Catalog::of(targets.iter().map(|t| Target::parse(t).unwrap()).collect())),
        }
    }

    #[test]
    fn the_active_set_is_the_union_and_removal_keeps_shared_targets() {
        let mut s = Sources::default();
        assert!(s.apply(Update {
            origin: Origin::RemoteConfig,
            configs: vec![cfg(Origin::RemoteConfig, "a", &["m:f", "m:g"]), cfg(Origin::RemoteConfig, "b", &["m:g"])],
        }));
        assert!(s.apply(Update { origin: Origin::Flags, configs: vec![cfg(Origin::Flags, "--target", &["m:h"])] }));
        let names: Vec<String> = s.effective().keys().map(ToString::to_string).collect();
        assert_eq!(names, ["m:f", "m:g", "m:h"]);
        // Config a goes: m:g stays (b names it), m:f goes.
        assert!(
            s.apply(Update { origin: Origin::RemoteConfig, configs: vec![cfg(Origin::RemoteConfig, "b", &["m:g"])] })
        );
        let e = s.effective();
        let names: Vec<String> = e.keys().map(ToString::to_string).collect();
        assert_eq!(names, ["m:g", "m:h"]);
        assert_eq!(e[&Target::parse("m:g").unwrap()], BTreeSet::from(["b".to_owned()]));
        // The same again: no change.
        assert!(
            !s.apply(Update { origin: Origin::RemoteConfig, configs: vec![cfg(Origin::RemoteConfig, "b", &["m:g"])] })
        );
    }

    #[test]
    fn a_rejected_config_adds_nothing_and_others_keep_working() {
        let mut s = Sources::default();
        let bad = Config {
            origin: Origin::File,
            name: "bad.json".into(),
            version: None,
            targets: Err("invalid JSON".into()),
        };
        s.apply(Update { origin: Origin::File, configs: vec![bad, cfg(Origin::File, "good.json", &["m:f"])] });
        assert_eq!(s.effective().len(), 1);
        assert_eq!(s.configs().count(), 2);
    }

    #[test]
    fn a_target_some_config_names_without_an_advisory_is_unconditional() {
        let mut s = Sources::default();
        let catalog = payload::parse(
            br#"{"targets": [{"id": "v", "targets": ["m:f", "m:g"], "dependency_name": "m", "package_versions": ["<2"]}]}"#,
        )
        .unwrap();
        let rc = Config { origin: Origin::RemoteConfig, name: "rc".into(), version: None, targets: Ok(catalog) };
        s.apply(Update { origin: Origin::RemoteConfig, configs: vec![rc] });
        assert!(s.unconditional().is_empty());
        s.apply(Update { origin: Origin::File, configs: vec![cfg(Origin::File, "plain.json", &["m:g"])] });
        assert_eq!(s.unconditional(), BTreeSet::from([Target::parse("m:g").unwrap()]));
        assert_eq!(s.advisories().len(), 2);
    }
}
