//! Who called each target in a process: the kernel records the frames
//! above a target at its first hit, a walk reads them back off the loop,
//! and the hits that came meanwhile wait for it (a few, briefly) so that
//! the first one reported says who reached the target.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{ProcessWatch, walker::CallerAsk};
use crate::{events::Hit, targets::TargetSet};

pub use crate::pyproc::callers::Caller;

/// Hits of one target held while its caller is read; more are reported
/// without it.
pub(crate) const MAX_HELD: usize = 64;

/// Longest a target's hits wait for its caller: a walk starved by its
/// process's share gives up on it rather than hold hits for long.
pub(crate) const CALLER_WAIT: Duration = Duration::from_secs(2);

/// What is known of a target's caller in a process.
#[derive(Debug)]
pub(crate) enum CallerState {
    /// Being read since then, from these frames: the hits waiting for it.
    Reading(Instant, CallerAsk, Vec<Hit>),
    /// Read: the first caller of user code, if there is one.
    Known(Option<Caller>),
}

/// A hit to report now, with its target's caller if known, or none (held).
pub(crate) enum Held {
    /// Report it.
    Now(Hit, Option<Caller>),
    /// It waits for its caller.
    Waiting,
}

impl ProcessWatch {
    /// Holds `hit` while its target's caller is being read.
    pub(crate) fn hold(&mut self, hit: Hit, target: u32) -> Held {
        match self.callers.get_mut(&target) {
            Some(CallerState::Reading(_, _, held)) if held.len() < MAX_HELD => {
                held.push(hit);
                Held::Waiting
            }
            Some(CallerState::Known(caller)) => Held::Now(hit, caller.clone()),
            _ => Held::Now(hit, None),
        }
    }

    /// Starts reading a target's caller from `ask`, unless it is read or
    /// being read.
    pub(crate) fn start_reading_caller(&mut self, ask: &CallerAsk) -> bool {
        if self.callers.contains_key(&ask.target) {
            return false;
        }
        self.callers.insert(ask.target, CallerState::Reading(Instant::now(), ask.clone(), Vec::new()));
        true
    }

    /// The callers being read, from which frames.
    pub(crate) fn callers_reading(&self) -> Vec<CallerAsk> {
        let reading = self.callers.values().filter_map(|s| match s {
            CallerState::Reading(_, ask, _) => Some(ask.clone()),
            CallerState::Known(_) => None,
        });
        reading.collect()
    }

    /// `target`'s caller is read: the hits that waited for it.
    pub(crate) fn caller_read(&mut self, target: u32, caller: Option<Caller>) -> Vec<Hit> {
        match self.callers.insert(target, CallerState::Known(caller)) {
            Some(CallerState::Reading(_, _, held)) => held,
            _ => Vec::new(),
        }
    }

    /// Whether `target`'s caller is being read (its reach waits for it).
    pub(crate) fn reading_caller(&self, target: u32) -> bool {
        matches!(self.callers.get(&target), Some(CallerState::Reading(..)))
    }

    /// The hits still waiting for callers read since before `before` (all
    /// of them if `None`), those callers given up on.
    pub(crate) fn release_held(&mut self, before: Option<Instant>) -> Vec<Hit> {
        let mut out = Vec::new();
        for state in self.callers.values_mut() {
            if let CallerState::Reading(since, _, held) = state
                && before.is_none_or(|b| *since < b)
            {
                out.append(held);
                *state = CallerState::Known(None);
            }
        }
        out
    }

    /// The callers found, by target name.
    pub(crate) fn callers_report(&self, targets: &TargetSet) -> BTreeMap<String, Caller> {
        let known = self.callers.iter().filter_map(|(id, s)| match s {
            CallerState::Known(Some(c)) => Some((targets.get(*id)?.to_string(), c.clone())),
            _ => None,
        });
        known.collect()
    }
}
