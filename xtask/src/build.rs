//! Building the eBPF object and the detector with it embedded.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{root, sh, toolchain};

/// `cargo +nightly SUBCOMMAND` in `detector-ebpf`, for its target.
fn ebpf_cargo(subcommand: &str, extra: &[&str]) -> Result<()> {
    toolchain::ensure_rust_src()?;
    let linker = toolchain::bpf_linker()?;
    sh(Command::new("cargo")
        .arg(format!("+{}", toolchain::nightly()))
        .args([subcommand, "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(extra)
        .current_dir(root().join("detector-ebpf"))
        // Keep the caller's toolchain choice (`cargo +x xtask`) out of it.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf"))
}

/// Builds the eBPF object; returns its path.
pub fn ebpf() -> Result<PathBuf> {
    ebpf_cargo("build", &[])?;
    Ok(root().join("detector-ebpf/target/bpfel-unknown-none/release/detector-ebpf"))
}

/// Format-checks and lints the eBPF crate (a workspace of its own).
pub fn check_ebpf() -> Result<()> {
    toolchain::ensure_components(&["rustfmt", "clippy"])?;
    sh(Command::new("cargo")
        .arg(format!("+{}", toolchain::nightly()))
        .args(["fmt", "--check"])
        .current_dir(root().join("detector-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    ebpf_cargo("clippy", &["--quiet", "--", "-D", "warnings"])
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
