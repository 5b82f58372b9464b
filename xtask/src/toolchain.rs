//! The eBPF toolchain: nightly's `rust-src`, and bpf-linker built against the
//! very LLVM that nightly rustc emits bitcode with (it ships as
//! `libLLVM.so.NN...` inside the toolchain; no system LLVM dev package needed).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cache_dir, output, sh};

/// The toolchain the eBPF crate builds with: `nightly`, or a dated one named
/// in `DETECTOR_NIGHTLY` (the container build pins one).
pub fn nightly() -> String {
    std::env::var("DETECTOR_NIGHTLY").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "nightly".into())
}
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs `rust-src` for nightly if missing.
pub fn ensure_rust_src() -> Result<()> {
    ensure_components(&["rust-src"])
}

/// Installs nightly's `components` that are missing.
pub fn ensure_components(components: &[&str]) -> Result<()> {
    let nightly = nightly();
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", &nightly]))
        .context("rustup is required")?;
    for c in components {
        if !installed.lines().any(|l| l.starts_with(c)) {
            eprintln!("xtask: installing {c} for {nightly}");
            sh(Command::new("rustup").args(["component", "add", c, "--toolchain", &nightly]))?;
        }
    }
    Ok(())
}

/// Path of a bpf-linker matching nightly's LLVM, building it on first use
/// (about a minute) into the xtask cache.
pub fn bpf_linker() -> Result<PathBuf> {
    let nightly = nightly();
    let verbose = output(Command::new("rustc").args([&format!("+{nightly}"), "-vV"]))
        .with_context(|| format!("the {nightly} toolchain is required (rustup toolchain install {nightly})"))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV printed no LLVM version")?
        .trim()
        .to_owned();
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    let commit = verbose.lines().find_map(|l| l.strip_prefix("commit-hash: ")).unwrap_or("unknown");
    let root =
        cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{llvm}-{}", &commit[..commit.len().min(12)]));
    let bin = root.join("bin").join("bpf-linker");
    if bin.exists() {
        return Ok(bin);
    }
    let sysroot = output(Command::new("rustc").args([&format!("+{nightly}"), "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&format!("libLLVM.so.{major}")) || name.starts_with(&format!("libLLVM-{major}"))
        })
        .with_context(|| format!("no libLLVM for LLVM {major} in {}", lib.display()))?;
    // bpf-linker's build looks for `lib/libLLVM.so` under LLVM_PREFIX.
    let prefix = root.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".into(), libllvm.file_name().unwrap().to_owned()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (once)");
    let feature = format!("llvm-{major}");
    sh(Command::new("cargo")
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features"])
        .args(["--features", &feature, "--root"])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix))
    .or_else(|_| {
        // Older lock files may not resolve on this toolchain; retry unlocked.
        sh(Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--no-default-features"])
            .args(["--features", &feature, "--root"])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix))
    })?;
    if !bin.exists() {
        bail!("bpf-linker was not installed at {}", bin.display());
    }
    Ok(bin)
}
