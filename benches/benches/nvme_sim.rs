//! Submit + complete through the NVMe driver against the in-process simulated controller.
//! The simulator runs on its own thread, so these numbers include its processing and the
//! cross-core cache-line handoff of SQEs, CQEs and doorbells — except `cq_poll_*`, which
//! time the completion side alone: a poll of an empty CQ (what an idle poller pays per
//! look), and the reap of 32 CQEs the simulator has already posted (submission and the
//! wait for the simulator are outside the timed part).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nvme::sim::{SimConfig, Simulator};
use nvme::{Controller, ControllerOptions, IoQueuePair, QueueOptions};

fn reap(qp: &mut IoQueuePair, n: usize) {
    let mut done = 0;
    let mut spins = 0u32;
    while done < n {
        let got = qp.poll(usize::MAX, |c| {
            black_box(c);
        });
        done += got;
        spins = if got > 0 { 0 } else { spins + 1 };
        if spins > 200 {
            // Two cores shared with the simulator thread: let it run.
            std::thread::yield_now();
        }
    }
}

fn bench(c: &mut Criterion) {
    for shadow in [true, false] {
        let cfg = SimConfig {
            busy_poll: true,
            ..SimConfig::default()
        };
        let sim = Simulator::start(cfg).expect("simulator");
        let opts = ControllerOptions {
            shadow_doorbells: shadow,
            ..Default::default()
        };
        let ctrl = Controller::new(sim.platform(), opts).expect("controller");
        let mut qp = ctrl
            .create_io_queue_pair(QueueOptions {
                depth: 64,
                sq_in_cmb: false,
            })
            .expect("queue pair");
        let pool = ctrl.alloc_dma(32 * 4096).expect("dma");
        let bufs = pool.chunks(4096);
        let tag = if shadow { "shadow" } else { "mmio" };

        let mut g = c.benchmark_group(format!("nvme_sim/{tag}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("read4k_qd1", |b| {
            b.iter(|| {
                qp.read(1, 7, &bufs[0], 0).expect("submit");
                reap(&mut qp, 1);
            })
        });
        g.bench_function("flush_qd1", |b| {
            b.iter(|| {
                qp.flush(1, 0).expect("submit");
                reap(&mut qp, 1);
            })
        });
        g.throughput(Throughput::Elements(32));
        g.bench_function("read4k_qd32_batch", |b| {
            b.iter(|| {
                for (i, buf) in bufs.iter().enumerate() {
                    qp.read(1, i as u64, buf, i as u64).expect("submit");
                }
                reap(&mut qp, bufs.len());
            })
        });
        g.bench_function("cq_poll_empty", |b| {
            b.iter(|| {
                qp.poll(usize::MAX, |c| {
                    black_box(c);
                })
            })
        });
        g.throughput(Throughput::Elements(32));
        g.bench_function("cq_poll_ready32", |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let before = sim.commands_processed();
                    for (i, buf) in bufs.iter().enumerate() {
                        qp.read(1, i as u64, buf, i as u64).expect("submit");
                    }
                    while sim.commands_processed() < before + bufs.len() as u64 {
                        std::thread::yield_now();
                    }
                    let t0 = Instant::now();
                    let mut done = 0;
                    while done < bufs.len() {
                        done += qp.poll(usize::MAX, |c| {
                            black_box(c);
                        });
                    }
                    timed += t0.elapsed();
                }
                timed
            })
        });
        g.finish();
        drop(qp);
        drop(ctrl);
        drop(sim);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
