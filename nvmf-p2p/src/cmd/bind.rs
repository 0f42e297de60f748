//! `nvmf-p2p bind BDF` / `unbind BDF` — hand a PCI device to vfio-pci and back
//! (driver_override + unbind + drivers_probe, remembering the previous driver).
use super::{print_json, CliError, CliResult};

#[derive(clap::Args)]
pub struct BindArgs {
    /// PCI address, e.g. 0000:00:03.0
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    pub bdf: Option<String>,
    /// Bind every controller the `vfio:` and `spdk:` namespaces of this serve
    /// configuration name (what the systemd unit's ExecStartPre does). Devices already on
    /// vfio-pci are left alone; exits 0 when all are bound.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct UnbindArgs {
    /// PCI address, e.g. 0000:00:03.0
    pub bdf: String,
    /// Driver to give the device to (default: the one it had before `bind`, else the
    /// kernel's choice).
    #[arg(long)]
    pub driver: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn report(o: &nvme::pci::BindOutcome, json: bool) -> CliResult {
    if json {
        return print_json(o);
    }
    let drv = o.driver.as_deref().unwrap_or("no driver");
    if !o.changed {
        println!("{} is already bound to {drv}", o.bdf);
    } else {
        println!(
            "{}: {} -> {drv}",
            o.bdf,
            o.previous_driver.as_deref().unwrap_or("no driver")
        );
    }
    if let Some(p) = &o.vfio_group_path {
        println!("VFIO group: {p}");
    }
    Ok(())
}

pub fn run_bind(a: BindArgs) -> CliResult {
    let bdfs = match (&a.bdf, &a.config) {
        (Some(b), _) => vec![b.clone()],
        (None, Some(path)) => {
            let cfg = transport::config::TargetConfig::load(path)
                .map_err(|e| CliError::new(e.to_string()))?;
            let bdfs = config_bdfs(&cfg);
            if bdfs.is_empty() && !a.json {
                println!(
                    "{}: no vfio: or spdk: namespace, nothing to bind",
                    path.display()
                );
            }
            bdfs
        }
        (None, None) => return Err(CliError::new("give a PCI address or --config FILE")),
    };
    let mut outcomes = Vec::new();
    for bdf in &bdfs {
        let o = nvme::pci::bind_vfio(bdf).map_err(|e| CliError::new(e.to_string()))?;
        if !a.json {
            report(&o, false)?;
        }
        outcomes.push(o);
    }
    if a.json {
        return match (&a.bdf, outcomes.as_slice()) {
            (Some(_), [o]) => print_json(o),
            _ => print_json(&outcomes),
        };
    }
    Ok(())
}

/// The PCI addresses of a configuration's `vfio:` and `spdk:` namespaces, each once, in
/// the order they appear.
pub fn config_bdfs(cfg: &transport::config::TargetConfig) -> Vec<String> {
    use transport::config::BackendSpec;
    let mut out: Vec<String> = Vec::new();
    for sub in &cfg.subsystems {
        for ns in &sub.namespaces {
            if let BackendSpec::Vfio { bdf, .. } | BackendSpec::Spdk { bdf, .. } = &ns.backend {
                if !out.contains(bdf) {
                    out.push(bdf.clone());
                }
            }
        }
    }
    out
}

pub fn run_unbind(a: UnbindArgs) -> CliResult {
    let o = nvme::pci::unbind_from_vfio(&a.bdf, a.driver.as_deref())
        .map_err(|e| CliError::new(e.to_string()))?;
    report(&o, a.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bdfs_lists_each_pci_controller_once() {
        let cfg = transport::config::TargetConfig::parse(
            "[[subsystem]]\nnqn = \"nqn.2026-11.io.x:a\"\nallow_any_host = true\n\
             [[subsystem.namespace]]\nbackend = \"vfio:0000:01:00.0:1\"\n\
             [[subsystem.namespace]]\nbackend = \"vfio:0000:01:00.0:2\"\n\
             [[subsystem.namespace]]\nbackend = \"ram:1MiB\"\n\
             [[subsystem]]\nnqn = \"nqn.2026-11.io.x:b\"\nallow_any_host = true\n\
             [[subsystem.namespace]]\nbackend = \"spdk:0000:02:00.0\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(config_bdfs(&cfg), ["0000:01:00.0", "0000:02:00.0"]);
    }
}
