//! Where a target's body starts, found from outside before any call (the
//! groundwork of the watchpoint strategy): `detector inspect PID --target`
//! walks the process's objects read-only and names, for each definition, the
//! code object and the code unit that runs exactly once per body start.
//! Checked on every interpreter: plain functions, methods of two classes and
//! a decoy module (distinct code objects), generators (whose body does not
//! start at unit 0), closures found through `co_consts` before they exist as
//! functions, and clear reasons for what cannot be found.

use std::process::Command;

use detector_tests::{Fixture, Interpreter, detector_bin, for_each_interpreter};
use serde_json::Value;

fn bodies(i: &Interpreter, workload: &str, targets: &[&str]) -> Value {
    let fixture = Fixture::start(i, workload);
    let mut cmd = Command::new(detector_bin());
    cmd.args(["inspect", "--format", "json", &fixture.pid().to_string()]);
    for t in targets {
        cmd.args(["--target", t]);
    }
    let out = cmd.output().unwrap();
    fixture.finish();
    assert!(out.status.success(), "{}: {}", i.name, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["bodies"].clone()
}

/// The single body start of `target`: (code object, unit, opcode name).
fn one(b: &Value, target: &str) -> (u64, u64, String) {
    assert_eq!(b[target]["found"], "code", "{target}: {}", b[target]);
    let starts = b[target]["starts"].as_array().unwrap();
    assert_eq!(starts.len(), 1, "{target}: {starts:?}");
    let s = &starts[0];
    let (code, unit, addr) =
        (s["code"].as_u64().unwrap(), s["unit"].as_u64().unwrap(), s["unit_addr"].as_u64().unwrap());
    let op = s["opname"].as_str().unwrap().to_owned();
    // 3.11+ bytecode lies inside the code object; 3.8-3.9's is `co_code`.
    if op != "co_code[0]" {
        assert!(addr > code && addr < code + 512, "{target}: the unit lies inside its code object");
    }
    (code, unit, op)
}

#[test]
fn body_starts_are_found_before_the_first_call() {
    for_each_interpreter(|i| {
        // 3.8-3.10: the first instruction of `co_code`, whatever the function.
        let old = i.minor < 11;
        let b = bodies(i, "plain", &["wl.plain:f", "wl.plain:g"]);
        let (f, unit, op) = one(&b, "wl.plain:f");
        let (g, _, _) = one(&b, "wl.plain:g");
        assert_ne!(f, g);
        assert_eq!(unit, 0, "a plain function starts at its first unit");
        assert!(if old { op == "co_code[0]" } else { op.contains("RESUME") }, "{op}");

        let targets =
            ["wl.methods:A.f", "wl.methods:B.f", "wl.methods:f", "wl.decoy:A.f", "wl.methods:A.s", "wl.methods:A.c"];
        let b = bodies(i, "methods", &targets);
        let codes: Vec<u64> = targets.iter().map(|t| one(&b, t).0).collect();
        let mut distinct = codes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), codes.len(), "same names, different code objects: {codes:?}");

        // 3.11+ generators start with RETURN_GENERATOR and POP_TOP; closures
        // with COPY_FREE_VARS. Closures are found as constants of the outer
        // function.
        let b = bodies(i, "gens", &["wl.gens:gen"]);
        assert!(one(&b, "wl.gens:gen").1 >= if old { 0 } else { 2 }, "{}", b);
        let b = bodies(i, "closures", &["wl.closures:make.<locals>.inner"]);
        assert!(one(&b, "wl.closures:make.<locals>.inner").1 >= if old { 0 } else { 1 }, "{}", b);

        let b = bodies(i, "plain", &["wl.plain:nope", "wl.absent:f"]);
        assert!(b["wl.plain:nope"]["reason"].as_str().unwrap().contains("no such definition"));
        assert!(b["wl.absent:f"]["reason"].as_str().unwrap().contains("not imported"));
    });
}

#[test]
fn a_target_needs_a_process() {
    let out = Command::new(detector_bin())
        .args(["inspect", "/usr/bin/python3.11", "--target", "json:loads"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a process"));
}
