//! Raw queue pairs: an I/O SQ/CQ pair whose rings someone else fills and reads (direct
//! mode: a remote host writes the SQEs and reads the CQEs by RDMA); the driver creates the
//! queues, re-creates them after a reset, rings their doorbells and deletes them.

use std::sync::Arc;

use crate::ctrl::NewQueue;
use crate::dma::DmaBuffer;
use crate::doorbell::DoorbellPair;
use crate::error::{Error, Result};
use crate::irq::EventFd;
use crate::spec::PAGE_SIZE;

/// Who created a [`RawQueuePair`]'s queues on the controller and deletes them: our driver
/// ([`Controller::create_raw_queue_pair`](crate::Controller::create_raw_queue_pair)), or
/// another driver that owns the controller (SPDK's, in the binary).
pub trait QueueOwner: Send + Sync {
    /// Controller resets so far; when it changes, the controller's queues were lost (or
    /// re-created empty).
    fn generation(&self) -> u64;
    /// Deletes queue pair `qid` (created in `generation`) from the controller and gives
    /// the qid back. Called once, when the [`RawQueuePair`] is dropped.
    fn release_queue(&self, qid: u16, generation: u64);
}

/// An I/O queue pair whose rings the caller drives (see
/// [`Controller::create_raw_queue_pair`](crate::Controller::create_raw_queue_pair)).
/// `Send + Sync`; each doorbell is to be rung by one thread at a time.
pub struct RawQueuePair {
    qid: u16,
    depth: u16,
    /// Vector and eventfd of the CQ's interrupt (None: polled).
    irq: Option<(u16, Arc<EventFd>)>,
    sq: DmaBuffer,
    cq: DmaBuffer,
    doorbells: DoorbellPair,
    /// The generation the queues were created in.
    created: u64,
    owner: Arc<dyn QueueOwner>,
}

impl RawQueuePair {
    pub(crate) fn new(
        q: NewQueue,
        depth: u16,
        sq: DmaBuffer,
        cq: DmaBuffer,
        owner: Arc<dyn QueueOwner>,
    ) -> Self {
        RawQueuePair {
            qid: q.qid,
            depth,
            irq: q.irq,
            sq,
            cq,
            doorbells: q.doorbells,
            created: q.generation,
            owner,
        }
    }

    /// Checks rings for a queue pair of `depth` entries on a controller that takes at
    /// most `max` (CAP.MQES + 1): `sq` holds `depth` 64-byte entries, `cq` `depth` 16-byte
    /// entries, both page aligned. Whoever creates the queues calls this first.
    pub fn check_rings(sq: &DmaBuffer, cq: &DmaBuffer, depth: u16, max: u16) -> Result<()> {
        if depth < 2
            || depth > max
            || sq.len() < depth as usize * 64
            || cq.len() < depth as usize * 16
        {
            return Err(Error::InvalidArgument(format!(
                "raw queue of depth {depth} (max {max}) on rings of {} / {} bytes",
                sq.len(),
                cq.len()
            )));
        }
        if !sq.iova().is_multiple_of(PAGE_SIZE as u64)
            || !cq.iova().is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(Error::InvalidArgument(
                "raw queue rings must be page aligned".into(),
            ));
        }
        Ok(())
    }

    /// A queue pair another driver created: queue `qid` of `depth` entries on the rings
    /// `sq` and `cq`, rung through `doorbells`, created in generation `created` of
    /// `owner`, which deletes it when this is dropped. Its CQ is polled (no interrupt).
    pub fn from_parts(
        qid: u16,
        depth: u16,
        sq: DmaBuffer,
        cq: DmaBuffer,
        doorbells: DoorbellPair,
        created: u64,
        owner: Arc<dyn QueueOwner>,
    ) -> Self {
        RawQueuePair {
            qid,
            depth,
            irq: None,
            sq,
            cq,
            doorbells,
            created,
            owner,
        }
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }
    pub fn depth(&self) -> u16 {
        self.depth
    }
    /// The submission ring.
    pub fn sq(&self) -> &DmaBuffer {
        &self.sq
    }
    /// The completion ring.
    pub fn cq(&self) -> &DmaBuffer {
        &self.cq
    }
    /// Controller resets so far; when it changes, the queues were recreated empty.
    pub fn generation(&self) -> u64 {
        self.owner.generation()
    }
    /// The eventfd the CQ's interrupt signals (shared by every queue on its vector), or
    /// None for a polled CQ. To sleep: clear it, look at the ring once more (a completion
    /// posted before the clear signalled an event that is now gone), then poll(2) on it.
    pub fn interrupt_eventfd(&self) -> Option<&Arc<EventFd>> {
        self.irq.as_ref().map(|(_, e)| e)
    }
    /// The CQ's interrupt vector, or None for a polled CQ.
    pub fn interrupt_vector(&self) -> Option<u16> {
        self.irq.as_ref().map(|(v, _)| *v)
    }
    /// Whether the doorbells go through shadow slots (then the MMIO register is written
    /// only when the controller's EventIdx asks for it).
    pub fn shadow_doorbells(&self) -> bool {
        self.doorbells.sq.has_shadow()
    }
    /// Publish a new SQ tail (after the SQEs are written): write barrier, then the
    /// shadow slot and, when EventIdx asks for it, the MMIO doorbell (without shadow
    /// doorbells: the MMIO doorbell). Returns whether MMIO was written.
    pub fn ring_sq(&self, tail: u16) -> bool {
        self.doorbells.sq.ring(tail)
    }
    /// Publish a new CQ head (after the CQEs are consumed), as [`ring_sq`](Self::ring_sq).
    pub fn ring_cq(&self, head: u16) -> bool {
        self.doorbells.cq.ring(head)
    }
}

impl Drop for RawQueuePair {
    fn drop(&mut self) {
        self.owner.release_queue(self.qid, self.created);
    }
}
