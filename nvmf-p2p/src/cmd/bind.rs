//! `nvmf-p2p bind BDF` / `unbind BDF` — owned by the nvme issue (#4); placeholder.
use super::{CliError, CliResult};

#[derive(clap::Args)]
pub struct BindArgs {
    /// PCI address, e.g. 0000:00:03.0
    pub bdf: String,
}

#[derive(clap::Args)]
pub struct UnbindArgs {
    /// PCI address, e.g. 0000:00:03.0
    pub bdf: String,
}

pub fn run_bind(a: BindArgs) -> CliResult {
    Err(CliError::new(format!(
        "bind {}: not implemented yet",
        a.bdf
    )))
}

pub fn run_unbind(a: UnbindArgs) -> CliResult {
    Err(CliError::new(format!(
        "unbind {}: not implemented yet",
        a.bdf
    )))
}
