//! The direct poller: one [`rdma::Poller`] for every direct queue of the target, hosted
//! on a core's reactor (`serve` puts it on the first core's, beside that core's poll
//! group). `poll` does what is ready — CM events, quiesce/detach requests, RDMA
//! completions, mirror pages, CQE push — and returns how much; `spell`, `arm` and `woken`
//! tell the reactor how to wait.
//!
//! Idle policy (`docs/direct-mode.md`, "Poller"): while a pushed queue has commands in
//! flight (or is on `p2p`), the reactor's short device spell, then sleep on the CQs'
//! MSI-X eventfds when every such CQ has one, else nap 25 µs doubling to 800 µs;
//! otherwise sleep on the completion and CM channels — after the idle spell with pushed
//! queues (their hosts resubmit right after a CQE), at once when only polled queues are
//! attached (the next doorbell is a receive completion that wakes the poller).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme::spec::Cqe;
use rdma::cm::{CmEventKind, ConnectRequest, Connection, EventChannel, Listener};
use rdma::{
    Arm, CompletionChannel, CompletionQueue, QpInit, RecvBatch, RemoteAddr, SendBatch, SendFlags,
    Spell, WakeSet, WorkCompletion, WrId,
};
use zerocopy::IntoBytes;

use super::super::host::{Completions, CQES_PER_SEND};
use super::super::proto::{
    reply_private, ConnectPrivate, Level, ACCEPT_CQ_POLLED, ACCEPT_READS_PUSHED, CONNECT_CQ_POLLED,
    REJECT_UNKNOWN_TOKEN,
};
use super::attach::{reap_expired, Attachment};
use super::forward::{Bogus, ForwardedQueue, Ignored, PoolWindow};
use super::report::{PollerCounts, QueueReport, Snapshot};
use super::{held, Inner};

/// Extra receive/send slots beyond the queue depth.
const SLACK: u32 = 16;
/// How often the poller publishes its report and drops attachments whose host never
/// connected.
const REAP_PERIOD: Duration = Duration::from_millis(200);
/// First and longest nap while pushed commands are in flight without interrupts.
const NAP_MIN: Duration = Duration::from_micros(25);
const NAP_MAX: Duration = Duration::from_micros(800);

// `WrId` kinds of the poller's work requests (one QP per queue, found by number): the
// doorbell receive, the CQE SEND (tag: the WRs it completes), the pushed read data WRITE.
const KIND_RECV: u8 = 1;
const KIND_SEND: u8 = 2;
const KIND_WRITE: u8 = 3;

/// What a work completion of the poller's QPs is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wr {
    /// A receive: the immediate is a doorbell.
    Recv,
    /// A CQE SEND, the last of a chain of `wrs` send-queue WRs.
    Send { wrs: u32 },
    /// Unsignaled read-data WRITEs never complete; anything else is ignored.
    Other,
}

/// The id of a CQE SEND ending a chain of `wrs` WRs.
fn send_wr_id(wrs: u32) -> WrId {
    WrId::new(KIND_SEND, wrs)
}

fn wr_kind(id: WrId) -> Wr {
    match id.kind() {
        KIND_RECV => Wr::Recv,
        KIND_SEND => Wr::Send { wrs: id.tag() },
        _ => Wr::Other,
    }
}

/// Host buffer for pushed read data: command id × `stride` bytes from `addr`.
#[derive(Clone, Copy, Debug)]
struct ReadTarget {
    addr: u64,
    rkey: u32,
    stride: u32,
}

/// An attachment with its direct connection.
struct Active {
    conn: Connection,
    att: Attachment,
    qp_num: u32,
    q: ForwardedQueue,
    push: Option<ReadTarget>,
    sends_out: u32,
    send_max: u32,
    dead: bool,
}

impl Active {
    fn report(&self) -> QueueReport {
        let mut r = self.att.report.clone();
        r.set_forwarded(self.q.counts());
        r
    }
}

/// The poller's state: its CM listener and CQ, the connected queues.
pub(super) struct Poller {
    inner: Arc<Inner>,
    cq: Arc<CompletionQueue>,
    chan: Arc<CompletionChannel>,
    events: EventChannel,
    _listener: Listener,
    active: Vec<Active>,
    wcs: Box<[WorkCompletion; 64]>,
    counts: PollerCounts,
    last_report: Instant,
    last_cm: Instant,
    /// The CM channel woke the reactor: read its events in the next poll.
    cm_due: bool,
    nap: Duration,
    /// The service stopped and every connection was closed.
    stopped: bool,
}

impl Poller {
    pub(super) fn new(
        inner: Arc<Inner>,
        cq: Arc<CompletionQueue>,
        chan: Arc<CompletionChannel>,
        events: EventChannel,
        listener: Listener,
    ) -> Self {
        let now = Instant::now();
        Poller {
            inner,
            cq,
            chan,
            events,
            _listener: listener,
            active: Vec::new(),
            wcs: Box::new([WorkCompletion::default(); 64]),
            counts: PollerCounts::default(),
            last_report: now,
            last_cm: now,
            cm_due: false,
            nap: NAP_MIN,
            stopped: false,
        }
    }

    /// Does the work that is ready (non-blocking); returns how much.
    fn poll_work(&mut self, now: Instant) -> usize {
        self.counts.polls += 1;
        // CM events cost a syscall: look at most every millisecond while busy, at once
        // when their channel woke the reactor.
        let mut work = 0;
        if self.cm_due || now.duration_since(self.last_cm) >= Duration::from_millis(1) {
            work += self.cm_events();
            self.last_cm = Instant::now();
            self.cm_due = false;
        }
        work += self.control();
        work += self.rdma_completions();
        for i in 0..self.active.len() {
            work += self.forward_mirror(i);
            work += self.push_completions(i);
        }
        if self.active.iter().any(|a| a.dead) {
            {
                let mut c = held(&self.inner.control);
                for a in self.active.iter().filter(|a| a.dead) {
                    c.note_closed(a.att.report.token, &a.att.report.hostnqn);
                }
            }
            self.active.retain(|a| !a.dead);
            self.publish();
        }
        if now.duration_since(self.last_report) > REAP_PERIOD {
            self.publish();
            self.last_report = Instant::now();
        }
        if work > 0 {
            self.nap = NAP_MIN;
        }
        work
    }

    /// Queues whose NVMe CQ the poller must watch: pushed ones with commands in the
    /// device (P2P pushed queues always: their doorbells bypass it). Polled queues wake
    /// it by their doorbells' receive completions.
    fn watched(a: &Active) -> bool {
        !a.q.polled() && (a.q.in_flight() > 0 || a.att.report.level == Level::P2p)
    }

    /// Every watched CQ raises an interrupt (its completion wakes a sleep).
    fn interrupts(&self) -> bool {
        self.active
            .iter()
            .filter(|a| Self::watched(a))
            .all(|a| a.att.raw.interrupt_eventfd().is_some())
    }

    /// Arms the RDMA CQ and lists the completion and CM channels — with `device` (commands
    /// in the device and every watched CQ has an interrupt) also the interrupt eventfds,
    /// cleared first. The RDMA CQ (and, with `device`, the NVMe CQs) get one more look
    /// after arming: an event before the arm/clear is gone, one after it stays pending
    /// (the eventfd reads are syscalls, full barriers).
    fn arm_sleep(&mut self, device: bool, wake: &mut WakeSet) -> Arm {
        if self.chan.drain_events().is_err() || self.cq.arm(false).is_err() {
            return Arm::Nap(if device {
                Duration::from_micros(100)
            } else {
                Duration::from_millis(1)
            });
        }
        self.counts.sleeps += 1;
        if device {
            self.counts.device_sleeps += 1;
        }
        wake.add(self.chan.fd(), TAG_CQ);
        wake.add(self.events.fd(), TAG_CM);
        if device {
            for a in self.active.iter().filter(|a| !a.q.polled() && !a.dead) {
                if let Some(e) = a.att.raw.interrupt_eventfd() {
                    e.clear();
                    wake.add(e.as_raw_fd(), TAG_DEVICE);
                }
            }
        }
        let mut work = self.rdma_completions();
        if device {
            for i in 0..self.active.len() {
                work += self.push_completions(i);
            }
        }
        if work > 0 {
            Arm::Ready
        } else {
            Arm::Sleep
        }
    }

    /// The service stops: every direct connection is disconnected.
    fn disconnect_all(&mut self) {
        for a in &self.active {
            let _ = a.conn.disconnect();
        }
        self.active.clear();
    }

    fn publish(&mut self) {
        let queues: Vec<QueueReport> = self.active.iter().map(Active::report).collect();
        let ttl = held(&self.inner.limits).pending_ttl;
        let pinned = held(&self.inner.pins).total;
        let mut c = held(&self.inner.control);
        let expired = reap_expired(&mut c.pending, Instant::now(), ttl, |a| a.created);
        if expired > 0 {
            tracing::info!(expired, ?ttl, "direct: attachments never connected dropped");
        }
        c.report.publish(Snapshot {
            queues,
            expired: expired as u64,
            bogus_tails: self.inner.bogus_tails.load(Ordering::Relaxed),
            pinned_bytes: pinned,
            poller: self.counts,
        });
    }

    /// Quiesce and detach requests.
    fn control(&mut self) -> usize {
        let want = self.inner.quiesce_req.load(Ordering::SeqCst);
        if self.inner.quiesce_ack.load(Ordering::SeqCst) < want {
            let n = self.active.len();
            for a in &self.active {
                let _ = a.conn.disconnect();
            }
            self.active.clear();
            held(&self.inner.control).pending.clear();
            self.publish();
            tracing::info!(queues = n, "direct queues dropped for a device reset");
            self.inner.quiesce_ack.store(want, Ordering::SeqCst);
            return 1;
        }
        let detach = std::mem::take(&mut held(&self.inner.control).detach);
        for t in &detach {
            if let Some(a) = self.active.iter_mut().find(|a| a.att.report.token == *t) {
                let _ = a.conn.disconnect();
                a.dead = true;
            }
        }
        detach.len()
    }

    fn cm_events(&mut self) -> usize {
        let mut n = 0;
        loop {
            let ev = match self.events.try_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return n,
                Err(e) => {
                    tracing::warn!(error = %e, "direct: rdma_get_cm_event");
                    return n;
                }
            };
            n += 1;
            match ev.kind {
                CmEventKind::ConnectRequest(req) => self.connect(req),
                CmEventKind::Disconnected
                | CmEventKind::ConnectError
                | CmEventKind::Unreachable
                | CmEventKind::DeviceRemoval => {
                    for a in self
                        .active
                        .iter_mut()
                        .filter(|a| a.conn.id_key() == ev.id_key)
                    {
                        let _ = a.conn.disconnect();
                        a.dead = true;
                        tracing::info!(token = a.att.report.token, "direct connection closed");
                    }
                }
                _ => {}
            }
        }
    }

    fn connect(&mut self, req: ConnectRequest) {
        let private = ConnectPrivate::parse(req.private_data());
        let token = private.map(|p| p.token.get());
        let att = token.and_then(|t| held(&self.inner.control).pending.remove(&t));
        let Some(mut att) = att else {
            tracing::info!("direct connection with an unknown token: rejected");
            let _ = req.reject(&reply_private(REJECT_UNKNOWN_TOKEN, 0));
            return;
        };
        let depth = u32::from(att.raw.depth());
        let polled = private.is_some_and(|p| p.flags.get() & CONNECT_CQ_POLLED != 0);
        // Read data is pushed with pushed CQEs only: polled queues are never watched.
        let push = private
            .filter(|p| !polled && p.read_rkey.get() != 0 && p.read_stride.get() >= 512)
            .map(|p| ReadTarget {
                addr: p.read_addr.get(),
                rkey: p.read_rkey.get(),
                stride: p.read_stride.get(),
            });
        let send_max = 2 * depth + SLACK;
        let init = QpInit {
            send_cq: self.cq.clone(),
            recv_cq: self.cq.clone(),
            srq: None,
            max_send_wr: send_max,
            max_recv_wr: depth + SLACK,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
            sq_sig_all: false,
        };
        let flags = if polled {
            ACCEPT_CQ_POLLED
        } else if push.is_some() {
            ACCEPT_READS_PUSHED
        } else {
            0
        };
        let conn = match req.accept(&self.inner.pd, &init, &reply_private(0, flags)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "direct: accept");
                return;
            }
        };
        for _ in 0..depth + SLACK {
            if let Err(e) = post_recv(&conn) {
                tracing::warn!(error = %e, "direct: post recv");
                let _ = conn.disconnect();
                return;
            }
        }
        att.report.connected = true;
        att.report.completions = if polled {
            Completions::Polled
        } else {
            Completions::Pushed
        };
        tracing::info!(
            token = att.report.token,
            qid = att.raw.qid(),
            completions = att.report.completions.name(),
            "direct connection up"
        );
        let qp_num = conn.qp().qp_num();
        let pool = PoolWindow {
            iova: att.pool_iova,
            len: att.pool_len,
            lba_size: att.lba_size,
        };
        let q = ForwardedQueue::new(att.raw.depth(), polled, push.is_some(), pool);
        self.active.push(Active {
            conn,
            att,
            qp_num,
            q,
            push,
            sends_out: 0,
            send_max,
            dead: false,
        });
        self.publish();
    }

    fn rdma_completions(&mut self) -> usize {
        let n = match self.cq.poll(&mut self.wcs[..]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "direct: ibv_poll_cq");
                return 0;
            }
        };
        for i in 0..n {
            let wc = self.wcs[i];
            let Some(a) = self.active.iter_mut().find(|a| a.qp_num == wc.qp_num()) else {
                continue;
            };
            if !wc.is_ok() {
                if !a.dead {
                    tracing::info!(token = a.att.report.token, status = %wc.status(), "direct: work completion error");
                }
                let _ = a.conn.disconnect();
                a.dead = true;
                continue;
            }
            match wr_kind(wc.wr_id()) {
                Wr::Recv => {
                    if let Some(imm) = wc.imm_data() {
                        let ig = a.q.doorbell_imm(&a.att.raw, imm);
                        ignored(a.att.report.token, &self.inner.bogus_tails, ig);
                    }
                    if post_recv(&a.conn).is_err() {
                        a.dead = true;
                    }
                }
                Wr::Send { wrs } => a.sends_out = a.sends_out.saturating_sub(wrs),
                Wr::Other => {}
            }
        }
        for a in &mut self.active {
            a.q.ring(&a.att.raw);
        }
        n
    }

    /// Forwards a tail written by plain RDMA WRITE into the mirror page.
    fn forward_mirror(&mut self, i: usize) -> usize {
        let a = &mut self.active[i];
        if a.dead || a.att.report.level != Level::Forwarded {
            return 0;
        }
        let Ok(v) = a.att.mirror.read_volatile_u64(0) else {
            return 0;
        };
        match a.q.doorbell_mirror(&a.att.raw, v) {
            Some(ig) => {
                ignored(a.att.report.token, &self.inner.bogus_tails, ig);
                1
            }
            None => 0,
        }
    }

    /// Pushes new CQEs to the host (up to [`CQES_PER_SEND`] per SEND, read data WRITEs
    /// ahead of it in the same chain), then rings the CQ head doorbell once.
    fn push_completions(&mut self, i: usize) -> usize {
        let a = &mut self.active[i];
        if a.dead {
            return 0;
        }
        if a.att.raw.generation() != a.att.generation {
            tracing::info!(
                token = a.att.report.token,
                "controller reset under a direct queue: dropping it (host re-attaches)"
            );
            let _ = a.conn.disconnect();
            a.dead = true;
            return 1;
        }
        if a.q.polled() {
            // The host reads the CQ itself.
            return 0;
        }
        let mut n = 0;
        let mut batch = [Cqe::default(); CQES_PER_SEND];
        // A chain is at most CQES_PER_SEND data WRITEs and one SEND.
        while n < 64 && a.sends_out + (CQES_PER_SEND as u32) < a.send_max {
            let k = a.q.take_cqes(&a.att.raw, &mut batch);
            if k == 0 {
                break;
            }
            let mut chain = SendBatch::<{ CQES_PER_SEND + 1 }>::new();
            let mut wrs = 1u32;
            let built = (|| -> rdma::Result<()> {
                if let Some(p) = a.push {
                    for e in &batch[..k] {
                        let Some(r) = a.q.read_of(e, p.stride) else {
                            continue;
                        };
                        let sge = a.att.pool_mr.sge(r.off as usize, r.len as usize)?;
                        let dst = RemoteAddr {
                            addr: p
                                .addr
                                .wrapping_add(u64::from(e.cid.get()) * u64::from(p.stride)),
                            rkey: p.rkey,
                        };
                        chain.write(WrId::new(KIND_WRITE, 0), sge, dst, SendFlags::NONE)?;
                        wrs += 1;
                    }
                }
                chain.send_inline(send_wr_id(wrs), batch[..k].as_bytes(), SendFlags::SIGNALED)?;
                a.conn.qp().post_send(&mut chain)
            })();
            if let Err(e) = built {
                tracing::info!(error = %e, "direct: push CQE");
                a.dead = true;
                break;
            }
            a.sends_out += wrs;
            a.q.pushed(k);
            a.att.report.cqes_pushed += k as u64;
            a.att.report.reads_pushed += u64::from(wrs - 1);
            n += k;
        }
        if n > 0 {
            a.q.release_cq(&a.att.raw);
        }
        n
    }
}

/// Wake-set tags of the direct poller.
const TAG_CQ: u32 = 0;
const TAG_CM: u32 = 1;
const TAG_DEVICE: u32 = 2;

/// The direct poller on a core's reactor (`rdma::reactor`): the reactor's spells replace
/// the poller's own spin and yield; the naps of polled NVMe queues stay here.
impl rdma::Poller for Poller {
    fn poll(&mut self, now: Instant) -> usize {
        if self.inner.stop.load(Ordering::Relaxed) {
            if !self.stopped {
                self.disconnect_all();
                self.stopped = true;
            }
            return 0;
        }
        self.poll_work(now)
    }

    fn spell(&self) -> Spell {
        if self.active.iter().any(Self::watched) {
            // Commands in the device: the short spell, then sleep on its interrupts (or
            // nap, see `arm`).
            Spell::Device
        } else if self.active.iter().any(|a| !a.q.polled()) {
            // Pushed queues: their hosts resubmit right after a CQE.
            Spell::Idle
        } else {
            // Only polled queues (the next doorbell's receive wakes the poller), or none.
            Spell::None
        }
    }

    fn arm(&mut self, _idle: Duration, wake: &mut WakeSet) -> Arm {
        let busy = self.active.iter().any(Self::watched);
        if busy && !self.interrupts() {
            // Commands in polled NVMe queues: back off 25 µs → 800 µs (a nap costs a timer
            // and two context switches, which on a TCG guest cost as much as the nap).
            let nap = self.nap;
            self.nap = (nap * 2).min(NAP_MAX);
            return Arm::Nap(nap);
        }
        self.arm_sleep(busy, wake)
    }

    fn woken(&mut self, tag: u32) {
        // The completion channel's events are drained when the poller next arms a sleep,
        // interrupt eventfds cleared then; a CM event is read by the next poll.
        if tag == TAG_CM {
            self.cm_due = true;
        }
    }

    fn finished(&self) -> bool {
        self.stopped
    }

    fn shutdown(&mut self) {
        self.disconnect_all();
        self.stopped = true;
    }
}

/// Posts one zero-length receive (for a WRITE WITH IMMEDIATE doorbell).
fn post_recv(conn: &Connection) -> rdma::Result<()> {
    let mut b = RecvBatch::<1>::new();
    b.recv(WrId::new(KIND_RECV, 0), None)?;
    conn.qp().post_recv(&mut b)
}

/// Logs what a doorbell asked that the queue ignored; bogus tails are counted for
/// `stats`.
fn ignored(token: u64, bogus: &AtomicU64, ig: Ignored) {
    if let Some(head) = ig.head {
        tracing::debug!(token, head, "direct: CQ head out of range ignored");
    }
    if let Some(b) = ig.tail {
        bogus_tail(token, bogus, b);
    }
}

/// `stats` counts them, the log says so at powers of two (a flood of bogus tails is not a
/// flood of log lines).
fn bogus_tail(token: u64, bogus: &AtomicU64, b: Bogus) {
    let n = bogus.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(
            token,
            tail = b.tail,
            current = b.current,
            in_flight = b.in_flight,
            why = b.why.as_str(),
            bogus_tails = n,
            "direct: bogus SQ tail ignored"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wr_ids_round_trip() {
        assert_eq!(wr_kind(WrId::new(KIND_RECV, 0)), Wr::Recv);
        for wrs in [1, 2, 5] {
            assert_eq!(wr_kind(send_wr_id(wrs)), Wr::Send { wrs });
        }
        assert_eq!(wr_kind(WrId::new(KIND_WRITE, 0)), Wr::Other);
    }
}
