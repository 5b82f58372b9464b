//! `detector run` as the node agent, discovering processes by itself, and
//! what it reports about itself: its event stream, `/metrics`,
//! `/processes`, `/healthz`, and the kernel objects it holds.

use std::{path::PathBuf, sync::Mutex, time::Instant};

use detector::agent::report::ProcessReport;
use serde_json::Value;

use crate::{Dump, STEP_TIMEOUT, free_port, spawn_wrapped};

/// An opted-in process's environment, with `service` as its identity.
pub fn opted_in(service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DD_APPSEC_SCA_ENABLED", "true".into()),
        ("DD_SERVICE", service.into()),
        ("DD_ENV", "test".into()),
        ("DD_VERSION", "1.0".into()),
    ]
}

/// Agents see every process on the machine: tests that run one take turns,
/// so no agent attaches to another test's processes.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `/healthz` asked over and over (see [`NodeAgent::watch_health`]).
pub struct HealthWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<std::time::Duration, String>>,
}

impl HealthWatch {
    /// Stops asking; the slowest answer, or the first that did not come
    /// within a second.
    pub fn stop(self) -> Result<std::time::Duration, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A running node agent.
pub struct NodeAgent {
    /// Its event stream (JSON lines on stdout).
    pub events: Dump,
    metrics_port: u16,
    /// Its tap socket.
    pub tap: PathBuf,
}

impl NodeAgent {
    /// Starts `detector run` discovering processes, with `targets` and extra
    /// `args`, and waits until discovery is live.
    pub fn start(targets: &[&str], args: &[&str]) -> Self {
        Self::start_wrapped(&[], targets, args)
    }

    /// As [`NodeAgent::start`], started by `wrapper` (see [`crate::spawn_wrapped`]).
    pub fn start_wrapped(wrapper: &[String], targets: &[&str], args: &[&str]) -> Self {
        let metrics_port = free_port();
        let tap = std::env::temp_dir().join(format!("detector-tap-{}-{metrics_port}.sock", std::process::id()));
        let mut argv: Vec<String> = vec!["run".into(), "--no-rc".into(), "--events".into(), "json".into()];
        argv.extend(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")]);
        argv.extend(["--tap".into(), tap.display().to_string(), "--log-format".into(), "json".into()]);
        argv.extend(["--log-level".into(), "info".into()]);
        for t in targets {
            argv.extend(["--target".into(), (*t).into()]);
        }
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut events = spawn_wrapped(wrapper, &argv, &[("DD_SCA_DETECTION_ENABLED", "true")]);
        events.wait_for("discovering");
        NodeAgent { events, metrics_port, tap }
    }

    /// The port of its metrics server (on 127.0.0.1).
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.events.pid()
    }

    /// Waits until the agent has attached to `pid`; returns its line.
    pub fn wait_attached(&mut self, pid: u32) -> Value {
        self.events.wait_match(&format!("attached line for {pid}"), |v| v["type"] == "attached" && v["pid"] == pid)
    }

    /// Waits until the agent reports `pid` gone (or changed image).
    pub fn wait_exited(&mut self, pid: u32) -> Value {
        self.events.wait_match(&format!("exited line for {pid}"), |v| v["type"] == "exited" && v["pid"] == pid)
    }

    /// Every line for `pid` of `kind` so far.
    pub fn lines(&mut self, kind: &str, pid: u32) -> Vec<Value> {
        self.events.poll();
        self.events.seen.iter().filter(|v| v["type"] == kind && v["pid"] == pid).cloned().collect()
    }

    /// Waits until `pid` has `n` hit lines.
    pub fn wait_hits(&mut self, pid: u32, n: usize) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.lines("hit", pid).len() < n {
            assert!(Instant::now() < deadline, "{pid}: {} hits, expected {n}", self.lines("hit", pid).len());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(self.lines("hit", pid).len(), n, "{pid}: more hits than expected");
    }

    /// Runs the `plain` workload (25 calls of `wl.plain:f`) on `interp` with
    /// `env`, watched by this agent; `started` sees its pid first. Returns
    /// its hits of `wl.plain:f`, every hit being one of them.
    pub fn count_plain(
        &mut self,
        interp: &crate::Interpreter,
        env: &[(&str, &str)],
        started: impl FnOnce(u32),
    ) -> usize {
        const F: &str = "wl.plain:f";
        let mut w = crate::Fixture::start_with_env(interp, "plain", env);
        let pid = w.pid();
        started(pid);
        let attached = self.wait_attached(pid);
        self.wait_armed(&attached, F);
        w.go();
        w.wait_done();
        self.wait_hits(pid, 25);
        w.finish();
        self.wait_exited(pid);
        let hits = self.lines("hit", pid);
        assert!(hits.iter().all(|h| h["target"] == F), "{}: {hits:?}", interp.name);
        hits.len()
    }

    /// Waits until `target` is armed in the process of `attached`, if it
    /// was pending then: attached during its start, its module may have
    /// been imported before the agent could read the module's body, and
    /// its calls count from when the target is armed.
    pub fn wait_armed(&mut self, attached: &Value, target: &str) {
        let report = crate::attached_report(attached);
        if report.target_strategies.get(target) != Some(&detector::agent::report::TargetStrategy::Pending) {
            return;
        }
        let pid = report.process.pid;
        self.events.wait_match(&format!("{target} armed"), |v| {
            v["type"] == "armed"
                && v["pid"] == pid
                && v["targets"].as_array().is_some_and(|t| t.iter().any(|t| t == target))
        });
    }

    /// GET `path` on the metrics server: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("http://127.0.0.1:{}{path}", self.metrics_port)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// GET `path` within a second: (status, body), or nothing if the agent
    /// did not answer.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(1)).build();
        match agent.get(&format!("http://127.0.0.1:{}{path}", self.metrics_port)).call() {
            Ok(r) => Some((r.status(), r.into_string().ok()?)),
            Err(ureq::Error::Status(code, r)) => Some((code, r.into_string().unwrap_or_default())),
            Err(_) => None,
        }
    }

    /// Starts asking `/healthz` every 100 ms, each answer allowed 1 s,
    /// until the returned watch is stopped.
    pub fn watch_health(&self) -> HealthWatch {
        let url = format!("http://127.0.0.1:{}/healthz", self.metrics_port);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // A connection per probe, as the kubelet makes them.
            let agent =
                ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(1)).max_idle_connections(0).build();
            let mut worst = std::time::Duration::ZERO;
            let started = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                if let Err(e) = agent.get(&url).call() {
                    let at = asked.duration_since(started);
                    return Err(format!("/healthz asked {at:?} in took {:?}: {e}", asked.elapsed()));
                }
                worst = worst.max(asked.elapsed());
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(worst)
        });
        HealthWatch { stop, thread }
    }

    /// What `/processes` says about `pid` (null if it is not watched).
    pub fn process(&self, pid: u32) -> Option<ProcessReport> {
        let (_, body) = self.get("/processes");
        let all: Vec<ProcessReport> = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/processes: {e}: {body}"));
        all.into_iter().find(|p| p.pid == pid)
    }

    /// The value of the sample `name` (with its labels, as exposed), or 0.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Waits until `sample` reads `want` (metrics refresh every second).
    pub fn wait_metric(&self, sample: &str, want: f64) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.metric(sample) != want {
            assert!(Instant::now() < deadline, "{sample} is {}, expected {want}", self.metric(sample));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits until `/processes` lists `pid`.
    pub fn wait_watched(&self, pid: u32) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !self.watched().contains(&pid) {
            assert!(Instant::now() < deadline, "{pid} not in /processes: {:?}", self.watched());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The pids the agent says it watches (`/processes`).
    pub fn watched(&self) -> Vec<u32> {
        let (_, body) = self.get("/processes");
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap() as u32).collect()
    }

    /// (perf events, BPF links) the agent holds open: each probe is a BPF
    /// link (or, on kernels without perf links, a perf event), so together
    /// they count its attachments.
    pub fn kernel_objects(&self) -> (usize, usize) {
        kernel_objects(self.pid())
    }

    /// Waits until the agent holds exactly `want` perf events and links: the
    /// kernel unregisters detached uprobes one at a time (~90 ms each here),
    /// behind the agent's back.
    pub fn wait_kernel_objects(&self, want: (usize, usize)) {
        let deadline = Instant::now() + 3 * STEP_TIMEOUT;
        while self.kernel_objects() != want {
            assert!(Instant::now() < deadline, "agent holds {:?}, expected {want:?}", self.kernel_objects());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Its resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
    }
}

/// (perf events, BPF links) open in process `pid`.
pub fn kernel_objects(pid: u32) -> (usize, usize) {
    let mut perf = 0;
    let mut links = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().filter_map(|e| e.ok()) {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        match target.to_string_lossy().as_ref() {
            "anon_inode:[perf_event]" => perf += 1,
            "anon_inode:bpf_link" => links += 1,
            _ => {}
        }
    }
    (perf, links)
}

/// The bytes at each probe site of an `attached` line, read from the watched
/// process's memory: a live uprobe shows as an int3 (0xcc) there.
pub fn site_bytes(attached: &Value) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let pid = attached["pid"].as_u64().unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    attached["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let mut b = [0u8];
            mem.read_exact_at(&mut b, s["runtime_addr"].as_u64().unwrap()).unwrap();
            b[0]
        })
        .collect()
}

/// An innocent process watched through an attack: the `plain` workload,
/// attached before the attack and run after it. Its counts must be exact,
/// and once the agent stops no breakpoint may be left in it.
pub struct Bystander {
    fixture: crate::Fixture,
    attached: Value,
}

impl Bystander {
    /// Starts it on `interp` and waits until `agent` watches it, every
    /// probe site holding its breakpoint.
    pub fn start(agent: &mut NodeAgent, interp: &crate::Interpreter) -> Self {
        let env = opted_in("bystander");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let fixture = crate::Fixture::start_with_env(interp, "plain", &env);
        let attached = agent.wait_attached(fixture.pid());
        agent.wait_armed(&attached, "wl.plain:f");
        let sites = site_bytes(&attached);
        assert!(!sites.is_empty() && sites.iter().all(|&b| b == 0xcc), "the bystander's sites: {sites:x?}");
        Bystander { fixture, attached }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.fixture.pid()
    }

    /// Runs its 25 calls of `wl.plain:f`; returns the hits `agent` saw.
    pub fn count(&mut self, agent: &mut NodeAgent) -> usize {
        self.fixture.go();
        self.fixture.wait_done();
        let pid = self.fixture.pid();
        agent.wait_hits(pid, 25);
        agent.lines("hit", pid).len()
    }

    /// Once the agent has stopped: not one breakpoint is left in it.
    pub fn assert_untouched(self) {
        let sites = site_bytes(&self.attached);
        assert!(sites.iter().all(|&b| b != 0xcc), "a breakpoint outlived the agent in the bystander: {sites:x?}");
        self.fixture.finish();
    }
}
