//! Which processes on the node to consider, and whether each one asked to
//! be watched: the opt-in and service identity come from its environment,
//! read once through `/proc/PID/environ` (host PID namespace, so processes
//! in containers are seen the same way).

use std::{io, path::Path};

use serde::Serialize;

use crate::pyproc::ProcessError;

/// The variable a process sets to opt in: the out-of-process form of "AppSec
/// SCA must already be enabled".
pub const OPT_IN: &str = "DD_APPSEC_SCA_ENABLED";

/// A process's unified service tagging, carried on its hits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Service {
    /// `DD_SERVICE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `DD_ENV`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// `DD_VERSION`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// What a process's environment says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environ {
    /// [`OPT_IN`] is `true` or `1`.
    pub opted_in: bool,
    /// Its identity.
    pub service: Service,
}

impl Environ {
    /// Parses a NUL-separated environment block. Only the last value of a
    /// repeated variable counts, as in Python's `os.environ`, where the
    /// tracer reads these (C's `getenv`, which CPython uses for its own
    /// `PYTHON_*` settings, finds the first).
    pub fn parse(block: &[u8]) -> Self {
        let mut env = Environ::default();
        for entry in block.split(|&b| b == 0) {
            let Some(eq) = entry.iter().position(|&b| b == b'=') else { continue };
            let (key, value) = (&entry[..eq], &entry[eq + 1..]);
            let text = || {
                let v = String::from_utf8_lossy(value).trim().to_owned();
                (!v.is_empty()).then_some(v)
            };
            match key {
                b"DD_APPSEC_SCA_ENABLED" => env.opted_in = is_true(value),
                b"DD_SERVICE" => env.service.service = text(),
                b"DD_ENV" => env.service.env = text(),
                b"DD_VERSION" => env.service.version = text(),
                _ => {}
            }
        }
        env
    }

    /// The environment of `pid` as it was at exec.
    pub fn read(pid: u32) -> Result<Self, ProcessError> {
        Ok(Environ::parse(&crate::pyproc::environ::environ_block(pid)?))
    }
}

/// `true` or `1`, as the tracers read boolean settings.
pub fn is_true(value: &[u8]) -> bool {
    let v = String::from_utf8_lossy(value);
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true")
}

/// Every process id in `/proc`.
pub fn all_pids() -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> =
        std::fs::read_dir("/proc")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    Ok(pids)
}

/// When `pid` started, in clock ticks since boot: with the pid, it names one
/// process even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything, spaces too.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` looks like a Python interpreter, from its executable's name
/// and its mappings; cheap, and reads none of its memory. Used to tell an
/// interpreter that did not opt in (reported) from every other process
/// (ignored).
pub fn looks_like_python(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let base = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if base.starts_with("python") {
        return true;
    }
    crate::pyproc::maps::any_line(pid, |l| l.rsplit('/').next().is_some_and(|b| b.starts_with("libpython")))
}

/// The executable's path, for logs.
pub fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| Path::new("?").display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_in_and_identity() {
        let e =
            Environ::parse(b"PATH=/bin\0DD_APPSEC_SCA_ENABLED=True\0DD_SERVICE=shop\0DD_ENV=prod\0DD_VERSION=1.2\0");
        assert!(e.opted_in);
        assert_eq!(
            e.service,
            Service { service: Some("shop".into()), env: Some("prod".into()), version: Some("1.2".into()) }
        );
    }

    #[test]
    fn opt_in_needs_a_true_value_and_the_last_one_wins() {
        assert!(!Environ::parse(b"DD_APPSEC_SCA_ENABLED=0\0").opted_in);
        assert!(!Environ::parse(b"DD_APPSEC_SCA_ENABLED=yes\0").opted_in);
        assert!(!Environ::parse(b"DD_APPSEC_SCA_ENABLED=1\0DD_APPSEC_SCA_ENABLED=false\0").opted_in);
        assert!(Environ::parse(b"DD_APPSEC_SCA_ENABLED= 1 \0").opted_in);
        assert!(!Environ::parse(b"XDD_APPSEC_SCA_ENABLED=1\0").opted_in);
        assert_eq!(Environ::parse(b"DD_SERVICE=\0garbage\0=x\0").service, Service::default());
    }

    #[test]
    fn start_time_of_self() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(all_pids().unwrap().contains(&me));
    }
}
