//! Protection domains.

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::device::Context;
use crate::error::{last_os_error, Result};

/// A protection domain (`ibv_pd`); keeps its [`Context`] alive.
pub struct ProtectionDomain {
    pd: NonNull<sys::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: PDs are thread-safe in libibverbs; the Rust side holds no mutable state.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// `ibv_alloc_pd`.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: live context.
        let pd = unsafe { sys::ibv_alloc_pd(ctx.as_raw()) };
        let pd = NonNull::new(pd).ok_or_else(|| last_os_error("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain {
            pd,
            ctx: Arc::clone(ctx),
        }))
    }

    /// The device context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The raw PD.
    pub fn as_raw(&self) -> *mut sys::ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; MRs, QPs and SRQs hold an Arc to this PD,
        // so none is alive any more.
        let ret = unsafe { sys::ibv_dealloc_pd(self.as_raw()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_dealloc_pd failed");
        }
    }
}
