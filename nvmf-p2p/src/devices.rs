//! The NVMe controllers a target drives, whichever driver owns them: ours (`vfio:`,
//! [`VfioOpener`]) and SPDK's (`spdk:`, cargo feature `spdk`). What needs every one of
//! them goes through here: direct mode's namespace lookups and `ctl reset-device`.

use std::sync::Arc;

use transport::config::BackendSpec;
use transport::direct::target::DirectDevice;

use crate::vfio_backend::VfioOpener;

/// The openers of one `serve` (the same ones its namespaces were opened with).
pub struct Devices {
    pub vfio: Arc<VfioOpener>,
    #[cfg(feature = "spdk")]
    pub spdk: Arc<crate::spdk_backend::SpdkOpener>,
}

impl Devices {
    /// Openers that have opened nothing (tests of what uses them).
    #[cfg(test)]
    pub fn none() -> Devices {
        Devices {
            vfio: Arc::new(VfioOpener::new(true, true)),
            #[cfg(feature = "spdk")]
            spdk: Arc::new(crate::spdk_backend::SpdkOpener::new(false)),
        }
    }

    /// The controller behind `spec`, for direct mode, if it is open (`vfio:` or `spdk:`).
    pub fn direct_device(&self, spec: &BackendSpec) -> Option<Arc<dyn DirectDevice>> {
        match spec {
            BackendSpec::Vfio { bdf, .. } => {
                let devs = self.vfio.devices();
                let (_, d) = devs.into_iter().find(|(b, _)| b == bdf)?;
                Some(d as Arc<dyn DirectDevice>)
            }
            #[cfg(feature = "spdk")]
            BackendSpec::Spdk { bdf, .. } => {
                let c = self.spdk.controller(bdf)?;
                Some(Arc::new(crate::spdk_direct::SpdkDirect::new(c)) as Arc<dyn DirectDevice>)
            }
            _ => None,
        }
    }

    /// Resets every controller (an FLR and re-initialisation for ours, SPDK's controller
    /// reset for SPDK's); returns their names. The caller has quiesced direct mode and
    /// holds the poll groups' backend I/O.
    pub fn reset_all(&self) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        for (bdf, dev) in self.vfio.devices() {
            dev.controller()
                .reset_device()
                .map_err(|e| format!("reset of vfio:{bdf} failed: {e}"))?;
            done.push(bdf);
        }
        #[cfg(feature = "spdk")]
        for (bdf, c) in self.spdk.controllers() {
            c.reset()
                .map_err(|e| format!("reset of spdk:{bdf} failed: {e}"))?;
            done.push(bdf);
        }
        Ok(done)
    }

    /// Whether no controller is open.
    pub fn is_empty(&self) -> bool {
        #[cfg(feature = "spdk")]
        if !self.spdk.controllers().is_empty() {
            return false;
        }
        self.vfio.devices().is_empty()
    }
}
