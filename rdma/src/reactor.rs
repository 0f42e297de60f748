//! The reactor: one adaptive loop per core that hosts every poller of that core.
//!
//! A [`Poller`] is anything with work to look for without blocking — a poll group of the
//! NVMe-oF target (its shared CQ, its queues, the NVMe completions of its backends), the
//! direct-mode forwarder, an initiator's queue. The reactor calls each one's
//! [`Poller::poll`] in turn. While work flows it keeps polling (yielding the CPU between
//! empty passes, because soft-RoCE does its packet processing in kernel workers on the
//! same CPUs). Once no poller has found work for a *spell* it asks each one to
//! [`Poller::arm`] its wake sources — `ibv_req_notify_cq`, clearing an NVMe interrupt
//! eventfd — and to list their fds, then sleeps in one `ppoll(2)` over all of them, its
//! own mailbox eventfd included, for at most `max_sleep` (or a poller's shorter nap).
//! An idle core therefore costs no CPU; a busy one pays no system call to look for work.
//!
//! The spell is the longest any poller asks for ([`Poller::spell`]): `idle_spell` while
//! hosts are expected to send more soon, the shorter `device_spell` while the only
//! outstanding work is in a device that will wake its poller (the device takes far longer
//! than a wake-up, and spinning would steal the CPU the device or its emulation needs),
//! none when every poller is woken by whatever comes next.
//!
//! Other threads reach a reactor only through its [`ReactorHandle`]: [`ReactorHandle::run`]
//! queues a closure that runs on the reactor thread between passes (how pollers are added,
//! and how control requests get an answer without a lock on the data path, as SPDK's
//! `spdk_thread_send_msg` does); the eventfd is rung only when the reactor sleeps.
//!
//! Nothing here allocates per pass: the wake set is reused, tasks are boxed by the sender.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};

use crate::error::{last_os_error, Result};

/// How long a poller wants the reactor to keep spinning after the last work. A reactor
/// spins for the longest spell any of its pollers asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Spell {
    /// Nothing to spin for: whatever comes next wakes the poller (an idle poller with no
    /// connections, queues whose next work is a doorbell receive).
    None,
    /// Commands are in a device that wakes the poller when they complete: the short
    /// `device_spell`.
    Device,
    /// Work that arrives from the network soon after the last (hosts resubmit right after
    /// a completion): `idle_spell`.
    Idle,
}

/// A poller's answer to [`Poller::arm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// Armed; the fds it added to the [`WakeSet`] (possibly none) wake it.
    Sleep,
    /// Work turned up while arming (the arm/complete race): poll again instead.
    Ready,
    /// It has outstanding work that raises no event (a polled NVMe queue): sleep at most
    /// this long.
    Nap(Duration),
}

/// The fds of one sleep and which poller each one belongs to.
#[derive(Default)]
pub struct WakeSet {
    fds: Vec<libc::pollfd>,
    owners: Vec<(usize, u32)>,
    current: usize,
}

impl WakeSet {
    /// Sleep on `fd` becoming readable; `tag` comes back in [`Poller::woken`].
    pub fn add(&mut self, fd: RawFd, tag: u32) {
        self.fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        self.owners.push((self.current, tag));
    }

    fn clear(&mut self) {
        self.fds.clear();
        self.owners.clear();
    }

    /// The number of fds in the set.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True when no fd is in the set.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// One source of work on a reactor.
pub trait Poller: Send {
    /// Does the work that is ready, without blocking; returns how much it found (0: none).
    /// `now` is the time of this pass (one clock read for all pollers).
    fn poll(&mut self, now: Instant) -> usize;

    /// Which spell applies while this poller finds nothing.
    fn spell(&self) -> Spell {
        Spell::Idle
    }

    /// The reactor is about to sleep (`idle` since the last work anywhere): arm every wake
    /// source, look once more for work that raced the arm, and add the fds to sleep on.
    fn arm(&mut self, idle: Duration, wake: &mut WakeSet) -> Arm;

    /// An fd this poller added with `tag` became readable during the sleep: consume its
    /// readiness (ack CQ events, read an eventfd). The next [`Poller::poll`] does the work.
    fn woken(&mut self, tag: u32) {
        let _ = tag;
    }

    /// True once the poller has nothing left to do and can be dropped.
    fn finished(&self) -> bool {
        false
    }

    /// The reactor is stopping: begin an orderly end (disconnect queues, fail what waits).
    fn shutdown(&mut self) {}

    /// After [`Poller::shutdown`]: true once nothing is left in flight.
    fn drained(&self) -> bool {
        true
    }
}

/// Reactor tuning. The defaults were measured on the 2-vCPU TCG testbed (docs/architecture.md,
/// "The reactor").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReactorConfig {
    /// Idle time after which the reactor arms its pollers and sleeps.
    pub idle_spell: Duration,
    /// The same while every busy poller waits only on devices that wake it.
    pub device_spell: Duration,
    /// Longest sleep: timers (keep-alive), stop requests and stats run at least this often.
    pub max_sleep: Duration,
    /// `sched_yield` after an empty pass before the spell ends, instead of a pure spin.
    /// Soft-RoCE processes packets in kernel workers on the same CPUs; a spin delays them
    /// to the next scheduler tick (rdma_bench 8 B ping-pong in the testbed: ~90 µs half
    /// round trip when yielding, ~4 ms when spinning).
    pub yield_when_idle: bool,
    /// How long [`Reactor::run`] waits for pollers to drain after a stop.
    pub drain_timeout: Duration,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            idle_spell: Duration::from_micros(200),
            device_spell: Duration::from_micros(20),
            max_sleep: Duration::from_millis(100),
            yield_when_idle: true,
            drain_timeout: Duration::from_secs(2),
        }
    }
}

/// A closure run on the reactor thread between passes.
pub type Task = Box<dyn FnOnce(&mut Reactor) + Send>;

#[derive(Default)]
struct Counters {
    passes: AtomicU64,
    idle_passes: AtomicU64,
    sleeps: AtomicU64,
    wakeups: AtomicU64,
    naps: AtomicU64,
    tasks: AtomicU64,
}

/// A snapshot of a reactor's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorCounters {
    /// Passes over the pollers.
    pub passes: u64,
    /// Passes that found nothing.
    pub idle_passes: u64,
    /// Sleeps in ppoll(2).
    pub sleeps: u64,
    /// Sleeps ended by an fd (not by the timeout).
    pub wakeups: u64,
    /// Sleeps bounded by a poller's nap.
    pub naps: u64,
    /// Tasks run.
    pub tasks: u64,
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
        // SAFETY: writes 8 bytes from a live u64 to the eventfd this struct owns; EAGAIN
        // (counter saturated) still leaves it readable, which is all a ring needs.
        unsafe { libc::write(self.eventfd, (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from the non-blocking eventfd this struct
        // owns.
        unsafe { libc::read(self.eventfd, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the eventfd is owned by this struct and closed once.
        unsafe { libc::close(self.eventfd) };
    }
}

/// How other threads reach a reactor: run a closure on it, add a poller, stop it, read
/// its counters. Cloneable.
#[derive(Clone)]
pub struct ReactorHandle {
    tx: Sender<Task>,
    shared: Arc<Shared>,
}

impl ReactorHandle {
    /// Runs `task` on the reactor thread before its next pass (waking it if it sleeps).
    /// Fails, giving the task back, only when the reactor is gone.
    pub fn run(&self, task: Task) -> std::result::Result<(), Task> {
        self.tx.send(task).map_err(|e| e.0)?;
        // Pairs with the fence in Reactor::sleep: either the reactor sees the task when it
        // looks at the mailbox after publishing `sleeping`, or this thread sees `sleeping`.
        fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::Relaxed) {
            self.shared.ring();
        }
        Ok(())
    }

    /// Adds `poller` to the reactor. Fails only when the reactor is gone (the poller is
    /// dropped then).
    pub fn add(&self, poller: Box<dyn Poller>) -> std::result::Result<(), ReactorGone> {
        self.run(Box::new(move |r: &mut Reactor| r.add(poller)))
            .map_err(|_| ReactorGone)
    }

    /// Asks the reactor to stop: its pollers shut down and drain, then [`Reactor::run`]
    /// returns.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ring();
    }

    /// The counters.
    pub fn counters(&self) -> ReactorCounters {
        snapshot(&self.shared.counters)
    }
}

/// The reactor a handle points at has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the reactor has ended")]
pub struct ReactorGone;

fn snapshot(c: &Counters) -> ReactorCounters {
    ReactorCounters {
        passes: c.passes.load(Ordering::Relaxed),
        idle_passes: c.idle_passes.load(Ordering::Relaxed),
        sleeps: c.sleeps.load(Ordering::Relaxed),
        wakeups: c.wakeups.load(Ordering::Relaxed),
        naps: c.naps.load(Ordering::Relaxed),
        tasks: c.tasks.load(Ordering::Relaxed),
    }
}

/// Tag of the reactor's own mailbox eventfd in its wake set.
const MAILBOX: usize = usize::MAX;

/// One core's loop. Create it on any thread, move it to its thread, [`Reactor::run`] it.
pub struct Reactor {
    pollers: Vec<Box<dyn Poller>>,
    rx: Receiver<Task>,
    handle: ReactorHandle,
    config: ReactorConfig,
    wake: WakeSet,
    last_work: Instant,
}

impl Reactor {
    /// A reactor with no pollers yet.
    pub fn new(config: ReactorConfig) -> Result<Reactor> {
        // SAFETY: plain syscall, result checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(last_os_error("eventfd"));
        }
        let (tx, rx) = crossbeam::channel::unbounded();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            eventfd: efd,
        });
        Ok(Reactor {
            pollers: Vec::new(),
            rx,
            handle: ReactorHandle { tx, shared },
            config,
            wake: WakeSet::default(),
            last_work: Instant::now(),
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// Adds a poller (on the reactor's own thread, or before it runs).
    pub fn add(&mut self, poller: Box<dyn Poller>) {
        self.pollers.push(poller);
    }

    /// Pollers hosted now.
    pub fn pollers(&self) -> usize {
        self.pollers.len()
    }

    /// The tuning.
    pub fn config(&self) -> ReactorConfig {
        self.config
    }

    /// The counters.
    pub fn counters(&self) -> ReactorCounters {
        snapshot(&self.handle.shared.counters)
    }

    fn tasks(&mut self) -> usize {
        let mut n = 0;
        while let Ok(task) = self.rx.try_recv() {
            task(self);
            n += 1;
        }
        if n > 0 {
            self.handle
                .shared
                .counters
                .tasks
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }

    /// One pass: the mailbox, then every poller once. Returns the work found.
    pub fn pass(&mut self) -> usize {
        let mut work = if self.rx.is_empty() { 0 } else { self.tasks() };
        let now = Instant::now();
        for p in &mut self.pollers {
            work += p.poll(now);
        }
        if self.pollers.iter().any(|p| p.finished()) {
            self.pollers.retain(|p| !p.finished());
        }
        let c = &self.handle.shared.counters;
        c.passes.fetch_add(1, Ordering::Relaxed);
        if work > 0 {
            self.last_work = now;
        } else {
            c.idle_passes.fetch_add(1, Ordering::Relaxed);
        }
        work
    }

    /// After an empty pass: spin on (yielding), or — once the spell is over — arm every
    /// poller and sleep.
    pub fn idle(&mut self) {
        let idle = self.last_work.elapsed();
        let spell = match self.pollers.iter().map(|p| p.spell()).max() {
            Some(Spell::Idle) => self.config.idle_spell,
            Some(Spell::Device) => self.config.device_spell,
            Some(Spell::None) | None => Duration::ZERO,
        };
        if idle < spell {
            if self.config.yield_when_idle {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            return;
        }
        self.sleep(idle);
    }

    fn sleep(&mut self, idle: Duration) {
        let shared = Arc::clone(&self.handle.shared);
        shared.sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in ReactorHandle::run (see there).
        fence(Ordering::SeqCst);
        self.wake.clear();
        self.wake.current = MAILBOX;
        self.wake.add(shared.eventfd, 0);
        let mut timeout = self.config.max_sleep;
        let mut ready = false;
        let mut napping = false;
        for (i, p) in self.pollers.iter_mut().enumerate() {
            self.wake.current = i;
            match p.arm(idle, &mut self.wake) {
                Arm::Sleep => {}
                Arm::Ready => {
                    ready = true;
                    break;
                }
                Arm::Nap(d) => {
                    napping = true;
                    timeout = timeout.min(d);
                }
            }
        }
        if ready || !self.rx.is_empty() || shared.stop.load(Ordering::SeqCst) {
            shared.sleeping.store(false, Ordering::Relaxed);
            if ready {
                self.last_work = Instant::now();
            }
            return;
        }
        shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        if napping {
            shared.counters.naps.fetch_add(1, Ordering::Relaxed);
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `fds` is a valid array of `len` pollfd structures and `ts` a valid
        // timespec, both outliving the call; a null signal mask leaves the mask unchanged.
        let r = unsafe {
            libc::ppoll(
                self.wake.fds.as_mut_ptr(),
                self.wake.fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        shared.sleeping.store(false, Ordering::Relaxed);
        if r <= 0 {
            return;
        }
        shared.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        // Only the fds that fired are read: a read that finds nothing is a wasted system
        // call, and most wake-ups are one fd's.
        for (fd, &(owner, tag)) in self.wake.fds.iter().zip(&self.wake.owners) {
            if fd.revents == 0 {
                continue;
            }
            if owner == MAILBOX {
                shared.clear();
            } else if let Some(p) = self.pollers.get_mut(owner) {
                p.woken(tag);
            }
        }
    }

    /// Runs until `stop` is set or [`ReactorHandle::stop`] is called; then shuts every
    /// poller down and polls until they drain (at most `drain_timeout`). Returns how many
    /// pollers had not drained.
    pub fn run(&mut self, stop: &AtomicBool) -> usize {
        let own = Arc::clone(&self.handle.shared);
        while !stop.load(Ordering::Relaxed) && !own.stop.load(Ordering::Relaxed) {
            if self.pass() == 0 {
                self.idle();
            }
        }
        self.tasks();
        for p in &mut self.pollers {
            p.shutdown();
        }
        let deadline = Instant::now() + self.config.drain_timeout;
        loop {
            let left = self.pollers.iter().filter(|p| !p.drained()).count();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            if self.pass() == 0 {
                std::thread::yield_now();
            }
        }
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
    use std::sync::atomic::AtomicUsize;

    /// An eventfd the test rings from outside, standing in for a CQ channel or an NVMe
    /// interrupt.
    struct Efd(RawFd);

    impl Efd {
        fn new() -> Arc<Efd> {
            // SAFETY: plain syscall; checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            Arc::new(Efd(fd))
        }
        fn ring(&self) {
            let one = 1u64;
            // SAFETY: 8-byte write from a live u64 to our eventfd.
            unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
        }
        fn clear(&self) {
            let mut v = 0u64;
            // SAFETY: 8-byte read into a live u64 from our non-blocking eventfd.
            unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
        }
    }

    impl Drop for Efd {
        fn drop(&mut self) {
            // SAFETY: our fd, closed once.
            unsafe { libc::close(self.0) };
        }
    }

    /// Work items posted by the test (`pending`), a wake fd, and what the reactor did.
    struct Fake {
        pending: Arc<AtomicUsize>,
        done: Arc<AtomicUsize>,
        polls: Arc<AtomicUsize>,
        woken: Arc<AtomicUsize>,
        efd: Option<Arc<Efd>>,
        nap: Option<Duration>,
        /// Polls left before it drains, after shutdown.
        drain_polls: Option<usize>,
        finish_after: Option<usize>,
    }

    #[derive(Clone, Default)]
    struct Probe {
        pending: Arc<AtomicUsize>,
        done: Arc<AtomicUsize>,
        polls: Arc<AtomicUsize>,
        woken: Arc<AtomicUsize>,
    }

    impl Probe {
        fn fake(&self, efd: Option<Arc<Efd>>) -> Fake {
            Fake {
                pending: self.pending.clone(),
                done: self.done.clone(),
                polls: self.polls.clone(),
                woken: self.woken.clone(),
                efd,
                nap: None,
                drain_polls: None,
                finish_after: None,
            }
        }
    }

    impl Poller for Fake {
        fn poll(&mut self, _now: Instant) -> usize {
            let n = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(left) = &mut self.drain_polls {
                *left = left.saturating_sub(1);
            }
            if let Some(f) = &mut self.finish_after {
                *f = f.saturating_sub(1);
            }
            let _ = n;
            let k = self.pending.swap(0, Ordering::SeqCst);
            self.done.fetch_add(k, Ordering::SeqCst);
            k
        }
        fn arm(&mut self, _idle: Duration, wake: &mut WakeSet) -> Arm {
            if let Some(e) = &self.efd {
                wake.add(e.0, 7);
            }
            if self.pending.load(Ordering::SeqCst) > 0 {
                return Arm::Ready;
            }
            match self.nap {
                Some(d) => Arm::Nap(d),
                None => Arm::Sleep,
            }
        }
        fn woken(&mut self, tag: u32) {
            assert_eq!(tag, 7);
            self.woken.fetch_add(1, Ordering::SeqCst);
            if let Some(e) = &self.efd {
                e.clear();
            }
        }
        fn finished(&self) -> bool {
            self.finish_after == Some(0)
        }
        fn shutdown(&mut self) {
            self.drain_polls.get_or_insert(3);
        }
        fn drained(&self) -> bool {
            self.drain_polls == Some(0)
        }
    }

    fn long_sleep() -> ReactorConfig {
        ReactorConfig {
            idle_spell: Duration::from_micros(100),
            max_sleep: Duration::from_secs(30),
            ..Default::default()
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn sleeps_when_idle_and_an_fd_wakes_it() {
        let probe = Probe::default();
        let efd = Efd::new();
        let mut r = Reactor::new(long_sleep()).unwrap();
        r.add(Box::new(probe.fake(Some(efd.clone()))));
        let h = r.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || r.run(&s2));
        wait_for("never slept", || h.counters().sleeps >= 1);
        let polls = probe.polls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        // Asleep (max_sleep is 30 s): at most the pass that armed.
        assert!(probe.polls.load(Ordering::SeqCst) <= polls + 1);
        // Work arrives and its fd fires: woken long before the 30 s timeout.
        probe.pending.store(5, Ordering::SeqCst);
        efd.ring();
        wait_for("the fd did not wake the reactor", || {
            probe.done.load(Ordering::SeqCst) == 5
        });
        assert_eq!(probe.woken.load(Ordering::SeqCst), 1);
        assert!(h.counters().wakeups >= 1);
        stop.store(true, Ordering::SeqCst);
        h.stop();
        assert_eq!(t.join().unwrap(), 0);
    }

    #[test]
    fn tasks_run_on_the_reactor_and_wake_it() {
        let probe = Probe::default();
        let mut r = Reactor::new(long_sleep()).unwrap();
        r.add(Box::new(probe.fake(None)));
        let h = r.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || r.run(&s2));
        wait_for("never slept", || h.counters().sleeps >= 1);
        let (tx, rx) = crossbeam::channel::bounded(1);
        h.run(Box::new(move |r: &mut Reactor| {
            tx.send((std::thread::current().id(), r.pollers())).unwrap();
        }))
        .map_err(|_| ())
        .unwrap();
        let (tid, pollers) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(tid, std::thread::current().id());
        assert_eq!(pollers, 1);
        // A poller added through the handle is polled.
        let second = Probe::default();
        h.add(Box::new(second.fake(None))).unwrap();
        wait_for("added poller not polled", || {
            second.polls.load(Ordering::SeqCst) > 0
        });
        h.stop();
        assert_eq!(t.join().unwrap(), 0);
        // The reactor is gone: adding fails.
        assert_eq!(
            h.add(Box::new(Probe::default().fake(None))),
            Err(ReactorGone)
        );
    }

    #[test]
    fn a_nap_bounds_the_sleep() {
        let probe = Probe::default();
        let mut r = Reactor::new(long_sleep()).unwrap();
        let mut f = probe.fake(None);
        f.nap = Some(Duration::from_millis(1));
        r.add(Box::new(f));
        let h = r.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || r.run(&s2));
        // With a 30 s max_sleep, only the 1 ms nap lets it poll again.
        wait_for("nap did not end the sleep", || h.counters().naps >= 20);
        assert!(probe.polls.load(Ordering::SeqCst) >= 20);
        stop.store(true, Ordering::SeqCst);
        h.stop();
        t.join().unwrap();
    }

    #[test]
    fn finished_pollers_are_dropped_and_stop_drains_the_rest() {
        let a = Probe::default();
        let b = Probe::default();
        let mut r = Reactor::new(ReactorConfig::default()).unwrap();
        let mut fa = a.fake(None);
        fa.finish_after = Some(3);
        r.add(Box::new(fa));
        r.add(Box::new(b.fake(None)));
        for _ in 0..5 {
            r.pass();
        }
        assert_eq!(r.pollers(), 1);
        assert_eq!(a.polls.load(Ordering::SeqCst), 3);
        let stop = AtomicBool::new(true);
        // Stopped at once: b shuts down and drains in three passes.
        assert_eq!(r.run(&stop), 0);
        assert!(b.polls.load(Ordering::SeqCst) >= 5 + 3);
    }

    #[test]
    fn a_poller_that_never_drains_is_reported() {
        struct Stuck;
        impl Poller for Stuck {
            fn poll(&mut self, _now: Instant) -> usize {
                0
            }
            fn arm(&mut self, _idle: Duration, _wake: &mut WakeSet) -> Arm {
                Arm::Sleep
            }
            fn drained(&self) -> bool {
                false
            }
        }
        let mut r = Reactor::new(ReactorConfig {
            drain_timeout: Duration::from_millis(20),
            ..Default::default()
        })
        .unwrap();
        r.add(Box::new(Stuck));
        assert_eq!(r.run(&AtomicBool::new(true)), 1);
    }

    #[test]
    fn the_longest_spell_of_the_pollers_applies() {
        struct Spelled(Spell);
        impl Poller for Spelled {
            fn poll(&mut self, _now: Instant) -> usize {
                0
            }
            fn spell(&self) -> Spell {
                self.0
            }
            fn arm(&mut self, _idle: Duration, _wake: &mut WakeSet) -> Arm {
                Arm::Nap(Duration::from_micros(1))
            }
        }
        let cfg = ReactorConfig {
            idle_spell: Duration::from_secs(60),
            device_spell: Duration::from_secs(60),
            ..Default::default()
        };
        // Only `None` spells: the first empty pass may sleep.
        let mut r = Reactor::new(cfg).unwrap();
        r.add(Box::new(Spelled(Spell::None)));
        r.pass();
        r.idle();
        assert_eq!(r.counters().sleeps, 1);
        // One poller wanting a (minute-long) spell keeps the reactor spinning.
        r.add(Box::new(Spelled(Spell::Device)));
        r.pass();
        r.idle();
        assert_eq!(r.counters().sleeps, 1);
    }

    #[test]
    fn work_found_while_arming_prevents_the_sleep() {
        let probe = Probe::default();
        let mut r = Reactor::new(long_sleep()).unwrap();
        r.add(Box::new(probe.fake(None)));
        r.pass();
        std::thread::sleep(Duration::from_millis(1));
        probe.pending.store(1, Ordering::SeqCst);
        // The spell is over; arm sees the pending work and returns Ready: no sleep (a
        // sleep here would last 30 s).
        r.idle();
        assert_eq!(r.counters().sleeps, 0);
        assert_eq!(r.pass(), 1);
    }
}
