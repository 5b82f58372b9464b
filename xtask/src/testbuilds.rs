//! Interpreter builds no distribution ships, compiled from CPython's source
//! (Debian's copy of the upstream tarball) on first use and cached in
//! the xtask cache: a 3.13 built `--without-computed-gotos`, whose handlers are
//! reached through a `switch`, and a stripped copy of it.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{cache_dir, sh};

const VERSION: &str = "3.13.5";
const TARBALL: &str = "http://deb.debian.org/debian/pool/main/p/python3.13/python3.13_3.13.5.orig.tar.xz";

/// Paths of the switch-dispatch interpreter (with DWARF) and its stripped copy.
pub struct SwitchBuild {
    /// Runnable from its build tree, with DWARF.
    pub python: PathBuf,
    /// The same binary without symbols or DWARF.
    pub stripped: PathBuf,
}

/// Builds (once, about a minute) CPython without computed gotos.
pub fn switch_build() -> Result<SwitchBuild> {
    let base = cache_dir().join("test-builds");
    let src = base.join(format!("Python-{VERSION}"));
    let python = src.join("python");
    let stripped = base.join(format!("python{VERSION}-switch-stripped"));
    if python.exists() && stripped.exists() {
        return Ok(SwitchBuild { python, stripped });
    }
    fs::create_dir_all(&base)?;
    let tarball = base.join(format!("Python-{VERSION}.tar.xz"));
    if !tarball.exists() {
        eprintln!("xtask: downloading CPython {VERSION} source");
        let partial = tarball.with_extension("partial");
        sh(Command::new("curl").args(["-fsSL", "-o"]).arg(&partial).arg(TARBALL))?;
        fs::rename(&partial, &tarball)?;
    }
    if src.exists() {
        fs::remove_dir_all(&src)?;
    }
    sh(Command::new("tar").arg("xf").arg(&tarball).current_dir(&base))?;
    eprintln!("xtask: building CPython {VERSION} --without-computed-gotos (once, about a minute)");
    sh(Command::new("./configure")
        .args(["--without-computed-gotos", "--disable-test-modules", "--quiet"])
        .current_dir(&src))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    sh(Command::new("make").args(["-j", &jobs, "--quiet", "python"]).current_dir(&src))?;
    fs::copy(&python, &stripped).context("copying the switch build")?;
    sh(Command::new("strip").arg(&stripped))?;
    Ok(SwitchBuild { python, stripped })
}
