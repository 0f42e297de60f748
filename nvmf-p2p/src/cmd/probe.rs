//! `nvmf-p2p probe BDF [--json]` — bring a controller up through VFIO and report what it
//! offers, including whether the doorbell page and the CMB export as dma-bufs.
use std::io::{Seek, SeekFrom};

use super::{print_json, CliError, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// PCI address, e.g. 0000:00:03.0
    pub bdf: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Do not enable shadow doorbells (Doorbell Buffer Config).
    #[arg(long)]
    pub no_shadow_doorbells: bool,
}

/// Result of one dma-buf export attempt.
#[derive(serde::Serialize)]
pub struct ExportResult {
    pub ok: bool,
    pub size: Option<u64>,
    pub error: Option<String>,
}

#[derive(serde::Serialize)]
pub struct ProbeReport {
    pub controller: nvme::ControllerInfo,
    pub export_doorbells: ExportResult,
    pub export_cmb: ExportResult,
}

fn export(r: nvme::Result<std::os::fd::OwnedFd>) -> ExportResult {
    match r {
        Ok(fd) => {
            let size = std::fs::File::from(fd).seek(SeekFrom::End(0)).ok();
            ExportResult {
                ok: true,
                size,
                error: None,
            }
        }
        Err(e) => ExportResult {
            ok: false,
            size: None,
            error: Some(e.to_string()),
        },
    }
}

fn show(e: &ExportResult) -> String {
    match (e.ok, e.size, &e.error) {
        (true, Some(s), _) => format!("ok, {s} bytes"),
        (true, None, _) => "ok".into(),
        (false, _, Some(err)) => format!("failed: {err}"),
        (false, _, None) => "failed".into(),
    }
}

pub fn run(a: Args) -> CliResult {
    let opts = nvme::ControllerOptions {
        shadow_doorbells: !a.no_shadow_doorbells,
        ..Default::default()
    };
    let dev =
        nvme::vfio::NvmeDevice::open(&a.bdf, opts).map_err(|e| CliError::new(e.to_string()))?;
    let info = dev.controller().info().clone();
    let export_doorbells = export(dev.export_doorbells());
    let export_cmb = match &info.cmb {
        Some(c) => export(dev.export_cmb(0..c.size)),
        None => ExportResult {
            ok: false,
            size: None,
            error: Some("the controller has no CMB".into()),
        },
    };
    let r = ProbeReport {
        controller: info,
        export_doorbells,
        export_cmb,
    };
    if a.json {
        return print_json(&r);
    }
    let c = &r.controller;
    println!(
        "controller {}: {} (serial {}, firmware {}, NVMe {})",
        c.name, c.model, c.serial, c.firmware, c.version
    );
    println!(
        "  MDTS: {}",
        c.mdts_bytes
            .map_or("no limit".to_string(), |b| format!("{} KiB", b / 1024))
    );
    println!(
        "  I/O queues: {} granted, up to {} entries each",
        c.io_queues_granted, c.max_queue_entries
    );
    println!(
        "  shadow doorbells: {} ({})",
        if c.shadow_doorbells_supported {
            "supported"
        } else {
            "not supported"
        },
        if c.shadow_doorbells_in_use {
            "in use"
        } else {
            "off"
        }
    );
    for ns in &c.namespaces {
        println!(
            "  namespace {}: {} blocks of {} bytes ({} MiB)",
            ns.nsid,
            ns.blocks,
            ns.block_size,
            (ns.blocks * ns.block_size as u64) >> 20
        );
        for (i, f) in ns.lba_formats.iter().enumerate() {
            let mark = if i == ns.lba_format_index {
                " (in use)"
            } else {
                ""
            };
            println!(
                "    LBA format {i}: {} B data, {} B metadata, rp {}{mark}",
                f.data_size, f.metadata_size, f.relative_performance
            );
        }
    }
    match &c.cmb {
        Some(m) => println!(
            "  CMB: {} MiB in BAR {} at offset {:#x}, SQS={} CQS={} LISTS={} RDS={} WDS={}",
            m.size >> 20,
            m.bar,
            m.offset,
            m.sqs as u8,
            m.cqs as u8,
            m.lists as u8,
            m.rds as u8,
            m.wds as u8
        ),
        None => println!("  CMB: none"),
    }
    println!(
        "  dma-buf export of the doorbell page: {}",
        show(&r.export_doorbells)
    );
    println!("  dma-buf export of the CMB: {}", show(&r.export_cmb));
    Ok(())
}
