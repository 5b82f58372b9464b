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
    walk(objs, Scope::Dict(globals), &parts)
}

/// The globals of module `name` if it is in `sys.modules`.
pub fn module_globals(objs: &Objects<'_>, runtime: u64, name: &str) -> Result<Option<u64>, ProcessError> {
    let o = objs.o;
    // Before initialisation (a command stopped at its entry point) there is
    // no interpreter, or no `sys.modules`, yet.
    let interp = objs.mem.ptr(runtime, o.runtime_interpreters_head)?;
    if interp == 0 {
        return Ok(None);
    }
    let modules = objs.mem.ptr(interp, o.interp_modules)?;
    if modules == 0 {
        return Ok(None);
    }
    let Some(module) = objs.dict_get(modules, name)? else {
        return Ok(None);
    };
    if objs.type_name(module)? != "module" {
        return Ok(None);
    }
    Ok(Some(objs.mem.ptr(module, o.module_dict)?))
}

/// The definitions `parts` names, starting in `scope`.
fn walk(objs: &Objects<'_>, scope: Scope, parts: &[&str]) -> Result<Vec<Definition>, ProcessError> {
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
            None => out.extend(codes_of(objs, obj, 0)?),
            Some(&"<locals>") => {
                for d in codes_of(objs, obj, 0)? {
                    out.extend(walk(objs, Scope::Code(d.code), &rest[1..])?);
                }
            }
            Some(_) if objs.is_class(obj) => {
                out.extend(walk(objs, Scope::Dict(objs.class_dict(obj)?), rest)?);
            }
            // A class defined inside a function: its body's code object.
            Some(_) if objs.type_name(obj)? == "code" => out.extend(walk(objs, Scope::Code(obj), rest)?),
            Some(_) => {}
        }
    }
    Ok(out)
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
fn codes_of(objs: &Objects<'_>, obj: u64, depth: u32) -> Result<Vec<Definition>, ProcessError> {
    if depth > MAX_WRAP_DEPTH {
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
                out.extend(codes_of(objs, w, depth + 1)?);
            }
            let closure = objs.mem.ptr(obj, o.func_closure)?;
            if closure != 0 {
                for cell in objs.tuple_items(closure)? {
                    let inner = objs.mem.ptr(cell, o.cell_ref)?;
                    if inner != 0 && objs.type_name(inner)? == "function" {
                        out.extend(codes_of(objs, inner, depth + 1)?);
                    }
                }
            }
            out
        }
        "staticmethod" | "classmethod" => codes_of(objs, objs.mem.ptr(obj, o.method_wrapper_callable)?, depth + 1)?,
        "property" => {
            // fget, fset, fdel follow the object header.
            let mut out = Vec::new();
            for off in [16u64, 24, 32] {
                let f = objs.mem.u64(obj + off)?;
                if f != 0 {
                    out.extend(codes_of(objs, f, depth + 1)?);
                }
            }
            out
        }
        _ => Vec::new(),
    })
}
