//! Fuzzes detector::fuzzing::elf (see there for what it covers).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| detector::fuzzing::elf(data));
