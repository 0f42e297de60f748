//! Driver cost per I/O, for `valgrind --tool=callgrind`: only `submit_batch` and
//! `reap_batch` should be collected (see the command below), so the simulator thread and
//! the waiting loop are not counted.
//!
//! ```text
//! cargo build --release -p nvme --example instr_per_io
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!   --toggle-collect='instr_per_io::submit_batch' --toggle-collect='instr_per_io::reap_batch' \
//!   target/release/examples/instr_per_io 32 2000
//! callgrind_annotate /tmp/cg.out | head   # total Ir / (32 * 2000) = instructions per I/O
//! ```

use std::hint::black_box;

use nvme::sim::{SimConfig, Simulator};
use nvme::{Controller, ControllerOptions, DmaBuffer, IoQueuePair, QueueOptions};

#[inline(never)]
fn submit_batch(qp: &mut IoQueuePair, bufs: &[DmaBuffer]) {
    let mut batch = qp.batch();
    for (i, b) in bufs.iter().enumerate() {
        let _ = black_box(batch.read(1, i as u64, b, i as u64));
    }
}

#[inline(never)]
fn reap_batch(qp: &mut IoQueuePair) -> usize {
    qp.poll(usize::MAX, |c| {
        black_box(c);
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let qd: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(32)
        .clamp(1, 255);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let shadow = args.next().as_deref() != Some("mmio");
    let sim = Simulator::start(SimConfig::default()).expect("simulator");
    let ctrl = Controller::new(
        sim.platform(),
        ControllerOptions {
            shadow_doorbells: shadow,
            ..Default::default()
        },
    )
    .expect("controller");
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 256,
            sq_in_cmb: false,
        })
        .expect("queue pair");
    let pool = ctrl.alloc_dma(qd * 4096).expect("dma");
    let bufs = pool.chunks(4096);
    let mut done = 0usize;
    for _ in 0..rounds {
        let target = sim.commands_processed() + qd as u64;
        submit_batch(&mut qp, &bufs);
        while sim.commands_processed() < target {
            std::thread::yield_now();
        }
        let mut got = 0;
        while got < qd {
            got += reap_batch(&mut qp);
        }
        done += got;
    }
    let s = qp.stats();
    println!(
        "{done} reads at QD {qd} (shadow doorbells {}): {} MMIO doorbell writes",
        if shadow { "on" } else { "off" },
        s.mmio_doorbell_writes
    );
}
