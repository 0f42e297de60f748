//! Benchmarks live in benches/benches/*.rs (criterion) and scripts/bench-*.
