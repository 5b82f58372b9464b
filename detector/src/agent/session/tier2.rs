//! A watched process whose tier-2 optimizer starts (its JIT is on, whether
//! by its build's default, `PYTHON_JIT`, or an embedder): from its first
//! compiled trace on, calls that run in compiled code pass no RESUME
//! handler and read no bytecode. It is not counted short in silence: every
//! probe goes, its counts so far stand, and it is reported blind, with why.
//! So is a child it forks afterwards, which runs the code compiled there.

use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Session, walking::Announce};
use crate::agent::ProcessWatch;

/// How often the kernel's marks of an optimizer's start are looked for,
/// behind the records that announce them: a full ring buffer loses a
/// record, never a mark.
pub(super) const TIER2_CHECK: Duration = Duration::from_secs(1);

impl Session {
    /// Processes the kernel marked as having entered the tier-2 optimizer
    /// that are not blind yet.
    pub(super) fn tier2_marks(&mut self) {
        self.tier2_checked = Instant::now();
        let unseen = self.watches.0.iter().filter(|(_, w)| w.tier2_probed() && w.blindness().is_none());
        let marked: Vec<u32> = unseen.map(|(&pid, _)| pid).filter(|&pid| self.probes.tier2_marked(pid)).collect();
        for pid in marked {
            self.tier2_started(pid, None);
        }
    }

    /// Why `child`, forked from `parent`, is blind from its attach: its
    /// parent's JIT had started, and the child runs the code compiled there
    /// (its optimizer may never run again, having compiled its loops).
    pub(super) fn inherited_blindness(&self, parent: u32, child: &ProcessWatch) -> Option<String> {
        let parent = self.watches.0.get(&parent)?;
        parent.blindness()?;
        let same =
            (&parent.process.object.path, parent.process.bias) == (&child.process.object.path, child.process.bias);
        same.then(|| {
            format!(
                "forked from {}, whose tier-2 optimizer had started (the JIT is on): it runs the code compiled \
                 there, which passes no RESUME handler and reads no bytecode, so it cannot be counted",
                parent.process.pid
            )
        })
    }

    /// `pid` (thread `tid`, if the record said) entered the tier-2 optimizer.
    pub(super) fn tier2_started(&mut self, pid: u32, tid: Option<u32>) {
        let on = tid.map(|t| format!(" on thread {t}")).unwrap_or_default();
        let why = format!(
            "its tier-2 optimizer started{on} (the JIT is on): calls that run in code it compiles pass no \
             RESUME handler and read no bytecode, so they cannot be counted; counting stopped and the counts \
             so far stand (run it with PYTHON_JIT=0 to have it counted)"
        );
        self.go_blind(pid, why);
    }

    /// Detaches `pid` for good, for `why`, keeping its counts, and says so.
    pub(super) fn go_blind(&mut self, pid: u32, why: String) {
        let Some(w) = self.watches.0.get_mut(&pid) else {
            debug!(pid, "the tier-2 optimizer started in a process no longer watched");
            return;
        };
        let strategy = w.mode();
        if !w.blind(&mut self.probes, why.clone()) {
            return;
        }
        let (binary, version) = (&w.process.object.path, &w.process.analysis.version);
        warn!(pid, binary = %binary, %version, strategy, reason = %why, "a watched process runs code its JIT compiled: no longer counted, detached");
        // Nothing is looked for any more; what was attached is said first.
        self.walker.forget(pid);
        if let Some((Announce::Attached(ran_before), _)) = self.announcing.remove(&pid) {
            self.announce(pid, ran_before);
        }
        self.printer.strategy(pid, "blind", &why);
    }
}
