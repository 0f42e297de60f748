//! Fuzz target `capsule`: the body is transport::fuzzing::capsule (replayed on stable by
//! transport/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| transport::fuzzing::capsule(data));
