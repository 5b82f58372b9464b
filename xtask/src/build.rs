//! Building the eBPF object and the detector with it embedded.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{root, sh, toolchain};

/// Builds the eBPF object; returns its path.
pub fn ebpf() -> Result<PathBuf> {
    toolchain::ensure_rust_src()?;
    let linker = toolchain::bpf_linker()?;
    let dir = root().join("detector-ebpf");
    sh(Command::new("cargo")
        .arg(format!("+{}", toolchain::nightly()))
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .current_dir(&dir)
        // Keep the caller's toolchain choice (`cargo +x xtask`) out of it.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf"))?;
    Ok(dir.join("target/bpfel-unknown-none/release/detector-ebpf"))
}

/// Builds everything; returns the path of the `detector` binary.
pub fn all() -> Result<PathBuf> {
    let object = ebpf()?;
    sh(Command::new("cargo")
        .args(["build", "--release", "--package", "detector"])
        .current_dir(root())
        .env("DETECTOR_BPF_OBJECT", &object))?;
    Ok(root().join("target/release/detector"))
}
