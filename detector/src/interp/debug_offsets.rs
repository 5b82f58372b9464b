//! `_Py_DebugOffsets`: the offsets table CPython 3.13+ keeps at the start of
//! `_PyRuntime` for out-of-process tools. It is authoritative for its build.
//!
//! Its own layout changes between minor releases (3.14 added interpreter,
//! frame and code members; 3.15 grew the thread state and moved every group
//! after it), and has changed between pre-releases of one minor. So each
//! minor's layout is transcribed group by group from CPython's
//! `pycore_debug_offsets.h`, positions follow from it, and a table is used
//! only if it is consistent with itself: every group's `size` member (the C
//! struct's `sizeof`) must exceed every offset read from that group. A table
//! laid out otherwise than its minor's transcription fails that check and is
//! refused rather than misread.

use detector_common::NO_OFFSET;

use super::offsets::{Disagreement, OffsetSource, OffsetTable};

/// `_Py_Debug_Cookie`.
pub const COOKIE: &[u8; 8] = b"xdebugpy";

/// Bytes to read from the start of `_PyRuntime` to cover every entry used
/// (3.15's `unicode_object` group ends at 744).
pub const READ_LEN: usize = 752;

/// The members before the first group: cookie, version, free-threaded flag.
const HEADER_LEN: usize = 24;

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
    if bytes.len() < HEADER_LEN || &bytes[..8] != COOKIE {
        return None;
    }
    Some(Header { version: u64_at(bytes, 8)? as u32, free_threaded: u64_at(bytes, 16)? != 0 })
}

/// A group of `_Py_DebugOffsets`: a nested struct of `uint64_t` members.
type Group = (&'static str, &'static [&'static str]);

const RUNTIME: Group = ("runtime_state", &["size", "finalizing", "interpreters_head"]);
const INTERP_313: Group = (
    "interpreter_state",
    &[
        "size",
        "id",
        "next",
        "threads_head",
        "gc",
        "imports_modules",
        "sysdict",
        "builtins",
        "ceval_gil",
        "gil_runtime_state",
        "gil_runtime_state_enabled",
        "gil_runtime_state_locked",
        "gil_runtime_state_holder",
    ],
);
const INTERP_314: Group = (
    "interpreter_state",
    &[
        "size",
        "id",
        "next",
        "threads_head",
        "threads_main",
        "gc",
        "imports_modules",
        "sysdict",
        "builtins",
        "ceval_gil",
        "gil_runtime_state",
        "gil_runtime_state_enabled",
        "gil_runtime_state_locked",
        "gil_runtime_state_holder",
        "code_object_generation",
        "tlbc_generation",
    ],
);
const TSTATE_313: Group = (
    "thread_state",
    &["size", "prev", "next", "interp", "current_frame", "thread_id", "native_thread_id", "datastack_chunk", "status"],
);
const TSTATE_315: Group = (
    "thread_state",
    &[
        "size",
        "prev",
        "next",
        "interp",
        "current_frame",
        "base_frame",
        "last_profiled_frame",
        "last_profiled_frame_seq",
        "thread_id",
        "native_thread_id",
        "datastack_chunk",
        "status",
        "holds_gil",
        "gil_requested",
        "current_exception",
        "exc_state",
    ],
);
const ERR_STACKITEM: Group = ("err_stackitem", &["exc_value"]);
const FRAME_314: Group = (
    "interpreter_frame",
    &["size", "previous", "executable", "instr_ptr", "localsplus", "owner", "stackpointer", "tlbc_index"],
);
/// 3.14 appended `stackpointer` and `tlbc_index`.
const FRAME_313: Group = (FRAME_314.0, FRAME_314.1.split_at(6).0);
const CODE_314: Group = (
    "code_object",
    &[
        "size",
        "filename",
        "name",
        "qualname",
        "linetable",
        "firstlineno",
        "argcount",
        "localsplusnames",
        "localspluskinds",
        "co_code_adaptive",
        "co_tlbc",
    ],
);
/// 3.14 appended `co_tlbc`.
const CODE_313: Group = (CODE_314.0, CODE_314.1.split_at(10).0);
const PYOBJECT: Group = ("pyobject", &["size", "ob_type"]);
const TYPE_315: Group = ("type_object", &["size", "tp_name", "tp_repr", "tp_flags", "tp_basicsize", "tp_dictoffset"]);
/// 3.15 appended `tp_basicsize` and `tp_dictoffset`.
const TYPE_313: Group = (TYPE_315.0, TYPE_315.1.split_at(4).0);
const HEAP_TYPE: Group = ("heap_type_object", &["size", "ht_cached_keys"]);
const TUPLE: Group = ("tuple_object", &["size", "ob_item", "ob_size"]);
const LIST: Group = ("list_object", &["size", "ob_item", "ob_size"]);
const SET: Group = ("set_object", &["size", "used", "table", "mask"]);
const DICT: Group = ("dict_object", &["size", "ma_keys", "ma_values"]);
const FLOAT: Group = ("float_object", &["size", "ob_fval"]);
const LONG: Group = ("long_object", &["size", "lv_tag", "ob_digit"]);
const BYTES: Group = ("bytes_object", &["size", "ob_size", "ob_sval"]);
const UNICODE: Group = ("unicode_object", &["size", "state", "length", "asciiobject_size"]);

/// Each minor's groups, up to the last one used, in declaration order.
fn layout(minor: u8) -> Option<&'static [Group]> {
    const V313: &[Group] = &[
        RUNTIME, INTERP_313, TSTATE_313, FRAME_313, CODE_313, PYOBJECT, TYPE_313, TUPLE, LIST, DICT, FLOAT, LONG,
        BYTES, UNICODE,
    ];
    const V314: &[Group] = &[
        RUNTIME, INTERP_314, TSTATE_313, FRAME_314, CODE_314, PYOBJECT, TYPE_313, TUPLE, LIST, SET, DICT, FLOAT, LONG,
        BYTES, UNICODE,
    ];
    const V315: &[Group] = &[
        RUNTIME,
        INTERP_314,
        TSTATE_315,
        ERR_STACKITEM,
        FRAME_314,
        CODE_314,
        PYOBJECT,
        TYPE_315,
        HEAP_TYPE,
        TUPLE,
        LIST,
        SET,
        DICT,
        FLOAT,
        LONG,
        BYTES,
        UNICODE,
    ];
    match minor {
        13 => Some(V313),
        14 => Some(V314),
        15 => Some(V315),
        _ => None,
    }
}

/// Our field for each member used, by `group.member`.
const USED: &[(&str, &str)] = &[
    ("runtime_interpreters_head", "runtime_state.interpreters_head"),
    ("interp_next", "interpreter_state.next"),
    ("interp_threads_head", "interpreter_state.threads_head"),
    ("interp_modules", "interpreter_state.imports_modules"),
    ("tstate_next", "thread_state.next"),
    ("tstate_interp", "thread_state.interp"),
    ("current_frame", "thread_state.current_frame"),
    ("tstate_native_thread_id", "thread_state.native_thread_id"),
    ("frame_previous", "interpreter_frame.previous"),
    ("frame_code", "interpreter_frame.executable"),
    ("frame_instr", "interpreter_frame.instr_ptr"),
    ("frame_tlbc_index", "interpreter_frame.tlbc_index"),
    ("code_filename", "code_object.filename"),
    ("code_name", "code_object.name"),
    ("code_qualname", "code_object.qualname"),
    ("code_linetable", "code_object.linetable"),
    ("code_firstlineno", "code_object.firstlineno"),
    ("code_adaptive", "code_object.co_code_adaptive"),
    ("code_tlbc", "code_object.co_tlbc"),
    ("object_type", "pyobject.ob_type"),
    ("type_name", "type_object.tp_name"),
    ("type_flags", "type_object.tp_flags"),
    ("type_basicsize", "type_object.tp_basicsize"),
    ("type_dictoffset", "type_object.tp_dictoffset"),
    ("tuple_items", "tuple_object.ob_item"),
    ("tuple_size", "tuple_object.ob_size"),
    ("dict_keys", "dict_object.ma_keys"),
    ("dict_values", "dict_object.ma_values"),
    ("unicode_state", "unicode_object.state"),
    ("unicode_length", "unicode_object.length"),
    ("unicode_ascii_data", "unicode_object.asciiobject_size"),
];

/// A member's position in the table: its group's and its own index.
fn position(groups: &[Group], group: &str, member: &str) -> Option<(usize, Option<usize>)> {
    let mut at = HEADER_LEN;
    for (name, members) in groups {
        if *name == group {
            let size = (members.first() == Some(&"size")).then_some(at);
            return Some((at + 8 * members.iter().position(|m| *m == member)?, size));
        }
        at += 8 * members.len();
    }
    None
}

/// Why a table cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum LayoutError {
    /// No transcription for this minor version.
    #[error("no known layout of _Py_DebugOffsets for 3.{0}")]
    UnknownMinor(u8),
    /// The table is shorter than its layout.
    #[error("_Py_DebugOffsets is cut short before {0}")]
    Short(&'static str),
    /// A member is not inside its struct: the table is laid out otherwise.
    #[error(
        "_Py_DebugOffsets is not laid out as 3.{minor}'s: {member} = {value} is not below its struct's size {size}"
    )]
    Inconsistent {
        /// Minor version.
        minor: u8,
        /// `group.member`.
        member: &'static str,
        /// Its value.
        value: u64,
        /// The group's `size`.
        size: u64,
    },
}

/// Applies every entry of `bytes` (the start of `_PyRuntime`) for `minor` to
/// `table`, after checking the whole table against its layout. Returns the
/// disagreements with less trusted sources.
pub(crate) fn apply(bytes: &[u8], minor: u8, table: &mut OffsetTable) -> Result<Vec<Disagreement>, LayoutError> {
    let groups = layout(minor).ok_or(LayoutError::UnknownMinor(minor))?;
    let mut values = Vec::new();
    for &(field, member) in USED {
        let (group, name) = member.split_once('.').expect("group.member");
        let Some((pos, size_at)) = position(groups, group, name) else {
            continue; // not in this minor (tp_basicsize before 3.15)
        };
        let value = u64_at(bytes, pos).ok_or(LayoutError::Short(member))?;
        if let Some(s) = size_at {
            let size = u64_at(bytes, s).ok_or(LayoutError::Short(member))?;
            if value >= size {
                return Err(LayoutError::Inconsistent { minor, member, value, size });
            }
        }
        values.push((field, value));
    }
    let mut disagreements = Vec::new();
    for (field, value) in values {
        // The built-in table says which fields the build has: a release
        // build's table gives 0 for the free-threaded `tlbc_index`.
        if table.values.get(field) == Some(NO_OFFSET) {
            continue;
        }
        if let Ok(v) = u16::try_from(value) {
            disagreements.extend(table.apply(field, v, OffsetSource::DebugOffsets));
        }
    }
    Ok(disagreements)
}

/// `sizeof(PyInterpreterState)` as the table of a 3.`minor` build gives it.
pub(crate) fn interp_size(bytes: &[u8], minor: u8) -> Option<u64> {
    let (at, _) = position(layout(minor)?, "interpreter_state", "size")?;
    u64_at(bytes, at)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{
        offsets::{Offsets, builtin},
        version::Flavour,
    };

    /// A table for `minor` holding `values`, with every group's size 16384.
    fn table_bytes(minor: u8, values: &Offsets) -> Vec<u8> {
        let groups = layout(minor).unwrap();
        let mut b = vec![0u8; READ_LEN];
        b[..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&(0x030000f0u64 | (minor as u64) << 16).to_le_bytes());
        for (group, _) in groups {
            if let Some((at, _)) = position(groups, group, "size") {
                b[at..at + 8].copy_from_slice(&16384u64.to_le_bytes());
            }
        }
        for &(f, member) in USED {
            let (group, name) = member.split_once('.').unwrap();
            if let Some((pos, _)) = position(groups, group, name) {
                // CPython writes 0 for a member its build lacks.
                let v = values.get(f).filter(|v| *v != NO_OFFSET).unwrap_or(0);
                b[pos..pos + 8].copy_from_slice(&(v as u64).to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn positions_are_those_of_the_c_headers() {
        let at = |minor, member: &str| {
            let (g, m) = member.split_once('.').unwrap();
            position(layout(minor).unwrap(), g, m).unwrap().0
        };
        // From `offsetof` in each minor's pycore_debug_offsets.h.
        assert_eq!(at(13, "thread_state.native_thread_id"), 200);
        assert_eq!(at(13, "unicode_object.asciiobject_size"), 560);
        assert_eq!(at(14, "thread_state.native_thread_id"), 224);
        assert_eq!(at(14, "unicode_object.asciiobject_size"), 640);
        assert_eq!(at(15, "interpreter_frame.previous"), 320);
        assert_eq!(at(15, "code_object.co_code_adaptive"), 448);
        assert_eq!(at(15, "type_object.tp_dictoffset"), 520);
        assert_eq!(at(15, "unicode_object.asciiobject_size"), 736);
        assert!(at(15, "unicode_object.asciiobject_size") + 8 <= READ_LEN);
    }

    #[test]
    fn every_member_used_is_in_each_layout() {
        for minor in [13, 14, 15] {
            for &(field, member) in USED {
                let (group, name) = member.split_once('.').unwrap();
                let found = position(layout(minor).unwrap(), group, name);
                let since = match field {
                    "type_basicsize" | "type_dictoffset" => 15,
                    "frame_tlbc_index" | "code_tlbc" => 14,
                    _ => 13,
                };
                assert_eq!(found.is_some(), minor >= since, "3.{minor} {member}");
                if let Some((_, size)) = found {
                    assert!(size.is_some(), "3.{minor} {group} has a size");
                }
            }
        }
    }

    #[test]
    fn reads_header_and_agrees_with_builtin_tables() {
        for minor in [13, 14, 15] {
            let builtin = builtin(minor, Flavour::Release).unwrap();
            let bytes = table_bytes(minor, &builtin);
            assert_eq!(header(&bytes).unwrap().version >> 16, 0x0300 | minor as u32);
            let mut t = OffsetTable::from(builtin, OffsetSource::Builtin);
            assert_eq!(apply(&bytes, minor, &mut t).unwrap(), vec![]);
            assert_eq!(t.sources["code_qualname"], OffsetSource::DebugOffsets);
        }
        assert!(header(b"not a cookie at all, no no no").is_none());
        assert_eq!(
            apply(&[], 16, &mut OffsetTable::from(builtin(15, Flavour::Release).unwrap(), OffsetSource::Builtin)),
            Err(LayoutError::UnknownMinor(16))
        );
    }

    #[test]
    fn a_table_laid_out_as_another_minor_is_refused() {
        // 3.14's table read as 3.15's: the thread state grew, so members
        // after it are read from the wrong places.
        let bytes = table_bytes(14, &builtin(14, Flavour::Release).unwrap());
        let mut t = OffsetTable::from(builtin(15, Flavour::Release).unwrap(), OffsetSource::Builtin);
        let err = apply(&bytes, 15, &mut t).unwrap_err();
        assert!(matches!(err, LayoutError::Inconsistent { minor: 15, .. }), "{err}");
        assert_eq!(t.sources["code_qualname"], OffsetSource::Builtin, "nothing applied");
    }
}
