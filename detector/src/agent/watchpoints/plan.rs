//! What watching some targets of a process takes, found before anything is
//! armed.

use std::collections::BTreeMap;

use super::{CannotWatch, DEBUG_REGISTERS, Fit, dispatch_of};
use crate::{
    pyproc::{
        PythonProcess,
        body::{self, BodyStart, Found},
    },
    targets::Target,
};

/// What watching `targets` in `p` would take: each found target's body
/// starts, with the target's id, and the targets not found yet; or why
/// watchpoints cannot apply (the per-call strategy is then used for all).
pub fn plan<'a, Id: Copy + Ord>(
    p: &PythonProcess,
    targets: impl IntoIterator<Item = (&'a Target, Id)>,
    fit: Fit,
) -> Result<Plan<Id>, CannotWatch> {
    dispatch_of(p)?;
    let mut plan = Plan { starts: Vec::new(), pending: BTreeMap::new() };
    let targets: Vec<(&Target, Id)> = targets.into_iter().collect();
    let ts: Vec<&Target> = targets.iter().map(|(t, _)| *t).collect();
    for ((t, id), found) in targets.into_iter().zip(body::find_all(p, &ts)?) {
        match found {
            Found::Code { starts } => plan.starts.extend(starts.into_iter().map(|s| (id, s))),
            Found::Nothing { reason, later: true } => {
                plan.pending.insert(id, reason);
            }
            Found::Nothing { reason, later: false } => {
                return Err(CannotWatch::Refused { target: t.to_string(), reason });
            }
        }
    }
    if fit == Fit::Registers && plan.starts.len() > DEBUG_REGISTERS {
        return Err(CannotWatch::TooMany(plan.starts.len()));
    }
    Ok(plan)
}

/// What watching some targets of a process takes.
pub struct Plan<Id> {
    /// Each found target's body starts, with the target's id.
    pub starts: Vec<(Id, BodyStart)>,
    /// Targets not found yet, and why.
    pub pending: BTreeMap<Id, String>,
}
