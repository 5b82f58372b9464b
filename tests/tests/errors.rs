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
    assert_refused(&["dump", "--pid", &p.pid(), "--target", "m:f"], "supported versions are 3.8 to 3.14");
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

#[test]
fn too_new_and_debug_builds_are_refused() {
    for (name, reason) in
        [("python3.15", "supported versions are 3.8 to 3.14"), ("python3.14d", "is a debug build (Py_DEBUG)")]
    {
        let (root, bin) = rootfs_python(name);
        assert_refused(&["inspect", &bin], reason);
        // The same refusal for a running process in the chroot (a container).
        let p = Sleeper::new(&["chroot", &root, &format!("/usr/bin/{name}"), "-c", "import sys; sys.stdin.read()"]);
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_refused(&["dump", "--pid", &p.pid(), "--target", "m:f"], reason);
    }
}
