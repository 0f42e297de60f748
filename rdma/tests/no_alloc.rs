//! Host test (no RDMA device): a reactor pass over a poller, and building and linking a
//! work-request chain, allocate nothing on the heap once warmed up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma::reactor::{Arm, Poller, Reactor, ReactorConfig, WakeSet};
use rdma::{RemoteAddr, SendBatch, SendFlags, Sge, WorkCompletion, WrId};

#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

/// Completions from a preallocated ring, summed into `sum`; never sleeps (the test only
/// runs passes).
struct Ring {
    queue: Arc<Mutex<VecDeque<u64>>>,
    wcs: [WorkCompletion; 32],
    sum: Arc<Mutex<u64>>,
}

impl Poller for Ring {
    fn poll(&mut self, _now: Instant) -> usize {
        let mut q = self.queue.lock().unwrap();
        let mut n = 0;
        while n < self.wcs.len() {
            let Some(id) = q.pop_front() else { break };
            self.wcs[n] = WorkCompletion::default();
            self.wcs[n].0.wr_id = id;
            n += 1;
        }
        let mut sum = self.sum.lock().unwrap();
        for wc in &self.wcs[..n] {
            *sum += wc.wr_id().raw();
        }
        n
    }
    fn arm(&mut self, _idle: Duration, _wake: &mut WakeSet) -> Arm {
        Arm::Nap(Duration::from_millis(1))
    }
}

#[test]
fn reactor_pass_and_wr_chains_do_not_allocate() {
    let queue = Arc::new(Mutex::new(VecDeque::with_capacity(1024)));
    let sum = Arc::new(Mutex::new(0));
    let mut reactor = Reactor::new(ReactorConfig::default()).unwrap();
    reactor.add(Box::new(Ring {
        queue: queue.clone(),
        wcs: [WorkCompletion::default(); 32],
        sum: sum.clone(),
    }));
    // Warm-up (lazy statics, first lock).
    reactor.pass();

    alloc_count::count_this_thread(true);
    let mut expected = 0;
    for round in 0..1000u64 {
        {
            let mut q = queue.lock().unwrap();
            for i in 0..32 {
                q.push_back(round + i);
                expected += round + i;
            }
        }
        let work = reactor.pass();
        assert_eq!(work, 32);
    }
    assert_eq!(*sum.lock().unwrap(), expected);
    let remote = RemoteAddr {
        addr: 0x1000,
        rkey: 1,
    };
    let sge = Sge {
        addr: 0x2000,
        len: 64,
        lkey: 2,
    };
    for _ in 0..1000 {
        let mut chain = SendBatch::<3>::new();
        chain
            .write(WrId::new(1, 1), sge, remote, SendFlags::NONE)
            .unwrap()
            .write(WrId::new(1, 2), sge, remote.offset(64), SendFlags::NONE)
            .unwrap()
            .write_imm(
                WrId::new(1, 3),
                None,
                remote.offset(128),
                7,
                SendFlags::SIGNALED,
            )
            .unwrap();
        assert_eq!(chain.len(), 3);
    }
    alloc_count::count_this_thread(false);
    assert_eq!(alloc_count::take(), 0, "heap allocations on the data path");
}
