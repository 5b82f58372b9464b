//! 3.8-3.10 have no `co_qualname`, so the kernel only matches a code object's
//! `co_name`. This resolves such a candidate exactly: the frame's globals name
//! the module (`__name__`), and the target's qualified name is walked from
//! there through the objects that define it (classes, functions, nested code
//! objects in `co_consts` for `<locals>`), until a code object that is the
//! candidate is found, or not.
//!
//! It is exact because it follows definitions, not names: `m:A.f` is only the
//! code of `m.A.f`, never `m.B.f`, `m.f` or `other.A.f`.

use super::{ProcessError, objects::Objects};
use crate::targets::Target;

/// How deep wrappers (`__wrapped__`, closure cells) are followed.
const MAX_WRAP_DEPTH: u32 = 4;

/// Most objects a wrapper's definitions are looked for in: a closure may
/// hold any number of cells, and they may point anywhere, itself included.
const MAX_WRAPPED: usize = 256;

/// Pointers looked at in each place a wrapper of unknown type may hold the
/// function it wraps (see [`held_functions`]).
const HELD_WORDS: usize = 16;

/// A namespace a qualified-name component is looked up in.
#[derive(Clone, Copy)]
enum Scope {
    /// A module's globals or a class's `__dict__`.
    Dict(u64),
    /// A code object's constants (`<locals>` and class bodies in functions).
    Code(u64),
}

/// A definition found by walking a qualified name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Definition {
    /// Its code object.
    pub code: u64,
    /// The function object made from it, if one exists yet (a function
    /// nested in another exists only while or after the outer one runs).
    pub function: Option<u64>,
}

/// Which of `candidates` (target id and target) the code object `code`,
/// started with globals `globals`, is.
pub fn resolve(
    objs: &Objects<'_>,
    code: u64,
    globals: u64,
    candidates: &[(u32, &Target)],
) -> Result<Option<u32>, ProcessError> {
    let Some(name) = objs.dict_get(globals, "__name__")? else {
        return Ok(None);
    };
    let module = objs.str(name)?;
    for &(id, target) in candidates.iter().filter(|(_, t)| t.module() == module) {
        if definitions(objs, globals, target)?.iter().any(|d| d.code == code) {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The definitions `target` names in the module whose globals are `globals`.
pub fn definitions(objs: &Objects<'_>, globals: u64, target: &Target) -> Result<Vec<Definition>, ProcessError> {
    let parts: Vec<&str> = target.qualname_parts().collect();
    let defs = walk(objs, Scope::Dict(globals), &parts, target.qualname())?;
    Ok(named(objs, defs, target))
}

/// The definitions whose code object is the target's own: a decorator's
/// wrapper (found through `functools.wraps`'s `__wrapped__`, or by its
/// copied `__qualname__`) runs code shared by every function it wraps, which
/// is never the target. The code's `co_qualname` must be the target's
/// (3.11+; what per-call probes match too), or, on 3.8-3.10, its `co_name`
/// the target's last name.
fn named(objs: &Objects<'_>, defs: Vec<Definition>, target: &Target) -> Vec<Definition> {
    let o = objs.o;
    let (field, want) = if o.code_qualname != detector_common::NO_OFFSET {
        (o.code_qualname, target.qualname())
    } else {
        (o.code_name, target.name())
    };
    defs.into_iter()
        .filter(|d| objs.mem.ptr(d.code, field).and_then(|n| objs.str(n)).is_ok_and(|n| n == want))
        .collect()
}

/// The definitions `target` names in a module body about to run, whose code
/// object is `code`: before the body runs, its functions exist only as code
/// objects in `co_consts` (classes' bodies and functions' nested code, too).
pub fn definitions_in_body(objs: &Objects<'_>, code: u64, target: &Target) -> Result<Vec<Definition>, ProcessError> {
    let parts: Vec<&str> = target.qualname_parts().collect();
    let defs = walk(objs, Scope::Code(code), &parts, target.qualname())?;
    Ok(named(objs, defs, target))
}

/// The globals of module `name` in every interpreter's `sys.modules`.
pub fn module_globals(objs: &Objects<'_>, runtime: u64, name: &str) -> Result<Vec<u64>, ProcessError> {
    Ok(modules_globals(objs, runtime, &[name])?.into_values().next().unwrap_or_default())
}

/// Most interpreters looked at in one process (`_PyRuntime`'s list is the
/// process's to make as long as it likes).
const MAX_INTERPRETERS: usize = 64;

/// `sys.modules` of every interpreter that has one yet, newest first: the
/// main one, and subinterpreters (before initialisation, a command stopped
/// at its entry point has none).
pub fn sys_modules(objs: &Objects<'_>, runtime: u64) -> Result<Vec<u64>, ProcessError> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut interp = objs.mem.ptr(runtime, objs.o.runtime_interpreters_head)?;
    while interp != 0 && seen.len() < MAX_INTERPRETERS && seen.insert(interp) {
        let modules = objs.mem.ptr(interp, objs.o.interp_modules)?;
        if modules != 0 {
            out.push(modules);
        }
        interp = objs.mem.ptr(interp, objs.o.interp_next)?;
    }
    Ok(out)
}

/// The globals of each of `names` that is a module, in every interpreter's
/// `sys.modules`: one pass over each.
pub fn modules_globals<'n>(
    objs: &Objects<'_>,
    runtime: u64,
    names: &[&'n str],
) -> Result<std::collections::BTreeMap<&'n str, Vec<u64>>, ProcessError> {
    let mut out: std::collections::BTreeMap<&'n str, Vec<u64>> = std::collections::BTreeMap::new();
    for modules in sys_modules(objs, runtime)? {
        for (name, module) in objs.dict_get_many(modules, names)? {
            if objs.type_name(module)? == "module" {
                out.entry(name).or_default().push(objs.mem.ptr(module, objs.o.module_dict)?);
            }
        }
    }
    Ok(out)
}

/// The definitions `parts` names, starting in `scope` (`qualname`, all of
/// them, is what the function found must call itself).
fn walk(objs: &Objects<'_>, scope: Scope, parts: &[&str], qualname: &str) -> Result<Vec<Definition>, ProcessError> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(Vec::new());
    };
    let found: Vec<u64> = match scope {
        Scope::Dict(d) => objs.dict_get(d, first)?.into_iter().collect(),
        Scope::Code(c) => nested_code(objs, c, first)?,
    };
    let mut out = Vec::new();
    for obj in found {
        match rest.first() {
            None => match codes_of(objs, obj)? {
                defs if defs.is_empty() => out.extend(held_functions(objs, obj, qualname)),
                defs => out.extend(defs),
            },
            Some(&"<locals>") => {
                for d in codes_of(objs, obj)? {
                    out.extend(walk(objs, Scope::Code(d.code), &rest[1..], qualname)?);
                }
            }
            Some(_) if objs.is_class(obj) => {
                out.extend(walk(objs, Scope::Dict(objs.class_dict(obj)?), rest, qualname)?);
            }
            // A class defined inside a function: its body's code object.
            Some(_) if objs.type_name(obj)? == "code" => out.extend(walk(objs, Scope::Code(obj), rest, qualname)?),
            Some(_) => {}
        }
    }
    Ok(out)
}

/// The function named `qualname` that a wrapper of a type not known here
/// holds (`functools.cached_property`, `singledispatchmethod`, a C wrapper
/// such as `lru_cache`'s, a descriptor of the application's own): its
/// attributes live in its own fields, in an instance dict (at
/// `tp_dictoffset` up to 3.10; managed, just before the object, from 3.11),
/// or in values inline after it (3.13+). A bounded look at the pointers in
/// each of those places, each one taken only if it is a function that calls
/// itself `qualname`: nothing else can match.
fn held_functions(objs: &Objects<'_>, obj: u64, qualname: &str) -> Vec<Definition> {
    let o = objs.o;
    let Ok(ty) = objs.type_of(obj) else { return Vec::new() };
    let basic = objs.mem.i64(ty + o.type_basicsize as u64).unwrap_or(0).clamp(16, 512) as u64;
    let mut places = vec![obj + 16, obj + basic];
    let mut holders: Vec<u64> =
        [obj.wrapping_sub(32), obj.wrapping_sub(24)].into_iter().filter_map(|at| objs.mem.u64(at).ok()).collect();
    if let Ok(offset) = objs.mem.i64(ty + o.type_dictoffset as u64)
        && (16..4096).contains(&offset)
        && let Ok(dict) = objs.mem.u64(obj + offset as u64)
    {
        holders.push(dict);
    }
    let mut candidates = Vec::new();
    for h in holders.into_iter().filter(|h| *h != 0) {
        // 3.12 stores a managed values pointer minus one (odd: a tag).
        let h = if h & 1 == 1 { h + 1 } else { h };
        match objs.type_name(h).as_deref() {
            Ok("dict") => match objs.mem.ptr(h, o.dict_values) {
                Ok(values) if values != 0 => places.extend([values, values + 8]),
                _ => candidates
                    .extend(objs.dict_items(h).unwrap_or_default().into_iter().take(HELD_WORDS).map(|(_, v)| v)),
            },
            // A values array (its layout differs by version by a word).
            _ => places.extend([h, h + 8]),
        }
    }
    for place in places {
        let Ok(words) = objs.mem.bytes(place, HELD_WORDS * 8) else { continue };
        candidates.extend(words.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())));
    }
    let mut out = Vec::new();
    for w in candidates {
        if w == 0 || w % 8 != 0 || out.iter().any(|d: &Definition| d.function == Some(w)) {
            continue;
        }
        if objs.type_name(w).is_ok_and(|t| t == "function")
            && objs.mem.ptr(w, o.func_qualname).and_then(|q| objs.str(q)).is_ok_and(|q| q == qualname)
            && let Ok(code) = objs.mem.ptr(w, o.func_code)
        {
            out.push(Definition { code, function: Some(w) });
        }
    }
    out
}

/// Code objects named `name` among `code.co_consts`.
fn nested_code(objs: &Objects<'_>, code: u64, name: &str) -> Result<Vec<u64>, ProcessError> {
    let consts = objs.mem.ptr(code, objs.o.code_consts)?;
    let mut out = Vec::new();
    for c in objs.tuple_items(consts)? {
        if objs.type_name(c)? == "code" && objs.str(objs.mem.ptr(c, objs.o.code_name)?)? == name {
            out.push(c);
        }
    }
    Ok(out)
}

/// The definitions whose body calling `obj` runs: a function (and, for
/// decorated functions, what it wraps), the function inside a
/// `staticmethod`, `classmethod` or `property`, or a code object itself.
fn codes_of(objs: &Objects<'_>, obj: u64) -> Result<Vec<Definition>, ProcessError> {
    let mut seen = std::collections::HashSet::new();
    wrapped_codes(objs, obj, 0, &mut seen)
}

/// [`codes_of`], `depth` wrappers in, each object looked at once (`seen`).
fn wrapped_codes(
    objs: &Objects<'_>,
    obj: u64,
    depth: u32,
    seen: &mut std::collections::HashSet<u64>,
) -> Result<Vec<Definition>, ProcessError> {
    if depth > MAX_WRAP_DEPTH || seen.len() >= MAX_WRAPPED || !seen.insert(obj) {
        return Ok(Vec::new());
    }
    let o = objs.o;
    Ok(match objs.type_name(obj)?.as_str() {
        "code" => vec![Definition { code: obj, function: None }],
        "function" => {
            let mut out = vec![Definition { code: objs.mem.ptr(obj, o.func_code)?, function: Some(obj) }];
            let dict = objs.mem.ptr(obj, o.func_dict)?;
            if dict != 0
                && let Some(w) = objs.dict_get(dict, "__wrapped__")?
            {
                out.extend(wrapped_codes(objs, w, depth + 1, seen)?);
            }
            let closure = objs.mem.ptr(obj, o.func_closure)?;
            if closure != 0 {
                for cell in objs.tuple_items(closure)? {
                    let inner = objs.mem.ptr(cell, o.cell_ref)?;
                    if inner != 0 && objs.type_name(inner)? == "function" {
                        out.extend(wrapped_codes(objs, inner, depth + 1, seen)?);
                    }
                }
            }
            out
        }
        "staticmethod" | "classmethod" => {
            wrapped_codes(objs, objs.mem.ptr(obj, o.method_wrapper_callable)?, depth + 1, seen)?
        }
        "property" => {
            // fget, fset, fdel follow the object header.
            let mut out = Vec::new();
            for off in [16u64, 24, 32] {
                let f = objs.mem.u64(obj + off)?;
                if f != 0 {
                    out.extend(wrapped_codes(objs, f, depth + 1, seen)?);
                }
            }
            out
        }
        _ => Vec::new(),
    })
}
