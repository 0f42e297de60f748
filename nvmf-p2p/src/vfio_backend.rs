//! The `vfio:BDF[:nsid]` namespace backend of `serve`: our polled NVMe driver behind the
//! target's `Backend` trait.
//!
//! Every command runs on one I/O queue pair guarded by a mutex and goes through a DMA
//! bounce buffer the size of the target's largest transfer, so the call is synchronous
//! and copies once each way. This is the functional path; the zero-copy one (request
//! buffers that are both VFIO-mapped and RDMA-registered, commands submitted and reaped
//! asynchronously by the poll group) replaces it when the target core grows an
//! asynchronous backend interface.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvme::vfio::NvmeDevice;
use nvme::{ControllerOptions, DmaBuffer, IoQueuePair, QueueOptions};
use transport::backend::Backend;
use transport::{Error, Result};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens NVMe controllers through VFIO, one per BDF, and hands out namespace backends.
#[derive(Default)]
pub struct VfioOpener {
    devices: Mutex<HashMap<String, Arc<NvmeDevice>>>,
}

impl VfioOpener {
    /// The controllers opened so far (for `ctl reset-device` and stats).
    pub fn devices(&self) -> Vec<(String, Arc<NvmeDevice>)> {
        let map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// A backend for namespace `nsid` of the controller at `bdf`.
    pub fn open(&self, bdf: &str, nsid: u32, max_io: usize) -> Result<Arc<dyn Backend>> {
        let dev = {
            let mut map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(bdf) {
                Some(d) => d.clone(),
                None => {
                    let d = Arc::new(
                        NvmeDevice::open(bdf, ControllerOptions::default())
                            .map_err(|e| io_err(bdf, "open", e))?,
                    );
                    map.insert(bdf.to_string(), d.clone());
                    d
                }
            }
        };
        let ctrl = dev.controller();
        let ns = ctrl
            .info()
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
            .ok_or_else(|| Error::BackendIo {
                backend: format!("vfio:{bdf}:{nsid}"),
                op: "open namespace",
                source: std::io::Error::other(format!(
                    "the controller has no active namespace {nsid} (active: {:?})",
                    ctrl.info()
                        .namespaces
                        .iter()
                        .map(|n| n.nsid)
                        .collect::<Vec<_>>()
                )),
            })?;
        let qp = ctrl
            .create_io_queue_pair(QueueOptions::default())
            .map_err(|e| io_err(bdf, "create I/O queue", e))?;
        let chunk = max_io.min(qp.max_transfer()).max(ns.block_size as usize);
        let bounce = ctrl
            .alloc_dma(chunk)
            .map_err(|e| io_err(bdf, "allocate DMA buffer", e))?;
        Ok(Arc::new(VfioBackend {
            name: format!("vfio:{bdf}:{nsid}"),
            nsid,
            block_size: ns.block_size,
            blocks: ns.blocks,
            io: Mutex::new(Io { qp, bounce }),
            _dev: dev,
        }))
    }
}

fn io_err(what: &str, op: &'static str, e: nvme::Error) -> Error {
    Error::BackendIo {
        backend: what.to_string(),
        op,
        source: std::io::Error::other(e.to_string()),
    }
}

struct Io {
    qp: IoQueuePair,
    bounce: DmaBuffer,
}

struct VfioBackend {
    name: String,
    nsid: u32,
    block_size: u32,
    blocks: u64,
    io: Mutex<Io>,
    // the controller outlives its queue pair (field order: `io` drops first)
    _dev: Arc<NvmeDevice>,
}

impl VfioBackend {
    fn with_io<T>(
        &self,
        f: impl FnOnce(&mut Io) -> nvme::Result<T>,
        op: &'static str,
    ) -> Result<T> {
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut io).map_err(|e| io_err(&self.name, op, e))
    }

    /// Runs `len`-byte pieces of a transfer through the bounce buffer.
    fn chunked(
        &self,
        slba: u64,
        len: usize,
        op: &'static str,
        mut each: impl FnMut(&mut Io, u64, usize, usize) -> nvme::Result<()>,
    ) -> Result<()> {
        transport::backend::check_range(self, slba, (len / self.block_size as usize) as u64)?;
        self.with_io(
            |io| {
                let chunk = io.bounce.len() / self.block_size as usize * self.block_size as usize;
                let mut off = 0;
                while off < len {
                    let n = chunk.min(len - off);
                    let lba = slba + (off / self.block_size as usize) as u64;
                    each(io, lba, off, n)?;
                    off += n;
                }
                Ok(())
            },
            op,
        )
    }
}

impl Backend for VfioBackend {
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
                nvme::spec::Sqe::read(nsid, lba, nlb0, 0, 0),
                Some(&b),
                IO_TIMEOUT,
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
                nvme::spec::Sqe::write(nsid, lba, nlb0, 0, 0),
                Some(&b),
                IO_TIMEOUT,
            )?;
            Ok(())
        })
    }
    fn flush(&self) -> Result<()> {
        let nsid = self.nsid;
        self.with_io(
            |io| {
                io.qp
                    .execute(nvme::spec::Sqe::flush(nsid), None, IO_TIMEOUT)
                    .map(|_| ())
            },
            "flush",
        )
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()> {
        transport::backend::check_range(self, slba, nlb)?;
        let nsid = self.nsid;
        self.with_io(
            |io| {
                let mut done = 0u64;
                while done < nlb {
                    let n = (nlb - done).min(65536);
                    let sqe = nvme::spec::Sqe::write_zeroes(nsid, slba + done, (n - 1) as u16);
                    io.qp.execute(sqe, None, IO_TIMEOUT)?;
                    done += n;
                }
                Ok(())
            },
            "write zeroes",
        )
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
}
