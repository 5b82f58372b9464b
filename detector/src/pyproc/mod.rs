//! A live Python process seen from outside: where its interpreter is mapped,
//! its memory, its threads, and its objects. Read-only, always.

pub mod body;
pub(crate) mod callers;
pub(crate) mod distributions;
pub(crate) mod environ;
pub(crate) mod jit;
pub mod maps;
pub mod mem;
pub mod objects;
pub mod qualname;
pub mod threads;
pub(crate) mod warmup;

use std::{io, sync::Arc};

use crate::interp::{Analysis, AnalysisError, cache::AnalysisCache};
use maps::MappedFile;
use mem::ProcessMemory;

/// Why a process cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Gone (or never existed).
    #[error("process {pid} does not exist (or has exited)")]
    NoSuchProcess {
        /// Process.
        pid: u32,
    },
    /// Not ours to read.
    #[error("not permitted to inspect process {pid}: {why}")]
    PermissionDenied {
        /// Process.
        pid: u32,
        /// What the kernel checked, and what the agent lacks.
        why: String,
    },
    /// No CPython in it.
    #[error("process {pid} is not a Python process: {reason}")]
    NotPython {
        /// Process.
        pid: u32,
        /// What was looked at.
        reason: String,
    },
    /// A CPython, but one that cannot be probed.
    #[error("process {pid} ({object})")]
    Analysis {
        /// Process.
        pid: u32,
        /// The interpreter object.
        object: String,
        /// Why.
        source: AnalysisError,
    },
    /// A read of its memory failed.
    #[error("cannot read memory of process {pid} at {addr:#x}")]
    BadAddress {
        /// Process.
        pid: u32,
        /// Address.
        addr: u64,
    },
    /// One look at its memory needed more than a look may take.
    #[error(
        "process {pid}: left unread after {reads} reads ({bytes} bytes, {ms} ms): its objects are too many, too \
         large or cyclic for one look"
    )]
    OverBudget {
        /// Process.
        pid: u32,
        /// Reads made.
        reads: u32,
        /// Bytes read.
        bytes: u64,
        /// Time taken.
        ms: u64,
    },
    /// Anything else from `/proc`.
    #[error("process {pid}")]
    Io {
        /// Process.
        pid: u32,
        /// Cause.
        source: io::Error,
    },
}

impl ProcessError {
    /// Whether a look ran out of reads or bytes: what it read is too much
    /// for any look, however idle the machine (running out of time is not).
    pub fn too_large(&self) -> bool {
        matches!(self, ProcessError::OverBudget { reads, bytes, .. } if mem::exceeds(*reads, *bytes))
    }

    /// Classifies an error from `/proc/PID/...`.
    pub fn io(pid: u32, e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ESRCH) => ProcessError::NoSuchProcess { pid },
            Some(libc::EACCES) | Some(libc::EPERM) => {
                ProcessError::PermissionDenied { pid, why: crate::privileges::process_denied(pid) }
            }
            _ => ProcessError::Io { pid, source: e },
        }
    }
}

/// A process and the interpreter found in it.
#[derive(Clone)]
pub struct PythonProcess {
    /// Process id (in the agent's PID namespace).
    pub pid: u32,
    /// The object holding the interpreter.
    pub object: MappedFile,
    /// The object, opened once: analysed from this descriptor, and every
    /// uprobe names it (see [`PythonProcess::probe_path`]).
    pub file: Arc<std::fs::File>,
    /// Added to the object's virtual addresses to get the process's.
    pub bias: u64,
    /// The interpreter's analysis.
    pub analysis: Arc<Analysis>,
}

impl PythonProcess {
    /// Address of `_PyRuntime` in the process.
    pub fn runtime(&self) -> Option<u64> {
        self.analysis.symbol("_PyRuntime").map(|a| a + self.bias)
    }

    /// The path uprobes are attached through: the analysed descriptor, so
    /// the probes go into exactly the bytes whose sites were decoded.
    pub fn probe_path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.file.as_raw_fd()).into()
    }

    /// Whether it has exited (or is exiting: its memory is gone).
    pub fn gone(&self) -> bool {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).is_err()
    }
}

/// Finds the CPython interpreter in `pid` and analyses it (once per binary).
pub fn locate(pid: u32, cache: &AnalysisCache) -> Result<PythonProcess, ProcessError> {
    let maps = maps::read(pid)?;
    let candidates = maps::interpreter_candidates(pid, &maps);
    let mut looked = Vec::new();
    for object in candidates {
        // Refused, gone, or out of descriptors: each is the process's state
        // now (a refusal says why; the rest are looked at again).
        let file = object.open().map_err(|e| ProcessError::io(pid, e))?;
        match cache.analyze(&object, &file) {
            Ok(analysis) => {
                let bias = maps::load_bias(&object, analysis.load_vaddr);
                let p = PythonProcess { pid, object, file: Arc::new(file), bias, analysis };
                verify_live_runtime(&p)?;
                jit::refuse_if_on(&p)?;
                return Ok(p);
            }
            Err(AnalysisError::NotPython(_) | AnalysisError::NotElf(_)) => looked.push(object.path),
            Err(source) => {
                return Err(ProcessError::Analysis { pid, object: object.path, source });
            }
        }
    }
    let reason = if looked.is_empty() {
        "no libpython mapped and no readable executable".to_owned()
    } else {
        format!("no CPython interpreter in {}", looked.join(", "))
    };
    Err(ProcessError::NotPython { pid, reason })
}

/// On 3.13+, the live `_Py_DebugOffsets` must be those the analysis used.
fn verify_live_runtime(p: &PythonProcess) -> Result<(), ProcessError> {
    let Some(runtime) = p.runtime() else {
        return Ok(());
    };
    if p.analysis.version_source != crate::interp::version::VersionSource::DebugOffsets {
        return Ok(());
    }
    let mem = ProcessMemory::open(p.pid)?;
    let head = mem.bytes(runtime, 24)?;
    match crate::interp::debug_offsets::header(&head) {
        Some(h) if crate::interp::version::PyVersion::from_hex(h.version) == p.analysis.version => Ok(()),
        _ => Err(ProcessError::Analysis {
            pid: p.pid,
            object: p.object.path.clone(),
            source: AnalysisError::Unsupported("_Py_DebugOffsets in the live process differ from the binary's".into()),
        }),
    }
}
