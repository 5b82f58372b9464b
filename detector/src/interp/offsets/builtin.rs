//! The built-in offset tables: the values of x86_64 builds per minor
//! version, used where neither `_Py_DebugOffsets` nor DWARF gives one.

use super::Offsets;
use crate::interp::version::Flavour;

/// The built-in table for a minor version and flavour (debug builds take
/// the release table, and are analysed only with DWARF).
pub fn builtin(minor: u8, flavour: Flavour) -> Option<Offsets> {
    let o = release(minor)?;
    match flavour {
        Flavour::FreeThreaded => free_threaded(minor, o),
        Flavour::Release | Flavour::Debug => Some(o),
    }
}

/// The table of x86_64 release builds.
fn release(minor: u8) -> Option<Offsets> {
    let mut o = common();
    match minor {
        8..=10 => {
            o.runtime_interpreters_head = 32;
            o.interp_modules = if minor == 8 { 56 } else { 856 };
            o.dictkeys_size = 8;
            o.dictkeys_indices = 40;
            o.interp_threads_head = 8;
            o.tstate_next = 8;
            o.tstate_interp = 16;
            o.frame_code = 32;
            o.frame_globals = 48;
            o.frame_lasti = if minor == 10 { 96 } else { 104 };
            o.frame_previous = 24;
            o.tstate_frame = 24;
            o.runtime_tstate_current = if minor == 8 { 1368 } else { 568 };
            o.code_linetable = 120;
            o.code_flags = 36;
            o.code_firstlineno = 40;
            o.code_code = 48;
            o.code_consts = 56;
            o.code_filename = 104;
            o.code_name = 112;
            o.code_warmup = 168;
            o.unicode_ascii_data = 48;
            o.unicode_compact_data = 72;
            if minor == 10 {
                set_function_310(&mut o);
            } else {
                o.func_code = 16;
                o.func_globals = 24;
                o.func_closure = 48;
                o.func_dict = 72;
                o.func_module = 88;
                o.func_qualname = 104;
            }
        }
        11 => {
            o.runtime_interpreters_head = 40;
            o.interp_modules = 888;
            o.interp_threads_head = 16;
            o.tstate_next = 8;
            o.tstate_interp = 16;
            o.tstate_tracing = 44;
            o.tstate_cframe = 56;
            o.current_frame = 8;
            o.tstate_native_thread_id = 160;
            o.frame_func = 0;
            o.frame_globals = 8;
            o.frame_code = 32;
            o.frame_instr = 56;
            o.frame_previous = 48;
            o.runtime_tstate_current = 576;
            set_code_311(&mut o, 72);
            o.code_warmup = 52;
            o.code_adaptive = 184;
            set_function_310(&mut o);
            o.unicode_ascii_data = 48;
            o.unicode_compact_data = 72;
        }
        12 => {
            o.runtime_interpreters_head = 40;
            o.interp_modules = 944;
            o.interp_threads_head = 72;
            o.interp_monitoring_version = 48;
            o.tstate_next = 8;
            o.tstate_interp = 16;
            o.tstate_tracing = 44;
            o.tstate_cframe = 56;
            o.current_frame = 0;
            o.tstate_native_thread_id = 144;
            set_frame_312(&mut o);
            set_code_311(&mut o, 68);
            o.code_instr_version = 160;
            o.code_adaptive = 192;
            set_function_310(&mut o);
        }
        13..=15 => {
            o.runtime_interpreters_head = match minor {
                13 => 632,
                14 => 808,
                _ => 936,
            };
            o.interp_next = if minor == 14 { 7272 } else { 7264 };
            o.interp_threads_head = if minor == 15 { 7336 } else { 7344 };
            o.interp_modules = match minor {
                13 => 7656,
                14 => 7688,
                _ => 7592,
            };
            o.tstate_next = 8;
            o.tstate_interp = 16;
            o.tstate_eval_breaker = 24;
            // 3.15 moved `holds_gil` and `gil_requested` into the thread state.
            o.tstate_tracing = if minor == 15 { 64 } else { 60 };
            o.current_frame = 72;
            o.tstate_native_thread_id = if minor == 15 { 184 } else { 160 };
            set_frame_312(&mut o);
            set_code_311(&mut o, 68);
            o.code_instr_version = 168;
            o.code_adaptive = if minor == 13 { 200 } else { 208 };
            set_function_310(&mut o);
            if minor >= 14 {
                o.tuple_items = 32; // 3.14 caches the hash in `ob_hash`
            }
        }
        _ => return None,
    }
    Some(o)
}

/// Fields that have not moved in 3.8-3.15.
fn common() -> Offsets {
    Offsets {
        interp_next: 0,
        unicode_state: 32,
        unicode_length: 16,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        object_type: 8,
        type_name: 24,
        type_flags: 168,
        type_basicsize: 32,
        type_dictoffset: 288,
        type_dict: 264,
        tuple_size: 16,
        tuple_items: 24,
        bytes_sval: 32,
        dict_keys: 32,
        dict_values: 40,
        dict_used: 16,
        cell_ref: 16,
        module_dict: 16,
        method_wrapper_callable: 16,
        ..Offsets::NONE
    }
}

fn set_function_310(o: &mut Offsets) {
    o.func_globals = 16;
    o.func_qualname = 40;
    o.func_code = 48;
    o.func_closure = 72;
    o.func_dict = 88;
    o.func_module = 104;
}

fn set_code_311(o: &mut Offsets, firstlineno: u16) {
    o.code_linetable = 136;
    o.code_consts = 24;
    o.code_flags = 48;
    o.code_firstlineno = firstlineno;
    o.code_filename = 112;
    o.code_name = 120;
    o.code_qualname = 128;
}

fn set_frame_312(o: &mut Offsets) {
    o.frame_code = 0;
    o.frame_previous = 8;
    o.frame_func = 16;
    o.frame_globals = 24;
    o.frame_instr = 56;
}

/// The table of `--disable-gil` builds (3.14+), from `o`, the release
/// build's: an object's header is 32 bytes, not 16 (an owning thread, flags,
/// a lock, GC bits, and a local and a shared reference count before
/// `ob_type`), and the runtime, interpreter and thread states carry
/// per-thread machinery.
fn free_threaded(minor: u8, mut o: Offsets) -> Option<Offsets> {
    if minor < 14 {
        return None;
    }
    const OBJECT_FIELDS: &[&str] = &[
        "code_flags",
        "code_firstlineno",
        "code_consts",
        "code_filename",
        "code_linetable",
        "code_name",
        "code_qualname",
        "code_instr_version",
        "code_adaptive",
        "bytes_sval",
        "func_code",
        "func_globals",
        "func_closure",
        "func_dict",
        "func_module",
        "func_qualname",
        "unicode_state",
        "unicode_length",
        "unicode_ascii_data",
        "unicode_compact_data",
        "object_type",
        "type_name",
        "type_flags",
        "type_basicsize",
        "type_dictoffset",
        "type_dict",
        "tuple_size",
        "tuple_items",
        "dict_keys",
        "dict_values",
        "dict_used",
        "module_dict",
        "cell_ref",
        "method_wrapper_callable",
    ];
    for f in OBJECT_FIELDS {
        let v = o.get(f)?;
        o.set(f, v + 16);
    }
    // `co_tlbc`, the per-thread copies, comes before the bytecode.
    o.code_tlbc = o.code_adaptive;
    o.code_adaptive += 8;
    o.frame_tlbc_index = 72;
    match minor {
        14 => {
            o.interp_modules = 7712;
            o.tstate_tlbc_index = 15520;
        }
        15 => o.tstate_tlbc_index = 15720,
        _ => return None,
    }
    Some(o)
}
