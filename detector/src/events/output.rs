//! Printing events as JSON lines or text, one line each, flushed at once so
//! a pipe reader sees them as they happen.

use std::io::Write;

use serde_json::{Value, json};

use super::Hit;
use crate::{agent::ProcessWatch, targets::Target};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Writes events to stdout.
pub struct Printer {
    format: Option<Format>,
    closed: std::cell::Cell<bool>,
}

impl Printer {
    /// A printer in `format`; `None` prints nothing.
    pub fn new(format: Option<Format>) -> Self {
        Printer { format, closed: std::cell::Cell::new(false) }
    }

    /// Whether stdout was closed by its reader: there is no one to report to.
    pub fn closed(&self) -> bool {
        self.closed.get()
    }

    fn emit(&self, json: Value, text: impl FnOnce() -> String) {
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

    /// Probes are live on a process.
    pub fn attached(&self, w: &ProcessWatch, targets: &[&Target]) {
        let a = &w.process.analysis;
        let sites: Vec<Value> = a
            .sites
            .iter()
            .map(
                |s| json!({"handler": s.handler, "addr": s.addr, "instruction": s.instruction, "emulated": s.emulated}),
            )
            .collect();
        let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
        self.emit(
            json!({
                "type": "attached",
                "pid": w.process.pid,
                "version": a.version.to_string(),
                "object": w.process.object.path,
                "strategy": "per-call",
                "probes": w.probes(),
                "sites": sites,
                "prefilled_threads": w.prefilled_threads,
                "prefilled_identities": w.prefilled_identities,
                "targets": names,
            }),
            || {
                format!(
                    "attached to pid {} (CPython {}, {}): {} probes, watching {}",
                    w.process.pid,
                    a.version,
                    w.process.object.path,
                    w.probes(),
                    names.join(", ")
                )
            },
        );
    }

    /// A hit.
    pub fn hit(&self, h: &Hit) {
        self.emit(
            json!({
                "type": "hit",
                "pid": h.pid,
                "tid": h.tid,
                "target": h.target.to_string(),
                "qualname": h.target.qualname(),
                "module": h.target.module(),
                "filename": h.filename,
                "lineno": h.lineno,
                "ts_ns": h.ts_ns,
            }),
            || {
                let at = match (&h.filename, h.lineno) {
                    (Some(f), Some(l)) => format!(" ({f}:{l})"),
                    _ => String::new(),
                };
                format!("hit pid={} tid={} {}{at}", h.pid, h.tid, h.target)
            },
        );
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
