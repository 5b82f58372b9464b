//! How a watched process's targets are observed ([`Mode`]): probed per
//! call, under watchpoints, suspended, or blind. Each mode holds exactly the
//! kernel objects it attached, so leaving it closes exactly those.

use std::{collections::BTreeSet, time::Instant};

use detector_common::MODE_WATCH;
use tracing::{debug, info, warn};

use super::{
    AttachError, Strategy,
    attach::{self, PerCallLinks},
    process::Counting,
    watchpoints::{Armed, CannotWatch},
};
use crate::{bpf::Link, bpf::Probes, pyproc::PythonProcess, targets::TargetSet};

/// How a process's targets are observed now.
pub(crate) enum Mode {
    /// Uprobes at every per-call site of the interpreter.
    PerCall(PerCall),
    /// Hardware watchpoints on the targets' body starts.
    Watch(Watching),
    /// Over budget: only the guards attached until it is tried again.
    Suspended(Suspension),
    /// Its JIT started: calls may run in compiled code that neither
    /// strategy sees, so nothing is attached again; why, until it exits.
    Blind(String),
    /// Nothing attached any more (the process is gone, or the agent stops).
    Detached,
}

/// The per-call mode's probes.
pub(crate) struct PerCall {
    pub(super) links: PerCallLinks,
    pub(super) guards: Vec<Link>,
    /// Why watchpoints were not used, where they were wanted.
    pub(super) fallback: Option<String>,
}

/// The watch mode's watchpoints and probes.
pub(crate) struct Watching {
    pub(super) armed: Armed,
    pub(super) guards: Vec<Link>,
    /// The module-execution probe, attached while a target is pending.
    pub(super) imports: Vec<Link>,
}

/// Why and until when a process is suspended, and the guards it keeps: a
/// JIT that starts meanwhile is seen.
pub(crate) struct Suspension {
    pub(super) until: Instant,
    pub(super) why: String,
    pub(super) guards: Vec<Link>,
}

/// When the targets' body starts are armed.
#[derive(Clone, Copy)]
pub(super) enum Arming {
    /// Now, walking the process on the loop: a budget's switch, where the
    /// watchpoints must be armed before the per-call probes go.
    Now,
    /// Once a walk off the loop has found them: each is pending until then.
    Later,
}

impl Watching {
    /// Arms the unreached targets' body starts `when` asked, but those left
    /// `unwatched`; the caller has attached the guards.
    pub(super) fn arm(
        probes: &mut Probes,
        p: &PythonProcess,
        (targets, unwatched): (&TargetSet, &BTreeSet<u32>),
        counting: &Counting,
        guards: Vec<Link>,
        when: Arming,
    ) -> Result<Watching, (CannotWatch, Vec<Link>)> {
        let unreached = targets.iter().filter(|(_, id)| !counting.seen(*id) && !unwatched.contains(id));
        let armed = match when {
            Arming::Now => Armed::arm(probes, p, unreached, counting.fit()),
            Arming::Later => Armed::pending_all(probes, p, unreached, counting.fit()),
        };
        match armed {
            Ok(armed) => {
                let mut w = Watching { armed, guards, imports: Vec::new() };
                w.follow_imports(probes, p);
                Ok(w)
            }
            Err(e) => Err((e, guards)),
        }
    }

    /// Attaches the module-execution probe while a target is not reached
    /// (pending, or armed: an interpreter of its own, or a reload, may
    /// define it anew), and detaches it once every one is.
    pub(super) fn follow_imports(&mut self, probes: &mut Probes, p: &PythonProcess) {
        let pending = self.armed.follows_imports();
        if pending && self.imports.is_empty() {
            match attach::imports(probes, p) {
                Ok(links) => self.imports = links,
                Err(e) if !p.gone() => {
                    warn!(pid = p.pid, error = %format!("{e:#}"), "cannot follow imports: pending targets are found by the rescan only");
                }
                Err(_) => {}
            }
        } else if !pending && !self.imports.is_empty() {
            attach::detach_all(probes, std::mem::take(&mut self.imports));
            debug!(pid = p.pid, "every target reached: no longer following imports");
        }
    }

    /// Disarms everything and returns the guards.
    pub(super) fn close(mut self, probes: &mut Probes) -> Vec<Link> {
        self.armed.disarm(probes);
        attach::detach_all(probes, std::mem::take(&mut self.imports));
        self.guards
    }
}

/// Attaches `p` for `strategy`: the guards first (no verdict may outlive
/// its code object, no JIT may start unseen), unless it `kept` them, then
/// watchpoints where they apply, else the per-call probes. On failure
/// nothing stays attached.
pub(super) fn start(
    probes: &mut Probes,
    (p, kept): (&PythonProcess, Option<Vec<Link>>),
    (targets, unwatched): (&TargetSet, &BTreeSet<u32>),
    strategy: Strategy,
    counting: &Counting,
) -> Result<Mode, AttachError> {
    let guards = match kept {
        Some(guards) => guards,
        None => attach::guards(probes, p)?,
    };
    let (guards, fallback) = if strategy == Strategy::PerCall {
        (guards, None)
    } else {
        match Watching::arm(probes, p, (targets, unwatched), counting, guards, Arming::Later) {
            Ok(w) => {
                if let Err(e) = probes.set_mode(p.pid, MODE_WATCH) {
                    let links = w.close(probes);
                    attach::detach_all(probes, links);
                    return Err(e.into());
                }
                let pending = w.armed.pending().len();
                info!(pid = p.pid, binary = %p.object.path, units = w.armed.units(), threads = w.armed.threads, pending,
                    "watching process with hardware watchpoints");
                return Ok(Mode::Watch(w));
            }
            Err((e, guards)) => {
                info!(pid = p.pid, reason = %e, "watch strategy does not apply; probing every call");
                (guards, Some(e.to_string()))
            }
        }
    };
    match attach::per_call(probes, p, targets) {
        Ok(links) => Ok(Mode::PerCall(PerCall { links, guards, fallback })),
        Err(e) => {
            attach::detach_all(probes, guards);
            Err(e)
        }
    }
}
