//! `detector inspect` on every interpreter: versions, probe sites, where
//! each offset and handler came from; the built-in offset tables checked
//! against DWARF; and bad input refused with one line, never a panic.

use std::{collections::BTreeSet, process::Command};

use detector_tests::{Fixture, Interpreter, builds, detector_bin, for_each_interpreter, interpreters};
use serde_json::Value;

fn inspect(what: &str) -> Result<Value, String> {
    let out = Command::new(detector_bin()).args(["inspect", "--format", "json", what]).output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn inspect_process(i: &Interpreter) -> Value {
    let fixture = Fixture::start(i, "plain");
    let a = inspect(&fixture.pid().to_string()).unwrap_or_else(|e| panic!("inspect: {e}"));
    fixture.finish();
    a
}

fn offset_sources(a: &Value) -> BTreeSet<String> {
    a["offsets"].as_object().unwrap().values().map(|o| o["source"].as_str().unwrap().to_owned()).collect()
}

fn site_handlers(a: &Value) -> Vec<String> {
    a["sites"].as_array().unwrap().iter().map(|s| s["handler"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn every_interpreter_is_analysed() {
    for_each_interpreter(|i| {
        let a = inspect_process(i);
        let version = a["version"].as_str().unwrap();
        assert!(version.starts_with(&format!("3.{}.", i.minor)), "{version}");
        let debug = i.name.ends_with("d-chroot");
        let flavour = match (debug, i.free_threaded) {
            (true, _) => "debug",
            (_, true) => "free-threaded",
            _ => "release",
        };
        assert_eq!(a["flavour"], flavour, "{}", i.name);
        let mut expected = vec!["_PyEval_EvalFrameDefault"];
        expected.extend(match i.minor {
            8..=10 => vec!["PyFunction_NewWithQualName", "code_dealloc", "PyEval_EvalCode"],
            11 => vec!["code_dealloc", "PyEval_EvalCode", "RESUME", "RESUME_QUICK"],
            12 => vec!["code_dealloc", "PyEval_EvalCode", "RESUME", "INSTRUMENTED_RESUME"],
            13 | 14 => vec!["code_dealloc", "PyEval_EvalCode", "RESUME", "RESUME_CHECK", "INSTRUMENTED_RESUME"],
            _ => vec![
                "code_dealloc",
                "PyEval_EvalCode",
                "RESUME",
                "RESUME_CHECK",
                "RESUME_CHECK_JIT",
                "INSTRUMENTED_RESUME",
            ],
        });
        // Debian's builds carry the JIT: its start is probed.
        if i.rootfs.is_some() {
            expected.push("_PyOptimizer_Optimize");
        }
        assert_eq!(site_handlers(&a), expected);
        // Sites passed on every call are emulated; module execution is
        // rare, and single-stepped on some builds (3.8 and 3.9 start
        // `PyEval_EvalCode` with `sub rsp`): microseconds per import.
        for s in a["sites"].as_array().unwrap().iter().filter(|s| s["role"] != "module_exec") {
            assert_eq!(s["emulated"], true, "{s}");
        }
        assert_eq!(a["disagreements"], Value::Array(vec![]), "sources disagree");
        if i.free_threaded {
            // Its hot site decides from the flags whether the frame runs this
            // thread's copy of the bytecode: no read per hit.
            let check =
                a["sites"].as_array().unwrap().iter().find(|s| s["handler"] == "RESUME_CHECK").unwrap()["check"]
                    .clone();
            assert_eq!(check, detector_common::CHECK_BRANCH_THREAD_COPY, "{}", i.name);
        }
        let sources = offset_sources(&a);
        let handlers = &a["handlers"]["source"];
        match i.name.as_str() {
            // Symbols and DWARF in the library (or the switch build's binary).
            n if n.starts_with("pyenv") || ["switch-3.13", "build-3.15", "ft-3.14", "ft-3.15"].contains(&n) => {
                assert_eq!(a["debug_info"]["kind"], "embedded");
                if i.minor >= 11 {
                    assert_eq!(handlers, "dwarf_labels");
                }
            }
            // Each handler a function of its own, named by its symbol.
            "tailcall-3.14" | "tailcall-3.15" => {
                assert_eq!(a["debug_info"]["kind"], "embedded");
                assert_eq!(handlers, "tail_call_functions");
            }
            // Stripped, no debug file on the host: the dispatch table by scan.
            "debian-3.11" => {
                assert_eq!(a["debug_info"], Value::Null);
                assert_eq!(handlers, "scan");
                assert_eq!(sources, BTreeSet::from(["builtin".to_owned()]));
            }
            // As the official images: a shared libpython, LTO, stripped to
            // its dynamic symbols. The table by scan, offsets from the
            // process's _Py_DebugOffsets and the built-in table.
            "lto-shared-3.14" => {
                assert_eq!(a["debug_info"], Value::Null);
                assert_eq!(handlers, "scan");
                assert!(a["object"].as_str().unwrap().contains("libpython3.14.so"), "{}", a["object"]);
                assert_eq!(sources, BTreeSet::from(["builtin".to_owned(), "debug_offsets".to_owned()]));
            }
            // Stripped, but the container has the debug file (python3.1x-dbg),
            // found by build id under /proc/PID/root.
            // Debug builds carry their DWARF.
            "sid-3.14d-chroot" | "sid-3.15d-chroot" => {
                assert_eq!(a["debug_info"]["kind"], "embedded");
                assert_eq!(handlers, "dwarf_labels");
                assert_eq!(sources, BTreeSet::from(["debug_offsets".to_owned(), "dwarf".to_owned()]));
            }
            "sid-3.14-chroot" | "sid-3.15-chroot" => {
                assert_eq!(a["debug_info"]["kind"], "build_id");
                assert_eq!(handlers, "dwarf_labels");
                assert_eq!(sources, BTreeSet::from(["debug_offsets".to_owned(), "dwarf".to_owned()]));
            }
            other => panic!("no expectations for {other}"),
        }
        if i.minor >= 13 {
            assert_eq!(a["version_source"], "debug_offsets");
        }
    });
}

#[test]
fn builtin_tables_equal_dwarf() {
    // Every offset of every build with DWARF comes from DWARF (or the
    // process's _Py_DebugOffsets) and no source disagrees with the built-in
    // table it overrode: the tables cannot rot unnoticed.
    for_each_interpreter(|i| {
        if i.name == "debian-3.11" || i.name == "lto-shared-3.14" {
            return; // no DWARF for them on this machine
        }
        let a = inspect_process(i);
        assert_eq!(a["disagreements"], Value::Array(vec![]));
        let sources = offset_sources(&a);
        assert!(!sources.contains("builtin"), "offsets still from the built-in table: {:?}", a["offsets"]);
    });
}

#[test]
fn stripped_binary_in_a_root_filesystem_is_analysed_by_scan() {
    let root = interpreters().into_iter().find_map(|i| i.rootfs).unwrap();
    // 3.15's has RESUME_CHECK_JIT too, and its table sits in `.data` beside
    // the JIT's tracing table; both probe the JIT's start.
    for (python, sites) in [("python3.14", 7), ("python3.15", 8)] {
        let a = inspect(&root.join("usr/bin").join(python).display().to_string()).unwrap();
        assert_eq!(a["debug_info"], Value::Null, "the host has no debug file for {python}");
        assert_eq!(a["handlers"]["source"], "scan", "{python}");
        assert_eq!(a["position_independent"], false, "{python}");
        assert_eq!(site_handlers(&a).len(), sites, "{python}");
    }
}

fn assert_refused(what: &str, reason: &str) {
    let out = Command::new(detector_bin()).args(["inspect", what]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
    assert!(err.starts_with("detector: ") && err.contains(reason), "{what}: {err:?} lacks {reason:?}");
}

#[test]
fn truncated_and_random_files_are_refused_without_panic() {
    let dir = std::env::temp_dir().join(format!("detector-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lib = interpreters()
        .into_iter()
        .find(|i| i.name.starts_with("pyenv") && i.minor == 12)
        .map(|i| {
            std::path::PathBuf::from(&i.argv[0]).parent().unwrap().parent().unwrap().join("lib/libpython3.12.so.1.0")
        })
        .unwrap();
    let data = std::fs::read(&lib).unwrap();
    for len in [16, 64, 4096, 1 << 20, data.len() / 2] {
        let p = dir.join(format!("truncated-{len}"));
        std::fs::write(&p, &data[..len]).unwrap();
        assert_refused(&p.display().to_string(), ": ");
    }
    // Pseudo-random bytes (xorshift), and an ELF header followed by them.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = dir.join("random");
    std::fs::write(&p, &random).unwrap();
    assert_refused(&p.display().to_string(), "not an ELF object");
    let mut elfish = data[..64].to_vec();
    elfish.extend(&random);
    let p = dir.join("elf-header-then-noise");
    std::fs::write(&p, &elfish).unwrap();
    assert_refused(&p.display().to_string(), ": ");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `inspect` of the build named `name`, with its symbols and stripped.
fn with_and_without_symbols(name: &str) -> (Value, Value) {
    let b = builds().into_iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no build {name}"));
    (inspect(&b.python.display().to_string()).unwrap(), inspect(&stripped(name)).unwrap())
}

/// Where each probe site of an analysis is.
fn site_addrs(a: &Value) -> Vec<Value> {
    a["sites"].as_array().unwrap().iter().map(|s| s["addr"].clone()).collect()
}

/// The stripped copy of the build named `name`.
fn stripped(name: &str) -> String {
    let b = builds().into_iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no build {name}"));
    b.stripped.unwrap_or_else(|| panic!("no stripped copy of {name}")).display().to_string()
}

#[test]
fn stripped_python_without_computed_gotos_is_refused() {
    // With DWARF it is analysed (labels name the handlers: it is one of the
    // interpreters every count test runs on); stripped, nothing does.
    assert_refused(&stripped("switch-3.13"), "cannot find the opcode handlers");
}

#[test]
fn stripped_tail_calling_builds_are_analysed_by_scan() {
    // Without the handlers' symbols, the table of their addresses is found
    // by scan: the same sites, and the same dispatch loads (a new frame's
    // first among them, in the function the evaluation function calls).
    for name in ["tailcall-3.14", "tailcall-3.15"] {
        let (with, without) = with_and_without_symbols(name);
        assert_eq!(with["handlers"]["source"], "tail_call_functions", "{name}");
        assert_eq!(without["handlers"]["source"], "scan", "{name}");
        assert_eq!(without["debug_info"], Value::Null, "{name}");
        assert_eq!(with["handlers"]["table"], without["handlers"]["table"], "{name}");
        assert_eq!(site_addrs(&with), site_addrs(&without), "{name}");
        assert!(with["dispatch"]["count"].as_u64().unwrap() > 0, "{name}: {}", with["dispatch"]);
        assert_eq!(with["dispatch"], without["dispatch"], "{name}");
    }
}

#[test]
fn stripped_free_threaded_builds_take_the_same_offsets_from_their_tables() {
    // As a standalone free-threaded build ships: no DWARF, so each offset
    // comes from `_Py_DebugOffsets` or, where it has none, the built-in
    // free-threaded table. Every one equals what DWARF gives.
    for name in ["ft-3.14", "ft-3.15"] {
        let (with, without) = with_and_without_symbols(name);
        assert_eq!(without["flavour"], "free-threaded", "{name}");
        assert_eq!(without["handlers"]["source"], "scan", "{name}");
        let sources = offset_sources(&without);
        assert_eq!(sources, BTreeSet::from(["builtin".to_owned(), "debug_offsets".to_owned()]), "{name}");
        let values = |a: &Value| {
            let offsets = a["offsets"].as_object().unwrap();
            offsets.iter().map(|(k, v)| (k.clone(), v["value"].clone())).collect::<Vec<_>>()
        };
        assert_eq!(values(&with), values(&without), "{name}");
        assert_eq!(site_addrs(&with), site_addrs(&without), "{name}");
    }
}

#[test]
fn the_jit_flag_offset_equals_dwarf() {
    // Debian's 3.14 and 3.15 carry the tier-2 optimizer. Analysed in their
    // container, with the debug files there, the flag's offset comes from
    // DWARF; from the host, without them, from the built-in value: the same.
    for i in interpreters().into_iter().filter(|i| i.rootfs.is_some() && !i.name.ends_with("d-chroot")) {
        let live = inspect_process(&i);
        assert_eq!(live["tier2"]["jit_flag"]["source"], "dwarf", "{}", i.name);
        let path = i.rootfs.as_ref().unwrap().join(i.argv.last().unwrap().trim_start_matches('/'));
        let file = inspect(&path.display().to_string()).unwrap();
        assert_eq!(file["tier2"]["jit_flag"]["source"], "builtin", "{}", i.name);
        assert_eq!(file["tier2"]["jit_flag"]["offset"], live["tier2"]["jit_flag"]["offset"], "{}", i.name);
    }
    // Builds configured without it have none.
    for i in interpreters().into_iter().filter(|i| i.name.starts_with("pyenv-3.13") || i.name == "build-3.15") {
        assert_eq!(inspect_process(&i)["tier2"], Value::Null, "{}", i.name);
    }
}
