//! The NVMe-oF RDMA transport binding over the `rdma` crate (verbs + RDMA CM).
//!
//! - [`RdmaTransport`] listens with RDMA CM on the configured addresses, turns CONNECT
//!   REQUEST events into [`RdmaIncoming`] (NVMe-oF private data), and tracks each
//!   connection's DISCONNECTED state.
//! - [`RdmaPollGroup`] owns one CQ (with a completion channel, for sleeping) shared by
//!   all its queue pairs, the MR over the core's buffer pool, and dispatches work
//!   completions to the right queue pair by [`rdma::WrId`] (slot + generation + kind +
//!   tag).
//! - [`RdmaQpair`] receives capsules into its registered receive ring (reposting each
//!   slot right after the core has copied it out), posts RDMA READ/WRITE on pool
//!   buffers, and sends responses inline (16 bytes: no MR, no buffer to recycle).
//!
//! Teardown drains before it destroys: the core calls [`Qpair::disconnect`] (`rdma_disconnect`
//! moves the QP to ERROR, posted WRs flush into the CQ), waits until every posted
//! transfer has been reported, then drops the queue pair: QP first, then the CM id, then
//! the receive ring it covered.
//!
//! Each poll group has a shared receive queue (`RdmaTransport::set_srq_depth`; 0 gives
//! every queue pair its own receive queue), its threads run on the `rdma::reactor`
//! (`serve.rs`), and the buffer pool it registers may be a controller's DMA memory
//! ([`WirePollGroup::register_memory`]). Not here: SEND_WITH_INVALIDATE (the host
//! invalidates its key itself, see [`Qpair::send_response`]).

mod host;
mod serve;
mod session;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nvme::spec::Cqe;
use rdma::cm::{context_for, CmEventKind, ConnectRequest, Connection, EventChannel, Listener};
use rdma::{
    Access, CompletionChannel, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpInit,
    RecvBatch, RegisteredBuffer, RemoteAddr, SendBatch, SendFlags, Sge, SharedReceiveQueue,
    WorkCompletion, WrId,
};
use zerocopy::IntoBytes;

pub use host::RdmaHost;
pub use serve::{
    serve, serve_with, serve_with_control, ListenerControl, ListenerOps, ServeOptions,
};
pub use session::{hostid_of, keyed, Namespace, Session, SessionOptions, DEFAULT_HOSTNQN};

use crate::error::{Error, Result};
use crate::fabrics::{CmAccept, CmReject};
use crate::pool::DataBuf;
use crate::wire::{
    Busy, Incoming, QpId, Qpair, Received, RemoteBuf, TransferDone, Transport, WirePollGroup,
};

fn rdma_err(op: &'static str) -> impl FnOnce(rdma::Error) -> Error {
    move |source| Error::Rdma { op, source }
}

/// An rdma error of queue `qid` (initiator queues, which know their queue id).
pub(crate) fn queue_err(qid: u16, op: &'static str) -> impl FnOnce(rdma::Error) -> Error {
    move |source| Error::QueueRdma { qid, op, source }
}

/// Connection state shared between the transport (which sees CM events) and the queue pair.
struct Link {
    connected: AtomicBool,
}

/// The RDMA transport: CM event channel, listeners, device context and PD.
pub struct RdmaTransport {
    channel: EventChannel,
    listeners: Vec<Listener>,
    ctx: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    links: HashMap<usize, Arc<Link>>,
    cq_entries: u32,
    srq_depth: u32,
}

impl RdmaTransport {
    /// Listens on `addrs` (all on one RDMA device: the first address picks it).
    pub fn listen(addrs: &[SocketAddr]) -> Result<Self> {
        let first = addrs.first().ok_or(Error::NoListenAddress)?;
        let ctx = context_for(first.ip()).map_err(rdma_err("device for listen address"))?;
        let pd = ProtectionDomain::new(&ctx).map_err(rdma_err("alloc PD"))?;
        let channel = EventChannel::new().map_err(rdma_err("CM event channel"))?;
        let mut listeners = Vec::new();
        for a in addrs {
            listeners.push(Listener::bind(&channel, *a, 128).map_err(rdma_err("listen"))?);
            tracing::info!(addr = %a, "listening (rdma)");
        }
        Ok(RdmaTransport {
            channel,
            listeners,
            ctx,
            pd,
            links: HashMap::new(),
            cq_entries: 4096,
            srq_depth: DEFAULT_SRQ_DEPTH,
        })
    }

    /// Receive buffers of the shared receive queue of each poll group created from now
    /// on; 0 gives every queue pair its own receive queue (queue depth entries).
    pub fn set_srq_depth(&mut self, depth: u32) {
        self.srq_depth = depth.min(u32::from(SRQ_SLOT) - 1);
    }

    /// Starts listening on `addr` too, on the same CM channel (`nvmf-p2p ctl
    /// add-listener`); the address must be on the RDMA device of the first listener
    /// (every poll group's queue pairs live on it).
    pub fn add_listener(&mut self, addr: SocketAddr) -> Result<()> {
        if self.listeners.iter().any(|l| l.local_addr() == addr) {
            return Ok(());
        }
        if !addr.ip().is_unspecified() {
            let ctx = context_for(addr.ip()).map_err(rdma_err("device for listen address"))?;
            if ctx.name() != self.ctx.name() {
                return Err(Error::ListenerOnOtherDevice {
                    addr: addr.ip(),
                    device: ctx.name(),
                    serving: self.ctx.name(),
                });
            }
        }
        self.listeners
            .push(Listener::bind(&self.channel, addr, 128).map_err(rdma_err("listen"))?);
        tracing::info!(addr = %addr, "listening (rdma)");
        Ok(())
    }

    /// Stops listening on `addr`; connections made through it stay up. False when it
    /// was not listened on.
    pub fn remove_listener(&mut self, addr: SocketAddr) -> bool {
        let before = self.listeners.len();
        self.listeners.retain(|l| l.local_addr() != addr);
        if self.listeners.len() != before {
            tracing::info!(addr = %addr, "stopped listening (rdma)");
        }
        self.listeners.len() != before
    }

    /// Addresses actually bound (ports resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.local_addr()).collect()
    }

    /// The CM event channel's fd (readable when a CM event is pending).
    pub fn event_fd(&self) -> RawFd {
        self.channel.fd()
    }
}

/// A connection request with its NVMe-oF private data.
pub struct RdmaIncoming {
    req: ConnectRequest,
    link: Arc<Link>,
}

impl Incoming for RdmaIncoming {
    fn private_data(&self) -> &[u8] {
        self.req.private_data()
    }

    fn reject(self, reject: &CmReject) {
        if let Err(e) = self.req.reject(reject.as_bytes()) {
            tracing::warn!(error = %e, "rdma_reject");
        }
    }
}

impl Transport for RdmaTransport {
    type Qpair = RdmaQpair;
    type Incoming = RdmaIncoming;
    type PollGroup = RdmaPollGroup;

    fn name(&self) -> &'static str {
        "rdma"
    }

    fn poll_incoming(&mut self) -> Option<RdmaIncoming> {
        // Forget links nobody holds any more (rejected requests, dropped queue pairs).
        self.links.retain(|_, l| Arc::strong_count(l) > 1);
        loop {
            let ev = match self.channel.try_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "rdma_get_cm_event");
                    return None;
                }
            };
            match ev.kind {
                CmEventKind::ConnectRequest(req) => {
                    let link = Arc::new(Link {
                        connected: AtomicBool::new(true),
                    });
                    self.links.insert(req.id_key(), link.clone());
                    return Some(RdmaIncoming { req, link });
                }
                CmEventKind::Disconnected
                | CmEventKind::ConnectError
                | CmEventKind::Unreachable
                | CmEventKind::DeviceRemoval => {
                    if let Some(l) = self.links.get(&ev.id_key) {
                        l.connected.store(false, Ordering::Release);
                    }
                }
                CmEventKind::TimewaitExit => {
                    self.links.remove(&ev.id_key);
                }
                _ => {}
            }
        }
    }

    fn create_poll_group(&mut self) -> Result<RdmaPollGroup> {
        let chan = CompletionChannel::new(&self.ctx).map_err(rdma_err("completion channel"))?;
        let cq = CompletionQueue::new(&self.ctx, self.cq_entries, Some(&chan))
            .map_err(rdma_err("create CQ"))?;
        Ok(RdmaPollGroup {
            pd: self.pd.clone(),
            cq,
            chan,
            pool_mr: None,
            slots: Vec::new(),
            wcs: Box::new([WorkCompletion::default(); 32]),
            srq_depth: self.srq_depth,
            srq: None,
            qpn_slot: HashMap::new(),
            armed: std::cell::Cell::new(false),
        })
    }
}

// `WrId` kinds of this transport's work requests.
const KIND_RECV: u8 = 1;
const KIND_READ: u8 = 2;
const KIND_WRITE: u8 = 3;
const KIND_SEND: u8 = 4;
/// A response SEND chained behind an unsignaled data WRITE (tag = the WRITE's): the
/// WRITE completed before it (one RC send queue completes in order), so its completion
/// also reports that transfer.
const KIND_SEND_AFTER_WRITE: u8 = 5;
/// The unsignaled WRITE of such a chain: it reports only if it fails.
const KIND_WRITE_CHAINED: u8 = 6;
/// Work requests per `ibv_post_send` call of [`RdmaQpair`]'s flush.
const POST_CHAIN: usize = 16;
/// Slot number marking receives posted to the poll group's SRQ (the QP is found by number).
const SRQ_SLOT: u16 = u16::MAX;
/// Default SRQ depth per poll group (SPDK uses 4096; the Linux target has SRQ off).
pub const DEFAULT_SRQ_DEPTH: u32 = 1024;

/// Registered receive buffers: a queue pair's own ring, or a poll group's SRQ ring.
struct RecvRing {
    buf: RegisteredBuffer,
    stride: usize,
    srq: Option<Arc<SharedReceiveQueue>>,
}

impl RecvRing {
    fn sge(&self, idx: u16) -> Result<Sge> {
        self.buf
            .mr()
            .sge(usize::from(idx) * self.stride, self.stride)
            .map_err(rdma_err("recv sge"))
    }

    /// Posts receive `idx` (to the SRQ, or to `qp`'s own receive queue).
    fn post(&self, id: WrId, idx: u16, qp: Option<&rdma::QueuePair>) -> Result<()> {
        let mut batch = RecvBatch::<1>::new();
        batch
            .recv(id, Some(self.sge(idx)?))
            .map_err(rdma_err("recv"))?;
        match (&self.srq, qp) {
            (Some(srq), _) => srq.post_recv(&mut batch).map_err(rdma_err("post SRQ recv")),
            (None, Some(qp)) => qp.post_recv(&mut batch).map_err(rdma_err("post recv")),
            (None, None) => Ok(()),
        }
    }

    fn srq_id(idx: u16) -> WrId {
        WrId::new(KIND_RECV, u32::from(idx)).with_queue(SRQ_SLOT, 0)
    }
}

/// The id of work request `kind` on `tag` of the queue pair in `slot`, generation `gen`.
const fn wr_id(gen: u16, slot: u16, kind: u8, tag: u16) -> WrId {
    WrId::new(kind, tag as u32).with_queue(slot, gen)
}

/// Completion-side state of one queue pair, filled by the poll group's CQ dispatch (the
/// group owns the queue pair: one thread, no lock).
struct QpState {
    recvs: VecDeque<(u16, u32)>,
    transfers: VecDeque<TransferDone>,
    sq_used: u32,
    error: bool,
}

/// A queue pair of the group, or the place of one that is gone; `gen` tells a late
/// completion for the old one from those of the queue pair reusing the slot.
struct Slot {
    gen: u16,
    qp: Option<RdmaQpair>,
}

/// Per-core RDMA state: one CQ for every queue pair of the group, the pool's MR.
///
/// Field order is drop order: the queue pairs first.
pub struct RdmaPollGroup {
    slots: Vec<Slot>,
    pd: Arc<ProtectionDomain>,
    cq: Arc<CompletionQueue>,
    chan: Arc<CompletionChannel>,
    pool_mr: Option<Arc<MemoryRegion>>,
    wcs: Box<[WorkCompletion; 32]>,
    srq_depth: u32,
    srq: Option<Arc<RecvRing>>,
    qpn_slot: HashMap<u32, u16>,
    /// The CQ is armed and its event not yet read from the channel: arming again would
    /// be a wasted `ibv_req_notify_cq` system call.
    armed: std::cell::Cell<bool>,
}

impl RdmaPollGroup {
    /// The completion channel fd (readable after [`RdmaPollGroup::arm`] and a completion).
    pub fn wake_fd(&self) -> RawFd {
        self.chan.fd()
    }

    /// Arms the CQ for one wake-up unless it still is (its event not yet taken by
    /// [`RdmaPollGroup::woken`]). Returns whether it armed now: then the caller polls
    /// once more before sleeping (a completion between its last poll and the arm raises
    /// no event); an arm still pending fires on any completion since it was set.
    pub fn arm(&self) -> Result<bool> {
        if self.armed.get() {
            return Ok(false);
        }
        self.cq.arm(false).map_err(rdma_err("arm CQ"))?;
        self.armed.set(true);
        Ok(true)
    }

    /// After a sleep in which [`RdmaPollGroup::wake_fd`] became readable: reads and
    /// acknowledges the channel's events (the CQ must be armed again). Called only then,
    /// so no sleep pays a `read` that finds nothing.
    pub fn woken(&self) -> Result<()> {
        // One CQ on the channel, armed once: at most one event.
        if self.chan.take_event().map_err(rdma_err("CQ event"))? {
            self.armed.set(false);
        }
        Ok(())
    }

    fn dispatch(&mut self, wc: &WorkCompletion) {
        let id = wc.wr_id();
        // Tags of this transport are u16 (receive index, command tag): exact.
        let (gen, slot, kind, tag) = (id.gen(), id.slot(), id.kind(), id.tag() as u16);
        if slot == SRQ_SLOT && kind == KIND_RECV {
            return self.dispatch_srq_recv(wc, tag);
        }
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        let Some(qp) = s.qp.as_mut().filter(|_| s.gen == gen) else {
            return; // a late flush for a queue pair that is gone
        };
        let ok = wc.is_ok();
        let st = &mut qp.state;
        if !ok {
            if !st.error {
                tracing::debug!(slot, kind, status = %wc.status(), "work completion error");
            }
            st.error = true;
        }
        match kind {
            KIND_RECV if ok => st.recvs.push_back((tag, wc.byte_len())),
            KIND_READ | KIND_WRITE => {
                st.sq_used = st.sq_used.saturating_sub(1);
                st.transfers.push_back(TransferDone { tag, ok });
            }
            KIND_SEND => st.sq_used = st.sq_used.saturating_sub(1),
            KIND_SEND_AFTER_WRITE => {
                st.sq_used = st.sq_used.saturating_sub(2);
                st.transfers.push_back(TransferDone { tag, ok });
            }
            _ => {}
        }
    }
}

impl RdmaPollGroup {
    /// A receive on the SRQ: hand it to the queue pair it arrived on, or give the buffer
    /// straight back to the SRQ when that queue pair is gone.
    fn dispatch_srq_recv(&mut self, wc: &WorkCompletion, idx: u16) {
        let Some(ring) = self.srq.clone() else { return };
        if !wc.is_ok() {
            return; // flushed at SRQ destruction
        }
        let live = self
            .qpn_slot
            .get(&wc.qp_num())
            .and_then(|&slot| self.slots.get_mut(usize::from(slot)))
            .and_then(|s| s.qp.as_mut());
        match live {
            Some(qp) => qp.state.recvs.push_back((idx, wc.byte_len())),
            None => {
                if let Err(e) = ring.post(RecvRing::srq_id(idx), idx, None) {
                    tracing::warn!(error = %e, "SRQ repost");
                }
            }
        }
    }

    fn srq_ring(&mut self, stride: usize) -> Result<Option<Arc<RecvRing>>> {
        if self.srq_depth == 0 {
            return Ok(None);
        }
        if let Some(r) = &self.srq {
            return Ok(Some(r.clone()));
        }
        let depth = self.srq_depth;
        let srq = SharedReceiveQueue::new(&self.pd, depth, 1).map_err(rdma_err("create SRQ"))?;
        let buf = RegisteredBuffer::new(&self.pd, stride * depth as usize, Access::LOCAL_WRITE)
            .map_err(rdma_err("SRQ ring"))?;
        let ring = Arc::new(RecvRing {
            buf,
            stride,
            srq: Some(srq),
        });
        for idx in 0..depth as u16 {
            ring.post(RecvRing::srq_id(idx), idx, None)?;
        }
        tracing::info!(depth, "shared receive queue");
        self.srq = Some(ring.clone());
        Ok(Some(ring))
    }
}

impl WirePollGroup for RdmaPollGroup {
    type Qpair = RdmaQpair;
    type Incoming = RdmaIncoming;

    unsafe fn register_memory(&mut self, base: *mut u8, len: usize) -> Result<()> {
        // SAFETY: the caller keeps [base, base+len) allocated until this group is dropped
        // (which drops the MR first) and touches a buffer only while no WR on it is in
        // flight; the MR has local write only, so no peer can reach it.
        let mr = unsafe { MemoryRegion::register(&self.pd, base, len, Access::LOCAL_WRITE) }
            .map_err(rdma_err("register buffer pool"))?;
        self.pool_mr = Some(Arc::new(mr));
        Ok(())
    }

    fn accept(
        &mut self,
        incoming: RdmaIncoming,
        accept: &CmAccept,
        entries: u16,
        icd_size: u32,
    ) -> Result<QpId> {
        let pool = self.pool_mr.clone().ok_or(Error::PoolNotRegistered)?;
        let stride = 64 + icd_size as usize;
        let shared = self.srq_ring(stride)?;
        let ring = match &shared {
            Some(r) => r.clone(),
            None => Arc::new(RecvRing {
                buf: RegisteredBuffer::new(
                    &self.pd,
                    stride * usize::from(entries),
                    Access::LOCAL_WRITE,
                )
                .map_err(rdma_err("receive ring"))?,
                stride,
                srq: None,
            }),
        };
        // Reuse the slot of a queue pair that is gone, in its next generation.
        let (slot, gen) = match self.slots.iter().position(|s| s.qp.is_none()) {
            Some(i) => (i, self.slots[i].gen.wrapping_add(1)),
            None => (self.slots.len(), 0),
        };
        // SRQ_SLOT marks shared receives: queue pairs use the slots below it.
        let slot16 = u16::try_from(slot).ok().filter(|&s| s != SRQ_SLOT).ok_or(
            Error::TooManyQueuePairs {
                max: usize::from(SRQ_SLOT),
            },
        )?;
        let sq_max = 2 * u32::from(entries) + 2;
        let init = QpInit {
            send_cq: self.cq.clone(),
            recv_cq: self.cq.clone(),
            srq: shared.as_ref().and_then(|r| r.srq.clone()),
            max_send_wr: sq_max,
            max_recv_wr: u32::from(entries),
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
            sq_sig_all: false,
        };
        let conn = incoming
            .req
            .accept(&self.pd, &init, accept.as_bytes())
            .map_err(rdma_err("accept"))?;
        let state = QpState {
            recvs: VecDeque::with_capacity(usize::from(entries)),
            transfers: VecDeque::with_capacity(2 * usize::from(entries)),
            sq_used: 0,
            error: false,
        };
        let qp = RdmaQpair {
            conn,
            ring,
            state,
            link: incoming.link,
            pool,
            gen,
            slot: slot16,
            sq_max,
            pending: Vec::with_capacity(sq_max as usize),
        };
        if qp.ring.srq.is_none() {
            for idx in 0..entries {
                qp.ring.post(qp.recv_id(idx), idx, Some(qp.conn.qp()))?;
            }
        }
        self.qpn_slot.insert(qp.conn.qp().qp_num(), slot16);
        let qp = Some(qp);
        match self.slots.get_mut(slot) {
            Some(s) => *s = Slot { gen, qp },
            None => self.slots.push(Slot { gen, qp }),
        }
        Ok(QpId(u32::from(slot16)))
    }

    fn qpair(&mut self, id: QpId) -> Option<&mut RdmaQpair> {
        self.slots.get_mut(id.0 as usize)?.qp.as_mut()
    }

    fn remove(&mut self, id: QpId) {
        let Some(qp) = self.slots.get_mut(id.0 as usize).and_then(|s| s.qp.take()) else {
            return;
        };
        self.qpn_slot.remove(&qp.conn.qp().qp_num());
        drop(qp); // QP, CM id, then its receive ring (RdmaQpair's field order)
    }

    fn poll(&mut self) -> usize {
        let n = match self.cq.poll(&mut self.wcs[..]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "ibv_poll_cq");
                0
            }
        };
        for i in 0..n {
            let wc = self.wcs[i];
            self.dispatch(&wc);
        }
        n
    }
}

/// One NVMe-oF queue on an RC queue pair.
///
/// Field order is drop order: the connection (QP, then CM id) before the receive ring.
pub struct RdmaQpair {
    conn: Connection,
    ring: Arc<RecvRing>,
    state: QpState,
    link: Arc<Link>,
    pool: Arc<MemoryRegion>,
    gen: u16,
    slot: u16,
    sq_max: u32,
    /// Work requests queued since the last [`Qpair::flush`] (capacity `sq_max`: never
    /// grows).
    pending: Vec<PendingWr>,
}

/// A send-queue work request held until [`Qpair::flush`] posts the chain.
#[derive(Clone, Copy)]
enum PendingWr {
    /// RDMA READ or WRITE; `signaled` is false for a WRITE whose response SEND follows.
    Transfer {
        kind: u8,
        tag: u16,
        sge: Sge,
        remote: RemoteAddr,
        signaled: bool,
    },
    /// A response (inline); `after_write` is the tag of the WRITE chained before it.
    Send {
        after_write: Option<u16>,
        cqe: [u8; 16],
    },
}

impl RdmaQpair {
    fn recv_id(&self, idx: u16) -> WrId {
        if self.ring.srq.is_some() {
            RecvRing::srq_id(idx)
        } else {
            wr_id(self.gen, self.slot, KIND_RECV, idx)
        }
    }

    fn repost(&mut self, idx: u16) {
        if let Err(e) = self.ring.post(self.recv_id(idx), idx, Some(self.conn.qp())) {
            tracing::debug!(error = %e, "repost recv");
            self.state.error = true;
        }
    }

    /// An SGE for `local`, which must lie in the registered pool.
    fn pool_sge(&self, local: *const u8, len: usize) -> Option<Sge> {
        let off = (local as u64).checked_sub(self.pool.addr())?;
        self.pool.sge(usize::try_from(off).ok()?, len).ok()
    }

    /// Queues an RDMA READ or WRITE between `remote` and `local` (a pool buffer's
    /// address and length, [`RemoteBuf::span`]; `None`: it does not fit, reported failed).
    fn post_transfer(
        &mut self,
        kind: u8,
        tag: u16,
        remote: RemoteBuf,
        local: Option<(*mut u8, usize)>,
    ) -> Result<(), Busy> {
        if self.state.sq_used >= self.sq_max {
            return Err(Busy);
        }
        let Some(sge) = local.and_then(|(ptr, len)| self.pool_sge(ptr, len)) else {
            self.state
                .transfers
                .push_back(TransferDone { tag, ok: false });
            return Ok(());
        };
        self.state.sq_used += 1;
        self.pending.push(PendingWr::Transfer {
            kind,
            tag,
            sge,
            remote: RemoteAddr {
                addr: remote.addr,
                rkey: remote.key,
            },
            signaled: true,
        });
        Ok(())
    }

    /// Posts `self.pending[from..]` as chains of up to [`POST_CHAIN`] WRs; returns the
    /// index of the first WR not posted and the error, if a post failed.
    fn post_pending(&self, from: usize) -> std::result::Result<(), (usize, rdma::Error)> {
        let mut i = from;
        while i < self.pending.len() {
            let start = i;
            let mut batch = SendBatch::<POST_CHAIN>::new();
            while i < self.pending.len() && batch.len() < POST_CHAIN {
                let built = match &self.pending[i] {
                    PendingWr::Transfer {
                        kind,
                        tag,
                        sge,
                        remote,
                        signaled,
                    } => {
                        let flags = if *signaled {
                            SendFlags::SIGNALED
                        } else {
                            SendFlags::NONE
                        };
                        let (kind, k) = match (*kind, *signaled) {
                            (KIND_WRITE, false) => (KIND_WRITE_CHAINED, KIND_WRITE),
                            (k, _) => (k, k),
                        };
                        let id = wr_id(self.gen, self.slot, kind, *tag);
                        if k == KIND_READ {
                            batch.read(id, *sge, *remote, flags).map(|_| ())
                        } else {
                            batch.write(id, *sge, *remote, flags).map(|_| ())
                        }
                    }
                    PendingWr::Send { after_write, cqe } => {
                        let id = match after_write {
                            Some(t) => wr_id(self.gen, self.slot, KIND_SEND_AFTER_WRITE, *t),
                            None => wr_id(self.gen, self.slot, KIND_SEND, 0),
                        };
                        batch.send_inline(id, cqe, SendFlags::SIGNALED).map(|_| ())
                    }
                };
                if let Err(e) = built {
                    return Err((i, e));
                }
                i += 1;
            }
            if let Err(e) = self.conn.qp().post_send(&mut batch) {
                let index = match &e {
                    rdma::Error::Post { index, .. } => *index,
                    _ => 0,
                };
                return Err((start + index, e));
            }
        }
        Ok(())
    }
}

impl Qpair for RdmaQpair {
    fn poll_capsule(&mut self, cmd: &mut [u8; 64], icd: &mut [u8]) -> Option<Received> {
        let (idx, len) = self.state.recvs.pop_front()?;
        let off = usize::from(idx) * self.ring.stride;
        let len = len as usize;
        if len < 64 {
            tracing::warn!(len, "short command capsule: disconnecting");
            self.repost(idx);
            self.state.error = true;
            return None;
        }
        let n = (len - 64).min(icd.len());
        let copied = self
            .ring
            .buf
            .read(off, cmd)
            .and_then(|_| self.ring.buf.read(off + 64, &mut icd[..n]));
        self.repost(idx);
        match copied {
            Ok(()) => Some(Received { icd_len: len - 64 }),
            Err(e) => {
                tracing::warn!(error = %e, "copy capsule");
                self.state.error = true;
                None
            }
        }
    }

    fn capsules_waiting(&self) -> usize {
        self.state.recvs.len()
    }

    fn post_read(&mut self, tag: u16, remote: RemoteBuf, local: &DataBuf) -> Result<(), Busy> {
        self.post_transfer(KIND_READ, tag, remote, remote.span(local))
    }

    fn post_write(&mut self, tag: u16, remote: RemoteBuf, local: &DataBuf) -> Result<(), Busy> {
        self.post_transfer(KIND_WRITE, tag, remote, remote.span(local))
    }

    fn poll_transfer(&mut self) -> Option<TransferDone> {
        self.state.transfers.pop_front()
    }

    fn send_response(&mut self, cqe: &Cqe, _invalidate: Option<u32>) -> Result<(), Busy> {
        // The host invalidates its key itself when the response does not (Linux checks
        // IB_WC_WITH_INVALIDATE); SEND_WITH_INV needs a builder the rdma crate lacks yet.
        let st = &mut self.state;
        if st.sq_used >= self.sq_max {
            return Err(Busy);
        }
        st.sq_used += 1;
        // Right behind a data WRITE (a read's result), the SEND reports both: the WRITE
        // needs no completion of its own (one CQE, and one chain per read).
        let after_write = match self.pending.last_mut() {
            Some(PendingWr::Transfer {
                kind: KIND_WRITE,
                tag,
                signaled,
                ..
            }) if *signaled => {
                *signaled = false;
                Some(*tag)
            }
            _ => None,
        };
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(cqe.as_bytes());
        self.pending.push(PendingWr::Send {
            after_write,
            cqe: bytes,
        });
        Ok(())
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Err((bad, e)) = self.post_pending(0) {
            tracing::debug!(error = %e, "post send chain");
            let st = &mut self.state;
            st.error = true;
            // WRs from `bad` on were not posted: report their transfers as failed (a
            // chained WRITE that went out without its SEND has no completion either).
            for (i, wr) in self.pending.iter().enumerate().skip(bad) {
                st.sq_used = st.sq_used.saturating_sub(1);
                match *wr {
                    PendingWr::Transfer { tag, .. } => {
                        st.transfers.push_back(TransferDone { tag, ok: false })
                    }
                    PendingWr::Send {
                        after_write: Some(tag),
                        ..
                    } if i == bad => st.transfers.push_back(TransferDone { tag, ok: false }),
                    PendingWr::Send { .. } => {}
                }
            }
        }
        self.pending.clear();
    }

    fn is_connected(&self) -> bool {
        self.link.connected.load(Ordering::Acquire) && !self.state.error
    }

    fn disconnect(&mut self) {
        self.link.connected.store(false, Ordering::Release);
        if let Err(e) = self.conn.disconnect() {
            tracing::debug!(error = %e, "rdma_disconnect");
        }
    }
}

impl Drop for RdmaQpair {
    fn drop(&mut self) {
        // Receives taken from the shared queue but never consumed go back to it.
        if self.ring.srq.is_some() {
            while let Some((idx, _)) = self.state.recvs.pop_front() {
                if let Err(e) = self.ring.post(RecvRing::srq_id(idx), idx, None) {
                    tracing::warn!(error = %e, "SRQ repost at teardown");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wr_id_round_trip() {
        let decode = |id: WrId| (id.gen(), id.slot(), id.kind(), id.tag() as u16);
        let id = wr_id(0xbeef, 513, KIND_WRITE, 0x7fff);
        assert_eq!(decode(id), (0xbeef, 513, KIND_WRITE, 0x7fff));
        assert_eq!(decode(wr_id(0, 0, KIND_RECV, 0)), (0, 0, KIND_RECV, 0));
        assert_eq!(
            decode(wr_id(u16::MAX, u16::MAX, KIND_SEND_AFTER_WRITE, u16::MAX)),
            (u16::MAX, u16::MAX, KIND_SEND_AFTER_WRITE, u16::MAX)
        );
        assert_eq!(
            decode(RecvRing::srq_id(7)),
            (0, SRQ_SLOT, KIND_RECV, 7),
            "SRQ receives are marked by their slot"
        );
    }
}
