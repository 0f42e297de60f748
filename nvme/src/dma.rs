//! Device-shared memory: DMA buffers, MMIO register windows and the [`Platform`] trait that
//! lets one controller init path run over VFIO and over the simulator.
//!
//! Rule (as in rust-vmm vm-memory): memory the device may access is never reached through a Rust
//! reference. [`DmaBuffer`] and [`Mmio`] hand out raw pointers, volatile accessors and
//! copies only.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Keeps the memory behind a [`DmaBuffer`] or [`Mmio`] mapped (and IOMMU-mapped) until the
/// last handle is dropped. Implementations unmap in `Drop`.
pub trait DmaRegion: Any + Send + Sync {}

/// A physically contiguous (in IOVA space) buffer the device can DMA to/from.
///
/// Cloning shares the underlying mapping. A buffer given to the device in a command must
/// stay alive until the command completes; if it is dropped earlier the mapping is removed
/// and the device gets an IOMMU fault (VFIO) or a Data Transfer Error (simulator), never
/// access to freed memory.
#[derive(Clone)]
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    iova: u64,
    len: usize,
    region: Arc<dyn DmaRegion>,
}

// SAFETY: a DmaBuffer is a raw pointer into a mapping kept alive by `region` (Send + Sync);
// every access goes through raw-pointer copies or volatile operations, never references,
// so sharing it between threads is as safe as sharing the mapping.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above; `&DmaBuffer` gives no reference into the memory.
unsafe impl Sync for DmaBuffer {}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DmaBuffer {{ iova: {:#x}, len: {:#x} }}",
            self.iova, self.len
        )
    }
}

impl DmaBuffer {
    /// Wrap a mapping.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as `region` lives, and
    /// the device must see it at `iova..iova+len`.
    pub unsafe fn from_raw_parts(
        ptr: NonNull<u8>,
        iova: u64,
        len: usize,
        region: Arc<dyn DmaRegion>,
    ) -> Self {
        DmaBuffer {
            ptr,
            iova,
            len,
            region,
        }
    }
    /// The device-visible address.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw CPU pointer (for registering the memory elsewhere, e.g. as an RDMA MR).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The object keeping the mapping alive.
    pub fn region(&self) -> &Arc<dyn DmaRegion> {
        &self.region
    }
    fn check(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {off:#x}+{len:#x} outside DMA buffer of {:#x} bytes",
                self.len
            ))),
        }
    }
    /// A sub-buffer sharing this mapping.
    pub fn slice(&self, off: usize, len: usize) -> Result<DmaBuffer> {
        self.check(off, len)?;
        Ok(DmaBuffer {
            // SAFETY: off <= len, checked above, so the pointer stays inside the mapping.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) },
            iova: self.iova + off as u64,
            len,
            region: self.region.clone(),
        })
    }
    /// Split into `n` consecutive sub-buffers of `chunk` bytes each.
    pub fn chunks(&self, chunk: usize) -> Vec<DmaBuffer> {
        if chunk == 0 {
            return Vec::new();
        }
        (0..self.len / chunk)
            .filter_map(|i| self.slice(i * chunk, chunk).ok())
            .collect()
    }
    /// Copy out of the buffer (call only when the device is not writing this range).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.check(off, dst.len())?;
        // SAFETY: range checked; source is raw device-shared memory (no reference is made
        // into it), destination is a distinct Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }
    /// Copy into the buffer (call only when the device is not accessing this range).
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        self.check(off, src.len())?;
        // SAFETY: range checked; destination is raw device-shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        };
        Ok(())
    }
    /// Fill a range with `byte`.
    pub fn fill(&self, off: usize, len: usize, byte: u8) -> Result<()> {
        self.check(off, len)?;
        // SAFETY: range checked.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), byte, len) };
        Ok(())
    }
    /// Volatile 32-bit load at a 4-byte aligned offset.
    pub fn read_u32(&self, off: usize) -> Result<u32> {
        self.check(off, 4)?;
        if !off.is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "unaligned u32 offset {off:#x}"
            )));
        }
        // SAFETY: in bounds and aligned (the buffer start is page aligned).
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off) as *const u32) })
    }
    /// Volatile 32-bit store at a 4-byte aligned offset.
    pub fn write_u32(&self, off: usize, v: u32) -> Result<()> {
        self.check(off, 4)?;
        if !off.is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "unaligned u32 offset {off:#x}"
            )));
        }
        // SAFETY: in bounds and aligned.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off) as *mut u32, v) };
        Ok(())
    }
    /// Copy using only aligned 8-byte volatile accesses (for trapped MMIO like QEMU's CMB).
    /// `off` and `src.len()` must be multiples of 8.
    pub fn write_volatile_u64s(&self, off: usize, src: &[u64]) -> Result<()> {
        self.check(off, src.len() * 8)?;
        if !off.is_multiple_of(8) {
            return Err(Error::InvalidArgument(format!("unaligned offset {off:#x}")));
        }
        let p = self.ptr.as_ptr().wrapping_add(off) as *mut u64;
        for (i, v) in src.iter().enumerate() {
            // SAFETY: in bounds and 8-byte aligned, checked above.
            unsafe { std::ptr::write_volatile(p.add(i), *v) };
        }
        Ok(())
    }
}

/// Something that hands out DMA-able memory.
pub trait DmaAllocator: Send + Sync {
    /// Allocate `len` bytes (rounded up to the page size), zeroed, page aligned in both
    /// CPU and IOVA space.
    fn alloc(&self, len: usize) -> Result<DmaBuffer>;
}

/// A window of memory-mapped registers (BAR0 or the simulator's register file).
#[derive(Clone)]
pub struct Mmio {
    base: NonNull<u8>,
    len: usize,
    _keep: Arc<dyn DmaRegion>,
}

// SAFETY: Mmio is a raw pointer into a mapping kept alive by `_keep`; all accesses are
// volatile and device registers are designed for concurrent access.
unsafe impl Send for Mmio {}
// SAFETY: as above.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// # Safety
    /// `base..base+len` must stay mapped (device registers or memory) while `keep` lives.
    pub unsafe fn new(base: NonNull<u8>, len: usize, keep: Arc<dyn DmaRegion>) -> Self {
        Mmio {
            base,
            len,
            _keep: keep,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn ok(&self, off: usize, size: usize) -> bool {
        off.is_multiple_of(size) && off.checked_add(size).is_some_and(|e| e <= self.len)
    }
    /// Volatile 32-bit read; out-of-range offsets read all ones (like a missing device).
    pub fn read32(&self, off: usize) -> u32 {
        if !self.ok(off, 4) {
            return u32::MAX;
        }
        // SAFETY: in bounds, aligned, mapping alive.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(off) as *const u32) }
    }
    /// Volatile 32-bit write; out-of-range offsets are ignored.
    pub fn write32(&self, off: usize, v: u32) {
        if self.ok(off, 4) {
            // SAFETY: in bounds, aligned, mapping alive.
            unsafe { std::ptr::write_volatile(self.base.as_ptr().add(off) as *mut u32, v) }
        }
    }
    /// 64-bit register read as two 32-bit reads (low then high).
    pub fn read64(&self, off: usize) -> u64 {
        self.read32(off) as u64 | ((self.read32(off + 4) as u64) << 32)
    }
    /// 64-bit register write as two 32-bit writes (low then high).
    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
    /// Raw pointer to a 32-bit register (doorbells), or None when out of range.
    pub fn reg_ptr(&self, off: usize) -> Option<*mut u32> {
        // SAFETY: checked in range and aligned.
        self.ok(off, 4)
            .then(|| unsafe { self.base.as_ptr().add(off) as *mut u32 })
    }
}

/// A mapped BAR other than the register BAR (the CMB's).
#[derive(Clone)]
pub struct BarMapping {
    /// The BAR's memory, as a DMA buffer whose `iova` is the BAR's PCI bus address.
    pub mem: DmaBuffer,
}

/// What one controller needs from the machine: its registers, DMA memory, other BARs and a
/// device-level reset. Implemented by the VFIO layer and by the simulator; the controller
/// init path in [`crate::Controller`] runs unchanged over both.
pub trait Platform: Send + Sync + 'static {
    /// A short name for messages (the BDF, or "sim").
    fn name(&self) -> String;
    /// The controller registers (BAR0).
    fn regs(&self) -> &Mmio;
    /// DMA memory in host RAM.
    fn dma(&self) -> &dyn DmaAllocator;
    /// Map BAR `bir` (for the CMB). The returned buffer's `iova` is the bus address the
    /// controller uses for it (CMBMSC.CBA).
    fn map_bar(&self, bir: u8) -> Result<BarMapping>;
    /// A device-level reset (FLR). Registers read CC=0 afterwards.
    fn device_reset(&self) -> Result<()>;
    /// Interrupt vectors (MSI-X) the device can signal through eventfds; 0 = none (the
    /// controller is then polled only).
    fn interrupt_vectors(&self) -> u16 {
        0
    }
    /// Route vectors `0..count` (count <= [`interrupt_vectors`](Self::interrupt_vectors))
    /// to one eventfd each and enable them. Once enabled, later calls return the same
    /// eventfds (at most as many as first enabled).
    fn enable_interrupts(&self, count: u16) -> Result<Vec<Arc<crate::irq::EventFd>>> {
        let _ = count;
        Err(Error::Unsupported {
            what: format!("interrupts on {}", self.name()),
        })
    }
}
