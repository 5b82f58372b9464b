//! `detector run` against a real `ddapm-test-agent`: targets follow Remote
//! Configuration live, malformed configs are reported per config while the
//! others keep working, tampered responses are rejected whole, and the
//! detector recovers when the agent restarts. Asserted both on the hits and
//! on what the agent received from the client.
//!
//! Run on one interpreter of each family (3.9: targets resolved through
//! identities; 3.12: RESUME sites), where target changes differ.

use detector::cli::targets::TargetsReport;
use detector_tests::{
    Dump, Fixture, Interpreter, TestAgent, interpreters,
    rc_agent::{cached_hash, config_states, response},
    spawn_with_env,
};
use serde_json::json;

const A: &str = "datadog/2/SCA_DETECTION/cfg-a/config";
const B: &str = "datadog/2/SCA_DETECTION/cfg-b/config";
const C: &str = "datadog/2/SCA_DETECTION/cfg-c/config";
const D: &str = "datadog/2/SCA_DETECTION/cfg-d/config";
const F: &str = "wl.rounds:f";
const G: &str = "wl.rounds:g";
const H: &str = "wl.rounds:h";

fn families() -> Vec<Interpreter> {
    interpreters().into_iter().filter(|i| i.name.starts_with("pyenv") && [9, 12].contains(&i.minor)).collect()
}

fn each_family(check: impl Fn(&Interpreter) + Sync) {
    let all = families();
    assert_eq!(all.len(), 2);
    std::thread::scope(|s| {
        let handles: Vec<_> = all.iter().map(|i| (i, s.spawn(|| check(i)))).collect();
        for (i, h) in handles {
            if let Err(e) = h.join() {
                std::panic::panic_any(format!("{}: {:?}", i.name, e.downcast_ref::<String>()));
            }
        }
    });
}

/// `detector run` on `pid`, polling `agent` five times a second.
fn run(agent: &TestAgent, pid: u32) -> Dump {
    let args: Vec<String> = ["run", "--rc-agent", &agent.url(), "--events", "json", "--pid", &pid.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut d = spawn_with_env(
        &args,
        &[("DD_SCA_DETECTION_ENABLED", "true"), ("DD_REMOTE_CONFIG_POLL_INTERVAL_SECONDS", "0.2")],
    );
    d.wait_for("attached");
    d
}

/// Calls `name` `n` times, then the sentinel `h` once and waits for its hit:
/// every hit of the round has then been read.
fn round(fixture: &mut Fixture, det: &mut Dump, calls: &[(&str, u32)], sentinel_hits: usize) {
    for (name, n) in calls {
        fixture.call(name, *n);
    }
    fixture.call("h", 1);
    det.wait_hits(H, sentinel_hits);
}

fn acknowledged(r: &serde_json::Value, id: &str) -> bool {
    config_states(r).iter().any(|(i, s, _)| i == id && *s == 2)
}

#[test]
fn targets_follow_configs_set_replaced_and_deleted() {
    each_family(|i| {
        let agent = TestAgent::start();
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let mut det = run(&agent, fixture.pid());

        agent.set_config(A, &json!({"targets": [F, H]}));
        let r = agent.wait_for_request("cfg-a acknowledged", |r| acknowledged(r, "cfg-a"));
        let first = cached_hash(&r, A).unwrap();
        round(&mut fixture, &mut det, &[("f", 5), ("g", 2)], 1);
        assert_eq!((det.hits(F), det.hits(G)), (5, 0));

        // Replaced: g is new, f is gone, h stays (and keeps counting).
        agent.set_config(A, &json!({"targets": [G, H]}));
        agent.wait_for_request("cfg-a's new content", |r| {
            acknowledged(r, "cfg-a") && cached_hash(r, A).is_some_and(|h| h != first)
        });
        round(&mut fixture, &mut det, &[("f", 3), ("g", 4)], 2);
        assert_eq!((det.hits(F), det.hits(G)), (5, 4));

        // Every config deleted: nothing is reported any more.
        agent.set_response(&response(1, &[], None));
        agent.wait_for_request("no configs", |r| config_states(r).is_empty());
        for name in ["f", "g", "h"] {
            fixture.call(name, 2);
        }
        let s = det.stop();
        assert_eq!(s.hits.iter().filter(|h| h["target"] == F).count(), 5);
        assert_eq!(s.hits.iter().filter(|h| h["target"] == G).count(), 4);
        assert_eq!(s.hits.iter().filter(|h| h["target"] == H).count(), 2);
        assert!(s.counts.is_empty(), "no active targets, no summaries: {:?}", s.counts);
        fixture.finish();
    });
}

#[test]
fn malformed_configs_are_reported_and_the_others_keep_working() {
    each_family(|i| {
        let agent = TestAgent::start();
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let mut det = run(&agent, fixture.pid());
        let good = json!({"targets": [F, H]}).to_string();
        agent.set_response(&response(
            1,
            &[
                (A, good.as_bytes()),
                (B, b"{\"targets\": [\"wl.rounds:g\""),
                (C, br#"{"targets": [1, "wl.rounds:g"]}"#),
                (D, br#"{"targets": ["wl.rounds:g", "no colon"]}"#),
            ],
            None,
        ));
        let r = agent.wait_for_request("every config applied or failed", |r| {
            let s = config_states(r);
            s.len() == 4 && s.iter().all(|(_, st, _)| *st == 2 || *st == 3)
        });
        let states = config_states(&r);
        let state = |id: &str| states.iter().find(|(i, _, _)| i == id).cloned().unwrap();
        assert_eq!(state("cfg-a").1, 2);
        for (id, reason) in
            [("cfg-b", "invalid JSON"), ("cfg-c", "must be a target string or an entry"), ("cfg-d", "whitespace")]
        {
            let (_, st, err) = state(id);
            assert_eq!(st, 3, "{id}");
            assert!(err.contains(reason), "{id}: {err:?} lacks {reason:?}");
        }
        round(&mut fixture, &mut det, &[("f", 2), ("g", 2)], 1);
        assert_eq!((det.hits(F), det.hits(G)), (2, 0));
        // A bad update of the good config: reported, and the good version
        // stays in force.
        agent.set_response(&response(2, &[(A, b"{\"targets\": [\"wl.rounds:f\"")], None));
        agent.wait_for_request("cfg-a's bad update reported", |r| {
            config_states(r).iter().any(|(id, st, _)| id == "cfg-a" && *st == 3)
        });
        round(&mut fixture, &mut det, &[("f", 3)], 2);
        assert_eq!(det.hits(F), 5, "cfg-a's last good version still counts f");
        det.stop();
        fixture.finish();
    });
}

#[test]
fn a_tampered_response_is_rejected_whole() {
    each_family(|i| {
        let agent = TestAgent::start();
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let mut det = run(&agent, fixture.pid());
        let first = json!({"targets": [F, H]}).to_string();
        agent.set_response(&response(1, &[(A, first.as_bytes())], None));
        agent.wait_for_request("cfg-a acknowledged", |r| acknowledged(r, "cfg-a"));

        // New content for A and a new config B, but B's bytes are not the
        // signed ones: nothing of it applies, and the error is reported.
        let second = json!({"targets": [G, H]}).to_string();
        let third = json!({"targets": [G]}).to_string();
        let tampered = json!({"targets": [F]}).to_string(); // as long as `third`
        agent.set_response(&response(
            2,
            &[(A, second.as_bytes()), (B, third.as_bytes())],
            Some((B, tampered.as_bytes())),
        ));
        let r = agent.wait_for_request("the error reported", |r| r["client"]["state"]["has_error"] == true);
        assert!(r["client"]["state"]["error"].as_str().unwrap().contains("sha256"), "{r}");
        assert_eq!(r["client"]["state"]["targets_version"], 1, "state unchanged");
        assert_eq!(config_states(&r).len(), 1);
        round(&mut fixture, &mut det, &[("f", 3), ("g", 3)], 1);
        assert_eq!((det.hits(F), det.hits(G)), (3, 0));

        // A length mismatch likewise.
        agent.set_response(&response(3, &[(A, second.as_bytes())], Some((A, b"{}"))));
        let r = agent.wait_for_request("the length error", |r| {
            r["client"]["state"]["error"].as_str().is_some_and(|e| e.contains("length"))
        });
        assert_eq!(r["client"]["state"]["targets_version"], 1);
        det.stop();
        fixture.finish();
    });
}

#[test]
fn recovers_when_the_agent_restarts() {
    each_family(|i| {
        let mut agent = TestAgent::start();
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let mut det = run(&agent, fixture.pid());
        agent.set_config(A, &json!({"targets": [F, H]}));
        let r = agent.wait_for_request("cfg-a acknowledged", |r| acknowledged(r, "cfg-a"));
        let first = cached_hash(&r, A).unwrap();
        round(&mut fixture, &mut det, &[("f", 1)], 1);

        agent.stop();
        // While it is gone the targets in place keep working.
        round(&mut fixture, &mut det, &[("f", 2)], 2);
        std::thread::sleep(std::time::Duration::from_secs(1));
        agent.restart();
        agent.set_config(A, &json!({"targets": [G, H]}));
        // The client's first requests to the restarted agent still report the
        // old content as applied: wait for the new content.
        agent.wait_for_request("the new config acknowledged", |r| {
            acknowledged(r, "cfg-a") && cached_hash(r, A).is_some_and(|h| h != first)
        });
        round(&mut fixture, &mut det, &[("g", 4), ("f", 1)], 3);
        assert_eq!((det.hits(F), det.hits(G)), (3, 4));
        det.stop();
        fixture.finish();
    });
}

#[test]
fn detection_is_off_unless_enabled() {
    let i = &families()[1];
    let mut fixture = Fixture::start(i, "rounds");
    fixture.go();
    let args: Vec<String> =
        ["run", "--target", F, "--pid", &fixture.pid().to_string()].iter().map(|s| s.to_string()).collect();
    let d = spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "false")]);
    fixture.call("f", 3);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let s = d.stop_with(libc::SIGTERM);
    assert_eq!(s.attached, serde_json::Value::Null, "nothing attached");
    assert!(s.hits.is_empty());
    fixture.finish();
}

#[test]
fn payload_files_are_watched() {
    let i = &families()[1];
    let dir = std::env::temp_dir().join(format!("detector-rc-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.json"), json!({"targets": [F, H]}).to_string()).unwrap();
    std::fs::write(dir.join("broken.json"), "{").unwrap();
    let mut fixture = Fixture::start(i, "rounds");
    fixture.go();
    let args: Vec<String> =
        ["run", "--targets", dir.to_str().unwrap(), "--events", "json", "--pid", &fixture.pid().to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut det = spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "1")]);
    det.wait_for("attached");
    round(&mut fixture, &mut det, &[("f", 2)], 1);
    // Rewritten: g replaces f. The change is picked up within a few seconds.
    std::fs::write(dir.join("a.json"), json!({"targets": [G, H]}).to_string()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while det.hits(G) == 0 {
        assert!(std::time::Instant::now() < deadline, "the file change was not picked up");
        fixture.call("g", 1);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (g_before, h_before) = (det.hits(G), det.hits(H));
    round(&mut fixture, &mut det, &[("f", 5), ("g", 2)], h_before + 1);
    assert_eq!((det.hits(F), det.hits(G)), (2, g_before + 2));
    det.stop();
    fixture.finish();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn targets_command_shows_every_config_and_where_each_target_comes_from() {
    let agent = TestAgent::start();
    let files =
        [(A, json!({"targets": [F, G]}).to_string()), (B, "not json".into()), (C, tracer_catalog().to_string())];
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_bytes())).collect();
    agent.set_response(&response(7, &files, None));
    let out = std::process::Command::new(detector_tests::detector_bin())
        .args(["targets", "--rc-agent", &agent.url(), "--target", F, "--format", "json", "--wait", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: TargetsReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.configs.len(), 4, "{report:?}");
    let config = |name: &str| report.configs.iter().find(|c| c.name == name).unwrap();
    assert_eq!(config(B).apply_state, "error");
    assert!(config(B).error.as_deref().unwrap().contains("invalid JSON"));
    assert_eq!(config(A).version, Some(7));
    let target = |name: &str| report.targets.iter().find(|t| t.target == name).unwrap();
    assert_eq!(target(F).configs.iter().collect::<Vec<_>>(), ["--target", A]);
    // The tracer's catalog: its advisory with its target, the entry for
    // another language skipped with the reason.
    let ids: Vec<_> = target(H).advisories.iter().map(|a| a.id.as_deref().unwrap()).collect();
    assert_eq!(ids, ["vuln-h"]);
    assert_eq!(target(H).advisories[0].versions, ["<2.32.0"]);
    assert_eq!(config(C).skipped.len(), 1);
    assert!(config(C).skipped[0].reason.contains("javascript"), "{:?}", config(C).skipped);
}

/// A catalog as dd-trace-py ships it: an entry for `H` and one for another
/// language.
fn tracer_catalog() -> serde_json::Value {
    json!({"targets": [
        {"id": "vuln-h", "targets": [H], "lang": "python", "dependency_name": "requests",
         "package_versions": ["<2.32.0"],
         "vulnerability": {"id": "CVE-2024-35195", "severity": "MEDIUM", "description": "cert checks"}},
        {"id": "vuln-js", "targets": ["x:y"], "lang": "javascript", "dependency_name": "lodash"}
    ]})
}

#[test]
fn the_tracers_catalog_arrives_by_remote_configuration_and_its_advisory_travels_with_hits() {
    each_family(|i| {
        let agent = TestAgent::start();
        let mut fixture = Fixture::start(i, "rounds");
        fixture.go();
        let mut det = run(&agent, fixture.pid());
        agent.set_config(A, &tracer_catalog());
        agent.wait_for_request("cfg-a acknowledged", |r| acknowledged(r, "cfg-a"));
        round(&mut fixture, &mut det, &[("f", 2)], 1);
        let s = det.stop();
        let hits: Vec<_> = s.hits.iter().filter(|h| h["target"] == H).collect();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0]["advisories"][0]["id"], "vuln-h", "{}", hits[0]);
        assert_eq!(hits[0]["advisories"][0]["vulnerability"]["id"], "CVE-2024-35195");
        assert_eq!(s.hits.iter().filter(|h| h["target"] == F).count(), 0);
        fixture.finish();
    });
}
