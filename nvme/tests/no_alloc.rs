//! Proof that the I/O path allocates nothing: a counting global allocator counts heap
//! allocations made by this thread while submit + poll run (the simulator thread's own
//! allocations are not counted).

use std::time::{Duration, Instant};

use nvme::sim::{SimConfig, Simulator};
use nvme::{Controller, ControllerOptions, QueueOptions};

#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

#[test]
fn submit_and_poll_do_not_allocate() {
    for shadow in [true, false] {
        let sim = Simulator::start(SimConfig::default()).unwrap();
        let opts = ControllerOptions {
            shadow_doorbells: shadow,
            ..Default::default()
        };
        let ctrl = Controller::new(sim.platform(), opts).unwrap();
        let mut qp = ctrl
            .create_io_queue_pair(QueueOptions {
                depth: 32,
                sq_in_cmb: false,
            })
            .unwrap();
        let pool = ctrl.alloc_dma(16 * 16384).unwrap();
        let bufs = pool.chunks(16384); // 4 pages each: PRP lists are used
        let mut completed = 0u64;
        let mut errors = 0u64;
        alloc_count::count_this_thread(true);
        let start = Instant::now();
        for round in 0..200u64 {
            for (i, b) in bufs.iter().enumerate() {
                let lba = (i as u64) * 4;
                if round % 2 == 0 {
                    qp.write(1, lba, b, round).unwrap();
                } else {
                    qp.read(1, lba, b, round).unwrap();
                }
            }
            let mut n = 0;
            while n < bufs.len() {
                n += qp.poll(usize::MAX, |c| {
                    completed += 1;
                    errors += (!c.is_ok()) as u64;
                });
                if start.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
        }
        alloc_count::count_this_thread(false);
        assert_eq!(completed, 200 * 16);
        assert_eq!(errors, 0);
        assert_eq!(
            alloc_count::take(),
            0,
            "heap allocations on the I/O path (shadow={shadow})"
        );
    }
}
