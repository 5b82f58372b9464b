//! Process lifecycle under the detector: exiting while attached, starting
//! a command so it is watched from its first Python call, and the detector's
//! own end (a duration, a signal, its reader going away).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use detector_tests::{Dump, Fixture, STEP_TIMEOUT, detector_bin, for_each_interpreter, interpreters};

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

/// `dump ... | head -2`: once its reader is gone, the dump detaches and
/// ends, although the process it watches lives on.
#[test]
fn dump_ends_when_its_reader_goes_away() {
    let i = interpreters().into_iter().find(|i| i.name.starts_with("pyenv") && i.minor == 12).unwrap();
    let mut fixture = Fixture::start(&i, "plain");
    let mut dump = Command::new(detector_bin())
        .args(["dump", "--format", "json", "--strategy", "per-call", "--target", "wl.plain:f"])
        .args(["--pid", &fixture.pid().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dump.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("\"attached\""), "the first line is the attach");
    fixture.go();
    assert!(lines.next().unwrap().unwrap().contains("\"hit\""));
    // The reader goes away as `head` would; the hits after it find no one.
    drop(lines);
    fixture.wait_done();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let status = loop {
        if let Some(status) = dump.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the dump runs on without a reader");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // Detached, not killed with it: the process finishes normally.
    fixture.finish();
}
