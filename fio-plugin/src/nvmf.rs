//! `mode=nvmf`: one NVMe-oF/RDMA controller session per fio thread (admin queue + one I/O
//! queue of `iodepth` commands) through `transport::nvmf_rdma::Session`, as `nvmf-p2p perf`
//! connects. fio's buffers are one MR on the I/O queue's protection domain; a command's
//! keyed SGL points straight at the io_u's buffer (zero copy). `queue` stages capsules
//! in the send ring, `commit` posts them in one chain.

use std::ffi::c_uint;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nvme::spec::DsmRange;
use rdma::RegisteredBuffer;
use transport::initiator::{cmd, InitiatorQueue};
use transport::nvmf_rdma::{keyed, RdmaHost, Session, SessionOptions};
use zerocopy::IntoBytes;

use crate::engine::{Backend, IoReq, Key, Queued};
use crate::options::Config;
use crate::sys::fio_ddir;
use crate::{EINVAL, EIO, WHO};

const TIMEOUT: Duration = Duration::from_secs(10);
/// No completion for this long with commands outstanding: the target is gone.
const STALL: Duration = Duration::from_secs(30);

/// Sessions `setup` connected (fio's main thread) for the job threads' `init` to take.
static PARKED: Mutex<Vec<(Key, Session)>> = Mutex::new(Vec::new());

fn connect(cfg: &Config) -> Result<Session, String> {
    let dst = cfg.dst.ok_or("traddr= is required")?;
    Session::connect(SessionOptions {
        dst,
        subnqn: cfg.subnqn.clone(),
        hostnqn: cfg.hostnqn.clone(),
        nsid: cfg.nsid,
        io_queues: 1,
        // fio runs may last longer than any keep-alive timeout, and the engine sends no
        // Keep Alive: ask for none.
        kato_ms: 0,
        timeout: TIMEOUT,
    })
    .map_err(|e| e.to_string())
}

/// Connects to learn the namespace size in bytes; with `park` keeps the session for a job
/// thread of this process.
pub fn probe(cfg: &Config, park: bool) -> Result<u64, String> {
    let s = connect(cfg)?;
    let ns = s.namespace();
    if park {
        PARKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((cfg.clone(), s));
    }
    Ok(ns.blocks * u64::from(ns.block_size))
}

/// One fio thread's controller session and I/O queue.
pub struct Nvmf {
    // Field order is drop order: the pool's MR before the queue's PD, the I/O queue
    // before the admin session.
    pool: Option<RegisteredBuffer>,
    ranges: RegisteredBuffer,
    io: InitiatorQueue<RdmaHost>,
    _session: Session,
    nsid: u32,
    shift: u32,
    last_progress: Instant,
    reported: bool,
}

impl Nvmf {
    /// Opens the thread's I/O queue for `depth` commands (on a parked session if `setup`
    /// left one with the same options).
    pub fn open(cfg: &Config, depth: u16) -> Result<Nvmf, String> {
        let parked = {
            let mut p = PARKED.lock().unwrap_or_else(|p| p.into_inner());
            p.iter()
                .position(|(k, _)| k == cfg)
                .map(|i| p.swap_remove(i).1)
        };
        let session = match parked {
            Some(s) => s,
            None => connect(cfg)?,
        };
        let mut io = session
            .connect_io_queue(1, depth)
            .map_err(|e| e.to_string())?;
        // `queue` stages capsules, `commit` posts the batch.
        io.wire_mut()
            .set_deferred_posts(true)
            .map_err(|e| e.to_string())?;
        if io.depth() < depth {
            return Err(format!(
                "the target accepts {} commands per queue, fewer than iodepth={depth}; lower iodepth",
                io.depth()
            ));
        }
        let ranges = io
            .wire()
            .register(usize::from(depth) * 16)
            .map_err(|e| e.to_string())?;
        let ns = session.namespace();
        Ok(Nvmf {
            pool: None,
            ranges,
            io,
            _session: session,
            nsid: ns.nsid,
            shift: ns.block_size.trailing_zeros(),
            last_progress: Instant::now(),
            reported: false,
        })
    }

    fn report(&mut self, msg: String) {
        if !self.reported {
            self.reported = true;
            eprintln!("{WHO}: {msg}");
        }
    }
}

impl Backend for Nvmf {
    fn alloc_pool(&mut self, len: usize) -> Result<*mut u8, String> {
        let b = self
            .io
            .wire()
            .register(len)
            .map_err(|e| format!("cannot register {len} bytes of I/O buffers: {e}"))?;
        let p = b.as_ptr();
        self.pool = Some(b);
        Ok(p)
    }

    fn free_pool(&mut self) {
        self.pool = None;
    }

    fn queue(&mut self, r: &IoReq) -> Result<Queued, c_uint> {
        let (slba, nlb) = match r.blocks(self.shift) {
            Ok(b) => b,
            Err(msg) => {
                self.report(msg);
                return Err(EINVAL);
            }
        };
        let sqe = match r.ddir {
            fio_ddir::DDIR_READ | fio_ddir::DDIR_WRITE => {
                let Some(pool) = &self.pool else {
                    return Err(EINVAL);
                };
                let off = (r.buf as usize).wrapping_sub(pool.as_ptr() as usize);
                let nlb16 = u16::try_from(nlb).ok().filter(|&n| n > 0);
                let (Some(nlb16), true) = (
                    nlb16,
                    off.checked_add(r.len).is_some_and(|e| e <= pool.len()),
                ) else {
                    return Err(EINVAL);
                };
                let d = keyed(pool, off, r.len);
                if r.ddir == fio_ddir::DDIR_READ {
                    cmd::read(self.nsid, slba, nlb16, d)
                } else {
                    cmd::write(self.nsid, slba, nlb16, d)
                }
            }
            fio_ddir::DDIR_SYNC | fio_ddir::DDIR_DATASYNC => cmd::flush(self.nsid),
            fio_ddir::DDIR_TRIM => {
                let off = r.index * 16;
                let Ok(nlb32) = u32::try_from(nlb) else {
                    return Err(EINVAL);
                };
                if self
                    .ranges
                    .write(off, DsmRange::new(slba, nlb32).as_bytes())
                    .is_err()
                {
                    return Err(EINVAL);
                }
                cmd::deallocate(self.nsid, 1, keyed(&self.ranges, off, 16))
            }
            _ => return Err(EINVAL),
        };
        if self.io.outstanding() == 0 {
            self.last_progress = Instant::now();
        }
        match self.io.submit(sqe, &[], r.tag) {
            Ok(_) => Ok(Queued::Yes),
            Err(transport::Error::QueueFull { .. }) => Ok(Queued::Busy),
            Err(e) => {
                self.report(format!("submission failed: {e}"));
                Err(EIO)
            }
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        self.io
            .flush()
            .map_err(|e| format!("posting the submissions failed: {e}"))
    }

    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, c_uint)) -> Result<usize, String> {
        self.commit()?;
        let mut n = 0;
        while n < max {
            let Some(c) = self.io.poll_one() else { break };
            n += 1;
            let st = c.status();
            let errno = if st.is_success() {
                0
            } else {
                self.report(format!("a command failed: {st:?}"));
                EIO
            };
            done(c.user, errno);
        }
        if n > 0 {
            self.last_progress = Instant::now();
        } else if self.io.outstanding() > 0 && self.last_progress.elapsed() > STALL {
            return Err(format!(
                "no completion for {}s with {} commands outstanding: the target stopped answering",
                STALL.as_secs(),
                self.io.outstanding()
            ));
        }
        Ok(n)
    }
}
