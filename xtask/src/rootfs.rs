//! Debian root filesystems for the tests: distro interpreter builds run
//! under `chroot`, which is also how the tests stand in for "a process in a
//! container" (its binary is only reachable through `/proc/PID/root`).
//! Built with `debootstrap` on first use and cached in the xtask cache.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{apt, cache_dir, is_root, sh};

/// A Debian suite with one interpreter package.
pub struct Rootfs {
    /// Directory name under the cache's `test-rootfs/`.
    pub name: &'static str,
    /// Debian suite.
    pub suite: &'static str,
    /// Packages to install: the interpreters.
    pub packages: &'static [&'static str],
}

/// The root filesystems the tests use: Debian's 3.14 and 3.15 (stripped,
/// static libpython, handlers outside `_PyEval_EvalFrameDefault`; their
/// debug files from the `-dbg` packages, which also bring the debug builds
/// `python3.14d` and `python3.15d`), and 3.15's standard library
/// (`-minimal` has no `ctypes`).
pub const ROOTFS: &[Rootfs] = &[Rootfs {
    name: "sid-python3.14",
    suite: "sid",
    packages: &["python3.14-minimal", "python3.15-minimal", "python3.14-dbg", "python3.15-dbg", "libpython3.15-stdlib"],
}];

const MIRROR: &str = "http://deb.debian.org/debian";
const STAMP: &str = ".detector-rootfs-complete";

/// Makes sure every root filesystem exists; returns the directory holding them.
pub fn ensure_all() -> Result<PathBuf> {
    let base = cache_dir().join("test-rootfs");
    for r in ROOTFS {
        let dir = base.join(r.name);
        let include = r.packages.join(",");
        // The stamp records what was installed: a changed list rebuilds.
        if fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s == include) {
            continue;
        }
        if !is_root() {
            bail!("building the test root filesystem {} needs root (debootstrap)", dir.display());
        }
        apt::ensure("debootstrap", "debootstrap")?;
        eprintln!("xtask: debootstrap {} with {include} into {} (once, a few minutes)", r.suite, dir.display());
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing partial {}", dir.display()))?;
        }
        fs::create_dir_all(&base)?;
        sh(Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={include}"), r.suite])
            .arg(&dir)
            .arg(MIRROR))?;
        fs::write(dir.join(STAMP), &include)?;
    }
    Ok(base)
}
