//! Reachability's reports beyond first hits: reaches seen from warm-up
//! marks, and the sampled call rates of reached targets.

use std::time::{Duration, Instant};

use tracing::warn;

use super::Session;
use crate::events::monotonic_ns;

impl Session {
    /// Reports reaches seen from warm-up marks: (process, target, code).
    pub(super) fn report_marked(&mut self, marked: Vec<(u32, u32, u64)>) {
        if marked.is_empty() {
            return;
        }
        let ts_ns = monotonic_ns();
        let mut hits = Vec::new();
        for (pid, id, code) in marked {
            let Some(target) = self.targets.get(id) else { continue };
            // A reach in the counts too, unless the kernel counted one.
            if let Err(e) = self.probes.note_reached(pid, id) {
                warn!(pid, target = %target, error = %e, "cannot record a reach seen from a warm-up mark");
            }
            hits.push(self.processor.marked_hit(pid, target, code, ts_ns, &self.watches));
        }
        self.report(hits);
    }

    /// Opens and closes reachability's sampling windows; prints what closed.
    pub(super) fn sample(&mut self, every: Duration) {
        let now = Instant::now();
        for (&pid, w) in self.watches.0.iter_mut() {
            for s in w.sample(&mut self.probes, &self.targets, now, every) {
                if let Some(target) = self.targets.get(s.target) {
                    self.printer.sample(pid, target, s.calls, s.secs);
                }
            }
        }
    }
}
