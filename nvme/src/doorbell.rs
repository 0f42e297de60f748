//! The one doorbell writer of the driver: an SQ tail or CQ head doorbell register in BAR0,
//! with its shadow doorbell and EventIdx slots when Doorbell Buffer Config is in use.
//! [`IoQueuePair`](crate::IoQueuePair), [`RawQueuePair`](crate::RawQueuePair) and the
//! admin queue all ring through [`Doorbell::ring`].
//!
//! With shadow doorbells (NVMe base spec, Doorbell Buffer Config; the virtio EventIdx
//! scheme) the host stores each new value in the shadow slot, which the controller reads,
//! and writes the MMIO register only when the controller asked to be told: when the
//! EventIdx it published lies in the range the new value moves past (see [`need_mmio`]).

use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, Ordering};

use crate::dma::{DmaBuffer, Mmio};
use crate::error::{Error, Result};
use crate::spec::{self, reg};

/// The shadow doorbell page and the EventIdx page given to the controller with Doorbell
/// Buffer Config; the slot of a doorbell sits at its register's offset from
/// [`reg::DOORBELL_BASE`] in each.
pub struct ShadowPages {
    /// Written by the host (the values the controller reads instead of the registers).
    pub doorbells: DmaBuffer,
    /// Written by the controller (the value at which it wants an MMIO write).
    pub event_idx: DmaBuffer,
}

impl ShadowPages {
    /// Zeroes queue `qid`'s shadow and EventIdx slots (CAP.DSTRD `dstrd`) before the
    /// queue is created: a queue of that qid before may have left values there.
    pub fn clear_slots(&self, qid: u16, dstrd: u8) -> Result<()> {
        for off in [
            spec::sq_tail_doorbell(qid, dstrd),
            spec::cq_head_doorbell(qid, dstrd),
        ] {
            let o = off - reg::DOORBELL_BASE;
            self.doorbells.write_u32(o, 0)?;
            self.event_idx.write_u32(o, 0)?;
        }
        Ok(())
    }
}

/// EventIdx rule: whether moving a doorbell from `old` to `new` must be written to MMIO,
/// given the controller's EventIdx `event` — true when `event` lies in `[old, new)` walking
/// forward modulo 2^16, i.e. `(new - event - 1) mod 2^16 < (new - old) mod 2^16`.
#[inline]
pub(crate) fn need_mmio(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

struct Shadow {
    /// The host's shadow slot of this doorbell.
    slot: NonNull<u32>,
    /// The controller's EventIdx slot of this doorbell.
    event_idx: NonNull<u32>,
    // Keep both pages mapped.
    _pages: (DmaBuffer, DmaBuffer),
}

/// One doorbell (an SQ tail or a CQ head) of one queue.
pub(crate) struct Doorbell {
    reg: NonNull<u32>,
    shadow: Option<Shadow>,
    // Keep the register window mapped.
    _regs: Mmio,
}

// SAFETY: `reg` points into the register window `_regs` keeps mapped, the shadow pointers
// into the DMA pages `_pages` keeps mapped, whichever thread holds the value; every access
// is a 32-bit volatile load or store of device-shared memory (the crate's rule for memory
// the device also touches, see dma.rs), never a reference.
unsafe impl Send for Doorbell {}
// SAFETY: as above; `ring` takes `&self` and does only volatile accesses. The owners ring
// each doorbell from one thread at a time (IoQueuePair: `&mut self`; RawQueuePair: its one
// driving thread, as documented): two threads ringing one doorbell at once would
// interleave the published values.
unsafe impl Sync for Doorbell {}

impl Doorbell {
    /// The doorbell register at byte offset `off` of `regs` (BAR0), with its shadow and
    /// EventIdx slots in `shadow` when shadow doorbells are in use for it.
    pub(crate) fn new(regs: &Mmio, off: usize, shadow: Option<&ShadowPages>) -> Result<Doorbell> {
        let reg = regs
            .reg_ptr(off)
            .and_then(NonNull::new)
            .ok_or_else(|| Error::InvalidArgument(format!("doorbell {off:#x} outside BAR0")))?;
        let shadow = match shadow {
            None => None,
            Some(p) => {
                let o = off.checked_sub(reg::DOORBELL_BASE).ok_or_else(|| {
                    Error::InvalidArgument(format!("{off:#x} is not a doorbell offset"))
                })?;
                // `off` is 4-byte aligned (reg_ptr checked), so are both slots.
                let slot = p.doorbells.slice(o, 4)?;
                let event_idx = p.event_idx.slice(o, 4)?;
                Some(Shadow {
                    slot: NonNull::new(slot.as_ptr() as *mut u32)
                        .ok_or_else(|| Error::InvalidArgument("shadow doorbell page".into()))?,
                    event_idx: NonNull::new(event_idx.as_ptr() as *mut u32)
                        .ok_or_else(|| Error::InvalidArgument("EventIdx page".into()))?,
                    _pages: (slot, event_idx),
                })
            }
        };
        Ok(Doorbell {
            reg,
            shadow,
            _regs: regs.clone(),
        })
    }

    /// Whether this doorbell goes through a shadow slot (EventIdx decides on MMIO).
    pub(crate) fn has_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    /// Publish `new` (an SQ tail after its SQEs are written, or a CQ head after its CQEs
    /// are consumed). Returns whether the MMIO register was written.
    ///
    /// Ordering: a release fence first, so the SQEs written (or CQEs read) before are
    /// visible (done) before the controller can see the new value; with a shadow slot, a
    /// full fence between storing the slot and loading EventIdx (a store-load order: the
    /// controller publishes EventIdx, then re-reads the slot — one of the two sides sees
    /// the other's write, so no update is missed).
    #[inline]
    pub(crate) fn ring(&self, new: u16) -> bool {
        fence(Ordering::Release);
        let Some(sh) = &self.shadow else {
            self.write_mmio(new);
            return true;
        };
        // SAFETY: `slot` is an aligned u32 inside the shadow page `_pages` keeps mapped;
        // only the host writes it.
        let old = unsafe { ptr::read_volatile(sh.slot.as_ptr()) } as u16;
        // SAFETY: as above.
        unsafe { ptr::write_volatile(sh.slot.as_ptr(), u32::from(new)) };
        fence(Ordering::SeqCst);
        // SAFETY: `event_idx` is an aligned u32 inside the EventIdx page `_pages` keeps
        // mapped; the controller writes it, so it is read volatile.
        let event = unsafe { ptr::read_volatile(sh.event_idx.as_ptr()) } as u16;
        if need_mmio(event, new, old) {
            self.write_mmio(new);
            return true;
        }
        false
    }

    #[inline]
    fn write_mmio(&self, v: u16) {
        // SAFETY: `reg` is an aligned doorbell register inside BAR0, which `_regs` keeps
        // mapped; doorbells take 32-bit volatile stores.
        unsafe { ptr::write_volatile(self.reg.as_ptr(), u32::from(v)) };
    }
}

/// The SQ tail and CQ head doorbells of one queue.
pub struct DoorbellPair {
    pub(crate) sq: Doorbell,
    pub(crate) cq: Doorbell,
}

impl DoorbellPair {
    /// Queue `qid`'s doorbells for CAP.DSTRD `dstrd`. `shadow`: the Doorbell Buffer
    /// Config pages when they are in use; a queue whose slots fall outside them (and the
    /// admin queue, always) rings MMIO only.
    pub fn new(
        regs: &Mmio,
        dstrd: u8,
        qid: u16,
        shadow: Option<&ShadowPages>,
    ) -> Result<DoorbellPair> {
        let sq = spec::sq_tail_doorbell(qid, dstrd);
        let cq = spec::cq_head_doorbell(qid, dstrd);
        let shadow = shadow.filter(|p| {
            qid > 0 && cq - reg::DOORBELL_BASE + 4 <= p.doorbells.len().min(p.event_idx.len())
        });
        Ok(DoorbellPair {
            sq: Doorbell::new(regs, sq, shadow)?,
            cq: Doorbell::new(regs, cq, shadow)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    use std::ptr::NonNull;
    use std::sync::Arc;

    use super::{need_mmio, Doorbell, DoorbellPair, ShadowPages};
    use crate::dma::{DmaBuffer, DmaRegion, Mmio};
    use crate::spec::{self, reg};
    use proptest::prelude::*;

    /// Zeroed, page-aligned heap memory standing in for BAR0 and the shadow pages.
    struct Mem {
        ptr: NonNull<u8>,
        layout: Layout,
    }
    // SAFETY: owned heap memory, accessed through raw pointers only.
    unsafe impl Send for Mem {}
    // SAFETY: as above.
    unsafe impl Sync for Mem {}
    impl DmaRegion for Mem {}
    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: allocated in `mem` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
    fn mem(len: usize) -> (NonNull<u8>, Arc<Mem>) {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
        (ptr, Arc::new(Mem { ptr, layout }))
    }
    fn regs() -> Mmio {
        let (p, keep) = mem(0x4000);
        // SAFETY: `keep` owns the 16 KiB at `p`.
        unsafe { Mmio::new(p, 0x4000, keep) }
    }
    fn page() -> DmaBuffer {
        let (p, keep) = mem(4096);
        // SAFETY: `keep` owns the page at `p`; nothing DMAs to it.
        unsafe { DmaBuffer::from_raw_parts(p, 0x10_0000, 4096, keep) }
    }
    fn pages() -> ShadowPages {
        ShadowPages {
            doorbells: page(),
            event_idx: page(),
        }
    }

    const SQ1: usize = spec::sq_tail_doorbell(1, 0);

    #[test]
    fn without_shadow_every_ring_writes_mmio() {
        let r = regs();
        let db = Doorbell::new(&r, SQ1, None).unwrap();
        assert!(!db.has_shadow());
        for v in [1u16, 2, 2, 0, u16::MAX] {
            assert!(db.ring(v));
            assert_eq!(r.read32(SQ1), u32::from(v));
        }
    }

    #[test]
    fn with_shadow_mmio_only_when_event_idx_asks() {
        let r = regs();
        let p = pages();
        let db = Doorbell::new(&r, SQ1, Some(&p)).unwrap();
        assert!(db.has_shadow());
        let slot = SQ1 - reg::DOORBELL_BASE;
        // EventIdx 0: the controller wants to hear about the move past 0.
        assert!(db.ring(1));
        assert_eq!((r.read32(SQ1), p.doorbells.read_u32(slot).unwrap()), (1, 1));
        // It has not caught up (EventIdx still 0): the shadow slot alone carries 2.
        assert!(!db.ring(2));
        assert_eq!((r.read32(SQ1), p.doorbells.read_u32(slot).unwrap()), (1, 2));
        // It caught up to 2 and asks again.
        p.event_idx.write_u32(slot, 2).unwrap();
        assert!(db.ring(5));
        assert_eq!((r.read32(SQ1), p.doorbells.read_u32(slot).unwrap()), (5, 5));
        // Around the wrap of the 16-bit value.
        p.doorbells
            .write_u32(slot, u32::from(u16::MAX - 1))
            .unwrap();
        p.event_idx.write_u32(slot, u32::from(u16::MAX)).unwrap();
        assert!(db.ring(1));
        assert_eq!(r.read32(SQ1), 1);
        assert!(!db.ring(3));
        assert_eq!(r.read32(SQ1), 1);
    }

    #[test]
    fn pair_shadows_io_queues_only_inside_the_pages() {
        let r = regs();
        let p = pages();
        let admin = DoorbellPair::new(&r, 0, 0, Some(&p)).unwrap();
        assert!(!admin.sq.has_shadow() && !admin.cq.has_shadow());
        let io = DoorbellPair::new(&r, 0, 1, Some(&p)).unwrap();
        assert!(io.sq.has_shadow() && io.cq.has_shadow());
        // Queue 511's CQ head slot is the page's last u32 (DSTRD 0); queue 512's and,
        // with a stride of 8 bytes, queue 300's lie past the page: MMIO only.
        assert!(DoorbellPair::new(&r, 0, 511, Some(&p))
            .unwrap()
            .cq
            .has_shadow());
        assert!(!DoorbellPair::new(&r, 0, 512, Some(&p))
            .unwrap()
            .sq
            .has_shadow());
        assert!(!DoorbellPair::new(&r, 1, 300, Some(&p))
            .unwrap()
            .sq
            .has_shadow());
        // A doorbell outside the register window is refused.
        assert!(DoorbellPair::new(&r, 0, 2000, Some(&p)).is_err());
    }

    /// The rule as the spec words it: walk from `old` to `new` one step at a time; an MMIO
    /// write is needed if one of the values passed (`old` included, `new` excluded) is
    /// `event`.
    fn naive(event: u16, new: u16, old: u16) -> bool {
        let mut v = old;
        while v != new {
            if v == event {
                return true;
            }
            v = v.wrapping_add(1);
        }
        false
    }

    #[test]
    fn event_idx_rule() {
        // Controller asked to be told when tail passes 5.
        assert!(need_mmio(5, 6, 5));
        assert!(need_mmio(5, 8, 3));
        assert!(!need_mmio(9, 8, 3));
        assert!(!need_mmio(2, 8, 3));
        // `new` itself is outside the window: the controller already has it.
        assert!(!need_mmio(8, 8, 3));
        // No movement, no write.
        assert!(!need_mmio(3, 3, 3));
        // Wrap-around.
        assert!(need_mmio(u16::MAX, 1, u16::MAX - 1));
        assert!(need_mmio(0, 1, u16::MAX - 1));
        assert!(!need_mmio(1, 1, u16::MAX - 1));
        assert!(!need_mmio(u16::MAX - 2, 1, u16::MAX - 1));
    }

    #[test]
    fn event_idx_rule_matches_the_walk_near_the_wrap() {
        // Every (event, new, old) within 16 of the wrap point, both sides.
        let near: Vec<u16> = (0..16u16).chain((u16::MAX - 15)..=u16::MAX).collect();
        for &event in &near {
            for &new in &near {
                for &old in &near {
                    assert_eq!(
                        need_mmio(event, new, old),
                        naive(event, new, old),
                        "event {event} new {new} old {old}"
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn event_idx_rule_matches_the_walk(event: u16, old: u16, step in 0u16..=u16::MAX) {
            let new = old.wrapping_add(step);
            prop_assert_eq!(need_mmio(event, new, old), naive(event, new, old));
        }

        /// `ring` over a run of values, with the controller moving EventIdx in
        /// between: MMIO is written exactly when the walk from the previous value to the
        /// new one passes EventIdx, and the register always ends at a value rung.
        #[test]
        fn ring_sequence_matches_the_model(
            steps in proptest::collection::vec((0u16..=u16::MAX, any::<u16>()), 1..64),
        ) {
            let r = regs();
            let p = pages();
            let db = Doorbell::new(&r, SQ1, Some(&p)).unwrap();
            let slot = SQ1 - reg::DOORBELL_BASE;
            let (mut old, mut mmio) = (0u16, 0u32);
            for (step, event) in steps {
                let new = old.wrapping_add(step);
                p.event_idx.write_u32(slot, u32::from(event)).unwrap();
                let want = naive(event, new, old);
                prop_assert_eq!(db.ring(new), want);
                if want {
                    mmio = u32::from(new);
                }
                prop_assert_eq!(r.read32(SQ1), mmio);
                prop_assert_eq!(p.doorbells.read_u32(slot).unwrap(), u32::from(new));
                old = new;
            }
        }

        #[test]
        fn event_idx_just_behind_new_always_rings(old: u16, step in 1u16..=u16::MAX) {
            // The controller caught up to `new - 1` and waits for the next entry.
            let new = old.wrapping_add(step);
            prop_assert!(need_mmio(new.wrapping_sub(1), new, old));
        }
    }
}
