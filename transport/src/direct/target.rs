//! Target side of direct mode: attach, the direct connection, the forwarding poller.
//!
//! One [`DirectService`] per target process. It owns an RDMA CM listener on the first
//! listen address (ephemeral port, reported in the descriptor), a protection domain of its
//! own — so no standard-mode queue pair can reach a direct MR — one CQ with a completion
//! channel, and one poller thread.
//!
//! Attach (on a poll group thread, through [`DirectAttach::attach`]): check the allow list,
//! allocate the SQ ring, CQ ring and data pool in VFIO-mapped memory, create the NVMe I/O
//! queue pair on them, try P2P doorbells (`ibv_reg_dmabuf_mr` over the byte-exact doorbell
//! range of that queue) and fall back to forwarded, register the rings, the pool and a
//! doorbell mirror page as MRs, park the attachment under a random token.
//!
//! The host then connects to the direct port with the token; the poller accepts, posts
//! zero-length receives (for WRITE WITH IMMEDIATE doorbells), and from then on:
//! - a receive with immediate `t` means "SQ tail is now `t`": ring the SQ doorbell;
//! - the mirror page's SQ tail is also checked (hosts that write it by plain RDMA WRITE);
//! - pushed completions: new CQEs (phase tag) are pushed to the host by SEND (16 bytes
//!   inline), then the CQ head doorbell is rung once per batch;
//! - polled completions (the host asked for them in the CM private data): the host reads
//!   the CQ ring itself and the immediate carries the CQ head too (`tail | head << 16`);
//!   the poller rings the CQ head doorbell, then the SQ doorbell, and never reads the CQ.
//!
//! Adaptive: the poller spins while work flows, yields then naps while commands of pushed
//! queues are in flight but idle, and otherwise sleeps on the completion and CM channels
//! (polled queues never keep it awake: their doorbells arrive as receive completions).
//!
//! Device reset: [`DirectService::quiesce`] drops every direct queue (the hosts see their
//! connection go and re-attach; attaches are refused with Namespace Not Ready meanwhile),
//! [`DirectService::resume`] lets them back. A controller generation change seen by the
//! poller does the same for the queue concerned.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvme::ctrl::RawQueuePair;
use nvme::spec::Status;
use nvme::vfio::NvmeDevice;
use nvme::DmaBuffer;
use rdma::cm::{context_for, CmEventKind, ConnectRequest, Connection, EventChannel, Listener};
use rdma::{
    Access, CompletionChannel, CompletionQueue, MemoryRegion, ProtectionDomain, QpInit, RecvBatch,
    RegisteredBuffer, RemoteAddr, SendBatch, SendFlags, WorkCompletion, WrId,
};
use zerocopy::byteorder::little_endian::{U16, U32, U64};

use super::host::Completions;
use super::host::CQES_PER_SEND;
use super::proto::{
    reply_private, split_polled_imm, AttachRequest, ConnectPrivate, Descriptor, Level,
    RemoteRegion, ACCEPT_CQ_POLLED, ACCEPT_READS_PUSHED, CONNECT_CQ_POLLED, FLAG_CQE_PUSH,
    FLAG_CQ_POLL, FLAG_TAIL_IN_IMM, REJECT_UNKNOWN_TOKEN, STATUS_ACCESS_DENIED,
    STATUS_ATTACH_LIMIT,
};
use super::DirectAttach;
use crate::error::{Error, Result};

const PAGE: usize = 4096;
/// Extra receive/send slots beyond the queue depth.
const SLACK: u32 = 16;
/// How often the poller drops attachments whose host never connected.
const REAP_PERIOD: Duration = Duration::from_millis(200);

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

/// Attachments and pinned bytes per host and in all, kept by [`Pin`]s.
#[derive(Debug, Default)]
struct PinLedger {
    per_host: HashMap<String, (u32, u64)>,
    total: u64,
}

/// One attachment's share of the [`PinLedger`]; given back when dropped (with the
/// attachment, however it ends).
struct Pin {
    ledger: Arc<Mutex<PinLedger>>,
    host: String,
    bytes: u64,
}

impl PinLedger {
    /// Takes `bytes` for one more attachment of `host`, or says which limit refuses it.
    fn reserve(
        ledger: &Arc<Mutex<PinLedger>>,
        lim: &DirectLimits,
        host: &str,
        bytes: u64,
    ) -> std::result::Result<Pin, String> {
        let mut l = held(ledger);
        let (n, b) = l.per_host.get(host).copied().unwrap_or((0, 0));
        if n >= lim.max_queues_per_host {
            return Err(format!(
                "the host has {n} direct queues (max_queues_per_host {})",
                lim.max_queues_per_host
            ));
        }
        if b + bytes > lim.max_pinned_per_host {
            return Err(format!(
                "the host's direct queues would pin {} bytes (max_pinned_per_host {})",
                b + bytes,
                lim.max_pinned_per_host
            ));
        }
        if l.total + bytes > lim.max_pinned_total {
            return Err(format!(
                "direct queues would pin {} bytes in all (max_pinned_total {})",
                l.total + bytes,
                lim.max_pinned_total
            ));
        }
        l.per_host.insert(host.to_owned(), (n + 1, b + bytes));
        l.total += bytes;
        Ok(Pin {
            ledger: ledger.clone(),
            host: host.to_owned(),
            bytes,
        })
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut l = held(&self.ledger);
        l.total = l.total.saturating_sub(self.bytes);
        if let Some((n, b)) = l.per_host.get_mut(&self.host) {
            *n = n.saturating_sub(1);
            *b = b.saturating_sub(self.bytes);
            if *n == 0 {
                l.per_host.remove(&self.host);
            }
        }
    }
}

/// Removes the entries of `pending` created `ttl` or longer before `now`; returns how many.
fn reap_expired<T>(
    pending: &mut HashMap<u64, T>,
    now: Instant,
    ttl: Duration,
    created: impl Fn(&T) -> Instant,
) -> usize {
    let before = pending.len();
    pending.retain(|_, a| now.saturating_duration_since(created(a)) < ttl);
    before - pending.len()
}

/// Why an attach failed.
enum AttachFail {
    /// A [`DirectLimits`] bound.
    Limit(String),
    /// The device or the RDMA registration.
    Device(nvme::Error),
}

impl From<nvme::Error> for AttachFail {
    fn from(e: nvme::Error) -> Self {
        AttachFail::Device(e)
    }
}
// `WrId` kinds of the poller's work requests (one QP per queue, found by number): the
// doorbell receive, the CQE SEND (tag: the WRs it completes), the pushed read data WRITE.
const KIND_RECV: u8 = 1;
const KIND_SEND: u8 = 2;
const KIND_WRITE: u8 = 3;

/// A namespace that direct mode may expose.
#[derive(Clone)]
pub struct DirectNamespace {
    /// The backing controller (shared with the standard-mode backend).
    pub device: Arc<NvmeDevice>,
    /// Namespace id on that controller.
    pub nsid: u32,
}

/// Direct-mode settings of one subsystem.
#[derive(Clone, Default)]
pub struct DirectSubsystem {
    /// Host NQNs allowed to attach (the subsystem's `direct_hosts`).
    pub hosts: Vec<String>,
    /// NVMe-oF nsid → backing namespace (only `vfio:` namespaces).
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

/// One attached queue, for stats.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueReport {
    /// Attachment token.
    pub token: u64,
    /// Host NQN.
    pub hostnqn: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Chosen level.
    pub level: Level,
    /// Why (the P2P registration error when forwarded).
    pub reason: String,
    /// The SQ ring is in the controller memory buffer (P2P level only).
    pub sq_in_cmb: bool,
    /// NVMe queue id on the backing controller.
    pub qid: u16,
    /// Entries.
    pub depth: u16,
    /// Whether the host's direct connection is up.
    pub connected: bool,
    /// How completions reach the host (what the host asked for at connect).
    pub completions: Completions,
    /// SQ tail doorbells forwarded to MMIO.
    pub doorbells_forwarded: u64,
    /// CQ head doorbells forwarded to MMIO (polled completions).
    pub cq_heads_forwarded: u64,
    /// CQEs pushed to the host.
    pub cqes_pushed: u64,
    /// Read data pushed to the host (RDMA WRITE before the CQE).
    pub reads_pushed: u64,
    /// MSI-X vector of the CQ (None: the poller polls it, or the host does).
    pub interrupt_vector: Option<u16>,
}

/// Service-wide counters and state, for stats.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ServiceReport {
    /// Direct CM port.
    pub port: u16,
    /// Attach requests refused because the host is not on `direct_hosts`.
    pub refused: u64,
    /// Attaches done.
    pub attached: u64,
    /// Attaches refused by a [`DirectLimits`] bound.
    pub limited: u64,
    /// Attachments dropped because their host did not connect in time.
    pub expired: u64,
    /// SQ tails ignored because they would put more commands in flight than the queue
    /// holds (a host writing bogus tails).
    pub bogus_tails: u64,
    /// Pinned bytes of all attachments now.
    pub pinned_bytes: u64,
    /// Times the poller went to sleep on its channels.
    pub sleeps: u64,
    /// Of those, sleeps on NVMe interrupts while commands were in the device.
    pub device_sleeps: u64,
    /// Poller iterations.
    pub polls: u64,
    /// Queues.
    pub queues: Vec<QueueReport>,
}

/// A queue pair on the P2P level, before it becomes an [`Attachment`].
struct P2pQueue {
    db_mr: MemoryRegion,
    sq_mr: MemoryRegion,
    raw: RawQueuePair,
    reason: String,
    sq_in_cmb: bool,
}

/// An attachment: everything the host's descriptor names. Field order is drop order:
/// MRs before the queue pair (which deletes the NVMe queues) and the memory.
struct Attachment {
    _db_mr: Option<MemoryRegion>,
    _sq_mr: MemoryRegion,
    _cq_mr: MemoryRegion,
    pool_mr: MemoryRegion,
    mirror: RegisteredBuffer,
    raw: RawQueuePair,
    _pool: DmaBuffer,
    pool_iova: u64,
    pool_len: u64,
    lba_size: u32,
    generation: u64,
    report: QueueReport,
    created: Instant,
    /// This attachment's share of the pinned memory (last: given back after the rest).
    _pin: Pin,
}

/// An attachment with its direct connection.
struct Active {
    conn: Connection,
    att: Attachment,
    qp_num: u32,
    head: u16,
    phase: bool,
    tail: u16,
    mirror_last: u16,
    ring: bool,
    /// Polled completions: the host reads the CQ; `host_head` is the CQ head it handed
    /// over, `ring_head` says it changed since the last CQ head doorbell.
    polled: bool,
    host_head: u16,
    mirror_head_last: u16,
    ring_head: bool,
    /// Host buffer for pushed read data: (addr, rkey, stride).
    push: Option<(u64, u32, u32)>,
    /// Reads in flight by command id (parsed from the SQEs when the tail moves).
    cmds: Box<[Cmd]>,
    in_flight: u32,
    sends_out: u32,
    send_max: u32,
    dead: bool,
}

/// What the poller needs to push a read's data: pool offset and length (0: not a read
/// it can push).
#[derive(Clone, Copy, Default)]
struct Cmd {
    off: u32,
    len: u32,
}

struct Control {
    pending: HashMap<u64, Attachment>,
    detach: Vec<u64>,
    report: ServiceReport,
}

struct Inner {
    cfg: DirectConfig,
    /// `cfg.subsystems` as it is now: [`DirectService::set_subsystem`] changes it.
    subsystems: std::sync::RwLock<HashMap<String, DirectSubsystem>>,
    pd: Arc<ProtectionDomain>,
    port: u16,
    control: Mutex<Control>,
    limits: Mutex<DirectLimits>,
    pins: Arc<Mutex<PinLedger>>,
    /// Bogus SQ tails ignored (see `tail_advance`).
    bogus_tails: AtomicU64,
    stop: AtomicBool,
    paused: AtomicBool,
    quiesce_req: AtomicU64,
    quiesce_ack: AtomicU64,
}

fn lock(m: &Mutex<Control>) -> MutexGuard<'_, Control> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rdma_err(op: &'static str) -> impl FnOnce(rdma::Error) -> Error {
    move |source| Error::Rdma { op, source }
}

/// The direct-mode service of a target.
pub struct DirectService {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl DirectService {
    /// Listens for direct connections and starts the poller.
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
        let poller = Poller {
            inner: inner.clone(),
            cq,
            chan,
            events,
            _listener: listener,
            active: Vec::new(),
            wcs: Box::new([WorkCompletion::default(); 64]),
            sleeps: 0,
            device_sleeps: 0,
            polls: 0,
            fds: Vec::with_capacity(64),
        };
        let thread = std::thread::Builder::new()
            .name("direct-poller".into())
            .spawn(move || poller.run())
            .map_err(|e| Error::Transport {
                qid: u16::MAX,
                reason: format!("cannot start the direct poller: {e}"),
            })?;
        Ok(Arc::new(DirectService {
            inner,
            thread: Some(thread),
        }))
    }

    /// The direct CM port.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// Counters and attached queues.
    pub fn report(&self) -> ServiceReport {
        lock(&self.inner.control).report.clone()
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
        lock(&self.inner.control).pending.clear();
        true
    }

    /// Lets hosts attach again after a [`quiesce`](Self::quiesce).
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for DirectService {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn random_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid writable buffer of 8 bytes for the duration of the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Fall back to time and address entropy; tokens only need to be unguessable
        // enough to not collide, the allow list is the access control.
        let t = Instant::now().elapsed().as_nanos() as u64;
        return t ^ (std::ptr::addr_of!(b) as u64).rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(b)
}

fn page_round(n: usize) -> usize {
    n.div_ceil(PAGE) * PAGE
}

impl DirectAttach for DirectService {
    fn attach(
        &self,
        subnqn: &str,
        hostnqn: &str,
        nsid: u32,
        req: AttachRequest,
    ) -> std::result::Result<Descriptor, Status> {
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
            lock(&inner.control).report.refused += 1;
            return Err(STATUS_ACCESS_DENIED);
        };
        if !sub.hosts.iter().any(|h| h == hostnqn) {
            tracing::info!(
                subnqn,
                hostnqn,
                "direct attach refused: host not on direct_hosts"
            );
            lock(&inner.control).report.refused += 1;
            return Err(STATUS_ACCESS_DENIED);
        }
        if inner.paused.load(Ordering::SeqCst) {
            return Err(Status::NAMESPACE_NOT_READY);
        }
        let Some(ns) = sub.namespaces.get(&nsid) else {
            return Err(Status::INVALID_NAMESPACE);
        };
        match self.build(subnqn, hostnqn, ns, req) {
            Ok((att, desc)) => {
                let mut c = lock(&inner.control);
                c.report.attached += 1;
                c.pending.insert(desc.token.get(), att);
                Ok(desc)
            }
            Err(AttachFail::Limit(why)) => {
                tracing::warn!(subnqn, hostnqn, why, "direct attach refused: limit");
                lock(&inner.control).report.limited += 1;
                Err(STATUS_ATTACH_LIMIT)
            }
            Err(AttachFail::Device(e)) => {
                tracing::warn!(subnqn, hostnqn, error = %e, "direct attach failed");
                Err(Status::INTERNAL_ERROR)
            }
        }
    }

    fn detach(&self, hostnqn: &str, token: u64) -> std::result::Result<(), Status> {
        self.detach_token(hostnqn, token)
    }
}

impl DirectService {
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
        let mut c = lock(&self.inner.control);
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

    fn detach_token(&self, hostnqn: &str, token: u64) -> std::result::Result<(), Status> {
        let mut c = lock(&self.inner.control);
        if let Some(a) = c.pending.get(&token) {
            if a.report.hostnqn != hostnqn {
                return Err(STATUS_ACCESS_DENIED);
            }
            c.pending.remove(&token);
            return Ok(());
        }
        match c.report.queues.iter().find(|q| q.token == token) {
            Some(q) if q.hostnqn == hostnqn => {
                c.detach.push(token);
                Ok(())
            }
            Some(_) => Err(STATUS_ACCESS_DENIED),
            None => Err(Status::INVALID_FIELD),
        }
    }
}

impl DirectService {
    /// Replaces the bounds on attaches (default [`DirectLimits::default`]); attachments
    /// already made stay.
    pub fn set_limits(&self, limits: DirectLimits) {
        *held(&self.inner.limits) = limits;
    }

    fn build(
        &self,
        subnqn: &str,
        hostnqn: &str,
        ns: &DirectNamespace,
        req: AttachRequest,
    ) -> std::result::Result<(Attachment, Descriptor), AttachFail> {
        let inner = &self.inner;
        let ctrl = ns.device.controller();
        let info = ctrl.info();
        let nsinfo = info
            .namespaces
            .iter()
            .find(|n| n.nsid == ns.nsid)
            .ok_or_else(|| nvme::Error::InvalidArgument(format!("namespace {}", ns.nsid)))?;
        let mqes = info.max_queue_entries.min(1024) as u16;
        let depth = if req.depth == 0 {
            inner.cfg.default_depth
        } else {
            req.depth
        }
        .clamp(2, mqes);
        let max_io = info.max_transfer.min(128 * 1024);
        let pool_len = if req.pool_bytes == 0 {
            usize::from(depth) * 8192
        } else {
            usize::try_from(req.pool_bytes.min(inner.cfg.max_pool)).unwrap_or(PAGE)
        };
        let pool_len = page_round(pool_len.max(PAGE));
        let sq_len = page_round(usize::from(depth) * 64);
        let cq_len = page_round(usize::from(depth) * 16);
        // Rings, pool and the doorbell mirror page.
        let pinned = (sq_len + cq_len + pool_len + PAGE) as u64;
        let limits = *held(&inner.limits);
        let pin =
            PinLedger::reserve(&inner.pins, &limits, hostnqn, pinned).map_err(AttachFail::Limit)?;
        let cq = ctrl.alloc_dma(cq_len)?;
        let pool = ctrl.alloc_dma(pool_len)?;
        let reg = |buf: &DmaBuffer, access: Access, what: &'static str| {
            // SAFETY: `buf` is VFIO-mapped memory kept alive by the attachment (the queue
            // pair holds the rings, `_pool` the pool) until after the MR is dropped (field
            // order of `Attachment`); the target touches it only through DmaBuffer's
            // volatile/raw-pointer accessors, never through references.
            unsafe { MemoryRegion::register(&inner.pd, buf.as_ptr(), buf.len(), access) }
                .map_err(|e| nvme::Error::InvalidArgument(format!("{what}: {e}")))
        };
        // Pushed completions: the poller watches the CQ, so give it an interrupt to sleep
        // on; polled ones: the host reads the CQ, an interrupt would only cost CPU.
        let irq = inner.cfg.interrupts && !req.polled_cq && ctrl.interrupt_vectors() > 0;
        // P2P first; on any refusal the queue pair is (re-)created with the SQ in host
        // memory and the host's doorbells go through the mirror page (forwarded).
        let p2p = if inner.cfg.try_p2p {
            self.p2p_queue(ns, &cq, depth, sq_len, irq)
        } else {
            Err("P2P disabled by configuration".to_string())
        };
        let (raw, sq_mr, db_mr, level, reason, sq_in_cmb) = match p2p {
            Ok(p) => (
                p.raw,
                p.sq_mr,
                Some(p.db_mr),
                Level::P2p,
                p.reason,
                p.sq_in_cmb,
            ),
            Err(reason) => {
                let sq = ctrl.alloc_dma(sq_len)?;
                sq.fill(0, sq.len(), 0)?;
                let raw = create_raw(ctrl, &sq, &cq, depth, irq)?;
                let sq_mr = reg(
                    &sq,
                    Access::LOCAL_WRITE | Access::REMOTE_WRITE,
                    "register SQ",
                )?;
                (raw, sq_mr, None, Level::Forwarded, reason, false)
            }
        };
        let qid = raw.qid();
        let interrupt_vector = raw.interrupt_vector();
        let cq_mr = reg(
            &cq,
            Access::LOCAL_WRITE | Access::REMOTE_READ,
            "register CQ",
        )?;
        let pool_mr = reg(&pool, Access::ALL, "register pool")?;
        let mirror = RegisteredBuffer::new(&inner.pd, PAGE, Access::ALL)
            .map_err(|e| nvme::Error::InvalidArgument(format!("doorbell mirror: {e}")))?;
        let (sq_off, cq_off) = ctrl.doorbell_offsets(qid);
        tracing::info!(subnqn, hostnqn, qid, depth, level = level.name(), sq_in_cmb, %reason, "direct queue attached");
        let token = random_token();
        let mut d = Descriptor::new();
        d.level = level.to_u8();
        d.flags = FLAG_CQE_PUSH
            | FLAG_CQ_POLL
            | if level == Level::Forwarded {
                FLAG_TAIL_IN_IMM
            } else {
                0
            };
        d.token = U64::new(token);
        d.generation = U64::new(ctrl.generation());
        d.qid = U16::new(qid);
        d.depth = U16::new(depth);
        d.nsid = U32::new(ns.nsid);
        d.lba_size = U32::new(nsinfo.block_size);
        d.max_transfer = U32::new(max_io as u32);
        d.blocks = U64::new(nsinfo.blocks);
        d.sq = RemoteRegion::new(sq_mr.addr(), sq_mr.rkey());
        d.cq = RemoteRegion::new(cq_mr.addr(), cq_mr.rkey());
        match &db_mr {
            Some(mr) => {
                d.sq_doorbell = RemoteRegion::new(mr.addr(), mr.rkey());
                d.cq_doorbell = RemoteRegion::new(mr.addr() + (cq_off - sq_off), mr.rkey());
            }
            None => {
                let m = mirror.mr();
                d.sq_doorbell = RemoteRegion::new(m.addr(), m.rkey());
                d.cq_doorbell = RemoteRegion::new(m.addr() + 4, m.rkey());
            }
        }
        d.pool = RemoteRegion::new(pool_mr.addr(), pool_mr.rkey());
        d.pool_len = U64::new(pool_len as u64);
        d.pool_iova = U64::new(pool.iova());
        d.port = U16::new(inner.port);
        d.set_reason(&reason);
        let att = Attachment {
            _db_mr: db_mr,
            _sq_mr: sq_mr,
            _cq_mr: cq_mr,
            pool_mr,
            mirror,
            raw,
            pool_iova: pool.iova(),
            pool_len: pool_len as u64,
            lba_size: nsinfo.block_size,
            _pool: pool,
            generation: ctrl.generation(),
            report: QueueReport {
                token,
                hostnqn: hostnqn.to_owned(),
                subnqn: subnqn.to_owned(),
                level,
                reason,
                sq_in_cmb,
                qid,
                depth,
                connected: false,
                completions: Completions::Pushed,
                doorbells_forwarded: 0,
                cq_heads_forwarded: 0,
                cqes_pushed: 0,
                reads_pushed: 0,
                interrupt_vector,
            },
            created: Instant::now(),
            _pin: pin,
        };
        Ok((att, d))
    }

    /// The P2P level for one queue pair: the SQ ring in the CMB when the controller allows
    /// SQs there (else in host memory), the queue pair created on it, the byte-exact
    /// doorbell MR and the SQ MR registered from dma-bufs. The error text is the reason
    /// for falling back to `forwarded`; the queue pair built so far is deleted on return.
    fn p2p_queue(
        &self,
        ns: &DirectNamespace,
        cq: &DmaBuffer,
        depth: u16,
        sq_len: usize,
        irq: bool,
    ) -> std::result::Result<P2pQueue, String> {
        let ctrl = ns.device.controller();
        let info = ctrl.info();
        let alloc_host = || {
            ctrl.alloc_dma(sq_len)
                .map_err(|e| format!("SQ memory: {e}"))
        };
        let (sq, where_) = match info.cmb.as_ref() {
            Some(c) if c.sqs => match ctrl.alloc_cmb(sq_len) {
                Ok(b) => (b, "SQ in the CMB".to_string()),
                Err(e) => (alloc_host()?, format!("SQ in host memory ({e})")),
            },
            Some(_) => (
                alloc_host()?,
                "SQ in host memory (the CMB does not take SQs)".to_string(),
            ),
            None => (alloc_host()?, "SQ in host memory (no CMB)".to_string()),
        };
        let mut in_cmb = where_ == "SQ in the CMB";
        let (mut sq, mut where_) = (sq, where_);
        sq.fill(0, sq.len(), 0)
            .map_err(|e| format!("SQ ring: {e}"))?;
        let raw = match create_raw(ctrl, &sq, cq, depth, irq) {
            Ok(r) => r,
            Err(e) if in_cmb => {
                // The controller refused the CMB ring: P2P can still work with the SQ in
                // host memory (the host writes SQEs there, the doorbell into the device).
                tracing::info!(error = %e, "SQ in the CMB refused; trying host memory");
                sq = alloc_host()?;
                sq.fill(0, sq.len(), 0)
                    .map_err(|e| format!("SQ ring: {e}"))?;
                in_cmb = false;
                where_ = format!("SQ in host memory (CMB SQ refused: {e})");
                create_raw(ctrl, &sq, cq, depth, irq).map_err(|e| format!("queue pair: {e}"))?
            }
            Err(e) => return Err(format!("queue pair with the {where_}: {e}")),
        };
        let (sq_off, cq_off) = ctrl.doorbell_offsets(raw.qid());
        let db_mr = self
            .p2p_doorbells(ns, sq_off, cq_off)
            .map_err(|e| format!("{e} (attempted with the {where_})"))?;
        // The controller takes SQ tails from the shadow buffer when shadow doorbells are
        // on, so a NIC writing the MMIO doorbell would be ignored.
        if info.shadow_doorbells_in_use {
            return Err(
                "dma-buf MR ok, but shadow doorbells are in use (set shadow_doorbells = false)"
                    .into(),
            );
        }
        let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
        let sq_mr = if in_cmb {
            let base = ctrl.cmb().map_or(0, |c| c.iova());
            let off = sq.iova().wrapping_sub(base);
            let fd = ns
                .device
                .export_cmb(off..off + sq.len() as u64)
                .map_err(|e| format!("CMB dma-buf export: {e}"))?;
            MemoryRegion::register_dmabuf(&self.inner.pd, fd.as_raw_fd(), 0, sq.len(), off, access)
                .map_err(|e| format!("ibv_reg_dmabuf_mr of the CMB SQ: {e}"))?
        } else {
            // SAFETY: as in `build`: VFIO-mapped memory that the queue pair keeps alive
            // until after the MR (field order of `Attachment`), touched only through
            // DmaBuffer's raw accessors.
            unsafe { MemoryRegion::register(&self.inner.pd, sq.as_ptr(), sq.len(), access) }
                .map_err(|e| format!("register SQ: {e}"))?
        };
        Ok(P2pQueue {
            raw,
            sq_mr,
            db_mr,
            reason: format!("dma-buf doorbell MR registered; {where_}"),
            sq_in_cmb: in_cmb,
        })
    }

    /// Registers the byte-exact doorbell range of one queue (SQ tail .. CQ head + 4) from
    /// the doorbell-page dma-buf; the error text is the reason for falling back.
    fn p2p_doorbells(
        &self,
        ns: &DirectNamespace,
        sq_off: u64,
        cq_off: u64,
    ) -> std::result::Result<MemoryRegion, String> {
        let fd = ns
            .device
            .export_doorbells()
            .map_err(|e| format!("doorbell dma-buf export: {e}"))?;
        let (page_off, _) = ns.device.doorbell_range();
        let off = sq_off - page_off;
        let len = (cq_off + 4 - sq_off) as usize;
        MemoryRegion::register_dmabuf(
            &self.inner.pd,
            fd.as_raw_fd(),
            off,
            len,
            off,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )
        .map_err(|e| {
            // Short form first: the descriptor carries 63 bytes of it.
            let name = match e.errno() {
                Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
                Some(libc::EINVAL) => "EINVAL",
                Some(libc::ENOSYS) => "ENOSYS",
                Some(libc::EFAULT) => "EFAULT",
                _ => "error",
            };
            format!("ibv_reg_dmabuf_mr: {name}; {e}")
        })
    }
}

/// A raw queue pair, with an interrupt when `irq` (falling back to a polled CQ when the
/// controller refuses one: the poller then polls it).
fn create_raw(
    ctrl: &nvme::Controller,
    sq: &DmaBuffer,
    cq: &DmaBuffer,
    depth: u16,
    irq: bool,
) -> nvme::Result<RawQueuePair> {
    if irq {
        match ctrl.create_raw_queue_pair_with_interrupts(sq.clone(), cq.clone(), depth) {
            Ok(r) => return Ok(r),
            Err(e) => tracing::warn!(error = %e, "direct queue without interrupt: polled CQ"),
        }
    }
    ctrl.create_raw_queue_pair(sq.clone(), cq.clone(), depth)
}

/// Longest sleep of the poller (ms): doorbells of polled queues, NVMe interrupts and CM
/// events wake it sooner; the timeout only bounds how late quiesce/detach requests, the
/// stop flag and stats are seen. Every timeout wake-up costs CPU with nothing to do (on
/// a TCG guest ≈ 0.5 ms each).
const MAX_SLEEP_MS: i32 = 100;

struct Poller {
    inner: Arc<Inner>,
    cq: Arc<CompletionQueue>,
    chan: Arc<CompletionChannel>,
    events: EventChannel,
    _listener: Listener,
    active: Vec<Active>,
    wcs: Box<[WorkCompletion; 64]>,
    sleeps: u64,
    device_sleeps: u64,
    polls: u64,
    /// poll(2) set of [`Poller::sleep`], kept to allocate only when queues are
    /// added.
    fds: Vec<libc::pollfd>,
}

impl Poller {
    fn run(mut self) {
        let mut last_work = Instant::now();
        let mut last_report = Instant::now();
        let mut last_cm = Instant::now();
        let mut nap = Duration::from_micros(25);
        while !self.inner.stop.load(Ordering::Relaxed) {
            self.polls += 1;
            // CM events cost a syscall: look at most every millisecond while busy.
            let mut work = 0;
            if last_cm.elapsed() >= Duration::from_millis(1) {
                work += self.cm_events();
                last_cm = Instant::now();
            }
            work += self.control();
            work += self.rdma_completions();
            for i in 0..self.active.len() {
                work += self.forward_mirror(i);
                work += self.push_completions(i);
            }
            if self.active.iter().any(|a| a.dead) {
                self.active.retain(|a| !a.dead);
                self.publish();
            }
            if last_report.elapsed() > REAP_PERIOD {
                self.publish();
                last_report = Instant::now();
            }
            let now = Instant::now();
            if work > 0 {
                last_work = now;
                nap = Duration::from_micros(25);
                continue;
            }
            let idle = now.duration_since(last_work);
            // Only pushed queues need the poller to watch their NVMe CQ (P2P pushed queues
            // always: their doorbells bypass it). Polled queues wake it by their
            // doorbells' receive completions.
            let watched =
                |a: &&Active| !a.polled && (a.in_flight > 0 || a.att.report.level == Level::P2p);
            let busy = self.active.iter().any(|a| watched(&a));
            // Every watched CQ raises an interrupt: sleep on those too instead of napping.
            let interrupts = busy
                && self
                    .active
                    .iter()
                    .filter(watched)
                    .all(|a| a.att.raw.interrupt_eventfd().is_some());
            let pushed = self.active.iter().any(|a| !a.polled);
            // Commands in flight: yield briefly, then nap (the device takes tens of
            // microseconds at best); nothing to watch: sleep on the channels — at once
            // when only polled queues are attached (the next doorbell wakes the poller),
            // after 200 µs with pushed queues (their hosts resubmit right after a CQE).
            if interrupts {
                if idle < Duration::from_micros(20) {
                    std::thread::yield_now();
                } else {
                    self.sleep(true);
                }
            } else if busy {
                if idle < Duration::from_micros(20) {
                    std::thread::yield_now();
                } else {
                    // Back off 25 µs → 800 µs: a nap costs a timer and two context
                    // switches, which on a TCG guest cost as much as the nap itself.
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_micros(800));
                }
            } else if !pushed || idle >= Duration::from_micros(200) {
                self.sleep(false);
            } else {
                std::thread::yield_now();
            }
        }
        for a in &self.active {
            let _ = a.conn.disconnect();
        }
    }

    /// Arms the CQ and sleeps in poll(2) on the completion and CM channels (≤ MAX_SLEEP_MS:
    /// doorbells of polled queues and connection events wake it; the timeout only bounds
    /// how late quiesce/detach requests, the stop flag and stats publishing are seen —
    /// every timeout wake-up is CPU the target spends with nothing to do).
    ///
    /// `device`: commands are in the device and every watched CQ has an interrupt — also
    /// clears those eventfds and sleeps on them. The RDMA CQ (and, with `device`, the NVMe
    /// CQs) get one more look after arming: an event before the arm/clear is gone, one
    /// after it stays pending (the eventfd reads are syscalls, full barriers).
    fn sleep(&mut self, device: bool) {
        self.sleeps += 1;
        if device {
            self.device_sleeps += 1;
        }
        if self.chan.drain_events().is_err() || self.cq.arm(false).is_err() {
            std::thread::sleep(if device {
                Duration::from_micros(100)
            } else {
                Duration::from_millis(1)
            });
            return;
        }
        self.fds.clear();
        for fd in [self.chan.fd(), self.events.fd()] {
            self.fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if device {
            for a in self.active.iter().filter(|a| !a.polled && !a.dead) {
                if let Some(e) = a.att.raw.interrupt_eventfd() {
                    e.clear();
                    self.fds.push(libc::pollfd {
                        fd: e.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
        }
        let mut work = self.rdma_completions();
        if device {
            for i in 0..self.active.len() {
                work += self.push_completions(i);
            }
        }
        if work > 0 {
            return;
        }
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structures
        // that outlives the call.
        unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                MAX_SLEEP_MS,
            )
        };
    }

    fn publish(&mut self) {
        let queues: Vec<QueueReport> = self.active.iter().map(|a| a.att.report.clone()).collect();
        let ttl = held(&self.inner.limits).pending_ttl;
        let pinned = held(&self.inner.pins).total;
        let mut c = lock(&self.inner.control);
        let expired = reap_expired(&mut c.pending, Instant::now(), ttl, |a| a.created);
        if expired > 0 {
            tracing::info!(expired, ?ttl, "direct: attachments never connected dropped");
        }
        c.report.expired += expired as u64;
        c.report.bogus_tails = self.inner.bogus_tails.load(Ordering::Relaxed);
        c.report.pinned_bytes = pinned;
        c.report.queues = queues;
        c.report.sleeps = self.sleeps;
        c.report.device_sleeps = self.device_sleeps;
        c.report.polls = self.polls;
    }

    /// Quiesce and detach requests.
    fn control(&mut self) -> usize {
        let want = self.inner.quiesce_req.load(Ordering::SeqCst);
        if self.inner.quiesce_ack.load(Ordering::SeqCst) < want {
            let n = self.active.len();
            for a in &self.active {
                let _ = a.conn.disconnect();
            }
            self.active.clear();
            lock(&self.inner.control).pending.clear();
            self.publish();
            tracing::info!(queues = n, "direct queues dropped for a device reset");
            self.inner.quiesce_ack.store(want, Ordering::SeqCst);
            return 1;
        }
        let detach = std::mem::take(&mut lock(&self.inner.control).detach);
        for t in &detach {
            if let Some(a) = self.active.iter_mut().find(|a| a.att.report.token == *t) {
                let _ = a.conn.disconnect();
                a.dead = true;
            }
        }
        detach.len()
    }

    fn cm_events(&mut self) -> usize {
        let mut n = 0;
        loop {
            let ev = match self.events.try_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return n,
                Err(e) => {
                    tracing::warn!(error = %e, "direct: rdma_get_cm_event");
                    return n;
                }
            };
            n += 1;
            match ev.kind {
                CmEventKind::ConnectRequest(req) => self.connect(req),
                CmEventKind::Disconnected
                | CmEventKind::ConnectError
                | CmEventKind::Unreachable
                | CmEventKind::DeviceRemoval => {
                    for a in self
                        .active
                        .iter_mut()
                        .filter(|a| a.conn.id_key() == ev.id_key)
                    {
                        let _ = a.conn.disconnect();
                        a.dead = true;
                        tracing::info!(token = a.att.report.token, "direct connection closed");
                    }
                }
                _ => {}
            }
        }
    }

    fn connect(&mut self, req: ConnectRequest) {
        let private = ConnectPrivate::parse(req.private_data());
        let token = private.map(|p| p.token.get());
        let att = token.and_then(|t| lock(&self.inner.control).pending.remove(&t));
        let Some(mut att) = att else {
            tracing::info!("direct connection with an unknown token: rejected");
            let _ = req.reject(&reply_private(REJECT_UNKNOWN_TOKEN, 0));
            return;
        };
        let depth = u32::from(att.raw.depth());
        let polled = private.is_some_and(|p| p.flags.get() & CONNECT_CQ_POLLED != 0);
        // Read data is pushed with pushed CQEs only: polled queues are never watched.
        let push = private
            .filter(|p| !polled && p.read_rkey.get() != 0 && p.read_stride.get() >= 512)
            .map(|p| (p.read_addr.get(), p.read_rkey.get(), p.read_stride.get()));
        let send_max = 2 * depth + SLACK;
        let init = QpInit {
            send_cq: self.cq.clone(),
            recv_cq: self.cq.clone(),
            srq: None,
            max_send_wr: send_max,
            max_recv_wr: depth + SLACK,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
            sq_sig_all: false,
        };
        let flags = if polled {
            ACCEPT_CQ_POLLED
        } else if push.is_some() {
            ACCEPT_READS_PUSHED
        } else {
            0
        };
        let conn = match req.accept(&self.inner.pd, &init, &reply_private(0, flags)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "direct: accept");
                return;
            }
        };
        for _ in 0..depth + SLACK {
            let mut b = RecvBatch::<1>::new();
            let posted = b
                .recv(WrId::new(KIND_RECV, 0), None)
                .map(|_| ())
                .and_then(|_| conn.qp().post_recv(&mut b));
            if let Err(e) = posted {
                tracing::warn!(error = %e, "direct: post recv");
                let _ = conn.disconnect();
                return;
            }
        }
        att.report.connected = true;
        att.report.completions = if polled {
            Completions::Polled
        } else {
            Completions::Pushed
        };
        tracing::info!(
            token = att.report.token,
            qid = att.raw.qid(),
            completions = att.report.completions.name(),
            "direct connection up"
        );
        let qp_num = conn.qp().qp_num();
        self.active.push(Active {
            conn,
            att,
            qp_num,
            head: 0,
            phase: true,
            tail: 0,
            mirror_last: 0,
            ring: false,
            polled,
            host_head: 0,
            mirror_head_last: 0,
            ring_head: false,
            push,
            cmds: vec![Cmd::default(); depth as usize].into_boxed_slice(),
            in_flight: 0,
            sends_out: 0,
            send_max,
            dead: false,
        });
        self.publish();
    }

    fn rdma_completions(&mut self) -> usize {
        let n = match self.cq.poll(&mut self.wcs[..]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "direct: ibv_poll_cq");
                return 0;
            }
        };
        for i in 0..n {
            let wc = self.wcs[i];
            let Some(a) = self.active.iter_mut().find(|a| a.qp_num == wc.qp_num()) else {
                continue;
            };
            if !wc.is_ok() {
                if !a.dead {
                    tracing::info!(token = a.att.report.token, status = %wc.status(), "direct: work completion error");
                }
                let _ = a.conn.disconnect();
                a.dead = true;
                continue;
            }
            let id = wc.wr_id();
            match id.kind() {
                KIND_RECV => {
                    if let Some(imm) = wc.imm_data() {
                        if a.polled {
                            let (t, h) = split_polled_imm(imm);
                            set_cq_head(a, h);
                            advance_tail(a, &self.inner.bogus_tails, u32::from(t));
                        } else {
                            advance_tail(a, &self.inner.bogus_tails, imm);
                        }
                    }
                    let mut b = RecvBatch::<1>::new();
                    let posted = b
                        .recv(WrId::new(KIND_RECV, 0), None)
                        .map(|_| ())
                        .and_then(|_| a.conn.qp().post_recv(&mut b));
                    if posted.is_err() {
                        a.dead = true;
                    }
                }
                KIND_SEND => a.sends_out = a.sends_out.saturating_sub(id.tag()),
                _ => {}
            }
        }
        for a in &mut self.active {
            ring(a);
        }
        n
    }

    /// Forwards a tail written by plain RDMA WRITE into the mirror page.
    fn forward_mirror(&mut self, i: usize) -> usize {
        let a = &mut self.active[i];
        if a.dead || a.att.report.level != Level::Forwarded {
            return 0;
        }
        let Ok(v) = a.att.mirror.read_volatile_u64(0) else {
            return 0;
        };
        // Only a change of the mirror is news: hosts that ring by immediate never
        // write it. Polled queues may hand the CQ head over at offset 4 the same way.
        let (t, h) = (v as u32 as u16, (v >> 32) as u32 as u16);
        let head_news = a.polled && h != a.mirror_head_last;
        if t == a.mirror_last && !head_news {
            return 0;
        }
        if head_news {
            a.mirror_head_last = h;
            set_cq_head(a, h);
        }
        if t != a.mirror_last {
            a.mirror_last = t;
            advance_tail(a, &self.inner.bogus_tails, u32::from(t));
        }
        ring(a);
        1
    }

    /// Pushes new CQEs to the host (up to [`CQES_PER_SEND`] per SEND), then rings the CQ
    /// head doorbell once.
    fn push_completions(&mut self, i: usize) -> usize {
        let a = &mut self.active[i];
        if a.dead {
            return 0;
        }
        if a.att.raw.generation() != a.att.generation {
            tracing::info!(
                token = a.att.report.token,
                "controller reset under a direct queue: dropping it (host re-attaches)"
            );
            let _ = a.conn.disconnect();
            a.dead = true;
            return 1;
        }
        if a.polled {
            // The host reads the CQ itself.
            return 0;
        }
        let depth = a.att.raw.depth();
        let mut n = 0;
        let mut batch = [0u8; 16 * CQES_PER_SEND];
        // A chain is at most CQES_PER_SEND data WRITEs and one SEND.
        while n < 64 && a.sends_out + (CQES_PER_SEND as u32) < a.send_max {
            let mut k = 0;
            while k < CQES_PER_SEND {
                let off = usize::from(a.head) * 16;
                // Phase tag first (volatile load of DW3), then the rest of the entry.
                let Ok(dw3) = a.att.raw.cq().read_u32(off + 12) else {
                    break;
                };
                if ((dw3 >> 16) & 1 == 1) != a.phase {
                    break;
                }
                std::sync::atomic::fence(Ordering::Acquire);
                if a.att
                    .raw
                    .cq()
                    .read(off, &mut batch[k * 16..k * 16 + 16])
                    .is_err()
                {
                    break;
                }
                k += 1;
                a.head += 1;
                if a.head == depth {
                    a.head = 0;
                    a.phase = !a.phase;
                }
            }
            if k == 0 {
                break;
            }
            let mut chain = SendBatch::<{ CQES_PER_SEND + 1 }>::new();
            let mut wrs = 1u32;
            let built = (|| -> rdma::Result<()> {
                if let Some((addr, rkey, stride)) = a.push {
                    for j in 0..k {
                        let e = &batch[j * 16..j * 16 + 16];
                        let cid = u16::from_le_bytes([e[12], e[13]]);
                        let ok = u16::from_le_bytes([e[14], e[15]]) >> 1 == 0;
                        let Some(c) = a.cmds.get(usize::from(cid)).copied() else {
                            continue;
                        };
                        if c.len == 0 || !ok || c.len > stride {
                            continue;
                        }
                        let sge = a.att.pool_mr.sge(c.off as usize, c.len as usize)?;
                        let dst = RemoteAddr {
                            addr: addr.wrapping_add(u64::from(cid) * u64::from(stride)),
                            rkey,
                        };
                        chain.write(WrId::new(KIND_WRITE, 0), sge, dst, SendFlags::NONE)?;
                        wrs += 1;
                    }
                }
                let id = WrId::new(KIND_SEND, wrs);
                chain.send_inline(id, &batch[..k * 16], SendFlags::SIGNALED)?;
                a.conn.qp().post_send(&mut chain)
            })();
            if let Err(e) = built {
                tracing::info!(error = %e, "direct: push CQE");
                a.dead = true;
                break;
            }
            a.sends_out += wrs;
            a.in_flight = a.in_flight.saturating_sub(k as u32);
            a.att.report.cqes_pushed += k as u64;
            a.att.report.reads_pushed += u64::from(wrs - 1);
            n += k;
        }
        if n > 0 {
            a.att.raw.ring_cq(a.head);
        }
        n
    }
}

/// Commands a new SQ tail `t` adds to a queue of `depth` entries whose tail is `tail`,
/// with `in_flight` commands submitted and not completed (pushed completions; polled:
/// not counted, `None`). Err: a bogus tail — beyond the ring, or one that would have more
/// commands outstanding than the queue holds (depth − 1: the CQ is as deep as the SQ).
pub(crate) fn tail_advance(
    depth: u32,
    tail: u16,
    in_flight: Option<u32>,
    t: u32,
) -> std::result::Result<u32, &'static str> {
    if t >= depth {
        return Err("beyond the ring");
    }
    let added = (t + depth - u32::from(tail)) % depth;
    if let Some(n) = in_flight {
        if n + added > depth - 1 {
            return Err("more commands than the queue holds");
        }
    }
    Ok(added)
}

/// `stats` counts them, the log says so at powers of two (a flood of bogus tails is not a
/// flood of log lines).
fn bogus_tail(a: &Active, bogus: &AtomicU64, t: u32, why: &'static str) {
    let n = bogus.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(
            token = a.att.report.token,
            tail = t,
            current = a.tail,
            in_flight = a.in_flight,
            why,
            bogus_tails = n,
            "direct: bogus SQ tail ignored"
        );
    }
}

fn advance_tail(a: &mut Active, bogus: &AtomicU64, t: u32) {
    let depth = u32::from(a.att.raw.depth());
    let in_flight = (!a.polled).then_some(a.in_flight);
    let added = match tail_advance(depth, a.tail, in_flight, t) {
        Ok(n) => n,
        Err(why) => return bogus_tail(a, bogus, t, why),
    };
    let t = t as u16;
    if added == 0 {
        return;
    }
    if a.push.is_some() {
        let mut slot = a.tail;
        while slot != t {
            note_command(a, slot);
            slot = if u32::from(slot) + 1 == depth {
                0
            } else {
                slot + 1
            };
        }
    }
    a.tail = t;
    if !a.polled {
        a.in_flight += added;
    }
    a.ring = true;
}

/// A polled queue's host consumed the CQ up to `h`: ring the CQ head doorbell with the
/// next SQ doorbell (out of range values are ignored, like tails).
fn set_cq_head(a: &mut Active, h: u16) {
    if h >= a.att.raw.depth() {
        tracing::debug!(
            token = a.att.report.token,
            head = h,
            "direct: CQ head out of range ignored"
        );
        return;
    }
    if h != a.host_head {
        a.host_head = h;
        a.ring_head = true;
    }
}

/// Reads the SQE in `slot` and remembers where a read's data will be (pool offset and
/// length) so that it can be pushed with the completion. Anything else — or a read whose
/// PRPs are not one contiguous pool range — is not pushed.
fn note_command(a: &mut Active, slot: u16) {
    let mut e = [0u8; 64];
    if a.att.raw.sq().read(usize::from(slot) * 64, &mut e).is_err() {
        return;
    }
    let cid = u16::from_le_bytes([e[2], e[3]]);
    let Some(c) = a.cmds.get_mut(usize::from(cid)) else {
        return;
    };
    *c = Cmd::default();
    let le64 = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or([0; 8]));
    let (opc, prp1, prp2) = (e[0], le64(24), le64(32));
    let nlb = u64::from(u16::from_le_bytes([e[48], e[49]])) + 1;
    let len = nlb * u64::from(a.att.lba_size);
    // Host-written values: no arithmetic that can overflow.
    let contiguous =
        len <= 4096 && prp2 == 0 || len <= 8192 && prp1.checked_add(4096) == Some(prp2);
    let in_pool = prp1
        .checked_sub(a.att.pool_iova)
        .and_then(|off| off.checked_add(len))
        .is_some_and(|end| end <= a.att.pool_len)
        && prp1 % 4096 + len.min(4096) <= 4096;
    if opc == nvme::spec::io_opc::READ && contiguous && in_pool {
        *c = Cmd {
            off: (prp1 - a.att.pool_iova) as u32,
            len: len as u32,
        };
    }
}

/// Rings the doorbells once for every update gathered since the last call: the CQ head
/// first (polled queues), so the controller has the room before it sees new commands, then
/// the SQ tail.
fn ring(a: &mut Active) {
    if a.ring_head {
        a.ring_head = false;
        a.att.report.cq_heads_forwarded += 1;
        a.att.raw.ring_cq(a.host_head);
    }
    if a.ring {
        a.ring = false;
        a.att.report.doorbells_forwarded += 1;
        a.att.raw.ring_sq(a.tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_bound_queues_and_bytes_per_host_and_in_all() {
        let ledger = Arc::new(Mutex::new(PinLedger::default()));
        let lim = DirectLimits {
            max_queues_per_host: 2,
            max_pinned_per_host: 100,
            max_pinned_total: 150,
            pending_ttl: Duration::from_secs(1),
        };
        let a1 = PinLedger::reserve(&ledger, &lim, "a", 40).unwrap();
        let a2 = PinLedger::reserve(&ledger, &lim, "a", 40).unwrap();
        let e = PinLedger::reserve(&ledger, &lim, "a", 1).err().unwrap();
        assert!(e.contains("max_queues_per_host 2"), "{e}");
        drop(a2);
        let e = PinLedger::reserve(&ledger, &lim, "a", 61).err().unwrap();
        assert!(e.contains("max_pinned_per_host 100"), "{e}");
        let b = PinLedger::reserve(&ledger, &lim, "b", 100).unwrap();
        let e = PinLedger::reserve(&ledger, &lim, "a", 20).err().unwrap();
        assert!(e.contains("max_pinned_total 150"), "{e}");
        assert_eq!(held(&ledger).total, 140);
        drop((a1, b));
        let l = held(&ledger);
        assert_eq!(l.total, 0, "every pin given back");
        assert!(l.per_host.is_empty());
    }

    #[test]
    fn expired_attachments_are_reaped_by_time() {
        let t0 = Instant::now();
        let mut pending: HashMap<u64, Instant> = HashMap::new();
        pending.insert(1, t0);
        pending.insert(2, t0 + Duration::from_secs(5));
        let ttl = Duration::from_secs(10);
        assert_eq!(
            reap_expired(&mut pending, t0 + Duration::from_secs(9), ttl, |c| *c),
            0
        );
        assert_eq!(
            reap_expired(&mut pending, t0 + Duration::from_secs(10), ttl, |c| *c),
            1
        );
        assert!(pending.contains_key(&2) && !pending.contains_key(&1));
        assert_eq!(
            reap_expired(&mut pending, t0 + Duration::from_secs(15), ttl, |c| *c),
            1
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn bogus_tails_cannot_inflate_in_flight() {
        // Depth 8: at most 7 commands outstanding.
        assert_eq!(tail_advance(8, 0, Some(0), 7), Ok(7));
        assert_eq!(tail_advance(8, 6, Some(0), 2), Ok(4), "wraps");
        assert!(tail_advance(8, 0, Some(0), 8).is_err(), "beyond the ring");
        assert!(tail_advance(8, 0, Some(0), u32::MAX).is_err());
        // Three in flight: the tail may move four more, not five.
        assert_eq!(tail_advance(8, 3, Some(3), 7), Ok(4));
        assert!(tail_advance(8, 3, Some(3), 0).is_err());
        // A tail moved "backwards" is a near-full wrap: refused while commands are out.
        assert!(tail_advance(8, 5, Some(1), 4).is_err());
        // Repeating the same bogus tail never adds anything.
        let mut in_flight = 0;
        let mut tail = 0u16;
        for t in [7u32, 6, 5, 7, 0, 3] {
            if let Ok(n) = tail_advance(8, tail, Some(in_flight), t) {
                in_flight += n;
                tail = t as u16;
            }
            assert!(in_flight <= 7, "in flight {in_flight}");
        }
        // Polled queues do not count in-flight commands; only the ring bound applies.
        assert_eq!(tail_advance(8, 3, None, 2), Ok(7));
        assert!(tail_advance(8, 3, None, 9).is_err());
    }
}
