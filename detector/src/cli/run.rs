//! `detector run`: agent mode. Targets come from Remote Configuration,
//! payload files and flags, and follow them live; hits are reported as they
//! happen.

use std::collections::BTreeSet;

use anyhow::bail;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use super::{require_privileges, sources::SourceArgs};
use crate::{
    agent::{Session, session::Activity, spawn},
    bpf::Capacities,
    events::output::{Format, Printer},
    pyproc::{self, ProcessError},
    sources::{Sources, Update},
    targets::Target,
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
    /// Watch this process. Repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// How hits are printed on stdout.
    #[arg(long, value_enum, default_value_t = Events::Json)]
    pub events: Events,
    /// Also start this command and watch it from its first Python call; run
    /// ends when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `DD_SCA_DETECTION_ENABLED` is `true` or `1`.
pub fn detection_enabled() -> bool {
    std::env::var("DD_SCA_DETECTION_ENABLED")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
}

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
    if args.pids.is_empty() && args.command.is_empty() {
        bail!("no process to watch: give --pid PID (repeatable) or -- COMMAND ARGS...");
    }
    require_privileges()?;
    let printer = Printer::new(match args.events {
        Events::Json => Some(Format::Json),
        Events::Text => Some(Format::Text),
        Events::None => None,
    });
    let mut session = Session::new(Capacities::default(), printer)?;
    let mut sources = Sources::default();
    let (mut updates, _rc_stats) = args.sources.start().await?;
    // What is known right away (flags, files) is in place before the first
    // attach, so the first calls already count.
    while let Ok(update) = updates.try_recv() {
        apply(&mut sources, &mut session, update)?;
    }
    for &pid in &args.pids {
        if let Err(e) =
            pyproc::locate(pid, &session.cache()).map_err(anyhow::Error::from).and_then(|p| Ok(session.watch(p)?))
        {
            error!(pid, error = %format!("{e:#}"), "not watching process");
            eprintln!("detector: {e:#}");
        }
    }
    let mut command = None;
    if !args.command.is_empty() {
        let cache = session.cache();
        let s = spawn::spawn(&args.command, move |pid| match pyproc::locate(pid, &cache) {
            Ok(p) => Ok(Some(p)),
            Err(ProcessError::NotPython { .. }) => Ok(None),
            Err(e) => Err(e),
        })?;
        let pid = s.process.pid;
        session.watch(s.process.clone())?;
        command = Some((pid, s.release()));
    }
    let mut watched: BTreeSet<u32> = args.pids.iter().copied().collect();
    watched.extend(command.as_ref().map(|(p, _)| *p));
    loop {
        tokio::select! {
            Some(update) = updates.recv() => apply(&mut sources, &mut session, update)?,
            activity = session.next() => match activity {
                Activity::Exited(pid) => {
                    let status = match command.take_if(|(p, _)| *p == pid) {
                        Some((_, c)) => tokio::task::spawn_blocking(move || c.join()).await.ok().and_then(|r| r.ok()).and_then(|r| r.ok()),
                        None => None,
                    };
                    session.end(pid, status.map(|s| s.to_string()).as_deref());
                    watched.remove(&pid);
                    if watched.is_empty() {
                        info!("every watched process has exited");
                        break;
                    }
                }
                Activity::OutputClosed => break,
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    session.shutdown();
    Ok(())
}

fn apply(sources: &mut Sources, session: &mut Session, update: Update) -> anyhow::Result<()> {
    if sources.apply(update) {
        let want: BTreeSet<Target> = sources.effective().into_keys().collect();
        session.set_targets(&want)?;
    }
    Ok(())
}
