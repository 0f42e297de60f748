//! Userspace initiator core (protocol side): builds fabrics/admin/I/O capsules, matches
//! responses to commands by CID, and records latencies for `perf`.
//!
//! The wire is abstracted by [`HostWire`] (implemented by the loopback host and by
//! [`crate::nvmf_rdma::RdmaHost`]), so the same queue logic runs in host tests and over
//! RDMA.

use std::time::{Duration, Instant};

use nvme::spec::{admin_opc, feat, reg, Cqe, Sqe, Status, U32};
use zerocopy::{FromZeros, IntoBytes};

use crate::error::{Error, Result};
use crate::fabrics::{
    CmRequest, ConnectCommand, ConnectData, PropertyCommand, SglDescriptor, FCTYPE_CONNECT,
    FCTYPE_PROPERTY_GET, FCTYPE_PROPERTY_SET, OPC_FABRICS,
};
use crate::loopback::LoopbackHost;

/// The host side of one queue's connection.
pub trait HostWire {
    /// Sends a command capsule with optional in-capsule data.
    fn send_capsule(&mut self, cmd: &[u8; 64], icd: &[u8]) -> Result<()>;
    /// Takes the next response capsule.
    fn recv_response(&mut self) -> Option<Cqe>;
    /// Puts on the wire every capsule a deferring wire has only staged (see
    /// [`crate::nvmf_rdma::RdmaHost::set_deferred_posts`]); a no-op for wires that send at once.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Before a sleep: asks for a wake-up on the next response (`ibv_req_notify_cq`).
    /// `Ok(false)`: this wire cannot wake a sleeper, poll or nap instead. After `Ok(true)`
    /// the caller looks for responses once more (one may have raced the arm).
    fn arm(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// The fd that becomes readable after [`HostWire::arm`] and a response.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Consumes the readiness of [`HostWire::wake_fd`] after a wake-up.
    fn woken(&mut self) {}
    /// True when a response is waiting; looks at the wire without taking it.
    fn has_response(&mut self) -> bool {
        false
    }
}

impl HostWire for LoopbackHost {
    fn send_capsule(&mut self, cmd: &[u8; 64], icd: &[u8]) -> Result<()> {
        self.send(cmd, icd)
    }
    fn recv_response(&mut self) -> Option<Cqe> {
        self.recv().map(|(c, _)| c)
    }
}

/// CM private data for connecting queue `qid` with `entries` entries (as Linux sends it:
/// hsqsize = entries − 1, hrqsize = entries).
pub fn cm_request(qid: u16, entries: u16) -> CmRequest {
    use zerocopy::little_endian::U16;
    CmRequest {
        recfmt: U16::new(0),
        qid: U16::new(qid),
        hrqsize: U16::new(entries),
        hsqsize: U16::new(entries.saturating_sub(1)),
        ..Default::default()
    }
}

/// Command builders. Every builder returns an [`Sqe`] with PSDT = SGL and CID 0; the
/// queue sets the CID on submission.
pub mod cmd {
    use super::*;

    fn sgl(mut s: Sqe, d: SglDescriptor) -> Sqe {
        s.set_psdt(1);
        let mut b = [0u8; 16];
        b.copy_from_slice(d.as_bytes());
        s.set_dptr(b);
        s
    }

    /// Commands without data carry a null keyed SGL descriptor (address 0, length 0,
    /// key 0), as the Linux host sends them; Linux nvmet rejects an all-zero descriptor.
    fn no_data(s: Sqe) -> Sqe {
        sgl(s, SglDescriptor::keyed(0, 0, 0, false))
    }

    /// Fabrics Connect for `qid` with 0-based `sqsize` and keep-alive `kato_ms`; the
    /// returned data goes in-capsule or through `data`'s keyed descriptor.
    pub fn connect(qid: u16, sqsize: u16, kato_ms: u32, data: SglDescriptor) -> Sqe {
        let mut c = ConnectCommand::new_zeroed();
        c.opcode = OPC_FABRICS;
        c.fctype = FCTYPE_CONNECT;
        c.qid = qid.into();
        c.sqsize = sqsize.into();
        c.kato = kato_ms.into();
        let mut s = Sqe::default();
        s.as_mut_bytes().copy_from_slice(c.as_bytes());
        sgl(s, data)
    }

    /// Connect data.
    pub fn connect_data(hostid: [u8; 16], cntlid: u16, subnqn: &str, hostnqn: &str) -> ConnectData {
        ConnectData::new(hostid, cntlid, subnqn, hostnqn)
    }

    fn property(fctype: u8, ofst: u32, size8: bool, value: u64) -> Sqe {
        let mut p = PropertyCommand::new_zeroed();
        p.opcode = OPC_FABRICS;
        p.fctype = fctype;
        p.attrib = u8::from(size8);
        p.ofst = ofst.into();
        p.value = value.into();
        let mut s = Sqe::default();
        s.as_mut_bytes().copy_from_slice(p.as_bytes());
        s = no_data(s);
        s
    }

    /// Property Get of the 4- or 8-byte register at `ofst`.
    pub fn property_get(ofst: u32, size8: bool) -> Sqe {
        property(FCTYPE_PROPERTY_GET, ofst, size8, 0)
    }

    /// Property Set of a 4-byte register.
    pub fn property_set(ofst: u32, value: u32) -> Sqe {
        property(FCTYPE_PROPERTY_SET, ofst, false, u64::from(value))
    }

    /// Identify (`cns`) into `data`.
    pub fn identify(cns: u8, nsid: u32, data: SglDescriptor) -> Sqe {
        sgl(Sqe::identify(cns, nsid, 0, 0), data)
    }

    /// Get Log Page `lid`, `len` bytes from `offset`.
    pub fn get_log_page(lid: u8, nsid: u32, len: u32, offset: u64, data: SglDescriptor) -> Sqe {
        sgl(Sqe::get_log_page(lid, nsid, len, offset, 0, 0), data)
    }

    /// Set Features.
    pub fn set_features(fid: u8, dw11: u32) -> Sqe {
        let mut s = Sqe::set_features(fid, dw11);
        s = no_data(s);
        s
    }

    /// Get Features.
    pub fn get_features(fid: u8) -> Sqe {
        let mut s = Sqe::get_features(fid);
        s = no_data(s);
        s
    }

    /// Set Features / Number of Queues (1-based counts).
    pub fn set_num_queues(n: u16) -> Sqe {
        set_features(
            feat::NUM_QUEUES,
            u32::from(n.saturating_sub(1)) | (u32::from(n.saturating_sub(1)) << 16),
        )
    }

    /// Keep Alive.
    pub fn keep_alive() -> Sqe {
        let mut s = Sqe::keep_alive();
        s = no_data(s);
        s
    }

    /// Asynchronous Event Request.
    pub fn async_event_request() -> Sqe {
        let mut s = Sqe::new(admin_opc::ASYNC_EVENT_REQUEST);
        s = no_data(s);
        s
    }

    /// Read `nlb` blocks (1-based) at `slba` into `data`.
    pub fn read(nsid: u32, slba: u64, nlb: u16, data: SglDescriptor) -> Sqe {
        sgl(Sqe::read(nsid, slba, nlb.saturating_sub(1), 0, 0), data)
    }

    /// Write `nlb` blocks (1-based) at `slba` from `data`.
    pub fn write(nsid: u32, slba: u64, nlb: u16, data: SglDescriptor) -> Sqe {
        sgl(Sqe::write(nsid, slba, nlb.saturating_sub(1), 0, 0), data)
    }

    /// Flush.
    pub fn flush(nsid: u32) -> Sqe {
        let mut s = Sqe::flush(nsid);
        s = no_data(s);
        s
    }

    /// Write Zeroes of `nlb` blocks (1-based).
    pub fn write_zeroes(nsid: u32, slba: u64, nlb: u16) -> Sqe {
        let mut s = Sqe::write_zeroes(nsid, slba, nlb.saturating_sub(1));
        s = no_data(s);
        s
    }

    /// Dataset Management (deallocate) over `nr` ranges (1-based) described by `data`.
    pub fn deallocate(nsid: u32, nr: u8, data: SglDescriptor) -> Sqe {
        let mut s = Sqe::dsm(nsid, nr.saturating_sub(1), nvme::spec::dsm::DEALLOCATE, 0);
        s.cdw10 = U32::new(u32::from(nr.saturating_sub(1)));
        sgl(s, data)
    }

    /// Sets the CID of a raw command.
    pub fn with_cid(mut s: Sqe, cid: u16) -> Sqe {
        s.set_cid(cid);
        s
    }

    /// Reads CQE DW0|DW1 as one 64-bit value.
    pub fn result64(c: &Cqe) -> u64 {
        u64::from(c.dw0.get()) | (u64::from(c.dw1.get()) << 32)
    }
}

/// Waits (spinning on the wire) for the next completion of `q`, up to `timeout`.
pub fn wait<W: HostWire>(q: &mut InitiatorQueue<W>, timeout: Duration) -> Result<Completion> {
    let start = Instant::now();
    loop {
        if let Some(c) = q.poll_one() {
            return Ok(c);
        }
        if start.elapsed() > timeout {
            return Err(Error::NoResponse {
                qid: q.qid(),
                timeout,
            });
        }
        std::hint::spin_loop();
    }
}

/// A failed fabrics Connect of queue `qid`: a refusal as [`Error::ConnectRefused`] (named
/// by [`crate::fabrics::connect_refusal`]: "subsystem ... not found on this target", "host
/// ... not allowed"), anything else as [`Error::ConnectFailed`] with the cause as source.
pub fn connect_error(
    e: Error,
    dst: std::net::SocketAddr,
    qid: u16,
    subnqn: &str,
    hostnqn: &str,
) -> Error {
    match e {
        Error::CommandFailed {
            sct, sc, result, ..
        } => Error::ConnectRefused {
            dst,
            qid,
            subnqn: subnqn.to_string(),
            hostnqn: hostnqn.to_string(),
            sct,
            sc,
            result,
        },
        other => Error::ConnectFailed {
            dst,
            qid,
            subnqn: subnqn.to_string(),
            hostnqn: hostnqn.to_string(),
            source: Box::new(other),
        },
    }
}

/// Submits `sqe` and waits for its completion; a non-success status is an error.
pub fn execute<W: HostWire>(
    q: &mut InitiatorQueue<W>,
    sqe: Sqe,
    icd: &[u8],
    timeout: Duration,
) -> Result<Completion> {
    let cid = q.submit(sqe, icd, 0)?;
    loop {
        let c = wait(q, timeout)?;
        if c.cid != cid {
            continue;
        }
        let st = c.status();
        if !st.is_success() {
            return Err(Error::CommandFailed {
                qid: q.qid(),
                cid,
                sct: st.sct(),
                sc: st.sc(),
                result: c.cqe.dw0.get(),
            });
        }
        return Ok(c);
    }
}

/// Enables the controller behind an admin queue the way a host does after Connect:
/// Property Set CC (EN, 64-byte SQEs, 16-byte CQEs), then Property Get CSTS until RDY,
/// for at most `timeout`.
pub fn enable_controller<W: HostWire>(q: &mut InitiatorQueue<W>, timeout: Duration) -> Result<()> {
    let cc = 1 | (6 << 16) | (4 << 20); // EN, IOSQES 64 B, IOCQES 16 B
    execute(q, cmd::property_set(reg::CC as u32, cc), &[], timeout)?;
    let start = Instant::now();
    loop {
        let csts = execute(q, cmd::property_get(reg::CSTS as u32, false), &[], timeout)?;
        if csts.cqe.dw0.get() & 1 == 1 {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(Error::NotReady {
                qid: q.qid(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A finished command.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// Command identifier.
    pub cid: u16,
    /// Caller's tag given at submission.
    pub user: u64,
    /// The response.
    pub cqe: Cqe,
    /// Time from submission to response.
    pub latency: Duration,
}

impl Completion {
    /// The response status.
    pub fn status(&self) -> Status {
        self.cqe.status()
    }
}

#[derive(Clone, Copy)]
struct Pending {
    start: Instant,
    user: u64,
}

/// One initiator queue: CID allocation, outstanding commands, latency histogram.
pub struct InitiatorQueue<W: HostWire> {
    wire: W,
    qid: u16,
    depth: u16,
    free: Vec<u16>,
    pending: Box<[Option<Pending>]>,
    /// Latencies of completed commands.
    pub histogram: LatencyHistogram,
    /// Responses whose CID matched nothing outstanding.
    pub stray_responses: u64,
}

impl<W: HostWire> InitiatorQueue<W> {
    /// A queue of `depth` outstanding commands over `wire`.
    pub fn new(wire: W, qid: u16, depth: u16) -> Self {
        InitiatorQueue {
            wire,
            qid,
            depth,
            free: (0..depth).rev().collect(),
            pending: vec![None; usize::from(depth)].into_boxed_slice(),
            histogram: LatencyHistogram::new(),
            stray_responses: 0,
        }
    }

    /// The wire.
    pub fn wire(&self) -> &W {
        &self.wire
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that may be outstanding at once.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        usize::from(self.depth) - self.free.len()
    }

    /// Submits `cmd` (its CID is assigned here) with in-capsule data `icd`; `user` comes
    /// back in the [`Completion`].
    pub fn submit(&mut self, mut cmd: Sqe, icd: &[u8], user: u64) -> Result<u16> {
        let Some(cid) = self.free.pop() else {
            return Err(Error::QueueFull {
                qid: self.qid,
                depth: self.depth,
            });
        };
        cmd.set_cid(cid);
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(cmd.as_bytes());
        if let Err(e) = self.wire.send_capsule(&bytes, icd) {
            self.free.push(cid);
            return Err(e);
        }
        self.pending[usize::from(cid)] = Some(Pending {
            start: Instant::now(),
            user,
        });
        Ok(cid)
    }

    /// Mutable access to the wire (e.g. to switch deferred posting on).
    pub fn wire_mut(&mut self) -> &mut W {
        &mut self.wire
    }

    /// True when a response is waiting (taken by the next [`InitiatorQueue::poll_one`]).
    pub fn has_response(&mut self) -> bool {
        self.wire.has_response()
    }

    /// Sends what the wire has staged (one post for a batch of submissions).
    pub fn flush(&mut self) -> Result<()> {
        self.wire.flush()
    }

    /// Takes the next completion, if a response arrived.
    pub fn poll_one(&mut self) -> Option<Completion> {
        loop {
            let cqe = self.wire.recv_response()?;
            let cid = cqe.cid.get();
            match self
                .pending
                .get_mut(usize::from(cid))
                .and_then(Option::take)
            {
                Some(p) => {
                    self.free.push(cid);
                    let latency = p.start.elapsed();
                    self.histogram.record(latency);
                    return Some(Completion {
                        cid,
                        user: p.user,
                        cqe,
                        latency,
                    });
                }
                None => self.stray_responses += 1,
            }
        }
    }
}

/// Latency histogram with log-linear buckets (16 per power of two, ≤ 6.25 % error),
/// fixed size, no allocation when recording.
#[derive(Clone)]
pub struct LatencyHistogram {
    buckets: Box<[u64; 64 * 16]>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
    min_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: Box::new([0; 64 * 16]),
            count: 0,
            sum_ns: 0,
            max_ns: 0,
            min_ns: u64::MAX,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < 16 {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros() as usize; // ≥ 4
        let sub = ((ns >> (exp - 4)) & 15) as usize;
        (exp - 3) * 16 + sub
    }

    fn lower_bound(idx: usize) -> u64 {
        if idx < 16 {
            return idx as u64;
        }
        let exp = idx / 16 + 3;
        let sub = (idx % 16) as u64;
        (1u64 << exp) | (sub << (exp - 4))
    }

    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::index(ns).min(64 * 16 - 1)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
        self.min_ns = self.min_ns.min(ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean latency.
    pub fn mean(&self) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((self.sum_ns / u128::from(self.count)) as u64)
    }

    /// Largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The `p`-th percentile (0–100), as the lower bound of its bucket (clamped to the
    /// observed min/max).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        if rank >= self.count {
            return self.max();
        }
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let v = Self::lower_bound(i).clamp(self.min_ns, self.max_ns);
                return Duration::from_nanos(v);
            }
        }
        self.max()
    }

    /// Adds another histogram's samples (per-thread histograms into one report).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.min_ns = self.min_ns.min(other.min_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme::spec::io_opc;

    /// A wire that takes every capsule and never answers.
    struct Silent;

    impl HostWire for Silent {
        fn send_capsule(&mut self, _cmd: &[u8; 64], _icd: &[u8]) -> Result<()> {
            Ok(())
        }
        fn recv_response(&mut self) -> Option<Cqe> {
            None
        }
    }

    #[test]
    fn unanswered_commands_are_typed_timeouts_naming_the_queue() {
        let mut q = InitiatorQueue::new(Silent, 3, 4);
        let t = Duration::from_millis(5);
        let e = execute(&mut q, cmd::keep_alive(), &[], t).unwrap_err();
        assert!(
            matches!(e, Error::NoResponse { qid: 3, timeout } if timeout == t),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "queue 3: no response within 5ms");
        let e = enable_controller(&mut q, t).unwrap_err();
        assert!(matches!(e, Error::NoResponse { qid: 3, .. }), "{e:?}");
    }

    #[test]
    fn connect_errors_are_typed_with_the_cause_as_source() {
        use std::error::Error as _;
        let dst: std::net::SocketAddr = "10.0.0.1:4420".parse().unwrap();
        let refused = Error::CommandFailed {
            qid: 2,
            cid: 0,
            sct: 1,
            sc: crate::fabrics::connect_status::INVALID_HOST,
            result: 0,
        };
        let e = connect_error(refused, dst, 2, "nqn.s", "nqn.h");
        assert!(
            matches!(&e, Error::ConnectRefused { qid: 2, subnqn, hostnqn, .. }
                if subnqn == "nqn.s" && hostnqn == "nqn.h"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("10.0.0.1:4420: host nqn.h is not allowed by subsystem nqn.s"),
            "{text}"
        );
        let lost = Error::NoResponse {
            qid: 2,
            timeout: Duration::from_secs(1),
        };
        let e = connect_error(lost, dst, 2, "nqn.s", "nqn.h");
        assert!(matches!(e, Error::ConnectFailed { qid: 2, .. }), "{e:?}");
        let source = e.source().expect("the cause is the source");
        assert_eq!(source.to_string(), "queue 2: no response within 1s");
        assert!(
            e.to_string().starts_with(
                "fabrics Connect of queue 2 to nqn.s at 10.0.0.1:4420 as nqn.h failed"
            ),
            "{e}"
        );
        // fio's VM test and users look for "cannot connect to" (fio-plugin/tests/vm_fio.rs).
        let e = Error::Unreachable {
            dst,
            qid: 0,
            source: Box::new(Error::NoRouteDevice { dst }),
        };
        assert!(
            e.to_string().starts_with("cannot connect to 10.0.0.1:4420"),
            "{e}"
        );
        assert!(
            e.to_string().ends_with("(is a target listening there?)"),
            "{e}"
        );
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.percentile(50.0).as_micros() as f64;
        let p99 = h.percentile(99.0).as_micros() as f64;
        assert!((p50 - 500.0).abs() / 500.0 < 0.07, "p50 {p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.07, "p99 {p99}");
        assert_eq!(h.max(), Duration::from_micros(1000));
        assert!((h.mean().as_micros() as i64 - 500).abs() <= 1);
        let mut h2 = LatencyHistogram::new();
        h2.record(Duration::from_secs(1));
        h2.merge(&h);
        assert_eq!(h2.count(), 1001);
        assert_eq!(h2.percentile(100.0), Duration::from_secs(1));
        for ns in [0u64, 15, 16, 17, 1000, 123_456_789] {
            let i = LatencyHistogram::index(ns);
            assert!(LatencyHistogram::lower_bound(i) <= ns);
            assert!(ns < 16 || LatencyHistogram::lower_bound(i + 1) > ns);
        }
    }

    #[test]
    fn builders_set_sgl_and_fields() {
        let d = SglDescriptor::keyed(0x1000, 4096, 7, false);
        let s = cmd::read(1, 10, 8, d);
        assert_eq!(s.psdt(), 1);
        assert_eq!(s.opcode(), io_opc::READ);
        assert_eq!(s.nlb0(), 7);
        assert_eq!(&s.as_bytes()[24..40], d.as_bytes());
        let c = cmd::connect(2, 127, 0, SglDescriptor::in_capsule(0, 1024));
        assert_eq!(c.as_bytes()[4], FCTYPE_CONNECT);
        assert_eq!(&c.as_bytes()[42..46], &[2, 0, 127, 0]);
        assert_eq!(c.as_bytes()[39], 0x01);
        // No-data commands carry a null keyed descriptor, like the Linux host.
        for s in [
            cmd::keep_alive(),
            cmd::property_get(0, true),
            cmd::flush(1),
            cmd::get_features(7),
        ] {
            assert_eq!(s.psdt(), 1);
            assert_eq!(
                &s.as_bytes()[24..40],
                SglDescriptor::keyed(0, 0, 0, false).as_bytes()
            );
        }
    }
}
