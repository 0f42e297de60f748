//! NVMe 2.0 base-spec data structures shared by the PCIe driver, the simulator and the
//! NVMe-oF target: submission/completion queue entries, status codes, opcodes, controller
//! registers, Identify structures, log pages and feature identifiers.
//!
//! Every fixed layout is a `#[repr(C)]` struct of little-endian field types
//! ([`zerocopy::little_endian`]), so each has alignment 1, no padding, and its size is
//! asserted at compile time together with the offsets of the fields other code relies on.
//! Parse a byte buffer with `zerocopy::FromBytes::read_from_bytes` /
//! `ref_from_bytes`, and serialise with `zerocopy::IntoBytes::as_bytes`.

use core::fmt;
use core::mem::{offset_of, size_of};

pub use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Memory page size the driver uses (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;

// ---------------------------------------------------------------------------------------
// Opcodes
// ---------------------------------------------------------------------------------------

/// Admin command opcodes (NVMe 2.0 base spec, figure 28) and the fabrics opcode.
pub mod admin_opc {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const NS_MANAGEMENT: u8 = 0x0d;
    pub const FW_COMMIT: u8 = 0x10;
    pub const FW_DOWNLOAD: u8 = 0x11;
    pub const DEVICE_SELF_TEST: u8 = 0x14;
    pub const NS_ATTACHMENT: u8 = 0x15;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const DIRECTIVE_SEND: u8 = 0x19;
    pub const DIRECTIVE_RECEIVE: u8 = 0x1a;
    pub const VIRTUALIZATION_MGMT: u8 = 0x1c;
    pub const NVME_MI_SEND: u8 = 0x1d;
    pub const NVME_MI_RECEIVE: u8 = 0x1e;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    /// Fabrics command (Connect, Property Get/Set, ...); the type is in byte 4 (fctype).
    pub const FABRICS: u8 = 0x7f;
    pub const FORMAT_NVM: u8 = 0x80;
    pub const SECURITY_SEND: u8 = 0x81;
    pub const SECURITY_RECEIVE: u8 = 0x82;
    pub const SANITIZE: u8 = 0x84;
}

/// NVM command set I/O opcodes.
pub mod io_opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const VERIFY: u8 = 0x0c;
    pub const RESERVATION_REGISTER: u8 = 0x0d;
    pub const RESERVATION_REPORT: u8 = 0x0e;
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    pub const RESERVATION_RELEASE: u8 = 0x15;
    pub const COPY: u8 = 0x19;
}

/// Name of an admin opcode, for logs and errors.
pub fn admin_opcode_name(opc: u8) -> &'static str {
    use admin_opc::*;
    match opc {
        DELETE_IO_SQ => "Delete I/O SQ",
        CREATE_IO_SQ => "Create I/O SQ",
        GET_LOG_PAGE => "Get Log Page",
        DELETE_IO_CQ => "Delete I/O CQ",
        CREATE_IO_CQ => "Create I/O CQ",
        IDENTIFY => "Identify",
        ABORT => "Abort",
        SET_FEATURES => "Set Features",
        GET_FEATURES => "Get Features",
        ASYNC_EVENT_REQUEST => "Asynchronous Event Request",
        KEEP_ALIVE => "Keep Alive",
        DOORBELL_BUFFER_CONFIG => "Doorbell Buffer Config",
        FABRICS => "Fabrics",
        FORMAT_NVM => "Format NVM",
        _ => "admin command",
    }
}

/// Name of an NVM I/O opcode, for logs and errors.
pub fn io_opcode_name(opc: u8) -> &'static str {
    use io_opc::*;
    match opc {
        FLUSH => "Flush",
        WRITE => "Write",
        READ => "Read",
        WRITE_UNCORRECTABLE => "Write Uncorrectable",
        COMPARE => "Compare",
        WRITE_ZEROES => "Write Zeroes",
        DATASET_MANAGEMENT => "Dataset Management",
        VERIFY => "Verify",
        COPY => "Copy",
        _ => "I/O command",
    }
}

// ---------------------------------------------------------------------------------------
// Submission queue entry
// ---------------------------------------------------------------------------------------

/// A 64-byte submission queue entry (common command format).
///
/// `prp1`/`prp2` are the data pointer (DPTR); for SGL commands (PSDT != 0) the same 16
/// bytes hold one SGL descriptor, see [`Sqe::dptr`].
#[derive(Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Sqe {
    /// Opcode (bits 7:0), FUSE (9:8), PSDT (15:14), command identifier (31:16).
    pub cdw0: U32,
    pub nsid: U32,
    pub cdw2: U32,
    pub cdw3: U32,
    pub mptr: U64,
    pub prp1: U64,
    pub prp2: U64,
    pub cdw10: U32,
    pub cdw11: U32,
    pub cdw12: U32,
    pub cdw13: U32,
    pub cdw14: U32,
    pub cdw15: U32,
}

const _: () = assert!(size_of::<Sqe>() == 64);
const _: () = assert!(offset_of!(Sqe, prp1) == 24);
const _: () = assert!(offset_of!(Sqe, cdw10) == 40);

impl fmt::Debug for Sqe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sqe")
            .field("opc", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid.get())
            .field("prp1", &format_args!("{:#x}", self.prp1.get()))
            .field("prp2", &format_args!("{:#x}", self.prp2.get()))
            .field("cdw10", &format_args!("{:#x}", self.cdw10.get()))
            .field("cdw11", &format_args!("{:#x}", self.cdw11.get()))
            .field("cdw12", &format_args!("{:#x}", self.cdw12.get()))
            .finish()
    }
}

impl Sqe {
    /// An entry with only the opcode set.
    pub fn new(opcode: u8) -> Self {
        Sqe {
            cdw0: U32::new(opcode as u32),
            ..Default::default()
        }
    }
    pub fn opcode(&self) -> u8 {
        self.cdw0.get() as u8
    }
    /// Fused operation bits (0 = normal).
    pub fn fuse(&self) -> u8 {
        ((self.cdw0.get() >> 8) & 3) as u8
    }
    /// PRP or SGL for data transfer: 0 = PRP, 1 = SGL (MPTR contiguous), 2 = SGL (MPTR SGL).
    pub fn psdt(&self) -> u8 {
        ((self.cdw0.get() >> 14) & 3) as u8
    }
    pub fn set_psdt(&mut self, psdt: u8) {
        self.cdw0 = U32::new((self.cdw0.get() & !(3 << 14)) | (((psdt & 3) as u32) << 14));
    }
    pub fn cid(&self) -> u16 {
        (self.cdw0.get() >> 16) as u16
    }
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = U32::new((self.cdw0.get() & 0xffff) | ((cid as u32) << 16));
    }
    /// The 16-byte data pointer (PRP1+PRP2 or one SGL descriptor) as raw bytes.
    pub fn dptr(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(self.prp1.as_bytes());
        out[8..].copy_from_slice(self.prp2.as_bytes());
        out
    }
    pub fn set_dptr(&mut self, d: [u8; 16]) {
        self.prp1 = U64::from_bytes(d[..8].try_into().expect("8 bytes"));
        self.prp2 = U64::from_bytes(d[8..].try_into().expect("8 bytes"));
    }
    /// Starting LBA of an NVM read/write/write-zeroes command (CDW10/11).
    pub fn slba(&self) -> u64 {
        self.cdw10.get() as u64 | ((self.cdw11.get() as u64) << 32)
    }
    /// Number of logical blocks, 0-based (CDW12 bits 15:0).
    pub fn nlb0(&self) -> u16 {
        self.cdw12.get() as u16
    }

    fn rw(opc: u8, nsid: u32, slba: u64, nlb0: u16, prp1: u64, prp2: u64) -> Self {
        Sqe {
            cdw0: U32::new(opc as u32),
            nsid: U32::new(nsid),
            prp1: U64::new(prp1),
            prp2: U64::new(prp2),
            cdw10: U32::new(slba as u32),
            cdw11: U32::new((slba >> 32) as u32),
            cdw12: U32::new(nlb0 as u32),
            ..Default::default()
        }
    }
    /// NVM Read of `nlb0 + 1` blocks at `slba`.
    pub fn read(nsid: u32, slba: u64, nlb0: u16, prp1: u64, prp2: u64) -> Self {
        Self::rw(io_opc::READ, nsid, slba, nlb0, prp1, prp2)
    }
    /// NVM Write of `nlb0 + 1` blocks at `slba`.
    pub fn write(nsid: u32, slba: u64, nlb0: u16, prp1: u64, prp2: u64) -> Self {
        Self::rw(io_opc::WRITE, nsid, slba, nlb0, prp1, prp2)
    }
    /// NVM Write Zeroes of `nlb0 + 1` blocks at `slba`.
    pub fn write_zeroes(nsid: u32, slba: u64, nlb0: u16) -> Self {
        Self::rw(io_opc::WRITE_ZEROES, nsid, slba, nlb0, 0, 0)
    }
    /// NVM Flush.
    pub fn flush(nsid: u32) -> Self {
        Sqe {
            nsid: U32::new(nsid),
            ..Self::new(io_opc::FLUSH)
        }
    }
    /// Dataset Management over `nr0 + 1` [`DsmRange`]s at `prp1`; `attr` = [`dsm`] bits.
    pub fn dsm(nsid: u32, nr0: u8, attr: u32, prp1: u64) -> Self {
        Sqe {
            nsid: U32::new(nsid),
            prp1: U64::new(prp1),
            cdw10: U32::new(nr0 as u32),
            cdw11: U32::new(attr),
            ..Self::new(io_opc::DATASET_MANAGEMENT)
        }
    }
    /// Identify with the given CNS ([`cns`]).
    pub fn identify(cns: u8, nsid: u32, cntid: u16, prp1: u64) -> Self {
        Sqe {
            nsid: U32::new(nsid),
            prp1: U64::new(prp1),
            cdw10: U32::new(cns as u32 | ((cntid as u32) << 16)),
            ..Self::new(admin_opc::IDENTIFY)
        }
    }
    /// Create I/O Completion Queue, physically contiguous, interrupts off.
    pub fn create_io_cq(qid: u16, qsize0: u16, prp1: u64) -> Self {
        Sqe {
            prp1: U64::new(prp1),
            cdw10: U32::new(qid as u32 | ((qsize0 as u32) << 16)),
            cdw11: U32::new(1), // PC=1, IEN=0, IV=0
            ..Self::new(admin_opc::CREATE_IO_CQ)
        }
    }
    /// Create I/O Completion Queue, physically contiguous, interrupts on (IEN = 1) on
    /// interrupt vector `iv`.
    pub fn create_io_cq_irq(qid: u16, qsize0: u16, prp1: u64, iv: u16) -> Self {
        Sqe {
            prp1: U64::new(prp1),
            cdw10: U32::new(qid as u32 | ((qsize0 as u32) << 16)),
            cdw11: U32::new(1 | 2 | ((iv as u32) << 16)), // PC=1, IEN=1, IV
            ..Self::new(admin_opc::CREATE_IO_CQ)
        }
    }
    /// Create I/O Submission Queue, physically contiguous, medium priority, bound to `cqid`.
    pub fn create_io_sq(qid: u16, qsize0: u16, cqid: u16, prp1: u64) -> Self {
        Sqe {
            prp1: U64::new(prp1),
            cdw10: U32::new(qid as u32 | ((qsize0 as u32) << 16)),
            cdw11: U32::new(1 | ((cqid as u32) << 16)), // PC=1, QPRIO=0
            ..Self::new(admin_opc::CREATE_IO_SQ)
        }
    }
    pub fn delete_io_sq(qid: u16) -> Self {
        Sqe {
            cdw10: U32::new(qid as u32),
            ..Self::new(admin_opc::DELETE_IO_SQ)
        }
    }
    pub fn delete_io_cq(qid: u16) -> Self {
        Sqe {
            cdw10: U32::new(qid as u32),
            ..Self::new(admin_opc::DELETE_IO_CQ)
        }
    }
    /// Set Features `fid` ([`feat`]) with CDW11 value `dw11`.
    pub fn set_features(fid: u8, dw11: u32) -> Self {
        Sqe {
            cdw10: U32::new(fid as u32),
            cdw11: U32::new(dw11),
            ..Self::new(admin_opc::SET_FEATURES)
        }
    }
    /// Get Features `fid` (current value).
    pub fn get_features(fid: u8) -> Self {
        Sqe {
            cdw10: U32::new(fid as u32),
            ..Self::new(admin_opc::GET_FEATURES)
        }
    }
    /// Set Features / Number of Queues: `nsq0`/`ncq0` are 0-based counts.
    pub fn set_num_queues(nsq0: u16, ncq0: u16) -> Self {
        Self::set_features(feat::NUM_QUEUES, nsq0 as u32 | ((ncq0 as u32) << 16))
    }
    /// Get Log Page `lid` ([`log`]), `len` bytes (multiple of 4) from byte `offset`.
    pub fn get_log_page(lid: u8, nsid: u32, len: u32, offset: u64, prp1: u64, prp2: u64) -> Self {
        let numd = (len / 4).saturating_sub(1);
        Sqe {
            nsid: U32::new(nsid),
            prp1: U64::new(prp1),
            prp2: U64::new(prp2),
            cdw10: U32::new(lid as u32 | ((numd & 0xffff) << 16)),
            cdw11: U32::new(numd >> 16),
            cdw12: U32::new(offset as u32),
            cdw13: U32::new((offset >> 32) as u32),
            ..Self::new(admin_opc::GET_LOG_PAGE)
        }
    }
    /// Abort command `cid` on submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Self {
        Sqe {
            cdw10: U32::new(sqid as u32 | ((cid as u32) << 16)),
            ..Self::new(admin_opc::ABORT)
        }
    }
    /// Doorbell Buffer Config: shadow doorbell page at `shadow`, EventIdx page at `eventidx`.
    pub fn doorbell_buffer_config(shadow: u64, eventidx: u64) -> Self {
        Sqe {
            prp1: U64::new(shadow),
            prp2: U64::new(eventidx),
            ..Self::new(admin_opc::DOORBELL_BUFFER_CONFIG)
        }
    }
    pub fn keep_alive() -> Self {
        Self::new(admin_opc::KEEP_ALIVE)
    }
}

// ---------------------------------------------------------------------------------------
// Completion queue entry and status
// ---------------------------------------------------------------------------------------

/// A 16-byte completion queue entry.
#[derive(Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Cqe {
    /// Command specific result (DW0).
    pub dw0: U32,
    pub dw1: U32,
    pub sq_head: U16,
    pub sq_id: U16,
    pub cid: U16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: U16,
}
const _: () = assert!(size_of::<Cqe>() == 16);
const _: () = assert!(offset_of!(Cqe, status) == 14);

impl fmt::Debug for Cqe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cqe")
            .field("dw0", &format_args!("{:#x}", self.dw0.get()))
            .field("sq_head", &self.sq_head.get())
            .field("sq_id", &self.sq_id.get())
            .field("cid", &self.cid.get())
            .field("phase", &self.phase())
            .field("status", &self.status())
            .finish()
    }
}

impl Cqe {
    /// A completion for `cid` on `sq_id` with the given status and phase.
    pub fn new(cid: u16, sq_id: u16, sq_head: u16, status: Status, phase: bool) -> Self {
        Cqe {
            dw0: U32::new(0),
            dw1: U32::new(0),
            sq_head: U16::new(sq_head),
            sq_id: U16::new(sq_id),
            cid: U16::new(cid),
            status: U16::new(status.to_field_with_phase(phase)),
        }
    }
    pub fn phase(&self) -> bool {
        self.status.get() & 1 == 1
    }
    pub fn status(&self) -> Status {
        Status::from_field(self.status.get())
    }
}

/// Status code type (SCT).
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
    pub const VENDOR: u8 = 7;
}

/// A status field as carried in a CQE (without the phase tag): SC, SCT, CRD, More, DNR.
/// Bit layout here: SC in bits 7:0, SCT 10:8, CRD 12:11, More 13, DNR 14 — i.e. the CQE
/// status field shifted right by one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u16);

impl Status {
    pub const SUCCESS: Status = Status(0);
    pub const INVALID_OPCODE: Status = Status::new(sct::GENERIC, 0x01);
    pub const INVALID_FIELD: Status = Status::new(sct::GENERIC, 0x02);
    pub const CID_CONFLICT: Status = Status::new(sct::GENERIC, 0x03);
    pub const DATA_TRANSFER_ERROR: Status = Status::new(sct::GENERIC, 0x04);
    pub const INTERNAL_ERROR: Status = Status::new(sct::GENERIC, 0x06);
    pub const ABORT_REQUESTED: Status = Status::new(sct::GENERIC, 0x07);
    pub const ABORTED_SQ_DELETED: Status = Status::new(sct::GENERIC, 0x08);
    pub const INVALID_NAMESPACE: Status = Status::new(sct::GENERIC, 0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::new(sct::GENERIC, 0x0c);
    pub const SGL_DATA_LENGTH_INVALID: Status = Status::new(sct::GENERIC, 0x0f);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status::new(sct::GENERIC, 0x11);
    pub const INVALID_PRP_OFFSET: Status = Status::new(sct::GENERIC, 0x13);
    pub const SGL_OFFSET_INVALID: Status = Status::new(sct::GENERIC, 0x16);
    /// Command Interrupted (NVMe 1.4): not processed, the host should retry it.
    pub const COMMAND_INTERRUPTED: Status = Status::new(sct::GENERIC, 0x21);
    pub const LBA_OUT_OF_RANGE: Status = Status::new(sct::GENERIC, 0x80);
    pub const CAPACITY_EXCEEDED: Status = Status::new(sct::GENERIC, 0x81);
    pub const NAMESPACE_NOT_READY: Status = Status::new(sct::GENERIC, 0x82);
    pub const INVALID_CQ: Status = Status::new(sct::COMMAND_SPECIFIC, 0x00);
    pub const INVALID_QUEUE_ID: Status = Status::new(sct::COMMAND_SPECIFIC, 0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x02);
    pub const ABORT_LIMIT_EXCEEDED: Status = Status::new(sct::COMMAND_SPECIFIC, 0x03);
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::new(sct::COMMAND_SPECIFIC, 0x08);
    pub const INVALID_LOG_PAGE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x09);
    pub const INVALID_QUEUE_DELETION: Status = Status::new(sct::COMMAND_SPECIFIC, 0x0c);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(sct::COMMAND_SPECIFIC, 0x0d);
    pub const WRITE_FAULT: Status = Status::new(sct::MEDIA, 0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::new(sct::MEDIA, 0x81);
    /// Compare: the data compared differ from the data read.
    pub const COMPARE_FAILURE: Status = Status::new(sct::MEDIA, 0x85);

    /// Status with the given type and code.
    pub const fn new(sct: u8, sc: u8) -> Status {
        Status(sc as u16 | (((sct & 7) as u16) << 8))
    }
    /// From the 16-bit CQE status field (phase tag in bit 0 is dropped).
    pub const fn from_field(field: u16) -> Status {
        Status(field >> 1)
    }
    /// The 16-bit CQE status field with the given phase tag.
    pub const fn to_field_with_phase(self, phase: bool) -> u16 {
        (self.0 << 1) | phase as u16
    }
    /// Same status with Do Not Retry set.
    pub const fn with_dnr(self) -> Status {
        Status(self.0 | (1 << 14))
    }
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    pub const fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    pub const fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }
    pub const fn is_success(self) -> bool {
        self.sc() == 0 && self.sct() == 0
    }
    /// Compare type and code only (ignores DNR/More/CRD).
    pub const fn same_code(self, other: Status) -> bool {
        (self.0 & 0x7ff) == (other.0 & 0x7ff)
    }
    /// The typed code.
    pub fn code(self) -> StatusCode {
        StatusCode::from_parts(self.sct(), self.sc())
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sct {:#x}, sc {:#04x}",
            self.code().name(),
            self.sct(),
            self.sc()
        )?;
        if self.dnr() {
            f.write_str(", dnr")?;
        }
        f.write_str(")")
    }
}

impl From<StatusCode> for Status {
    fn from(c: StatusCode) -> Status {
        let (sct, sc) = c.parts();
        Status::new(sct, sc)
    }
}

macro_rules! status_codes {
    ($( $variant:ident = ($sct:expr, $sc:expr, $name:literal), )*) => {
        /// Typed NVMe status codes with their spec names. Command-specific codes
        /// 0x80..=0xBF depend on the command (e.g. NVM vs fabrics Connect) and are kept as
        /// [`StatusCode::CommandSpecific`]; unknown codes as [`StatusCode::Other`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum StatusCode {
            $( #[doc = $name] $variant, )*
            /// A command-specific code whose meaning depends on the command.
            CommandSpecific(u8),
            /// A vendor-specific code (SCT 7).
            Vendor(u8),
            /// A code this crate has no name for.
            Other { sct: u8, sc: u8 },
        }
        impl StatusCode {
            /// Decode from status code type and status code.
            pub fn from_parts(sct: u8, sc: u8) -> StatusCode {
                match (sct, sc) {
                    $( ($sct, $sc) => StatusCode::$variant, )*
                    (sct::COMMAND_SPECIFIC, sc) => StatusCode::CommandSpecific(sc),
                    (sct::VENDOR, sc) => StatusCode::Vendor(sc),
                    (sct, sc) => StatusCode::Other { sct, sc },
                }
            }
            /// (SCT, SC).
            pub fn parts(self) -> (u8, u8) {
                match self {
                    $( StatusCode::$variant => ($sct, $sc), )*
                    StatusCode::CommandSpecific(sc) => (sct::COMMAND_SPECIFIC, sc),
                    StatusCode::Vendor(sc) => (sct::VENDOR, sc),
                    StatusCode::Other { sct, sc } => (sct, sc),
                }
            }
            /// The spec's name for this status.
            pub fn name(self) -> &'static str {
                match self {
                    $( StatusCode::$variant => $name, )*
                    StatusCode::CommandSpecific(_) => "Command Specific Status",
                    StatusCode::Vendor(_) => "Vendor Specific Status",
                    StatusCode::Other { .. } => "Unknown Status",
                }
            }
        }
    };
}

status_codes! {
    Success = (0, 0x00, "Successful Completion"),
    InvalidOpcode = (0, 0x01, "Invalid Command Opcode"),
    InvalidField = (0, 0x02, "Invalid Field in Command"),
    CommandIdConflict = (0, 0x03, "Command ID Conflict"),
    DataTransferError = (0, 0x04, "Data Transfer Error"),
    AbortedPowerLoss = (0, 0x05, "Commands Aborted due to Power Loss Notification"),
    InternalError = (0, 0x06, "Internal Error"),
    AbortRequested = (0, 0x07, "Command Abort Requested"),
    AbortedSqDeleted = (0, 0x08, "Command Aborted due to SQ Deletion"),
    AbortedFailedFused = (0, 0x09, "Command Aborted due to Failed Fused Command"),
    AbortedMissingFused = (0, 0x0a, "Command Aborted due to Missing Fused Command"),
    InvalidNamespace = (0, 0x0b, "Invalid Namespace or Format"),
    CommandSequenceError = (0, 0x0c, "Command Sequence Error"),
    InvalidSglSegment = (0, 0x0d, "Invalid SGL Segment Descriptor"),
    InvalidSglCount = (0, 0x0e, "Invalid Number of SGL Descriptors"),
    SglDataLengthInvalid = (0, 0x0f, "Data SGL Length Invalid"),
    SglMetadataLengthInvalid = (0, 0x10, "Metadata SGL Length Invalid"),
    SglDescriptorTypeInvalid = (0, 0x11, "SGL Descriptor Type Invalid"),
    InvalidCmbUse = (0, 0x12, "Invalid Use of Controller Memory Buffer"),
    InvalidPrpOffset = (0, 0x13, "PRP Offset Invalid"),
    AtomicWriteUnitExceeded = (0, 0x14, "Atomic Write Unit Exceeded"),
    OperationDenied = (0, 0x15, "Operation Denied"),
    SglOffsetInvalid = (0, 0x16, "SGL Offset Invalid"),
    HostIdInconsistentFormat = (0, 0x18, "Host Identifier Inconsistent Format"),
    KeepAliveTimerExpired = (0, 0x19, "Keep Alive Timer Expired"),
    KeepAliveTimeoutInvalid = (0, 0x1a, "Keep Alive Timeout Invalid"),
    AbortedPreemptAbort = (0, 0x1b, "Command Aborted due to Preempt and Abort"),
    SanitizeFailed = (0, 0x1c, "Sanitize Failed"),
    SanitizeInProgress = (0, 0x1d, "Sanitize In Progress"),
    SglDataBlockGranularityInvalid = (0, 0x1e, "SGL Data Block Granularity Invalid"),
    CommandNotSupportedForCmbQueue = (0, 0x1f, "Command Not Supported for Queue in CMB"),
    NamespaceWriteProtected = (0, 0x20, "Namespace is Write Protected"),
    CommandInterrupted = (0, 0x21, "Command Interrupted"),
    TransientTransportError = (0, 0x22, "Transient Transport Error"),
    LbaOutOfRange = (0, 0x80, "LBA Out of Range"),
    CapacityExceeded = (0, 0x81, "Capacity Exceeded"),
    NamespaceNotReady = (0, 0x82, "Namespace Not Ready"),
    ReservationConflict = (0, 0x83, "Reservation Conflict"),
    FormatInProgress = (0, 0x84, "Format In Progress"),
    CompletionQueueInvalid = (1, 0x00, "Completion Queue Invalid"),
    InvalidQueueIdentifier = (1, 0x01, "Invalid Queue Identifier"),
    InvalidQueueSize = (1, 0x02, "Invalid Queue Size"),
    AbortCommandLimitExceeded = (1, 0x03, "Abort Command Limit Exceeded"),
    AsyncEventRequestLimitExceeded = (1, 0x05, "Asynchronous Event Request Limit Exceeded"),
    InvalidFirmwareSlot = (1, 0x06, "Invalid Firmware Slot"),
    InvalidFirmwareImage = (1, 0x07, "Invalid Firmware Image"),
    InvalidInterruptVector = (1, 0x08, "Invalid Interrupt Vector"),
    InvalidLogPage = (1, 0x09, "Invalid Log Page"),
    InvalidFormat = (1, 0x0a, "Invalid Format"),
    FirmwareActivationRequiresReset = (1, 0x0b, "Firmware Activation Requires Conventional Reset"),
    InvalidQueueDeletion = (1, 0x0c, "Invalid Queue Deletion"),
    FeatureIdNotSaveable = (1, 0x0d, "Feature Identifier Not Saveable"),
    FeatureNotChangeable = (1, 0x0e, "Feature Not Changeable"),
    FeatureNotNamespaceSpecific = (1, 0x0f, "Feature Not Namespace Specific"),
    NamespaceAlreadyAttached = (1, 0x18, "Namespace Already Attached"),
    NamespaceIsPrivate = (1, 0x19, "Namespace Is Private"),
    NamespaceNotAttached = (1, 0x1a, "Namespace Not Attached"),
    InvalidControllerIdentifier = (1, 0x1f, "Invalid Controller Identifier"),
    WriteFault = (2, 0x80, "Write Fault"),
    UnrecoveredReadError = (2, 0x81, "Unrecovered Read Error"),
    EndToEndGuardCheckError = (2, 0x82, "End-to-end Guard Check Error"),
    EndToEndApplicationTagCheckError = (2, 0x83, "End-to-end Application Tag Check Error"),
    EndToEndReferenceTagCheckError = (2, 0x84, "End-to-end Reference Tag Check Error"),
    CompareFailure = (2, 0x85, "Compare Failure"),
    AccessDenied = (2, 0x86, "Access Denied"),
    DeallocatedOrUnwrittenBlock = (2, 0x87, "Deallocated or Unwritten Logical Block"),
    InternalPathError = (3, 0x00, "Internal Path Error"),
    AsymmetricAccessPersistentLoss = (3, 0x01, "Asymmetric Access Persistent Loss"),
    AsymmetricAccessInaccessible = (3, 0x02, "Asymmetric Access Inaccessible"),
    AsymmetricAccessTransition = (3, 0x03, "Asymmetric Access Transition"),
    ControllerPathingError = (3, 0x60, "Controller Pathing Error"),
    HostPathingError = (3, 0x70, "Host Pathing Error"),
    CommandAbortedByHost = (3, 0x71, "Command Aborted By Host"),
}

/// Command-specific status codes of the NVM command set (SCT 1, SC 0x80..).
pub mod nvm_cs {
    pub const CONFLICTING_ATTRIBUTES: u8 = 0x80;
    pub const INVALID_PROTECTION_INFO: u8 = 0x81;
    pub const WRITE_TO_READ_ONLY_RANGE: u8 = 0x82;
}

/// Command-specific status codes of the fabrics Connect command (SCT 1).
pub mod connect_cs {
    pub const INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONTROLLER_BUSY: u8 = 0x81;
    pub const INVALID_PARAMETERS: u8 = 0x82;
    pub const RESTART_DISCOVERY: u8 = 0x83;
    pub const INVALID_HOST: u8 = 0x84;
}

// ---------------------------------------------------------------------------------------
// Controller registers (PCIe BAR0 / fabrics properties)
// ---------------------------------------------------------------------------------------

/// Register offsets in BAR0 (and fabrics property offsets).
pub mod reg {
    pub const CAP: usize = 0x00;
    pub const VS: usize = 0x08;
    pub const INTMS: usize = 0x0c;
    pub const INTMC: usize = 0x10;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1c;
    pub const NSSR: usize = 0x20;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    pub const CMBLOC: usize = 0x38;
    pub const CMBSZ: usize = 0x3c;
    pub const BPINFO: usize = 0x40;
    pub const CMBMSC: usize = 0x50;
    pub const CMBSTS: usize = 0x58;
    /// First doorbell (admin SQ tail).
    pub const DOORBELL_BASE: usize = 0x1000;
}

/// Offset of the SQ `qid` tail doorbell for CAP.DSTRD `dstrd`.
pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize) * (4 << dstrd)
}
/// Offset of the CQ `qid` head doorbell for CAP.DSTRD `dstrd`.
pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize + 1) * (4 << dstrd)
}

/// (offset in BAR0, length) of the whole pages holding the doorbells of queues 0 to
/// `queues` for CAP.DSTRD `dstrd` (what a dma-buf of the doorbells covers).
pub const fn doorbell_pages(queues: u16, dstrd: u8) -> (u64, u64) {
    let end = cq_head_doorbell(queues, dstrd) + 4;
    let len = (end - reg::DOORBELL_BASE).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    (reg::DOORBELL_BASE as u64, len as u64)
}

macro_rules! bits {
    ($(#[$m:meta])* $name:ident : $t:ty, $shift:expr, $width:expr) => {
        $(#[$m])*
        pub const fn $name(self) -> $t {
            ((self.0 >> $shift) & ((1 << $width) - 1)) as $t
        }
    };
}

/// Controller Capabilities (CAP, 64 bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cap(pub u64);
impl Cap {
    bits!(/// Maximum queue entries supported, 0-based.
        mqes: u16, 0, 16);
    bits!(/// Contiguous queues required.
        cqr: bool_u8, 16, 1);
    bits!(/// Arbitration mechanisms supported.
        ams: u8, 17, 2);
    bits!(/// Timeout in 500 ms units (worst case for CSTS.RDY to change).
        to: u8, 24, 8);
    bits!(/// Doorbell stride: 2^(2+DSTRD) bytes.
        dstrd: u8, 32, 4);
    bits!(/// NVM subsystem reset supported.
        nssrs: u8, 36, 1);
    bits!(/// Command sets supported (bit 0 = NVM, bit 7 = admin only).
        css: u8, 37, 8);
    bits!(/// Boot partition support.
        bps: u8, 45, 1);
    bits!(/// Memory page size minimum: 2^(12+MPSMIN).
        mpsmin: u8, 48, 4);
    bits!(/// Memory page size maximum: 2^(12+MPSMAX).
        mpsmax: u8, 52, 4);
    bits!(/// Controller memory buffer supported (CMBLOC/CMBSZ/CMBMSC).
        cmbs: u8, 57, 1);
    /// CAP.TO as a duration.
    pub fn timeout(self) -> core::time::Duration {
        core::time::Duration::from_millis(500 * self.to().max(1) as u64)
    }
    /// Doorbell stride in bytes.
    pub const fn doorbell_stride(self) -> usize {
        4 << self.dstrd()
    }
}
#[allow(non_camel_case_types)]
type bool_u8 = u8;

/// Version (VS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Vs(pub u32);
impl Vs {
    pub const V1_4: Vs = Vs(0x0001_0400);
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Vs {
        Vs(((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32)
    }
    bits!(major: u16, 16, 16);
    bits!(minor: u8, 8, 8);
    bits!(tertiary: u8, 0, 8);
}
impl fmt::Display for Vs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// Controller Configuration (CC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cc(pub u32);
impl Cc {
    bits!(/// Enable.
        en: u8, 0, 1);
    bits!(/// I/O command set selected.
        css: u8, 4, 3);
    bits!(/// Memory page size: 2^(12+MPS).
        mps: u8, 7, 4);
    bits!(/// Arbitration mechanism selected.
        ams: u8, 11, 3);
    bits!(/// Shutdown notification (1 normal, 2 abrupt).
        shn: u8, 14, 2);
    bits!(/// I/O SQ entry size, log2.
        iosqes: u8, 16, 4);
    bits!(/// I/O CQ entry size, log2.
        iocqes: u8, 20, 4);
    /// The value the driver writes to enable: NVM command set, 4 KiB pages, round robin,
    /// 64-byte SQEs and 16-byte CQEs.
    pub const fn enabled_default() -> Cc {
        Cc(1 | (6 << 16) | (4 << 20))
    }
}

/// Controller Status (CSTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Csts(pub u32);
impl Csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    bits!(/// Ready.
        rdy: u8, 0, 1);
    bits!(/// Controller fatal status.
        cfs: u8, 1, 1);
    bits!(/// Shutdown status (2 = complete).
        shst: u8, 2, 2);
    bits!(/// NVM subsystem reset occurred.
        nssro: u8, 4, 1);
    bits!(/// Processing paused.
        pp: u8, 5, 1);
    /// All-ones reads mean the device is gone (surprise removal, decode off).
    pub const fn is_all_ones(self) -> bool {
        self.0 == u32::MAX
    }
}

/// Admin Queue Attributes (AQA): 0-based sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Aqa(pub u32);
impl Aqa {
    pub const fn new(asqs0: u16, acqs0: u16) -> Aqa {
        Aqa((asqs0 as u32 & 0xfff) | ((acqs0 as u32 & 0xfff) << 16))
    }
    bits!(asqs: u16, 0, 12);
    bits!(acqs: u16, 16, 12);
}

/// Controller Memory Buffer Location (CMBLOC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CmbLoc(pub u32);
impl CmbLoc {
    bits!(/// Base indicator register (BAR index).
        bir: u8, 0, 3);
    bits!(/// CMB queue mixed memory support.
        cqmms: u8, 3, 1);
    bits!(/// CMB queue physically discontiguous support.
        cqpds: u8, 4, 1);
    bits!(/// CMB data pointer mixed locations support.
        cdpmls: u8, 5, 1);
    bits!(/// CMB data pointer and command independent locations support.
        cdpcils: u8, 6, 1);
    bits!(/// CMB data metadata mixed memory support.
        cdmmms: u8, 7, 1);
    bits!(/// CMB queue dword alignment.
        cqda: u8, 8, 1);
    bits!(/// Offset in CMBSZ.SZU units from the start of the BAR.
        ofst: u32, 12, 20);
}

/// Controller Memory Buffer Size (CMBSZ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CmbSz(pub u32);
impl CmbSz {
    bits!(/// Submission queue support.
        sqs: u8, 0, 1);
    bits!(/// Completion queue support.
        cqs: u8, 1, 1);
    bits!(/// PRP/SGL list support.
        lists: u8, 2, 1);
    bits!(/// Read data support.
        rds: u8, 3, 1);
    bits!(/// Write data support.
        wds: u8, 4, 1);
    bits!(/// Size units: 4 KiB * 16^SZU.
        szu: u8, 8, 4);
    bits!(/// Size in SZU units.
        sz: u32, 12, 20);
    /// Bytes per size unit.
    pub const fn unit_bytes(self) -> u64 {
        4096u64 << (4 * self.szu() as u32)
    }
    /// CMB size in bytes.
    pub const fn size_bytes(self) -> u64 {
        self.sz() as u64 * self.unit_bytes()
    }
}

/// Controller Memory Buffer Memory Space Control (CMBMSC, 64 bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CmbMsc(pub u64);
impl CmbMsc {
    /// Capabilities registers enabled (CMBLOC/CMBSZ read non-zero).
    pub const CRE: u64 = 1;
    /// Controller memory space enabled (CMB usable at CBA).
    pub const CMSE: u64 = 2;
    /// Value enabling the CMB at controller base address `cba` (4 KiB aligned bus address).
    pub const fn enable_at(cba: u64) -> CmbMsc {
        CmbMsc((cba & !0xfff) | Self::CRE | Self::CMSE)
    }
    pub const fn cre(self) -> bool {
        self.0 & Self::CRE != 0
    }
    pub const fn cmse(self) -> bool {
        self.0 & Self::CMSE != 0
    }
    /// Controller base address.
    pub const fn cba(self) -> u64 {
        self.0 & !0xfff
    }
}

/// Controller Memory Buffer Status (CMBSTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CmbSts(pub u32);
impl CmbSts {
    bits!(/// Controller base address invalid.
        cbai: u8, 0, 1);
}

// ---------------------------------------------------------------------------------------
// Identify
// ---------------------------------------------------------------------------------------

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
}

/// Optional Admin Command Support bits (Identify Controller OACS).
pub mod oacs {
    pub const SECURITY: u16 = 1 << 0;
    pub const FORMAT: u16 = 1 << 1;
    pub const FIRMWARE: u16 = 1 << 2;
    pub const NS_MANAGEMENT: u16 = 1 << 3;
    pub const SELF_TEST: u16 = 1 << 4;
    pub const DIRECTIVES: u16 = 1 << 5;
    pub const NVME_MI: u16 = 1 << 6;
    pub const VIRTUALIZATION: u16 = 1 << 7;
    pub const DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
}

/// Optional NVM Command Support bits (Identify Controller ONCS).
pub mod oncs {
    pub const COMPARE: u16 = 1 << 0;
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    pub const DSM: u16 = 1 << 2;
    pub const WRITE_ZEROES: u16 = 1 << 3;
    pub const SAVE_SELECT: u16 = 1 << 4;
    pub const RESERVATIONS: u16 = 1 << 5;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const VERIFY: u16 = 1 << 7;
    pub const COPY: u16 = 1 << 8;
}

/// Power state descriptor (32 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PowerStateDescriptor {
    pub mp: U16,
    pub rsvd2: u8,
    pub flags: u8,
    pub enlat: U32,
    pub exlat: U32,
    pub rrt: u8,
    pub rrl: u8,
    pub rwt: u8,
    pub rwl: u8,
    pub idlp: U16,
    pub ips: u8,
    pub rsvd19: u8,
    pub actp: U16,
    pub apw_aps: u8,
    pub rsvd23: [u8; 9],
}
const _: () = assert!(size_of::<PowerStateDescriptor>() == 32);

/// Identify Controller data structure (CNS 01h), 4096 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IdentifyController {
    pub vid: U16,
    pub ssvid: U16,
    /// Serial number, ASCII, space padded.
    pub sn: [u8; 20],
    /// Model number, ASCII, space padded.
    pub mn: [u8; 40],
    /// Firmware revision, ASCII, space padded.
    pub fr: [u8; 8],
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    /// Maximum data transfer size: 2^MDTS minimum pages; 0 = no limit.
    pub mdts: u8,
    pub cntlid: U16,
    pub ver: U32,
    pub rtd3r: U32,
    pub rtd3e: U32,
    pub oaes: U32,
    pub ctratt: U32,
    pub rrls: U16,
    pub rsvd102: [u8; 9],
    /// Controller type: 1 I/O, 2 discovery, 3 administrative.
    pub cntrltype: u8,
    pub fguid: [u8; 16],
    pub crdt1: U16,
    pub crdt2: U16,
    pub crdt3: U16,
    pub rsvd134: [u8; 106],
    pub nvme_mi: [u8; 16],
    /// Optional admin command support ([`oacs`]).
    pub oacs: U16,
    /// Abort command limit, 0-based.
    pub acl: u8,
    /// Asynchronous event request limit, 0-based.
    pub aerl: u8,
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries, 0-based.
    pub elpe: u8,
    pub npss: u8,
    pub avscc: u8,
    pub apsta: u8,
    pub wctemp: U16,
    pub cctemp: U16,
    pub mtfa: U16,
    pub hmpre: U32,
    pub hmmin: U32,
    pub tnvmcap: U128,
    pub unvmcap: U128,
    pub rpmbs: U32,
    pub edstt: U16,
    pub dsto: u8,
    pub fwug: u8,
    /// Keep alive support, 100 ms units.
    pub kas: U16,
    pub hctma: U16,
    pub mntmt: U16,
    pub mxtmt: U16,
    pub sanicap: U32,
    pub hmminds: U32,
    pub hmmaxd: U16,
    pub nsetidmax: U16,
    pub endgidmax: U16,
    pub anatt: u8,
    pub anacap: u8,
    pub anagrpmax: U32,
    pub nanagrpid: U32,
    pub pels: U32,
    pub domainid: U16,
    pub rsvd358: [u8; 10],
    pub megcap: U128,
    pub rsvd384: [u8; 128],
    /// Submission queue entry size: required (3:0) and maximum (7:4), log2.
    pub sqes: u8,
    /// Completion queue entry size: required (3:0) and maximum (7:4), log2.
    pub cqes: u8,
    pub maxcmd: U16,
    /// Number of namespaces (maximum NSID).
    pub nn: U32,
    /// Optional NVM command support ([`oncs`]).
    pub oncs: U16,
    pub fuses: U16,
    pub fna: u8,
    /// Volatile write cache present (bit 0).
    pub vwc: u8,
    pub awun: U16,
    pub awupf: U16,
    pub icsvscc: u8,
    pub nwpc: u8,
    pub acwu: U16,
    pub cdfs: U16,
    /// SGL support.
    pub sgls: U32,
    pub mnan: U32,
    pub maxdna: U128,
    pub maxcna: U32,
    pub rsvd564: [u8; 204],
    /// NVM subsystem NQN, NUL terminated.
    pub subnqn: [u8; 256],
    pub rsvd1024: [u8; 768],
    /// Fabrics: I/O queue command capsule supported size, 16-byte units.
    pub ioccsz: U32,
    /// Fabrics: I/O queue response capsule supported size, 16-byte units.
    pub iorcsz: U32,
    /// Fabrics: in-capsule data offset, 16-byte units.
    pub icdoff: U16,
    /// Fabrics: controller attributes (bit 0: static controller model).
    pub fcatt: u8,
    /// Fabrics: maximum SGL data block descriptors.
    pub msdbd: u8,
    pub ofcs: U16,
    pub rsvd1806: [u8; 242],
    pub psd: [PowerStateDescriptor; 32],
    pub vs: [u8; 1024],
}
const _: () = assert!(size_of::<IdentifyController>() == 4096);
const _: () = assert!(offset_of!(IdentifyController, mdts) == 77);
const _: () = assert!(offset_of!(IdentifyController, cntrltype) == 111);
const _: () = assert!(offset_of!(IdentifyController, oacs) == 256);
const _: () = assert!(offset_of!(IdentifyController, kas) == 320);
const _: () = assert!(offset_of!(IdentifyController, sqes) == 512);
const _: () = assert!(offset_of!(IdentifyController, nn) == 516);
const _: () = assert!(offset_of!(IdentifyController, sgls) == 536);
const _: () = assert!(offset_of!(IdentifyController, subnqn) == 768);
const _: () = assert!(offset_of!(IdentifyController, ioccsz) == 1792);
const _: () = assert!(offset_of!(IdentifyController, psd) == 2048);

/// Trim an ASCII, space/NUL padded identify string.
pub fn ascii_field(bytes: &[u8]) -> String {
    let s: String = bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                ' '
            }
        })
        .collect();
    s.trim_end_matches([' ', '\0']).trim().to_string()
}

/// Copy `s` into a space-padded ASCII identify field.
pub fn set_ascii_field(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, b) in dst.iter_mut().zip(s.bytes()) {
        *d = b;
    }
}

impl IdentifyController {
    /// All zero.
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
    pub fn serial(&self) -> String {
        ascii_field(&self.sn)
    }
    pub fn model(&self) -> String {
        ascii_field(&self.mn)
    }
    pub fn firmware(&self) -> String {
        ascii_field(&self.fr)
    }
    /// Subsystem NQN up to the first NUL.
    pub fn subsystem_nqn(&self) -> String {
        let end = self
            .subnqn
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.subnqn.len());
        String::from_utf8_lossy(&self.subnqn[..end]).into_owned()
    }
    /// Maximum data transfer size in bytes for minimum page size `mps_min_bytes`, or None
    /// when MDTS = 0 (no limit).
    pub fn max_transfer_bytes(&self, mps_min_bytes: usize) -> Option<usize> {
        (self.mdts != 0).then(|| mps_min_bytes << self.mdts)
    }
    /// Whether Doorbell Buffer Config (shadow doorbells) is supported.
    pub fn supports_shadow_doorbells(&self) -> bool {
        self.oacs.get() & oacs::DOORBELL_BUFFER_CONFIG != 0
    }
}

/// LBA format descriptor (4 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LbaFormat {
    /// Metadata size in bytes.
    pub ms: U16,
    /// LBA data size, log2.
    pub lbads: u8,
    /// Relative performance (bits 1:0).
    pub rp: u8,
}
const _: () = assert!(size_of::<LbaFormat>() == 4);
impl LbaFormat {
    pub const fn new(lbads: u8, ms: u16) -> LbaFormat {
        LbaFormat {
            ms: U16::from_bytes(ms.to_le_bytes()),
            lbads,
            rp: 0,
        }
    }
    /// Block size in bytes (0 if the format is unused).
    pub fn block_size(&self) -> u32 {
        if self.lbads == 0 || self.lbads >= 32 {
            0
        } else {
            1 << self.lbads
        }
    }
}

/// Identify Namespace data structure (CNS 00h), 4096 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: U64,
    /// Namespace capacity in logical blocks.
    pub ncap: U64,
    /// Namespace utilisation in logical blocks.
    pub nuse: U64,
    pub nsfeat: u8,
    /// Number of LBA formats, 0-based.
    pub nlbaf: u8,
    /// Formatted LBA size: format index in bits 3:0 (and 6:5 for index 16..63).
    pub flbas: u8,
    pub mc: u8,
    pub dpc: u8,
    pub dps: u8,
    pub nmic: u8,
    pub rescap: u8,
    pub fpi: u8,
    pub dlfeat: u8,
    pub nawun: U16,
    pub nawupf: U16,
    pub nacwu: U16,
    pub nabsn: U16,
    pub nabo: U16,
    pub nabspf: U16,
    pub noiob: U16,
    pub nvmcap: U128,
    pub npwg: U16,
    pub npwa: U16,
    pub npdg: U16,
    pub npda: U16,
    pub nows: U16,
    pub rsvd74: [u8; 18],
    pub anagrpid: U32,
    pub rsvd96: [u8; 3],
    pub nsattr: u8,
    pub nvmsetid: U16,
    pub endgid: U16,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub lbaf: [LbaFormat; 64],
    pub rsvd384: [u8; 3456],
    pub vs: [u8; 256],
}
const _: () = assert!(size_of::<IdentifyNamespace>() == 4096);
const _: () = assert!(offset_of!(IdentifyNamespace, nvmcap) == 48);
const _: () = assert!(offset_of!(IdentifyNamespace, anagrpid) == 92);
const _: () = assert!(offset_of!(IdentifyNamespace, nguid) == 104);
const _: () = assert!(offset_of!(IdentifyNamespace, lbaf) == 128);

impl IdentifyNamespace {
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
    /// Index of the formatted LBA format.
    pub fn lba_format_index(&self) -> usize {
        ((self.flbas & 0xf) | ((self.flbas >> 5) & 3) << 4) as usize
    }
    /// The formatted LBA format.
    pub fn lba_format(&self) -> LbaFormat {
        self.lbaf[self.lba_format_index().min(63)]
    }
    /// Formatted block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.lba_format().block_size()
    }
    /// The LBA formats the namespace offers (nlbaf + 1 of them).
    pub fn lba_formats(&self) -> &[LbaFormat] {
        &self.lbaf[..(self.nlbaf as usize + 1).min(64)]
    }
}

/// Active namespace ID list (CNS 02h): up to 1024 NSIDs, zero terminated.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct NamespaceList {
    pub ids: [U32; 1024],
}
const _: () = assert!(size_of::<NamespaceList>() == 4096);
impl NamespaceList {
    /// The non-zero NSIDs in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.iter().map(|x| x.get()).take_while(|&x| x != 0)
    }
}

/// Namespace identification descriptor types (CNS 03h).
pub mod nidt {
    pub const EUI64: u8 = 1;
    pub const NGUID: u8 = 2;
    pub const UUID: u8 = 3;
    pub const CSI: u8 = 4;
}

/// Header of one namespace identification descriptor; `nidl` bytes of ID follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct NsIdDescriptorHeader {
    pub nidt: u8,
    pub nidl: u8,
    pub rsvd: U16,
}
const _: () = assert!(size_of::<NsIdDescriptorHeader>() == 4);

/// One namespace identification descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsIdDescriptor {
    pub nidt: u8,
    pub nid: Vec<u8>,
}

/// Parse a CNS 03h buffer into descriptors (stops at a zero type or at the end).
pub fn parse_ns_id_descriptors(buf: &[u8]) -> Vec<NsIdDescriptor> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let Ok(h) = NsIdDescriptorHeader::read_from_bytes(&buf[off..off + 4]) else {
            break;
        };
        if h.nidt == 0 || h.nidl == 0 {
            break;
        }
        let end = off + 4 + h.nidl as usize;
        if end > buf.len() {
            break;
        }
        out.push(NsIdDescriptor {
            nidt: h.nidt,
            nid: buf[off + 4..end].to_vec(),
        });
        off = end;
    }
    out
}

/// Serialise descriptors into a 4096-byte CNS 03h buffer (extra descriptors are dropped).
pub fn build_ns_id_descriptors(descs: &[NsIdDescriptor]) -> [u8; 4096] {
    let mut buf = [0u8; 4096];
    let mut off = 0;
    for d in descs {
        let end = off + 4 + d.nid.len();
        if d.nid.len() > 255 || end > buf.len() {
            break;
        }
        buf[off] = d.nidt;
        buf[off + 1] = d.nid.len() as u8;
        buf[off + 4..end].copy_from_slice(&d.nid);
        off = end;
    }
    buf
}

// ---------------------------------------------------------------------------------------
// Dataset management, log pages, features
// ---------------------------------------------------------------------------------------

/// Dataset Management attribute bits (CDW11).
pub mod dsm {
    pub const INTEGRAL_READ: u32 = 1 << 0;
    pub const INTEGRAL_WRITE: u32 = 1 << 1;
    pub const DEALLOCATE: u32 = 1 << 2;
}

/// One Dataset Management range (16 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DsmRange {
    pub cattr: U32,
    /// Length in logical blocks (1-based).
    pub nlb: U32,
    pub slba: U64,
}
const _: () = assert!(size_of::<DsmRange>() == 16);
impl DsmRange {
    pub fn new(slba: u64, nlb: u32) -> Self {
        DsmRange {
            cattr: U32::new(0),
            nlb: U32::new(nlb),
            slba: U64::new(slba),
        }
    }
}

/// Log page identifiers.
pub mod log {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const COMMANDS_SUPPORTED: u8 = 0x05;
    pub const DISCOVERY: u8 = 0x70;
}

/// Error information log entry (log page 01h), 64 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ErrorLogEntry {
    pub error_count: U64,
    pub sqid: U16,
    pub cid: U16,
    /// Status field (as in the CQE, bit 0 = phase tag of the completion).
    pub status: U16,
    pub parameter_error_location: U16,
    pub lba: U64,
    pub nsid: U32,
    pub vs: u8,
    pub trtype: u8,
    pub rsvd30: [u8; 2],
    pub cs: U64,
    pub trtype_specific: U16,
    pub rsvd42: [u8; 22],
}
const _: () = assert!(size_of::<ErrorLogEntry>() == 64);

/// SMART / Health Information log (log page 02h), 512 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature, kelvin.
    pub temperature: U16,
    pub avail_spare: u8,
    pub spare_thresh: u8,
    pub percent_used: u8,
    pub endurance_group_critical: u8,
    pub rsvd7: [u8; 25],
    /// Thousands of 512-byte units read.
    pub data_units_read: U128,
    pub data_units_written: U128,
    pub host_read_commands: U128,
    pub host_write_commands: U128,
    pub controller_busy_time: U128,
    pub power_cycles: U128,
    pub power_on_hours: U128,
    pub unsafe_shutdowns: U128,
    pub media_errors: U128,
    pub num_error_log_entries: U128,
    pub warning_temp_time: U32,
    pub critical_temp_time: U32,
    pub temp_sensor: [U16; 8],
    pub thermal_mgmt_t1_count: U32,
    pub thermal_mgmt_t2_count: U32,
    pub thermal_mgmt_t1_time: U32,
    pub thermal_mgmt_t2_time: U32,
    pub rsvd232: [u8; 280],
}
const _: () = assert!(size_of::<SmartLog>() == 512);
const _: () = assert!(offset_of!(SmartLog, data_units_read) == 32);
const _: () = assert!(offset_of!(SmartLog, warning_temp_time) == 192);
impl SmartLog {
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
}

/// Firmware Slot Information log (log page 03h), 512 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FirmwareSlotLog {
    /// Active firmware info: slot running now (bits 2:0), slot at next reset (6:4).
    pub afi: u8,
    pub rsvd1: [u8; 7],
    /// Firmware revision in slots 1..=7, ASCII, space padded (all zeroes: slot empty).
    pub frs: [[u8; 8]; 7],
    pub rsvd64: [u8; 448],
}
const _: () = assert!(size_of::<FirmwareSlotLog>() == 512);

/// Commands Supported and Effects log (log page 05h), 4096 bytes: one entry per
/// opcode ([`cse`] bits).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CommandsEffectsLog {
    /// Admin command effects, indexed by opcode.
    pub acs: [U32; 256],
    /// I/O command effects, indexed by opcode.
    pub iocs: [U32; 256],
    pub rsvd2048: [u8; 2048],
}
const _: () = assert!(size_of::<CommandsEffectsLog>() == 4096);

/// Commands Supported and Effects entry bits.
pub mod cse {
    /// Command supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical block content change.
    pub const LBCC: u32 = 1 << 1;
    /// Namespace capability change.
    pub const NCC: u32 = 1 << 2;
    /// Namespace inventory change.
    pub const NIC: u32 = 1 << 3;
    /// Controller capability change.
    pub const CCC: u32 = 1 << 4;
}

/// Get Features Select field (CDW10 bits 10:8).
pub mod feat_sel {
    pub const CURRENT: u8 = 0;
    pub const DEFAULT: u8 = 1;
    pub const SAVED: u8 = 2;
    pub const SUPPORTED_CAPABILITIES: u8 = 3;
    /// Supported-capabilities result bits: saveable, namespace specific, changeable.
    pub const CAP_SAVEABLE: u32 = 1 << 0;
    pub const CAP_NS_SPECIFIC: u32 = 1 << 1;
    pub const CAP_CHANGEABLE: u32 = 1 << 2;
}

/// Feature identifiers.
pub mod feat {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const LBA_RANGE_TYPE: u8 = 0x03;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUM_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const AUTONOMOUS_POWER_STATE: u8 = 0x0c;
    pub const HOST_MEMORY_BUFFER: u8 = 0x0d;
    pub const TIMESTAMP: u8 = 0x0e;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    pub const HOST_IDENTIFIER: u8 = 0x81;
    pub const RESERVATION_NOTIFICATION_MASK: u8 = 0x82;
    pub const RESERVATION_PERSISTENCE: u8 = 0x83;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_read_fields() {
        let mut s = Sqe::read(1, 0x1_0000_0002, 7, 0x1000, 0x2000);
        s.set_cid(0xbeef);
        assert_eq!(s.opcode(), io_opc::READ);
        assert_eq!(s.cid(), 0xbeef);
        assert_eq!(s.slba(), 0x1_0000_0002);
        assert_eq!(s.nlb0(), 7);
        let b = s.as_bytes();
        assert_eq!(&b[0..4], &[0x02, 0, 0xef, 0xbe]);
        assert_eq!(&b[24..32], &0x1000u64.to_le_bytes());
        assert_eq!(&b[40..44], &2u32.to_le_bytes());
        assert_eq!(&b[44..48], &1u32.to_le_bytes());
        let back = Sqe::read_from_bytes(b).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn status_roundtrip_and_names() {
        let cqe = Cqe::new(5, 1, 9, Status::LBA_OUT_OF_RANGE.with_dnr(), true);
        assert!(cqe.phase());
        let st = cqe.status();
        assert!(st.dnr());
        assert_eq!(st.code(), StatusCode::LbaOutOfRange);
        assert_eq!(st.code().name(), "LBA Out of Range");
        assert_eq!(
            Status::from(StatusCode::InvalidQueueSize),
            Status::INVALID_QUEUE_SIZE
        );
        assert_eq!(
            StatusCode::from_parts(1, 0x82),
            StatusCode::CommandSpecific(0x82)
        );
        assert_eq!(
            StatusCode::from_parts(2, 0x81).name(),
            "Unrecovered Read Error"
        );
        assert!(format!("{}", Status::ABORT_REQUESTED).contains("Command Abort Requested"));
        // CQE status field: SC at bits 8:1, SCT at 11:9, DNR at 15.
        assert_eq!(cqe.status.get(), (0x80 << 1) | (1 << 15) | 1);
    }

    #[test]
    fn registers_decode() {
        // QEMU-like CAP: MQES 2047, CQR, TO 15, DSTRD 0, CSS NVM, CMBS.
        let cap = Cap(2047 | (1 << 16) | (15 << 24) | (1 << 37) | (1 << 57));
        assert_eq!(cap.mqes(), 2047);
        assert_eq!(cap.to(), 15);
        assert_eq!(cap.dstrd(), 0);
        assert_eq!(cap.cmbs(), 1);
        assert_eq!(cap.timeout().as_millis(), 7500);
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(3, 1), 0x1000 + 6 * 8);
        // QEMU's CMBSZ for 16 MiB.
        let sz = CmbSz(0x1021d);
        assert_eq!(sz.sqs(), 1);
        assert_eq!(sz.cqs(), 0);
        assert_eq!(sz.lists(), 1);
        assert_eq!(sz.rds(), 1);
        assert_eq!(sz.wds(), 1);
        assert_eq!(sz.szu(), 2);
        assert_eq!(sz.sz(), 16);
        assert_eq!(sz.size_bytes(), 16 << 20);
        let cc = Cc::enabled_default();
        assert_eq!((cc.en(), cc.iosqes(), cc.iocqes(), cc.mps()), (1, 6, 4, 0));
        assert_eq!(Vs::V1_4.to_string(), "1.4.0");
        assert_eq!(Aqa::new(31, 31).0, 31 | (31 << 16));
    }

    #[test]
    fn identify_helpers() {
        let mut id = IdentifyController::zeroed();
        set_ascii_field(&mut id.mn, "QEMU NVMe Ctrl");
        id.mdts = 7;
        id.oacs = U16::new(oacs::DOORBELL_BUFFER_CONFIG);
        assert_eq!(id.model(), "QEMU NVMe Ctrl");
        assert_eq!(id.max_transfer_bytes(4096), Some(512 * 1024));
        assert!(id.supports_shadow_doorbells());
        let mut ns = IdentifyNamespace::zeroed();
        ns.nlbaf = 1;
        ns.lbaf[0] = LbaFormat::new(9, 0);
        ns.lbaf[1] = LbaFormat::new(12, 0);
        ns.flbas = 1;
        assert_eq!(ns.block_size(), 4096);
        assert_eq!(ns.lba_formats().len(), 2);
        let descs = vec![
            NsIdDescriptor {
                nidt: nidt::NGUID,
                nid: vec![7; 16],
            },
            NsIdDescriptor {
                nidt: nidt::CSI,
                nid: vec![0],
            },
        ];
        assert_eq!(
            parse_ns_id_descriptors(&build_ns_id_descriptors(&descs)),
            descs
        );
    }
}
