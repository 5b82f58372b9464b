//! The node agent's own footprint, for `cargo xtask bench`: its CPU time and
//! memory while it watches 20 processes that each call a target 100 times a
//! second.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use detector_tests::{Interpreter, detector_bin};

/// Processes watched.
pub const PROCESSES: usize = 20;
/// How long the agent is measured.
const WINDOW: Duration = Duration::from_secs(10);

/// The load: a target called every 10 ms, for long enough.
const LOAD: &str =
    "import time\ndef f(): pass\nend = time.time() + 40\nwhile time.time() < end:\n    f()\n    time.sleep(0.01)\n";

/// The agent's (CPU % of one core, RSS MiB) over [`WINDOW`].
pub fn measure(interp: &Interpreter) -> Result<(f64, f64)> {
    let mut agent = Command::new(detector_bin())
        .args(["run", "--no-rc", "--target", "__main__:f", "--events", "json", "--tap", "none"])
        .env("DD_SCA_DETECTION_ENABLED", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the agent")?;
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let mut wait_for = |kind: &str, n: usize| -> Result<()> {
        let mut seen = 0;
        while seen < n {
            let Some(Ok(line)) = lines.next() else { bail!("the agent stopped") };
            if line.contains(&format!("\"type\":\"{kind}\"")) {
                seen += 1;
            }
        }
        Ok(())
    };
    wait_for("discovering", 1)?;
    let mut load: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            Command::new(&interp.argv[0])
                .args(&interp.argv[1..])
                .args(["-c", LOAD])
                .env("DD_APPSEC_SCA_ENABLED", "true")
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    wait_for("attached", PROCESSES)?;
    // Keep reading (and dropping) its output in the background.
    std::thread::spawn(move || for _ in lines {});
    let pid = agent.id();
    let before = cpu_ticks(pid)?;
    std::thread::sleep(WINDOW);
    let after = cpu_ticks(pid)?;
    let rss = rss_mib(pid)?;
    // SAFETY: no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for c in &mut load {
        let _ = c.kill();
        let _ = c.wait();
    }
    detector_tests::signal(pid as u32, libc::SIGTERM);
    let _ = agent.wait();
    Ok(((after - before) as f64 / hz / WINDOW.as_secs_f64() * 100.0, rss))
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .parse()?;
    Ok(kb / 1024.0)
}
