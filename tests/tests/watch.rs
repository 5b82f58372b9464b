//! The watch strategy (`dump --strategy watch`): hardware watchpoints on each
//! target's body start instead of per-call probes. Exact counts for the
//! foundation's workloads on every interpreter, with the strategy
//! asserted from the `attached` line (no silent fallback), and a clear
//! fallback to per-call where it cannot apply (free-threaded builds, whose
//! threads, four of them calling at once in `threads`, each run their own
//! copy of the bytecode).

use detector::agent::report::{ModeReport, TargetStrategy};
use detector_tests::{
    Dump, Fixture, Interpreter, Summary, attached_report, for_each_interpreter, for_each_interpreter_at_most,
    for_each_watchable_interpreter, run_reaching,
};

/// Runs `workload` under `dump --strategy watch` attached after its setup.
fn watched(i: &Interpreter, workload: &str, targets: &[&str]) -> Summary {
    let mut fixture = Fixture::start(i, workload);
    let dump = Dump::attach_with(fixture.pid(), targets, &["--strategy", "watch"]);
    fixture.go();
    fixture.wait_done();
    let s = dump.stop();
    fixture.finish();
    s
}

/// Checks the strategy in use and the exact counts. A free-threaded build
/// is probed per call, and says why.
fn check(i: &Interpreter, workload: &str, expected: &[(&str, u64)]) {
    let targets: Vec<&str> = expected.iter().map(|(t, _)| *t).collect();
    let s = watched(i, workload, &targets);
    let attached = attached_report(&s.attached).process;
    if i.free_threaded {
        assert_per_call_for_thread_local_bytecode(i, &attached.mode);
        s.assert_counts(expected);
        return;
    }
    assert_eq!(attached.strategy, "watch", "{}: {attached:?}", i.name);
    // The guards and the module-execution probe (a module body that runs
    // may define a target anew): no per-call probe.
    assert_eq!(attached.probes, i.guards() + 1, "{}: {attached:?}", i.name);
    s.assert_counts(expected);
}

/// `mode` is per-call because each thread of a free-threaded build runs its
/// own copy of the bytecode.
fn assert_per_call_for_thread_local_bytecode(i: &Interpreter, mode: &ModeReport) {
    let ModeReport::PerCall { watch_fallback: Some(why), .. } = mode else {
        panic!("{}: not per-call, or no reason given: {mode:?}", i.name)
    };
    assert!(why.contains("free-threaded") && why.contains("own copy"), "{}: {why}", i.name);
}

#[test]
fn plain_functions_and_decoys() {
    for_each_interpreter(|i| {
        check(i, "plain", &[("wl.plain:f", 25), ("wl.plain:g", 3)]);
        check(i, "methods", &[("wl.methods:A.f", 10), ("wl.methods:B.f", 5), ("wl.methods:f", 7), ("wl.decoy:A.f", 3)]);
    });
}

#[test]
fn static_and_class_methods_and_constructors() {
    for_each_interpreter(|i| {
        check(i, "methods", &[("wl.methods:A.s", 6), ("wl.methods:A.c", 6)]);
        check(i, "init", &[("wl.init:Point.__init__", 12), ("wl.init:Other.__init__", 3)]);
    });
}

#[test]
fn nested_calls_and_recursion() {
    for_each_interpreter(|i| {
        check(i, "nested", &[("wl.nested:outer", 4), ("wl.nested:middle", 20), ("wl.nested:inner", 40)]);
        check(i, "rec", &[("wl.rec:fib", 177)]);
    });
}

#[test]
fn generators_and_coroutines_count_starts_not_resumes() {
    for_each_interpreter(|i| check(i, "gens", &[("wl.gens:gen", 5), ("wl.gens:coro", 4)]));
}

#[test]
fn closures_found_before_they_exist() {
    for_each_interpreter(|i| check(i, "closures", &[("wl.closures:make", 3), ("wl.closures:make.<locals>.inner", 12)]));
}

#[test]
fn threads_started_after_arming_and_one_already_looping() {
    for_each_interpreter(|i| {
        check(i, "threads", &[("wl.threads:work", 1000), ("wl.threads:loop", 4)]);
        check(i, "looping", &[("wl.looping:tick", 100)]);
    });
}

#[test]
fn signals_handled_at_a_start_count_it_once() {
    for_each_interpreter(|i| check(i, "signals", &[("wl.signals:f", 20_000)]));
}

#[test]
fn more_body_starts_than_debug_registers_fall_back_to_per_call() {
    for_each_watchable_interpreter(|i| {
        let targets = ["wl.methods:A.f", "wl.methods:B.f", "wl.methods:f", "wl.decoy:A.f", "wl.methods:A.s"];
        let s = watched(i, "methods", &targets);
        let attached = attached_report(&s.attached).process;
        let ModeReport::PerCall { watch_fallback: Some(why), .. } = &attached.mode else {
            panic!("{}: not per-call, or no reason given: {attached:?}", i.name)
        };
        assert!(why.contains("4 debug registers"), "{why}");
        s.assert_counts(&[
            ("wl.methods:A.f", 10),
            ("wl.methods:B.f", 5),
            ("wl.methods:f", 7),
            ("wl.decoy:A.f", 3),
            ("wl.methods:A.s", 6),
        ]);
    });
}

#[test]
fn tracing_and_monitoring_switched_on_and_off() {
    for_each_interpreter(|i| {
        // Switching re-instruments the code object and re-dispatches its
        // RESUME (3.12+); 3.11's tracing re-dispatches every instruction.
        // Neither is a second start.
        let calls = if i.minor >= 12 { 25 } else { 20 };
        check(i, "traced", &[("wl.traced:target", calls)]);
    });
}

#[test]
fn run_follows_target_changes_by_rearming() {
    for_each_watchable_interpreter(|i| {
        const F: &str = "wl.rounds:f";
        const G: &str = "wl.rounds:g";
        const H: &str = "wl.rounds:h";
        let dir = std::env::temp_dir().join(format!("detector-watch-{}-{}", std::process::id(), i.name));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("targets.json");
        std::fs::write(&file, serde_json::json!({"targets": [F, H]}).to_string()).unwrap();
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let args: Vec<String> = [
            "run",
            "--no-rc",
            "--targets",
            &file.display().to_string(),
            "--strategy",
            "watch",
            "--events",
            "json",
            "--pid",
            &fixture.pid().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut det = detector_tests::spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "true")]);
        let attached = det.wait_for("attached");
        assert_eq!(attached["strategy"], "watch", "{attached}");
        fixture.call("f", 5);
        fixture.call("h", 1);
        det.wait_hits(H, 1);
        assert_eq!(det.hits(F), 5);

        // Replaced: the watchpoints move to g and h (the file is re-read).
        std::fs::write(&file, serde_json::json!({"targets": [G, H]}).to_string()).unwrap();
        let deadline = std::time::Instant::now() + detector_tests::STEP_TIMEOUT;
        while det.hits(G) == 0 {
            assert!(std::time::Instant::now() < deadline, "g never matched");
            fixture.call("g", 1);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        fixture.call("g", 4);
        fixture.call("f", 3);
        fixture.call("h", 1);
        det.wait_hits(H, 2);
        assert_eq!((det.hits(F), det.hits(G)), (5, 5));
        det.stop();
        fixture.finish();
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn reachability_reports_once_and_then_stops_paying() {
    for_each_watchable_interpreter(|i| {
        const F: &str = "wl.rounds:f";
        const H: &str = "wl.rounds:h";
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let mut det = run_reaching(fixture.pid(), &[F, H], &["--strategy", "watch"]);
        fixture.call("f", 5);
        fixture.call("h", 1);
        // Once h's only report is in, f's first round has been read (and its
        // watchpoint disarmed).
        det.wait_hits(H, 1);
        fixture.call("f", 5);
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(det.hits(F), 1, "reported once");
        let s = det.stop();
        // Some of the first round ran before the report reached user space
        // (how many depends on when the reader woke); after it, a disarmed
        // watchpoint counts nothing, so the second round adds nothing.
        assert!((1..=5).contains(&s.count(F)), "{}: {} of 10 calls counted", i.name, s.count(F));
        fixture.finish();
    });
}

#[test]
fn reachability_samples_a_reached_target_now_and_then() {
    // The rate measured is the workload's own pace: a few at a time.
    for_each_interpreter_at_most(6, |i| {
        if i.free_threaded {
            return; // probed per call: see `check`
        }
        const T: &str = "wl.hot:target";
        // About 90 calls a second for 9 s.
        let mut fixture = Fixture::start(i, "hot");
        let mut det = run_reaching(fixture.pid(), &[T], &["--strategy", "watch", "--reachability-sample", "1"]);
        // Its 9 s start once attached: on a loaded machine an attach can
        // take most of them, leaving only empty windows.
        fixture.go();
        det.wait_hits(T, 1);
        // Disarmed once seen, armed again a second later for a second.
        let sample = det.wait_match("a sample with calls", |v| v["type"] == "sample" && v["calls"].as_u64() > Some(0));
        let rate = sample["calls_per_sec"].as_f64().unwrap();
        assert!((10.0..=200.0).contains(&rate), "{}: {sample}", i.name);
        let s = det.stop();
        fixture.finish();
        // Reported once; counted at the first call and in the windows.
        assert_eq!(s.hits.len(), 1, "{}", i.name);
        assert!(s.count(T) > sample["calls"].as_u64().unwrap(), "{}: {}", i.name, s.count(T));
    });
}

#[test]
fn the_default_strategy_is_watch_where_it_applies() {
    use std::io::{BufRead, BufReader};
    for_each_interpreter(|i| {
        let fixture = Fixture::start(i, "plain");
        // Straight from the binary: the harness's spawn pins a strategy.
        let mut child = std::process::Command::new(detector_tests::detector_bin())
            .args(["dump", "--format", "json", "--target", "wl.plain:f", "--pid", &fixture.pid().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let first = BufReader::new(child.stdout.take().unwrap()).lines().next().unwrap().unwrap();
        detector_tests::signal(child.id(), libc::SIGINT);
        child.wait().unwrap();
        fixture.finish();
        let attached = attached_report(&serde_json::from_str(&first).unwrap());
        if i.free_threaded {
            assert_per_call_for_thread_local_bytecode(i, &attached.process.mode);
            assert_eq!(attached.target_strategies["wl.plain:f"], TargetStrategy::PerCall, "{}", i.name);
            return;
        }
        assert_eq!(attached.process.strategy, "watch", "{}: {attached:?}", i.name);
        assert_eq!(attached.target_strategies["wl.plain:f"], TargetStrategy::Watch, "{}: {attached:?}", i.name);
    });
}

#[test]
fn a_late_import_is_watched_from_when_its_module_runs() {
    for_each_watchable_interpreter(|i| {
        let mut fixture = Fixture::start(i, "late_rounds");
        fixture.go();
        let mut d = Dump::attach_with(fixture.pid(), &["wl.late:f"], &["--strategy", "watch"]);
        let attached = attached_report(&d.wait_for("attached"));
        // Pending, at no cost: no per-call probe while the module is absent.
        assert_eq!(attached.process.strategy, "watch", "{}: {attached:?}", i.name);
        assert_eq!(attached.target_strategies["wl.late:f"], TargetStrategy::Pending, "{attached:?}");
        fixture.call("import", 0);
        let armed = d.wait_for("armed");
        assert_eq!(armed["targets"][0], "wl.late:f", "{}: {armed}", i.name);
        fixture.call("f", 7);
        let s = d.stop();
        fixture.finish();
        s.assert_counts(&[("wl.late:f", 7)]);
    });
}

#[test]
fn a_watched_function_redefined_is_watched_anew() {
    for_each_watchable_interpreter(|i| {
        let mut fixture = Fixture::start(i, "redefine");
        fixture.go();
        let mut d = Dump::attach_with(fixture.pid(), &["wl.redefine:f"], &["--strategy", "watch"]);
        assert_eq!(d.wait_for("attached")["strategy"], "watch", "{}", i.name);
        fixture.call("f", 3);
        // The old code object goes away: the kernel stops counting its unit
        // (whatever is allocated there next is not f) and the agent re-arms
        // on the new definition.
        fixture.call("redefine", 1);
        let moved = d.wait_for("strategy");
        assert_eq!(moved["strategy"], "watch", "{}: {moved}", i.name);
        assert!(moved["why"].as_str().unwrap().contains("deallocated"), "{moved}");
        fixture.call("f", 4);
        let s = d.stop();
        fixture.finish();
        s.assert_counts(&[("wl.redefine:f", 7)]);
    });
}

#[test]
fn a_sigtrap_from_the_kernel_takes_the_process_off_watchpoints() {
    for_each_interpreter(|i| {
        const F: &str = "wl.trapped:f";
        // The switch builds have no `_ctypes` to run the instruction with.
        let ctypes = std::process::Command::new(&i.argv[0]).args(&i.argv[1..]).args(["-c", "import ctypes"]).status();
        if !ctypes.is_ok_and(|s| s.success()) {
            assert!(i.name.starts_with("switch"), "{}: no ctypes", i.name);
            return;
        }
        let mut fixture = Fixture::start(i, "trapped");
        let pid = fixture.pid();
        let mut dump = Dump::attach_with(pid, &[F], &["--strategy", "watch"]);
        let watched = attached_report(&dump.wait_for("attached")).process.strategy == "watch";
        fixture.go();
        fixture.call("f", 3);
        // The kernel's SIGTRAP, as a misreported debug exception gives it.
        fixture.call("trap", 1);
        if watched {
            let line = dump.wait_match("strategy line for the SIGTRAP", |v| v["type"] == "strategy" && v["pid"] == pid);
            assert_eq!(line["strategy"], "per-call", "{}: {line}", i.name);
            let why = line["why"].as_str().unwrap();
            assert!(why.contains("SIGTRAP") && why.contains("TRAP_BRKPT"), "{}: {why}", i.name);
            let logged = || dump.stderr().contains("the kernel sent SIGTRAP to a thread under watchpoints");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !logged() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(logged(), "{}: {}", i.name, dump.stderr());
        }
        // Counted exactly across the move, by per-call probes from then on.
        fixture.call("f", 4);
        let s = dump.stop();
        fixture.finish();
        s.assert_counts(&[(F, 7)]);
        // Counted only where watchpoints could have caused it.
        assert_eq!(s.stats["trap_signals"], u64::from(watched), "{}: {}", i.name, s.stats);
    });
}
