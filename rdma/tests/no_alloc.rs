//! Host test (no RDMA device): the engine's poll/dispatch path and building and linking a
//! work-request chain allocate nothing on the heap once warmed up.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use rdma::engine::{CompletionSource, Engine, EngineConfig, Handler};
use rdma::{RemoteAddr, SendBatch, SendFlags, Sge, WorkCompletion};

#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

/// Completions from a preallocated ring; never wakes (the test only polls).
struct Ring(Mutex<VecDeque<u64>>);

impl CompletionSource for Ring {
    fn poll(&self, out: &mut [WorkCompletion]) -> rdma::Result<usize> {
        let mut q = self.0.lock().unwrap();
        let mut n = 0;
        while n < out.len() {
            let Some(id) = q.pop_front() else { break };
            out[n] = WorkCompletion::default();
            out[n].0.wr_id = id;
            n += 1;
        }
        Ok(n)
    }
    fn arm(&self) -> rdma::Result<()> {
        Ok(())
    }
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    fn drain_wakeups(&self) -> rdma::Result<()> {
        Ok(())
    }
}

struct Sum(u64);

impl Handler for Sum {
    type Msg = u64;
    fn on_completion(&mut self, _source: usize, wc: &WorkCompletion) {
        self.0 += wc.wr_id();
    }
    fn on_message(&mut self, msg: u64) {
        self.0 += msg;
    }
}

#[test]
fn engine_poll_and_wr_chains_do_not_allocate() {
    let ring = Arc::new(Ring(Mutex::new(VecDeque::with_capacity(1024))));
    let mut engine = Engine::<u64>::new(EngineConfig::default()).unwrap();
    engine.add_source(ring.clone()).unwrap();
    let mut h = Sum(0);
    // Warm-up (lazy statics, first lock).
    engine.poll_once(&mut h).unwrap();

    alloc_count::count_this_thread(true);
    let mut expected = 0;
    for round in 0..1000u64 {
        {
            let mut q = ring.0.lock().unwrap();
            for i in 0..40 {
                q.push_back(round + i);
                expected += round + i;
            }
        }
        let work = engine.poll_once(&mut h).unwrap();
        assert_eq!(work, 40);
    }
    assert_eq!(h.0, expected);

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
            .write(1, sge, remote, SendFlags::NONE)
            .unwrap()
            .write(2, sge, remote.offset(64), SendFlags::NONE)
            .unwrap()
            .write_imm(3, None, remote.offset(128), 7, SendFlags::SIGNALED)
            .unwrap();
        assert_eq!(chain.len(), 3);
    }
    alloc_count::count_this_thread(false);
    assert_eq!(alloc_count::take(), 0, "heap allocations on the data path");
}
