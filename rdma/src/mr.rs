//! Memory regions over host memory and over dma-buf file descriptors, and an owned,
//! registered buffer for tests and protocol buffers.

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::error::{last_os_error, Error, Result};
use crate::pd::ProtectionDomain;
use crate::wr::Sge;

/// Access rights of a memory region (`ibv_access_flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access(pub u32);

impl Access {
    /// Local write (needed for RECV and RDMA READ targets).
    pub const LOCAL_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE);
    /// Peers may RDMA WRITE into it.
    pub const REMOTE_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE);
    /// Peers may RDMA READ from it.
    pub const REMOTE_READ: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ);
    /// Local write plus remote read and write.
    pub const ALL: Access = Access(
        sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
    );
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// A registered memory region (`ibv_mr`); keeps its PD alive, deregistered on drop.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: an MR handle is immutable after registration; deregistration happens once in Drop.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes of host memory at `addr` (`ibv_reg_mr`).
    ///
    /// # Safety
    /// Until this region is dropped (deregistered) and every work request that names it
    /// has completed:
    /// - `[addr, addr + len)` must stay mapped and must not be freed or remapped;
    /// - the NIC (and, with remote access, the peer) may write to it at any time, so the
    ///   memory must not be accessed through Rust references (`&[u8]`/`&mut [u8]`) — only
    ///   through raw pointers (volatile or `ptr::copy`), atomics, or syscalls.
    ///
    /// Memory that the nvme crate has VFIO-mapped for DMA satisfies this if it outlives
    /// both mappings.
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion> {
        // SAFETY: live PD; the caller guarantees the range contract above.
        let mr = unsafe { sys::ibv_reg_mr(pd.as_raw(), addr.cast(), len, access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os_error("ibv_reg_mr"))?;
        Ok(MemoryRegion {
            mr,
            pd: Arc::clone(pd),
        })
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd`, addressed by the peer as
    /// `iova` (`ibv_reg_dmabuf_mr`). A device that cannot import dma-bufs (soft-RoCE)
    /// gives [`Error::Unsupported`] carrying EOPNOTSUPP.
    ///
    /// The fd may be closed after registration; the MR holds its own reference.
    pub fn register_dmabuf(
        pd: &Arc<ProtectionDomain>,
        fd: RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<MemoryRegion> {
        // SAFETY: live PD; the kernel validates the fd and range, and no host virtual
        // address is involved, so Rust memory is not exposed.
        let mr =
            unsafe { sys::ibv_reg_dmabuf_mr(pd.as_raw(), offset, len, iova, fd, access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os_error("ibv_reg_dmabuf_mr"))?;
        Ok(MemoryRegion {
            mr,
            pd: Arc::clone(pd),
        })
    }

    fn raw(&self) -> &sys::ibv_mr {
        // SAFETY: the MR is live until Drop and libibverbs does not mutate these fields.
        unsafe { self.mr.as_ref() }
    }

    /// The raw MR.
    pub fn as_raw(&self) -> *mut sys::ibv_mr {
        self.mr.as_ptr()
    }

    /// The PD it is registered in.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Local key (for SGEs).
    pub fn lkey(&self) -> u32 {
        self.raw().lkey
    }

    /// Remote key (handed to peers).
    pub fn rkey(&self) -> u32 {
        self.raw().rkey
    }

    /// Start address (the IOVA for dma-buf MRs).
    pub fn addr(&self) -> u64 {
        self.raw().addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.raw().length
    }

    /// True when the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A scatter/gather entry for `[offset, offset + len)` of this region, bounds-checked.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) || len > u32::MAX as usize {
            return Err(Error::OutOfRange {
                what: "MR",
                offset,
                len,
                size: self.len(),
            });
        }
        Ok(Sge {
            addr: self.addr() + offset as u64,
            len: len as u32,
            lkey: self.lkey(),
        })
    }

    /// The remote address of `offset` in this region, for handing to a peer.
    pub fn remote(&self, offset: usize) -> crate::wr::RemoteAddr {
        crate::wr::RemoteAddr {
            addr: self.addr() + offset as u64,
            rkey: self.rkey(),
        }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by this type, deregistered once.
        let ret = unsafe { sys::ibv_dereg_mr(self.as_raw()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_dereg_mr failed");
        }
    }
}

/// Page-aligned anonymous memory registered as one MR, owned by this value.
///
/// Accessed only by copies through raw pointers, since the NIC may write it at any time.
pub struct RegisteredBuffer {
    // Deregistered explicitly in Drop, before the unmap.
    mr: std::mem::ManuallyDrop<MemoryRegion>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned and only accessed through raw-pointer copies.
unsafe impl Send for RegisteredBuffer {}
// SAFETY: as above; concurrent copies race only as the NIC's DMA does.
unsafe impl Sync for RegisteredBuffer {}

impl RegisteredBuffer {
    /// Maps `len` zeroed bytes (rounded up to a page) and registers them.
    pub fn new(pd: &Arc<ProtectionDomain>, len: usize, access: Access) -> Result<Self> {
        if len == 0 {
            return Err(Error::EmptyBuffer);
        }
        // SAFETY: anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_os_error("mmap"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap returned NULL without MAP_FAILED");
        // SAFETY: the mapping lives until Drop, which deregisters first; it is only
        // accessed by raw-pointer copies.
        match unsafe { MemoryRegion::register(pd, ptr.as_ptr(), len, access) } {
            Ok(mr) => Ok(RegisteredBuffer {
                mr: std::mem::ManuallyDrop::new(mr),
                ptr,
                len,
            }),
            Err(e) => {
                // SAFETY: unmapping the mapping made above, never registered.
                unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
                Err(e)
            }
        }
    }

    /// The memory region.
    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base pointer (for volatile access by callers that know the protocol).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::OutOfRange {
                what: "buffer",
                offset,
                len,
                size: self.len,
            });
        }
        Ok(())
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked; raw copy into the owned mapping, no reference formed.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies from the buffer at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: bounds checked; raw copy out of the owned mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Volatile 8-byte load at `offset` (must be 8-aligned): for polling flags the peer
    /// writes.
    pub fn read_volatile_u64(&self, offset: usize) -> Result<u64> {
        self.check(offset, 8)?;
        if offset & 7 != 0 {
            return Err(Error::Misaligned { offset, align: 8 });
        }
        // SAFETY: bounds and alignment checked (the mapping is page-aligned).
        Ok(unsafe { std::ptr::read_volatile(self.as_ptr().add(offset).cast::<u64>()) })
    }

    /// Volatile 8-byte store at `offset` (must be 8-aligned).
    pub fn write_volatile_u64(&self, offset: usize, v: u64) -> Result<()> {
        self.check(offset, 8)?;
        if offset & 7 != 0 {
            return Err(Error::Misaligned { offset, align: 8 });
        }
        // SAFETY: bounds and alignment checked.
        unsafe { std::ptr::write_volatile(self.as_ptr().add(offset).cast::<u64>(), v) };
        Ok(())
    }
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        // SAFETY: the MR is dropped exactly once, here, and before the mapping it covers
        // is unmapped; nothing uses either afterwards.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.mr);
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
