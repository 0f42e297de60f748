//! I/O queue pairs: one per thread, no locks and no heap allocation per command.

use std::os::fd::{AsFd, BorrowedFd};
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ctrl::Shared;
use crate::dma::DmaBuffer;
use crate::doorbell::DoorbellPair;
use crate::error::{Error, Result};
use crate::irq::EventFd;
use crate::spec::{Sqe, Status, PAGE_SIZE};

/// One completed command as [`IoQueuePair::poll`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command identifier the submit call returned.
    pub cid: u16,
    /// The caller's tag given at submission.
    pub tag: u64,
    /// NVMe status. Commands lost in a controller reset complete with
    /// [`Status::ABORTED_SQ_DELETED`].
    pub status: Status,
    /// Command-specific result (CQE DW0).
    pub dw0: u32,
}

impl Completion {
    pub fn is_ok(&self) -> bool {
        self.status.is_success()
    }
}

/// Counters kept per queue pair.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueStats {
    pub submitted: u64,
    pub completed: u64,
    /// Doorbell writes that reached MMIO (with shadow doorbells most are skipped).
    pub mmio_doorbell_writes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Busy,
    /// Lost in a controller reset; reported by the next poll.
    Lost,
}

#[derive(Clone, Copy)]
struct Slot {
    state: SlotState,
    opcode: u8,
    timed_out: bool,
    epoch: u32,
    tag: u64,
}

/// An I/O submission/completion queue pair.
///
/// Owned by one thread (`Send`, not `Sync`). `submit*` writes the SQE and rings the tail
/// doorbell; [`poll`](Self::poll) reaps completions and rings the CQ head doorbell once
/// per batch. Buffers passed to a command must stay alive until its completion.
pub struct IoQueuePair {
    pub(crate) qid: u16,
    depth: u16,
    sq: *mut u8,
    cq: *const u8,
    doorbells: DoorbellPair,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    in_flight: u16,
    lost: u16,
    prp: DmaBuffer,
    max_transfer: usize,
    ns_shift: Vec<(u32, u32)>,
    /// (nsid, lba shift) of the first namespace, for the fast path.
    ns0: (u32, u32),
    generation: u64,
    epoch: u32,
    epoch_start: Instant,
    sq_in_cmb: bool,
    /// The CQ's interrupt vector and the eventfd it signals (IEN = 1), if any.
    irq: Option<(u16, Arc<EventFd>)>,
    stats: QueueStats,
    // Keep the rings mapped.
    _sq_buf: DmaBuffer,
    _cq_buf: DmaBuffer,
    pub(crate) shared: Arc<Shared>,
}

// SAFETY: the raw ring pointers point into mappings kept alive by `_sq_buf` and `_cq_buf`
// (the doorbells keep their own); the queue pair is used by one thread at a time.
unsafe impl Send for IoQueuePair {}

pub(crate) struct QueueParts {
    pub qid: u16,
    pub depth: u16,
    pub sq_buf: DmaBuffer,
    pub cq_buf: DmaBuffer,
    pub sq_in_cmb: bool,
    pub prp: DmaBuffer,
    pub doorbells: DoorbellPair,
    pub max_transfer: usize,
    pub ns_shift: Vec<(u32, u32)>,
    pub generation: u64,
    pub irq: Option<(u16, Arc<EventFd>)>,
}

#[cold]
fn inactive_namespace(nsid: u32) -> Error {
    Error::InvalidArgument(format!("namespace {nsid} is not active"))
}

#[cold]
fn bad_length(len: usize, shift: u32, max: usize) -> Error {
    if len >> shift > 65536 {
        return Error::TooLarge { len, max };
    }
    Error::InvalidArgument(format!(
        "length {len} is not a non-zero multiple of the block size {}",
        1usize << shift
    ))
}

#[cold]
fn too_large(len: usize, max: usize) -> Error {
    Error::TooLarge { len, max }
}

#[cold]
fn misaligned(iova: u64) -> Error {
    Error::InvalidArgument(format!("data buffer IOVA {iova:#x} is not dword aligned"))
}

impl IoQueuePair {
    pub(crate) fn from_parts(p: QueueParts, shared: Arc<Shared>) -> Self {
        let depth = p.depth;
        IoQueuePair {
            qid: p.qid,
            depth,
            sq: p.sq_buf.as_ptr(),
            cq: p.cq_buf.as_ptr(),
            doorbells: p.doorbells,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            slots: vec![
                Slot {
                    state: SlotState::Free,
                    opcode: 0,
                    timed_out: false,
                    epoch: 0,
                    tag: 0
                };
                depth as usize
            ]
            .into_boxed_slice(),
            // depth - 1 command identifiers: one SQ entry always stays free
            // (full = tail + 1 == head), so the free list alone is the backpressure.
            free: (0..depth - 1).rev().collect(),
            in_flight: 0,
            lost: 0,
            prp: p.prp,
            max_transfer: p.max_transfer,
            ns0: p.ns_shift.first().copied().unwrap_or((0, 9)),
            ns_shift: p.ns_shift,
            generation: p.generation,
            epoch: 0,
            epoch_start: Instant::now(),
            sq_in_cmb: p.sq_in_cmb,
            irq: p.irq,
            stats: QueueStats::default(),
            _sq_buf: p.sq_buf,
            _cq_buf: p.cq_buf,
            shared,
        }
    }

    /// Queue identifier.
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Number of entries; at most `depth - 1` commands can be outstanding.
    pub fn depth(&self) -> u16 {
        self.depth
    }
    /// Commands submitted and not yet reported by `poll`.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }
    /// Whether the SQ lives in the controller memory buffer.
    pub fn sq_in_cmb(&self) -> bool {
        self.sq_in_cmb
    }
    /// Whether shadow doorbells are in use for this queue.
    pub fn shadow_doorbells(&self) -> bool {
        self.doorbells.sq.has_shadow()
    }
    /// The interrupt vector of this queue's CQ, if it was created with interrupts
    /// ([`crate::Controller::create_io_queue_pair_with_interrupts`]).
    pub fn interrupt_vector(&self) -> Option<u16> {
        self.irq.as_ref().map(|(v, _)| *v)
    }
    /// The eventfd the CQ's interrupt signals (readable after [`arm_interrupt`] once a
    /// completion is posted), for poll(2)/epoll. None on a polled queue.
    ///
    /// [`arm_interrupt`]: Self::arm_interrupt
    pub fn interrupt_fd(&self) -> Option<BorrowedFd<'_>> {
        self.irq.as_ref().map(|(_, e)| e.as_fd())
    }
    /// The eventfd itself (shared by every queue on the same vector).
    pub fn interrupt_eventfd(&self) -> Option<&Arc<EventFd>> {
        self.irq.as_ref().map(|(_, e)| e)
    }

    /// Whether [`poll`](Self::poll) has something to report now (a CQE with the current
    /// phase at the head, or commands lost in a controller reset). No side effects on
    /// the rings.
    #[inline]
    pub fn completion_ready(&mut self) -> bool {
        self.sync_generation();
        if self.lost > 0 {
            return true;
        }
        let entry = self.cq.wrapping_add(self.cq_head as usize * 16);
        // SAFETY: cq_head < depth; the CQ ring holds depth 16-byte entries.
        let st = unsafe { ptr::read_volatile(entry.add(14) as *const u16) };
        (st & 1 == 1) == self.phase
    }

    /// Prepare to sleep on [`interrupt_fd`](Self::interrupt_fd): clear the eventfd, then
    /// look at the CQ once more (a completion posted before the clear raised an event
    /// that is now gone; one posted after it signals the fd again). Returns true when the
    /// caller may sleep; false when a completion is already there (poll instead) or the
    /// queue has no interrupt.
    #[inline]
    pub fn arm_interrupt(&mut self) -> bool {
        let Some((_, e)) = &self.irq else {
            return false;
        };
        e.clear();
        // The eventfd read is a syscall (a full barrier); the CQ read comes after it.
        fence(Ordering::SeqCst);
        !self.completion_ready()
    }

    /// Sleep until a completion may be ready or `timeout` passes: arm, then wait on the
    /// eventfd. Returns at once if a completion is already there. Errors on a polled
    /// queue.
    pub fn wait_interrupt(&mut self, timeout: Duration) -> Result<()> {
        if self.irq.is_none() {
            return Err(Error::InvalidArgument(format!(
                "queue {} was created without interrupts",
                self.qid
            )));
        }
        if !self.arm_interrupt() {
            return Ok(());
        }
        if let Some((_, e)) = &self.irq {
            e.wait(timeout)
                .map_err(|err| Error::io("waiting for an NVMe interrupt", err))?;
        }
        Ok(())
    }

    /// Largest transfer one command may carry, in bytes.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The block size of namespace `nsid` as log2, if known.
    pub fn lba_shift(&self, nsid: u32) -> Option<u32> {
        self.ns_shift
            .iter()
            .find(|(n, _)| *n == nsid)
            .map(|(_, s)| *s)
    }

    #[inline]
    fn sync_generation(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g == self.generation {
            return;
        }
        // The controller was reset and recreated this queue pair (empty, CQ zeroed):
        // every outstanding command is lost.
        self.generation = g;
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        for s in self.slots.iter_mut() {
            if s.state == SlotState::Busy {
                s.state = SlotState::Lost;
                self.lost += 1;
            }
        }
    }

    /// Build PRP1/PRP2 for `buf` into `sqe`, using this slot's PRP list page if needed.
    #[inline]
    fn build_prps(&self, sqe: &mut Sqe, cid: u16, buf: &DmaBuffer) -> Result<()> {
        let len = buf.len();
        if len > self.max_transfer {
            return Err(too_large(len, self.max_transfer));
        }
        let iova = buf.iova();
        if iova & 3 != 0 {
            return Err(misaligned(iova));
        }
        let page = PAGE_SIZE as u64;
        sqe.prp1 = iova.into();
        let first = (page - (iova & (page - 1))) as usize;
        if len <= first {
            sqe.prp2 = 0.into();
            return Ok(());
        }
        let next = (iova & !(page - 1)) + page;
        let rest = len - first;
        if rest <= PAGE_SIZE {
            sqe.prp2 = next.into();
            return Ok(());
        }
        let n = rest.div_ceil(PAGE_SIZE);
        // One list page per slot holds 512 entries; max_transfer keeps n <= 512.
        let list = self.prp.as_ptr().wrapping_add(cid as usize * PAGE_SIZE) as *mut u64;
        for i in 0..n {
            // SAFETY: n <= 512 entries fit in this slot's 4 KiB list page, which the device
            // does not read until the SQE referencing it is submitted.
            unsafe { ptr::write_volatile(list.add(i), next + (i as u64) * page) };
        }
        sqe.prp2 = (self.prp.iova() + cid as u64 * page).into();
        Ok(())
    }

    /// Submit a command and ring the SQ doorbell. `data`, if given, is described with PRPs
    /// (its whole length); returns the command identifier. No heap allocation, no locks.
    #[inline]
    pub fn submit(&mut self, sqe: Sqe, data: Option<&DmaBuffer>, tag: u64) -> Result<u16> {
        let cid = self.enqueue(sqe, data, tag)?;
        self.ring_sq();
        Ok(cid)
    }

    /// Start a batch: commands queued through it share one doorbell write, done when the
    /// batch is dropped (or [`Batch::ring`] is called).
    pub fn batch(&mut self) -> Batch<'_> {
        Batch {
            qp: self,
            queued: 0,
        }
    }

    /// Write the SQE into the ring without ringing the doorbell.
    #[inline]
    fn enqueue(&mut self, mut sqe: Sqe, data: Option<&DmaBuffer>, tag: u64) -> Result<u16> {
        self.sync_generation();
        let Some(&cid) = self.free.last() else {
            return Err(Error::QueueFull {
                qid: self.qid,
                depth: self.depth,
            });
        };
        sqe.set_cid(cid);
        if let Some(buf) = data {
            self.build_prps(&mut sqe, cid, buf)?;
        }
        self.free.pop();
        self.slots[cid as usize] = Slot {
            state: SlotState::Busy,
            opcode: sqe.opcode(),
            timed_out: false,
            epoch: self.epoch,
            tag,
        };
        self.in_flight += 1;
        self.write_sqe(&sqe);
        self.sq_tail = if self.sq_tail + 1 == self.depth {
            0
        } else {
            self.sq_tail + 1
        };
        self.stats.submitted += 1;
        Ok(cid)
    }

    #[inline]
    fn write_sqe(&mut self, sqe: &Sqe) {
        let words: [u64; 8] = zerocopy::transmute!(*sqe);
        let dst = self.sq.wrapping_add(self.sq_tail as usize * 64) as *mut u64;
        for (i, w) in words.iter().enumerate() {
            // SAFETY: sq_tail < depth and the SQ ring holds depth 64-byte entries; the
            // entry at the tail is not owned by the controller. 8-byte volatile stores
            // suit both host memory and trapped CMB MMIO.
            unsafe { ptr::write_volatile(dst.add(i), *w) };
        }
    }

    /// Publish the SQ tail (one MMIO write, or none when EventIdx allows).
    #[inline]
    fn ring_sq(&mut self) {
        if self.doorbells.sq.ring(self.sq_tail) {
            self.stats.mmio_doorbell_writes += 1;
        }
    }

    /// Publish the CQ head after the CQEs before it are consumed.
    #[inline]
    fn ring_cq(&mut self) {
        if self.doorbells.cq.ring(self.cq_head) {
            self.stats.mmio_doorbell_writes += 1;
        }
    }

    /// Reap up to `max` completions, calling `f` for each; rings the CQ head doorbell
    /// once. Returns the number reported.
    #[inline]
    pub fn poll<F: FnMut(Completion)>(&mut self, max: usize, mut f: F) -> usize {
        self.sync_generation();
        let mut n = 0;
        if self.lost > 0 {
            for cid in 0..self.depth {
                let s = &mut self.slots[cid as usize];
                if s.state == SlotState::Lost && n < max {
                    s.state = SlotState::Free;
                    let tag = s.tag;
                    self.free.push(cid);
                    self.lost -= 1;
                    self.in_flight -= 1;
                    n += 1;
                    f(Completion {
                        cid,
                        tag,
                        status: Status::ABORTED_SQ_DELETED,
                        dw0: 0,
                    });
                }
            }
        }
        let mut reaped = false;
        while n < max {
            let entry = self.cq.wrapping_add(self.cq_head as usize * 16);
            // SAFETY: cq_head < depth; the CQ ring holds depth 16-byte entries.
            let st = unsafe { ptr::read_volatile(entry.add(14) as *const u16) };
            if (st & 1 == 1) != self.phase {
                break;
            }
            // Read barrier: the rest of the entry after its phase tag.
            fence(Ordering::Acquire);
            // SAFETY: same entry, aligned fields.
            let dw0 = unsafe { ptr::read_volatile(entry as *const u32) };
            // SAFETY: as above.
            let cid = unsafe { ptr::read_volatile(entry.add(12) as *const u16) };
            self.cq_head += 1;
            if self.cq_head == self.depth {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            reaped = true;
            let Some(s) = self.slots.get_mut(cid as usize) else {
                continue;
            };
            if s.state != SlotState::Busy {
                continue;
            }
            s.state = SlotState::Free;
            let tag = s.tag;
            self.free.push(cid);
            self.in_flight -= 1;
            self.stats.completed += 1;
            n += 1;
            f(Completion {
                cid,
                tag,
                status: Status::from_field(st),
                dw0,
            });
        }
        if reaped {
            self.ring_cq();
        }
        n
    }

    /// Submit one command and wait for it (nothing else may be outstanding).
    pub fn execute(
        &mut self,
        sqe: Sqe,
        data: Option<&DmaBuffer>,
        timeout: Duration,
    ) -> Result<Completion> {
        if self.in_flight != 0 {
            return Err(Error::InvalidArgument(format!(
                "execute on queue {} with {} commands outstanding",
                self.qid, self.in_flight
            )));
        }
        let opcode = sqe.opcode();
        let cid = self.submit(sqe, data, 0)?;
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let mut got = None;
            self.poll(1, |c| got = Some(c));
            if let Some(c) = got {
                if !c.is_ok() {
                    return Err(Error::Command {
                        qid: self.qid,
                        cid,
                        opcode,
                        status: c.status,
                    });
                }
                return Ok(c);
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                if start.elapsed() > timeout {
                    return Err(Error::Timeout {
                        qid: self.qid,
                        cid,
                        opcode,
                        after: timeout,
                    });
                }
                std::thread::yield_now();
            }
        }
    }

    /// 0-based block count for a transfer of `len` bytes on `nsid`.
    #[inline]
    fn nlb0(&self, nsid: u32, len: usize) -> Result<u16> {
        // Fast path: the first namespace (the common single-namespace case).
        let shift = if nsid == self.ns0.0 {
            self.ns0.1
        } else {
            match self.lba_shift(nsid) {
                Some(s) => s,
                None => return Err(inactive_namespace(nsid)),
            }
        };
        let nlb = len >> shift;
        // One compare for 1..=65536 blocks, one for a whole number of blocks.
        if (nlb.wrapping_sub(1)) >= 65536 || (nlb << shift) != len {
            return Err(bad_length(len, shift, self.max_transfer));
        }
        Ok((nlb - 1) as u16)
    }

    /// Read `buf.len()` bytes from `slba`.
    #[inline]
    pub fn read(&mut self, nsid: u32, slba: u64, buf: &DmaBuffer, tag: u64) -> Result<u16> {
        let nlb0 = self.nlb0(nsid, buf.len())?;
        self.submit(Sqe::read(nsid, slba, nlb0, 0, 0), Some(buf), tag)
    }
    /// Write `buf.len()` bytes at `slba`.
    #[inline]
    pub fn write(&mut self, nsid: u32, slba: u64, buf: &DmaBuffer, tag: u64) -> Result<u16> {
        let nlb0 = self.nlb0(nsid, buf.len())?;
        self.submit(Sqe::write(nsid, slba, nlb0, 0, 0), Some(buf), tag)
    }
    /// Queue a read like [`IoQueuePair::read`] without ringing the doorbell:
    /// [`IoQueuePair::ring_doorbell`] publishes every command queued so far. For callers
    /// whose queueing and publishing happen in separate calls (fio's `queue` / `commit`);
    /// within one call prefer [`IoQueuePair::batch`].
    #[inline]
    pub fn queue_read(&mut self, nsid: u32, slba: u64, buf: &DmaBuffer, tag: u64) -> Result<u16> {
        let nlb0 = self.nlb0(nsid, buf.len())?;
        self.enqueue(Sqe::read(nsid, slba, nlb0, 0, 0), Some(buf), tag)
    }
    /// Queue a write without ringing the doorbell (see [`IoQueuePair::queue_read`]).
    #[inline]
    pub fn queue_write(&mut self, nsid: u32, slba: u64, buf: &DmaBuffer, tag: u64) -> Result<u16> {
        let nlb0 = self.nlb0(nsid, buf.len())?;
        self.enqueue(Sqe::write(nsid, slba, nlb0, 0, 0), Some(buf), tag)
    }
    /// Queue any command without ringing the doorbell (see [`IoQueuePair::queue_read`]).
    #[inline]
    pub fn queue_command(&mut self, sqe: Sqe, data: Option<&DmaBuffer>, tag: u64) -> Result<u16> {
        self.enqueue(sqe, data, tag)
    }
    /// Ring the SQ doorbell for every command queued since the last ring (one MMIO write,
    /// or none when the shadow doorbell's EventIdx allows).
    #[inline]
    pub fn ring_doorbell(&mut self) {
        self.ring_sq();
    }
    /// Flush the volatile write cache.
    pub fn flush(&mut self, nsid: u32, tag: u64) -> Result<u16> {
        self.submit(Sqe::flush(nsid), None, tag)
    }
    /// Write zeroes over `nlb` blocks (1..=65536).
    pub fn write_zeroes(&mut self, nsid: u32, slba: u64, nlb: u32, tag: u64) -> Result<u16> {
        if nlb == 0 || nlb > 65536 {
            return Err(Error::InvalidArgument(format!(
                "write zeroes of {nlb} blocks"
            )));
        }
        self.submit(Sqe::write_zeroes(nsid, slba, (nlb - 1) as u16), None, tag)
    }
    /// Dataset Management (deallocate with `attr` = [`crate::spec::dsm::DEALLOCATE`]) over
    /// the [`crate::spec::DsmRange`]s stored in `ranges` (1..=256 of them).
    pub fn dataset_management(
        &mut self,
        nsid: u32,
        ranges: &DmaBuffer,
        count: usize,
        attr: u32,
        tag: u64,
    ) -> Result<u16> {
        if count == 0 || count > 256 || count * 16 > ranges.len() {
            return Err(Error::InvalidArgument(format!("{count} DSM ranges")));
        }
        let r = ranges.slice(0, count * 16)?;
        self.submit(Sqe::dsm(nsid, (count - 1) as u8, attr, 0), Some(&r), tag)
    }

    /// Advance the coarse timeout clock and return a command outstanding for longer than
    /// `timeout` (each command is reported once). Call periodically from the owning thread.
    pub fn check_timeouts(&mut self, timeout: Duration) -> Option<u16> {
        let now = Instant::now();
        if now.duration_since(self.epoch_start) >= timeout / 2 {
            self.epoch = self.epoch.wrapping_add(1);
            self.epoch_start = now;
        }
        for (cid, s) in self.slots.iter_mut().enumerate() {
            if s.state == SlotState::Busy && !s.timed_out && self.epoch.wrapping_sub(s.epoch) >= 3 {
                s.timed_out = true;
                return Some(cid as u16);
            }
        }
        None
    }

    /// Opcode of an outstanding command.
    pub fn opcode_of(&self, cid: u16) -> Option<u8> {
        self.slots
            .get(cid as usize)
            .filter(|s| s.state == SlotState::Busy)
            .map(|s| s.opcode)
    }
    /// Whether `cid` is still outstanding.
    pub fn is_outstanding(&self, cid: u16) -> bool {
        self.slots
            .get(cid as usize)
            .is_some_and(|s| s.state != SlotState::Free)
    }
}

/// Commands queued on an [`IoQueuePair`] with one SQ doorbell write for all of them: the
/// doorbell is rung when the batch is dropped.
#[must_use = "the doorbell is rung when the batch is dropped"]
pub struct Batch<'a> {
    qp: &'a mut IoQueuePair,
    queued: u16,
}

impl Batch<'_> {
    /// Queue a command (see [`IoQueuePair::submit`]).
    #[inline]
    pub fn submit(&mut self, sqe: Sqe, data: Option<&DmaBuffer>, tag: u64) -> Result<u16> {
        let cid = self.qp.enqueue(sqe, data, tag)?;
        self.queued += 1;
        Ok(cid)
    }
    /// Queue a read of `buf.len()` bytes from `slba`.
    #[inline]
    pub fn read(&mut self, nsid: u32, slba: u64, buf: &DmaBuffer, tag: u64) -> Result<u16> {
        let nlb0 = self.qp.nlb0(nsid, buf.len())?;
        self.submit(Sqe::read(nsid, slba, nlb0, 0, 0), Some(buf), tag)
    }
    /// Queue a write of `buf.len()` bytes at `slba`.
    #[inline]
    pub fn write(&mut self, nsid: u32, slba: u64, buf: &DmaBuffer, tag: u64) -> Result<u16> {
        let nlb0 = self.qp.nlb0(nsid, buf.len())?;
        self.submit(Sqe::write(nsid, slba, nlb0, 0, 0), Some(buf), tag)
    }
    /// Commands queued so far.
    pub fn len(&self) -> usize {
        self.queued as usize
    }
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }
    /// Ring the doorbell now.
    pub fn ring(self) {}
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.queued > 0 {
            self.qp.ring_sq();
        }
    }
}

impl Drop for IoQueuePair {
    fn drop(&mut self) {
        self.shared.release_queue(self.qid, self.generation);
    }
}
