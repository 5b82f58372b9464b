//! Polling the Datadog Agent's `/v0.7/config`: discovery through `/info`,
//! the full state in every request, payloads parsed and acknowledged (or
//! reported as errors) before the next poll, and backoff on errors.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    client::{Change, Identity, RcClient},
    protocol::Response,
};
use crate::sources::{Config, Delivery, Origin, Update, payload};

/// Longest wait between attempts after errors.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Wait before asking again an agent that does not serve `/v0.7/config`.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(30);
/// Per-request timeout.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read (a catalog of the most targets a config may name
/// is far smaller).
const MAX_BODY: usize = 16 << 20;

/// Where and how often to poll.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Base URL of the agent, e.g. `http://127.0.0.1:8126`.
    pub url: String,
    /// Time between polls.
    pub interval: Duration,
    /// Tracer identity to present.
    pub identity: Identity,
}

impl Settings {
    /// The agent URL from `flag`, else `DD_TRACE_AGENT_URL`, else
    /// `DD_AGENT_HOST` and `DD_TRACE_AGENT_PORT` (8126), else localhost; the
    /// interval from `DD_REMOTE_CONFIG_POLL_INTERVAL_SECONDS` (5).
    pub fn from_env(flag: Option<&str>) -> Result<Settings, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let url = match (flag.map(str::to_owned), env("DD_TRACE_AGENT_URL"), env("DD_AGENT_HOST")) {
            (Some(u), _, _) | (None, Some(u), _) => u,
            (None, None, Some(host)) => {
                let port = env("DD_TRACE_AGENT_PORT").unwrap_or_else(|| "8126".into());
                let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
                format!("http://{host}:{port}")
            }
            (None, None, None) => "http://localhost:8126".into(),
        };
        let url = url.trim_end_matches('/').to_owned();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!("agent URL {url:?}: only http:// and https:// are supported"));
        }
        let interval = match env("DD_REMOTE_CONFIG_POLL_INTERVAL_SECONDS") {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("DD_REMOTE_CONFIG_POLL_INTERVAL_SECONDS={v:?} is not a positive number"))?,
            None => Duration::from_secs(5),
        };
        let identity = Identity {
            service: env("DD_SERVICE").unwrap_or_else(|| "detector".into()),
            env: env("DD_ENV").unwrap_or_default(),
            app_version: env("DD_VERSION").unwrap_or_default(),
        };
        Ok(Settings { url, interval, identity })
    }
}

/// Counters of the poller's life, for metrics and `detector targets`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests sent to `/v0.7/config`.
    pub polls: AtomicU64,
    /// Failed polls and rejected responses.
    pub errors: AtomicU64,
    /// The last error, if the last attempt failed.
    pub last_error: Mutex<Option<String>>,
}

enum PollError {
    /// RC is not enabled on the agent.
    NotFound,
    /// Anything else: connection, timeout, 5xx, bad JSON.
    Failed(String),
}

/// Polls until `tx` closes, publishing every change of the RC configs.
pub async fn run(settings: Settings, tx: mpsc::Sender<Delivery>, stats: Arc<Stats>) {
    let http = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %e, "cannot create an HTTP client: remote configuration disabled");
            return;
        }
    };
    let mut client = RcClient::new(settings.identity.clone());
    let mut parsed: BTreeMap<String, Result<crate::sources::catalog::Catalog, String>> = BTreeMap::new();
    let mut discovered = false;
    let mut published = false;
    let mut failures: u32 = 0;
    loop {
        if !discovered {
            match discover(&http, &settings.url).await {
                Ok(true) => {
                    info!(agent = %settings.url, "remote configuration available");
                    discovered = true;
                }
                Ok(false) => {
                    note_error(&stats, format!("{} does not serve /v0.7/config", settings.url));
                    tokio::time::sleep(UNSUPPORTED_RETRY).await;
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    note_error(&stats, e);
                    tokio::time::sleep(backoff(settings.interval, failures)).await;
                    continue;
                }
            }
        }
        stats.polls.fetch_add(1, Ordering::Relaxed);
        match poll(&http, &settings.url, &client).await {
            Ok(resp) => {
                failures = 0;
                *stats.last_error.lock().unwrap() = None;
                match client.update(resp) {
                    // The first answer is published even if empty: it tells
                    // readers that the agent answered.
                    Ok(changes) if !changes.is_empty() || !published => {
                        published = true;
                        // Parsed configs are acknowledged once the kernel has their targets.
                        let mut to_apply = Vec::new();
                        for change in changes {
                            match change {
                                Change::Put { path, raw } => {
                                    let result = payload::parse(&raw).map_err(|e| e.to_string());
                                    if let Err(e) = &result {
                                        client.acknowledge(&path, Err(e.clone()));
                                    }
                                    match result {
                                        Ok(targets) => {
                                            to_apply.push(path.clone());
                                            parsed.insert(path, Ok(targets));
                                        }
                                        // A bad update of a good config: the good one stays.
                                        Err(e) if matches!(parsed.get(&path), Some(Ok(_))) => {
                                            warn!(config = %path, error = %e, "rejected remote configuration update: its last good version stays");
                                        }
                                        Err(e) => {
                                            warn!(config = %path, error = %e, "rejected remote configuration");
                                            parsed.insert(path, Err(e));
                                        }
                                    }
                                }
                                Change::Remove { path } => {
                                    parsed.remove(&path);
                                }
                            }
                        }
                        let configs = parsed
                            .iter()
                            .map(|(path, targets)| Config {
                                origin: Origin::RemoteConfig,
                                name: path.clone(),
                                version: client.held().get(path).map(|h| h.version),
                                targets: targets.clone(),
                            })
                            .collect();
                        let (applied, answer) = tokio::sync::oneshot::channel();
                        let update = Update { origin: Origin::RemoteConfig, configs };
                        if tx.send(Delivery { update, applied: Some(applied) }).await.is_err() {
                            return;
                        }
                        let Ok(result) = answer.await else {
                            warn!("the agent loop is gone: remote configuration polling stops");
                            return;
                        };
                        if let Err(e) = &result {
                            warn!(configs = ?to_apply, error = %e, "remote configuration parsed but not applied");
                        }
                        for path in to_apply {
                            client.acknowledge(&path, result.clone());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => note_error(&stats, format!("rejected response: {e}")),
                }
                tokio::time::sleep(settings.interval).await;
            }
            Err(PollError::NotFound) => {
                note_error(&stats, format!("{}/v0.7/config: 404, remote configuration is not enabled", settings.url));
                discovered = false;
                tokio::time::sleep(UNSUPPORTED_RETRY).await;
            }
            Err(PollError::Failed(e)) => {
                failures += 1;
                note_error(&stats, e);
                tokio::time::sleep(backoff(settings.interval, failures)).await;
            }
        }
    }
}

fn note_error(stats: &Stats, e: String) {
    stats.errors.fetch_add(1, Ordering::Relaxed);
    let mut last = stats.last_error.lock().unwrap();
    // Log a failure once, not every retry.
    if last.as_deref() != Some(e.as_str()) {
        warn!(error = %e, "remote configuration");
    } else {
        debug!(error = %e, "remote configuration");
    }
    *last = Some(e);
}

/// Exponential backoff from the poll interval, capped, with jitter.
fn backoff(interval: Duration, failures: u32) -> Duration {
    let base = interval.saturating_mul(1 << failures.min(6)).min(MAX_BACKOFF);
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    base.mul_f64(0.75 + 0.5 * jitter).min(MAX_BACKOFF)
}

async fn discover(http: &reqwest::Client, url: &str) -> Result<bool, String> {
    let resp = http.get(format!("{url}/info")).send().await.map_err(|e| format!("{url}/info: {}", crate::chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("{url}/info: HTTP {}", resp.status()));
    }
    let info: serde_json::Value = resp.json().await.map_err(|e| format!("{url}/info: {}", crate::chain(&e)))?;
    Ok(info["endpoints"].as_array().is_some_and(|e| e.iter().any(|x| x == "/v0.7/config")))
}

async fn poll(http: &reqwest::Client, url: &str, client: &RcClient) -> Result<Response, PollError> {
    let fail = |e: String| PollError::Failed(format!("{url}/v0.7/config: {e}"));
    let mut resp = http
        .post(format!("{url}/v0.7/config"))
        .json(&client.request())
        .send()
        .await
        .map_err(|e| fail(crate::chain(&e)))?;
    match resp.status().as_u16() {
        404 => return Err(PollError::NotFound),
        204 => return Ok(Response::default()),
        s if !(200..300).contains(&s) => return Err(fail(format!("HTTP {s}"))),
        _ => {}
    }
    let too_large = || fail(format!("response larger than {MAX_BODY} bytes"));
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(crate::chain(&e)))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Response::default());
    }
    serde_json::from_slice(&body).map_err(|e| fail(format!("invalid response: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_secs(5);
        assert!(backoff(i, 1) >= Duration::from_millis(7500) && backoff(i, 1) <= Duration::from_millis(12500));
        assert!(backoff(i, 10) <= MAX_BACKOFF);
    }
}
