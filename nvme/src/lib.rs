//! Userspace NVMe: spec types, a polled driver over VFIO, the controller memory buffer,
//! dma-buf export of the doorbell page and the CMB, and an in-process simulated controller.
//!
//! Entry points: [`Controller::new`] over any [`Platform`] — [`vfio::VfioPlatform`] for a
//! real (or QEMU-emulated) device bound to vfio-pci, [`sim::Simulator`] for tests — then
//! [`Controller::create_io_queue_pair`] per thread, [`IoQueuePair::submit`] /
//! [`IoQueuePair::poll`] on the hot path, [`Controller::alloc_dma`] for buffers.

pub mod ctrl;
pub mod dma;
pub mod error;
pub mod pci;
pub mod queue;
pub mod sim;
pub mod spec;
pub mod vfio;

pub use ctrl::{
    CmbInfo, Controller, ControllerInfo, ControllerOptions, LbaFormatInfo, NamespaceInfo,
    QueueOptions, Recovery, DRIVER_MAX_TRANSFER,
};
pub use dma::{BarMapping, DmaAllocator, DmaBuffer, DmaRegion, Mmio, Platform};
pub use error::{Error, Result};
pub use queue::{Completion, IoQueuePair, QueueStats};
