//! Two poll groups on two threads share one target: the admin queue on one, an I/O queue
//! on the other; tearing the controller down on one group closes the queue on the other.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nvme::spec::{reg, Status};
use transport::fabrics::{SglDescriptor, CNTLID_DYNAMIC};
use transport::initiator::{cm_request, cmd, InitiatorQueue};
use transport::loopback::{LinkState, LoopbackTransport};
use transport::nvmf_target::Target;
use transport::wire::Transport;
use zerocopy::IntoBytes;

#[test]
fn controller_spans_poll_groups_on_two_threads() {
    let cfg = config("");
    let target = Target::from_config(&cfg, None).unwrap();
    let (mut transport, connector) = LoopbackTransport::new();
    let mut group_a = target.create_poll_group(&mut transport).unwrap();
    let group_b = target.create_poll_group(&mut transport).unwrap();

    // Admin queue into group A (this thread).
    let admin_host = connector.connect(&cm_request(0, 32));
    group_a.accept(transport.poll_incoming().unwrap()).unwrap();
    let mut admin = InitiatorQueue::new(admin_host, 0, 31);
    let mut run_a = |q: &mut HostQ, sqe, icd: &[u8]| {
        q.submit(sqe, icd, 0).unwrap();
        for _ in 0..1000 {
            group_a.poll();
            if let Some(c) = q.poll_one() {
                return c;
            }
        }
        panic!("no admin response");
    };
    let data = cmd::connect_data([1; 16], CNTLID_DYNAMIC, SUBNQN, HOSTNQN);
    let c = run_a(
        &mut admin,
        cmd::connect(0, 31, 0, SglDescriptor::in_capsule(0, 1024)),
        data.as_bytes(),
    );
    assert_eq!(c.status(), Status::SUCCESS);
    let cntlid = c.cqe.dw0.get() as u16;
    let c = run_a(
        &mut admin,
        cmd::property_set(reg::CC as u32, 1 | (6 << 16) | (4 << 20)),
        &[],
    );
    assert_eq!(c.status(), Status::SUCCESS);

    // I/O queue into group B, which runs on its own thread.
    let io_host = connector.connect(&cm_request(1, 32));
    let incoming = transport.poll_incoming().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_b = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut g = group_b;
        g.accept(incoming).unwrap();
        while !stop_b.load(Ordering::Relaxed) {
            if g.poll() == 0 {
                std::thread::yield_now();
            }
        }
        g.queue_count()
    });
    let mut io = InitiatorQueue::new(io_host, 1, 31);
    let wait = |q: &mut HostQ| {
        let t = Instant::now();
        loop {
            if let Some(c) = q.poll_one() {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "no I/O response");
            std::thread::yield_now();
        }
    };
    for _ in 0..1000 {
        if matches!(io.wire().state(), LinkState::Established(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let data = cmd::connect_data([1; 16], cntlid, SUBNQN, HOSTNQN);
    io.submit(
        cmd::connect(1, 31, 0, SglDescriptor::in_capsule(0, 1024)),
        data.as_bytes(),
        0,
    )
    .unwrap();
    assert_eq!(wait(&mut io).status(), Status::SUCCESS);
    let buf = io.wire().register(8 * 4096);
    for i in 0..8u64 {
        let bytes = pattern(4096, i as u8);
        io.wire().write_region(buf, i as usize * 4096, &bytes);
        let d = SglDescriptor::keyed(buf.addr + i * 4096, 4096, buf.key, false);
        io.submit(cmd::write(1, i * 8, 8, d), &[], i).unwrap();
    }
    for _ in 0..8 {
        assert_eq!(wait(&mut io).status(), Status::SUCCESS);
    }
    let rd = io.wire().register(8 * 4096);
    io.submit(
        cmd::read(
            1,
            0,
            64,
            SglDescriptor::keyed(rd.addr, 8 * 4096, rd.key, false),
        ),
        &[],
        0,
    )
    .unwrap();
    assert_eq!(wait(&mut io).status(), Status::SUCCESS);
    assert_eq!(io.wire().read_region(rd), io.wire().read_region(buf));
    assert_eq!(target.controller_stats()[0].write_commands, 8);

    // The host drops the admin queue: group A tears the controller down, group B's
    // I/O queue follows on its own thread.
    admin.wire().disconnect();
    for _ in 0..10 {
        group_a.poll();
    }
    assert!(target.controllers().is_empty());
    let t = Instant::now();
    while io.wire().state() != LinkState::Closed {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "I/O queue not torn down"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(worker.join().unwrap(), 0, "group B removed its queue");
}
