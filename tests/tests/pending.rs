//! 3.8-3.10 code objects whose starts await resolution: the kernel counts
//! them apart from everything else, a bounded number per process, and
//! hands them to user space as they are resolved or freed. Each test
//! asserts exact counts of its own process.

use detector::agent::report::ProcessReport;
use detector_tests::{
    Fixture, NodeAgent, env,
    node_agent::{one_at_a_time, opted_in},
    pyenv,
};

const UNNAMED: &str = "wl.unnamed:f";

/// Runs `fixture` on 3.`minor` under an agent probing per call: its report
/// once its `hits` are in, and the hits of its summary.
fn run(minor: u8, fixture: &str, hits: usize) -> (ProcessReport, u64) {
    let _turn = one_at_a_time();
    let args = ["--strategy", "per-call", "--reachability", "false", "--overhead-budget", "0"];
    let mut agent = NodeAgent::start(&[UNNAMED], &args);
    let mut f = Fixture::start_with_env(&pyenv(minor), fixture, &env(&opted_in(fixture)));
    let pid = f.pid();
    agent.wait_attached(pid);
    f.go();
    f.wait_done();
    agent.wait_hits(pid, hits);
    let report = agent.process(pid).expect("watched");
    f.finish();
    let summary =
        agent.events.wait_match("the summary", |v| v["type"] == "summary" && v["pid"] == pid && v["target"] == UNNAMED);
    assert_eq!(agent.events.stop_with(libc::SIGTERM).code, Some(0));
    (report, summary["hits"].as_u64().expect("a count"))
}

/// A process on 3.8 that starts 1,000 code objects awaiting resolution,
/// many times its share of the kernel's map of them: each is resolved,
/// folded out of the map, and its room given back, so every start counts.
#[test]
fn resolved_code_objects_give_their_room_back() {
    let (report, hits) = run(8, "unnamed_many", 1000);
    assert_eq!(report.starts_refused, 0, "{report:?}");
    assert_eq!(hits, 1000);
}

/// A process on 3.9 whose code objects awaiting resolution are freed one
/// after another, the next allocated where the last one was, half of them
/// the target's and half a namesake's: each is resolved as itself, and the
/// counts are exact.
#[test]
fn a_code_object_allocated_where_a_freed_one_was_counts_apart() {
    let (_, hits) = run(9, "unnamed_churn", 50);
    assert_eq!(hits, 50);
}
