//! Target side of direct mode: attach, the direct connection, the forwarding poller.
//!
//! One [`DirectService`] per target process. It owns an RDMA CM listener on the first
//! listen address (ephemeral port, reported in the descriptor), a protection domain of its
//! own — so no standard-mode queue pair can reach a direct MR — one CQ with a completion
//! channel, one poller (run by a core's reactor, [`DirectService::take_poller`]), and a
//! control thread that builds attachments off the target's poll groups.
//!
//! Where things are:
//! - this file: [`DirectService`] — start, [`quiesce`](DirectService::quiesce) /
//!   [`resume`](DirectService::resume), [`set_subsystem`](DirectService::set_subsystem),
//!   [`set_limits`](DirectService::set_limits), the [`DirectAttach`] entry points;
//! - `attach.rs`: building an attachment on the control thread (the allow list is checked
//!   here first, on the caller's thread): the SQ ring, CQ ring and data pool in
//!   VFIO-mapped memory, the NVMe I/O queue pair on them, the MRs, the descriptor; the pin
//!   ledger ([`DirectLimits`]);
//! - `device.rs`: [`DirectDevice`], what an attach needs from the controller, for our
//!   driver's `vfio:` devices and (implemented in the binary) SPDK's `spdk:` ones;
//! - `p2p.rs`: the P2P attempt (`ibv_reg_dmabuf_mr` over the byte-exact doorbell range
//!   of the queue, the SQ in the CMB) and the typed reasons for falling back to forwarded;
//! - `forward.rs`: one forwarded queue's SQ tail / CQ head bookkeeping — bogus tails,
//!   doorbells, the CQEs to push — over the rings, unit-tested against a ring model;
//! - `poller.rs`: the poller — CM events, RDMA completions, control requests, and the
//!   idle policy it gives its reactor;
//! - `report.rs`: what `nvmf-p2p stats` shows ([`QueueReport`], [`ServiceReport`]).
//!
//! The host connects to the direct port with the token of its parked attachment; the
//! poller accepts, posts zero-length receives (for WRITE WITH IMMEDIATE doorbells), and
//! from then on:
//! - a receive with immediate `t` means "SQ tail is now `t`": ring the SQ doorbell;
//! - the mirror page's SQ tail is also checked (hosts that write it by plain RDMA WRITE);
//! - pushed completions: new CQEs (phase tag) are pushed to the host by SEND (16 bytes
//!   inline), then the CQ head doorbell is rung once per batch;
//! - polled completions (the host asked for them in the CM private data): the host reads
//!   the CQ ring itself and the immediate carries the CQ head too (`tail | head << 16`);
//!   the poller rings the CQ head doorbell, then the SQ doorbell, and never reads the CQ.
//!
//! Device reset: [`DirectService::quiesce`] drops every direct queue (the hosts see their
//! connection go and re-attach; attaches are refused with Namespace Not Ready meanwhile),
//! [`DirectService::resume`] lets them back. A controller generation change seen by the
//! poller does the same for the queue concerned.

mod attach;
mod device;
mod forward;
mod p2p;
mod poller;
mod report;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvme::spec::Status;
use rdma::cm::{context_for, EventChannel, Listener};
use rdma::{CompletionChannel, CompletionQueue, ProtectionDomain};

use crossbeam::channel::{unbounded, Sender};

use super::proto::{AttachRequest, STATUS_ACCESS_DENIED};
use super::{AttachReply, DirectAttach};
use crate::error::{Error, Result};
use attach::{AttachJob, Attachment, PinLedger};

pub use device::{CmbSqs, DirectDevice};
pub(crate) use forward::tail_advance;
pub use report::{QueueReport, ServiceReport};

/// What attaches may hold: every attachment pins its SQ and CQ rings, its data pool and a
/// doorbell page (DMA-mapped, registered memory) until it is detached, its connection
/// ends, or — never connected — `pending_ttl` passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectLimits {
    /// Attachments (pending or connected) of one host NQN.
    pub max_queues_per_host: u32,
    /// Pinned bytes of one host NQN's attachments.
    pub max_pinned_per_host: u64,
    /// Pinned bytes of all attachments.
    pub max_pinned_total: u64,
    /// An attachment whose host does not connect within this time is dropped (reaped by
    /// the poller, not only on the next attach).
    pub pending_ttl: Duration,
}

impl Default for DirectLimits {
    /// 16 queues and 512 MiB per host, 2 GiB in all, 20 s to connect.
    fn default() -> Self {
        DirectLimits {
            max_queues_per_host: 16,
            max_pinned_per_host: 512 << 20,
            max_pinned_total: 2 << 30,
            pending_ttl: Duration::from_secs(20),
        }
    }
}

/// Locks `m`, going on after a panic of another holder (the data stays consistent:
/// every change is one assignment).
fn held<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A namespace that direct mode may expose.
#[derive(Clone)]
pub struct DirectNamespace {
    /// The backing controller (shared with the standard-mode backend): ours (`vfio:`)
    /// or SPDK's (`spdk:`).
    pub device: Arc<dyn DirectDevice>,
    /// Namespace id on that controller.
    pub nsid: u32,
}

/// Direct-mode settings of one subsystem.
#[derive(Clone, Default)]
pub struct DirectSubsystem {
    /// Host NQNs allowed to attach (the subsystem's `direct_hosts`).
    pub hosts: Vec<String>,
    /// NVMe-oF nsid → backing namespace (`vfio:` and `spdk:` namespaces).
    pub namespaces: HashMap<u32, DirectNamespace>,
}

/// How the service is set up.
#[derive(Clone)]
pub struct DirectConfig {
    /// Address of the direct CM listener (one of the target's RDMA addresses).
    pub address: IpAddr,
    /// Port (0: any free port; the descriptor carries it).
    pub port: u16,
    /// Queue entries when the host does not ask (clamped to the controller's MQES).
    pub default_depth: u16,
    /// Largest pool a host may ask for.
    pub max_pool: u64,
    /// Subsystem NQN → settings. Subsystems not here refuse every attach.
    pub subsystems: HashMap<String, DirectSubsystem>,
    /// Try P2P (dma-buf MRs) first. Off only for tests of the fallback.
    pub try_p2p: bool,
    /// Create the CQs of pushed-completion queues with an MSI-X interrupt when the
    /// controller has vectors, so the poller sleeps while their commands are in the
    /// device (else it naps and polls).
    pub interrupts: bool,
}

/// Parked attachments, requests for the poller, the report.
struct Control {
    pending: HashMap<u64, Attachment>,
    detach: Vec<u64>,
    /// Queues that closed by themselves (host disconnect, device reset), newest last, so
    /// a host's detach that races its own disconnect still succeeds.
    closed: std::collections::VecDeque<(u64, String)>,
    report: ServiceReport,
}

/// Most closed queues [`Control::closed`] remembers.
const CLOSED_KEPT: usize = 256;

impl Control {
    /// Remembers that queue `token` of `hostnqn` closed.
    fn note_closed(&mut self, token: u64, hostnqn: &str) {
        if self.closed.len() == CLOSED_KEPT {
            self.closed.pop_front();
        }
        self.closed.push_back((token, hostnqn.to_owned()));
    }

    /// A host's detach of queue `token`: an attachment not yet connected is dropped, a
    /// connected queue is handed to the poller to disconnect, one that closed already is
    /// done; another host's queue is refused.
    fn detach(&mut self, hostnqn: &str, token: u64) -> std::result::Result<(), Status> {
        if let Some(a) = self.pending.get(&token) {
            if a.report.hostnqn != hostnqn {
                return Err(STATUS_ACCESS_DENIED);
            }
            self.pending.remove(&token);
            return Ok(());
        }
        match self.report.queues.iter().find(|q| q.token == token) {
            Some(q) if q.hostnqn == hostnqn => {
                self.detach.push(token);
                Ok(())
            }
            Some(_) => Err(STATUS_ACCESS_DENIED),
            None => match self.closed.iter().position(|(t, _)| *t == token) {
                // Closed already (the host's disconnect beat its detach): done.
                Some(i) if self.closed[i].1 == hostnqn => {
                    self.closed.remove(i);
                    Ok(())
                }
                Some(_) => Err(STATUS_ACCESS_DENIED),
                None => Err(Status::INVALID_FIELD),
            },
        }
    }
}

/// What the service, the attach path and the poller share.
struct Inner {
    cfg: DirectConfig,
    /// `cfg.subsystems` as it is now: [`DirectService::set_subsystem`] changes it.
    subsystems: std::sync::RwLock<HashMap<String, DirectSubsystem>>,
    pd: Arc<ProtectionDomain>,
    port: u16,
    control: Mutex<Control>,
    limits: Mutex<DirectLimits>,
    pins: Arc<Mutex<PinLedger>>,
    /// Bogus SQ tails ignored (see `forward::tail_advance`).
    bogus_tails: AtomicU64,
    stop: AtomicBool,
    paused: AtomicBool,
    quiesce_req: AtomicU64,
    quiesce_ack: AtomicU64,
}

fn rdma_err(op: &'static str) -> impl FnOnce(rdma::Error) -> Error {
    move |source| Error::Rdma { op, source }
}

/// The direct-mode service of a target.
pub struct DirectService {
    inner: Arc<Inner>,
    /// The poller until [`DirectService::take_poller`] hands it to a reactor.
    parked: Mutex<Option<poller::Poller>>,
    /// Attaches for the control thread (dropped first on shutdown: the thread ends).
    jobs: Option<Sender<AttachJob>>,
    control: Option<JoinHandle<()>>,
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Transport {
            qid: u16::MAX,
            reason: format!("cannot start the {name} thread: {e}"),
        })
}

impl DirectService {
    /// Listens for direct connections; the poller runs once a reactor hosts it
    /// ([`DirectService::take_poller`]).
    pub fn start(cfg: DirectConfig) -> Result<Arc<DirectService>> {
        let ctx = context_for(cfg.address).map_err(rdma_err("device for direct address"))?;
        let pd = ProtectionDomain::new(&ctx).map_err(rdma_err("alloc PD"))?;
        let chan = CompletionChannel::new(&ctx).map_err(rdma_err("completion channel"))?;
        let cq = CompletionQueue::new(&ctx, 8192, Some(&chan)).map_err(rdma_err("create CQ"))?;
        let events = EventChannel::new().map_err(rdma_err("CM event channel"))?;
        let listener = Listener::bind(&events, SocketAddr::new(cfg.address, cfg.port), 64)
            .map_err(rdma_err("listen (direct)"))?;
        let port = listener.local_addr().port();
        tracing::info!(address = %cfg.address, port, "direct mode: listening");
        let inner = Arc::new(Inner {
            subsystems: std::sync::RwLock::new(cfg.subsystems.clone()),
            cfg,
            pd,
            port,
            control: Mutex::new(Control {
                pending: HashMap::new(),
                detach: Vec::new(),
                closed: std::collections::VecDeque::new(),
                report: ServiceReport {
                    port,
                    ..Default::default()
                },
            }),
            limits: Mutex::new(DirectLimits::default()),
            pins: Arc::new(Mutex::new(PinLedger::default())),
            bogus_tails: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            quiesce_req: AtomicU64::new(0),
            quiesce_ack: AtomicU64::new(0),
        });
        let (jobs, rx) = unbounded();
        let control = {
            let inner = inner.clone();
            spawn("direct-control", move || attach::control_thread(inner, rx))?
        };
        let poller = poller::Poller::new(inner.clone(), cq, chan, events, listener);
        Ok(Arc::new(DirectService {
            inner,
            parked: Mutex::new(Some(poller)),
            jobs: Some(jobs),
            control: Some(control),
        }))
    }

    /// The poller that forwards doorbells and pushes completions, to run on a core's
    /// reactor (`serve` hosts it on the first core's, beside that core's poll group);
    /// `None` once taken. Nothing connects to the direct port until it runs.
    pub fn take_poller(&self) -> Option<Box<dyn rdma::Poller>> {
        held(&self.parked)
            .take()
            .map(|p| Box::new(p) as Box<dyn rdma::Poller>)
    }

    /// The direct CM port.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// Counters and attached queues.
    pub fn report(&self) -> ServiceReport {
        held(&self.inner.control).report.clone()
    }

    /// Drops every direct queue and refuses attaches until [`resume`](Self::resume);
    /// returns once the poller no longer touches the controller (or after `timeout`).
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.inner.paused.store(true, Ordering::SeqCst);
        let want = self.inner.quiesce_req.fetch_add(1, Ordering::SeqCst) + 1;
        let start = Instant::now();
        while self.inner.quiesce_ack.load(Ordering::SeqCst) < want {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        held(&self.inner.control).pending.clear();
        true
    }

    /// Lets hosts attach again after a [`quiesce`](Self::quiesce).
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
    }

    /// Replaces the direct-mode settings of subsystem `subnqn` (`None`: direct mode off
    /// for it), as `nvmf-p2p ctl add-host --direct` / `remove-host --direct` and a
    /// reload do. Queues of hosts no longer allowed are detached (their hosts see the
    /// connection close); returns how many.
    pub fn set_subsystem(&self, subnqn: &str, sub: Option<DirectSubsystem>) -> usize {
        let hosts = sub.as_ref().map(|s| s.hosts.clone()).unwrap_or_default();
        {
            let mut map = self
                .inner
                .subsystems
                .write()
                .unwrap_or_else(|p| p.into_inner());
            match sub {
                Some(s) => map.insert(subnqn.to_owned(), s),
                None => map.remove(subnqn),
            };
        }
        let mut c = held(&self.inner.control);
        c.pending
            .retain(|_, a| a.report.subnqn != subnqn || hosts.contains(&a.report.hostnqn));
        let revoked: Vec<u64> = c
            .report
            .queues
            .iter()
            .filter(|q| q.subnqn == subnqn && !hosts.contains(&q.hostnqn))
            .map(|q| q.token)
            .collect();
        for t in &revoked {
            if !c.detach.contains(t) {
                c.detach.push(*t);
            }
        }
        if !revoked.is_empty() {
            tracing::info!(
                subnqn,
                queues = revoked.len(),
                "direct queues of removed hosts detached"
            );
        }
        revoked.len()
    }

    /// Replaces the bounds on attaches (default [`DirectLimits::default`]); attachments
    /// already made stay.
    pub fn set_limits(&self, limits: DirectLimits) {
        *held(&self.inner.limits) = limits;
    }

    fn detach_token(&self, hostnqn: &str, token: u64) -> std::result::Result<(), Status> {
        held(&self.inner.control).detach(hostnqn, token)
    }
}

impl Drop for DirectService {
    fn drop(&mut self) {
        // The poller (on a reactor) sees it, closes its connections and is dropped.
        self.inner.stop.store(true, Ordering::SeqCst);
        drop(self.jobs.take());
        if let Some(t) = self.control.take() {
            let _ = t.join();
        }
    }
}

impl DirectAttach for DirectService {
    /// Checks the allow list, the quiesce and the namespace here (no device access) and
    /// hands the build to the control thread.
    fn attach(
        &self,
        subnqn: &str,
        hostnqn: &str,
        nsid: u32,
        req: AttachRequest,
        reply: AttachReply,
    ) {
        let inner = &self.inner;
        let sub = inner
            .subsystems
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(subnqn)
            .cloned();
        let Some(sub) = sub else {
            tracing::info!(
                subnqn,
                hostnqn,
                "direct attach refused: direct mode is off for this subsystem"
            );
            held(&inner.control).report.refused += 1;
            reply.send(Err(STATUS_ACCESS_DENIED));
            return;
        };
        if !sub.hosts.iter().any(|h| h == hostnqn) {
            tracing::info!(
                subnqn,
                hostnqn,
                "direct attach refused: host not on direct_hosts"
            );
            held(&inner.control).report.refused += 1;
            reply.send(Err(STATUS_ACCESS_DENIED));
            return;
        }
        if inner.paused.load(Ordering::SeqCst) {
            reply.send(Err(Status::NAMESPACE_NOT_READY));
            return;
        }
        let Some(ns) = sub.namespaces.get(&nsid).cloned() else {
            reply.send(Err(Status::INVALID_NAMESPACE));
            return;
        };
        let job = AttachJob {
            subnqn: subnqn.to_owned(),
            hostnqn: hostnqn.to_owned(),
            ns,
            req,
            reply,
        };
        if let Some(Err(e)) = self.jobs.as_ref().map(|j| j.send(job)) {
            // The control thread is gone (the service is stopping).
            e.into_inner().reply.send(Err(Status::INTERNAL_ERROR));
        }
    }

    fn detach(&self, hostnqn: &str, token: u64) -> std::result::Result<(), Status> {
        self.detach_token(hostnqn, token)
    }
}

#[cfg(test)]
mod control_tests {
    use super::*;

    fn control() -> Control {
        Control {
            pending: HashMap::new(),
            detach: Vec::new(),
            closed: std::collections::VecDeque::new(),
            report: ServiceReport::default(),
        }
    }

    #[test]
    fn a_detach_after_the_queue_closed_succeeds_once_for_its_host_only() {
        let mut c = control();
        c.note_closed(7, "nqn.a");
        assert_eq!(c.detach("nqn.b", 7), Err(STATUS_ACCESS_DENIED));
        assert_eq!(c.detach("nqn.a", 7), Ok(()));
        assert_eq!(c.detach("nqn.a", 7), Err(Status::INVALID_FIELD));
        assert_eq!(c.detach("nqn.a", 8), Err(Status::INVALID_FIELD));
    }

    #[test]
    fn closed_queues_are_remembered_up_to_a_bound() {
        let mut c = control();
        for t in 0..(CLOSED_KEPT as u64 + 10) {
            c.note_closed(t, "nqn.a");
        }
        assert_eq!(c.closed.len(), CLOSED_KEPT);
        assert_eq!(c.detach("nqn.a", 0), Err(Status::INVALID_FIELD));
        assert_eq!(c.detach("nqn.a", CLOSED_KEPT as u64 + 9), Ok(()));
    }
}
