//! `serve`: the target on RDMA, one poll group per configured core.
//!
//! Every poll group runs on a thread of its own; the calling thread owns the transport
//! and waits for RDMA CM events (connect requests, disconnects) in poll(2) — a poll group
//! never pays a system call to look for them — and hands each connect request to a group
//! round-robin through the group's mailbox (an eventfd wakes a sleeping group). Each
//! group is a [`Poller`] on its core's [`Reactor`] (`rdma::reactor`, one adaptive loop per
//! core): it busy-polls while work flows and, after `idle_spell` without work, arms its CQ
//! and sleeps in ppoll(2) on the CQ channel and its mailbox for at most `max_sleep` — so
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

use rdma::reactor::{Arm, Poller, Reactor, ReactorConfig, Spell, WakeSet};

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

/// Tuning of the serve loop: the reactor of each poll group's core (spells, sleep cap,
/// drain timeout).
pub type ServeOptions = ReactorConfig;

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
        let wake = Arc::new(EventFd::new().map_err(|source| Error::Io {
            op: "listener control eventfd",
            source,
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
        self.tx.send(op(reply)).map_err(|_| Error::ServeLoopGone)?;
        self.wake.signal();
        rx.recv_timeout(LISTENER_OP_WAIT)
            .map_err(|_| Error::ServeLoopGone)?
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
                    Err(Error::NotListening { addr })
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
    serve_with_control(target, cfg, stop, opts, on_ready, None, Vec::new())
}

/// [`serve_with`], also taking listener changes from `ops` (see [`ListenerControl`]) and
/// hosting `pollers` (e.g. the direct-mode service's) on the first core's reactor beside
/// its poll group.
pub fn serve_with_control(
    target: &Target,
    cfg: &TargetConfig,
    stop: &AtomicBool,
    opts: ServeOptions,
    on_ready: impl FnOnce(),
    ops: Option<ListenerOps>,
    pollers: Vec<Box<dyn Poller>>,
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
    // One reactor per core: its poll group, and on the first the extra pollers.
    let mut reactors = Vec::with_capacity(groups.len());
    let mut extra = Some(pollers);
    for group in groups {
        let mut reactor =
            Reactor::new(opts).map_err(super::rdma_err("create a poll group's reactor"))?;
        reactor.add(Box::new(GroupPoller { group }));
        for p in extra.take().into_iter().flatten() {
            reactor.add(p);
        }
        reactors.push(reactor);
    }
    on_ready();
    let mut failed = None;
    std::thread::scope(|s| {
        for (i, reactor) in reactors.into_iter().enumerate() {
            let core = cfg.cores.get(i).copied();
            let spawned = std::thread::Builder::new()
                .name(format!("nvmf-group{i}"))
                .spawn_scoped(s, move || run_reactor(reactor, stop, core));
            if let Err(e) = spawned {
                failed = Some(crate::error::Error::Io {
                    op: "start a poll group thread",
                    source: e,
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
    if let Err(e) = rdma::reactor::pin_to_cpu(core) {
        tracing::warn!(core, error = %e, "cannot pin poll group");
    }
}

/// Runs one core's reactor (pinned to `core`) until `stop`, then lets its pollers shut
/// down and drain.
fn run_reactor(mut reactor: Reactor, stop: &AtomicBool, core: Option<usize>) {
    if let Some(c) = core {
        pin(c);
    }
    let left = reactor.run(stop);
    if left > 0 {
        tracing::warn!(pollers = left, "queues still draining at shutdown");
    }
}

/// A standard-mode poll group as a reactor poller: its shared CQ, its mailbox, and the
/// NVMe queues of its backends.
struct GroupPoller {
    group: PollGroup<RdmaTransport>,
}

/// Wake-set tags of a [`GroupPoller`].
const TAG_CQ: u32 = 0;
const TAG_MAILBOX: u32 = 1;
const TAG_BACKEND: u32 = 2;

impl Poller for GroupPoller {
    fn poll(&mut self, now: Instant) -> usize {
        self.group.poll_at(now)
    }

    fn spell(&self) -> Spell {
        if self.group.queue_count() == 0 {
            // No host connected: a connect request comes through the mailbox, which wakes.
            Spell::None
        } else if self.group.backends_wake() {
            Spell::Device
        } else {
            Spell::Idle
        }
    }

    fn arm(&mut self, idle: Duration, wake: &mut WakeSet) -> Arm {
        match self.group.wire().arm() {
            // A completion that arrived between the last poll and the arm raises no
            // event: poll once more before sleeping (the arm/complete race).
            Ok(true) => {
                if self.group.poll() > 0 {
                    return Arm::Ready;
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "arm CQ");
                return Arm::Nap(BACKEND_NAP_MAX);
            }
        }
        if self.group.has_mail() {
            return Arm::Ready;
        }
        wake.add(self.group.wire().wake_fd(), TAG_CQ);
        wake.add(self.group.mailbox_fd(), TAG_MAILBOX);
        let mut backend_fds = [-1; MAX_BACKEND_FDS];
        match self.group.arm_backends(&mut backend_fds) {
            BackendWait::Idle => Arm::Sleep,
            // A completion came in while arming: poll it now.
            BackendWait::Ready => Arm::Ready,
            // Commands in the device, each queue's completion signals its interrupt
            // eventfd: sleep until one does (max_sleep bounds a lost interrupt).
            BackendWait::Sleep(k) => {
                for &fd in &backend_fds[..k] {
                    wake.add(fd, TAG_BACKEND);
                }
                Arm::Sleep
            }
            // Commands in a polled backend complete without an event to sleep on: nap
            // briefly so their completions are seen soon, yet leave the CPU to the device.
            BackendWait::Nap => Arm::Nap((idle / 4).clamp(BACKEND_NAP_MIN, BACKEND_NAP_MAX)),
        }
    }

    fn woken(&mut self, tag: u32) {
        match tag {
            TAG_CQ => {
                if let Err(e) = self.group.wire().woken() {
                    tracing::warn!(error = %e, "CQ events");
                }
            }
            TAG_MAILBOX => self.group.mailbox_woken(),
            // Interrupt eventfds are cleared by `arm_backends` before the next sleep.
            _ => {}
        }
    }

    fn shutdown(&mut self) {
        self.group.disconnect_all();
    }

    fn drained(&self) -> bool {
        self.group.queue_count() == 0
    }
}
