//! The crate's one error type.

use std::io;
use std::time::Duration;

use crate::spec::Status;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the driver, the VFIO layer and the simulator. Each
/// variant's message is one sentence a user can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("PCI device {bdf} does not exist (no /sys/bus/pci/devices/{bdf}); check the address with `lspci -D`")]
    NoSuchDevice { bdf: String },
    #[error("{bdf} is not a valid PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:03.0)")]
    BadAddress { bdf: String },
    #[error(
        "PCI device {bdf} is bound to driver `{driver}`, not vfio-pci; run `nvmf-p2p bind {bdf}`"
    )]
    BoundToOtherDriver { bdf: String, driver: String },
    #[error("PCI device {bdf} is not bound to any driver; run `nvmf-p2p bind {bdf}`")]
    NotBound { bdf: String },
    #[error("PCI device {bdf} has no IOMMU group; enable the IOMMU (intel_iommu=on / amd_iommu=on) in the kernel command line")]
    NoIommuGroup { bdf: String },
    #[error("IOMMU group {group} of {bdf} is not viable: every device in /sys/kernel/iommu_groups/{group}/devices must be bound to vfio-pci or unbound")]
    GroupNotViable { bdf: String, group: u32 },
    #[error("no permission to open {path} for {bdf}; run as root or give your user access to it")]
    Permission { bdf: String, path: String },
    /// The VFIO group is open in another process (a group has one user at a time).
    #[error("{bdf} is in use: {path} is held by {holder}{hint}")]
    DeviceBusy {
        bdf: String,
        path: String,
        /// Who holds it: `pid N (command line)`, or "another process".
        holder: String,
        /// What to do about it, when the holder is a known one (`nvmf-p2p serve`).
        hint: &'static str,
    },
    #[error("{op} failed for {bdf}: {source}")]
    Vfio {
        bdf: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("controller {name} did not become ready within {waited:?} (CSTS {csts:#x}, CAP.TO allows {timeout:?})")]
    NotReady {
        name: String,
        csts: u32,
        waited: Duration,
        timeout: Duration,
    },
    #[error("controller {name} reports a fatal status (CSTS.CFS); it needs a reset")]
    ControllerFatal { name: String },
    #[error("controller {name} is not responding (registers read all ones); the device is gone or memory decode is off")]
    DeviceGone { name: String },
    #[error("command {opcode:#04x} (cid {cid}) on queue {qid} timed out after {after:?}")]
    Timeout {
        qid: u16,
        cid: u16,
        opcode: u8,
        after: Duration,
    },
    #[error("command {opcode:#04x} (cid {cid}) on queue {qid} failed: {status}")]
    Command {
        qid: u16,
        cid: u16,
        opcode: u8,
        status: Status,
    },
    #[error("transfer of {len} bytes exceeds the maximum of {max} bytes (MDTS)")]
    TooLarge { len: usize, max: usize },
    #[error("queue {qid} is full ({depth} entries); poll for completions first")]
    QueueFull { qid: u16, depth: u16 },
    #[error("no I/O queue left on the controller ({granted} granted, all in use)")]
    NoQueuesLeft { granted: u16 },
    #[error("not supported: {what}")]
    Unsupported { what: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("out of DMA memory: could not allocate {len} bytes ({why})")]
    OutOfDmaMemory { len: usize, why: String },
    #[error("queue {qid} was lost in a controller reset; create it again")]
    QueueLost { qid: u16 },
}

impl Error {
    /// Whether the error is the typed NVMe status `status` (ignoring DNR/More).
    pub fn is_status(&self, status: Status) -> bool {
        matches!(self, Error::Command { status: s, .. } if s.same_code(status))
    }
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
