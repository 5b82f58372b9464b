//! The interpreter layout: every offset the eBPF programs need to walk from a
//! thread state or frame to a code object's names, for one interpreter build.

/// An offset that does not exist in this build.
pub const NO_OFFSET: u16 = u16::MAX;

/// 3.8-3.10: `_PyEval_EvalFrameDefault` receives the frame; its entry is the
/// per-call site.
pub const FAMILY_FRAME_ARG: u8 = 1;
/// 3.11+: calls are inlined; the per-call sites are the RESUME handlers and the
/// frame is read through the thread state.
pub const FAMILY_RESUME: u8 = 2;

/// `f_executable`/`f_funcobj` are `_PyStackRef`s whose low bits are tags (3.14+).
pub const LAYOUT_STACKREFS: u16 = 1 << 0;
/// The instrumentation version lives in `tstate->eval_breaker` with the low
/// eight bits used for events (3.13+), rather than in the interpreter (3.12).
pub const LAYOUT_VERSION_IN_EVAL_BREAKER: u16 = 1 << 1;
/// Re-instrumentation only happens when `tstate->tracing == 0` (3.13+).
pub const LAYOUT_TRACING_GATES_INSTRUMENT: u16 = 1 << 2;

/// `CO_OPTIMIZED`: set on function bodies, clear on module and class bodies.
pub const CO_OPTIMIZED: u32 = 0x1;

/// Offsets (bytes) for one interpreter build. [`NO_OFFSET`] marks absent fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// [`FAMILY_FRAME_ARG`] or [`FAMILY_RESUME`].
    pub family: u8,
    /// 3.8-3.10: argument register index (0 = rdi, 1 = rsi, ...) of the frame.
    pub frame_arg: u8,
    /// 3.8-3.10: argument register index of `throwflag`.
    pub throwflag_arg: u8,
    /// How far up `PyASCIIObject.state`'s bits sit: 6 in free-threaded
    /// builds, whose `interned` is a whole byte rather than two bits.
    pub unicode_state_shift: u8,
    /// `LAYOUT_*` flags.
    pub flags: u16,
    /// Bits of the RESUME oparg that say where it resumes; zero means a start.
    pub resume_where_mask: u16,

    /// `tstate->cframe` (3.11, 3.12), or [`NO_OFFSET`].
    pub tstate_cframe: u16,
    /// `cframe->current_frame` (3.11, 3.12) or `tstate->current_frame` (3.13+).
    pub current_frame: u16,
    /// `tstate->interp`.
    pub tstate_interp: u16,
    /// `tstate->eval_breaker` (3.13+).
    pub tstate_eval_breaker: u16,
    /// `tstate->tracing`.
    pub tstate_tracing: u16,
    /// `interp->monitoring_version` (3.12).
    pub interp_monitoring_version: u16,
    /// `_PyRuntime.gilstate.tstate_current` (3.8-3.11): the thread running
    /// bytecode.
    pub runtime_tstate_current: u16,
    /// `_PyRuntime.interpreters.head`.
    pub runtime_interpreters_head: u16,
    /// `interp->next`.
    pub interp_next: u16,
    /// `interp->threads.head`.
    pub interp_threads_head: u16,
    /// `tstate->next`.
    pub tstate_next: u16,
    /// `tstate->native_thread_id` (3.11+).
    pub tstate_native_thread_id: u16,
    /// `tstate->frame` (3.8-3.10).
    pub tstate_frame: u16,

    /// Frame's code object (`f_code`, `f_executable`).
    pub frame_code: u16,
    /// Frame's function object (3.11+: `f_func`, `f_funcobj`).
    pub frame_func: u16,
    /// Frame's current instruction (3.11+: `prev_instr`, `instr_ptr`).
    pub frame_instr: u16,
    /// `f_lasti` (3.8-3.10): -1 until the frame first runs.
    pub frame_lasti: u16,
    /// `f_globals`.
    pub frame_globals: u16,
    /// The calling frame: `previous` (3.11+), `f_back` (3.8-3.10).
    pub frame_previous: u16,
    /// Free-threaded: which thread's copy of the bytecode the frame runs.
    pub frame_tlbc_index: u16,
    /// Free-threaded: `_PyThreadStateImpl.tlbc_index`, the thread's copy.
    pub tstate_tlbc_index: u16,

    /// `co_flags`.
    pub code_flags: u16,
    /// `co_firstlineno`.
    pub code_firstlineno: u16,
    /// `co_filename`.
    pub code_filename: u16,
    /// `co_name`.
    pub code_name: u16,
    /// `co_qualname` (3.11+).
    pub code_qualname: u16,
    /// `_co_instrumentation_version` (3.12+).
    pub code_instr_version: u16,

    /// `func_module`.
    pub func_module: u16,

    /// `PyDictObject.ma_keys` (3.8-3.10, to read a module's `__name__`).
    pub dict_keys: u16,
    /// `PyDictObject.ma_values`.
    pub dict_values: u16,
    /// `PyDictKeysObject.dk_size` (3.8-3.10).
    pub dictkeys_size: u16,
    /// `PyDictKeysObject.dk_indices` (3.8-3.10); entries follow the indices.
    pub dictkeys_indices: u16,

    /// `PyASCIIObject.state`.
    pub unicode_state: u16,
    /// `PyASCIIObject.length`.
    pub unicode_length: u16,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's bytes start.
    pub unicode_ascii_data: u16,
}

impl Layout {
    /// A layout with every offset absent.
    pub const EMPTY: Layout = Layout {
        family: 0,
        frame_arg: 0,
        throwflag_arg: 0,
        unicode_state_shift: 0,
        flags: 0,
        resume_where_mask: 0,
        tstate_cframe: NO_OFFSET,
        current_frame: NO_OFFSET,
        tstate_interp: NO_OFFSET,
        tstate_eval_breaker: NO_OFFSET,
        tstate_tracing: NO_OFFSET,
        interp_monitoring_version: NO_OFFSET,
        runtime_tstate_current: NO_OFFSET,
        runtime_interpreters_head: NO_OFFSET,
        interp_next: NO_OFFSET,
        interp_threads_head: NO_OFFSET,
        tstate_next: NO_OFFSET,
        tstate_native_thread_id: NO_OFFSET,
        tstate_frame: NO_OFFSET,
        frame_code: NO_OFFSET,
        frame_func: NO_OFFSET,
        frame_instr: NO_OFFSET,
        frame_lasti: NO_OFFSET,
        frame_globals: NO_OFFSET,
        frame_previous: NO_OFFSET,
        frame_tlbc_index: NO_OFFSET,
        tstate_tlbc_index: NO_OFFSET,
        code_flags: NO_OFFSET,
        code_firstlineno: NO_OFFSET,
        code_filename: NO_OFFSET,
        code_name: NO_OFFSET,
        code_qualname: NO_OFFSET,
        code_instr_version: NO_OFFSET,
        func_module: NO_OFFSET,
        dict_keys: NO_OFFSET,
        dict_values: NO_OFFSET,
        dictkeys_size: NO_OFFSET,
        dictkeys_indices: NO_OFFSET,
        unicode_state: NO_OFFSET,
        unicode_length: NO_OFFSET,
        unicode_ascii_data: NO_OFFSET,
    };

    /// Address of the name the verdict cache keys on: `co_qualname` where it
    /// exists, else `co_name`.
    pub const fn verdict_name_offset(&self) -> u16 {
        if self.code_qualname != NO_OFFSET { self.code_qualname } else { self.code_name }
    }
}

/// Bits of `PyASCIIObject.state`, shifted up by [`Layout::unicode_state_shift`].
pub mod unicode_state {
    /// `compact`: the characters follow the object header.
    pub const COMPACT: u32 = 1 << 5;
    /// `ascii`: every character is ASCII, stored one byte each.
    pub const ASCII: u32 = 1 << 6;
    /// `kind` (bytes per character: 1, 2 or 4) is `(state >> KIND_SHIFT) & KIND_MASK`.
    pub const KIND_SHIFT: u32 = 2;
    /// See [`KIND_SHIFT`].
    pub const KIND_MASK: u32 = 7;
}
