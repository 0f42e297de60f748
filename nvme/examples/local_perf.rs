//! 4 KiB random reads through the VFIO driver on one queue pair, for comparing with fio on
//! the kernel driver in the same VM boot:
//! `local_perf BDF [QD [SECONDS]]` prints IOPS and latency percentiles (JSON with --json).

use std::time::{Duration, Instant};

use nvme::vfio::NvmeDevice;
use nvme::{ControllerOptions, QueueOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(bdf) = pos.first() else {
        eprintln!("usage: local_perf BDF [QD [SECONDS]] [--json]");
        std::process::exit(2);
    };
    let qd: usize = pos
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(32)
        .clamp(1, 1023);
    let secs: u64 = pos.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let dev = match NvmeDevice::open(bdf, ControllerOptions::default()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("local_perf: {e}");
            std::process::exit(1);
        }
    };
    let ctrl = dev.controller();
    let ns = ctrl.info().namespaces[0].clone();
    let per = (4096 / ns.block_size as u64).max(1);
    let slots = ns.blocks / per;
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: (qd + 1) as u16,
            sq_in_cmb: false,
        })
        .expect("queue pair");
    let pool = ctrl.alloc_dma(qd * 4096).expect("dma");
    let bufs = pool.chunks(4096);
    let mut started = vec![Instant::now(); qd];
    let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let end = Instant::now() + Duration::from_secs(secs);
    for (i, b) in bufs.iter().enumerate() {
        started[i] = Instant::now();
        qp.read(ns.nsid, next(slots) * per, b, i as u64)
            .expect("submit");
    }
    let mut done = 0u64;
    let t0 = Instant::now();
    let mut free = Vec::with_capacity(qd);
    let mut idle = 0u64;
    loop {
        qp.poll(usize::MAX, |c| {
            assert!(c.is_ok(), "read failed: {}", c.status);
            let i = c.tag as usize;
            lat_us.push(started[i].elapsed().as_micros() as u32);
            free.push(i);
            done += 1;
        });
        if free.is_empty() {
            // Read the clock only now and then while nothing completes (it may be a
            // syscall in a TCG guest).
            idle += 1;
            if idle.is_multiple_of(1024) && Instant::now() >= end {
                break;
            }
            continue;
        }
        idle = 0;
        let now = Instant::now();
        if now >= end {
            break;
        }
        let mut batch = qp.batch();
        for i in free.drain(..) {
            started[i] = now;
            batch
                .read(ns.nsid, next(slots) * per, &bufs[i], i as u64)
                .expect("submit");
        }
        drop(batch); // one doorbell write for the whole refill
    }
    let elapsed = t0.elapsed().as_secs_f64();
    while qp.in_flight() > 0 {
        qp.poll(usize::MAX, |_| {});
    }
    lat_us.sort_unstable();
    let pct = |p: f64| {
        lat_us
            .get(((lat_us.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let iops = done as f64 / elapsed;
    if json {
        println!(
            "{{\"qd\":{qd},\"seconds\":{elapsed:.2},\"ios\":{done},\"iops\":{iops:.0},\"p50_us\":{},\"p99_us\":{}}}",
            pct(0.5),
            pct(0.99)
        );
    } else {
        println!(
            "vfio driver 4K randread QD{qd}: {iops:.0} IOPS over {elapsed:.1} s (p50 {} us, p99 {} us)",
            pct(0.5),
            pct(0.99)
        );
    }
}
