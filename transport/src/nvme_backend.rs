//! A namespace of an NVMe controller driven by the `nvme` crate (the `vfio:BDF[:nsid]`
//! backend of `serve`; the simulator in tests).
//!
//! Two paths:
//! - **asynchronous, zero-copy** — each poll group opens an [`IoChannel`] (its own I/O
//!   queue pair, used by the group's thread only: no lock) and gets its buffer pool from
//!   [`Backend::alloc_dma`], so the request buffers the NIC reads and writes are the
//!   buffers the controller DMAs: no copy, as many commands in flight as the queue holds;
//! - **synchronous** ([`Backend`]'s `read`/`write`/…) — one queue pair behind a mutex and
//!   a bounce buffer, one command at a time: for what the asynchronous path does not
//!   cover (Dataset Management, a flush of every namespace, a poll group whose pool is
//!   another device's memory, shutdown).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvme::spec::{Sqe, Status};
use nvme::{Controller, DmaBuffer, IoQueuePair, QueueOptions};

use crate::backend::{check_range, AsyncOp, Backend, DeviceRef, Fault, IoChannel, SubmitError};
use crate::error::{Error, Result};

/// Timeout of one synchronous command (or the asynchronous one, when shorter: see
/// [`NvmeBackend::with_command_timeout`]).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Default timeout of a poll group's asynchronous commands (Linux nvme's io_timeout);
/// a command older than that makes the group ask for a device reset.
pub const ASYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Entries of a poll group's queue pair (capped by the controller's CAP.MQES). Read and
/// Write each hold a pool buffer, so a group rarely has more in flight than its pool has
/// buffers.
const CHANNEL_DEPTH: u16 = 512;

/// Something that owns a brought-up controller (a VFIO device, or a bare controller
/// over the simulator) and keeps it alive.
pub trait NvmeController: Send + Sync + 'static {
    /// The controller.
    fn controller(&self) -> &Controller;
}

impl NvmeController for Controller {
    fn controller(&self) -> &Controller {
        self
    }
}

impl NvmeController for nvme::vfio::NvmeDevice {
    fn controller(&self) -> &Controller {
        nvme::vfio::NvmeDevice::controller(self)
    }
}

/// `op` of backend `backend` failed in the driver.
fn nvme_err(backend: &str, op: &'static str, source: nvme::Error) -> Error {
    Error::Nvme {
        backend: backend.to_string(),
        op,
        source: Box::new(source),
    }
}

struct SyncIo {
    qp: IoQueuePair,
    bounce: DmaBuffer,
}

/// Namespace `nsid` of an NVMe controller as a target backend.
pub struct NvmeBackend {
    name: String,
    nsid: u32,
    block_size: u32,
    blocks: u64,
    io: Mutex<SyncIo>,
    /// Poll groups' queue pairs raise interrupts (when the controller has vectors).
    interrupts: bool,
    /// Timeout of the poll groups' asynchronous commands.
    timeout: Duration,
    // The controller outlives its queue pairs (field order: `io` drops first).
    dev: Arc<dyn NvmeController>,
}

impl NvmeBackend {
    /// A backend for namespace `nsid` of `dev`, named `name` (e.g. `vfio:BDF:nsid`);
    /// `max_io` is the target's largest transfer (the synchronous bounce buffer's size).
    pub fn open(
        dev: Arc<dyn NvmeController>,
        name: String,
        nsid: u32,
        max_io: usize,
    ) -> Result<Self> {
        let ctrl = dev.controller();
        let ns = ctrl
            .info()
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
            .ok_or_else(|| Error::NoSuchNamespace {
                backend: name.clone(),
                nsid,
                active: ctrl.info().namespaces.iter().map(|n| n.nsid).collect(),
            })?;
        let qp = ctrl
            .create_io_queue_pair(QueueOptions::default())
            .map_err(|e| nvme_err(&name, "create I/O queue", e))?;
        let chunk = max_io.min(qp.max_transfer()).max(ns.block_size as usize);
        let bounce = ctrl
            .alloc_dma(chunk)
            .map_err(|e| nvme_err(&name, "allocate DMA buffer", e))?;
        Ok(NvmeBackend {
            name,
            nsid,
            block_size: ns.block_size,
            blocks: ns.blocks,
            io: Mutex::new(SyncIo { qp, bounce }),
            interrupts: true,
            timeout: ASYNC_TIMEOUT,
            dev,
        })
    }

    /// Whether the poll groups' queue pairs are created with interrupts (default: yes,
    /// when the controller has MSI-X vectors), so a group with commands in the device
    /// sleeps on their eventfds instead of napping. Off: polled queues.
    pub fn with_interrupts(mut self, on: bool) -> Self {
        self.interrupts = on;
        self
    }

    /// How long a poll group's asynchronous command may stay in the device before the
    /// group reports [`Fault::Timeout`] (default [`ASYNC_TIMEOUT`]); a synchronous
    /// command waits at most that long too (and at most 10 s), and its timeout is reported the same way.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn sync_timeout(&self) -> Duration {
        self.timeout.min(IO_TIMEOUT)
    }

    fn with_io<T>(
        &self,
        f: impl FnOnce(&mut SyncIo) -> nvme::Result<T>,
        op: &'static str,
    ) -> Result<T> {
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        if io.qp.in_flight() > 0 {
            // A command that timed out before: reap its late completion, or its abort by
            // the controller reset since, so the queue pair takes commands again (while
            // it is still in the device, `execute` refuses and the command fails).
            let name = &self.name;
            io.qp.poll(usize::MAX, |c| {
                tracing::debug!(backend = %name, status = %c.status, "late synchronous completion");
            });
        }
        f(&mut io).map_err(|e| nvme_err(&self.name, op, e))
    }

    /// Runs `len`-byte pieces of a transfer through the bounce buffer.
    fn chunked(
        &self,
        slba: u64,
        len: usize,
        op: &'static str,
        mut each: impl FnMut(&mut SyncIo, u64, usize, usize) -> nvme::Result<()>,
    ) -> Result<()> {
        let bs = self.block_size as usize;
        check_range(self, slba, (len / bs) as u64)?;
        self.with_io(
            |io| {
                let chunk = io.bounce.len() / bs * bs;
                let mut off = 0;
                while off < len {
                    let n = chunk.min(len - off);
                    let lba = slba + (off / bs) as u64;
                    each(io, lba, off, n)?;
                    off += n;
                }
                Ok(())
            },
            op,
        )
    }
}

impl Backend for NvmeBackend {
    fn describe(&self) -> String {
        self.name.clone()
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn block_count(&self) -> u64 {
        self.blocks
    }
    fn read(&self, slba: u64, buf: &mut [u8]) -> Result<()> {
        let nsid = self.nsid;
        self.chunked(slba, buf.len(), "read", |io, lba, off, n| {
            let b = io.bounce.slice(0, n)?;
            let nlb0 = (n / self.block_size as usize - 1) as u16;
            io.qp.execute(
                Sqe::read(nsid, lba, nlb0, 0, 0),
                Some(&b),
                self.sync_timeout(),
            )?;
            b.read(0, &mut buf[off..off + n])
        })
    }
    fn write(&self, slba: u64, buf: &[u8]) -> Result<()> {
        let nsid = self.nsid;
        self.chunked(slba, buf.len(), "write", |io, lba, off, n| {
            let b = io.bounce.slice(0, n)?;
            b.write(0, &buf[off..off + n])?;
            let nlb0 = (n / self.block_size as usize - 1) as u16;
            io.qp.execute(
                Sqe::write(nsid, lba, nlb0, 0, 0),
                Some(&b),
                self.sync_timeout(),
            )?;
            Ok(())
        })
    }
    fn flush(&self) -> Result<()> {
        let nsid = self.nsid;
        self.with_io(
            |io| {
                io.qp
                    .execute(Sqe::flush(nsid), None, self.sync_timeout())
                    .map(|_| ())
            },
            "flush",
        )
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()> {
        check_range(self, slba, nlb)?;
        let nsid = self.nsid;
        self.with_io(
            |io| {
                let mut done = 0u64;
                while done < nlb {
                    let n = (nlb - done).min(65536);
                    let sqe = Sqe::write_zeroes(nsid, slba + done, (n - 1) as u16);
                    io.qp.execute(sqe, None, self.sync_timeout())?;
                    done += n;
                }
                Ok(())
            },
            "write zeroes",
        )
    }
    fn dma_domain(&self) -> Option<usize> {
        // Every queue pair and DMA buffer of one controller lives in its platform's
        // address space (one VFIO container).
        Some(Arc::as_ptr(self.dev.controller().platform()) as *const () as usize)
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer> {
        self.dev
            .controller()
            .alloc_dma(len)
            .map_err(|e| nvme_err(&self.name, "allocate DMA buffer pool", e))
    }
    fn open_channel(&self) -> Result<Option<Box<dyn IoChannel>>> {
        let ctrl = self.dev.controller();
        let qopts = QueueOptions {
            depth: CHANNEL_DEPTH,
            sq_in_cmb: false,
        };
        let with_irq = if self.interrupts && ctrl.interrupt_vectors() > 0 {
            match ctrl.create_io_queue_pair_with_interrupts(qopts) {
                Ok(qp) => Some(qp),
                Err(e) => {
                    tracing::warn!(backend = %self.name, error = %e, "no interrupts: the poll group's NVMe queue is polled");
                    None
                }
            }
        } else {
            None
        };
        let qp = match with_irq {
            Some(qp) => qp,
            None => ctrl
                .create_io_queue_pair(qopts)
                .map_err(|e| nvme_err(&self.name, "create a poll group's I/O queue", e))?,
        };
        tracing::debug!(backend = %self.name, qid = qp.qid(), vector = ?qp.interrupt_vector(), "poll group NVMe queue");
        let depth = usize::from(qp.depth());
        Ok(Some(Box::new(NvmeChannel {
            nsid: self.nsid,
            pending: Vec::with_capacity(depth),
            failed: Vec::with_capacity(depth),
            timeout: self.timeout,
            fault_generation: None,
            qp,
            dev: self.dev.clone(),
        })))
    }
    fn device(&self) -> Option<DeviceRef> {
        // `vfio:BDF:nsid` names namespace `nsid` of controller `vfio:BDF`.
        let name = match self.name.rsplit_once(':') {
            Some((ctrl, ns)) if ns == self.nsid.to_string() => ctrl.to_string(),
            _ => self.name.clone(),
        };
        Some(DeviceRef {
            key: Arc::as_ptr(&self.dev) as *const () as usize,
            name,
            nsid: self.nsid,
        })
    }
    fn device_log_page(&self, lid: u8, len: usize) -> Result<Vec<u8>> {
        self.dev
            .controller()
            .get_log_page(lid, u32::MAX, len)
            .map_err(|e| nvme_err(&self.name, "get log page", e))
    }
}

/// A command started but not yet handed to the controller (see [`IoChannel::flush`]).
struct Pending {
    tag: u64,
    sqe: Sqe,
    data: Option<DmaBuffer>,
}

/// One poll group's queue pair on the controller.
struct NvmeChannel {
    nsid: u32,
    /// Started since the last flush; capacity = queue depth (never grows).
    pending: Vec<Pending>,
    /// Refused by the driver at flush; reported by the next poll.
    failed: Vec<(u64, Status)>,
    timeout: Duration,
    /// Controller generation in which a dead controller was last reported (once per
    /// generation: a reset makes a new one).
    fault_generation: Option<u64>,
    qp: IoQueuePair,
    // The controller outlives the queue pair (field order).
    dev: Arc<dyn NvmeController>,
}

fn nlb0(nlb: u32) -> std::result::Result<u16, SubmitError> {
    match nlb {
        1..=65536 => Ok((nlb - 1) as u16),
        _ => Err(SubmitError::Failed(Status::INVALID_FIELD.with_dnr())),
    }
}

impl IoChannel for NvmeChannel {
    fn submit(&mut self, tag: u64, op: AsyncOp<'_>) -> std::result::Result<(), SubmitError> {
        // One SQ entry stays empty; `failed` entries still count until reported.
        let used = usize::from(self.qp.in_flight()) + self.pending.len() + self.failed.len();
        if used + 1 >= usize::from(self.qp.depth()) {
            return Err(SubmitError::Busy);
        }
        let nsid = self.nsid;
        let (sqe, data) = match op {
            AsyncOp::Read { slba, nlb, buf } => {
                (Sqe::read(nsid, slba, nlb0(nlb)?, 0, 0), Some(buf.clone()))
            }
            AsyncOp::Write { slba, nlb, buf } => {
                (Sqe::write(nsid, slba, nlb0(nlb)?, 0, 0), Some(buf.clone()))
            }
            AsyncOp::Flush => (Sqe::flush(nsid), None),
            AsyncOp::WriteZeroes { slba, nlb } => (Sqe::write_zeroes(nsid, slba, nlb0(nlb)?), None),
        };
        if data
            .as_ref()
            .is_some_and(|d| d.len() > self.qp.max_transfer())
        {
            return Err(SubmitError::Failed(Status::INVALID_FIELD.with_dnr()));
        }
        self.pending.push(Pending { tag, sqe, data });
        Ok(())
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut batch = self.qp.batch();
        for p in self.pending.drain(..) {
            if let Err(e) = batch.submit(p.sqe, p.data.as_ref(), p.tag) {
                tracing::warn!(error = %e, "NVMe submission refused");
                let status = match e {
                    nvme::Error::QueueFull { .. } => Status::INTERNAL_ERROR,
                    _ => Status::INVALID_FIELD.with_dnr(),
                };
                self.failed.push((p.tag, status));
            }
        }
        // Dropping the batch rings the SQ doorbell once for all of them.
    }

    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut n = 0;
        while n < max {
            let Some((tag, status)) = self.failed.pop() else {
                break;
            };
            done(tag, status);
            n += 1;
        }
        if n < max && self.qp.in_flight() > 0 {
            n += self.qp.poll(max - n, |c| done(c.tag, c.status));
        }
        n
    }

    fn in_flight(&self) -> usize {
        usize::from(self.qp.in_flight()) + self.pending.len() + self.failed.len()
    }

    fn max_transfer(&self) -> usize {
        self.qp.max_transfer()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.qp.interrupt_fd().map(|fd| fd.as_raw_fd())
    }

    fn clear_wake(&mut self) {
        if let Some(e) = self.qp.interrupt_eventfd() {
            e.clear();
        }
    }

    fn ready(&mut self) -> bool {
        // Refused submissions are reported by the next poll.
        !self.failed.is_empty() || !self.pending.is_empty() || self.qp.completion_ready()
    }

    fn check_health(&mut self) -> Option<Fault> {
        let ctrl = self.dev.controller();
        let generation = ctrl.generation();
        if self.fault_generation != Some(generation) {
            let fault = match ctrl.check_health() {
                Err(nvme::Error::ControllerFatal { .. }) => Some(Fault::ControllerFatal),
                Err(nvme::Error::DeviceGone { .. }) => Some(Fault::DeviceGone),
                _ => None,
            };
            if fault.is_some() {
                self.fault_generation = Some(generation);
                return fault;
            }
        }
        // Each command is reported once.
        self.qp
            .check_timeouts(self.timeout)
            .map(|_| Fault::Timeout {
                after: self.timeout,
            })
    }
}
