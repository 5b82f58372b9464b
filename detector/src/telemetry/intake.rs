//! The sender: keeps each runtime's state, sends what is due to the
//! agent's telemetry intake at most a batch of requests at a time, and
//! backs off while the intake does not answer. What the agent loop queued
//! meanwhile is taken between requests, so a slow intake fills nothing
//! but its own backlog of state.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{
    Event, Settings, TRACER_VERSION,
    runtime::{Runtime, Sent},
    wire::Envelope,
};
use crate::metrics::{Metrics, SharedMetrics};

/// How often runtimes are looked at for something to send.
const FLUSH: Duration = Duration::from_secs(1);
/// Most requests per look: the queue is taken between them, and the rest
/// wait for the next look.
const MAX_PER_FLUSH: usize = 64;
/// Per-request timeout.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between attempts while the intake fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest the last reports may take when the agent stops.
const LAST_FLUSH: Duration = Duration::from_secs(3);
/// Most runtimes held: every watched process, and those that ended with
/// something still to say.
const MAX_RUNTIMES: usize = 2 * detector_common::capacity::WATCHED as usize;

/// Why a request was not taken.
enum Failure {
    /// Worth retrying: the intake is down, slow or busy.
    Retry(String),
    /// Refused for what it is: retrying would not help.
    Rejected(String),
}

/// Whether the intake answers, and since when it does not.
#[derive(Default)]
struct Link {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Link {
    fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }

    fn failed(&mut self, url: &str, why: &str) {
        if self.failures == 0 {
            warn!(agent = %url, error = %why, "the telemetry intake does not answer: reports are kept and sent when it does");
        }
        self.failures += 1;
        let wait = Duration::from_secs(1 << self.failures.min(6)).min(MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + wait);
        debug!(agent = %url, failures = self.failures, retry_in = ?wait, "telemetry backing off");
    }

    fn answered(&mut self, url: &str) {
        if self.failures > 0 {
            info!(agent = %url, failures = self.failures, "the telemetry intake answers again");
        }
        *self = Link::default();
    }
}

/// Every runtime's state, capped.
struct Runtimes {
    map: HashMap<Uuid, Runtime>,
    /// The queue's count of bounded events: one fewer for each taken.
    queued: Arc<AtomicUsize>,
}

impl Runtimes {
    fn apply(&mut self, event: Event, metrics: &Metrics) {
        if event.bounded() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        let id = event.runtime();
        if !self.map.contains_key(&id) && !self.make_room(metrics) {
            metrics.telemetry_dropped("runtimes_cap", 1);
            return;
        }
        let r = self.map.entry(id).or_insert_with(Runtime::new);
        match event {
            Event::Started { application, adopted, .. } => r.start(application, adopted),
            Event::Dependencies { found, .. } => {
                let dropped = r.dependencies(found);
                if dropped > 0 {
                    metrics.telemetry_dropped("metadata_cap", dropped);
                }
            }
            Event::Reached { dependency, version, advisory, at, .. } => {
                if !r.reached(&dependency, version.as_deref(), &advisory, at) && r.full(&dependency) {
                    metrics.telemetry_dropped("metadata_cap", 1);
                }
            }
            Event::Closed { .. } => r.close(Instant::now()),
        }
        metrics.telemetry_runtimes.set(self.map.len() as i64);
    }

    /// Room for one more runtime: the one that ended first goes if need be.
    fn make_room(&mut self, metrics: &Metrics) -> bool {
        if self.map.len() < MAX_RUNTIMES {
            return true;
        }
        let oldest = self.map.iter().filter_map(|(id, r)| Some((r.closed_at?, *id))).min();
        let Some((_, id)) = oldest else { return false };
        self.map.remove(&id);
        metrics.telemetry_dropped("runtimes_cap", 1);
        true
    }
}

/// The queue from the agent loop, and its count of bounded events.
type Queue = (mpsc::UnboundedReceiver<Event>, Arc<AtomicUsize>);

/// Sends until the agent loop's side is dropped, then sends what is left
/// for a little while.
pub(super) async fn run(settings: Settings, (mut rx, queued): Queue, metrics: SharedMetrics) {
    let http = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "cannot create an HTTP client: nothing is reported to the telemetry intake");
            return;
        }
    };
    let runtimes = Runtimes { map: HashMap::new(), queued };
    let mut sender = Sender { http, settings, metrics, runtimes, link: Link::default() };
    let mut tick = tokio::time::interval(FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(e) => sender.runtimes.apply(e, &sender.metrics),
                None => break,
            },
            _ = tick.tick() => {
                sender.flush(&mut rx).await;
            }
        }
    }
    let last = async { while sender.flush(&mut rx).await {} };
    if tokio::time::timeout(LAST_FLUSH, last).await.is_err() {
        warn!("the telemetry intake took too long: the last reports were not all sent");
    }
}

struct Sender {
    http: reqwest::Client,
    settings: Settings,
    metrics: SharedMetrics,
    runtimes: Runtimes,
    link: Link,
}

impl Sender {
    /// Sends what is due, a batch of requests at most, taking the queue
    /// between requests; stops at the first the intake does not answer.
    /// Whether any was taken (more may be due).
    async fn flush(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) -> bool {
        if !self.link.ready(Instant::now()) {
            return false;
        }
        let mut taken = false;
        let now = Instant::now();
        let due: Vec<Uuid> = self.runtimes.map.iter().filter(|(_, r)| r.is_due(now)).map(|(id, _)| *id).collect();
        for id in due.into_iter().take(MAX_PER_FLUSH) {
            let Some(r) = self.runtimes.map.get_mut(&id) else { continue };
            let Some((payload, sent)) = r.due(Instant::now()) else { continue };
            let Some(application) = r.application.clone() else { continue };
            r.seq += 1;
            let envelope = Envelope {
                api_version: "v2".into(),
                tracer_time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                runtime_id: id.to_string(),
                seq_id: r.seq,
                application,
                host: self.settings.host.clone(),
                payload,
            };
            match self.post(&envelope).await {
                Ok(()) => {
                    self.metrics.telemetry_request("ok");
                    self.link.answered(&self.settings.url);
                    self.acknowledge(id, sent);
                    taken = true;
                }
                Err(Failure::Rejected(why)) => {
                    warn!(runtime_id = %id, request_type = envelope.payload.request_type(), error = %why,
                        "the telemetry intake refused a report: dropped");
                    self.metrics.telemetry_request("rejected");
                    self.metrics.telemetry_dropped("rejected", 1);
                    self.acknowledge(id, sent);
                }
                Err(Failure::Retry(why)) => {
                    self.metrics.telemetry_request("failed");
                    self.link.failed(&self.settings.url, &why);
                    return false;
                }
            }
            while let Ok(e) = rx.try_recv() {
                self.runtimes.apply(e, &self.metrics);
            }
        }
        taken
    }

    fn acknowledge(&mut self, id: Uuid, sent: Sent) {
        let Some(r) = self.runtimes.map.get_mut(&id) else { return };
        r.sent(sent, Instant::now(), self.settings.heartbeat);
        if r.done() {
            self.runtimes.map.remove(&id);
            self.metrics.telemetry_runtimes.set(self.runtimes.map.len() as i64);
        }
    }

    async fn post(&self, envelope: &Envelope) -> Result<(), Failure> {
        let url = format!("{}/telemetry/proxy/api/v2/apmtelemetry", self.settings.url);
        let response = self
            .http
            .post(&url)
            .header("DD-Telemetry-API-Version", "v2")
            .header("DD-Telemetry-Request-Type", envelope.payload.request_type())
            .header("DD-Client-Library-Language", "python")
            .header("DD-Client-Library-Version", TRACER_VERSION)
            .json(envelope)
            .send()
            .await
            .map_err(|e| Failure::Retry(format!("{url}: {}", crate::chain(&e))))?;
        let status = response.status();
        match status.as_u16() {
            200..=299 => Ok(()),
            // Not there yet (an agent starting, or one without the
            // proxy), throttled, or failing: the same report later.
            404 | 408 | 429 | 500..=599 => Err(Failure::Retry(format!("{url}: HTTP {status}"))),
            _ => Err(Failure::Rejected(format!("{url}: HTTP {status}"))),
        }
    }
}
