//! A forked child's calls before the agent attached it. Its probes did not
//! exist then, and uprobes and the agent's watchpoints are not inherited
//! into new processes (the kernel drops a parent's uprobe in a child at its
//! first hit). What the child ran is still written in its code objects'
//! warm-up marks, which it inherited from the parent as they were at the
//! fork: a mark the child changed while the parent's did not is a body the
//! child ran since the fork. Reachability reports those; exact counts
//! start at the attach.

use std::time::Instant;

use tracing::debug;

use super::{ProcessWatch, mode::Mode};
use crate::{
    pyproc::{PythonProcess, body, body::Found, mem::ProcessMemory, warmup},
    targets::TargetSet,
};

/// Targets, with their code objects, whose bodies `child` ran between its
/// fork from `parent` (at `forked` or before) and now (a child just
/// attached has reached none yet: every target is asked about).
pub(crate) fn runs_since_fork(
    child: &PythonProcess,
    parent: &ProcessWatch,
    forked: Instant,
    targets: &TargetSet,
) -> Vec<(u32, u64)> {
    match read(child, parent, forked, targets) {
        Ok(ran) => ran,
        Err(e) => {
            debug!(pid = child.pid, parent = parent.process.pid, error = %e, "reading the marks of a forked child");
            Vec::new()
        }
    }
}

fn read(
    child: &PythonProcess,
    parent: &ProcessWatch,
    forked: Instant,
    targets: &TargetSet,
) -> Result<Vec<(u32, u64)>, crate::pyproc::ProcessError> {
    let ids: Vec<(u32, &crate::targets::Target)> = targets.iter().map(|(t, id)| (id, t)).collect();
    let ts: Vec<&crate::targets::Target> = ids.iter().map(|(_, t)| *t).collect();
    let (child_mem, parent_mem) = (ProcessMemory::open(child.pid)?, ProcessMemory::open(parent.process.pid)?);
    let armed = match &parent.mode {
        Mode::Watch(w) => Some(&w.armed),
        _ => None,
    };
    let mut ran = Vec::new();
    for ((id, _), found) in ids.iter().zip(body::find_all(child, &ts)?) {
        let Found::Code { starts } = found else { continue };
        for s in starts {
            let Some((mark, _)) = warmup::Watched::start(child, &child_mem, &s)? else { continue };
            // The parent's mark of the same code (the child's memory is a
            // copy of the parent's from the fork).
            let Ok(parent_now) = mark.read(&parent_mem) else { continue };
            let shown = match armed.and_then(|a| a.mark_armed_before(s.code, s.unit_addr, forked)) {
                Some(parent_mark) => mark.ran_since_fork(parent_mark, &parent_now),
                None => mark.ran_since_fresh_fork(&parent_now),
            };
            if shown {
                ran.push((*id, s.code));
                break;
            }
        }
    }
    Ok(ran)
}
