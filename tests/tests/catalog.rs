//! Real catalogs under the watch strategy: most targets' modules are never
//! imported (they cost nothing), some are imported after the attach (found
//! as their module body runs, before its functions exist, and armed at
//! once), and a process may have more body starts than debug registers
//! (shared over time under reachability).

use detector::agent::report::TargetStrategy;
use detector_tests::{
    Dump, Fixture, Interpreter, attached_report, for_each_watchable_interpreter, run_reaching, watching,
};
use serde_json::Value;

/// Waits for `armed` lines naming every one of `targets`; returns them.
fn wait_armed(d: &mut Dump, targets: &[&str]) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut left: Vec<&str> = targets.to_vec();
    while !left.is_empty() {
        let line = d.wait_match(&format!("armed {left:?}"), |v| {
            v["type"] == "armed" && v["targets"].as_array().unwrap().iter().any(|t| left.contains(&t.as_str().unwrap()))
        });
        left.retain(|t| !line["targets"].as_array().unwrap().iter().any(|n| n == t));
        lines.push(line);
    }
    lines
}

/// `dump` (exact counts) attached before `wl.lazy_mod` and `wl.lazy_thread`
/// are imported: every target is pending at first, at no cost.
fn attach_before_imports(i: &Interpreter, targets: &[&str]) -> (Fixture, Dump) {
    let mut fixture = Fixture::start(i, "lazy");
    fixture.go();
    // The watch module's decisions are logged: a failure shows them.
    let d = Dump::attach_with(
        fixture.pid(),
        targets,
        &["--strategy", "watch", "--log-level", "warn,detector::agent=debug"],
    );
    let attached = attached_report(&d.seen[0]);
    assert_eq!(attached.process.strategy, "watch", "{}: {attached:?}", i.name);
    // The guards and the module-execution probe: nothing per call.
    assert_eq!(attached.process.probes, i.guards() + 1, "{}: {attached:?}", i.name);
    assert_eq!(watching(&attached.process).2, targets.len(), "{}: {attached:?}", i.name);
    for t in targets {
        assert_eq!(attached.target_strategies[*t], TargetStrategy::Pending, "{}: {attached:?}", i.name);
    }
    (fixture, d)
}

#[test]
fn targets_imported_later_are_armed_as_their_module_runs_and_counted_exactly() {
    for_each_watchable_interpreter(|i| {
        const F: &str = "wl.lazy_mod:f";
        const PROP: &str = "wl.lazy_mod:C.prop";
        const INNER: &str = "wl.lazy_mod:make.<locals>.inner";
        const G: &str = "wl.lazy_thread:g";
        let (mut fixture, mut d) = attach_before_imports(i, &[F, PROP, INNER, G]);
        assert_eq!(fixture.ask("import wl.lazy_mod"), "ok");
        assert_eq!(fixture.ask("thread wl.lazy_thread"), "ok");
        for line in wait_armed(&mut d, &[F, PROP, INNER, G]) {
            // Found in the module's code objects as its body started, or,
            // if the body was over before the agent looked (a loaded
            // machine), in `sys.modules` right after.
            let source = line["source"].as_str().unwrap();
            assert!(["module body", "module ran"].contains(&source), "{}: {line}", i.name);
        }
        fixture.call("lazy_mod:use_f", 3);
        fixture.call("lazy_mod:use_prop", 2);
        fixture.call("lazy_mod:use_inner", 4);
        fixture.call("lazy_thread:use_g", 5);
        let s = d.stop();
        fixture.finish();
        s.assert_counts(&[(F, 3), (PROP, 2), (INNER, 4), (G, 5)]);
    });
}

#[test]
fn a_method_and_a_function_made_by_exec_are_found_as_their_code_runs() {
    for_each_watchable_interpreter(|i| {
        const M: &str = "wl.lazy_mod:C.m";
        const DYN: &str = "wl.lazy_mod:dyn";
        let (mut fixture, mut d) = attach_before_imports(i, &[M, DYN]);
        assert_eq!(fixture.ask("import wl.lazy_mod"), "ok");
        wait_armed(&mut d, &[M, DYN]);
        fixture.call("lazy_mod:use_m", 6);
        fixture.call("lazy_mod:use_dyn", 7);
        let s = d.stop();
        fixture.finish();
        s.assert_counts(&[(M, 6), (DYN, 7)]);
    });
}

#[test]
fn a_catalog_whose_modules_are_never_imported_costs_nothing() {
    for_each_watchable_interpreter(|i| {
        let mut targets: Vec<String> = (0..50).map(|n| format!("wl.absent{n}:Handler.f{n}")).collect();
        targets.extend(["plistlib:loads", "tarfile:TarFile.extractall", "mailbox:Maildir.add"].map(String::from));
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let mut fixture = Fixture::start(i, "lazy");
        fixture.go();
        // The node agent's defaults: reachability, an overhead budget, auto.
        let mut d = run_reaching(fixture.pid(), &targets, &["--strategy", "auto", "--overhead-budget", "1"]);
        let attached = attached_report(d.seen.iter().find(|v| v["type"] == "attached").unwrap()).process;
        assert_eq!(attached.strategy, "watch+reachability", "{}: {attached:?}", i.name);
        assert_eq!(attached.probes, i.guards() + 1, "{}: {attached:?}", i.name);
        let (units, _, pending) = watching(&attached);
        assert_eq!((units, pending), (0, targets.len()), "{}: {attached:?}", i.name);
        // Call-heavy for longer than the budget's window: no probe runs,
        // so nothing moves it anywhere.
        assert_eq!(fixture.ask("busy 4"), "ok");
        d.poll();
        let moved: Vec<&Value> = d.seen.iter().filter(|v| v["type"] == "strategy").collect();
        assert!(moved.is_empty(), "{}: {moved:?}", i.name);
        let s = d.stop();
        fixture.finish();
        assert_eq!(s.stats["hits"], 0, "{}: {}", i.name, s.stats);
        assert!(s.hits.is_empty());
    });
}

#[test]
fn eight_hot_targets_share_the_debug_registers_and_are_all_reported() {
    for_each_watchable_interpreter(|i| {
        let targets: Vec<String> = (0..8).map(|n| format!("wl.hot8:h{n}")).collect();
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let mut fixture = Fixture::start(i, "hot8");
        fixture.go();
        let mut d = run_reaching(fixture.pid(), &targets, &["--strategy", "watch"]);
        let attached = attached_report(d.seen.iter().find(|v| v["type"] == "attached").unwrap()).process;
        assert_eq!(attached.strategy, "watch+reachability", "{}: {attached:?}", i.name);
        let (units, rotating, _) = watching(&attached);
        assert_eq!((units, rotating), (8, true), "{}: {attached:?}", i.name);
        // 10 ms apart for over a second: every target is called while a
        // register watches it.
        fixture.call("rounds", 120);
        for t in &targets {
            d.wait_hits(t, 1);
        }
        let s = d.stop();
        fixture.finish();
        // Reported once each.
        assert_eq!(s.hits.len(), 8, "{}: {:?}", i.name, s.hits);
    });
}

#[test]
fn one_off_calls_of_more_targets_than_registers_are_all_reported() {
    for_each_watchable_interpreter(|i| {
        let called: Vec<String> = (0..12).map(|n| format!("wl.once:o{n}")).collect();
        let mut targets: Vec<&str> = called.iter().map(String::as_str).collect();
        targets.extend(["wl.once:d0", "wl.once:d1"]);
        let mut fixture = Fixture::start(i, "once");
        fixture.go();
        let mut d = run_reaching(fixture.pid(), &targets, &["--strategy", "watch"]);
        let attached = attached_report(d.seen.iter().find(|v| v["type"] == "attached").unwrap()).process;
        let (units, rotating, _) = watching(&attached);
        assert_eq!((units, rotating), (14, true), "{}: {attached:?}", i.name);
        // Each once: at most four of them have a register as they run; the
        // others are seen from their code objects' warm-up marks.
        fixture.call("all", 1);
        for t in &called {
            d.wait_hits(t, 1);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let s = d.stop();
        fixture.finish();
        // Reported once each, counted once each (a reach seen from a mark
        // counts one), the decoys not at all.
        let expected: Vec<(&str, u64)> = targets.iter().map(|t| (*t, u64::from(!t.contains(":d")))).collect();
        s.assert_counts(&expected);
    });
}
