//! A pass a RESUME site does not count (RESUME_CHECK de-optimising, on a
//! pending signal or a new instrumentation version) goes on into RESUME's
//! body, which starts the function. Where that path reaches a site (RESUME's
//! own, or a handler's entry) nothing more is needed. Clang instead copies
//! RESUME's first test onto the path and branches from it into RESUME's
//! body past RESUME's site: such a path gets a site of its own, at that
//! branch, checked as RESUME's is.

use iced_x86::{FlowControl, Instruction, OpKind};

use super::{
    MAX_STRAIGHT_LINE, ResumeContext, Site, decoder, emulated, format, resume_check, sets_flags, straight_line,
    uncounted_edge,
};
use crate::interp::{AnalysisError, elf::ElfImage, registers};

/// Unconditional jumps followed along an uncounted pass.
const MAX_JUMPS: usize = 4;

/// The sites RESUME_CHECK's uncounted passes need: one per pass that
/// reaches none of `sites`. (RESUME's own uncounted passes re-instrument and
/// dispatch the same instruction again, through a handler's entry.)
pub(crate) fn deopt_sites(elf: &ElfImage, sites: &[Site], ctx: &ResumeContext) -> Result<Vec<Site>, AnalysisError> {
    let mut out: Vec<Site> = Vec::new();
    for s in sites.iter().filter(|s| s.handler == "RESUME_CHECK") {
        let Some(edge) = uncounted_edge(elf, s) else { continue };
        if let Some(site) = path_site(elf, s, edge, sites, ctx)?
            && !out.iter().any(|o| o.addr == site.addr)
        {
            out.push(site);
        }
    }
    Ok(out)
}

/// The site on the path from `edge`, where `partner`'s uncounted pass goes
/// on, or `None` if that path reaches one of `sites`.
fn path_site(
    elf: &ElfImage,
    partner: &Site,
    edge: u64,
    sites: &[Site],
    ctx: &ResumeContext,
) -> Result<Option<Site>, AnalysisError> {
    let name = format!("{} de-optimised", partner.handler);
    let refuse = |why: String| AnalysisError::Unsupported(format!("{name} at {edge:#x}: {why}"));
    let covered = |addr: u64| sites.iter().any(|s| s.addr == addr || s.handler_addr == addr);
    let (branch, path) = match follow(elf, edge, &covered)? {
        Leads::Site => return Ok(None),
        Leads::Branch(branch, path) => (branch, path),
        Leads::Elsewhere(why) => return Err(refuse(format!("{why} without passing a site"))),
    };
    // A way on from the branch that reached a site would count twice.
    for next in [branch.near_branch_target(), branch.next_ip()] {
        if matches!(follow(elf, next, &covered)?, Leads::Site) {
            return Err(refuse(format!("its branch at {:#x} leads on to a site too", branch.ip())));
        }
    }
    // The body it goes on in is RESUME's.
    let flag_setter = path.iter().rev().find(|i| sets_flags(i)).copied();
    let decided = resume_check("RESUME", &branch, (flag_setter.as_ref(), &path), ctx);
    // What the partner's handler did before its branch holds on the path.
    let mut block = straight_line(elf, partner.handler_addr)?;
    block.extend(path);
    let registers = registers::at_site(&block, ctx.frame_instr, ctx.frame_code);
    Ok(Some(Site::resume((name, edge), &branch, decided, registers)))
}

/// Where a straight path first leads.
enum Leads {
    /// To a site, or a handler's entry.
    Site,
    /// To a conditional branch, after these instructions.
    Branch(Instruction, Vec<Instruction>),
    /// Elsewhere, as said.
    Elsewhere(String),
}

/// Where the path from `from`, along instructions and direct jumps, leads.
fn follow(elf: &ElfImage, from: u64, covered: &dyn Fn(u64) -> bool) -> Result<Leads, AnalysisError> {
    let (mut dec, mut jumps, mut path) = (decoder(elf, from)?, 0, Vec::new());
    for _ in 0..MAX_STRAIGHT_LINE {
        let insn = dec.decode();
        if covered(insn.ip()) {
            return Ok(Leads::Site);
        }
        match insn.flow_control() {
            FlowControl::Next => path.push(insn),
            FlowControl::UnconditionalBranch if insn.op0_kind() == OpKind::NearBranch64 => {
                if jumps == MAX_JUMPS {
                    return Ok(Leads::Elsewhere(format!("takes more than {MAX_JUMPS} jumps")));
                }
                jumps += 1;
                dec = decoder(elf, insn.near_branch_target())?;
            }
            FlowControl::ConditionalBranch if emulated(&insn) => return Ok(Leads::Branch(insn, path)),
            other => {
                let at = format!("leaves at {:#x} ({other:?}: {})", insn.ip(), format(&insn));
                return Ok(Leads::Elsewhere(at));
            }
        }
    }
    Ok(Leads::Elsewhere(format!("has no branch in its first {MAX_STRAIGHT_LINE} instructions")))
}
