//! `serve`: the target on RDMA, one poll group per configured core.
//!
//! Every poll group runs on a thread of its own; the calling thread owns the transport
//! and waits for RDMA CM events (connect requests, disconnects) in poll(2) — a poll group
//! never pays a system call to look for them — and hands each connect request to a group
//! round-robin through the group's mailbox (an eventfd wakes a sleeping group). Every
//! group busy-polls while work flows and, after `idle_spell` without work, arms its CQ
//! and sleeps in poll(2) on the CQ channel and its mailbox for at most `max_sleep` — so
//! an idle target costs no CPU. With commands in an NVMe backend whose queues raise
//! interrupts, the sleep also waits on their eventfds (woken by the completion); with
//! polled queues it is a short nap instead.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, unbounded, Receiver, Sender};
use nvme::EventFd;

use super::RdmaTransport;
use crate::config::TargetConfig;
use crate::error::{Error, Result};
use crate::nvmf_target::{BackendWait, PollGroup, Target};

/// Sleeps of a group while commands are in its NVMe backend channels: a quarter of the
/// time idle so far, within these bounds (a slow device is not polled in a tight loop,
/// a fast one is seen soon).
const BACKEND_NAP_MIN: Duration = Duration::from_micros(50);
const BACKEND_NAP_MAX: Duration = Duration::from_millis(1);

/// Most backend wake fds (NVMe interrupt eventfds) one group sleeps on; with more, it naps.
const MAX_BACKEND_FDS: usize = 8;

/// Longest wait of the RDMA CM thread for an event: how late it sees the stop flag (each
/// timeout wake-up costs CPU on an idle target).
const CM_WAIT: Duration = Duration::from_millis(500);

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

/// A listener change for the RDMA CM thread of a running [`serve_with`].
enum ListenerOp {
    Add(SocketAddr, Sender<Result<()>>),
    Remove(SocketAddr, Sender<Result<()>>),
}

/// Where another thread (the control socket's) asks the running serve loop to start or
/// stop listening on an address: the CM thread owns the transport and applies it.
#[derive(Clone)]
pub struct ListenerControl {
    tx: Sender<ListenerOp>,
    wake: Arc<EventFd>,
}

/// The serve loop's side of a [`ListenerControl`].
pub struct ListenerOps {
    rx: Receiver<ListenerOp>,
    wake: Arc<EventFd>,
}

/// How long a listener change waits for the CM thread.
const LISTENER_OP_WAIT: Duration = Duration::from_secs(5);

impl ListenerControl {
    /// A control and the receiving side to pass to [`serve_with`].
    pub fn new() -> Result<(ListenerControl, ListenerOps)> {
        let wake = Arc::new(EventFd::new().map_err(|e| Error::Transport {
            qid: u16::MAX,
            reason: format!("listener control eventfd: {e}"),
        })?);
        let (tx, rx) = unbounded();
        Ok((
            ListenerControl {
                tx,
                wake: wake.clone(),
            },
            ListenerOps { rx, wake },
        ))
    }

    fn ask(&self, op: impl FnOnce(Sender<Result<()>>) -> ListenerOp) -> Result<()> {
        let (reply, rx) = bounded(1);
        let gone = || Error::Transport {
            qid: u16::MAX,
            reason: "the serve loop is not running".into(),
        };
        self.tx.send(op(reply)).map_err(|_| gone())?;
        self.wake.signal();
        rx.recv_timeout(LISTENER_OP_WAIT).map_err(|_| gone())?
    }

    /// Binds and listens on `addr` (an error if it cannot: the address is not local, or
    /// on another RDMA device).
    pub fn add(&self, addr: SocketAddr) -> Result<()> {
        self.ask(|r| ListenerOp::Add(addr, r))
    }

    /// Stops listening on `addr`.
    pub fn remove(&self, addr: SocketAddr) -> Result<()> {
        self.ask(|r| ListenerOp::Remove(addr, r))
    }
}

fn apply_listener_ops(transport: &mut RdmaTransport, ops: &ListenerOps) {
    ops.wake.clear();
    while let Ok(op) = ops.rx.try_recv() {
        match op {
            ListenerOp::Add(addr, reply) => {
                let _ = reply.send(transport.add_listener(addr));
            }
            ListenerOp::Remove(addr, reply) => {
                let r = if transport.remove_listener(addr) {
                    Ok(())
                } else {
                    Err(Error::Transport {
                        qid: u16::MAX,
                        reason: format!("not listening on {addr}"),
                    })
                };
                let _ = reply.send(r);
            }
        }
    }
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
    serve_with_control(target, cfg, stop, opts, on_ready, None)
}

/// [`serve_with`], also taking listener changes from `ops` (see [`ListenerControl`]).
pub fn serve_with_control(
    target: &Target,
    cfg: &TargetConfig,
    stop: &AtomicBool,
    opts: ServeOptions,
    on_ready: impl FnOnce(),
    ops: Option<ListenerOps>,
) -> Result<()> {
    let addrs: Vec<SocketAddr> = cfg
        .listeners
        .iter()
        .map(|l| SocketAddr::new(l.address, l.port))
        .collect();
    let mut transport = RdmaTransport::listen(&addrs)?;
    let mut groups = Vec::new();
    for _ in 0..cfg.cores.len().max(1) {
        groups.push(target.create_poll_group(&mut transport)?);
    }
    let inboxes: Vec<_> = groups.iter().map(|g| g.inbox()).collect();
    on_ready();
    let mut failed = None;
    std::thread::scope(|s| {
        for (i, group) in groups.into_iter().enumerate() {
            let core = cfg.cores.get(i).copied();
            let spawned = std::thread::Builder::new()
                .name(format!("nvmf-group{i}"))
                .spawn_scoped(s, move || run_group(group, stop, core, opts));
            if let Err(e) = spawned {
                failed = Some(crate::error::Error::Transport {
                    qid: u16::MAX,
                    reason: format!("cannot start poll group thread {i}: {e}"),
                });
                // The groups already running drain and end.
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        let mut next = 0usize;
        let mut fds = vec![transport.event_fd()];
        if let Some(o) = &ops {
            fds.push(o.wake.as_raw_fd());
        }
        while !stop.load(Ordering::Relaxed) {
            match nvme::irq::wait_readable(&fds, CM_WAIT) {
                Ok(0) => continue,
                Ok(_) => {
                    if let Some(o) = &ops {
                        apply_listener_ops(&mut transport, o);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "poll on the RDMA CM channel");
                    std::thread::sleep(CM_WAIT);
                    continue;
                }
            }
            while let Some(mut inc) = crate::wire::Transport::poll_incoming(&mut transport) {
                // Round-robin; a group that is gone (its thread ended) passes it on.
                for _ in 0..inboxes.len() {
                    let to = next % inboxes.len();
                    next += 1;
                    match inboxes[to].send(inc) {
                        Ok(()) => break,
                        Err(back) => inc = back,
                    }
                }
            }
        }
    });
    target.flush_all();
    failed.map_or(Ok(()), Err)
}

fn pin(core: usize) {
    if let Err(e) = rdma::engine::pin_to_cpu(core) {
        tracing::warn!(core, error = %e, "cannot pin poll group");
    }
}

fn run_group(
    mut group: PollGroup<RdmaTransport>,
    stop: &AtomicBool,
    core: Option<usize>,
    opts: ServeOptions,
) {
    if let Some(c) = core {
        pin(c);
    }
    let mut last_work = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let work = group.poll();
        idle(&mut group, work, &mut last_work, opts);
    }
    drain(&mut group, opts);
}

/// Sleeps when the group has been idle for `idle_spell` (`device_spell` while it waits
/// for backends that wake it).
fn idle(
    group: &mut PollGroup<RdmaTransport>,
    work: usize,
    last_work: &mut Instant,
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
    match group.wire().arm() {
        // A completion that arrived between the last poll and the arm raises no event:
        // poll once more before sleeping (the arm/complete race).
        Ok(true) => {
            if group.poll() > 0 {
                *last_work = Instant::now();
                return;
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "arm CQ");
            return;
        }
    }
    if group.has_mail() {
        return;
    }
    const NO_FD: libc::pollfd = libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [NO_FD; 2 + MAX_BACKEND_FDS];
    fds[0].fd = group.wire().wake_fd();
    fds[1].fd = group.mailbox_fd();
    let mut n = 2;
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
        return;
    }
    // Read only the events that are there: a read that finds nothing is a wasted system
    // call (most wake-ups are one fd's).
    if fds[0].revents != 0 {
        if let Err(e) = group.wire().woken() {
            tracing::warn!(error = %e, "CQ events");
        }
    }
    if fds[1].revents != 0 {
        group.mailbox_woken();
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
