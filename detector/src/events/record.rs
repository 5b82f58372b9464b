//! Decoding ring-buffer records. Records are byte slices with no alignment
//! guarantee: they are read with `read_unaligned`, never cast.

use detector_common::{
    CallerFrame, CallersEvent, CandidateEvent, CodeEvent, EVENT_CALLERS, EVENT_CANDIDATE, EVENT_CODE, EVENT_EXEC,
    EVENT_FORK, EVENT_HIT, EVENT_MODULE_EXEC, EVENT_PENDING_FREED, EVENT_TIER2, EVENT_TRAP_SIGNAL, EVENT_WATCH_FREED,
    EventHeader, FreedEvent, HitEvent, ModuleExecEvent, PendingFreedEvent, ProcessEvent, Tier2Event, TrapSignalEvent,
    name_bytes,
};

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A target's body started.
    Hit(HitEvent),
    /// Where a newly matched code object comes from.
    Code {
        /// Process.
        pid: u32,
        /// Code object.
        code: u64,
        /// `co_filename`, if the kernel could read it.
        filename: Option<String>,
        /// `co_firstlineno`.
        lineno: u32,
    },
    /// 3.8-3.10: a start awaiting resolution.
    Candidate(CandidateEvent),
    /// A process executed a new image.
    Exec {
        /// The process.
        pid: u32,
    },
    /// A watched process forked.
    Fork {
        /// The watched process.
        parent: u32,
        /// Its child.
        child: u32,
    },
    /// A code object under a watchpoint was deallocated.
    WatchFreed {
        /// The process.
        pid: u32,
        /// The code object.
        code: u64,
    },
    /// A module body is about to run in a process with targets not found yet.
    ModuleExec(ModuleExec),
    /// 3.8-3.10: a code object with starts awaiting resolution was
    /// deallocated, its entry handed over.
    PendingFreed {
        /// The process.
        pid: u32,
        /// Generation of the targets its starts were counted in.
        generation: u32,
        /// The code object.
        code: u64,
        /// Its starts counted.
        hits: u64,
    },
    /// The frames above a target at its first hit.
    Callers(Callers),
    /// The kernel sent SIGTRAP to a thread of a watched process.
    TrapSignal {
        /// The process.
        pid: u32,
        /// The thread.
        tid: u32,
        /// `si_code`.
        code: i32,
    },
    /// A watched process entered its tier-2 optimizer: its JIT is on.
    Tier2 {
        /// The process.
        pid: u32,
        /// The thread.
        tid: u32,
    },
}

/// The frames above a target at its first hit, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Callers {
    /// The process.
    pub pid: u32,
    /// The target.
    pub target: u32,
    /// Its code object.
    pub code: u64,
    /// The frames that called it.
    pub frames: Vec<CallerFrame>,
}

/// A module body about to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleExec {
    /// The process.
    pub pid: u32,
    /// The module's code object.
    pub code: u64,
    /// Its globals.
    pub globals: u64,
    /// When the kernel saw it (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    // SAFETY: the length is checked, and every `T` read here is plain integers (`detector_common`'s records).
    (bytes.len() >= size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one record; `None` for a short or unknown one.
pub fn decode(bytes: &[u8]) -> Option<Record> {
    let header: EventHeader = read(bytes)?;
    match header.kind {
        EVENT_HIT => read(bytes).map(Record::Hit),
        EVENT_CODE => {
            let c: CodeEvent = read(bytes)?;
            let name = name_bytes(&c.filename);
            Some(Record::Code {
                pid: c.header.tgid,
                code: c.code,
                filename: (!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned()),
                lineno: c.firstlineno,
            })
        }
        EVENT_CANDIDATE => read(bytes).map(Record::Candidate),
        EVENT_EXEC => read::<ProcessEvent>(bytes).map(|e| Record::Exec { pid: e.header.tgid }),
        EVENT_FORK => read::<ProcessEvent>(bytes).map(|e| Record::Fork { parent: e.parent, child: e.header.tgid }),
        EVENT_WATCH_FREED => read::<FreedEvent>(bytes).map(|e| Record::WatchFreed { pid: e.header.tgid, code: e.code }),
        EVENT_PENDING_FREED => read::<PendingFreedEvent>(bytes).map(|e| Record::PendingFreed {
            pid: e.header.tgid,
            generation: e.generation,
            code: e.code,
            hits: e.hits,
        }),
        EVENT_TRAP_SIGNAL => {
            read::<TrapSignalEvent>(bytes).map(|e| Record::TrapSignal { pid: e.header.tgid, tid: e.tid, code: e.code })
        }
        EVENT_TIER2 => read::<Tier2Event>(bytes).map(|e| Record::Tier2 { pid: e.header.tgid, tid: e.tid }),
        EVENT_CALLERS => read::<CallersEvent>(bytes).map(|e| {
            let depth = (e.depth as usize).min(e.frames.len());
            Record::Callers(Callers {
                pid: e.header.tgid,
                target: e.target,
                code: e.code,
                frames: e.frames[..depth].to_vec(),
            })
        }),
        EVENT_MODULE_EXEC => read::<ModuleExecEvent>(bytes).map(|e| {
            Record::ModuleExec(ModuleExec { pid: e.header.tgid, code: e.code, globals: e.globals, ts_ns: e.ts_ns })
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: the bytes of a live value, read as bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_each_kind_even_misaligned() {
        let hit =
            HitEvent { header: EventHeader { kind: EVENT_HIT, tgid: 7 }, tid: 8, target: 2, ts_ns: 99, code: 0x1000 };
        let mut buf = vec![0u8];
        buf.extend(bytes_of(&hit));
        assert_eq!(decode(&buf[1..]), Some(Record::Hit(hit)));

        let mut code = CodeEvent {
            header: EventHeader { kind: EVENT_CODE, tgid: 7 },
            target: 2,
            firstlineno: 12,
            code: 0x1000,
            filename: [0; detector_common::FILENAME_LEN],
        };
        code.filename[..5].copy_from_slice(b"/a.py");
        assert_eq!(
            decode(&bytes_of(&code)),
            Some(Record::Code { pid: 7, code: 0x1000, filename: Some("/a.py".into()), lineno: 12 })
        );
        assert_eq!(decode(&bytes_of(&hit)[..10]), None);
        let unknown = EventHeader { kind: 99, tgid: 1 };
        assert_eq!(decode(&bytes_of(&unknown)), None);
    }
}
