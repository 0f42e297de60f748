//! Limits against misbehaving hosts, over the loopback transport: a connection that never
//! sends Connect is dropped after the connect timeout; capsules beyond a queue's depth are
//! answered with Command Interrupted while the connection and the other queues live.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nvme::spec::{Cqe, Status};
use transport::initiator::cmd;
use transport::loopback::LinkState;
use zerocopy::IntoBytes;

#[test]
fn connection_without_connect_is_dropped_after_the_timeout() {
    let mut rig = Rig::new(&config("connect_timeout_ms = 50"));
    let t0 = Instant::now();
    rig.frozen = Some(t0);
    let silent = rig.open(1, 32);
    let (mut admin, _) = rig.admin(0);
    // Just before the deadline: still there.
    rig.frozen = Some(t0 + Duration::from_millis(49));
    rig.pump();
    assert!(matches!(silent.wire().state(), LinkState::Established(_)));
    assert_eq!(rig.target.connect_timeouts(), 0);
    rig.frozen = Some(t0 + Duration::from_millis(60));
    rig.pump();
    assert_eq!(silent.wire().state(), LinkState::Closed, "dropped");
    assert_eq!(rig.target.connect_timeouts(), 1);
    // The connected admin queue, as old, lives on and answers.
    let c = rig.exec(&mut admin, cmd::keep_alive(), &[]);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(rig.group.queue_count(), 1);
}

#[test]
fn connect_timeout_zero_never_drops() {
    let mut rig = Rig::new(&config("connect_timeout_ms = 0"));
    let t0 = Instant::now();
    rig.frozen = Some(t0);
    let silent = rig.open(1, 32);
    rig.frozen = Some(t0 + Duration::from_secs(3600));
    rig.pump();
    assert!(matches!(silent.wire().state(), LinkState::Established(_)));
    assert_eq!(rig.target.connect_timeouts(), 0);
}

#[test]
fn capsules_beyond_the_queue_depth_are_answered_and_the_others_keep_going() {
    let mut rig = Rig::default_rig();
    let (mut admin, cntlid) = rig.admin(0);
    // An I/O queue of 4 entries.
    let mut io = rig.open(1, 4);
    let c = rig.connect_icd(&mut io, SUBNQN, HOSTNQN, cntlid, 3);
    assert_eq!(c.status(), Status::SUCCESS);
    // No response can go out: every request stays in use.
    io.wire().set_send_credits(0);
    let flush = |cid: u16| {
        let mut s = cmd::flush(1);
        s.set_cid(cid);
        let mut b = [0u8; 64];
        b.copy_from_slice(s.as_bytes());
        b
    };
    // 4 fill the requests, 4 more may wait (one depth ahead), 3 are beyond that.
    for cid in 0..11u16 {
        io.wire().send(&flush(cid), &[]).unwrap();
    }
    rig.pump();
    let stats = |rig: &Rig| {
        rig.group
            .queue_stats()
            .into_iter()
            .find(|q| q.qid == 1)
            .unwrap()
    };
    assert_eq!(stats(&rig).overflows, 3);
    assert_eq!(stats(&rig).in_flight, 4);
    // The admin queue is served meanwhile.
    let c = rig.exec(&mut admin, cmd::keep_alive(), &[]);
    assert_eq!(c.status(), Status::SUCCESS);

    io.wire().set_send_credits(usize::MAX);
    rig.pump();
    let mut got: Vec<Cqe> = Vec::new();
    while let Some((cqe, _)) = io.wire().recv() {
        got.push(cqe);
    }
    assert_eq!(got.len(), 11, "every capsule answered: {got:?}");
    let interrupted: Vec<u16> = got
        .iter()
        .filter(|c| c.status().same_code(Status::COMMAND_INTERRUPTED))
        .map(|c| c.cid.get())
        .collect();
    // The wire hands capsules over in order: the first ones waiting are answered, the
    // last four (one depth) run once requests are free.
    assert_eq!(interrupted, [4, 5, 6]);
    assert!(got
        .iter()
        .filter(|c| !interrupted.contains(&c.cid.get()))
        .all(|c| c.status() == Status::SUCCESS));
    assert!(
        got.iter()
            .filter(|c| c.status().same_code(Status::COMMAND_INTERRUPTED))
            .all(|c| !c.status().dnr()),
        "retryable (no DNR)"
    );
    // The connection lives and serves a host keeping to its depth again.
    assert!(matches!(io.wire().state(), LinkState::Established(_)));
    io.wire().send(&flush(20), &[]).unwrap();
    rig.pump();
    let (cqe, _) = io.wire().recv().expect("response");
    assert_eq!((cqe.cid.get(), cqe.status()), (20, Status::SUCCESS));
    assert_eq!(stats(&rig).overflows, 3);
}
