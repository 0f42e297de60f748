//! The asynchronous backend path does not touch the heap per I/O either: after warm-up,
//! polling a stream of keyed and in-capsule reads/writes, flushes and write-zeroes through
//! a backend channel allocates nothing on the target side.

mod common;
#[path = "async_common/fake.rs"]
mod fake;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use nvme::spec::Status;
use transport::fabrics::SglDescriptor;
use transport::initiator::cmd;

#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

#[test]
fn async_io_path_does_not_allocate() {
    let backend = Arc::new(fake::FakeBackend::new(4 << 20, 8));
    let dev = backend.dev.clone();
    let mut rig = Rig::with_backend(&config(""), backend.clone());
    assert!(rig.group.dma_pool());
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
        alloc_count::count_all_threads(armed);
        while rig.group.poll_at(now) > 0 {}
        alloc_count::count_all_threads(false);
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
    alloc_count::count_all_threads(true);
    drop(std::hint::black_box(vec![1u8; 16]));
    alloc_count::count_all_threads(false);
    assert_eq!(alloc_count::take(), 1, "the counter works");
    round(&mut rig, true);
    assert_eq!(dev.ctl().submitted - before, 19, "all through the channel");
    assert!(dev.ctl().busy > 0, "with backpressure (channel depth 8)");
    assert_eq!(
        alloc_count::count(),
        0,
        "heap allocations while serving I/O through an asynchronous backend"
    );
}
