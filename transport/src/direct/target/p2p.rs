//! The P2P level of one queue: the SQ ring in the CMB when the controller takes SQs there,
//! the byte-exact doorbell MR and the CMB SQ MR registered from dma-bufs
//! (`docs/direct-mode.md`, "Levels"). Every refusal is a [`P2pRefusal`]; its text is the
//! reason the descriptor and `stats` carry for falling back to `forwarded`.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nvme::ctrl::RawQueuePair;
use nvme::DmaBuffer;
use rdma::{Access, MemoryRegion, ProtectionDomain};

use super::attach::create_raw;
use super::device::CmbSqs;
use super::DirectNamespace;

/// Where the P2P attempt put the SQ ring, and why not in the CMB.
#[derive(Debug)]
pub(super) enum SqPlace {
    /// In the controller memory buffer.
    Cmb,
    /// Host memory: the CMB has no room (or its allocation failed).
    CmbFull(nvme::Error),
    /// Host memory: the CMB does not take SQs (CMBSZ.SQS clear).
    CmbTakesNoSqs,
    /// Host memory: the controller has no CMB.
    NoCmb,
    /// Host memory: the CMB belongs to the controller's driver (SPDK).
    CmbOwners,
    /// Host memory: the controller refused the queue pair with the SQ in the CMB.
    CmbRefused(nvme::Error),
}

impl SqPlace {
    /// Whether the ring is in the CMB.
    pub(super) fn in_cmb(&self) -> bool {
        matches!(self, SqPlace::Cmb)
    }
}

impl fmt::Display for SqPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SqPlace::Cmb => f.write_str("SQ in the CMB"),
            SqPlace::CmbFull(e) => write!(f, "SQ in host memory ({e})"),
            SqPlace::CmbTakesNoSqs => f.write_str("SQ in host memory (the CMB does not take SQs)"),
            SqPlace::NoCmb => f.write_str("SQ in host memory (no CMB)"),
            SqPlace::CmbOwners => f.write_str("SQ in host memory (the CMB is SPDK's)"),
            SqPlace::CmbRefused(e) => write!(f, "SQ in host memory (CMB SQ refused: {e})"),
        }
    }
}

/// Why the P2P level was refused: the queue falls back to `forwarded`. The text (Display)
/// is the reason of the descriptor (cut to 63 bytes) and of `stats` (whole).
#[derive(Debug, thiserror::Error)]
pub(super) enum P2pRefusal {
    /// `try_p2p` is off.
    #[error("P2P disabled by configuration")]
    Disabled,
    /// No host memory for the SQ ring.
    #[error("SQ memory: {0}")]
    SqMemory(nvme::Error),
    /// The SQ ring could not be zeroed.
    #[error("SQ ring: {0}")]
    SqRing(nvme::Error),
    /// The controller refused the queue pair.
    #[error("queue pair with the {place}: {source}")]
    QueuePair { place: SqPlace, source: nvme::Error },
    /// The controller refused the queue pair in host memory too, after the CMB.
    #[error("queue pair: {0}")]
    QueuePairInHostMemory(nvme::Error),
    /// The doorbell MR (the usual refusal: the NIC cannot import the dma-buf).
    #[error("{source} (attempted with the {place})")]
    Doorbells {
        place: SqPlace,
        source: DoorbellRefusal,
    },
    /// The controller takes SQ tails from the shadow buffer: a NIC's MMIO write would be
    /// ignored.
    #[error("dma-buf MR ok, but shadow doorbells are in use (set shadow_doorbells = false)")]
    ShadowDoorbells,
    /// The CMB range of the SQ could not be exported as a dma-buf.
    #[error("CMB dma-buf export: {0}")]
    CmbExport(nvme::Error),
    /// The NIC refused the CMB SQ's dma-buf.
    #[error("ibv_reg_dmabuf_mr of the CMB SQ: {0}")]
    CmbSqMr(rdma::Error),
    /// The host-memory SQ could not be registered.
    #[error("register SQ: {0}")]
    SqMr(rdma::Error),
}

/// Why the byte-exact doorbell MR could not be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum DoorbellRefusal {
    /// VFIO did not export the doorbell page.
    #[error("doorbell dma-buf export: {0}")]
    Export(nvme::Error),
    /// `ibv_reg_dmabuf_mr` refused it; the errno name first (the descriptor carries 63
    /// bytes of the reason).
    #[error("ibv_reg_dmabuf_mr: {name}; {0}", name = errno_name(.0))]
    Register(rdma::Error),
}

/// Short name of the errno of a registration error.
fn errno_name(e: &rdma::Error) -> &'static str {
    match e.errno() {
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EFAULT) => "EFAULT",
        _ => "error",
    }
}

/// A queue pair on the P2P level, before it becomes an attachment.
pub(super) struct P2pQueue {
    pub db_mr: MemoryRegion,
    pub sq_mr: MemoryRegion,
    pub raw: RawQueuePair,
    pub place: SqPlace,
}

impl P2pQueue {
    /// The reason text of a P2P queue.
    pub(super) fn reason(&self) -> String {
        format!("dma-buf doorbell MR registered; {}", self.place)
    }
}

/// The P2P level for one queue pair: the SQ ring in the CMB when the controller allows
/// SQs there (else in host memory), the queue pair created on it, the byte-exact doorbell
/// MR and the SQ MR registered from dma-bufs. On a refusal (boxed: it is large, and rare
/// next to the work of an attach) the queue pair built so far is deleted on return.
pub(super) fn p2p_queue(
    pd: &Arc<ProtectionDomain>,
    ns: &DirectNamespace,
    cq: &DmaBuffer,
    depth: u16,
    sq_len: usize,
    irq: bool,
) -> Result<P2pQueue, Box<P2pRefusal>> {
    let ctrl = &*ns.device;
    let alloc_host = || {
        ctrl.alloc_dma(sq_len)
            .map_err(|e| Box::new(P2pRefusal::SqMemory(e)))
    };
    let (mut sq, mut place) = match ctrl.cmb_sqs() {
        CmbSqs::Yes => match ctrl.alloc_cmb(sq_len) {
            Ok(b) => (b, SqPlace::Cmb),
            Err(e) => (alloc_host()?, SqPlace::CmbFull(e)),
        },
        CmbSqs::NotSqs => (alloc_host()?, SqPlace::CmbTakesNoSqs),
        CmbSqs::NoCmb => (alloc_host()?, SqPlace::NoCmb),
        CmbSqs::OwnersOnly => (alloc_host()?, SqPlace::CmbOwners),
    };
    sq.fill(0, sq.len(), 0).map_err(P2pRefusal::SqRing)?;
    let raw = match create_raw(ctrl, &sq, cq, depth, irq) {
        Ok(r) => r,
        Err(e) if place.in_cmb() => {
            // The controller refused the CMB ring: P2P can still work with the SQ in
            // host memory (the host writes SQEs there, the doorbell into the device).
            tracing::info!(error = %e, "SQ in the CMB refused; trying host memory");
            sq = alloc_host()?;
            sq.fill(0, sq.len(), 0).map_err(P2pRefusal::SqRing)?;
            place = SqPlace::CmbRefused(e);
            create_raw(ctrl, &sq, cq, depth, irq).map_err(P2pRefusal::QueuePairInHostMemory)?
        }
        Err(source) => return Err(P2pRefusal::QueuePair { place, source }.into()),
    };
    let (sq_off, cq_off) = ctrl.doorbell_offsets(raw.qid());
    let db_mr = match p2p_doorbells(pd, ns, sq_off, cq_off) {
        Ok(mr) => mr,
        Err(source) => return Err(P2pRefusal::Doorbells { place, source }.into()),
    };
    // The controller takes SQ tails from the shadow buffer when shadow doorbells are
    // on, so a NIC writing the MMIO doorbell would be ignored.
    if ctrl.shadow_doorbells_in_use() {
        return Err(P2pRefusal::ShadowDoorbells.into());
    }
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let sq_mr = if place.in_cmb() {
        let off = ctrl.cmb_offset(&sq);
        let fd = ctrl
            .export_cmb(off..off + sq.len() as u64)
            .map_err(P2pRefusal::CmbExport)?;
        MemoryRegion::register_dmabuf(pd, fd.as_raw_fd(), 0, sq.len(), off, access)
            .map_err(P2pRefusal::CmbSqMr)?
    } else {
        // SAFETY: as in `attach::build`: the driver's DMA memory that the queue pair keeps
        // alive until after the MR (field order of `Attachment`), touched only through
        // DmaBuffer's raw accessors.
        unsafe { MemoryRegion::register(pd, sq.as_ptr(), sq.len(), access) }
            .map_err(P2pRefusal::SqMr)?
    };
    Ok(P2pQueue {
        raw,
        sq_mr,
        db_mr,
        place,
    })
}

/// Registers the byte-exact doorbell range of one queue (SQ tail .. CQ head + 4) from
/// the doorbell-page dma-buf.
fn p2p_doorbells(
    pd: &Arc<ProtectionDomain>,
    ns: &DirectNamespace,
    sq_off: u64,
    cq_off: u64,
) -> Result<MemoryRegion, DoorbellRefusal> {
    let fd = ns
        .device
        .export_doorbells()
        .map_err(DoorbellRefusal::Export)?;
    let (page_off, _) = ns.device.doorbell_range();
    let off = sq_off - page_off;
    let len = (cq_off + 4 - sq_off) as usize;
    MemoryRegion::register_dmabuf(
        pd,
        fd.as_raw_fd(),
        off,
        len,
        off,
        Access::LOCAL_WRITE | Access::REMOTE_WRITE,
    )
    .map_err(DoorbellRefusal::Register)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err() -> nvme::Error {
        nvme::Error::Io {
            context: "cmb".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        }
    }

    #[test]
    fn reasons_keep_their_text_and_the_cmb_is_a_place_not_a_string() {
        assert!(SqPlace::Cmb.in_cmb());
        for p in [
            SqPlace::CmbFull(io_err()),
            SqPlace::CmbTakesNoSqs,
            SqPlace::NoCmb,
            SqPlace::CmbOwners,
            SqPlace::CmbRefused(io_err()),
        ] {
            assert!(!p.in_cmb(), "{p}");
            assert!(p.to_string().starts_with("SQ in host memory ("), "{p}");
        }
        assert_eq!(SqPlace::Cmb.to_string(), "SQ in the CMB");
        let r = P2pRefusal::Doorbells {
            place: SqPlace::Cmb,
            source: DoorbellRefusal::Export(io_err()),
        };
        let s = r.to_string();
        assert!(s.starts_with("doorbell dma-buf export: cmb: "), "{s}");
        assert!(s.ends_with(" (attempted with the SQ in the CMB)"), "{s}");
        assert_eq!(
            P2pRefusal::Disabled.to_string(),
            "P2P disabled by configuration"
        );
        assert!(P2pRefusal::ShadowDoorbells
            .to_string()
            .contains("shadow_doorbells = false"));
    }
}
