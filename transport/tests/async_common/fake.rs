//! A fake asynchronous backend for host tests: DMA memory from the heap, a channel that
//! completes commands only when polled, last-in first-out (out of order), moving the data
//! at completion time like a device doing DMA late, with switches for backpressure, held
//! completions and failures.
#![allow(dead_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use nvme::spec::Status;
use nvme::{DmaBuffer, DmaRegion};
use transport::backend::{AsyncOp, Backend, IoChannel, SubmitError};
use transport::Result;

pub const BLOCK: u32 = 512;

struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the region only owns its allocation; it is freed once, in Drop.
unsafe impl Send for HeapRegion {}
// SAFETY: as above; it offers no access to the memory.
unsafe impl Sync for HeapRegion {}

impl DmaRegion for HeapRegion {}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `heap_dma`, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn heap_dma(len: usize) -> DmaBuffer {
    let layout = Layout::from_size_align(len.max(4096), 4096).unwrap();
    // SAFETY: non-zero size.
    let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
    let region = Arc::new(HeapRegion { ptr, layout });
    // SAFETY: the allocation is valid for `layout.size()` bytes while `region` lives; the
    // fake device "sees" it at IOVA = its address.
    unsafe { DmaBuffer::from_raw_parts(ptr, ptr.as_ptr() as u64, layout.size(), region) }
}

/// Switches and counters shared by the backend, its channels and the test.
#[derive(Default)]
pub struct Ctl {
    /// Completions are held (the "device" is slow).
    pub hold: bool,
    /// Commands a channel takes before it answers Busy.
    pub depth: usize,
    /// Busy answers given.
    pub busy: u64,
    /// Commands accepted by channels.
    pub submitted: u64,
    /// Synchronous calls (read/write/flush/write zeroes).
    pub sync_calls: u64,
    /// Status of the next completed command.
    pub fail_next: Option<Status>,
}

pub struct FakeDev {
    data: Mutex<Vec<u8>>,
    pub ctl: Mutex<Ctl>,
}

impl FakeDev {
    pub fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap()
    }
    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }
}

/// The backend: one namespace of `size` bytes.
pub struct FakeBackend {
    pub dev: Arc<FakeDev>,
}

impl FakeBackend {
    pub fn new(size: usize, depth: usize) -> FakeBackend {
        FakeBackend {
            dev: Arc::new(FakeDev {
                data: Mutex::new(vec![0; size]),
                ctl: Mutex::new(Ctl {
                    depth,
                    ..Ctl::default()
                }),
            }),
        }
    }
}

impl Backend for FakeBackend {
    fn describe(&self) -> String {
        "fake-async".into()
    }
    fn block_size(&self) -> u32 {
        BLOCK
    }
    fn block_count(&self) -> u64 {
        (self.dev.data.lock().unwrap().len() / BLOCK as usize) as u64
    }
    fn read(&self, slba: u64, buf: &mut [u8]) -> Result<()> {
        self.dev.ctl().sync_calls += 1;
        let off = slba as usize * BLOCK as usize;
        buf.copy_from_slice(&self.dev.data.lock().unwrap()[off..off + buf.len()]);
        Ok(())
    }
    fn write(&self, slba: u64, buf: &[u8]) -> Result<()> {
        self.dev.ctl().sync_calls += 1;
        let off = slba as usize * BLOCK as usize;
        self.dev.data.lock().unwrap()[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.dev.ctl().sync_calls += 1;
        Ok(())
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()> {
        self.dev.ctl().sync_calls += 1;
        let (off, len) = (slba as usize * 512, nlb as usize * 512);
        self.dev.data.lock().unwrap()[off..off + len].fill(0);
        Ok(())
    }
    fn dma_domain(&self) -> Option<usize> {
        Some(0xfa4e)
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer> {
        Ok(heap_dma(len))
    }
    fn open_channel(&self) -> Result<Option<Box<dyn IoChannel>>> {
        Ok(Some(Box::new(FakeChannel {
            dev: self.dev.clone(),
            inflight: Vec::with_capacity(256),
        })))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
    Flush,
    Zero,
}

struct Cmd {
    tag: u64,
    kind: Kind,
    off: usize,
    len: usize,
    ptr: usize,
}

struct FakeChannel {
    dev: Arc<FakeDev>,
    inflight: Vec<Cmd>,
}

impl IoChannel for FakeChannel {
    fn submit(&mut self, tag: u64, op: AsyncOp<'_>) -> std::result::Result<(), SubmitError> {
        let mut ctl = self.dev.ctl();
        if self.inflight.len() >= ctl.depth.min(self.inflight.capacity()) {
            ctl.busy += 1;
            return Err(SubmitError::Busy);
        }
        ctl.submitted += 1;
        let bs = BLOCK as usize;
        let cmd = match op {
            AsyncOp::Read { slba, nlb, buf } | AsyncOp::Write { slba, nlb, buf } => {
                assert_eq!(buf.len(), nlb as usize * bs, "buffer exactly nlb blocks");
                assert_eq!(
                    buf.iova(),
                    buf.as_ptr() as u64,
                    "pool buffer from our DMA memory"
                );
                Cmd {
                    tag,
                    kind: if matches!(op, AsyncOp::Read { .. }) {
                        Kind::Read
                    } else {
                        Kind::Write
                    },
                    off: slba as usize * bs,
                    len: buf.len(),
                    ptr: buf.as_ptr() as usize,
                }
            }
            AsyncOp::Flush => Cmd {
                tag,
                kind: Kind::Flush,
                off: 0,
                len: 0,
                ptr: 0,
            },
            AsyncOp::WriteZeroes { slba, nlb } => Cmd {
                tag,
                kind: Kind::Zero,
                off: slba as usize * bs,
                len: nlb as usize * bs,
                ptr: 0,
            },
        };
        self.inflight.push(cmd);
        Ok(())
    }

    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut n = 0;
        while n < max && !self.inflight.is_empty() {
            let status = {
                let mut ctl = self.dev.ctl();
                if ctl.hold {
                    break;
                }
                ctl.fail_next.take().unwrap_or(Status::SUCCESS)
            };
            // Last in, first out: completions come back out of order.
            let Some(c) = self.inflight.pop() else {
                break;
            };
            if status.is_success() {
                let mut data = self.dev.data.lock().unwrap();
                let range = c.off..c.off + c.len;
                match c.kind {
                    // SAFETY: `ptr..ptr+len` is a pool buffer the core handed over with
                    // the command and does not touch until this completion.
                    Kind::Read => unsafe {
                        std::ptr::copy_nonoverlapping(data[range].as_ptr(), c.ptr as *mut u8, c.len)
                    },
                    // SAFETY: as above.
                    Kind::Write => unsafe {
                        std::ptr::copy_nonoverlapping(
                            c.ptr as *const u8,
                            data[range].as_mut_ptr(),
                            c.len,
                        )
                    },
                    Kind::Zero => data[range].fill(0),
                    Kind::Flush => {}
                }
            }
            done(c.tag, status);
            n += 1;
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn max_transfer(&self) -> usize {
        128 * 1024
    }
}
