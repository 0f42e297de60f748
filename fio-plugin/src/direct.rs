//! `mode=direct`: one admin connection and one direct-mode queue per fio thread
//! (`transport::direct::host`, as `nvmf-p2p perf --direct` attaches them; the host NQN must
//! be on the subsystem's `direct_hosts`). fio's buffers *are* the queue's registered data
//! pool: io_u buffer `i` is pool slot `i`, so a write's data is already where the target
//! reads it from and a read's data is left where fio looks (zero copy).

use std::ffi::c_uint;
use std::sync::Mutex;
use std::time::Duration;

use transport::direct::host::{DirectHost, DirectQueue, HostOptions};

use crate::engine::{Backend, IoReq, Queued};
use crate::options::Config;
use crate::sys::fio_ddir;
use crate::{EINVAL, EIO, WHO};

/// How long an attach may wait for a device reset to finish.
const PATIENCE: Duration = Duration::from_secs(30);
/// Largest I/O a direct queue carries (PRP1 + PRP2, no PRP list).
const MAX_IO: u64 = 8192;

/// What a fio job asks of its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// fio's iodepth.
    pub iodepth: u16,
    /// fio's largest block size (the pool slot size).
    pub max_bs: u64,
}

/// Connections `setup` attached for the job threads' `init` to take.
static PARKED: Mutex<Vec<(Config, Shape, DirectHost, DirectQueue)>> = Mutex::new(Vec::new());

fn attach(cfg: &Config, shape: Shape) -> Result<(DirectHost, DirectQueue), String> {
    if shape.max_bs > MAX_IO {
        return Err(format!(
            "bs={} is larger than the {MAX_IO} bytes a direct-mode command carries",
            shape.max_bs
        ));
    }
    let dst = cfg.dst.ok_or("traddr= is required")?;
    let io_size = shape.max_bs.max(512) as usize;
    // Slot stride as the queue lays the pool out (a power of two ≥ 512, or 8 KiB);
    // fio's buffer area is iodepth × bs plus up to two pages of alignment slack.
    let stride = if io_size <= 4096 {
        io_size.next_power_of_two()
    } else {
        8192
    };
    let slack = 8192usize.div_ceil(stride) as u16;
    let depth = shape.iodepth.saturating_add(1).saturating_add(slack);
    let mut host = DirectHost::connect(HostOptions {
        addr: dst,
        subnqn: cfg.subnqn.clone(),
        hostnqn: cfg.hostnqn.clone(),
        nsid: cfg.nsid,
        depth,
        io_size,
        completions: cfg.completions,
    })
    .map_err(|e| {
        format!(
            "cannot connect to {dst} as {}: {e} (is a target listening there?)",
            cfg.hostnqn
        )
    })?;
    let q = host
        .open_queue(PATIENCE)
        .map_err(|e| format!("direct attach to {} as {}: {e}", cfg.subnqn, cfg.hostnqn))?;
    if q.capacity() < usize::from(shape.iodepth) {
        return Err(format!(
            "the target grants direct queues of {} commands, fewer than iodepth={}; lower iodepth",
            q.capacity(),
            shape.iodepth
        ));
    }
    Ok((host, q))
}

/// Attaches to learn the namespace size in bytes; with `park` keeps the queue for a job
/// thread of this process.
pub fn probe(cfg: &Config, shape: Shape, park: bool) -> Result<u64, String> {
    let (host, q) = attach(cfg, shape)?;
    let d = q.descriptor();
    let bytes = d.blocks.get() * u64::from(d.lba_size.get());
    if park {
        PARKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((cfg.clone(), shape, host, q));
    } else {
        detach(host, q);
    }
    Ok(bytes)
}

fn detach(mut host: DirectHost, q: DirectQueue) {
    let token = q.descriptor().token.get();
    drop(q);
    let _ = host.detach(token);
}

/// One fio thread's direct queue.
pub struct Direct {
    q: Option<DirectQueue>,
    host: Option<DirectHost>,
    base: usize,
    pool_len: usize,
    stride: usize,
    shift: u32,
    reported: bool,
}

impl Direct {
    /// Takes the queue `setup` attached for these options, or attaches one.
    pub fn open(cfg: &Config, shape: Shape) -> Result<Direct, String> {
        let parked = {
            let mut p = PARKED.lock().unwrap_or_else(|p| p.into_inner());
            p.iter()
                .position(|(k, s, _, _)| k == cfg && *s == shape)
                .map(|i| p.swap_remove(i))
        };
        let (host, q) = match parked {
            Some((_, _, h, q)) => (h, q),
            None => attach(cfg, shape)?,
        };
        let (base, pool_len, stride) = q.data_pool();
        let shift = q.descriptor().lba_size.get().trailing_zeros();
        Ok(Direct {
            q: Some(q),
            host: Some(host),
            base: base as usize,
            pool_len,
            stride,
            shift,
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

impl Drop for Direct {
    fn drop(&mut self) {
        if let (Some(h), Some(q)) = (self.host.take(), self.q.take()) {
            detach(h, q);
        }
    }
}

impl Backend for Direct {
    fn alloc_pool(&mut self, len: usize) -> Result<*mut u8, String> {
        if len > self.pool_len {
            return Err(format!(
                "fio wants {len} bytes of buffers, more than the direct queue's {}-byte pool",
                self.pool_len
            ));
        }
        Ok(self.base as *mut u8)
    }

    fn free_pool(&mut self) {}

    fn queue(&mut self, r: &IoReq) -> Result<Queued, c_uint> {
        let Some(q) = self.q.as_mut() else {
            return Err(EIO);
        };
        let mask = (1u64 << self.shift) - 1;
        let write = match r.ddir {
            fio_ddir::DDIR_READ => false,
            fio_ddir::DDIR_WRITE => true,
            _ => {
                self.report("mode=direct carries reads and writes only (no trim or sync)".into());
                return Err(EINVAL);
            }
        };
        let off = (r.buf as usize).wrapping_sub(self.base);
        if r.offset & mask != 0
            || r.len as u64 & mask != 0
            || !off.is_multiple_of(self.stride)
            || r.len > self.stride
            || off >= self.pool_len
        {
            self.report(format!(
                "I/O of {} bytes at offset {} does not fit the direct queue's {}-byte slots of whole {}-byte blocks",
                r.len,
                r.offset,
                self.stride,
                1u64 << self.shift
            ));
            return Err(EINVAL);
        }
        let slot = (off / self.stride) as u16;
        match q.submit_in_slot(write, r.offset >> self.shift, slot, r.len, r.tag) {
            Ok(_) => Ok(Queued::Yes),
            Err(transport::Error::QueueFull { .. }) => Ok(Queued::Busy),
            Err(e) => {
                self.report(format!("direct submission failed: {e}"));
                Err(EIO)
            }
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        match self.q.as_mut() {
            Some(q) => q.flush().map_err(|e| format!("direct queue lost: {e}")),
            None => Ok(()),
        }
    }

    fn poll(&mut self, _max: usize, done: &mut dyn FnMut(u64, c_uint)) -> Result<usize, String> {
        let Some(q) = self.q.as_mut() else {
            return Ok(0);
        };
        let mut first_bad = None;
        // The queue reports every completion it has (at most iodepth, fio's max too).
        let r = q.poll(|c, _| {
            let errno = if c.status.is_success() { 0 } else { EIO };
            if errno != 0 && first_bad.is_none() {
                first_bad = Some(c.status);
            }
            done(c.user, errno);
        });
        if let Some(st) = first_bad {
            self.report(format!("a direct command failed: {st:?}"));
        }
        r.map_err(|e| format!("direct queue lost: {e}"))
    }
}
