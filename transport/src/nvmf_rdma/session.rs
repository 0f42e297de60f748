//! An initiator session over NVMe-oF/RDMA: the admin queue connected, the controller
//! enabled, one namespace identified; I/O queues connected on demand. Shared by
//! `nvmf-p2p perf` and the fio engine (fio-plugin), so both connect the same way and fail
//! with the same sentences.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nvme::spec::{cns, IdentifyNamespace};
use rdma::RegisteredBuffer;
use zerocopy::{FromBytes, IntoBytes};

use super::{queue_err, RdmaHost};
use crate::error::{Error, Result};
use crate::fabrics::{SglDescriptor, CNTLID_DYNAMIC};
use crate::initiator::{cmd, enable_controller, execute, InitiatorQueue};

/// Host NQN used when none is given (`perf --hostnqn`, the fio engine's `hostnqn`).
pub const DEFAULT_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-000000000001";

/// Where and who.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Target address and port.
    pub dst: SocketAddr,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Our host NQN.
    pub hostnqn: String,
    /// Namespace to identify.
    pub nsid: u32,
    /// I/O queues to ask the controller for (Set Features / Number of Queues).
    pub io_queues: u16,
    /// Keep-alive timeout in ms sent in the admin Connect (0: none; the caller then sends no
    /// Keep Alive commands).
    pub kato_ms: u32,
    /// Time allowed for each connection and admin command.
    pub timeout: Duration,
}

/// The namespace the session identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
}

/// A connected admin queue of one controller.
pub struct Session {
    admin: InitiatorQueue<RdmaHost>,
    abuf: RegisteredBuffer,
    opts: SessionOptions,
    hostid: [u8; 16],
    cntlid: u16,
    ns: Namespace,
    granted: u16,
    /// When [`Session::keep_alive_tick`] sends the next Keep Alive (KATO/2 apart).
    next_keep_alive: Option<Instant>,
}

/// Half the keep-alive timeout: how often a Keep Alive goes out (`None`: no KATO).
fn opts_kato(opts: &SessionOptions) -> Option<Duration> {
    (opts.kato_ms > 0).then(|| Duration::from_millis(u64::from(opts.kato_ms / 2)))
}

/// A keyed SGL data block descriptor for `len` bytes at `off` of `buf`.
pub fn keyed(buf: &RegisteredBuffer, off: usize, len: usize) -> SglDescriptor {
    let r = buf.mr().remote(off);
    SglDescriptor::keyed(r.addr, len as u32, r.rkey, false)
}

/// A host identifier derived from the host NQN (stable across runs).
pub fn hostid_of(hostnqn: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in hostnqn.bytes().enumerate() {
        id[i % 16] = id[i % 16].wrapping_mul(31).wrapping_add(b);
    }
    id
}

impl Session {
    /// Connects the admin queue, enables the controller, identifies `opts.nsid` and asks
    /// for `opts.io_queues` I/O queues.
    pub fn connect(opts: SessionOptions) -> Result<Session> {
        let dst = opts.dst;
        let subnqn = opts.subnqn.as_str();
        let t = opts.timeout;
        let host = RdmaHost::connect(dst, 0, 32, 0, t).map_err(|e| Error::Unreachable {
            dst,
            qid: 0,
            source: Box::new(e),
        })?;
        let abuf = host.register(8192)?;
        let mut admin = InitiatorQueue::new(host, 0, 31);
        let hostid = hostid_of(&opts.hostnqn);
        let data = cmd::connect_data(hostid, CNTLID_DYNAMIC, subnqn, &opts.hostnqn);
        abuf.write(0, data.as_bytes())
            .map_err(queue_err(0, "admin buffer"))?;
        let c = execute(
            &mut admin,
            cmd::connect(0, 31, opts.kato_ms, keyed(&abuf, 0, 1024)),
            &[],
            t,
        )
        .map_err(|e| crate::initiator::connect_error(e, dst, 0, subnqn, &opts.hostnqn))?;
        let cntlid = c.cqe.dw0.get() as u16;
        enable_controller(&mut admin, t)?;
        execute(
            &mut admin,
            cmd::identify(cns::NAMESPACE, opts.nsid, keyed(&abuf, 0, 4096)),
            &[],
            t,
        )
        .map_err(|e| Error::Identify {
            nsid: opts.nsid,
            source: Box::new(e),
        })?;
        let mut raw = [0u8; 4096];
        abuf.read(0, &mut raw)
            .map_err(queue_err(0, "admin buffer"))?;
        let id = IdentifyNamespace::read_from_bytes(&raw[..]).map_err(|_| Error::Malformed {
            what: "Identify Namespace data",
            reason: format!("not {} bytes", raw.len()),
        })?;
        let ns = Namespace {
            nsid: opts.nsid,
            block_size: id.block_size(),
            blocks: id.nsze.get(),
        };
        if ns.blocks == 0 || ns.block_size == 0 {
            return Err(Error::NamespaceInactive {
                nsid: opts.nsid,
                subnqn: subnqn.to_string(),
            });
        }
        let want = opts.io_queues.max(1);
        let granted = execute(&mut admin, cmd::set_num_queues(want), &[], t)?
            .cqe
            .dw0
            .get();
        // NSQA / NCQA are 0-based.
        let granted = ((granted & 0xffff).min(granted >> 16) + 1) as u16;
        let next_keep_alive = opts_kato(&opts).map(|half| Instant::now() + half);
        Ok(Session {
            admin,
            abuf,
            opts,
            hostid,
            cntlid,
            ns,
            granted,
            next_keep_alive,
        })
    }

    /// The identified namespace.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// I/O queues the controller granted.
    pub fn granted_queues(&self) -> u16 {
        self.granted
    }

    /// The options it was connected with.
    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }

    /// Connects I/O queue `qid` for up to `depth` outstanding commands (fewer when the
    /// target accepts a smaller queue: [`InitiatorQueue::depth`] says). Register data
    /// buffers on its protection domain with `queue.wire().register(len)`.
    pub fn connect_io_queue(&self, qid: u16, depth: u16) -> Result<InitiatorQueue<RdmaHost>> {
        let t = self.opts.timeout;
        let host = RdmaHost::connect(self.opts.dst, qid, depth.saturating_add(1), 0, t)?;
        let qd = depth.min(host.accepted_queue_size().saturating_sub(1).max(1));
        let cbuf = host.register(4096)?;
        let mut io = InitiatorQueue::new(host, qid, qd);
        let data = cmd::connect_data(
            self.hostid,
            self.cntlid,
            &self.opts.subnqn,
            &self.opts.hostnqn,
        );
        cbuf.write(0, data.as_bytes())
            .map_err(queue_err(qid, "Connect data buffer"))?;
        execute(
            &mut io,
            cmd::connect(qid, qd, 0, keyed(&cbuf, 0, 1024)),
            &[],
            t,
        )
        .map_err(|e| {
            crate::initiator::connect_error(
                e,
                self.opts.dst,
                qid,
                &self.opts.subnqn,
                &self.opts.hostnqn,
            )
        })?;
        Ok(io)
    }

    /// Keeps the controller alive while the caller runs I/O on its queues: with a KATO,
    /// submits a Keep Alive every KATO/2 without waiting for it, and reaps admin
    /// completions. Cheap when nothing is due; call it from the I/O loop. A failed Keep
    /// Alive, or one still unanswered when the next is due, is an error. (Do not mix with
    /// commands of your own on [`Session::admin`]: this reaps their completions too.)
    pub fn keep_alive_tick(&mut self, now: Instant) -> Result<()> {
        while let Some(c) = self.admin.poll_one() {
            let st = c.status();
            if !st.is_success() {
                return Err(Error::KeepAliveFailed {
                    sct: st.sct(),
                    sc: st.sc(),
                });
            }
        }
        let Some(due) = self.next_keep_alive else {
            return Ok(());
        };
        if now < due {
            return Ok(());
        }
        if self.admin.outstanding() > 0 {
            return Err(Error::KeepAliveUnanswered {
                waited: Duration::from_millis(u64::from(self.opts.kato_ms / 2)),
            });
        }
        self.admin.submit(cmd::keep_alive(), &[], 0)?;
        self.next_keep_alive = opts_kato(&self.opts).map(|half| now + half);
        Ok(())
    }

    /// The admin queue (for commands the session does not wrap).
    pub fn admin(&mut self) -> (&mut InitiatorQueue<RdmaHost>, &RegisteredBuffer) {
        (&mut self.admin, &self.abuf)
    }
}
