//! Preallocated data buffers of a poll group.
//!
//! The pool is one page-aligned allocation so the wire can register it once (one MR) and,
//! later, the VFIO driver can map it for device DMA. Because a NIC or a device writes
//! into it behind Rust's back, the pool never holds a Rust reference to its memory: it
//! keeps a raw pointer and hands out a slice only for a buffer its caller owns (a
//! [`BufIdx`] from [`BufferPool::alloc`]), and the core only slices a buffer while no
//! transfer on it is in flight (the request state machine guarantees it).
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

/// Index of a buffer in its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufIdx(u32);

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

    /// The first `len` bytes of buffer `idx` as the device sees them (its IOVA), for a
    /// DMA pool. Clones a reference to the mapping: no heap allocation.
    pub fn dma(&self, idx: BufIdx, len: usize) -> Option<DmaBuffer> {
        let mem = self.dma.as_ref()?;
        let i = idx.0 as usize;
        if i >= self.count || !self.owned[i] || len > self.chunk {
            return None;
        }
        mem.slice(i * self.chunk, len).ok()
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
    pub fn alloc(&mut self) -> Option<BufIdx> {
        let i = self.free.pop()?;
        self.owned[i as usize] = true;
        Some(BufIdx(i))
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
    pub fn alloc_io(&mut self) -> Option<BufIdx> {
        if self.free.len() <= self.reserve() {
            return None;
        }
        self.alloc()
    }

    /// Returns a buffer.
    pub fn release(&mut self, idx: BufIdx) {
        let slot = &mut self.owned[idx.0 as usize];
        assert!(*slot, "buffer {} released twice", idx.0);
        *slot = false;
        self.free.push(idx.0);
    }

    fn range(&self, idx: BufIdx, len: usize) -> (*mut u8, usize) {
        let i = idx.0 as usize;
        assert!(
            i < self.count && self.owned[i],
            "buffer {i} is not allocated"
        );
        // Pointer arithmetic inside the allocation: i < count, offset ≤ len of the layout.
        (
            self.base.as_ptr().wrapping_add(i * self.chunk),
            len.min(self.chunk),
        )
    }

    /// The first `len` bytes of buffer `idx` (which must be allocated).
    pub fn slice(&self, idx: BufIdx, len: usize) -> &[u8] {
        let (p, n) = self.range(idx, len);
        // SAFETY: [p, p+n) lies in our allocation, in a buffer the caller owns through
        // `idx`; no transfer is in flight on it (the core's state machine), so nothing
        // else writes it while the shared borrow of `self` lasts.
        unsafe { std::slice::from_raw_parts(p, n) }
    }

    /// The first `len` bytes of buffer `idx`, writable.
    pub fn slice_mut(&mut self, idx: BufIdx, len: usize) -> &mut [u8] {
        let (p, n) = self.range(idx, len);
        // SAFETY: as in `slice`, and `&mut self` makes this the only slice of the pool.
        unsafe { std::slice::from_raw_parts_mut(p, n) }
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
        let io: Vec<_> = std::iter::from_fn(|| p.alloc_io()).collect();
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
        p.release(io[0]);
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
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert!(p.alloc().is_none());
        p.slice_mut(a, 4096).fill(1);
        p.slice_mut(b, 4096).fill(2);
        assert!(p.slice(a, 4096).iter().all(|&x| x == 1));
        p.release(a);
        assert_eq!(p.available(), 1);
        assert_eq!(p.capacity(), 2);
        assert_eq!(p.alloc(), Some(a));
        let (base, len) = p.region();
        assert_eq!(base as usize % POOL_ALIGN, 0);
        assert_eq!(len, 8192);
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn double_release_panics() {
        let mut p = BufferPool::new(1, 512);
        let a = p.alloc().unwrap();
        p.release(a);
        p.release(a);
    }
}
