//! `nvmf-p2p bind BDF` / `unbind BDF` — hand a PCI device to vfio-pci and back
//! (driver_override + unbind + drivers_probe, remembering the previous driver).
use super::{print_json, CliError, CliResult};

#[derive(clap::Args)]
pub struct BindArgs {
    /// PCI address, e.g. 0000:00:03.0
    pub bdf: String,
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
    let o = nvme::pci::bind_vfio(&a.bdf).map_err(|e| CliError::new(e.to_string()))?;
    report(&o, a.json)
}

pub fn run_unbind(a: UnbindArgs) -> CliResult {
    let o = nvme::pci::unbind_from_vfio(&a.bdf, a.driver.as_deref())
        .map_err(|e| CliError::new(e.to_string()))?;
    report(&o, a.json)
}
