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

use nvme::spec::Status;

/// What the target core asks of a direct-mode provider (set with
/// [`Target::set_direct`](crate::nvmf_target::Target::set_direct)). Both calls run on a poll
/// group thread and must not block for long.
pub trait DirectAttach: Send + Sync {
    /// Handles an attach request from `hostnqn` on subsystem `subnqn`; returns the
    /// descriptor (written to the host through the command's keyed SGL) or the status.
    fn attach(
        &self,
        subnqn: &str,
        hostnqn: &str,
        nsid: u32,
        req: proto::AttachRequest,
    ) -> Result<proto::Descriptor, Status>;
    /// Detaches the queue with `token` if `hostnqn` owns it.
    fn detach(&self, hostnqn: &str, token: u64) -> Result<(), Status>;
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
