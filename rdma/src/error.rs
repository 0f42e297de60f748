//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::wr::{WcOpcode, WcStatus};
use crate::wr_id::WrId;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to add a soft-RoCE device, quoted by the "no device" errors.
pub const SOFT_ROCE_HINT: &str =
    "load rdma_rxe and add a soft-RoCE device: `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <if>`";

/// Every failure of the verbs and RDMA CM layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `ibv_get_device_list` found nothing.
    #[error("no RDMA device found; {SOFT_ROCE_HINT}")]
    NoDevice,
    /// A device was asked for by name and is not present.
    #[error("RDMA device {name:?} not found (present: {present}); {SOFT_ROCE_HINT}")]
    DeviceNotFound {
        /// The requested name.
        name: String,
        /// Names of the devices that do exist, comma-separated.
        present: String,
    },
    /// The provider does not implement the operation (EOPNOTSUPP / ENOSYS / EPROTONOSUPPORT).
    #[error("{op} is not supported by this RDMA device (errno {errno}: {})", io::Error::from_raw_os_error(*errno))]
    Unsupported {
        /// The verb that failed.
        op: &'static str,
        /// The errno the provider returned.
        errno: i32,
    },
    /// A verb failed with an errno.
    #[error("{op} failed: {source}")]
    Os {
        /// The verb that failed.
        op: &'static str,
        /// The mapped errno.
        #[source]
        source: io::Error,
    },
    /// `ibv_post_send` / `ibv_post_recv` / `ibv_post_srq_recv` refused a work request.
    #[error("posting {opcode} (WR {index} of the chain) on QP {qp_num} failed: {source}")]
    Post {
        /// QP number (0 for an SRQ).
        qp_num: u32,
        /// Opcode of the refused WR.
        opcode: &'static str,
        /// Index of the refused WR in the posted chain; earlier WRs were posted.
        index: usize,
        /// The mapped errno.
        #[source]
        source: io::Error,
    },
    /// A work completion carried an error status.
    #[error("work completion on QP {qp_num} failed: {status} (opcode {opcode}, wr_id {wr_id:?}, vendor_err {vendor_err:#x})")]
    WorkCompletion {
        /// QP number of the completion.
        qp_num: u32,
        /// Status, printed by name.
        status: WcStatus,
        /// Opcode, printed by name (only meaningful for some error statuses).
        opcode: WcOpcode,
        /// The WR's id.
        wr_id: WrId,
        /// Provider-specific detail.
        vendor_err: u32,
    },
    /// A byte range outside a memory region or registered buffer.
    #[error("range {offset}+{len} outside {what} of {size} bytes")]
    OutOfRange {
        /// "MR" or "buffer".
        what: &'static str,
        /// First byte of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A volatile 8-byte access at an offset that is not 8-aligned.
    #[error("offset {offset} is not {align}-aligned")]
    Misaligned {
        /// The offset.
        offset: usize,
        /// The alignment it needs.
        align: usize,
    },
    /// A buffer of zero bytes was asked for.
    #[error("zero-length buffer")]
    EmptyBuffer,
    /// A work-request batch has no room for another WR.
    #[error("{what} batch full ({capacity} WRs)")]
    BatchFull {
        /// "send" or "recv".
        what: &'static str,
        /// The batch's capacity.
        capacity: usize,
    },
    /// An inline payload longer than a WR can describe.
    #[error("inline payload of {len} bytes is too long")]
    InlineTooLong {
        /// Its length.
        len: usize,
    },
    /// A PD of one device given for a CM id bound to another.
    #[error("PD belongs to another device than the CM id (use cm::context_for)")]
    ForeignPd,
    /// `rdma_create_qp` reported success but set no QP.
    #[error("rdma_create_qp left no QP")]
    NoQp,
    /// Private data longer than the CM allows for this message.
    #[error("private data of {len} bytes exceeds the RDMA CM limit of {max} bytes for {what}")]
    PrivateDataTooLong {
        /// Given length.
        len: usize,
        /// Limit for this message on IB/RoCE.
        max: usize,
        /// "connect", "accept" or "reject".
        what: &'static str,
    },
    /// `rdma_bind_addr` found no RDMA device behind the address.
    #[error("address {addr} has no RDMA device bound to it ({source}); {SOFT_ROCE_HINT} and give it that address")]
    NoDeviceForAddress {
        /// The address.
        addr: SocketAddr,
        /// errno from rdma_bind_addr.
        #[source]
        source: io::Error,
    },
    /// The RDMA CM port is taken.
    #[error("RDMA CM address {addr} is already in use")]
    AddrInUse {
        /// The address.
        addr: SocketAddr,
    },
    /// Nobody listens on the remote port (REJECTED with "invalid service id").
    #[error("no RDMA CM listener at {addr} (rejected with status {status})")]
    NoListener {
        /// The remote address.
        addr: SocketAddr,
        /// CM reject reason.
        status: i32,
    },
    /// The peer rejected the connection.
    #[error("connection to {addr} rejected (status {status}, {} bytes of private data)", private_data.len())]
    Rejected {
        /// The remote address.
        addr: SocketAddr,
        /// CM reject reason (28 = consumer defined, i.e. `rdma_reject`).
        status: i32,
        /// The peer's reject private data (padded by the CM).
        private_data: Vec<u8>,
    },
    /// Address/route resolution or connection failed (ADDR_ERROR, ROUTE_ERROR, UNREACHABLE, CONNECT_ERROR).
    #[error("{addr} unreachable: {event} (status {status})")]
    Unreachable {
        /// The remote address.
        addr: SocketAddr,
        /// The CM event's name.
        event: &'static str,
        /// The event's status.
        status: i32,
    },
    /// An RDMA CM event other than the awaited one.
    #[error("unexpected RDMA CM event {event} (status {status}) while {during}")]
    UnexpectedCmEvent {
        /// The event's name.
        event: &'static str,
        /// The event's status.
        status: i32,
        /// What was being waited for.
        during: &'static str,
    },
    /// Waiting timed out.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        timeout: Duration,
    },
}

impl Error {
    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Unsupported { errno, .. } => Some(*errno),
            Error::Os { source, .. }
            | Error::Post { source, .. }
            | Error::NoDeviceForAddress { source, .. } => source.raw_os_error(),
            Error::AddrInUse { .. } => Some(libc::EADDRINUSE),
            Error::Timeout { .. } => Some(libc::ETIMEDOUT),
            _ => None,
        }
    }
}

/// Maps an errno returned by verb `op` to an [`Error`]: "not supported" errnos become
/// [`Error::Unsupported`], everything else [`Error::Os`].
pub fn from_errno(op: &'static str, errno: i32) -> Error {
    match errno {
        libc::EOPNOTSUPP | libc::ENOSYS | libc::EPROTONOSUPPORT => Error::Unsupported { op, errno },
        _ => Error::Os {
            op,
            source: io::Error::from_raw_os_error(errno),
        },
    }
}

/// The current thread's errno as an [`Error`] for verb `op` (for verbs that return NULL or -1).
pub fn last_os_error(op: &'static str) -> Error {
    let errno = io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO);
    from_errno(op, errno)
}

/// Checks a verb's return value in the "0 or errno" convention.
pub fn check_ret(op: &'static str, ret: i32) -> Result<()> {
    match ret {
        0 => Ok(()),
        // Some verbs return -1 and set errno; others return the errno itself.
        r if r < 0 => Err(last_os_error(op)),
        r => Err(from_errno(op, r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eopnotsupp_maps_to_unsupported() {
        let e = from_errno("ibv_reg_dmabuf_mr", libc::EOPNOTSUPP);
        assert!(
            matches!(e, Error::Unsupported { op: "ibv_reg_dmabuf_mr", errno } if errno == libc::EOPNOTSUPP)
        );
        assert_eq!(e.errno(), Some(libc::EOPNOTSUPP));
        assert!(e.to_string().contains("not supported"));
    }

    #[test]
    fn other_errno_maps_to_os_with_op() {
        let e = from_errno("ibv_reg_mr", libc::EFAULT);
        assert_eq!(e.errno(), Some(libc::EFAULT));
        assert!(e.to_string().starts_with("ibv_reg_mr failed"));
        assert!(check_ret("x", 0).is_ok());
        assert_eq!(
            check_ret("x", libc::ENOMEM).unwrap_err().errno(),
            Some(libc::ENOMEM)
        );
    }

    #[test]
    fn range_errors_carry_their_numbers() {
        let e = Error::OutOfRange {
            what: "MR",
            offset: 4096,
            len: 64,
            size: 4096,
        };
        assert_eq!(e.to_string(), "range 4096+64 outside MR of 4096 bytes");
        assert_eq!(e.errno(), None);
        let e = Error::Misaligned {
            offset: 4,
            align: 8,
        };
        assert_eq!(e.to_string(), "offset 4 is not 8-aligned");
    }

    #[test]
    fn no_device_says_how_to_add_soft_roce() {
        assert!(Error::NoDevice
            .to_string()
            .contains("rdma link add rxe0 type rxe netdev"));
    }

    #[test]
    fn wc_error_names_status_opcode_and_qp() {
        let e = Error::WorkCompletion {
            qp_num: 0x11,
            status: WcStatus(rdma_sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR),
            opcode: WcOpcode(rdma_sys::ibv_wc_opcode::IBV_WC_RDMA_WRITE),
            wr_id: WrId::new(3, 7),
            vendor_err: 0,
        };
        let s = e.to_string();
        assert!(s.contains("QP 17"), "{s}");
        assert!(s.contains("REM_ACCESS_ERR"), "{s}");
        assert!(s.contains("RDMA_WRITE"), "{s}");
        assert!(s.contains("kind: 3, tag: 7"), "{s}");
    }
}
