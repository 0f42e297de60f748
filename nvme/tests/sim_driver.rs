//! Driver tests against the simulated controller (no VFIO, no root).

use std::time::{Duration, Instant};

use nvme::sim::{SimConfig, Simulator};
use nvme::spec::{self, Sqe, Status, StatusCode};
use nvme::{
    Completion, Controller, ControllerOptions, DmaBuffer, Error, IoQueuePair, QueueOptions,
    Recovery,
};

const T: Duration = Duration::from_secs(5);

fn setup(cfg: SimConfig, opts: ControllerOptions) -> (Simulator, Controller) {
    let sim = Simulator::start(cfg).expect("simulator");
    let ctrl = Controller::new(sim.platform(), opts).expect("controller init");
    (sim, ctrl)
}

fn default() -> (Simulator, Controller) {
    setup(SimConfig::default(), ControllerOptions::default())
}

fn pattern(buf: &DmaBuffer, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<u8> = (0..buf.len())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    buf.write(0, &v).unwrap();
    v
}

fn contents(buf: &DmaBuffer) -> Vec<u8> {
    let mut v = vec![0u8; buf.len()];
    buf.read(0, &mut v).unwrap();
    v
}

/// Wait until `cid` completes; return its completion.
fn wait(qp: &mut IoQueuePair, cid: u16) -> Completion {
    let start = Instant::now();
    loop {
        let mut got = None;
        qp.poll(usize::MAX, |c| {
            if c.cid == cid {
                got = Some(c)
            }
        });
        if let Some(c) = got {
            return c;
        }
        assert!(start.elapsed() < T, "cid {cid} did not complete");
        std::thread::yield_now();
    }
}

fn write_sync(qp: &mut IoQueuePair, slba: u64, buf: &DmaBuffer) -> Completion {
    let cid = qp.write(1, slba, buf, 0).unwrap();
    wait(qp, cid)
}

fn read_sync(qp: &mut IoQueuePair, slba: u64, buf: &DmaBuffer) -> Completion {
    let cid = qp.read(1, slba, buf, 0).unwrap();
    wait(qp, cid)
}

#[test]
fn init_reports_identify_and_features() {
    let (_sim, ctrl) = default();
    let info = ctrl.info();
    assert_eq!(info.model, "nvmf-p2p simulated controller");
    assert_eq!(info.serial, "SIM0001");
    assert_eq!(info.version, "1.4.0");
    assert_eq!(info.mdts_bytes, Some(128 * 1024));
    assert_eq!(info.max_transfer, 128 * 1024);
    assert_eq!(info.io_queues_granted, 8);
    assert_eq!(info.max_queue_entries, 1024);
    assert!(info.shadow_doorbells_supported && info.shadow_doorbells_in_use);
    assert_eq!(info.namespaces.len(), 1);
    let ns = &info.namespaces[0];
    assert_eq!(
        (ns.nsid, ns.blocks, ns.block_size, ns.lba_formats.len()),
        (1, 4096, 4096, 2)
    );
    let cmb = info.cmb.as_ref().expect("cmb");
    assert_eq!(cmb.size, 1 << 20);
    assert!(cmb.sqs && cmb.rds && cmb.wds && !cmb.cqs);
    let id = ctrl.identify_controller().unwrap();
    assert_eq!(id.subsystem_nqn(), "nqn.2026-11.io.nvmf-p2p:sim");
    let smart = ctrl.smart_log().unwrap();
    assert_eq!(smart.avail_spare, 97);
    assert_eq!(smart.temperature.get(), nvme::sim::SIM_TEMPERATURE_KELVIN);
    let errors = ctrl
        .get_log_page(nvme::spec::log::ERROR, u32::MAX, 128)
        .unwrap();
    assert_eq!(errors[0], nvme::sim::SIM_ERROR_COUNT as u8, "one entry");
    assert!(errors[64..].iter().all(|&b| b == 0));
    // Unknown log page is a typed command-specific error.
    let e = ctrl.get_log_page(0x42, 0, 512).unwrap_err();
    assert!(e.is_status(Status::INVALID_LOG_PAGE), "{e}");
}

#[test]
fn write_read_roundtrip_and_prp_boundaries() {
    // 512-byte blocks so buffers can start at odd page offsets.
    let cfg = SimConfig {
        block_size: 512,
        blocks: 8192,
        ..SimConfig::default()
    };
    let (_sim, ctrl) = setup(cfg, ControllerOptions::default());
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 32,
            sq_in_cmb: false,
        })
        .unwrap();
    let max = qp.max_transfer();
    assert_eq!(max, 128 * 1024);
    let big = ctrl.alloc_dma(max + 2 * 4096).unwrap();
    // (page offset, length): single page, crossing one boundary (PRP2 = page), needing a
    // PRP list, exact MDTS aligned and exact MDTS at an offset (list of 32 entries).
    let cases = [
        (0, 512),
        (0, 4096),
        (3584, 1024),
        (512, 8192),
        (512, 12288),
        (0, 65536),
        (0, max),
        (1024, max),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let w = big.slice(off, len).unwrap();
        let data = pattern(&w, i as u64 + 1);
        let slba = (i as u64) * 300;
        assert!(write_sync(&mut qp, slba, &w).is_ok(), "write case {i}");
        let r = big.slice(off, len).unwrap();
        r.fill(0, len, 0).unwrap();
        assert!(read_sync(&mut qp, slba, &r).is_ok(), "read case {i}");
        assert_eq!(contents(&r), data, "case {i} (off {off}, len {len})");
    }
    // MDTS + 1 block is rejected before it reaches the controller.
    let too = big.slice(0, max + 512).unwrap();
    match qp.write(1, 0, &too, 0) {
        Err(Error::TooLarge { len, max: m }) => assert_eq!((len, m), (max + 512, max)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn queue_wraps_around_many_times() {
    let (sim, ctrl) = default();
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 4,
            sq_in_cmb: false,
        })
        .unwrap();
    assert_eq!(qp.depth(), 4);
    let buf = ctrl.alloc_dma(4096).unwrap();
    for i in 0..50u64 {
        let d = pattern(&buf, i);
        assert!(write_sync(&mut qp, i, &buf).is_ok());
        assert_eq!(sim.namespace_bytes(i as usize * 4096, 4096), d);
    }
    for i in 0..50u64 {
        assert!(read_sync(&mut qp, i, &buf).is_ok());
        assert_eq!(
            contents(&buf)[..8],
            sim.namespace_bytes(i as usize * 4096, 8)[..]
        );
    }
}

#[test]
fn full_queue_backpressure() {
    let (_sim, ctrl) = default();
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 8,
            sq_in_cmb: false,
        })
        .unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    for i in 0..7 {
        qp.read(1, i, &buf, i).unwrap();
    }
    assert!(matches!(
        qp.read(1, 0, &buf, 0),
        Err(Error::QueueFull { depth: 8, .. })
    ));
    let mut done = 0;
    let start = Instant::now();
    while done < 7 {
        done += qp.poll(usize::MAX, |c| assert!(c.is_ok()));
        assert!(start.elapsed() < T);
    }
    assert_eq!(qp.in_flight(), 0);
    qp.read(1, 0, &buf, 0).unwrap();
}

#[test]
fn error_statuses_are_typed() {
    let (sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    let c = read_sync(&mut qp, 4096, &buf);
    assert_eq!(c.status.code(), StatusCode::LbaOutOfRange);
    sim.faults().fail_next_io(1, Status::UNRECOVERED_READ_ERROR);
    let c = read_sync(&mut qp, 0, &buf);
    assert_eq!(c.status.code(), StatusCode::UnrecoveredReadError);
    assert_eq!(c.status.code().name(), "Unrecovered Read Error");
    let e = qp
        .execute(Sqe::read(7, 0, 0, buf.iova(), 0), None, T)
        .unwrap_err();
    assert!(e.is_status(Status::INVALID_NAMESPACE), "{e}");
    assert!(e.to_string().contains("Invalid Namespace or Format"), "{e}");
    let mut bad = Sqe::new(0x7e);
    bad.nsid = 1.into();
    let e = qp.execute(bad, None, T).unwrap_err();
    assert!(
        matches!(e, Error::Command { status, .. } if status.code() == StatusCode::InvalidOpcode)
    );
    // Creating a queue with an invalid id is rejected by the controller.
    let e = ctrl
        .admin_command(Sqe::create_io_sq(200, 15, 1, buf.iova()), None)
        .unwrap_err();
    assert!(e.is_status(Status::INVALID_QUEUE_ID), "{e}");
}

#[test]
fn flush_write_zeroes_and_deallocate() {
    let (sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(4 * 4096).unwrap();
    pattern(&buf, 9);
    assert!(write_sync(&mut qp, 10, &buf).is_ok());
    let cid = qp.write_zeroes(1, 11, 1, 0).unwrap();
    assert!(wait(&mut qp, cid).is_ok());
    assert!(sim.namespace_bytes(11 * 4096, 4096).iter().all(|&b| b == 0));
    assert!(sim.namespace_bytes(12 * 4096, 4096).iter().any(|&b| b != 0));
    let ranges = ctrl.alloc_dma(4096).unwrap();
    ranges
        .write(
            0,
            zerocopy::IntoBytes::as_bytes(&spec::DsmRange::new(12, 2)),
        )
        .unwrap();
    let cid = qp
        .dataset_management(1, &ranges, 1, spec::dsm::DEALLOCATE, 0)
        .unwrap();
    assert!(wait(&mut qp, cid).is_ok());
    assert!(sim.namespace_bytes(12 * 4096, 8192).iter().all(|&b| b == 0));
    assert!(sim.namespace_bytes(10 * 4096, 4096).iter().any(|&b| b != 0));
    let cid = qp.flush(1, 0).unwrap();
    assert!(wait(&mut qp, cid).is_ok());
}

fn wait_timeout(qp: &mut IoQueuePair, timeout: Duration) -> u16 {
    let start = Instant::now();
    loop {
        qp.poll(usize::MAX, |c| panic!("unexpected completion {c:?}"));
        if let Some(cid) = qp.check_timeouts(timeout) {
            assert!(
                start.elapsed() >= timeout,
                "reported after {:?}",
                start.elapsed()
            );
            return cid;
        }
        assert!(start.elapsed() < T);
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn timeout_then_abort_recovers_the_command() {
    let (sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    sim.faults().stall_next_io(1);
    let cid = qp.read(1, 0, &buf, 77).unwrap();
    let timed_out = wait_timeout(&mut qp, Duration::from_millis(40));
    assert_eq!(timed_out, cid);
    let mut seen = Vec::new();
    let how = ctrl.recover(&mut qp, cid, |c| seen.push(c)).unwrap();
    assert_eq!(how, Recovery::Aborted);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].cid, seen[0].tag), (cid, 77));
    assert_eq!(seen[0].status.code(), StatusCode::AbortRequested);
    assert_eq!(ctrl.generation(), 0, "no reset needed");
    assert!(read_sync(&mut qp, 0, &buf).is_ok());
}

#[test]
fn timeout_with_ignored_abort_resets_the_controller() {
    let (sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    let d = pattern(&buf, 5);
    assert!(write_sync(&mut qp, 3, &buf).is_ok());
    sim.faults().stall_next_io(1);
    sim.faults().ignore_aborts(true);
    let cid = qp.read(1, 3, &buf, 1).unwrap();
    let timed_out = wait_timeout(&mut qp, Duration::from_millis(40));
    let mut seen = Vec::new();
    let how = ctrl.recover(&mut qp, timed_out, |c| seen.push(c)).unwrap();
    assert_eq!(how, Recovery::Reset);
    assert_eq!(ctrl.generation(), 1);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].cid, cid);
    assert_eq!(seen[0].status, Status::ABORTED_SQ_DELETED);
    // The queue pair was recreated: I/O works and the acknowledged write is still there.
    sim.faults().ignore_aborts(false);
    buf.fill(0, 4096, 0).unwrap();
    assert!(read_sync(&mut qp, 3, &buf).is_ok());
    assert_eq!(contents(&buf), d);
}

#[test]
fn fatal_status_is_reported_and_reset_clears_it() {
    let (sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    assert!(ctrl.check_health().is_ok());
    sim.faults().set_fatal();
    let start = Instant::now();
    while ctrl.check_health().is_ok() {
        assert!(start.elapsed() < T);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(
        ctrl.check_health(),
        Err(Error::ControllerFatal { .. })
    ));
    // Admin commands fail fast with the same error instead of timing out.
    assert!(matches!(
        ctrl.identify_controller(),
        Err(Error::ControllerFatal { .. })
    ));
    ctrl.reset().unwrap();
    assert!(ctrl.check_health().is_ok());
    assert!(read_sync(&mut qp, 0, &buf).is_ok());
}

#[test]
fn controller_that_never_gets_ready_fails_cleanly() {
    let cfg = SimConfig {
        timeout_units: 1,
        ..SimConfig::default()
    };
    let sim = Simulator::start(cfg).unwrap();
    sim.faults().never_ready(true);
    let start = Instant::now();
    let e = Controller::new(sim.platform(), ControllerOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(e, Error::NotReady { .. }), "{e}");
    assert!(e.to_string().contains("did not become ready"), "{e}");
    assert!(
        start.elapsed() >= Duration::from_millis(500) && start.elapsed() < Duration::from_secs(3)
    );
}

#[test]
fn reset_mid_io_keeps_every_acknowledged_write() {
    let (sim, ctrl) = default();
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 64,
            sq_in_cmb: false,
        })
        .unwrap();
    let pool = ctrl.alloc_dma(48 * 4096).unwrap();
    let bufs = pool.chunks(4096);
    let mut expect: Vec<Option<Vec<u8>>> = vec![None; 48];
    let datas: Vec<Vec<u8>> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| pattern(b, 100 + i as u64))
        .collect();
    for (i, b) in bufs.iter().enumerate() {
        qp.write(1, i as u64, b, i as u64).unwrap();
    }
    // Reap some, then reset with the rest in flight.
    let mut acked = 0;
    qp.poll(10, |c| {
        if c.is_ok() {
            expect[c.tag as usize] = Some(datas[c.tag as usize].clone());
            acked += 1;
        }
    });
    ctrl.reset().unwrap();
    let mut lost = 0;
    let start = Instant::now();
    while qp.in_flight() > 0 {
        qp.poll(usize::MAX, |c| {
            if c.is_ok() {
                expect[c.tag as usize] = Some(datas[c.tag as usize].clone());
            } else {
                assert_eq!(c.status, Status::ABORTED_SQ_DELETED);
                lost += 1;
            }
        });
        assert!(start.elapsed() < T);
    }
    assert!(
        lost > 0,
        "the reset should have caught some writes in flight"
    );
    // Every acknowledged write reads back.
    let r = ctrl.alloc_dma(4096).unwrap();
    for (i, e) in expect.iter().enumerate() {
        if let Some(d) = e {
            assert!(read_sync(&mut qp, i as u64, &r).is_ok());
            assert_eq!(&contents(&r), d, "block {i}");
        }
    }
    drop(sim);
}

#[test]
fn device_reset_recreates_queues() {
    let (_sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(8192).unwrap();
    let d = pattern(&buf, 3);
    assert!(write_sync(&mut qp, 20, &buf).is_ok());
    ctrl.reset_device().unwrap();
    buf.fill(0, 8192, 0).unwrap();
    assert!(read_sync(&mut qp, 20, &buf).is_ok());
    assert_eq!(contents(&buf), d);
    assert!(ctrl.info().shadow_doorbells_in_use);
    assert!(qp.shadow_doorbells());
}

#[test]
fn sq_in_cmb_and_cmb_data_buffers() {
    let (_sim, ctrl) = default();
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 16,
            sq_in_cmb: true,
        })
        .unwrap();
    assert!(qp.sq_in_cmb());
    let cmb = ctrl.cmb().expect("cmb");
    let buf = ctrl.alloc_cmb(8192).unwrap();
    assert!(buf.iova() >= cmb.iova() && buf.iova() + 8192 <= cmb.iova() + cmb.len() as u64);
    let d = pattern(&buf, 11);
    for i in 0..40 {
        assert!(write_sync(&mut qp, i, &buf).is_ok());
    }
    let r = ctrl.alloc_cmb(8192).unwrap();
    assert!(read_sync(&mut qp, 39, &r).is_ok());
    assert_eq!(contents(&r), d);
    drop((buf, r));
    // The CMB allocator gives the space back.
    let all = ctrl.alloc_cmb(cmb.len() - 4096).unwrap(); // all but the SQ's page
    assert!(ctrl.alloc_cmb(4096).is_err());
    drop(all);
}

#[test]
fn shadow_doorbells_on_and_off() {
    for shadow in [true, false] {
        let opts = ControllerOptions {
            shadow_doorbells: shadow,
            ..ControllerOptions::default()
        };
        let (_sim, ctrl) = setup(SimConfig::default(), opts);
        assert_eq!(ctrl.info().shadow_doorbells_in_use, shadow);
        let mut qp = ctrl
            .create_io_queue_pair(QueueOptions {
                depth: 64,
                sq_in_cmb: false,
            })
            .unwrap();
        assert_eq!(qp.shadow_doorbells(), shadow);
        let pool = ctrl.alloc_dma(32 * 4096).unwrap();
        let bufs = pool.chunks(4096);
        for round in 0..20u64 {
            for (i, b) in bufs.iter().enumerate() {
                qp.write(1, i as u64, b, round).unwrap();
            }
            let mut n = 0;
            let start = Instant::now();
            while n < bufs.len() {
                n += qp.poll(usize::MAX, |c| assert!(c.is_ok()));
                assert!(start.elapsed() < T);
            }
        }
        let s = qp.stats();
        assert_eq!((s.submitted, s.completed), (640, 640));
        if shadow {
            assert!(s.mmio_doorbell_writes < s.submitted + s.completed, "{s:?}");
        } else {
            assert!(s.mmio_doorbell_writes >= s.submitted, "{s:?}");
        }
    }
    // A controller without Doorbell Buffer Config gets MMIO doorbells.
    let cfg = SimConfig {
        shadow_doorbells: false,
        ..SimConfig::default()
    };
    let (_sim, ctrl) = setup(cfg, ControllerOptions::default());
    assert!(!ctrl.info().shadow_doorbells_supported && !ctrl.info().shadow_doorbells_in_use);
}

#[test]
fn queue_pairs_on_threads_and_qid_reuse() {
    let (sim, ctrl) = default();
    let baseline = sim.dma_mappings();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let ctrl = &ctrl;
            s.spawn(move || {
                let mut qp = ctrl
                    .create_io_queue_pair(QueueOptions {
                        depth: 32,
                        sq_in_cmb: false,
                    })
                    .unwrap();
                let buf = ctrl.alloc_dma(4096).unwrap();
                for i in 0..100u64 {
                    let lba = t * 1000 + i;
                    let d = pattern(&buf, lba);
                    assert!(write_sync(&mut qp, lba, &buf).is_ok());
                    buf.fill(0, 4096, 0).unwrap();
                    assert!(read_sync(&mut qp, lba, &buf).is_ok());
                    assert_eq!(contents(&buf), d);
                }
            });
        }
    });
    // All queue memory was unmapped and the qids are free again.
    assert_eq!(sim.dma_mappings(), baseline);
    let qps: Vec<_> = (0..8)
        .map(|_| ctrl.create_io_queue_pair(QueueOptions::default()).unwrap())
        .collect();
    let mut ids: Vec<u16> = qps.iter().map(|q| q.qid()).collect();
    ids.sort();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    assert!(matches!(
        ctrl.create_io_queue_pair(QueueOptions::default()),
        Err(Error::NoQueuesLeft { granted: 8 })
    ));
}

/// I/O and raw queue pairs come from one creation path: one qid space, and a Create I/O
/// SQ the controller refuses leaves nothing behind (its CQ is deleted again, the qid is
/// free, the queue is not re-created by a reset).
#[test]
fn queue_creation_is_one_path_and_rolls_back() {
    let (sim, ctrl) = default();
    let ring = |n: usize| ctrl.alloc_dma(n).unwrap();
    for raw in [false, true] {
        sim.faults()
            .fail_next_admin(spec::admin_opc::CREATE_IO_SQ, Status::INVALID_QUEUE_SIZE);
        let e = if raw {
            ctrl.create_raw_queue_pair(ring(16 * 64), ring(4096), 16)
                .err()
                .unwrap()
        } else {
            ctrl.create_io_queue_pair(QueueOptions::default())
                .err()
                .unwrap()
        };
        assert!(e.is_status(Status::INVALID_QUEUE_SIZE), "{e}");
    }
    // A CQ left behind would make Create I/O CQ for qid 1 fail (Invalid Queue Identifier).
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    assert_eq!(qp.qid(), 1);
    ctrl.reset().unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    let d = pattern(&buf, 5);
    assert!(write_sync(&mut qp, 7, &buf).is_ok());
    buf.fill(0, 4096, 0).unwrap();
    assert!(read_sync(&mut qp, 7, &buf).is_ok());
    assert_eq!(contents(&buf), d);
    // Raw and I/O queue pairs share the granted qids.
    let raws: Vec<_> = (0..3)
        .map(|_| {
            ctrl.create_raw_queue_pair(ring(16 * 64), ring(4096), 16)
                .unwrap()
        })
        .collect();
    let ios: Vec<_> = (0..4)
        .map(|_| ctrl.create_io_queue_pair(QueueOptions::default()).unwrap())
        .collect();
    let mut ids: Vec<u16> = raws.iter().map(|r| r.qid()).collect();
    ids.extend(ios.iter().map(|q| q.qid()));
    ids.push(qp.qid());
    ids.sort_unstable();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    assert!(matches!(
        ctrl.create_raw_queue_pair(ring(16 * 64), ring(4096), 16),
        Err(Error::NoQueuesLeft { granted: 8 })
    ));
    // The lowest free qid is taken: the raw pairs got 2..=4, and 2 again once they are gone.
    assert_eq!(raws.iter().map(|r| r.qid()).collect::<Vec<_>>(), [2, 3, 4]);
    drop(raws);
    let again = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    assert_eq!(again.qid(), 2);
}

#[test]
fn buffer_dropped_early_gives_transfer_error_not_memory_corruption() {
    let (_sim, ctrl) = default();
    let mut qp = ctrl.create_io_queue_pair(QueueOptions::default()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    let fake = buf.clone();
    drop(buf);
    // `fake` still holds the mapping, so this works; the IOMMU-like check is exercised by
    // pointing a raw command at an address the simulator never mapped.
    assert!(read_sync(&mut qp, 0, &fake).is_ok());
    let e = qp
        .execute(Sqe::read(1, 0, 0, 0x1000, 0), None, T)
        .unwrap_err();
    assert!(e.is_status(Status::DATA_TRANSFER_ERROR), "{e}");
}

mod prp_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
        #[test]
        fn any_aligned_transfer_roundtrips(off_blocks in 0usize..16, nblocks in 1usize..=256, slba in 0u64..4000) {
            let cfg = SimConfig { block_size: 512, blocks: 8192, ..SimConfig::default() };
            let (_sim, ctrl) = setup(cfg, ControllerOptions { shadow_doorbells: false, use_cmb: false, ..Default::default() });
            let mut qp = ctrl.create_io_queue_pair(QueueOptions { depth: 4, sq_in_cmb: false }).unwrap();
            let pool = ctrl.alloc_dma(256 * 512 + 16 * 512).unwrap();
            let w = pool.slice(off_blocks * 512, nblocks * 512).unwrap();
            let d = pattern(&w, slba);
            prop_assert!(write_sync(&mut qp, slba, &w).is_ok());
            w.fill(0, w.len(), 0).unwrap();
            prop_assert!(read_sync(&mut qp, slba, &w).is_ok());
            prop_assert_eq!(contents(&w), d);
        }
    }
}

#[test]
fn raw_queue_pair_driven_by_hand() {
    let (sim, ctrl) = default();
    let depth = 8u16;
    let sq = ctrl.alloc_dma(depth as usize * 64).unwrap();
    let cq = ctrl.alloc_dma(4096).unwrap();
    let raw = ctrl
        .create_raw_queue_pair(sq.clone(), cq.clone(), depth)
        .unwrap();
    let (sdb, cdb) = ctrl.doorbell_offsets(raw.qid());
    assert_eq!(
        (sdb, cdb),
        (
            0x1000 + 8 * raw.qid() as u64,
            0x1000 + 8 * raw.qid() as u64 + 4
        )
    );
    let data = ctrl.alloc_dma(4096).unwrap();
    let d = pattern(&data, 8);
    // Write one SQE by hand (as a remote host would), ring, poll the CQ by hand.
    let mut sqe = Sqe::write(1, 42, 0, data.iova(), 0);
    sqe.set_cid(5);
    sq.write(0, zerocopy::IntoBytes::as_bytes(&sqe)).unwrap();
    raw.ring_sq(1);
    let start = Instant::now();
    let cqe = loop {
        let mut b = [0u8; 16];
        cq.read(0, &mut b).unwrap();
        let c = <spec::Cqe as zerocopy::FromBytes>::read_from_bytes(&b).unwrap();
        if c.phase() {
            break c;
        }
        assert!(start.elapsed() < T);
        std::thread::yield_now();
    };
    assert_eq!(cqe.cid.get(), 5);
    assert!(cqe.status().is_success());
    raw.ring_cq(1);
    assert_eq!(sim.namespace_bytes(42 * 4096, 4096), d);
    // After a reset the raw queue exists again (generation tells the owner).
    let g = raw.generation();
    ctrl.reset().unwrap();
    assert_eq!(raw.generation(), g + 1);
    let mut cq0 = [0u8; 16];
    cq.read(0, &mut cq0).unwrap();
    assert_eq!(cq0, [0u8; 16], "CQ zeroed for the recreated queue");
    let mut sqe = Sqe::read(1, 42, 0, data.iova(), 0);
    sqe.set_cid(6);
    data.fill(0, 4096, 0).unwrap();
    sq.write(0, zerocopy::IntoBytes::as_bytes(&sqe)).unwrap();
    raw.ring_sq(1);
    let start = Instant::now();
    loop {
        let mut b = [0u8; 16];
        cq.read(0, &mut b).unwrap();
        if b[14] & 1 == 1 {
            break;
        }
        assert!(start.elapsed() < T);
        std::thread::yield_now();
    }
    assert_eq!(contents(&data), d);
}

/// A raw queue pair rings through the same doorbell writer as an IoQueuePair: with
/// shadow doorbells the first tail always reaches MMIO (EventIdx starts at 0) and later
/// ones only when EventIdx asks; without them every ring is an MMIO write. Either way the
/// controller runs every command rung.
#[test]
fn raw_queue_pair_doorbells_with_and_without_shadow() {
    for shadow in [true, false] {
        let opts = ControllerOptions {
            shadow_doorbells: shadow,
            ..ControllerOptions::default()
        };
        let (sim, ctrl) = setup(SimConfig::default(), opts);
        let depth = 16u16;
        let sq = ctrl.alloc_dma(depth as usize * 64).unwrap();
        let cq = ctrl.alloc_dma(4096).unwrap();
        let raw = ctrl
            .create_raw_queue_pair(sq.clone(), cq.clone(), depth)
            .unwrap();
        assert_eq!(raw.shadow_doorbells(), shadow);
        let data = ctrl.alloc_dma(4096).unwrap();
        let d = pattern(&data, 21);
        let mut mmio = 0;
        // 40 commands: the ring wraps twice, the CQ phase flips.
        let mut head = 0u16;
        let mut phase = true;
        for i in 0..40u16 {
            let slot = i % depth;
            let mut sqe = Sqe::write(1, 100 + u64::from(i), 0, data.iova(), 0);
            sqe.set_cid(i);
            sq.write(slot as usize * 64, zerocopy::IntoBytes::as_bytes(&sqe))
                .unwrap();
            let rang = raw.ring_sq((slot + 1) % depth);
            if i == 0 || !shadow {
                assert!(rang, "command {i}: MMIO doorbell expected");
            }
            mmio += usize::from(rang);
            let start = Instant::now();
            let cqe = loop {
                let mut b = [0u8; 16];
                cq.read(head as usize * 16, &mut b).unwrap();
                let c = <spec::Cqe as zerocopy::FromBytes>::read_from_bytes(&b).unwrap();
                if c.phase() == phase {
                    break c;
                }
                assert!(start.elapsed() < T, "command {i} did not complete");
                std::thread::yield_now();
            };
            assert_eq!(cqe.cid.get(), i);
            assert!(cqe.status().is_success());
            head = (head + 1) % depth;
            if head == 0 {
                phase = !phase;
            }
            raw.ring_cq(head);
        }
        assert!((1..=40).contains(&mmio), "{mmio}");
        for i in 0..40usize {
            assert_eq!(sim.namespace_bytes((100 + i) * 4096, 4096), d, "block {i}");
        }
    }
}

#[test]
fn batch_rings_the_doorbell_once() {
    let opts = ControllerOptions {
        shadow_doorbells: false,
        ..ControllerOptions::default()
    };
    let (_sim, ctrl) = setup(SimConfig::default(), opts);
    let mut qp = ctrl
        .create_io_queue_pair(QueueOptions {
            depth: 64,
            sq_in_cmb: false,
        })
        .unwrap();
    let pool = ctrl.alloc_dma(16 * 4096).unwrap();
    let bufs = pool.chunks(4096);
    let before = qp.stats().mmio_doorbell_writes;
    {
        let mut b = qp.batch();
        for (i, buf) in bufs.iter().enumerate() {
            b.write(1, i as u64, buf, i as u64).unwrap();
        }
        assert_eq!(b.len(), 16);
    }
    assert_eq!(qp.stats().mmio_doorbell_writes, before + 1);
    let mut n = 0;
    let start = Instant::now();
    while n < 16 {
        n += qp.poll(usize::MAX, |c| assert!(c.is_ok()));
        assert!(start.elapsed() < T);
    }
}
