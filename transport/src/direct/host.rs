//! Host side of direct mode.
//!
//! [`DirectHost::connect`] opens a standard NVMe-oF admin queue (Connect, CC.EN), then
//! [`DirectHost::open_queue`] sends the attach command, checks the descriptor and opens the
//! direct RDMA connection (token in the CM private data). [`DirectQueue`] then does I/O
//! with one-sided RDMA only:
//!
//! - write: one chained post — RDMA WRITE (data → pool slot), RDMA WRITE WITH IMMEDIATE
//!   (the 64-byte SQE, inline, → SQ slot; immediate = new SQ tail, which is the doorbell
//!   on the forwarded level). On the P2P level the doorbell is a third WRITE (4 bytes
//!   inline) into the doorbell MR.
//! - read: the SQE chain alone; the target pushes the data ahead of the CQE, or (polled,
//!   or without pushed reads) the host RDMA READs the pool slot after the completion.
//! - completions, two variants chosen per queue ([`Completions`]): the target pushes
//!   CQEs by SEND into a receive ring, or the host polls the CQ ring by RDMA READ (one
//!   READ of up to 8 entries outstanding, phase tag, adaptive back-off when it finds
//!   nothing) and carries the new CQ head in its next doorbell.
//!
//! Pool slot = command id; at most `depth - 1` commands are outstanding, so an SQ slot is
//! never rewritten before the controller fetched it. Nothing is allocated per I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme::spec::{Cqe, Sqe, Status};
use rdma::cm::{CmEventKind, Connection, Connector};
use rdma::{
    Access, CompletionQueue, ProtectionDomain, QpInit, RecvBatch, RegisteredBuffer, RemoteAddr,
    SendBatch, SendFlags, Sge, WorkCompletion, WrId,
};
use zerocopy::{FromBytes, IntoBytes};

use super::proto::{
    detach_sqe, polled_imm, reply_flags, AttachRequest, ConnectPrivate, Descriptor, Level,
    ACCEPT_CQ_POLLED, ACCEPT_READS_PUSHED, CONNECT_CQ_POLLED, CQ_READ_ENTRIES, FLAG_CQ_POLL,
};
use crate::error::{Error, LostCause, Result};
use crate::fabrics::{SglDescriptor, CNTLID_DYNAMIC};
use crate::initiator::{cmd, enable_controller, execute, InitiatorQueue};
use crate::nvmf_rdma::{queue_err, RdmaHost};

const T: Duration = Duration::from_secs(10);
const RECV_SLACK: u32 = 16;
/// CQEs the target packs into one SEND at most (64 bytes: inline on every provider).
pub const CQES_PER_SEND: usize = 4;
const RECV_SLOT: usize = 16 * CQES_PER_SEND;
/// Commands per `ibv_post_send` in [`DirectQueue::flush`].
pub const FLUSH_BATCH: usize = 16;
// `WrId` kinds. Tags: the command id (data WRITE, READ), the receive slot (RECV).
const KIND_CHAIN: u8 = 1;
const KIND_RECV: u8 = 2;
const KIND_READ: u8 = 3;
const KIND_CQ_READ: u8 = 4;
/// The id of the WRs of a submission chain that carry no command (SQEs, doorbells).
const CHAIN: WrId = WrId::new(KIND_CHAIN, 0);

/// Where and who.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Target address (RDMA CM).
    pub addr: SocketAddr,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN (must be on the subsystem's `direct_hosts`).
    pub hostnqn: String,
    /// NVMe-oF namespace id.
    pub nsid: u32,
    /// Queue entries to ask for.
    pub depth: u16,
    /// Largest I/O in bytes (pool slot size; ≤ 8 KiB: two PRPs, no PRP list).
    pub io_size: usize,
    /// How completions reach the host (falls back to pushed when the target does not
    /// offer polling; [`DirectQueue::completions`] says what was agreed).
    pub completions: Completions,
}

/// How a direct queue's completions reach the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Completions {
    /// The target's poller watches the NVMe CQ and SENDs the CQEs (up to 4 per SEND),
    /// read data by RDMA WRITE ahead of them in the same chain.
    #[default]
    Pushed,
    /// The host reads the CQ ring by RDMA READ (phase tag), reads read data by RDMA READ,
    /// and hands the CQ head back with its doorbells: the target never watches the CQ.
    Polled,
}

impl Completions {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Completions::Pushed => "pushed",
            Completions::Polled => "polled",
        }
    }
}

/// A completions name that is neither `pushed` nor `polled`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("completions: '{0}' is neither 'pushed' nor 'polled'")]
pub struct UnknownCompletions(pub String);

impl std::str::FromStr for Completions {
    type Err = UnknownCompletions;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownCompletions> {
        match s {
            "pushed" => Ok(Completions::Pushed),
            "polled" => Ok(Completions::Polled),
            _ => Err(UnknownCompletions(s.to_string())),
        }
    }
}

impl std::fmt::Display for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The host's view of a polled CQ ring: the next entry to consume and its phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CqCursor {
    head: u16,
    phase: bool,
    depth: u16,
}

impl CqCursor {
    /// At entry 0, expecting phase 1 (the target zeroes the ring at creation).
    pub fn new(depth: u16) -> Self {
        CqCursor {
            head: 0,
            phase: true,
            depth: depth.max(1),
        }
    }

    /// The next entry to consume (the CQ head to hand to the controller).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Entries one READ covers from the head: up to [`CQ_READ_ENTRIES`], never across
    /// the end of the ring.
    pub fn span(&self) -> usize {
        usize::from(self.depth - self.head).min(CQ_READ_ENTRIES)
    }

    /// Whether `entry` (16 bytes) carries the phase of a new completion.
    pub fn is_new(&self, entry: &[u8]) -> bool {
        entry.len() >= 16 && (entry[14] & 1 == 1) == self.phase
    }

    /// Consumes the head entry.
    pub fn advance(&mut self) {
        self.head += 1;
        if self.head >= self.depth {
            self.head = 0;
            self.phase = !self.phase;
        }
    }
}

/// When a polling host reads the CQ again: at once after a READ that found entries;
/// after an empty one, after a wait that doubles from 4 µs up to an eighth of the typical
/// latency (8–256 µs); the first READ after the queue had nothing in the device waits
/// three quarters of the shortest recent latency (no command completes much faster).
/// Typical latency is an exponential average of submission → CQE seen; the shortest (the
/// floor) drops at once with a faster completion and is reset to the minimum of the last
/// [`PollBackoff::WINDOW`] completions at the end of each window (robust: one slow command
/// does not delay the next one's first look).
#[derive(Clone, Copy, Debug)]
pub struct PollBackoff {
    wait: Duration,
    latency_ns: u64,
    floor_ns: u64,
    win_min_ns: u64,
    win_n: u32,
}

impl Default for PollBackoff {
    fn default() -> Self {
        PollBackoff {
            wait: Self::MIN,
            latency_ns: 0,
            floor_ns: 0,
            win_min_ns: u64::MAX,
            win_n: 0,
        }
    }
}

impl PollBackoff {
    const MIN: Duration = Duration::from_micros(4);
    /// Completions per window of the latency floor.
    pub const WINDOW: u32 = 64;

    /// The typical latency (exponential average).
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_ns)
    }

    /// The shortest recent latency.
    pub fn floor(&self) -> Duration {
        Duration::from_nanos(self.floor_ns)
    }

    /// Longest wait after empty READs.
    pub fn cap(&self) -> Duration {
        (self.latency() / 8).clamp(Duration::from_micros(8), Duration::from_micros(256))
    }

    /// A completion was seen `lat` after its submission.
    pub fn record(&mut self, lat: Duration) {
        let ns = u64::try_from(lat.as_nanos()).unwrap_or(u64::MAX / 2);
        self.latency_ns = if self.latency_ns == 0 {
            ns
        } else {
            (self.latency_ns * 7 + ns) / 8
        };
        // A faster completion lowers the floor at once; at the end of a window the floor
        // becomes that window's minimum (so it can rise again).
        self.floor_ns = if self.floor_ns == 0 {
            ns
        } else {
            self.floor_ns.min(ns)
        };
        self.win_min_ns = self.win_min_ns.min(ns);
        self.win_n += 1;
        if self.win_n >= Self::WINDOW {
            self.floor_ns = self.win_min_ns;
            self.win_n = 0;
            self.win_min_ns = u64::MAX;
        }
    }

    /// A READ found entries: the next one goes at once.
    pub fn found(&mut self) {
        self.wait = Self::MIN;
    }

    /// A READ found nothing: how long to wait before the next one.
    pub fn empty(&mut self) -> Duration {
        let w = self.wait.min(self.cap());
        self.wait = (w * 2).min(self.cap());
        w
    }

    /// Delay of the first READ after commands entered an idle queue.
    pub fn first(&self) -> Duration {
        (self.floor() * 3 / 4).min(Duration::from_millis(2))
    }
}

/// An admin connection that can attach direct queues.
pub struct DirectHost {
    admin: InitiatorQueue<RdmaHost>,
    abuf: RegisteredBuffer,
    opts: HostOptions,
}

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The target answered with an NVMe status (Access Denied for hosts not on
    /// `direct_hosts`, Namespace Not Ready during a device reset).
    #[error("attach refused: {}", describe(*.0))]
    Refused(Status),
    /// Transport or protocol failure.
    #[error("{0}")]
    Other(#[from] Error),
}

/// Text for an attach status ([`crate::fabrics::refusal`], the one naming of statuses).
pub fn describe(s: Status) -> String {
    crate::fabrics::refusal(s.sct(), s.sc())
}

impl DirectHost {
    /// Connects the admin queue and enables the controller.
    pub fn connect(opts: HostOptions) -> Result<DirectHost> {
        let host = RdmaHost::connect(opts.addr, 0, 32, 0, T)?;
        let abuf = host.register(8192)?;
        let mut admin = InitiatorQueue::new(host, 0, 31);
        let data = cmd::connect_data([0x44; 16], CNTLID_DYNAMIC, &opts.subnqn, &opts.hostnqn);
        abuf.write(0, data.as_bytes())
            .map_err(queue_err(0, "admin buffer"))?;
        execute(
            &mut admin,
            cmd::connect(0, 31, 0, keyed(&abuf, 0, 1024)),
            &[],
            T,
        )
        .map_err(|e| {
            crate::initiator::connect_error(e, opts.addr, 0, &opts.subnqn, &opts.hostnqn)
        })?;
        enable_controller(&mut admin, T)?;
        Ok(DirectHost { admin, abuf, opts })
    }

    /// Sends the attach command; returns the descriptor.
    pub fn attach(&mut self) -> std::result::Result<Descriptor, AttachError> {
        let req = AttachRequest {
            depth: self.opts.depth,
            pool_bytes: (u64::from(self.opts.depth) * slot_stride(self.opts.io_size) as u64)
                .div_ceil(4096)
                * 4096,
            polled_cq: self.opts.completions == Completions::Polled,
        };
        let mut sqe = req.to_sqe(self.opts.nsid);
        sqe.set_psdt(1);
        let mut d = [0u8; 16];
        d.copy_from_slice(keyed(&self.abuf, 0, 256).as_bytes());
        sqe.set_dptr(d);
        self.abuf
            .write(0, &[0u8; 256])
            .map_err(|e| AttachError::Other(queue_err(0, "admin buffer")(e)))?;
        match execute(&mut self.admin, sqe, &[], T) {
            Ok(_) => {}
            Err(Error::CommandFailed { sct, sc, .. }) => {
                return Err(AttachError::Refused(Status::new(sct, sc)))
            }
            Err(e) => return Err(e.into()),
        }
        let mut raw = [0u8; 256];
        self.abuf
            .read(0, &mut raw)
            .map_err(|e| AttachError::Other(queue_err(0, "admin buffer")(e)))?;
        Descriptor::parse(&raw).ok_or_else(|| {
            AttachError::Other(Error::Malformed {
                what: "direct-mode descriptor",
                reason: "wrong magic or version, unknown level, or depth below 2".into(),
            })
        })
    }

    /// Attaches and opens the direct connection, retrying while the target says the
    /// namespace is not ready (device reset) for up to `patience`.
    pub fn open_queue(
        &mut self,
        patience: Duration,
    ) -> std::result::Result<DirectQueue, AttachError> {
        let start = Instant::now();
        loop {
            match self.attach() {
                Ok(d) => return DirectQueue::open(&self.opts, d).map_err(AttachError::Other),
                Err(AttachError::Refused(s))
                    if s.same_code(Status::NAMESPACE_NOT_READY) && start.elapsed() < patience =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Detaches the queue with `token` (the target disconnects it).
    pub fn detach(&mut self, token: u64) -> Result<()> {
        let mut sqe = detach_sqe(token);
        sqe.set_psdt(1);
        let mut d = [0u8; 16];
        d.copy_from_slice(SglDescriptor::keyed(0, 0, 0, false).as_bytes());
        sqe.set_dptr(d);
        execute(&mut self.admin, sqe, &[], T).map(|_| ())
    }
}

fn keyed(buf: &RegisteredBuffer, off: usize, len: usize) -> SglDescriptor {
    let r = buf.mr().remote(off);
    SglDescriptor::keyed(r.addr, len as u32, r.rkey, false)
}

fn slot_stride(io_size: usize) -> usize {
    if io_size <= 4096 {
        io_size.max(512).next_power_of_two()
    } else {
        8192
    }
}

/// How one posted batch of submissions rings the doorbells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbells {
    /// Forwarded level: the last SQE goes as WRITE WITH IMMEDIATE with this immediate
    /// (new tail; polled: `tail | head << 16`).
    pub imm: Option<u32>,
    /// P2P level, polled: 4-byte WRITE of this CQ head to the CQ head doorbell, posted
    /// before the SQ doorbell (only when the head moved since the last one).
    pub cq_head: Option<u16>,
    /// P2P level: 4-byte WRITE of this tail to the SQ tail doorbell (last in the chain).
    pub sq_tail: Option<u16>,
}

/// Whether a polled queue must hand its CQ head to the controller with the next doorbell:
/// beyond the head the controller knows, it may post one CQE per command in the device
/// (`awaiting`) plus one per CQE consumed since that head (`unreleased`); a CQ of `depth`
/// entries holds `depth − 1` = `capacity`. Handing the head over resets `unreleased` to 0,
/// and `awaiting` ≤ `capacity` always, so the CQ never overflows. At low queue depth this
/// spares the CQ head doorbell for all but one I/O in `capacity`.
pub fn must_release(awaiting: usize, unreleased: usize, capacity: usize) -> bool {
    awaiting + unreleased > capacity
}

/// The doorbells of a batch that makes the SQ tail `new_tail`; `head` is the CQ head to
/// hand over (polled; `head_sent` when there is no need, see [`must_release`]).
pub fn doorbells(
    level: Level,
    completions: Completions,
    new_tail: u16,
    head: u16,
    head_sent: u16,
) -> Doorbells {
    let polled = completions == Completions::Polled;
    match level {
        Level::Forwarded => Doorbells {
            imm: Some(if polled {
                polled_imm(new_tail, head)
            } else {
                u32::from(new_tail)
            }),
            cq_head: None,
            sq_tail: None,
        },
        Level::P2p => Doorbells {
            imm: None,
            cq_head: (polled && head != head_sent).then_some(head),
            sq_tail: Some(new_tail),
        },
    }
}

/// RDMA operations counted by the host (both directions).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct OpCounts {
    /// RDMA WRITEs posted (data, and P2P doorbells).
    pub writes: u64,
    /// RDMA WRITE WITH IMMEDIATE posted (SQE + doorbell).
    pub write_imms: u64,
    /// RDMA READs posted of read data (pool slot → host).
    pub reads: u64,
    /// SENDs received (CQEs pushed by the target, up to 4 each).
    pub recvs: u64,
    /// RDMA WRITEs of read data by the target (pushed ahead of the CQE).
    pub pushed_reads: u64,
    /// RDMA READs of the CQ ring that found completions (polled).
    pub cq_reads: u64,
    /// RDMA READs of the CQ ring that found nothing (polled).
    pub empty_polls: u64,
}

impl OpCounts {
    /// All operations.
    pub fn total(&self) -> u64 {
        self.writes
            + self.write_imms
            + self.reads
            + self.recvs
            + self.pushed_reads
            + self.cq_reads
            + self.empty_polls
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &OpCounts) {
        self.writes += other.writes;
        self.write_imms += other.write_imms;
        self.reads += other.reads;
        self.recvs += other.recvs;
        self.pushed_reads += other.pushed_reads;
        self.cq_reads += other.cq_reads;
        self.empty_polls += other.empty_polls;
    }
}

/// A finished direct I/O.
#[derive(Clone, Copy, Debug)]
pub struct DirectCompletion {
    /// Command id (= pool slot).
    pub cid: u16,
    /// Caller's value from submission.
    pub user: u64,
    /// NVMe status.
    pub status: Status,
    /// Submission to completion.
    pub latency: Duration,
    /// A write (else a read).
    pub write: bool,
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    write: bool,
    len: u32,
    user: u64,
    start: Instant,
    status: Status,
    sq_slot: u16,
    /// Polled: submitted, CQE not seen yet.
    in_device: bool,
}

/// One attached direct queue. Field order is drop order: the connection first.
pub struct DirectQueue {
    conn: Connection,
    cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
    data: RegisteredBuffer,
    recv: RegisteredBuffer,
    desc: Descriptor,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    tail: u16,
    stride: usize,
    recv_slots: u32,
    wcs: Box<[WorkCompletion; 32]>,
    scratch: Box<[u8]>,
    last_cm_check: Instant,
    reads_pushed: bool,
    /// SQEs staged in SQ-slot order, registered: a batch's contiguous slots go out in one
    /// RDMA WRITE. A slot is rewritten only when the SQ wraps onto it, long after the
    /// WRITE that carried it completed (its command completed).
    sq_stage: RegisteredBuffer,
    queued: Vec<u16>,
    completions: Completions,
    /// Polled: ring position, READ target, whether a READ is out and its entry count,
    /// commands whose CQE is not seen yet, when to READ next, the CQ head last handed to
    /// the controller (P2P: written only when it changed).
    cqc: CqCursor,
    cq_buf: RegisteredBuffer,
    cq_read_len: usize,
    cq_read_out: bool,
    awaiting: usize,
    next_cq_read: Instant,
    backoff: PollBackoff,
    head_sent: u16,
    unreleased: usize,
    /// The caller owns the pool slots ([`DirectQueue::submit_in_slot`]): reads are not
    /// copied out for the completion callback.
    zero_copy: bool,
    /// RDMA operation counters.
    pub ops: OpCounts,
}

impl DirectQueue {
    fn open(opts: &HostOptions, desc: Descriptor) -> Result<DirectQueue> {
        let qid = desc.qid.get();
        let depth = desc.depth.get();
        let stride = slot_stride(opts.io_size);
        let lba = desc.lba_size.get() as usize;
        if lba == 0
            || opts.io_size == 0
            || !opts.io_size.is_multiple_of(lba)
            || opts.io_size > 8192
            || opts.io_size > desc.max_transfer.get() as usize
            || (desc.pool_len.get() as usize) < usize::from(depth) * stride
        {
            return Err(Error::DirectQueueShape {
                qid,
                io_size: opts.io_size,
                lba_size: lba,
                max_transfer: desc.max_transfer.get(),
                pool_len: desc.pool_len.get(),
                depth,
            });
        }
        let dst = SocketAddr::new(opts.addr.ip(), desc.port.get());
        let connector = Connector::resolve(dst, T).map_err(queue_err(qid, "resolve (direct)"))?;
        let ctx = connector.context().ok_or(Error::NoRouteDevice { dst })?;
        let pd = ProtectionDomain::new(&ctx).map_err(queue_err(qid, "alloc PD"))?;
        let recv_slots = u32::from(depth) + RECV_SLACK;
        let send_max = 3 * u32::from(depth) + 8;
        let cq = CompletionQueue::new(&ctx, send_max + recv_slots + 8, None)
            .map_err(queue_err(qid, "create CQ"))?;
        let mut init = QpInit::new(&cq);
        init.max_send_wr = send_max;
        init.max_recv_wr = recv_slots;
        init.max_inline_data = 64;
        let data = RegisteredBuffer::new(&pd, usize::from(depth) * stride, Access::ALL)
            .map_err(queue_err(qid, "data buffers"))?;
        let recv = RegisteredBuffer::new(&pd, RECV_SLOT * recv_slots as usize, Access::LOCAL_WRITE)
            .map_err(queue_err(qid, "CQE ring"))?;
        let sq_stage = RegisteredBuffer::new(&pd, usize::from(depth) * 64, Access::LOCAL_WRITE)
            .map_err(queue_err(qid, "SQE staging ring"))?;
        let cq_buf = RegisteredBuffer::new(&pd, 16 * CQ_READ_ENTRIES, Access::LOCAL_WRITE)
            .map_err(queue_err(qid, "CQ read buffer"))?;
        // Ask the target to push read data into our buffer before each read's CQE (pushed
        // completions only; a target that agrees to polling ignores it).
        let mut private = ConnectPrivate::new(desc.token.get());
        private.read_addr = data.mr().addr().into();
        private.read_rkey = data.mr().rkey().into();
        private.read_stride = (stride as u32).into();
        if opts.completions == Completions::Polled && desc.flags & FLAG_CQ_POLL != 0 {
            private.flags = CONNECT_CQ_POLLED.into();
        }
        let conn = connector
            .connect(&pd, &init, private.as_bytes(), T)
            .map_err(queue_err(qid, "connect (direct)"))?;
        let reply = reply_flags(conn.peer_private_data());
        let completions = if reply & ACCEPT_CQ_POLLED != 0 {
            Completions::Polled
        } else {
            Completions::Pushed
        };
        let reads_pushed = completions == Completions::Pushed && reply & ACCEPT_READS_PUSHED != 0;
        let now = Instant::now();
        let q = DirectQueue {
            conn,
            cq,
            _pd: pd,
            data,
            recv,
            desc,
            slots: vec![
                Slot {
                    busy: false,
                    write: false,
                    len: 0,
                    user: 0,
                    start: now,
                    status: Status::SUCCESS,
                    sq_slot: 0,
                    in_device: false,
                };
                usize::from(depth)
            ]
            .into_boxed_slice(),
            free: (0..depth - 1).rev().collect(),
            tail: 0,
            stride,
            recv_slots,
            wcs: Box::new([WorkCompletion::default(); 32]),
            scratch: vec![0u8; stride].into_boxed_slice(),
            last_cm_check: now,
            reads_pushed,
            sq_stage,
            queued: Vec::with_capacity(usize::from(depth)),
            completions,
            cqc: CqCursor::new(depth),
            cq_buf,
            cq_read_len: 0,
            cq_read_out: false,
            awaiting: 0,
            next_cq_read: now,
            backoff: PollBackoff::default(),
            head_sent: 0,
            unreleased: 0,
            zero_copy: false,
            ops: OpCounts::default(),
        };
        // Polled queues get nothing by SEND.
        if completions == Completions::Pushed {
            for i in 0..recv_slots {
                q.post_recv(i)?;
            }
        }
        Ok(q)
    }

    /// The queue id the target gave the direct queue.
    fn qid(&self) -> u16 {
        self.desc.qid.get()
    }

    /// The descriptor the target returned.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    /// Whether the target pushes read data (else the host RDMA READs it).
    pub fn reads_pushed(&self) -> bool {
        self.reads_pushed
    }

    /// The level.
    pub fn level(&self) -> Level {
        self.desc.level()
    }

    /// How completions reach this queue (what the target agreed to).
    pub fn completions(&self) -> Completions {
        self.completions
    }

    /// Commands that can be outstanding at once (depth − 1).
    pub fn capacity(&self) -> usize {
        usize::from(self.desc.depth.get()) - 1
    }

    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.capacity() - self.free.len()
    }

    /// `user` values of the outstanding commands (to resubmit after a re-attach).
    pub fn outstanding_users(&self) -> impl Iterator<Item = (bool, u64)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.busy)
            .map(|s| (s.write, s.user))
    }

    fn post_recv(&self, i: u32) -> Result<()> {
        let sge = self
            .recv
            .mr()
            .sge(i as usize * RECV_SLOT, RECV_SLOT)
            .map_err(queue_err(self.qid(), "recv sge"))?;
        let mut b = RecvBatch::<1>::new();
        b.recv(WrId::new(KIND_RECV, i), Some(sge))
            .map_err(queue_err(self.qid(), "recv"))?;
        self.conn
            .qp()
            .post_recv(&mut b)
            .map_err(queue_err(self.qid(), "post recv"))
    }

    /// Writes `data` (a multiple of the LBA size, ≤ the I/O size) at `lba`.
    pub fn submit_write(&mut self, lba: u64, data: &[u8], user: u64) -> Result<u16> {
        self.submit(true, lba, data, data.len(), user)
    }

    /// Reads `len` bytes at `lba`; the data comes with the completion.
    pub fn submit_read(&mut self, lba: u64, len: usize, user: u64) -> Result<u16> {
        self.submit(false, lba, &[], len, user)
    }

    /// The registered data pool: base pointer, length and slot stride. Slot `cid` (at
    /// `base + cid * stride`) is the data of command `cid`; with
    /// [`submit_in_slot`](Self::submit_in_slot) the caller owns the slots' contents
    /// (zero copy: e.g. fio's I/O buffers live here). Access it only by raw-pointer
    /// copies or hand it to code that does (the NIC writes it).
    pub fn data_pool(&self) -> (*mut u8, usize, usize) {
        (self.data.as_ptr(), self.data.len(), self.stride)
    }

    /// Zero-copy submission: a write of the `len` bytes the caller already put in pool
    /// slot `slot` (see [`data_pool`](Self::data_pool)), or a read whose data the
    /// completion leaves in that slot (its callback then gets no data slice). The slot
    /// must not be in use; it is the command's id.
    pub fn submit_in_slot(
        &mut self,
        write: bool,
        lba: u64,
        slot: u16,
        len: usize,
        user: u64,
    ) -> Result<u16> {
        self.zero_copy = true;
        self.submit_to(write, lba, None, len, user, Some(slot))
    }

    fn submit(&mut self, write: bool, lba: u64, data: &[u8], len: usize, user: u64) -> Result<u16> {
        self.submit_to(write, lba, Some(data), len, user, None)
    }

    fn submit_to(
        &mut self,
        write: bool,
        lba: u64,
        data: Option<&[u8]>,
        len: usize,
        user: u64,
        slot: Option<u16>,
    ) -> Result<u16> {
        let lba_size = self.desc.lba_size.get() as usize;
        if len == 0 || !len.is_multiple_of(lba_size) || len > self.stride || len > 8192 {
            return Err(Error::DirectIoSize {
                qid: self.qid(),
                len,
                lba_size,
                max: self.stride.min(8192),
            });
        }
        let nlb = (len / lba_size) as u64;
        if lba
            .checked_add(nlb)
            .is_none_or(|e| e > self.desc.blocks.get())
        {
            return Err(Error::LbaOutOfRange {
                slba: lba,
                nlb,
                blocks: self.desc.blocks.get(),
            });
        }
        let cid = match slot {
            None => self.free.pop(),
            // The free list is at most the queue depth long: a scan, no allocation.
            Some(want) => self
                .free
                .iter()
                .position(|&c| c == want)
                .map(|i| self.free.swap_remove(i)),
        };
        let Some(cid) = cid else {
            if let Some(want) = slot.filter(|&w| usize::from(w) < self.capacity()) {
                if self.slots[usize::from(want)].busy {
                    return Err(Error::DirectSlot {
                        qid: self.qid(),
                        slot: want,
                        busy: true,
                    });
                }
            } else if let Some(want) = slot {
                return Err(Error::DirectSlot {
                    qid: self.qid(),
                    slot: want,
                    busy: false,
                });
            }
            return Err(Error::QueueFull {
                qid: self.desc.qid.get(),
                depth: self.desc.depth.get(),
            });
        };
        let off = usize::from(cid) * self.stride;
        if let (true, Some(data)) = (write, data) {
            if let Err(e) = self.data.write(off, data) {
                self.free.push(cid);
                return Err(queue_err(self.qid(), "stage data")(e));
            }
        }
        // Target-provided values: wrapping arithmetic, never a panic.
        let iova = self.desc.pool_iova.get().wrapping_add(off as u64);
        let prp2 = if len > 4096 {
            iova.wrapping_add(4096)
        } else {
            0
        };
        let nsid = self.desc.nsid.get();
        let mut sqe = if write {
            Sqe::write(nsid, lba, (nlb - 1) as u16, iova, prp2)
        } else {
            Sqe::read(nsid, lba, (nlb - 1) as u16, iova, prp2)
        };
        sqe.set_cid(cid);
        let depth = self.desc.depth.get();
        let slot = self.tail;
        if let Err(e) = self.sq_stage.write(usize::from(slot) * 64, sqe.as_bytes()) {
            self.free.push(cid);
            return Err(queue_err(self.qid(), "stage SQE")(e));
        }
        self.queued.push(cid);
        self.tail = if slot + 1 == depth { 0 } else { slot + 1 };
        let now = Instant::now();
        let polled = self.completions == Completions::Polled;
        self.slots[usize::from(cid)] = Slot {
            busy: true,
            write,
            len: len as u32,
            user,
            start: now,
            status: Status::SUCCESS,
            sq_slot: slot,
            in_device: polled,
        };
        if polled {
            if self.awaiting == 0 && !self.cq_read_out {
                // Nothing was in the device: the first look can wait a while.
                self.next_cq_read = now + self.backoff.first();
            }
            self.awaiting += 1;
        }
        Ok(cid)
    }

    /// Posts every submission queued since the last flush: one `ibv_post_send` per up to
    /// [`FLUSH_BATCH`] commands — data WRITEs and SQE WRITEs, the last SQE as a WRITE WITH
    /// IMMEDIATE carrying the new tail (forwarded: one doorbell, one receive completion at
    /// the target per batch), or followed by one doorbell WRITE (P2P). Only the last WR
    /// of a post is signaled. [`poll`](Self::poll) flushes too.
    pub fn flush(&mut self) -> Result<()> {
        let mut done = 0;
        while done < self.queued.len() {
            let n = (self.queued.len() - done).min(FLUSH_BATCH);
            let r = self.post_batch(done, n);
            if let Err(e) = r {
                self.queued.clear();
                return Err(queue_err(self.qid(), "post direct submissions")(e));
            }
            done += n;
        }
        self.queued.clear();
        Ok(())
    }

    fn post_batch(&mut self, first: usize, n: usize) -> rdma::Result<()> {
        let depth = self.desc.depth.get();
        let inline = |b: &[u8]| Sge {
            addr: b.as_ptr() as u64,
            len: b.len() as u32,
            lkey: 0,
        };
        let last_slot = self.slots[usize::from(self.queued[first + n - 1])].sq_slot;
        let new_tail = if last_slot + 1 == depth {
            0
        } else {
            last_slot + 1
        };
        let polled = self.completions == Completions::Polled;
        let release = polled && must_release(self.awaiting, self.unreleased, self.capacity());
        let head = if release {
            self.cqc.head()
        } else {
            self.head_sent
        };
        let bells = doorbells(
            self.desc.level(),
            self.completions,
            new_tail,
            head,
            self.head_sent,
        );
        let tail_bytes = u32::from(new_tail).to_le_bytes();
        let head_bytes = u32::from(head).to_le_bytes();
        let mut chain = SendBatch::<{ FLUSH_BATCH + 4 }>::new();
        for i in 0..n {
            let cid = self.queued[first + i];
            let s = self.slots[usize::from(cid)];
            if s.write {
                let off = usize::from(cid) * self.stride;
                let pool = RemoteAddr {
                    addr: self.desc.pool.addr.get().wrapping_add(off as u64),
                    rkey: self.desc.pool.rkey.get(),
                };
                chain.write(
                    WrId::new(KIND_CHAIN, u32::from(cid)),
                    self.data.mr().sge(off, s.len as usize)?,
                    pool,
                    SendFlags::NONE,
                )?;
                self.ops.writes += 1;
            }
        }
        // The batch's SQEs sit in consecutive SQ slots: one WRITE from the staging ring,
        // two when they wrap past the ring's end. The last carries the doorbell
        // immediate (forwarded).
        let first_slot = self.slots[usize::from(self.queued[first])].sq_slot;
        let n16 = n as u16;
        let run1 = n16.min(depth - first_slot);
        let runs = [(first_slot, run1), (0, n16 - run1)];
        let last_run = if run1 == n16 { 0 } else { 1 };
        for (k, &(slot, len)) in runs.iter().enumerate().take(last_run + 1) {
            let off = usize::from(slot) * 64;
            let sqes = self.sq_stage.mr().sge(off, usize::from(len) * 64)?;
            let sq = RemoteAddr {
                addr: self.desc.sq.addr.get().wrapping_add(off as u64),
                rkey: self.desc.sq.rkey.get(),
            };
            match bells.imm {
                Some(imm) if k == last_run => {
                    chain.write_imm(CHAIN, Some(sqes), sq, imm, SendFlags::SIGNALED)?;
                    self.ops.write_imms += 1;
                }
                _ => {
                    chain.write(CHAIN, sqes, sq, SendFlags::NONE)?;
                    self.ops.writes += 1;
                }
            }
        }
        if bells.cq_head.is_some() {
            let db = RemoteAddr {
                addr: self.desc.cq_doorbell.addr.get(),
                rkey: self.desc.cq_doorbell.rkey.get(),
            };
            chain.write(CHAIN, inline(&head_bytes), db, SendFlags::INLINE)?;
            self.ops.writes += 1;
        }
        if bells.sq_tail.is_some() {
            let db = RemoteAddr {
                addr: self.desc.sq_doorbell.addr.get(),
                rkey: self.desc.sq_doorbell.rkey.get(),
            };
            let flags = SendFlags::INLINE | SendFlags::SIGNALED;
            chain.write(CHAIN, inline(&tail_bytes), db, flags)?;
            self.ops.writes += 1;
        }
        self.conn.qp().post_send(&mut chain)?;
        if release {
            self.head_sent = head;
            self.unreleased = 0;
        }
        Ok(())
    }

    /// Reaps completions: `f` gets each finished I/O and, for reads, its data. An error
    /// means the queue is gone (target reset or disconnect): re-attach and resubmit
    /// [`outstanding_users`](Self::outstanding_users).
    pub fn poll(&mut self, mut f: impl FnMut(&DirectCompletion, &[u8])) -> Result<usize> {
        self.flush()?;
        let n = self
            .cq
            .poll(&mut self.wcs[..])
            .map_err(queue_err(self.qid(), "poll CQ"))?;
        let done = self.handle(n, &mut f)?;
        if self.completions == Completions::Polled {
            self.read_cq()?;
        }
        if done == 0 {
            self.check_connection()?;
        }
        Ok(done)
    }

    fn handle(&mut self, n: usize, f: &mut impl FnMut(&DirectCompletion, &[u8])) -> Result<usize> {
        let mut done = 0;
        for i in 0..n {
            let wc = self.wcs[i];
            if let Err(e) = wc.result() {
                return Err(Error::DirectQueueLost {
                    qid: self.qid(),
                    cause: LostCause::WorkCompletion(e),
                });
            }
            let id = wc.wr_id();
            match id.kind() {
                KIND_RECV => {
                    // One SEND carries 1..=CQES_PER_SEND completions.
                    let idx = id.tag();
                    let count = (wc.byte_len() as usize / 16).min(CQES_PER_SEND);
                    let mut raw = [0u8; 16 * CQES_PER_SEND];
                    self.recv
                        .read(idx as usize * RECV_SLOT, &mut raw[..count * 16])
                        .map_err(queue_err(self.qid(), "read CQE"))?;
                    self.post_recv(idx % self.recv_slots)?;
                    self.ops.recvs += 1;
                    for k in 0..count {
                        let cqe =
                            Cqe::read_from_bytes(&raw[k * 16..k * 16 + 16]).unwrap_or_default();
                        let cid = cqe.cid.get();
                        let Some(s) = self.slots.get_mut(usize::from(cid)).filter(|s| s.busy)
                        else {
                            continue;
                        };
                        s.status = cqe.status();
                        if s.write || !s.status.is_success() {
                            done += self.finish(cid, false, f);
                        } else if self.reads_pushed {
                            // The data came by RDMA WRITE ahead of this SEND (RC order).
                            self.ops.pushed_reads += 1;
                            done += self.finish(cid, true, f);
                        } else {
                            self.post_read(cid)?;
                        }
                    }
                }
                // Command ids are u16: exact.
                KIND_READ => done += self.finish(id.tag() as u16, true, f),
                KIND_CQ_READ => done += self.reap_cq(f)?,
                _ => {}
            }
        }
        Ok(done)
    }

    /// Polled: consumes the entries of the READ that just completed whose phase tag is
    /// new, in ring order. An entry is taken only if it names this SQ and a command that
    /// waits for its CQE; anything else (an entry read while the controller was writing
    /// it) ends the scan and is read again by the next READ.
    fn reap_cq(&mut self, f: &mut impl FnMut(&DirectCompletion, &[u8])) -> Result<usize> {
        self.cq_read_out = false;
        let count = self.cq_read_len.min(CQ_READ_ENTRIES);
        let mut raw = [0u8; 16 * CQ_READ_ENTRIES];
        self.cq_buf
            .read(0, &mut raw[..count * 16])
            .map_err(queue_err(self.qid(), "read CQ entries"))?;
        let (mut found, mut done) = (0, 0);
        let qid = self.desc.qid.get();
        for e in raw[..count * 16].chunks_exact(16) {
            if !self.cqc.is_new(e) {
                break;
            }
            let cqe = Cqe::read_from_bytes(e).unwrap_or_default();
            let cid = cqe.cid.get();
            let Some(s) = self
                .slots
                .get_mut(usize::from(cid))
                .filter(|s| s.busy && s.in_device && cqe.sq_id.get() == qid)
            else {
                break;
            };
            self.cqc.advance();
            self.unreleased += 1;
            found += 1;
            s.in_device = false;
            s.status = cqe.status();
            let (write, ok, start) = (s.write, s.status.is_success(), s.start);
            self.awaiting = self.awaiting.saturating_sub(1);
            self.backoff.record(start.elapsed());
            if write || !ok {
                done += self.finish(cid, false, f);
            } else {
                self.post_read(cid)?;
            }
        }
        let now = Instant::now();
        if found > 0 {
            self.ops.cq_reads += 1;
            self.backoff.found();
            self.next_cq_read = now;
        } else {
            self.ops.empty_polls += 1;
            self.next_cq_read = now + self.backoff.empty();
        }
        Ok(done)
    }

    /// Polled: posts the next READ of the CQ ring (from the head, up to
    /// [`CQ_READ_ENTRIES`] entries) when none is out, commands wait for their CQE and the
    /// back-off allows.
    fn read_cq(&mut self) -> Result<()> {
        if self.cq_read_out || self.awaiting == 0 || Instant::now() < self.next_cq_read {
            return Ok(());
        }
        let n = self.cqc.span();
        let sge = self
            .cq_buf
            .mr()
            .sge(0, n * 16)
            .map_err(queue_err(self.qid(), "CQ read sge"))?;
        let remote = RemoteAddr {
            addr: self
                .desc
                .cq
                .addr
                .get()
                .wrapping_add(u64::from(self.cqc.head()) * 16),
            rkey: self.desc.cq.rkey.get(),
        };
        let mut b = SendBatch::<1>::new();
        b.read(WrId::new(KIND_CQ_READ, 0), sge, remote, SendFlags::SIGNALED)
            .map_err(queue_err(self.qid(), "CQ read"))?;
        self.conn
            .qp()
            .post_send(&mut b)
            .map_err(queue_err(self.qid(), "post CQ read"))?;
        self.cq_read_out = true;
        self.cq_read_len = n;
        Ok(())
    }

    /// While idle, looks (at most every millisecond) for the CM event that says the target
    /// dropped the connection: commands in flight then never complete (the target
    /// dropped the queue, e.g. for a device reset), and no work request would fail.
    fn check_connection(&mut self) -> Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_cm_check) < Duration::from_millis(1) {
            return Ok(());
        }
        self.last_cm_check = now;
        let Some(ch) = self.conn.channel() else {
            return Ok(());
        };
        match ch.try_event() {
            Ok(Some(ev)) => match ev.kind {
                CmEventKind::Disconnected
                | CmEventKind::DeviceRemoval
                | CmEventKind::ConnectError
                | CmEventKind::Unreachable => Err(Error::DirectQueueLost {
                    qid: self.qid(),
                    cause: LostCause::CmEvent(ev.name()),
                }),
                _ => Ok(()),
            },
            Ok(None) => Ok(()),
            Err(e) => Err(queue_err(self.qid(), "CM event")(e)),
        }
    }

    fn post_read(&mut self, cid: u16) -> Result<()> {
        let s = self.slots[usize::from(cid)];
        let off = usize::from(cid) * self.stride;
        let sge = self
            .data
            .mr()
            .sge(off, s.len as usize)
            .map_err(queue_err(self.qid(), "read sge"))?;
        let pool = RemoteAddr {
            addr: self.desc.pool.addr.get().wrapping_add(off as u64),
            rkey: self.desc.pool.rkey.get(),
        };
        let mut b = SendBatch::<1>::new();
        b.read(
            WrId::new(KIND_READ, u32::from(cid)),
            sge,
            pool,
            SendFlags::SIGNALED,
        )
        .map_err(queue_err(self.qid(), "read"))?;
        self.conn
            .qp()
            .post_send(&mut b)
            .map_err(queue_err(self.qid(), "post read"))?;
        self.ops.reads += 1;
        Ok(())
    }

    fn finish(
        &mut self,
        cid: u16,
        with_data: bool,
        f: &mut impl FnMut(&DirectCompletion, &[u8]),
    ) -> usize {
        let Some(s) = self.slots.get_mut(usize::from(cid)).filter(|s| s.busy) else {
            return 0;
        };
        s.busy = false;
        let s = *s;
        let c = DirectCompletion {
            cid,
            user: s.user,
            status: s.status,
            latency: s.start.elapsed(),
            write: s.write,
        };
        let len = s.len as usize;
        if with_data
            && !self.zero_copy
            && self
                .data
                .read(usize::from(cid) * self.stride, &mut self.scratch[..len])
                .is_ok()
        {
            f(&c, &self.scratch[..len]);
        } else {
            f(&c, &[]);
        }
        self.free.push(cid);
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_spans_stop_at_the_ring_end_and_phase_flips() {
        let mut c = CqCursor::new(10);
        assert_eq!((c.head(), c.span()), (0, CQ_READ_ENTRIES));
        let mut e = [0u8; 16];
        assert!(!c.is_new(&e), "a zeroed ring holds no new entry");
        e[14] = 1;
        assert!(c.is_new(&e));
        for _ in 0..8 {
            c.advance();
        }
        assert_eq!((c.head(), c.span()), (8, 2));
        c.advance();
        c.advance();
        assert_eq!(c.head(), 0);
        // Second lap: phase 0 is new, phase 1 is last lap's entry.
        assert!(!c.is_new(&e));
        e[14] = 0xfe;
        assert!(c.is_new(&e));
        assert!(!c.is_new(&e[..8]));
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = PollBackoff::default();
        assert_eq!(b.first(), Duration::ZERO);
        b.record(Duration::from_micros(800));
        assert_eq!(b.latency(), Duration::from_micros(800));
        assert_eq!(b.cap(), Duration::from_micros(100));
        assert_eq!(b.first(), Duration::from_micros(600));
        let waits: Vec<u64> = (0..7).map(|_| b.empty().as_micros() as u64).collect();
        assert_eq!(waits, [4, 8, 16, 32, 64, 100, 100]);
        b.found();
        assert_eq!(b.empty(), Duration::from_micros(4));
        // The estimate follows the latency, and the cap stays within 8..=256 µs.
        // Slow outliers move the average (the cap) but not the floor within a window.
        b.record(Duration::from_millis(50));
        assert!(b.cap() > Duration::from_micros(100));
        assert_eq!(b.first(), Duration::from_micros(600));
        for _ in 0..200 {
            b.record(Duration::from_millis(50));
        }
        assert_eq!(b.cap(), Duration::from_micros(256));
        assert_eq!(b.floor(), Duration::from_millis(50));
        assert_eq!(b.first(), Duration::from_millis(2));
        // The floor follows faster completions at once, the cap within a few.
        b.record(Duration::from_micros(10));
        assert_eq!(b.floor(), Duration::from_micros(10));
        for _ in 0..200 {
            b.record(Duration::from_micros(10));
        }
        assert_eq!(b.cap(), Duration::from_micros(8));
        assert_eq!(b.first(), Duration::from_nanos(7500));
    }

    #[test]
    fn doorbells_per_level_and_variant() {
        use Completions::{Polled, Pushed};
        let d = |l, c, t, h, hs| doorbells(l, c, t, h, hs);
        // Forwarded: the immediate alone; polled adds the head in bits 31:16.
        let f = d(Level::Forwarded, Pushed, 7, 5, 0);
        assert_eq!((f.imm, f.cq_head, f.sq_tail), (Some(7), None, None));
        let f = d(Level::Forwarded, Polled, 7, 5, 5);
        assert_eq!(
            (f.imm, f.cq_head, f.sq_tail),
            (Some(0x0005_0007), None, None)
        );
        // P2P: no immediate; the SQ doorbell WRITE, preceded by the CQ head WRITE when
        // polled and the head moved.
        let p = d(Level::P2p, Pushed, 3, 9, 0);
        assert_eq!((p.imm, p.cq_head, p.sq_tail), (None, None, Some(3)));
        let p = d(Level::P2p, Polled, 3, 9, 2);
        assert_eq!((p.imm, p.cq_head, p.sq_tail), (None, Some(9), Some(3)));
        let p = d(Level::P2p, Polled, 3, 9, 9);
        assert_eq!((p.imm, p.cq_head, p.sq_tail), (None, None, Some(3)));
    }

    #[test]
    fn completions_names_round_trip() {
        for c in [Completions::Pushed, Completions::Polled] {
            assert_eq!(c.name().parse::<Completions>(), Ok(c));
        }
        let e = "push".parse::<Completions>().unwrap_err();
        assert_eq!(e, UnknownCompletions("push".into()));
        assert_eq!(
            e.to_string(),
            "completions: 'push' is neither 'pushed' nor 'polled'"
        );
    }

    proptest::proptest! {
        /// A model of a polled queue: the host submits (≤ depth − 1 commands outstanding;
        /// the CQ head it has consumed to goes with the doorbell when `must_release` says
        /// so), the controller
        /// posts CQEs with phase tags into a real ring, the host READs spans of it with
        /// `CqCursor`. The controller never finds the CQ full, and the host consumes
        /// exactly the posted entries, in order.
        #[test]
        fn polled_cq_never_overflows(depth in 2u16..40, steps in proptest::collection::vec(0u8..3, 1..600)) {
            let d = u64::from(depth);
            let mut ring = vec![0u8; usize::from(depth) * 16];
            let mut cur = CqCursor::new(depth);
            // Counts since the start: submitted and doorbelled, posted by the controller,
            // released to the controller (head doorbell), consumed by the host.
            let (mut submitted, mut posted, mut released, mut consumed) = (0u64, 0u64, 0u64, 0u64);
            for s in steps {
                match s {
                    0 if submitted - consumed < d - 1 => {
                        submitted += 1;
                        // The head goes with the doorbell only when it must.
                        let (awaiting, unreleased) = (submitted - consumed, consumed - released);
                        if must_release(awaiting as usize, unreleased as usize, usize::from(depth) - 1) {
                            released = consumed;
                        }
                    }
                    1 if posted < submitted => {
                        // NVMe: the CQ is full at depth − 1 entries not released.
                        proptest::prop_assert!(posted - released < d - 1, "CQ full");
                        let slot = (posted % d) as usize * 16;
                        let phase = (posted / d) % 2 == 0;
                        ring[slot..slot + 16].fill(0);
                        ring[slot + 12..slot + 14].copy_from_slice(&((posted % 65536) as u16).to_le_bytes());
                        ring[slot + 14] = u8::from(phase);
                        posted += 1;
                    }
                    _ => {
                        let start = usize::from(cur.head());
                        for k in 0..cur.span() {
                            let e = &ring[(start + k) * 16..(start + k) * 16 + 16];
                            if !cur.is_new(e) {
                                break;
                            }
                            proptest::prop_assert_eq!(u16::from_le_bytes([e[12], e[13]]), (consumed % 65536) as u16);
                            cur.advance();
                            consumed += 1;
                        }
                        proptest::prop_assert!(consumed <= posted);
                    }
                }
            }
        }
    }
}
