//! The interpreters the tests run on: every pyenv build from 3.8 to 3.13,
//! Debian's stripped `/usr/bin/python3.11`, Debian's 3.14 and 3.15 and their
//! debug builds in a debootstrapped root filesystem run under `chroot` (a
//! process "in a container": its binary is only reachable through
//! `/proc/PID/root`), and the builds xtask makes from the upstream tarballs ([`builds`]): a
//! 3.13 without computed gotos (handlers reached through a `switch`), a
//! 3.15 with DWARF, 3.14 and 3.15 with the tail-calling interpreter, an
//! optimised shared 3.14, and free-threaded 3.14 and 3.15.

use std::path::{Path, PathBuf};

/// One interpreter.
#[derive(Clone, Debug)]
pub struct Interpreter {
    /// Name for messages, e.g. `pyenv-3.12.1`.
    pub name: String,
    /// Minor version.
    pub minor: u8,
    /// Built without the GIL (`--disable-gil`).
    pub free_threaded: bool,
    /// Command prefix that runs a script: `[python]` or `[chroot, ROOT, python]`.
    pub argv: Vec<String>,
    /// The fixtures directory as this interpreter sees it.
    pub fixtures: PathBuf,
    /// Root filesystem, for chrooted interpreters.
    pub rootfs: Option<PathBuf>,
}

const PYENV_MINORS: [u8; 6] = [8, 9, 10, 11, 12, 13];

/// pyenv's newest build of 3.`minor`: its version and interpreter; panics
/// if there is none.
pub fn pyenv_python(minor: u8) -> (String, PathBuf) {
    let pyenv = pyenv_root();
    let prefix = format!("3.{minor}.");
    let found = std::fs::read_dir(pyenv.join("versions")).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.strip_prefix(&prefix).is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit())))
            .max()
    });
    let version = found.unwrap_or_else(|| panic!("no pyenv build of 3.{minor} in {}", pyenv.display()));
    let python = pyenv.join("versions").join(&version).join("bin").join(format!("python3.{minor}"));
    assert!(python.exists(), "{} is missing", python.display());
    (version, python)
}

impl Interpreter {
    /// The probes every attached mode keeps: code deallocation, and the
    /// tier-2 optimizer's entry where the JIT is built in (Debian's builds).
    pub fn guards(&self) -> usize {
        1 + usize::from(self.rootfs.is_some())
    }
}

/// The name of xtask's builds with the JIT on by default starts so.
pub const JIT_BUILD_PREFIX: &str = "jit-";

/// An interpreter xtask built from source.
#[derive(Clone, Debug)]
pub struct Build {
    /// Name for messages, e.g. `tailcall-3.14`.
    pub name: String,
    /// Minor version.
    pub minor: u8,
    /// Built without the GIL (`--disable-gil`).
    pub free_threaded: bool,
    /// The interpreter, in its build tree, with symbols and DWARF.
    pub python: PathBuf,
    /// A copy of it without either, if the tests want one.
    pub stripped: Option<PathBuf>,
}

/// The builds xtask made, from its manifest (`DETECTOR_TEST_BUILDS`: a line
/// per build of name, minor (`14t` if free-threaded), interpreter and
/// stripped copy, tab-separated);
/// panics naming any that is missing.
pub fn builds() -> Vec<Build> {
    let manifest = std::env::var("DETECTOR_TEST_BUILDS")
        .expect("DETECTOR_TEST_BUILDS is not set: run the integration tests with `cargo xtask test`");
    let path = |p: &str| {
        let p = PathBuf::from(p);
        assert!(p.exists(), "{} is missing", p.display());
        p
    };
    manifest
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [name, minor, python, stripped] = fields[..] else { panic!("manifest line {line:?}") };
            let (minor, free_threaded) = minor.strip_suffix('t').map_or((minor, false), |m| (m, true));
            Build {
                name: name.to_owned(),
                minor: minor.parse().unwrap_or_else(|_| panic!("manifest line {line:?}")),
                free_threaded,
                python: path(python),
                stripped: (!stripped.is_empty()).then(|| path(stripped)),
            }
        })
        .collect()
}

/// Every interpreter; panics naming any that is missing.
pub fn interpreters() -> Vec<Interpreter> {
    let fixtures = crate::fixtures_dir();
    let mut out = Vec::new();
    for minor in PYENV_MINORS {
        let (version, python) = pyenv_python(minor);
        out.push(Interpreter {
            name: format!("pyenv-{version}"),
            minor,
            free_threaded: false,
            argv: vec![python.display().to_string()],
            fixtures: fixtures.clone(),
            rootfs: None,
        });
    }
    let debian = Path::new("/usr/bin/python3.11");
    assert!(debian.exists(), "Debian's /usr/bin/python3.11 is missing");
    out.push(Interpreter {
        name: "debian-3.11".into(),
        minor: 11,
        free_threaded: false,
        argv: vec![debian.display().to_string()],
        fixtures: fixtures.clone(),
        rootfs: None,
    });
    let rootfs_base = std::env::var_os("DETECTOR_TEST_ROOTFS")
        .map(PathBuf::from)
        .expect("DETECTOR_TEST_ROOTFS is not set: run the integration tests with `cargo xtask test`");
    let root = rootfs_base.join("sid-python3.14");
    install_fixtures(&root);
    // The JIT on by default leaves every per-interpreter workload blind:
    // the JIT's own tests run that build.
    for b in builds().into_iter().filter(|b| !b.name.starts_with(JIT_BUILD_PREFIX)) {
        out.push(Interpreter {
            name: b.name,
            minor: b.minor,
            free_threaded: b.free_threaded,
            argv: vec![b.python.display().to_string()],
            fixtures: fixtures.clone(),
            rootfs: None,
        });
    }
    // Release builds, then the debug builds (`Py_DEBUG`) of the `-dbg` packages.
    for (minor, suffix) in [(14, ""), (15, ""), (14, "d"), (15, "d")] {
        let python = format!("/usr/bin/python3.{minor}{suffix}");
        assert!(root.join(&python[1..]).exists(), "no {python} in {}", root.display());
        out.push(Interpreter {
            name: format!("sid-3.{minor}{suffix}-chroot"),
            minor,
            free_threaded: false,
            argv: vec!["chroot".into(), root.display().to_string(), python],
            fixtures: PathBuf::from("/opt/detector-fixtures"),
            rootfs: Some(root.clone()),
        });
    }
    out
}

fn pyenv_root() -> PathBuf {
    if let Some(r) = std::env::var_os("PYENV_ROOT") {
        return PathBuf::from(r);
    }
    std::process::Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".pyenv"))
}

/// Copies the fixtures into the root filesystem, once per test process.
fn install_fixtures(root: &Path) {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| copy_dir(&crate::fixtures_dir(), &root.join("opt/detector-fixtures")));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "__pycache__" {
                copy_dir(&e.path(), &dest);
            }
        } else {
            // Write to a temporary name and rename: tests run in parallel.
            let tmp = to.join(format!(".{}.{}", e.file_name().to_string_lossy(), std::process::id()));
            std::fs::copy(e.path(), &tmp).unwrap();
            std::fs::rename(&tmp, &dest).unwrap();
        }
    }
}

/// Where xtask installed the dependency-version environments
/// (`DETECTOR_TEST_VERSIONS`): virtualenvs `old` (six 1.16.0), `new` (six
/// 1.17.0) and `editable`, a `userbase` and a zipapp `app.pyz`.
pub fn dist_environments() -> PathBuf {
    PathBuf::from(std::env::var("DETECTOR_TEST_VERSIONS").expect("DETECTOR_TEST_VERSIONS (set by cargo xtask test)"))
}

/// The interpreter of the dependency-version virtualenv `name` (a 3.12).
pub fn dist_venv(name: &str) -> Interpreter {
    let python = dist_environments().join(name).join("bin/python");
    Interpreter {
        name: format!("venv-{name}"),
        minor: 12,
        free_threaded: false,
        argv: vec![python.display().to_string()],
        fixtures: crate::fixtures_dir(),
        rootfs: None,
    }
}
