//! `mode=local`: a controller bound to vfio-pci through our driver (`nvme` crate), as
//! `nvmf-p2p perf --local` drives it. The controller is opened once per process and
//! shared by the fio threads; each thread creates its own I/O queue pair. fio's buffers
//! are one VFIO DMA allocation; a command's PRPs point straight at the io_u's buffer.

use std::ffi::c_uint;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvme::spec::{dsm, DsmRange, Sqe};
use nvme::vfio::NvmeDevice;
use nvme::{ControllerOptions, DmaBuffer, IoQueuePair, QueueOptions};
use zerocopy::IntoBytes;

use crate::engine::{Backend, IoReq, Queued};
use crate::options::Config;
use crate::sys::fio_ddir;
use crate::{EINVAL, EIO, WHO};

/// No completion for this long with commands outstanding: the controller is stuck.
const STALL: Duration = Duration::from_secs(30);

/// Controllers open in this process, by PCI address.
static DEVICES: Mutex<Vec<(String, Arc<NvmeDevice>)>> = Mutex::new(Vec::new());

fn device(bdf: &str, keep: bool) -> Result<Arc<NvmeDevice>, String> {
    let mut d = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, dev)) = d.iter().find(|(b, _)| b == bdf) {
        return Ok(dev.clone());
    }
    let dev =
        Arc::new(NvmeDevice::open(bdf, ControllerOptions::default()).map_err(|e| e.to_string())?);
    if keep {
        d.push((bdf.to_string(), dev.clone()));
    }
    Ok(dev)
}

fn namespace(dev: &NvmeDevice, bdf: &str, nsid: u32) -> Result<(u64, u32), String> {
    dev.controller()
        .info()
        .namespaces
        .iter()
        .find(|n| n.nsid == nsid)
        .map(|n| (n.blocks, n.block_size))
        .ok_or_else(|| format!("{bdf} has no active namespace {nsid}"))
}

/// Opens the controller to learn the namespace size in bytes; with `keep` it stays open
/// for the job threads of this process.
pub fn probe(cfg: &Config, keep: bool) -> Result<u64, String> {
    let bdf = cfg.bdf.as_deref().ok_or("bdf= is required")?;
    let dev = device(bdf, keep)?;
    let (blocks, bs) = namespace(&dev, bdf, cfg.nsid)?;
    Ok(blocks * u64::from(bs))
}

/// One fio thread's queue pair.
pub struct Local {
    // Field order is drop order: buffers and the queue before the controller.
    pool: Option<DmaBuffer>,
    ranges: DmaBuffer,
    qp: IoQueuePair,
    dev: Arc<NvmeDevice>,
    bdf: String,
    nsid: u32,
    shift: u32,
    unrung: bool,
    last_progress: Instant,
    reported: bool,
}

impl Local {
    /// Creates the thread's queue pair for `depth` commands.
    pub fn open(cfg: &Config, depth: u16) -> Result<Local, String> {
        let bdf = cfg.bdf.clone().ok_or("bdf= is required")?;
        let dev = device(&bdf, true)?;
        let (_, bs) = namespace(&dev, &bdf, cfg.nsid)?;
        let ctrl = dev.controller();
        let qp = ctrl
            .create_io_queue_pair(QueueOptions {
                depth: depth.saturating_add(1).max(2),
                sq_in_cmb: false,
            })
            .map_err(|e| e.to_string())?;
        if qp.depth() - 1 < depth {
            return Err(format!(
                "{bdf} allows {} commands per queue, fewer than iodepth={depth}; lower iodepth",
                qp.depth() - 1
            ));
        }
        let ranges = ctrl
            .alloc_dma(usize::from(depth) * 16)
            .map_err(|e| e.to_string())?;
        Ok(Local {
            pool: None,
            ranges,
            qp,
            dev,
            bdf,
            nsid: cfg.nsid,
            shift: bs.trailing_zeros(),
            unrung: false,
            last_progress: Instant::now(),
            reported: false,
        })
    }

    fn report(&mut self, msg: String) {
        if !self.reported {
            self.reported = true;
            eprintln!("{WHO}: {}: {msg}", self.bdf);
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // The last user of the controller closes it (the registry's copy and ours remain).
        let mut d = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&self.dev) <= 2 {
            d.retain(|(b, _)| b != &self.bdf);
        }
    }
}

impl Backend for Local {
    fn alloc_pool(&mut self, len: usize) -> Result<*mut u8, String> {
        let b = self.dev.controller().alloc_dma(len).map_err(|e| {
            format!("cannot allocate {len} bytes of DMA memory for I/O buffers: {e}")
        })?;
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
        let res = match r.ddir {
            fio_ddir::DDIR_READ | fio_ddir::DDIR_WRITE => {
                let Some(pool) = &self.pool else {
                    return Err(EINVAL);
                };
                let off = (r.buf as usize).wrapping_sub(pool.as_ptr() as usize);
                let Ok(buf) = pool.slice(off, r.len) else {
                    return Err(EINVAL);
                };
                if r.ddir == fio_ddir::DDIR_READ {
                    self.qp.queue_read(self.nsid, slba, &buf, r.tag)
                } else {
                    self.qp.queue_write(self.nsid, slba, &buf, r.tag)
                }
            }
            fio_ddir::DDIR_SYNC | fio_ddir::DDIR_DATASYNC => {
                self.qp.queue_command(Sqe::flush(self.nsid), None, r.tag)
            }
            fio_ddir::DDIR_TRIM => {
                let off = r.index * 16;
                let Ok(nlb32) = u32::try_from(nlb) else {
                    return Err(EINVAL);
                };
                let Ok(range) = self.ranges.slice(off, 16) else {
                    return Err(EINVAL);
                };
                if range
                    .write(0, DsmRange::new(slba, nlb32).as_bytes())
                    .is_err()
                {
                    return Err(EINVAL);
                }
                let sqe = Sqe::dsm(self.nsid, 0, dsm::DEALLOCATE, 0);
                self.qp.queue_command(sqe, Some(&range), r.tag)
            }
            _ => return Err(EINVAL),
        };
        if self.qp.in_flight() == 1 {
            self.last_progress = Instant::now();
        }
        match res {
            Ok(_) => {
                self.unrung = true;
                Ok(Queued::Yes)
            }
            Err(nvme::Error::QueueFull { .. }) => Ok(Queued::Busy),
            Err(e) => {
                self.report(format!("submission failed: {e}"));
                Err(EIO)
            }
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        if self.unrung {
            self.unrung = false;
            self.qp.ring_doorbell();
        }
        Ok(())
    }

    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, c_uint)) -> Result<usize, String> {
        self.commit()?;
        let mut first_bad = None;
        let n = self.qp.poll(max, |c| {
            let errno = if c.is_ok() { 0 } else { EIO };
            if errno != 0 && first_bad.is_none() {
                first_bad = Some(c.status);
            }
            done(c.tag, errno);
        });
        if let Some(st) = first_bad {
            self.report(format!("a command failed: {st:?}"));
        }
        if n > 0 {
            self.last_progress = Instant::now();
        } else if self.qp.in_flight() > 0 && self.last_progress.elapsed() > STALL {
            return Err(format!(
                "no completion for {}s with {} commands outstanding: the controller stopped answering",
                STALL.as_secs(),
                self.qp.in_flight()
            ));
        }
        Ok(n)
    }
}
