//! Interrupt-driven I/O queues against the simulated controller: the eventfd a CQ's
//! vector signals, the arm/check rule, a thread sleeping in poll(2) until a completion,
//! queues recreated with their vectors after a controller reset.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nvme::irq::wait_readable;
use nvme::sim::{SimConfig, Simulator};
use nvme::spec::Status;
use nvme::{Completion, Controller, ControllerOptions, Error, IoQueuePair, QueueOptions};

const T: Duration = Duration::from_secs(5);

fn setup(cfg: SimConfig) -> (Simulator, Controller) {
    let sim = Simulator::start(cfg).expect("simulator");
    let ctrl = Controller::new(sim.platform(), ControllerOptions::default()).expect("controller");
    (sim, ctrl)
}

fn qopts() -> QueueOptions {
    QueueOptions {
        depth: 64,
        sq_in_cmb: false,
    }
}

fn readable(qp: &IoQueuePair, timeout: Duration) -> bool {
    let fd = qp.interrupt_fd().expect("interrupt fd").as_raw_fd();
    wait_readable(&[fd], timeout).unwrap() > 0
}

fn drain(qp: &mut IoQueuePair) -> Vec<Completion> {
    let mut v = Vec::new();
    qp.poll(usize::MAX, |c| v.push(c));
    v
}

/// Waits (for the test, by the simulator's counter) until `n` commands were processed.
fn wait_processed(sim: &Simulator, n: u64) {
    let start = Instant::now();
    while sim.commands_processed() < n {
        assert!(
            start.elapsed() < T,
            "the simulator did not process command {n}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[test]
fn queue_with_interrupts_signals_its_eventfd_on_completion() {
    let (sim, ctrl) = setup(SimConfig::default());
    assert_eq!(ctrl.interrupt_vectors(), 17);
    let mut polled = ctrl.create_io_queue_pair(qopts()).unwrap();
    assert!(polled.interrupt_fd().is_none() && polled.interrupt_vector().is_none());
    assert!(
        !polled.arm_interrupt(),
        "a polled queue must never be slept on"
    );
    assert!(matches!(
        polled.wait_interrupt(Duration::ZERO),
        Err(Error::InvalidArgument(_))
    ));

    let mut qp = ctrl.create_io_queue_pair_with_interrupts(qopts()).unwrap();
    let v = qp.interrupt_vector().unwrap();
    assert!(
        v >= 1,
        "I/O queues get their own vector, not the admin queue's (got {v})"
    );
    assert!(qp.arm_interrupt(), "nothing in flight: may sleep");
    assert!(!readable(&qp, Duration::from_millis(20)));

    let buf = ctrl.alloc_dma(4096).unwrap();
    let before = sim.interrupts_raised();
    qp.read(1, 0, &buf, 9).unwrap();
    assert!(readable(&qp, T), "no interrupt after a completion");
    assert!(sim.interrupts_raised() > before);
    let done = drain(&mut qp);
    assert_eq!(done.len(), 1);
    assert!(done[0].is_ok() && done[0].tag == 9);

    // The polled queue's completions raise nothing on the interrupt queue's vector.
    let raised = sim.interrupts_raised();
    assert!(qp.arm_interrupt());
    let cid = polled.read(1, 0, &buf, 1).unwrap();
    let start = Instant::now();
    loop {
        let got = drain(&mut polled);
        if got.iter().any(|c| c.cid == cid) {
            break;
        }
        assert!(start.elapsed() < T);
    }
    assert_eq!(sim.interrupts_raised(), raised);
    assert!(!readable(&qp, Duration::from_millis(10)));
}

#[test]
fn arm_sees_a_completion_that_came_before_it() {
    // The race: a CQE (and its interrupt) lands after the last poll but before the
    // eventfd is cleared; clearing swallows the event, so arm must find the CQE.
    let (sim, ctrl) = setup(SimConfig::default());
    let mut qp = ctrl.create_io_queue_pair_with_interrupts(qopts()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    let n0 = sim.commands_processed();
    qp.read(1, 0, &buf, 1).unwrap();
    wait_processed(&sim, n0 + 1);
    assert!(qp.completion_ready());
    assert!(
        !qp.arm_interrupt(),
        "a completion is waiting: must not sleep"
    );
    assert!(
        !readable(&qp, Duration::ZERO),
        "arm cleared the eventfd (the CQE is what tells)"
    );
    // wait_interrupt returns at once instead of sleeping for the full timeout.
    let start = Instant::now();
    qp.wait_interrupt(Duration::from_secs(10)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(drain(&mut qp).len(), 1);
    assert!(!qp.completion_ready());
    assert!(qp.arm_interrupt());
}

#[test]
fn a_thread_asleep_in_poll_wakes_on_completion() {
    let (sim, ctrl) = setup(SimConfig::default());
    let mut qp = ctrl.create_io_queue_pair_with_interrupts(qopts()).unwrap();
    let buf = ctrl.alloc_dma(8192).unwrap();
    // Stall the command so the waiter is certainly asleep before it completes; then
    // complete it with an Abort from another thread.
    sim.faults().stall_next_io(1);
    let cid = qp.read(1, 0, &buf, 5).unwrap();
    let qid = qp.qid();
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() {
            assert!(start.elapsed() < T, "never woke");
            if qp.arm_interrupt() {
                let fd = qp.interrupt_fd().unwrap().as_raw_fd();
                wait_readable(&[fd], T).unwrap();
            }
            got = drain(&mut qp);
        }
        (got, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished(), "the waiter did not sleep");
    assert!(ctrl.abort(qid, cid).unwrap());
    let (got, slept) = waiter.join().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, Status::ABORT_REQUESTED);
    assert!(slept >= Duration::from_millis(90));
    assert!(sim.interrupts_raised() >= 1);
}

#[test]
fn a_lost_interrupt_only_delays_until_the_timeout() {
    let (sim, ctrl) = setup(SimConfig::default());
    let mut qp = ctrl.create_io_queue_pair_with_interrupts(qopts()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    sim.faults().mute_interrupts(true);
    let n0 = sim.commands_processed();
    assert!(qp.arm_interrupt());
    qp.read(1, 0, &buf, 1).unwrap();
    wait_processed(&sim, n0 + 1);
    assert!(!readable(&qp, Duration::from_millis(20)));
    qp.wait_interrupt(Duration::from_millis(20)).unwrap();
    assert_eq!(drain(&mut qp).len(), 1);
}

#[test]
fn vectors_survive_a_controller_reset_and_bad_vectors_are_refused() {
    let (sim, ctrl) = setup(SimConfig {
        msix_vectors: 3,
        ..SimConfig::default()
    });
    let mut qs: Vec<IoQueuePair> = (0..4)
        .map(|_| ctrl.create_io_queue_pair_with_interrupts(qopts()).unwrap())
        .collect();
    let vs: Vec<u16> = qs.iter().map(|q| q.interrupt_vector().unwrap()).collect();
    // Two I/O vectors (1, 2) shared round-robin by four queues.
    assert_eq!(vs, [1, 2, 1, 2]);
    ctrl.reset().unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    for q in qs.iter_mut() {
        assert!(q.arm_interrupt());
        q.read(1, 0, &buf, 3).unwrap();
        assert!(
            readable(q, T),
            "queue {} lost its interrupt in the reset",
            q.qid()
        );
        assert_eq!(drain(q).len(), 1);
    }
    let n = sim.interrupts_raised();
    assert!(n >= 4);

    // The controller refuses an I/O CQ on a vector it does not have.
    let cq = ctrl.alloc_dma(4096).unwrap();
    let e = ctrl
        .admin_command(nvme::spec::Sqe::create_io_cq_irq(9, 15, cq.iova(), 7), None)
        .unwrap_err();
    assert!(
        matches!(e, Error::Command { status, .. } if status == Status::INVALID_INTERRUPT_VECTOR),
        "{e}"
    );
}

#[test]
fn no_vectors_means_a_clear_error() {
    let (_sim, ctrl) = setup(SimConfig {
        msix_vectors: 0,
        ..SimConfig::default()
    });
    assert_eq!(ctrl.interrupt_vectors(), 0);
    match ctrl.create_io_queue_pair_with_interrupts(qopts()) {
        Err(e) => assert!(matches!(e, Error::Unsupported { .. }), "{e}"),
        Ok(_) => panic!("a queue with interrupts on a controller without vectors"),
    }
    // Polled queues still work.
    let mut qp = ctrl.create_io_queue_pair(qopts()).unwrap();
    let buf = ctrl.alloc_dma(4096).unwrap();
    qp.execute(nvme::spec::Sqe::read(1, 0, 0, 0, 0), Some(&buf), T)
        .unwrap();
}

#[test]
fn raw_queue_with_interrupts_wakes_a_sleeper_and_survives_reset() {
    let (_sim, ctrl) = setup(SimConfig::default());
    let depth = 8u16;
    let sq = ctrl.alloc_dma(4096).unwrap();
    let cq = ctrl.alloc_dma(4096).unwrap();
    let plain = ctrl
        .create_raw_queue_pair(
            ctrl.alloc_dma(4096).unwrap(),
            ctrl.alloc_dma(4096).unwrap(),
            4,
        )
        .unwrap();
    assert!(plain.interrupt_eventfd().is_none() && plain.interrupt_vector().is_none());
    let raw = ctrl
        .create_raw_queue_pair_with_interrupts(sq.clone(), cq.clone(), depth)
        .unwrap();
    let v = raw.interrupt_vector().expect("a vector");
    assert_ne!(
        v, 0,
        "I/O queues do not share the admin queue's vector while others last"
    );
    let ev = raw.interrupt_eventfd().unwrap().clone();
    let data = ctrl.alloc_dma(4096).unwrap();
    // One command by hand, as a remote host would: the owner sleeps on the eventfd
    // (cleared first, ring checked after) and wakes when the CQE is posted.
    let submit = |slot: u16, cid: u16| {
        let mut sqe = nvme::spec::Sqe::read(1, 7, 0, data.iova(), 0);
        sqe.set_cid(cid);
        sq.write(usize::from(slot) * 64, zerocopy::IntoBytes::as_bytes(&sqe))
            .unwrap();
        raw.ring_sq(slot + 1);
    };
    let phase_at = |slot: usize| {
        let mut b = [0u8; 16];
        cq.read(slot * 16, &mut b).unwrap();
        b[14] & 1 == 1
    };
    for (slot, cid) in [(0u16, 11u16), (1, 12)] {
        ev.clear();
        assert!(
            !phase_at(usize::from(slot)),
            "nothing posted before the submission"
        );
        submit(slot, cid);
        assert!(
            wait_readable(&[ev.as_raw_fd()], T).unwrap() > 0,
            "no interrupt for the completion in slot {slot}"
        );
        assert!(
            phase_at(usize::from(slot)),
            "woken before the CQE was visible"
        );
        raw.ring_cq(slot + 1);
    }
    // A controller reset recreates the queue with its vector: interrupts keep coming.
    ctrl.reset().unwrap();
    ev.clear();
    submit(0, 13);
    assert!(
        wait_readable(&[ev.as_raw_fd()], T).unwrap() > 0,
        "no interrupt after the reset"
    );
    assert!(phase_at(0));
}
