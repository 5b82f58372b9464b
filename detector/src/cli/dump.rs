//! `detector dump`: watch one process, print its hits, then exact counts.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use super::require_privileges;
use crate::{
    agent::{ProcessWatch, spawn},
    bpf::{Capacities, Probes},
    events::{
        EventProcessor, ProcessLookup,
        output::{Format, Printer},
        record,
    },
    interp::cache::AnalysisCache,
    pyproc::{self, ProcessError, PythonProcess},
    targets::{Target, TargetSet},
};

/// How often the ring buffer is drained when no wakeup came (the kernel
/// only wakes the reader for bursts, so a hit does not pay for a wakeup).
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// Arguments of `detector dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Watch this running process.
    #[arg(long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,
    /// A function to watch, `package.module:Qual.name` (repeat for several).
    #[arg(long = "target", value_name = "MODULE:QUALNAME", required = true)]
    pub targets: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Start this command and watch it from its first Python call.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

struct One<'a>(&'a PythonProcess);

impl ProcessLookup for One<'_> {
    fn process(&self, pid: u32) -> Option<&PythonProcess> {
        (pid == self.0.pid).then_some(self.0)
    }
}

/// Runs `detector dump`.
pub async fn run(args: DumpArgs) -> anyhow::Result<()> {
    if args.pid.is_none() && args.command.is_empty() {
        bail!("give a process to watch: --pid PID, or -- COMMAND ARGS...");
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0)
    {
        bail!("--duration must be a positive number of seconds");
    }
    // Before anything can be attached: a stop request must always end in a
    // clean detach and a summary, never in the default action.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut targets = TargetSet::default();
    for t in &args.targets {
        targets.insert(Target::parse(t)?);
    }
    require_privileges()?;
    let printer = Printer::new(args.format);
    let mut probes = Probes::load(Capacities::default())?;
    probes.sync_targets(&targets)?;
    let cache = Arc::new(AnalysisCache::default());

    let (process, spawned) = match args.pid {
        Some(pid) => (pyproc::locate(pid, &cache)?, None),
        None => {
            let cache = cache.clone();
            let s = spawn::spawn(&args.command, move |pid| match pyproc::locate(pid, &cache) {
                Ok(p) => Ok(Some(p)),
                Err(ProcessError::NotPython { .. }) => Ok(None),
                Err(e) => Err(e),
            })?;
            (s.process.clone(), Some(s))
        }
    };
    let pid = process.pid;
    // Open before attaching so an exit during the attach is still seen.
    let exit = pidfd(pid).with_context(|| format!("watching process {pid} for exit"))?;
    let mut watch = match ProcessWatch::attach(&mut probes, process, &targets) {
        Ok(w) => w,
        Err(e) => {
            drop(spawned); // the tracer kills the child when released unwatched
            return Err(e.into());
        }
    };
    let names: Vec<&Target> = targets.iter().map(|(t, _)| t).collect();
    printer.attached(&watch, &names);
    let child = spawned.map(|s| s.release());

    let ring = probes.take_events().context("ring buffer already taken")?;
    // SAFETY: the ring buffer owns its fd and keeps it open until dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")?;
    let mut processor = EventProcessor::default();
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    let deadline = tokio::time::sleep(Duration::from_secs_f64(args.duration.unwrap_or(1e9)));
    tokio::pin!(deadline);

    let lookup = One(&watch.process);
    let exited = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut processor, &mut probes, &targets, &lookup, &printer);
                guard.clear_ready();
            }
            _ = tick.tick() => {
                drain(ring.get_mut(), &mut processor, &mut probes, &targets, &lookup, &printer);
                if printer.closed() {
                    break false; // nobody reads the output any more
                }
            }
            _ = exit.readable() => break true,
            _ = sigint.recv() => break false,
            _ = sigterm.recv() => break false,
            _ = &mut deadline => break false,
        }
    };
    // Everything the process did before it stopped is in the buffer by now.
    drain(ring.get_mut(), &mut processor, &mut probes, &targets, &lookup, &printer);
    if exited {
        let status = match child {
            Some(c) => {
                tokio::task::spawn_blocking(move || c.join()).await.ok().and_then(|r| r.ok()).and_then(|r| r.ok())
            }
            None => None,
        };
        printer.exited(pid, status.map(|s| s.to_string()).as_deref());
    }
    let totals = processor.totals(pid, &mut probes, &targets, &lookup);
    for (t, id) in targets.iter() {
        printer.summary(pid, t, totals.get(&id).copied().unwrap_or(0));
    }
    let stats = probes.stats();
    let named: Vec<(&str, u64)> = detector_common::stats::NAMES.iter().copied().zip(stats.iter().copied()).collect();
    printer.stats(&named);
    watch.detach(&mut probes);
    Ok(())
}

/// Runs the hidden `bench-floor` command.
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
    Ok(())
}

fn drain(
    ring: &mut RingBuf<MapData>,
    processor: &mut EventProcessor,
    probes: &mut Probes,
    targets: &TargetSet,
    lookup: &impl ProcessLookup,
    printer: &Printer,
) {
    while let Some(item) = ring.next() {
        let Some(rec) = record::decode(&item) else {
            continue;
        };
        drop(item);
        if let Some(hit) = processor.handle(rec, probes, targets, lookup) {
            printer.hit(&hit);
        }
    }
}

/// A file descriptor that becomes readable when `pid` exits.
fn pidfd(pid: u32) -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ESRCH) {
            std::io::Error::new(e.kind(), format!("process {pid} does not exist"))
        } else {
            e
        });
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `OwnedFd` keeps the descriptor open until dropped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(std::io::Error::from)
}
