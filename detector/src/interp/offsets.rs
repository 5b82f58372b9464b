//! Struct offsets: the built-in tables per minor version (the fallback), and
//! the record of where each value finally came from.

use std::collections::BTreeMap;

use detector_common::NO_OFFSET;

/// Where an offset's value came from, most trusted first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetSource {
    /// `_Py_DebugOffsets` in the live process or the binary (3.13+).
    DebugOffsets,
    /// DWARF in the binary or its separate debug file.
    Dwarf,
    /// The built-in table for this minor version.
    Builtin,
}

macro_rules! offsets {
    ($($(#[doc = $doc:literal])* $field:ident),* $(,)?) => {
        /// Byte offsets of every field the detector reads. [`NO_OFFSET`]
        /// marks a field this version does not have.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct Offsets { $($(#[doc = $doc])* pub $field: u16,)* }

        impl Offsets {
            /// Every field name, in declaration order.
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// All fields absent.
            pub const NONE: Offsets = Offsets { $($field: NO_OFFSET,)* };

            /// A field by name.
            pub fn get(&self, name: &str) -> Option<u16> {
                match name { $(stringify!($field) => Some(self.$field),)* _ => None }
            }

            /// Sets a field by name; false if there is no such field.
            pub fn set(&mut self, name: &str, value: u16) -> bool {
                match name { $(stringify!($field) => { self.$field = value; true })* _ => false }
            }
        }
    };
}

offsets! {
    /// `_PyRuntimeState.interpreters.head`.
    runtime_interpreters_head,
    /// `PyInterpreterState.next`.
    interp_next,
    /// `PyInterpreterState.tstate_head` / `threads.head`.
    interp_threads_head,
    /// `PyInterpreterState.monitoring_version` (3.12).
    interp_monitoring_version,
    /// `PyInterpreterState.modules` / `imports.modules`: `sys.modules`.
    interp_modules,
    /// `PyThreadState.next`.
    tstate_next,
    /// `PyThreadState.interp`.
    tstate_interp,
    /// `PyThreadState.native_thread_id` (3.11+).
    tstate_native_thread_id,
    /// `_PyRuntimeState.gilstate.tstate_current` (3.8-3.11): the thread
    /// holding the GIL, which is the one running bytecode.
    runtime_tstate_current,
    /// `PyThreadState.frame` (3.8-3.10): the frame running.
    tstate_frame,
    /// `PyThreadState.cframe` (3.11, 3.12).
    tstate_cframe,
    /// `_PyCFrame.current_frame` (3.11, 3.12) or `PyThreadState.current_frame` (3.13+).
    current_frame,
    /// `PyThreadState.eval_breaker` (3.13+).
    tstate_eval_breaker,
    /// `PyThreadState.tracing`.
    tstate_tracing,
    /// Frame's code object.
    frame_code,
    /// Frame's function (3.11+).
    frame_func,
    /// Frame's instruction pointer (3.11+).
    frame_instr,
    /// Which thread's copy of the bytecode the frame runs (free-threaded).
    frame_tlbc_index,
    /// `_PyThreadStateImpl.tlbc_index`: the thread's copy (free-threaded).
    tstate_tlbc_index,
    /// `PyFrameObject.f_lasti` (3.8-3.10).
    frame_lasti,
    /// Frame's globals.
    frame_globals,
    /// The calling frame: `previous` (3.11+), `f_back` (3.8-3.10).
    frame_previous,
    /// `co_flags`.
    code_flags,
    /// `co_firstlineno`.
    code_firstlineno,
    /// `co_consts`.
    code_consts,
    /// `co_filename`.
    code_filename,
    /// `co_linetable` (3.10+) or `co_lnotab` (3.8, 3.9): instruction
    /// offsets to lines.
    code_linetable,
    /// `co_name`.
    code_name,
    /// `co_qualname` (3.11+).
    code_qualname,
    /// `_co_instrumentation_version` (3.12+).
    code_instr_version,
    /// `co_opcache_flag` (3.8-3.10) or `co_warmup` (3.11): counts the body's
    /// first runs.
    code_warmup,
    /// `co_code_adaptive`: the bytecode, inline in the code object (3.11+).
    code_adaptive,
    /// `co_tlbc`: each thread's copy of the bytecode (free-threaded).
    code_tlbc,
    /// `co_code`: the bytecode, a `bytes` object (3.8-3.10).
    code_code,
    /// `PyBytesObject.ob_sval`.
    bytes_sval,
    /// `func_code`.
    func_code,
    /// `func_globals`.
    func_globals,
    /// `func_closure`.
    func_closure,
    /// `func_dict`.
    func_dict,
    /// `func_module`.
    func_module,
    /// `func_qualname`.
    func_qualname,
    /// `PyASCIIObject.state`.
    unicode_state,
    /// `PyASCIIObject.length`.
    unicode_length,
    /// `sizeof(PyASCIIObject)`.
    unicode_ascii_data,
    /// `sizeof(PyCompactUnicodeObject)`.
    unicode_compact_data,
    /// `PyObject.ob_type`.
    object_type,
    /// `PyTypeObject.tp_name`.
    type_name,
    /// `PyTypeObject.tp_flags`.
    type_flags,
    /// `PyTypeObject.tp_basicsize`.
    type_basicsize,
    /// `PyTypeObject.tp_dictoffset`.
    type_dictoffset,
    /// `PyTypeObject.tp_dict`.
    type_dict,
    /// `PyVarObject.ob_size` of a tuple.
    tuple_size,
    /// `PyTupleObject.ob_item`.
    tuple_items,
    /// `PyDictObject.ma_keys`.
    dict_keys,
    /// `PyDictObject.ma_values`.
    dict_values,
    /// `PyDictObject.ma_used`: how many items.
    dict_used,
    /// `PyDictKeysObject.dk_size` (3.8-3.10).
    dictkeys_size,
    /// `PyDictKeysObject.dk_indices` (3.8-3.10).
    dictkeys_indices,
    /// `PyModuleObject.md_dict`.
    module_dict,
    /// `PyCellObject.ob_ref`.
    cell_ref,
    /// `staticmethod`/`classmethod` wrapped callable.
    method_wrapper_callable,
}

/// An offset table with the source of every value.
#[derive(Clone, Debug)]
pub struct OffsetTable {
    /// The values.
    pub values: Offsets,
    /// Source of each present value, by field name.
    pub sources: BTreeMap<&'static str, OffsetSource>,
}

/// A value that a more trusted source changed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Disagreement {
    /// Field name.
    pub field: &'static str,
    /// Value kept.
    pub kept: u16,
    /// Source of the kept value.
    pub kept_from: OffsetSource,
    /// Value overridden.
    pub other: u16,
    /// Source of the overridden value.
    pub other_from: OffsetSource,
}

impl OffsetTable {
    /// A table whose every present value comes from `source`.
    pub fn from(values: Offsets, source: OffsetSource) -> Self {
        let sources =
            Offsets::FIELDS.iter().filter(|f| values.get(f) != Some(NO_OFFSET)).map(|f| (*f, source)).collect();
        OffsetTable { values, sources }
    }

    /// Applies a value from `source`: it wins if `source` is more trusted
    /// than the current one. Returns the disagreement if the values differ.
    pub fn apply(&mut self, field: &'static str, value: u16, source: OffsetSource) -> Option<Disagreement> {
        let current = self.values.get(field)?;
        let current_src = self.sources.get(field).copied();
        let wins = current_src.is_none_or(|c| source <= c);
        let disagreement = match current_src {
            Some(cs) if current != value && current != NO_OFFSET => Some(if wins {
                Disagreement { field, kept: value, kept_from: source, other: current, other_from: cs }
            } else {
                Disagreement { field, kept: current, kept_from: cs, other: value, other_from: source }
            }),
            _ => None,
        };
        if wins {
            self.values.set(field, value);
            self.sources.insert(field, source);
        }
        disagreement
    }
}

/// Where each offset lives in CPython's structs, as DWARF names them: the
/// first alternative that resolves wins (names moved between versions).
/// Sizes are written `sizeof(Type)`.
const DWARF_FIELDS: &[(&str, &[(&str, &str)])] = &[
    ("runtime_interpreters_head", &[("_PyRuntimeState", "interpreters.head")]),
    ("interp_next", &[("PyInterpreterState", "next")]),
    ("interp_threads_head", &[("PyInterpreterState", "threads.head"), ("PyInterpreterState", "tstate_head")]),
    ("interp_monitoring_version", &[("PyInterpreterState", "monitoring_version")]),
    ("interp_modules", &[("PyInterpreterState", "imports.modules"), ("PyInterpreterState", "modules")]),
    ("tstate_next", &[("PyThreadState", "next")]),
    ("tstate_interp", &[("PyThreadState", "interp")]),
    ("tstate_native_thread_id", &[("PyThreadState", "native_thread_id")]),
    ("runtime_tstate_current", &[("_PyRuntimeState", "gilstate.tstate_current")]),
    ("tstate_frame", &[("PyThreadState", "frame")]),
    ("tstate_cframe", &[("PyThreadState", "cframe")]),
    ("current_frame", &[("PyThreadState", "current_frame"), ("_PyCFrame", "current_frame")]),
    ("tstate_eval_breaker", &[("PyThreadState", "eval_breaker")]),
    ("tstate_tracing", &[("PyThreadState", "tracing")]),
    (
        "frame_code",
        &[("_PyInterpreterFrame", "f_executable"), ("_PyInterpreterFrame", "f_code"), ("PyFrameObject", "f_code")],
    ),
    ("frame_previous", &[("_PyInterpreterFrame", "previous"), ("PyFrameObject", "f_back")]),
    ("frame_func", &[("_PyInterpreterFrame", "f_funcobj"), ("_PyInterpreterFrame", "f_func")]),
    ("frame_instr", &[("_PyInterpreterFrame", "instr_ptr"), ("_PyInterpreterFrame", "prev_instr")]),
    ("frame_tlbc_index", &[("_PyInterpreterFrame", "tlbc_index")]),
    ("tstate_tlbc_index", &[("_PyThreadStateImpl", "tlbc_index")]),
    ("frame_lasti", &[("PyFrameObject", "f_lasti")]),
    ("frame_globals", &[("_PyInterpreterFrame", "f_globals"), ("PyFrameObject", "f_globals")]),
    ("code_flags", &[("PyCodeObject", "co_flags")]),
    ("code_firstlineno", &[("PyCodeObject", "co_firstlineno")]),
    ("code_consts", &[("PyCodeObject", "co_consts")]),
    ("code_filename", &[("PyCodeObject", "co_filename")]),
    ("code_linetable", &[("PyCodeObject", "co_linetable"), ("PyCodeObject", "co_lnotab")]),
    ("code_name", &[("PyCodeObject", "co_name")]),
    ("code_qualname", &[("PyCodeObject", "co_qualname")]),
    ("code_instr_version", &[("PyCodeObject", "_co_instrumentation_version")]),
    ("code_warmup", &[("PyCodeObject", "co_warmup"), ("PyCodeObject", "co_opcache_flag")]),
    ("code_adaptive", &[("PyCodeObject", "co_code_adaptive")]),
    ("code_code", &[("PyCodeObject", "co_code")]),
    ("code_tlbc", &[("PyCodeObject", "co_tlbc")]),
    ("bytes_sval", &[("PyBytesObject", "ob_sval")]),
    ("func_code", &[("PyFunctionObject", "func_code")]),
    ("func_globals", &[("PyFunctionObject", "func_globals")]),
    ("func_closure", &[("PyFunctionObject", "func_closure")]),
    ("func_dict", &[("PyFunctionObject", "func_dict")]),
    ("func_module", &[("PyFunctionObject", "func_module")]),
    ("func_qualname", &[("PyFunctionObject", "func_qualname")]),
    ("unicode_state", &[("PyASCIIObject", "state")]),
    ("unicode_length", &[("PyASCIIObject", "length")]),
    ("unicode_ascii_data", &[("sizeof", "PyASCIIObject")]),
    ("unicode_compact_data", &[("sizeof", "PyCompactUnicodeObject")]),
    ("object_type", &[("PyObject", "ob_type")]),
    ("type_name", &[("PyTypeObject", "tp_name")]),
    ("type_flags", &[("PyTypeObject", "tp_flags")]),
    ("type_basicsize", &[("PyTypeObject", "tp_basicsize")]),
    ("type_dictoffset", &[("PyTypeObject", "tp_dictoffset")]),
    ("type_dict", &[("PyTypeObject", "tp_dict")]),
    ("tuple_size", &[("PyTupleObject", "ob_base.ob_size")]),
    ("tuple_items", &[("PyTupleObject", "ob_item")]),
    ("dict_keys", &[("PyDictObject", "ma_keys")]),
    ("dict_values", &[("PyDictObject", "ma_values")]),
    ("dict_used", &[("PyDictObject", "ma_used")]),
    ("dictkeys_size", &[("PyDictKeysObject", "dk_size")]),
    ("dictkeys_indices", &[("PyDictKeysObject", "dk_indices")]),
    ("module_dict", &[("PyModuleObject", "md_dict")]),
    ("cell_ref", &[("PyCellObject", "ob_ref")]),
    ("method_wrapper_callable", &[("staticmethod", "sm_callable")]),
];

/// Every offset DWARF gives, by field name.
pub fn from_dwarf(info: &super::dwarf::DwarfInfo) -> Vec<(&'static str, u16)> {
    DWARF_FIELDS
        .iter()
        .filter_map(|(field, alternatives)| {
            alternatives.iter().find_map(|(ty, path)| {
                let v = if *ty == "sizeof" { info.size_of(path) } else { info.offset_of(ty, path) };
                v.and_then(|v| u16::try_from(v).ok()).map(|v| (*field, v))
            })
        })
        .collect()
}

mod builtin;
pub use builtin::builtin;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::version::Flavour;

    #[test]
    fn every_supported_minor_has_the_fields_its_family_needs() {
        for minor in 8..=15 {
            let o = builtin(minor, Flavour::Release).unwrap();
            for f in ["frame_code", "code_name", "code_flags", "func_module", "unicode_state"] {
                assert_ne!(o.get(f), Some(NO_OFFSET), "3.{minor} {f}");
            }
            let resume = minor >= 11;
            assert_eq!(o.code_qualname != NO_OFFSET, resume, "3.{minor}");
            assert_eq!(o.frame_lasti != NO_OFFSET, !resume, "3.{minor}");
        }
        assert!(builtin(7, Flavour::Release).is_none() && builtin(16, Flavour::Release).is_none());
    }

    #[test]
    fn free_threaded_tables_have_longer_headers_and_per_thread_bytecode() {
        for minor in [14, 15] {
            let (release, ft) =
                (builtin(minor, Flavour::Release).unwrap(), builtin(minor, Flavour::FreeThreaded).unwrap());
            assert_eq!((release.object_type, ft.object_type), (8, 24));
            assert_eq!(ft.code_name, release.code_name + 16);
            assert_eq!(release.tstate_tlbc_index, NO_OFFSET);
            assert_ne!(ft.tstate_tlbc_index, NO_OFFSET);
            assert_eq!(ft.current_frame, release.current_frame, "not an object");
        }
        assert!(builtin(13, Flavour::FreeThreaded).is_none());
    }

    #[test]
    fn every_field_has_a_dwarf_spelling() {
        for f in Offsets::FIELDS {
            assert!(DWARF_FIELDS.iter().any(|(n, _)| n == f), "{f} has no DWARF spelling");
        }
        for (n, _) in DWARF_FIELDS {
            assert!(Offsets::FIELDS.contains(n), "{n} is not a field");
        }
    }

    #[test]
    fn more_trusted_sources_win_and_disagreements_are_reported() {
        let mut t = OffsetTable::from(builtin(13, Flavour::Release).unwrap(), OffsetSource::Builtin);
        assert_eq!(t.apply("code_name", 120, OffsetSource::DebugOffsets), None);
        let d = t.apply("code_qualname", 136, OffsetSource::DebugOffsets).unwrap();
        assert_eq!((d.kept, d.other), (136, 128));
        assert_eq!(t.values.code_qualname, 136);
        // A less trusted source does not override.
        let d = t.apply("code_qualname", 128, OffsetSource::Builtin).unwrap();
        assert_eq!(d.kept, 136);
        assert_eq!(t.sources["code_qualname"], OffsetSource::DebugOffsets);
    }
}
