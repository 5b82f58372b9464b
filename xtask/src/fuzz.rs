//! `cargo xtask fuzz`: every fuzz target of `detector/fuzz` for a bounded
//! time each, with cargo-fuzz (installed into the cache on first use) on
//! nightly. Each run starts from the committed seeds and the corpus earlier
//! runs grew, which lives in the cache; a crash fails the run and leaves its
//! input under `detector/fuzz/artifacts/`, to be committed to the seeds once
//! fixed (see `detector/fuzz/README.md`).

use std::process::Command;

use anyhow::{Context, Result};

use crate::{cache_dir, root, sh, toolchain};

/// The targets, as `detector/fuzz/Cargo.toml` names them.
const TARGETS: [&str; 4] = ["elf", "payload", "rc_response", "proc_files"];

/// cargo-fuzz's version: pinned, so a warm cache is reused.
const CARGO_FUZZ: &str = "0.13.1";

/// Runs each target (or those whose name contains `only`) for `secs` seconds.
pub fn run(secs: u64, only: Option<&str>) -> Result<()> {
    let cargo_fuzz = install()?;
    let dir = root().join("detector/fuzz");
    let nightly = toolchain::nightly();
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| t.contains(o))) {
        // libFuzzer adds what it finds to the first directory only.
        let grown = cache_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&grown)?;
        let seeds = dir.join("corpus").join(target);
        eprintln!("xtask: fuzzing {target} for {secs} s (corpus {})", grown.display());
        sh(Command::new(&cargo_fuzz)
            .current_dir(&dir)
            .env("RUSTUP_TOOLCHAIN", &nightly)
            .args(["fuzz", "run", "--release", target])
            .arg(&grown)
            .arg(&seeds)
            .args(["--", &format!("-max_total_time={secs}"), "-max_len=1048576", "-rss_limit_mb=4096"]))
        .with_context(|| format!("fuzz target {target} found a crash: see detector/fuzz/artifacts/{target}"))?;
    }
    Ok(())
}

/// cargo-fuzz, built once into the cache.
fn install() -> Result<std::path::PathBuf> {
    let prefix = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ}"));
    let bin = prefix.join("bin/cargo-fuzz");
    if !bin.exists() {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ}");
        sh(Command::new("cargo")
            .args(["install", "--locked", "--version", CARGO_FUZZ, "--root"])
            .arg(&prefix)
            .arg("cargo-fuzz"))?;
    }
    Ok(bin)
}
