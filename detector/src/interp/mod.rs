//! Interpreter analysis: from an ELF object to everything needed to probe it
//! (version, build flavour, symbols, struct offsets and probe sites), or the
//! precise reason it cannot be probed. Independent of any process.

pub mod cache;
pub mod debug_offsets;
pub mod dispatch;
pub mod dwarf;
pub mod elf;
pub(crate) mod file;
pub mod offsets;
pub mod registers;
pub mod sites;
pub mod tier2;
pub mod version;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use detector_common::{
    FAMILY_FRAME_ARG, FAMILY_RESUME, LAYOUT_STACKREFS, LAYOUT_TRACING_GATES_INSTRUMENT, LAYOUT_VERSION_IN_EVAL_BREAKER,
    Layout, NO_OFFSET,
};
use dwarf::DebugSource;
use elf::{ElfImage, SymbolTable};
use offsets::{Disagreement, OffsetSource, OffsetTable};
use sites::{HandlerSource, ResumeContext, Site, SiteRole};
use version::{Flavour, PyVersion, VersionSource};

/// Oldest and newest minor versions supported.
pub const SUPPORTED_MINORS: std::ops::RangeInclusive<u8> = 8..=15;

/// Why an object cannot be probed.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not an ELF object.
    #[error("not an ELF object: {0}")]
    NotElf(String),
    /// An ELF object, but no CPython interpreter in it.
    #[error("not a CPython interpreter: {0}")]
    NotPython(String),
    /// A CPython this detector refuses to probe, and why.
    #[error("unsupported interpreter: {0}")]
    Unsupported(String),
}

/// A symbol the analysis used.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UsedSymbol {
    /// Name.
    pub name: &'static str,
    /// Virtual address.
    pub addr: u64,
    /// Table it came from.
    pub source: SymbolTable,
}

/// How the RESUME handlers were found, as reported.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HandlersInfo {
    /// The source used.
    pub source: HandlerSource,
    /// Address of the opcode dispatch table, when one was found.
    pub table: Option<u64>,
}

/// One offset, as reported.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OffsetInfo {
    /// Bytes.
    pub value: u16,
    /// Where it came from.
    pub source: OffsetSource,
}

/// Everything known about one interpreter build.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Analysis {
    /// The object as the watched process names it.
    pub object: String,
    /// GNU build id, hex.
    pub build_id: Option<String>,
    /// Position independent (PIE or shared library).
    pub position_independent: bool,
    /// Virtual address of the first loadable segment (for the load bias).
    #[serde(skip)]
    pub load_vaddr: u64,
    /// CPython version.
    pub version: PyVersion,
    /// Where the version came from.
    pub version_source: VersionSource,
    /// Build flavour (debug builds are analysed from their DWARF).
    pub flavour: Flavour,
    /// Symbols used.
    pub symbols: Vec<UsedSymbol>,
    /// Where the DWARF came from, if any was found.
    pub debug_info: Option<DebugSource>,
    /// How the RESUME handlers were found (3.11+).
    pub handlers: Option<HandlersInfo>,
    /// Every offset and its source.
    pub offsets: BTreeMap<&'static str, OffsetInfo>,
    /// Values where sources disagreed, and which won.
    pub disagreements: Vec<Disagreement>,
    /// The loads that dispatch a code unit (3.11+): what tells a body start
    /// from other reads of its first unit, for the watch strategy.
    pub dispatch: Option<dispatch::DispatchReads>,
    /// The tier-2 optimizer, when the build has one: a process that runs
    /// it is refused.
    pub tier2: Option<tier2::Tier2>,
    /// Probe sites.
    pub sites: Vec<Site>,
    /// Anything that works but costs more or is less certain than usual.
    pub warnings: Vec<String>,
    /// Offsets for the kernel.
    #[serde(skip)]
    pub layout: Layout,
    /// Offsets for user space.
    #[serde(skip)]
    pub table: OffsetTable,
}

impl Analysis {
    /// Address of a used symbol.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.iter().find(|s| s.name == name).map(|s| s.addr)
    }
}

/// Analyses the interpreter in `elf`. `object` is its path as the process
/// sees it (for messages, version hints and `.gnu_debuglink`); `root` is the
/// process's root directory, where separate debug files are looked up;
/// `live_runtime` is the start of `_PyRuntime` read from a live process.
pub fn analyze(
    elf: &ElfImage,
    object: &str,
    root: &Path,
    live_runtime: Option<&[u8]>,
) -> Result<Analysis, AnalysisError> {
    let lower = object.to_ascii_lowercase();
    if lower.contains("pypy") || elf.symbol("pypy_main_startup").is_some() {
        return Err(AnalysisError::NotPython("PyPy is not CPython".into()));
    }
    let eval = elf
        .symbol("_PyEval_EvalFrameDefault")
        .ok_or_else(|| AnalysisError::NotPython(format!("{object} defines no _PyEval_EvalFrameDefault")))?;
    let mut symbols = vec![UsedSymbol { name: "_PyEval_EvalFrameDefault", addr: eval.addr, source: eval.table }];
    let runtime = elf.symbol("_PyRuntime");
    if let Some(r) = runtime {
        symbols.push(UsedSymbol { name: "_PyRuntime", addr: r.addr, source: r.table });
    }

    let file_runtime = runtime.and_then(|r| elf.bytes_at(r.addr, debug_offsets::READ_LEN));
    let runtime_bytes = live_runtime.or(file_runtime);
    let header = runtime_bytes.and_then(debug_offsets::header);
    let (version, version_source) = version::detect(elf, header.map(|h| h.version), object)?;
    let flavour = version::flavour(elf, object, header.map(|h| h.free_threaded));
    refuse_unsupported(version, flavour)?;
    let minor = version.minor;
    let dwarf = dwarf::find(elf, object, root)?;
    if (flavour == Flavour::Debug || version::is_debug(elf)) && dwarf.is_none() {
        // The built-in tables are release builds'; a debug build's layouts
        // are taken from its own DWARF, which such builds normally carry.
        return Err(AnalysisError::Unsupported(format!(
            "CPython {version} is a debug build (Py_DEBUG) without DWARF: its layouts are read from DWARF only"
        )));
    }
    let debug_offsets = runtime_bytes.filter(|_| header.is_some());
    let (table, disagreements, mut warnings) =
        offset_table((version, flavour), dwarf.as_ref().map(|(info, _)| info), debug_offsets)?;

    let mut sites = vec![sites::function_entry(elf, "_PyEval_EvalFrameDefault", eval.addr, SiteRole::EvalEntry)?];
    if minor <= 10 {
        let f = elf
            .symbol("PyFunction_NewWithQualName")
            .ok_or_else(|| AnalysisError::Unsupported("no PyFunction_NewWithQualName symbol".into()))?;
        symbols.push(UsedSymbol { name: "PyFunction_NewWithQualName", addr: f.addr, source: f.table });
        sites.push(sites::function_entry(elf, "PyFunction_NewWithQualName", f.addr, SiteRole::FunctionNew)?);
    }
    sites.push(code_dealloc_site(elf, flavour, &mut symbols)?);
    // Exported API, so it survives stripping; without it, targets whose
    // module is imported after the attach are found by the rescan only.
    match elf.symbol("PyEval_EvalCode") {
        Some(f) => {
            symbols.push(UsedSymbol { name: "PyEval_EvalCode", addr: f.addr, source: f.table });
            sites.push(sites::function_entry(elf, "PyEval_EvalCode", f.addr, SiteRole::ModuleExec)?);
        }
        None => warnings.push("no PyEval_EvalCode symbol: late imports are found by the periodic rescan only".into()),
    }
    warnings.extend(sites.iter().filter(|s| !s.emulated).map(|s| {
        format!(
            "{} entry `{}` is not emulated by the kernel: each probe hit is single-stepped",
            s.handler, s.instruction
        )
    }));
    let (handlers, dispatch) = if minor >= 11 {
        let labels = dwarf.as_ref().map(|(info, _)| &info.labels);
        let clang = dwarf.as_ref().and_then(|(info, _)| info.ceval_by_clang).unwrap_or(false);
        let (info, dispatch) = resume_family(
            elf,
            (eval.addr, eval.size, clang),
            minor,
            (labels, &table.values),
            &mut sites,
            &mut warnings,
        )?;
        (Some(info), dispatch)
    } else {
        // 3.8-3.10 dispatch from the evaluation function alone; a body
        // starts when a new frame dispatches its first instruction.
        (None, dispatch::find_from_entry(elf, eval.addr))
    };

    let interp_size = debug_offsets.and_then(|b| debug_offsets::interp_size(b, minor));
    let dwarf_info = dwarf.as_ref().map(|(info, _)| info);
    let tier2 = tier2::find(elf, dwarf_info, (minor, interp_size), &mut symbols, &mut warnings)?.map(|(t, site)| {
        sites.extend(site);
        t
    });
    place_in_file(elf, &mut sites)?;
    let layout = kernel_layout(minor, flavour, &table.values);
    let offsets = table
        .sources
        .iter()
        .map(|(f, s)| (*f, OffsetInfo { value: table.values.get(f).unwrap_or(NO_OFFSET), source: *s }))
        .collect();
    Ok(Analysis {
        object: object.to_owned(),
        build_id: elf.build_id.as_ref().map(|b| b.iter().map(|x| format!("{x:02x}")).collect()),
        position_independent: elf.position_independent,
        load_vaddr: elf.segments.iter().map(|s| s.vaddr).min().unwrap_or(0),
        version,
        version_source,
        flavour,
        symbols,
        debug_info: dwarf.map(|(_, source)| source),
        handlers,
        offsets,
        disagreements,
        dispatch,
        tier2,
        sites,
        warnings,
        layout,
        table,
    })
}

/// 3.11+: the RESUME-family handlers and their sites (added to `sites`), and
/// the loads that dispatch a code unit.
fn resume_family(
    elf: &ElfImage,
    (eval, size, clang): (u64, u64, bool),
    minor: u8,
    (labels, o): (Option<&HashMap<String, Vec<u64>>>, &offsets::Offsets),
    sites: &mut Vec<Site>,
    warnings: &mut Vec<String>,
) -> Result<(HandlersInfo, Option<dispatch::DispatchReads>), AnalysisError> {
    let (found, info, all) = resume_handlers(elf, labels, minor, warnings)?;
    sites.extend(resume_sites(elf, &found, minor, o)?);
    // 3.11's tracing handler is the dispatch table's last entry.
    let tracing = if minor == 11 { table_entry(elf, labels, minor, "TARGET_DO_TRACING", 255) } else { None };
    let redispatchers: Vec<u64> = found.iter().map(|(_, a)| *a).chain(tracing).collect();
    let dispatch = dispatch::find(elf, eval, size, (&all, info.table), &redispatchers)
        .filter(|_| !tail_merged_redispatch(clang, (eval, size), &all, warnings));
    Ok((info, dispatch))
}

/// Whether the evaluation loop may reach a start's dispatch that the
/// watchpoints' dispatch reads leave out: seen on clang's computed-goto
/// loop (a 3.14 built with clang 19), which merges RESUME's re-dispatch
/// into a dispatch other paths take, and missed a function's first call.
/// Recognised by the compiler DWARF names for `ceval.c` (`.comment` lists
/// every compiler of every object linked, clang's JIT stencils' included),
/// with handlers inside the evaluation function (a tail-calling build keeps
/// them apart): such builds are probed per call. Without DWARF it is not
/// recognised.
fn tail_merged_redispatch(clang: bool, (eval, size): (u64, u64), handlers: &[u64], warnings: &mut Vec<String>) -> bool {
    let inside = handlers.iter().any(|&h| h >= eval && h < eval.saturating_add(size));
    if !(clang && inside) {
        return false;
    }
    warnings.push(
        "clang built this computed-goto evaluation loop, where watchpoints were seen to miss a function's \
         first call (RESUME's re-dispatch is merged with a dispatch other paths take): processes are probed \
         per call"
            .into(),
    );
    true
}

/// Where each site is in the file, which is where uprobes are attached.
fn place_in_file(elf: &ElfImage, sites: &mut [Site]) -> Result<(), AnalysisError> {
    for site in sites {
        site.file_offset = elf
            .file_offset(site.addr)
            .ok_or_else(|| AnalysisError::Unsupported(format!("site {:#x} is not backed by the file", site.addr)))?;
    }
    Ok(())
}

/// Refuses versions and flavours this detector does not probe at all.
fn refuse_unsupported(version: PyVersion, flavour: Flavour) -> Result<(), AnalysisError> {
    if version.major != 3 || !SUPPORTED_MINORS.contains(&version.minor) {
        return Err(AnalysisError::Unsupported(format!(
            "CPython {version}: supported versions are 3.{} to 3.{}",
            SUPPORTED_MINORS.start(),
            SUPPORTED_MINORS.end()
        )));
    }
    match flavour {
        Flavour::Release | Flavour::Debug => Ok(()),
        Flavour::FreeThreaded if version.minor >= 14 => Ok(()),
        // Experimental upstream in 3.13, and not built or tested here.
        Flavour::FreeThreaded => Err(AnalysisError::Unsupported(format!(
            "CPython {version} is a free-threaded build: supported from 3.14 on"
        ))),
    }
}

/// Every offset, from the most trusted source that has it: the built-in
/// table gives the shape (which fields this version has), DWARF and
/// `_Py_DebugOffsets` (the start of `_PyRuntime`, 3.13+) the values. Also
/// the disagreements between sources, and warnings.
fn offset_table(
    (version, flavour): (PyVersion, Flavour),
    dwarf: Option<&dwarf::DwarfInfo>,
    debug_offsets: Option<&[u8]>,
) -> Result<(OffsetTable, Vec<Disagreement>, Vec<String>), AnalysisError> {
    let builtin = offsets::builtin(version.minor, flavour).expect("every supported minor has a table");
    let mut table = OffsetTable::from(builtin, OffsetSource::Builtin);
    let mut disagreements = Vec::new();
    for (field, value) in dwarf.map(offsets::from_dwarf).unwrap_or_default() {
        if table.values.get(field) != Some(NO_OFFSET) {
            disagreements.extend(table.apply(field, value, OffsetSource::Dwarf));
        }
    }
    let mut warnings = Vec::new();
    if let Some(bytes) = debug_offsets {
        match debug_offsets::apply(bytes, version.minor, &mut table) {
            Ok(d) => disagreements.extend(d),
            // Without DWARF the built-in table would be a guess for a layout
            // that already differs from the one it was written for.
            Err(e) if dwarf.is_none() => return Err(AnalysisError::Unsupported(format!("CPython {version}: {e}"))),
            Err(e) => warnings.push(format!("{e}: using DWARF")),
        }
    }
    Ok((table, disagreements, warnings))
}

/// The RESUME-family handlers: from DWARF labels (`TARGET_RESUME`, ...)
/// when there are any, else the tail-calling interpreter's handler functions
/// (`_TAIL_CALL_RESUME`, ...), else the opcode dispatch table (found by
/// symbol or by scan; a tail-calling interpreter's table of function
/// pointers has the same shape). Labels and a table are cross-checked: the
/// table's entry must be one of the label's addresses (a cloned evaluation
/// loop has several), and any difference is reported.
fn resume_handlers(
    elf: &ElfImage,
    labels: Option<&HashMap<String, Vec<u64>>>,
    minor: u8,
    warnings: &mut Vec<String>,
) -> Result<(Vec<Handler>, HandlersInfo, Vec<u64>), AnalysisError> {
    let opcodes = sites::resume_opcodes(minor);
    let labelled = labels.filter(|l| opcodes.iter().all(|(name, _)| l.contains_key(&format!("TARGET_{name}"))));
    let table = sites::handler_table(elf, minor);
    if let Some(l) = labelled {
        let mut found = Vec::new();
        for &(name, opcode) in opcodes {
            let addrs = &l[&format!("TARGET_{name}")];
            if let Ok(t) = &table
                && !addrs.contains(&t.entries[opcode as usize])
            {
                warnings.push(format!(
                    "{name}: DWARF labels at {addrs:#x?}, dispatch table entry at {:#x}; using the labels",
                    t.entries[opcode as usize]
                ));
            }
            found.extend(addrs.iter().map(|a| (name, *a)));
        }
        let all = l.iter().filter(|(k, _)| k.starts_with("TARGET_")).flat_map(|(_, v)| v.iter().copied()).collect();
        let info = HandlersInfo { source: HandlerSource::DwarfLabels, table: table.ok().map(|t| t.addr) };
        return Ok((found, info, all));
    }
    let tail_calls: Option<Vec<Handler>> =
        opcodes.iter().map(|&(name, _)| elf.symbol(&format!("_TAIL_CALL_{name}")).map(|s| (name, s.addr))).collect();
    if let Some(found) = tail_calls {
        // The table's entries are every handler function.
        let (table, all) = table.map_or((None, Vec::new()), |t| (Some(t.addr), t.entries));
        return Ok((found, HandlersInfo { source: HandlerSource::TailCallFunctions, table }, all));
    }
    let t = table?;
    let mut found = Vec::new();
    for &(name, opcode) in opcodes {
        let handler = t.entries[opcode as usize];
        if handler == t.unknown {
            return Err(AnalysisError::Unsupported(format!(
                "opcode {opcode} ({name}) has no handler in the dispatch table at {:#x}",
                t.addr
            )));
        }
        found.push((name, handler));
    }
    let all = t.entries.clone();
    Ok((found, HandlersInfo { source: t.source, table: Some(t.addr) }, all))
}

/// A handler by DWARF label, else by its dispatch table entry.
fn table_entry(
    elf: &ElfImage,
    labels: Option<&HashMap<String, Vec<u64>>>,
    minor: u8,
    label: &str,
    opcode: usize,
) -> Option<u64> {
    labels
        .and_then(|l| l.get(label))
        .and_then(|a| a.first().copied())
        .or_else(|| sites::handler_table(elf, minor).ok().map(|t| t.entries[opcode]))
}

/// A RESUME-family handler: opcode name and address.
type Handler = (&'static str, u64);

fn resume_sites(
    elf: &ElfImage,
    handlers: &[Handler],
    minor: u8,
    o: &offsets::Offsets,
) -> Result<Vec<Site>, AnalysisError> {
    let ctx = ResumeContext {
        minor,
        frame_code: o.frame_code,
        frame_instr: o.frame_instr,
        code_instr_version: o.code_instr_version,
        frame_tlbc_index: o.frame_tlbc_index,
    };
    let sites = |uncounted: &[sites::UncountedEdge]| -> Result<Vec<Site>, AnalysisError> {
        let mut out: Vec<Site> = Vec::new();
        for &(name, handler) in handlers {
            if out.iter().any(|s| s.handler_addr == handler) {
                continue;
            }
            let site = sites::resume_site(elf, (name, handler), &ctx, uncounted)?;
            // Two probes at one address would count each pass twice.
            if !out.iter().any(|s| s.addr == site.addr) {
                out.push(site);
            }
        }
        Ok(out)
    };
    // A handler that jumps to where another's uncounted pass goes on has
    // its site there, or that pass would start a body uncounted.
    let first = sites(&[])?;
    let uncounted: Vec<sites::UncountedEdge> =
        first.iter().filter_map(|s| Some((sites::uncounted_edge(elf, s)?, s.handler_addr))).collect();
    // The first pass's sites would let such a pass start a body uncounted.
    let mut out = if uncounted.is_empty() { first } else { sites(&uncounted)? };
    // And an uncounted pass that reaches no site needs one of its own.
    let deopt = sites::deopt_sites(elf, &out, &ctx)?;
    out.extend(deopt);
    Ok(out)
}

/// `code_dealloc`, found through `PyCode_Type.tp_dealloc` (both the type and
/// its initialiser survive stripping; `code_dealloc` itself is static).
fn code_dealloc_site(elf: &ElfImage, flavour: Flavour, symbols: &mut Vec<UsedSymbol>) -> Result<Site, AnalysisError> {
    // `offsetof(PyTypeObject, tp_dealloc)`: the same in every version, after
    // a free-threaded build's longer object header.
    let tp_dealloc: u64 = if flavour == Flavour::FreeThreaded { 64 } else { 48 };
    let ty = elf.symbol("PyCode_Type").ok_or_else(|| AnalysisError::Unsupported("no PyCode_Type symbol".into()))?;
    symbols.push(UsedSymbol { name: "PyCode_Type", addr: ty.addr, source: ty.table });
    let dealloc = elf
        .pointer_at(ty.addr + tp_dealloc)
        .filter(|a| elf.is_code(*a))
        .ok_or_else(|| AnalysisError::Unsupported("PyCode_Type.tp_dealloc is not a code address".into()))?;
    sites::function_entry(elf, "code_dealloc", dealloc, SiteRole::CodeDealloc)
}

/// The kernel's view of the offsets.
fn kernel_layout(minor: u8, flavour: Flavour, o: &offsets::Offsets) -> Layout {
    let resume = minor >= 11;
    let mut flags = 0;
    if minor >= 13 {
        flags |= LAYOUT_VERSION_IN_EVAL_BREAKER;
    }
    // Without a GIL another thread may re-instrument while one traces, so a
    // free-threaded build checks the version whether tracing or not.
    if minor >= 13 && flavour != Flavour::FreeThreaded {
        flags |= LAYOUT_TRACING_GATES_INSTRUMENT;
    }
    if minor >= 14 {
        flags |= LAYOUT_STACKREFS;
    }
    Layout {
        family: if resume { FAMILY_RESUME } else { FAMILY_FRAME_ARG },
        // 3.8: (frame, throwflag); 3.9+: (tstate, frame, throwflag).
        frame_arg: if minor == 8 { 0 } else { 1 },
        unicode_state_shift: if flavour == Flavour::FreeThreaded { 6 } else { 0 },
        throwflag_arg: if minor == 8 { 1 } else { 2 },
        flags,
        // 3.13+ keeps extra bits above the "where" field of RESUME's oparg;
        // 3.15 widens it for a fifth place (a generator expression's start).
        resume_where_mask: match minor {
            15.. => 7,
            13 | 14 => 3,
            _ => 0xff,
        },
        tstate_cframe: o.tstate_cframe,
        current_frame: o.current_frame,
        tstate_interp: o.tstate_interp,
        tstate_eval_breaker: o.tstate_eval_breaker,
        tstate_tracing: o.tstate_tracing,
        interp_monitoring_version: o.interp_monitoring_version,
        runtime_tstate_current: o.runtime_tstate_current,
        runtime_interpreters_head: o.runtime_interpreters_head,
        interp_next: o.interp_next,
        interp_threads_head: o.interp_threads_head,
        tstate_next: o.tstate_next,
        tstate_native_thread_id: o.tstate_native_thread_id,
        tstate_frame: o.tstate_frame,
        frame_previous: o.frame_previous,
        frame_tlbc_index: o.frame_tlbc_index,
        tstate_tlbc_index: o.tstate_tlbc_index,
        frame_code: o.frame_code,
        frame_func: o.frame_func,
        frame_instr: o.frame_instr,
        frame_lasti: o.frame_lasti,
        frame_globals: o.frame_globals,
        code_flags: o.code_flags,
        code_firstlineno: o.code_firstlineno,
        code_filename: o.code_filename,
        code_name: o.code_name,
        code_qualname: o.code_qualname,
        code_instr_version: o.code_instr_version,
        func_module: o.func_module,
        dict_keys: if resume { NO_OFFSET } else { o.dict_keys },
        dict_values: if resume { NO_OFFSET } else { o.dict_values },
        dictkeys_size: o.dictkeys_size,
        dictkeys_indices: o.dictkeys_indices,
        unicode_state: o.unicode_state,
        unicode_length: o.unicode_length,
        unicode_ascii_data: o.unicode_ascii_data,
    }
}
