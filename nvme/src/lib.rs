//! Userspace NVMe: spec types, a driver over VFIO (polled or interrupt-driven queues),
//! the controller memory buffer, dma-buf export of the doorbell page and the CMB, and an
//! in-process simulated controller.
//!
//! - [`spec`]: SQE/CQE, status codes, opcodes, registers, Identify and log page layouts
//!   (shared with the NVMe-oF target).
//! - [`Controller::new`] brings a controller up over any [`Platform`]:
//!   [`vfio::VfioPlatform`] (a device bound to vfio-pci; [`vfio::NvmeDevice`] adds the
//!   dma-buf exports) or [`sim::Simulator`] (tests, benches).
//! - [`Controller::create_io_queue_pair`] gives one [`IoQueuePair`] per thread:
//!   [`IoQueuePair::submit`] / [`read`](IoQueuePair::read) / [`write`](IoQueuePair::write)
//!   and [`IoQueuePair::poll`] — no locks, no allocation.
//! - [`Controller::create_io_queue_pair_with_interrupts`] gives a queue pair whose CQ
//!   raises an MSI-X interrupt (VFIO eventfd, or the simulator's): sleep on
//!   [`IoQueuePair::interrupt_fd`] after [`IoQueuePair::arm_interrupt`] returns true.
//! - [`Controller::alloc_dma`] / [`Controller::alloc_cmb`] give [`DmaBuffer`]s.
//! - [`Controller::create_raw_queue_pair`] hands the rings to someone else (direct mode).
//!
//! ```
//! use nvme::sim::{SimConfig, Simulator};
//! use nvme::{Controller, ControllerOptions, QueueOptions};
//!
//! let sim = Simulator::start(SimConfig::default())?;
//! let ctrl = Controller::new(sim.platform(), ControllerOptions::default())?;
//! let mut qp = ctrl.create_io_queue_pair(QueueOptions::default())?;
//! let buf = ctrl.alloc_dma(4096)?;
//! buf.write(0, b"hello")?;
//! qp.write(1, 0, &buf, 7)?;
//! let mut done = None;
//! while done.is_none() {
//!     qp.poll(16, |c| done = Some(c));
//! }
//! let c = done.unwrap();
//! assert!(c.is_ok() && c.tag == 7);
//! # Ok::<(), nvme::Error>(())
//! ```

pub mod ctrl;
pub mod dma;
mod doorbell;
pub mod error;
pub mod irq;
pub mod pci;
pub mod queue;
mod raw_queue;
pub mod sim;
pub mod spec;
pub mod vfio;

pub use ctrl::{
    CmbInfo, Controller, ControllerInfo, ControllerOptions, LbaFormatInfo, NamespaceInfo,
    QueueOptions, Recovery, DRIVER_MAX_TRANSFER,
};
pub use dma::{BarMapping, DmaAllocator, DmaBuffer, DmaRegion, Mmio, Platform};
pub use doorbell::{DoorbellPair, ShadowPages};
pub use error::{Error, Result};
pub use irq::EventFd;
pub use queue::{Batch, Completion, IoQueuePair, QueueStats};
pub use raw_queue::{QueueOwner, RawQueuePair};
