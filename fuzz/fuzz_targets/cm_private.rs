//! Fuzz target `cm_private`: the body is transport::fuzzing::cm_private (replayed on stable by
//! transport/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| transport::fuzzing::cm_private(data));
