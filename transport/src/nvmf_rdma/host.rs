//! The initiator's end of an NVMe-oF/RDMA queue: connect with CM private data, send
//! command capsules from a registered ring, receive 16-byte responses into another.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvme::spec::Cqe;
use rdma::cm::{Connection, Connector};
use rdma::{
    Access, CompletionChannel, CompletionQueue, ProtectionDomain, QpInit, RecvBatch,
    RegisteredBuffer, SendBatch, SendFlags, WorkCompletion, WrId,
};
use zerocopy::{FromBytes, IntoBytes};

use super::queue_err;
use crate::error::{Error, Result};
use crate::fabrics::CmAccept;
use crate::initiator::{cm_request, HostWire};

// `WrId` kinds; the tag is the send or receive ring slot.
const KIND_SEND: u8 = 1;
const KIND_RECV: u8 = 2;
/// How long a submission waits for a send slot whose completion is still in flight.
const SEND_SLOT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// Work requests per `ibv_post_send` when posts are deferred.
const POST_CHAIN: usize = 16;

/// One host queue over RDMA.
///
/// Field order is drop order: the connection (QP, CM id) before the rings it covered.
pub struct RdmaHost {
    conn: Connection,
    cq: Arc<CompletionQueue>,
    /// Wakes a sleeping reactor on a response once the CQ is armed.
    chan: Arc<CompletionChannel>,
    armed: bool,
    pd: Arc<ProtectionDomain>,
    send_ring: RegisteredBuffer,
    recv_ring: RegisteredBuffer,
    send_stride: usize,
    send_free: Vec<u16>,
    responses: VecDeque<Cqe>,
    wcs: Box<[WorkCompletion; 32]>,
    qid: u16,
    entries: u16,
    crqsize: u16,
    /// Capsules staged but not posted (slot, length) while posts are deferred.
    deferred: Vec<(u16, u32)>,
    defer: bool,
}

impl RdmaHost {
    /// Connects queue `qid` with `entries` entries to `dst`; capsules may carry up to
    /// `icd_max` bytes of in-capsule data.
    pub fn connect(
        dst: SocketAddr,
        qid: u16,
        entries: u16,
        icd_max: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let connector = Connector::resolve(dst, timeout).map_err(queue_err(qid, "resolve"))?;
        let ctx = connector.context().ok_or(Error::NoRouteDevice { dst })?;
        let pd = ProtectionDomain::new(&ctx).map_err(queue_err(qid, "alloc PD"))?;
        let slots = u32::from(entries) + 1;
        let chan = CompletionChannel::new(&ctx).map_err(queue_err(qid, "completion channel"))?;
        let cq = CompletionQueue::new(&ctx, 2 * slots + 8, Some(&chan))
            .map_err(queue_err(qid, "create CQ"))?;
        let mut init = QpInit::new(&cq);
        init.max_send_wr = slots;
        init.max_recv_wr = slots;
        init.max_inline_data = 64;
        let send_stride = 64 + icd_max as usize;
        let send_ring =
            RegisteredBuffer::new(&pd, send_stride * usize::from(entries), Access::LOCAL_WRITE)
                .map_err(queue_err(qid, "send ring"))?;
        let recv_ring = RegisteredBuffer::new(&pd, 16 * slots as usize, Access::LOCAL_WRITE)
            .map_err(queue_err(qid, "recv ring"))?;
        let req = cm_request(qid, entries);
        let conn = connector
            .connect(&pd, &init, req.as_bytes(), timeout)
            .map_err(|e| match e {
                rdma::Error::Rejected {
                    ref private_data, ..
                } if private_data.len() >= 4 => Error::CmReject {
                    status: u16::from_le_bytes([private_data[2], private_data[3]]),
                },
                e => Error::QueueRdma {
                    qid,
                    op: "connect",
                    source: e,
                },
            })?;
        let accept = CmAccept::read_from_prefix(conn.peer_private_data())
            .map(|(a, _)| a)
            .ok();
        let crqsize = accept.map_or(entries, |a| a.crqsize.get());
        let host = RdmaHost {
            conn,
            cq,
            chan,
            armed: false,
            pd,
            send_ring,
            recv_ring,
            send_stride,
            send_free: (0..entries).rev().collect(),
            responses: VecDeque::with_capacity(slots as usize),
            wcs: Box::new([WorkCompletion::default(); 32]),
            qid,
            entries,
            crqsize,
            deferred: Vec::with_capacity(usize::from(entries)),
            defer: false,
        };
        for i in 0..slots as u16 {
            host.post_recv(i)?;
        }
        Ok(host)
    }

    /// The protection domain (register data buffers on it).
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Queue size the target accepted (CM crqsize).
    pub fn accepted_queue_size(&self) -> u16 {
        self.crqsize
    }

    /// Registers `len` bytes the target may RDMA READ and WRITE (data buffers).
    pub fn register(&self, len: usize) -> Result<RegisteredBuffer> {
        RegisteredBuffer::new(&self.pd, len, Access::ALL)
            .map_err(queue_err(self.qid, "data buffer"))
    }

    /// With `on`, [`HostWire::send_capsule`] only stages a capsule in the send ring and
    /// [`HostWire::flush`] posts every staged one in chains of up to [`POST_CHAIN`] work
    /// requests — one `ibv_post_send` per batch instead of one per command (fio's
    /// queue/commit split). Switching it off flushes first.
    pub fn set_deferred_posts(&mut self, on: bool) -> Result<()> {
        if !on {
            self.post_deferred()?;
        }
        self.defer = on;
        Ok(())
    }

    fn post_deferred(&mut self) -> Result<()> {
        let mut done = 0;
        while done < self.deferred.len() {
            let n = (self.deferred.len() - done).min(POST_CHAIN);
            let mut b = SendBatch::<POST_CHAIN>::new();
            for &(slot, len) in &self.deferred[done..done + n] {
                let sge = self
                    .send_ring
                    .mr()
                    .sge(usize::from(slot) * self.send_stride, len as usize)
                    .map_err(queue_err(self.qid, "send sge"))?;
                b.send(
                    WrId::new(KIND_SEND, u32::from(slot)),
                    Some(sge),
                    SendFlags::SIGNALED,
                )
                .map_err(queue_err(self.qid, "send"))?;
            }
            let r = self.conn.qp().post_send(&mut b);
            if let Err(e) = r {
                self.deferred.clear();
                return Err(queue_err(self.qid, "post send")(e));
            }
            done += n;
        }
        self.deferred.clear();
        Ok(())
    }

    fn post_recv(&self, i: u16) -> Result<()> {
        let sge = self
            .recv_ring
            .mr()
            .sge(usize::from(i) * 16, 16)
            .map_err(queue_err(self.qid, "recv sge"))?;
        let mut b = RecvBatch::<1>::new();
        b.recv(WrId::new(KIND_RECV, u32::from(i)), Some(sge))
            .map_err(queue_err(self.qid, "recv"))?;
        self.conn
            .qp()
            .post_recv(&mut b)
            .map_err(queue_err(self.qid, "post recv"))
    }

    fn poll_cq(&mut self) -> Result<()> {
        let n = self
            .cq
            .poll(&mut self.wcs[..])
            .map_err(queue_err(self.qid, "poll CQ"))?;
        for i in 0..n {
            let wc = self.wcs[i];
            let id = wc.wr_id();
            wc.result()
                .map_err(queue_err(self.qid, "work completion"))?;
            // Ring slots are u16: exact.
            let idx = id.tag() as u16;
            if id.kind() == KIND_RECV {
                let mut raw = [0u8; 16];
                self.recv_ring
                    .read(usize::from(idx) * 16, &mut raw)
                    .map_err(queue_err(self.qid, "read response"))?;
                self.post_recv(idx)?;
                self.responses
                    .push_back(Cqe::read_from_bytes(&raw).unwrap_or_default());
            } else if id.kind() == KIND_SEND {
                self.send_free.push(idx);
            }
        }
        Ok(())
    }
}

impl HostWire for RdmaHost {
    fn send_capsule(&mut self, cmd: &[u8; 64], icd: &[u8]) -> Result<()> {
        // A response can be reaped before the completion of the send that carried its
        // command (rxe reports them in either order), so a caller that keeps at most
        // `entries` commands outstanding may find every slot still awaiting its send
        // completion: wait for one, briefly.
        let start = std::time::Instant::now();
        while self.send_free.is_empty() && start.elapsed() < SEND_SLOT_WAIT {
            self.poll_cq()?;
        }
        let Some(slot) = self.send_free.pop() else {
            return Err(Error::QueueFull {
                qid: self.qid,
                depth: self.entries,
            });
        };
        if 64 + icd.len() > self.send_stride {
            self.send_free.push(slot);
            return Err(Error::CapsuleTooLarge {
                qid: self.qid,
                len: icd.len(),
                max: self.send_stride - 64,
            });
        }
        let off = usize::from(slot) * self.send_stride;
        self.send_ring
            .write(off, cmd)
            .map_err(queue_err(self.qid, "capsule"))?;
        self.send_ring
            .write(off + 64, icd)
            .map_err(queue_err(self.qid, "capsule"))?;
        if self.defer {
            self.deferred.push((slot, (64 + icd.len()) as u32));
            return Ok(());
        }
        let sge = self
            .send_ring
            .mr()
            .sge(off, 64 + icd.len())
            .map_err(queue_err(self.qid, "send sge"))?;
        let mut b = SendBatch::<1>::new();
        b.send(
            WrId::new(KIND_SEND, u32::from(slot)),
            Some(sge),
            SendFlags::SIGNALED,
        )
        .map_err(queue_err(self.qid, "send"))?;
        self.conn
            .qp()
            .post_send(&mut b)
            .map_err(queue_err(self.qid, "post send"))
    }

    fn flush(&mut self) -> Result<()> {
        self.post_deferred()
    }

    fn arm(&mut self) -> Result<bool> {
        // Armed once until the event is consumed: ibv_req_notify_cq is a system call on
        // rxe (FACTS.md), re-arming an armed CQ would only repeat it.
        if !self.armed {
            self.cq.arm(false).map_err(queue_err(self.qid, "arm CQ"))?;
            self.armed = true;
        }
        Ok(true)
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.chan.fd())
    }

    fn woken(&mut self) {
        // One CQ on the channel, armed once: at most one event.
        match self.chan.take_event() {
            Ok(true) => self.armed = false,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, qid = self.qid, "CQ event"),
        }
    }

    fn has_response(&mut self) -> bool {
        if self.responses.is_empty() {
            if let Err(e) = self.poll_cq() {
                tracing::warn!(error = %e, qid = self.qid, "host queue");
            }
        }
        !self.responses.is_empty()
    }

    fn recv_response(&mut self) -> Option<Cqe> {
        if self.responses.is_empty() {
            if let Err(e) = self.poll_cq() {
                tracing::warn!(error = %e, qid = self.qid, "host queue");
            }
        }
        self.responses.pop_front()
    }
}

impl Drop for RdmaHost {
    fn drop(&mut self) {
        let _ = self.conn.disconnect();
        // Flushed completions reference only the rings, which outlive the QP (field order).
        let _ = self.poll_cq();
    }
}
