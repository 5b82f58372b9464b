//! Harness for the integration tests: real interpreters, real kernel, and
//! the real `detector` binary (built by `cargo xtask test`, which passes its
//! path in `DETECTOR_BIN`). Nothing is mocked and nothing is skipped: a
//! missing interpreter or binary fails the test.

pub mod deploy;
pub mod dump;
pub mod fixture;
pub mod interpreters;
pub mod kernel_maps;
pub mod node_agent;
pub mod rc_agent;

use std::{path::PathBuf, time::Duration};

pub use dump::{Dump, Summary, run_reaching, spawn as spawn_detector, spawn_with_env, spawn_wrapped};
pub use fixture::{Fixture, pin};
pub use interpreters::{Build, Interpreter, builds, interpreters};
pub use node_agent::NodeAgent;
pub use rc_agent::TestAgent;

/// How long any single step (start, attach, run, stop) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The detector binary under test.
pub fn detector_bin() -> PathBuf {
    let p = std::env::var_os("DETECTOR_BIN")
        .map(PathBuf::from)
        .expect("DETECTOR_BIN is not set: run the integration tests with `cargo xtask test`");
    assert!(p.exists(), "DETECTOR_BIN {} does not exist", p.display());
    p
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// This crate's fixtures directory on the host.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The pyenv build of CPython 3.`minor`.
pub fn pyenv(minor: u8) -> Interpreter {
    interpreters().into_iter().find(|i| i.name.starts_with("pyenv") && i.minor == minor).expect("a pyenv build")
}

/// `pairs` as the environment a fixture is started with.
pub fn env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Runs `workload` on `interp` under `detector dump` attached by pid after
/// the workload's setup, and returns the summary once it has run.
pub fn run_attached(interp: &Interpreter, workload: &str, targets: &[&str]) -> Summary {
    let mut fixture = Fixture::start(interp, workload);
    let dump = Dump::attach(fixture.pid(), targets);
    fixture.go();
    fixture.wait_done();
    let summary = dump.stop();
    fixture.finish();
    summary
}

/// Runs `check` for every interpreter in parallel, reporting every failure
/// (not only the first) with the interpreter's name.
pub fn for_each_interpreter(check: impl Fn(&Interpreter) + Sync) {
    for_each_interpreter_at_most(usize::MAX, check)
}

/// As [`for_each_interpreter`], on those where hardware watchpoints apply:
/// not the free-threaded builds, whose threads each run their own copy of a
/// function's bytecode, and which are probed per call instead (the watch
/// tests' exact counts assert that fallback and its reason).
pub fn for_each_watchable_interpreter(check: impl Fn(&Interpreter) + Sync) {
    for_each_interpreter(|i| {
        if !i.free_threaded {
            check(i)
        }
    })
}

/// As [`for_each_interpreter`], `n` interpreters at a time: for checks
/// whose workload keeps a CPU busy and whose assertions depend on its pace
/// (all at once, on 2 cores, each would run at a fraction of its speed).
///
/// `DETECTOR_TEST_INTERPRETERS` (name prefixes, comma-separated) narrows
/// the interpreters while developing, e.g. `ft-,pyenv-3.13`.
pub fn for_each_interpreter_at_most(n: usize, check: impl Fn(&Interpreter) + Sync) {
    let only = std::env::var("DETECTOR_TEST_INTERPRETERS").unwrap_or_default();
    let wanted = |i: &Interpreter| only.is_empty() || only.split(',').any(|p| i.name.starts_with(p));
    let all: Vec<Interpreter> = interpreters().into_iter().filter(wanted).collect();
    assert!(!all.is_empty(), "DETECTOR_TEST_INTERPRETERS={only} names no interpreter");
    let mut failures = Vec::new();
    for group in all.chunks(n) {
        failures.extend(run_in_parallel(group, &check));
    }
    assert!(failures.is_empty(), "failed on {} interpreter(s):\n{}", failures.len(), failures.join("\n"));
}

/// Runs `check` for each of `interps` on a thread of its own; the failures.
fn run_in_parallel(interps: &[Interpreter], check: &(impl Fn(&Interpreter) + Sync)) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = interps.iter().map(|i| (i, s.spawn(move || check(i)))).collect();
        handles
            .into_iter()
            .filter_map(|(i, h)| {
                h.join().err().map(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("{}: {msg}", i.name)
                })
            })
            .collect()
    })
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: plain integer arguments.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Sends `signal` to the process group `pgid`.
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: plain integer arguments.
    unsafe { libc::kill(-(pgid as i32), signal) };
}

/// Forked workers, named by the `workers PID...` line their parent
/// printed; killed when dropped, so a failed test leaves none behind (they
/// would hold the test's output open).
pub struct Workers(pub Vec<u32>);

impl Workers {
    /// The workers a `workers PID...` line names.
    pub fn from_line(line: &str) -> Self {
        let pids = line.strip_prefix("workers ").unwrap_or_else(|| panic!("not a workers line: {line}"));
        Workers(pids.split(' ').map(|p| p.parse().unwrap()).collect())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Only a failed test leaves them running; otherwise they are reaped
        // already and their pids may be another process's.
        if std::thread::panicking() {
            for w in &self.0 {
                signal(*w, libc::SIGKILL);
            }
        }
    }
}

/// An `attached` line, typed.
pub fn attached_report(line: &serde_json::Value) -> detector::agent::report::AttachedReport {
    serde_json::from_value(line.clone()).unwrap_or_else(|e| panic!("attached line {line}: {e}"))
}

/// An `armed` line, typed.
pub fn armed_report(line: &serde_json::Value) -> detector::agent::report::ArmedReport {
    serde_json::from_value(line.clone()).unwrap_or_else(|e| panic!("armed line {line}: {e}"))
}

/// A process under watchpoints: (units watched, whether they rotate,
/// targets pending); panics naming its mode otherwise.
pub fn watching(p: &detector::agent::report::ProcessReport) -> (usize, bool, usize) {
    match &p.mode {
        detector::agent::report::ModeReport::Watch { watched_units, rotating, pending_targets } => {
            (*watched_units, *rotating, *pending_targets)
        }
        other => panic!("pid {} is not under watchpoints: {other:?}", p.pid),
    }
}
