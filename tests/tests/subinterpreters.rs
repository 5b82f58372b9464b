//! Every interpreter in a process: a subinterpreter has its own modules,
//! code objects and functions. Made after the attach, it is found as it
//! imports a target's module, and its calls are counted exactly under
//! every strategy, like the main interpreter's.

use detector_tests::{Dump, Fixture, for_each_interpreter};

const F: &str = "wl.subinterp_mod:f";
const DECOY: &str = "wl.subinterp_mod:decoy";

#[test]
fn calls_in_subinterpreters_made_after_the_attach_are_counted_exactly() {
    for_each_interpreter(|i| {
        // `_xxsubinterpreters` from 3.12, `_interpreters` from 3.13; the
        // switch builds are made without either extension (pyenv's 3.13
        // covers that version).
        if i.minor < 12 || i.name.starts_with("switch") {
            return;
        }
        for strategy in ["watch", "per-call"] {
            let mut fixture = Fixture::start(i, "subinterp");
            fixture.go();
            let mut d = Dump::attach_with(fixture.pid(), &[F, DECOY], &["--strategy", strategy]);
            let attached = detector_tests::attached_report(&d.seen[0]).process;
            assert_eq!(attached.strategy, strategy, "{}: {attached:?}", i.name);
            fixture.call("main", 10);
            let armed_f =
                |v: &serde_json::Value| v["type"] == "armed" && v["targets"].as_array().unwrap().iter().any(|t| t == F);
            for (k, n) in [7, 3].into_iter().enumerate() {
                assert_eq!(fixture.ask("new"), "ok");
                if strategy == "watch" {
                    // Its module's body ran in the new interpreter: its f
                    // and decoy are armed (a call before that is not seen).
                    let deadline = std::time::Instant::now() + detector_tests::STEP_TIMEOUT;
                    while d.seen.iter().filter(|v| armed_f(v)).count() <= k {
                        assert!(std::time::Instant::now() < deadline, "{}: interpreter {k} not armed", i.name);
                        d.poll();
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
                fixture.call("sub", n);
                assert_eq!(fixture.ask("end"), "ok");
            }
            fixture.call("main", 1);
            let s = d.stop();
            fixture.finish();
            s.assert_counts(&[(F, 21), (DECOY, 0)]);
        }
    });
}
