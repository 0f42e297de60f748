//! Userspace NVMe: spec types, VFIO driver, CMB, dma-buf export, simulated controller.

pub mod spec;
