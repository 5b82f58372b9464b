//! The capabilities the agent holds, which of its steps need which, and
//! refusal messages that name the capability the kernel actually checked.
//!
//! Measured on Linux 6.18 against a process of uid 1000 (see the
//! deployment guide for the line-by-line justification):
//! - `/proc/PID/mem` and `environ` are mode 0600/0400 and owned by the
//!   process's user: root without `CAP_DAC_READ_SEARCH` fails the file's
//!   permission check before the ptrace check (`CAP_SYS_PTRACE`) is reached.
//!   The same holds for a binary under a 0700 directory.
//! - Since Linux 6.16, and the stable kernels that took the same change in
//!   2025 (5.10.240, 5.15.189, 6.1.146, 6.6.99, 6.12.39, 6.15.7), a uprobe
//!   perf event needs `CAP_SYS_ADMIN`
//!   (`perf_uprobe_event_init`); `CAP_PERFMON` suffices for watchpoints,
//!   but every watched process has uprobes too (deallocations at least).

use std::io;

/// A Linux capability the agent may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// Reading files of other users (`/proc/PID/mem`, `environ`, binaries in private directories).
    DacReadSearch = 2,
    /// The ptrace access check of `/proc/PID/mem`, `maps`, `root`.
    SysPtrace = 19,
    /// Uprobes on kernels patched since 2025; implies BPF and PERFMON.
    SysAdmin = 21,
    /// Perf events: watchpoints, tracepoints, and uprobes on older kernels.
    Perfmon = 38,
    /// Loading programs and maps.
    Bpf = 39,
}

impl Cap {
    /// Its name, as capabilities(7) spells it.
    pub fn name(self) -> &'static str {
        match self {
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// The effective capabilities of this process.
#[derive(Clone, Copy, Debug)]
pub struct Held(u64);

impl Held {
    /// Read from `/proc/self/status`.
    pub fn now() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Held(status_field(&status, "CapEff:").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0))
    }

    /// Whether `cap` is held.
    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1 << cap as u32) != 0
    }

    /// Those of `caps` not held.
    pub fn missing(self, caps: &[Cap]) -> Vec<&'static str> {
        caps.iter().filter(|c| !self.has(**c)).map(|c| c.name()).collect()
    }
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// Fails unless this process may load eBPF programs, open perf events and
/// pass the ptrace check; warns about what else it will not be able to do.
pub fn require() -> Result<(), String> {
    let held = Held::now();
    let mut missing = held.missing(&[Cap::SysPtrace]);
    if !held.has(Cap::SysAdmin) {
        missing.extend(held.missing(&[Cap::Bpf, Cap::Perfmon]));
    }
    if !missing.is_empty() {
        return Err(format!(
            "insufficient privileges: run as root, or grant {} (eBPF, perf events, reading other processes)",
            missing.join(", ")
        ));
    }
    if !held.has(Cap::SysAdmin) {
        tracing::warn!(
            "without CAP_SYS_ADMIN, kernels since Linux 6.16 (and stable kernels patched in 2025) refuse uprobes, \
             which every watched process needs"
        );
    }
    if !held.has(Cap::DacReadSearch) {
        tracing::warn!("without CAP_DAC_READ_SEARCH, processes of users other than the agent's cannot be read");
    }
    Ok(())
}

/// Why reading process `pid` was refused, naming what the kernel checked.
pub fn process_denied(pid: u32) -> String {
    let held = Held::now();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uid = status_field(&status, "Uid:").and_then(|u| u.split_whitespace().nth(1)?.parse::<u32>().ok());
    // SAFETY: geteuid cannot fail.
    let own = unsafe { libc::geteuid() };
    match uid {
        Some(uid) if uid != own && !held.has(Cap::DacReadSearch) => format!(
            "it runs as uid {uid} and its /proc files and private directories are readable only by that user: \
             the agent needs {}",
            Cap::DacReadSearch.name()
        ),
        _ if !held.has(Cap::SysPtrace) => format!("the ptrace access check needs {}", Cap::SysPtrace.name()),
        _ => "the kernel refused although the agent holds CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH \
              (a Yama ptrace_scope of 3, or a security module)"
            .to_owned(),
    }
}

/// A hint for a refused perf event or BPF call, if `e` is such a refusal
/// and a capability the agent lacks explains it.
pub fn attach_hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut source = Some(e);
    let mut denied = false;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            denied |= matches!(io.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM));
        }
        source = s.source();
    }
    (denied && !Held::now().has(Cap::SysAdmin)).then_some(
        "uprobes need CAP_SYS_ADMIN since Linux 6.16 and stable kernels patched in 2025 (perf_uprobe_event_init)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bits_are_read_from_the_status_file() {
        let status = "Name:\tx\nCapEff:\t000000c000080000\n";
        let held = Held(u64::from_str_radix(status_field(status, "CapEff:").unwrap(), 16).unwrap());
        assert!(held.has(Cap::SysPtrace) && held.has(Cap::Perfmon) && held.has(Cap::Bpf));
        assert!(!held.has(Cap::SysAdmin) && !held.has(Cap::DacReadSearch));
        assert_eq!(held.missing(&[Cap::Bpf, Cap::DacReadSearch]), vec!["CAP_DAC_READ_SEARCH"]);
    }

    #[test]
    fn a_refusal_without_a_denial_has_no_hint() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(attach_hint(&e), None);
    }
}
