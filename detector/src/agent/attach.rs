//! Attaching uprobes to one process's interpreter: the per-call sites with
//! what they need pre-filled, and the rare-event sites (deallocation, the
//! tier-2 optimizer's start, module execution). Each function leaves
//! nothing attached when it fails.

use detector_common::{FAMILY_FRAME_ARG, MODE_PER_CALL, SiteCookie};
use tracing::{debug, info};

use super::AttachError;
use crate::{
    bpf::{Link, ProbeKind, Probes},
    interp::sites::SiteRole,
    pyproc::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects, qualname, threads},
    targets::{Target, TargetSet},
};

/// The per-call probes of a process, and what was pre-filled for them.
pub(crate) struct PerCallLinks {
    /// Every per-call site's uprobe.
    pub links: Vec<Link>,
    /// Threads whose state was pre-filled (3.11+).
    pub prefilled_threads: usize,
    /// Target functions whose identity was pre-filled (3.8-3.10).
    pub prefilled_identities: usize,
}

/// Attaches `kind` at every site of `role`; on failure what it attached is
/// detached again.
pub(crate) fn role(
    probes: &mut Probes,
    p: &PythonProcess,
    role: SiteRole,
    kind: ProbeKind,
) -> Result<Vec<Link>, AttachError> {
    let layout = probes.layout_id(&p.analysis.layout)?;
    let slot = probes.slot(p.pid)?;
    let mut links = Vec::new();
    for site in p.analysis.sites.iter().filter(|s| s.role == role) {
        let cookie = SiteCookie {
            layout,
            slot,
            check: site.check,
            cond: site.cond,
            count_when: site.count_when,
            frame_reg: site.registers.frame,
            code_reg: site.registers.code,
            instr_reg: site.registers.instr,
        };
        match probes.attach(kind, &p.probe_path(), site.file_offset, p.pid, cookie) {
            Ok(link) => links.push(link),
            Err(e) => {
                detach_all(probes, links);
                return Err(e.into());
            }
        }
        debug!(pid = p.pid, binary = %p.object.path, site = %site.handler, addr = site.addr, "attached");
    }
    Ok(links)
}

/// The probes every attached mode keeps: code deallocation (no verdict,
/// identity or watched unit may outlive its code object) and the tier-2
/// optimizer's entry (a JIT that starts stops the counting). Both are rare
/// next to calls.
pub(crate) fn guards(probes: &mut Probes, p: &PythonProcess) -> Result<Vec<Link>, AttachError> {
    let _attaching = probes.attaching();
    let mut links = role(probes, p, SiteRole::CodeDealloc, ProbeKind::CodeDealloc)?;
    match role(probes, p, SiteRole::Tier2Start, ProbeKind::Tier2Start) {
        Ok(tier2) => {
            links.extend(tier2);
            Ok(links)
        }
        Err(e) => {
            detach_all(probes, links);
            Err(e)
        }
    }
}

/// The module-execution probe (empty where the build has no such site).
pub(crate) fn imports(probes: &mut Probes, p: &PythonProcess) -> Result<Vec<Link>, AttachError> {
    let _attaching = probes.attaching();
    role(probes, p, SiteRole::ModuleExec, ProbeKind::ModuleExec)
}

/// Attaches every per-call site and switches the process's slot to count
/// them. The guards must be attached already.
pub(crate) fn per_call(
    probes: &mut Probes,
    p: &PythonProcess,
    targets: &TargetSet,
) -> Result<PerCallLinks, AttachError> {
    let _attaching = probes.attaching();
    let mut out = PerCallLinks { links: Vec::new(), prefilled_threads: 0, prefilled_identities: 0 };
    let result = attach_per_call(probes, p, targets, &mut out);
    if let Err(e) = result {
        detach_all(probes, std::mem::take(&mut out.links));
        return Err(e);
    }
    info!(
        pid = p.pid,
        binary = %p.object.path,
        version = %p.analysis.version,
        sites = out.links.len(),
        prefilled_threads = out.prefilled_threads,
        prefilled_identities = out.prefilled_identities,
        "probing every call"
    );
    Ok(out)
}

fn attach_per_call(
    probes: &mut Probes,
    p: &PythonProcess,
    targets: &TargetSet,
    out: &mut PerCallLinks,
) -> Result<(), AttachError> {
    if p.analysis.layout.family == FAMILY_FRAME_ARG {
        // Definitions first, then pre-fill, then calls: a function made in
        // between is recorded by the definition probe.
        out.links.extend(role(probes, p, SiteRole::FunctionNew, ProbeKind::FuncNew)?);
        out.prefilled_identities = prefill_identities(probes, p, targets.iter().map(|(t, _)| t))?;
        out.links.extend(role(probes, p, SiteRole::EvalEntry, ProbeKind::EvalCall)?);
    } else {
        // Entry first, then pre-fill, then RESUME sites: a thread that
        // starts in between is recorded by the entry probe.
        out.links.extend(role(probes, p, SiteRole::EvalEntry, ProbeKind::EvalEntry)?);
        out.prefilled_threads = prefill_threads(probes, p)?;
        out.links.extend(role(probes, p, SiteRole::Resume, ProbeKind::Resume)?);
    }
    probes.set_mode(p.pid, MODE_PER_CALL)?;
    Ok(())
}

/// The empty program at every site the detector would use: the floor the
/// detector's per-hit cost is measured against (`cargo xtask bench` only).
pub(crate) fn floor(probes: &mut Probes, p: &PythonProcess) -> Result<Vec<Link>, AttachError> {
    let _attaching = probes.attaching();
    let mut links = Vec::new();
    for r in [SiteRole::CodeDealloc, SiteRole::FunctionNew, SiteRole::EvalEntry, SiteRole::Resume] {
        match role(probes, p, r, ProbeKind::Empty) {
            Ok(l) => links.extend(l),
            Err(e) => {
                detach_all(probes, links);
                return Err(e);
            }
        }
    }
    Ok(links)
}

/// 3.8-3.10: records the identity of target functions that already exist
/// (modules imported before the attach), so the kernel matches them exactly
/// from their first call. Returns how many were found.
pub(crate) fn prefill_identities<'a>(
    probes: &mut Probes,
    p: &PythonProcess,
    targets: impl IntoIterator<Item = &'a Target>,
) -> Result<usize, AttachError> {
    let found = identities(p, targets)?;
    for i in &found {
        probes.set_identity(p.pid, i.code, i.qualname, i.globals)?;
    }
    Ok(found.len())
}

/// A function of a target's that exists, as the kernel identifies it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Identity {
    /// The function object.
    pub(crate) function: u64,
    pub(crate) code: u64,
    /// The function's `__qualname__`.
    pub(crate) qualname: u64,
    /// The function's `__globals__`.
    pub(crate) globals: u64,
}

/// 3.8-3.10: the functions of `targets` that exist in `p` now.
pub(crate) fn identities<'a>(
    p: &PythonProcess,
    targets: impl IntoIterator<Item = &'a Target>,
) -> Result<Vec<Identity>, ProcessError> {
    let Some(runtime) = p.runtime() else {
        return Ok(Vec::new());
    };
    let mem = ProcessMemory::open(p.pid)?;
    let objs = Objects::of(p, &mem);
    let mut found = Vec::new();
    for target in targets {
        for globals in qualname::module_globals(&objs, runtime, target.module())? {
            for def in qualname::definitions(&objs, globals, target)? {
                let Some(func) = def.function else { continue };
                let qualname = mem.ptr(func, objs.o.func_qualname)?;
                let globals = mem.ptr(func, objs.o.func_globals)?;
                found.push(Identity { function: func, code: def.code, qualname, globals });
            }
        }
    }
    Ok(found)
}

/// Records the thread state of every thread already known to the
/// interpreter, for threads that are deep in Python and will not enter
/// `_PyEval_EvalFrameDefault` again.
fn prefill_threads(probes: &mut Probes, p: &PythonProcess) -> Result<usize, AttachError> {
    let Some(runtime) = p.runtime() else {
        return Ok(0);
    };
    let mem = ProcessMemory::open(p.pid)?;
    let states = threads::thread_states(&mem, &p.analysis.table.values, runtime)?;
    for t in &states {
        probes.set_thread(t.tid, p.pid, t.tstate)?;
    }
    Ok(states.len())
}

/// Detaches `links` (closed in the background).
pub(crate) fn detach_all(probes: &mut Probes, links: Vec<Link>) {
    for link in links {
        probes.detach(link);
    }
}
