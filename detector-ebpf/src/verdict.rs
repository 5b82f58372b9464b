//! Which target, if any, a code object is: computed once per (process, code
//! object, target-set generation) and cached in an LRU map, so the common
//! case on the hot path is one lookup.

use detector_common::{
    CO_OPTIMIZED, CO_RESUMABLE, CodeIdentity, CodeKey, Layout, NAME_LEN, NameKey, TARGET_NONE, TARGET_PENDING, Verdict,
    stats,
};

use crate::{
    emit,
    maps::{CONFIG, NAMES, SCRATCH, TARGETS, VERDICTS, bump},
    mem::{field, object_field, read, read_ascii},
};

/// The current generation of the target set.
#[inline(always)]
pub fn generation() -> u32 {
    CONFIG.get(0).map(|c| c.generation).unwrap_or(0)
}

/// A cached verdict for `key` in `generation`, if any: `(target, resumable)`.
#[inline(always)]
pub fn cached(key: &CodeKey, generation: u32) -> Option<(u32, bool)> {
    let v = unsafe { VERDICTS.get(key) }?;
    if v.generation == generation { Some((v.target, v.resumable != 0)) } else { None }
}

/// Stores a verdict; returns `(target, resumable)` as `cached` would.
#[inline(always)]
pub fn store(layout: &Layout, key: &CodeKey, generation: u32, target: u32) -> (u32, bool) {
    bump(stats::VERDICT_MISSES);
    // Targets only: nothing else is ever asked whether it resumes.
    let resumable = target != TARGET_NONE
        && read::<u32>(key.code + layout.code_flags as u64).is_some_and(|f| f & CO_RESUMABLE != 0);
    let _ = VERDICTS.insert(key, &Verdict { generation, target, resumable: resumable as u32 }, 0);
    (target, resumable)
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
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TARGET_NONE;
    };
    let key = unsafe { &mut (*scratch).key };
    key.module = [0; NAME_LEN];
    key.qualname = [0; NAME_LEN];
    if !read_ascii(layout, module, &mut key.module) || !read_ascii(layout, qualname, &mut key.qualname) {
        return TARGET_NONE;
    }
    match unsafe { TARGETS.get(&*key) } {
        Some(&target) => {
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
    let scratch = SCRATCH.get_ptr_mut(0)?;
    let key = unsafe { &mut (*scratch).key };
    key.module = [0; NAME_LEN];
    key.qualname = [0; NAME_LEN];
    let qualname = if identity.qualname != 0 { identity.qualname } else { name };
    if !read_ascii(layout, module, &mut key.module) || !read_ascii(layout, qualname, &mut key.qualname) {
        return Some(TARGET_NONE);
    }
    Some(match unsafe { TARGETS.get(&*key) } {
        Some(&target) => {
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
    let scratch = SCRATCH.get_ptr_mut(0)?;
    let buf = unsafe { &mut (*scratch).key.qualname };
    *buf = [0; NAME_LEN];
    if !read_ascii(layout, key, buf) || buf[..9] != *b"__name__\0" {
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
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TARGET_NONE;
    };
    let key = unsafe { &mut (*scratch).key };
    key.module = [0; NAME_LEN];
    if !read_ascii(layout, name, &mut key.module) {
        return TARGET_NONE;
    }
    // `NameKey` is a `#[repr(C)]` wrapper of the same array.
    let name_key = unsafe { &*(&key.module as *const _ as *const NameKey) };
    if unsafe { NAMES.get(name_key) }.is_some() { TARGET_PENDING } else { TARGET_NONE }
}
