//! Fuzz target `direct_proto`: the body is transport::fuzzing::direct_proto (replayed on stable by
//! transport/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| transport::fuzzing::direct_proto(data));
