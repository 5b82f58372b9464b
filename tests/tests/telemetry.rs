//! Reporting to Datadog as the tracers do: each watched process is a
//! runtime at a real `ddapm-test-agent`'s telemetry intake, with the
//! catalog dependencies it has installed and where each advisory was first
//! reached, read back from the test agent. The processes run `six` 1.16.0
//! (affected by the catalog's advisory) and 1.17.0 (not) from PyPI.

use detector::{
    agent::report::{AttachedReport, ProcessReport},
    telemetry::wire::{Dependency, Envelope, Metadata, Payload, Reachability, Reached},
};
use detector_tests::{
    Dump, Fixture, TestAgent, env,
    interpreters::dist_venv as venv,
    node_agent::{one_at_a_time, opted_in},
    spawn_with_env,
};
use serde_json::json;

const SIX: &str = "six:ensure_str";
const CATALOG: &str = "datadog/2/SCA_DETECTION/sca-catalog/config";

fn catalog() -> serde_json::Value {
    json!({"targets": [
        {"id": "vuln-six", "targets": [SIX], "lang": "python", "dependency_name": "six",
         "package_versions": ["<1.17.0"], "vulnerability": {"id": "CVE-0000-0001", "severity": "LOW"}},
    ]})
}

/// `run` discovering opted-in processes, with `args` and `env`; heartbeats
/// every second.
fn node(args: &[&str], extra_env: &[(&str, &str)]) -> Dump {
    let mut argv: Vec<String> =
        ["run", "--events", "json", "--tap", "none", "--log-format", "json"].into_iter().map(String::from).collect();
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut environment = vec![("DD_SCA_DETECTION_ENABLED", "true"), ("DD_TELEMETRY_HEARTBEAT_INTERVAL", "1")];
    environment.extend_from_slice(extra_env);
    let mut dump = spawn_with_env(&argv, &environment);
    dump.wait_for("discovering");
    dump
}

fn attached(dump: &mut Dump, pid: u32) -> AttachedReport {
    let line = dump.wait_match("attached line", |v| v["type"] == "attached" && v["pid"] == pid);
    serde_json::from_value(line).unwrap()
}

/// Every payload sent for `runtime`, in order, batches unpacked.
fn payloads(all: &[Envelope], runtime: &str) -> Vec<Payload> {
    fn unpack(p: &Payload, out: &mut Vec<Payload>) {
        match p {
            Payload::MessageBatch(items) => items.iter().for_each(|i| unpack(i, out)),
            other => out.push(other.clone()),
        }
    }
    let mut out = Vec::new();
    all.iter().filter(|e| e.runtime_id == runtime).for_each(|e| unpack(&e.payload, &mut out));
    out
}

/// Each `app-dependencies-loaded` sent for `runtime`, in order.
fn dependency_reports(all: &[Envelope], runtime: &str) -> Vec<Vec<Dependency>> {
    let loaded = payloads(all, runtime).into_iter().filter_map(|p| match p {
        Payload::AppDependenciesLoaded(d) => Some(d.dependencies),
        _ => None,
    });
    loaded.collect()
}

/// Each reachability entry sent for `runtime` that says it was reached.
fn reaches(all: &[Envelope], runtime: &str) -> Vec<Reachability> {
    let deps = dependency_reports(all, runtime).into_iter().flatten();
    let entries = deps.flat_map(|d| d.metadata).filter_map(|m| m.as_reachability());
    entries.filter(|r| !r.reached.is_empty()).collect()
}

fn count(all: &[Envelope], runtime: &str, request_type: &str) -> usize {
    payloads(all, runtime).iter().filter(|p| p.request_type() == request_type).count()
}

/// The reach as the fixture makes it: `six_call` calls `six.ensure_str`.
fn six_reached() -> Reachability {
    let path = detector_tests::fixtures_dir().join("wl/dist_calls.py").display().to_string();
    let source = std::fs::read_to_string(&path).unwrap();
    let line = source.lines().position(|l| l.contains("six.ensure_str(\"x\")")).unwrap() as u32 + 1;
    let at = Reached { path, symbol: "six_call".into(), line };
    Reachability { id: "vuln-six".into(), reached: vec![at] }
}

#[test]
fn findings_reach_the_intake_as_the_tracer_reports_them() {
    let _turn = one_at_a_time();
    let agent = TestAgent::start();
    agent.set_config(CATALOG, &catalog());
    let url = agent.url();
    let metrics = format!("127.0.0.1:{}", detector_tests::free_port());
    let args = ["--rc-agent", &url, "--metrics-addr", &metrics];
    let mut detector = node(&args, &[("DD_REMOTE_CONFIG_POLL_INTERVAL_SECONDS", "0.2")]);
    let identity = opted_in("telemetry-app");
    let mut old = Fixture::start_with_env(&venv("old"), "dist_calls", &env(&identity));
    let mut new = Fixture::start_with_env(&venv("new"), "dist_calls", &env(&identity));
    old.go();
    new.go();
    let a = attached(&mut detector, old.pid());
    let b = attached(&mut detector, new.pid());
    let (old_rt, new_rt) = (a.process.runtime_id.clone(), b.process.runtime_id.clone());
    let loaded = |all: &[Envelope]| [&old_rt, &new_rt].iter().all(|rt| !dependency_reports(all, rt).is_empty());
    let all = agent.wait_telemetry("both processes' dependencies", loaded);
    // Exactly what the tracer sends: the affected version with its
    // advisory registered, unreached; the other without it.
    let registered = Dependency {
        name: "six".into(),
        version: "1.16.0".into(),
        metadata: vec![Metadata::reachability("vuln-six", None)],
    };
    assert_eq!(dependency_reports(&all, &old_rt)[0], [registered]);
    let unaffected = Dependency { name: "six".into(), version: "1.17.0".into(), metadata: vec![] };
    assert_eq!(dependency_reports(&all, &new_rt)[0], [unaffected]);
    for rt in [&old_rt, &new_rt] {
        assert!(matches!(payloads(&all, rt).first(), Some(Payload::AppStarted(_))), "app-started comes first");
    }

    old.call("six", 3);
    new.call("six", 4);
    detector.wait_match("the hit", |v| v["type"] == "hit" && v["pid"] == old.pid());
    let all = agent.wait_telemetry("the reach", |all| !reaches(all, &old_rt).is_empty());
    assert_eq!(reaches(&all, &old_rt), [six_reached()]);
    // Sent again whole: the dependency with its version.
    let last = dependency_reports(&all, &old_rt).pop().unwrap();
    assert_eq!((last[0].name.as_str(), last[0].version.as_str()), ("six", "1.16.0"));
    assert!(reaches(&all, &new_rt).is_empty(), "1.17.0 is not affected: {all:#?}");
    // The same caller on the hit line and in `/processes`.
    let hit = detector.wait_match("the hit", |v| v["type"] == "hit" && v["pid"] == old.pid());
    assert_eq!(serde_json::from_value::<Reached>(hit["caller"].clone()).unwrap(), six_reached().reached[0]);
    let processes: Vec<ProcessReport> =
        ureq::get(&format!("http://{metrics}/processes")).call().unwrap().into_json().unwrap();
    let p = processes.iter().find(|p| p.pid == old.pid()).unwrap();
    assert_eq!(p.callers[SIX], six_reached().reached[0]);

    let envelope = all.iter().find(|e| e.runtime_id == old_rt).unwrap();
    let app = &envelope.application;
    assert_eq!(
        (app.service_name.as_str(), app.env.as_deref(), app.service_version.as_deref()),
        ("telemetry-app", Some("test"), Some("1.0"))
    );
    assert_eq!((app.language_name.as_str(), app.language_version.as_str()), ("python", a.process.version.as_str()));
    assert!(app.tracer_version.starts_with("detector/"), "{app:?}");
    assert!(!envelope.host.hostname.is_empty());
    assert_eq!(envelope.api_version, "v2");

    // Alive, then gone.
    agent.wait_telemetry("heartbeats", |all| count(all, &old_rt, "app-heartbeat") > 0);
    old.finish();
    let all = agent.wait_telemetry("the closing", |all| count(all, &old_rt, "app-closing") > 0);
    assert_eq!(count(&all, &old_rt, "app-closing"), 1);
    assert_eq!(count(&all, &old_rt, "app-started"), 1);
    let seqs: Vec<u64> = all.iter().filter(|e| e.runtime_id == old_rt).map(|e| e.seq_id).collect();
    // Listed by `seq_id`: strictly increasing means each request has its own.
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq_id once each: {seqs:?}");
    // The headers the tracers send, naming what each body is.
    for (headers, body) in agent.telemetry_requests() {
        assert_eq!(headers["dd-telemetry-api-version"], "v2");
        assert_eq!(headers["dd-telemetry-request-type"], body["request_type"].as_str().unwrap());
        assert_eq!(headers["dd-client-library-language"], "python");
        assert!(headers["dd-client-library-version"].starts_with("detector/"), "{headers:?}");
    }
    new.finish();
    detector.stop();
}

#[test]
fn reports_made_while_the_intake_is_down_arrive_once_it_is_back() {
    let _turn = one_at_a_time();
    let mut agent = TestAgent::start();
    agent.stop();
    let file = std::env::temp_dir().join(format!("detector-telemetry-{}.json", std::process::id()));
    std::fs::write(&file, catalog().to_string()).unwrap();
    let url = agent.url();
    let mut detector = node(&["--no-rc", "--targets", &file.display().to_string()], &[("DD_TRACE_AGENT_URL", &url)]);
    let identity = opted_in("telemetry-down");
    let mut app = Fixture::start_with_env(&venv("old"), "dist_calls", &env(&identity));
    app.go();
    let runtime = attached(&mut detector, app.pid()).process.runtime_id;
    app.call("six", 3);
    detector.wait_match("the hit", |v| v["type"] == "hit" && v["pid"] == app.pid());
    let deadline = std::time::Instant::now() + detector_tests::STEP_TIMEOUT;
    while !detector.stderr().contains("the telemetry intake does not answer") {
        assert!(std::time::Instant::now() < deadline, "no failure logged: {}", detector.stderr());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    agent.restart();
    let all = agent.wait_telemetry("the reach", |all| !reaches(all, &runtime).is_empty());
    app.finish();
    let all = {
        drop(all);
        agent.wait_telemetry("the closing", |all| count(all, &runtime, "app-closing") > 0)
    };
    // Everything, once: the start, the dependency with its reach, the end.
    assert_eq!(count(&all, &runtime, "app-started"), 1, "{all:#?}");
    assert_eq!(reaches(&all, &runtime), [six_reached()], "{all:#?}");
    assert_eq!(count(&all, &runtime, "app-closing"), 1, "{all:#?}");
    detector.stop();
    let _ = std::fs::remove_file(file);
}
