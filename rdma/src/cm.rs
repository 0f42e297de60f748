//! RDMA connection manager: event channel, listener, connect requests (accept/reject with
//! private data), active connect with a timeout, disconnect.
//!
//! Every event is copied out and acknowledged inside [`EventChannel::try_event`], before
//! the caller sees it, so a CM id can never be destroyed inside its own event callback
//! (`rdma_destroy_id` waits for unacknowledged events and would deadlock).

use std::ffi::CStr;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys as sys;

use crate::cq::set_nonblocking;
use crate::device::Context;
use crate::error::{from_errno, last_os_error, Error, Result};
use crate::pd::ProtectionDomain;
use crate::qp::{QpInit, QueuePair};

/// Largest private data of a connect request on IB/RoCE (92-byte REQ field minus the
/// 36-byte RDMA CM header).
pub const MAX_CONNECT_PRIVATE_DATA: usize = 56;
/// Largest private data of an accept (REP) on IB/RoCE.
pub const MAX_ACCEPT_PRIVATE_DATA: usize = 196;
/// Largest private data of a reject (REJ) on IB/RoCE.
pub const MAX_REJECT_PRIVATE_DATA: usize = 148;
/// CM reject reason for "no listener on this port" (IB_CM_REJ_INVALID_SERVICE_ID).
pub const REJECT_INVALID_SERVICE_ID: i32 = 8;
/// CM reject reason of `rdma_reject` (IB_CM_REJ_CONSUMER_DEFINED).
pub const REJECT_CONSUMER_DEFINED: i32 = 28;

pub(crate) struct ChannelInner {
    ch: NonNull<sys::rdma_event_channel>,
}

// SAFETY: an event channel is an fd wrapper; librdmacm calls on it are thread-safe.
unsafe impl Send for ChannelInner {}
// SAFETY: as above.
unsafe impl Sync for ChannelInner {}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_event_channel; every id on it holds an Arc to this,
        // so all are destroyed.
        unsafe { sys::rdma_destroy_event_channel(self.ch.as_ptr()) };
    }
}

/// A CM event channel with a non-blocking fd, for a poll loop.
#[derive(Clone)]
pub struct EventChannel {
    inner: Arc<ChannelInner>,
}

pub(crate) struct CmIdInner {
    id: NonNull<sys::rdma_cm_id>,
    _ch: Arc<ChannelInner>,
}

// SAFETY: CM ids are used through thread-safe librdmacm calls only.
unsafe impl Send for CmIdInner {}
// SAFETY: as above.
unsafe impl Sync for CmIdInner {}

impl CmIdInner {
    pub(crate) fn as_raw(&self) -> *mut sys::rdma_cm_id {
        self.id.as_ptr()
    }

    fn key(&self) -> usize {
        self.id.as_ptr() as usize
    }

    /// The id's device context; it holds this id (and so librdmacm's device reference).
    fn context(self: &Arc<Self>) -> Option<Arc<Context>> {
        // SAFETY: live id; `verbs` is set once the id is bound or resolved.
        let verbs = NonNull::new(unsafe { (*self.as_raw()).verbs })?;
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(self) as _;
        // SAFETY: `verbs` is this id's context and `keep` is this id.
        Some(unsafe { Context::borrowed(verbs, keep) })
    }
}

impl Drop for CmIdInner {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_id or handed over by a CONNECT_REQUEST; any QP on
        // it was destroyed first (a QueuePair holds an Arc to this); all its events were
        // acked when read, so this cannot block forever.
        let ret = unsafe { sys::rdma_destroy_id(self.as_raw()) };
        if ret != 0 {
            tracing::warn!(ret, "rdma_destroy_id failed");
        }
    }
}

/// What happened, per `rdma_cm_event_type`.
pub enum CmEventKind {
    /// A peer wants to connect to a listener; accept or reject it (dropping it destroys
    /// the id, and the peer times out).
    ConnectRequest(ConnectRequest),
    /// The connection is up.
    Established,
    /// The peer (or we) disconnected. The local QP is *not* changed by this event: call
    /// [`Connection::disconnect`] (which moves the QP to ERROR so outstanding WRs complete
    /// with WR_FLUSH_ERR), drain the CQ, then drop the connection.
    Disconnected,
    /// The peer rejected our connect.
    Rejected,
    /// The peer is unreachable (or did not answer).
    Unreachable,
    /// Connection establishment failed.
    ConnectError,
    /// Address resolved (active side).
    AddrResolved,
    /// Address resolution failed.
    AddrError,
    /// Route resolved (active side).
    RouteResolved,
    /// Route resolution failed.
    RouteError,
    /// The RDMA device went away: destroy everything on it.
    DeviceRemoval,
    /// The QP left TIMEWAIT: its number may be reused, the id may be destroyed.
    TimewaitExit,
    /// The address moved to another device.
    AddrChange,
    /// Any other event (number as in `rdma_cm_event_type`).
    Other(u32),
}

/// One CM event, copied out and already acknowledged.
pub struct CmEvent {
    /// The kind, with the new id for connect requests.
    pub kind: CmEventKind,
    /// Raw `rdma_cm_event_type`.
    pub raw_event: u32,
    /// Key of the id the event is about (compare with `Connection::id_key`).
    pub id_key: usize,
    /// Key of the listening id for connect requests, else 0.
    pub listen_key: usize,
    /// The event's status (reject reason for REJECTED, -errno for errors).
    pub status: i32,
    /// Private data carried by the event (CM-padded: compare a prefix).
    pub private_data: Vec<u8>,
}

impl CmEvent {
    /// librdmacm's name of the event.
    pub fn name(&self) -> &'static str {
        event_name(self.raw_event)
    }
}

impl std::fmt::Debug for CmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmEvent")
            .field("event", &self.name())
            .field("id_key", &self.id_key)
            .field("status", &self.status)
            .field("private_data_len", &self.private_data.len())
            .finish()
    }
}

/// librdmacm's name of a `rdma_cm_event_type`.
pub fn event_name(ev: u32) -> &'static str {
    // SAFETY: rdma_event_str returns a pointer to a static string literal for any value.
    let s = unsafe { CStr::from_ptr(sys::rdma_event_str(ev)) };
    s.to_str().unwrap_or("UNKNOWN")
}

impl EventChannel {
    /// `rdma_create_event_channel`, fd made non-blocking.
    pub fn new() -> Result<EventChannel> {
        // SAFETY: plain constructor; result checked.
        let ch = unsafe { sys::rdma_create_event_channel() };
        let ch = NonNull::new(ch).ok_or_else(|| {
            let e = last_os_error("rdma_create_event_channel");
            match e.errno() {
                Some(libc::ENODEV) | Some(libc::ENOENT) => Error::NoDevice,
                _ => e,
            }
        })?;
        let chan = EventChannel {
            inner: Arc::new(ChannelInner { ch }),
        };
        set_nonblocking(chan.fd())?;
        Ok(chan)
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> RawFd {
        // SAFETY: live channel; fd immutable.
        unsafe { self.inner.ch.as_ref().fd }
    }

    fn create_id(&self) -> Result<Arc<CmIdInner>> {
        let mut id: *mut sys::rdma_cm_id = std::ptr::null_mut();
        // SAFETY: live channel; out-pointer valid.
        let ret = unsafe {
            sys::rdma_create_id(
                self.inner.ch.as_ptr(),
                &mut id,
                std::ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if ret != 0 {
            return Err(last_os_error("rdma_create_id"));
        }
        let id = NonNull::new(id).ok_or_else(|| last_os_error("rdma_create_id"))?;
        Ok(Arc::new(CmIdInner {
            id,
            _ch: Arc::clone(&self.inner),
        }))
    }

    /// Reads one event if one is pending, without blocking.
    pub fn try_event(&self) -> Result<Option<CmEvent>> {
        let mut ev: *mut sys::rdma_cm_event = std::ptr::null_mut();
        // SAFETY: live channel with a non-blocking fd; out-pointer valid.
        let ret = unsafe { sys::rdma_get_cm_event(self.inner.ch.as_ptr(), &mut ev) };
        if ret != 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e == libc::EAGAIN {
                return Ok(None);
            }
            return Err(from_errno("rdma_get_cm_event", e));
        }
        // SAFETY: rdma_get_cm_event succeeded: `ev` is valid until acked below; all fields
        // needed are copied out first.
        let (raw, id, listen, status, pd, resp, init) = unsafe {
            let e = &*ev;
            let conn = e.param.conn;
            let pd = if !conn.private_data.is_null() && conn.private_data_len > 0 {
                std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    conn.private_data_len as usize,
                )
                .to_vec()
            } else {
                Vec::new()
            };
            (
                e.event,
                e.id,
                e.listen_id,
                e.status,
                pd,
                conn.responder_resources,
                conn.initiator_depth,
            )
        };
        // SAFETY: acknowledging the event obtained above, once; nothing of it is used later.
        unsafe { sys::rdma_ack_cm_event(ev) };
        use sys::rdma_cm_event_type::*;
        let kind = match raw {
            RDMA_CM_EVENT_CONNECT_REQUEST => match NonNull::new(id) {
                Some(nid) => CmEventKind::ConnectRequest(ConnectRequest {
                    id: Arc::new(CmIdInner {
                        id: nid,
                        _ch: Arc::clone(&self.inner),
                    }),
                    private_data: pd.clone(),
                    responder_resources: resp,
                    initiator_depth: init,
                }),
                None => CmEventKind::Other(raw),
            },
            RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established,
            RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
            RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected,
            RDMA_CM_EVENT_UNREACHABLE => CmEventKind::Unreachable,
            RDMA_CM_EVENT_CONNECT_ERROR => CmEventKind::ConnectError,
            RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddrResolved,
            RDMA_CM_EVENT_ADDR_ERROR => CmEventKind::AddrError,
            RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
            RDMA_CM_EVENT_ROUTE_ERROR => CmEventKind::RouteError,
            RDMA_CM_EVENT_DEVICE_REMOVAL => CmEventKind::DeviceRemoval,
            RDMA_CM_EVENT_TIMEWAIT_EXIT => CmEventKind::TimewaitExit,
            RDMA_CM_EVENT_ADDR_CHANGE => CmEventKind::AddrChange,
            other => CmEventKind::Other(other),
        };
        Ok(Some(CmEvent {
            kind,
            raw_event: raw,
            id_key: id as usize,
            listen_key: listen as usize,
            status,
            private_data: pd,
        }))
    }

    /// Waits up to `timeout` for one event.
    pub fn wait_event(&self, timeout: Duration) -> Result<Option<CmEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.try_event()? {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            poll_readable(self.fd(), left)?;
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes (EINTR is a spurious wake-up).
pub(crate) fn poll_readable(fd: RawFd, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let ret = unsafe { libc::poll(&mut p, 1, ms) };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(last_os_error("poll"));
    }
    Ok(ret > 0)
}

fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

fn check_private_data(data: &[u8], max: usize, what: &'static str) -> Result<()> {
    if data.len() > max {
        return Err(Error::PrivateDataTooLong {
            len: data.len(),
            max,
            what,
        });
    }
    Ok(())
}

fn bind_error(addr: SocketAddr, errno: i32) -> Error {
    match errno {
        libc::EADDRINUSE => Error::AddrInUse { addr },
        libc::EADDRNOTAVAIL | libc::ENODEV | libc::ENOENT => Error::NoDeviceForAddress {
            addr,
            source: std::io::Error::from_raw_os_error(errno),
        },
        e => from_errno("rdma_bind_addr", e),
    }
}

fn bind(id: &CmIdInner, addr: SocketAddr) -> Result<()> {
    let mut ss = to_sockaddr(addr);
    // SAFETY: live id; `ss` holds a valid sockaddr for the family.
    let ret = unsafe {
        sys::rdma_bind_addr(id.as_raw(), (&mut ss as *mut libc::sockaddr_storage).cast())
    };
    if ret != 0 {
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(bind_error(addr, e));
    }
    Ok(())
}

/// The device context behind local address `ip` (the one the RDMA CM will use for ids
/// bound or routed through it): create PDs, CQs and SRQs on it before listening or
/// connecting.
pub fn context_for(ip: IpAddr) -> Result<Arc<Context>> {
    let ch = EventChannel::new()?;
    let id = ch.create_id()?;
    let addr = SocketAddr::new(ip, 0);
    bind(&id, addr)?;
    id.context().ok_or(Error::NoDeviceForAddress {
        addr,
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    })
}

/// A listening CM id. Its connect requests, and the events of connections accepted from
/// it, arrive on the [`EventChannel`] it was bound with.
pub struct Listener {
    id: Arc<CmIdInner>,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `addr` (an address with an RDMA device; port 0 picks one) and listens.
    pub fn bind(channel: &EventChannel, addr: SocketAddr, backlog: i32) -> Result<Listener> {
        let id = channel.create_id()?;
        bind(&id, addr)?;
        if !addr.ip().is_unspecified() && id.context().is_none() {
            return Err(Error::NoDeviceForAddress {
                addr,
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            });
        }
        // SAFETY: live, bound id.
        if unsafe { sys::rdma_listen(id.as_raw(), backlog) } != 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            return Err(match e {
                libc::EADDRINUSE => Error::AddrInUse { addr },
                e => from_errno("rdma_listen", e),
            });
        }
        // SAFETY: live id; returns the bound port in network order.
        let port = u16::from_be(unsafe { sys::rdma_get_src_port(id.as_raw()) });
        Ok(Listener {
            id,
            addr: SocketAddr::new(addr.ip(), port),
        })
    }

    /// The bound address, with the real port.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The device context (None when bound to the wildcard address). It keeps the
    /// listening id alive while it lives.
    pub fn context(&self) -> Option<Arc<Context>> {
        self.id.context()
    }

    /// Key of the listening id (matches [`CmEvent::listen_key`]).
    pub fn id_key(&self) -> usize {
        self.id.key()
    }

    /// The raw CM id.
    pub fn as_raw(&self) -> *mut sys::rdma_cm_id {
        self.id.as_raw()
    }
}

/// An incoming connection request: accept it with a QP, or reject it.
pub struct ConnectRequest {
    id: Arc<CmIdInner>,
    private_data: Vec<u8>,
    responder_resources: u8,
    initiator_depth: u8,
}

impl ConnectRequest {
    /// The initiator's private data (CM-padded to 56 bytes on IB/RoCE).
    pub fn private_data(&self) -> &[u8] {
        &self.private_data
    }

    /// The device context the connection arrives on (it keeps this id alive while it
    /// lives; prefer a context from [`context_for`] for long-lived resources).
    pub fn context(&self) -> Option<Arc<Context>> {
        self.id.context()
    }

    /// Key of the new id (matches later events' [`CmEvent::id_key`]).
    pub fn id_key(&self) -> usize {
        self.id.key()
    }

    /// Creates the QP (on `pd`, with `init`'s CQs and optional SRQ) and accepts with
    /// `private_data`. ESTABLISHED follows on the channel.
    pub fn accept(
        self,
        pd: &Arc<ProtectionDomain>,
        init: &QpInit,
        private_data: &[u8],
    ) -> Result<Connection> {
        check_private_data(private_data, MAX_ACCEPT_PRIVATE_DATA, "accept")?;
        let qp = create_cm_qp(&self.id, pd, init)?;
        let mut param = sys::rdma_conn_param {
            private_data: private_data.as_ptr().cast(),
            private_data_len: private_data.len() as u8,
            responder_resources: self.responder_resources.min(16),
            initiator_depth: self.initiator_depth.min(16),
            retry_count: 7,
            rnr_retry_count: 7,
            srq: u8::from(init.srq.is_some()),
            ..Default::default()
        };
        // SAFETY: live id with a QP; `param` and its private data live for the call.
        if unsafe { sys::rdma_accept(self.id.as_raw(), &mut param) } != 0 {
            return Err(last_os_error("rdma_accept"));
        }
        Ok(Connection {
            qp,
            id: self.id,
            peer_private_data: self.private_data,
            channel: None,
        })
    }

    /// Rejects with `private_data` (the initiator sees [`Error::Rejected`]); the id is
    /// destroyed.
    pub fn reject(self, private_data: &[u8]) -> Result<()> {
        check_private_data(private_data, MAX_REJECT_PRIVATE_DATA, "reject")?;
        // SAFETY: live id; private data lives for the call.
        let ret = unsafe {
            sys::rdma_reject(
                self.id.as_raw(),
                private_data.as_ptr().cast(),
                private_data.len() as u8,
            )
        };
        if ret != 0 {
            return Err(last_os_error("rdma_reject"));
        }
        Ok(())
    }
}

fn create_cm_qp(
    id: &Arc<CmIdInner>,
    pd: &Arc<ProtectionDomain>,
    init: &QpInit,
) -> Result<QueuePair> {
    // SAFETY: live id.
    if unsafe { (*id.as_raw()).verbs } != pd.context().as_raw() {
        return Err(Error::ForeignPd);
    }
    let mut attr = init.to_attr();
    // SAFETY: live id and PD of the same context; CQs/SRQ kept alive by `init` clone in
    // the QueuePair.
    if unsafe { sys::rdma_create_qp(id.as_raw(), pd.as_raw(), &mut attr) } != 0 {
        return Err(last_os_error("rdma_create_qp"));
    }
    // SAFETY: rdma_create_qp succeeded, so id->qp is set.
    let qp = NonNull::new(unsafe { (*id.as_raw()).qp }).ok_or(Error::NoQp)?;
    Ok(QueuePair::from_cm(qp, Arc::clone(id), pd, init))
}

/// An established (or being established) RC connection: its QP and CM id.
///
/// Dropping it destroys the QP, then the CM id (then the private event channel of an
/// active-side connection). Move the QP to error and drain first: destroying a QP with work
/// requests still posted leaves completions that point at freed buffers.
pub struct Connection {
    // Field order is drop order: QP before the id it was created on.
    qp: QueuePair,
    id: Arc<CmIdInner>,
    peer_private_data: Vec<u8>,
    channel: Option<EventChannel>,
}

impl Connection {
    /// The QP.
    pub fn qp(&self) -> &QueuePair {
        &self.qp
    }

    /// Private data the peer sent (connect request or accept), CM-padded.
    pub fn peer_private_data(&self) -> &[u8] {
        &self.peer_private_data
    }

    /// Key of the CM id (matches [`CmEvent::id_key`]).
    pub fn id_key(&self) -> usize {
        self.id.key()
    }

    /// The raw CM id.
    pub fn as_raw(&self) -> *mut sys::rdma_cm_id {
        self.id.as_raw()
    }

    /// `rdma_disconnect`: the local QP goes to ERROR (outstanding WRs flush) and both
    /// sides get DISCONNECTED. Also the answer to a peer's DISCONNECTED; calling it twice
    /// is harmless.
    pub fn disconnect(&self) -> Result<()> {
        // SAFETY: live id.
        if unsafe { sys::rdma_disconnect(self.id.as_raw()) } != 0 {
            let e = last_os_error("rdma_disconnect");
            // librdmacm errors the QP before asking the kernel; the kernel answers EINVAL
            // when the connection is already down, which is what the caller wanted.
            if e.errno() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The private event channel of an active-side connection (DISCONNECTED arrives there).
    pub fn channel(&self) -> Option<&EventChannel> {
        self.channel.as_ref()
    }
}

/// Active side, step 1: resolve address and route of `dst` on a private event channel.
pub struct Connector {
    id: Arc<CmIdInner>,
    channel: EventChannel,
    dst: SocketAddr,
}

fn expect_event(
    ch: &EventChannel,
    want: u32,
    dst: SocketAddr,
    timeout: Duration,
    during: &'static str,
) -> Result<CmEvent> {
    let ev = ch.wait_event(timeout)?.ok_or(Error::Timeout {
        what: during,
        timeout,
    })?;
    if ev.raw_event == want {
        return Ok(ev);
    }
    use sys::rdma_cm_event_type::*;
    Err(match ev.raw_event {
        RDMA_CM_EVENT_REJECTED if ev.status == REJECT_INVALID_SERVICE_ID => Error::NoListener {
            addr: dst,
            status: ev.status,
        },
        RDMA_CM_EVENT_REJECTED => Error::Rejected {
            addr: dst,
            status: ev.status,
            private_data: ev.private_data,
        },
        RDMA_CM_EVENT_ADDR_ERROR
        | RDMA_CM_EVENT_ROUTE_ERROR
        | RDMA_CM_EVENT_UNREACHABLE
        | RDMA_CM_EVENT_CONNECT_ERROR => Error::Unreachable {
            addr: dst,
            event: event_name(ev.raw_event),
            status: ev.status,
        },
        other => Error::UnexpectedCmEvent {
            event: event_name(other),
            status: ev.status,
            during,
        },
    })
}

impl Connector {
    /// Resolves `dst` (address then route), each step bounded by `timeout`.
    pub fn resolve(dst: SocketAddr, timeout: Duration) -> Result<Connector> {
        let channel = EventChannel::new()?;
        let id = channel.create_id()?;
        let mut ss = to_sockaddr(dst);
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: live id; `ss` valid; NULL source lets the CM pick.
        let ret = unsafe {
            sys::rdma_resolve_addr(
                id.as_raw(),
                std::ptr::null_mut(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                ms,
            )
        };
        if ret != 0 {
            return Err(last_os_error("rdma_resolve_addr"));
        }
        expect_event(
            &channel,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
            dst,
            timeout + Duration::from_secs(1),
            "address resolution",
        )?;
        // SAFETY: live id with a resolved address.
        if unsafe { sys::rdma_resolve_route(id.as_raw(), ms) } != 0 {
            return Err(last_os_error("rdma_resolve_route"));
        }
        expect_event(
            &channel,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            dst,
            timeout + Duration::from_secs(1),
            "route resolution",
        )?;
        Ok(Connector { id, channel, dst })
    }

    /// The device context the connection will use.
    pub fn context(&self) -> Option<Arc<Context>> {
        self.id.context()
    }

    /// Step 2: create the QP and connect with `private_data`, waiting up to `timeout`
    /// for ESTABLISHED. Rejection gives [`Error::Rejected`] (with the peer's private
    /// data) or [`Error::NoListener`].
    pub fn connect(
        self,
        pd: &Arc<ProtectionDomain>,
        init: &QpInit,
        private_data: &[u8],
        timeout: Duration,
    ) -> Result<Connection> {
        check_private_data(private_data, MAX_CONNECT_PRIVATE_DATA, "connect")?;
        let qp = create_cm_qp(&self.id, pd, init)?;
        let mut param = sys::rdma_conn_param {
            private_data: private_data.as_ptr().cast(),
            private_data_len: private_data.len() as u8,
            responder_resources: 16,
            initiator_depth: 16,
            retry_count: 7,
            rnr_retry_count: 7,
            ..Default::default()
        };
        // SAFETY: live id with a QP; `param` lives for the call.
        if unsafe { sys::rdma_connect(self.id.as_raw(), &mut param) } != 0 {
            return Err(last_os_error("rdma_connect"));
        }
        let ev = expect_event(
            &self.channel,
            sys::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            self.dst,
            timeout,
            "connection establishment",
        )?;
        Ok(Connection {
            qp,
            id: self.id,
            peer_private_data: ev.private_data,
            channel: Some(self.channel),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_data_limits_are_typed() {
        let big = [0u8; 57];
        let e = check_private_data(&big, MAX_CONNECT_PRIVATE_DATA, "connect").unwrap_err();
        assert!(matches!(
            e,
            Error::PrivateDataTooLong {
                len: 57,
                max: 56,
                what: "connect"
            }
        ));
        assert!(check_private_data(&big[..56], MAX_CONNECT_PRIVATE_DATA, "connect").is_ok());
    }

    #[test]
    fn bind_errors_are_typed() {
        let a: SocketAddr = "10.0.0.1:4420".parse().unwrap();
        assert!(matches!(
            bind_error(a, libc::EADDRINUSE),
            Error::AddrInUse { .. }
        ));
        assert!(matches!(
            bind_error(a, libc::EADDRNOTAVAIL),
            Error::NoDeviceForAddress { .. }
        ));
        assert!(bind_error(a, libc::ENODEV)
            .to_string()
            .contains("rdma link add"));
    }

    #[test]
    fn sockaddr_v4_is_network_order() {
        let ss = to_sockaddr("10.99.0.1:4420".parse().unwrap());
        // SAFETY: to_sockaddr wrote a sockaddr_in for a V4 address.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u16::from_be(sin.sin_port), 4420);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [10, 99, 0, 1]);
    }

    #[test]
    fn event_names_come_from_librdmacm() {
        assert_eq!(
            event_name(sys::rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED),
            "RDMA_CM_EVENT_DISCONNECTED"
        );
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    /// On a host without RDMA (the build machine) the CM entry points fail with one clear
    /// error, never a panic; with a device present this only checks they do not panic.
    #[test]
    fn cm_without_device_is_a_clear_error() {
        if crate::device::device_names().unwrap().is_empty() {
            let e = EventChannel::new()
                .err()
                .expect("event channel without RDMA");
            assert!(e.to_string().contains("rdma link add"), "{e}");
            let e = context_for("127.0.0.1".parse().unwrap())
                .err()
                .expect("context without RDMA");
            assert!(e.to_string().contains("rdma link add"), "{e}");
        } else {
            let _ = context_for("127.0.0.1".parse().unwrap());
        }
    }
}
