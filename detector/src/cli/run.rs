//! `detector run`: agent mode. Targets come from Remote Configuration,
//! payload files and flags, and follow them live; hits are reported as they
//! happen.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use detector_common::capacity;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::{require_privileges, sources::SourceArgs};
use crate::{
    agent::{
        Session, Strategy,
        budget::Budget,
        discovery::{self, Environ},
        node::{Node, NodeOptions},
        session::Activity,
        spawn,
    },
    bpf::Capacities,
    confine,
    events::output::{Format, Printer},
    interp::cache::{AnalysisCache, MAX_ENTRIES},
    metrics::{Metrics, SharedMetrics, server},
    pyproc,
    sources::{Delivery, Sources, Update},
    tap::{self, Tap},
    targets::Target,
    telemetry::{self, Telemetry},
};

/// How hits are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Events {
    /// JSON lines, shaped like `dump --format json`.
    Json,
    /// One human-readable line each.
    Text,
    /// Nothing on stdout (logs still go to stderr).
    None,
}

/// Arguments of `detector run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub sources: SourceArgs,
    /// Watch only this process (repeatable), whatever its environment, instead
    /// of discovering processes; run ends when they have all exited.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Watch every CPython process, not only those whose environment sets
    /// DD_APPSEC_SCA_ENABLED=true.
    #[arg(long, env = "DETECTOR_ATTACH_ALL")]
    pub attach_all: bool,
    /// How calls are observed: `per-call` probes (every Python call of a
    /// watched process pays about a microsecond), or hardware watchpoints on
    /// each target's body start (`watch`, up to four body starts per process:
    /// other calls pass no probe, a target's call tens of
    /// microseconds), falling back to per-call per process, with the reason,
    /// where it cannot apply. `auto` is watch where it applies: the cheapest
    /// exact strategy for targets that are rarely called.
    #[arg(long, value_enum, default_value_t = Strategy::Auto, env = "DETECTOR_STRATEGY")]
    pub strategy: Strategy,
    /// Most CPU a watched process may spend in probes, in percent of one CPU:
    /// its probe passes per second times the cost of one (measured when the
    /// agent starts). A process over it moves to a cheaper strategy, logged
    /// and counted in detector_budget_actions_total: per-call -> watch ->
    /// watch with reachability -> suspended for --budget-retry. 0 turns the
    /// budget off.
    #[arg(long, default_value_t = 1.0, value_name = "PERCENT", env = "DETECTOR_OVERHEAD_BUDGET")]
    pub overhead_budget: f64,
    /// How long a process suspended by the overhead budget waits before it is
    /// probed again (and measured again), in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS", env = "DETECTOR_BUDGET_RETRY")]
    pub budget_retry: u64,
    /// Reachability mode, the default for SCA: report each target once per
    /// process and stop paying for it where the strategy allows (a
    /// watchpoint is disarmed once its target is seen); counts then say how
    /// often it was seen, not run. `--reachability false` reports and counts
    /// every call exactly.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL", env = "DETECTOR_REACHABILITY")]
    pub reachability: bool,
    /// Reachability under watchpoints: every SECS seconds, arm each reached
    /// target again for a one-second window, count its calls then, and
    /// report their rate (a `sample` line, `sampled_calls_per_sec` in
    /// /processes). 0, the default, samples nothing: a reached target then
    /// costs nothing at all.
    #[arg(long, default_value_t = 0, value_name = "SECS", env = "DETECTOR_REACHABILITY_SAMPLE")]
    pub reachability_sample: u64,
    /// Report to Datadog as the tracers do: each watched process is a
    /// runtime at the agent's telemetry intake, with the catalog
    /// dependencies it has installed and, for each advisory, where it was
    /// first reached. Sent to the agent that Remote Configuration polls, or
    /// that DD_TRACE_AGENT_URL / DD_AGENT_HOST name; never with neither.
    /// Heartbeats every DD_TELEMETRY_HEARTBEAT_INTERVAL seconds (60).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new(), env = "DD_INSTRUMENTATION_TELEMETRY_ENABLED")]
    pub telemetry: bool,
    /// How hits are printed on stdout.
    #[arg(long, value_enum, default_value_t = Events::Json, env = "DETECTOR_EVENTS")]
    pub events: Events,
    /// Serve /metrics (Prometheus), /healthz and /processes on this address.
    #[arg(long, value_name = "ADDR:PORT", env = "DETECTOR_METRICS_ADDR", value_parser = listen_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve the live event stream on this unix socket, for `detector dump`
    /// with no targets; `none` turns it off. Default: /run/detector/tap.sock
    /// for the node agent, none with --pid or a command (so an ad-hoc run
    /// never competes with the node's agent).
    #[arg(long, value_name = "PATH|none", env = "DETECTOR_TAP")]
    pub tap: Option<PathBuf>,
    /// Most processes watched at once; more are refused (and counted under
    /// detector_cap_reached_total{cap="processes"}).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=capacity::WATCHED as i64), env = "DETECTOR_MAX_PROCESSES")]
    pub max_processes: u32,
    /// Most processes watched at once in one tenant: a Kubernetes pod where
    /// the process's cgroup names one, else its cgroup. A fork storm in one
    /// pod then cannot fill --max-processes for the others. Processes
    /// refused by a cap or quota are considered again at each rescan.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..), env = "DETECTOR_MAX_PROCESSES_PER_TENANT")]
    pub max_processes_per_tenant: u32,
    /// Most active targets; beyond it the rest are ignored, in name order.
    #[arg(long, default_value_t = capacity::TARGETS, value_parser = clap::value_parser!(u32).range(1..=capacity::TARGETS as i64), env = "DETECTOR_MAX_TARGETS")]
    pub max_targets: u32,
    /// Most interpreter builds whose analysis is cached.
    #[arg(long, default_value_t = MAX_ENTRIES, env = "DETECTOR_MAX_CACHED_ANALYSES")]
    pub max_cached_analyses: usize,
    /// How often all of /proc is scanned for processes the exec tracepoint
    /// did not report (started before the agent, or missed), in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS", env = "DETECTOR_RESCAN_INTERVAL")]
    pub rescan_interval: u64,
    /// Also start this command and watch it from its first Python call; run
    /// ends when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// An address to listen on: `IP:PORT`, `[IPv6]:PORT`, or a bare IPv6
/// address and port (`fd00::5:9187`, as `$(POD_IP):9187` makes on an IPv6
/// cluster).
fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let (ip, port) = s.rsplit_once(':').ok_or_else(|| format!("{s}: expected ADDR:PORT"))?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| format!("{s}: expected ADDR:PORT"))?;
    let port: u16 = port.parse().map_err(|_| format!("{s}: bad port"))?;
    Ok((ip, port).into())
}

/// `DD_SCA_DETECTION_ENABLED` is `true` or `1`.
pub fn detection_enabled() -> bool {
    std::env::var("DD_SCA_DETECTION_ENABLED").is_ok_and(|v| discovery::is_true(v.as_bytes()))
}

/// How often the metrics are refreshed (and the health heartbeat beats).
const REFRESH: Duration = Duration::from_secs(1);

/// Runs `detector run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    if !detection_enabled() {
        eprintln!(
            "detector: SCA detection is off (DD_SCA_DETECTION_ENABLED is not true or 1): attaching nothing; \
             waiting for SIGTERM"
        );
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        return Ok(());
    }
    args.sources.flags()?; // a bad --target is a usage error, before anything starts
    require_privileges()?;
    raise_fd_limit();
    // Explicit processes (--pid, a command) end the run when they are gone;
    // without them the agent discovers processes until it is stopped.
    let explicit = !args.pids.is_empty() || !args.command.is_empty();
    let (metrics, tap, printer) = outputs(&args, explicit).await?;
    let (session, mut node) = agent(&args, printer, &metrics)?;
    let (mut session, reporter) = match telemetry(&args)? {
        Some(settings) => {
            let (telemetry, task) = Telemetry::start(settings, metrics.clone());
            (session.with_telemetry(telemetry), Some(task))
        }
        None => (session, None),
    };
    let mut sources = Sources::default();
    let (mut updates, rc_stats) = args.sources.start().await?;
    let max_targets = args.max_targets as usize;
    // What is known right away (flags, files) is in place before the first
    // attach, so the first calls already count.
    while let Ok(delivery) = updates.try_recv() {
        apply(&mut sources, &mut session, delivery, max_targets, &metrics);
    }
    let (mut watched, mut command) = if explicit { watch_given(&args, &mut session)? } else { Default::default() };
    start_watching(&args, explicit, &mut session, &mut node)?;
    let mut rescan = tokio::time::interval(Duration::from_secs(args.rescan_interval.max(1)));
    let mut refresh = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            Some(delivery) = updates.recv() => apply(&mut sources, &mut session, delivery, max_targets, &metrics),
            decided = node.decided() => node.settle(&mut session, decided),
            _ = rescan.tick(), if !explicit => node.rescan(&session),
            _ = refresh.tick() => node.refresh(&mut session, rc_stats.as_deref()),
            activity = session.next() => match activity {
                Activity::Exited(pid) => {
                    let status = match command.take_if(|(p, _)| *p == pid) {
                        Some((_, c)) => spawn::exit_status(c).await,
                        None => None,
                    };
                    node.end(&mut session, pid, status.as_deref());
                    watched.remove(&pid);
                    if explicit && watched.is_empty() {
                        info!("every watched process has exited");
                        break;
                    }
                }
                Activity::Exec(pid) if !explicit => node.exec(&mut session, pid),
                Activity::Fork { child, .. } if !explicit => node.consider(&session, child, true),
                Activity::Exec(_) | Activity::Fork { .. } => {}
                Activity::OutputClosed => break,
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    session.shutdown();
    if let Some(task) = reporter {
        // It sends what is left, within its own limit.
        let _ = task.await;
    }
    drop(tap);
    Ok(())
}

/// Where telemetry goes, if it is on and there is an agent to send it to.
fn telemetry(args: &RunArgs) -> anyhow::Result<Option<telemetry::Settings>> {
    if !args.telemetry {
        info!("telemetry off: nothing is reported to the Datadog Agent");
        return Ok(None);
    }
    let Some(url) = args.sources.agent()? else {
        info!("no Datadog Agent given: nothing is reported to its telemetry intake");
        return Ok(None);
    };
    telemetry::Settings::from_env(url).map(Some).map_err(anyhow::Error::msg).context("telemetry")
}

/// Where the agent reports: the metrics server, the tap, and the printer
/// of its event lines (which feeds the tap).
async fn outputs(args: &RunArgs, explicit: bool) -> anyhow::Result<(SharedMetrics, Option<Tap>, Printer)> {
    let tap_path = match &args.tap {
        Some(p) if p.as_os_str() == "none" => None,
        Some(p) => Some(p.clone()),
        None if explicit => None,
        None => Some(PathBuf::from(tap::DEFAULT_PATH)),
    };
    let metrics: SharedMetrics = Arc::default();
    if let Some(addr) = args.metrics_addr {
        server::start(addr, metrics.clone()).await.with_context(|| format!("serving metrics on {addr}"))?;
    }
    let tap = match &tap_path {
        Some(p) => Some(Tap::bind(p).with_context(|| format!("serving the tap on {}", p.display()))?),
        None => None,
    };
    let mut printer = Printer::new(match args.events {
        Events::Json => Some(Format::Json),
        Events::Text => Some(Format::Text),
        Events::None => None,
    });
    if let Some(tap) = &tap {
        printer = printer.with_tap(tap.sender());
    }
    Ok((metrics, tap, printer))
}

/// The session (the eBPF object loaded, nothing attached) and the node's
/// view of processes, as `args` configure them.
fn agent(args: &RunArgs, printer: Printer, metrics: &SharedMetrics) -> anyhow::Result<(Session, Node)> {
    // Every watched process's share of the pending map fits: none can take
    // another's room.
    let pending = (args.max_processes as u64 * capacity::PENDING_PER_PROCESS) as u32;
    let caps =
        Capacities { targets: args.max_targets, pending: pending.max(capacity::PENDING), ..Capacities::default() };
    let cache = Arc::new(AnalysisCache::new(args.max_cached_analyses));
    let mut session = Session::new(caps, printer)?
        .with_cache(cache.clone())
        .with_strategy(args.strategy)
        .with_reachability(args.reachability)
        .with_reachability_sample(
            (args.reachability_sample > 0).then(|| Duration::from_secs(args.reachability_sample)),
        );
    let budget = (args.overhead_budget > 0.0).then(|| Budget {
        share: args.overhead_budget / 100.0,
        costs: session.calibrate(),
        retry: Duration::from_secs(args.budget_retry),
    });
    let opts = NodeOptions {
        attach_all: args.attach_all,
        max_processes: args.max_processes as usize,
        max_per_tenant: args.max_processes_per_tenant as usize,
        budget,
    };
    let node = Node::new(opts, metrics.clone(), cache);
    Ok((session, node))
}

/// A process started by `run`: its pid, and what tells its exit status.
type Command = (u32, std::thread::JoinHandle<std::io::Result<std::process::ExitStatus>>);

/// Watches the processes given (`--pid`, a command): the pids watched, and
/// the command's process.
fn watch_given(args: &RunArgs, session: &mut Session) -> anyhow::Result<(BTreeSet<u32>, Option<Command>)> {
    for &pid in &args.pids {
        let service = Environ::read(pid).map(|e| e.service).unwrap_or_default();
        if let Err(e) = pyproc::locate(pid, &session.cache())
            .map_err(anyhow::Error::from)
            .and_then(|p| Ok(session.watch_as(p, service)?))
        {
            error!(pid, error = %format!("{e:#}"), "not watching process");
            eprintln!("detector: {e:#}");
        }
    }
    let mut command = None;
    if !args.command.is_empty() {
        let s = spawn::spawn_python(&args.command, session.cache())?;
        let pid = s.process.pid;
        session.watch(s.process.clone())?;
        command = Some((pid, s.release()));
    }
    let mut watched: BTreeSet<u32> = args.pids.iter().copied().collect();
    watched.extend(command.as_ref().map(|(p, _)| *p));
    if watched.is_empty() {
        bail!("none of the given processes can be watched");
    }
    Ok((watched, command))
}

/// Starts discovery (without given processes), confines the agent, and
/// looks at the processes already running.
fn start_watching(args: &RunArgs, explicit: bool, session: &mut Session, node: &mut Node) -> anyhow::Result<()> {
    if !explicit {
        session.discover().context("starting process discovery")?;
        info!(attach_all = args.attach_all, "discovering Python processes");
        session.printer().discovering(args.attach_all);
    }
    // Every program is loaded and the tap's socket made: nothing the agent
    // does from here needs to write a file, load code or trace a process.
    if args.command.is_empty() {
        confine::confine().context("confining the agent")?;
        info!(
            "confined: no file opened for writing or changed, \
             no ptrace, process_vm_writev, exec, unix socket, namespace, mount or module"
        );
    }
    if !explicit {
        node.rescan(session);
    }
    Ok(())
}

/// Applies an update's targets, and tells its sender whether the kernel
/// took them.
fn apply(sources: &mut Sources, session: &mut Session, delivery: Delivery, max: usize, metrics: &Metrics) {
    let result = apply_update(sources, session, delivery.update, max, metrics);
    if let Some(applied) = delivery.applied {
        let _ = applied.send(result);
    }
}

fn apply_update(
    sources: &mut Sources,
    session: &mut Session,
    update: Update,
    max: usize,
    metrics: &Metrics,
) -> Result<(), String> {
    let before = sources.clone();
    if sources.apply(update) {
        let mut want: BTreeSet<Target> = sources.effective().into_keys().collect();
        if want.len() > max {
            warn!(active = want.len(), max, "more targets than --max-targets: ignoring the rest, in name order");
            metrics.cap_reached("targets");
            want = want.into_iter().take(max).collect();
        }
        // Before the targets: a new target is gated by its advisories from
        // its first call.
        session.set_advisories(sources.advisories(), sources.unconditional());
        // The kernel refusing a change leaves the last targets it took:
        // said, counted, and no reason to stop watching.
        if let Err(e) = session.set_targets(&want) {
            let e = format!("{:#}", anyhow::Error::from(e));
            error!(error = %e, "cannot apply the targets: the previous ones stay");
            // As if the update never came: the same update again is tried again.
            *sources = before;
            session.set_advisories(sources.advisories(), sources.unconditional());
            return Err(format!("the kernel refused the targets: {e}"));
        }
        metrics.targets.set(want.len() as i64);
    }
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard one: every probe,
/// watchpoint and connection takes one, and running out blinds the agent.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let from = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: a valid rlimit, read above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        info!(from, to = limit.rlim_cur, "raised the open-descriptor limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_of_both_families() {
        assert_eq!(listen_addr("10.0.0.5:9187").unwrap().to_string(), "10.0.0.5:9187");
        assert_eq!(listen_addr("[fd00::5]:9187").unwrap().to_string(), "[fd00::5]:9187");
        assert_eq!(listen_addr("fd00::5:9187").unwrap().to_string(), "[fd00::5]:9187");
        assert!(listen_addr("fd00::5").is_err(), "a port is required");
        assert!(listen_addr("nonsense").is_err());
    }
}
