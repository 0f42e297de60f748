//! A minimal NVMe-oF/RDMA target for manual and VM testing until `nvmf-p2p serve` uses
//! the library: `rdma_target CONFIG.toml [SECONDS]` serves until SECONDS pass (default:
//! forever) or SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use transport::config::TargetConfig;
use transport::nvmf_rdma::{serve, ServeOptions};
use transport::nvmf_target::Target;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    tracing_init();
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: rdma_target CONFIG.toml [SECONDS]");
        std::process::exit(2);
    };
    let cfg = match TargetConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Some(secs) = args.next().and_then(|s| s.parse::<u64>().ok()) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            STOP.store(true, Ordering::Relaxed);
        });
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
    let target = match Target::from_config(&cfg, None) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    eprintln!("rdma_target: serving {} subsystem(s)", cfg.subsystems.len());
    if let Err(e) = serve(&target, &cfg, &STOP, ServeOptions::default()) {
        eprintln!("rdma_target: {e}");
        std::process::exit(1);
    }
    eprintln!("rdma_target: stopped");
}

fn tracing_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
