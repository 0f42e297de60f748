//! Completion channels and completion queues.

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use crate::device::Context;
use crate::error::{check_ret, from_errno, last_os_error, Result};
use crate::wr::WorkCompletion;

/// A completion channel (`ibv_comp_channel`): an fd that becomes readable when an armed
/// CQ gets a completion. Made non-blocking, so it can sit in an epoll set.
pub struct CompletionChannel {
    ch: NonNull<sys::ibv_comp_channel>,
    ctx: Arc<Context>,
}

// SAFETY: the channel is an fd wrapper; libibverbs calls on it are thread-safe.
unsafe impl Send for CompletionChannel {}
// SAFETY: as above.
unsafe impl Sync for CompletionChannel {}

impl CompletionChannel {
    /// `ibv_create_comp_channel`, with the fd set O_NONBLOCK.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<CompletionChannel>> {
        // SAFETY: live context.
        let ch = unsafe { sys::ibv_create_comp_channel(ctx.as_raw()) };
        let ch = NonNull::new(ch).ok_or_else(|| last_os_error("ibv_create_comp_channel"))?;
        let chan = CompletionChannel {
            ch,
            ctx: Arc::clone(ctx),
        };
        set_nonblocking(chan.fd())?;
        Ok(Arc::new(chan))
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> RawFd {
        // SAFETY: live channel; `fd` is immutable.
        unsafe { self.ch.as_ref().fd }
    }

    /// The raw channel.
    pub fn as_raw(&self) -> *mut sys::ibv_comp_channel {
        self.ch.as_ptr()
    }

    /// Reads and acknowledges one CQ event, if one is pending; returns whether there was
    /// one. An armed CQ raises one event, so after poll(2) said the fd is readable this is
    /// one `read` — [`drain_events`](Self::drain_events) pays a second that finds nothing.
    pub fn take_event(&self) -> Result<bool> {
        let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
        let mut cq_ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: live channel with a non-blocking fd; out-pointers are valid.
        let ret = unsafe { sys::ibv_get_cq_event(self.as_raw(), &mut cq, &mut cq_ctx) };
        if ret != 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | None => Ok(false),
                Some(e) => Err(from_errno("ibv_get_cq_event", e)),
            };
        }
        // SAFETY: `cq` was just returned by ibv_get_cq_event and is alive (a CQ on this
        // channel holds an Arc to it, and a CQ is destroyed only after its events are acked).
        unsafe { sys::ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }

    /// Reads and acknowledges every pending CQ event; returns how many there were.
    /// Never blocks. The CQs must be re-armed before the next sleep.
    pub fn drain_events(&self) -> Result<usize> {
        let mut n = 0;
        loop {
            let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
            let mut cq_ctx: *mut libc::c_void = std::ptr::null_mut();
            // SAFETY: live channel with a non-blocking fd; out-pointers are valid.
            let ret = unsafe { sys::ibv_get_cq_event(self.as_raw(), &mut cq, &mut cq_ctx) };
            if ret != 0 {
                let err = std::io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(n),
                    Some(e) => Err(from_errno("ibv_get_cq_event", e)),
                    None => Ok(n),
                };
            }
            // SAFETY: `cq` was just returned by ibv_get_cq_event and is alive (a CQ on this
            // channel holds an Arc to it, and a CQ is destroyed only after its events are acked).
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            n += 1;
        }
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel; CQs using it hold an Arc, so none is
        // left.
        let ret = unsafe { sys::ibv_destroy_comp_channel(self.as_raw()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_destroy_comp_channel failed");
        }
        let _ = &self.ctx;
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on an fd we own; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(last_os_error("fcntl(F_GETFL)"));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_os_error("fcntl(F_SETFL)"));
    }
    Ok(())
}

/// A completion queue (`ibv_cq`), optionally attached to a completion channel.
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    channel: Option<Arc<CompletionChannel>>,
    ctx: Arc<Context>,
}

// SAFETY: ibv_poll_cq / ibv_req_notify_cq are thread-safe in libibverbs (providers lock).
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    /// `ibv_create_cq` with at least `cqe` entries, reporting to `channel` when armed.
    pub fn new(
        ctx: &Arc<Context>,
        cqe: u32,
        channel: Option<&Arc<CompletionChannel>>,
    ) -> Result<Arc<CompletionQueue>> {
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.as_raw());
        // SAFETY: live context, optional live channel of the same context.
        let cq =
            unsafe { sys::ibv_create_cq(ctx.as_raw(), cqe as i32, std::ptr::null_mut(), ch, 0) };
        let cq = NonNull::new(cq).ok_or_else(|| last_os_error("ibv_create_cq"))?;
        Ok(Arc::new(CompletionQueue {
            cq,
            channel: channel.cloned(),
            ctx: Arc::clone(ctx),
        }))
    }

    /// The raw CQ.
    pub fn as_raw(&self) -> *mut sys::ibv_cq {
        self.cq.as_ptr()
    }

    /// The completion channel, if any.
    pub fn channel(&self) -> Option<&Arc<CompletionChannel>> {
        self.channel.as_ref()
    }

    /// The context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Polls up to `out.len()` completions into the caller's array; returns the count.
    /// Errored completions are returned like any other: check [`WorkCompletion::result`].
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        let n = out.len().min(i32::MAX as usize) as i32;
        // SAFETY: live CQ; WorkCompletion is repr(transparent) over ibv_wc and `out` has
        // room for `n` entries.
        let ret = unsafe { sys::ibv_poll_cq(self.as_raw(), n, out.as_mut_ptr().cast()) };
        if ret < 0 {
            // Providers return -1 or -errno.
            return Err(from_errno(
                "ibv_poll_cq",
                if ret < -1 { -ret } else { libc::EIO },
            ));
        }
        Ok(ret as usize)
    }

    /// Arms the CQ: the next completion raises an event on the channel
    /// (`ibv_req_notify_cq`). Poll once more after arming to close the race.
    pub fn arm(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: live CQ.
        check_ret("ibv_req_notify_cq", unsafe {
            sys::ibv_req_notify_cq(self.as_raw(), i32::from(solicited_only))
        })
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; QPs and SRQs using it hold an Arc, so none is
        // left; channel events were acked as they were read (drain_events).
        let ret = unsafe { sys::ibv_destroy_cq(self.as_raw()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_destroy_cq failed");
        }
    }
}
