//! A forwarded queue: the target's bookkeeping of one direct queue's SQ tail and CQ head.
//!
//! The host writes SQEs into the SQ ring by RDMA and hands the new tail over (the
//! immediate of its WRITE WITH IMMEDIATE, or a plain WRITE into the mirror page; polled
//! queues also hand the CQ head over). [`ForwardedQueue`] checks each tail (a bogus one
//! can neither leave the ring nor put more commands in flight than the queue holds), notes
//! where the data of new reads will be (pushed reads), rings the NVMe doorbells once per
//! batch — CQ head first — and, on pushed-completion queues, takes the new CQEs (phase
//! tag) for the poller to push. It touches the rings only through [`Rings`]: the NVMe
//! queue pair on the target, a model in the tests.

use std::sync::atomic::{fence, Ordering};

use nvme::ctrl::RawQueuePair;
use nvme::spec::{io_opc, Cqe, Sqe, Status};
use zerocopy::{FromZeros, IntoBytes};

use crate::direct::proto::split_polled_imm;

/// Where a [`ForwardedQueue`] reads entries and rings doorbells.
pub(crate) trait Rings {
    /// The SQE in `slot` (None: the ring cannot be read).
    fn sqe(&self, slot: u16) -> Option<Sqe>;
    /// The CQE in `slot` if its phase tag is `phase` (a new completion): the phase is read
    /// first, the rest of the entry after an acquire fence.
    fn new_cqe(&self, slot: u16, phase: bool) -> Option<Cqe>;
    /// Writes the SQ tail doorbell.
    fn sq_doorbell(&self, tail: u16);
    /// Writes the CQ head doorbell.
    fn cq_doorbell(&self, head: u16);
}

impl Rings for RawQueuePair {
    fn sqe(&self, slot: u16) -> Option<Sqe> {
        let mut e = Sqe::new_zeroed();
        self.sq()
            .read(usize::from(slot) * 64, e.as_mut_bytes())
            .ok()?;
        Some(e)
    }

    fn new_cqe(&self, slot: u16, phase: bool) -> Option<Cqe> {
        let off = usize::from(slot) * 16;
        // Phase tag first (volatile load of DW3: CID and status), then the whole entry.
        let dw3 = self.cq().read_u32(off + 12).ok()?;
        if ((dw3 >> 16) & 1 == 1) != phase {
            return None;
        }
        fence(Ordering::Acquire);
        let mut e = Cqe::new_zeroed();
        self.cq().read(off, e.as_mut_bytes()).ok()?;
        Some(e)
    }

    fn sq_doorbell(&self, tail: u16) {
        self.ring_sq(tail);
    }

    fn cq_doorbell(&self, head: u16) {
        self.ring_cq(head);
    }
}

/// Why a tail was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BogusTail {
    /// Not an entry of the ring.
    BeyondRing,
    /// It would put more commands in flight than the queue holds.
    TooMany,
}

impl BogusTail {
    /// For the log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BogusTail::BeyondRing => "beyond the ring",
            BogusTail::TooMany => "more commands than the queue holds",
        }
    }
}

/// A tail the queue ignored, with the state it met (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bogus {
    /// The tail the host handed over.
    pub tail: u32,
    /// The queue's tail.
    pub current: u16,
    /// Commands in flight.
    pub in_flight: u32,
    /// Why.
    pub why: BogusTail,
}

/// What a doorbell from the host asked that the queue ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ignored {
    /// A CQ head beyond the ring.
    pub head: Option<u16>,
    /// A bogus SQ tail.
    pub tail: Option<Bogus>,
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
) -> Result<u32, BogusTail> {
    if t >= depth {
        return Err(BogusTail::BeyondRing);
    }
    let added = (t + depth - u32::from(tail)) % depth;
    if let Some(n) = in_flight {
        if n + added > depth - 1 {
            return Err(BogusTail::TooMany);
        }
    }
    Ok(added)
}

/// The queue's data pool as the device sees it, for pushed reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PoolWindow {
    /// Device IOVA of the first pool byte.
    pub iova: u64,
    /// Pool bytes.
    pub len: u64,
    /// Bytes per logical block of the namespace.
    pub lba_size: u32,
}

/// Where a read's data will be in the pool: offset and length (0: not a read the poller
/// can push).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadSlot {
    pub off: u32,
    pub len: u32,
}

/// Doorbells rung so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ForwardCounts {
    /// SQ tail doorbells.
    pub sq_doorbells: u64,
    /// CQ head doorbells for a polled queue's host.
    pub cq_heads: u64,
}

/// The target's side of one forwarded direct queue (see the module docs).
pub(crate) struct ForwardedQueue {
    depth: u16,
    /// Polled completions: the host reads the CQ and hands its head over.
    polled: bool,
    /// Read the SQEs of new commands to push read data with their CQEs.
    note_reads: bool,
    pool: PoolWindow,
    tail: u16,
    /// The tail moved since the last SQ doorbell.
    ring_tail: bool,
    /// Pushed completions: the next CQ entry and its expected phase.
    head: u16,
    phase: bool,
    /// Pushed completions: commands submitted and not completed.
    in_flight: u32,
    /// Polled completions: the CQ head the host handed over, and whether it changed
    /// since the last CQ head doorbell.
    host_head: u16,
    ring_head: bool,
    /// The mirror page's last values (tail, head): only a change is news.
    mirror_tail: u16,
    mirror_head: u16,
    /// Reads by command id (parsed from the SQEs when the tail moves).
    reads: Box<[ReadSlot]>,
    counts: ForwardCounts,
}

impl ForwardedQueue {
    /// A queue of `depth` entries at tail 0 and CQ head 0 (phase 1: the ring is zeroed).
    pub(crate) fn new(depth: u16, polled: bool, note_reads: bool, pool: PoolWindow) -> Self {
        let depth = depth.max(2);
        ForwardedQueue {
            depth,
            polled,
            note_reads,
            pool,
            tail: 0,
            ring_tail: false,
            head: 0,
            phase: true,
            in_flight: 0,
            host_head: 0,
            ring_head: false,
            mirror_tail: 0,
            mirror_head: 0,
            reads: vec![ReadSlot::default(); usize::from(depth)].into_boxed_slice(),
            counts: ForwardCounts::default(),
        }
    }

    /// Whether the host polls the CQ.
    pub(crate) fn polled(&self) -> bool {
        self.polled
    }

    /// Commands in flight (pushed completions; always 0 when polled).
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The SQ tail (the last one accepted).
    #[cfg(test)]
    pub(crate) fn tail(&self) -> u16 {
        self.tail
    }

    /// The next CQ entry the poller takes and its phase (pushed completions).
    #[cfg(test)]
    pub(crate) fn cq_position(&self) -> (u16, bool) {
        (self.head, self.phase)
    }

    /// Doorbells rung so far.
    pub(crate) fn counts(&self) -> ForwardCounts {
        self.counts
    }

    /// A receive with immediate `imm`: the new tail (polled: `tail | head << 16`). The
    /// doorbells are rung by [`ForwardedQueue::ring`].
    pub(crate) fn doorbell_imm(&mut self, rings: &impl Rings, imm: u32) -> Ignored {
        if self.polled {
            let (t, h) = split_polled_imm(imm);
            Ignored {
                head: self.set_cq_head(h).err(),
                tail: self.set_tail(rings, u32::from(t)).err(),
            }
        } else {
            Ignored {
                head: None,
                tail: self.set_tail(rings, imm).err(),
            }
        }
    }

    /// The mirror page's first 8 bytes `v` (tail at 0, polled: head at 4): forwards what
    /// changed since the last look and rings. None: no news.
    pub(crate) fn doorbell_mirror(&mut self, rings: &impl Rings, v: u64) -> Option<Ignored> {
        // Only a change of the mirror is news: hosts that ring by immediate never write
        // it. Polled queues may hand the CQ head over at offset 4 the same way.
        let (t, h) = (v as u32 as u16, (v >> 32) as u32 as u16);
        let head_news = self.polled && h != self.mirror_head;
        if t == self.mirror_tail && !head_news {
            return None;
        }
        let mut ignored = Ignored::default();
        if head_news {
            self.mirror_head = h;
            ignored.head = self.set_cq_head(h).err();
        }
        if t != self.mirror_tail {
            self.mirror_tail = t;
            ignored.tail = self.set_tail(rings, u32::from(t)).err();
        }
        self.ring(rings);
        Some(ignored)
    }

    /// Takes SQ tail `t` unless it is bogus ([`tail_advance`]); notes the new commands'
    /// reads when pushing them.
    pub(crate) fn set_tail(&mut self, rings: &impl Rings, t: u32) -> Result<(), Bogus> {
        let depth = u32::from(self.depth);
        let in_flight = (!self.polled).then_some(self.in_flight);
        let added = tail_advance(depth, self.tail, in_flight, t).map_err(|why| Bogus {
            tail: t,
            current: self.tail,
            in_flight: self.in_flight,
            why,
        })?;
        if added == 0 {
            return Ok(());
        }
        let t = t as u16;
        if self.note_reads {
            let mut slot = self.tail;
            while slot != t {
                self.note_command(rings, slot);
                slot = if u32::from(slot) + 1 == depth {
                    0
                } else {
                    slot + 1
                };
            }
        }
        self.tail = t;
        if !self.polled {
            self.in_flight += added;
        }
        self.ring_tail = true;
        Ok(())
    }

    /// A polled queue's host consumed the CQ up to `h`: the CQ head doorbell goes with
    /// the next [`ForwardedQueue::ring`]. Err: beyond the ring, ignored (like tails).
    pub(crate) fn set_cq_head(&mut self, h: u16) -> Result<(), u16> {
        if h >= self.depth {
            return Err(h);
        }
        if h != self.host_head {
            self.host_head = h;
            self.ring_head = true;
        }
        Ok(())
    }

    /// Rings the doorbells once for every update gathered since the last call: the CQ head
    /// first (polled queues), so the controller has the room before it sees new commands,
    /// then the SQ tail.
    pub(crate) fn ring(&mut self, rings: &impl Rings) {
        if self.ring_head {
            self.ring_head = false;
            self.counts.cq_heads += 1;
            rings.cq_doorbell(self.host_head);
        }
        if self.ring_tail {
            self.ring_tail = false;
            self.counts.sq_doorbells += 1;
            rings.sq_doorbell(self.tail);
        }
    }

    /// Reads the SQE in `slot` and remembers where a read's data will be (pool offset and
    /// length) so that it can be pushed with the completion. Anything else — or a read
    /// whose PRPs are not one contiguous pool range — is not pushed.
    fn note_command(&mut self, rings: &impl Rings, slot: u16) {
        let Some(e) = rings.sqe(slot) else {
            return;
        };
        let Some(c) = self.reads.get_mut(usize::from(e.cid())) else {
            return;
        };
        *c = ReadSlot::default();
        let (prp1, prp2) = (e.prp1.get(), e.prp2.get());
        let len = (u64::from(e.nlb0()) + 1) * u64::from(self.pool.lba_size);
        // Host-written values: no arithmetic that can overflow.
        let contiguous =
            len <= 4096 && prp2 == 0 || len <= 8192 && prp1.checked_add(4096) == Some(prp2);
        let in_pool = prp1
            .checked_sub(self.pool.iova)
            .and_then(|off| off.checked_add(len))
            .is_some_and(|end| end <= self.pool.len)
            && prp1 % 4096 + len.min(4096) <= 4096;
        if e.opcode() == io_opc::READ && contiguous && in_pool {
            *c = ReadSlot {
                off: (prp1 - self.pool.iova) as u32,
                len: len as u32,
            };
        }
    }

    /// Pushed completions: takes up to `out.len()` new CQEs (phase tag) in order into
    /// `out`; returns how many. Their commands leave the in-flight count with
    /// [`ForwardedQueue::pushed`].
    pub(crate) fn take_cqes(&mut self, rings: &impl Rings, out: &mut [Cqe]) -> usize {
        let mut k = 0;
        while k < out.len() {
            let Some(e) = rings.new_cqe(self.head, self.phase) else {
                break;
            };
            out[k] = e;
            k += 1;
            self.head += 1;
            if self.head == self.depth {
                self.head = 0;
                self.phase = !self.phase;
            }
        }
        k
    }

    /// `k` CQEs taken by [`ForwardedQueue::take_cqes`] reached the host.
    pub(crate) fn pushed(&mut self, k: usize) {
        self.in_flight = self.in_flight.saturating_sub(k as u32);
    }

    /// Tells the controller the CQ entries taken so far are free (pushed completions).
    pub(crate) fn release_cq(&self, rings: &impl Rings) {
        rings.cq_doorbell(self.head);
    }

    /// Where the data of the successful read `cqe` completed is, if the poller can push
    /// it into a host slot of `stride` bytes.
    pub(crate) fn read_of(&self, cqe: &Cqe, stride: u32) -> Option<ReadSlot> {
        let c = self.reads.get(usize::from(cqe.cid.get())).copied()?;
        (c.len != 0 && cqe.status() == Status::SUCCESS && c.len <= stride).then_some(c)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;
    use crate::direct::proto::polled_imm;

    /// A doorbell write, in order.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Bell {
        Sq(u16),
        Cq(u16),
    }

    /// SQ and CQ rings in memory; doorbells recorded.
    struct Model {
        sq: RefCell<Vec<Sqe>>,
        cq: RefCell<Vec<Cqe>>,
        bells: RefCell<Vec<Bell>>,
    }

    impl Model {
        fn new(depth: u16) -> Self {
            Model {
                sq: RefCell::new(vec![Sqe::default(); usize::from(depth)]),
                cq: RefCell::new(vec![Cqe::default(); usize::from(depth)]),
                bells: RefCell::new(Vec::new()),
            }
        }
        fn last_sq(&self) -> Option<u16> {
            self.bells.borrow().iter().rev().find_map(|b| match b {
                Bell::Sq(t) => Some(*t),
                Bell::Cq(_) => None,
            })
        }
        fn last_cq(&self) -> Option<u16> {
            self.bells.borrow().iter().rev().find_map(|b| match b {
                Bell::Cq(h) => Some(*h),
                Bell::Sq(_) => None,
            })
        }
    }

    impl Rings for Model {
        fn sqe(&self, slot: u16) -> Option<Sqe> {
            self.sq.borrow().get(usize::from(slot)).copied()
        }
        fn new_cqe(&self, slot: u16, phase: bool) -> Option<Cqe> {
            let e = *self.cq.borrow().get(usize::from(slot))?;
            (e.phase() == phase).then_some(e)
        }
        fn sq_doorbell(&self, tail: u16) {
            self.bells.borrow_mut().push(Bell::Sq(tail));
        }
        fn cq_doorbell(&self, head: u16) {
            self.bells.borrow_mut().push(Bell::Cq(head));
        }
    }

    const POOL: PoolWindow = PoolWindow {
        iova: 0x10_0000,
        len: 1 << 20,
        lba_size: 512,
    };

    #[test]
    fn bogus_tails_cannot_inflate_in_flight() {
        // Depth 8: at most 7 commands outstanding.
        assert_eq!(tail_advance(8, 0, Some(0), 7), Ok(7));
        assert_eq!(tail_advance(8, 6, Some(0), 2), Ok(4), "wraps");
        assert_eq!(tail_advance(8, 0, Some(0), 8), Err(BogusTail::BeyondRing));
        assert!(tail_advance(8, 0, Some(0), u32::MAX).is_err());
        // Three in flight: the tail may move four more, not five.
        assert_eq!(tail_advance(8, 3, Some(3), 7), Ok(4));
        assert_eq!(tail_advance(8, 3, Some(3), 0), Err(BogusTail::TooMany));
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

    #[test]
    fn reads_in_the_pool_are_noted_and_others_not() {
        let m = Model::new(8);
        let mut q = ForwardedQueue::new(8, false, true, POOL);
        // cid 0: a 4 KiB read in the pool; cid 1: a write; cid 2: a read outside it;
        // cid 3: 8 KiB with a PRP2 that is not the next page.
        let reads = [
            Sqe::read(1, 0, 7, POOL.iova + 8192, 0),
            Sqe::write(1, 0, 7, POOL.iova, 0),
            Sqe::read(1, 0, 7, POOL.iova - 4096, 0),
            Sqe::read(1, 0, 15, POOL.iova, POOL.iova + 3 * 4096),
        ];
        for (i, mut s) in reads.into_iter().enumerate() {
            s.set_cid(i as u16);
            m.sq.borrow_mut()[i] = s;
        }
        assert_eq!(q.set_tail(&m, 4), Ok(()));
        assert_eq!(q.in_flight(), 4);
        q.ring(&m);
        assert_eq!(*m.bells.borrow(), [Bell::Sq(4)]);
        let ok = |cid| Cqe::new(cid, 1, 0, Status::SUCCESS, true);
        assert_eq!(
            q.read_of(&ok(0), 4096),
            Some(ReadSlot {
                off: 8192,
                len: 4096
            })
        );
        assert_eq!(q.read_of(&ok(0), 2048), None, "larger than the host slot");
        assert_eq!(q.read_of(&ok(1), 4096), None, "a write");
        assert_eq!(q.read_of(&ok(2), 4096), None, "outside the pool");
        assert_eq!(q.read_of(&ok(3), 8192), None, "not contiguous");
        let failed = Cqe::new(0, 1, 0, Status::LBA_OUT_OF_RANGE, true);
        assert_eq!(
            q.read_of(&failed, 4096),
            None,
            "a failed read pushes nothing"
        );
        assert_eq!(q.read_of(&ok(200), 4096), None, "cid beyond the table");
    }

    #[test]
    fn polled_heads_ring_before_tails_and_bad_heads_are_ignored() {
        let m = Model::new(16);
        let mut q = ForwardedQueue::new(16, true, false, POOL);
        assert_eq!(q.doorbell_imm(&m, polled_imm(5, 3)), Ignored::default());
        q.ring(&m);
        assert_eq!(*m.bells.borrow(), [Bell::Cq(3), Bell::Sq(5)]);
        // The same head again rings only the tail; a head beyond the ring is ignored.
        let ig = q.doorbell_imm(&m, polled_imm(6, 3));
        assert_eq!(ig, Ignored::default());
        let ig = q.doorbell_imm(&m, polled_imm(7, 16));
        assert_eq!(ig.head, Some(16));
        q.ring(&m);
        assert_eq!(&m.bells.borrow()[2..], [Bell::Sq(7)]);
        assert_eq!(q.in_flight(), 0, "polled queues count nothing in flight");
        assert_eq!(
            q.counts(),
            ForwardCounts {
                sq_doorbells: 2,
                cq_heads: 1
            }
        );
        // The mirror page: only changes are news.
        assert_eq!(q.doorbell_mirror(&m, 0), None);
        assert_eq!(q.doorbell_mirror(&m, 9 | 4 << 32), Some(Ignored::default()));
        assert_eq!(&m.bells.borrow()[3..], [Bell::Cq(4), Bell::Sq(9)]);
        assert_eq!(q.doorbell_mirror(&m, 9 | 4 << 32), None);
        let ig = q.doorbell_mirror(&m, 99).unwrap();
        assert_eq!(ig.tail.map(|b| b.why), Some(BogusTail::BeyondRing));
        assert_eq!(q.tail(), 9);
    }

    proptest::proptest! {
        /// A pushed queue against a naive model: a host (well-behaved, or handing over
        /// random tails; by immediate or by the mirror page) submits reads and writes, the
        /// controller fetches the commands up to the last SQ doorbell and posts CQEs with
        /// phase tags into the ring, the poller takes and pushes them. The queue's tail
        /// and in-flight count are the model's (a bogus tail changes nothing, the count
        /// never exceeds depth − 1), the controller never finds the CQ full, the CQEs come
        /// out in order with the phase flipping at each wrap, and every read in the pool
        /// is pushed.
        #[test]
        fn pushed_queue_follows_the_ring_model(
            depth in 2u16..24,
            by_mirror in proptest::bool::ANY,
            steps in proptest::collection::vec((0u8..4, 0u32..64), 1..400),
        ) {
            let d = u32::from(depth);
            let m = Model::new(depth);
            let mut q = ForwardedQueue::new(depth, false, true, POOL);
            // The model: the accepted tail, the commands not yet taken by the poller in
            // order (slot, is a read), the controller's SQ head and fetched commands,
            // CQEs posted / taken, the CQ head released to the controller.
            let mut tail = 0u16;
            let mut outstanding: VecDeque<(u16, bool)> = VecDeque::new();
            let mut fetched: VecDeque<u16> = VecDeque::new();
            let mut ctrl_head = 0u16;
            let (mut posted, mut taken, mut released) = (0u64, 0u64, 0u64);
            let mut last_mirror = 0u32;
            for (op, x) in steps {
                match op {
                    // The host writes some SQEs and hands the tail over; or (1) a random
                    // tail.
                    0 | 1 => {
                        let t = if op == 1 {
                            x % (2 * d)
                        } else {
                            let room = d - 1 - outstanding.len() as u32;
                            (u32::from(tail) + x % (room + 1)) % d
                        };
                        if by_mirror && t == last_mirror {
                            // An unchanged mirror is no news.
                            proptest::prop_assert_eq!(q.doorbell_mirror(&m, u64::from(t)), None);
                            continue;
                        }
                        // One step at a time from the tail: the slots the new tail covers.
                        let mut walk = Vec::new();
                        let mut s = tail;
                        let accepted = t < d && {
                            while u32::from(s) != t {
                                walk.push(s);
                                s = ((u32::from(s) + 1) % d) as u16;
                            }
                            outstanding.len() + walk.len() < usize::from(depth)
                        };
                        if accepted {
                            for &slot in &walk {
                                let read = (x + u32::from(slot)) % 2 == 0;
                                let prp = POOL.iova + u64::from(slot) * 4096;
                                let mut e = if read {
                                    Sqe::read(1, 0, 7, prp, 0)
                                } else {
                                    Sqe::write(1, 0, 7, prp, 0)
                                };
                                e.set_cid(slot);
                                m.sq.borrow_mut()[usize::from(slot)] = e;
                                outstanding.push_back((slot, read));
                            }
                            tail = t as u16;
                        }
                        let before = m.bells.borrow().len();
                        let ig = if by_mirror {
                            last_mirror = t;
                            q.doorbell_mirror(&m, u64::from(t)).expect("news")
                        } else {
                            let ig = q.doorbell_imm(&m, t);
                            q.ring(&m);
                            ig
                        };
                        proptest::prop_assert_eq!(ig.tail.is_none(), accepted, "tail {} accepted", t);
                        proptest::prop_assert_eq!(q.tail(), tail);
                        proptest::prop_assert_eq!(q.in_flight() as usize, outstanding.len());
                        proptest::prop_assert!(q.in_flight() < d);
                        if accepted && !walk.is_empty() {
                            proptest::prop_assert_eq!(m.last_sq(), Some(tail));
                            proptest::prop_assert_eq!(m.bells.borrow().len(), before + 1);
                        } else {
                            proptest::prop_assert_eq!(m.bells.borrow().len(), before, "no doorbell without news");
                        }
                    }
                    // The controller fetches up to the SQ doorbell and posts one CQE.
                    2 => {
                        let db = m.last_sq().unwrap_or(0);
                        while ctrl_head != db {
                            fetched.push_back(m.sq.borrow()[usize::from(ctrl_head)].cid());
                            ctrl_head = ((u32::from(ctrl_head) + 1) % d) as u16;
                        }
                        if let Some(cid) = fetched.pop_front() {
                            proptest::prop_assert!(posted - released < u64::from(d) - 1, "CQ full");
                            let i = (posted % u64::from(d)) as usize;
                            let phase = (posted / u64::from(d)) % 2 == 0;
                            m.cq.borrow_mut()[i] = Cqe::new(cid, 1, ctrl_head, Status::SUCCESS, phase);
                            posted += 1;
                        }
                    }
                    // The poller takes what is new and pushes it, four at a time.
                    _ => {
                        loop {
                            let mut out = [Cqe::default(); 4];
                            let k = q.take_cqes(&m, &mut out);
                            if k == 0 {
                                break;
                            }
                            for e in &out[..k] {
                                let (slot, read) = outstanding.pop_front().expect("a CQE of an outstanding command");
                                proptest::prop_assert_eq!(e.cid.get(), slot, "in order");
                                let push = q.read_of(e, 4096);
                                proptest::prop_assert_eq!(push.is_some(), read);
                                if let Some(r) = push {
                                    proptest::prop_assert_eq!(u64::from(r.off), u64::from(slot) * 4096);
                                    proptest::prop_assert_eq!(r.len, 4096);
                                }
                            }
                            taken += k as u64;
                            q.pushed(k);
                            q.release_cq(&m);
                            released = taken;
                            proptest::prop_assert_eq!(m.last_cq(), Some((taken % u64::from(d)) as u16));
                        }
                        proptest::prop_assert_eq!(taken, posted, "everything posted is taken");
                        let (h, p) = q.cq_position();
                        proptest::prop_assert_eq!(u64::from(h), taken % u64::from(d));
                        proptest::prop_assert_eq!(p, (taken / u64::from(d)) % 2 == 0, "phase flips at each wrap");
                        proptest::prop_assert_eq!(q.in_flight() as usize, outstanding.len());
                    }
                }
            }
        }

        /// A polled queue: any immediates keep the tail in the ring, count nothing in
        /// flight, and ring the CQ head (when it changed) before the SQ tail.
        #[test]
        fn polled_queue_rings_head_then_tail(
            depth in 2u16..40,
            imms in proptest::collection::vec((0u16..80, 0u16..80), 1..200),
        ) {
            let m = Model::new(depth);
            let mut q = ForwardedQueue::new(depth, true, false, POOL);
            let (mut tail, mut head) = (0u16, 0u16);
            for (t, h) in imms {
                let before = m.bells.borrow().len();
                let ig = q.doorbell_imm(&m, polled_imm(t, h));
                q.ring(&m);
                let bells = m.bells.borrow()[before..].to_vec();
                let mut want = Vec::new();
                if h < depth && h != head {
                    head = h;
                    want.push(Bell::Cq(h));
                }
                if t < depth && t != tail {
                    tail = t;
                    want.push(Bell::Sq(t));
                }
                proptest::prop_assert_eq!(bells, want);
                proptest::prop_assert_eq!(ig.head.is_some(), h >= depth);
                proptest::prop_assert_eq!(ig.tail.is_some(), t >= depth);
                proptest::prop_assert_eq!(q.tail(), tail);
                proptest::prop_assert_eq!(q.in_flight(), 0);
            }
        }
    }
}
