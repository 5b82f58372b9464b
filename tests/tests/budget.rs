//! The overhead budget: `run` measures what each watched process pays for
//! its probes (passes per second times the cost of a pass, measured at
//! start) and moves a process over budget to a cheaper strategy, saying so in
//! its logs, `/processes` and `/metrics`; counts stay exact across a switch
//! from per-call probes to watchpoints. The workload (`wl/hot.py`) calls a
//! function in bursts of 20,000 and the target once a burst: per-call probes
//! cost it far more than the budget, watchpoints far less.

use std::collections::BTreeMap;

use detector::agent::report::{ModeReport, TargetStrategy};

use detector_tests::{
    Fixture, NodeAgent, env, interpreters,
    node_agent::{one_at_a_time, opted_in},
};

const TARGET: &str = "wl.hot:target";

/// Runs `hot` under an agent watching `targets` with `args`; returns (agent,
/// fixture) once the fixture is attached and running.
fn start(i: &detector_tests::Interpreter, targets: &[&str], args: &[&str]) -> (NodeAgent, Fixture) {
    let mut agent = NodeAgent::start(targets, args);
    let mut fixture = Fixture::start_with_env(i, "hot", &env(&opted_in("hot")));
    agent.wait_attached(fixture.pid());
    fixture.go();
    (agent, fixture)
}

#[test]
fn per_call_over_budget_moves_to_watch_and_counts_stay_exact() {
    let _turn = one_at_a_time();
    // Free-threaded builds have no watch strategy to move to.
    for i in interpreters().iter().filter(|i| i.rootfs.is_none() && !i.free_threaded) {
        let (mut agent, mut fixture) = start(i, &[TARGET], &["--strategy", "per-call", "--overhead-budget", "1"]);
        let pid = fixture.pid();
        agent.wait_metric(r#"detector_budget_actions_total{action="watch"}"#, 1.0);
        let p = agent.process(pid).expect("in /processes");
        assert_eq!(p.strategy, "watch", "{}: {p:?}", i.name);
        assert_eq!(p.targets_by_strategy, BTreeMap::from([(TargetStrategy::Watch, 1)]), "{}: {p:?}", i.name);
        // The per-call uprobes are closed; the deallocation and
        // module-execution probes stay.
        assert_eq!(p.probes, 2, "{}: {p:?}", i.name);
        let note = p.budget.unwrap_or_default();
        assert!(note.starts_with("watch: ") && note.ends_with("under per-call"), "{}: {note}", i.name);
        // It keeps the watch strategy: a target call per burst is cheap.
        let line = fixture.read_line();
        let calls: u64 = line.strip_prefix("target_calls ").unwrap().parse().unwrap();
        fixture.wait_done();
        fixture.finish();
        let summary = agent.events.wait_match("summary", |v| v["type"] == "summary" && v["pid"] == pid);
        assert_eq!(summary["hits"], calls, "{}: every call counted once across the switch", i.name);
        assert_eq!(agent.metric(r#"detector_budget_actions_total{action="watch"}"#), 1.0, "{}", i.name);
        assert_eq!(agent.metric(r#"detector_budget_actions_total{action="suspend"}"#), 0.0, "{}", i.name);
        agent.events.stop();
    }
}

#[test]
fn within_budget_nothing_changes() {
    let _turn = one_at_a_time();
    let i = interpreters().into_iter().find(|i| i.name.starts_with("pyenv") && i.minor == 12).unwrap();
    // Ten CPUs: more than any process can spend.
    let (mut agent, mut fixture) = start(&i, &[TARGET], &["--strategy", "per-call", "--overhead-budget", "1000"]);
    let pid = fixture.pid();
    let line = fixture.read_line();
    let p = agent.process(pid).expect("in /processes");
    assert_eq!(p.strategy, "per-call", "{p:?}");
    assert_eq!(p.targets_by_strategy, BTreeMap::from([(TargetStrategy::PerCall, 1)]), "{p:?}");
    let share = p.overhead_percent.expect("measured");
    // Measured, and far from free (a loaded machine may inflate the cost
    // measured at start, so no upper bound is asserted).
    assert!(share > 0.5, "per-call probes on a call-heavy loop: {share}% of a CPU");
    assert!(p.budget.is_none(), "{p:?}");
    fixture.wait_done();
    fixture.finish();
    let calls: u64 = line.strip_prefix("target_calls ").unwrap().parse().unwrap();
    let summary = agent.events.wait_match("summary", |v| v["type"] == "summary" && v["pid"] == pid);
    assert_eq!(summary["hits"], calls);
    agent.events.stop();
}

#[test]
fn over_budget_without_a_cheaper_strategy_suspends_then_tries_again() {
    let _turn = one_at_a_time();
    // A target whose bytecode 3.10 shares with another function:
    // watchpoints cannot tell its starts apart, so nothing is cheaper than
    // per-call. (A target not defined yet is no obstacle: it costs nothing
    // until its module runs.)
    let i = interpreters().into_iter().find(|i| i.name.starts_with("pyenv") && i.minor == 10).unwrap();
    let args = ["--strategy", "per-call", "--overhead-budget", "0.5", "--budget-retry", "2"];
    let (agent, mut fixture) = start(&i, &[TARGET, "wl.hot:twin"], &args);
    let pid = fixture.pid();
    agent.wait_metric(r#"detector_budget_actions_total{action="suspend"}"#, 1.0);
    let p = agent.process(pid).expect("in /processes");
    assert_eq!(p.strategy, "suspended", "{p:?}");
    // Every target is blind while it is suspended, and it says why.
    assert_eq!(p.targets_by_strategy, BTreeMap::from([(TargetStrategy::None, 2)]), "{p:?}");
    // Only the guards: code deallocation, and the JIT's start where built in.
    assert_eq!(p.probes, i.guards(), "{p:?}");
    let ModeReport::Suspended { why, .. } = &p.mode else { panic!("not suspended: {p:?}") };
    assert!(why.contains("over budget") && why.contains("wl.hot:twin"), "{why}");
    agent.wait_metric(r#"detector_processes_by_strategy{strategy="suspended"}"#, 1.0);
    // After --budget-retry it is probed (and measured) again.
    agent.wait_metric(r#"detector_budget_actions_total{action="resume"}"#, 1.0);
    agent.wait_metric(r#"detector_budget_actions_total{action="suspend"}"#, 2.0);
    // The process never noticed.
    let line = fixture.read_line();
    assert!(line.starts_with("target_calls "), "{line}");
    fixture.wait_done();
    fixture.finish();
    agent.events.stop();
}
