//! One debug register of every thread of a process, all on one address:
//! the agent's own perf breakpoint events, moved in place as registers
//! rotate.

use std::collections::BTreeSet;

use tracing::debug;

use super::CannotWatch;
use crate::bpf::{Probes, Watchpoint};

/// Rounds of "list the threads, arm the new ones": a thread made by one not
/// armed yet is caught by the next round.
const ARM_ROUNDS: usize = 5;

/// A debug register of every thread, all on one address: a watchpoint per
/// thread armed (the threads they make inherit it).
pub(super) struct Register {
    pub(super) addr: u64,
    pub(super) threads: Vec<Watchpoint>,
}

impl Register {
    /// A watchpoint on `addr` for every thread of `pid`.
    pub(super) fn arm(probes: &mut Probes, pid: u32, addr: u64) -> Result<Register, CannotWatch> {
        let mut reg = Register { addr, threads: Vec::new() };
        let mut done = BTreeSet::new();
        for _ in 0..ARM_ROUNDS {
            let threads: Vec<u32> = tasks(pid)?.into_iter().filter(|t| !done.contains(t)).collect();
            if threads.is_empty() {
                break;
            }
            for tid in threads {
                match probes.attach_watch(tid, addr) {
                    Ok(w) => reg.threads.push(w),
                    // The thread exited meanwhile, or is exiting.
                    Err(e) if Probes::thread_gone(&e) => {}
                    Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {}
                    Err(e) => return Err(e.into()),
                }
                done.insert(tid);
            }
        }
        Ok(reg)
    }

    /// Moves every thread's watchpoint to `addr`. A thread's that cannot
    /// move (it exited) keeps watching the old address, where a trap is no
    /// longer counted once its unit is gone.
    pub(super) fn move_to(&mut self, addr: u64) {
        for w in &mut self.threads {
            if let Err(e) = w.move_to(addr) {
                debug!(addr, error = %e, "moving a watchpoint");
            }
        }
        self.addr = addr;
    }
}

/// How registers on `on` come to watch `turn` (distinct addresses).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Moves {
    /// Registers already on an address of `turn`: they stay.
    pub(super) kept: Vec<usize>,
    /// In order: a register (or a new one) and the address it goes to.
    /// Registers in neither list are closed.
    pub(super) moves: Vec<(Option<usize>, u64)>,
}

/// Moves that never put two registers on one address, even between two
/// moves: each would trap, and one start would count twice. Only registers
/// on no address of `turn` move, each to an address none is on.
pub(super) fn reassign(on: &[u64], turn: &[u64]) -> Moves {
    let mut kept: Vec<usize> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for (i, addr) in on.iter().enumerate() {
        if turn.contains(addr) && !kept.iter().any(|&k| on[k] == *addr) {
            kept.push(i);
        } else {
            free.push(i);
        }
    }
    free.reverse();
    let moves =
        turn.iter().filter(|addr| !kept.iter().any(|&k| on[k] == **addr)).map(|&addr| (free.pop(), addr)).collect();
    Moves { kept, moves }
}

fn tasks(pid: u32) -> Result<Vec<u32>, crate::pyproc::ProcessError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| crate::pyproc::ProcessError::io(pid, e))?;
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays `moves` from `on`: every address watched after each step, and
    /// at the end (closed registers gone).
    fn play(on: &[u64], m: &Moves) -> Vec<Vec<u64>> {
        let mut regs: Vec<Option<u64>> = on.iter().copied().map(Some).collect();
        let mut steps = Vec::new();
        for &(from, addr) in &m.moves {
            match from {
                Some(i) => regs[i] = Some(addr),
                None => regs.push(Some(addr)),
            }
            steps.push(regs.iter().flatten().copied().collect());
        }
        let moved: Vec<usize> = m.moves.iter().filter_map(|(f, _)| *f).collect();
        for (i, r) in regs.iter_mut().enumerate().take(on.len()) {
            if !m.kept.contains(&i) && !moved.contains(&i) {
                *r = None;
            }
        }
        steps.push(regs.iter().flatten().copied().collect());
        steps
    }

    fn assert_never_twice(on: &[u64], turn: &[u64]) {
        let m = reassign(on, turn);
        let steps = play(on, &m);
        for step in &steps {
            let mut sorted = step.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), step.len(), "two registers on one address: {step:?} ({m:?})");
        }
        let mut end = steps.last().unwrap().clone();
        end.sort_unstable();
        let mut want = turn.to_vec();
        want.sort_unstable();
        assert_eq!(end, want, "{m:?}");
    }

    #[test]
    fn a_reached_unit_leaving_the_turn_shifts_no_register_onto_another() {
        // Units 1..=14, the first four watched; unit 1 is reached and
        // disarmed, so the turn from the same cursor is 2..=5.
        let m = reassign(&[1, 2, 3, 4], &[2, 3, 4, 5]);
        assert_eq!(m, Moves { kept: vec![1, 2, 3], moves: vec![(Some(0), 5)] });
        assert_never_twice(&[1, 2, 3, 4], &[2, 3, 4, 5]);
    }

    #[test]
    fn rotation_fewer_units_and_new_registers_never_double_an_address() {
        assert_never_twice(&[1, 2, 3, 4], &[5, 6, 7, 8]);
        assert_never_twice(&[1, 2, 3, 4], &[3, 4, 5, 6]);
        assert_never_twice(&[1, 2, 3, 4], &[4, 1]);
        assert_never_twice(&[1, 2], &[2, 3, 4, 1]);
        assert_never_twice(&[], &[1, 2, 3]);
        assert_never_twice(&[1, 1, 2], &[1, 3]);
        assert_never_twice(&[1, 2, 3], &[]);
    }
}
