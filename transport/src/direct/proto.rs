//! Direct-mode wire layouts (all little endian). `docs/direct-mode.md` is the prose form.

use nvme::spec::{Sqe, Status};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Admin opcode: attach a direct queue (vendor specific; bits 1:0 = 10b, data from the
/// controller: the [`Descriptor`] through the command's keyed SGL).
pub const OPC_DIRECT_ATTACH: u8 = 0xC2;
/// Admin opcode: detach the direct queue named by CDW10 (token low) / CDW11 (token high).
pub const OPC_DIRECT_DETACH: u8 = 0xC0;

/// `Descriptor::magic`: "NVDM".
pub const DESCRIPTOR_MAGIC: u32 = u32::from_le_bytes(*b"NVDM");
/// Connection private data magic: "NVDC".
pub const CONNECT_MAGIC: u32 = u32::from_le_bytes(*b"NVDC");
/// Protocol version.
pub const VERSION: u16 = 1;

/// Refusal of a host that is not on the subsystem's `direct_hosts` list:
/// SCT 2h (media and data integrity), SC 86h Access Denied.
pub const STATUS_ACCESS_DENIED: Status = Status::new(nvme::spec::sct::MEDIA, 0x86);

/// Refusal of an attach beyond the target's direct-mode limits (queues or pinned memory
/// per host, pinned memory in all): SCT 1h (command specific), SC 01h Invalid Queue
/// Identifier, what Create I/O Queue answers when no more queues are available.
pub const STATUS_ATTACH_LIMIT: Status = Status::new(nvme::spec::sct::COMMAND_SPECIFIC, 0x01);

/// Data-path level of an attached queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// SQ and doorbells in host memory; a target poller forwards doorbells.
    Forwarded,
    /// SQ in the CMB and doorbells in BAR0, both registered from dma-bufs.
    P2p,
}

impl Level {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Level::Forwarded => 1,
            Level::P2p => 2,
        }
    }
    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Level> {
        match v {
            1 => Some(Level::Forwarded),
            2 => Some(Level::P2p),
            _ => None,
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Level::Forwarded => "forwarded",
            Level::P2p => "p2p",
        }
    }
}

/// `Descriptor::flags` bit: the target pushes each CQE to the host by SEND (16 bytes).
pub const FLAG_CQE_PUSH: u8 = 1 << 0;
/// `Descriptor::flags` bit: an RDMA WRITE WITH IMMEDIATE to the SQ carrying the new tail
/// in the immediate rings the SQ doorbell (forwarded level).
pub const FLAG_TAIL_IN_IMM: u8 = 1 << 1;
/// `Descriptor::flags` bit: the target offers polled completions (the host reads the CQ
/// ring by RDMA READ and hands the CQ head back, see [`CONNECT_CQ_POLLED`]). Targets
/// without it only push CQEs.
pub const FLAG_CQ_POLL: u8 = 1 << 2;

/// CQ entries a polling host reads with one RDMA READ at most (128 bytes).
pub const CQ_READ_ENTRIES: usize = 8;

/// The immediate of a polled queue's doorbell WRITE WITH IMMEDIATE: new SQ tail in bits
/// 15:0, CQ head in bits 31:16 (pushed queues carry the tail alone).
pub fn polled_imm(sq_tail: u16, cq_head: u16) -> u32 {
    u32::from(sq_tail) | u32::from(cq_head) << 16
}

/// (SQ tail, CQ head) of a polled queue's immediate.
pub fn split_polled_imm(imm: u32) -> (u16, u16) {
    (imm as u16, (imm >> 16) as u16)
}

/// A remote memory range: address and rkey (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct RemoteRegion {
    /// Address to use in RDMA work requests.
    pub addr: U64,
    /// Remote key.
    pub rkey: U32,
    /// Reserved (0).
    pub rsvd: U32,
}

impl RemoteRegion {
    /// A region at `addr` with `rkey`.
    pub fn new(addr: u64, rkey: u32) -> Self {
        RemoteRegion {
            addr: U64::new(addr),
            rkey: U32::new(rkey),
            rsvd: U32::new(0),
        }
    }
}

/// The attach reply (256 bytes), written to the host by the attach command.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Descriptor {
    /// [`DESCRIPTOR_MAGIC`].
    pub magic: U32,
    /// [`VERSION`].
    pub version: U16,
    /// [`Level`] wire value.
    pub level: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Names this attachment: CM private data of the direct connection, and detach.
    pub token: U64,
    /// Controller resets seen by the target when the queue was created.
    pub generation: U64,
    /// NVMe queue id on the backing controller (CQ id = SQ id).
    pub qid: U16,
    /// Entries of the SQ and of the CQ.
    pub depth: U16,
    /// Namespace id on the backing controller (goes into SQEs as is).
    pub nsid: U32,
    /// Bytes per logical block.
    pub lba_size: U32,
    /// Largest transfer per command, bytes.
    pub max_transfer: U32,
    /// Namespace size in logical blocks.
    pub blocks: U64,
    /// Submission ring: `depth` × 64 bytes.
    pub sq: RemoteRegion,
    /// SQ tail doorbell (4 bytes).
    pub sq_doorbell: RemoteRegion,
    /// Completion ring: `depth` × 16 bytes (RDMA READ for polling).
    pub cq: RemoteRegion,
    /// CQ head doorbell (4 bytes).
    pub cq_doorbell: RemoteRegion,
    /// Data pool (PRPs point into it at `pool_iova + offset`).
    pub pool: RemoteRegion,
    /// Pool length in bytes.
    pub pool_len: U64,
    /// Device IOVA of the first pool byte.
    pub pool_iova: U64,
    /// RDMA CM port of the direct connection (same address as the admin connection).
    pub port: U16,
    /// Reserved.
    pub rsvd0: [u8; 6],
    /// Why this level (ASCII, NUL padded), e.g. the P2P registration error.
    pub reason: [u8; 64],
    /// Reserved.
    pub rsvd1: [u8; 40],
}

const _: () = assert!(size_of::<Descriptor>() == 256);
const _: () = assert!(std::mem::offset_of!(Descriptor, sq) == 48);
const _: () = assert!(std::mem::offset_of!(Descriptor, pool) == 112);
const _: () = assert!(std::mem::offset_of!(Descriptor, port) == 144);
const _: () = assert!(std::mem::offset_of!(Descriptor, reason) == 152);

impl Descriptor {
    /// A zeroed descriptor with magic and version set.
    pub fn new() -> Self {
        let mut d = Descriptor::new_zeroed();
        d.magic = U32::new(DESCRIPTOR_MAGIC);
        d.version = U16::new(VERSION);
        d
    }

    /// Parses and checks magic, version and level.
    pub fn parse(bytes: &[u8]) -> Option<Descriptor> {
        let (d, _) = Descriptor::read_from_prefix(bytes).ok()?;
        (d.magic.get() == DESCRIPTOR_MAGIC
            && d.version.get() == VERSION
            && Level::from_u8(d.level).is_some()
            && d.depth.get() >= 2)
            .then_some(d)
    }

    /// The level.
    pub fn level(&self) -> Level {
        Level::from_u8(self.level).unwrap_or(Level::Forwarded)
    }

    /// Sets the reason text. It has 63 bytes on the wire: a longer one is cut at the
    /// last word that fits and ends in "..." (serve's log has it whole), never mid-word
    /// or mid-character.
    pub fn set_reason(&mut self, s: &str) {
        self.reason = [0; 64];
        let t = fit_reason(s, 63);
        self.reason[..t.len()].copy_from_slice(t.as_bytes());
    }

    /// The reason text.
    pub fn reason(&self) -> String {
        let end = self.reason.iter().position(|&b| b == 0).unwrap_or(64);
        String::from_utf8_lossy(&self.reason[..end]).into_owned()
    }
}

/// `s` if it has at most `max` bytes, else its longest prefix of whole words that leaves
/// room for "...", followed by "...".
fn fit_reason(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let room = max - 3;
    let mut end = 0;
    for (i, c) in s.char_indices() {
        if i + c.len_utf8() > room {
            break;
        }
        if c == ' ' {
            end = i;
        }
    }
    if end == 0 {
        // one long word: cut at a character boundary
        end = s
            .char_indices()
            .map(|(i, c)| i + c.len_utf8())
            .take_while(|&e| e <= room)
            .last()
            .unwrap_or(0);
    }
    format!(
        "{}...",
        s[..end].trim_end_matches([' ', ',', ';', ':', '('])
    )
}

impl Default for Descriptor {
    fn default() -> Self {
        Self::new()
    }
}

/// What the host asks for in the attach command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachRequest {
    /// Requested queue entries (CDW10 bits 15:0; 0 = the target's default).
    pub depth: u16,
    /// Requested pool bytes (CDW11 × 4 KiB; 0 = the target's default).
    pub pool_bytes: u64,
    /// The host will read the CQ itself (polled completions; CDW10 bit 16): the target
    /// then creates the CQ without an interrupt, which nobody would wait for.
    pub polled_cq: bool,
}

/// CDW10 bit of [`AttachRequest::polled_cq`].
pub const ATTACH_POLLED_CQ: u32 = 1 << 16;

impl AttachRequest {
    /// The attach command for namespace `nsid` (the SGL is set by the caller).
    pub fn to_sqe(self, nsid: u32) -> Sqe {
        let mut s = Sqe::new(OPC_DIRECT_ATTACH);
        s.nsid = U32::new(nsid);
        s.cdw10 =
            U32::new(u32::from(self.depth) | if self.polled_cq { ATTACH_POLLED_CQ } else { 0 });
        s.cdw11 = U32::new(u32::try_from(self.pool_bytes / 4096).unwrap_or(u32::MAX));
        s
    }

    /// From an attach command.
    pub fn from_sqe(s: &Sqe) -> Self {
        AttachRequest {
            depth: s.cdw10.get() as u16,
            pool_bytes: u64::from(s.cdw11.get()) * 4096,
            polled_cq: s.cdw10.get() & ATTACH_POLLED_CQ != 0,
        }
    }
}

/// The detach command for `token`.
pub fn detach_sqe(token: u64) -> Sqe {
    let mut s = Sqe::new(OPC_DIRECT_DETACH);
    s.cdw10 = U32::new(token as u32);
    s.cdw11 = U32::new((token >> 32) as u32);
    s
}

/// The token of a detach command.
pub fn detach_token(s: &Sqe) -> u64 {
    u64::from(s.cdw10.get()) | (u64::from(s.cdw11.get()) << 32)
}

/// CM private data of the direct connection request (32 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnectPrivate {
    /// [`CONNECT_MAGIC`].
    pub magic: U32,
    /// [`VERSION`].
    pub version: U16,
    /// `CONNECT_*` bits (version 1 targets before polled completions treat this as
    /// reserved and ignore it; the accept's flags say what the target agreed to).
    pub flags: U16,
    /// `Descriptor::token` of the attachment.
    pub token: U64,
    /// Host buffer for pushed read data (command id × `read_stride`); rkey 0: the host
    /// fetches read data itself by RDMA READ.
    pub read_addr: U64,
    /// Remote key of the read buffer.
    pub read_rkey: U32,
    /// Bytes per command id in the read buffer.
    pub read_stride: U32,
}

const _: () = assert!(size_of::<ConnectPrivate>() == 32);

/// Accept private data `flags` bit: read data is pushed before each read's CQE.
pub const ACCEPT_READS_PUSHED: u16 = 1;
/// Accept private data `flags` bit: completions are polled by the host (the target
/// agreed to [`CONNECT_CQ_POLLED`]); absent, the target pushes CQEs.
pub const ACCEPT_CQ_POLLED: u16 = 2;

/// `ConnectPrivate::flags` bit: the host polls the CQ ring by RDMA READ and carries the CQ
/// head in its doorbells; the target pushes nothing.
pub const CONNECT_CQ_POLLED: u16 = 1;

/// Rejection reason in the direct connection's reject private data ({magic u32, code u16}).
pub const REJECT_UNKNOWN_TOKEN: u16 = 1;

/// Accept/reject private data: {magic u32, code u16, flags u16}.
pub fn reply_private(code: u16, flags: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&CONNECT_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&code.to_le_bytes());
    b[6..8].copy_from_slice(&flags.to_le_bytes());
    b
}

/// The flags of an accept's private data (0 when absent or foreign).
pub fn reply_flags(b: &[u8]) -> u16 {
    if b.len() < 8 || b[..4] != CONNECT_MAGIC.to_le_bytes() {
        return 0;
    }
    u16::from_le_bytes([b[6], b[7]])
}

impl ConnectPrivate {
    /// Private data naming `token`, without pushed reads.
    pub fn new(token: u64) -> Self {
        ConnectPrivate {
            magic: U32::new(CONNECT_MAGIC),
            version: U16::new(VERSION),
            flags: U16::new(0),
            token: U64::new(token),
            read_addr: U64::new(0),
            read_rkey: U32::new(0),
            read_stride: U32::new(0),
        }
    }
    /// Parses; `None` unless magic and version match.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let (p, _) = ConnectPrivate::read_from_prefix(b).ok()?;
        (p.magic.get() == CONNECT_MAGIC && p.version.get() == VERSION).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_between_words() {
        let mut d = Descriptor::new();
        let long =
            "ibv_reg_dmabuf_mr: EOPNOTSUPP; the doorbell page export is not supported by this NIC";
        d.set_reason(long);
        let r = d.reason();
        assert!(r.len() <= 63 && r.ends_with("..."), "{r}");
        let kept = r.trim_end_matches("...");
        assert!(long.starts_with(kept), "{r}");
        assert!(
            matches!(
                long.as_bytes()[kept.len()],
                b' ' | b',' | b';' | b':' | b'('
            ),
            "cut mid-word: {r}"
        );
        d.set_reason("SQ in the CMB");
        assert_eq!(d.reason(), "SQ in the CMB");
        d.set_reason(&"é".repeat(40));
        assert!(d.reason().ends_with("...") && d.reason().len() <= 63);
    }

    #[test]
    fn descriptor_round_trip() {
        let mut d = Descriptor::new();
        d.level = Level::Forwarded.to_u8();
        d.depth = U16::new(64);
        d.token = U64::new(0x1122_3344_5566_7788);
        d.set_reason("ibv_reg_dmabuf_mr: EOPNOTSUPP");
        let p = Descriptor::parse(d.as_bytes()).unwrap();
        assert_eq!(p.token.get(), 0x1122_3344_5566_7788);
        assert_eq!(p.level(), Level::Forwarded);
        assert_eq!(p.reason(), "ibv_reg_dmabuf_mr: EOPNOTSUPP");
        // Garbage never parses into a descriptor.
        assert!(Descriptor::parse(&[0u8; 256]).is_none());
        assert!(Descriptor::parse(&[0u8; 10]).is_none());
    }

    proptest::proptest! {
        /// Network input never panics the parsers, and what parses round-trips.
        #[test]
        fn parsers_take_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Some(d) = Descriptor::parse(&bytes) {
                proptest::prop_assert_eq!(d.as_bytes(), &bytes[..256]);
                let _ = d.reason();
            }
            if let Some(p) = ConnectPrivate::parse(&bytes) {
                proptest::prop_assert_eq!(p.as_bytes(), &bytes[..32]);
            }
            let _ = reply_flags(&bytes);
            let mut sqe = Sqe::default();
            let n = bytes.len().min(64);
            sqe.as_mut_bytes()[..n].copy_from_slice(&bytes[..n]);
            let _ = AttachRequest::from_sqe(&sqe);
            let _ = detach_token(&sqe);
        }
    }

    #[test]
    fn attach_and_detach_commands() {
        let r = AttachRequest {
            depth: 32,
            pool_bytes: 1 << 20,
            polled_cq: false,
        };
        let s = r.to_sqe(1);
        assert_eq!(s.opcode(), OPC_DIRECT_ATTACH);
        assert_eq!(AttachRequest::from_sqe(&s), r);
        let polled = AttachRequest {
            depth: 1024,
            polled_cq: true,
            ..r
        };
        let s = polled.to_sqe(1);
        assert_eq!(s.cdw10.get(), 1024 | ATTACH_POLLED_CQ);
        assert_eq!(AttachRequest::from_sqe(&s), polled);
        assert_eq!(detach_token(&detach_sqe(u64::MAX - 5)), u64::MAX - 5);
        let c = ConnectPrivate::new(42);
        assert_eq!(ConnectPrivate::parse(c.as_bytes()).unwrap().token.get(), 42);
        assert!(ConnectPrivate::parse(&[0u8; 32]).is_none());
        assert!(ConnectPrivate::parse(&c.as_bytes()[..16]).is_none());
        assert_eq!(reply_flags(&reply_private(0, ACCEPT_READS_PUSHED)), 1);
        assert_eq!(reply_flags(&[1, 2, 3]), 0);
        let mut c = ConnectPrivate::new(7);
        c.flags = U16::new(CONNECT_CQ_POLLED);
        let p = ConnectPrivate::parse(c.as_bytes()).unwrap();
        assert_eq!(p.flags.get(), CONNECT_CQ_POLLED);
        // Byte 6 is the flags field on the wire.
        assert_eq!(c.as_bytes()[6], 1);
    }

    #[test]
    fn polled_immediate_carries_tail_and_head() {
        assert_eq!(polled_imm(5, 0), 5);
        assert_eq!(polled_imm(0x3ff, 0x2a), 0x002a_03ff);
        for (t, h) in [(0u16, 0u16), (1023, 1022), (u16::MAX, 1), (7, u16::MAX)] {
            assert_eq!(split_polled_imm(polled_imm(t, h)), (t, h));
        }
    }
}
