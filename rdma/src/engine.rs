//! The adaptive polled engine: one loop per core over many CQs, CM channels and an
//! inbox of messages from other threads.
//!
//! While work flows it busy-polls. After `idle_spell` without any work it arms every CQ
//! (`ibv_req_notify_cq`), polls once more to close the arm/complete race, and sleeps in
//! `epoll_wait` on the completion-channel fds, the CM channel fds and an eventfd that
//! [`EngineHandle::send`] rings — so an idle engine costs no CPU, which matters on a
//! 2-vCPU box where a spinning target starves the rest.
//!
//! Completions are polled into a fixed array inside the engine and handed to the
//! [`Handler`] by reference: no heap allocation on the data path.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender, TryRecvError};

use crate::cm::{CmEvent, EventChannel};
use crate::cq::CompletionQueue;
use crate::error::{last_os_error, Error, Result};
use crate::wr::WorkCompletion;

/// Completions fetched per `ibv_poll_cq` call.
pub const POLL_BATCH: usize = 32;
/// Most `ibv_poll_cq` calls per source per iteration, so a busy CQ cannot starve the
/// others, the CM channel or the inbox.
pub const MAX_BATCHES_PER_SOURCE: usize = 4;

/// Something that yields completions and can wake a sleeping engine through an fd.
/// Implemented by [`CompletionQueue`]; tests implement it with fakes.
pub trait CompletionSource: Send + Sync {
    /// Polls up to `out.len()` completions.
    fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize>;
    /// Requests a wake-up (fd readable) on the next completion.
    fn arm(&self) -> Result<()>;
    /// The fd that becomes readable after [`CompletionSource::arm`] and a completion.
    /// `None` means the source cannot wake the engine, which then never sleeps.
    fn wake_fd(&self) -> Option<RawFd>;
    /// Consumes the readiness of [`CompletionSource::wake_fd`] (acks CQ events).
    fn drain_wakeups(&self) -> Result<()>;
}

impl CompletionSource for CompletionQueue {
    fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        CompletionQueue::poll(self, out)
    }
    fn arm(&self) -> Result<()> {
        CompletionQueue::arm(self, false)
    }
    fn wake_fd(&self) -> Option<RawFd> {
        self.channel().map(|c| c.fd())
    }
    fn drain_wakeups(&self) -> Result<()> {
        if let Some(c) = self.channel() {
            c.drain_events()?;
        }
        Ok(())
    }
}

/// The per-poll-group logic plugged into an engine (e.g. the NVMe-oF target's poll group).
pub trait Handler {
    /// Messages other threads send through [`EngineHandle::send`].
    type Msg: Send;

    /// One completion from source `source` (index in the order sources were added).
    fn on_completion(&mut self, source: usize, wc: &WorkCompletion);

    /// One RDMA CM event from channel `channel` (index in the order channels were added).
    fn on_cm_event(&mut self, channel: usize, event: CmEvent) {
        let _ = (channel, event);
    }

    /// One message from another thread.
    fn on_message(&mut self, msg: Self::Msg) {
        let _ = msg;
    }

    /// Extra polling each iteration (e.g. an NVMe CQ); returns how much work it did.
    fn poll(&mut self) -> usize {
        0
    }

    /// False while the handler has work that cannot wake the engine (e.g. NVMe commands
    /// outstanding on a polled device): the engine then keeps polling.
    fn can_sleep(&self) -> bool {
        true
    }
}

/// Engine tuning.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Idle time after which the engine arms the CQs and sleeps.
    pub idle_spell: Duration,
    /// Longest single sleep (the stop flag is checked at least this often).
    pub max_sleep: Duration,
    /// Pin the engine thread to this CPU when it starts running.
    pub cpu: Option<usize>,
    /// Most inbox messages handled per iteration.
    pub message_batch: usize,
    /// Call `sched_yield` after an empty poll (before the idle spell ends). Soft-RoCE does
    /// its packet processing in kernel workers on the same CPUs; a pure spin delays them to
    /// the next scheduler tick. Measured in the 2-vCPU testbed (rdma_bench, 8 B SEND/RECV
    /// ping-pong): ~90 us half round trip when yielding, ~4 ms when spinning.
    pub yield_when_idle: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            idle_spell: Duration::from_micros(200),
            max_sleep: Duration::from_millis(100),
            cpu: None,
            message_batch: 64,
            yield_when_idle: true,
        }
    }
}

#[derive(Default)]
struct Counters {
    polls: AtomicU64,
    idle_polls: AtomicU64,
    sleeps: AtomicU64,
    wakeups: AtomicU64,
    completions: AtomicU64,
    cm_events: AtomicU64,
    messages: AtomicU64,
}

/// A snapshot of the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Loop iterations.
    pub polls: u64,
    /// Iterations that found nothing.
    pub idle_polls: u64,
    /// Times the engine went to sleep.
    pub sleeps: u64,
    /// Sleeps ended by an fd becoming ready (not by the `max_sleep` timeout).
    pub wakeups: u64,
    /// Work completions dispatched.
    pub completions: u64,
    /// CM events dispatched.
    pub cm_events: u64,
    /// Inbox messages dispatched.
    pub messages: u64,
}

struct Shared {
    counters: Counters,
    sleeping: AtomicBool,
    stop: AtomicBool,
    eventfd: RawFd,
}

impl Shared {
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd; EAGAIN (counter saturated) is harmless.
        unsafe { libc::write(self.eventfd, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the eventfd is owned by this struct and closed once.
        unsafe { libc::close(self.eventfd) };
    }
}

/// A cloneable handle for other threads: send messages, read counters, stop.
pub struct EngineHandle<M> {
    tx: Sender<M>,
    shared: Arc<Shared>,
}

impl<M> Clone for EngineHandle<M> {
    fn clone(&self) -> Self {
        EngineHandle {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M: Send> EngineHandle<M> {
    /// Queues `msg` for the engine and wakes it if it sleeps. Fails (returning the
    /// message) only when the engine is gone.
    pub fn send(&self, msg: M) -> std::result::Result<(), M> {
        self.tx.send(msg).map_err(|e| e.0)?;
        // Pairs with the fence in Engine::sleep: either the engine sees the message when it
        // re-checks the inbox, or we see `sleeping` and ring.
        fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::Relaxed) {
            self.shared.ring();
        }
        Ok(())
    }

    /// Asks the engine loop to return.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ring();
    }

    /// The counters.
    pub fn counters(&self) -> EngineCounters {
        snapshot(&self.shared.counters)
    }
}

fn snapshot(c: &Counters) -> EngineCounters {
    EngineCounters {
        polls: c.polls.load(Ordering::Relaxed),
        idle_polls: c.idle_polls.load(Ordering::Relaxed),
        sleeps: c.sleeps.load(Ordering::Relaxed),
        wakeups: c.wakeups.load(Ordering::Relaxed),
        completions: c.completions.load(Ordering::Relaxed),
        cm_events: c.cm_events.load(Ordering::Relaxed),
        messages: c.messages.load(Ordering::Relaxed),
    }
}

/// The polled engine; generic over its handler's message type.
pub struct Engine<M> {
    sources: Vec<Arc<dyn CompletionSource>>,
    /// For each distinct wake fd: the source that drains it.
    wake: Vec<(RawFd, usize)>,
    cm: Vec<EventChannel>,
    rx: Receiver<M>,
    handle: EngineHandle<M>,
    epoll: RawFd,
    config: EngineConfig,
    wcs: [WorkCompletion; POLL_BATCH],
}

const EVENTFD_TOKEN: u64 = u64::MAX;
const CM_TOKEN_BASE: u64 = 1 << 32;
const EXTRA_TOKEN_BASE: u64 = 2 << 32;

impl<M: Send> Engine<M> {
    /// An engine with no sources yet.
    pub fn new(config: EngineConfig) -> Result<Engine<M>> {
        // SAFETY: plain syscalls; results checked.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(last_os_error("epoll_create1"));
        }
        // SAFETY: as above.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            let e = last_os_error("eventfd");
            // SAFETY: closing the epoll fd created above.
            unsafe { libc::close(epoll) };
            return Err(e);
        }
        let (tx, rx) = crossbeam::channel::unbounded();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            eventfd: efd,
        });
        let engine = Engine {
            sources: Vec::new(),
            wake: Vec::new(),
            cm: Vec::new(),
            rx,
            handle: EngineHandle { tx, shared },
            epoll,
            config,
            wcs: [WorkCompletion::default(); POLL_BATCH],
        };
        engine.epoll_add(efd, EVENTFD_TOKEN)?;
        Ok(engine)
    }

    fn epoll_add(&self, fd: RawFd, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: live epoll fd; `ev` valid for the call.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(last_os_error("epoll_ctl"));
        }
        Ok(())
    }

    /// A handle for other threads.
    pub fn handle(&self) -> EngineHandle<M> {
        self.handle.clone()
    }

    /// Adds a completion source (a CQ); returns its index for [`Handler::on_completion`].
    pub fn add_source(&mut self, src: Arc<dyn CompletionSource>) -> Result<usize> {
        let idx = self.sources.len();
        if let Some(fd) = src.wake_fd() {
            if !self.wake.iter().any(|&(f, _)| f == fd) {
                self.epoll_add(fd, idx as u64)?;
                self.wake.push((fd, idx));
            }
        }
        self.sources.push(src);
        Ok(idx)
    }

    /// Adds a CQ (convenience for [`Engine::add_source`]).
    pub fn add_cq(&mut self, cq: &Arc<CompletionQueue>) -> Result<usize> {
        self.add_source(Arc::clone(cq) as Arc<dyn CompletionSource>)
    }

    /// Adds a CM event channel; returns its index for [`Handler::on_cm_event`].
    pub fn add_cm_channel(&mut self, ch: &EventChannel) -> Result<usize> {
        let idx = self.cm.len();
        self.epoll_add(ch.fd(), CM_TOKEN_BASE + idx as u64)?;
        self.cm.push(ch.clone());
        Ok(idx)
    }

    /// Adds any fd (a control socket, an NVMe interrupt eventfd, ...) whose readability
    /// must wake a sleeping engine. The engine does not read it: [`Handler::poll`] must
    /// consume the readiness, or the engine keeps waking up.
    pub fn add_wake_fd(&mut self, fd: RawFd) -> Result<()> {
        self.epoll_add(fd, EXTRA_TOKEN_BASE + fd as u64)
    }

    /// The counters.
    pub fn counters(&self) -> EngineCounters {
        snapshot(&self.handle.shared.counters)
    }

    /// One pass over every source; returns the amount of work found.
    pub fn poll_once<H: Handler<Msg = M>>(&mut self, handler: &mut H) -> Result<usize> {
        let c = &self.handle.shared.counters;
        let mut work = 0;
        for (i, src) in self.sources.iter().enumerate() {
            for _ in 0..MAX_BATCHES_PER_SOURCE {
                let n = src.poll(&mut self.wcs)?;
                for wc in &self.wcs[..n] {
                    handler.on_completion(i, wc);
                }
                work += n;
                c.completions.fetch_add(n as u64, Ordering::Relaxed);
                if n < POLL_BATCH {
                    break;
                }
            }
        }
        for (i, ch) in self.cm.iter().enumerate() {
            while let Some(ev) = ch.try_event()? {
                handler.on_cm_event(i, ev);
                work += 1;
                c.cm_events.fetch_add(1, Ordering::Relaxed);
            }
        }
        for _ in 0..self.config.message_batch {
            match self.rx.try_recv() {
                Ok(m) => {
                    handler.on_message(m);
                    work += 1;
                    c.messages.fetch_add(1, Ordering::Relaxed);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        work += handler.poll();
        c.polls.fetch_add(1, Ordering::Relaxed);
        if work == 0 {
            c.idle_polls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(work)
    }

    /// Arms everything, re-polls, and sleeps if still idle. Returns work found by the
    /// re-poll (then no sleep happened).
    fn sleep<H: Handler<Msg = M>>(&mut self, handler: &mut H) -> Result<usize> {
        if self.sources.iter().any(|s| s.wake_fd().is_none()) {
            return Ok(0);
        }
        let shared = Arc::clone(&self.handle.shared);
        shared.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        for s in &self.sources {
            s.arm()?;
        }
        let work = self.poll_once(handler)?;
        if work > 0
            || !self.rx.is_empty()
            || !handler.can_sleep()
            || shared.stop.load(Ordering::SeqCst)
        {
            shared.sleeping.store(false, Ordering::Relaxed);
            return Ok(work);
        }
        shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        let ms = self.config.max_sleep.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: live epoll fd; `events` has room for 16 entries.
        let n = unsafe { libc::epoll_wait(self.epoll, events.as_mut_ptr(), 16, ms) };
        shared.sleeping.store(false, Ordering::Relaxed);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(0);
            }
            return Err(Error::Os {
                op: "epoll_wait",
                source: e,
            });
        }
        if n > 0 {
            shared.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == EVENTFD_TOKEN {
                let mut v: u64 = 0;
                // SAFETY: reading 8 bytes from our non-blocking eventfd into `v`.
                unsafe { libc::read(shared.eventfd, (&mut v as *mut u64).cast(), 8) };
            } else if token < CM_TOKEN_BASE {
                self.sources[token as usize].drain_wakeups()?;
            }
            // CM fds: events are read by the next poll_once; extra fds by Handler::poll.
        }
        Ok(0)
    }

    /// Runs until [`EngineHandle::stop`]: busy-polls while there is work, sleeps after
    /// `idle_spell` of idleness.
    pub fn run<H: Handler<Msg = M>>(&mut self, handler: &mut H) -> Result<()> {
        if let Some(cpu) = self.config.cpu {
            pin_to_cpu(cpu)?;
        }
        let mut idle_since: Option<Instant> = None;
        while !self.handle.shared.stop.load(Ordering::Relaxed) {
            let work = self.poll_once(handler)?;
            if work > 0 {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.config.idle_spell && handler.can_sleep() {
                if self.sleep(handler)? > 0 {
                    idle_since = None;
                } else {
                    idle_since = Some(Instant::now());
                }
            } else if self.config.yield_when_idle {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }
}

impl<M> Drop for Engine<M> {
    fn drop(&mut self) {
        // SAFETY: the epoll fd is owned by this engine and closed once.
        unsafe { libc::close(self.epoll) };
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size; the
    // syscall reads the set.
    let ret = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if ret != 0 {
        return Err(last_os_error("sched_setaffinity"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A CQ stand-in: completions pushed by the test, an eventfd rung when armed.
    struct FakeCq {
        queue: Mutex<VecDeque<u64>>,
        armed: AtomicBool,
        efd: RawFd,
    }

    impl FakeCq {
        fn new() -> Arc<FakeCq> {
            // SAFETY: plain syscall; checked.
            let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
            assert!(efd >= 0);
            Arc::new(FakeCq {
                queue: Mutex::new(VecDeque::new()),
                armed: AtomicBool::new(false),
                efd,
            })
        }
        fn complete(&self, wr_id: u64) {
            self.queue.lock().unwrap().push_back(wr_id);
            if self.armed.swap(false, Ordering::SeqCst) {
                let one = 1u64;
                // SAFETY: 8-byte write to our eventfd.
                unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
            }
        }
    }

    impl Drop for FakeCq {
        fn drop(&mut self) {
            // SAFETY: closing our own fd once.
            unsafe { libc::close(self.efd) };
        }
    }

    impl CompletionSource for FakeCq {
        fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
            let mut q = self.queue.lock().unwrap();
            let mut n = 0;
            while n < out.len() {
                let Some(id) = q.pop_front() else { break };
                out[n] = WorkCompletion::default();
                out[n].0.wr_id = id;
                n += 1;
            }
            Ok(n)
        }
        fn arm(&self) -> Result<()> {
            self.armed.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn wake_fd(&self) -> Option<RawFd> {
            Some(self.efd)
        }
        fn drain_wakeups(&self) -> Result<()> {
            let mut v = 0u64;
            // SAFETY: 8-byte read from our non-blocking eventfd.
            unsafe { libc::read(self.efd, (&mut v as *mut u64).cast(), 8) };
            Ok(())
        }
    }

    #[derive(Default)]
    struct Collect {
        seen: Vec<(usize, u64)>,
        msgs: Vec<u32>,
    }

    impl Handler for Collect {
        type Msg = u32;
        fn on_completion(&mut self, source: usize, wc: &WorkCompletion) {
            self.seen.push((source, wc.wr_id()));
        }
        fn on_message(&mut self, msg: u32) {
            self.msgs.push(msg);
        }
    }

    #[test]
    fn poll_once_dispatches_in_order_across_sources() {
        let a = FakeCq::new();
        let b = FakeCq::new();
        let mut e = Engine::<u32>::new(EngineConfig::default()).unwrap();
        assert_eq!(e.add_source(a.clone()).unwrap(), 0);
        assert_eq!(e.add_source(b.clone()).unwrap(), 1);
        for i in 0..40 {
            a.complete(i);
        }
        b.complete(100);
        let mut h = Collect::default();
        assert_eq!(e.poll_once(&mut h).unwrap(), 41);
        let ids: Vec<u64> = h.seen.iter().filter(|s| s.0 == 0).map(|s| s.1).collect();
        assert_eq!(ids, (0..40).collect::<Vec<_>>());
        assert_eq!(h.seen.last(), Some(&(1, 100)));
        assert_eq!(e.poll_once(&mut h).unwrap(), 0);
        let c = e.counters();
        assert_eq!((c.polls, c.idle_polls, c.completions), (2, 1, 41));
    }

    #[test]
    fn busy_source_cannot_starve_the_next() {
        let a = FakeCq::new();
        let b = FakeCq::new();
        let mut e = Engine::<u32>::new(EngineConfig::default()).unwrap();
        e.add_source(a.clone()).unwrap();
        e.add_source(b.clone()).unwrap();
        for i in 0..200 {
            a.complete(i);
        }
        b.complete(1000);
        let mut h = Collect::default();
        let cap = POLL_BATCH * MAX_BATCHES_PER_SOURCE;
        assert_eq!(e.poll_once(&mut h).unwrap(), cap + 1);
        assert_eq!(h.seen.last(), Some(&(1, 1000)));
        assert_eq!(e.poll_once(&mut h).unwrap(), 200 - cap);
    }

    /// Reads a pipe in `poll`, so the engine sleeps until the pipe has data.
    struct PipeReader {
        fd: RawFd,
        got: Vec<u8>,
    }

    impl Handler for PipeReader {
        type Msg = ();
        fn on_completion(&mut self, _source: usize, _wc: &WorkCompletion) {}
        fn poll(&mut self) -> usize {
            let mut b = [0u8; 16];
            // SAFETY: reading into a local buffer from our non-blocking pipe.
            let n = unsafe { libc::read(self.fd, b.as_mut_ptr().cast(), b.len()) };
            if n > 0 {
                self.got.extend_from_slice(&b[..n as usize]);
                n as usize
            } else {
                0
            }
        }
    }

    #[test]
    fn extra_wake_fd_wakes_a_sleeping_engine() {
        let mut fds = [0; 2];
        // SAFETY: valid out-array of two fds.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(ret, 0);
        let mut e = Engine::<()>::new(EngineConfig {
            idle_spell: Duration::from_millis(1),
            max_sleep: Duration::from_secs(5),
            ..Default::default()
        })
        .unwrap();
        e.add_wake_fd(fds[0]).unwrap();
        let h = e.handle();
        let rfd = fds[0];
        let t = std::thread::spawn(move || {
            let mut r = PipeReader {
                fd: rfd,
                got: Vec::new(),
            };
            e.run(&mut r).unwrap();
            r.got
        });
        std::thread::sleep(Duration::from_millis(200));
        let before = h.counters();
        assert!(before.sleeps >= 1, "{before:?}");
        // SAFETY: writing 3 bytes to our pipe.
        let n = unsafe { libc::write(fds[1], b"abc".as_ptr().cast(), 3) };
        assert_eq!(n, 3);
        std::thread::sleep(Duration::from_millis(200));
        let after = h.counters();
        assert!(after.wakeups > before.wakeups, "{before:?} -> {after:?}");
        h.stop();
        assert_eq!(t.join().unwrap(), b"abc");
        // SAFETY: closing our pipe fds once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn idle_engine_sleeps_and_wakes_on_completion_and_message() {
        let cq = FakeCq::new();
        let mut e = Engine::<u32>::new(EngineConfig {
            idle_spell: Duration::from_millis(1),
            max_sleep: Duration::from_secs(5),
            ..Default::default()
        })
        .unwrap();
        e.add_source(cq.clone()).unwrap();
        let h = e.handle();
        let t = std::thread::spawn(move || {
            let mut handler = Collect::default();
            let cpu0 = thread_cpu();
            e.run(&mut handler).unwrap();
            (handler, thread_cpu() - cpu0)
        });
        std::thread::sleep(Duration::from_millis(300));
        let before = h.counters();
        assert!(before.sleeps >= 1, "{before:?}");
        cq.complete(7);
        std::thread::sleep(Duration::from_millis(100));
        h.send(42).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let after = h.counters();
        assert!(after.wakeups >= 2, "{after:?}");
        assert_eq!(after.completions, 1);
        h.stop();
        let (handler, cpu) = t.join().unwrap();
        assert_eq!(handler.seen, vec![(0, 7)]);
        assert_eq!(handler.msgs, vec![42]);
        // ~500 ms of wall time, nearly all asleep.
        assert!(cpu < Duration::from_millis(100), "engine burnt {cpu:?}");
    }
}
