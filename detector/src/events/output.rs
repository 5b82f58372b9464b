//! Printing events as JSON lines or text, one line each, flushed at once so
//! a pipe reader sees them as they happen.

use std::{io::Write, sync::Arc};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::Hit;
use crate::{
    agent::{
        callers::Caller,
        discovery::Service,
        exposure::Exposure,
        report::{ArmedReport, AttachedReport, ModeReport},
    },
    sources::catalog::Advisory,
    targets::Target,
};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Writes events to stdout, and as JSON lines to the tap's clients.
pub struct Printer {
    format: Option<Format>,
    closed: std::cell::Cell<bool>,
    tap: Option<broadcast::Sender<Arc<str>>>,
}

impl Printer {
    /// A printer in `format`; `None` prints nothing.
    pub fn new(format: Option<Format>) -> Self {
        Printer { format, closed: std::cell::Cell::new(false), tap: None }
    }

    /// Also sends every event, as a JSON line, to `tap`.
    pub fn with_tap(mut self, tap: broadcast::Sender<Arc<str>>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Whether stdout was closed by its reader: there is no one to report
    /// to. Asked of the descriptor too, not only learnt from a failed
    /// write: a reader can go while nothing is being written.
    pub fn closed(&self) -> bool {
        if self.format.is_some() && !self.closed.get() {
            let mut out = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
            // SAFETY: one valid pollfd, no wait.
            let ready = unsafe { libc::poll(&mut out, 1, 0) };
            if ready > 0 && out.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                self.closed.set(true);
            }
        }
        self.closed.get()
    }

    fn emit(&self, json: Value, text: impl FnOnce() -> String) {
        if let Some(tap) = self.tap.as_ref().filter(|t| t.receiver_count() > 0) {
            let _ = tap.send(json.to_string().into());
        }
        let line = match self.format {
            Some(Format::Json) => json.to_string(),
            Some(Format::Text) => text(),
            None => return,
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            self.closed.set(true);
        }
    }

    /// Probes are live on a process: its report, and how each target is
    /// observed, at which sites.
    pub fn attached(&self, report: &AttachedReport) {
        let mut line = serde_json::to_value(report).unwrap_or_default();
        line["type"] = "attached".into();
        self.emit(line, || {
            let p = &report.process;
            let how = match &p.mode {
                ModeReport::Watch { watched_units, rotating, pending_targets } => format!(
                    ", {watched_units} watchpoints{}{}",
                    if *rotating { " (rotating)" } else { "" },
                    match pending_targets {
                        0 => String::new(),
                        n => format!(", {n} pending until their module runs"),
                    }
                ),
                _ => String::new(),
            };
            format!(
                "attached to pid {} (CPython {}, {}): {}, {} probes{how}, watching {}",
                p.pid,
                p.version,
                escaped(&p.binary),
                p.strategy,
                p.probes,
                report.targets.join(", ")
            )
        });
    }

    /// Process discovery is live: processes started from now on are seen.
    pub fn discovering(&self, attach_all: bool) {
        self.emit(json!({"type": "discovering", "attach_all": attach_all}), || {
            format!("discovering Python processes ({})", if attach_all { "all" } else { "opted in" })
        });
    }

    /// A hit, with the identity of the service it happened in, and who
    /// called its target if known.
    pub fn hit(
        &self,
        h: &Hit,
        service: Option<&Service>,
        advisories: &[Advisory],
        exposure: Option<&Exposure>,
        caller: Option<&Caller>,
    ) {
        let mut json = json!({
            "type": "hit",
            "pid": h.pid,
            "tid": h.tid,
            "target": h.target.to_string(),
            "qualname": h.target.qualname(),
            "module": h.target.module(),
            "filename": h.filename,
            "lineno": h.lineno,
            "ts_ns": h.ts_ns,
            "seen_by": h.seen_by,
        });
        if let Some(s) = service.filter(|s| **s != Service::default()) {
            json["service"] = json!(s);
        }
        if !advisories.is_empty() {
            json["advisories"] = json!(advisories);
        }
        if let Some(e) = exposure {
            json["exposure"] = json!(e);
        }
        if let Some(c) = caller {
            json["caller"] = json!(c);
        }
        let text = || hit_text(&json);
        self.emit(json.clone(), text);
    }

    /// What the installed version of `target`'s dependency means for it in
    /// `pid` changed (a module imported since its attach showed it).
    pub fn exposure(&self, pid: u32, target: &str, exposure: &Exposure) {
        let line = json!({"type": "exposure", "pid": pid, "target": target, "exposure": exposure});
        let watched = if exposure.watched() { "watched" } else { "not watched" };
        self.emit(line.clone(), || format!("exposure pid={pid} {target}: {watched}: {}", line["exposure"]));
    }

    /// A watched process moved to another strategy, and why.
    pub fn strategy(&self, pid: u32, strategy: &str, why: &str) {
        self.emit(json!({"type": "strategy", "pid": pid, "strategy": strategy, "why": why}), || {
            format!("pid {pid} now watched with {strategy}: {why}")
        });
    }

    /// Targets found after the attach are armed: found as their module's
    /// body started (`latency_us` after it did) or by a look in `sys.modules`.
    pub fn armed(&self, report: &ArmedReport) {
        let mut line = serde_json::to_value(report).unwrap_or_default();
        line["type"] = "armed".into();
        self.emit(line, || {
            let ArmedReport { pid, targets, source, latency_us, .. } = report;
            match latency_us {
                Some(us) => format!("armed pid={pid} {} ({source}, {us} us after it started)", targets.join(", ")),
                None => format!("armed pid={pid} {} ({source})", targets.join(", ")),
            }
        });
    }

    /// Reachability: `calls` starts of a reached target in a sampling
    /// window of `secs`.
    pub fn sample(&self, pid: u32, target: &Target, calls: u64, secs: f64) {
        let rate = calls as f64 / secs;
        let line = json!({"type": "sample", "pid": pid, "target": target.to_string(), "calls": calls,
            "window_secs": secs, "calls_per_sec": rate});
        self.emit(line, || format!("sample pid={pid} {target} calls={calls} in {secs:.1}s ({rate:.1}/s)"));
    }

    /// The watched process exited.
    pub fn exited(&self, pid: u32, status: Option<&str>) {
        self.emit(json!({"type": "exited", "pid": pid, "status": status}), || match status {
            Some(s) => format!("pid {pid} exited ({s})"),
            None => format!("pid {pid} exited"),
        });
    }

    /// Exact count for one target.
    pub fn summary(&self, pid: u32, target: &Target, hits: u64) {
        self.emit(json!({"type": "summary", "pid": pid, "target": target.to_string(), "hits": hits}), || {
            format!("summary pid={pid} {target} hits={hits}")
        });
    }

    /// The kernel's counters.
    pub fn stats(&self, stats: &[(&str, u64)]) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), "stats".into());
        for (k, v) in stats {
            obj.insert((*k).into(), (*v).into());
        }
        self.emit(Value::Object(obj), || {
            let parts: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("stats {}", parts.join(" "))
        });
    }
}

/// The text form of a hit's JSON (also used by `dump` on the tap). What the
/// process wrote (its file names, its service identity) is escaped: a
/// control character in it cannot forge a line or move the terminal.
pub fn hit_text(h: &Value) -> String {
    let at = match (h["filename"].as_str(), h["lineno"].as_u64()) {
        (Some(f), Some(l)) => format!(" ({}:{l})", escaped(f)),
        _ => String::new(),
    };
    let service = match h["service"].as_object() {
        Some(s) => {
            let parts: Vec<String> =
                s.iter().map(|(k, v)| format!("{}={}", escaped(k), escaped(v.as_str().unwrap_or("")))).collect();
            format!(" [{}]", parts.join(" "))
        }
        None => String::new(),
    };
    let how = if h["seen_by"] == "warmup_mark" { " (seen from its code object's warm-up mark)" } else { "" };
    let caller = match (h["caller"]["path"].as_str(), h["caller"]["symbol"].as_str(), h["caller"]["line"].as_u64()) {
        (Some(p), Some(s), Some(l)) => format!(" called from {} ({}:{l})", escaped(s), escaped(p)),
        _ => String::new(),
    };
    let ids: Vec<String> =
        h["advisories"].as_array().into_iter().flatten().filter_map(|a| a["id"].as_str().map(escaped)).collect();
    let advisories = if ids.is_empty() { String::new() } else { format!(" advisories={}", ids.join(",")) };
    format!(
        "hit pid={} tid={} {}{at}{caller}{service}{advisories}{how}",
        h["pid"],
        h["tid"],
        h["target"].as_str().unwrap_or("?")
    )
}

/// `s` with control characters escaped (`\n`, `\u{1b}`), the rest as is.
fn escaped(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_hits_escape_what_the_process_wrote() {
        let h = json!({"pid": 1, "tid": 2, "target": "m:f", "filename": "/a\nhit pid=9 forged.py", "lineno": 3,
            "service": {"service": "svc\u{1b}[2J"}});
        let line = hit_text(&h);
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(line.contains("/a\\nhit pid=9 forged.py:3") && line.contains("service=svc\\u{1b}[2J"), "{line}");
    }
}
