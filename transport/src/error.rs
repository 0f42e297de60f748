//! The crate's one error type.

use std::path::PathBuf;

/// How a direct queue was found lost ([`Error::DirectQueueLost`]).
#[derive(Debug, thiserror::Error)]
pub enum LostCause {
    /// A work completion failed (status, opcode, QP and id in the rdma error).
    #[error(transparent)]
    WorkCompletion(#[from] rdma::Error),
    /// The target's side of the connection went away (the CM event).
    #[error("{0}")]
    CmEvent(&'static str),
}

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
    /// An RDMA verbs or RDMA CM operation of one queue failed.
    #[error("queue {qid}: rdma: {op}: {source}")]
    QueueRdma {
        /// Queue id (0 = admin).
        qid: u16,
        /// What was being done.
        op: &'static str,
        /// The rdma crate's error.
        #[source]
        source: rdma::Error,
    },
    /// A system call of the transport (eventfd, thread spawn) failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The RDMA transport was given no address to listen on.
    #[error("no listen address")]
    NoListenAddress,
    /// A listen address on another RDMA device than the target's first listener.
    #[error(
        "{addr} is on RDMA device {device}, the target serves on {serving}: one device per target"
    )]
    ListenerOnOtherDevice {
        /// The address.
        addr: std::net::IpAddr,
        /// Its device.
        device: String,
        /// The device of the target's queue pairs.
        serving: String,
    },
    /// A listener to remove is not there.
    #[error("not listening on {addr}")]
    NotListening {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// The serve loop that applies listener changes is not running (or did not answer).
    #[error("the serve loop is not running")]
    ServeLoopGone,
    /// A poll group was asked to accept a queue pair before its buffer pool was registered.
    #[error("buffer pool not registered with the poll group")]
    PoolNotRegistered,
    /// A poll group has no queue slot left.
    #[error("too many queue pairs in one poll group (at most {max})")]
    TooManyQueuePairs {
        /// Slots a poll group has.
        max: usize,
    },
    /// The route to a peer leads to no RDMA device.
    #[error("no RDMA device on the route to {dst}")]
    NoRouteDevice {
        /// The peer.
        dst: std::net::SocketAddr,
    },
    /// A command's in-capsule data is larger than the queue's capsules.
    #[error("queue {qid}: {len} bytes of in-capsule data do not fit (at most {max})")]
    CapsuleTooLarge {
        /// Queue id.
        qid: u16,
        /// In-capsule data length.
        len: usize,
        /// Largest in-capsule data of the queue.
        max: usize,
    },
    /// No response arrived in time.
    #[error("queue {qid}: no response within {timeout:?}")]
    NoResponse {
        /// Queue id.
        qid: u16,
        /// How long was waited.
        timeout: std::time::Duration,
    },
    /// The controller did not set CSTS.RDY after CC.EN.
    #[error("queue {qid}: the controller never became ready (CSTS.RDY) within {timeout:?}")]
    NotReady {
        /// Queue id (the admin queue).
        qid: u16,
        /// How long was waited.
        timeout: std::time::Duration,
    },
    /// The transport connection of an initiator queue could not be made.
    #[error("cannot connect to {dst} (queue {qid}): {source} (is a target listening there?)")]
    Unreachable {
        /// Target address.
        dst: std::net::SocketAddr,
        /// Queue id.
        qid: u16,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The target refused a fabrics Connect (named by [`crate::fabrics::connect_refusal`]).
    #[error("{dst}: {}", crate::fabrics::connect_refusal(*.sct, *.sc, *.result, .subnqn, .hostnqn))]
    ConnectRefused {
        /// Target address.
        dst: std::net::SocketAddr,
        /// Queue id.
        qid: u16,
        /// Subsystem NQN asked for.
        subnqn: String,
        /// Host NQN given.
        hostnqn: String,
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
        /// Completion DW0 (IATTR/IPO).
        result: u32,
    },
    /// A fabrics Connect failed for another reason than a refusal.
    #[error("fabrics Connect of queue {qid} to {subnqn} at {dst} as {hostnqn} failed: {source}")]
    ConnectFailed {
        /// Target address.
        dst: std::net::SocketAddr,
        /// Queue id.
        qid: u16,
        /// Subsystem NQN asked for.
        subnqn: String,
        /// Host NQN given.
        hostnqn: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// Identify Namespace failed.
    #[error("Identify namespace {nsid}: {source}")]
    Identify {
        /// Namespace id.
        nsid: u32,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The namespace reports no size: it is not active on the subsystem.
    #[error("namespace {nsid} is not active on {subnqn}")]
    NamespaceInactive {
        /// Namespace id.
        nsid: u32,
        /// Subsystem NQN.
        subnqn: String,
    },
    /// A Keep Alive completed with an error status.
    #[error("Keep Alive failed: {}", crate::fabrics::refusal(*.sct, *.sc))]
    KeepAliveFailed {
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
    },
    /// A Keep Alive was still unanswered when the next was due.
    #[error("Keep Alive unanswered for {waited:?}: the target stopped answering")]
    KeepAliveUnanswered {
        /// How long it has been out.
        waited: std::time::Duration,
    },
    /// A direct-mode I/O of a size the queue cannot carry.
    #[error(
        "queue {qid}: direct I/O of {len} bytes (a multiple of {lba_size} up to {max} is needed)"
    )]
    DirectIoSize {
        /// Queue id.
        qid: u16,
        /// Requested length.
        len: usize,
        /// LBA size.
        lba_size: usize,
        /// Largest I/O of the queue.
        max: usize,
    },
    /// A direct-mode zero-copy submission named a pool slot that is busy or not there.
    #[error("queue {qid}: direct pool slot {slot} is {}", if *.busy { "in use" } else { "beyond the queue" })]
    DirectSlot {
        /// Queue id.
        qid: u16,
        /// The slot asked for.
        slot: u16,
        /// True: in use; false: beyond the queue's slots.
        busy: bool,
    },
    /// A direct queue cannot carry the configured I/O size with what the target offered.
    #[error("direct queue {qid} cannot carry {io_size}-byte I/O (LBA {lba_size}, MDTS {max_transfer}, pool {pool_len} for depth {depth})")]
    DirectQueueShape {
        /// Queue id.
        qid: u16,
        /// Configured I/O size.
        io_size: usize,
        /// LBA size of the namespace.
        lba_size: usize,
        /// Largest transfer the target allows.
        max_transfer: u32,
        /// Pool bytes the target offered.
        pool_len: u64,
        /// Queue depth.
        depth: u16,
    },
    /// A direct queue is gone: a work request failed or the target disconnected.
    #[error("queue {qid}: direct queue lost: {cause}")]
    DirectQueueLost {
        /// Queue id.
        qid: u16,
        /// What showed it.
        #[source]
        cause: LostCause,
    },
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
