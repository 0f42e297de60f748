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
#[derive(Default)]
pub struct VfioOpener {
    devices: Mutex<HashMap<String, Arc<NvmeDevice>>>,
}

impl VfioOpener {
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
                    let d = Arc::new(
                        NvmeDevice::open(bdf, ControllerOptions::default())
                            .map_err(|e| io_err(bdf, "open", e))?,
                    );
                    map.insert(bdf.to_string(), d.clone());
                    d
                }
            }
        };
        Ok(Arc::new(NvmeBackend::open(
            dev,
            format!("vfio:{bdf}:{nsid}"),
            nsid,
            max_io,
        )?))
    }
}

fn io_err(what: &str, op: &'static str, e: nvme::Error) -> Error {
    Error::BackendIo {
        backend: what.to_string(),
        op,
        source: std::io::Error::other(e.to_string()),
    }
}
