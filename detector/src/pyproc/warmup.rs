//! What a code object's own memory shows of its body having run: the
//! interpreter warms code up as it runs it, and that leaves marks that only
//! running makes.
//!
//! - 3.8-3.10: `co_opcache_flag` counts the frames evaluated (0 when made,
//!   up to 1024);
//! - 3.11: `co_warmup` counts `RESUME`s and backward jumps (-8 when made,
//!   up to 0);
//! - 3.12+: the inline caches of the body's first instructions count down
//!   as they run (a fresh one holds the warm-up value), and 3.13+ rewrites
//!   the body's `RESUME` to `RESUME_CHECK` the first time it runs. `sys.monitoring` rewrites bytecode too, so a
//!   change is taken as a run only if the code's instrumentation version
//!   did not move meanwhile.
//!
//! A mark is read by the agent, so it says "ran since the last look", not
//! when nor how often: reachability uses it to see a call that happened
//! while no debug register watched the body, never to count.

use super::{ProcessError, PythonProcess, body::BodyStart, mem::ProcessMemory};
use crate::interp::sites::resume_opcodes;
use detector_common::NO_OFFSET;

/// Bytes of bytecode from the body start looked at (3.12+): the first
/// instructions with an inline cache are within a few units of `RESUME`.
const WINDOW: usize = 32;

/// Where to look in one code object, and how to read what is there.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    addr: u64,
    len: usize,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A counter field of the code object and its value when made.
    Counter { fresh: i64 },
    /// The bytecode from the body start, and the instrumentation version
    /// at `version`; the body's `RESUME` opcode when the code was made, if
    /// the version rewrites it on the first run (3.13+).
    Bytecode { version: u64, fresh_resume: Option<u8> },
}

/// One look at a mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reading {
    version: u64,
    bytes: Vec<u8>,
}

impl Mark {
    /// The mark of `start`'s code object in `p`, if its version leaves one.
    pub(crate) fn of(p: &PythonProcess, mem: &ProcessMemory, start: &BodyStart) -> Result<Option<Mark>, ProcessError> {
        let o = &p.analysis.table.values;
        let minor = p.analysis.version.minor;
        if minor <= 11 {
            if o.code_warmup == NO_OFFSET {
                return Ok(None);
            }
            let (len, fresh) = if minor == 11 { (2, -8) } else { (4, 0) };
            return Ok(Some(Mark { addr: start.code + u64::from(o.code_warmup), len, kind: Kind::Counter { fresh } }));
        }
        if o.code_instr_version == NO_OFFSET || o.code_adaptive == NO_OFFSET {
            return Ok(None);
        }
        // No further than the code object's end: what follows it changes
        // for reasons of its own.
        let units = mem.i64(start.code + u64::from(o.tuple_size))?.max(0) as u64;
        let end = start.code + u64::from(o.code_adaptive) + 2 * units;
        let len = end.saturating_sub(start.unit_addr).min(WINDOW as u64) as usize;
        if len < 2 {
            return Ok(None);
        }
        let fresh_resume = if minor >= 13 { resume_opcodes(minor).first().map(|(_, op)| *op) } else { None };
        let version = start.code + u64::from(o.code_instr_version);
        Ok(Some(Mark { addr: start.unit_addr, len, kind: Kind::Bytecode { version, fresh_resume } }))
    }

    /// What the mark holds now.
    pub(crate) fn read(&self, mem: &ProcessMemory) -> Result<Reading, ProcessError> {
        let version = match self.kind {
            Kind::Counter { .. } => 0,
            Kind::Bytecode { version, .. } => mem.u64(version)?,
        };
        Ok(Reading { version, bytes: mem.bytes(self.addr, self.len)? })
    }

    /// Whether `r` shows a body that never ran, where the version tells
    /// (3.12 makes no such mark on its own `RESUME`: unknown).
    pub(crate) fn fresh(&self, r: &Reading) -> Option<bool> {
        match self.kind {
            Kind::Counter { fresh } => Some(counter(&r.bytes) == fresh),
            Kind::Bytecode { fresh_resume: Some(op), .. } => Some(r.bytes.first() == Some(&op)),
            Kind::Bytecode { fresh_resume: None, .. } => fresh_312(&r.bytes),
        }
    }

    /// Whether the body ran between `before` and `now`. A change that came
    /// with instrumentation proves nothing.
    pub(crate) fn ran(&self, before: &Reading, now: &Reading) -> bool {
        before.version == now.version && before.bytes != now.bytes
    }
}

/// A mark and what it held at the last look.
#[derive(Clone, Debug)]
pub(crate) struct Watched {
    mark: Mark,
    /// The first look.
    base: Reading,
    last: Reading,
}

impl Watched {
    /// Starts watching `start`'s mark; with whether the body already ran,
    /// if the version tells.
    pub(crate) fn start(
        p: &PythonProcess,
        mem: &ProcessMemory,
        start: &BodyStart,
    ) -> Result<Option<(Watched, Option<bool>)>, ProcessError> {
        let Some(mark) = Mark::of(p, mem, start)? else { return Ok(None) };
        let last = mark.read(mem)?;
        let fresh = mark.fresh(&last);
        Ok(Some((Watched { mark, base: last.clone(), last }, fresh.map(|f| !f))))
    }

    /// For a forked child's mark (`self`, just started) of the same code as
    /// the parent's (`parent`, started before the fork): whether the child
    /// ran the body since the fork. Known only while the parent's mark is
    /// as it was before the fork (`parent_now`, read after it): the child
    /// began with that state, so any change is its own.
    pub(crate) fn ran_since_fork(&self, parent: &Watched, parent_now: &Reading) -> bool {
        *parent_now == parent.base && self.mark.ran(&parent.base, &self.base)
    }

    /// Whether the child's mark (`self`, just started) shows a run since the
    /// fork, where the parent's mark is not watched: only where the version
    /// tells a fresh mark (`parent_now` fresh, so it was at the fork).
    pub(crate) fn ran_since_fresh_fork(&self, parent_now: &Reading) -> bool {
        self.mark.fresh(parent_now) == Some(true) && self.mark.fresh(&self.base) == Some(false)
    }

    /// Reads the mark now.
    pub(crate) fn read(&self, mem: &ProcessMemory) -> Result<Reading, ProcessError> {
        self.mark.read(mem)
    }

    /// Whether the body ran since the last look.
    pub(crate) fn ran(&mut self, mem: &ProcessMemory) -> Result<bool, ProcessError> {
        let now = self.mark.read(mem)?;
        Ok(self.looked(now))
    }

    fn looked(&mut self, now: Reading) -> bool {
        let ran = self.mark.ran(&self.last, &now);
        self.last = now;
        ran
    }
}

/// [`Watched::ran`] for each of `marks`, read in one system call (a look
/// at every unit costs one, not two per unit); `None` for a mark that
/// could not be read.
pub(crate) fn ran_all(mem: &ProcessMemory, marks: &mut [&mut Watched]) -> Vec<Option<bool>> {
    let mut versions = vec![[0u8; 8]; marks.len()];
    let mut bytes: Vec<Vec<u8>> = marks.iter().map(|m| vec![0; m.mark.len]).collect();
    let read = {
        let mut parts: Vec<(u64, &mut [u8])> = Vec::with_capacity(2 * marks.len());
        for ((m, v), b) in marks.iter().zip(versions.iter_mut()).zip(bytes.iter_mut()) {
            if let Kind::Bytecode { version, .. } = m.mark.kind {
                parts.push((version, v.as_mut_slice()));
            }
            parts.push((m.mark.addr, b.as_mut_slice()));
        }
        mem.read_many(&mut parts)
    };
    if !read {
        // Some code object is gone (its pages unmapped): one by one.
        return marks.iter_mut().map(|m| m.ran(mem).ok()).collect();
    }
    marks
        .iter_mut()
        .zip(versions)
        .zip(bytes)
        .map(|((m, v), bytes)| {
            let version = match m.mark.kind {
                Kind::Counter { .. } => 0,
                Kind::Bytecode { .. } => u64::from_le_bytes(v),
            };
            Some(m.looked(Reading { version, bytes }))
        })
        .collect()
}

impl Watched {}

/// 3.12 opcodes with an inline cache whose first entry is the counter that
/// a run decrements.
const CACHED_312: [u8; 12] = [25, 60, 92, 93, 95, 106, 107, 116, 122, 123, 141, 171];
/// Their specialized forms: made only by runs.
const SPECIALIZED_312: [u8; 59] = [
    6, 7, 8, 10, 13, 14, 16, 18, 19, 20, 21, 22, 23, 24, 28, 29, 34, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 56,
    57, 58, 59, 62, 63, 64, 65, 66, 67, 70, 72, 73, 76, 77, 78, 79, 80, 81, 82, 111, 112, 113, 148, 153, 159, 160, 161,
    166, 167, 168,
];
/// 3.12 opcodes that neither branch nor raise nor have a cache (with the
/// superinstructions quickening makes of them): POP_TOP, PUSH_NULL, NOP,
/// LOAD_CONST__LOAD_FAST, LOAD_FAST__LOAD_CONST, LOAD_FAST__LOAD_FAST,
/// SWAP, LOAD_CONST, BUILD_TUPLE, BUILD_LIST, BUILD_MAP, COPY, LOAD_FAST,
/// STORE_FAST, LOAD_CLOSURE, LOAD_FAST_AND_CLEAR, EXTENDED_ARG,
/// STORE_FAST__LOAD_FAST, STORE_FAST__STORE_FAST.
const STRAIGHT_312: [u8; 19] = [1, 2, 9, 84, 86, 88, 99, 100, 102, 103, 105, 120, 124, 125, 136, 143, 144, 154, 158];
/// A 3.12 inline cache counter as the code was made: value 1, backoff 1.
const WARMUP_312: u16 = (1 << 4) | 1;

/// Whether 3.12 bytecode from a body's `RESUME` shows no run: the first
/// instruction with a cache that every run reaches is still as made.
/// Unknown where a branch, a possible exception or the window's end comes
/// first (a body that starts `return CONSTANT` leaves no mark).
fn fresh_312(bytes: &[u8]) -> Option<bool> {
    let units: Vec<(u8, u8)> = bytes.chunks_exact(2).map(|u| (u[0], u[1])).collect();
    for (i, &(op, _)) in units.iter().enumerate().skip(1) {
        if CACHED_312.contains(&op) {
            let (lo, hi) = *units.get(i + 1)?;
            return Some(u16::from_le_bytes([lo, hi]) == WARMUP_312);
        }
        if SPECIALIZED_312.contains(&op) {
            return Some(false);
        }
        if !STRAIGHT_312.contains(&op) {
            return None;
        }
    }
    None
}

/// A little-endian signed counter of 2 or 4 bytes.
fn counter(b: &[u8]) -> i64 {
    match *b {
        [a, b] => i64::from(i16::from_le_bytes([a, b])),
        [a, b, c, d] => i64::from(i32::from_le_bytes([a, b, c, d])),
        _ => i64::MIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(version: u64, bytes: &[u8]) -> Reading {
        Reading { version, bytes: bytes.to_vec() }
    }

    #[test]
    fn counters_are_fresh_at_their_initial_value() {
        let m311 = Mark { addr: 1, len: 2, kind: Kind::Counter { fresh: -8 } };
        assert_eq!(m311.fresh(&reading(0, &(-8i16).to_le_bytes())), Some(true));
        assert_eq!(m311.fresh(&reading(0, &(-7i16).to_le_bytes())), Some(false));
        let m38 = Mark { addr: 1, len: 4, kind: Kind::Counter { fresh: 0 } };
        assert_eq!(m38.fresh(&reading(0, &1024i32.to_le_bytes())), Some(false));
        assert!(m38.ran(&reading(0, &0i32.to_le_bytes()), &reading(0, &1i32.to_le_bytes())));
    }

    #[test]
    fn a_change_under_new_instrumentation_is_no_run() {
        let m = Mark { addr: 1, len: 4, kind: Kind::Bytecode { version: 2, fresh_resume: Some(149) } };
        // 3.13: RESUME (149) becomes RESUME_CHECK (207) on the first run.
        assert_eq!(m.fresh(&reading(0, &[149, 0, 85, 0])), Some(true));
        assert!(m.ran(&reading(0, &[149, 0, 85, 0]), &reading(0, &[207, 0, 85, 0])));
        assert!(!m.ran(&reading(0, &[149, 0, 85, 0]), &reading(1, &[236, 0, 85, 0])));
        let m312 = Mark { addr: 1, len: 4, kind: Kind::Bytecode { version: 2, fresh_resume: None } };
        assert_eq!(m312.fresh(&reading(0, &[151, 0, 124, 0])), None);
    }

    #[test]
    fn a_312_body_is_fresh_while_its_first_cache_is_as_made() {
        // `return x.real`, as made and after one run (read off 3.12.1).
        let made = [0x97, 0, 0x7c, 0, 0x6a, 0, 0x11, 0, 0, 0];
        let ran = [0x97, 0, 0x7c, 0, 0x6a, 0, 0x01, 0, 0, 0];
        assert_eq!(fresh_312(&made), Some(true));
        assert_eq!(fresh_312(&ran), Some(false));
        // `return 1`: RETURN_CONST first, no cache on the way.
        assert_eq!(fresh_312(&[0x97, 0, 0x79, 1]), None);
        // The window ends before the counter.
        assert_eq!(fresh_312(&made[..6]), None);
    }
}
