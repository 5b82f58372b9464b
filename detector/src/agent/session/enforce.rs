//! The overhead budget applied to the session's processes: what each pays,
//! and the moves down the ladder (or back from a suspension) it leads to.

use std::time::Instant;

use tracing::warn;

use super::Session;
use crate::agent::budget::{self, Action, Budget, Load};

/// A budget decision taken about a process.
#[derive(Debug)]
pub struct BudgetChange {
    /// The process.
    pub pid: u32,
    /// What was done.
    pub action: Action,
    /// What it was paying.
    pub load: Load,
    /// What it was watched with before, and after.
    pub from: String,
    /// See `from`.
    pub to: String,
    /// Why the cheaper strategy wanted did not apply, if it did not.
    pub why: Option<String>,
}

impl Session {
    /// Measures what a probe pass costs on this node (see
    /// [`budget::Costs::calibrate`]); the bench's figures if it cannot.
    pub fn calibrate(&mut self) -> budget::Costs {
        budget::Costs::calibrate(&mut self.probes).unwrap_or_else(|e| {
            warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot measure the cost of a probe pass; using the bench's");
            budget::Costs::FALLBACK
        })
    }

    /// Applies the overhead budget: measures each process's probe passes
    /// and moves those over budget to a cheaper strategy; attaches suspended
    /// ones again once their wait is over. Called about once a second.
    pub fn enforce(&mut self, budget: &Budget) -> Vec<BudgetChange> {
        let now = Instant::now();
        let mut over = Vec::new();
        let mut changes = Vec::new();
        let mut looks = Vec::new();
        for (&pid, w) in self.watches.0.iter_mut() {
            if let Some((until, _)) = w.suspension() {
                if now >= until {
                    let from = w.mode();
                    let why = w.resume(&mut self.probes, &self.targets, self.strategy).err().map(|e| format!("{e:#}"));
                    // Under watchpoints its targets are found by a walk.
                    looks.extend(w.rescan_pending(&self.targets, true, "resumed"));
                    let load = Load { passes_per_sec: 0.0, hits_per_sec: 0.0, share: 0.0 };
                    changes.push(BudgetChange { pid, action: Action::Resume, load, from, to: w.mode(), why });
                }
                continue;
            }
            let Some(strategy) = w.strategy() else { continue };
            let Some(passes) = self.probes.passes(pid) else { continue };
            let Some(rate) = w.meter.sample(now, passes) else { continue };
            let share = rate * budget.costs.of(strategy) * 1e-9;
            w.meter.share = Some(share);
            if share > budget.share {
                over.push((pid, rate, share));
            }
        }
        for job in looks {
            self.look(Some(job));
        }
        for (pid, passes_per_sec, share) in over {
            let totals = self.totals(pid);
            let Some(w) = self.watches.0.get_mut(&pid) else { continue };
            let seen: Vec<u32> =
                totals.iter().filter(|(_, n)| *n > 0).filter_map(|(t, _)| self.targets.id(t)).collect();
            let hits: u64 = totals.iter().map(|(_, n)| n).sum();
            let hits_per_sec = hits as f64 / w.since.elapsed().as_secs_f64().max(1.0);
            let load = Load { passes_per_sec, hits_per_sec, share };
            let Some(strategy) = w.strategy() else { continue };
            let action = budget::decide(budget, strategy, w.reachability(), &load);
            let from = w.mode();
            let mut why = None;
            match action {
                Action::Keep | Action::Resume => continue,
                Action::Reach => w.reach(&mut self.probes, seen),
                Action::Watch | Action::WatchReach => {
                    if action == Action::WatchReach {
                        w.reach(&mut self.probes, seen);
                    }
                    if let Err(e) = w.switch_to_watch(&mut self.probes, &self.targets) {
                        why = Some(e.to_string());
                        w.suspend(&mut self.probes, now + budget.retry, format!("over budget; watch: {e}"));
                    }
                }
                Action::Suspend => w.suspend(&mut self.probes, now + budget.retry, "over budget".into()),
            }
            let action = if w.suspension().is_some() { Action::Suspend } else { action };
            w.budget_note = Some(format!(
                "{}: {:.2}% of a CPU ({passes_per_sec:.0} probe passes/s) under {from}",
                action.name(),
                share * 100.0
            ));
            self.printer.strategy(pid, &w.mode(), w.budget_note.as_deref().unwrap_or(""));
            changes.push(BudgetChange { pid, action, load, from, to: w.mode(), why });
        }
        changes
    }
}
