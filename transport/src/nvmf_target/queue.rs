//! One queue (admin or I/O): preallocated requests and the per-request state machine.
//!
//! ```text
//! FREE → NEW ─parse─┬─ error ──────────────────────────────────────────┐
//!                   ├─ no data / in-capsule ─→ EXECUTING ─┬─ host→ctrl ──┤
//!                   └─ keyed → NEED_BUFFER ─(pool)─┐      └─ ctrl→host → TRANSFER_OUT
//!                        host→ctrl: TRANSFER_IN ←──┘            (RDMA WRITE)   │
//!                        (RDMA READ) → EXECUTING                               ↓
//!                                      AER: AWAIT_EVENT ─────→ COMPLETING (send CQE) → FREE
//! ```
//!
//! I/O commands on a namespace with an asynchronous channel in this poll group leave
//! EXECUTING for BACKEND (submitted to the device, the pool buffer handed to it) and come
//! back, when the group routes the channel's completion here, to TRANSFER_OUT (reads) or
//! COMPLETING.
//!
//! A direct-mode attach leaves EXECUTING for AWAIT_REPLY: its provider builds the queue
//! off the poll group (admin commands to the device take milliseconds) and answers through
//! an [`AttachReply`](crate::direct::AttachReply), which wakes the group; the descriptor
//! then goes out like any ctrl→host data (TRANSFER_OUT).
//!
//! In TRANSFER_OUT the response is sent right behind the posted RDMA WRITE (the
//! connection is reliable and ordered); the request is freed when the WRITE completes.
//!
//! A request waits in NEED_BUFFER while the pool is empty, in EXECUTING while the backend
//! channel is full, and in NEED_BUFFER / TRANSFER_OUT / COMPLETING while the wire is busy:
//! commands are never dropped. Teardown waits for requests in TRANSFER_IN/OUT and BACKEND
//! before it frees their buffers (the NIC or the device may still access them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme::spec::{admin_opc, io_opc, Cqe, Sqe, Status, U16, U32};
use nvme::EventFd;
use zerocopy::{FromBytes, IntoBytes};

use super::controller::Controller;
use super::{admin, io, TargetShared};
use crate::backend::{Backend, IoChannel};
use crate::direct::AttachPending;
use crate::fabrics::{
    DataSgl, SglDescriptor, FCTYPE_CONNECT, FCTYPE_DISCONNECT, FCTYPE_PROPERTY_GET,
    FCTYPE_PROPERTY_SET, OPC_FABRICS,
};
use crate::pool::{BufferPool, DataBuf};
use crate::wire::{QpId, Qpair, RemoteBuf, TransferDone};

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqState {
    /// Unused slot.
    Free,
    /// Capsule received, not yet parsed.
    New,
    /// Waiting for a data buffer (or for the wire to take the RDMA READ).
    NeedBuffer,
    /// RDMA READ of host data in flight.
    TransferIn,
    /// Ready to execute.
    Executing,
    /// Submitted to an asynchronous backend; waiting for its completion.
    Backend,
    /// An Asynchronous Event Request held until an event occurs.
    AwaitEvent,
    /// A direct-mode attach waiting for its provider's answer (built off the poll group,
    /// see [`DirectAttach`](crate::direct::DirectAttach)).
    AwaitReply,
    /// Result data to send: RDMA WRITE posted (`posted`) or waiting for the wire.
    TransferOut,
    /// Response to send.
    Completing,
}

/// Data direction of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    None,
    ToCtrl,
    FromCtrl,
}

/// Where a request's data is.
#[derive(Debug)]
pub(crate) enum Data {
    None,
    InCapsule {
        offset: usize,
        len: usize,
    },
    /// A pool buffer the request owns until it is freed (the NIC uses it in
    /// TRANSFER_IN and in TRANSFER_OUT once posted, the device in BACKEND).
    Pool {
        buf: DataBuf,
        len: usize,
    },
}

impl Data {
    /// Bytes of data.
    pub fn len(&self) -> usize {
        match *self {
            Data::None => 0,
            Data::InCapsule { len, .. } | Data::Pool { len, .. } => len,
        }
    }

    /// The data for the CPU (a synchronous backend, an admin command): in the capsule
    /// (`icd`, the request's in-capsule data) or in the pool buffer.
    ///
    /// # Safety
    /// No transfer and no device command on the pool buffer may be in flight while the
    /// slice lives: the request is in EXECUTING, where its RDMA READ has completed, its
    /// RDMA WRITE is not posted yet and it is in no backend channel.
    pub unsafe fn bytes_mut<'a>(&'a mut self, icd: &'a mut [u8]) -> &'a mut [u8] {
        match self {
            Data::None => &mut [],
            Data::InCapsule { offset, len } => &mut icd[*offset..*offset + *len],
            // SAFETY: the caller's guarantee; the request owns `buf` and the pool outlives
            // the queues (PollGroup field order).
            Data::Pool { buf, len } => unsafe { buf.bytes_mut(*len) },
        }
    }
}

/// What executing a command produced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outcome {
    pub status: Status,
    /// CQE DW0 | DW1 << 32.
    pub result: u64,
    /// Bytes of result data to send to the host (ctrl→host commands).
    pub out_len: usize,
    /// Parameter error location for the error log.
    pub loc: u16,
    /// Hold the request (Asynchronous Event Request).
    pub park: bool,
}

impl Outcome {
    pub fn ok() -> Self {
        Outcome {
            status: Status::SUCCESS,
            result: 0,
            out_len: 0,
            loc: 0xffff,
            park: false,
        }
    }
    pub fn data(out_len: usize) -> Self {
        Outcome {
            out_len,
            ..Self::ok()
        }
    }
    pub fn result(result: u64) -> Self {
        Outcome {
            result,
            ..Self::ok()
        }
    }
    pub fn err(status: Status, loc: u16) -> Self {
        Outcome {
            status: status.with_dnr(),
            loc,
            ..Self::ok()
        }
    }
    /// A device's status, passed to the host as is (DNR and all: an abort by a
    /// controller reset stays retryable).
    pub fn failed(status: Status) -> Self {
        Outcome {
            status,
            loc: loc::CDW10,
            ..Self::ok()
        }
    }
    /// The request's next state after executing with this outcome.
    fn next_state(&self, dir: Dir) -> ReqState {
        if self.park {
            ReqState::AwaitEvent
        } else if self.status.is_success() && dir == Dir::FromCtrl && self.out_len > 0 {
            ReqState::TransferOut
        } else {
            ReqState::Completing
        }
    }
}

struct Request {
    state: ReqState,
    posted: bool,
    /// TRANSFER_OUT: the response went out behind the posted RDMA WRITE.
    responded: bool,
    cmd: Sqe,
    icd: Box<[u8]>,
    icd_len: usize,
    sgl: Option<DataSgl>,
    dir: Dir,
    data: Data,
    out: Outcome,
    /// AWAIT_REPLY: where the provider's answer arrives.
    reply: Option<AttachPending>,
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Queue id.
    pub qid: u16,
    /// Controller id (0 before Connect).
    pub cntlid: u16,
    /// Commands received.
    pub commands: u64,
    /// Commands completed with an error status.
    pub errors: u64,
    /// Times a request waited for a data buffer.
    pub buffer_waits: u64,
    /// Times the wire was busy (send credits / WR slots).
    pub wire_busy: u64,
    /// Commands submitted to an asynchronous backend channel.
    pub backend_commands: u64,
    /// Times the backend channel was full (the command waited).
    pub backend_busy: u64,
    /// Requests in use right now.
    pub in_flight: u16,
    /// Capsules beyond the queue's depth answered with Command Interrupted (a host that
    /// does not keep to its SQ size).
    pub overflows: u64,
}

/// Queue state other than the request array (so execution can borrow both).
pub(crate) struct QueueCtx {
    pub shared: Arc<TargetShared>,
    /// Queue id from the CM request; Connect must match it.
    pub qid: u16,
    /// Entries (CM hsqsize + 1).
    pub entries: u16,
    pub ctrl: Option<Arc<Controller>>,
    pub sqhd: u16,
    pub aers: usize,
    pub stats: QueueStats,
    /// Set by an admin command answered later (a direct attach): the request waits in
    /// AWAIT_REPLY for it.
    pub reply: Option<AttachPending>,
    /// The poll group's mailbox eventfd: an answer from another thread wakes the group.
    pub wake: Option<Arc<EventFd>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Live,
    Draining,
    Closed,
}

/// A poll group's asynchronous channel to one backend.
pub(crate) struct Channel {
    /// Identity of the backend ([`backend_id`]).
    pub backend: usize,
    pub chan: Box<dyn IoChannel>,
    /// Largest Read/Write the channel takes.
    pub max_transfer: usize,
}

/// Identity of a backend object (its `Arc`'s data pointer).
pub(crate) fn backend_id(b: &Arc<dyn Backend>) -> usize {
    Arc::as_ptr(b) as *const () as usize
}

/// A queue on the wire plus its preallocated requests. The queue pair itself lives in
/// the poll group's wire (which fills its completion state from the shared CQ: no lock,
/// no shared ownership); each method that touches it is handed it, `qp`, for the call.
pub(crate) struct QueueHandler {
    /// The queue pair in the poll group's wire ([`WirePollGroup::qpair`](crate::wire::WirePollGroup::qpair)).
    qp: QpId,
    /// Key of this queue in its poll group (the high bits of backend channel tags).
    key: u32,
    reqs: Box<[Request]>,
    free: Vec<u16>,
    ctx: QueueCtx,
    phase: Phase,
    next_ka_check: Option<Instant>,
    /// Some request can move without a new event (it waited for a buffer, the wire, the
    /// backend channel, or an asynchronous event), or a backend completion arrived.
    kick: bool,
    /// Until when the host may take to send Connect (set on the first poll).
    connect_deadline: Option<Instant>,
    /// CIDs of capsules beyond the queue's depth, to answer with Command Interrupted.
    overflow: std::collections::VecDeque<u16>,
}

const KA_CHECK_PERIOD: Duration = Duration::from_millis(10);

impl QueueHandler {
    pub fn new(
        qp: QpId,
        qid: u16,
        entries: u16,
        shared: Arc<TargetShared>,
        key: u32,
        wake: Option<Arc<EventFd>>,
    ) -> Self {
        let icd = shared.limits.in_capsule_data_size as usize;
        let reqs = (0..entries)
            .map(|_| Request {
                state: ReqState::Free,
                posted: false,
                responded: false,
                cmd: Sqe::default(),
                icd: vec![0u8; icd].into_boxed_slice(),
                icd_len: 0,
                sgl: None,
                dir: Dir::None,
                data: Data::None,
                out: Outcome::ok(),
                reply: None,
            })
            .collect();
        QueueHandler {
            qp,
            key,
            reqs,
            free: (0..entries).rev().collect(),
            ctx: QueueCtx {
                shared,
                qid,
                entries,
                ctrl: None,
                sqhd: 0,
                aers: 0,
                stats: QueueStats {
                    qid,
                    ..Default::default()
                },
                reply: None,
                wake,
            },
            phase: Phase::Live,
            next_ka_check: None,
            kick: false,
            connect_deadline: None,
            overflow: std::collections::VecDeque::with_capacity(usize::from(entries)),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// This queue's key in its poll group.
    pub fn key(&self) -> u32 {
        self.key
    }

    /// Its queue pair in the poll group's wire.
    pub fn qp(&self) -> QpId {
        self.qp
    }

    /// A backend channel finished request `tag` with `status`.
    pub fn backend_done(&mut self, tag: u16, status: Status) {
        let Some(req) = self.reqs.get_mut(usize::from(tag)) else {
            return;
        };
        if req.state != ReqState::Backend {
            tracing::warn!(tag, state = ?req.state, "backend completion for a request not in the backend");
            return;
        }
        self.kick = true;
        let out = if status.is_success() {
            Outcome::ok()
        } else {
            Outcome::failed(status)
        };
        req.out = match &self.ctx.ctrl {
            Some(ctrl) => io::complete(ctrl, &req.cmd, req.data.len(), out),
            None => out,
        };
        req.state = req.out.next_state(req.dir);
    }

    pub fn stats(&self) -> QueueStats {
        let mut s = self.ctx.stats;
        s.cntlid = self.ctx.ctrl.as_ref().map_or(0, |c| c.cntlid());
        s.in_flight = self.ctx.entries - self.free.len() as u16;
        s
    }

    pub fn begin_teardown<Q: Qpair>(&mut self, qp: &mut Q, why: &str) {
        if self.phase == Phase::Live {
            tracing::debug!(qid = self.ctx.qid, why, "queue teardown");
            qp.disconnect();
            self.phase = Phase::Draining;
        }
    }

    /// Drives the queue once; returns the work done. `chans` are the poll group's
    /// asynchronous backend channels; with `io_held` (a device reset is under way) no
    /// I/O command starts on a backend — they wait in EXECUTING.
    pub fn poll<Q: Qpair>(
        &mut self,
        qp: &mut Q,
        pool: &mut BufferPool,
        chans: &mut [Channel],
        now: Instant,
        io_held: bool,
    ) -> usize {
        match self.phase {
            Phase::Closed => return 0,
            Phase::Draining => return self.drain(qp, pool),
            Phase::Live => {}
        }
        if !qp.is_connected() {
            self.begin_teardown(qp, "disconnected by host");
            return 1 + self.drain(qp, pool);
        }
        if self.ctx.ctrl.is_none() {
            // A connection that never sends a (successful) Connect holds receive buffers
            // and a queue slot: dropped after the configured time.
            let timeout = self.ctx.shared.limits.connect_timeout;
            let deadline = *self.connect_deadline.get_or_insert(now + timeout);
            if !timeout.is_zero() && now >= deadline {
                tracing::warn!(
                    qid = self.ctx.qid,
                    timeout_ms = timeout.as_millis() as u64,
                    "no Connect within the connect timeout: connection dropped"
                );
                self.ctx
                    .shared
                    .connect_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                self.begin_teardown(qp, "connect timeout");
                return 1 + self.drain(qp, pool);
            }
        }
        if let Some(ctrl) = &self.ctx.ctrl {
            if !ctrl.is_alive() {
                self.begin_teardown(qp, "controller gone");
                return 1 + self.drain(qp, pool);
            }
            if self.ctx.qid == 0 && self.next_ka_check.is_none_or(|t| now >= t) {
                self.next_ka_check = Some(now + KA_CHECK_PERIOD);
                if ctrl.keep_alive_expired(now) {
                    tracing::warn!(
                        cntlid = ctrl.cntlid(),
                        "keep-alive timeout: controller torn down"
                    );
                    ctrl.fail();
                    self.begin_teardown(qp, "keep-alive timeout");
                    return 1 + self.drain(qp, pool);
                }
            }
        }
        let mut work = 0;
        while let Some(t) = qp.poll_transfer() {
            self.transfer_done(t, pool);
            work += 1;
        }
        while let Some(&tag) = self.free.last() {
            let req = &mut self.reqs[usize::from(tag)];
            let mut cmd = [0u8; 64];
            let Some(r) = qp.poll_capsule(&mut cmd, &mut req.icd) else {
                break;
            };
            self.free.pop();
            req.cmd = Sqe::read_from_bytes(&cmd).unwrap_or_default();
            req.icd_len = r.icd_len;
            req.state = ReqState::New;
            req.posted = false;
            req.responded = false;
            req.data = Data::None;
            self.ctx.sqhd = (self.ctx.sqhd + 1) % self.ctx.entries.max(1);
            self.ctx.stats.commands += 1;
            work += 1;
        }
        work += self.overflow_capsules(qp);
        // Requests waiting for an event (RDMA transfer, backend completion) cannot move
        // until one arrives: skip the pass over the slots when nothing happened.
        if self.free.len() < self.reqs.len() && (work > 0 || self.kick) {
            self.kick = false;
            for tag in 0..self.reqs.len() {
                work += self.advance(qp, tag, pool, chans, now, io_held);
                let r = &self.reqs[tag];
                self.kick |= match r.state {
                    ReqState::Free | ReqState::TransferIn | ReqState::Backend => false,
                    ReqState::TransferOut => !(r.posted && r.responded),
                    _ => true,
                };
            }
        }
        work
    }

    /// Every request is in use and still more capsules wait: the host sends beyond its
    /// SQ size. Each waiting capsule holds a receive buffer the poll group's queues share
    /// (the SRQ), so a host flooding one queue would starve the others; a queue may have
    /// one more depth of capsules waiting (responses just sent free their requests only
    /// when the wire reports them done, so a host keeping to its depth can be that far
    /// ahead), and each capsule beyond that is taken at once and answered with Command
    /// Interrupted (retryable: the host may send it again once it keeps to its depth).
    /// The connection lives. (A host must not submit to a full SQ; we know of no status
    /// the NVMe-oF specification assigns to a capsule that arrives anyway.)
    fn overflow_capsules<Q: Qpair>(&mut self, qp: &mut Q) -> usize {
        let mut work = 0;
        let depth = usize::from(self.ctx.entries);
        while self.free.is_empty() && qp.capsules_waiting() > depth {
            let mut cmd = [0u8; 64];
            if qp.poll_capsule(&mut cmd, &mut []).is_none() {
                break;
            }
            work += 1;
            self.ctx.stats.commands += 1;
            self.ctx.stats.overflows += 1;
            if self.ctx.stats.overflows == 1 || self.ctx.stats.overflows.is_power_of_two() {
                tracing::warn!(
                    qid = self.ctx.qid,
                    depth,
                    overflows = self.ctx.stats.overflows,
                    "capsule beyond the queue's depth: answered Command Interrupted"
                );
            }
            // Bounded: beyond one depth of unanswered overflows the capsule is dropped
            // unanswered (the host gets its timeout for it).
            if self.overflow.len() < depth {
                let cid = u16::from_le_bytes([cmd[2], cmd[3]]);
                self.overflow.push_back(cid);
            }
        }
        while let Some(&cid) = self.overflow.front() {
            let cqe = Cqe {
                dw0: U32::new(0),
                dw1: U32::new(0),
                sq_head: U16::new(self.ctx.sqhd),
                sq_id: U16::new(self.ctx.qid),
                cid: U16::new(cid),
                status: U16::new(Status::COMMAND_INTERRUPTED.to_field_with_phase(false)),
            };
            if qp.send_response(&cqe, None).is_err() {
                self.ctx.stats.wire_busy += 1;
                break;
            }
            self.overflow.pop_front();
            self.ctx.stats.errors += 1;
            work += 1;
        }
        work
    }

    fn transfer_done(&mut self, t: TransferDone, pool: &mut BufferPool) {
        let Some(req) = self.reqs.get_mut(usize::from(t.tag)) else {
            return;
        };
        if req.state == ReqState::TransferOut && req.responded {
            // The response already went out behind this WRITE (a failed WRITE breaks the
            // connection, so the host never takes that response): the buffer is ours again.
            self.finish(usize::from(t.tag), pool);
            return;
        }
        match (req.state, t.ok) {
            (ReqState::TransferIn, true) => req.state = ReqState::Executing,
            (ReqState::TransferOut, true) => req.state = ReqState::Completing,
            (ReqState::TransferIn | ReqState::TransferOut, false) => {
                req.out = Outcome::err(Status::DATA_TRANSFER_ERROR, 24);
                req.state = ReqState::Completing;
            }
            (s, _) => {
                tracing::warn!(tag = t.tag, state = ?s, "transfer completion for idle request")
            }
        }
    }

    /// Moves request `tag` forward as far as it can go now.
    fn advance<Q: Qpair>(
        &mut self,
        qp: &mut Q,
        tag: usize,
        pool: &mut BufferPool,
        chans: &mut [Channel],
        now: Instant,
        io_held: bool,
    ) -> usize {
        let mut steps = 0;
        loop {
            let req = &mut self.reqs[tag];
            let before = (req.state, req.posted);
            match req.state {
                ReqState::Free | ReqState::TransferIn | ReqState::Backend => break,
                ReqState::New => match parse(&self.ctx, req) {
                    Ok(next) => req.state = next,
                    Err(out) => {
                        req.out = out;
                        req.state = ReqState::Completing;
                    }
                },
                ReqState::NeedBuffer => {
                    if matches!(req.data, Data::None) {
                        let io = self.ctx.qid != 0 && req.cmd.opcode() != OPC_FABRICS;
                        match if io { pool.alloc_io() } else { pool.alloc() } {
                            Some(buf) => {
                                let len = sgl_len(req.sgl) as usize;
                                req.data = Data::Pool { buf, len };
                            }
                            None => {
                                self.ctx.stats.buffer_waits += 1;
                                break;
                            }
                        }
                    }
                    if req.dir == Dir::ToCtrl {
                        let Data::Pool { buf, len } = &req.data else {
                            break;
                        };
                        let mut remote = remote_of(req.sgl);
                        remote.len = *len as u32;
                        match qp.post_read(tag as u16, remote, buf) {
                            Ok(()) => req.state = ReqState::TransferIn,
                            Err(_) => {
                                self.ctx.stats.wire_busy += 1;
                                break;
                            }
                        }
                    } else {
                        req.state = ReqState::Executing;
                    }
                }
                ReqState::Executing => {
                    let cmd = req.cmd;
                    let out = match &self.ctx.ctrl {
                        Some(ctrl) if self.ctx.qid != 0 && cmd.opcode() != OPC_FABRICS => {
                            if io_held {
                                break;
                            }
                            let key = (u64::from(self.key) << 16) | tag as u64;
                            let started = io::start(
                                &self.ctx.shared,
                                ctrl,
                                &cmd,
                                &mut req.data,
                                &mut req.icd,
                                pool,
                                chans,
                                key,
                                &mut self.ctx.stats,
                            );
                            match started {
                                io::Started::Done(out) => out,
                                io::Started::InDevice => {
                                    req.state = ReqState::Backend;
                                    steps += 1;
                                    break;
                                }
                                io::Started::Wait => break,
                            }
                        }
                        _ if self.ctx.qid == 0 && cmd.opcode() == admin_opc::ABORT => {
                            self.abort(&cmd)
                        }
                        _ => {
                            // SAFETY: EXECUTING, and fabrics and admin commands never go
                            // to a backend channel.
                            let data = unsafe { req.data.bytes_mut(&mut req.icd) };
                            execute(&mut self.ctx, &cmd, data, now)
                        }
                    };
                    let req = &mut self.reqs[tag];
                    req.out = out;
                    req.state = out.next_state(req.dir);
                    if out.park {
                        self.ctx.aers += 1;
                    }
                    if let Some(p) = self.ctx.reply.take() {
                        req.reply = Some(p);
                        req.state = ReqState::AwaitReply;
                    }
                }
                ReqState::AwaitReply => {
                    let Some(r) = req.reply.as_ref().and_then(|p| p.try_take()) else {
                        break;
                    };
                    req.reply = None;
                    // SAFETY: an admin command that executed and has not moved on: no
                    // transfer or device command on its buffer.
                    let data = unsafe { req.data.bytes_mut(&mut req.icd) };
                    let out = admin::direct_reply(r, data);
                    req.out = out;
                    req.state = out.next_state(req.dir);
                }
                ReqState::AwaitEvent => {
                    let ev = self.ctx.ctrl.as_ref().and_then(|c| c.take_event());
                    match ev {
                        Some(dw0) => {
                            self.ctx.aers -= 1;
                            req.out = Outcome::result(u64::from(dw0));
                            req.state = ReqState::Completing;
                        }
                        None => break,
                    }
                }
                ReqState::TransferOut => {
                    if !req.posted {
                        let Data::Pool { buf, len } = &req.data else {
                            req.state = ReqState::Completing;
                            continue;
                        };
                        let n = req.out.out_len.min(*len);
                        let mut remote = remote_of(req.sgl);
                        remote.len = n as u32;
                        match qp.post_write(tag as u16, remote, buf) {
                            Ok(()) => req.posted = true,
                            Err(_) => {
                                self.ctx.stats.wire_busy += 1;
                                break;
                            }
                        }
                    }
                    if !req.responded {
                        // A reliable connection delivers the WRITE's data before the
                        // response that follows it, so the response need not wait for the
                        // WRITE's completion (Linux nvmet-rdma chains them the same way);
                        // the buffer stays the NIC's until that completion.
                        if self.respond(qp, tag) {
                            self.reqs[tag].responded = true;
                            steps += 1;
                        }
                    }
                    break;
                }
                ReqState::Completing => {
                    if !self.complete(qp, tag, pool) {
                        break;
                    }
                }
            }
            if (req_state(&self.reqs[tag]), self.reqs[tag].posted) == before {
                break;
            }
            steps += 1;
        }
        steps
    }

    /// Abort (CDW10: SQID bits 15:0, CID bits 31:16). A command still queued here — an
    /// Asynchronous Event Request waiting on this admin queue — completes with Abort
    /// Requested and DW0 bit 0 is 0; any other command (in flight on an I/O queue, in a
    /// device, or already done) runs to completion and DW0 bit 0 is 1, "not aborted".
    fn abort(&mut self, cmd: &Sqe) -> Outcome {
        let sqid = cmd.cdw10.get() as u16;
        let cid = (cmd.cdw10.get() >> 16) as u16;
        if sqid == self.ctx.qid {
            if let Some(r) = self
                .reqs
                .iter_mut()
                .find(|r| r.state == ReqState::AwaitEvent && r.cmd.cid() == cid)
            {
                r.out = Outcome {
                    status: Status::ABORT_REQUESTED,
                    loc: loc::OPCODE,
                    ..Outcome::ok()
                };
                r.state = ReqState::Completing;
                self.ctx.aers -= 1;
                self.kick = true;
                return Outcome::result(0);
            }
        }
        Outcome::result(1)
    }

    /// Sends the response of request `tag` and frees it; false when the wire is busy.
    fn complete<Q: Qpair>(&mut self, qp: &mut Q, tag: usize, pool: &mut BufferPool) -> bool {
        if !self.respond(qp, tag) {
            return false;
        }
        self.finish(tag, pool);
        true
    }

    /// Sends the response of request `tag`; false when the wire is busy.
    fn respond<Q: Qpair>(&mut self, qp: &mut Q, tag: usize) -> bool {
        let req = &self.reqs[tag];
        let out = req.out;
        let cid = req.cmd.cid();
        let cqe = Cqe {
            dw0: U32::new(out.result as u32),
            dw1: U32::new((out.result >> 32) as u32),
            sq_head: U16::new(self.ctx.sqhd),
            sq_id: U16::new(self.ctx.qid),
            cid: U16::new(cid),
            status: U16::new(out.status.to_field_with_phase(false)),
        };
        let invalidate = match req.sgl {
            Some(DataSgl::Keyed {
                key,
                invalidate: true,
                ..
            }) => Some(key),
            _ => None,
        };
        if qp.send_response(&cqe, invalidate).is_err() {
            self.ctx.stats.wire_busy += 1;
            return false;
        }
        if !out.status.is_success() {
            tracing::debug!(
                qid = self.ctx.qid,
                cid,
                opcode = req.cmd.opcode(),
                cdw10 = req.cmd.cdw10.get(),
                status = %out.status,
                loc = out.loc,
                "command failed"
            );
            self.ctx.stats.errors += 1;
            if let Some(ctrl) = &self.ctx.ctrl {
                let c = &req.cmd;
                let lba = if self.ctx.qid != 0 { c.slba() } else { 0 };
                ctrl.log_error(self.ctx.qid, cid, out.status, out.loc, lba, c.nsid.get());
            }
        }
        true
    }

    /// Returns request `tag`'s buffer and slot.
    fn finish(&mut self, tag: usize, pool: &mut BufferPool) {
        let req = &mut self.reqs[tag];
        if let Data::Pool { buf, .. } = std::mem::replace(&mut req.data, Data::None) {
            pool.release(buf);
        }
        req.sgl = None;
        req.reply = None;
        req.state = ReqState::Free;
        req.posted = false;
        req.responded = false;
        self.free.push(tag as u16);
    }

    /// Teardown: wait for posted transfers to be flushed, then free everything.
    fn drain<Q: Qpair>(&mut self, qp: &mut Q, pool: &mut BufferPool) -> usize {
        let mut work = 0;
        while let Some(t) = qp.poll_transfer() {
            if let Some(req) = self.reqs.get_mut(usize::from(t.tag)) {
                if matches!(req.state, ReqState::TransferIn | ReqState::TransferOut) {
                    req.state = ReqState::Completing;
                    req.posted = false;
                }
            }
            work += 1;
        }
        // The NIC (posted transfers) or the device (commands in the backend) may still
        // access these requests' buffers.
        let in_wire = self.reqs.iter().any(|r| {
            r.state == ReqState::TransferIn
                || r.state == ReqState::Backend
                || (r.state == ReqState::TransferOut && r.posted)
        });
        if in_wire {
            return work;
        }
        for (tag, req) in self.reqs.iter_mut().enumerate() {
            if req.state != ReqState::Free {
                if let Data::Pool { buf, .. } = std::mem::replace(&mut req.data, Data::None) {
                    pool.release(buf);
                }
                // An attach still being built is dropped by its provider when the answer
                // finds nobody waiting.
                req.reply = None;
                req.state = ReqState::Free;
                self.free.push(tag as u16);
            }
        }
        if let Some(ctrl) = self.ctx.ctrl.take() {
            if self.ctx.qid == 0 {
                ctrl.kill();
                self.ctx.shared.remove_controller(ctrl.cntlid());
            } else {
                ctrl.release_io_queue(self.ctx.qid);
            }
        }
        self.phase = Phase::Closed;
        work + 1
    }
}

fn req_state(r: &Request) -> ReqState {
    r.state
}

fn sgl_len(sgl: Option<DataSgl>) -> u32 {
    match sgl {
        Some(DataSgl::Keyed { len, .. }) | Some(DataSgl::InCapsule { len, .. }) => len,
        None => 0,
    }
}

fn remote_of(sgl: Option<DataSgl>) -> RemoteBuf {
    match sgl {
        Some(DataSgl::Keyed { addr, len, key, .. }) => RemoteBuf { addr, len, key },
        _ => RemoteBuf {
            addr: 0,
            len: 0,
            key: 0,
        },
    }
}

/// Byte offsets used as parameter error locations.
pub(crate) mod loc {
    pub const FLAGS: u16 = 1;
    pub const NSID: u16 = 4;
    pub const FCTYPE: u16 = 4;
    pub const OPCODE: u16 = 0;
    pub const SGL: u16 = 24;
    pub const SGL_ID: u16 = 39;
    pub const CDW10: u16 = 40;
    pub const CDW11: u16 = 44;
    pub const CDW12: u16 = 48;
    pub const CDW14: u16 = 56;
}

/// What a command needs, decided by opcode before anything executes.
struct Shape {
    dir: Dir,
    /// Exact data length required (`Some`) or the maximum useful length (`None` + max).
    exact: Option<u32>,
    max: u32,
}

fn shape_none() -> Shape {
    Shape {
        dir: Dir::None,
        exact: None,
        max: 0,
    }
}

/// Validates a new command and decides its next state (parse, then execute).
fn parse(ctx: &QueueCtx, req: &mut Request) -> Result<ReqState, Outcome> {
    let cmd = &req.cmd;
    if cmd.fuse() != 0 || cmd.psdt() != 1 {
        return Err(Outcome::err(Status::INVALID_FIELD, loc::FLAGS));
    }
    let opc = cmd.opcode();
    let fctype = cmd.as_bytes()[4];
    let shape = match &ctx.ctrl {
        None => {
            if opc != OPC_FABRICS || fctype != FCTYPE_CONNECT {
                return Err(Outcome::err(Status::COMMAND_SEQUENCE_ERROR, loc::OPCODE));
            }
            Shape {
                dir: Dir::ToCtrl,
                exact: Some(1024),
                max: 1024,
            }
        }
        Some(ctrl) => {
            if opc == OPC_FABRICS {
                match fctype {
                    FCTYPE_PROPERTY_GET | FCTYPE_PROPERTY_SET if ctx.qid == 0 => shape_none(),
                    FCTYPE_DISCONNECT if ctx.qid != 0 => shape_none(),
                    FCTYPE_CONNECT => {
                        return Err(Outcome::err(Status::COMMAND_SEQUENCE_ERROR, loc::FCTYPE))
                    }
                    _ => return Err(Outcome::err(Status::INVALID_OPCODE, loc::FCTYPE)),
                }
            } else if !ctrl.is_ready() {
                return Err(Outcome::err(Status::COMMAND_SEQUENCE_ERROR, loc::OPCODE));
            } else if ctx.qid == 0 {
                admin_shape(cmd)?
            } else {
                io_shape(ctrl, cmd)?
            }
        }
    };
    req.dir = shape.dir;
    req.sgl = None;
    if shape.dir == Dir::None {
        return Ok(ReqState::Executing);
    }
    let mdts = ctx.shared.limits.max_io_size;
    let desc = SglDescriptor::read_from_bytes(&cmd.as_bytes()[24..40]).unwrap_or_default();
    let sgl = desc
        .decode()
        .map_err(|_| Outcome::err(Status::SGL_DESCRIPTOR_TYPE_INVALID, loc::SGL_ID))?;
    let len = sgl_len(Some(sgl));
    if len > mdts {
        return Err(Outcome::err(Status::SGL_DATA_LENGTH_INVALID, loc::SGL));
    }
    if shape.exact.is_some_and(|n| n != len) {
        return Err(Outcome::err(Status::SGL_DATA_LENGTH_INVALID, loc::SGL));
    }
    // Commands that produce a bounded amount of data (Identify, log pages) move at most
    // that much, whatever room the host offered.
    let sgl = match sgl {
        DataSgl::Keyed {
            addr,
            len,
            key,
            invalidate,
        } if shape.exact.is_none() => DataSgl::Keyed {
            addr,
            len: len.min(shape.max),
            key,
            invalidate,
        },
        s => s,
    };
    req.sgl = Some(sgl);
    match sgl {
        DataSgl::InCapsule { offset, len } => {
            if shape.dir != Dir::ToCtrl {
                return Err(Outcome::err(Status::INVALID_FIELD, loc::SGL_ID));
            }
            let cap = req.icd.len();
            if offset > req.icd_len.min(cap) as u64 {
                return Err(Outcome::err(Status::SGL_OFFSET_INVALID, loc::SGL));
            }
            let end = offset + u64::from(len);
            if req.icd_len > cap || end > req.icd_len as u64 {
                return Err(Outcome::err(Status::SGL_DATA_LENGTH_INVALID, loc::SGL));
            }
            req.data = Data::InCapsule {
                offset: offset as usize,
                len: len as usize,
            };
            Ok(ReqState::Executing)
        }
        DataSgl::Keyed { len: 0, .. } => Ok(ReqState::Executing),
        DataSgl::Keyed { .. } => Ok(ReqState::NeedBuffer),
    }
}

fn admin_shape(cmd: &Sqe) -> Result<Shape, Outcome> {
    let from = |max: u32| Shape {
        dir: Dir::FromCtrl,
        exact: None,
        max,
    };
    Ok(match cmd.opcode() {
        admin_opc::IDENTIFY => from(4096),
        admin_opc::GET_LOG_PAGE => {
            let numd = (cmd.cdw10.get() >> 16) | ((cmd.cdw11.get() & 0xffff) << 16);
            from(numd.saturating_add(1).saturating_mul(4))
        }
        admin_opc::SET_FEATURES | admin_opc::GET_FEATURES => shape_none(),
        admin_opc::KEEP_ALIVE | admin_opc::ASYNC_EVENT_REQUEST => shape_none(),
        admin_opc::ABORT => shape_none(),
        crate::direct::proto::OPC_DIRECT_ATTACH => from(256),
        crate::direct::proto::OPC_DIRECT_DETACH => shape_none(),
        _ => return Err(Outcome::err(Status::INVALID_OPCODE, loc::OPCODE)),
    })
}

fn io_shape(ctrl: &Controller, cmd: &Sqe) -> Result<Shape, Outcome> {
    let opc = cmd.opcode();
    if !admin::io_supported(opc) {
        return Err(Outcome::err(Status::INVALID_OPCODE, loc::OPCODE));
    }
    let nsid = cmd.nsid.get();
    let sub = ctrl.subsystem();
    if opc == io_opc::FLUSH && nsid == u32::MAX {
        return Ok(shape_none());
    }
    let Some(ns) = sub.namespace(nsid) else {
        return Err(Outcome::err(Status::INVALID_NAMESPACE, loc::NSID));
    };
    let bs = ns.backend.block_size();
    Ok(match opc {
        io_opc::READ | io_opc::WRITE | io_opc::COMPARE => {
            let nlb = u32::from(cmd.nlb0()) + 1;
            let len = nlb.saturating_mul(bs);
            let dir = if opc == io_opc::READ {
                Dir::FromCtrl
            } else {
                Dir::ToCtrl
            };
            // The LBA range is checked before the SGL length so that a bad range reports
            // LBA Out of Range whatever the descriptor says.
            let end = cmd.slba().checked_add(u64::from(nlb));
            if end.is_none_or(|e| e > ns.backend.block_count()) {
                return Err(Outcome::err(Status::LBA_OUT_OF_RANGE, loc::CDW10));
            }
            Shape {
                dir,
                exact: Some(len),
                max: len,
            }
        }
        io_opc::WRITE_ZEROES => {
            let nlb = u64::from(cmd.nlb0()) + 1;
            if cmd
                .slba()
                .checked_add(nlb)
                .is_none_or(|e| e > ns.backend.block_count())
            {
                return Err(Outcome::err(Status::LBA_OUT_OF_RANGE, loc::CDW10));
            }
            shape_none()
        }
        io_opc::DATASET_MANAGEMENT => {
            let len = ((cmd.cdw10.get() & 0xff) + 1) * 16;
            Shape {
                dir: Dir::ToCtrl,
                exact: Some(len),
                max: len,
            }
        }
        _ => shape_none(),
    })
}

/// Executes a fabrics or admin command (I/O commands go to [`io::start`]).
fn execute(ctx: &mut QueueCtx, cmd: &Sqe, data: &mut [u8], now: Instant) -> Outcome {
    if cmd.opcode() == OPC_FABRICS {
        return admin::fabrics(ctx, cmd, data, now);
    }
    let Some(ctrl) = ctx.ctrl.clone() else {
        return Outcome::err(Status::COMMAND_SEQUENCE_ERROR, loc::OPCODE);
    };
    admin::execute(ctx, &ctrl, cmd, data, now)
}
