//! Reliable-connected queue pairs.

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::cm::CmIdInner;
use crate::cq::CompletionQueue;
use crate::error::{check_ret, last_os_error, Error, Result};
use crate::mr::Access;
use crate::pd::ProtectionDomain;
use crate::srq::SharedReceiveQueue;
use crate::wr::{RecvBatch, SendBatch};

/// What a QP is created with.
#[derive(Clone)]
pub struct QpInit {
    /// CQ for send completions.
    pub send_cq: Arc<CompletionQueue>,
    /// CQ for receive completions (may be the same CQ).
    pub recv_cq: Arc<CompletionQueue>,
    /// Take RECVs from this SRQ instead of an own receive queue.
    pub srq: Option<Arc<SharedReceiveQueue>>,
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth (ignored with an SRQ).
    pub max_recv_wr: u32,
    /// SGEs per send WR.
    pub max_send_sge: u32,
    /// SGEs per receive WR.
    pub max_recv_sge: u32,
    /// Bytes that may be sent inline.
    pub max_inline_data: u32,
    /// Signal every send WR regardless of [`crate::SendFlags::SIGNALED`].
    pub sq_sig_all: bool,
}

impl QpInit {
    /// Depth 64/64, one SGE, 64 bytes inline, selective signaling, one CQ for both.
    pub fn new(cq: &Arc<CompletionQueue>) -> QpInit {
        QpInit {
            send_cq: Arc::clone(cq),
            recv_cq: Arc::clone(cq),
            srq: None,
            max_send_wr: 64,
            max_recv_wr: 64,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
            sq_sig_all: false,
        }
    }

    pub(crate) fn to_attr(&self) -> sys::ibv_qp_init_attr {
        let with_srq = self.srq.is_some();
        sys::ibv_qp_init_attr {
            send_cq: self.send_cq.as_raw(),
            recv_cq: self.recv_cq.as_raw(),
            srq: self
                .srq
                .as_ref()
                .map_or(std::ptr::null_mut(), |s| s.as_raw()),
            cap: sys::ibv_qp_cap {
                max_send_wr: self.max_send_wr,
                max_recv_wr: if with_srq { 0 } else { self.max_recv_wr },
                max_send_sge: self.max_send_sge,
                max_recv_sge: if with_srq { 0 } else { self.max_recv_sge },
                max_inline_data: self.max_inline_data,
            },
            qp_type: sys::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: i32::from(self.sq_sig_all),
            ..Default::default()
        }
    }
}

/// Where the remote end of an RC QP is, for the RTR transition (RoCE: GID-addressed).
#[derive(Clone, Copy, Debug)]
pub struct RemoteQp {
    /// Remote QP number.
    pub qp_num: u32,
    /// Remote starting receive PSN (our rq_psn).
    pub psn: u32,
    /// Remote GID.
    pub gid: [u8; 16],
    /// Remote LID (0 on RoCE).
    pub lid: u16,
}

enum Owner {
    Verbs,
    Cm(Arc<CmIdInner>),
}

/// An RC queue pair; keeps its PD, CQs and SRQ alive. Destroyed on drop
/// (`rdma_destroy_qp` when the RDMA CM created it, before its CM id is destroyed).
pub struct QueuePair {
    qp: NonNull<sys::ibv_qp>,
    owner: Owner,
    init: QpInit,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: ibv_post_send/recv and ibv_modify_qp are thread-safe in libibverbs.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl QueuePair {
    /// `ibv_create_qp` of an RC QP, in RESET state.
    pub fn new_rc(pd: &Arc<ProtectionDomain>, init: &QpInit) -> Result<QueuePair> {
        let mut attr = init.to_attr();
        // SAFETY: live PD; the CQs/SRQ referenced by `attr` are alive (kept by `init`).
        let qp = unsafe { sys::ibv_create_qp(pd.as_raw(), &mut attr) };
        let qp = NonNull::new(qp).ok_or_else(|| last_os_error("ibv_create_qp"))?;
        Ok(QueuePair {
            qp,
            owner: Owner::Verbs,
            init: init.clone(),
            pd: Arc::clone(pd),
        })
    }

    pub(crate) fn from_cm(
        qp: NonNull<sys::ibv_qp>,
        id: Arc<CmIdInner>,
        pd: &Arc<ProtectionDomain>,
        init: &QpInit,
    ) -> QueuePair {
        QueuePair {
            qp,
            owner: Owner::Cm(id),
            init: init.clone(),
            pd: Arc::clone(pd),
        }
    }

    /// The raw QP.
    pub fn as_raw(&self) -> *mut sys::ibv_qp {
        self.qp.as_ptr()
    }

    /// QP number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: live QP; qp_num is immutable.
        unsafe { self.qp.as_ref().qp_num }
    }

    /// The PD.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// The send CQ.
    pub fn send_cq(&self) -> &Arc<CompletionQueue> {
        &self.init.send_cq
    }

    /// The receive CQ.
    pub fn recv_cq(&self) -> &Arc<CompletionQueue> {
        &self.init.recv_cq
    }

    fn modify(&self, attr: &mut sys::ibv_qp_attr, mask: u32) -> Result<()> {
        // SAFETY: live QP; `attr` valid for the fields named by `mask`.
        check_ret("ibv_modify_qp", unsafe {
            sys::ibv_modify_qp(self.as_raw(), attr, mask as i32)
        })
    }

    /// RESET → INIT on `port` with the given remote access rights.
    pub fn to_init(&self, port: u8, access: Access) -> Result<()> {
        use sys::ibv_qp_attr_mask::*;
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_INIT,
            port_num: port,
            pkey_index: 0,
            qp_access_flags: access.0,
            ..Default::default()
        };
        self.modify(
            &mut a,
            IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS,
        )
    }

    /// INIT → RTR towards `remote` (RoCE: global routing with `sgid_index`).
    pub fn to_rtr(&self, port: u8, sgid_index: u8, mtu: u32, remote: &RemoteQp) -> Result<()> {
        use sys::ibv_qp_attr_mask::*;
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: mtu,
            dest_qp_num: remote.qp_num,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 16,
            min_rnr_timer: 12,
            ..Default::default()
        };
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = port;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid.raw = remote.gid;
        a.ah_attr.grh.sgid_index = sgid_index;
        a.ah_attr.grh.hop_limit = 64;
        self.modify(
            &mut a,
            IBV_QP_STATE
                | IBV_QP_AV
                | IBV_QP_PATH_MTU
                | IBV_QP_DEST_QPN
                | IBV_QP_RQ_PSN
                | IBV_QP_MAX_DEST_RD_ATOMIC
                | IBV_QP_MIN_RNR_TIMER,
        )
    }

    /// RTR → RTS with starting send PSN `psn`.
    pub fn to_rts(&self, psn: u32) -> Result<()> {
        use sys::ibv_qp_attr_mask::*;
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 16,
            ..Default::default()
        };
        self.modify(
            &mut a,
            IBV_QP_STATE
                | IBV_QP_SQ_PSN
                | IBV_QP_TIMEOUT
                | IBV_QP_RETRY_CNT
                | IBV_QP_RNR_RETRY
                | IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Any state → ERROR: outstanding WRs complete with WR_FLUSH_ERR (the first step of
    /// teardown: error, drain the CQ, reclaim buffers, then drop).
    pub fn to_error(&self) -> Result<()> {
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        self.modify(&mut a, sys::ibv_qp_attr_mask::IBV_QP_STATE)
    }

    /// Current state (`ibv_qp_state`, e.g. `IBV_QPS_RTS`).
    pub fn state(&self) -> Result<u32> {
        let mut a = sys::ibv_qp_attr::default();
        let mut i = sys::ibv_qp_init_attr::default();
        // SAFETY: live QP; out-pointers valid.
        check_ret("ibv_query_qp", unsafe {
            sys::ibv_query_qp(
                self.as_raw(),
                &mut a,
                sys::ibv_qp_attr_mask::IBV_QP_STATE as i32,
                &mut i,
            )
        })?;
        Ok(a.qp_state)
    }

    /// Posts the batch as one chain (`ibv_post_send`). On failure the error names the
    /// index and opcode of the refused WR; WRs before it were posted.
    ///
    /// Local buffers named by the batch belong to the NIC until their completions (or,
    /// for unsignaled WRs, a later signaled completion) return.
    pub fn post_send<const N: usize>(&self, batch: &mut SendBatch<'_, N>) -> Result<()> {
        let Some(head) = batch.link() else {
            return Ok(());
        };
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: live QP; the chain is linked in place inside `batch`, which outlives the
        // call; inline payloads are borrowed for 'a by the batch.
        let ret = unsafe { sys::ibv_post_send(self.as_raw(), head, &mut bad) };
        if ret != 0 {
            let (index, opcode) = batch.locate(bad);
            return Err(Error::Post {
                qp_num: self.qp_num(),
                opcode,
                index,
                source: std::io::Error::from_raw_os_error(ret),
            });
        }
        Ok(())
    }

    /// Posts the batch's RECVs as one chain (`ibv_post_recv`); not for QPs on an SRQ.
    pub fn post_recv<const N: usize>(&self, batch: &mut RecvBatch<N>) -> Result<()> {
        let Some(head) = batch.link() else {
            return Ok(());
        };
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: live QP; the chain lives in `batch` for the call.
        let ret = unsafe { sys::ibv_post_recv(self.as_raw(), head, &mut bad) };
        if ret != 0 {
            return Err(Error::Post {
                qp_num: self.qp_num(),
                opcode: "RECV",
                index: batch.locate(bad),
                source: std::io::Error::from_raw_os_error(ret),
            });
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Verbs => {
                // SAFETY: created by ibv_create_qp, destroyed once.
                let ret = unsafe { sys::ibv_destroy_qp(self.as_raw()) };
                if ret != 0 {
                    tracing::warn!(ret, qp = self.qp_num(), "ibv_destroy_qp failed");
                }
            }
            Owner::Cm(id) => {
                // SAFETY: created by rdma_create_qp on this id, which is still alive (we
                // hold an Arc); rdma_destroy_qp destroys it and clears id->qp, so the id
                // can be destroyed afterwards.
                unsafe { sys::rdma_destroy_qp(id.as_raw()) };
            }
        }
    }
}
