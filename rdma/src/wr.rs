//! Work requests and work completions.
//!
//! [`SendBatch`] and [`RecvBatch`] keep caller-owned fixed arrays of `ibv_send_wr` /
//! `ibv_recv_wr` and one `ibv_sge` per WR. The chain (`next`, `sg_list`) is linked in
//! place right before posting, so a whole chain goes to the NIC in one
//! `ibv_post_send`/`ibv_post_recv` call without any heap allocation, and the batch can be
//! reused after [`SendBatch::clear`].

use std::fmt;
use std::marker::PhantomData;

use rdma_sys as sys;

use crate::error::{Error, Result};
use crate::wr_id::WrId;

/// One scatter/gather entry: `len` bytes at `addr` of an MR with key `lkey`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    /// Virtual address (or IOVA) of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of the MR covering the range.
    pub lkey: u32,
}

/// A peer's memory: address and remote key, as exchanged in a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr {
    /// Remote virtual address (or IOVA).
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
}

impl RemoteAddr {
    /// The address `off` bytes further.
    pub fn offset(self, off: u64) -> RemoteAddr {
        RemoteAddr {
            addr: self.addr + off,
            rkey: self.rkey,
        }
    }
}

/// `ibv_send_flags` of one WR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendFlags(pub u32);

impl SendFlags {
    /// No completion unless the WR fails (unsignaled).
    pub const NONE: SendFlags = SendFlags(0);
    /// Generate a completion for this WR.
    pub const SIGNALED: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_SIGNALED);
    /// Wait for earlier RDMA READs to finish before this WR starts.
    pub const FENCE: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_FENCE);
    /// Set the solicited-event bit (wakes a peer armed with solicited_only).
    pub const SOLICITED: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_SOLICITED);
    /// Copy the payload into the WQE at post time (size ≤ the QP's max_inline_data).
    pub const INLINE: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_INLINE);

    /// True when all bits of `other` are set.
    pub fn contains(self, other: SendFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for SendFlags {
    type Output = SendFlags;
    fn bitor(self, rhs: SendFlags) -> SendFlags {
        SendFlags(self.0 | rhs.0)
    }
}

macro_rules! named_u32 {
    ($(#[$m:meta])* $name:ident, $module:ident, [$($c:ident => $s:literal),* $(,)?]) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq)]
        pub struct $name(pub u32);

        impl $name {
            /// The rdma-core name without its prefix, or "UNKNOWN".
            pub fn name(self) -> &'static str {
                match self.0 {
                    $(sys::$module::$c => $s,)*
                    _ => "UNKNOWN",
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", self.name(), self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

named_u32!(
    /// Work-completion status (`ibv_wc_status`).
    WcStatus, ibv_wc_status, [
    IBV_WC_SUCCESS => "SUCCESS",
    IBV_WC_LOC_LEN_ERR => "LOC_LEN_ERR",
    IBV_WC_LOC_QP_OP_ERR => "LOC_QP_OP_ERR",
    IBV_WC_LOC_EEC_OP_ERR => "LOC_EEC_OP_ERR",
    IBV_WC_LOC_PROT_ERR => "LOC_PROT_ERR",
    IBV_WC_WR_FLUSH_ERR => "WR_FLUSH_ERR",
    IBV_WC_MW_BIND_ERR => "MW_BIND_ERR",
    IBV_WC_BAD_RESP_ERR => "BAD_RESP_ERR",
    IBV_WC_LOC_ACCESS_ERR => "LOC_ACCESS_ERR",
    IBV_WC_REM_INV_REQ_ERR => "REM_INV_REQ_ERR",
    IBV_WC_REM_ACCESS_ERR => "REM_ACCESS_ERR",
    IBV_WC_REM_OP_ERR => "REM_OP_ERR",
    IBV_WC_RETRY_EXC_ERR => "RETRY_EXC_ERR",
    IBV_WC_RNR_RETRY_EXC_ERR => "RNR_RETRY_EXC_ERR",
    IBV_WC_LOC_RDD_VIOL_ERR => "LOC_RDD_VIOL_ERR",
    IBV_WC_REM_INV_RD_REQ_ERR => "REM_INV_RD_REQ_ERR",
    IBV_WC_REM_ABORT_ERR => "REM_ABORT_ERR",
    IBV_WC_INV_EECN_ERR => "INV_EECN_ERR",
    IBV_WC_INV_EEC_STATE_ERR => "INV_EEC_STATE_ERR",
    IBV_WC_FATAL_ERR => "FATAL_ERR",
    IBV_WC_RESP_TIMEOUT_ERR => "RESP_TIMEOUT_ERR",
    IBV_WC_GENERAL_ERR => "GENERAL_ERR",
]);

named_u32!(
    /// Work-completion opcode (`ibv_wc_opcode`).
    WcOpcode, ibv_wc_opcode, [
    IBV_WC_SEND => "SEND",
    IBV_WC_RDMA_WRITE => "RDMA_WRITE",
    IBV_WC_RDMA_READ => "RDMA_READ",
    IBV_WC_COMP_SWAP => "COMP_SWAP",
    IBV_WC_FETCH_ADD => "FETCH_ADD",
    IBV_WC_BIND_MW => "BIND_MW",
    IBV_WC_LOCAL_INV => "LOCAL_INV",
    IBV_WC_RECV => "RECV",
    IBV_WC_RECV_RDMA_WITH_IMM => "RECV_RDMA_WITH_IMM",
]);

named_u32!(
    /// Send work-request opcode (`ibv_wr_opcode`).
    WrOpcode, ibv_wr_opcode, [
    IBV_WR_SEND => "SEND",
    IBV_WR_SEND_WITH_IMM => "SEND_WITH_IMM",
    IBV_WR_RDMA_WRITE => "RDMA_WRITE",
    IBV_WR_RDMA_WRITE_WITH_IMM => "RDMA_WRITE_WITH_IMM",
    IBV_WR_RDMA_READ => "RDMA_READ",
    IBV_WR_ATOMIC_CMP_AND_SWP => "ATOMIC_CMP_AND_SWP",
    IBV_WR_ATOMIC_FETCH_AND_ADD => "ATOMIC_FETCH_AND_ADD",
    IBV_WR_SEND_WITH_INV => "SEND_WITH_INV",
]);

/// One work completion, layout-identical to `ibv_wc` so arrays of it are polled into
/// directly.
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
pub struct WorkCompletion(pub sys::ibv_wc);

impl WorkCompletion {
    /// The WR id given at post time.
    pub fn wr_id(&self) -> WrId {
        WrId::from_raw(self.0.wr_id)
    }
    /// Status.
    pub fn status(&self) -> WcStatus {
        WcStatus(self.0.status)
    }
    /// True when the status is SUCCESS.
    pub fn is_ok(&self) -> bool {
        self.0.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }
    /// Opcode.
    pub fn opcode(&self) -> WcOpcode {
        WcOpcode(self.0.opcode)
    }
    /// Bytes received (RECV completions).
    pub fn byte_len(&self) -> u32 {
        self.0.byte_len
    }
    /// Local QP number.
    pub fn qp_num(&self) -> u32 {
        self.0.qp_num
    }
    /// Immediate data in host order, when the completion carries one.
    pub fn imm_data(&self) -> Option<u32> {
        if self.0.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM != 0 {
            // SAFETY: with IBV_WC_WITH_IMM set the union holds imm_data.
            Some(u32::from_be(unsafe { self.0.__bindgen_anon_1.imm_data }))
        } else {
            None
        }
    }
    /// `Ok(self)` on success, else [`Error::WorkCompletion`] with status, opcode and QP.
    pub fn result(&self) -> Result<&Self> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(Error::WorkCompletion {
                qp_num: self.qp_num(),
                status: self.status(),
                opcode: self.opcode(),
                wr_id: self.wr_id(),
                vendor_err: self.0.vendor_err,
            })
        }
    }
}

impl fmt::Debug for WorkCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkCompletion")
            .field("wr_id", &self.wr_id())
            .field("status", &self.status())
            .field("opcode", &self.opcode())
            .field("byte_len", &self.byte_len())
            .field("qp_num", &self.qp_num())
            .field("imm", &self.imm_data())
            .finish()
    }
}

/// Up to `N` send WRs (one SGE each), posted as one chain.
///
/// `'a` ties the batch to payloads of inline sends, which the NIC copies at post time, so
/// a payload cannot be freed while a batch that names it may still be posted:
///
/// ```compile_fail
/// let mut batch = rdma::SendBatch::<1>::new();
/// {
///     let payload = vec![1u8, 2, 3];
///     batch.send_inline(rdma::WrId::new(0, 0), &payload, rdma::SendFlags::SIGNALED).unwrap();
/// } // `payload` dropped here while `batch` still points at it: does not compile
/// assert_eq!(batch.len(), 1);
/// ```
#[must_use = "a batch does nothing until posted"]
pub struct SendBatch<'a, const N: usize> {
    wrs: [sys::ibv_send_wr; N],
    sges: [sys::ibv_sge; N],
    len: usize,
    _inline: PhantomData<&'a [u8]>,
}

impl<const N: usize> Default for SendBatch<'_, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a, const N: usize> SendBatch<'a, N> {
    /// An empty batch.
    pub fn new() -> Self {
        SendBatch {
            wrs: [sys::ibv_send_wr::default(); N],
            sges: [sys::ibv_sge::default(); N],
            len: 0,
            _inline: PhantomData,
        }
    }

    /// Number of WRs in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn push(
        &mut self,
        wr_id: WrId,
        opcode: u32,
        sge: Option<Sge>,
        flags: SendFlags,
    ) -> Result<&mut sys::ibv_send_wr> {
        if self.len == N {
            return Err(Error::BatchFull {
                what: "send",
                capacity: N,
            });
        }
        let i = self.len;
        self.len += 1;
        let (num_sge, s) = match sge {
            Some(s) => (
                1,
                sys::ibv_sge {
                    addr: s.addr,
                    length: s.len,
                    lkey: s.lkey,
                },
            ),
            None => (0, sys::ibv_sge::default()),
        };
        self.sges[i] = s;
        let wr = &mut self.wrs[i];
        *wr = sys::ibv_send_wr::default();
        wr.wr_id = wr_id.raw();
        wr.opcode = opcode;
        wr.send_flags = flags.0;
        wr.num_sge = num_sge;
        Ok(wr)
    }

    /// SEND of `sge` (`None` for a zero-length send).
    pub fn send(&mut self, wr_id: WrId, sge: Option<Sge>, flags: SendFlags) -> Result<&mut Self> {
        self.push(wr_id, sys::ibv_wr_opcode::IBV_WR_SEND, sge, flags)?;
        Ok(self)
    }

    /// SEND with the payload copied inline into the WQE (no MR needed; the bytes must fit
    /// the QP's `max_inline_data`).
    pub fn send_inline(
        &mut self,
        wr_id: WrId,
        data: &'a [u8],
        flags: SendFlags,
    ) -> Result<&mut Self> {
        let sge = Sge {
            addr: data.as_ptr() as u64,
            len: u32::try_from(data.len()).map_err(|_| Error::InlineTooLong { len: data.len() })?,
            lkey: 0,
        };
        self.push(
            wr_id,
            sys::ibv_wr_opcode::IBV_WR_SEND,
            Some(sge),
            flags | SendFlags::INLINE,
        )?;
        Ok(self)
    }

    /// RDMA WRITE of `local` to `remote`.
    pub fn write(
        &mut self,
        wr_id: WrId,
        local: Sge,
        remote: RemoteAddr,
        flags: SendFlags,
    ) -> Result<&mut Self> {
        let wr = self.push(
            wr_id,
            sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            Some(local),
            flags,
        )?;
        wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: remote.addr,
            rkey: remote.rkey,
        };
        Ok(self)
    }

    /// RDMA WRITE with a 32-bit immediate (consumes a RECV at the peer).
    pub fn write_imm(
        &mut self,
        wr_id: WrId,
        local: Option<Sge>,
        remote: RemoteAddr,
        imm: u32,
        flags: SendFlags,
    ) -> Result<&mut Self> {
        let wr = self.push(
            wr_id,
            sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            local,
            flags,
        )?;
        wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: remote.addr,
            rkey: remote.rkey,
        };
        wr.__bindgen_anon_1.imm_data = imm.to_be();
        Ok(self)
    }

    /// RDMA READ of `remote` into `local`.
    pub fn read(
        &mut self,
        wr_id: WrId,
        local: Sge,
        remote: RemoteAddr,
        flags: SendFlags,
    ) -> Result<&mut Self> {
        let wr = self.push(
            wr_id,
            sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
            Some(local),
            flags,
        )?;
        wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: remote.addr,
            rkey: remote.rkey,
        };
        Ok(self)
    }

    /// Links the WRs in place and returns the head, or `None` when empty.
    pub(crate) fn link(&mut self) -> Option<*mut sys::ibv_send_wr> {
        if self.len == 0 {
            return None;
        }
        let base = self.wrs.as_mut_ptr();
        for i in 0..self.len {
            let wr = &mut self.wrs[i];
            if wr.num_sge > 0 {
                wr.sg_list = &mut self.sges[i];
            } else {
                wr.sg_list = std::ptr::null_mut();
            }
            // SAFETY (pointer arithmetic only): i + 1 <= len <= N, one past the end at most.
            wr.next = if i + 1 < self.len {
                base.wrapping_add(i + 1)
            } else {
                std::ptr::null_mut()
            };
        }
        Some(base)
    }

    /// Index of `bad` in the linked chain, with its opcode name.
    pub(crate) fn locate(&self, bad: *const sys::ibv_send_wr) -> (usize, &'static str) {
        let idx = (0..self.len)
            .find(|&i| std::ptr::eq(&self.wrs[i], bad))
            .unwrap_or(0);
        (idx, WrOpcode(self.wrs[idx].opcode).name())
    }

    /// The WR at `i` (for inspection and tests).
    pub fn wr(&self, i: usize) -> Option<&sys::ibv_send_wr> {
        self.wrs[..self.len].get(i)
    }
}

/// Up to `N` receive WRs (one SGE each), posted as one chain to a QP or an SRQ.
#[must_use = "a batch does nothing until posted"]
pub struct RecvBatch<const N: usize> {
    wrs: [sys::ibv_recv_wr; N],
    sges: [sys::ibv_sge; N],
    len: usize,
}

impl<const N: usize> Default for RecvBatch<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RecvBatch<N> {
    /// An empty batch.
    pub fn new() -> Self {
        RecvBatch {
            wrs: [sys::ibv_recv_wr::default(); N],
            sges: [sys::ibv_sge::default(); N],
            len: 0,
        }
    }

    /// Number of WRs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// A RECV into `sge` (`None`: only for zero-length messages / WRITE_WITH_IMM).
    pub fn recv(&mut self, wr_id: WrId, sge: Option<Sge>) -> Result<&mut Self> {
        if self.len == N {
            return Err(Error::BatchFull {
                what: "recv",
                capacity: N,
            });
        }
        let i = self.len;
        self.len += 1;
        let wr = &mut self.wrs[i];
        *wr = sys::ibv_recv_wr::default();
        wr.wr_id = wr_id.raw();
        match sge {
            Some(s) => {
                self.sges[i] = sys::ibv_sge {
                    addr: s.addr,
                    length: s.len,
                    lkey: s.lkey,
                };
                wr.num_sge = 1;
            }
            None => wr.num_sge = 0,
        }
        Ok(self)
    }

    /// Links the WRs in place and returns the head, or `None` when empty.
    pub(crate) fn link(&mut self) -> Option<*mut sys::ibv_recv_wr> {
        if self.len == 0 {
            return None;
        }
        let base = self.wrs.as_mut_ptr();
        for i in 0..self.len {
            let wr = &mut self.wrs[i];
            wr.sg_list = if wr.num_sge > 0 {
                &mut self.sges[i]
            } else {
                std::ptr::null_mut()
            };
            wr.next = if i + 1 < self.len {
                base.wrapping_add(i + 1)
            } else {
                std::ptr::null_mut()
            };
        }
        Some(base)
    }

    /// Index of `bad` in the linked chain.
    pub(crate) fn locate(&self, bad: *const sys::ibv_recv_wr) -> usize {
        (0..self.len)
            .find(|&i| std::ptr::eq(&self.wrs[i], bad))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(tag: u32) -> WrId {
        WrId::new(1, tag)
    }

    fn sge(a: u64) -> Sge {
        Sge {
            addr: a,
            len: 16,
            lkey: 5,
        }
    }

    #[test]
    fn chain_links_in_place_in_order() {
        let remote = RemoteAddr {
            addr: 0x1000,
            rkey: 9,
        };
        let mut b = SendBatch::<4>::new();
        b.write(id(1), sge(0xa0), remote, SendFlags::NONE)
            .unwrap()
            .write(id(2), sge(0xb0), remote.offset(64), SendFlags::NONE)
            .unwrap()
            .write_imm(
                id(3),
                None,
                remote.offset(128),
                0xdead_beef,
                SendFlags::SIGNALED,
            )
            .unwrap();
        let head = b.link().unwrap();
        let mut p = head;
        let mut ids = vec![];
        while !p.is_null() {
            // SAFETY: the chain points into `b.wrs`, alive for the loop.
            let wr = unsafe { &*p };
            ids.push(WrId::from_raw(wr.wr_id).tag());
            if wr.num_sge == 1 {
                // SAFETY: linked to `b.sges`.
                let s = unsafe { &*wr.sg_list };
                assert_eq!(s.lkey, 5);
            } else {
                assert!(wr.sg_list.is_null());
            }
            p = wr.next;
        }
        assert_eq!(ids, [1, 2, 3]);
        let w2 = b.wr(1).unwrap();
        // SAFETY: a WRITE's union holds `rdma`.
        let (ra, rk) = unsafe { (w2.wr.rdma.remote_addr, w2.wr.rdma.rkey) };
        assert_eq!((ra, rk), (0x1040, 9));
        let w3 = b.wr(2).unwrap();
        assert_eq!(w3.opcode, sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM);
        assert_eq!(w3.send_flags, sys::ibv_send_flags::IBV_SEND_SIGNALED);
        // SAFETY: imm_data was written.
        let imm = unsafe { w3.__bindgen_anon_1.imm_data };
        assert_eq!(u32::from_be(imm), 0xdead_beef);
        assert_eq!(b.locate(b.wr(2).unwrap()), (2, "RDMA_WRITE_WITH_IMM"));
    }

    #[test]
    fn batch_full_is_an_error_and_clear_reuses() {
        let mut b = SendBatch::<1>::new();
        b.send(id(1), None, SendFlags::SIGNALED).unwrap();
        assert!(matches!(
            b.send(id(2), None, SendFlags::NONE),
            Err(Error::BatchFull {
                what: "send",
                capacity: 1
            })
        ));
        b.clear();
        assert!(b.is_empty());
        assert!(b.link().is_none());
        let data = [1u8, 2, 3];
        b.send_inline(id(7), &data, SendFlags::SIGNALED).unwrap();
        let wr = b.wr(0).unwrap();
        assert!(SendFlags(wr.send_flags).contains(SendFlags::INLINE | SendFlags::SIGNALED));
    }

    #[test]
    fn recv_chain_links() {
        let mut r = RecvBatch::<3>::new();
        r.recv(id(10), Some(sge(1)))
            .unwrap()
            .recv(id(11), None)
            .unwrap();
        let head = r.link().unwrap();
        // SAFETY: chain points into `r`.
        let first = unsafe { &*head };
        assert_eq!(first.wr_id, id(10).raw());
        // SAFETY: as above.
        let second = unsafe { &*first.next };
        assert_eq!(second.wr_id, id(11).raw());
        assert!(second.next.is_null());
        assert_eq!(r.locate(second), 1);
    }

    #[test]
    fn wc_result_names_error() {
        let mut wc = WorkCompletion::default();
        wc.0.status = sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR;
        wc.0.qp_num = 3;
        let e = wc.result().unwrap_err().to_string();
        assert!(e.contains("WR_FLUSH_ERR") && e.contains("QP 3"), "{e}");
        wc.0.status = 0;
        assert!(wc.result().is_ok());
        assert_eq!(WcStatus(9999).name(), "UNKNOWN");
    }

    proptest::proptest! {
        #[test]
        fn any_chain_length_links_all(n in 0usize..16) {
            let mut b = SendBatch::<16>::new();
            for i in 0..n {
                b.read(id(i as u32), sge(i as u64), RemoteAddr { addr: 0, rkey: 1 }, SendFlags::NONE).unwrap();
            }
            let mut count = 0;
            let mut p = b.link().unwrap_or(std::ptr::null_mut());
            while !p.is_null() {
                // SAFETY: chain points into `b`.
                let wr = unsafe { &*p };
                proptest::prop_assert_eq!(wr.wr_id, id(count as u32).raw());
                count += 1;
                p = wr.next;
            }
            proptest::prop_assert_eq!(count, n);
        }
    }
}
