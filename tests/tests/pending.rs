//! 3.8-3.10 code objects whose starts await resolution: the kernel counts
//! them apart from everything else, a bounded number per process, and
//! hands them to user space as they are resolved or freed. Each test
//! asserts exact counts of its own process.

use detector_tests::{
    Fixture, NodeAgent, env,
    node_agent::{one_at_a_time, opted_in},
    pyenv,
};

/// A process on 3.8 that starts 1,000 code objects awaiting resolution,
/// many times its share of the kernel's map of them: each is resolved,
/// folded out of the map, and its room given back, so every start counts.
#[test]
fn resolved_code_objects_give_their_room_back() {
    let _turn = one_at_a_time();
    const UNNAMED: &str = "wl.unnamed:f";
    let args = ["--strategy", "per-call", "--reachability", "false", "--overhead-budget", "0"];
    let mut agent = NodeAgent::start(&[UNNAMED], &args);
    let mut many = Fixture::start_with_env(&pyenv(8), "unnamed_many", &env(&opted_in("many")));
    let pid = many.pid();
    agent.wait_attached(pid);
    many.go();
    many.wait_done();
    agent.wait_hits(pid, 1000);
    let report = agent.process(pid).expect("watched");
    assert_eq!(report.starts_refused, 0, "{report:?}");
    many.finish();
    let summary =
        agent.events.wait_match("the summary", |v| v["type"] == "summary" && v["pid"] == pid && v["target"] == UNNAMED);
    assert_eq!(summary["hits"], 1000, "{summary}");
    assert_eq!(agent.events.stop_with(libc::SIGTERM).code, Some(0));
}

/// A process on 3.9 whose code objects awaiting resolution are freed one
/// after another, the next allocated where the last one was, half of them
/// the target's and half a namesake's: each is resolved as itself, and the
/// counts are exact.
#[test]
fn a_code_object_allocated_where_a_freed_one_was_counts_apart() {
    let _turn = one_at_a_time();
    const UNNAMED: &str = "wl.unnamed:f";
    let args = ["--strategy", "per-call", "--reachability", "false", "--overhead-budget", "0"];
    let mut agent = NodeAgent::start(&[UNNAMED], &args);
    let mut churn = Fixture::start_with_env(&pyenv(9), "unnamed_churn", &env(&opted_in("churn")));
    let pid = churn.pid();
    agent.wait_attached(pid);
    churn.go();
    churn.wait_done();
    agent.wait_hits(pid, 50);
    churn.finish();
    let summary =
        agent.events.wait_match("the summary", |v| v["type"] == "summary" && v["pid"] == pid && v["target"] == UNNAMED);
    assert_eq!(summary["hits"], 50, "{summary}");
    assert_eq!(agent.events.stop_with(libc::SIGTERM).code, Some(0));
}
