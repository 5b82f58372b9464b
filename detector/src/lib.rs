//! `detector`: finds CPython processes, locates their interpreter's
//! frame-evaluation code, and attaches eBPF probes that count calls of target
//! functions by qualified name, from outside the process.
//!
//! Layers, bottom up:
//! - [`interp`]: analysis of an interpreter binary (no process state);
//! - [`pyproc`]: reading a live Python process (maps, memory, threads, objects);
//! - [`targets`]: the target grammar;
//! - [`rc`], [`sources`]: where targets come from (Remote Configuration,
//!   payload files, flags);
//! - [`bpf`]: the loaded eBPF object, its maps and probe links;
//! - [`agent`]: attaching to processes;
//! - [`events`]: turning ring-buffer records into hits;
//! - [`telemetry`]: reporting findings to Datadog as the tracers do;
//! - [`cli`]: the command line.

pub mod agent;
pub(crate) mod bpf;
pub mod cli;
pub(crate) mod confine;
pub(crate) mod events;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod interp;
pub(crate) mod listen;
pub(crate) mod metrics;
pub(crate) mod privileges;
pub(crate) mod pyproc;
pub(crate) mod rc;
pub(crate) mod sources;
pub(crate) mod tap;
pub(crate) mod targets;
pub mod telemetry;

/// An error and its causes on one line: the useful part (`reqwest`'s
/// "connection refused", the kernel's errno under a probe error) is often
/// in the sources.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
