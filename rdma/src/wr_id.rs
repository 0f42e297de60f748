//! Work-request ids: the one layout of the 64-bit `wr_id` for every user of the crate.
//!
//! A completion carries back only the `wr_id` its work request was posted with, so the
//! id must say which queue the request belonged to, what it was, and which buffer or
//! command it concerned. [`WrId`] packs those as named fields (bits, most significant
//! first):
//!
//! | bits   | field  | what it holds |
//! |--------|--------|---------------|
//! | 63..48 | `gen`  | generation of the queue slot: a late completion of a queue pair that is gone carries the old one |
//! | 47..32 | `slot` | queue slot in the owner of the CQ (a poll group's queue pairs), or a marker like "SRQ" |
//! | 31..24 | `kind` | the operation, in the caller's numbering (RECV, READ, the SEND after a WRITE...) |
//! | 23..0  | `tag`  | index within the queue: a receive buffer, a command id, a count of WRs |
//!
//! Users that own one CQ per queue leave `slot` and `gen` at 0 ([`WrId::new`]); poll
//! groups add them with [`WrId::with_queue`].

use std::fmt;

/// A work request's id: generation, queue slot, operation kind and tag in one `u64`
/// (layout in the [module documentation](self)). `Copy`, built and taken apart by
/// `const fn`s, never allocates.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WrId(u64);

impl WrId {
    /// Bits of the tag field.
    pub const TAG_BITS: u32 = 24;
    /// Largest tag ([`WrId::new`] keeps only the low [`WrId::TAG_BITS`] bits).
    pub const TAG_MAX: u32 = (1 << Self::TAG_BITS) - 1;
    const KIND_SHIFT: u32 = 24;
    const SLOT_SHIFT: u32 = 32;
    const GEN_SHIFT: u32 = 48;

    /// Operation `kind` on item `tag` (≤ [`WrId::TAG_MAX`]) of queue slot 0, generation 0.
    pub const fn new(kind: u8, tag: u32) -> WrId {
        debug_assert!(tag <= Self::TAG_MAX, "WrId tag beyond 24 bits");
        WrId(((kind as u64) << Self::KIND_SHIFT) | (tag & Self::TAG_MAX) as u64)
    }

    /// The same kind and tag on queue `slot`, generation `gen`.
    pub const fn with_queue(self, slot: u16, gen: u16) -> WrId {
        let low = self.0 & ((1 << Self::SLOT_SHIFT) - 1);
        WrId(((gen as u64) << Self::GEN_SHIFT) | ((slot as u64) << Self::SLOT_SHIFT) | low)
    }

    /// The id as a completion returned it (`ibv_wc.wr_id`).
    pub const fn from_raw(raw: u64) -> WrId {
        WrId(raw)
    }

    /// The 64 bits posted as `ibv_send_wr.wr_id` / `ibv_recv_wr.wr_id`.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Generation of the queue slot.
    pub const fn gen(self) -> u16 {
        (self.0 >> Self::GEN_SHIFT) as u16
    }

    /// Queue slot.
    pub const fn slot(self) -> u16 {
        (self.0 >> Self::SLOT_SHIFT) as u16
    }

    /// Operation kind.
    pub const fn kind(self) -> u8 {
        (self.0 >> Self::KIND_SHIFT) as u8
    }

    /// Tag (receive buffer, command id, count).
    pub const fn tag(self) -> u32 {
        (self.0 as u32) & Self::TAG_MAX
    }
}

impl fmt::Debug for WrId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrId")
            .field("gen", &self.gen())
            .field("slot", &self.slot())
            .field("kind", &self.kind())
            .field("tag", &self.tag())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_where_the_table_says() {
        let id = WrId::new(0x06, 0x7f_ffff).with_queue(0x0201, 0xbeef);
        assert_eq!(id.raw(), 0xbeef_0201_067f_ffff);
        assert_eq!(
            (id.gen(), id.slot(), id.kind(), id.tag()),
            (0xbeef, 0x0201, 6, 0x7f_ffff)
        );
        assert_eq!(WrId::from_raw(id.raw()), id);
        assert_eq!(WrId::new(0, 0).raw(), 0);
        assert_eq!(WrId::new(1, 5).with_queue(0, 0), WrId::new(1, 5));
        // with_queue replaces an earlier queue, keeping kind and tag.
        let moved = id.with_queue(3, 4);
        assert_eq!(
            (moved.gen(), moved.slot(), moved.kind(), moved.tag()),
            (4, 3, 6, 0x7f_ffff)
        );
    }

    #[test]
    fn debug_names_the_fields() {
        let s = format!("{:?}", WrId::new(4, 17).with_queue(2, 9));
        assert_eq!(s, "WrId { gen: 9, slot: 2, kind: 4, tag: 17 }");
    }

    #[test]
    fn const_construction() {
        const ID: WrId = WrId::new(2, 3).with_queue(u16::MAX, 1);
        const KIND: u8 = ID.kind();
        assert_eq!((KIND, ID.tag(), ID.slot(), ID.gen()), (2, 3, u16::MAX, 1));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(gen: u16, slot: u16, kind: u8, tag in 0..=WrId::TAG_MAX) {
            let id = WrId::new(kind, tag).with_queue(slot, gen);
            proptest::prop_assert_eq!((id.gen(), id.slot(), id.kind(), id.tag()), (gen, slot, kind, tag));
            proptest::prop_assert_eq!(WrId::from_raw(id.raw()), id);
        }

        #[test]
        fn raw_round_trip(raw: u64) {
            let id = WrId::from_raw(raw);
            let rebuilt = WrId::new(id.kind(), id.tag()).with_queue(id.slot(), id.gen());
            proptest::prop_assert_eq!(rebuilt.raw(), raw);
        }
    }
}
