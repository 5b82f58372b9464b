//! Bad input gets one clear line on stderr and a non-zero exit, and nothing
//! is attached.

use std::process::{Command, Stdio};

use detector_tests::{detector_bin, interpreters};

/// Runs the detector; returns (exit code, stderr).
fn detector(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(detector_bin()).args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_refused(args: &[&str], reason: &str) {
    let (code, err) = detector(args);
    assert_ne!(code, Some(0), "{args:?} succeeded");
    let err = err.trim();
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line:\n{err}");
    assert!(err.starts_with("detector: ") && err.contains(reason), "{args:?}: {err:?} lacks {reason:?}");
}

struct Sleeper(std::process::Child);

impl Sleeper {
    fn new(argv: &[&str]) -> Self {
        Sleeper(Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::piped()).spawn().unwrap())
    }
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn malformed_targets() {
    for (target, reason) in [
        ("nocolon", "exactly one `:`"),
        ("a:b:c", "exactly one `:`"),
        ("m:", "component \"\""),
        ("m f:g", "whitespace"),
        ("1m:f", "not a Python identifier"),
        ("m:f.<locals>", "<locals>"),
    ] {
        assert_refused(&["dump", "--pid", "1", "--target", target], reason);
    }
}

#[test]
fn not_a_python_process() {
    let p = Sleeper::new(&["sleep", "60"]);
    assert_refused(&["dump", "--pid", &p.pid(), "--target", "m:f"], "is not a Python process");
}

#[test]
fn no_such_process() {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id().to_string();
    c.wait().unwrap();
    assert_refused(&["dump", "--pid", &pid, "--target", "m:f"], "does not exist");
}

#[test]
fn unsupported_interpreter_version() {
    // Python 3.7 is installed by pyenv next to the supported versions.
    let python37 = interpreters()[0].argv[0].replace("3.8", "3.7");
    let dir = std::path::Path::new(&python37).parent().unwrap().parent().unwrap().parent().unwrap();
    let v37 = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("3.7."))
        .expect("a pyenv build of Python 3.7 to refuse");
    let python = v37.join("bin/python3.7").display().to_string();
    let p = Sleeper::new(&[&python, "-c", "import sys; sys.stdin.read()"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_refused(&["dump", "--pid", &p.pid(), "--target", "m:f"], "supported versions are 3.8 to 3.15");
    // Started by the detector, it is refused the same way and not left running.
    assert_refused(&["dump", "--target", "m:f", "--", &python, "-c", "import time; time.sleep(60)"], "3.7");
}

#[test]
fn missing_privileges() {
    let p = Sleeper::new(&["sleep", "60"]);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(detector_bin())
        .args(["dump", "--pid", &p.pid(), "--target", "m:f"])
        .output()
        .expect("setpriv (util-linux) runs the detector unprivileged");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("insufficient privileges") && err.contains("CAP_BPF"), "{err}");
}

#[test]
fn inspect_refuses_what_is_not_cpython() {
    assert_refused(&["inspect", "/bin/sh"], "not a CPython interpreter");
    assert_refused(&["inspect", "/etc/hostname"], "not an ELF object");
    let p = Sleeper::new(&["sleep", "60"]);
    assert_refused(&["inspect", &p.pid()], "is not a Python process");
}

/// An interpreter binary in the test root filesystem.
fn rootfs_python(name: &str) -> (String, String) {
    let root = interpreters().into_iter().find_map(|i| i.rootfs).expect("a chroot interpreter");
    let bin = root.join("usr/bin").join(name);
    assert!(bin.exists(), "{} is missing", bin.display());
    (root.display().to_string(), bin.display().to_string())
}

/// Debian's 3.15 as `/usr/local/bin/NAME` in the root filesystem, with the
/// `u64` at `at` in its `_Py_DebugOffsets` (found by cookie and version)
/// set to `value`: a build this detector has not seen.
fn patched_315(name: &str, at: usize, value: u64) -> String {
    let (root, bin) = rootfs_python("python3.15");
    let mut data = std::fs::read(&bin).unwrap();
    // The cookie also appears in code (compared as an immediate): the table
    // is where a 3.15 version follows it.
    let start = data
        .windows(16)
        .position(|w| &w[..8] == b"xdebugpy" && u64::from_le_bytes(w[8..].try_into().unwrap()) >> 16 == 0x030f)
        .expect("Debian's 3.15 _Py_DebugOffsets");
    data[start + at..start + at + 8].copy_from_slice(&value.to_le_bytes());
    let path = std::path::Path::new(&root).join("usr/local/bin").join(name);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    format!("/usr/local/bin/{name}")
}

#[test]
fn a_debug_offsets_table_laid_out_otherwise_is_refused_unless_dwarf_says() {
    let (root, _) = rootfs_python("python3.15");
    // Its thread state's size below its own members' offsets: the table is
    // not laid out as 3.15's (as a later release could change it).
    let relaid = patched_315("python3.15-relaid", 176, 100);
    assert_refused(&["inspect", &format!("{root}{relaid}")], "not laid out as 3.15's: thread_state.");
    // In the root filesystem, Debian's debug file for the build id has the
    // offsets: analysed from DWARF, and said so.
    let p = Sleeper::new(&["chroot", &root, &relaid, "-c", "import sys; sys.stdin.read()"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = Command::new(detector_bin()).args(["inspect", "--format", "json", &p.pid()]).output().unwrap();
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect's JSON");
    let warnings = a["warnings"].to_string();
    assert!(warnings.contains("not below its struct's size 100: using DWARF"), "{warnings}");
    assert_eq!(a["offsets"]["tstate_native_thread_id"]["source"], "dwarf", "{a}");
}

#[test]
fn too_new_builds_are_refused() {
    let (root, _) = rootfs_python("python3.15");
    let future = patched_315("python3.16", 8, 0x0310_00f0);
    let reason = "CPython 3.16.0: supported versions are 3.8 to 3.15";
    assert_refused(&["inspect", &format!("{root}{future}")], reason);
    // The same refusal for a running process in the chroot (a container).
    let p = Sleeper::new(&["chroot", &root, &future, "-c", "import sys; sys.stdin.read()"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_refused(&["dump", "--pid", &p.pid(), "--target", "m:f"], reason);
}

#[test]
fn a_debug_build_without_dwarf_is_refused() {
    // Debian's debug build, stripped: no DWARF in it, and no debug file for
    // its build id.
    let (_, bin) = rootfs_python("python3.14d");
    let stripped = std::env::temp_dir().join(format!("python3.14d-stripped-{}", std::process::id()));
    let status = Command::new("strip").arg("-o").arg(&stripped).arg(&bin).status().unwrap();
    assert!(status.success(), "strip {bin}");
    assert_refused(
        &["inspect", &stripped.display().to_string()],
        "is a debug build (Py_DEBUG) without DWARF: its layouts are read from DWARF only",
    );
    std::fs::remove_file(&stripped).unwrap();
}

/// Hides `PYTHON_JIT` from `/proc/PID/environ` once the interpreter has
/// read it (renames it in the block the kernel shows), as a build that turns
/// the JIT on by default would look; then waits.
const HIDE_PYTHON_JIT: &str = "import ctypes, sys
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_void_p
ctypes.memmove(libc.getenv(b'PYTHON_JIT') - 2, b'X', 1)
sys.stdin.read()";

#[test]
fn a_process_running_the_jit_is_refused() {
    let (root, _) = rootfs_python("python3.15");
    let wait = "import sys; sys.stdin.read()";
    for python in ["/usr/bin/python3.14", "/usr/bin/python3.15"] {
        let run = |env: &str, args: &[&str]| {
            let mut argv = vec!["chroot", &root, "/usr/bin/env", env, python];
            argv.extend(args);
            Sleeper::new(&argv)
        };
        let on = run("PYTHON_JIT=1", &["-c", wait]);
        let hidden = run("PYTHON_JIT=1", &["-c", HIDE_PYTHON_JIT]);
        // CPython ignores the environment under -I: the JIT stays off.
        let isolated = run("PYTHON_JIT=1", &["-I", "-c", wait]);
        let off = run("PYTHON_JIT=0", &["-c", wait]);
        let why = "runs with the JIT on (its main interpreter's jit flag is set)";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let renamed = || {
            std::fs::read(format!("/proc/{}/environ", hidden.pid())).unwrap().windows(11).any(|w| w == b"PYTHON_JIX=")
        };
        while !renamed() {
            assert!(std::time::Instant::now() < deadline, "{python}: PYTHON_JIT not hidden");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_refused(&["dump", "--pid", &on.pid(), "--target", "m:f"], why);
        assert_refused(&["inspect", &hidden.pid()], why);
        for p in [&isolated, &off] {
            let (code, err) = detector(&["inspect", &p.pid()]);
            assert_eq!(code, Some(0), "{python}: {err}");
        }
    }
}
