//! The controller behind a direct namespace: what an attach asks of it, whichever driver
//! owns it — our VFIO driver ([`NvmeDevice`], `vfio:` namespaces) or SPDK's (`spdk:`
//! namespaces; the binary implements [`DirectDevice`] over SPDK's controller).
//!
//! Either way a direct queue is an I/O SQ/CQ pair on rings the attach allocates, created
//! with the owner's admin queue, invisible to the owner's own completion path, and
//! deleted when its [`RawQueuePair`] is dropped; the dma-bufs of the doorbell page and the
//! CMB come from a VFIO device fd of the same device ([`nvme::vfio::VfioDevice`]).

use std::ops::Range;
use std::os::fd::OwnedFd;

use nvme::vfio::NvmeDevice;
use nvme::{DmaBuffer, RawQueuePair};

/// Whether the CMB can hold a direct queue's SQ ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmbSqs {
    /// Yes ([`DirectDevice::alloc_cmb`]).
    Yes,
    /// The CMB does not take SQs (CMBSZ.SQS clear).
    NotSqs,
    /// The controller has no CMB.
    NoCmb,
    /// The controller has a CMB, but its driver keeps it (SPDK's maps it for its own
    /// queues and data): the SQ goes in host memory.
    OwnersOnly,
}

/// What direct mode needs from a controller.
pub trait DirectDevice: Send + Sync {
    /// For logs and reasons: `vfio:BDF`, `spdk:BDF`.
    fn name(&self) -> String;
    /// Namespace `nsid` as (LBA size in bytes, blocks); None when it is not active.
    fn namespace(&self, nsid: u32) -> Option<(u32, u64)>;
    /// CAP.MQES + 1.
    fn max_queue_entries(&self) -> u32;
    /// Largest transfer of one command, in bytes.
    fn max_transfer(&self) -> usize;
    /// Whether the controller takes doorbells from a shadow buffer (Doorbell Buffer
    /// Config): a doorbell a NIC writes to MMIO is then not seen.
    fn shadow_doorbells_in_use(&self) -> bool;
    /// Whether a direct queue's SQ ring may go in the controller memory buffer.
    fn cmb_sqs(&self) -> CmbSqs;
    /// Controller resets so far (as [`RawQueuePair::generation`]).
    fn generation(&self) -> u64;
    /// `len` bytes of zeroed DMA memory, page aligned and contiguous in the device's
    /// address space (rings and the data pool: the host builds PRPs from its IOVA).
    fn alloc_dma(&self, len: usize) -> nvme::Result<DmaBuffer>;
    /// `len` bytes of the CMB.
    fn alloc_cmb(&self, len: usize) -> nvme::Result<DmaBuffer>;
    /// Byte offset of `buf` (from [`alloc_cmb`](Self::alloc_cmb)) inside the CMB.
    fn cmb_offset(&self, buf: &DmaBuffer) -> u64;
    /// MSI-X vectors a direct queue's CQ may use (0: polled CQs only).
    fn interrupt_vectors(&self) -> u16;
    /// Creates an I/O queue pair of `depth` entries on `sq` and `cq` (the CQ with an
    /// interrupt when `interrupts`).
    fn create_raw_queue_pair(
        &self,
        sq: DmaBuffer,
        cq: DmaBuffer,
        depth: u16,
        interrupts: bool,
    ) -> nvme::Result<RawQueuePair>;
    /// Byte offsets in BAR0 of queue `qid`'s SQ tail and CQ head doorbells.
    fn doorbell_offsets(&self, qid: u16) -> (u64, u64);
    /// (offset in BAR0, length) of the exported doorbell page(s).
    fn doorbell_range(&self) -> (u64, u64);
    /// The doorbell page(s) of BAR0 as a dma-buf.
    fn export_doorbells(&self) -> nvme::Result<OwnedFd>;
    /// `range` (byte offsets inside the CMB, page aligned) as a dma-buf.
    fn export_cmb(&self, range: Range<u64>) -> nvme::Result<OwnedFd>;
}

impl DirectDevice for NvmeDevice {
    fn name(&self) -> String {
        format!("vfio:{}", self.vfio().bdf())
    }
    fn namespace(&self, nsid: u32) -> Option<(u32, u64)> {
        let info = self.controller().info();
        let n = info.namespaces.iter().find(|n| n.nsid == nsid)?;
        Some((n.block_size, n.blocks))
    }
    fn max_queue_entries(&self) -> u32 {
        self.controller().info().max_queue_entries
    }
    fn max_transfer(&self) -> usize {
        self.controller().info().max_transfer
    }
    fn shadow_doorbells_in_use(&self) -> bool {
        self.controller().info().shadow_doorbells_in_use
    }
    fn cmb_sqs(&self) -> CmbSqs {
        match self.controller().info().cmb.as_ref() {
            Some(c) if c.sqs => CmbSqs::Yes,
            Some(_) => CmbSqs::NotSqs,
            None => CmbSqs::NoCmb,
        }
    }
    fn generation(&self) -> u64 {
        self.controller().generation()
    }
    fn alloc_dma(&self, len: usize) -> nvme::Result<DmaBuffer> {
        self.controller().alloc_dma(len)
    }
    fn alloc_cmb(&self, len: usize) -> nvme::Result<DmaBuffer> {
        self.controller().alloc_cmb(len)
    }
    fn cmb_offset(&self, buf: &DmaBuffer) -> u64 {
        let base = self.controller().cmb().map_or(0, |c| c.iova());
        buf.iova().wrapping_sub(base)
    }
    fn interrupt_vectors(&self) -> u16 {
        self.controller().interrupt_vectors()
    }
    fn create_raw_queue_pair(
        &self,
        sq: DmaBuffer,
        cq: DmaBuffer,
        depth: u16,
        interrupts: bool,
    ) -> nvme::Result<RawQueuePair> {
        let c = self.controller();
        if interrupts {
            c.create_raw_queue_pair_with_interrupts(sq, cq, depth)
        } else {
            c.create_raw_queue_pair(sq, cq, depth)
        }
    }
    fn doorbell_offsets(&self, qid: u16) -> (u64, u64) {
        self.controller().doorbell_offsets(qid)
    }
    fn doorbell_range(&self) -> (u64, u64) {
        NvmeDevice::doorbell_range(self)
    }
    fn export_doorbells(&self) -> nvme::Result<OwnedFd> {
        NvmeDevice::export_doorbells(self)
    }
    fn export_cmb(&self, range: Range<u64>) -> nvme::Result<OwnedFd> {
        NvmeDevice::export_cmb(self, range)
    }
}
