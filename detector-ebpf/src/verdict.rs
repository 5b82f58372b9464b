//! Which target, if any, a code object is: computed once per (process, code
//! object, target-set generation) and cached in an LRU map, with each CPU's
//! most recent verdicts in a direct-mapped array in front of it, so the
//! common case on the hot path is an array lookup the kernel inlines.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use detector_common::{
    CELL_SHARED, CELL_UNKNOWN, CO_OPTIMIZED, CO_RESUMABLE, CellKey, CodeIdentity, CodeKey, CountKey, Layout, NAME_LEN,
    NO_SLOT, NameKey, SLOT_CELLS, Scratch, TARGET_NONE, TARGET_PENDING, TargetKey, Verdict, VerdictLine, stats,
    verdict_line,
};

use crate::{
    emit,
    maps::{
        CELL_CLAIMS, CELL_OF, CODE_EPOCH, CONFIG, NAMES, SCRATCH, TARGETS, UNAFFECTED, VERDICT_CACHE, VERDICTS, bump,
    },
    mem::{field, object_field, read, read_ascii},
};

/// A classification given up (see [`Claim::held`]): never stored.
const TARGET_UNKNOWN: u32 = u32::MAX - 2;

/// What the hot path needs to know of the code object running at a site.
pub struct Known {
    /// The code object.
    pub code: u64,
    /// Target id, [`TARGET_NONE`] or [`TARGET_PENDING`].
    pub target: u32,
    /// Its frames are resumed (generators, coroutines).
    pub resumable: bool,
    /// Where its hits are counted ([`Verdict::cell`]).
    pub cell: u32,
    /// The target set's generation.
    pub generation: u32,
}

/// The verdict on the code object a site found as `key` (the code object
/// itself, or an instruction inside it) in process `tgid`, watch `instance`: from this CPU's
/// cache; else from [`VERDICTS`] by the code object (`code` reads it), else
/// made by `classify` and stored in both.
#[inline(always)]
pub fn verdict(
    layout: &Layout,
    tgid: u32,
    slot: u16,
    instance: u32,
    key: u64,
    code: impl FnOnce() -> Option<u64>,
    classify: impl FnOnce(u64) -> Option<u32>,
) -> Option<Known> {
    // Read first: a line filled from a verdict older than a deallocation
    // then carries the epoch before it, and is refused.
    let epoch = CODE_EPOCH.get(0).copied().unwrap_or(0);
    let config = CONFIG.get(0)?;
    let (generation, stamp) = (config.generation, config.cache_stamp);
    let cache = VERDICT_CACHE.get_ptr_mut(0)?;
    let line = unsafe { &mut (*cache).lines[verdict_line(tgid, key)] };
    // One copy, checked and used: the line may change under a preemption.
    let seen = unsafe { core::ptr::read_volatile(line) };
    if seen.key == key && seen.tgid == tgid && seen.stamp == stamp && seen.epoch == epoch && seen.check == seen.digest()
    {
        let resumable = seen.resumable != 0;
        return Some(Known { code: seen.code, target: seen.target, resumable, cell: seen.cell, generation });
    }
    let code = code()?;
    let code_key = CodeKey { tgid, instance, code };
    let mut v = match unsafe { VERDICTS.get(&code_key) } {
        Some(v) if v.generation == generation => *v,
        _ => match classify(code)? {
            TARGET_UNKNOWN => {
                bump(stats::SCRATCH_RACES);
                return None;
            }
            target => store(layout, &code_key, slot, generation, target),
        },
    };
    // A target's verdict that user space wrote (3.8-3.10 resolution).
    if v.target < TARGET_PENDING && v.cell == CELL_UNKNOWN {
        v.cell = cell_for(slot, tgid, v.target);
        let _ = VERDICTS.insert(&code_key, &v, 0);
    }
    if v.target != TARGET_PENDING {
        let mut fill = VerdictLine {
            key,
            code,
            tgid,
            stamp,
            epoch,
            target: v.target,
            resumable: v.resumable,
            cell: v.cell,
            check: 0,
        };
        fill.check = fill.digest();
        unsafe { core::ptr::write_volatile(line, fill) };
    }
    Some(Known { code, target: v.target, resumable: v.resumable != 0, cell: v.cell, generation })
}

/// The cell of `slot` that counts `(tgid, target)`, claimed on its first
/// hit, or [`CELL_SHARED`] once the process's cells are all claimed.
#[inline(always)]
fn cell_for(slot: u16, tgid: u32, target: u32) -> u32 {
    let key = CountKey { tgid, target };
    if let Some(&cell) = unsafe { CELL_OF.get(&key) } {
        return cell;
    }
    if slot == NO_SLOT {
        return CELL_SHARED;
    }
    for cell in 0..SLOT_CELLS as u32 {
        if CELL_CLAIMS.insert(&CellKey { tgid, cell }, &target, BPF_NOEXIST as u64).is_err() {
            continue;
        }
        return match CELL_OF.insert(&key, &cell, BPF_NOEXIST as u64) {
            Ok(()) => cell,
            // Another CPU claimed one for the same target first: count in
            // theirs, and give this one back.
            Err(_) => {
                let _ = CELL_CLAIMS.remove(&CellKey { tgid, cell });
                unsafe { CELL_OF.get(&key) }.copied().unwrap_or(CELL_SHARED)
            }
        };
    }
    CELL_SHARED
}

/// A code object is going away: every CPU's cached lines may name its
/// address, or instructions inside it, which its successor there must not
/// inherit, so they all lapse.
#[inline(always)]
pub fn code_freed() {
    if let Some(epoch) = CODE_EPOCH.get_ptr_mut(0) {
        unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(epoch, 1);
        }
    }
}

/// Stores a verdict, with a target's cell, and returns it.
#[inline(always)]
fn store(layout: &Layout, key: &CodeKey, slot: u16, generation: u32, target: u32) -> Verdict {
    bump(stats::VERDICT_MISSES);
    // A target this process's dependency version leaves unwatched is none
    // here (user space starts a new generation when that changes).
    let target = if target < TARGET_PENDING && unsafe { UNAFFECTED.get(&CountKey { tgid: key.tgid, target }) }.is_some()
    {
        TARGET_NONE
    } else {
        target
    };
    // Targets only: nothing else is ever asked whether it resumes.
    let resumable = target != TARGET_NONE
        && read::<u32>(key.code + layout.code_flags as u64).is_some_and(|f| f & CO_RESUMABLE != 0);
    let cell = if target < TARGET_PENDING { cell_for(slot, key.tgid, target) } else { CELL_UNKNOWN };
    let v = Verdict { generation, target, resumable: resumable as u32, cell };
    let _ = VERDICTS.insert(key, &v, 0);
    v
}

/// 3.11+: match the frame's function (`__module__`) and code (`co_qualname`)
/// against the targets. Module and class bodies never match.
#[inline(always)]
pub fn classify_resume(layout: &Layout, tgid: u32, frame: u64, code: u64) -> u32 {
    let Some(qualname) = field(code, layout.code_qualname) else { return TARGET_NONE };
    let Some(flags) = read::<u32>(code + layout.code_flags as u64) else {
        return TARGET_NONE;
    };
    if flags & CO_OPTIMIZED == 0 {
        return TARGET_NONE;
    }
    let Some(func) = object_field(layout, frame, layout.frame_func) else {
        return TARGET_NONE;
    };
    let Some(module) = field(func, layout.func_module) else {
        return TARGET_NONE;
    };
    let Some(claim) = Claim::take() else { return TARGET_NONE };
    let key = claim.key();
    key.module = [0; NAME_LEN];
    key.qualname = [0; NAME_LEN];
    if !read_ascii(layout, module, &mut key.module) || !read_ascii(layout, qualname, &mut key.qualname) {
        return TARGET_NONE;
    }
    let found = unsafe { TARGETS.get(&*key) }.copied();
    if !claim.held() {
        return TARGET_UNKNOWN;
    }
    match found {
        Some(target) => {
            emit::code(layout, tgid, target, code);
            target
        }
        None => TARGET_NONE,
    }
}

/// 3.8-3.10 with a known identity: the same exact match as 3.11+, with the
/// qualified name recorded when the function was made and the module read
/// from its globals. `None` if the module cannot be read that way.
#[inline(always)]
pub fn classify_identity(layout: &Layout, tgid: u32, code: u64, name: u64, identity: &CodeIdentity) -> Option<u32> {
    let flags = read::<u32>(code + layout.code_flags as u64)?;
    if flags & CO_OPTIMIZED == 0 {
        return Some(TARGET_NONE);
    }
    let module = module_name(layout, identity.globals)?;
    let claim = Claim::take()?;
    let key = claim.key();
    key.module = [0; NAME_LEN];
    key.qualname = [0; NAME_LEN];
    let qualname = if identity.qualname != 0 { identity.qualname } else { name };
    if !read_ascii(layout, module, &mut key.module) || !read_ascii(layout, qualname, &mut key.qualname) {
        return Some(TARGET_NONE);
    }
    let found = unsafe { TARGETS.get(&*key) }.copied();
    if !claim.held() {
        return Some(TARGET_UNKNOWN);
    }
    Some(match found {
        Some(target) => {
            emit::code(layout, tgid, target, code);
            target
        }
        None => TARGET_NONE,
    })
}

/// `globals["__name__"]` for a module's globals (3.8-3.10 dict layout):
/// module dicts are created with `__name__` as their first key, so it is the
/// first entry; anything else (a split table, another first key) is `None`.
#[inline(always)]
fn module_name(layout: &Layout, globals: u64) -> Option<u64> {
    if field(globals, layout.dict_values)? != 0 {
        return None;
    }
    let keys = field(globals, layout.dict_keys)?;
    let size = read::<i64>(keys + layout.dictkeys_size as u64)?;
    let index_bytes: i64 = match size {
        1..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => return None,
    };
    let entry = keys + layout.dictkeys_indices as u64 + (size * index_bytes) as u64;
    // An entry is (hash, key, value).
    let key = read::<u64>(entry + 8)?;
    let claim = Claim::take()?;
    let buf = &mut claim.key().qualname;
    *buf = [0; NAME_LEN];
    if !read_ascii(layout, key, buf) || buf[..9] != *b"__name__\0" || !claim.held() {
        return None;
    }
    read::<u64>(entry + 16)
}

/// 3.8-3.10 without an identity (the function was made before the probes
/// were attached and user space did not pre-fill it): the kernel only checks
/// `co_name` against the last component of each target; a match is pending
/// until user space resolves the rest from the module.
#[inline(always)]
pub fn classify_name(layout: &Layout, code: u64, name: u64) -> u32 {
    let Some(flags) = read::<u32>(code + layout.code_flags as u64) else {
        return TARGET_NONE;
    };
    if flags & CO_OPTIMIZED == 0 {
        return TARGET_NONE;
    }
    let Some(claim) = Claim::take() else { return TARGET_NONE };
    let key = claim.key();
    key.module = [0; NAME_LEN];
    if !read_ascii(layout, name, &mut key.module) {
        return TARGET_NONE;
    }
    // `NameKey` is a `#[repr(C)]` wrapper of the same array.
    let name_key = unsafe { &*(&key.module as *const _ as *const NameKey) };
    let found = unsafe { NAMES.get(name_key) }.is_some();
    match (claim.held(), found) {
        (false, _) => TARGET_UNKNOWN,
        (true, true) => TARGET_PENDING,
        (true, false) => TARGET_NONE,
    }
}

/// This CPU's scratch key, taken for one lookup (see
/// [`detector_common::Scratch::claim`]).
struct Claim {
    scratch: *mut Scratch,
    mark: u64,
}

impl Claim {
    #[inline(always)]
    fn take() -> Option<Claim> {
        let scratch = SCRATCH.get_ptr_mut(0)?;
        // A nanosecond clock: no two programs on one CPU read the same.
        let mark = unsafe { bpf_ktime_get_ns() };
        unsafe { core::ptr::write_volatile(&raw mut (*scratch).claim, mark) };
        Some(Claim { scratch, mark })
    }

    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    fn key(&self) -> &mut TargetKey {
        unsafe { &mut (*self.scratch).key }
    }

    /// Whether no other program took the space since: the key is as built.
    #[inline(always)]
    fn held(&self) -> bool {
        unsafe { core::ptr::read_volatile(&raw const (*self.scratch).claim) == self.mark }
    }
}
