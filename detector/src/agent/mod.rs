//! Attaching to processes: per process, the probe sites of its interpreter,
//! scoped to that process so others pay nothing.

mod attach;
pub(crate) mod budget;
pub mod callers;
pub(crate) mod discovery;
pub mod exposure;
mod fork;
mod mode;
pub(crate) mod node;
mod process;
pub mod report;
pub(crate) mod sampling;
pub(crate) mod session;
pub(crate) mod spawn;
pub(crate) mod tenant;
pub(crate) mod walker;
pub(crate) mod walks;
pub(crate) mod watchpoints;

pub(crate) use process::ProcessWatch;
pub(crate) use session::Session;

use crate::{bpf::BpfError, pyproc::ProcessError};

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Reading the process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The kernel refused.
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// How a process's targets are watched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// The cheapest exact strategy for the process and targets at hand:
    /// watch where it applies, per-call elsewhere.
    #[default]
    Auto,
    /// Uprobes at the interpreter's per-call sites: every Python call pays
    /// about a microsecond; exact on every build.
    PerCall,
    /// A hardware watchpoint on each target's body start: calls of other
    /// functions pass no probe, a target's call costs tens of microseconds.
    /// Targets whose module is not imported yet cost nothing until it is.
    /// More than four body starts share the debug registers over time under
    /// reachability; counting exactly, they are probed per call. Falls back
    /// to per-call, saying why, when it cannot apply.
    Watch,
}

impl Strategy {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::PerCall => "per-call",
            Strategy::Watch => "watch",
        }
    }
}
