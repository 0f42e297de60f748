//! NVMe over Fabrics on RDMA: target, initiator, direct mode.

pub mod backend;
pub mod config;
pub mod error;
pub mod fabrics;

pub use error::{Error, Result};
