//! NVMe over Fabrics on RDMA: target, initiator, direct mode.
//!
//! Layers, bottom up:
//! - [`fabrics`]: NVMe-oF wire structures (Connect, properties, SGLs, CM private data,
//!   discovery log) with compile-time-checked layouts; NVMe base types come from
//!   [`nvme::spec`].
//! - [`wire`]: the transport interface the core runs over; [`loopback`] implements it
//!   in process for tests.
//! - [`nvmf_target`]: the target core (subsystems, controllers, request state machine).
//! - [`backend`]: namespace storage (`ram`, `file`; `vfio` through an opener).
//! - [`nvme_backend`]: a namespace of an `nvme`-crate controller (the `vfio` backend), with
//!   the asynchronous zero-copy path.
//! - [`config`]: the `serve --config target.toml` model.
//! - [`nvmf_rdma`]: the NVMe-oF RDMA binding of [`wire`] over the `rdma` crate, and `serve`.

pub mod backend;
pub mod config;
pub mod direct;
pub mod error;
pub mod fabrics;
#[doc(hidden)]
pub mod fuzzing;
pub mod initiator;
pub mod loopback;
pub mod nvme_backend;
pub mod nvmf_rdma;
pub mod nvmf_target;
pub mod pool;
pub mod wire;

pub use error::{Error, Result};
