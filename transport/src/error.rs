//! The crate's one error type.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in the transport crate, with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("{}: cannot read configuration: {source}", file.display())]
    ConfigRead {
        /// Path of the configuration file.
        file: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is syntactically or semantically invalid.
    #[error("{}:{line}:{column}: field `{field}`: {message}", file.display())]
    Config {
        /// Path of the configuration file (or `<string>`).
        file: PathBuf,
        /// 1-based line of the offending value (0 when unknown).
        line: usize,
        /// 1-based column of the offending value (0 when unknown).
        column: usize,
        /// Dotted path or key name of the offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A namespace backend specification (`ram:SIZE`, `file:PATH`, `vfio:BDF[:nsid]`) is invalid.
    #[error("invalid backend `{spec}`: {reason}")]
    BackendSpec {
        /// The specification as written.
        spec: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A namespace backend failed to open or to perform I/O.
    #[error("backend {backend}: {op} failed: {source}")]
    BackendIo {
        /// Backend description (e.g. `file:/tmp/x`).
        backend: String,
        /// Operation that failed.
        op: &'static str,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The NVMe driver (the `nvme` crate) failed an operation of a device backend
    /// (`vfio:BDF[:nsid]`, or a controller over the simulator).
    #[error("backend {backend}: {op} failed: {source}")]
    Nvme {
        /// Backend description: the device, and the namespace when the operation is one
        /// namespace's (e.g. `vfio:0000:00:04.0:1`).
        backend: String,
        /// Operation that failed.
        op: &'static str,
        /// The driver's error (boxed: it is large, and errors are the cold path).
        #[source]
        source: Box<nvme::Error>,
    },
    /// A device backend names a namespace its controller does not have (or not active).
    #[error("backend {backend}: open namespace failed: the controller has no active namespace {nsid} (active: {active:?})")]
    NoSuchNamespace {
        /// Backend description (e.g. `vfio:0000:00:04.0:2`).
        backend: String,
        /// The namespace asked for.
        nsid: u32,
        /// The controller's active namespaces.
        active: Vec<u32>,
    },
    /// This kind of backend exists in the configuration model but is not available here.
    #[error("backend kind `{kind}` is not available: {reason}")]
    BackendUnavailable {
        /// Backend kind (`vfio`).
        kind: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// An I/O request addressed blocks outside the namespace.
    #[error("lba range {slba}+{nlb} outside namespace of {blocks} blocks")]
    LbaOutOfRange {
        /// Starting LBA.
        slba: u64,
        /// Number of blocks.
        nlb: u64,
        /// Namespace size in blocks.
        blocks: u64,
    },
    /// A caller buffer does not match the requested transfer length.
    #[error("buffer of {got} bytes where {expected} were needed")]
    BufferSize {
        /// Required size.
        expected: usize,
        /// Given size.
        got: usize,
    },
    /// The transport lost or refused a connection.
    #[error("queue {qid}: transport error: {reason}")]
    Transport {
        /// Queue id (0 = admin; `u16::MAX` = not yet known).
        qid: u16,
        /// What happened.
        reason: String,
    },
    /// The RDMA CM connection request was rejected (NVMe-oF RDMA CM reject status).
    #[error("connection rejected: RDMA CM status {status:#x}")]
    CmReject {
        /// NVMe-oF RDMA CM reject status (`RDMA_CM_...` values of the RDMA binding).
        status: u16,
    },
    /// The initiator has no free command identifier / queue slot.
    #[error("queue {qid}: queue full ({depth} commands outstanding)")]
    QueueFull {
        /// Queue id.
        qid: u16,
        /// Queue depth.
        depth: u16,
    },
    /// A command completed with a non-zero NVMe status.
    #[error("queue {qid}: command {cid} failed: {}", crate::fabrics::refusal(*.sct, *.sc))]
    CommandFailed {
        /// Queue id.
        qid: u16,
        /// Command identifier.
        cid: u16,
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
        /// Completion DW0 (e.g. IATTR/IPO of a refused Connect).
        result: u32,
    },
    /// An RDMA verbs or RDMA CM operation failed.
    #[error("rdma: {op}: {source}")]
    Rdma {
        /// What was being done.
        op: &'static str,
        /// The rdma crate's error.
        #[source]
        source: rdma::Error,
    },
    /// Setting up an initiator session ([`crate::nvmf_rdma::Session`]) failed; the message names
    /// the step, the cause and what to check.
    #[error("{0}")]
    Session(String),
    /// Malformed data received from a peer.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it is malformed.
        reason: String,
    },
    /// Poll groups did not answer a request to hold their backend I/O (a device reset
    /// was not started).
    #[error("{groups} poll group(s) did not hold their backend I/O within {waited:?}: the device was not reset; retry, or restart the target if it persists")]
    Quiesce {
        /// Groups that did not answer.
        groups: usize,
        /// How long the request waited.
        waited: std::time::Duration,
    },
}
