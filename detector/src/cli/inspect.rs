//! `detector inspect`: the analysis of an interpreter, or why it is refused.

use std::{path::Path, sync::Arc};

use anyhow::Context;

use crate::{
    agent::{Strategy, watchpoints},
    events::output::Format,
    interp::{Analysis, analyze, cache::AnalysisCache, elf::ElfImage, tier2::StartSeen},
    pyproc::{self, body},
    targets::Target,
};

/// Arguments of `detector inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A process id, or the path of an interpreter binary or libpython.
    #[arg(value_name = "PID|PATH")]
    pub what: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// With a PID: also find where this target's body starts (its code
    /// objects and the code unit a watchpoint would watch), read-only.
    /// Repeatable.
    #[arg(long = "target", value_name = "MODULE:QUALNAME")]
    pub targets: Vec<String>,
}

/// Runs `detector inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let targets: Vec<Target> = args.targets.iter().map(|t| Target::parse(t)).collect::<Result<_, _>>()?;
    let (analysis, process) = if let Ok(pid) = args.what.parse::<u32>() {
        let p = pyproc::locate(pid, &AnalysisCache::default())?;
        (p.analysis.clone(), Some(p))
    } else {
        if !targets.is_empty() {
            anyhow::bail!("--target needs a process: body starts are found in a live process's objects");
        }
        let path = Path::new(&args.what);
        let elf = ElfImage::open(path)?;
        let analysis = analyze(&elf, &args.what, Path::new("/"), None).with_context(|| args.what.clone())?;
        (Arc::new(analysis), None)
    };
    let mut bodies = Vec::new();
    let mut strategy = None;
    if let Some(p) = &process {
        for t in &targets {
            bodies.push((t.to_string(), body::find(p, t)?));
        }
        if !targets.is_empty() {
            // What `--strategy auto` would do with these targets.
            let targets = targets.iter().enumerate().map(|(i, t)| (t, i));
            strategy = Some(match watchpoints::plan(p, targets, watchpoints::Fit::Rotate) {
                Ok(plan) => (
                    Strategy::Watch,
                    format!(
                        "{} body starts under watchpoints{}, {} target(s) pending until their module runs",
                        plan.starts.len(),
                        if plan.starts.len() > watchpoints::DEBUG_REGISTERS {
                            " (sharing the debug registers under reachability; per call when counting exactly)"
                        } else {
                            ""
                        },
                        plan.pending.len()
                    ),
                ),
                Err(e) => (Strategy::PerCall, e.to_string()),
            });
        }
    }
    match args.format {
        Format::Json => {
            let mut v = serde_json::to_value(&*analysis)?;
            if let Some(p) = &process {
                v["pid"] = p.pid.into();
                v["load_bias"] = p.bias.into();
                v["open_path"] = p.object.open_path.display().to_string().into();
            }
            if !bodies.is_empty() {
                let map: serde_json::Map<String, serde_json::Value> = bodies
                    .iter()
                    .map(|(t, f)| Ok((t.clone(), serde_json::to_value(f)?)))
                    .collect::<serde_json::Result<_>>()?;
                v["bodies"] = map.into();
            }
            if let Some((s, why)) = &strategy {
                v["strategy"] = serde_json::json!({"strategy": s.name(), "why": why});
            }
            write_out(&format!("{v}\n"))
        }
        Format::Text => {
            let mut out = text(&analysis, process.as_ref());
            for (t, found) in &bodies {
                out.push_str(&body_text(t, found));
            }
            if let Some((s, why)) = &strategy {
                out.push_str(&format!("strategy (auto) for these targets: {} ({why})\n", s.name()));
            }
            write_out(&out)
        }
    }
}

fn body_text(target: &str, found: &body::Found) -> String {
    match found {
        body::Found::Code { starts } => starts
            .iter()
            .map(|s| {
                format!(
                    "body of {target}: code object {:#x}, starts at unit {} ({:#x}, {})\n",
                    s.code, s.unit, s.unit_addr, s.opname
                )
            })
            .collect(),
        body::Found::Nothing { reason, .. } => format!("body of {target}: not found ({reason})\n"),
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn write_out(s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(s.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn text(a: &Analysis, p: Option<&pyproc::PythonProcess>) -> String {
    let mut out = String::new();
    macro_rules! println {
        ($($arg:tt)*) => {{
            use std::fmt::Write as _;
            let _ = writeln!(out, $($arg)*);
        }};
    }
    if let Some(p) = p {
        println!("process     {} (load bias {:#x}, opened as {})", p.pid, p.bias, p.object.open_path.display());
    }
    println!("object      {}", a.object);
    println!("version     CPython {} ({:?} build; version from {:?})", a.version, a.flavour, a.version_source);
    println!("build id    {}", a.build_id.as_deref().unwrap_or("-"));
    println!("PIE/shared  {}", a.position_independent);
    for s in &a.symbols {
        println!("symbol      {:<26} {:#x} ({:?})", s.name, s.addr, s.source);
    }
    match &a.debug_info {
        Some(d) => println!("DWARF       {d:?}"),
        None => println!("DWARF       none found"),
    }
    if let Some(h) = &a.handlers {
        let table = h.table.map(|t| format!(", dispatch table at {t:#x}")).unwrap_or_default();
        println!("handlers    from {:?}{table}", h.source);
    }
    if let Some(t) = &a.tier2 {
        let flag = match t.jit_flag {
            Some(f) => format!("PYTHON_JIT or PyInterpreterState.jit at +{} ({:?}) says so", f.offset, f.source),
            None => "PYTHON_JIT in its environment says so".to_owned(),
        };
        println!("tier 2      built in: a process running it (the JIT) is refused; on when {flag}");
        let seen = match t.start {
            StartSeen::Probed { calls: 0 } => {
                "its entry is never called directly: a JIT that starts later may go unseen".to_owned()
            }
            StartSeen::Probed { calls } => format!(
                "its entry (called from {calls} place{}) is probed: a JIT that starts later stops the counting, \
                 with the reason",
                if calls == 1 { "" } else { "s" }
            ),
            StartSeen::NotProbed => "its entry runs with the JIT off too: a JIT that starts later goes unseen".into(),
        };
        println!("tier 2      {seen}");
    }
    for s in &a.sites {
        println!(
            "site        {:<26} {:#x} (file +{:#x}) `{}` {}",
            s.handler,
            s.addr,
            s.file_offset,
            s.instruction,
            if s.emulated { "emulated" } else { "single-stepped" }
        );
    }
    for (field, o) in &a.offsets {
        println!("offset      {field:<26} {:>5} ({:?})", o.value, o.source);
    }
    for d in &a.disagreements {
        println!(
            "disagree    {}: kept {} from {:?} over {} from {:?}",
            d.field, d.kept, d.kept_from, d.other, d.other_from
        );
    }
    for w in &a.warnings {
        println!("warning     {w}");
    }
    out
}
