//! In-process loopback transport: the whole target runs in host tests without RDMA.
//!
//! A [`LoopbackConnector`] plays the host's RDMA CM and NIC: [`LoopbackConnector::connect`]
//! sends NVMe-oF CM private data, the target accepts or rejects it, and the resulting
//! [`LoopbackHost`] sends command capsules, receives response capsules, and registers
//! host memory regions that the target reaches by "RDMA READ/WRITE" (addr + key). Data
//! transfers complete asynchronously: their completions are delivered on the target's
//! next poll, so the core's state machine runs as it would over RDMA.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use nvme::spec::Cqe;
use zerocopy::IntoBytes;

use crate::error::{Error, Result};
use crate::fabrics::{CmAccept, CmReject, CmRequest};
use crate::pool::DataBuf;
use crate::wire::{
    Busy, Incoming, QpId, Qpair, Received, RemoteBuf, TransferDone, Transport, WirePollGroup,
};

/// Connection state as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Waiting for the target to accept.
    Connecting,
    /// Accepted with this CM private data.
    Established(CmAccept),
    /// Rejected with this NVMe-oF CM status.
    Rejected(u16),
    /// Torn down by either side.
    Closed,
}

struct Region {
    addr: u64,
    data: Vec<u8>,
}

struct Link {
    state: LinkState,
    private_data: Vec<u8>,
    sq: VecDeque<([u8; 64], Vec<u8>)>,
    cq: VecDeque<(Cqe, Option<u32>)>,
    transfers: VecDeque<TransferDone>,
    regions: HashMap<u32, Region>,
    next_key: u32,
    send_credits: usize,
    entries: u16,
    icd_size: u32,
    rdma_reads: u64,
    rdma_writes: u64,
}

type Shared = Arc<Mutex<Link>>;

fn lock(l: &Shared) -> MutexGuard<'_, Link> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// The target side: yields incoming connections and creates poll groups.
pub struct LoopbackTransport {
    pending: Arc<Mutex<VecDeque<Shared>>>,
}

/// The host side: opens connections to a [`LoopbackTransport`].
#[derive(Clone)]
pub struct LoopbackConnector {
    pending: Arc<Mutex<VecDeque<Shared>>>,
}

impl LoopbackTransport {
    /// A transport and the connector hosts use to reach it.
    pub fn new() -> (Self, LoopbackConnector) {
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        (
            LoopbackTransport {
                pending: pending.clone(),
            },
            LoopbackConnector { pending },
        )
    }
}

impl LoopbackConnector {
    /// Starts a connection with the given CM request; poll the target, then check
    /// [`LoopbackHost::state`].
    pub fn connect(&self, req: &CmRequest) -> LoopbackHost {
        self.connect_raw(req.as_bytes())
    }

    /// Starts a connection with arbitrary private data bytes.
    pub fn connect_raw(&self, private_data: &[u8]) -> LoopbackHost {
        let link = Arc::new(Mutex::new(Link {
            state: LinkState::Connecting,
            private_data: private_data.to_vec(),
            sq: VecDeque::new(),
            cq: VecDeque::new(),
            transfers: VecDeque::new(),
            regions: HashMap::new(),
            next_key: 0x1000,
            send_credits: usize::MAX,
            entries: 0,
            icd_size: 0,
            rdma_reads: 0,
            rdma_writes: 0,
        }));
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(link.clone());
        LoopbackHost { link }
    }
}

/// A host memory region registered for remote access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRegion {
    /// Address to put in keyed SGL descriptors.
    pub addr: u64,
    /// Remote key.
    pub key: u32,
    /// Length in bytes.
    pub len: u32,
}

/// The host end of a loopback connection.
pub struct LoopbackHost {
    link: Shared,
}

impl LoopbackHost {
    /// Connection state.
    pub fn state(&self) -> LinkState {
        lock(&self.link).state
    }

    /// Receive slots and in-capsule data size the target accepted with.
    pub fn accepted_geometry(&self) -> (u16, u32) {
        let l = lock(&self.link);
        (l.entries, l.icd_size)
    }

    /// Sends a command capsule with optional in-capsule data.
    pub fn send(&self, cmd: &[u8; 64], icd: &[u8]) -> Result<()> {
        let mut l = lock(&self.link);
        if !matches!(l.state, LinkState::Established(_)) {
            return Err(Error::Transport {
                qid: u16::MAX,
                reason: format!("link is {:?}", l.state),
            });
        }
        l.sq.push_back((*cmd, icd.to_vec()));
        Ok(())
    }

    /// Takes the next response capsule (and the key it asked to invalidate, if any).
    pub fn recv(&self) -> Option<(Cqe, Option<u32>)> {
        lock(&self.link).cq.pop_front()
    }

    /// Registers `len` bytes of host memory (zeroed).
    pub fn register(&self, len: u32) -> HostRegion {
        let mut l = lock(&self.link);
        let key = l.next_key;
        l.next_key += 1;
        let addr = u64::from(key) << 32 | 0x1000;
        l.regions.insert(
            key,
            Region {
                addr,
                data: vec![0; len as usize],
            },
        );
        HostRegion { addr, key, len }
    }

    /// Reads a registered region.
    pub fn read_region(&self, r: HostRegion) -> Vec<u8> {
        lock(&self.link)
            .regions
            .get(&r.key)
            .map(|g| g.data.clone())
            .unwrap_or_default()
    }

    /// Writes into a registered region at `offset`.
    pub fn write_region(&self, r: HostRegion, offset: usize, bytes: &[u8]) {
        if let Some(g) = lock(&self.link).regions.get_mut(&r.key) {
            g.data[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// Limits how many responses may wait unreceived (models send credits).
    pub fn set_send_credits(&self, n: usize) {
        lock(&self.link).send_credits = n;
    }

    /// RDMA READs and WRITEs the target performed on this connection.
    pub fn rdma_ops(&self) -> (u64, u64) {
        let l = lock(&self.link);
        (l.rdma_reads, l.rdma_writes)
    }

    /// Tears the connection down.
    pub fn disconnect(&self) {
        lock(&self.link).state = LinkState::Closed;
    }
}

/// A connection request on the target side.
pub struct LoopbackIncoming {
    link: Shared,
    private_data: Vec<u8>,
}

impl Incoming for LoopbackIncoming {
    fn private_data(&self) -> &[u8] {
        &self.private_data
    }

    fn reject(self, reject: &CmReject) {
        lock(&self.link).state = LinkState::Rejected(reject.sts.get());
    }
}

/// Target side of an accepted loopback connection.
pub struct LoopbackQpair {
    link: Shared,
}

/// The host region `remote` names and its offset there, when all of it lies inside.
fn region_range(l: &Link, remote: RemoteBuf) -> Option<(u32, usize)> {
    let r = l.regions.get(&remote.key)?;
    let off = remote.addr.checked_sub(r.addr)? as usize;
    (off.checked_add(remote.len as usize)? <= r.data.len()).then_some((remote.key, off))
}

impl Qpair for LoopbackQpair {
    fn poll_capsule(&mut self, cmd: &mut [u8; 64], icd: &mut [u8]) -> Option<Received> {
        let mut l = lock(&self.link);
        if !matches!(l.state, LinkState::Established(_)) {
            return None;
        }
        let (c, data) = l.sq.pop_front()?;
        *cmd = c;
        let n = data.len().min(icd.len());
        icd[..n].copy_from_slice(&data[..n]);
        Some(Received {
            icd_len: data.len(),
        })
    }

    fn capsules_waiting(&self) -> usize {
        lock(&self.link).sq.len()
    }

    fn post_read(&mut self, tag: u16, remote: RemoteBuf, local: &DataBuf) -> Result<(), Busy> {
        let mut l = lock(&self.link);
        let span = remote.span(local);
        let ok = match (l.state, span, region_range(&l, remote)) {
            (LinkState::Established(_), Some((dst, len)), Some((key, off))) => {
                let src = &l.regions[&key].data[off..off + len];
                // SAFETY: `dst` is the start of `local`, a pool buffer of at least `len`
                // bytes (`span`) that the core leaves alone until this transfer's
                // completion; `src` is host memory of this link, not in the pool. The
                // "NIC" writes at post time instead of later.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
                true
            }
            _ => false,
        };
        l.rdma_reads += 1;
        l.transfers.push_back(TransferDone { tag, ok });
        Ok(())
    }

    fn post_write(&mut self, tag: u16, remote: RemoteBuf, local: &DataBuf) -> Result<(), Busy> {
        let mut l = lock(&self.link);
        let span = remote.span(local);
        let ok = match (l.state, span, region_range(&l, remote)) {
            (LinkState::Established(_), Some((src, len)), Some((key, off))) => {
                if let Some(r) = l.regions.get_mut(&key) {
                    let dst = &mut r.data[off..off + len];
                    // SAFETY: `src` is the start of `local`, a pool buffer of at least
                    // `len` bytes (`span`) that nothing writes while this WRITE is posted;
                    // `dst` is host memory of this link, not in the pool.
                    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), len) };
                }
                true
            }
            _ => false,
        };
        l.rdma_writes += 1;
        l.transfers.push_back(TransferDone { tag, ok });
        Ok(())
    }

    fn poll_transfer(&mut self) -> Option<TransferDone> {
        lock(&self.link).transfers.pop_front()
    }

    fn send_response(&mut self, cqe: &Cqe, invalidate: Option<u32>) -> Result<(), Busy> {
        let mut l = lock(&self.link);
        if !matches!(l.state, LinkState::Established(_)) {
            return Ok(()); // dropped on the floor like a flushed send
        }
        if l.cq.len() >= l.send_credits {
            return Err(Busy);
        }
        l.cq.push_back((*cqe, invalidate));
        Ok(())
    }

    fn is_connected(&self) -> bool {
        matches!(lock(&self.link).state, LinkState::Established(_))
    }

    fn disconnect(&mut self) {
        let mut l = lock(&self.link);
        l.state = LinkState::Closed;
    }
}

/// The loopback poll group: its queue pairs (nothing shared to poll).
#[derive(Default)]
pub struct LoopbackPollGroup {
    qps: Vec<Option<LoopbackQpair>>,
}

impl LoopbackPollGroup {
    /// Queue pairs this group holds (a queue's goes when the core removes it).
    pub fn qpair_count(&self) -> usize {
        self.qps.iter().flatten().count()
    }
}

impl WirePollGroup for LoopbackPollGroup {
    type Qpair = LoopbackQpair;
    type Incoming = LoopbackIncoming;

    unsafe fn register_memory(&mut self, _base: *mut u8, _len: usize) -> Result<()> {
        Ok(())
    }

    fn accept(
        &mut self,
        incoming: LoopbackIncoming,
        accept: &CmAccept,
        entries: u16,
        icd_size: u32,
    ) -> Result<QpId> {
        let mut l = lock(&incoming.link);
        l.state = LinkState::Established(*accept);
        l.entries = entries;
        l.icd_size = icd_size;
        drop(l);
        let qp = Some(LoopbackQpair {
            link: incoming.link,
        });
        let slot = match self.qps.iter().position(Option::is_none) {
            Some(i) => {
                self.qps[i] = qp;
                i
            }
            None => {
                self.qps.push(qp);
                self.qps.len() - 1
            }
        };
        Ok(QpId(slot as u32))
    }

    fn qpair(&mut self, id: QpId) -> Option<&mut LoopbackQpair> {
        self.qps.get_mut(id.0 as usize)?.as_mut()
    }

    fn remove(&mut self, id: QpId) {
        if let Some(slot) = self.qps.get_mut(id.0 as usize) {
            *slot = None;
        }
    }

    fn poll(&mut self) -> usize {
        0
    }
}

impl Transport for LoopbackTransport {
    type Qpair = LoopbackQpair;
    type Incoming = LoopbackIncoming;
    type PollGroup = LoopbackPollGroup;

    fn name(&self) -> &'static str {
        "loopback"
    }

    fn poll_incoming(&mut self) -> Option<LoopbackIncoming> {
        let link = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()?;
        let private_data = lock(&link).private_data.clone();
        Some(LoopbackIncoming { link, private_data })
    }

    fn create_poll_group(&mut self) -> Result<LoopbackPollGroup> {
        Ok(LoopbackPollGroup::default())
    }
}

/// A target with one poll group on a loopback transport, driven from the calling thread:
/// the rig under the host tests (`transport/tests/common`) and the fuzz targets
/// (`transport/src/fuzzing.rs`), which add their own hosts and clocks.
pub struct TargetRig {
    /// The target.
    pub target: crate::nvmf_target::Target,
    /// Its transport (connections wait here until accepted).
    pub transport: LoopbackTransport,
    /// Where hosts connect.
    pub connector: LoopbackConnector,
    /// The poll group.
    pub group: crate::nvmf_target::PollGroup<LoopbackTransport>,
}

impl TargetRig {
    /// A rig around `target`: one poll group on a new loopback transport.
    pub fn new(target: crate::nvmf_target::Target) -> Result<TargetRig> {
        let (mut transport, connector) = LoopbackTransport::new();
        let group = target.create_poll_group(&mut transport)?;
        Ok(TargetRig {
            target,
            transport,
            connector,
            group,
        })
    }

    /// Accepts pending connections, then polls at `now` until the group is idle; false
    /// when it still worked after `passes` polls.
    pub fn pump_at(&mut self, now: std::time::Instant, passes: usize) -> bool {
        self.group.accept_pending(&mut self.transport);
        (0..passes).any(|_| self.group.poll_at(now) == 0)
    }

    /// Starts the connection of queue `qid` with `entries` entries (CM level only); pump
    /// to have it accepted, then check [`LoopbackHost::state`].
    pub fn connect(&self, qid: u16, entries: u16) -> LoopbackHost {
        self.connector
            .connect(&crate::initiator::cm_request(qid, entries))
    }
}
