//! Process lifecycle under the detector: exiting while attached, and
//! starting a command so it is watched from its first Python call.

use detector_tests::{Dump, Fixture, for_each_interpreter};

#[test]
fn process_exiting_while_attached() {
    for_each_interpreter(|i| {
        let mut fixture = Fixture::start(i, "exits");
        let dump = Dump::attach(fixture.pid(), &["wl.exits:f"]);
        fixture.go();
        assert_eq!(fixture.wait_exit(), Some(0));
        // The detector notices the exit by itself, reports it and the counts.
        let s = dump.collect();
        assert!(s.exited, "no exited line");
        s.assert_counts(&[("wl.exits:f", 8)]);
    });
}

#[test]
fn command_watched_from_its_first_call() {
    for_each_interpreter(|i| {
        let mut cmd = i.argv.clone();
        cmd.push(i.fixtures.join("run.py").display().to_string());
        cmd.extend(["plain".into(), "--now".into()]);
        let s = Dump::command(&["wl.plain:f", "wl.plain:g"], &cmd).collect();
        assert!(s.exited, "no exited line");
        s.assert_counts(&[("wl.plain:f", 25), ("wl.plain:g", 3)]);
    });
}

#[test]
fn stops_after_duration_with_exact_counts() {
    for_each_interpreter(|i| {
        let mut fixture = Fixture::start(i, "plain");
        let dump = Dump::attach_with(fixture.pid(), &["wl.plain:f"], &["--duration", "3"]);
        fixture.go();
        fixture.wait_done();
        // No signal: the detector ends by itself and the process lives on.
        let s = dump.collect();
        assert!(!s.exited);
        s.assert_counts(&[("wl.plain:f", 25)]);
        fixture.finish();
    });
}

#[test]
fn sigterm_detaches_with_exact_counts() {
    for_each_interpreter(|i| {
        let mut fixture = Fixture::start(i, "plain");
        let dump = Dump::attach(fixture.pid(), &["wl.plain:g"]);
        fixture.go();
        fixture.wait_done();
        dump.stop_with(libc::SIGTERM).assert_counts(&[("wl.plain:g", 3)]);
        // Detached: the process goes on and exits normally.
        fixture.finish();
    });
}
