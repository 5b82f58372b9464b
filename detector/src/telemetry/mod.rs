//! Reporting upstream as the Datadog tracers do: instrumentation telemetry
//! v2 through the Datadog Agent, one runtime per watched process, so that
//! the backend needs no change to show what this agent found. The agent
//! loop hands events to a bounded queue and never waits on the network.

mod intake;
pub(crate) mod runtime;
pub mod wire;

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};
use uuid::Uuid;

use crate::metrics::SharedMetrics;
use runtime::Found;
use wire::{Application, Host, Reached};

/// What this agent says it is, in `application.tracer_version` and the
/// `DD-Client-Library-Version` header: never a ddtrace version, so that a
/// process that also runs ddtrace is reported twice in ways the backend
/// tells apart (with distinct runtime ids too).
pub const TRACER_VERSION: &str = concat!("detector/", env!("CARGO_PKG_VERSION"));

/// Events the agent loop may queue ahead of the sender; more are dropped
/// and counted.
const QUEUE: usize = 4096;

/// Where and how often to report.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Base URL of the Datadog Agent.
    pub url: String,
    /// Time between heartbeats of a runtime.
    pub heartbeat: Duration,
    /// The node, as reported.
    pub host: Host,
}

impl Settings {
    /// Reports to the agent at `url`, with the heartbeat interval of
    /// `DD_TELEMETRY_HEARTBEAT_INTERVAL` (seconds, 60 by default).
    pub fn from_env(url: String) -> Result<Settings, String> {
        let heartbeat = match std::env::var("DD_TELEMETRY_HEARTBEAT_INTERVAL").ok().filter(|v| !v.trim().is_empty()) {
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    format!("DD_TELEMETRY_HEARTBEAT_INTERVAL={v:?} is not a number of seconds in (0, 3600]")
                })?,
            None => Duration::from_secs(60),
        };
        Ok(Settings { url, heartbeat, host: host() })
    }
}

/// What the agent loop tells the sender about a runtime.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    /// A process is announced: `adopted` if it started before this agent.
    Started { runtime: Uuid, application: Application, adopted: bool },
    /// Its catalog dependencies, as last read.
    Dependencies { runtime: Uuid, found: Vec<Found> },
    /// An advisory's target was first reached in it.
    Reached { runtime: Uuid, dependency: String, version: Option<String>, advisory: String, at: Reached },
    /// It ended.
    Closed { runtime: Uuid },
}

impl Event {
    /// Whether it counts against the queue's bound.
    fn bounded(&self) -> bool {
        matches!(self, Event::Dependencies { .. } | Event::Reached { .. })
    }

    fn runtime(&self) -> Uuid {
        match self {
            Event::Started { runtime, .. }
            | Event::Dependencies { runtime, .. }
            | Event::Reached { runtime, .. }
            | Event::Closed { runtime } => *runtime,
        }
    }
}

/// The agent loop's side of the sender: queues events, never blocks.
/// A runtime's start and end are always queued (one each per watched
/// process, so bounded by them): a runtime that missed either would never
/// be sent, or never end. Other events beyond [`QUEUE`] are dropped.
#[derive(Clone)]
pub struct Telemetry {
    tx: mpsc::UnboundedSender<Event>,
    /// Events other than starts and ends queued and not taken yet.
    queued: Arc<AtomicUsize>,
    metrics: SharedMetrics,
}

impl Telemetry {
    /// Starts the sender; the handle that waits for its last reports.
    pub fn start(settings: Settings, metrics: SharedMetrics) -> (Telemetry, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tracing::info!(agent = %settings.url, heartbeat = ?settings.heartbeat, tracer_version = TRACER_VERSION,
            "reporting to the Datadog Agent's telemetry intake");
        let task = tokio::spawn(intake::run(settings, (rx, queued.clone()), metrics.clone()));
        (Telemetry { tx, queued, metrics }, task)
    }

    /// Queues `event`; a full queue drops it (never a start or an end),
    /// counted.
    pub(crate) fn send(&self, event: Event) {
        if event.bounded() && self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.metrics.telemetry_dropped("queue_full", 1);
            return;
        }
        // The sender ends only after this side is dropped.
        let _ = self.tx.send(event);
    }
}

/// The runtime id of the process `pid` that started at `start_time`
/// (clock ticks after boot) running the interpreter `binary`: the same
/// across restarts of this agent, and another for a pid reused after a
/// reboot or by another process, or for a process that executed another
/// interpreter.
pub fn runtime_id(pid: u32, start_time: Option<u64>, binary: &str) -> Uuid {
    // A namespace of this agent's own (a v4 id drawn once).
    const NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_0a52_9d3e_4b7a_8f21_5e0d_c4a9_3b17);
    let name = format!("{}:{pid}:{}:{binary}", boot_id(), start_time.unwrap_or(0));
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

fn boot_id() -> &'static str {
    static BOOT_ID: OnceLock<String> = OnceLock::new();
    BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
    })
}

/// The node: `DD_HOSTNAME`, else its name, and its kernel.
fn host() -> Host {
    // SAFETY: a zeroed utsname to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid utsname.
    let ok = unsafe { libc::uname(&mut u) } == 0;
    let field = |f: &[libc::c_char]| -> String {
        if !ok {
            return String::new();
        }
        let bytes: Vec<u8> = f.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let hostname = std::env::var("DD_HOSTNAME").ok().filter(|h| !h.trim().is_empty());
    Host {
        hostname: hostname.unwrap_or_else(|| field(&u.nodename)),
        os: "Linux".into(),
        kernel_name: field(&u.sysname),
        kernel_release: field(&u.release),
        kernel_version: field(&u.version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_ids_are_stable_and_distinct() {
        let id = |pid, start, binary| runtime_id(pid, Some(start), binary);
        assert_eq!(id(42, 100, "/py"), id(42, 100, "/py"));
        assert_ne!(id(42, 100, "/py"), id(42, 101, "/py"), "a reused pid");
        assert_ne!(id(42, 100, "/py"), id(43, 100, "/py"));
        assert_ne!(id(42, 100, "/py"), id(42, 100, "/other/py"), "another image");
        assert_eq!(id(42, 100, "/py").get_version_num(), 5);
    }
}
