//! Safe libibverbs/librdmacm wrappers and the adaptive polled engine.
//!
//! Ownership follows the verbs object tree: every child holds an `Arc` to its parent
//! (MR → PD → context, QP → PD + CQs + SRQ, CQ → completion channel → context), so
//! parents are destroyed after their children, each in its own `Drop`. Raw handles are
//! reachable through `as_raw()` for calls into [`rdma_sys`].
//!
//! Work requests are built in caller-owned fixed arrays ([`SendBatch`], [`RecvBatch`]) and
//! posted as one linked chain per call, without heap allocation; completions are polled
//! into caller-owned arrays of [`WorkCompletion`].
//!
//! # A target's poll group in outline
//!
//! Resources for RDMA CM connections are created on the context of the device behind
//! the listen address ([`cm::context_for`]); connections are accepted onto a shared CQ and
//! SRQ; one [`Engine`] per core polls the CQ and the CM channel and sleeps when idle.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::sync::Arc;
//! use rdma::cm::{self, CmEvent, CmEventKind, EventChannel, Listener};
//! use rdma::engine::{Engine, EngineConfig, Handler};
//! use rdma::*;
//!
//! struct Group {
//!     pd: Arc<ProtectionDomain>,
//!     init: QpInit,
//!     conns: Vec<Connection>,
//! }
//!
//! impl Handler for Group {
//!     type Msg = ();
//!     fn on_completion(&mut self, _cq: usize, wc: &WorkCompletion) {
//!         match wc.result() {
//!             Ok(_wc) => { /* RECV: parse the capsule at wc.wr_id(); RDMA_READ: data in */ }
//!             Err(e) => eprintln!("{e}"), // names status, opcode and QP
//!         }
//!     }
//!     fn on_cm_event(&mut self, _ch: usize, ev: CmEvent) {
//!         match ev.kind {
//!             CmEventKind::ConnectRequest(req) if req.private_data().len() >= 8 => {
//!                 // NVMe-oF: accept private data {recfmt, crqsize}.
//!                 if let Ok(c) = req.accept(&self.pd, &self.init, &[0, 0, 128, 0]) {
//!                     self.conns.push(c);
//!                 }
//!             }
//!             CmEventKind::ConnectRequest(req) => {
//!                 let _ = req.reject(&[0, 0, 1, 0]); // {recfmt, sts}
//!             }
//!             CmEventKind::Disconnected => {
//!                 // Error the QP so in-flight WRs flush; drop once they are drained.
//!                 if let Some(c) = self.conns.iter().find(|c| c.id_key() == ev.id_key) {
//!                     let _ = c.disconnect();
//!                 }
//!             }
//!             CmEventKind::TimewaitExit => self.conns.retain(|c| c.id_key() != ev.id_key),
//!             _ => {}
//!         }
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
//!         rb.recv(i as u64, Some(buf.mr().sge(i * 4096, 4096)?))?;
//!     }
//!     init.srq.as_ref().unwrap().post_recv(&mut rb)?;
//!
//!     let events = EventChannel::new()?;
//!     let _listener = Listener::bind(&events, SocketAddr::new(ip, 4420), 128)?;
//!     let mut engine = Engine::new(EngineConfig::default())?;
//!     engine.add_cq(&cq)?;
//!     engine.add_cm_channel(&events)?;
//!     let mut group = Group { pd, init, conns: Vec::new() };
//!     engine.run(&mut group)
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
//!     .write(1, data, pool, SendFlags::NONE)?
//!     .write(2, sqe, sq, SendFlags::NONE)?
//!     .write(3, tail, db, SendFlags::SIGNALED)?;
//! qp.post_send(&mut chain)?;
//! # Ok(()) }
//! ```

pub mod cm;
pub mod cq;
pub mod device;
pub mod engine;
pub mod error;
pub mod mr;
pub mod pd;
pub mod qp;
pub mod srq;
pub mod wr;

pub use rdma_sys as sys;

pub use cm::{CmEvent, CmEventKind, ConnectRequest, Connection, Connector, EventChannel, Listener};
pub use cq::{CompletionChannel, CompletionQueue};
pub use device::{device_names, Context};
pub use engine::{Engine, EngineConfig, EngineCounters, EngineHandle, Handler};
pub use error::{Error, Result};
pub use mr::{Access, MemoryRegion, RegisteredBuffer};
pub use pd::ProtectionDomain;
pub use qp::{QpInit, QueuePair, RemoteQp};
pub use srq::SharedReceiveQueue;
pub use wr::{
    RecvBatch, RemoteAddr, SendBatch, SendFlags, Sge, WcOpcode, WcStatus, WorkCompletion,
};
