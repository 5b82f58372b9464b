//! The command line. Typed errors from the library become one-line messages
//! here, at the edge.

pub mod dump;
pub mod inspect;
pub mod run;
pub mod sources;
pub mod targets;

use clap::{Parser, Subcommand};

/// Out-of-process function-hit detector for CPython.
///
/// Attaches eBPF uprobes to a Python interpreter's frame-evaluation code and
/// reports each start of the target functions, counted exactly in the
/// kernel. Nothing in the watched process changes: no restart, no library,
/// no code injection. Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE).
///
/// Targets are `package.module:Qual.name`, e.g. `requests.sessions:Session.send`
/// or `pkg.mod:outer.<locals>.inner`.
#[derive(Debug, Parser)]
#[command(name = "detector", version, propagate_version = true)]
pub struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace),
    /// or a `tracing` filter such as `detector=debug`. `RUST_LOG` also works.
    #[arg(long, global = true, default_value = "warn", value_name = "FILTER")]
    pub log_level: String,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line, with pid, binary and target as fields.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch one Python process and print every start of the target functions,
    /// then exact per-target counts.
    ///
    /// Either attach to a running process (`--pid`), or start a command and
    /// watch it from its first Python call (`-- COMMAND ARGS...`; wrappers such
    /// as pyenv shims that exec Python are followed). Stops on SIGINT, SIGTERM,
    /// `--duration`, or when the process exits, and then prints one summary per
    /// target (zero included) and the kernel's counters, ring-buffer drops
    /// among them.
    ///
    /// With no --target, dump connects to the agent running on this node
    /// (`detector run`, through its tap socket) and prints its live hits, in
    /// the same JSON; several dumps may read at once.
    ///
    /// Example: detector dump --target json.decoder:JSONDecoder.decode --format json -- python3 -c 'import json; json.loads("{}")'
    /// Example: kubectl exec -n datadog ds/detector -- detector dump --format json
    Dump(dump::DumpArgs),
    /// The node agent: discover the node's Python processes, watch those that
    /// opted in, take targets from Remote Configuration, payload files and
    /// flags, follow them live, and report hits.
    ///
    /// Off unless DD_SCA_DETECTION_ENABLED is true (or 1): then it says so
    /// and attaches nothing. A process opts in with DD_APPSEC_SCA_ENABLED=true
    /// in its environment (or --attach-all); its DD_SERVICE, DD_ENV and
    /// DD_VERSION are carried on its hits. New processes are seen at exec
    /// (and their forks); /proc is rescanned as a safety net. With --pid or a
    /// command, only those are watched and run ends when they exit. Targets
    /// that stay keep their counts; new ones match from the next call; removed
    /// ones stop. Counts are per agent run. Every option can also be set
    /// through the environment variable shown.
    ///
    /// Example: DD_SCA_DETECTION_ENABLED=true detector run --targets builtin --metrics-addr 0.0.0.0:9187
    Run(run::RunArgs),
    /// Print the effective targets and which config each comes from, with
    /// every config's state, from the same sources as `run`.
    Targets(targets::TargetsArgs),
    /// Print what the detector knows about an interpreter: version, build,
    /// symbols, struct offsets and probe sites with their sources, or the
    /// precise reason it refuses to probe it.
    Inspect(inspect::InspectArgs),
    /// Benchmark support (`cargo xtask bench`): attach an empty program at
    /// the detector's sites in one process until SIGINT or SIGTERM.
    #[command(hide = true)]
    BenchFloor {
        /// Process.
        #[arg(long)]
        pid: u32,
    },
    /// Benchmark support: measure what a probe pass costs on this machine
    /// (as `run` does for its overhead budget) and print it as JSON.
    #[command(hide = true)]
    Calibrate,
}

/// Fails with a clear message unless this process may load eBPF programs,
/// open perf events and read other processes' memory.
pub fn require_privileges() -> anyhow::Result<()> {
    crate::privileges::require().map_err(anyhow::Error::msg)
}
