//! `nvmf-p2p serve --config target.toml [--print-config]` — the NVMe-oF RDMA target.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use transport::config::{BackendSpec, TargetConfig};
use transport::nvmf_rdma::{serve_with_control, ListenerControl};
use transport::nvmf_target::Target;

use super::{CliError, CliResult};
use crate::control::{self, Request};
use crate::devices::Devices;
use crate::reconfig::{Opener, Running};
use crate::vfio_backend::VfioOpener;

#[derive(clap::Args)]
pub struct Args {
    /// Target configuration (TOML): subsystems, namespaces, listeners.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Check the configuration as serve would (listeners, cores, PCI devices), print it
    /// with every default filled in, and exit. Without --config: print an annotated
    /// template with every key and its default.
    #[arg(long)]
    pub print_config: bool,
    /// Open `vfio:` controllers without shadow doorbells (every doorbell an MMIO write;
    /// what direct mode's P2P doorbell level needs on real hardware). Same as
    /// `shadow_doorbells = false` in the configuration.
    #[arg(long)]
    pub no_shadow_doorbells: bool,
    /// Poll `vfio:` NVMe queues instead of sleeping on their MSI-X interrupts. Same as
    /// `nvme_interrupts = false` in the configuration.
    #[arg(long)]
    pub no_nvme_interrupts: bool,
}

/// A controller is driven by one driver: `vfio:` and `spdk:` namespaces of the same BDF
/// cannot be mixed.
#[cfg(feature = "spdk")]
fn one_driver_per_controller(spec: &BackendSpec) -> transport::Error {
    transport::Error::BackendSpec {
        spec: spec.to_string(),
        reason: "this controller is already open with the other driver: use either vfio: or spdk: for all its namespaces",
    }
}

pub fn run(a: Args) -> CliResult {
    let Some(config_path) = a.config.clone() else {
        if a.print_config {
            print!("{}", transport::config::TEMPLATE);
            return Ok(());
        }
        return Err(CliError::new(
            "serve needs --config FILE (`nvmf-p2p serve --print-config` prints an annotated template)",
        ));
    };
    let mut cfg = load_checked(&config_path)?;
    let overrides = {
        let (no_shadow, no_irq) = (a.no_shadow_doorbells, a.no_nvme_interrupts);
        move |cfg: &mut TargetConfig| {
            cfg.shadow_doorbells &= !no_shadow;
            cfg.nvme_interrupts &= !no_irq;
        }
    };
    overrides(&mut cfg);
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    // Before anything is opened or printed: a second serve of the same configuration
    // fails here, not after claiming devices and ports.
    control_socket_free(&cfg.control_socket)?;
    let opener = Arc::new(VfioOpener::new(cfg.shadow_doorbells, cfg.nvme_interrupts));
    #[cfg(feature = "spdk")]
    let spdk = Arc::new(crate::spdk_backend::SpdkOpener::new(cfg.nvme_interrupts));
    let max_io = cfg.max_io_size as usize;
    let open: Arc<Opener> = {
        let opener = opener.clone();
        #[cfg(feature = "spdk")]
        let spdk = spdk.clone();
        Arc::new(move |spec: &BackendSpec| match spec {
            BackendSpec::Vfio { bdf, nsid } => {
                #[cfg(feature = "spdk")]
                if spdk.has(bdf) {
                    return Err(one_driver_per_controller(spec));
                }
                opener.open(bdf, *nsid, max_io)
            }
            #[cfg(feature = "spdk")]
            BackendSpec::Spdk { bdf, nsid } => {
                if opener
                    .devices()
                    .iter()
                    .any(|(b, _)| crate::spdk_backend::same_bdf(b, bdf))
                {
                    return Err(one_driver_per_controller(spec));
                }
                spdk.open(bdf, *nsid, max_io)
            }
            _ => transport::backend::open_backend(spec, None),
        })
    };
    let target = Arc::new(
        Target::with_backends(&cfg, |spec| open(spec)).map_err(|e| CliError(e.to_string()))?,
    );
    let devices = Arc::new(Devices {
        vfio: opener.clone(),
        #[cfg(feature = "spdk")]
        spdk: spdk.clone(),
    });
    let direct = super::direct::start_service(&cfg, &devices, &target)?;
    let running = Arc::new(Running::new(
        cfg.clone(),
        target.clone(),
        open.clone(),
        direct.clone(),
        devices.clone(),
        Box::new(overrides),
    ));
    let (listener_control, listener_ops) =
        ListenerControl::new().map_err(|e| CliError(e.to_string()))?;
    let _ = running.listeners.set(listener_control);
    start_reload_on_sighup(&running, &config_path)?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| CliError::new(format!("cannot install the signal handler: {e}")))?;
    }

    let handler: control::Handler = {
        let target = target.clone();
        let devices = devices.clone();
        let direct = direct.clone();
        let running = running.clone();
        #[cfg(feature = "spdk")]
        let spdk = spdk.clone();
        Arc::new(move |req| match req {
            Request::Stats => {
                #[allow(unused_mut)]
                let mut report = stats(&target);
                #[cfg(feature = "spdk")]
                {
                    // controllers SPDK's driver attached (`spdk:` namespaces)
                    let bdfs: Vec<String> = spdk
                        .controllers()
                        .iter()
                        .map(|(_, c)| c.bdf().to_string())
                        .collect();
                    report["spdk_controllers"] = json!(bdfs);
                }
                Ok(super::direct::with_report(report, direct.as_deref()))
            }
            Request::ResetDevice => {
                let done = reset_devices(&target, &devices, direct.as_deref())?;
                Ok(json!({ "reset": done }))
            }
            Request::SaveConfig => Ok(json!({ "config": running.config().to_toml() })),
            change => {
                let reply = running.request(change)?;
                log_changes("ctl", &reply);
                Ok(reply)
            }
        })
    };
    {
        // A poll group that sees a command time out or the controller go fatal asks for
        // the same reset (on a thread of its own).
        let devices = devices.clone();
        let direct = direct.as_ref().map(Arc::downgrade);
        target.set_recovery(Arc::new(move |target, backend, fault| {
            let direct = direct.as_ref().and_then(|d| d.upgrade());
            match reset_devices(target, &devices, direct.as_deref()) {
                Ok(done) => tracing::warn!(backend = %backend.describe(), %fault, reset = ?done, "device reset after a fault"),
                Err(e) => tracing::error!(backend = %backend.describe(), %fault, error = %e, "device reset after a fault failed"),
            }
        }));
    }
    // The control socket opens once the listeners are bound: whoever waits for it (the
    // demo, tests, an operator's script) can connect right away.
    let mut control = None;
    let mut metrics = None;
    let stats_handler = handler.clone();
    let on_ready = || {
        match control::Server::start(
            &cfg.control_socket,
            cfg.control_socket_group.as_deref(),
            handler,
        ) {
            Ok(server) => control = Some(Ok(server)),
            Err(e) => {
                control = Some(Err(e));
                stop.store(true, Ordering::Relaxed);
                return;
            }
        }
        eprintln!(
            "nvmf-p2p: serving {} subsystem(s) on {}; control socket {}",
            cfg.subsystems.len(),
            cfg.listeners
                .iter()
                .map(|l| format!("{}:{}", l.address, l.port))
                .collect::<Vec<_>>()
                .join(", "),
            cfg.control_socket.display()
        );
        if let Some(d) = &direct {
            eprintln!("nvmf-p2p: direct mode on (direct port {})", d.port());
        }
        if let Some(m) = &cfg.metrics {
            match start_metrics(m.listen, stats_handler) {
                Ok(at) => eprintln!("nvmf-p2p: metrics on http://{at}/metrics"),
                Err(e) => {
                    metrics = Some(e);
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
        crate::sd_notify::notify_logged("READY=1\nSTATUS=serving");
    };
    serve_with_control(
        &target,
        &cfg,
        &stop,
        cfg.reactor(),
        on_ready,
        Some(listener_ops),
        // Direct mode's poller runs on the first core's reactor, beside its poll group.
        direct
            .as_ref()
            .and_then(|d| d.take_poller())
            .into_iter()
            .collect(),
    )
    .map_err(|e| CliError(e.to_string()))?;
    crate::sd_notify::notify_logged("STOPPING=1");
    if let Some(Err(e)) = control {
        return Err(CliError(e));
    }
    if let Some(e) = metrics {
        return Err(CliError(e));
    }
    if stop.load(Ordering::Relaxed) {
        eprintln!("nvmf-p2p: stopped (queues drained, namespaces flushed)");
    }
    Ok(())
}

/// Reads and checks the configuration file the way `serve` needs it: the file's own
/// consistency ([`TargetConfig::parse`]) and this machine ([`TargetConfig::check_deploy`]:
/// a listener, cores that exist, PCI devices that exist). `--print-config` runs it too.
pub fn load_checked(path: &std::path::Path) -> Result<TargetConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", path.display())))?;
    let cfg = TargetConfig::parse(&text, path).map_err(|e| CliError(e.to_string()))?;
    // SAFETY: sysconf only reads a system value.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    let pci_exists = |bdf: &str| {
        let full = if bdf.matches(':').count() == 1 {
            format!("0000:{bdf}")
        } else {
            bdf.to_owned()
        };
        std::path::Path::new("/sys/bus/pci/devices")
            .join(full)
            .exists()
    };
    cfg.check_deploy(&text, path, cpus, &pci_exists)
        .map_err(|e| CliError(e.to_string()))?;
    Ok(cfg)
}

/// Refuses to start when another `serve` answers on `path` (the control socket).
fn control_socket_free(path: &std::path::Path) -> CliResult {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(CliError::new(format!(
            "another nvmf-p2p serve is running on the control socket {} (stop it, or give this one its own control_socket, listener ports and direct_port)",
            path.display()
        )));
    }
    Ok(())
}

/// The `[metrics]` HTTP endpoint: the control socket's `stats` reply as Prometheus text.
fn start_metrics(
    at: std::net::SocketAddr,
    handler: control::Handler,
) -> Result<std::net::SocketAddr, String> {
    crate::metrics::start_http(
        at,
        Arc::new(move || handler(&Request::Stats).map(|v| crate::metrics::render(&v))),
    )
}

/// Prints the changes of a reconfiguration reply (`changes`) to serve's log.
fn log_changes(origin: &str, reply: &serde_json::Value) {
    let changes = reply["changes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if changes.is_empty() {
        eprintln!("nvmf-p2p: {origin}: no change");
    }
    for c in changes {
        eprintln!("nvmf-p2p: {origin}: {}", c.as_str().unwrap_or_default());
    }
}

/// On SIGHUP, reloads the configuration file and applies the difference (the same path
/// as `ctl`); a refused file changes nothing and is logged.
fn start_reload_on_sighup(running: &Arc<Running>, path: &std::path::Path) -> CliResult {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .map_err(|e| CliError::new(format!("cannot install the SIGHUP handler: {e}")))?;
    let running = running.clone();
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                let origin = format!("reload of {}", path.display());
                let reloaded = load_checked(&path)
                    .map_err(|e| e.0)
                    .and_then(|cfg| running.reload(cfg, &path.display().to_string()));
                match reloaded {
                    Ok(reply) => log_changes(&origin, &reply),
                    Err(e) => eprintln!("nvmf-p2p: {origin} refused, nothing changed: {e}"),
                }
            }
        })
        .map_err(|e| CliError::new(format!("cannot start the reload thread: {e}")))?;
    Ok(())
}

/// The `stats` reply: subsystems with their namespaces, and live controllers with their
/// command, byte and error counters.
fn stats(target: &Target) -> serde_json::Value {
    let mut ios = 0u64;
    let subsystems: Vec<_> = target
        .subsystems()
        .iter()
        .map(|s| {
            let namespaces: Vec<_> = s
                .namespaces()
                .iter()
                .map(|ns| {
                    json!({
                        "nsid": ns.nsid,
                        "backend": ns.backend.describe(),
                        "block_size": ns.backend.block_size(),
                        "blocks": ns.backend.block_count(),
                        "totals": ns.stats.totals(),
                    })
                })
                .collect();
            let totals = target.subsystem_totals(s);
            ios += totals.read_commands + totals.write_commands;
            json!({ "nqn": s.nqn, "namespaces": namespaces, "totals": totals })
        })
        .collect();
    let controllers = serde_json::to_value(target.controller_stats()).unwrap_or_default();
    let cpu = process_cpu_seconds();
    json!({
        "subsystems": subsystems,
        "controllers": controllers,
        "process": {
            "cpu_seconds": cpu,
            "ios": ios,
            "cpu_us_per_io": if ios > 0 { (cpu * 1e6 / ios as f64 * 10.0).round() / 10.0 } else { 0.0 },
        },
        "connect_timeouts": target.connect_timeouts(),
        "notes": {
            "totals": "since serve started, hosts connected now and gone; a namespace counts the reads and writes it was sent",
            "errors": "commands the target completed with an error status: refusals (LBA out of range, invalid field, ...) and commands aborted by a device reset, which hosts retry (fio then reports none)",
            "cpu_us_per_io": "serve's user + system CPU time since it started, over every read and write it served (idle time included)",
            "connect_timeouts": "connections dropped because they sent no Connect within connect_timeout_ms",
        },
    })
}

/// User + system CPU time of this process, in seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// How long a device reset waits for the commands in the poll groups' channels to
/// complete before it resets the device under them (they complete aborted, retryable).
const RESET_DRAIN: Duration = Duration::from_secs(2);

/// Resets every `vfio:` controller with all its users held: direct queues dropped (their
/// hosts re-attach after it), every poll group's backend I/O held (new commands wait;
/// those in the device get [`RESET_DRAIN`] to complete); both resume when this returns.
/// `ctl reset-device` and the fault recovery both come here.
fn reset_devices(
    target: &Target,
    devices: &Devices,
    direct: Option<&transport::direct::target::DirectService>,
) -> Result<Vec<String>, String> {
    // One reset at a time (`ctl` and a fault may ask together): a second one's resume
    // would let direct queues back while the first still resets.
    static RESETS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = RESETS.lock().unwrap_or_else(|p| p.into_inner());
    if devices.is_empty() {
        return Err("no vfio: or spdk: namespace in this target: nothing to reset".into());
    }
    // Drop order: the poll groups go on first, then direct attaches are allowed again.
    let _direct = super::direct::Quiesced::new(direct)?;
    let held = target
        .hold_backend_io(RESET_DRAIN)
        .map_err(|e| e.to_string())?;
    tracing::info!(
        groups = held.groups(),
        left_in_device = held.left_in_device(),
        "poll groups hold their backend I/O: resetting"
    );
    devices.reset_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIGHUP reloads the file through the same path as `ctl`: a changed serial and an
    /// added namespace reach the running target; a file with a restart-only change is
    /// refused and leaves it as it was.
    #[test]
    fn sighup_reloads_the_config_file() {
        let dir = std::env::temp_dir().join(format!("nvmf-p2p-hup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("target.toml");
        let text = "[[listener]]\naddress = \"10.0.0.1\"\n[[subsystem]]\nnqn = \"nqn.2026-11.io.example:hup\"\nallow_any_host = true\n[[subsystem.namespace]]\nbackend = \"ram:1MiB\"\n";
        std::fs::write(&file, text).unwrap();
        let cfg = load_checked(&file).unwrap();
        let target = Arc::new(Target::from_config(&cfg, None).unwrap());
        let open: Arc<Opener> = Arc::new(|spec| transport::backend::open_backend(spec, None));
        let running = Arc::new(Running::new(
            cfg,
            target.clone(),
            open,
            None,
            Arc::new(Devices::none()),
            Box::new(|_: &mut TargetConfig| {}),
        ));
        start_reload_on_sighup(&running, &file).unwrap();
        let hup_until = |done: &dyn Fn() -> bool, wait: Duration| {
            // SAFETY: raise sends a signal to this process; SIGHUP has the handler
            // start_reload_on_sighup installed.
            unsafe { libc::raise(libc::SIGHUP) };
            let t0 = std::time::Instant::now();
            while !done() && t0.elapsed() < wait {
                std::thread::sleep(Duration::from_millis(10));
            }
            done()
        };
        let edited = text.replace("allow_any_host", "serial = \"HUP1\"\nallow_any_host")
            + "[[subsystem.namespace]]\nbackend = \"ram:2MiB\"\n";
        std::fs::write(&file, &edited).unwrap();
        assert!(hup_until(
            &|| target.subsystems()[1].serial() == "HUP1",
            Duration::from_secs(5)
        ));
        assert!(hup_until(
            &|| target.subsystems()[1].namespaces().len() == 2,
            Duration::from_secs(5)
        ));
        // queue_depth needs a restart: the whole file is refused, the serial stays.
        std::fs::write(
            &file,
            format!("queue_depth = 64\n{}", edited.replace("HUP1", "HUP2")),
        )
        .unwrap();
        assert!(!hup_until(
            &|| target.subsystems()[1].serial() == "HUP2",
            Duration::from_secs(1)
        ));
        assert_eq!(
            running.config().queue_depth,
            transport::config::DEFAULT_QUEUE_DEPTH
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
