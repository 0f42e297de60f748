//! Device list, device context, and device/port/GID queries.

use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::error::{check_ret, last_os_error, Error, Result};

/// Names of the RDMA devices present (empty when there are none).
pub fn device_names() -> Result<Vec<String>> {
    let mut n = 0i32;
    // SAFETY: ibv_get_device_list writes the count to `n` and returns a NULL-terminated
    // array (or NULL with errno), freed below with ibv_free_device_list.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        // ENOSYS: no kernel support for RDMA at all, i.e. no device.
        return Ok(Vec::new());
    }
    let mut names = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `list` has `n` valid entries; ibv_get_device_name returns a NUL-terminated
        // string owned by the device, copied out before the list is freed.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { sys::ibv_free_device_list(list) };
    Ok(names)
}

/// An open device context (`ibv_context`).
///
/// Either opened by this crate ([`Context::open`], closed on drop) or borrowed from
/// librdmacm ([`crate::cm::context_for`] and the CM objects' `context()`), in which case it
/// holds a CM id bound to the device for as long as it lives. PDs, CQs and SRQs for RDMA
/// CM connections must be created on a borrowed context of the same device.
pub struct Context {
    ctx: NonNull<sys::ibv_context>,
    owned: bool,
    // For borrowed contexts: a CM id bound to the device, so librdmacm's reference on the
    // device cannot drop to zero while this context is in use.
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: libibverbs contexts are thread-safe; the pointer is only used through verbs.
unsafe impl Send for Context {}
// SAFETY: as above; no interior state is kept on the Rust side.
unsafe impl Sync for Context {}

impl Context {
    /// Opens the device called `name`, or the first device when `name` is `None`.
    pub fn open(name: Option<&str>) -> Result<Arc<Context>> {
        let mut n = 0i32;
        // SAFETY: see device_names.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() || n == 0 {
            if !list.is_null() {
                // SAFETY: freeing the list obtained above, once.
                unsafe { sys::ibv_free_device_list(list) };
            }
            return Err(Error::NoDevice);
        }
        let mut chosen = None;
        let mut present = Vec::new();
        for i in 0..n as usize {
            // SAFETY: `list` has `n` valid entries.
            let dev = unsafe { *list.add(i) };
            // SAFETY: device names are NUL-terminated strings owned by the device.
            let dev_name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_none() && name.is_none_or(|want| want == dev_name) {
                chosen = Some(dev);
            }
            present.push(dev_name);
        }
        let result = match chosen {
            None => Err(Error::DeviceNotFound {
                name: name.unwrap_or_default().to_owned(),
                present: present.join(", "),
            }),
            Some(dev) => {
                // SAFETY: `dev` is a live entry of the list, which is still allocated.
                let ctx = unsafe { sys::ibv_open_device(dev) };
                NonNull::new(ctx)
                    .map(|ctx| {
                        Arc::new(Context {
                            ctx,
                            owned: true,
                            _keep: None,
                        })
                    })
                    .ok_or_else(|| last_os_error("ibv_open_device"))
            }
        };
        // SAFETY: an opened context stays valid after the list is freed (rdma-core contract).
        unsafe { sys::ibv_free_device_list(list) };
        result
    }

    /// Wraps a context owned by librdmacm (from `rdma_cm_id::verbs`).
    ///
    /// # Safety
    /// `ctx` must be the `verbs` context of the CM id `keep`, which keeps librdmacm's
    /// device (and so the context) open while this value lives.
    pub(crate) unsafe fn borrowed(
        ctx: NonNull<sys::ibv_context>,
        keep: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Arc<Context> {
        Arc::new(Context {
            ctx,
            owned: false,
            _keep: Some(keep),
        })
    }

    /// The raw context, for calls into `rdma_sys`.
    pub fn as_raw(&self) -> *mut sys::ibv_context {
        self.ctx.as_ptr()
    }

    /// The device name (e.g. `rxe0`).
    pub fn name(&self) -> String {
        // SAFETY: the context is live; `device` is set by libibverbs and outlives it.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name((*self.as_raw()).device)) };
        name.to_string_lossy().into_owned()
    }

    /// `ibv_query_device`.
    pub fn query_device(&self) -> Result<sys::ibv_device_attr> {
        let mut attr = sys::ibv_device_attr::default();
        // SAFETY: live context, `attr` is a valid out-pointer.
        check_ret("ibv_query_device", unsafe {
            sys::ibv_query_device(self.as_raw(), &mut attr)
        })?;
        Ok(attr)
    }

    /// `ibv_query_port` (ports count from 1).
    pub fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr> {
        let mut attr = sys::ibv_port_attr::default();
        // SAFETY: live context, `attr` is a valid out-pointer of the current layout (the
        // shim calls the header's inline, not the compat symbol).
        check_ret("ibv_query_port", unsafe {
            sys::ibv_query_port(self.as_raw(), port, &mut attr)
        })?;
        Ok(attr)
    }

    /// `ibv_query_gid`: the 16-byte GID at `index` of `port`.
    pub fn query_gid(&self, port: u8, index: i32) -> Result<[u8; 16]> {
        let mut gid = sys::ibv_gid::default();
        // SAFETY: live context, `gid` is a valid out-pointer.
        check_ret("ibv_query_gid", unsafe {
            sys::ibv_query_gid(self.as_raw(), port, index, &mut gid)
        })?;
        // SAFETY: every bit pattern of the union is a valid `raw` byte array.
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: opened by ibv_open_device; every child holds an Arc to this context,
            // so none is alive any more.
            let ret = unsafe { sys::ibv_close_device(self.as_raw()) };
            if ret != 0 {
                tracing::warn!(ret, "ibv_close_device failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_typed_error_not_a_panic() {
        let names = device_names().unwrap();
        if names.is_empty() {
            // The host has no RDMA: the error must say how to add soft-RoCE.
            let err = Context::open(None)
                .err()
                .expect("no device, yet open succeeded");
            assert!(matches!(err, Error::NoDevice), "{err}");
        }
        let err = Context::open(Some("no-such-rdma-dev"))
            .err()
            .expect("bogus name opened");
        assert!(
            matches!(err, Error::NoDevice | Error::DeviceNotFound { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("rdma link add"), "{err}");
    }
}
