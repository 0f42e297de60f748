//! The transport interface: what the NVMe-oF core needs from a wire.
//!
//! "The core owns the NVMe protocol, the transport owns the wire." A transport (RDMA, or
//! the in-process [`loopback`](crate::loopback)) delivers command capsules, moves data
//! between host memory and the core's buffers (RDMA READ/WRITE of keyed SGLs) and sends
//! response capsules. It knows nothing about NVMe commands; the core knows nothing about
//! verbs. Modelled on SPDK's `spdk_nvmf_transport_ops` and Linux `nvmet_fabrics_ops`.
//!
//! Ownership rule for data transfers: a buffer passed to [`Qpair::post_read`] or
//! [`Qpair::post_write`] is a [`DataBuf`] of the pool the poll group registered through
//! [`WirePollGroup::register_memory`] — a handle, not a slice: the transport reaches the
//! memory by address, as the NIC does — and the core makes no CPU view of it
//! ([`DataBuf::bytes`], which is `unsafe`) until the matching [`TransferDone`] comes
//! back from [`Qpair::poll_transfer`] (also after [`Qpair::disconnect`]: a transport
//! must report every posted transfer, flushed ones with `ok = false`).

use nvme::spec::Cqe;

use crate::error::Result;
use crate::fabrics::{CmAccept, CmReject};
use crate::pool::DataBuf;

/// A remote (host) memory region named by a keyed SGL descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteBuf {
    /// Host virtual / bus address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Remote key.
    pub key: u32,
}

impl RemoteBuf {
    /// The local span a transfer of this region moves: the first `len` bytes of `local`
    /// as (address, length); `None` when they do not fit in it (the transport then
    /// reports the transfer failed).
    pub fn span(&self, local: &DataBuf) -> Option<(*mut u8, usize)> {
        let len = self.len as usize;
        (len <= local.capacity()).then_some((local.as_ptr(), len))
    }
}

/// The transport has no room right now (send credits, work-request slots); retry later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// A queue pair in its poll group ([`WirePollGroup::accept`]); valid until
/// [`WirePollGroup::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QpId(pub u32);

/// A finished data transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferDone {
    /// The tag given when posting (the request slot).
    pub tag: u16,
    /// False when the transfer failed or was flushed by a disconnect.
    pub ok: bool,
}

/// A received command capsule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes of in-capsule data that arrived after the 64-byte command. May exceed the
    /// buffer given to [`Qpair::poll_capsule`]; only what fits was copied.
    pub icd_len: usize,
}

/// One queue pair (one NVMe-oF queue, admin or I/O) on the wire.
pub trait Qpair {
    /// Takes the next received command capsule: the 64-byte command into `cmd`, in-capsule
    /// data into `icd`. Returns `None` when nothing is pending.
    fn poll_capsule(&mut self, cmd: &mut [u8; 64], icd: &mut [u8]) -> Option<Received>;
    /// Received capsules not yet taken by [`Qpair::poll_capsule`] (on RDMA with a shared
    /// receive queue each holds one of the SRQ's buffers, which every queue of the poll
    /// group shares: the core bounds it, see `QueueHandler::poll`).
    fn capsules_waiting(&self) -> usize;
    /// Starts an RDMA READ of `remote` (`remote.len` bytes) into the start of `local`
    /// (host → target data); the buffer is the NIC's until the transfer is reported.
    fn post_read(&mut self, tag: u16, remote: RemoteBuf, local: &DataBuf) -> Result<(), Busy>;
    /// Starts an RDMA WRITE of the first `remote.len` bytes of `local` to `remote`
    /// (target → host data); the buffer is the NIC's until the transfer is reported.
    fn post_write(&mut self, tag: u16, remote: RemoteBuf, local: &DataBuf) -> Result<(), Busy>;
    /// Takes the next finished transfer.
    fn poll_transfer(&mut self) -> Option<TransferDone>;
    /// Sends a response capsule; `invalidate` asks the host's key to be invalidated
    /// (RDMA SEND with invalidate).
    fn send_response(&mut self, cqe: &Cqe, invalidate: Option<u32>) -> Result<(), Busy>;
    /// Hands what [`Qpair::post_read`], [`Qpair::post_write`] and
    /// [`Qpair::send_response`] queued since the last call to the wire. A transport may
    /// hold them until here to post them together (RDMA: one `ibv_post_send` chain, so a
    /// read's data WRITE and its response SEND cost one system call on soft-RoCE); the
    /// poll group calls it after every pass over a queue.
    fn flush(&mut self) {}
    /// Whether the connection is still up.
    fn is_connected(&self) -> bool;
    /// Starts tearing the connection down (QP to error; posted transfers get flushed).
    fn disconnect(&mut self);
}

/// A connection request waiting for the core's decision.
pub trait Incoming {
    /// The NVMe-oF private data of the request (see [`crate::fabrics::CmRequest`]).
    fn private_data(&self) -> &[u8];
    /// Rejects with `reject` as private data.
    fn reject(self, reject: &CmReject);
}

/// Per-core wire state: shared completion queue, shared receive queue, registered memory,
/// and the queue pairs on them. The group owns its queue pairs (its CQ dispatch fills
/// their completion state directly: one thread, no lock, no shared ownership); the core
/// reaches one by its [`QpId`] for each call.
pub trait WirePollGroup {
    /// Queue pairs this group drives.
    type Qpair: Qpair;
    /// Connection requests it can accept.
    type Incoming: Incoming;

    /// Registers the core's data-buffer memory (the pool) with the wire (an MR).
    ///
    /// # Safety
    /// `[base, base + len)` must stay allocated until this poll group is dropped, the
    /// [`DataBuf`]s given to [`Qpair::post_read`]/[`Qpair::post_write`] must lie in it,
    /// and the caller touches a buffer only while no transfer posted on it is in flight
    /// (see the module documentation).
    unsafe fn register_memory(&mut self, base: *mut u8, len: usize) -> Result<()>;

    /// Accepts `incoming` into this group (its QP on this group's CQ/SRQ) with `accept`
    /// as private data; the queue gets `entries` receive slots of 64 + `icd_size` bytes.
    fn accept(
        &mut self,
        incoming: Self::Incoming,
        accept: &CmAccept,
        entries: u16,
        icd_size: u32,
    ) -> Result<QpId>;

    /// The queue pair `id` (`None` once removed).
    fn qpair(&mut self, id: QpId) -> Option<&mut Self::Qpair>;

    /// Drops queue pair `id`: the core calls it once every transfer posted on it was
    /// reported (see the module documentation).
    fn remove(&mut self, id: QpId);

    /// Processes wire events (shared CQ); returns how many were handled.
    fn poll(&mut self) -> usize;
}

/// A fabric transport: listens, yields incoming connections, creates poll groups.
pub trait Transport {
    /// Queue pairs.
    type Qpair: Qpair;
    /// Connection requests.
    type Incoming: Incoming;
    /// Per-core wire state.
    type PollGroup: WirePollGroup<Qpair = Self::Qpair, Incoming = Self::Incoming>;
    /// Transport name (`rdma`, `loopback`).
    fn name(&self) -> &'static str;
    /// Next pending connection request.
    fn poll_incoming(&mut self) -> Option<Self::Incoming>;
    /// Creates the wire side of a poll group.
    fn create_poll_group(&mut self) -> Result<Self::PollGroup>;
}

#[cfg(test)]
mod tests {
    use super::RemoteBuf;
    use crate::pool::BufferPool;

    #[test]
    fn a_transfer_never_spans_past_its_buffer() {
        let mut pool = BufferPool::new(2, 4096);
        let buf = pool.alloc().unwrap();
        let remote = |len| RemoteBuf {
            addr: 0x1000,
            len,
            key: 1,
        };
        assert_eq!(remote(4096).span(&buf), Some((buf.as_ptr(), 4096)));
        assert_eq!(remote(0).span(&buf), Some((buf.as_ptr(), 0)));
        assert_eq!(remote(4097).span(&buf), None, "would reach the next buffer");
        pool.release(buf);
    }
}
