//! The catalog scenario of `cargo xtask bench`: what a real catalog costs.
//!
//! - A Flask service from PyPI (in a virtualenv made here) under load from
//!   Flask's test client in the same process, started while the node agent
//!   runs with its defaults and a 60-target catalog (most modules never
//!   imported, some imported and never called, several called on every
//!   request): throughput against the same service without the agent,
//!   startup, what was reported against the ground truth recorded
//!   in-process with `sys.monitoring`, and whether anything was suspended.
//! - fib and richards (the suite's workloads) with the same catalog.
//! - How long a module's targets wait to be armed once its body starts.
//! - Rotation: detection time against the number of unreached body starts
//!   and the rate of the call.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use detector_tests::{Fixture, Interpreter, detector_bin, spawn_with_env};
use serde_json::Value;

use crate::{latency::monotonic_ns, root, sh};

/// The service's packages, pinned.
const PACKAGES: [&str; 8] = [
    "flask==3.1.3",
    "werkzeug==3.1.9",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
    "itsdangerous==2.2.0",
    "blinker==1.9.0",
    "pyyaml==6.0.3",
    "requests==2.34.2",
];
/// Seconds of load per run of the service.
const LOAD_SECS: usize = 12;
/// The first seconds, reported apart (the agent attaches and arms then).
const FIRST_SECS: usize = 5;
/// Runs of the service with and without the agent, interleaved.
const RUNS: usize = 3;
/// Body starts (N) and calls per second (r) of the rotation table.
const ROTATION_N: [usize; 4] = [4, 8, 16, 32];
const ROTATION_RATES: [u32; 3] = [10, 100, 1000];
/// Processes per rotation cell.
const ROTATION_REPS: usize = 12;

fn fixture(name: &str) -> PathBuf {
    root().join("xtask").join("fixtures").join(name)
}

/// The service's virtualenv on `interp`, made once.
fn venv(interp: &Interpreter) -> Result<PathBuf> {
    let dir = crate::cache_dir().join(format!("webapp-{}", interp.name));
    let python = dir.join("bin").join("python");
    let stamp = dir.join(".installed");
    let want = PACKAGES.join(" ");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(python);
    }
    eprintln!("xtask: installing the catalog scenario's service into {}", dir.display());
    sh(Command::new(&interp.argv[0]).args(["-m", "venv", "--clear"]).arg(&dir))?;
    sh(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PACKAGES))?;
    std::fs::write(&stamp, want)?;
    Ok(python)
}

/// Lines of a child's stdout, each with when it was read (CLOCK_MONOTONIC).
fn lines_of(child: &mut Child) -> mpsc::Receiver<(u64, String)> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((monotonic_ns(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// One run of the service.
#[derive(Default)]
struct AppRun {
    started_ms: f64,
    per_second: Vec<f64>,
    /// When it was started (CLOCK_MONOTONIC ns).
    spawned_ns: u64,
}

impl AppRun {
    fn mean(&self, from: usize, to: usize) -> f64 {
        let s = &self.per_second[from.min(self.per_second.len())..to.min(self.per_second.len())];
        s.iter().sum::<f64>() / s.len().max(1) as f64
    }
}

fn run_app(python: &Path, extra: &[&str], opted_in: bool) -> Result<(AppRun, u32)> {
    let mut cmd = Command::new(python);
    cmd.arg(fixture("webapp.py")).arg(LOAD_SECS.to_string()).args(extra).stdout(Stdio::piped());
    if opted_in {
        cmd.env("DD_APPSEC_SCA_ENABLED", "true").env("DD_SERVICE", "webapp");
    }
    let spawned_ns = monotonic_ns();
    let mut child = cmd.spawn().context("starting the service")?;
    let pid = child.id();
    // The CPU the bench gives workloads; the agent and this reader share the other.
    detector_tests::pin(pid, 0);
    let rx = lines_of(&mut child);
    let mut run = AppRun { spawned_ns, ..AppRun::default() };
    while let Ok((_, line)) = rx.recv_timeout(Duration::from_secs(60)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["started", ms] => run.started_ms = ms.parse()?,
            ["second", _, n] => run.per_second.push(n.parse()?),
            _ => {}
        }
    }
    if !child.wait()?.success() || run.per_second.len() < LOAD_SECS {
        bail!("the service did not run its {LOAD_SECS} s");
    }
    Ok((run, pid))
}

/// What the agent said about the service.
#[derive(Default)]
struct Seen {
    /// Targets reported, with the ms from the call to the report.
    reported: BTreeMap<String, f64>,
    /// µs from a module body's start to its targets armed.
    armed_us: Vec<f64>,
    /// Strategy changes (a suspension would be one).
    strategy_lines: Vec<Value>,
    /// ms from the service's start to the agent's `attached` line.
    attached_ms: Option<f64>,
}

/// The service under the node agent (its defaults, the catalog).
fn with_agent(python: &Path) -> Result<(AppRun, Seen)> {
    let catalog = fixture("catalog.json");
    let mut agent = Command::new(detector_bin())
        .args(["run", "--no-rc", "--events", "json", "--tap", "none", "--targets"])
        .arg(&catalog)
        .env("DD_SCA_DETECTION_ENABLED", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the agent")?;
    let rx = lines_of(&mut agent);
    let ready = Instant::now();
    while !rx.recv_timeout(Duration::from_secs(60))?.1.contains("\"discovering\"") {
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the agent never started discovering");
        }
    }
    // A node agent that has run for a while has analysed the interpreter
    // already: one short process of the same binary first.
    let mut warm =
        Command::new(python).args(["-c", "import time; time.sleep(2)"]).env("DD_APPSEC_SCA_ENABLED", "true").spawn()?;
    let is_warm_attached = |line: &str| {
        serde_json::from_str::<Value>(line).is_ok_and(|v| v["type"] == "attached" && v["pid"] == warm.id())
    };
    while !is_warm_attached(&rx.recv_timeout(Duration::from_secs(60))?.1) {}
    warm.wait()?;
    let result = run_app(python, &[], true);
    detector_tests::signal(agent.id() as u32, libc::SIGTERM);
    agent.wait()?;
    let (run, pid) = result?;
    let mut seen = Seen::default();
    for (at, line) in rx.try_iter() {
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if v["pid"] != pid {
            continue;
        }
        match v["type"].as_str() {
            Some("attached") => seen.attached_ms = Some(at.saturating_sub(run.spawned_ns) as f64 / 1e6),
            Some("hit") => {
                let ms = at.saturating_sub(v["ts_ns"].as_u64().unwrap_or(at)) as f64 / 1e6;
                seen.reported.entry(v["target"].as_str().unwrap_or("").to_owned()).or_insert(ms);
            }
            Some("armed") if v["source"] == "module body" => {
                seen.armed_us.extend(v["latency_us"].as_f64());
            }
            Some("strategy") => seen.strategy_lines.push(v),
            _ => {}
        }
    }
    Ok((run, seen))
}

/// The ground truth: which catalog targets ran in the service, and whether
/// their module had finished importing then.
fn truth(python: &Path) -> Result<BTreeMap<String, bool>> {
    let out = root().join("target").join("bench").join("webapp-truth.json");
    let catalog = fixture("catalog.json");
    run_app(python, &["truth", &catalog.display().to_string(), &out.display().to_string()], false)?;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    Ok(v.as_object()
        .context("truth is an object")?
        .iter()
        .map(|(k, e)| (k.clone(), e["after_import"].as_bool().unwrap_or(false)))
        .collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The service's table.
fn service(interp: &Interpreter) -> Result<String> {
    let python = venv(interp)?;
    let truth = truth(&python)?;
    let (mut steady, mut first, mut startup) = (Vec::new(), Vec::new(), Vec::new());
    let mut armed = Vec::new();
    let mut report_ms = Vec::new();
    let mut misses = BTreeSet::new();
    let mut false_reports = BTreeSet::new();
    let mut late = BTreeSet::new();
    let mut changes = Vec::new();
    let mut attached = Vec::new();
    for i in 0..RUNS {
        // Alternating which goes first, so neither gets the warmer machine.
        let (base, (run, seen)) = if i % 2 == 0 {
            let base = run_app(&python, &[], false)?.0;
            (base, with_agent(&python)?)
        } else {
            let agent = with_agent(&python)?;
            (run_app(&python, &[], false)?.0, agent)
        };
        steady.push(run.mean(FIRST_SECS, LOAD_SECS) / base.mean(FIRST_SECS, LOAD_SECS));
        first.push(run.mean(0, FIRST_SECS) / base.mean(0, FIRST_SECS));
        startup.push(run.started_ms / base.started_ms);
        armed.extend(seen.armed_us.iter().copied());
        attached.extend(seen.attached_ms);
        report_ms.extend(seen.reported.values().copied());
        for (t, after_import) in &truth {
            if !seen.reported.contains_key(t) {
                if *after_import {
                    misses.insert(t.clone())
                } else {
                    late.insert(t.clone())
                };
            }
        }
        false_reports.extend(seen.reported.keys().filter(|t| !truth.contains_key(*t)).cloned());
        changes.extend(seen.strategy_lines.iter().map(|v| v.to_string()));
        eprintln!("xtask: service run: {} reported, {} strategy changes", seen.reported.len(), changes.len());
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Catalog scenario: a Flask service\n\n\
         `xtask/fixtures/webapp.py` on {} ({}) serving `/` (a Jinja2 template), `/yaml` (PyYAML) and \
         `/json` (JSON body) to Flask's test client in the same process for {LOAD_SECS} s, started \
         while `detector run` runs with its defaults (`auto`, reachability, 1% budget) and \
         `xtask/fixtures/catalog.json`: 60 targets, of which this service never imports 17 modules' \
         worth, imports and never calls most of the rest, and calls several on every request. {RUNS} \
         runs with the agent, each beside one without; ratios are medians. Ground truth: the same \
         service under `sys.monitoring` (PY_START, each code object once), which records every catalog \
         target that ran and whether its module had finished importing by then.\n",
        interp.name,
        PACKAGES.join(", ")
    );
    let _ = writeln!(s, "| measure | value |\n|---|---:|");
    let _ = writeln!(s, "| throughput, steady state (s {FIRST_SECS}-{LOAD_SECS}) | {:.3}x |", median(steady));
    let _ = writeln!(s, "| throughput, first {FIRST_SECS} s | {:.3}x |", median(first));
    let _ = writeln!(s, "| startup (to the first request ready) | {:.3}x |", median(startup));
    let _ = writeln!(s, "| process start to attached, ms (median) | {:.0} |", median(attached));
    let _ = writeln!(
        s,
        "| targets that ran (ground truth) | {} ({} after their module was imported) |",
        truth.len(),
        truth.values().filter(|a| **a).count()
    );
    let _ = writeln!(s, "| missed, called after their module was imported | {} {:?} |", misses.len(), misses);
    let _ = writeln!(s, "| missed, called only while their module was importing | {} {:?} |", late.len(), late);
    let _ = writeln!(s, "| reported and never called (false reports) | {} {:?} |", false_reports.len(), false_reports);
    let _ = writeln!(
        s,
        "| call to report, ms (p50 / p99) | {:.1} / {:.1} |",
        percentile(report_ms.clone(), 0.5),
        percentile(report_ms, 0.99)
    );
    let _ = writeln!(
        s,
        "| module body start to its targets armed, µs (p50 / p99, n={}) | {:.0} / {:.0} |",
        armed.len(),
        percentile(armed.clone(), 0.5),
        percentile(armed, 0.99)
    );
    let _ = writeln!(s, "| strategy changes or suspensions | {} |", changes.len());
    for c in changes.iter().take(5) {
        let _ = writeln!(s, "\n`{c}`");
    }
    Ok(s)
}

/// fib and richards with the catalog: the suite's fixture, `run --pid`
/// with the catalog and the node agent's defaults.
fn workloads(interp: &Interpreter, richards: &str) -> Result<String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### fib and richards with the same catalog\n\n\
         The suite's workloads (below) on {}, which import `json` (two of the catalog's targets, \
         armed: an enabled debug register costs richards a few percent in this VM, see above) and none \
         of its other modules (the target `rare` is not in it): `run` with the catalog and its defaults against no agent, median of \
         {RUNS} processes each, interleaved.\n\n| workload | none ms | with the catalog |\n|---|---:|---:|",
        interp.name
    );
    let catalog = fixture("catalog.json").display().to_string();
    for workload in ["fib", "richards"] {
        let (mut none, mut with) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            for agent in [false, true] {
                let env = [("DETECTOR_BENCH_WORKLOAD", workload), ("DETECTOR_BENCH_RICHARDS", richards)];
                let f = Fixture::start_with_env(interp, "suite", &env);
                f.pin(0);
                let detector = agent.then(|| {
                    let args: Vec<String> = [
                        "run",
                        "--no-rc",
                        "--events",
                        "json",
                        "--strategy",
                        "auto",
                        "--reachability",
                        "true",
                        "--overhead-budget",
                        "1",
                        "--targets",
                        &catalog,
                        "--pid",
                        &f.pid().to_string(),
                    ]
                    .map(String::from)
                    .to_vec();
                    let mut d = spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "true")]);
                    d.wait_for("attached");
                    d
                });
                let ns = crate::harness::timed(f, detector, "ns_per_round ");
                if agent { with.push(ns) } else { none.push(ns) }
            }
        }
        let (none, with) = (median(none), median(with));
        let _ = writeln!(s, "| {workload} | {:.1} | {:.3}x |", none / 1e6, with / none);
    }
    Ok(s)
}

/// A process with N functions, all imported, function `k` of them called r
/// times a second once told to: the time from its first call to its report,
/// in ms.
fn rotation_once(interp: &Interpreter, body: &str, n: usize, k: usize, rate: u32) -> Result<f64> {
    let script = format!(
        "import sys, time\n\
         for i in range({n}):\n    exec('def f%d():\\n    {body}' % (i, i))\n\
         print('ready', flush=True)\nsys.stdin.readline()\n\
         f = globals()['f{last}']\nprint('first', time.monotonic_ns(), flush=True)\n\
         end = time.monotonic() + 30\n\
         while time.monotonic() < end:\n    f()\n    time.sleep({period})\n",
        last = k,
        period = 1.0 / rate as f64
    );
    let mut child = Command::new(&interp.argv[0])
        .args(&interp.argv[1..])
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = lines_of(&mut child);
    out.recv_timeout(Duration::from_secs(30))?;
    let mut args: Vec<String> = ["run", "--no-rc", "--events", "json", "--strategy", "watch", "--reachability", "true"]
        .map(String::from)
        .to_vec();
    args.extend(["--pid".into(), child.id().to_string()]);
    for i in 0..n {
        args.extend(["--target".into(), format!("__main__:f{i}")]);
    }
    let mut agent = spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "true")]);
    agent.wait_for("attached");
    writeln!(child.stdin.as_mut().unwrap(), "go")?;
    let first: u64 =
        out.recv_timeout(Duration::from_secs(30))?.1.split_whitespace().nth(1).context("first")?.parse()?;
    let hit = agent.wait_match("the hit", |v| v["type"] == "hit");
    let _ = child.kill();
    let _ = child.wait();
    agent.stop();
    Ok(hit["ts_ns"].as_u64().unwrap_or(first).saturating_sub(first) as f64 / 1e6)
}

/// The rotation table, for bodies that leave a warm-up mark or not.
fn rotation(interp: &Interpreter, marked: bool) -> Result<String> {
    let mut s = String::new();
    let (body, title, what) = if marked {
        (
            "return abs(%d)",
            "with warm-up marks",
            "`return abs(i)`: the body's first instruction has an inline cache, whose count a run changes, so a call \
             made while no register watches the body is seen from the code object at the next look (every 100 ms)",
        )
    } else {
        (
            "return %d",
            "rotation alone",
            "`return i`: on 3.12 the body leaves no warm-up mark (no inline cache before it returns), so only a \
             register's turn sees it",
        )
    };
    let _ = writeln!(
        s,
        "\n### Rotation: more unreached body starts than debug registers, {title}\n\n\
         A process on {} with N functions, all targets and imported, none reached; after the \
         attach one of them (a different one each time) is called r times a second. Time from its first call to its \
         report (the hit), in ms: median and worst of {ROTATION_REPS} processes. \
         `run --strategy watch --reachability true`; the registers move every {} ms. Bodies are {what}.\n\n\
         | N | r = {}/s | r = {}/s | r = {}/s |\n|---:|---:|---:|---:|",
        interp.name, 100, ROTATION_RATES[0], ROTATION_RATES[1], ROTATION_RATES[2]
    );
    for n in ROTATION_N {
        let mut row = format!("| {n} |");
        for rate in ROTATION_RATES {
            let mut ms = Vec::new();
            // A different function each time: where it stands in the
            // rotation decides how long it waits for its turn.
            for rep in 0..ROTATION_REPS {
                ms.push(rotation_once(interp, body, n, (rep * 7 + 3) % n, rate)?);
            }
            let worst = ms.iter().copied().fold(0.0, f64::max);
            let _ = write!(row, " {:.0} / {:.0} |", median(ms), worst);
        }
        eprintln!("xtask: rotation {row}");
        let _ = writeln!(s, "{row}");
    }
    Ok(s)
}

/// Every table of the catalog scenario, on pyenv 3.12 (the ground truth
/// needs `sys.monitoring`).
pub fn run(interps: &[Interpreter], richards: &str) -> Result<String> {
    let interp = interps
        .iter()
        .find(|i| i.name.starts_with("pyenv") && i.minor == 12)
        .context("the catalog scenario runs on pyenv 3.12")?;
    let mut s = String::new();
    // Each table as soon as it is done: a later failure loses none.
    let mut done = |table: String| {
        eprintln!("{table}");
        s.push_str(&table);
    };
    done(service(interp)?);
    done(workloads(interp, richards)?);
    done(rotation(interp, false)?);
    done(rotation(interp, true)?);
    Ok(s)
}
