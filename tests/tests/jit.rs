//! A JIT that starts after the attach: the process is caught between its
//! interpreter existing and its JIT flag being set (held in `site`'s import,
//! which CPython runs first, as a node agent attaching at exec catches every
//! new process), then runs a hot loop that the JIT compiles. It is reported
//! blind, with why, and its counts up to then stand; with the JIT off the
//! same workload is counted exactly.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use detector::agent::report::ModeReport;
use detector_tests::{
    Dump, Fixture, Interpreter, NodeAgent, STEP_TIMEOUT, attached_report, builds,
    interpreters::{JIT_BUILD_PREFIX, interpreters},
    node_agent::{one_at_a_time, opted_in},
};

/// Calls of `f` in the hot loop: the JIT compiles it after about 4,000.
const LOOP: u64 = 20_000;
/// Calls of `f` before the loop.
const BEFORE: u64 = 7;

/// Imported by `site` before CPython reads `PYTHON_JIT`: says it is held,
/// then waits to be let go.
const SITECUSTOMIZE: &str = "import os, time
here = os.path.dirname(__file__)
open(os.path.join(here, 'held'), 'w').close()
while not os.path.exists(os.path.join(here, 'go')):
    time.sleep(0.01)
";

/// The workload: `f` [`BEFORE`] times, then [`LOOP`] times in a loop;
/// with `JIT_FORK` set, a child forked then runs the loop (compiled) again;
/// then it waits to be told to exit.
fn workload() -> String {
    format!(
        "import sys, os, time
sys.path.insert(0, os.path.dirname(__file__))
import wl_jit
for _ in range({BEFORE}):
    wl_jit.f()
def loop(n):
    f = wl_jit.f
    for _ in range(n):
        f()
loop({LOOP})
print('jit', sys._jit.is_enabled(), flush=True)
exit = os.path.join(os.path.dirname(__file__), 'exit')
child = os.fork() if 'JIT_FORK' in os.environ else None
if child == 0:
    loop({LOOP})
while not os.path.exists(exit):
    time.sleep(0.01)
if child == 0:
    os._exit(0)
if child:
    os.waitpid(child, 0)
"
    )
}

const MODULE: &str = "def f():
    pass
def decoy():
    pass
";

const TARGETS: [&str; 2] = ["wl_jit:f", "wl_jit:decoy"];

/// The interpreters with the JIT built in: Debian's (on with
/// `PYTHON_JIT=1`) and xtask's default-on build (on unless `PYTHON_JIT=0`),
/// with the environment that turns it on.
fn with_jit() -> Vec<(Interpreter, &'static str)> {
    let all = interpreters();
    let debian = |name: &str| all.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("no {name}")).clone();
    let mut out = vec![(debian("sid-3.14-chroot"), "PYTHON_JIT=1"), (debian("sid-3.15-chroot"), "PYTHON_JIT=1")];
    for b in builds().into_iter().filter(|b| b.name.starts_with(JIT_BUILD_PREFIX)) {
        let argv = vec![b.python.display().to_string()];
        let i = Interpreter { name: b.name, minor: b.minor, free_threaded: false, argv, ..debian("sid-3.14-chroot") };
        out.push((Interpreter { rootfs: None, fixtures: detector_tests::fixtures_dir(), ..i }, ""));
    }
    assert_eq!(out.len(), 3, "no build with the JIT on by default in the manifest");
    out
}

/// A workload process held in `site`'s import.
struct Held {
    /// Its directory on the host.
    dir: PathBuf,
    child: Child,
}

impl Held {
    /// Starts the workload on `i` with `env` (`NAME=VALUE`s, or none) and
    /// waits until it is held.
    fn start(i: &Interpreter, env: &[String]) -> Self {
        // Tests run at once: each its own directory.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("detector-jit-{}-{n}-{}", std::process::id(), i.name);
        let (dir, inner) = match &i.rootfs {
            Some(root) => (root.join("tmp").join(&name), Path::new("/tmp").join(&name)),
            None => (std::env::temp_dir().join(&name), std::env::temp_dir().join(&name)),
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in [("sitecustomize.py", SITECUSTOMIZE), ("main.py", &workload()), ("wl_jit.py", MODULE)] {
            std::fs::write(dir.join(file), text).unwrap();
        }
        let python = i.argv.last().unwrap();
        let mut argv: Vec<String> = match &i.rootfs {
            Some(root) => vec!["chroot".into(), root.display().to_string()],
            None => Vec::new(),
        };
        argv.push("/usr/bin/env".into());
        argv.push(format!("PYTHONPATH={}", inner.display()));
        argv.extend(env.iter().cloned());
        argv.extend([python.clone(), inner.join("main.py").display().to_string()]);
        // A group of its own: a child it forks goes with it.
        let child = Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::piped()).process_group(0).spawn().unwrap();
        let held = Held { dir, child };
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !held.dir.join("held").exists() {
            assert!(Instant::now() < deadline, "{}: not held in site", i.name);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        held
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it go and exit; returns what it printed.
    fn finish(mut self) -> String {
        self.go();
        std::fs::write(self.dir.join("exit"), "").unwrap();
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let _ = self.child.wait();
        out
    }

    /// Lets it go on from `site`.
    fn go(&self) {
        std::fs::write(self.dir.join("go"), "").unwrap();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        detector_tests::signal_group(self.pid(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_jit_that_starts_after_the_attach_stops_the_counting_and_says_so() {
    for (i, on) in with_jit() {
        let env: Vec<String> = on.split_whitespace().map(str::to_owned).collect();
        let held = Held::start(&i, &env);
        let mut d = Dump::attach(held.pid(), &TARGETS);
        let out = held.finish();
        assert!(out.contains("jit True"), "{}: the JIT was not on: {out}", i.name);
        let blind = d.wait_match("blind", |v| v["type"] == "strategy" && v["strategy"] == "blind");
        let why = blind["why"].as_str().unwrap();
        assert!(why.contains("its tier-2 optimizer started"), "{}: {why}", i.name);
        let s = d.collect();
        let sites = s.attached["sites"].to_string();
        assert!(sites.contains("_PyOptimizer_Optimize"), "{}: the optimizer's entry not probed: {sites}", i.name);
        let f = s.count("wl_jit:f");
        // Every call until the JIT compiled the loop, and none after.
        assert!(f > BEFORE && f < BEFORE + LOOP, "{}: {f} calls of f counted", i.name);
        assert_eq!(s.count("wl_jit:decoy"), 0, "{}", i.name);
        assert_eq!(s.stats["tier2_starts"], 1, "{}: {}", i.name, s.stats);
    }
}

#[test]
fn with_the_jit_off_the_same_workload_is_counted_exactly() {
    for (i, _) in with_jit() {
        let held = Held::start(&i, &["PYTHON_JIT=0".into()]);
        let d = Dump::attach(held.pid(), &TARGETS);
        let out = held.finish();
        assert!(out.contains("jit False"), "{}: the JIT was on: {out}", i.name);
        let s = d.collect();
        assert_eq!((s.count("wl_jit:f"), s.count("wl_jit:decoy")), (BEFORE + LOOP, 0), "{}", i.name);
        assert_eq!(s.stats["tier2_starts"], 0, "{}: {}", i.name, s.stats);
        assert!(!s.hits.is_empty() || s.stats["ringbuf_drops"] != 0, "{}: no hit reported", i.name);
    }
}

/// The node agent attaches to a new process as it executes, before its
/// interpreter has read whether the JIT is on (here, on by the build's
/// default): it says the process went blind in `/processes`, counts it in
/// its metrics, and does not attach to it again; a child it forks then,
/// which has its JIT flag set too, is refused.
#[test]
fn the_node_agent_reports_a_process_whose_jit_started_as_blind() {
    let _turn = one_at_a_time();
    let (i, _) = with_jit().pop().unwrap();
    let mut agent = NodeAgent::start(&TARGETS, &["--rescan-interval", "1"]);
    let mut env: Vec<String> = opted_in("jit-app").into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push("JIT_FORK=1".into());
    let held = Held::start(&i, &env);
    let pid = held.pid();
    agent.wait_attached(pid);
    held.go();
    let why = wait_blind(&agent, pid);
    assert!(why.contains("its tier-2 optimizer started"), "{why}");
    assert_eq!(agent.process(pid).map(|p| p.probes), Some(0), "probes left on a blind process");
    // Its child has the parent's JIT flag set: refused, with the reason.
    let child = child_of(pid);
    let deadline = Instant::now() + STEP_TIMEOUT;
    let refused =
        |log: &str| log.lines().any(|l| l.contains(&format!("\"pid\":{child},")) && l.contains("runs with the JIT on"));
    while !refused(&agent.events.stderr()) {
        assert!(Instant::now() < deadline, "child {child} not refused: {}", agent.events.stderr());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    agent.wait_metric(r#"detector_processes_by_strategy{strategy="blind"}"#, 1.0);
    // Past a rescan, which would find it again were it not known.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = held.finish();
    assert!(out.contains("jit True"), "{out}");
    agent.wait_exited(pid);
    assert_eq!(agent.lines("attached", pid).len(), 1, "attached again");
}

/// What `/processes` says is why `pid` is blind, once it is.
fn wait_blind(agent: &NodeAgent, pid: u32) -> String {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match agent.process(pid).map(|p| p.mode) {
            Some(ModeReport::Blind { why }) => return why,
            other => assert!(Instant::now() < deadline, "{pid} not blind: {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The child `pid` forked, once it has.
fn child_of(pid: u32) -> u32 {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "{pid} forked no child");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Clang's computed-goto loop (the JIT build's): RESUME_CHECK's
/// de-optimisation (a signal pending at a start) goes on into RESUME's body
/// past RESUME's site, so that path has a site of its own and every start
/// counts once; and RESUME's re-dispatch shares a dispatch with other
/// handlers, so watchpoints are not used there, with the reason.
#[test]
fn a_clang_computed_goto_loop_counts_de_optimised_starts_and_is_not_watched() {
    let (i, _) = with_jit().pop().unwrap();
    let off = [("PYTHON_JIT", "0")];
    let mut fixture = Fixture::start_with_env(&i, "signals", &off);
    let dump = Dump::attach(fixture.pid(), &["wl.signals:f"]);
    assert!(dump.seen[0]["sites"].to_string().contains("RESUME_CHECK de-optimised"), "{}", dump.seen[0]);
    fixture.go();
    fixture.wait_done();
    let s = dump.stop();
    fixture.finish();
    s.assert_counts(&[("wl.signals:f", 20_000)]);
    assert!(s.stats["redispatch_skips"].as_u64().unwrap() > 0, "no start de-optimised: {}", s.stats);

    let mut fixture = Fixture::start_with_env(&i, "plain", &off);
    let d = Dump::attach_with(fixture.pid(), &["wl.plain:f"], &["--strategy", "watch"]);
    let ModeReport::PerCall { watch_fallback: Some(why), .. } = attached_report(&d.seen[0]).process.mode else {
        panic!("watched: {}", d.seen[0])
    };
    assert!(why.contains("opcode dispatch is not known well enough"), "{why}");
    fixture.go();
    fixture.wait_done();
    let s = d.stop();
    fixture.finish();
    s.assert_counts(&[("wl.plain:f", 25)]);
}
