//! Test peers from PyPI, in a virtualenv in the xtask cache: the Datadog test
//! agent, whose `/v0.7/config` the Remote Configuration tests talk to.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{cache_dir, sh};

/// The pinned `ddapm-test-agent`.
const TEST_AGENT: &str = "ddapm-test-agent==1.69.1";

/// Path of the `ddapm-test-agent` executable, installing it on first use.
pub fn test_agent() -> Result<PathBuf> {
    let venv = cache_dir().join("test-venv");
    let bin = venv.join("bin").join("ddapm-test-agent");
    let stamp = venv.join(".installed");
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == TEST_AGENT) {
        return Ok(bin);
    }
    eprintln!("xtask: installing {TEST_AGENT} into {}", venv.display());
    sh(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv)).context("python3 -m venv")?;
    sh(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        TEST_AGENT,
    ]))?;
    std::fs::write(&stamp, TEST_AGENT)?;
    Ok(bin)
}
