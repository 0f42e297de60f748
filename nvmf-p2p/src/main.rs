//! `nvmf-p2p` — one binary, one subcommand per job.
fn main() {}
