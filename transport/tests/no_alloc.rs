//! The target core does not touch the heap per I/O: after warm-up, polling a stream of
//! keyed and in-capsule reads/writes allocates nothing on the target side.

mod common;

use std::time::Instant;

use common::*;
use nvme::spec::Status;
use transport::fabrics::SglDescriptor;
use transport::initiator::cmd;

#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

#[test]
fn io_path_does_not_allocate() {
    let mut rig = Rig::default_rig();
    let now = Instant::now();
    rig.frozen = Some(now);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let region = io.wire().register(64 * 1024);
    let data = pattern(4096, 3);
    let mut round = |rig: &mut Rig, armed: bool| {
        // Host side submits (allocates in the loopback host: not measured).
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
        alloc_count::count_all_threads(armed);
        while rig.group.poll_at(now) > 0 {}
        alloc_count::count_all_threads(false);
        let mut n = 0;
        while let Some(c) = io.poll_one() {
            assert_eq!(c.status(), Status::SUCCESS);
            n += 1;
        }
        assert_eq!(n, 17);
    };
    round(&mut rig, false); // warm-up: queues in the loopback reach their capacity
    round(&mut rig, false);
    // The counter works.
    alloc_count::count_all_threads(true);
    drop(std::hint::black_box(vec![1u8; 16]));
    alloc_count::count_all_threads(false);
    assert_eq!(alloc_count::take(), 1);
    round(&mut rig, true);
    assert_eq!(
        alloc_count::count(),
        0,
        "heap allocations while serving I/O"
    );
}
