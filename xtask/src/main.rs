//! `cargo xtask`: everything needed to build, run, test and benchmark the
//! detector on a fresh machine, provisioning what is missing (rust-src,
//! bpf-linker, test root filesystems) and caching it outside the clone
//! (see [`cache_dir`]).

mod apt;
mod bench;
mod build;
mod catalog;
mod footprint;
mod fuzz;
mod harness;
mod latency;
mod peers;
mod rootfs;
mod suite;
mod test;
mod testbuilds;
mod toolchain;
mod venvs;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Build, run, test and benchmark the detector.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object and the `detector` binary with it embedded
    /// (release). Installs rust-src and bpf-linker on first use.
    Build,
    /// Build, then run `detector ARGS` (as root: eBPF needs it).
    ///
    /// Example: cargo xtask run -- dump --target json.decoder:JSONDecoder.decode -- python3 -c 'import json; json.loads("[]")'
    Run {
        /// Arguments for `detector`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Everything CI runs: formatting, clippy, unit tests, and the
    /// integration tests against real interpreters and the real kernel.
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure the detector's per-hit cost against an empty probe at the
    /// same sites and against no probe, on every interpreter, then the
    /// workload suite (fib, richards, json) under each strategy; writes the
    /// tables to docs/BENCHMARKS.md.
    Bench {
        /// Only the workload suite and the site costs, printed (nothing written).
        #[arg(long)]
        suite_only: bool,
        /// Only the call-loop table, for interpreters whose name contains
        /// this, printed (nothing written): a quick check of a probe change.
        #[arg(long, value_name = "INTERPRETER", conflicts_with = "suite_only")]
        calls_only: Option<String>,
        /// Only the catalog scenario (a Flask service, fib and richards with
        /// a 60-target catalog; rotation), printed (nothing written).
        #[arg(long, conflicts_with_all = ["suite_only", "calls_only"])]
        catalog_only: bool,
    },
    /// Fuzz every parser of untrusted input (interpreter images, payloads,
    /// Remote Configuration responses, /proc files) for SECS seconds each,
    /// with cargo-fuzz on nightly (installed into the cache on first use).
    /// New inputs join the committed corpus under detector/fuzz/corpus,
    /// which the unit tests replay.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Only targets whose name contains this.
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build => build::all().map(|_| ()),
        Cmd::Run { args } => run(&args),
        Cmd::Test { filter } => test::run(filter.as_deref()),
        Cmd::Bench { suite_only, calls_only, catalog_only } => {
            bench::run(suite_only, calls_only.as_deref(), catalog_only)
        }
        Cmd::Fuzz { secs, target } => fuzz::run(secs, target.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let bin = build::all()?;
    if !is_root() {
        bail!("the detector loads eBPF programs and needs root: run `sudo -E cargo xtask run -- ...`");
    }
    let status = Command::new(&bin).args(args).status().with_context(|| format!("running {}", bin.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        _ => bail!("detector exited with {status}"),
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where xtask caches what it provisions (bpf-linker, test root
/// filesystems, CPython builds, virtualenvs): outside the clone, so every
/// clone on a machine (CI's fresh one included) reuses them.
/// `DETECTOR_XTASK_CACHE`, else `$XDG_CACHE_HOME/detector-xtask`, else
/// `~/.cache/detector-xtask`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DETECTOR_XTASK_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")).unwrap_or_else(|| root().join("target"))
    });
    base.join("detector-xtask")
}

/// Whether we run as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Runs a command, failing with its name and status.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
