//! The target over asynchronous backends: the fake one (out-of-order completions,
//! backpressure, held completions at disconnect, device errors) and the real NVMe backend
//! on the `nvme` crate's simulated controller — pool buffers handed to the device as is.

mod common;
#[path = "async_common/fake.rs"]
mod fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fake::{FakeBackend, FakeDev};
use nvme::sim::{SimConfig, Simulator};
use nvme::spec::{DsmRange, Status};
use nvme::{Controller, ControllerOptions};
use transport::backend::{Backend, Fault};
use transport::fabrics::SglDescriptor;
use transport::initiator::cmd;
use transport::nvme_backend::NvmeBackend;
use transport::nvmf_target::Target;
use zerocopy::IntoBytes;

fn fake_rig(depth: usize) -> (Rig, Arc<FakeDev>) {
    let b = FakeBackend::new(4 << 20, depth);
    let dev = b.dev.clone();
    let rig = Rig::with_backend(&config(""), Arc::new(b));
    assert!(
        rig.group.dma_pool(),
        "pool carved from the backend's DMA memory"
    );
    assert_eq!(rig.group.channel_count(), 1);
    (rig, dev)
}

#[test]
fn fake_async_io_out_of_order_zero_copy() {
    let (mut rig, dev) = fake_rig(64);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let region = io.wire().register(16 * 4096);
    for i in 0..16u64 {
        io.wire()
            .write_region(region, i as usize * 4096, &pattern(4096, i as u8));
    }
    for i in 0..16u64 {
        let d = SglDescriptor::keyed(region.addr + i * 4096, 4096, region.key, false);
        io.submit(cmd::write(1, i * 8, 8, d), &[], i).unwrap();
    }
    // One in-capsule write (copied once into a pool buffer, then asynchronous).
    let icd = pattern(4096, 99);
    io.submit(
        cmd::write(1, 200, 8, SglDescriptor::in_capsule(0, 4096)),
        &icd,
        0,
    )
    .unwrap();
    let cs = rig.collect(&mut io, 17);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    for i in 0..16u64 {
        assert_eq!(dev.bytes(i as usize * 4096, 4096), pattern(4096, i as u8));
    }
    assert_eq!(dev.bytes(200 * 512, 4096), icd);

    let back = io.wire().register(16 * 4096);
    for i in 0..16u64 {
        let d = SglDescriptor::keyed(back.addr + (15 - i) * 4096, 4096, back.key, false);
        io.submit(cmd::read(1, i * 8, 8, d), &[], 0).unwrap();
    }
    let cs = rig.collect(&mut io, 16);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    let got = io.wire().read_region(back);
    for i in 0..16usize {
        assert_eq!(
            &got[(15 - i) * 4096..(16 - i) * 4096],
            &pattern(4096, i as u8)[..]
        );
    }
    // Flush and Write Zeroes go through the channel too; nothing took the sync path.
    io.submit(cmd::flush(1), &[], 0).unwrap();
    io.submit(cmd::write_zeroes(1, 0, 8), &[], 0).unwrap();
    let cs = rig.collect(&mut io, 2);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    assert!(dev.bytes(0, 4096).iter().all(|&b| b == 0));
    let ctl = dev.ctl();
    assert_eq!(ctl.submitted, 16 + 1 + 16 + 2);
    assert_eq!(ctl.sync_calls, 0);
    drop(ctl);
    let s = rig.group.queue_stats();
    assert_eq!(s.iter().map(|q| q.backend_commands).sum::<u64>(), 35);
    assert_eq!(rig.group.free_buffers(), 16);
    // The controller's counters see the asynchronous commands.
    let c = &rig.target.controller_stats()[0];
    assert_eq!((c.read_commands, c.write_commands), (16, 17));
    assert_eq!(c.bytes_read, 16 * 4096);
}

#[test]
fn fake_async_busy_backpressure_never_drops() {
    let (mut rig, dev) = fake_rig(2);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let region = io.wire().register(24 * 4096);
    for i in 0..24u64 {
        io.wire()
            .write_region(region, i as usize * 4096, &pattern(4096, 7 + i as u8));
        let d = SglDescriptor::keyed(region.addr + i * 4096, 4096, region.key, false);
        io.submit(cmd::write(1, i * 8, 8, d), &[], 0).unwrap();
    }
    let cs = rig.collect(&mut io, 24);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    for i in 0..24usize {
        assert_eq!(dev.bytes(i * 4096, 4096), pattern(4096, 7 + i as u8));
    }
    assert!(dev.ctl().busy > 0, "the channel pushed back");
    let s = rig.group.queue_stats();
    assert!(s.iter().map(|q| q.backend_busy).sum::<u64>() > 0);
    assert!(
        s.iter().map(|q| q.buffer_waits).sum::<u64>() > 0,
        "16 buffers, 24 writes"
    );
    assert_eq!(rig.group.free_buffers(), 16);
}

#[test]
fn fake_async_disconnect_waits_for_commands_in_backend() {
    let (mut rig, dev) = fake_rig(64);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    dev.ctl().hold = true;
    let region = io.wire().register(4 * 4096);
    for i in 0..4u64 {
        let d = SglDescriptor::keyed(region.addr + i * 4096, 4096, region.key, false);
        io.submit(cmd::read(1, i * 8, 8, d), &[], 0).unwrap();
    }
    rig.pump();
    assert_eq!(rig.group.backend_in_flight(), 4);
    assert_eq!(rig.group.free_buffers(), 12);
    io.wire().disconnect();
    for _ in 0..10 {
        rig.pump();
    }
    // The queue cannot go while the device may still write into its buffers.
    assert_eq!(rig.group.queue_count(), 2);
    assert_eq!(rig.group.free_buffers(), 12);
    dev.ctl().hold = false;
    rig.pump();
    rig.pump();
    assert_eq!(rig.group.backend_in_flight(), 0);
    assert_eq!(
        rig.group.queue_count(),
        1,
        "I/O queue closed after the backend finished"
    );
    assert_eq!(rig.group.free_buffers(), 16);
}

#[test]
fn fake_async_device_errors_reach_the_host() {
    let (mut rig, dev) = fake_rig(64);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let region = io.wire().register(4096);
    dev.ctl().fail_next = Some(Status::UNRECOVERED_READ_ERROR);
    let c = rig.exec(&mut io, cmd::read(1, 0, 8, keyed(region)), &[]);
    assert_status(&c, Status::UNRECOVERED_READ_ERROR);
    // An abort by a controller reset stays retryable (no DNR).
    dev.ctl().fail_next = Some(Status::ABORTED_SQ_DELETED);
    let c = rig.exec(&mut io, cmd::read(1, 0, 8, keyed(region)), &[]);
    assert_eq!(c.status(), Status::ABORTED_SQ_DELETED);
    // Range errors never reach the device.
    let before = dev.ctl().submitted;
    let blocks = (4 << 20) / 512;
    let c = rig.exec(&mut io, cmd::read(1, blocks - 4, 8, keyed(region)), &[]);
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    let c = rig.exec(&mut io, cmd::write_zeroes(1, blocks - 1, 2), &[]);
    assert_status(&c, Status::LBA_OUT_OF_RANGE);
    assert_eq!(dev.ctl().submitted, before);
    // Still serving.
    let c = rig.exec(&mut io, cmd::read(1, 0, 8, keyed(region)), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(rig.group.free_buffers(), 16);
}

/// The NVMe backend's failures are typed: a missing namespace names the ones there are,
/// and a driver failure carries the `nvme` crate's error as its source, with the backend
/// and the operation.
#[test]
fn nvme_backend_errors_carry_the_driver_error() {
    let sim = Simulator::start(SimConfig::default()).unwrap();
    let opts = ControllerOptions {
        io_queues: 1,
        ..ControllerOptions::default()
    };
    let ctrl = Arc::new(Controller::new(sim.platform(), opts).unwrap());
    match NvmeBackend::open(ctrl.clone(), "sim:9".into(), 9, 4096) {
        Err(transport::Error::NoSuchNamespace {
            backend,
            nsid,
            active,
        }) => assert_eq!((backend.as_str(), nsid, active), ("sim:9", 9, vec![1])),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("namespace 9 opened"),
    }
    // The one granted I/O queue is taken: opening a backend needs its own.
    let _taken = ctrl
        .create_io_queue_pair(nvme::QueueOptions::default())
        .unwrap();
    let e = match NvmeBackend::open(ctrl.clone(), "sim:1".into(), 1, 4096) {
        Err(e) => e,
        Ok(_) => panic!("opened without a free queue"),
    };
    let text = e.to_string();
    match &e {
        transport::Error::Nvme {
            backend,
            op,
            source,
        } => {
            assert_eq!((backend.as_str(), *op), ("sim:1", "create I/O queue"));
            assert!(
                matches!(**source, nvme::Error::NoQueuesLeft { granted: 1 }),
                "{source:?}"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    // The error chain goes on into the driver's error.
    let source = std::error::Error::source(&e).expect("a source");
    assert!(
        source.to_string().starts_with("no I/O queue left"),
        "{source}"
    );
    assert!(
        text.starts_with("backend sim:1: create I/O queue failed: no I/O queue left"),
        "{text}"
    );
}

#[test]
fn nvme_backend_on_simulator_zero_copy() {
    let sim = Simulator::start(SimConfig {
        blocks: 1024,
        block_size: 4096,
        ..SimConfig::default()
    })
    .unwrap();
    let ctrl = Controller::new(sim.platform(), ControllerOptions::default()).unwrap();
    let backend = NvmeBackend::open(Arc::new(ctrl), "sim:1".into(), 1, 128 * 1024).unwrap();
    assert_eq!(backend.block_count(), 1024);
    let mut rig = Rig::with_backend(&config(""), Arc::new(backend));
    assert!(rig.group.dma_pool());
    assert_eq!(rig.group.channel_count(), 1);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);

    // 16 × 4 KiB keyed writes, 2 × 64 KiB, one in-capsule 4 KiB, all in flight at once.
    let region = io.wire().register(16 * 4096 + 2 * 65536);
    let mut n = 0;
    for i in 0..16u64 {
        let p = pattern(4096, i as u8);
        io.wire().write_region(region, i as usize * 4096, &p);
        let d = SglDescriptor::keyed(region.addr + i * 4096, 4096, region.key, false);
        io.submit(cmd::write(1, i, 1, d), &[], 0).unwrap();
        n += 1;
    }
    for j in 0..2u64 {
        let off = 16 * 4096 + j * 65536;
        io.wire()
            .write_region(region, off as usize, &pattern(65536, 50 + j as u8));
        let d = SglDescriptor::keyed(region.addr + off, 65536, region.key, false);
        io.submit(cmd::write(1, 100 + 16 * j, 16, d), &[], 0)
            .unwrap();
        n += 1;
    }
    let icd = pattern(4096, 77);
    io.submit(
        cmd::write(1, 500, 1, SglDescriptor::in_capsule(0, 4096)),
        &icd,
        0,
    )
    .unwrap();
    n += 1;
    let cs = rig.collect(&mut io, n);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    for i in 0..16usize {
        assert_eq!(sim.namespace_bytes(i * 4096, 4096), pattern(4096, i as u8));
    }
    assert_eq!(sim.namespace_bytes(100 * 4096, 65536), pattern(65536, 50));
    assert_eq!(sim.namespace_bytes(116 * 4096, 65536), pattern(65536, 51));
    assert_eq!(sim.namespace_bytes(500 * 4096, 4096), icd);

    // Read everything back in one burst.
    let back = io.wire().register(16 * 4096 + 65536);
    for i in 0..16u64 {
        let d = SglDescriptor::keyed(back.addr + i * 4096, 4096, back.key, false);
        io.submit(cmd::read(1, i, 1, d), &[], 0).unwrap();
    }
    let d = SglDescriptor::keyed(back.addr + 16 * 4096, 65536, back.key, false);
    io.submit(cmd::read(1, 116, 16, d), &[], 0).unwrap();
    let cs = rig.collect(&mut io, 17);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    let got = io.wire().read_region(back);
    for i in 0..16usize {
        assert_eq!(&got[i * 4096..(i + 1) * 4096], &pattern(4096, i as u8)[..]);
    }
    assert_eq!(&got[16 * 4096..], &pattern(65536, 51)[..]);

    // Flush, Write Zeroes (asynchronous) and Dataset Management (synchronous path).
    io.submit(cmd::flush(1), &[], 0).unwrap();
    io.submit(cmd::write_zeroes(1, 0, 2), &[], 0).unwrap();
    let cs = rig.collect(&mut io, 2);
    assert!(cs.iter().all(|c| c.status() == Status::SUCCESS));
    assert!(sim.namespace_bytes(0, 8192).iter().all(|&b| b == 0));
    let range = DsmRange::new(5, 1);
    io.submit(
        cmd::deallocate(1, 1, SglDescriptor::in_capsule(0, 16)),
        range.as_bytes(),
        0,
    )
    .unwrap();
    let cs = rig.collect(&mut io, 1);
    assert_eq!(cs[0].status(), Status::SUCCESS);

    // A device error comes back as the device's status.
    sim.faults().fail_next_io(1, Status::UNRECOVERED_READ_ERROR);
    let d = SglDescriptor::keyed(back.addr, 4096, back.key, false);
    io.submit(cmd::read(1, 3, 1, d), &[], 0).unwrap();
    let cs = rig.collect(&mut io, 1);
    assert!(cs[0].status().same_code(Status::UNRECOVERED_READ_ERROR));

    let s = rig.group.queue_stats();
    assert_eq!(
        s.iter().map(|q| q.backend_commands).sum::<u64>(),
        19 + 17 + 2 + 1
    );
    assert_eq!(rig.group.free_buffers(), 16);
    assert_eq!(rig.group.backend_in_flight(), 0);
}

#[test]
fn nvme_backend_interrupts_let_a_poll_group_sleep_until_the_device_completes() {
    use transport::nvmf_target::BackendWait;
    for interrupts in [true, false] {
        let sim = Simulator::start(SimConfig {
            blocks: 1024,
            block_size: 4096,
            ..SimConfig::default()
        })
        .unwrap();
        let ctrl = Arc::new(Controller::new(sim.platform(), ControllerOptions::default()).unwrap());
        let backend = NvmeBackend::open(ctrl.clone(), "sim:1".into(), 1, 128 * 1024)
            .unwrap()
            .with_interrupts(interrupts);
        let mut rig = Rig::with_backend(&config(""), Arc::new(backend));
        let (_admin, cntlid) = rig.admin(0);
        let mut io = rig.io(1, cntlid);
        let mut fds = [-1; 4];
        assert_eq!(rig.group.arm_backends(&mut fds), BackendWait::Idle);
        assert!(!rig.group.backends_wake(), "nothing in flight");

        // One read the device holds (stalled) until it is aborted.
        sim.faults().stall_next_io(1);
        let region = io.wire().register(4096);
        let d = SglDescriptor::keyed(region.addr, 4096, region.key, false);
        io.submit(cmd::read(1, 7, 1, d), &[], 0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.group.backend_in_flight() == 0 {
            rig.group.poll();
            assert!(
                Instant::now() < deadline,
                "the read never reached the device"
            );
        }
        let n0 = sim.commands_processed();
        while sim.commands_processed() == n0 {
            rig.group.poll();
            assert!(
                Instant::now() < deadline,
                "the device never fetched the read"
            );
        }
        assert_eq!(rig.group.poll(), 0, "nothing to do but wait for the device");
        assert_eq!(rig.group.backends_wake(), interrupts);
        if !interrupts {
            assert_eq!(rig.group.arm_backends(&mut fds), BackendWait::Nap);
            assert!(ctrl.abort(2, 0).unwrap());
            let cs = rig.collect(&mut io, 1);
            assert!(cs[0].status().same_code(Status::ABORT_REQUESTED));
            continue;
        }
        assert_eq!(rig.group.arm_backends(&mut fds), BackendWait::Sleep(1));
        let fd = fds[0];
        assert!(fd >= 0);
        assert_eq!(
            nvme::irq::wait_readable(&[fd], Duration::from_millis(20)).unwrap(),
            0,
            "woke with nothing completed"
        );
        // The poll group's queue is qid 2 (the synchronous one is 1); the read is cid 0.
        assert!(ctrl.abort(2, 0).unwrap());
        assert_eq!(
            nvme::irq::wait_readable(&[fd], Duration::from_secs(5)).unwrap(),
            1,
            "the completion's interrupt did not wake the sleeper"
        );
        // Arming again clears the event but finds the CQE: poll, do not sleep.
        assert_eq!(rig.group.arm_backends(&mut fds), BackendWait::Ready);
        let cs = rig.collect(&mut io, 1);
        assert!(cs[0].status().same_code(Status::ABORT_REQUESTED));
        assert_eq!(rig.group.arm_backends(&mut fds), BackendWait::Idle);
        assert!(sim.interrupts_raised() >= 1);
    }
}

/// The NVMe backend on the simulator, with the controller kept for resets.
fn sim_rig(timeout: Option<Duration>) -> (Rig, Simulator, Arc<Controller>) {
    let sim = Simulator::start(SimConfig {
        blocks: 1024,
        block_size: 4096,
        ..SimConfig::default()
    })
    .unwrap();
    let ctrl = Arc::new(Controller::new(sim.platform(), ControllerOptions::default()).unwrap());
    let mut backend = NvmeBackend::open(ctrl.clone(), "sim:1".into(), 1, 128 * 1024).unwrap();
    if let Some(t) = timeout {
        backend = backend.with_command_timeout(t);
    }
    let rig = Rig::with_backend(&config(""), Arc::new(backend));
    assert_eq!(rig.group.channel_count(), 1);
    (rig, sim, ctrl)
}

#[test]
fn device_resets_with_io_held_lose_no_command() {
    let (mut rig, sim, ctrl) = sim_rig(None);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let region = io.wire().register(16 * 4096);
    // Another thread resets the device five times while the group keeps 16 writes in
    // flight: each reset waits for the group to hold, so no command is in the device.
    let target = rig.target.clone();
    let resets = {
        let ctrl = ctrl.clone();
        std::thread::spawn(move || {
            let mut left = 0;
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(30));
                let held = target.hold_backend_io(Duration::from_secs(5)).unwrap();
                assert_eq!(held.groups(), 1);
                left += held.left_in_device();
                ctrl.reset_device().unwrap();
            }
            left
        })
    };
    let mut rounds = 0u64;
    while !resets.is_finished() || rounds < 3 {
        for i in 0..16u64 {
            let p = pattern(4096, (rounds * 16 + i) as u8);
            io.wire().write_region(region, i as usize * 4096, &p);
            let d = SglDescriptor::keyed(region.addr + i * 4096, 4096, region.key, false);
            io.submit(cmd::write(1, i, 1, d), &[], 0).unwrap();
        }
        let cs = rig.collect(&mut io, 16);
        for c in &cs {
            assert_eq!(c.status(), Status::SUCCESS, "round {rounds}");
        }
        for i in 0..16u64 {
            let want = pattern(4096, (rounds * 16 + i) as u8);
            assert_eq!(sim.namespace_bytes(i as usize * 4096, 4096), want);
        }
        rounds += 1;
    }
    assert_eq!(resets.join().unwrap(), 0, "commands left in the device");
    assert_eq!(ctrl.generation(), 5);
    rig.group.poll(); // takes the last release message
    assert!(
        !rig.group.backend_io_held(),
        "released after the guard dropped"
    );
}

/// Sets a recovery hook that holds I/O, resets the device and reports the fault.
fn recovery(rig: &Rig, ctrl: &Arc<Controller>) -> std::sync::mpsc::Receiver<Fault> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ctrl = ctrl.clone();
    let tx = std::sync::Mutex::new(tx);
    rig.target.set_recovery(Arc::new(
        move |target: &Target, _b: &Arc<dyn Backend>, fault| {
            let held = target.hold_backend_io(Duration::from_millis(200)).unwrap();
            assert_eq!(
                held.left_in_device(),
                1,
                "the stuck command stays in the device"
            );
            ctrl.reset_device().unwrap();
            drop(held);
            tx.lock().unwrap().send(fault).unwrap();
        },
    ));
    rx
}

/// One read the device never completes by itself, then what the host gets back.
fn stuck_read(rig: &mut Rig, sim: &Simulator, io: &mut HostQ) -> transport::initiator::Completion {
    sim.faults().stall_next_io(1);
    let region = io.wire().register(4096);
    let d = SglDescriptor::keyed(region.addr, 4096, region.key, false);
    io.submit(cmd::read(1, 7, 1, d), &[], 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.group.backend_in_flight() == 0 {
        rig.group.poll();
        assert!(
            Instant::now() < deadline,
            "the read never reached the device"
        );
    }
    rig.collect(io, 1).remove(0)
}

#[test]
fn a_fatal_controller_is_reset_and_the_host_may_retry() {
    let (mut rig, sim, ctrl) = sim_rig(None);
    let faults = recovery(&rig, &ctrl);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let t0 = Instant::now();
    let sim2 = &sim;
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            sim2.faults().set_fatal();
        });
        let c = stuck_read(&mut rig, &sim, &mut io);
        assert!(
            c.status().same_code(Status::ABORTED_SQ_DELETED),
            "{}",
            c.status()
        );
        assert!(!c.status().dnr(), "an abort by a reset must stay retryable");
    });
    assert_eq!(
        faults.recv_timeout(Duration::from_secs(5)).unwrap(),
        Fault::ControllerFatal
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(ctrl.generation(), 1);
    // The device works again.
    let region = io.wire().register(4096);
    io.submit(cmd::read(1, 0, 1, keyed(region)), &[], 0)
        .unwrap();
    assert_eq!(rig.collect(&mut io, 1)[0].status(), Status::SUCCESS);
}

#[test]
fn a_command_timeout_resets_the_device() {
    let timeout = Duration::from_millis(200);
    let (mut rig, sim, ctrl) = sim_rig(Some(timeout));
    let faults = recovery(&rig, &ctrl);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let t0 = Instant::now();
    let c = stuck_read(&mut rig, &sim, &mut io);
    assert!(
        c.status().same_code(Status::ABORTED_SQ_DELETED),
        "{}",
        c.status()
    );
    assert!(t0.elapsed() >= timeout, "reset before the timeout");
    assert_eq!(
        faults.recv_timeout(Duration::from_secs(5)).unwrap(),
        Fault::Timeout { after: timeout }
    );
    assert_eq!(ctrl.generation(), 1);
    let region = io.wire().register(4096);
    io.submit(cmd::read(1, 0, 1, keyed(region)), &[], 0)
        .unwrap();
    assert_eq!(rig.collect(&mut io, 1)[0].status(), Status::SUCCESS);
}

#[test]
fn two_holds_take_turns() {
    let (mut rig, _sim, _ctrl) = sim_rig(None);
    // Each thread returns (when its hold began, when it released it).
    let spawn = |delay: u64, hold_for: u64| {
        let target = rig.target.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            let held = target.hold_backend_io(Duration::from_secs(2)).unwrap();
            let got = Instant::now();
            assert_eq!(held.groups(), 1);
            std::thread::sleep(Duration::from_millis(hold_for));
            let released = Instant::now();
            drop(held);
            (got, released)
        })
    };
    let first = spawn(0, 300);
    let second = spawn(50, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(first.is_finished() && second.is_finished()) {
        rig.group.poll();
        assert!(Instant::now() < deadline, "holds did not finish");
        std::thread::yield_now();
    }
    let (_, first_released) = first.join().unwrap();
    let (second_got, _) = second.join().unwrap();
    assert!(
        second_got >= first_released,
        "the second hold began while the first was still held"
    );
    rig.group.poll(); // takes the last release message
    assert!(!rig.group.backend_io_held());
}

#[test]
fn compare_on_a_namespace_with_an_async_channel() {
    let (mut rig, dev) = fake_rig(64);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let a = pattern(4096, 5);
    let ic = SglDescriptor::in_capsule(0, 4096);
    io.submit(cmd::write(1, 64, 8, ic), &a, 0).unwrap();
    let cs = rig.collect(&mut io, 1);
    assert_eq!(cs[0].status(), Status::SUCCESS);
    assert_eq!(dev.ctl().submitted, 1, "the write went through the channel");
    // Compare reads the device's blocks (its synchronous path) and compares.
    let compare = |s: nvme::spec::Sqe| {
        let mut s = s;
        s.cdw0 = nvme::spec::U32::new((s.cdw0.get() & !0xff) | 0x05);
        s
    };
    io.submit(compare(cmd::write(1, 64, 8, ic)), &a, 0).unwrap();
    let mut b = a.clone();
    b[0] ^= 0xff;
    io.submit(compare(cmd::write(1, 64, 8, ic)), &b, 1).unwrap();
    let r = io.wire().register(4096);
    io.wire().write_region(r, 0, &a);
    io.submit(compare(cmd::write(1, 64, 8, keyed(r))), &[], 2)
        .unwrap();
    let mut cs = rig.collect(&mut io, 3);
    cs.sort_by_key(|c| c.user);
    assert_eq!(cs[0].status(), Status::SUCCESS);
    assert_status(&cs[1], Status::COMPARE_FAILURE);
    assert_eq!(cs[2].status(), Status::SUCCESS);
    assert_eq!(rig.group.free_buffers(), 16, "every pool buffer returned");
}

/// SMART / Health and Error Information logs come from the devices behind the namespaces
/// (the simulator's 318 K, its power-on hours, its one error entry), each device counted
/// once however many namespaces it backs, combined over devices.
#[test]
fn smart_and_error_logs_pass_through_from_devices() {
    use nvme::sim::{SIM_ERROR_COUNT, SIM_TEMPERATURE_KELVIN};
    use nvme::spec::{log, ErrorLogEntry, SmartLog};
    use transport::config::{BackendSpec, TargetConfig};
    use zerocopy::FromBytes;

    let start = || {
        let sim = Simulator::start(SimConfig {
            blocks: 1024,
            block_size: 4096,
            ..SimConfig::default()
        })
        .unwrap();
        let ctrl = Arc::new(Controller::new(sim.platform(), ControllerOptions::default()).unwrap());
        (sim, ctrl)
    };
    let (_sim_a, a) = start();
    let (_sim_b, b) = start();
    // nsid 1 and 2: namespace 1 of device A (twice), nsid 3: namespace 1 of device B.
    let text = config_text("").replacen(
        "backend = \"ram:4MiB\"",
        "backend = \"ram:4MiB\"\n[[subsystem.namespace]]\nbackend = \"ram:2MiB\"\n\
         [[subsystem.namespace]]\nbackend = \"ram:3MiB\"",
        1,
    );
    let cfg = TargetConfig::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let open = |c: &Arc<Controller>, name: &str| -> Arc<dyn Backend> {
        Arc::new(NvmeBackend::open(c.clone(), name.into(), 1, 128 * 1024).unwrap())
    };
    let (na1, na2, nb) = (
        open(&a, "sim-a:1"),
        open(&a, "sim-a:1"),
        open(&b, "sim-b:1"),
    );
    let target = Target::with_backends(&cfg, |spec| match spec {
        BackendSpec::Ram { size } if *size == 4 << 20 => Ok(na1.clone()),
        BackendSpec::Ram { size } if *size == 2 << 20 => Ok(na2.clone()),
        BackendSpec::Ram { size } if *size == 3 << 20 => Ok(nb.clone()),
        s => transport::backend::open_backend(s, None),
    })
    .unwrap();
    let mut rig = Rig::with_target(target);
    let (mut admin, _) = rig.admin(0);

    let r = admin.wire().register(512);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::SMART, u32::MAX, 512, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let s = SmartLog::read_from_bytes(&admin.wire().read_region(r)).unwrap();
    assert_eq!(s.temperature.get(), SIM_TEMPERATURE_KELVIN, "the device's");
    assert_eq!(s.avail_spare, 97);
    assert_eq!(
        s.power_on_hours.get(),
        2 * 42,
        "two devices, A counted once"
    );
    assert_eq!(
        s.num_error_log_entries.get(),
        2 * u128::from(SIM_ERROR_COUNT)
    );
    assert_eq!(s.critical_warning, 0);

    // A temperature threshold below the device's temperature raises the warning bit.
    let c = rig.exec(&mut admin, cmd::set_features(4, 310), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::SMART, u32::MAX, 512, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let s = SmartLog::read_from_bytes(&admin.wire().read_region(r)).unwrap();
    assert_eq!(s.critical_warning & (1 << 1), 1 << 1);

    let r = admin.wire().register(4096);
    let c = rig.exec(
        &mut admin,
        cmd::get_log_page(log::ERROR, u32::MAX, 4096, 0, keyed(r)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let page = admin.wire().read_region(r);
    let entries: Vec<ErrorLogEntry> = page
        .chunks_exact(64)
        .map(|c| ErrorLogEntry::read_from_bytes(c).unwrap())
        .filter(|e| e.error_count.get() != 0)
        .collect();
    assert_eq!(entries.len(), 2, "one entry per device: {entries:?}");
    assert!(entries
        .iter()
        .all(|e| e.error_count.get() == SIM_ERROR_COUNT
            && e.lba.get() == 0x1234
            && e.sqid.get() == 0xffff
            && e.cid.get() == 0xffff));
    // Device A's namespace 1 is our nsid 1, device B's is our nsid 3.
    assert_eq!(
        entries.iter().map(|e| e.nsid.get()).collect::<Vec<_>>(),
        [1, 3]
    );
}

/// One executor for both kinds of backend: the same commands on a namespace with an
/// asynchronous channel and on a synchronous one (ram) give the host the same statuses
/// and count the same in the namespace's and the controller's counters (a failed device
/// command counts as issued on the namespace, not as done on the controller; a range
/// error fails before anything is issued).
#[test]
fn sync_and_async_namespaces_count_alike() {
    let run = |rig: &mut Rig, fail: &dyn Fn()| {
        let (_admin, cntlid) = rig.admin(0);
        let mut io = rig.io(1, cntlid);
        let r = io.wire().register(4096);
        io.wire().write_region(r, 0, &pattern(4096, 9));
        let blocks = (4u64 << 20) / 512;
        let mut statuses = Vec::new();
        let mut exec = |rig: &mut Rig, io: &mut HostQ, sqe, icd: &[u8]| {
            statuses.push(rig.exec(io, sqe, icd).status().code());
        };
        exec(rig, &mut io, cmd::write(1, 0, 8, keyed(r)), &[]);
        let icd = pattern(4096, 4);
        exec(
            rig,
            &mut io,
            cmd::write(1, 8, 8, SglDescriptor::in_capsule(0, 4096)),
            &icd,
        );
        exec(rig, &mut io, cmd::read(1, 8, 8, keyed(r)), &[]);
        assert_eq!(io.wire().read_region(r), icd);
        exec(rig, &mut io, cmd::read(1, blocks - 4, 8, keyed(r)), &[]);
        exec(rig, &mut io, cmd::write_zeroes(1, blocks - 1, 2), &[]);
        exec(rig, &mut io, cmd::write_zeroes(1, 0, 8), &[]);
        exec(rig, &mut io, cmd::flush(1), &[]);
        fail();
        exec(rig, &mut io, cmd::read(1, 0, 8, keyed(r)), &[]);
        let sub = rig.target.subsystems()[1].clone();
        let ns = sub.namespace(1).unwrap().stats.totals();
        let c = rig.target.controller_stats()[0].clone();
        let q: u64 = rig.group.queue_stats().iter().map(|q| q.errors).sum();
        (
            statuses,
            ns,
            (
                c.read_commands,
                c.write_commands,
                c.bytes_read,
                c.bytes_written,
                c.errors,
            ),
            q,
        )
    };
    let mut sync = Rig::default_rig();
    let sync_out = run(&mut sync, &|| {});
    let (mut rig, dev) = fake_rig(64);
    let fail = || dev.ctl().fail_next = Some(Status::UNRECOVERED_READ_ERROR);
    let async_out = run(&mut rig, &fail);
    assert_eq!(dev.ctl().sync_calls, 0, "everything took the channel");
    assert_eq!(dev.ctl().submitted, 6);
    // The ram namespace cannot fail a read: the last read differs, nothing else.
    let (mut s_st, s_ns, s_c, s_q) = sync_out;
    let (a_st, a_ns, a_c, a_q) = async_out;
    assert_eq!(a_st.last(), Some(&Status::UNRECOVERED_READ_ERROR.code()));
    s_st.pop();
    assert_eq!(&a_st[..a_st.len() - 1], &s_st[..]);
    assert_eq!(
        (
            a_ns.read_commands,
            a_ns.write_commands,
            a_ns.bytes_read,
            a_ns.bytes_written
        ),
        (
            s_ns.read_commands,
            s_ns.write_commands,
            s_ns.bytes_read,
            s_ns.bytes_written
        ),
        "namespace counters: issued commands"
    );
    assert_eq!((s_ns.read_commands, s_ns.write_commands), (2, 2));
    assert_eq!(a_ns.errors, s_ns.errors + 1);
    assert_eq!(s_c, (2, 2, 8192, 8192, 2));
    assert_eq!(
        a_c,
        (1, 2, 4096, 8192, 3),
        "the failed read is not counted as done"
    );
    assert_eq!(a_q, s_q + 1);
}

/// A poll group that does not answer a hold (its thread is stuck) makes the hold fail
/// with Quiesce, so the caller does not reset a device the group may still drive; the
/// hold is taken back, and the group, once it polls again, serves I/O as before.
#[test]
fn a_hold_no_group_answers_fails_and_is_taken_back() {
    let (mut rig, _sim, ctrl) = sim_rig(None);
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    let t0 = Instant::now();
    let err = rig
        .target
        .hold_backend_io(Duration::from_millis(50))
        .err()
        .expect("nobody answered: the hold fails");
    assert!(
        matches!(err, transport::Error::Quiesce { groups: 1, .. }),
        "{err}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(ctrl.generation(), 0);
    rig.group.poll(); // takes the hold and its release
    assert!(!rig.group.backend_io_held(), "the failed hold was released");
    let region = io.wire().register(4096);
    io.submit(cmd::read(1, 0, 1, keyed(region)), &[], 0)
        .unwrap();
    assert_eq!(rig.collect(&mut io, 1)[0].status(), Status::SUCCESS);
    assert_eq!(rig.group.backend_in_flight(), 0);
}

/// A synchronous command that times out in the device (Dataset Management takes the
/// backend's synchronous path) asks for the same recovery as an asynchronous one: the
/// host gets an error, the device is reset with the poll group's I/O held, and it serves
/// again.
#[test]
fn a_synchronous_command_timeout_resets_the_device_too() {
    let timeout = Duration::from_millis(200);
    let (mut rig, sim, ctrl) = sim_rig(Some(timeout));
    let (tx, faults) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let dev = ctrl.clone();
    rig.target.set_recovery(Arc::new(
        move |target: &Target, _b: &Arc<dyn Backend>, fault| {
            let held = target.hold_backend_io(Duration::from_millis(200)).unwrap();
            dev.reset_device().unwrap();
            drop(held);
            tx.lock().unwrap().send(fault).unwrap();
        },
    ));
    let (_admin, cntlid) = rig.admin(0);
    let mut io = rig.io(1, cntlid);
    sim.faults().stall_next_io(1);
    let range = DsmRange::new(5, 1);
    let dsm = cmd::deallocate(1, 1, SglDescriptor::in_capsule(0, 16));
    let c = rig.exec(&mut io, dsm, range.as_bytes());
    assert!(!c.status().is_success(), "the stalled command failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let fault = loop {
        if let Ok(f) = faults.try_recv() {
            break f;
        }
        assert!(Instant::now() < deadline, "no recovery");
        rig.group.poll();
        std::thread::yield_now();
    };
    assert_eq!(fault, Fault::Timeout { after: timeout });
    assert_eq!(ctrl.generation(), 1);
    rig.group.poll(); // takes the release
    let region = io.wire().register(4096);
    io.submit(cmd::read(1, 0, 1, keyed(region)), &[], 0)
        .unwrap();
    assert_eq!(rig.collect(&mut io, 1)[0].status(), Status::SUCCESS);
    let c = rig.exec(&mut io, dsm, range.as_bytes());
    assert_eq!(
        c.status(),
        Status::SUCCESS,
        "synchronous commands work again"
    );
}
