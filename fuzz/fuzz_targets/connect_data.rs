//! Fuzz target `connect_data`: the body is transport::fuzzing::connect_data (replayed on stable by
//! transport/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| transport::fuzzing::connect_data(data));
