//! Namespace backends: where a namespace's blocks live.
//!
//! The target core calls a [`Backend`] with caller-owned buffers (the request's data
//! buffer), so a backend never allocates per I/O. `ram` and `file` live here; the device
//! backends — `vfio` (a namespace of a PCIe controller driven by the `nvme` crate) and
//! `spdk` (the same through SPDK's NVMe driver) — plug in through [`BackendOpener`]
//! without this module depending on either driver.

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use nvme::spec::Status;
use nvme::DmaBuffer;

use crate::config::BackendSpec;
use crate::error::{Error, Result};

/// Default logical block size of `ram` and `file` backends.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;

/// Block storage behind one namespace. Methods take `&self`: a backend is shared by every
/// poll group and must do its own synchronisation.
///
/// Every backend has the synchronous methods. One that drives a DMA-capable device can
/// also offer an asynchronous, zero-copy path: [`Backend::dma_domain`] names its address
/// space, [`Backend::alloc_dma`] gives a poll group its buffer pool memory in that space
/// (the same buffer is then the RDMA target and the device's DMA source/destination), and
/// [`Backend::open_channel`] gives each poll group its own [`IoChannel`].
pub trait Backend: Send + Sync {
    /// Human-readable description (`ram:64MiB`, `file:/x`).
    fn describe(&self) -> String;
    /// Logical block size in bytes (a power of two ≥ 512).
    fn block_size(&self) -> u32;
    /// Number of logical blocks.
    fn block_count(&self) -> u64;
    /// Reads `buf.len() / block_size` blocks starting at `slba` into `buf`.
    fn read(&self, slba: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` starting at block `slba`.
    fn write(&self, slba: u64, buf: &[u8]) -> Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
    /// Sets `nlb` blocks at `slba` to zero.
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()>;
    /// Deallocates (trims) `nlb` blocks at `slba`; afterwards they read as zeroes.
    fn deallocate(&self, slba: u64, nlb: u64) -> Result<()> {
        self.write_zeroes(slba, nlb)
    }
    /// Whether the backend has a volatile write cache that [`Backend::flush`] empties.
    fn volatile_write_cache(&self) -> bool {
        false
    }
    /// The DMA address space of an asynchronous backend (e.g. its device's IOMMU
    /// container): memory from [`Backend::alloc_dma`] of any backend with the same domain
    /// can be given to this backend's channels. `None`: synchronous only.
    fn dma_domain(&self) -> Option<usize> {
        None
    }
    /// Allocates `len` bytes (page aligned) that the backend's device can DMA to and
    /// from: a poll group's buffer pool.
    fn alloc_dma(&self, _len: usize) -> Result<DmaBuffer> {
        Err(Error::BackendUnavailable {
            kind: "dma",
            reason: "this backend has no DMA memory",
        })
    }
    /// Opens an asynchronous channel owned by one poll group (its thread), or `None` when
    /// this backend only has the synchronous path.
    fn open_channel(&self) -> Result<Option<Box<dyn IoChannel>>> {
        Ok(None)
    }
    /// The NVMe controller this backend's blocks live on, whose health and error logs
    /// the target passes through (Get Log Page 02h and 01h, see
    /// `transport/src/nvmf_target/device_logs.rs`). `None`: no device (ram, file).
    fn device(&self) -> Option<DeviceRef> {
        None
    }
    /// Reads `len` bytes of log page `lid` with controller scope (NSID FFFFFFFFh) from the
    /// controller of [`Backend::device`]. An admin command to the device, synchronous:
    /// for log pages hosts read rarely, never for I/O.
    fn device_log_page(&self, _lid: u8, _len: usize) -> Result<Vec<u8>> {
        Err(Error::BackendUnavailable {
            kind: "device log",
            reason: "this backend has no device",
        })
    }
}

/// Which controller (and which of its namespaces) a backend is ([`Backend::device`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRef {
    /// The same for every namespace of one controller (the target reads each
    /// controller's logs once, however many of its namespaces a subsystem has).
    pub key: usize,
    /// The controller for messages (`vfio:0000:01:00.0`).
    pub name: String,
    /// The namespace id on the device.
    pub nsid: u32,
}

/// A command for [`IoChannel::submit`]. Data buffers lie in memory of the channel's DMA
/// domain and are exactly `nlb` blocks long; the caller leaves them alone until the
/// command's completion comes back from [`IoChannel::poll`].
#[derive(Clone, Copy, Debug)]
pub enum AsyncOp<'a> {
    /// Read `nlb` blocks at `slba` into `buf`.
    Read {
        /// Starting block.
        slba: u64,
        /// Blocks (1-based).
        nlb: u32,
        /// Destination.
        buf: &'a DmaBuffer,
    },
    /// Write `buf` (`nlb` blocks) at `slba`.
    Write {
        /// Starting block.
        slba: u64,
        /// Blocks (1-based).
        nlb: u32,
        /// Source.
        buf: &'a DmaBuffer,
    },
    /// Make completed writes durable.
    Flush,
    /// Zero `nlb` blocks at `slba`.
    WriteZeroes {
        /// Starting block.
        slba: u64,
        /// Blocks (1-based, ≤ 65536).
        nlb: u32,
    },
}

/// Why [`IoChannel::submit`] did not start a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// No room right now (queue full): nothing was started; retry after completions.
    Busy,
    /// The command cannot be started; complete it with this status.
    Failed(Status),
}

/// One poll group's asynchronous path to a backend — for an NVMe controller, an I/O queue
/// pair owned by the group's thread. No locks and no heap allocation per command.
pub trait IoChannel: Send {
    /// Starts `op`; its completion comes back from [`IoChannel::poll`] with `tag`.
    fn submit(&mut self, tag: u64, op: AsyncOp<'_>) -> std::result::Result<(), SubmitError>;
    /// Hands commands started since the last call to the device (one doorbell for a
    /// batch). The poll group calls it after every pass over its queues.
    fn flush(&mut self) {}
    /// Reaps up to `max` completions, calling `done(tag, status)` for each; returns how
    /// many.
    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, Status)) -> usize;
    /// Commands started and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Largest Read/Write one command may carry, in bytes.
    fn max_transfer(&self) -> usize;
    /// An fd that becomes readable when a completion may be ready (an NVMe queue's
    /// interrupt eventfd), so a poll group with commands in the device can sleep in
    /// poll(2) instead of napping. None: completions must be polled for.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Clears the event of [`IoChannel::wake_fd`] before a sleep. The caller then asks
    /// [`IoChannel::ready`] of every channel (clear all first, check all after: channels
    /// may share an fd) and sleeps only if none is ready.
    fn clear_wake(&mut self) {}
    /// Whether [`IoChannel::poll`] would report something now. True when unsure.
    fn ready(&mut self) -> bool {
        true
    }
    /// Looks for a command outstanding longer than the channel's timeout and for a dead
    /// device (NVMe: CSTS.CFS, or registers reading all ones). The poll group calls it
    /// every [`HEALTH_CHECK_PERIOD`] while commands are in flight and hands a fault to
    /// the target's recovery ([`Target::set_recovery`](crate::nvmf_target::Target::set_recovery)),
    /// which resets the device with every poll group's I/O held.
    fn check_health(&mut self) -> Option<Fault> {
        None
    }
}

/// How often a poll group asks its busy channels [`IoChannel::check_health`].
pub const HEALTH_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// What [`IoChannel::check_health`] found: the device needs a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A command has been outstanding longer than the channel's timeout.
    Timeout {
        /// The timeout.
        after: std::time::Duration,
    },
    /// The controller reports a fatal status (NVMe CSTS.CFS).
    ControllerFatal,
    /// The device is gone (its registers read all ones).
    DeviceGone,
}

impl Fault {
    /// The fault behind a failed synchronous command of a device backend (the same the
    /// channel's [`IoChannel::check_health`] reports), if the error is one.
    pub fn of(e: &Error) -> Option<Fault> {
        let Error::Nvme { source, .. } = e else {
            return None;
        };
        match **source {
            nvme::Error::Timeout { after, .. } => Some(Fault::Timeout { after }),
            nvme::Error::ControllerFatal { .. } => Some(Fault::ControllerFatal),
            nvme::Error::DeviceGone { .. } => Some(Fault::DeviceGone),
            _ => None,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Timeout { after } => write!(f, "a command took longer than {after:?}"),
            Fault::ControllerFatal => f.write_str("controller fatal status (CSTS.CFS)"),
            Fault::DeviceGone => f.write_str("device gone (registers read all ones)"),
        }
    }
}

/// Checks that `nlb` blocks at `slba` fit in `backend` and that a buffer has the right size.
pub fn check_range(backend: &dyn Backend, slba: u64, nlb: u64) -> Result<()> {
    let blocks = backend.block_count();
    match slba.checked_add(nlb) {
        Some(end) if end <= blocks => Ok(()),
        _ => Err(Error::LbaOutOfRange { slba, nlb, blocks }),
    }
}

fn check_buf(backend: &dyn Backend, slba: u64, len: usize) -> Result<(u64, u64)> {
    let bs = u64::from(backend.block_size());
    if !(len as u64).is_multiple_of(bs) {
        return Err(Error::BufferSize {
            expected: (len as u64).div_ceil(bs) as usize * bs as usize,
            got: len,
        });
    }
    let nlb = len as u64 / bs;
    check_range(backend, slba, nlb)?;
    Ok((slba * bs, len as u64))
}

/// A memory-backed namespace (zero-filled at start).
pub struct RamBackend {
    block_size: u32,
    data: RwLock<Box<[u8]>>,
}

impl RamBackend {
    /// A RAM namespace of `size` bytes (a multiple of `block_size`).
    pub fn new(size: u64, block_size: u32) -> Result<Self> {
        if !block_size.is_power_of_two()
            || block_size < 512
            || !size.is_multiple_of(u64::from(block_size))
        {
            return Err(Error::BackendSpec {
                spec: format!("ram:{size}"),
                reason: "size must be a multiple of a power-of-two block size ≥ 512",
            });
        }
        let len = usize::try_from(size).map_err(|_| Error::BackendSpec {
            spec: format!("ram:{size}"),
            reason: "size does not fit in memory",
        })?;
        Ok(RamBackend {
            block_size,
            data: RwLock::new(vec![0u8; len].into_boxed_slice()),
        })
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Box<[u8]>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Box<[u8]>> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for RamBackend {
    fn describe(&self) -> String {
        format!("ram:{}", self.read_lock().len())
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn block_count(&self) -> u64 {
        self.read_lock().len() as u64 / u64::from(self.block_size)
    }
    fn read(&self, slba: u64, buf: &mut [u8]) -> Result<()> {
        let (off, len) = check_buf(self, slba, buf.len())?;
        buf.copy_from_slice(&self.read_lock()[off as usize..(off + len) as usize]);
        Ok(())
    }
    fn write(&self, slba: u64, buf: &[u8]) -> Result<()> {
        let (off, len) = check_buf(self, slba, buf.len())?;
        self.write_lock()[off as usize..(off + len) as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()> {
        check_range(self, slba, nlb)?;
        let bs = u64::from(self.block_size);
        self.write_lock()[(slba * bs) as usize..((slba + nlb) * bs) as usize].fill(0);
        Ok(())
    }
}

/// A namespace stored in a regular file or block device (pread/pwrite, fdatasync).
pub struct FileBackend {
    path: PathBuf,
    file: File,
    block_size: u32,
    blocks: u64,
}

impl FileBackend {
    /// Opens `path` read-write; its size (rounded down to whole blocks) is the namespace size.
    pub fn open(path: &Path, block_size: u32) -> Result<Self> {
        let io = |op, source| Error::BackendIo {
            backend: format!("file:{}", path.display()),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io("open", e))?;
        // Block devices report length 0 in metadata: seek to the end instead.
        let len = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))
                .map_err(|e| io("size", e))?
        };
        let blocks = len / u64::from(block_size);
        if blocks == 0 {
            return Err(Error::BackendSpec {
                spec: format!("file:{}", path.display()),
                reason: "file is smaller than one block",
            });
        }
        Ok(FileBackend {
            path: path.to_owned(),
            file,
            block_size,
            blocks,
        })
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> Error {
        Error::BackendIo {
            backend: self.describe(),
            op,
            source,
        }
    }
}

impl Backend for FileBackend {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn block_count(&self) -> u64 {
        self.blocks
    }
    fn read(&self, slba: u64, buf: &mut [u8]) -> Result<()> {
        let (off, _) = check_buf(self, slba, buf.len())?;
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| self.io_err("read", e))
    }
    fn write(&self, slba: u64, buf: &[u8]) -> Result<()> {
        let (off, _) = check_buf(self, slba, buf.len())?;
        self.file
            .write_all_at(buf, off)
            .map_err(|e| self.io_err("write", e))
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err("flush", e))
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()> {
        check_range(self, slba, nlb)?;
        const CHUNK: usize = 64 * 1024;
        static ZEROES: [u8; CHUNK] = [0; CHUNK];
        let bs = u64::from(self.block_size);
        let (mut off, end) = (slba * bs, (slba + nlb) * bs);
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            self.file
                .write_all_at(&ZEROES[..n], off)
                .map_err(|e| self.io_err("write zeroes", e))?;
            off += n as u64;
        }
        Ok(())
    }
    fn volatile_write_cache(&self) -> bool {
        true
    }
}

/// Opens the device kinds of backend (`vfio:BDF:nsid`, `spdk:BDF:nsid`); supplied by the
/// binary that links the drivers. It is only called with those two kinds.
pub type BackendOpener = dyn Fn(&BackendSpec) -> Result<Arc<dyn Backend>>;

/// What a build without SPDK says about an `spdk:` namespace.
pub const NO_SPDK_SUPPORT: &str = "this build has no SPDK support: run scripts/setup and rebuild";

/// Opens a backend from its specification. `vfio` and `spdk` need an opener (the drivers'
/// glue); without one they fail with [`Error::BackendUnavailable`].
pub fn open_backend(
    spec: &BackendSpec,
    devices: Option<&BackendOpener>,
) -> Result<Arc<dyn Backend>> {
    match spec {
        BackendSpec::Ram { size } => Ok(Arc::new(RamBackend::new(*size, DEFAULT_BLOCK_SIZE)?)),
        BackendSpec::File { path } => Ok(Arc::new(FileBackend::open(path, DEFAULT_BLOCK_SIZE)?)),
        BackendSpec::Vfio { .. } | BackendSpec::Spdk { .. } => match devices {
            Some(open) => open(spec),
            None if matches!(spec, BackendSpec::Spdk { .. }) => Err(Error::BackendUnavailable {
                kind: "spdk",
                reason: NO_SPDK_SUPPORT,
            }),
            None => Err(Error::BackendUnavailable {
                kind: "vfio",
                reason: "no VFIO NVMe driver opener was registered",
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(b: &dyn Backend) {
        let bs = b.block_size() as usize;
        let data: Vec<u8> = (0..2 * bs).map(|i| (i % 251) as u8).collect();
        b.write(3, &data).unwrap();
        let mut back = vec![0u8; 2 * bs];
        b.read(3, &mut back).unwrap();
        assert_eq!(back, data);
        b.write_zeroes(4, 1).unwrap();
        b.read(3, &mut back).unwrap();
        assert_eq!(&back[..bs], &data[..bs]);
        assert!(back[bs..].iter().all(|&x| x == 0));
        let last = b.block_count() - 1;
        assert!(
            b.read(last, &mut back).is_err(),
            "read past the end must fail"
        );
        assert!(matches!(
            b.write_zeroes(last, 2),
            Err(Error::LbaOutOfRange { .. })
        ));
        assert!(matches!(
            b.read(0, &mut back[..bs - 1]),
            Err(Error::BufferSize { .. })
        ));
        b.flush().unwrap();
    }

    #[test]
    fn ram_backend() {
        let b = RamBackend::new(1 << 20, 512).unwrap();
        assert_eq!(b.block_count(), 2048);
        exercise(&b);
    }

    #[test]
    fn file_backend() {
        let path =
            std::env::temp_dir().join(format!("transport-file-backend-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let b = FileBackend::open(&path, 4096).unwrap();
        assert_eq!(b.block_count(), 256);
        exercise(&b);
        drop(b);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_specs() {
        let b = open_backend(&BackendSpec::Ram { size: 1 << 20 }, None).unwrap();
        assert_eq!(b.block_count() * u64::from(b.block_size()), 1 << 20);
        let v = BackendSpec::Vfio {
            bdf: "0000:01:00.0".into(),
            nsid: 1,
        };
        assert!(matches!(
            open_backend(&v, None),
            Err(Error::BackendUnavailable { .. })
        ));
        let opener = |s: &BackendSpec| -> Result<Arc<dyn Backend>> {
            assert!(matches!(s, BackendSpec::Vfio { nsid: 1, .. }));
            Ok(Arc::new(RamBackend::new(4096, 512)?))
        };
        assert_eq!(open_backend(&v, Some(&opener)).unwrap().block_count(), 8);
        let s = BackendSpec::Spdk {
            bdf: "0000:01:00.0".into(),
            nsid: 1,
        };
        match open_backend(&s, None) {
            Err(e @ Error::BackendUnavailable { kind: "spdk", .. }) => {
                assert!(
                    e.to_string().contains("run scripts/setup and rebuild"),
                    "{e}"
                )
            }
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("spdk: opened without an opener"),
        }
    }
}
