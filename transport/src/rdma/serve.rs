//! `serve`: the target on RDMA, one poll group per configured core.
//!
//! The calling thread owns the transport (RDMA CM) and poll group 0; groups 1.. run on
//! their own threads and receive new connections round-robin over a channel. Every group
//! busy-polls while work flows and, after `idle_spell` without work, arms its CQ and
//! sleeps in poll(2) on the CQ channel (and, for group 0, the CM channel) for at most
//! `max_sleep` — so an idle target costs no CPU. With commands in an NVMe backend whose
//! queues raise interrupts, the sleep also waits on their eventfds (woken by the
//! completion); with polled queues it is a short nap instead.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel::{unbounded, Receiver, Sender};

use super::{RdmaIncoming, RdmaTransport};
use crate::config::TargetConfig;
use crate::error::Result;
use crate::target::{BackendWait, PollGroup, Target};

/// Sleeps of a group while commands are in its NVMe backend channels: a quarter of the
/// time idle so far, within these bounds (a slow device is not polled in a tight loop,
/// a fast one is seen soon).
const BACKEND_NAP_MIN: Duration = Duration::from_micros(50);
const BACKEND_NAP_MAX: Duration = Duration::from_millis(1);

/// Most backend wake fds (NVMe interrupt eventfds) one group sleeps on; with more, it naps.
const MAX_BACKEND_FDS: usize = 8;

/// How often a busy group 0 looks for RDMA CM events.
const CM_POLL_PERIOD: Duration = Duration::from_millis(1);

/// Tuning of the serve loop.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Idle time after which a group arms its CQ and sleeps.
    pub idle_spell: Duration,
    /// The same while the group's only outstanding work is commands in backends that
    /// wake it (NVMe queues with interrupts): shorter, the device takes far longer than
    /// a wake-up, and spinning steals the CPU the device (or its emulation) needs.
    pub device_spell: Duration,
    /// Longest sleep (keep-alive checks and the stop flag run at least this often).
    pub max_sleep: Duration,
    /// How long shutdown waits for queues to drain.
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            idle_spell: Duration::from_micros(200),
            device_spell: Duration::from_micros(20),
            max_sleep: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(2),
        }
    }
}

/// Serves `target` on the configuration's RDMA listeners until `stop` is set, then
/// disconnects every queue, drains, and flushes the namespaces.
pub fn serve(
    target: &Target,
    cfg: &TargetConfig,
    stop: &AtomicBool,
    opts: ServeOptions,
) -> Result<()> {
    serve_with(target, cfg, stop, opts, || {})
}

/// [`serve`], calling `on_ready` once every listener is bound and the poll groups exist —
/// the moment a host can connect (the binary opens its control socket then, so tools
/// that wait for the socket never race the listener).
pub fn serve_with(
    target: &Target,
    cfg: &TargetConfig,
    stop: &AtomicBool,
    opts: ServeOptions,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let addrs: Vec<SocketAddr> = cfg
        .listeners
        .iter()
        .map(|l| SocketAddr::new(l.address, l.port))
        .collect();
    let mut transport = RdmaTransport::listen(&addrs)?;
    let groups = cfg.cores.len().max(1);
    let mut others = Vec::new();
    for _ in 1..groups {
        others.push(target.create_poll_group(&mut transport)?);
    }
    let mut group0 = target.create_poll_group(&mut transport)?;
    on_ready();
    std::thread::scope(|s| {
        let mut senders: Vec<Sender<RdmaIncoming>> = Vec::new();
        for (i, group) in others.into_iter().enumerate() {
            let (tx, rx) = unbounded();
            senders.push(tx);
            let core = cfg.cores.get(i + 1).copied();
            s.spawn(move || run_group(group, Some(rx), stop, core, opts));
        }
        if let Some(&c) = cfg.cores.first() {
            pin(c);
        }
        let mut next = 0usize;
        let mut last_work = Instant::now();
        // CM events cost a syscall to look for: check at most every CM_POLL_PERIOD
        // while busy (a sleeping group also wakes on the CM channel's fd).
        let mut next_cm = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let mut work = 0;
            let now = Instant::now();
            let cm_due = now >= next_cm;
            if cm_due {
                next_cm = now + CM_POLL_PERIOD;
            }
            while let Some(inc) = cm_due
                .then(|| crate::wire::Transport::poll_incoming(&mut transport))
                .flatten()
            {
                work += 1;
                let target_group = next % groups;
                next += 1;
                if target_group == 0 {
                    accept(&mut group0, inc);
                } else if let Err(e) = senders[target_group - 1].send(inc) {
                    accept(&mut group0, e.into_inner());
                }
            }
            work += group0.poll();
            idle(
                &mut group0,
                work,
                &mut last_work,
                &[transport.event_fd()],
                opts,
            );
        }
        drain(&mut group0, opts);
        drop(senders);
    });
    target.flush_all();
    Ok(())
}

fn pin(core: usize) {
    if let Err(e) = rdma::engine::pin_to_cpu(core) {
        tracing::warn!(core, error = %e, "cannot pin poll group");
    }
}

fn accept(group: &mut PollGroup<RdmaTransport>, inc: RdmaIncoming) {
    if let Err(e) = group.accept(inc) {
        tracing::info!(error = %e, "connection refused");
    }
}

fn run_group(
    mut group: PollGroup<RdmaTransport>,
    inbox: Option<Receiver<RdmaIncoming>>,
    stop: &AtomicBool,
    core: Option<usize>,
    opts: ServeOptions,
) {
    if let Some(c) = core {
        pin(c);
    }
    let mut last_work = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut work = 0;
        if let Some(rx) = &inbox {
            while let Ok(inc) = rx.try_recv() {
                accept(&mut group, inc);
                work += 1;
            }
        }
        work += group.poll();
        idle(&mut group, work, &mut last_work, &[], opts);
    }
    drain(&mut group, opts);
}

/// Sleeps when the group has been idle for `idle_spell` (`device_spell` while it waits
/// for backends that wake it).
fn idle(
    group: &mut PollGroup<RdmaTransport>,
    work: usize,
    last_work: &mut Instant,
    extra_fds: &[std::os::fd::RawFd],
    opts: ServeOptions,
) {
    let now = Instant::now();
    if work > 0 {
        *last_work = now;
        return;
    }
    let spell = if group.backends_wake() {
        opts.device_spell
    } else {
        opts.idle_spell
    };
    if now.duration_since(*last_work) < spell {
        return;
    }
    if let Err(e) = group.wire().arm() {
        tracing::warn!(error = %e, "arm CQ");
        return;
    }
    // A completion that arrived between the last poll and the arm raises no event:
    // poll once more before sleeping (the arm/complete race).
    if group.poll() > 0 {
        *last_work = Instant::now();
        return;
    }
    const NO_FD: libc::pollfd = libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [NO_FD; 2 + MAX_BACKEND_FDS];
    fds[0].fd = group.wire().wake_fd();
    let mut n = 1;
    if let Some(&fd) = extra_fds.first() {
        fds[n].fd = fd;
        n += 1;
    }
    let mut backend_fds = [-1; MAX_BACKEND_FDS];
    let sleep = match group.arm_backends(&mut backend_fds) {
        BackendWait::Idle => opts.max_sleep,
        // A completion came in while arming: poll it now.
        BackendWait::Ready => return,
        // Commands in the device, each queue's completion signals its interrupt eventfd:
        // sleep until one does (max_sleep bounds a lost interrupt).
        BackendWait::Sleep(k) => {
            for &fd in &backend_fds[..k] {
                fds[n].fd = fd;
                n += 1;
            }
            opts.max_sleep
        }
        // Commands in a polled backend complete without an event to sleep on: nap briefly
        // so their completions are seen soon, yet leave the CPU to the device.
        BackendWait::Nap => {
            (now.duration_since(*last_work) / 4).clamp(BACKEND_NAP_MIN, BACKEND_NAP_MAX)
        }
    };
    let ts = libc::timespec {
        tv_sec: sleep.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(sleep.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a valid array of `n` pollfd structures and `ts` a valid timespec,
    // both outliving the call; a null signal mask leaves the mask unchanged.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), n as libc::nfds_t, &ts, std::ptr::null()) };
    if r < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "poll");
    }
}

fn drain(group: &mut PollGroup<RdmaTransport>, opts: ServeOptions) {
    group.disconnect_all();
    let deadline = Instant::now() + opts.drain_timeout;
    while group.queue_count() > 0 && Instant::now() < deadline {
        group.poll();
    }
    if group.queue_count() > 0 {
        tracing::warn!(
            queues = group.queue_count(),
            "queues still draining at shutdown"
        );
    }
}
