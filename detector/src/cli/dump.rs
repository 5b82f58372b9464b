//! `detector dump`: watch one process, print its hits, then exact counts.

use std::{collections::BTreeSet, io::Write, path::PathBuf, time::Duration};

use anyhow::bail;
use tokio::signal::unix::{SignalKind, signal};

use super::require_privileges;
use crate::{
    agent::{ProcessWatch, Session, Strategy, session::Activity, spawn},
    bpf::{Capacities, Probes},
    events::output::{Format, Printer, hit_text},
    interp::cache::AnalysisCache,
    pyproc, tap,
    targets::Target,
};

/// Arguments of `detector dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Watch this running process.
    #[arg(long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,
    /// A function to watch, `package.module:Qual.name` (repeat for several).
    /// Without any, dump prints the live hits of the agent running here.
    #[arg(long = "target", value_name = "MODULE:QUALNAME")]
    pub targets: Vec<String>,
    /// The running agent's event tap (see `detector run --tap`), used when no
    /// target is given.
    #[arg(long, value_name = "PATH", default_value = tap::DEFAULT_PATH, env = "DETECTOR_TAP")]
    pub tap: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// How calls are observed: `per-call` probes (exact on every build) or
    /// hardware watchpoints on each target's body start (`watch`: other calls
    /// pass no probe; falls back to per-call when it cannot apply). `auto`
    /// is watch where it applies.
    #[arg(long, value_enum, default_value_t = Strategy::Auto)]
    pub strategy: Strategy,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Start this command and watch it from its first Python call.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs `detector dump`.
pub async fn run(args: DumpArgs) -> anyhow::Result<()> {
    // Before anything can be attached: a stop request must always end in a
    // clean detach and a summary, never in the default action.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    if args.targets.is_empty() {
        if args.pid.is_some() || !args.command.is_empty() {
            bail!("give the functions to watch: --target MODULE:QUALNAME (repeatable)");
        }
        return from_tap(&args).await;
    }
    if args.pid.is_none() && args.command.is_empty() {
        bail!("give a process to watch: --pid PID, or -- COMMAND ARGS...");
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0)
    {
        bail!("--duration must be a positive number of seconds");
    }
    let targets: BTreeSet<Target> = args.targets.iter().map(|t| Target::parse(t)).collect::<Result<_, _>>()?;
    require_privileges()?;
    let mut session =
        Session::new(Capacities::default(), Printer::new(Some(args.format)))?.with_strategy(args.strategy);
    session.set_targets(&targets)?;

    let (process, spawned) = match args.pid {
        Some(pid) => (pyproc::locate(pid, &session.cache())?, None),
        None => {
            let s = spawn::spawn_python(&args.command, session.cache())?;
            (s.process.clone(), Some(s))
        }
    };
    let pid = process.pid;
    // On failure the unreleased child is killed: it must not run unwatched.
    session.watch(process)?;
    let child = spawned.map(|s| s.release());

    let deadline = tokio::time::sleep(Duration::from_secs_f64(args.duration.unwrap_or(1e9)));
    tokio::pin!(deadline);
    tokio::select! {
        activity = next_of_interest(&mut session) => {
            if activity == Activity::Exited(pid) {
                let status = match child {
                    Some(c) => spawn::exit_status(c).await,
                    None => None,
                };
                session.end(pid, status.as_deref());
            }
        }
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
        _ = &mut deadline => {}
    }
    session.shutdown();
    Ok(())
}

/// Prints the hits a running agent serves on its tap, until it stops, the
/// duration ends, or SIGINT/SIGTERM.
async fn from_tap(args: &DumpArgs) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut lines = tap::connect(&args.tap).await?;
    let deadline = tokio::time::sleep(Duration::from_secs_f64(args.duration.unwrap_or(1e9)));
    tokio::pin!(deadline);
    let mut out = std::io::stdout().lock();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        };
        let Some(line) = line else {
            eprintln!("detector: the agent closed the tap");
            break;
        };
        let printed = match args.format {
            Format::Json => line,
            Format::Text => match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v["type"] == "hit" => hit_text(&v),
                Ok(v) if v["type"] == "dropped" => format!("dropped {} events (this reader was too slow)", v["events"]),
                _ => continue,
            },
        };
        if writeln!(out, "{printed}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

/// Runs the hidden `bench-floor` command: the empty program at the
/// detector's sites, for `cargo xtask bench`.
pub async fn bench_floor(pid: u32) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    require_privileges()?;
    let mut probes = Probes::load(Capacities::default())?;
    let process = pyproc::locate(pid, &AnalysisCache::default())?;
    let mut watch = ProcessWatch::attach_floor(&mut probes, process)?;
    println!("{}", serde_json::json!({"type": "attached", "pid": pid, "probes": watch.probes()}));
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    watch.detach(&mut probes);
    // As `dump` does: leave nothing for the kernel to finish after the exit.
    probes.settle(Duration::from_secs(20));
    Ok(())
}

/// `detector calibrate`: the per-pass costs the overhead budget uses.
pub fn calibrate() -> anyhow::Result<()> {
    require_privileges()?;
    let mut probes = Probes::load(Capacities::default())?;
    let costs = crate::agent::budget::Costs::calibrate(&mut probes)?;
    probes.settle(Duration::from_secs(20));
    println!("{}", serde_json::to_string(&costs)?);
    Ok(())
}

/// The next activity that ends a dump: the process's exit, or the output's
/// reader going away (nothing else is followed: a dump does not discover).
async fn next_of_interest(session: &mut Session) -> Activity {
    loop {
        match session.next().await {
            a @ (Activity::Exited(_) | Activity::OutputClosed) => return a,
            Activity::Exec(_) | Activity::Fork { .. } => {}
        }
    }
}
