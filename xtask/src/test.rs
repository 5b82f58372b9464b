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
    let switch = testbuilds::switch_build()?;
    let py315 = testbuilds::py315_build()?;
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
        .env("DETECTOR_TEST_SWITCH_PYTHON", &switch.python)
        .env("DETECTOR_TEST_STRIPPED_SWITCH_PYTHON", &switch.stripped)
        .env("DETECTOR_TEST_PY315", &py315)
        .env("DETECTOR_TEST_AGENT", &test_agent)
        .env("DETECTOR_TEST_VERSIONS", &versions);
    if let Some(f) = filter {
        it.arg(f);
    }
    sh(&mut it)
}
