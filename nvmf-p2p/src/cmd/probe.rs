//! `nvmf-p2p probe BDF [--json]` — owned by the nvme issue (#4); placeholder.
use super::{CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// PCI address, e.g. 0000:00:03.0
    pub bdf: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> CliResult {
    Err(CliError::new(format!(
        "probe {}: not implemented yet",
        a.bdf
    )))
}
