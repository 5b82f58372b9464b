//! What the benches share: running a timed fixture side by side with the
//! detector.

use detector_tests::{Dump, Fixture};

/// Lets `fixture` run (under `detector`, if any), stops both, and returns
/// the number its output line gives after `prefix` (NaN if none).
pub fn timed(mut fixture: Fixture, detector: Option<Dump>, prefix: &str) -> f64 {
    fixture.go();
    let line = fixture.read_line();
    fixture.wait_done();
    if let Some(d) = detector {
        d.stop();
    }
    fixture.finish();
    line.strip_prefix(prefix).and_then(|v| v.trim().parse().ok()).unwrap_or(f64::NAN)
}
