//! `detector run` as the node agent: it discovers processes by itself, in
//! containers too, watches only those that opted in, carries their service
//! identity on hits, follows forks and execs, detaches on exit, serves its
//! event stream to `dump`, and leaves nothing behind when stopped or killed.
//! Attachments are asserted through the agent's own reports (`attached`
//! lines, `/processes`, `/metrics`) and through the kernel (the perf events
//! and BPF links it holds; the int3 bytes in the watched process).

use std::{
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use detector_tests::{
    Fixture, NodeAgent, STEP_TIMEOUT, detector_bin, env, interpreters,
    node_agent::{kernel_objects, one_at_a_time, opted_in, site_bytes},
    pyenv, spawn_detector,
};
use serde_json::Value;

const F: &str = "wl.plain:f";
const G: &str = "wl.plain:g";

/// The exact summary the agent printed for `target` in `pid` once it ended.
fn summary(agent: &mut NodeAgent, pid: u32, target: &str) -> u64 {
    agent.events.wait_match(&format!("summary of {target} for {pid}"), |v| {
        v["type"] == "summary" && v["pid"] == pid && v["target"] == target
    })["hits"]
        .as_u64()
        .unwrap()
}

#[test]
fn agent_started_first_reports_hits_with_service_identity() {
    let _turn = one_at_a_time();
    let agent = Mutex::new(NodeAgent::start(&[F, G], &[]));
    let all = interpreters();
    assert!(all.iter().any(|i| i.rootfs.is_some()), "a chrooted interpreter is among them");
    std::thread::scope(|s| {
        for i in &all {
            let agent = &agent;
            s.spawn(move || {
                let service = format!("svc-{}", i.name);
                let mut fixture = Fixture::start_with_env(i, "plain", &env(&opted_in(&service)));
                let pid = fixture.pid();
                let attached = agent.lock().unwrap().wait_attached(pid);
                assert_eq!(attached["service"]["service"], service.as_str(), "{}", i.name);
                fixture.go();
                fixture.wait_done();
                fixture.finish();
                let mut a = agent.lock().unwrap();
                a.wait_exited(pid);
                assert_eq!((summary(&mut a, pid, F), summary(&mut a, pid, G)), (25, 3), "{}", i.name);
                let hits = a.lines("hit", pid);
                assert_eq!(hits.len(), 28, "{}: every hit reported", i.name);
                for h in hits {
                    assert_eq!(h["service"]["service"], service.as_str());
                    assert_eq!(
                        (h["service"]["env"].as_str(), h["service"]["version"].as_str()),
                        (Some("test"), Some("1.0"))
                    );
                }
            });
        }
    });
    let agent = agent.into_inner().unwrap();
    // Other opted-in processes on the machine may add to it, never take away.
    let sample = r#"detector_hits_total{target="wl.plain:f"}"#;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while agent.metric(sample) < 25.0 * all.len() as f64 {
        assert!(Instant::now() < deadline, "hits metric {}", agent.metric(sample));
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = agent.events.stop_with(libc::SIGTERM);
    assert_eq!(s.code, Some(0));
}

#[test]
fn processes_without_opt_in_are_never_probed() {
    let _turn = one_at_a_time();
    let i = pyenv(12);
    let mut agent = NodeAgent::start(&[F], &[]);
    let mut plain = Fixture::start(&i, "plain");
    let mut opted = Fixture::start_with_env(&i, "plain", &env(&opted_in("opted")));
    agent.wait_attached(opted.pid());
    // The refusal is counted in the metrics (refreshed every second).
    agent.wait_metric(r#"detector_processes_refused_total{reason="not_opted_in"}"#, 1.0);
    agent.wait_watched(opted.pid());
    assert!(!agent.watched().contains(&plain.pid()));
    // The strategy in use is in the agent's report and its metrics.
    let (_, processes) = agent.get("/processes");
    assert!(processes.contains(r#""strategy":"per-call""#), "{processes}");
    agent.wait_metric(r#"detector_processes_by_strategy{strategy="per-call"}"#, 1.0);
    for f in [&mut plain, &mut opted] {
        f.go();
        f.wait_done();
    }
    agent.wait_hits(opted.pid(), 25);
    assert!(agent.lines("attached", plain.pid()).is_empty());
    assert!(agent.lines("hit", plain.pid()).is_empty());
    agent.events.stop_with(libc::SIGTERM);

    // --attach-all: the same process is watched (found by the start-up scan).
    let mut all = NodeAgent::start(&[F], &["--attach-all"]);
    all.wait_attached(plain.pid());
    plain.finish();
    opted.finish();
}

#[test]
fn a_watched_process_exiting_is_detached_and_the_agent_stays_healthy() {
    let _turn = one_at_a_time();
    let i = pyenv(11);
    let mut agent = NodeAgent::start(&["wl.exits:f"], &[]);
    let before = agent.kernel_objects();
    let mut fixture = Fixture::start_with_env(&i, "exits", &env(&opted_in("exits")));
    let pid = fixture.pid();
    let attached = agent.wait_attached(pid);
    let probes = attached["probes"].as_u64().unwrap() as usize;
    let during = agent.kernel_objects();
    assert_eq!(during.0 + during.1, before.0 + before.1 + probes, "one link (or perf event) per probe");
    fixture.go();
    assert_eq!(fixture.wait_exit(), Some(0));
    agent.wait_exited(pid);
    agent.wait_metric("detector_processes_watched", 0.0);
    agent.wait_metric("detector_probes_attached", 0.0);
    agent.wait_kernel_objects(before); // every probe of the exited process released
    agent.wait_metric("detector_probes_detaching", 0.0);
    assert_eq!(agent.get("/healthz"), (200, "ok\n".to_owned()));
    assert!(agent.watched().is_empty());
    // Still working: a new process is watched and counted.
    let mut next = Fixture::start_with_env(&i, "exits", &env(&opted_in("exits")));
    agent.wait_attached(next.pid());
    next.go();
    let pid = next.pid();
    next.wait_exit();
    agent.wait_exited(pid);
    assert_eq!(summary(&mut agent, pid, "wl.exits:f"), 8);
    agent.events.stop_with(libc::SIGTERM);
}

#[test]
fn fifty_short_lived_processes_leak_nothing() {
    let _turn = one_at_a_time();
    let python = pyenv(12).argv[0].clone();
    let mut agent = NodeAgent::start(&[F], &[]);
    let short_lived = |n: usize| {
        let children: Vec<_> = (0..n)
            .map(|_| {
                Command::new(&python)
                    .args(["-c", "import time; time.sleep(0.4)"])
                    .envs(env(&opted_in("short")))
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
    };
    let settle = |agent: &mut NodeAgent| {
        agent.wait_metric("detector_processes_watched", 0.0);
        agent.wait_metric("detector_probes_detaching", 0.0);
        assert!(agent.watched().is_empty());
        agent.events.poll();
    };
    // Warm up (first analysis, allocator pools), then measure.
    short_lived(10);
    settle(&mut agent);
    let objects = agent.kernel_objects();
    let rss = agent.rss_kib();
    let attached_before = agent.events.seen.iter().filter(|v| v["type"] == "attached").count();
    for _ in 0..5 {
        short_lived(10);
    }
    settle(&mut agent);
    agent.events.poll();
    let attached = agent.events.seen.iter().filter(|v| v["type"] == "attached").count() - attached_before;
    let exited = agent.events.seen.iter().filter(|v| v["type"] == "exited").count();
    assert!(attached >= 40, "only {attached} of 50 processes were attached before they exited");
    assert!(exited >= attached, "{exited} exits reported for {attached} attaches");
    agent.wait_kernel_objects(objects); // no perf event or BPF link leaked
    let grown = agent.rss_kib() as i64 - rss as i64;
    assert!(grown < 4096, "agent memory grew by {grown} KiB over 50 processes");
    agent.events.stop_with(libc::SIGTERM);
}

#[test]
fn dump_attached_to_a_running_agent_prints_live_hits() {
    let _turn = one_at_a_time();
    let i = pyenv(13);
    let mut agent = NodeAgent::start(&[F, G], &[]);
    let tap = agent.tap.display().to_string();
    // Two clients at once, each seeing every hit.
    let mut clients: Vec<_> = (0..2)
        .map(|_| spawn_detector(&["dump".into(), "--format".into(), "json".into(), "--tap".into(), tap.clone()]))
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // connected before the hits
    let mut fixture = Fixture::start_with_env(&i, "plain", &env(&opted_in("tapped")));
    let pid = fixture.pid();
    agent.wait_attached(pid);
    fixture.go();
    fixture.wait_done();
    for c in &mut clients {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let count = |c: &mut detector_tests::Dump| {
            c.poll();
            let hits: Vec<&Value> = c.seen.iter().filter(|v| v["type"] == "hit" && v["pid"] == pid).collect();
            assert!(hits.iter().all(|h| h["service"]["service"] == "tapped"));
            (hits.iter().filter(|h| h["target"] == F).count(), hits.iter().filter(|h| h["target"] == G).count())
        };
        while count(c) != (25, 3) {
            assert!(Instant::now() < deadline, "tap client saw {:?}", count(c));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fixture.finish();
    // The agent stopping ends its clients cleanly.
    agent.events.stop_with(libc::SIGTERM);
    for c in clients {
        c.collect();
    }
    let missing = Command::new(detector_bin()).args(["dump", "--tap", &tap]).output().unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("cannot connect to a running agent's tap"), "{err}");
}

/// Stops the agent with `signal` while it watches a process, and checks
/// that the process is left exactly as it was: no int3 at any site, no
/// probe in the kernel, and it runs on normally.
fn stopped_agent_leaves_nothing(signal: i32) {
    let _turn = one_at_a_time();
    let i = pyenv(12);
    let mut agent = NodeAgent::start(&[F], &[]);
    let mut fixture = Fixture::start_with_env(&i, "plain", &env(&opted_in("stopped")));
    let attached = agent.wait_attached(fixture.pid());
    assert!(site_bytes(&attached).iter().all(|&b| b == 0xcc), "every site holds a breakpoint while attached");
    let agent_pid = agent.pid();
    if signal == libc::SIGTERM {
        assert_eq!(agent.events.stop_with(signal).code, Some(0));
    } else {
        agent.events.kill();
    }
    assert!(!std::path::Path::new(&format!("/proc/{agent_pid}")).exists());
    if signal == libc::SIGTERM {
        // A stopping agent waits for the kernel to unregister its probes.
        assert!(site_bytes(&attached).iter().all(|&b| b != 0xcc), "a breakpoint outlived the agent");
    } else {
        // A killed one cannot: the kernel closes its links as it reaps it and
        // unregisters the uprobes moments later, on its own.
        let deadline = Instant::now() + STEP_TIMEOUT;
        while site_bytes(&attached).contains(&0xcc) {
            assert!(Instant::now() < deadline, "a breakpoint outlived the killed agent");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fixture.go();
    fixture.wait_done();
    fixture.finish();
}

#[test]
fn sigterm_leaves_no_attachment_behind() {
    stopped_agent_leaves_nothing(libc::SIGTERM);
}

#[test]
fn sigkill_leaves_nothing_that_harms_a_watched_process() {
    stopped_agent_leaves_nothing(libc::SIGKILL);
}

#[test]
fn forked_children_and_new_images_are_followed() {
    let _turn = one_at_a_time();
    let mut agent = NodeAgent::start(&["wl.forks:f", "wl.execs:f", F], &[]);
    for minor in [9, 12] {
        let i = pyenv(minor);
        // Fork: the child is watched as a process of its own.
        let mut parent = Fixture::start_with_env(&i, "forks", &env(&opted_in("forks")));
        agent.wait_attached(parent.pid());
        parent.go();
        let child: u32 = parent.read_line().strip_prefix("child ").unwrap().parse().unwrap();
        let attached = agent.wait_attached(child);
        assert_eq!(attached["service"]["service"], "forks");
        detector_tests::signal(child, libc::SIGUSR1);
        parent.wait_done();
        agent.wait_exited(child);
        assert_eq!(summary(&mut agent, child, "wl.forks:f"), 4, "3.{minor} child");
        let pid = parent.pid();
        parent.finish();
        agent.wait_exited(pid);
        assert_eq!(summary(&mut agent, pid, "wl.forks:f"), 2, "3.{minor} parent");

        // Exec: the old image is detached with its counts, the new one watched.
        let mut fixture = Fixture::start_with_env(&i, "execs", &env(&opted_in("execs")));
        let pid = fixture.pid();
        agent.wait_attached(pid);
        fixture.go();
        assert_eq!(fixture.read_line(), "ready", "the new image");
        let exec = agent.wait_exited(pid);
        assert_eq!(exec["status"], "exec");
        assert_eq!(summary(&mut agent, pid, "wl.execs:f"), 1);
        let n = agent.lines("attached", pid).len();
        let deadline = Instant::now() + STEP_TIMEOUT;
        while agent.lines("attached", pid).len() < 2 {
            assert!(Instant::now() < deadline, "new image not attached ({n} attached lines)");
            std::thread::sleep(Duration::from_millis(20));
        }
        fixture.go();
        fixture.wait_done();
        fixture.finish();
        agent
            .events
            .wait_match("the new image's exit", |v| v["type"] == "exited" && v["pid"] == pid && v["status"].is_null());
        let hits = agent.lines("hit", pid).into_iter().filter(|h| h["target"] == F).count();
        assert_eq!(hits, 25, "3.{minor}: the new image's calls");
    }
    agent.events.stop_with(libc::SIGTERM);
}

/// Forked workers, killed if the test fails before they exit.
#[test]
fn prefork_workers_that_call_at_once_after_the_fork_are_each_reported() {
    let _turn = one_at_a_time();
    const POST: &str = "wl.prefork:Ledger.post";
    const VOID: &str = "wl.prefork:Ledger.void";
    for strategy in ["per-call", "watch"] {
        let mut agent = NodeAgent::start(&[POST, VOID], &["--strategy", strategy, "--reachability", "true"]);
        for minor in [8, 10, 11, 12, 13] {
            prefork_round(&mut agent, minor, strategy);
        }
        agent.events.stop_with(libc::SIGTERM);
    }
}

/// One master on pyenv 3.`minor` and its four workers, watched with `strategy`.
fn prefork_round(agent: &mut NodeAgent, minor: u8, strategy: &str) {
    const POST: &str = "wl.prefork:Ledger.post";
    let i = pyenv(minor);
    let mut master = Fixture::start_with_env(&i, "prefork", &env(&opted_in("prefork")));
    agent.wait_attached(master.pid());
    master.go();
    let line = master.read_line();
    let workers = detector_tests::Workers::from_line(&line);
    let workers = &workers.0;
    // Each worker made its call before the agent could attach it: its
    // code object's warm-up mark, changed since the fork while the
    // master's stayed as it was, shows it.
    for w in workers {
        agent.wait_attached(*w);
    }
    for w in &workers[..3] {
        agent.wait_hits(*w, 1);
        assert_eq!(agent.lines("hit", *w)[0]["target"], POST, "3.{minor} {strategy}");
    }
    for w in workers {
        detector_tests::signal(*w, libc::SIGUSR1);
        agent.wait_exited(*w);
    }
    master.wait_done();
    assert!(agent.lines("hit", workers[3]).is_empty(), "3.{minor} {strategy}: the worker that called nothing");
    let pid = master.pid();
    master.finish();
    agent.wait_exited(pid);
    assert!(agent.lines("hit", pid).is_empty(), "3.{minor} {strategy}: the master called nothing");
}

#[test]
fn without_the_gate_nothing_is_attached() {
    let _turn = one_at_a_time();
    let i = pyenv(12);
    let mut fixture = Fixture::start_with_env(&i, "plain", &env(&opted_in("gated")));
    let mut off = detector_tests::spawn_with_env(&["run".into(), "--no-rc".into(), "--target".into(), F.into()], &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(kernel_objects(off.pid()), (0, 0));
    off.poll();
    assert!(off.seen.is_empty(), "{:?}", off.seen);
    off.stop_with(libc::SIGTERM);
    fixture.go();
    fixture.wait_done();
    fixture.finish();
}

#[test]
fn reachability_samples_show_in_processes() {
    let _turn = one_at_a_time();
    const T: &str = "wl.hot:target";
    let args = ["--strategy", "watch", "--reachability", "true", "--reachability-sample", "1"];
    let mut agent = NodeAgent::start(&[T], &args);
    let mut fixture = Fixture::start_with_env(&pyenv(12), "hot", &env(&opted_in("hot")));
    let pid = fixture.pid();
    agent.wait_attached(pid);
    fixture.go();
    // Reached, disarmed, then armed again for a window a second later.
    agent.events.wait_match("a sample with calls", |v| v["type"] == "sample" && v["calls"].as_u64() > Some(0));
    // /processes is published once a second.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let p = loop {
        let p = agent.process(pid).expect("in /processes");
        if p.sampled_calls_per_sec.contains_key(T) || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rate = p.sampled_calls_per_sec.get(T).copied().unwrap_or(0.0);
    assert!((10.0..=200.0).contains(&rate), "{p:?}");
    fixture.read_line();
    fixture.wait_done();
    fixture.finish();
    agent.events.stop();
}

/// A watched process that exits leaves no key in the agent's maps: its
/// counters, cells and watched units are deleted by name, without a sweep
/// (the few maps keyed by code object or thread keep entries of the ended
/// watch, which no later watch reads).
#[test]
fn an_ended_watch_leaves_no_keys_behind() {
    use detector_tests::kernel_maps::{keys_by_map, keys_of};
    let _turn = one_at_a_time();
    const BY_PROCESS: [&str; 8] =
        ["COUNTS", "CELL_OF", "CELL_CLAIMS", "PENDING", "WATCHES", "WATCHED_CODES", "DISPATCH_READS", "WATCHED"];
    for (strategy, minor, written) in
        [("per-call", 10, "CELL_CLAIMS"), ("per-call", 12, "CELL_OF"), ("watch", 12, "WATCHES")]
    {
        let mut agent = NodeAgent::start(&[F, G], &["--strategy", strategy, "--reachability", "false"]);
        let mut fixture = Fixture::start_with_env(&pyenv(minor), "plain", &env(&opted_in("keys")));
        let pid = fixture.pid();
        agent.wait_attached(pid);
        fixture.go();
        fixture.wait_done();
        let alive = keys_by_map(agent.pid());
        assert!(keys_of(&alive, written, pid) > 0, "3.{minor} {strategy}: {written} holds the process's keys");
        assert_eq!(keys_of(&alive, "WATCHED", pid), 1, "3.{minor} {strategy}");
        fixture.finish();
        agent.wait_exited(pid);
        assert_eq!((summary(&mut agent, pid, F), summary(&mut agent, pid, G)), (25, 3), "3.{minor} {strategy}");
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let maps = keys_by_map(agent.pid());
            let left: Vec<(&str, usize)> =
                BY_PROCESS.iter().map(|m| (*m, keys_of(&maps, m, pid))).filter(|(_, n)| *n > 0).collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "3.{minor} {strategy}: keys left {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.events.stop_with(libc::SIGTERM);
    }
}
