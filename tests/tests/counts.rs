//! Exact hit counts for known workloads on every interpreter, and zero for
//! decoys: same name in another class, at module level, in another module.

use detector_tests::{Dump, Fixture, for_each_interpreter, run_attached, run_reaching};

#[test]
fn plain_functions() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "plain", &["wl.plain:f", "wl.plain:g", "wl.plain:never_defined"]);
        s.assert_counts(&[("wl.plain:f", 25), ("wl.plain:g", 3), ("wl.plain:never_defined", 0)]);
    });
}

#[test]
fn methods_and_decoys() {
    for_each_interpreter(|i| {
        // B.f (5 calls), module-level f (7) and wl.decoy:A.f (3) share the
        // name f: none of them is wl.methods:A.f.
        let s = run_attached(i, "methods", &["wl.methods:A.f", "wl.methods:C.f", "wl.other:A.f"]);
        s.assert_counts(&[("wl.methods:A.f", 10), ("wl.methods:C.f", 0), ("wl.other:A.f", 0)]);
    });
}

#[test]
fn decoys_counted_on_their_own() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "methods", &["wl.methods:B.f", "wl.methods:f", "wl.decoy:A.f"]);
        s.assert_counts(&[("wl.methods:B.f", 5), ("wl.methods:f", 7), ("wl.decoy:A.f", 3)]);
    });
}

#[test]
fn staticmethods_and_classmethods() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "methods", &["wl.methods:A.s", "wl.methods:A.c"]);
        s.assert_counts(&[("wl.methods:A.s", 6), ("wl.methods:A.c", 6)]);
    });
}

#[test]
fn nested_python_to_python_calls() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "nested", &["wl.nested:outer", "wl.nested:middle", "wl.nested:inner"]);
        s.assert_counts(&[("wl.nested:outer", 4), ("wl.nested:middle", 20), ("wl.nested:inner", 40)]);
    });
}

#[test]
fn constructors() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "init", &["wl.init:Point.__init__", "wl.init:Other.__init__"]);
        s.assert_counts(&[("wl.init:Point.__init__", 12), ("wl.init:Other.__init__", 3)]);
    });
}

#[test]
fn generators_and_coroutines_count_starts_not_resumes() {
    for_each_interpreter(|i| {
        // 5 generators of 10 items each, 2 created but never started; 4
        // coroutines awaiting 3 times each.
        let s = run_attached(i, "gens", &["wl.gens:gen", "wl.gens:coro"]);
        s.assert_counts(&[("wl.gens:gen", 5), ("wl.gens:coro", 4)]);
    });
}

#[test]
fn recursion() {
    for_each_interpreter(|i| {
        // fib(10) makes 177 calls.
        let s = run_attached(i, "rec", &["wl.rec:fib"]);
        s.assert_counts(&[("wl.rec:fib", 177)]);
    });
}

#[test]
fn signals_handled_at_a_start_count_it_once() {
    for_each_interpreter(|i| {
        run_attached(i, "signals", &["wl.signals:f"]).assert_counts(&[("wl.signals:f", 20_000)]);
    });
}

#[test]
fn closures() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "closures", &["wl.closures:make", "wl.closures:make.<locals>.inner"]);
        s.assert_counts(&[("wl.closures:make", 3), ("wl.closures:make.<locals>.inner", 12)]);
    });
}

#[test]
fn four_threads_at_once() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "threads", &["wl.threads:work", "wl.threads:loop"]);
        s.assert_counts(&[("wl.threads:work", 1000), ("wl.threads:loop", 4)]);
        let tids: std::collections::BTreeSet<u64> =
            s.hits.iter().filter(|h| h["target"] == "wl.threads:work").map(|h| h["tid"].as_u64().unwrap()).collect();
        assert_eq!(tids.len(), 4, "hits from 4 distinct threads");
        if i.free_threaded {
            // No GIL: they run at once, and each thread's first call of each
            // target starts on the main copy of its bytecode, whose RESUME
            // moves it to the thread's own copy uncounted: 4 threads, 2
            // targets.
            let skips = s.stats["redispatch_skips"].as_u64().unwrap();
            assert!(skips >= 8, "{}: {skips} passes moved to a thread's copy", i.name);
        }
    });
}

#[test]
fn thread_already_looping_before_attach() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "looping", &["wl.looping:tick"]);
        s.assert_counts(&[("wl.looping:tick", 100)]);
    });
}

#[test]
fn module_imported_and_functions_defined_after_attach() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "late_import", &["wl.late:f", "wl.late:C.m", "wl.dynamic:dyn"]);
        s.assert_counts(&[("wl.late:f", 9), ("wl.late:C.m", 2), ("wl.dynamic:dyn", 5)]);
    });
}

#[test]
fn hits_carry_file_and_line() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "plain", &["wl.plain:g"]);
        s.assert_counts(&[("wl.plain:g", 3)]);
        // `dump` reports every hit.
        assert_eq!((s.hits.len(), &s.stats["hit_records"]), (3, &serde_json::json!(3)), "{}", i.name);
        for h in &s.hits {
            assert_eq!(h["qualname"], "g");
            assert_eq!(h["module"], "wl.plain");
            assert_eq!(h["lineno"], 5, "{h}");
            assert!(h["filename"].as_str().unwrap().ends_with("wl/plain.py"), "{h}");
            assert!(h["ts_ns"].as_u64().unwrap() > 0);
        }
    });
}

#[test]
fn tracing_and_monitoring_switched_on_and_off() {
    for_each_interpreter(|i| {
        let s = run_attached(i, "traced", &["wl.traced:target", "wl.traced:tracer"]);
        // sys.monitoring (3.12+) adds a round of 5 calls.
        let calls = if i.minor >= 12 { 25 } else { 20 };
        let target = s.count("wl.traced:target");
        assert_eq!(target, calls, "stats: {}", s.stats);
        if i.minor >= 12 {
            // The passes re-instrumentation undid were seen, and not counted.
            assert!(s.stats["redispatch_skips"].as_u64().unwrap() > 0, "stats: {}", s.stats);
        }
        // The tracer is called for each traced call event (at least once per call).
        assert!(s.count("wl.traced:tracer") >= 5, "tracer: {}", s.count("wl.traced:tracer"));
    });
}

#[test]
fn more_targets_than_a_process_has_cells_each_counted_exactly() {
    for_each_interpreter(|i| {
        // The kernel counts a process's first 8 targets hit in per-CPU cells
        // and the others in a shared map: all exact, none mixed up.
        let names: Vec<String> = (0..12).map(|k| format!("wl.many:t{k}")).collect();
        let targets: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut fixture = Fixture::start(i, "many");
        fixture.go();
        let dump = Dump::attach(fixture.pid(), &targets);
        for k in 0..12 {
            fixture.call(&format!("t{k}"), k + 1);
        }
        let s = dump.stop();
        fixture.finish();
        let want: Vec<(&str, u64)> = targets.iter().zip(1..).map(|(t, n)| (*t, n)).collect();
        s.assert_counts(&want);
    });
}

#[test]
fn a_code_object_freed_and_its_address_reused_gets_a_new_verdict() {
    for_each_interpreter(|i| {
        // A decoy's code object freed and the target made at its address,
        // and back, four times: what the CPUs cached for the address (or the
        // instructions in it) must not outlive the code object.
        let mut fixture = Fixture::start(i, "reuse");
        fixture.go();
        let dump = Dump::attach_with(fixture.pid(), &["wl.reuse:f"], &["--strategy", "per-call"]);
        let mut addresses = Vec::new();
        for _ in 0..4 {
            for name in ["g", "f"] {
                let reply = fixture.ask(&format!("{name} 3"));
                addresses.push(reply.strip_prefix("ok ").unwrap_or_else(|| panic!("{reply}")).to_owned());
            }
        }
        let s = dump.stop();
        fixture.finish();
        // Worth its name only if the allocator did reuse the address.
        assert!(addresses.windows(2).any(|w| w[0] == w[1]), "{}: no address reused: {addresses:?}", i.name);
        s.assert_counts(&[("wl.reuse:f", 12)]);
    });
}

#[test]
fn reachability_counts_every_call_and_records_few() {
    for_each_interpreter(|i| {
        const F: &str = "wl.rounds:f";
        let mut fixture = Fixture::start(i, "rounds");
        // Each CPU counts its own share: on one CPU, one share.
        fixture.pin(0);
        fixture.go();
        let mut det = run_reaching(fixture.pid(), &[F], &["--strategy", "per-call"]);
        fixture.call("f", 100);
        det.wait_hits(F, 1);
        let s = det.stop();
        fixture.finish();
        // Per-call probes keep counting exactly; the kernel writes a record
        // only when the CPU's count reaches 1, 2, 4, ..., 64 (fewer if 3.8-3.10
        // counted the first calls as pending), and one hit line is printed.
        assert_eq!((s.count(F), s.hits.len()), (100, 1), "{}", i.name);
        let records = s.stats["hit_records"].as_u64().unwrap();
        assert!((1..=7).contains(&records), "{}: {records} records for 100 hits", i.name);
    });
}
