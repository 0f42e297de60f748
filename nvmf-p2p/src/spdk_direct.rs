//! Direct mode on a controller SPDK's driver owns (`spdk:` namespaces, cargo feature
//! `spdk`): [`DirectDevice`] over [`SpdkController`], so that remote hosts write a direct
//! queue's SQ entries and doorbells by RDMA while SPDK keeps the controller — its bring-up,
//! admin queue and standard-mode queue pairs (docs/direct-mode.md, "On an SPDK-owned
//! controller").
//!
//! A direct queue here is:
//! - a qid from SPDK's allocator (`spdk_nvme_ctrlr_alloc_qid`), so SPDK never hands it to a
//!   queue pair of its own, given back by `spdk_nvme_ctrlr_free_qid` when the queue goes;
//! - rings and the data pool in SPDK DMA memory that is contiguous in the device's address
//!   space ([`alloc_contiguous`]: the host builds PRPs from the pool's IOVA);
//! - Create I/O CQ / SQ (and Delete) sent as raw admin commands on SPDK's admin queue
//!   ([`SpdkController::admin_raw`]); SPDK's completion path never sees the queue;
//! - doorbells rung through `nvme`'s one doorbell writer on SPDK's BAR0 mapping
//!   (`spdk_pci_device_map_bar`), with SPDK's shadow doorbell and EventIdx pages when SPDK
//!   set up Doorbell Buffer Config (read by spdk-sys's C shim: SPDK has no accessor);
//! - dma-bufs of the doorbell page (and nothing of the CMB, which SPDK keeps) exported
//!   with `VFIO_DEVICE_FEATURE_DMA_BUF` from a device fd of the same VFIO device, taken from
//!   DPDK's VFIO group fd (`rte_vfio_get_group_fd`, then `VFIO_GROUP_GET_DEVICE_FD`: the
//!   group path lets a device be opened more than once; FACTS.md).
//!
//! Reset: [`SpdkController::reset`] bumps the generation, so a queue dropped after it
//! neither deletes queues nor frees a qid SPDK may have given out again.

use std::io;
use std::ops::Range;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::{null_mut, NonNull};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvme::spec::{self, Cap, Sqe};
use nvme::vfio::VfioDevice;
use nvme::{DmaBuffer, DmaRegion, DoorbellPair, Mmio, QueueOwner, RawQueuePair, ShadowPages};
use spdk_sys as sys;
use transport::direct::target::{CmbSqs, DirectDevice};

use crate::spdk_backend::{alloc_contiguous, SpdkController};

/// The direct-mode face of one SPDK controller.
pub struct SpdkDirect {
    ctrl: Arc<SpdkController>,
}

/// Keeps the controller (and so SPDK's BAR0 mapping and shadow doorbell pages) alive
/// while a doorbell or a shadow page of it is in use.
struct Held(#[allow(dead_code)] Arc<SpdkController>);
impl DmaRegion for Held {}

fn admin_err(ctrl: &SpdkController, what: &str, e: impl std::fmt::Display) -> nvme::Error {
    nvme::Error::Io {
        context: format!("spdk:{} {what}", ctrl.bdf()),
        source: io::Error::other(e.to_string()),
    }
}

impl SpdkDirect {
    pub fn new(ctrl: Arc<SpdkController>) -> Self {
        SpdkDirect { ctrl }
    }

    fn cap(&self) -> Cap {
        // SAFETY: the controller is attached; SPDK reads its cached CAP.
        Cap(unsafe { sys::spdk_nvme_ctrlr_get_regs_cap(self.ctrl.raw()).raw })
    }

    /// SPDK's mapping of BAR0 (DPDK mapped it when SPDK attached; no new mapping).
    fn bar0(&self) -> nvme::Result<Mmio> {
        let (mut addr, mut phys, mut size) = (null_mut(), 0u64, 0u64);
        // SAFETY: the controller is attached, so is its PCI device; SPDK writes the three
        // out-parameters.
        let rc = unsafe {
            let dev = sys::spdk_nvme_ctrlr_get_pci_device(self.ctrl.raw());
            if dev.is_null() {
                -libc::ENODEV
            } else {
                sys::spdk_pci_device_map_bar(dev, 0, &mut addr, &mut phys, &mut size)
            }
        };
        let base = NonNull::new(addr.cast::<u8>()).filter(|_| rc == 0);
        let base = base.ok_or_else(|| nvme::Error::Unsupported {
            what: format!(
                "BAR0 of spdk:{} (spdk_pci_device_map_bar: {rc})",
                self.ctrl.bdf()
            ),
        })?;
        // SAFETY: BAR0 stays mapped while SPDK has the controller attached, which `Held`
        // guarantees for as long as the Mmio lives.
        Ok(unsafe { Mmio::new(base, size as usize, Arc::new(Held(self.ctrl.clone()))) })
    }

    /// SPDK's Doorbell Buffer Config pages, when SPDK set them up (they change at each
    /// reset: read for every queue).
    fn shadow_pages(&self) -> Option<ShadowPages> {
        let (mut db, mut ei) = (null_mut(), null_mut());
        // SAFETY: the controller is attached; the shim reads two pointer fields.
        unsafe { sys::nvmf_p2p_spdk_shadow_doorbells(self.ctrl.raw(), &mut db, &mut ei) };
        let page = |p: *mut u32| -> Option<DmaBuffer> {
            let ptr = NonNull::new(p.cast::<u8>())?;
            // SAFETY: SPDK allocated one page (its page size, 4 KiB on PCIe) of DMA memory
            // for each and frees it only in a reset or at detach; a reset happens only
            // after every direct queue was dropped (serve's reset path), and `Held` keeps
            // the controller attached. The iova is not used (the pages are the host's).
            Some(unsafe {
                DmaBuffer::from_raw_parts(
                    ptr,
                    0,
                    spec::PAGE_SIZE,
                    Arc::new(Held(self.ctrl.clone())),
                )
            })
        };
        Some(ShadowPages {
            doorbells: page(db)?,
            event_idx: page(ei)?,
        })
    }

    /// The VFIO device fd of this controller, from DPDK's group fd (opened once).
    fn vfio(&self) -> nvme::Result<Arc<VfioDevice>> {
        let got = self.ctrl.vfio.get_or_init(|| {
            let bdf = self.ctrl.bdf();
            let group = nvme::pci::iommu_group(bdf)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{bdf} has no IOMMU group"))?;
            // SAFETY: plain call into DPDK's EAL (initialised: SPDK attached the device).
            let fd = unsafe { sys::rte_vfio_get_group_fd(group as i32) };
            if fd < 0 {
                return Err(format!(
                    "DPDK has no VFIO group fd for IOMMU group {group} of {bdf} (is the device on vfio-pci, not uio_pci_generic?)"
                ));
            }
            // SAFETY: DPDK keeps the group fd open while the device is attached; it is
            // only borrowed for the ioctl.
            let group_fd = unsafe { BorrowedFd::borrow_raw(fd) };
            VfioDevice::from_group(group_fd, bdf)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        got.clone().map_err(|what| nvme::Error::Unsupported {
            what: format!("dma-buf export from SPDK's VFIO device: {what}"),
        })
    }

    /// Runs `sqe` on SPDK's admin queue; an error unless it succeeded.
    fn admin(&self, sqe: Sqe, what: &str) -> nvme::Result<()> {
        let opcode = sqe.opcode();
        let cqe = self
            .ctrl
            .admin_raw(&sqe, None)
            .map_err(|e| admin_err(&self.ctrl, what, e))?;
        let status = cqe.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(nvme::Error::Command {
                qid: 0,
                cid: cqe.cid.get(),
                opcode,
                status,
            })
        }
    }
}

impl QueueOwner for SpdkController {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn release_queue(&self, qid: u16, generation: u64) {
        if generation != self.generation() {
            // The reset deleted the queues and rebuilt SPDK's qid allocator.
            return;
        }
        for sqe in [Sqe::delete_io_sq(qid), Sqe::delete_io_cq(qid)] {
            if let Err(e) = self.admin_raw(&sqe, None) {
                tracing::warn!(bdf = %self.bdf(), qid, "deleting direct queue: {e}");
            }
        }
        // SAFETY: `qid` came from spdk_nvme_ctrlr_alloc_qid in this generation and is
        // given back once (this is the queue's one release).
        unsafe { sys::spdk_nvme_ctrlr_free_qid(self.raw(), qid) };
    }
}

impl DirectDevice for SpdkDirect {
    fn name(&self) -> String {
        format!("spdk:{}", self.ctrl.bdf())
    }

    fn namespace(&self, nsid: u32) -> Option<(u32, u64)> {
        let ns = self.ctrl.namespace(nsid)?;
        // SAFETY: `ns` is an active namespace handle of the attached controller.
        Some(unsafe {
            (
                sys::spdk_nvme_ns_get_sector_size(ns.as_ptr()),
                sys::spdk_nvme_ns_get_num_sectors(ns.as_ptr()),
            )
        })
    }

    fn max_queue_entries(&self) -> u32 {
        u32::from(self.cap().mqes()) + 1
    }

    fn max_transfer(&self) -> usize {
        // SAFETY: the controller is attached.
        unsafe { sys::spdk_nvme_ctrlr_get_max_xfer_size(self.ctrl.raw()) as usize }
    }

    fn shadow_doorbells_in_use(&self) -> bool {
        self.shadow_pages().is_some()
    }

    fn cmb_sqs(&self) -> CmbSqs {
        // SAFETY: the controller is attached; SPDK reads its cached CMBSZ.
        let cmbsz = unsafe { sys::spdk_nvme_ctrlr_get_regs_cmbsz(self.ctrl.raw()).raw };
        if cmbsz == 0 {
            CmbSqs::NoCmb
        } else {
            CmbSqs::OwnersOnly
        }
    }

    fn generation(&self) -> u64 {
        QueueOwner::generation(&*self.ctrl)
    }

    fn alloc_dma(&self, len: usize) -> nvme::Result<DmaBuffer> {
        alloc_contiguous(len)
    }

    fn alloc_cmb(&self, _len: usize) -> nvme::Result<DmaBuffer> {
        Err(nvme::Error::Unsupported {
            what: format!(
                "direct queues in the CMB of spdk:{} (SPDK keeps it)",
                self.ctrl.bdf()
            ),
        })
    }

    fn cmb_offset(&self, _buf: &DmaBuffer) -> u64 {
        0
    }

    fn interrupt_vectors(&self) -> u16 {
        // SPDK owns the MSI-X table (its queue pairs' eventfds): direct queues poll.
        0
    }

    fn create_raw_queue_pair(
        &self,
        sq: DmaBuffer,
        cq: DmaBuffer,
        depth: u16,
        interrupts: bool,
    ) -> nvme::Result<RawQueuePair> {
        if interrupts {
            return Err(nvme::Error::Unsupported {
                what: format!(
                    "interrupts on direct queues of spdk:{} (SPDK owns MSI-X)",
                    self.ctrl.bdf()
                ),
            });
        }
        let max = self.max_queue_entries().min(65535) as u16;
        RawQueuePair::check_rings(&sq, &cq, depth, max)?;
        let regs = self.bar0()?;
        let shadow = self.shadow_pages();
        // SAFETY: the controller is attached; SPDK's allocator is locked inside.
        let qid = unsafe { sys::spdk_nvme_ctrlr_alloc_qid(self.ctrl.raw()) };
        let Ok(qid) = u16::try_from(qid) else {
            return Err(nvme::Error::NoQueuesLeft { granted: 0 });
        };
        let generation = QueueOwner::generation(&*self.ctrl);
        // From here on the queue pair's drop deletes the queues and frees the qid.
        let dstrd = self.cap().dstrd();
        let doorbells = match DoorbellPair::new(&regs, dstrd, qid, shadow.as_ref()) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: allocated above, given back once.
                unsafe { sys::spdk_nvme_ctrlr_free_qid(self.ctrl.raw(), qid) };
                return Err(e);
            }
        };
        if let Some(sh) = &shadow {
            sh.clear_slots(qid, dstrd)?;
        }
        cq.fill(0, cq.len(), 0)?;
        // Created before the commands: if the CQ or SQ creation fails, dropping it deletes
        // whatever was created (Delete of a queue that does not exist just fails) and
        // frees the qid.
        let cq_iova = cq.iova();
        let sq_iova = sq.iova();
        let raw = RawQueuePair::from_parts(
            qid,
            depth,
            sq,
            cq,
            doorbells,
            generation,
            self.ctrl.clone() as Arc<dyn QueueOwner>,
        );
        self.admin(Sqe::create_io_cq(qid, depth - 1, cq_iova), "Create I/O CQ")?;
        self.admin(
            Sqe::create_io_sq(qid, depth - 1, qid, sq_iova),
            "Create I/O SQ",
        )?;
        tracing::info!(bdf = %self.ctrl.bdf(), qid, depth, shadow_doorbells = raw.shadow_doorbells(), "direct queue created on SPDK's controller");
        Ok(raw)
    }

    fn doorbell_offsets(&self, qid: u16) -> (u64, u64) {
        let d = self.cap().dstrd();
        (
            spec::sq_tail_doorbell(qid, d) as u64,
            spec::cq_head_doorbell(qid, d) as u64,
        )
    }

    fn doorbell_range(&self) -> (u64, u64) {
        // SAFETY: the controller is attached.
        let queues = unsafe { (*sys::spdk_nvme_ctrlr_get_opts(self.ctrl.raw())).num_io_queues };
        spec::doorbell_pages(queues.min(65535) as u16, self.cap().dstrd())
    }

    fn export_doorbells(&self) -> nvme::Result<OwnedFd> {
        let (off, len) = self.doorbell_range();
        self.vfio()?.export_dma_buf(0, off, len)
    }

    fn export_cmb(&self, _range: Range<u64>) -> nvme::Result<OwnedFd> {
        Err(nvme::Error::Unsupported {
            what: format!(
                "CMB export of spdk:{} (SPDK keeps the CMB)",
                self.ctrl.bdf()
            ),
        })
    }
}
