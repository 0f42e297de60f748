//! Direct mode: a remote host drives a dedicated NVMe I/O queue pair of the backing
//! controller by one-sided RDMA (see `docs/direct-mode.md` for the protocol).
//!
//! - [`proto`]: wire layouts — the attach descriptor returned by the vendor-specific admin
//!   command [`proto::OPC_DIRECT_ATTACH`], and the CM private data of the direct connection.
//! - [`target`]: the target side — [`target::DirectService`] owns a CM listener, a PD of
//!   its own (direct MRs are unreachable from standard-mode queue pairs), the attached
//!   queues and the poller thread that forwards doorbells and pushes completions.
//! - [`host`]: the host side — connect normally, attach, then I/O by chained WRs.

pub mod host;
pub mod proto;
pub mod target;

use std::sync::Arc;

use crossbeam::channel::{bounded, Receiver, Sender, TryRecvError};
use nvme::spec::Status;
use nvme::EventFd;

/// What the target core asks of a direct-mode provider (set with
/// [`Target::set_direct`](crate::nvmf_target::Target::set_direct)). Both calls come from a
/// poll group thread and must not block: an attach (admin commands to the device, MR
/// registrations — milliseconds) is answered later through its [`AttachReply`], and the
/// attach admin command stays outstanding until then.
pub trait DirectAttach: Send + Sync {
    /// Starts an attach request from `hostnqn` on subsystem `subnqn`; the descriptor
    /// (written to the host through the command's keyed SGL) or the status goes to
    /// `reply`, from any thread, possibly before this returns.
    fn attach(
        &self,
        subnqn: &str,
        hostnqn: &str,
        nsid: u32,
        req: proto::AttachRequest,
        reply: AttachReply,
    );
    /// Detaches the queue with `token` if `hostnqn` owns it.
    fn detach(&self, hostnqn: &str, token: u64) -> Result<(), Status>;
}

/// The answer to one attach request: the descriptor or the status.
pub type AttachResult = Result<proto::Descriptor, Status>;

/// Where a provider answers one attach (see [`attach_reply`]).
pub struct AttachReply {
    tx: Sender<AttachResult>,
    /// Wakes the poll group that waits for the answer, if it sleeps.
    wake: Option<Arc<EventFd>>,
}

impl AttachReply {
    /// Answers the attach and wakes the waiting poll group. False when nobody waits any
    /// more (the admin queue closed): the provider then drops what it attached.
    pub fn send(self, r: AttachResult) -> bool {
        if self.tx.send(r).is_err() {
            return false;
        }
        if let Some(w) = &self.wake {
            w.signal();
        }
        true
    }
}

/// Where the attach command waits for its [`AttachReply`].
pub struct AttachPending {
    rx: Receiver<AttachResult>,
}

impl AttachPending {
    /// The answer, once there. A provider that dropped its reply unanswered gives
    /// Internal Error (the command never hangs on it).
    pub fn try_take(&self) -> Option<AttachResult> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(Status::INTERNAL_ERROR)),
        }
    }
}

/// A reply for a provider and the place its answer arrives; `wake` (the poll group's
/// mailbox eventfd) is signalled with the answer.
pub fn attach_reply(wake: Option<Arc<EventFd>>) -> (AttachReply, AttachPending) {
    let (tx, rx) = bounded(1);
    (AttachReply { tx, wake }, AttachPending { rx })
}

/// A shared provider.
pub type DirectProvider = Arc<dyn DirectAttach>;

/// The deterministic test pattern of block `lba` for `seed` (used by `nvmf-p2p direct
/// --fill/--check` and the VM tests): 8-byte words of a xorshift stream seeded by both.
pub fn pattern(seed: u64, lba: u64, out: &mut [u8]) {
    let mut x = seed ^ lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    if x == 0 {
        x = 1;
    }
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_replies_arrive_once_and_say_when_nobody_waits() {
        let wake = Arc::new(EventFd::new().unwrap());
        let (reply, pending) = attach_reply(Some(wake.clone()));
        assert!(pending.try_take().is_none(), "no answer yet");
        assert!(reply.send(Err(Status::NAMESPACE_NOT_READY)));
        assert!(matches!(pending.try_take(), Some(Err(s)) if s == Status::NAMESPACE_NOT_READY));
        // The answer woke the group's eventfd.
        assert_eq!(wake.clear(), 1);
        // A provider that drops the reply unanswered: Internal Error, not a hang.
        let (reply, pending) = attach_reply(None);
        drop(reply);
        assert!(matches!(pending.try_take(), Some(Err(s)) if s == Status::INTERNAL_ERROR));
        // The command is gone: the provider learns it.
        let (reply, pending) = attach_reply(None);
        drop(pending);
        assert!(!reply.send(Err(Status::INTERNAL_ERROR)));
    }

    #[test]
    fn pattern_depends_on_seed_and_lba() {
        let (mut a, mut b, mut c) = ([0u8; 512], [0u8; 512], [0u8; 512]);
        pattern(1, 7, &mut a);
        pattern(1, 8, &mut b);
        pattern(2, 7, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
        let mut again = [0u8; 512];
        pattern(1, 7, &mut again);
        assert_eq!(a, again);
    }
}
