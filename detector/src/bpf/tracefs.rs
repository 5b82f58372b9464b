//! tracefs: where tracepoints are named and their record layouts described.
//! The agent mounts it if the system has not (a container given only
//! CAP_SYS_ADMIN and /sys may need it).

use std::{io, path::Path};

/// Where tracefs lives (and is mounted if missing).
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The old debugfs location.
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// The tracefs root, mounting it at [`TRACEFS`] if neither location has it.
pub fn root() -> io::Result<&'static str> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(root).join("events").is_dir() {
            return Ok(root);
        }
    }
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, dst, fs) = (c("nodev"), c(TRACEFS), c("tracefs"));
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("tracefs is not mounted and mounting it at {TRACEFS} failed: {e}"),
        ));
    }
    tracing::info!(path = TRACEFS, "mounted tracefs");
    Ok(TRACEFS)
}

/// Offset of `field` in the records of tracepoint `category/name`.
pub fn field_offset(root: &str, category: &str, name: &str, field: &str) -> io::Result<u32> {
    let path = Path::new(root).join("events").join(category).join(name).join("format");
    let format = std::fs::read_to_string(&path)?;
    parse_offset(&format, field).ok_or_else(|| io::Error::other(format!("{}: no field {field}", path.display())))
}

fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let decl = l.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?;
        (name == field).then(|| {
            let at = l.find("offset:")? + "offset:".len();
            l[at..].split(';').next()?.trim().parse().ok()
        })?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_from_formats_old_and_new() {
        let new = "\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_offset(new, "child_pid"), Some(20));
        assert_eq!(parse_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_offset(old, "child"), None);
    }
}
