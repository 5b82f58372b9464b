//! Fuzzes detector::fuzzing::payload (see there for what it covers).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| detector::fuzzing::payload(data));
