//! Interpreter builds no distribution ships, compiled from CPython's source
//! (Debian's copies of the upstream tarballs, checked against their SHA-256)
//! on first use and cached in the xtask cache, a directory per version and
//! flags, so every clone on a machine reuses them: 3.13 without computed
//! gotos, 3.15 with DWARF, 3.14 and 3.15 with the tail-calling interpreter,
//! 3.14 as the official container images build it, 3.14 and 3.15
//! free-threaded, and 3.14 with the JIT on by default. The tests find them
//! in a manifest (`DETECTOR_TEST_BUILDS`): one line per build, its name,
//! minor version (`14t` if free-threaded), interpreter and stripped copy
//! (if any).

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{apt, cache_dir, sh};

/// One build: a tarball, the compiler and the flags it is configured with.
struct Build {
    /// The name the tests give it.
    name: &'static str,
    /// Version, as in the tarball's top directory (`Python-VERSION`).
    version: &'static str,
    /// Debian's copy of the upstream tarball.
    tarball: &'static str,
    /// Its SHA-256: the pool is not a pinned archive.
    sha256: &'static str,
    /// The C compiler (a Debian package of that name), if not the default.
    cc: Option<&'static str>,
    /// `./configure` flags beyond the ones every build gets.
    flags: &'static [&'static str],
    /// `make` targets: the interpreter alone, or (empty) it and every
    /// extension module (`ctypes` for the tests that need it).
    targets: &'static [&'static str],
    /// Whether the tests also get a copy without symbols or DWARF.
    stripped: bool,
    /// Whether it is installed (under its directory, `install/`) the way
    /// the official container images install theirs: its libpython shared,
    /// both linked `--strip-all`, the interpreter finding the library by
    /// its rpath. The tests then run the installed interpreter.
    installed: bool,
    /// Directory under the cache's `test-builds/`; a new key rebuilds.
    key: &'static str,
}

impl Build {
    /// Free-threaded (`--disable-gil`): the manifest writes its minor as
    /// CPython names the build, `14t`.
    fn free_threaded(&self) -> bool {
        self.flags.contains(&FREE_THREADED[0])
    }

    /// The JIT built in, and on unless `PYTHON_JIT=0`.
    fn jit(&self) -> bool {
        self.flags.contains(&JIT[0])
    }
}

const PY313: (&str, &str, &str) = (
    "3.13.5",
    "http://deb.debian.org/debian/pool/main/p/python3.13/python3.13_3.13.5.orig.tar.xz",
    "93e583f243454e6e9e4588ca2c2662206ad961659863277afcdb96801647d640",
);
const PY314: (&str, &str, &str) = (
    "3.14.7",
    "http://deb.debian.org/debian/pool/main/p/python3.14/python3.14_3.14.7.orig.tar.xz",
    "3b48dac8fb59f62eaa67ac83c1eb12bda1b7a08406dd286e252c11a66be27f81",
);
const PY315: (&str, &str, &str) = (
    "3.15.0rc2",
    "http://deb.debian.org/debian/pool/main/p/python3.15/python3.15_3.15.0~rc2.orig.tar.xz",
    "8d93af5eaaaea5adfd41bd786a7ba3f03f2ad1ab57c6a65e0b963deab91d5ad7",
);

/// The tail-calling interpreter: handlers are functions, and a build
/// needs clang 19 or later.
const TAIL_CALL: &[&str] = &["--with-tail-call-interp"];

/// No GIL: 32-byte object headers, a copy of the bytecode per thread.
const FREE_THREADED: &[&str] = &["--disable-gil"];

/// The JIT, on by default: its stencils are compiled at build time with
/// clang and LLVM 19, by a script run with an installed Python 3.11+.
const JIT: &[&str] = &["--enable-experimental-jit=yes"];

const BUILDS: &[Build] = &[
    // Handlers reached through a `switch`: analysed from DWARF labels,
    // refused stripped.
    Build {
        name: "switch-3.13",
        version: PY313.0,
        tarball: PY313.1,
        sha256: PY313.2,
        cc: None,
        flags: &["--without-computed-gotos"],
        targets: &["python"],
        stripped: true,
        installed: false,
        key: "3.13.5-switch",
    },
    // As upstream configures it, with DWARF (Debian's 3.15 is stripped):
    // the build the built-in tables are checked against.
    Build {
        name: "build-3.15",
        version: PY315.0,
        tarball: PY315.1,
        sha256: PY315.2,
        cc: None,
        flags: &[],
        targets: &[],
        stripped: false,
        installed: false,
        key: "3.15.0rc2",
    },
    Build {
        name: "tailcall-3.14",
        version: PY314.0,
        tarball: PY314.1,
        sha256: PY314.2,
        cc: Some("clang-19"),
        flags: TAIL_CALL,
        targets: &[],
        stripped: true,
        installed: false,
        key: "3.14.7-tailcall-clang19",
    },
    Build {
        name: "tailcall-3.15",
        version: PY315.0,
        tarball: PY315.1,
        sha256: PY315.2,
        cc: Some("clang-19"),
        flags: TAIL_CALL,
        targets: &[],
        stripped: true,
        installed: false,
        key: "3.15.0rc2-tailcall-clang19",
    },
    // As the official container images build it (less PGO, which would run
    // the test suite for a quarter of an hour): `-O3` (CPython's default),
    // link-time optimisation, a shared libpython, stripped.
    Build {
        name: "lto-shared-3.14",
        version: PY314.0,
        tarball: PY314.1,
        sha256: PY314.2,
        cc: None,
        flags: &["--enable-shared", "--with-lto", "--without-ensurepip"],
        targets: &[],
        stripped: false,
        installed: true,
        key: "3.14.7-shared-lto",
    },
    Build {
        name: "ft-3.14",
        version: PY314.0,
        tarball: PY314.1,
        sha256: PY314.2,
        cc: None,
        flags: FREE_THREADED,
        targets: &[],
        stripped: true,
        installed: false,
        key: "3.14.7-freethreaded",
    },
    Build {
        name: "ft-3.15",
        version: PY315.0,
        tarball: PY315.1,
        sha256: PY315.2,
        cc: None,
        flags: FREE_THREADED,
        targets: &[],
        stripped: true,
        installed: false,
        key: "3.15.0rc2-freethreaded",
    },
    Build {
        name: "jit-3.14",
        version: PY314.0,
        tarball: PY314.1,
        sha256: PY314.2,
        cc: Some("clang-19"),
        flags: JIT,
        targets: &[],
        stripped: false,
        installed: false,
        key: "3.14.7-jit-clang19",
    },
];

/// Builds every interpreter the tests need that is missing (a minute or
/// two each, once); returns the tests' manifest of them.
pub fn ensure_all() -> Result<String> {
    let mut manifest = String::new();
    for b in BUILDS {
        let python = build(b)?;
        let stripped = if b.stripped { stripped_copy(b, &python)?.display().to_string() } else { String::new() };
        let minor = b.version.split('.').nth(1).context("version")?;
        let minor = if b.free_threaded() { format!("{minor}t") } else { minor.to_owned() };
        manifest.push_str(&format!("{}\t{minor}\t{}\t{stripped}\n", b.name, python.display()));
    }
    Ok(manifest)
}

/// A copy of `python` without symbols or DWARF, beside it in its build tree
/// (where it finds its standard library).
fn stripped_copy(b: &Build, python: &std::path::Path) -> Result<PathBuf> {
    let stripped = python.with_file_name("python-stripped");
    let stamp = python.with_file_name(".detector-stripped");
    if !stamp.exists() {
        let partial = stripped.with_extension("partial");
        fs::copy(python, &partial).with_context(|| format!("copying {}", b.name))?;
        sh(Command::new("strip").arg(&partial))?;
        fs::rename(&partial, &stripped)?;
        fs::write(&stamp, "")?;
    }
    Ok(stripped)
}

/// The interpreter of `b`, runnable from its build tree, built if missing.
fn build(b: &Build) -> Result<PathBuf> {
    let base = cache_dir().join("test-builds").join(b.key);
    let src = base.join(format!("Python-{}", b.version));
    let prefix = base.join("install");
    let python = if b.installed {
        let minor = b.version.split('.').take(2).collect::<Vec<_>>().join(".");
        prefix.join("bin").join(format!("python{minor}"))
    } else {
        src.join("python")
    };
    let stamp = src.join(".detector-build-complete");
    if python.exists() && stamp.exists() {
        return Ok(python);
    }
    if let Some(cc) = b.cc {
        apt::ensure(cc, cc)?;
    }
    if b.jit() {
        apt::ensure("llvm-19", "llvm-readobj-19")?;
    }
    fs::create_dir_all(&base)?;
    let tarball = download(b, &base)?;
    if src.exists() {
        fs::remove_dir_all(&src)?;
    }
    sh(Command::new("tar").arg("xf").arg(&tarball).current_dir(&base))?;
    eprintln!("xtask: building {} (CPython {} {}, once, a few minutes)", b.name, b.version, b.flags.join(" "));
    let mut configure = Command::new("./configure");
    configure.args(b.flags).args(["--disable-test-modules", "--quiet"]).current_dir(&src);
    if let Some(cc) = b.cc {
        configure.env("CC", cc);
    }
    if b.jit() {
        // Not a pyenv shim, which may name a version it does not have.
        configure.env("PYTHON_FOR_REGEN", "/usr/bin/python3");
    }
    if b.installed {
        configure.arg(format!("--prefix={}", prefix.display()));
        configure.env("LDFLAGS", format!("-Wl,--strip-all -Wl,-rpath={}", prefix.join("lib").display()));
    }
    sh(&mut configure)?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    sh(Command::new("make").args(["-j", &jobs, "--quiet"]).args(b.targets).current_dir(&src))?;
    if b.installed {
        if prefix.exists() {
            fs::remove_dir_all(&prefix)?;
        }
        sh(Command::new("make").args(["install", "--quiet"]).current_dir(&src))?;
    }
    fs::write(&stamp, b.flags.join(" "))?;
    Ok(python)
}

/// `b`'s tarball in `base`, downloaded and checked if missing.
fn download(b: &Build, base: &std::path::Path) -> Result<PathBuf> {
    let tarball = base.join(format!("Python-{}.tar.xz", b.version));
    if tarball.exists() {
        return Ok(tarball);
    }
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
    Ok(tarball)
}
