//! The `vfio:BDF[:nsid]` namespace backend of `serve`: controllers opened through VFIO
//! (one per BDF, shared with direct mode and `ctl reset-device`), each namespace served by
//! [`transport::nvme_backend::NvmeBackend`] — asynchronous and zero-copy on the poll
//! groups (their buffer pools are this controller's DMA memory, one I/O queue pair per
//! group), synchronous through a bounce buffer for the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nvme::vfio::NvmeDevice;
use nvme::ControllerOptions;
use transport::backend::Backend;
use transport::nvme_backend::NvmeBackend;
use transport::{Error, Result};

/// Opens NVMe controllers through VFIO, one per BDF, and hands out namespace backends.
pub struct VfioOpener {
    devices: Mutex<HashMap<String, Arc<NvmeDevice>>>,
    shadow_doorbells: bool,
    interrupts: bool,
}

impl Default for VfioOpener {
    /// Shadow doorbells and interrupts on (where the controller has them).
    fn default() -> Self {
        VfioOpener::new(true, true)
    }
}

impl VfioOpener {
    /// An opener whose controllers use shadow doorbells if `shadow_doorbells` (and the
    /// controller offers them), and whose poll-group queues raise MSI-X interrupts if
    /// `interrupts` (and the device has vectors).
    pub fn new(shadow_doorbells: bool, interrupts: bool) -> Self {
        VfioOpener {
            devices: Mutex::new(HashMap::new()),
            shadow_doorbells,
            interrupts,
        }
    }

    /// The controllers opened so far (for `ctl reset-device` and stats).
    pub fn devices(&self) -> Vec<(String, Arc<NvmeDevice>)> {
        let map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// A backend for namespace `nsid` of the controller at `bdf`.
    pub fn open(&self, bdf: &str, nsid: u32, max_io: usize) -> Result<Arc<dyn Backend>> {
        let dev = {
            let mut map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(bdf) {
                Some(d) => d.clone(),
                None => {
                    let opts = ControllerOptions {
                        shadow_doorbells: self.shadow_doorbells,
                        ..ControllerOptions::default()
                    };
                    let d =
                        Arc::new(NvmeDevice::open(bdf, opts).map_err(|source| Error::Nvme {
                            backend: bdf.to_string(),
                            op: "open",
                            source: Box::new(source),
                        })?);
                    let info = d.controller().info();
                    tracing::info!(
                        bdf,
                        shadow_doorbells = info.shadow_doorbells_in_use,
                        msix_vectors = d.vfio().msix_vectors(),
                        interrupts = self.interrupts,
                        "NVMe controller opened"
                    );
                    map.insert(bdf.to_string(), d.clone());
                    d
                }
            }
        };
        Ok(Arc::new(
            NvmeBackend::open(dev, format!("vfio:{bdf}:{nsid}"), nsid, max_io)?
                .with_interrupts(self.interrupts),
        ))
    }
}
