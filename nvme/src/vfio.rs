//! VFIO (type1 IOMMU) access to a PCI NVMe controller: container and group, device fd,
//! regions, BAR mmap, config space, DMA mapping with IOVA allocation inside the ranges the
//! IOMMU reports (and outside the device's own BAR windows), device reset, and dma-buf
//! export of BAR ranges (`VFIO_DEVICE_FEATURE_DMA_BUF`).
//!
//! All ioctls are in the private `sys` module; everything else is safe code.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio as vb;

use crate::ctrl::{Controller, ControllerOptions};
use crate::dma::{BarMapping, DmaAllocator, DmaBuffer, DmaRegion, Mmio, Platform};
use crate::error::{Error, Result};
use crate::irq::EventFd;
use crate::pci;
use crate::spec::{self, PAGE_SIZE};

/// The lowest IOVA handed out (keeps 0 and the first MiB unused).
const IOVA_MIN: u64 = 1 << 20;
/// QEMU's emulated Intel IOMMU translates 39 address bits; stay below unless VFIO reports
/// (and we were asked for) more.
const IOVA_LIMIT: u64 = 1 << 39;

mod sys {
    //! The raw ioctls. Each wrapper documents what the kernel reads and writes.
    use std::io;
    use std::os::fd::RawFd;

    const fn io(nr: u32) -> libc::c_ulong {
        (((vfio_bindings::bindings::vfio::VFIO_TYPE as u32) << 8)
            | (vfio_bindings::bindings::vfio::VFIO_BASE + nr)) as libc::c_ulong
    }
    pub const GET_API_VERSION: libc::c_ulong = io(0);
    pub const CHECK_EXTENSION: libc::c_ulong = io(1);
    pub const SET_IOMMU: libc::c_ulong = io(2);
    pub const GROUP_GET_STATUS: libc::c_ulong = io(3);
    pub const GROUP_SET_CONTAINER: libc::c_ulong = io(4);
    pub const GROUP_GET_DEVICE_FD: libc::c_ulong = io(6);
    pub const DEVICE_GET_INFO: libc::c_ulong = io(7);
    pub const DEVICE_GET_REGION_INFO: libc::c_ulong = io(8);
    pub const DEVICE_GET_IRQ_INFO: libc::c_ulong = io(9);
    pub const DEVICE_SET_IRQS: libc::c_ulong = io(10);
    pub const DEVICE_RESET: libc::c_ulong = io(11);
    pub const IOMMU_GET_INFO: libc::c_ulong = io(12);
    pub const IOMMU_MAP_DMA: libc::c_ulong = io(13);
    pub const IOMMU_UNMAP_DMA: libc::c_ulong = io(14);
    pub const DEVICE_FEATURE: libc::c_ulong = io(17);

    fn check(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// An ioctl with an integer argument (or none).
    pub fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
        // SAFETY: these requests take a plain integer, the kernel dereferences nothing.
        check(unsafe { libc::ioctl(fd, req, arg) })
    }

    /// An ioctl whose argument is `buf`, read and written by the kernel in place (its first
    /// u32 is `argsz` = the buffer length, so the kernel stays inside it).
    pub fn ioctl_buf(fd: RawFd, req: libc::c_ulong, buf: &mut [u8]) -> io::Result<libc::c_int> {
        debug_assert!(buf.len() >= 4);
        // SAFETY: `buf` is valid for reads and writes of its length, which the caller put
        // in argsz; the kernel touches no more than argsz bytes.
        check(unsafe { libc::ioctl(fd, req, buf.as_mut_ptr()) })
    }

    /// GROUP_GET_DEVICE_FD with a NUL-terminated name.
    pub fn get_device_fd(group: RawFd, name: &std::ffi::CStr) -> io::Result<RawFd> {
        // SAFETY: the kernel reads the NUL-terminated string only.
        check(unsafe { libc::ioctl(group, GROUP_GET_DEVICE_FD, name.as_ptr()) })
    }

    /// mmap a region of a VFIO device fd, shared, read/write.
    pub fn mmap_region(fd: RawFd, offset: u64, len: usize) -> io::Result<*mut u8> {
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(p as *mut u8)
        }
    }

    /// Anonymous private memory, populated.
    pub fn mmap_anon(len: usize) -> io::Result<*mut u8> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(p as *mut u8)
        }
    }

    /// # Safety
    /// `p..p+len` must be a mapping created by `mmap_region`/`mmap_anon` that nothing
    /// uses any more.
    pub unsafe fn munmap(p: *mut u8, len: usize) {
        // SAFETY: per the function contract.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }
}

/// Plain-old-data wrappers for the bindgen structs we pass as byte buffers.
fn struct_buf<T>(v: &T) -> Vec<u8> {
    let n = std::mem::size_of::<T>();
    let mut out = vec![0u8; n];
    // SAFETY: T is a bindgen repr(C) struct of integers (no padding-dependent invariants);
    // copying its bytes is fine.
    unsafe { std::ptr::copy_nonoverlapping(v as *const T as *const u8, out.as_mut_ptr(), n) };
    out
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
        .unwrap_or(0)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .unwrap_or(0)
}

/// One VFIO region.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    pub offset: u64,
}

struct Container {
    file: File,
}

struct IovaSpace {
    /// Usable ranges (start, end exclusive), minus forbidden windows.
    free: Vec<(u64, u64)>,
}

impl IovaSpace {
    fn new(ranges: &[(u64, u64)], forbidden: &[(u64, u64)]) -> IovaSpace {
        let mut free: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(s, e)| (s.max(IOVA_MIN), e.min(IOVA_LIMIT)))
            .filter(|&(s, e)| s < e)
            .collect();
        for &(fs, fe) in forbidden {
            free = free
                .into_iter()
                .flat_map(|(s, e)| {
                    if fe <= s || fs >= e {
                        vec![(s, e)]
                    } else {
                        [(s, fs.max(s)), (fe.min(e), e)]
                            .into_iter()
                            .filter(|(a, b)| a < b)
                            .collect()
                    }
                })
                .collect();
        }
        free.sort();
        IovaSpace { free }
    }
    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        for i in 0..self.free.len() {
            let (s, e) = self.free[i];
            let a = s.div_ceil(align) * align;
            if a.checked_add(len).is_some_and(|end| end <= e) {
                self.free.remove(i);
                if a + len < e {
                    self.free.insert(i, (a + len, e));
                }
                if s < a {
                    self.free.insert(i, (s, a));
                }
                return Some(a);
            }
        }
        None
    }
    fn release(&mut self, start: u64, len: u64) {
        let pos = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(pos, (start, start + len));
        let mut i = 0;
        while i + 1 < self.free.len() {
            if self.free[i].1 == self.free[i + 1].0 {
                self.free[i].1 = self.free[i + 1].1;
                self.free.remove(i + 1);
            } else {
                i += 1;
            }
        }
    }
}

/// DMA memory mapped into the device's IOMMU domain.
pub struct VfioDma {
    bdf: String,
    container: Arc<Container>,
    iova: Arc<Mutex<IovaSpace>>,
}

struct VfioDmaRegion {
    container: Arc<Container>,
    iova_space: Arc<Mutex<IovaSpace>>,
    ptr: *mut u8,
    len: usize,
    iova: u64,
}
// SAFETY: owns an anonymous mapping and the IOMMU mapping of it; accessed via raw pointers.
unsafe impl Send for VfioDmaRegion {}
// SAFETY: as above.
unsafe impl Sync for VfioDmaRegion {}
impl DmaRegion for VfioDmaRegion {}
impl Drop for VfioDmaRegion {
    fn drop(&mut self) {
        let unmap = vb::vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vb::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova: self.iova,
            size: self.len as u64,
            data: Default::default(),
        };
        let mut buf = struct_buf(&unmap);
        match sys::ioctl_buf(
            self.container.file.as_raw_fd(),
            sys::IOMMU_UNMAP_DMA,
            &mut buf,
        ) {
            Ok(_) => {
                self.iova_space
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(self.iova, self.len as u64);
                // SAFETY: the device can no longer reach the memory (unmapped from the
                // IOMMU above) and no DmaBuffer refers to it (this is the last owner).
                unsafe { sys::munmap(self.ptr, self.len) };
            }
            // Leak rather than free memory the device may still write.
            Err(e) => tracing::error!(
                iova = self.iova,
                "VFIO_IOMMU_UNMAP_DMA failed, leaking the buffer: {e}"
            ),
        }
    }
}

impl DmaAllocator for VfioDma {
    fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        let big = len >= (2 << 20);
        let align: usize = if big { 2 << 20 } else { PAGE_SIZE };
        let len = len.max(1).div_ceil(align) * align;
        let iova = self
            .iova
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(len as u64, align as u64)
            .ok_or_else(|| Error::OutOfDmaMemory {
                len,
                why: "no free IOVA range below 2^39".into(),
            })?;
        let release = |iova_space: &Arc<Mutex<IovaSpace>>| {
            iova_space
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(iova, len as u64)
        };
        let ptr = match sys::mmap_anon(len) {
            Ok(p) => p,
            Err(e) => {
                release(&self.iova);
                return Err(Error::OutOfDmaMemory {
                    len,
                    why: e.to_string(),
                });
            }
        };
        let map = vb::vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vb::vfio_iommu_type1_dma_map>() as u32,
            flags: vb::VFIO_DMA_MAP_FLAG_READ | vb::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: ptr as u64,
            iova,
            size: len as u64,
        };
        let mut buf = struct_buf(&map);
        if let Err(e) = sys::ioctl_buf(
            self.container.file.as_raw_fd(),
            sys::IOMMU_MAP_DMA,
            &mut buf,
        ) {
            // SAFETY: just mapped above and never handed out.
            unsafe { sys::munmap(ptr, len) };
            release(&self.iova);
            return Err(Error::Vfio {
                bdf: self.bdf.clone(),
                op: "VFIO_IOMMU_MAP_DMA",
                source: e,
            });
        }
        let region = Arc::new(VfioDmaRegion {
            container: self.container.clone(),
            iova_space: self.iova.clone(),
            ptr,
            len,
            iova,
        });
        let nn = NonNull::new(ptr).ok_or_else(|| Error::OutOfDmaMemory {
            len,
            why: "null mapping".into(),
        })?;
        // SAFETY: `ptr..ptr+len` is our anonymous mapping, IOMMU-mapped at `iova`, both
        // kept until `region` drops.
        Ok(unsafe { DmaBuffer::from_raw_parts(nn, iova, len, region) })
    }
}

struct BarRegion {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: an MMIO mapping; accessed only through volatile raw-pointer operations.
unsafe impl Send for BarRegion {}
// SAFETY: as above.
unsafe impl Sync for BarRegion {}
impl DmaRegion for BarRegion {}
impl Drop for BarRegion {
    fn drop(&mut self) {
        // SAFETY: mapped by mmap_region; the last Mmio/DmaBuffer using it is gone.
        unsafe { sys::munmap(self.ptr, self.len) };
    }
}

/// A VFIO device fd with its regions: the one place that exports BAR ranges as dma-bufs,
/// for our own driver ([`VfioPlatform`]) and for a device another driver in this process
/// opened (SPDK's, through DPDK's VFIO group fd: the group path lets a device be opened
/// more than once).
pub struct VfioDevice {
    bdf: String,
    file: File,
    flags: u32,
    regions: Vec<RegionInfo>,
}

impl VfioDevice {
    /// Opens `bdf` (normalised) on the VFIO group `group` (VFIO_GROUP_GET_DEVICE_FD) and
    /// reads its flags and regions.
    pub fn from_group(group: BorrowedFd<'_>, bdf: &str) -> Result<VfioDevice> {
        let vfio_err = |op: &'static str| {
            let bdf = bdf.to_string();
            move |source: io::Error| Error::Vfio { bdf, op, source }
        };
        let name = CString::new(bdf).map_err(|_| Error::BadAddress {
            bdf: bdf.to_string(),
        })?;
        let dfd = sys::get_device_fd(group.as_raw_fd(), &name)
            .map_err(vfio_err("VFIO_GROUP_GET_DEVICE_FD"))?;
        // SAFETY: a fresh fd returned by the kernel that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dfd) });
        let mut info = vb::vfio_device_info {
            argsz: std::mem::size_of::<vb::vfio_device_info>() as u32,
            ..Default::default()
        };
        let mut b = struct_buf(&info);
        sys::ioctl_buf(dfd, sys::DEVICE_GET_INFO, &mut b)
            .map_err(vfio_err("VFIO_DEVICE_GET_INFO"))?;
        info.flags = u32_at(&b, 4);
        info.num_regions = u32_at(&b, 8);
        let mut regions = Vec::new();
        for index in 0..info.num_regions.min(9) {
            let ri = vb::vfio_region_info {
                argsz: std::mem::size_of::<vb::vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            let mut b = struct_buf(&ri);
            if sys::ioctl_buf(dfd, sys::DEVICE_GET_REGION_INFO, &mut b).is_ok() {
                regions.push(RegionInfo {
                    index,
                    flags: u32_at(&b, 4),
                    size: u64_at(&b, 16),
                    offset: u64_at(&b, 24),
                });
            }
        }
        Ok(VfioDevice {
            bdf: bdf.to_string(),
            file,
            flags: info.flags,
            regions,
        })
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// VFIO region `index` (0–5 BARs, 7 config space).
    pub fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions.iter().find(|r| r.index == index).copied()
    }

    fn dma_buf_request(
        &self,
        region: u32,
        offset: u64,
        length: u64,
        probe: bool,
    ) -> Result<Option<OwnedFd>> {
        let mut b = Vec::with_capacity(48);
        let total = 8 + 16 + 16;
        b.extend_from_slice(&(total as u32).to_le_bytes());
        let mut flags = vb::VFIO_DEVICE_FEATURE_GET | vb::VFIO_DEVICE_FEATURE_DMA_BUF;
        if probe {
            flags |= vb::VFIO_DEVICE_FEATURE_PROBE;
        }
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&region.to_le_bytes());
        b.extend_from_slice(&((libc::O_CLOEXEC | libc::O_RDWR) as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&length.to_le_bytes());
        match sys::ioctl_buf(self.file.as_raw_fd(), sys::DEVICE_FEATURE, &mut b) {
            Ok(_) if probe => Ok(None),
            // SAFETY: the kernel returned a new dma-buf fd that we now own.
            Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)) || (probe && e.raw_os_error() == Some(libc::EINVAL)) => {
                Err(Error::Unsupported {
                    what: format!(
                        "dma-buf export of {}: this kernel's vfio-pci lacks VFIO_DEVICE_FEATURE_DMA_BUF (needs CONFIG_VFIO_PCI_DMABUF, Linux >= 6.19): {e}",
                        self.bdf
                    ),
                })
            }
            Err(e) => Err(Error::Vfio { bdf: self.bdf.clone(), op: "VFIO_DEVICE_FEATURE(DMA_BUF)", source: e }),
        }
    }

    /// Export `length` bytes at `offset` of BAR `region` as a dma-buf (page aligned).
    pub fn export_dma_buf(&self, region: u32, offset: u64, length: u64) -> Result<OwnedFd> {
        let pg = PAGE_SIZE as u64;
        if region > 5 || length == 0 || !offset.is_multiple_of(pg) || !length.is_multiple_of(pg) {
            return Err(Error::InvalidArgument(format!("dma-buf range {offset:#x}+{length:#x} of region {region} must be page aligned in a BAR")));
        }
        let r = self
            .region(region)
            .ok_or_else(|| Error::InvalidArgument(format!("no region {region}")))?;
        if offset.checked_add(length).is_none_or(|e| e > r.size) {
            return Err(Error::InvalidArgument(format!(
                "dma-buf range {offset:#x}+{length:#x} outside BAR {region} ({:#x} bytes)",
                r.size
            )));
        }
        self.dma_buf_request(region, offset, length, true)?;
        self.dma_buf_request(region, offset, length, false)?
            .ok_or_else(|| Error::Unsupported {
                what: "dma-buf export returned no fd".into(),
            })
    }
}

/// A PCI device opened through VFIO, as a [`Platform`] for the controller.
pub struct VfioPlatform {
    bdf: String,
    // Field order matters for drop: device, then group, then container.
    device: VfioDevice,
    _group: File,
    dma: VfioDma,
    regs: Mmio,
    bars: Mutex<Vec<(u8, BarMapping)>>,
    /// MSI-X vectors VFIO offers (VFIO_DEVICE_GET_IRQ_INFO, index MSI-X).
    msix_vectors: u16,
    /// The eventfds of the enabled MSI-X vectors (vector i signals `irqs[i]`).
    irqs: Mutex<Vec<Arc<EventFd>>>,
}

/// Processes that have `path` open (pid, command line), from /proc/*/fd; those whose
/// fds cannot be read (other users, without privilege) are left out.
pub fn holders_of(path: &Path) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path))
        {
            let cmd = std::fs::read(p.path().join("cmdline"))
                .map(|b| {
                    b.split(|&c| c == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push((pid, cmd));
        }
    }
    out
}

fn open_node(path: &str, bdf: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => Error::Permission {
                bdf: bdf.into(),
                path: path.into(),
            },
            Some(libc::EBUSY) => {
                let holders = holders_of(Path::new(path));
                let serve = holders.iter().any(|(_, cmd)| {
                    cmd.split_whitespace().any(|w| w == "serve")
                        && cmd.split_whitespace().any(|w| w.ends_with("nvmf-p2p"))
                });
                Error::DeviceBusy {
                    bdf: bdf.into(),
                    path: path.into(),
                    holder: if holders.is_empty() {
                        "another process".into()
                    } else {
                        holders
                            .iter()
                            .map(|(pid, cmd)| format!("pid {pid} ({cmd})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    hint: if serve {
                        ": `nvmf-p2p serve` drives this controller; use it over NVMe-oF (perf --traddr), read `nvmf-p2p stats`, or stop serve first"
                    } else {
                        ""
                    },
                }
            }
            _ => Error::io(format!("opening {path} for {bdf}"), e),
        })
}

impl VfioPlatform {
    /// Open `bdf` (bound to vfio-pci): group, container (type1v2), device, regions; map
    /// BAR0; turn on memory decode and bus mastering.
    pub fn open(bdf: &str) -> Result<VfioPlatform> {
        let bdf = pci::normalize_bdf(bdf)?;
        pci::device_dir(&bdf)?;
        match pci::current_driver(&bdf)? {
            Some(d) if d == "vfio-pci" => {}
            Some(d) => return Err(Error::BoundToOtherDriver { bdf, driver: d }),
            None => return Err(Error::NotBound { bdf }),
        }
        let group_no =
            pci::iommu_group(&bdf)?.ok_or_else(|| Error::NoIommuGroup { bdf: bdf.clone() })?;
        let container = open_node("/dev/vfio/vfio", &bdf)?;
        let cfd = container.as_raw_fd();
        let vfio_err = |op: &'static str| {
            let bdf = bdf.clone();
            move |source: io::Error| Error::Vfio { bdf, op, source }
        };
        let ver = sys::ioctl_val(cfd, sys::GET_API_VERSION, 0)
            .map_err(vfio_err("VFIO_GET_API_VERSION"))?;
        if ver as u32 != vb::VFIO_API_VERSION {
            return Err(Error::Unsupported {
                what: format!("VFIO API version {ver}"),
            });
        }
        if sys::ioctl_val(
            cfd,
            sys::CHECK_EXTENSION,
            vb::VFIO_TYPE1v2_IOMMU as libc::c_ulong,
        )
        .unwrap_or(0)
            != 1
        {
            return Err(Error::Unsupported {
                what: "the VFIO type1v2 IOMMU (is the IOMMU enabled?)".into(),
            });
        }
        let group = open_node(&format!("/dev/vfio/{group_no}"), &bdf)?;
        let gfd = group.as_raw_fd();
        let mut st = vb::vfio_group_status { argsz: 8, flags: 0 };
        let mut b = struct_buf(&st);
        sys::ioctl_buf(gfd, sys::GROUP_GET_STATUS, &mut b)
            .map_err(vfio_err("VFIO_GROUP_GET_STATUS"))?;
        st.flags = u32_at(&b, 4);
        if st.flags & vb::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::GroupNotViable {
                bdf,
                group: group_no,
            });
        }
        let mut cfd_arg = cfd.to_ne_bytes().to_vec();
        cfd_arg.resize(8, 0);
        // GROUP_SET_CONTAINER takes a pointer to an int fd.
        sys::ioctl_buf(gfd, sys::GROUP_SET_CONTAINER, &mut cfd_arg)
            .map_err(vfio_err("VFIO_GROUP_SET_CONTAINER"))?;
        sys::ioctl_val(cfd, sys::SET_IOMMU, vb::VFIO_TYPE1v2_IOMMU as libc::c_ulong)
            .map_err(vfio_err("VFIO_SET_IOMMU"))?;
        let device = VfioDevice::from_group(group.as_fd(), &bdf)?;

        // IOVA ranges the IOMMU accepts.
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(&4096u32.to_le_bytes());
        let mut ranges = Vec::new();
        if sys::ioctl_buf(cfd, sys::IOMMU_GET_INFO, &mut b).is_ok()
            && u32_at(&b, 4) & vb::VFIO_IOMMU_INFO_CAPS != 0
        {
            let mut off = u32_at(&b, 16) as usize;
            let mut hops = 0;
            while off != 0 && off + 16 <= b.len() && hops < 16 {
                let id = u16::from_le_bytes([b[off], b[off + 1]]) as u32;
                let next = u32_at(&b, off + 4) as usize;
                if id == vb::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                    let n = u32_at(&b, off + 8) as usize;
                    for i in 0..n {
                        let r = off + 16 + i * 16;
                        if r + 16 <= b.len() {
                            ranges.push((u64_at(&b, r), u64_at(&b, r + 8).saturating_add(1)));
                        }
                    }
                }
                off = next;
                hops += 1;
            }
        }
        if ranges.is_empty() {
            ranges.push((0, IOVA_LIMIT));
        }
        let container = Arc::new(Container { file: container });

        let mut p = VfioPlatform {
            dma: VfioDma {
                bdf: bdf.clone(),
                container,
                iova: Arc::new(Mutex::new(IovaSpace { free: Vec::new() })),
            },
            bdf: bdf.clone(),
            device,
            _group: group,
            // Placeholder until BAR0 is mapped below.
            regs: empty_mmio(),
            bars: Mutex::new(Vec::new()),
            msix_vectors: 0,
            irqs: Mutex::new(Vec::new()),
        };
        p.msix_vectors = p
            .irq_count(vb::VFIO_PCI_MSIX_IRQ_INDEX)
            .min(u16::MAX as u32) as u16;
        p.enable_decode_and_master()?;
        // Keep every BAR's bus window (the CMB's in particular) out of the IOVA space.
        let forbidden: Vec<(u64, u64)> = (0..6u8)
            .filter_map(|i| {
                p.bar_bus_address(i)
                    .ok()
                    .flatten()
                    .map(|a| (a, a + p.region(i as u32).map_or(0, |r| r.size)))
            })
            .collect();
        *p.dma.iova.lock().unwrap_or_else(|e| e.into_inner()) = IovaSpace::new(&ranges, &forbidden);
        let bar0 = p.map_region(0)?;
        // SAFETY: BAR0 stays mapped while the BarRegion (held by the Mmio) lives.
        p.regs = unsafe {
            Mmio::new(
                NonNull::new(bar0.0).ok_or_else(|| Error::InvalidArgument("bar0".into()))?,
                bar0.1,
                bar0.2,
            )
        };
        Ok(p)
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }
    /// VFIO regions (0–5 BARs, 7 config space).
    pub fn regions(&self) -> &[RegionInfo] {
        &self.device.regions
    }
    pub fn region(&self, index: u32) -> Option<RegionInfo> {
        self.device.region(index)
    }
    /// Whether VFIO_DEVICE_RESET is available.
    pub fn supports_reset(&self) -> bool {
        self.device.flags & vb::VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// Vectors of VFIO interrupt index `index` (0 INTx, 1 MSI, 2 MSI-X) that can signal
    /// an eventfd; 0 when the index is absent or has no eventfd support.
    pub fn irq_count(&self, index: u32) -> u32 {
        let info = vb::vfio_irq_info {
            argsz: std::mem::size_of::<vb::vfio_irq_info>() as u32,
            flags: 0,
            index,
            count: 0,
        };
        let mut b = struct_buf(&info);
        match sys::ioctl_buf(
            self.device.file.as_raw_fd(),
            sys::DEVICE_GET_IRQ_INFO,
            &mut b,
        ) {
            Ok(_) if u32_at(&b, 4) & vb::VFIO_IRQ_INFO_EVENTFD != 0 => u32_at(&b, 12),
            _ => 0,
        }
    }

    /// MSI-X vectors the device offers through VFIO.
    pub fn msix_vectors(&self) -> u16 {
        self.msix_vectors
    }

    /// Enable MSI-X vectors `0..count`, each signalling its own new eventfd
    /// (`VFIO_DEVICE_SET_IRQS`, DATA_EVENTFD | ACTION_TRIGGER). Enabled once: later calls
    /// return the eventfds of the first (VFIO cannot grow an enabled MSI-X block).
    pub fn enable_msix(&self, count: u16) -> Result<Vec<Arc<EventFd>>> {
        let mut irqs = self.irqs.lock().unwrap_or_else(|p| p.into_inner());
        if !irqs.is_empty() {
            return Ok(irqs.clone());
        }
        if count == 0 || count > self.msix_vectors {
            return Err(Error::Unsupported {
                what: format!(
                    "{count} MSI-X vectors on {} (VFIO offers {})",
                    self.bdf, self.msix_vectors
                ),
            });
        }
        let fds = (0..count)
            .map(|_| EventFd::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::io("creating an eventfd", e))?;
        // struct vfio_irq_set { argsz, flags, index, start, count; s32 data[count] }
        let total = 20 + 4 * count as usize;
        let mut b = Vec::with_capacity(total);
        b.extend_from_slice(&(total as u32).to_le_bytes());
        b.extend_from_slice(
            &(vb::VFIO_IRQ_SET_DATA_EVENTFD | vb::VFIO_IRQ_SET_ACTION_TRIGGER).to_le_bytes(),
        );
        b.extend_from_slice(&vb::VFIO_PCI_MSIX_IRQ_INDEX.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(count as u32).to_le_bytes());
        for f in &fds {
            b.extend_from_slice(&f.as_raw_fd().to_le_bytes());
        }
        sys::ioctl_buf(self.device.file.as_raw_fd(), sys::DEVICE_SET_IRQS, &mut b).map_err(|e| {
            Error::Vfio {
                bdf: self.bdf.clone(),
                op: "VFIO_DEVICE_SET_IRQS (MSI-X eventfds; the IOMMU may lack interrupt remapping: see vfio_iommu_type1.allow_unsafe_interrupts)",
                source: e,
            }
        })?;
        *irqs = fds.clone();
        Ok(fds)
    }

    /// Turn MSI-X off again (`VFIO_DEVICE_SET_IRQS`, DATA_NONE, count 0).
    fn disable_msix(&self) {
        let mut irqs = self.irqs.lock().unwrap_or_else(|p| p.into_inner());
        if irqs.is_empty() {
            return;
        }
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&20u32.to_le_bytes());
        b.extend_from_slice(
            &(vb::VFIO_IRQ_SET_DATA_NONE | vb::VFIO_IRQ_SET_ACTION_TRIGGER).to_le_bytes(),
        );
        b.extend_from_slice(&vb::VFIO_PCI_MSIX_IRQ_INDEX.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        if let Err(e) = sys::ioctl_buf(self.device.file.as_raw_fd(), sys::DEVICE_SET_IRQS, &mut b) {
            tracing::warn!(bdf = %self.bdf, "disabling MSI-X: {e}");
        }
        irqs.clear();
    }

    /// Read `buf.len()` bytes of PCI config space at `off`.
    pub fn read_config(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let r = self
            .region(vb::VFIO_PCI_CONFIG_REGION_INDEX)
            .ok_or_else(|| Error::Unsupported {
                what: "config space region".into(),
            })?;
        self.device
            .file
            .read_exact_at(buf, r.offset + off)
            .map_err(|e| Error::Vfio {
                bdf: self.bdf.clone(),
                op: "reading config space",
                source: e,
            })
    }
    /// Write PCI config space.
    pub fn write_config(&self, off: u64, buf: &[u8]) -> Result<()> {
        let r = self
            .region(vb::VFIO_PCI_CONFIG_REGION_INDEX)
            .ok_or_else(|| Error::Unsupported {
                what: "config space region".into(),
            })?;
        self.device
            .file
            .write_all_at(buf, r.offset + off)
            .map_err(|e| Error::Vfio {
                bdf: self.bdf.clone(),
                op: "writing config space",
                source: e,
            })
    }

    /// Turn on memory space decode and bus mastering in the PCI command register.
    pub fn enable_decode_and_master(&self) -> Result<()> {
        let mut cmd = [0u8; 2];
        self.read_config(4, &mut cmd)?;
        let v = u16::from_le_bytes(cmd) | 0x2 | 0x4;
        self.write_config(4, &v.to_le_bytes())
    }

    /// The bus address BAR `bar` is programmed with (None for I/O or unset BARs).
    pub fn bar_bus_address(&self, bar: u8) -> Result<Option<u64>> {
        if bar > 5 {
            return Ok(None);
        }
        let mut lo = [0u8; 4];
        self.read_config(0x10 + 4 * bar as u64, &mut lo)?;
        let lo = u32::from_le_bytes(lo);
        if lo & 1 == 1 {
            return Ok(None);
        }
        let mut addr = (lo & !0xf) as u64;
        if (lo >> 1) & 3 == 2 && bar < 5 {
            let mut hi = [0u8; 4];
            self.read_config(0x10 + 4 * (bar as u64 + 1), &mut hi)?;
            addr |= (u32::from_le_bytes(hi) as u64) << 32;
        }
        Ok((addr != 0).then_some(addr))
    }

    fn map_region(&self, index: u32) -> Result<(*mut u8, usize, Arc<dyn DmaRegion>)> {
        let r = self.region(index).ok_or_else(|| Error::Unsupported {
            what: format!("region {index} of {}", self.bdf),
        })?;
        if r.flags & vb::VFIO_REGION_INFO_FLAG_MMAP == 0 || r.size == 0 {
            return Err(Error::Unsupported {
                what: format!("mmap of BAR {index} of {}", self.bdf),
            });
        }
        let len = r.size as usize;
        let ptr = sys::mmap_region(self.device.file.as_raw_fd(), r.offset, len).map_err(|e| {
            Error::Vfio {
                bdf: self.bdf.clone(),
                op: "mmap of a BAR",
                source: e,
            }
        })?;
        Ok((ptr, len, Arc::new(BarRegion { ptr, len })))
    }

    /// Export `length` bytes at `offset` of BAR `region` as a dma-buf (page aligned).
    pub fn export_dma_buf(&self, region: u32, offset: u64, length: u64) -> Result<OwnedFd> {
        self.device.export_dma_buf(region, offset, length)
    }
}

impl Drop for VfioPlatform {
    fn drop(&mut self) {
        // Closing the device fd would do it too; explicit, so the eventfds are released
        // by VFIO before they are closed.
        self.disable_msix();
    }
}

fn empty_mmio() -> Mmio {
    struct Nothing;
    impl DmaRegion for Nothing {}
    // SAFETY: length 0: every access is out of range and never dereferences the pointer.
    unsafe { Mmio::new(NonNull::dangling(), 0, Arc::new(Nothing)) }
}

impl Platform for VfioPlatform {
    fn name(&self) -> String {
        self.bdf.clone()
    }
    fn regs(&self) -> &Mmio {
        &self.regs
    }
    fn dma(&self) -> &dyn DmaAllocator {
        &self.dma
    }
    fn map_bar(&self, bir: u8) -> Result<BarMapping> {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = bars.iter().find(|(b, _)| *b == bir) {
            return Ok(m.clone());
        }
        let bus = self
            .bar_bus_address(bir)?
            .ok_or_else(|| Error::Unsupported {
                what: format!("BAR {bir} of {} has no bus address", self.bdf),
            })?;
        let (ptr, len, region) = self.map_region(bir as u32)?;
        let nn = NonNull::new(ptr).ok_or_else(|| Error::InvalidArgument("bar".into()))?;
        // SAFETY: the BAR mapping lives as long as `region`; the device decodes it at `bus`.
        let mem = unsafe { DmaBuffer::from_raw_parts(nn, bus, len, region) };
        let m = BarMapping { mem };
        bars.push((bir, m.clone()));
        Ok(m)
    }
    fn interrupt_vectors(&self) -> u16 {
        self.msix_vectors
    }
    fn enable_interrupts(&self, count: u16) -> Result<Vec<Arc<EventFd>>> {
        self.enable_msix(count)
    }
    fn device_reset(&self) -> Result<()> {
        if !self.supports_reset() {
            return Err(Error::Unsupported {
                what: format!("VFIO_DEVICE_RESET on {} (no reset method)", self.bdf),
            });
        }
        sys::ioctl_val(self.device.file.as_raw_fd(), sys::DEVICE_RESET, 0).map_err(|e| {
            Error::Vfio {
                bdf: self.bdf.clone(),
                op: "VFIO_DEVICE_RESET",
                source: e,
            }
        })?;
        self.enable_decode_and_master()
    }
}

/// An NVMe controller on a VFIO device: the driver plus dma-buf export.
pub struct NvmeDevice {
    platform: Arc<VfioPlatform>,
    ctrl: Controller,
}

impl NvmeDevice {
    /// Open `bdf` through VFIO and bring the controller up.
    pub fn open(bdf: &str, opts: ControllerOptions) -> Result<NvmeDevice> {
        let platform = Arc::new(VfioPlatform::open(bdf)?);
        let ctrl = Controller::new(platform.clone(), opts)?;
        Ok(NvmeDevice { platform, ctrl })
    }
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }
    pub fn vfio(&self) -> &VfioPlatform {
        &self.platform
    }
    /// (offset in BAR0, length) of the doorbell page(s) covering every possible queue.
    pub fn doorbell_range(&self) -> (u64, u64) {
        spec::doorbell_pages(self.ctrl.info().io_queues_granted, self.ctrl.cap().dstrd())
    }
    /// Export the doorbell page of BAR0 as a dma-buf.
    pub fn export_doorbells(&self) -> Result<OwnedFd> {
        let (off, len) = self.doorbell_range();
        self.platform.export_dma_buf(0, off, len)
    }
    /// Export `range` (byte offsets inside the CMB, page aligned) as a dma-buf.
    pub fn export_cmb(&self, range: std::ops::Range<u64>) -> Result<OwnedFd> {
        let cmb = self
            .ctrl
            .info()
            .cmb
            .clone()
            .ok_or_else(|| Error::Unsupported {
                what: format!("CMB on {} (none, or not enabled)", self.platform.bdf),
            })?;
        if range.start >= range.end || range.end > cmb.size {
            return Err(Error::InvalidArgument(format!(
                "CMB range {range:?} outside the CMB of {} bytes",
                cmb.size
            )));
        }
        self.platform.export_dma_buf(
            cmb.bar as u32,
            cmb.offset + range.start,
            range.end - range.start,
        )
    }
    /// FLR through VFIO, then controller re-initialisation with every queue recreated.
    /// dma-bufs exported before stay open and are usable again once this returns.
    pub fn reset_device(&self) -> Result<()> {
        self.ctrl.reset_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_of_finds_this_process_and_busy_names_it() {
        let path = std::env::temp_dir().join(format!("nvmf-p2p-holder-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let held = holders_of(&path);
        assert!(
            held.iter().any(|(pid, _)| *pid == std::process::id()),
            "{held:?}"
        );
        drop(f);
        assert!(holders_of(&path).is_empty());
        let _ = std::fs::remove_file(&path);
        let e = Error::DeviceBusy {
            bdf: "0000:01:00.0".into(),
            path: "/dev/vfio/3".into(),
            holder: "pid 42 (/usr/bin/nvmf-p2p serve --config t.toml)".into(),
            hint: ": `nvmf-p2p serve` drives this controller",
        };
        assert_eq!(e.to_string(), "0000:01:00.0 is in use: /dev/vfio/3 is held by pid 42 (/usr/bin/nvmf-p2p serve --config t.toml): `nvmf-p2p serve` drives this controller");
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(sys::GET_API_VERSION, 0x3b64);
        assert_eq!(sys::IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(sys::DEVICE_RESET, 0x3b6f);
        assert_eq!(sys::DEVICE_FEATURE, 0x3b75);
        assert_eq!(sys::DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(sys::DEVICE_SET_IRQS, 0x3b6e);
    }

    #[test]
    fn iova_space_respects_ranges_and_forbidden_windows() {
        // VFIO reports [0, 0xfee00000) and [0xfef00000, 2^48); the CMB sits at 1 MiB+.
        let ranges = [(0, 0xfee0_0000), (0xfef0_0000, 1 << 48)];
        let cmb = (0x10_0000 + 0x1000, 0x10_0000 + 0x1000 + (16 << 20));
        let mut s = IovaSpace::new(&ranges, &[cmb]);
        let a = s.alloc(4096, 4096).unwrap();
        assert!(a >= IOVA_MIN);
        assert!(
            a + 4096 <= cmb.0 || a >= cmb.1,
            "{a:#x} inside the CMB window"
        );
        let big = s.alloc(2 << 20, 2 << 20).unwrap();
        assert_eq!(big % (2 << 20), 0);
        assert!(big >= cmb.1 || big + (2 << 20) <= cmb.0);
        // Nothing above 2^39 even though VFIO allows it.
        let huge = s.alloc(1 << 38, 1 << 20);
        assert!(huge.is_none_or(|h| h + (1 << 38) <= IOVA_LIMIT));
        s.release(a, 4096);
        assert_eq!(s.alloc(4096, 4096), Some(a));
    }

    #[test]
    fn opening_a_missing_device_is_a_clear_error() {
        let e = VfioPlatform::open("0000:ee:1f.7").err().unwrap();
        assert!(matches!(e, Error::NoSuchDevice { .. }), "{e}");
        let e = VfioPlatform::open("not-a-bdf").err().unwrap();
        assert!(matches!(e, Error::BadAddress { .. }), "{e}");
    }
}
