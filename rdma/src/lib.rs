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
