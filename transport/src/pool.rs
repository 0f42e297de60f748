//! Preallocated data buffers of a poll group.
//!
//! The pool is one page-aligned allocation so the wire can register it once (one MR) and
//! the VFIO driver can map it for device DMA. Because a NIC or a device writes into it
//! behind Rust's back, nothing holds a Rust reference to that memory while a transfer
//! may be in flight: a buffer travels as an owned handle, a [`DataBuf`] from
//! [`BufferPool::alloc`] (an address and a size, like vm-memory's `VolatileSlice`),
//! which the wire (`Qpair::post_read`/`post_write`) and the device (through
//! [`BufferPool::dma`]) take by address. The CPU sees the bytes only through
//! [`DataBuf::bytes`] and [`DataBuf::bytes_mut`], which are `unsafe`: their caller
//! asserts that no transfer or device command on the buffer is in flight (the core's
//! request state machine knows). The handle goes back with [`BufferPool::release`], by
//! value, so it cannot be released twice or used after.
//!
//! With an asynchronous backend the pool is carved from that backend's DMA memory
//! ([`BufferPool::from_dma`]): each buffer is then also an NVMe PRP source/destination
//! ([`BufferPool::dma`]), so data moves NIC ↔ buffer ↔ device without a copy.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use nvme::DmaBuffer;

/// Alignment of the pool and of each buffer (buffers are multiples of it).
pub const POOL_ALIGN: usize = 4096;

/// Fixed-size data buffers carved from one allocation; allocation is a pop from a free
/// list: no heap traffic per I/O.
pub struct BufferPool {
    base: NonNull<u8>,
    len: usize,
    /// `Some`: the pool allocated its memory itself (freed on drop).
    layout: Option<Layout>,
    /// `Some`: the memory is this DMA buffer's (device-visible; kept alive by it).
    dma: Option<DmaBuffer>,
    chunk: usize,
    count: usize,
    free: Vec<u32>,
    owned: Vec<bool>,
}

// SAFETY: the pool exclusively owns its allocation (or, for a DMA pool, a `DmaBuffer`,
// which is Send); moving it between threads moves that ownership (no thread-local state).
unsafe impl Send for BufferPool {}

/// One data buffer of a [`BufferPool`], owned by whoever holds the handle (a request)
/// from [`BufferPool::alloc`] to [`BufferPool::release`]. Neither `Clone` nor `Copy`,
/// and no reference into the memory: the NIC or the device may write it while it is
/// held (see the module documentation).
///
/// ```compile_fail
/// let mut pool = transport::pool::BufferPool::new(1, 4096);
/// let buf = pool.alloc().unwrap();
/// pool.release(buf);
/// pool.release(buf); // moved: a buffer cannot go back twice
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct DataBuf {
    idx: u32,
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: the handle is the only owner of its buffer (not Clone, not Copy); moving it to
// another thread moves that ownership; the memory is the pool's, which is Send.
unsafe impl Send for DataBuf {}

impl DataBuf {
    /// Address of the buffer (for a wire's SGE or a device's PRP).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Size of the buffer (the pool's chunk size).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The first `len` bytes of the buffer (at most its capacity) for the CPU to read.
    ///
    /// # Safety
    /// No RDMA READ into the buffer and no device command on it may be in flight while
    /// the slice lives, and the pool must outlive it.
    pub unsafe fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: [ptr, ptr + min(len, cap)) is this buffer, inside the pool's
        // allocation; the caller guarantees nothing writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len.min(self.cap)) }
    }

    /// The first `len` bytes of the buffer (at most its capacity) for the CPU to write.
    ///
    /// # Safety
    /// No transfer (RDMA READ or WRITE) and no device command on the buffer may be in
    /// flight while the slice lives, and the pool must outlive it.
    pub unsafe fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` on the only handle makes the slice unique,
        // and the caller guarantees neither the NIC nor the device accesses it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len.min(self.cap)) }
    }
}

impl BufferPool {
    /// `count` buffers of `chunk` bytes each (`chunk` rounded up to [`POOL_ALIGN`]).
    pub fn new(count: u32, chunk: usize) -> Self {
        let chunk = chunk.max(1).next_multiple_of(POOL_ALIGN);
        let len = (count as usize * chunk).max(POOL_ALIGN);
        let layout = Layout::from_size_align(len, POOL_ALIGN).expect("pool layout");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        BufferPool {
            base,
            len,
            layout: Some(layout),
            dma: None,
            chunk,
            count: count as usize,
            free: (0..count).rev().collect(),
            owned: vec![false; count as usize],
        }
    }

    /// `count` buffers of `chunk` bytes each (`chunk` rounded up to [`POOL_ALIGN`]) carved
    /// from `mem`, device DMA memory; `None` when `mem` is too small or misaligned.
    pub fn from_dma(count: u32, chunk: usize, mem: DmaBuffer) -> Option<Self> {
        let chunk = chunk.max(1).next_multiple_of(POOL_ALIGN);
        let len = count as usize * chunk;
        let base = NonNull::new(mem.as_ptr())?;
        if mem.len() < len.max(POOL_ALIGN)
            || !(base.as_ptr() as usize).is_multiple_of(POOL_ALIGN)
            || !mem.iova().is_multiple_of(POOL_ALIGN as u64)
        {
            return None;
        }
        Some(BufferPool {
            base,
            len: mem.len(),
            layout: None,
            dma: Some(mem),
            chunk,
            count: count as usize,
            free: (0..count).rev().collect(),
            owned: vec![false; count as usize],
        })
    }

    /// Whether buffers are device DMA memory ([`BufferPool::from_dma`]).
    pub fn is_dma(&self) -> bool {
        self.dma.is_some()
    }

    /// The first `len` bytes of `buf` as the device sees them (its IOVA), for a DMA
    /// pool. Clones a reference to the mapping: no heap allocation.
    pub fn dma(&self, buf: &DataBuf, len: usize) -> Option<DmaBuffer> {
        let mem = self.dma.as_ref()?;
        let i = self.index_of(buf)?;
        if len > self.chunk {
            return None;
        }
        mem.slice(i * self.chunk, len).ok()
    }

    /// Index of `buf` in this pool; `None` for a buffer of another pool.
    fn index_of(&self, buf: &DataBuf) -> Option<usize> {
        let i = buf.idx as usize;
        let ours = i < self.count
            && buf.ptr.as_ptr() == self.base.as_ptr().wrapping_add(i * self.chunk)
            && self.owned[i];
        ours.then_some(i)
    }

    /// Size of one buffer.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Total buffers.
    pub fn capacity(&self) -> usize {
        self.count
    }

    /// Takes a buffer, or `None` when all are in use (the caller waits: backpressure).
    pub fn alloc(&mut self) -> Option<DataBuf> {
        let i = self.free.pop()?;
        self.owned[i as usize] = true;
        // Pointer arithmetic inside the allocation: i < count, i * chunk < len.
        let ptr = self.base.as_ptr().wrapping_add(i as usize * self.chunk);
        Some(DataBuf {
            idx: i,
            ptr: NonNull::new(ptr)?,
            cap: self.chunk,
        })
    }

    /// Buffers that I/O commands leave free for admin and fabrics commands (a Connect's
    /// data, Identify, log pages): when hosts' reads and writes hold every other buffer, a
    /// new queue's Connect or a Keep Alive still goes through. 1/8 of the pool, 1..=8; none
    /// in a one-buffer pool.
    pub fn reserve(&self) -> usize {
        if self.count <= 1 {
            0
        } else {
            (self.count / 8).clamp(1, 8)
        }
    }

    /// Takes a buffer for an I/O command: `None` (wait) when only the
    /// [`reserve`](Self::reserve) is left.
    pub fn alloc_io(&mut self) -> Option<DataBuf> {
        if self.free.len() <= self.reserve() {
            return None;
        }
        self.alloc()
    }

    /// Returns a buffer (the handle is gone with it).
    ///
    /// # Panics
    /// When `buf` is another pool's: a bug in the caller, not input.
    pub fn release(&mut self, buf: DataBuf) {
        let i = self
            .index_of(&buf)
            .unwrap_or_else(|| panic!("buffer {} is not from this pool", buf.idx));
        self.owned[i] = false;
        self.free.push(buf.idx);
    }

    /// Base address and length of the whole pool, to register it with a wire (an MR).
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.len)
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { dealloc(self.base.as_ptr(), layout) }
        }
        // A DMA pool's memory goes with `self.dma`, when its last handle drops.
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn io_commands_leave_the_reserve_to_admin_commands() {
        let mut p = super::BufferPool::new(4, 4096);
        assert_eq!(p.reserve(), 1);
        let mut io: Vec<_> = std::iter::from_fn(|| p.alloc_io()).collect();
        assert_eq!(io.len(), 3, "I/O takes all but the reserve");
        let admin = p
            .alloc()
            .expect("an admin command gets the reserved buffer");
        assert!(p.alloc().is_none());
        p.release(admin);
        assert!(
            p.alloc_io().is_none(),
            "the freed buffer is the reserve again"
        );
        p.release(io.swap_remove(0));
        assert!(p.alloc_io().is_some());
        let mut one = super::BufferPool::new(1, 4096);
        assert_eq!(one.reserve(), 0);
        assert!(
            one.alloc_io().is_some(),
            "a one-buffer pool keeps no reserve"
        );
        assert_eq!(super::BufferPool::new(256, 4096).reserve(), 8);
    }

    use super::*;

    #[test]
    fn alloc_release() {
        let mut p = BufferPool::new(2, 4096);
        let mut a = p.alloc().unwrap();
        let mut b = p.alloc().unwrap();
        assert!(p.alloc().is_none());
        // SAFETY: no transfer is posted on either buffer.
        unsafe {
            a.bytes_mut(4096).fill(1);
            b.bytes_mut(8192).fill(2);
            assert!(a.bytes(4096).iter().all(|&x| x == 1));
            assert_eq!(
                b.bytes(usize::MAX).len(),
                4096,
                "views stop at the buffer's end"
            );
        }
        let a_ptr = a.as_ptr();
        p.release(a);
        assert_eq!(p.available(), 1);
        assert_eq!(p.capacity(), 2);
        assert_eq!(p.alloc().map(|a| a.as_ptr()), Some(a_ptr));
        let (base, len) = p.region();
        assert_eq!(base as usize % POOL_ALIGN, 0);
        assert_eq!(len, 8192);
    }

    #[test]
    #[should_panic(expected = "not from this pool")]
    fn a_buffer_goes_back_to_its_own_pool_only() {
        let mut p = BufferPool::new(1, 512);
        let mut q = BufferPool::new(1, 512);
        let a = p.alloc().unwrap();
        assert!(q.dma(&a, 512).is_none());
        let _keep = q.alloc().unwrap();
        q.release(a);
    }
}
