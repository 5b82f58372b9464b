//! The per-call hot path's own state: each CPU's cache of recent verdicts
//! and each process's per-CPU hit counters. Both are array lookups, which
//! the kernel inlines, where a hash lookup would cost a probe pass several
//! percent more.

/// Lines in a CPU's [`VerdictCache`] (a power of two).
pub const VERDICT_CACHE_LINES: usize = 256;

/// One line of a [`VerdictCache`]: a verdict with what it is about. `key` is
/// what the probe found at its site: the code object, or on 3.11+ the
/// address of the RESUME being executed, which lies inside it and is read
/// from a register where the code object would cost a memory read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictLine {
    /// Code object or instruction address; 0 for an empty line.
    pub key: u64,
    /// The code object.
    pub code: u64,
    /// Process.
    pub tgid: u32,
    /// [`crate::Config::cache_stamp`] when the line was filled.
    pub stamp: u32,
    /// [`crate::CODE_EPOCH`] when the line was filled: a code object freed
    /// since may have left its address (and its instructions') to another.
    pub epoch: u32,
    /// Target id or [`crate::TARGET_NONE`] (never [`crate::TARGET_PENDING`]:
    /// user space resolves those in [`crate::VERDICTS`], which a copy here
    /// would hide).
    pub target: u32,
    /// As [`crate::Verdict::resumable`].
    pub resumable: u32,
    /// As [`crate::Verdict::cell`].
    pub cell: u32,
    /// [`VerdictLine::digest`] of the line as its writer wrote it.
    pub check: u64,
}

impl VerdictLine {
    /// A digest of every other field. Per-call programs run with migration
    /// disabled but can be preempted, so two of them may write (or one read
    /// while another writes) the same line of a CPU: the mixture does not
    /// match the digest it ends up with, and is not used.
    #[inline(always)]
    pub fn digest(&self) -> u64 {
        let pair = |a: u32, b: u32| ((a as u64) << 32) | b as u64;
        self.key
            ^ self.code.rotate_left(13)
            ^ pair(self.tgid, self.stamp).rotate_left(27)
            ^ pair(self.epoch, self.target).rotate_left(41)
            ^ pair(self.resumable, self.cell).rotate_left(53)
    }
}

/// A CPU's direct-mapped cache of verdicts, in front of [`crate::VERDICTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VerdictCache {
    /// Lines, indexed by [`verdict_line`].
    pub lines: [VerdictLine; VERDICT_CACHE_LINES],
}

/// The line of a CPU's [`VerdictCache`] that may hold `(tgid, key)`.
#[inline(always)]
pub fn verdict_line(tgid: u32, key: u64) -> usize {
    // Fibonacci hashing: code objects and instructions are close together.
    ((key ^ tgid as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize & (VERDICT_CACHE_LINES - 1)
}

/// Targets per process counted in per-CPU cells; more are counted in
/// [`crate::COUNTS`]. Few processes call more than a handful of targets, and
/// every slot pays for its cells on every CPU.
pub const SLOT_CELLS: usize = 8;

/// A process's hit counters on one CPU (user space sums the CPUs). Added to
/// atomically all the same: a program preempted on its CPU by another may be
/// halfway through an increment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCells {
    /// Hits, by cell.
    pub hits: [u64; SLOT_CELLS],
}

/// A cell of a process: the key of [`crate::CELL_CLAIMS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CellKey {
    /// Process.
    pub tgid: u32,
    /// Cell index.
    pub cell: u32,
}

/// [`crate::Verdict::cell`]: not chosen yet (a verdict user space wrote).
pub const CELL_UNKNOWN: u32 = u32::MAX;
/// [`crate::Verdict::cell`]: counted in [`crate::COUNTS`].
pub const CELL_SHARED: u32 = u32::MAX - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_code_objects_spread_over_lines() {
        // Code objects a few hundred bytes apart, as an allocator lays out a
        // module's functions, and RESUMEs a few bytes into each.
        let mut used = [false; VERDICT_CACHE_LINES];
        for i in 0..64u64 {
            used[verdict_line(4242, 0x7f3a_1c00_0000 + i * 0xb0 + 0x60)] = true;
        }
        assert!(used.iter().filter(|u| **u).count() >= 48);
        // The process is part of the key.
        assert_ne!(verdict_line(1, 0x7f3a_1c00_0000), verdict_line(2, 0x7f3a_1c00_0000));
    }

    #[test]
    fn a_line_two_writers_mixed_fails_its_digest() {
        // Two code objects of one process, as two preempted writers would
        // fill the same line: any mixture of their fields is refused.
        let sealed = |mut l: VerdictLine| {
            l.check = l.digest();
            l
        };
        let a = sealed(VerdictLine {
            key: 0x7f3a_1c00_0a60,
            code: 0x7f3a_1c00_0a00,
            tgid: 4242,
            stamp: 7,
            epoch: 3,
            target: 1,
            resumable: 0,
            cell: 0,
            check: 0,
        });
        let b = sealed(VerdictLine {
            key: 0x7f3a_1c00_1b60,
            code: 0x7f3a_1c00_1b00,
            target: crate::TARGET_NONE,
            cell: CELL_UNKNOWN,
            ..a
        });
        assert_eq!((a.check, b.check), (a.digest(), b.digest()));
        let mixes = [
            VerdictLine { key: b.key, ..a },
            VerdictLine { code: b.code, ..a },
            VerdictLine { target: b.target, ..a },
            VerdictLine { cell: b.cell, ..a },
            VerdictLine { key: a.key, check: a.check, ..b },
            VerdictLine { key: b.key, code: b.code, ..a },
        ];
        for m in mixes {
            assert_ne!(m.check, m.digest(), "{m:?}");
        }
    }
}
