//! Interpreter builds no distribution ships, compiled from CPython's source
//! (Debian's copies of the upstream tarballs, checked against their SHA-256)
//! on first use and cached in the xtask cache, a directory per version and
//! flags, so every clone on a machine reuses them:
//! - a 3.13 built `--without-computed-gotos`, whose handlers are reached
//!   through a `switch`, and a stripped copy of it;
//! - a 3.15 built as upstream configures it, with DWARF (Debian's own 3.15
//!   binary is stripped), the build the built-in tables are checked against.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{cache_dir, sh};

/// One build: a tarball and the flags it is configured with.
struct Build {
    /// Version, as in the tarball's top directory (`Python-VERSION`).
    version: &'static str,
    /// Debian's copy of the upstream tarball.
    tarball: &'static str,
    /// Its SHA-256: the pool is not a pinned archive.
    sha256: &'static str,
    /// `./configure` flags beyond the ones every build gets.
    flags: &'static [&'static str],
    /// `make` targets: the interpreter alone, or (empty) it and every
    /// extension module (`ctypes` for the tests that need it).
    targets: &'static [&'static str],
    /// Directory under the cache's `test-builds/`; a new key rebuilds.
    key: &'static str,
}

const SWITCH: Build = Build {
    version: "3.13.5",
    tarball: "http://deb.debian.org/debian/pool/main/p/python3.13/python3.13_3.13.5.orig.tar.xz",
    sha256: "93e583f243454e6e9e4588ca2c2662206ad961659863277afcdb96801647d640",
    flags: &["--without-computed-gotos"],
    targets: &["python"],
    key: "3.13.5-switch",
};

const PY315: Build = Build {
    version: "3.15.0rc2",
    tarball: "http://deb.debian.org/debian/pool/main/p/python3.15/python3.15_3.15.0~rc2.orig.tar.xz",
    sha256: "8d93af5eaaaea5adfd41bd786a7ba3f03f2ad1ab57c6a65e0b963deab91d5ad7",
    flags: &[],
    targets: &[],
    key: "3.15.0rc2",
};

/// Paths of the switch-dispatch interpreter (with DWARF) and its stripped copy.
pub struct SwitchBuild {
    /// Runnable from its build tree, with DWARF.
    pub python: PathBuf,
    /// The same binary without symbols or DWARF.
    pub stripped: PathBuf,
}

/// Builds (once, about a minute) CPython without computed gotos.
pub fn switch_build() -> Result<SwitchBuild> {
    let python = build(&SWITCH)?;
    let stripped = cache_dir().join("test-builds").join(SWITCH.key).join("python-stripped");
    if !stripped.exists() {
        let partial = stripped.with_extension("partial");
        fs::copy(&python, &partial).context("copying the switch build")?;
        sh(Command::new("strip").arg(&partial))?;
        fs::rename(&partial, &stripped)?;
    }
    Ok(SwitchBuild { python, stripped })
}

/// Builds (once, about two minutes) CPython 3.15 with DWARF; its interpreter.
pub fn py315_build() -> Result<PathBuf> {
    build(&PY315)
}

/// The interpreter of `b`, runnable from its build tree, built if missing.
fn build(b: &Build) -> Result<PathBuf> {
    let base = cache_dir().join("test-builds").join(b.key);
    let src = base.join(format!("Python-{}", b.version));
    let python = src.join("python");
    let stamp = src.join(".detector-build-complete");
    if python.exists() && stamp.exists() {
        return Ok(python);
    }
    fs::create_dir_all(&base)?;
    let tarball = base.join(format!("Python-{}.tar.xz", b.version));
    if !tarball.exists() {
        eprintln!("xtask: downloading CPython {} source", b.version);
        let partial = tarball.with_extension("partial");
        sh(Command::new("curl").args(["-fsSL", "-o"]).arg(&partial).arg(b.tarball))?;
        let sum = Command::new("sha256sum").arg(&partial).output().context("sha256sum")?;
        let sum = String::from_utf8_lossy(&sum.stdout);
        if sum.split_whitespace().next() != Some(b.sha256) {
            fs::remove_file(&partial)?;
            anyhow::bail!("{} has SHA-256 {sum}, expected {}", b.tarball, b.sha256);
        }
        fs::rename(&partial, &tarball)?;
    }
    if src.exists() {
        fs::remove_dir_all(&src)?;
    }
    sh(Command::new("tar").arg("xf").arg(&tarball).current_dir(&base))?;
    eprintln!("xtask: building CPython {} {} (once, a minute or two)", b.version, b.flags.join(" "));
    sh(Command::new("./configure").args(b.flags).args(["--disable-test-modules", "--quiet"]).current_dir(&src))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    sh(Command::new("make").args(["-j", &jobs, "--quiet"]).args(b.targets).current_dir(&src))?;
    fs::write(&stamp, b.flags.join(" "))?;
    Ok(python)
}
