//! Driving `detector dump --format json` and collecting what it prints.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, channel},
    },
    time::Instant,
};

use serde_json::Value;

use crate::{STEP_TIMEOUT, detector_bin};

/// A running `detector dump`.
pub struct Dump {
    child: Child,
    lines: Receiver<Value>,
    /// Everything printed on stderr so far (the logs), read as it comes so
    /// that verbose logs never fill the pipe and stall the detector.
    stderr: Arc<Mutex<String>>,
    /// The thread reading it, done once the detector has exited.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    /// Every JSON line printed so far.
    pub seen: Vec<Value>,
}

/// What a finished `detector dump` printed.
#[derive(Debug, Default)]
pub struct Summary {
    /// Exact hits per target, from the summary lines.
    pub counts: BTreeMap<String, u64>,
    /// Every hit line.
    pub hits: Vec<Value>,
    /// The `attached` line.
    pub attached: Value,
    /// The `stats` line.
    pub stats: Value,
    /// Whether it reported the process exiting.
    pub exited: bool,
    /// Exit code of the detector.
    pub code: Option<i32>,
}

impl Summary {
    /// Hits of `target`.
    pub fn count(&self, target: &str) -> u64 {
        *self.counts.get(target).unwrap_or_else(|| panic!("no summary for {target}: {:?}", self.counts))
    }

    /// Asserts exact counts for every `(target, hits)`.
    pub fn assert_counts(&self, expected: &[(&str, u64)]) {
        let got: Vec<(&str, u64)> = expected.iter().map(|(t, _)| (*t, self.count(t))).collect();
        assert_eq!(got, expected, "stats: {}; hits: {:#?}", self.stats, self.hits);
        // Every counted hit is also reported as an event when nothing dropped.
        if self.stats["ringbuf_drops"] == 0 {
            let total: u64 = expected.iter().map(|(_, n)| n).sum();
            assert_eq!(self.hits.len() as u64, total, "hit events vs summaries");
        }
    }
}

/// Starts the detector with `args` (its stdout parsed as JSON lines).
pub fn spawn(args: &[String]) -> Dump {
    spawn_with_env(args, &[])
}

/// `detector run` on `pid` alone, opted in, in reachability mode with
/// `extra` flags (a strategy, say), once attached.
pub fn run_reaching(pid: u32, targets: &[&str], extra: &[&str]) -> Dump {
    let mut args: Vec<String> = ["run", "--no-rc", "--events", "json", "--reachability", "true", "--pid"]
        .into_iter()
        .map(String::from)
        .collect();
    args.push(pid.to_string());
    for t in targets {
        args.extend(["--target".to_owned(), t.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut d = spawn_with_env(&args, &[("DD_SCA_DETECTION_ENABLED", "true")]);
    d.wait_for("attached");
    d
}

/// As [`spawn`], with extra environment variables.
///
/// `run` and `dump` watch with the per-call strategy, and `run` counts
/// exactly (no reachability) with no overhead budget, unless the test says
/// otherwise: the suites written for one strategy test that strategy,
/// whatever the defaults (tests of the defaults, of reachability and of the
/// budget pass them explicitly).
pub fn spawn_with_env(args: &[String], env: &[(&str, &str)]) -> Dump {
    spawn_wrapped(&[], args, env)
}

/// As [`spawn_with_env`], with the detector started by `wrapper` (a command
/// that executes its arguments, such as `setpriv` with a capability set).
pub fn spawn_wrapped(wrapper: &[String], args: &[String], env: &[(&str, &str)]) -> Dump {
    let mut args = args.to_vec();
    let has = |flag: &str| args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    let mut defaults = Vec::new();
    let watches = args.iter().any(|a| a == "--pid" || a == "--target" || a == "--");
    if matches!(args.first().map(String::as_str), Some("run" | "dump")) && watches && !has("--strategy") {
        defaults.extend(["--strategy", "per-call"]);
    }
    if args.first().is_some_and(|a| a == "run") && !has("--overhead-budget") {
        defaults.extend(["--overhead-budget", "0"]);
    }
    if args.first().is_some_and(|a| a == "run") && !has("--reachability") {
        defaults.extend(["--reachability", "false"]);
    }
    for (i, a) in defaults.into_iter().enumerate() {
        args.insert(1 + i, a.to_owned());
    }
    let mut argv: Vec<std::ffi::OsString> = wrapper.iter().map(Into::into).collect();
    argv.push(detector_bin().into());
    argv.extend(args.iter().map(Into::into));
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting detector");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        // Non-JSON lines come from a spawned command sharing our stdout.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v.is_object()
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    let mut pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Dump { child, lines, stderr, stderr_reader: Some(stderr_reader), seen: Vec::new() }
}

fn dump_args(targets: &[&str]) -> Vec<String> {
    let mut args = vec!["dump".to_string(), "--format".into(), "json".into()];
    for t in targets {
        args.push("--target".into());
        args.push((*t).into());
    }
    args
}

impl Dump {
    /// Attaches to `pid` and waits until probes are live.
    pub fn attach(pid: u32, targets: &[&str]) -> Self {
        Self::attach_with(pid, targets, &[])
    }

    /// As [`Dump::attach`], with extra arguments.
    pub fn attach_with(pid: u32, targets: &[&str], extra: &[&str]) -> Self {
        let mut args = dump_args(targets);
        args.extend(["--pid".into(), pid.to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut d = spawn(&args);
        d.wait_for("attached");
        d
    }

    /// Starts `command` under the detector (`dump -- COMMAND`).
    pub fn command(targets: &[&str], command: &[String]) -> Self {
        let mut args = dump_args(targets);
        args.push("--".into());
        args.extend(command.iter().cloned());
        spawn(&args)
    }

    /// Waits for a line of `kind`, keeping everything seen.
    pub fn wait_for(&mut self, kind: &str) -> Value {
        self.wait_match(&format!("{kind:?} line"), |v| v["type"] == kind)
    }

    /// Waits for a line (seen before or new) matching `pred`, keeping
    /// everything seen.
    pub fn wait_match(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    self.logs_complete();
                    let last: Vec<String> = self.seen.iter().rev().take(8).map(Value::to_string).collect();
                    panic!(
                        "detector printed no {what}; last lines (newest first): {last:#?}; stderr: {}",
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Waits (up to 5 s: a command the detector started may hold the pipe
    /// open) for the stderr reader to reach the end once the detector exited.
    fn logs_complete(&mut self) {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while self.stderr_reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// What the detector logged so far (its stderr).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The detector's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Takes every line printed so far without waiting.
    pub fn poll(&mut self) {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
    }

    /// Hit lines for `target` so far.
    pub fn hits(&mut self, target: &str) -> usize {
        self.poll();
        self.seen.iter().filter(|v| v["type"] == "hit" && v["target"] == target).count()
    }

    /// Waits until `target` has `n` hit lines (and returns), or panics.
    pub fn wait_hits(&mut self, target: &str, n: usize) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.hits(target) < n {
            assert!(Instant::now() < deadline, "{target}: {} hits, expected {n}", self.hits(target));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Stops the detector with SIGINT and collects its output.
    pub fn stop(self) -> Summary {
        self.stop_with(libc::SIGINT)
    }

    /// Stops the detector with `signal` and collects its output.
    pub fn stop_with(self, signal: i32) -> Summary {
        crate::signal(self.child.id(), signal);
        self.collect()
    }

    /// Kills the detector with SIGKILL and reaps it; nothing is collected.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the detector to finish by itself and collects its output.
    pub fn collect(mut self) -> Summary {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match self.child.try_wait().unwrap() {
                Some(_) => break,
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    panic!("detector did not stop");
                }
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        let code = self.child.wait().unwrap().code();
        self.logs_complete();
        // The reader thread ends at EOF; take everything it got.
        while let Ok(v) = self.lines.recv_timeout(std::time::Duration::from_secs(5)) {
            self.seen.push(v);
        }
        assert_eq!(code, Some(0), "detector failed: {}", self.stderr());
        let mut s = Summary { code, ..Summary::default() };
        for v in std::mem::take(&mut self.seen) {
            match v["type"].as_str() {
                Some("summary") => {
                    s.counts.insert(v["target"].as_str().unwrap().to_owned(), v["hits"].as_u64().unwrap());
                }
                Some("hit") => s.hits.push(v),
                Some("attached") => s.attached = v,
                Some("stats") => s.stats = v,
                Some("exited") => s.exited = true,
                _ => {}
            }
        }
        s
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
