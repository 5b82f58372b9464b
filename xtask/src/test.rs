//! `cargo xtask test`: what CI runs.

use std::process::Command;

use anyhow::Result;

use crate::{build, peers, root, rootfs, sh, testbuilds, venvs};

/// Runs every check and test. `filter` narrows the integration tests.
pub fn run(filter: Option<&str>) -> Result<()> {
    let ws = root();
    sh(Command::new("cargo").args(["fmt", "--all", "--check"]).current_dir(&ws))?;
    sh(Command::new("cargo")
        .args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])
        .current_dir(&ws))?;
    let bin = build::all()?;
    build::check_ebpf()?;
    let rootfs = rootfs::ensure_all()?;
    let builds = testbuilds::ensure_all()?;
    let test_agent = peers::test_agent()?;
    let versions = venvs::ensure()?;
    // Unit tests (no kernel needed), then the integration tests, which drive
    // the built binary against real interpreters and the real kernel.
    sh(Command::new("cargo").args(["test", "--workspace", "--exclude", "detector-tests"]).current_dir(&ws))?;
    let mut it = Command::new("cargo");
    it.args(["test", "--release", "--package", "detector-tests", "--"])
        .current_dir(&ws)
        .env("DETECTOR_BIN", &bin)
        .env("DETECTOR_TEST_ROOTFS", &rootfs)
        .env("DETECTOR_TEST_BUILDS", &builds)
        .env("DETECTOR_TEST_AGENT", &test_agent)
        .env("DETECTOR_TEST_VERSIONS", &versions);
    if let Some(f) = filter {
        it.arg(f);
    }
    sh(&mut it)
}
