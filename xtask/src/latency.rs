//! Detection latency, for `cargo xtask bench`: from a target's call (the
//! kernel's timestamp in the hit) to the hit line reaching a reader of
//! `dump`'s output, per strategy.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result};
use detector_tests::{Fixture, Interpreter, detector_bin};

/// Calls measured per strategy.
const CALLS: usize = 200;

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// (p50, p99) latency in ms over [`CALLS`] calls, one every few ms.
pub fn measure(interp: &Interpreter, strategy: &str) -> Result<(f64, f64)> {
    let mut fixture = Fixture::start(interp, "rounds");
    fixture.go();
    let mut child = Command::new(detector_bin())
        .args(["dump", "--format", "json", "--strategy", strategy, "--target", "wl.rounds:f", "--pid"])
        .arg(fixture.pid().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dump")?;
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let now = monotonic_ns();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && tx.send((now, v)).is_err()
            {
                break;
            }
        }
    });
    // Wait for the probes.
    while rx.recv_timeout(Duration::from_secs(60))?.1["type"] != "attached" {}
    let mut latencies = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        fixture.call("f", 1);
        let (seen, v) = loop {
            let (t, v) = rx.recv_timeout(Duration::from_secs(10)).context("no hit")?;
            if v["type"] == "hit" {
                break (t, v);
            }
        };
        let at = v["ts_ns"].as_u64().unwrap_or(seen);
        latencies.push(seen.saturating_sub(at) as f64 / 1e6);
        std::thread::sleep(Duration::from_millis(3));
    }
    detector_tests::signal(child.id() as u32, libc::SIGINT);
    let _ = child.wait();
    fixture.finish();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok((pick(0.5), pick(0.99)))
}
