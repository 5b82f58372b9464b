//! Every interpreter in a process: a subinterpreter has its own modules,
//! code objects and functions. Made after the attach, it is found as it
//! imports a target's module, and its calls are counted exactly under
//! every strategy, like the main interpreter's.

use detector_tests::{Dump, Fixture, Interpreter, for_each_interpreter};

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
        // A free-threaded build is probed per call whatever is asked.
        let strategies: &[&str] = if i.free_threaded { &["per-call"] } else { &["watch", "per-call"] };
        for &strategy in strategies {
            let mut fixture = Fixture::start(i, "subinterp");
            fixture.go();
            let mut d = Dump::attach_with(fixture.pid(), &[F, DECOY], &["--strategy", strategy]);
            let attached = detector_tests::attached_report(&d.seen[0]).process;
            assert_eq!(attached.strategy, strategy, "{}: {attached:?}", i.name);
            fixture.call("main", 10);
            // Where the `armed` lines that tell of the next interpreter start.
            let mut from = 0;
            for n in [7, 3] {
                let code = fixture.ask("new");
                if strategy == "watch" {
                    // Its own f is armed (its module's body ran): a call
                    // before that is not seen.
                    from = wait_for_f(&mut d, from, i, |codes| codes.contains(&code));
                }
                fixture.call("sub", n);
                assert_eq!(fixture.ask("end"), "ok");
                if strategy == "watch" {
                    // Its f is no longer watched: the next interpreter's
                    // may take its address.
                    from = wait_for_f(&mut d, from, i, |codes| !codes.contains(&code));
                }
            }
            fixture.call("main", 1);
            let s = d.stop();
            fixture.finish();
            s.assert_counts(&[(F, 21), (DECOY, 0)]);
        }
    });
}

/// Waits for an `armed` line from the `from`th on whose code objects for F
/// pass `check`; returns the index after it.
fn wait_for_f(d: &mut Dump, from: usize, i: &Interpreter, check: impl Fn(&[String]) -> bool) -> usize {
    let deadline = std::time::Instant::now() + detector_tests::STEP_TIMEOUT;
    loop {
        let found = d.seen.iter().enumerate().skip(from).find(|(_, v)| {
            v["type"] == "armed" && detector_tests::armed_report(v).code_objects.get(F).is_some_and(|c| check(c))
        });
        if let Some((at, _)) = found {
            return at + 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: f's code objects not armed as expected: {:?}",
            i.name,
            d.seen
        );
        d.poll();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
