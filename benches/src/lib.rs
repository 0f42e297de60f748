//! Benchmarks live in benches/benches/*.rs (criterion) and scripts/bench (the testbed
//! matrix); this library is the report generator of scripts/bench (`bench-report`,
//! docs/bench.md).

pub mod report;
