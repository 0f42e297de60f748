//! Shared receive queues.

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::error::{last_os_error, Error, Result};
use crate::pd::ProtectionDomain;
use crate::wr::RecvBatch;

/// A shared receive queue (`ibv_srq`): one pool of RECV buffers for many QPs.
pub struct SharedReceiveQueue {
    srq: NonNull<sys::ibv_srq>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: ibv_post_srq_recv is thread-safe in libibverbs.
unsafe impl Send for SharedReceiveQueue {}
// SAFETY: as above.
unsafe impl Sync for SharedReceiveQueue {}

impl SharedReceiveQueue {
    /// `ibv_create_srq` holding up to `max_wr` RECVs of up to `max_sge` SGEs each.
    pub fn new(pd: &Arc<ProtectionDomain>, max_wr: u32, max_sge: u32) -> Result<Arc<Self>> {
        let mut attr = sys::ibv_srq_init_attr::default();
        attr.attr.max_wr = max_wr;
        attr.attr.max_sge = max_sge;
        // SAFETY: live PD; `attr` is a valid in/out pointer.
        let srq = unsafe { sys::ibv_create_srq(pd.as_raw(), &mut attr) };
        let srq = NonNull::new(srq).ok_or_else(|| last_os_error("ibv_create_srq"))?;
        Ok(Arc::new(SharedReceiveQueue {
            srq,
            pd: Arc::clone(pd),
        }))
    }

    /// The raw SRQ.
    pub fn as_raw(&self) -> *mut sys::ibv_srq {
        self.srq.as_ptr()
    }

    /// The PD.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Posts the batch's RECVs as one chain (`ibv_post_srq_recv`).
    ///
    /// The buffers named by the batch belong to the NIC until their completions return.
    pub fn post_recv<const N: usize>(&self, batch: &mut RecvBatch<N>) -> Result<()> {
        let Some(head) = batch.link() else {
            return Ok(());
        };
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: live SRQ; the chain is linked in place inside `batch`, which outlives the
        // call; buffer ownership is the caller's contract (MR registration).
        let ret = unsafe { sys::ibv_post_srq_recv(self.as_raw(), head, &mut bad) };
        if ret != 0 {
            return Err(Error::Post {
                qp_num: 0,
                opcode: "SRQ_RECV",
                index: batch.locate(bad),
                source: std::io::Error::from_raw_os_error(ret),
            });
        }
        Ok(())
    }
}

impl Drop for SharedReceiveQueue {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_srq; QPs using it hold an Arc, so none is left.
        let ret = unsafe { sys::ibv_destroy_srq(self.as_raw()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_destroy_srq failed");
        }
    }
}
