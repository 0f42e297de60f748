//! The asynchronous backend path does not touch the heap per I/O either: after warm-up,
//! polling a stream of keyed and in-capsule reads/writes, flushes and write-zeroes through
//! a backend channel allocates nothing on the target side.

mod common;
#[path = "async_common/fake.rs"]
mod fake;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use nvme::spec::Status;
use transport::backend::open_backend;
use transport::config::BackendSpec;
use transport::fabrics::SglDescriptor;
use transport::initiator::cmd;
use transport::loopback::LoopbackTransport;
use transport::target::Target;

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn async_io_path_does_not_allocate() {
    let backend = Arc::new(fake::FakeBackend::new(4 << 20, 8));
    let dev = backend.dev.clone();
    let target = Target::with_backends(&config(""), |spec| match spec {
        BackendSpec::Ram { size } if *size == 4 << 20 => Ok(backend.clone()),
        s => open_backend(s, None),
    })
    .unwrap();
    let (mut transport, connector) = LoopbackTransport::new();
    let group = target.create_poll_group(&mut transport).unwrap();
    assert!(group.dma_pool());
    let mut rig = Rig {
        target,
        transport,
        connector,
        group,
        frozen: None,
    };
    let now = Instant::now();
    rig.frozen = Some(now);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let region = io.wire().register(64 * 1024);
    let data = pattern(4096, 3);
    let mut round = |rig: &mut Rig, armed: bool| {
        for i in 0..8u64 {
            let d = SglDescriptor::keyed(region.addr + i * 8192, 4096, region.key, false);
            io.submit(cmd::write(1, i * 8, 8, d), &[], 0).unwrap();
            io.submit(cmd::read(1, i * 8, 8, d), &[], 0).unwrap();
        }
        io.submit(
            cmd::write(1, 100, 8, SglDescriptor::in_capsule(0, 4096)),
            &data,
            0,
        )
        .unwrap();
        io.submit(cmd::flush(1), &[], 0).unwrap();
        io.submit(cmd::write_zeroes(1, 200, 8), &[], 0).unwrap();
        ARMED.store(armed, Ordering::SeqCst);
        while rig.group.poll_at(now) > 0 {}
        ARMED.store(false, Ordering::SeqCst);
        let mut n = 0;
        while let Some(c) = io.poll_one() {
            assert_eq!(c.status(), Status::SUCCESS);
            n += 1;
        }
        assert_eq!(n, 19);
    };
    round(&mut rig, false); // warm-up
    round(&mut rig, false);
    let before = dev.ctl().submitted;
    ARMED.store(true, Ordering::SeqCst);
    drop(std::hint::black_box(vec![1u8; 16]));
    ARMED.store(false, Ordering::SeqCst);
    assert_eq!(ALLOCS.swap(0, Ordering::SeqCst), 1, "the counter works");
    round(&mut rig, true);
    assert_eq!(dev.ctl().submitted - before, 19, "all through the channel");
    assert!(dev.ctl().busy > 0, "with backpressure (channel depth 8)");
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "heap allocations while serving I/O through an asynchronous backend"
    );
}
