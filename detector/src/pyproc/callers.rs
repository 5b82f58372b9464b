//! Who called a target: the frames the kernel recorded above it at its
//! first hit, read back to the first one of user code (not the standard
//! library, not a third-party package, not the target's own package), and
//! its file, qualified name and line, as the tracer reports it.

mod lines;

use detector_common::CallerFrame;
use serde::{Deserialize, Serialize};

use super::{ProcessError, PythonProcess, mem::ProcessMemory, objects::Objects};

/// The file names of the code objects CPython 3.12 runs entry frames with.
const SHIMS: [&str; 3] = ["<shim>", "<interpreter trampoline>", "<cleanup>"];

/// Largest line table read.
const MAX_LINETABLE: i64 = 64 << 10;
/// Longest bytecode (code units) and most per-thread copies of it looked
/// through for the copy a caller's instruction lies in.
const MAX_CODE_UNITS: i64 = 1 << 20;
const MAX_BYTECODE_COPIES: i64 = 1024;

/// Where a target was reached from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The caller's file (`co_filename`); the target's module when the
    /// caller is not known.
    pub path: String,
    /// The caller's qualified name (`co_name` before 3.11); the target's
    /// when the caller is not known.
    pub symbol: String,
    /// The line of the call, 0 when it is not known.
    pub line: u32,
}

/// The first caller of user code among `frames` (innermost first), above
/// the target whose code object is `code` in module `module`.
pub fn first_user_caller(
    p: &PythonProcess,
    module: &str,
    code: u64,
    frames: &[CallerFrame],
) -> Result<Option<Caller>, ProcessError> {
    let mem = ProcessMemory::open(p.pid)?;
    let objs = Objects::of(p, &mem);
    let o = objs.o;
    let own = mem.ptr(code, o.code_filename).and_then(|f| objs.str(f)).ok();
    let package = own.as_deref().and_then(|f| package_of(module, f));
    for f in frames.iter().filter(|f| f.code != 0) {
        // One frame that cannot be read (its code object freed since)
        // leaves the others to look at.
        if let Some(caller) = frame_caller(&objs, f, package.as_ref()) {
            return Ok(Some(caller));
        }
    }
    Ok(None)
}

/// The caller `f` is, if it is a frame of user code that can be read.
fn frame_caller(objs: &Objects<'_>, f: &CallerFrame, package: Option<&Package>) -> Option<Caller> {
    let (mem, o) = (objs.mem, objs.o);
    // A frame of the C stack holds no code object (3.13+: `None`).
    if objs.type_name(f.code).ok()? != "code" {
        return None;
    }
    let path = objs.str(mem.ptr(f.code, o.code_filename).ok()?).ok()?;
    if !user_code(&path, package) {
        return None;
    }
    let name = if o.code_qualname != detector_common::NO_OFFSET { o.code_qualname } else { o.code_name };
    let symbol = objs.str(mem.ptr(f.code, name).ok()?).ok()?;
    let line = line(objs, f).unwrap_or(0);
    Some(Caller { path, symbol, line })
}

/// The line a frame is at, through its code object's line table.
fn line(objs: &Objects<'_>, f: &CallerFrame) -> Option<u32> {
    let (mem, o) = (objs.mem, objs.o);
    let first = mem.u32(f.code.checked_add(o.code_firstlineno as u64)?).ok()? as i32;
    let table = mem.ptr(f.code, o.code_linetable).ok()?;
    let len = mem.i64(table.checked_add(o.tuple_size as u64)?).ok()?;
    if !(0..=MAX_LINETABLE).contains(&len) {
        return None;
    }
    let bytes = mem.bytes(table.checked_add(o.bytes_sval as u64)?, len as usize).ok()?;
    let offset = match objs.minor {
        8 | 9 => f.instr,
        10 => f.instr.checked_mul(2)?,
        _ => f.instr.checked_sub(bytecode_of(objs, f)?)?,
    };
    lines::line_of(objs.minor, &bytes, first, offset)
}

/// Where the bytecode the frame runs starts (3.11+): the code object's own,
/// or in a free-threaded build the copy of the frame's thread that holds
/// its instruction.
fn bytecode_of(objs: &Objects<'_>, f: &CallerFrame) -> Option<u64> {
    let (mem, o) = (objs.mem, objs.o);
    let own = f.code.checked_add(o.code_adaptive as u64)?;
    if o.code_tlbc == detector_common::NO_OFFSET {
        return Some(own);
    }
    // A code object is a variable-size object of `ob_size` code units.
    let units = mem.i64(f.code.checked_add(o.tuple_size as u64)?).ok()?.clamp(0, MAX_CODE_UNITS);
    let copies = mem.ptr(f.code, o.code_tlbc).ok()?;
    let count = mem.i64(copies).ok()?.clamp(0, MAX_BYTECODE_COPIES);
    let entries = mem.bytes(copies.checked_add(8)?, count as usize * 8).ok()?;
    let holds = |start: u64| (start..start.saturating_add(units as u64 * 2)).contains(&f.instr);
    // The first copy is the code object's own; an instruction in none of
    // them has no line to give.
    entries.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap())).find(|&c| c != 0 && holds(c))
}

/// Where the target's own package lives: its top-level package's
/// directory, or its module's file for a top-level module.
#[derive(Debug, PartialEq, Eq)]
enum Package {
    Dir(String),
    File(String),
}

fn package_of(module: &str, filename: &str) -> Option<Package> {
    let top = module.split('.').next()?;
    let dir = format!("/{top}/");
    if let Some(at) = filename.rfind(&dir) {
        return Some(Package::Dir(filename[..at + dir.len()].to_owned()));
    }
    filename.ends_with(&format!("/{top}.py")).then(|| Package::File(filename.to_owned()))
}

/// Whether a frame of `path` is user code: not the target's own package,
/// nor an installed package, nor the standard library (frozen modules
/// included), nor one of the interpreter's own entry frames (3.12 pushes
/// a shim code object where C calls Python). Code given to `exec` or `-c`
/// (`<string>`) is the user's.
fn user_code(path: &str, package: Option<&Package>) -> bool {
    let own = match package {
        Some(Package::Dir(d)) => path.starts_with(d.as_str()),
        Some(Package::File(f)) => path == f,
        None => false,
    };
    !own && !path.starts_with("<frozen ")
        && !SHIMS.contains(&path)
        && !path.contains("/site-packages/")
        && !path.contains("/dist-packages/")
        && !standard_library(path)
}

/// `.../lib/python3.N/...` outside `site-packages`: the standard library.
fn standard_library(path: &str) -> bool {
    path.match_indices("/python3.").any(|(at, _)| {
        let before = &path[..at];
        let after = &path[at + "/python3.".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        (before.ends_with("/lib") || before.ends_with("/lib64")) && digits > 0 && after[digits..].starts_with('/')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_is_what_is_neither_library_nor_the_target_s_package() {
        let six = package_of("six", "/v/lib/python3.12/site-packages/six.py");
        assert_eq!(six, Some(Package::File("/v/lib/python3.12/site-packages/six.py".into())));
        let demo = package_of("editable_demo.sub", "/src/editable_demo/sub.py");
        assert_eq!(demo, Some(Package::Dir("/src/editable_demo/".into())));
        assert!(user_code("/app/views.py", six.as_ref()));
        assert!(!user_code("/src/editable_demo/api.py", demo.as_ref()), "the target's own package");
        assert!(user_code("/src/editable_demo_app.py", demo.as_ref()));
        assert!(!user_code("/usr/lib/python3.11/json/__init__.py", None));
        assert!(!user_code("/root/.pyenv/versions/3.8.18/lib/python3.8/json/decoder.py", None));
        assert!(!user_code("/v/lib/python3.12/site-packages/requests/api.py", None));
        assert!(!user_code("/usr/lib/python3/dist-packages/yaml/__init__.py", None));
        assert!(!user_code("<frozen runpy>", None));
        assert!(user_code("<string>", None), "python -c");
        assert!(!user_code("<shim>", None));
        assert!(user_code("/srv/lib/python3.x/app.py", None));
        assert!(user_code("/home/me/python3.12/app.py", None));
    }
}
