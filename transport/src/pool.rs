//! Preallocated data buffers of a poll group.

/// Fixed-size data buffers carved from one allocation, so the wire can register the
/// whole pool once (one MR). Allocation is a pop from a free list: no heap traffic per I/O.
pub struct BufferPool {
    mem: Box<[u8]>,
    chunk: usize,
    free: Vec<u32>,
}

/// Index of a buffer in its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufIdx(u32);

impl BufferPool {
    /// `count` buffers of `chunk` bytes each.
    pub fn new(count: u32, chunk: usize) -> Self {
        let mem = vec![0u8; count as usize * chunk].into_boxed_slice();
        BufferPool {
            mem,
            chunk,
            free: (0..count).rev().collect(),
        }
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
        self.mem.len().checked_div(self.chunk).unwrap_or(0)
    }

    /// Takes a buffer, or `None` when all are in use (the caller waits: backpressure).
    pub fn alloc(&mut self) -> Option<BufIdx> {
        self.free.pop().map(BufIdx)
    }

    /// Returns a buffer.
    pub fn release(&mut self, idx: BufIdx) {
        debug_assert!(
            !self.free.contains(&idx.0),
            "double free of buffer {}",
            idx.0
        );
        self.free.push(idx.0);
    }

    /// The first `len` bytes of buffer `idx`.
    pub fn slice(&self, idx: BufIdx, len: usize) -> &[u8] {
        let start = idx.0 as usize * self.chunk;
        &self.mem[start..start + len.min(self.chunk)]
    }

    /// The first `len` bytes of buffer `idx`, writable.
    pub fn slice_mut(&mut self, idx: BufIdx, len: usize) -> &mut [u8] {
        let start = idx.0 as usize * self.chunk;
        &mut self.mem[start..start + len.min(self.chunk)]
    }

    /// The whole pool memory (to register it with the wire).
    pub fn memory_mut(&mut self) -> &mut [u8] {
        &mut self.mem
    }
}

#[cfg(test)]
mod tests {
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
    }
}
