//! `_Py_DebugOffsets`: the offsets table CPython 3.13+ keeps at the start of
//! `_PyRuntime` for out-of-process tools. It is authoritative for its build.
//!
//! Its own layout grew between releases (3.14 added interpreter, frame, code
//! and set fields), so the position of each entry is known per minor version;
//! the header (cookie, version, free-threaded flag) is stable.

use super::offsets::{Disagreement, OffsetSource, OffsetTable};

/// `_Py_Debug_Cookie`.
pub const COOKIE: &[u8; 8] = b"xdebugpy";

/// Bytes to read from the start of `_PyRuntime` to cover every entry used.
pub const READ_LEN: usize = 656;

/// The header of `_Py_DebugOffsets`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `PY_VERSION_HEX`.
    pub version: u32,
    /// Built with `--disable-gil`.
    pub free_threaded: bool,
}

/// Parses the header, or `None` if `bytes` does not start with the cookie.
pub fn header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < 24 || &bytes[..8] != COOKIE {
        return None;
    }
    Some(Header { version: u64_at(bytes, 8)? as u32, free_threaded: u64_at(bytes, 16)? != 0 })
}

/// Position of each entry we use inside `_Py_DebugOffsets`, per minor version.
fn positions(minor: u8) -> Option<&'static [(&'static str, usize)]> {
    const V313: &[(&str, usize)] = &[
        ("runtime_interpreters_head", 40),
        ("interp_next", 64),
        ("interp_threads_head", 72),
        ("interp_modules", 88),
        ("tstate_next", 168),
        ("tstate_interp", 176),
        ("current_frame", 184),
        ("tstate_native_thread_id", 200),
        ("frame_previous", 232),
        ("frame_code", 240),
        ("frame_instr", 248),
        ("code_filename", 280),
        ("code_name", 288),
        ("code_qualname", 296),
        ("code_linetable", 304),
        ("code_firstlineno", 312),
        ("code_adaptive", 344),
        ("object_type", 360),
        ("type_name", 376),
        ("type_flags", 392),
        ("tuple_items", 408),
        ("tuple_size", 416),
        ("dict_keys", 456),
        ("dict_values", 464),
        ("unicode_state", 544),
        ("unicode_length", 552),
        ("unicode_ascii_data", 560),
    ];
    const V314: &[(&str, usize)] = &[
        ("runtime_interpreters_head", 40),
        ("interp_next", 64),
        ("interp_threads_head", 72),
        ("interp_modules", 96),
        ("tstate_next", 192),
        ("tstate_interp", 200),
        ("current_frame", 208),
        ("tstate_native_thread_id", 224),
        ("frame_previous", 256),
        ("frame_code", 264),
        ("frame_instr", 272),
        ("code_filename", 320),
        ("code_name", 328),
        ("code_qualname", 336),
        ("code_linetable", 344),
        ("code_firstlineno", 352),
        ("code_adaptive", 384),
        ("object_type", 408),
        ("type_name", 424),
        ("type_flags", 440),
        ("tuple_items", 456),
        ("tuple_size", 464),
        ("dict_keys", 536),
        ("dict_values", 544),
        ("unicode_state", 624),
        ("unicode_length", 632),
        ("unicode_ascii_data", 640),
    ];
    match minor {
        13 => Some(V313),
        14 => Some(V314),
        _ => None,
    }
}

/// Applies every entry of `bytes` (the start of `_PyRuntime`) for `minor` to
/// `table`. Returns the disagreements with less trusted sources, or `None` if
/// this minor version's layout of the table is unknown.
pub fn apply(bytes: &[u8], minor: u8, table: &mut OffsetTable) -> Option<Vec<Disagreement>> {
    let mut disagreements = Vec::new();
    for &(field, pos) in positions(minor)? {
        let v = u64_at(bytes, pos)?;
        let Ok(v) = u16::try_from(v) else { continue };
        disagreements.extend(table.apply(field, v, OffsetSource::DebugOffsets));
    }
    Some(disagreements)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::offsets::builtin;

    fn table_bytes(entries: &[(&str, usize)], values: &crate::interp::offsets::Offsets) -> Vec<u8> {
        let mut b = vec![0u8; READ_LEN];
        b[..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&0x030d00f0u64.to_le_bytes());
        for &(f, pos) in entries {
            b[pos..pos + 8].copy_from_slice(&(values.get(f).unwrap() as u64).to_le_bytes());
        }
        b
    }

    #[test]
    fn reads_header_and_agrees_with_builtin_tables() {
        for minor in [13, 14] {
            let builtin = builtin(minor).unwrap();
            let bytes = table_bytes(positions(minor).unwrap(), &builtin);
            assert_eq!(header(&bytes).unwrap().version, 0x030d00f0);
            let mut t = OffsetTable::from(builtin, OffsetSource::Builtin);
            assert_eq!(apply(&bytes, minor, &mut t).unwrap(), vec![]);
            assert_eq!(t.sources["code_qualname"], OffsetSource::DebugOffsets);
        }
        assert!(header(b"not a cookie at all, no no no").is_none());
    }
}
