//! Who called a target: at a target's first hit the kernel records the
//! frames above it, and the hit says which of them is the first of user
//! code (its file, function and line), skipping the standard library's, on
//! every interpreter and under both strategies.

use detector::agent::callers::Caller;
use detector_tests::{Dump, Fixture, Interpreter, for_each_interpreter};

const DECODE: &str = "json.decoder:JSONDecoder.decode";

/// The line of `needle` in the fixture `wl/callers.py`.
fn line_of(needle: &str) -> u32 {
    let source = std::fs::read_to_string(detector_tests::fixtures_dir().join("wl/callers.py")).unwrap();
    source.lines().position(|l| l.contains(needle)).expect("a line of the fixture") as u32 + 1
}

/// The caller each hit reports, by calling `name` `n` times.
fn callers_of(interp: &Interpreter, strategy: &str, name: &str, n: u32) -> Vec<Option<Caller>> {
    let mut fixture = Fixture::start(interp, "callers");
    let mut dump = Dump::attach_with(fixture.pid(), &[DECODE], &["--strategy", strategy]);
    fixture.go();
    fixture.call(name, n);
    dump.wait_hits(DECODE, n as usize);
    let summary = dump.stop();
    fixture.finish();
    let hits = summary.hits.iter().filter(|h| h["target"] == DECODE);
    hits.map(|h| serde_json::from_value(h["caller"].clone()).ok()).collect()
}

#[test]
fn the_first_caller_of_user_code_comes_with_the_hits() {
    for_each_interpreter(|interp| {
        let path = interp.fixtures.join("wl/callers.py").display().to_string();
        for strategy in ["per-call", "watch"] {
            // Through `json.loads`, a frame of the standard library, skipped.
            let parse = Caller { path: path.clone(), symbol: "parse".into(), line: line_of("json.loads(") };
            let got = callers_of(interp, strategy, "parse", 3);
            assert_eq!(got, vec![Some(parse.clone()); 3], "{strategy}: every hit says who first called");
            let direct = Caller { path: path.clone(), symbol: "direct".into(), line: line_of("DECODER.decode(") };
            assert_eq!(callers_of(interp, strategy, "direct", 1), [Some(direct)], "{strategy}");
            // Called by C code (3.12 puts an entry frame of its own between).
            let via_c = Caller { path: path.clone(), symbol: "via_c".into(), line: line_of("map(DECODER.decode") };
            assert_eq!(callers_of(interp, strategy, "via_c", 1), [Some(via_c)], "{strategy}: through C");
            // On a thread started after the attach: a watchpoint trap finds
            // its frames through its own thread state.
            let on_thread = callers_of(interp, strategy, "threaded", 2);
            assert_eq!(on_thread, vec![Some(parse.clone()); 2], "{strategy}: on a thread of its own");
        }
    });
}
