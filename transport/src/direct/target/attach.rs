//! Attach: what one attachment pins (the [`PinLedger`]), and building it — the NVMe queue
//! pair on fresh rings (P2P first, `forwarded` on any refusal), the MRs the descriptor
//! names, the descriptor itself — on the service's control thread ([`control_thread`]),
//! never on a poll group: admin commands to the device and MR registrations take
//! milliseconds, and a poll group thread serves I/O.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use nvme::ctrl::RawQueuePair;
use nvme::spec::Status;
use nvme::DmaBuffer;
use rdma::{Access, MemoryRegion, RegisteredBuffer};
use zerocopy::byteorder::little_endian::{U16, U32, U64};

use super::super::proto::{
    AttachRequest, Descriptor, Level, RemoteRegion, FLAG_CQE_PUSH, FLAG_CQ_POLL, FLAG_TAIL_IN_IMM,
    STATUS_ATTACH_LIMIT,
};
use super::super::AttachReply;
use super::p2p::{p2p_queue, P2pRefusal};
use super::report::{QueueIdentity, QueueReport};
use super::{held, DirectDevice, DirectLimits, DirectNamespace, Inner};

const PAGE: usize = 4096;

/// Attachments and pinned bytes per host and in all, kept by [`Pin`]s.
#[derive(Debug, Default)]
pub(super) struct PinLedger {
    per_host: HashMap<String, (u32, u64)>,
    pub(super) total: u64,
}

/// One attachment's share of the [`PinLedger`]; given back when dropped (with the
/// attachment, however it ends).
pub(super) struct Pin {
    ledger: Arc<Mutex<PinLedger>>,
    host: String,
    bytes: u64,
}

/// Which [`DirectLimits`] bound refuses an attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum LimitRefusal {
    #[error("the host has {have} direct queues (max_queues_per_host {max})")]
    QueuesPerHost { have: u32, max: u32 },
    #[error("the host's direct queues would pin {would} bytes (max_pinned_per_host {max})")]
    PinnedPerHost { would: u64, max: u64 },
    #[error("direct queues would pin {would} bytes in all (max_pinned_total {max})")]
    PinnedTotal { would: u64, max: u64 },
}

impl PinLedger {
    /// Takes `bytes` for one more attachment of `host`, or says which limit refuses it.
    pub(super) fn reserve(
        ledger: &Arc<Mutex<PinLedger>>,
        lim: &DirectLimits,
        host: &str,
        bytes: u64,
    ) -> Result<Pin, LimitRefusal> {
        let mut l = held(ledger);
        let (n, b) = l.per_host.get(host).copied().unwrap_or((0, 0));
        if n >= lim.max_queues_per_host {
            return Err(LimitRefusal::QueuesPerHost {
                have: n,
                max: lim.max_queues_per_host,
            });
        }
        if b + bytes > lim.max_pinned_per_host {
            return Err(LimitRefusal::PinnedPerHost {
                would: b + bytes,
                max: lim.max_pinned_per_host,
            });
        }
        if l.total + bytes > lim.max_pinned_total {
            return Err(LimitRefusal::PinnedTotal {
                would: l.total + bytes,
                max: lim.max_pinned_total,
            });
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
pub(super) fn reap_expired<T>(
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
#[derive(Debug, thiserror::Error)]
pub(super) enum AttachFail {
    /// A [`DirectLimits`] bound.
    #[error(transparent)]
    Limit(#[from] LimitRefusal),
    /// The namespace is not on the controller (any more).
    #[error("namespace {0} is not on the controller")]
    NoNamespace(u32),
    /// The device: DMA memory, queue creation.
    #[error(transparent)]
    Device(#[from] nvme::Error),
    /// An RDMA registration.
    #[error("{what}: {source}")]
    Rdma {
        what: &'static str,
        source: rdma::Error,
    },
}

/// An attachment: everything the host's descriptor names. Field order is drop order:
/// MRs before the queue pair (which deletes the NVMe queues) and the memory.
pub(super) struct Attachment {
    pub _db_mr: Option<MemoryRegion>,
    pub _sq_mr: MemoryRegion,
    pub _cq_mr: MemoryRegion,
    pub pool_mr: MemoryRegion,
    pub mirror: RegisteredBuffer,
    pub raw: RawQueuePair,
    pub _pool: DmaBuffer,
    pub pool_iova: u64,
    pub pool_len: u64,
    pub lba_size: u32,
    pub generation: u64,
    pub report: QueueReport,
    pub created: Instant,
    /// This attachment's share of the pinned memory (last: given back after the rest).
    pub _pin: Pin,
}

/// An attach handed to the control thread: the allow list and the namespace were checked
/// on the caller's thread.
pub(super) struct AttachJob {
    pub subnqn: String,
    pub hostnqn: String,
    pub ns: DirectNamespace,
    pub req: AttachRequest,
    pub reply: AttachReply,
}

/// The service's control thread: builds the attachments handed to it, one at a time, off
/// the poll groups (as SPDK sends such work to its management thread), and answers each
/// through its reply. Ends when the service drops the sending side.
pub(super) fn control_thread(inner: Arc<Inner>, jobs: Receiver<AttachJob>) {
    for job in jobs.iter() {
        run(&inner, job);
    }
}

fn run(inner: &Inner, job: AttachJob) {
    let AttachJob {
        subnqn,
        hostnqn,
        ns,
        req,
        reply,
    } = job;
    if inner.paused.load(Ordering::SeqCst) {
        reply.send(Err(Status::NAMESPACE_NOT_READY));
        return;
    }
    let (att, desc) = match build(inner, &subnqn, &hostnqn, &ns, req) {
        Ok(built) => built,
        Err(AttachFail::Limit(why)) => {
            tracing::warn!(subnqn, hostnqn, why = %why, "direct attach refused: limit");
            held(&inner.control).report.limited += 1;
            reply.send(Err(STATUS_ATTACH_LIMIT));
            return;
        }
        Err(e) => {
            tracing::warn!(subnqn, hostnqn, error = %e, "direct attach failed");
            reply.send(Err(Status::INTERNAL_ERROR));
            return;
        }
    };
    let token = desc.token.get();
    {
        let mut c = held(&inner.control);
        // Checked under the lock a quiesce clears the parked attachments with: one that
        // began during the build (a device reset) gets none of them.
        if inner.paused.load(Ordering::SeqCst) {
            drop(c);
            drop(att);
            reply.send(Err(Status::NAMESPACE_NOT_READY));
            return;
        }
        c.report.attached += 1;
        c.pending.insert(token, att);
    }
    if !reply.send(Ok(desc)) {
        // The admin queue closed while the queue was built: nobody will connect to it.
        let mut c = held(&inner.control);
        if c.pending.remove(&token).is_some() {
            c.report.attached -= 1;
        }
        tracing::info!(
            subnqn,
            hostnqn,
            "direct attach built after its admin queue closed: dropped"
        );
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

/// Builds the attachment of `hostnqn` to namespace `ns` of `subnqn` and its descriptor:
/// rings, pool and mirror page pinned and registered, the NVMe queue pair created (admin
/// commands to the controller: this blocks for as long as the device takes).
pub(super) fn build(
    inner: &Inner,
    subnqn: &str,
    hostnqn: &str,
    ns: &DirectNamespace,
    req: AttachRequest,
) -> Result<(Attachment, Descriptor), AttachFail> {
    let ctrl = &*ns.device;
    let (block_size, blocks) = ctrl
        .namespace(ns.nsid)
        .ok_or(AttachFail::NoNamespace(ns.nsid))?;
    let mqes = ctrl.max_queue_entries().min(1024) as u16;
    let depth = if req.depth == 0 {
        inner.cfg.default_depth
    } else {
        req.depth
    }
    .clamp(2, mqes);
    let max_io = ctrl.max_transfer().min(128 * 1024);
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
    let pin = PinLedger::reserve(&inner.pins, &limits, hostnqn, pinned)?;
    let cq = ctrl.alloc_dma(cq_len)?;
    let pool = ctrl.alloc_dma(pool_len)?;
    let reg = |buf: &DmaBuffer, access: Access, what: &'static str| {
        // SAFETY: `buf` is DMA memory of the controller's driver, kept alive by the attachment (the queue
        // pair holds the rings, `_pool` the pool) until after the MR is dropped (field
        // order of `Attachment`); the target touches it only through DmaBuffer's
        // volatile/raw-pointer accessors, never through references.
        unsafe { MemoryRegion::register(&inner.pd, buf.as_ptr(), buf.len(), access) }
            .map_err(|source| AttachFail::Rdma { what, source })
    };
    // Pushed completions: the poller watches the CQ, so give it an interrupt to sleep
    // on; polled ones: the host reads the CQ, an interrupt would only cost CPU.
    let irq = inner.cfg.interrupts && !req.polled_cq && ctrl.interrupt_vectors() > 0;
    // P2P first; on any refusal the queue pair is (re-)created with the SQ in host
    // memory and the host's doorbells go through the mirror page (forwarded).
    let p2p = if inner.cfg.try_p2p {
        p2p_queue(&inner.pd, ns, &cq, depth, sq_len, irq)
    } else {
        Err(Box::new(P2pRefusal::Disabled))
    };
    let (raw, sq_mr, db_mr, level, reason, sq_in_cmb) = match p2p {
        Ok(p) => {
            let reason = p.reason();
            let in_cmb = p.place.in_cmb();
            (p.raw, p.sq_mr, Some(p.db_mr), Level::P2p, reason, in_cmb)
        }
        Err(refusal) => {
            let sq = ctrl.alloc_dma(sq_len)?;
            sq.fill(0, sq.len(), 0)?;
            let raw = create_raw(ctrl, &sq, &cq, depth, irq)?;
            let sq_mr = reg(
                &sq,
                Access::LOCAL_WRITE | Access::REMOTE_WRITE,
                "register SQ",
            )?;
            (
                raw,
                sq_mr,
                None,
                Level::Forwarded,
                refusal.to_string(),
                false,
            )
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
    let mirror =
        RegisteredBuffer::new(&inner.pd, PAGE, Access::ALL).map_err(|source| AttachFail::Rdma {
            what: "doorbell mirror",
            source,
        })?;
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
    d.lba_size = U32::new(block_size);
    d.max_transfer = U32::new(max_io as u32);
    d.blocks = U64::new(blocks);
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
        lba_size: block_size,
        _pool: pool,
        generation: ctrl.generation(),
        report: QueueReport::attached(QueueIdentity {
            token,
            hostnqn: hostnqn.to_owned(),
            subnqn: subnqn.to_owned(),
            level,
            reason,
            sq_in_cmb,
            qid,
            depth,
            interrupt_vector,
        }),
        created: Instant::now(),
        _pin: pin,
    };
    Ok((att, d))
}

/// A raw queue pair, with an interrupt when `irq` (falling back to a polled CQ when the
/// controller refuses one: the poller then polls it).
pub(super) fn create_raw(
    ctrl: &dyn DirectDevice,
    sq: &DmaBuffer,
    cq: &DmaBuffer,
    depth: u16,
    irq: bool,
) -> nvme::Result<RawQueuePair> {
    if irq {
        match ctrl.create_raw_queue_pair(sq.clone(), cq.clone(), depth, true) {
            Ok(r) => return Ok(r),
            Err(e) => tracing::warn!(error = %e, "direct queue without interrupt: polled CQ"),
        }
    }
    ctrl.create_raw_queue_pair(sq.clone(), cq.clone(), depth, false)
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
        assert_eq!(e, LimitRefusal::QueuesPerHost { have: 2, max: 2 });
        assert!(e.to_string().contains("max_queues_per_host 2"), "{e}");
        drop(a2);
        let e = PinLedger::reserve(&ledger, &lim, "a", 61).err().unwrap();
        assert_eq!(
            e,
            LimitRefusal::PinnedPerHost {
                would: 101,
                max: 100
            }
        );
        assert!(e.to_string().contains("max_pinned_per_host 100"), "{e}");
        let b = PinLedger::reserve(&ledger, &lim, "b", 100).unwrap();
        let e = PinLedger::reserve(&ledger, &lim, "a", 20).err().unwrap();
        assert!(matches!(e, LimitRefusal::PinnedTotal { max: 150, .. }));
        assert!(e.to_string().contains("max_pinned_total 150"), "{e}");
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
    fn rdma_failures_are_their_own_error_with_context() {
        let e = AttachFail::NoNamespace(9);
        assert_eq!(e.to_string(), "namespace 9 is not on the controller");
        let e = AttachFail::from(LimitRefusal::QueuesPerHost { have: 1, max: 1 });
        assert!(e.to_string().starts_with("the host has 1 direct queues"));
        assert_eq!(page_round(1), PAGE);
        assert_eq!(page_round(PAGE + 1), 2 * PAGE);
    }
}
