//! The session's side of callers: frames the kernel recorded above targets
//! at their first hits are read back by a walk, once per process and
//! target, and the hits held meanwhile are reported with what it found.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tracing::info;

use super::Session;
use crate::{
    agent::{
        callers::{CALLER_WAIT, Caller},
        walker::{CallerAsk, Finding, Look, Walked},
    },
    events::{Hit, record::Callers},
    pyproc::callers,
};

impl Session {
    /// Frames recorded above targets at their first hits: a walk reads who
    /// called each, for each process and target once.
    pub(super) fn callers_recorded(&mut self, recorded: Vec<Callers>) {
        if recorded.is_empty() {
            return;
        }
        let mut asks: BTreeMap<u32, Vec<CallerAsk>> = BTreeMap::new();
        for c in recorded {
            let (Some(w), Some(target)) = (self.watches.0.get_mut(&c.pid), self.targets.get(c.target)) else {
                continue;
            };
            let module = target.module().to_owned();
            let ask = CallerAsk { target: c.target, module, code: c.code, frames: c.frames };
            if w.start_reading_caller(&ask) {
                asks.entry(c.pid).or_default().push(ask);
            }
        }
        for (pid, asks) in asks {
            let Some(w) = self.watches.0.get(&pid) else { continue };
            let targets: Vec<u32> = asks.iter().map(|a| a.target).collect();
            if self.walker.submit(w.walk(Look::Callers(asks), Arc::from(Vec::new()))).is_err() {
                for target in targets {
                    self.caller_known(pid, target, None);
                }
            }
        }
        self.start_walks();
    }

    /// Applies a walk that read callers.
    pub(super) fn callers_read(&mut self, walked: Walked) {
        let pid = walked.pid;
        let read = match (walked.finding, walked.look) {
            (Ok(Finding::Callers(read)), _) => read,
            (_, Look::Callers(asks)) => asks.iter().map(|a| (a.target, None)).collect(),
            _ => return,
        };
        for (target, caller) in read {
            if let Some(c) = &caller {
                let name = self.targets.get(target).map(ToString::to_string).unwrap_or_default();
                info!(pid, target = %name, path = %c.path, symbol = %c.symbol, line = c.line, "first called from");
            }
            self.caller_known(pid, target, caller);
        }
    }

    fn caller_known(&mut self, pid: u32, target: u32, caller: Option<Caller>) {
        let Some(w) = self.watches.0.get_mut(&pid) else { return };
        for hit in w.caller_read(target, caller.clone()) {
            self.hit_out(hit, caller.clone());
        }
    }

    /// At stop: reads here the callers still being read, until `until`, and
    /// reports the hits that waited for them.
    pub(super) fn callers_now(&mut self, until: Instant) {
        let reading: Vec<(u32, CallerAsk)> =
            self.watches.0.iter().flat_map(|(pid, w)| w.callers_reading().into_iter().map(|a| (*pid, a))).collect();
        for (pid, ask) in reading {
            let Some(w) = self.watches.0.get(&pid) else { continue };
            let caller = if Instant::now() < until {
                callers::first_user_caller(&w.process, &ask.module, ask.code, &ask.frames).ok().flatten()
            } else {
                None
            };
            self.caller_known(pid, ask.target, caller);
        }
    }

    /// Reports `pid`'s hits still waiting for their callers, without them.
    pub(super) fn release_held(&mut self, pid: u32) {
        let Some(w) = self.watches.0.get_mut(&pid) else { return };
        for hit in w.release_held(None) {
            self.hit_out(hit, None);
        }
    }

    /// Reports, without them, the hits that waited for their callers longer
    /// than they may (looked at every [`CALLER_WAIT`] at most).
    pub(super) fn release_overdue(&mut self) {
        let now = Instant::now();
        if self.callers_checked.is_some_and(|at| now < at + CALLER_WAIT) {
            return;
        }
        self.callers_checked = Some(now);
        let before = now.checked_sub(CALLER_WAIT);
        let overdue: Vec<Hit> = self.watches.0.values_mut().flat_map(|w| w.release_held(before)).collect();
        for hit in overdue {
            self.hit_out(hit, None);
        }
    }

    /// Prints a hit, with who called its target if known, and reports the
    /// reach upstream.
    pub(super) fn hit_out(&mut self, hit: Hit, caller: Option<Caller>) {
        let service = self.watches.service(hit.pid);
        tracing::debug!(
            pid = hit.pid,
            tid = hit.tid,
            target = %hit.target,
            service = service.and_then(|s| s.service.as_deref()).unwrap_or(""),
            "hit"
        );
        let advisories = self.advisories.get(&hit.target).map(Vec::as_slice).unwrap_or_default();
        let exposure = self.exposure_of(hit.pid, &hit.target);
        self.printer.hit(&hit, service, advisories, exposure.as_ref(), caller.as_ref());
        // Reported upstream once the caller is read (the first reach wins).
        let reading =
            self.targets.id(&hit.target).zip(self.watches.0.get(&hit.pid)).is_some_and(|(t, w)| w.reading_caller(t));
        if !reading {
            self.upstream_reached(&hit, caller);
        }
    }
}
