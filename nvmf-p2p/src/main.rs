//! `nvmf-p2p` — one binary, one subcommand per job. Each subcommand lives in its own
//! module under `cmd/` with an `Args` struct (clap) and a `run` function.

mod cmd;
mod control;
mod devices;
mod metrics;
mod reconfig;
mod sd_notify;
#[cfg(feature = "spdk")]
mod spdk_backend;
#[cfg(feature = "spdk")]
mod spdk_direct;
mod vfio_backend;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nvmf-p2p",
    version,
    about = "NVMe-over-RDMA data path: VFIO NVMe driver, NVMe-oF RDMA target and initiator, direct P2P mode"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `nvme=debug`. Also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rebind a PCI device to vfio-pci (remembering its previous driver).
    Bind(cmd::bind::BindArgs),
    /// Give a PCI device back to its previous (or given) driver.
    Unbind(cmd::bind::UnbindArgs),
    /// Bring up an NVMe controller through VFIO and print what it offers.
    Probe(cmd::probe::Args),
    /// Run the NVMe-oF RDMA target described by a TOML configuration.
    Serve(cmd::serve::Args),
    /// I/O at a fixed queue depth against a target (or a local controller); IOPS and latency.
    Perf(cmd::perf::Args),
    /// Direct mode host: attach a direct queue, then I/O by one-sided RDMA (or fill/check).
    Direct(cmd::direct::Args),
    /// Counters of a running target, from its control socket.
    Stats(cmd::stats::StatsArgs),
    /// Control commands to a running target: reconfigure it (`ctl add-namespace`, ...),
    /// `ctl save-config`, `ctl reset-device`.
    Ctl(cmd::ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    // Colour only on a terminal, and never with NO_COLOR set (no-color.org): a log
    // redirected to a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && !matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let result = match cli.cmd {
        Command::Bind(a) => cmd::bind::run_bind(a),
        Command::Unbind(a) => cmd::bind::run_unbind(a),
        Command::Probe(a) => cmd::probe::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Perf(a) => cmd::perf::run(a),
        Command::Direct(a) => cmd::direct::run(a),
        Command::Stats(a) => cmd::stats::run_stats(a),
        Command::Ctl(a) => cmd::ctl::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmf-p2p: {e}");
            ExitCode::FAILURE
        }
    }
}
