//! Safe libibverbs/librdmacm wrappers and the per-core reactor.
//!
//! Ownership follows the verbs object tree: every child holds an `Arc` to its parent
//! (MR → PD → context, QP → PD + CQs + SRQ, CQ → completion channel → context), so
//! parents are destroyed after their children, each in its own `Drop`. Raw handles are
//! reachable through `as_raw()` for calls into [`rdma_sys`].
//!
//! Work requests are built in caller-owned fixed arrays ([`SendBatch`], [`RecvBatch`]) and
//! posted as one linked chain per call, without heap allocation; completions are polled
//! into caller-owned arrays of [`WorkCompletion`]. Every work request carries a [`WrId`]
//! (queue slot, generation, operation kind, tag), the one `wr_id` layout of the workspace.
//!
//! # A target's poll group in outline
//!
//! Resources for RDMA CM connections are created on the context of the device behind
//! the listen address ([`cm::context_for`]); connections are accepted onto a shared CQ and
//! SRQ; one [`Reactor`] per core polls the CQ (a [`Poller`]) and sleeps when idle, while
//! connection setup runs on a thread of its own.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::sync::atomic::AtomicBool;
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use rdma::cm::{self, CmEventKind, EventChannel, Listener};
//! use rdma::reactor::{Arm, Poller, Reactor, ReactorConfig, WakeSet};
//! use rdma::*;
//!
//! /// One core's queues: a shared CQ with its completion channel.
//! struct Group {
//!     cq: Arc<CompletionQueue>,
//!     chan: Arc<CompletionChannel>,
//!     wcs: [WorkCompletion; 32],
//! }
//!
//! impl Poller for Group {
//!     fn poll(&mut self, _now: Instant) -> usize {
//!         let n = self.cq.poll(&mut self.wcs).unwrap_or(0);
//!         for wc in &self.wcs[..n] {
//!             match wc.result() {
//!                 Ok(_wc) => { /* RECV: parse the capsule in buffer wc.wr_id().tag(); RDMA_READ: data in */ }
//!                 Err(e) => eprintln!("{e}"), // names status, opcode and QP
//!             }
//!         }
//!         n
//!     }
//!     fn arm(&mut self, _idle: Duration, wake: &mut WakeSet) -> Arm {
//!         if self.cq.arm(false).is_err() {
//!             return Arm::Nap(Duration::from_millis(1));
//!         }
//!         wake.add(self.chan.fd(), 0);
//!         // A completion between the last poll and the arm raises no event: look again.
//!         if self.poll(Instant::now()) > 0 { Arm::Ready } else { Arm::Sleep }
//!     }
//!     fn woken(&mut self, _tag: u32) {
//!         let _ = self.chan.drain_events();
//!     }
//! }
//!
//! fn main() -> rdma::Result<()> {
//!     let ip = "10.99.0.1".parse().unwrap();
//!     let ctx = cm::context_for(ip)?;
//!     let pd = ProtectionDomain::new(&ctx)?;
//!     let chan = CompletionChannel::new(&ctx)?;
//!     let cq = CompletionQueue::new(&ctx, 4096, Some(&chan))?;
//!     let mut init = QpInit::new(&cq);
//!     init.srq = Some(SharedReceiveQueue::new(&pd, 1024, 1)?);
//!
//!     // Data buffers: RegisteredBuffer, or `unsafe MemoryRegion::register` over VFIO-mapped
//!     // memory, or MemoryRegion::register_dmabuf (Error::Unsupported on soft-RoCE).
//!     let buf = RegisteredBuffer::new(&pd, 1 << 20, Access::ALL)?;
//!     let mut rb = RecvBatch::<32>::new();
//!     for i in 0..32 {
//!         rb.recv(WrId::new(1, i as u32), Some(buf.mr().sge(i * 4096, 4096)?))?;
//!     }
//!     init.srq.as_ref().unwrap().post_recv(&mut rb)?;
//!
//!     // The data path runs on a reactor thread; connection setup stays on this one.
//!     let mut reactor = Reactor::new(ReactorConfig::default())?;
//!     reactor.add(Box::new(Group { cq, chan, wcs: [WorkCompletion::default(); 32] }));
//!     let stop = Arc::new(AtomicBool::new(false));
//!     let s = stop.clone();
//!     std::thread::spawn(move || reactor.run(&s));
//!
//!     let events = EventChannel::new()?;
//!     let _listener = Listener::bind(&events, SocketAddr::new(ip, 4420), 128)?;
//!     let mut conns = Vec::new();
//!     loop {
//!         // A real target sleeps in poll(2) on `events.fd()` instead of napping.
//!         let Some(ev) = events.try_event()? else {
//!             std::thread::sleep(Duration::from_millis(10));
//!             continue;
//!         };
//!         match ev.kind {
//!             // NVMe-oF: accept private data {recfmt, crqsize}.
//!             CmEventKind::ConnectRequest(req) => conns.push(req.accept(&pd, &init, &[0, 0, 128, 0])?),
//!             CmEventKind::TimewaitExit => conns.retain(|c: &Connection| c.id_key() != ev.id_key),
//!             _ => {}
//!         }
//!     }
//! }
//! ```
//!
//! A chained post (one `ibv_post_send`, no allocation), as direct mode writes data, then
//! the SQ entry, then the doorbell, with only the last WR signaled:
//!
//! ```no_run
//! # use rdma::*;
//! # fn f(qp: &QueuePair, data: Sge, sqe: Sge, tail: Sge, pool: RemoteAddr, sq: RemoteAddr,
//! #      db: RemoteAddr) -> rdma::Result<()> {
//! let mut chain = SendBatch::<3>::new();
//! chain
//!     .write(WrId::new(1, 0), data, pool, SendFlags::NONE)?
//!     .write(WrId::new(1, 1), sqe, sq, SendFlags::NONE)?
//!     .write(WrId::new(1, 2), tail, db, SendFlags::SIGNALED)?;
//! qp.post_send(&mut chain)?;
//! # Ok(()) }
//! ```

pub mod cm;
pub mod cq;
pub mod device;
pub mod error;
pub mod mr;
pub mod pd;
pub mod qp;
pub mod reactor;
pub mod srq;
pub mod wr;
pub mod wr_id;

pub use rdma_sys as sys;

pub use cm::{CmEvent, CmEventKind, ConnectRequest, Connection, Connector, EventChannel, Listener};
pub use cq::{CompletionChannel, CompletionQueue};
pub use device::{device_names, Context};
pub use error::{Error, Result};
pub use mr::{Access, MemoryRegion, RegisteredBuffer};
pub use pd::ProtectionDomain;
pub use qp::{QpInit, QueuePair, RemoteQp};
pub use reactor::{
    Arm, Poller, Reactor, ReactorConfig, ReactorCounters, ReactorHandle, Spell, WakeSet,
};
pub use srq::SharedReceiveQueue;
pub use wr::{
    RecvBatch, RemoteAddr, SendBatch, SendFlags, Sge, WcOpcode, WcStatus, WorkCompletion,
};
pub use wr_id::WrId;
