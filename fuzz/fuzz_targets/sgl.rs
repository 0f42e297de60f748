//! Fuzz target `sgl`: the body is transport::fuzzing::sgl (replayed on stable by
//! transport/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| transport::fuzzing::sgl(data));
