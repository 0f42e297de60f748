//! The `spdk:BDF[:nsid]` namespace backend of `serve` (cargo feature `spdk`): a namespace
//! of a PCIe NVMe controller driven by SPDK's userspace NVMe driver instead of ours.
//!
//! It plugs in like `vfio:` (`vfio_backend.rs`, `transport::nvme_backend`): one controller
//! per BDF, shared by its namespaces; each poll group gets its own SPDK I/O queue pair
//! ([`IoChannel`]) whose completions it reaps with `spdk_nvme_qpair_process_completions`
//! from its own loop; its buffer pool is SPDK DMA memory (`spdk_zmalloc`), which the pool
//! code registers as the RDMA memory region — the NIC and the controller use the same
//! buffers, nothing is copied and nothing is allocated per I/O (SPDK's requests come from
//! the queue pair's preallocated pool, our per-command state from a slot array sized once).
//! The synchronous path (Dataset Management, flush of every namespace, shutdown) runs
//! through one more queue pair behind a mutex and a bounce buffer, as for `vfio:`.
//!
//! SPDK's environment (DPDK's EAL) starts once per process, on the first `spdk:`
//! namespace, in IOVA mode `pa` (the testbed's vIOMMU cannot map DPDK's default IOVA=VA
//! range, FACTS.md "SPDK"; `NVMF_P2P_SPDK_IOVA_MODE=va` to change it) with hugepages,
//! which must be mounted and reserved. The
//! controller handle stays reachable ([`SpdkController::raw`], [`SpdkController::admin_raw`])
//! for what needs SPDK's controller itself, such as raw admin commands.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CString};
use std::mem::size_of;
use std::os::fd::RawFd;
use std::ptr::{null_mut, NonNull};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nvme::spec::{Cqe, Sqe, Status};
use nvme::{DmaBuffer, DmaRegion};
use spdk_sys as sys;
use transport::backend::{check_range, AsyncOp, Backend, IoChannel, SubmitError};
use transport::{Error, Result};
use zerocopy::{FromBytes, IntoBytes};

/// Timeout of one synchronous command (I/O or admin).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Entries of a poll group's queue pair (capped by the controller's CAP.MQES); as for
/// `vfio:`, a group rarely has more in flight than its pool has buffers.
const CHANNEL_DEPTH: u32 = 512;

/// Commands the synchronous queue pair holds (one at a time is used).
const SYNC_DEPTH: u32 = 4;

/// I/O queues an SPDK controller may create when it raises interrupts: SPDK gives every
/// queue id a vector (qid = vector) and DPDK an eventfd each, so keep it within the MSI-X
/// vectors a controller has (QEMU's NVMe: 65) — enough for a poll group per core plus
/// the synchronous queue of each namespace.
const IRQ_IO_QUEUES: u32 = 32;

fn backend_err(backend: &str, op: &'static str, msg: impl Into<String>) -> Error {
    Error::BackendIo {
        backend: backend.to_string(),
        op,
        source: std::io::Error::other(msg.into()),
    }
}

// ---------------------------------------------------------------------------------------
// Environment (DPDK EAL), once per process
// ---------------------------------------------------------------------------------------

static ENV: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Free 2 MiB-or-larger hugepages and whether hugetlbfs is mounted.
fn hugepages() -> (u64, bool) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
    (free, mounted)
}

/// Starts SPDK's environment once for the process; every later call returns the first
/// outcome.
fn init_env() -> Result<()> {
    let outcome = ENV.get_or_init(|| {
        let (free, mounted) = hugepages();
        if !mounted || free == 0 {
            return Err(format!(
                "SPDK needs hugepages ({}): mount hugetlbfs (`mount -t hugetlbfs nodev /dev/hugepages`) and reserve 2 MiB pages (`echo 512 > /proc/sys/vm/nr_hugepages`)",
                if mounted { "none is free" } else { "no hugetlbfs is mounted" }
            ));
        }
        let mut opts = sys::spdk_env_opts {
            opts_size: size_of::<sys::spdk_env_opts>(),
            ..Default::default()
        };
        // SAFETY: `opts` is a valid spdk_env_opts of the size its opts_size says.
        unsafe { sys::spdk_env_opts_init(&mut opts) };
        opts.name = c"nvmf-p2p".as_ptr();
        // PA by default: the IOMMU of the testbed (and hosts without one) cannot take
        // DPDK's VA range; NVMF_P2P_SPDK_IOVA_MODE=va where the IOMMU can (and PA, which
        // reads /proc/self/pagemap, is not available).
        let iova = match std::env::var("NVMF_P2P_SPDK_IOVA_MODE").as_deref() {
            Ok("va") => c"va",
            Ok("pa") | Err(_) => c"pa",
            Ok(other) => {
                return Err(format!(
                    "NVMF_P2P_SPDK_IOVA_MODE={other} is not an IOVA mode: use pa or va"
                ))
            }
        };
        opts.iova_mode = iova.as_ptr();
        // private hugepage files, no shared-memory config: several processes may run SPDK
        opts.shm_id = -1;
        // DPDK pins the calling thread to its main lcore: give it back its CPUs after.
        let saved = thread_affinity();
        // SAFETY: `opts` and the 'static strings it points at outlive the call; SPDK copies
        // what it keeps.
        let rc = unsafe { sys::spdk_env_init(&opts) };
        if let Some(set) = saved {
            set_thread_affinity(&set);
        }
        if rc != 0 {
            return Err(format!(
                "SPDK's environment (DPDK EAL) did not start (error {rc}; its messages are above)"
            ));
        }
        tracing::info!(iova_mode = ?iova, "SPDK environment started");
        Ok(())
    });
    outcome.clone().map_err(|reason| Error::BackendIo {
        backend: "spdk".into(),
        op: "start SPDK's environment",
        source: std::io::Error::other(reason),
    })
}

fn thread_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 = the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    (rc == 0).then_some(set)
}

fn set_thread_affinity(set: &libc::cpu_set_t) {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 = the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        tracing::warn!(
            "could not restore the thread's CPU affinity after SPDK's environment started"
        );
    }
}

// ---------------------------------------------------------------------------------------
// DMA memory
// ---------------------------------------------------------------------------------------

/// Memory from `spdk_zmalloc(SPDK_MALLOC_DMA)`: hugepage memory SPDK has registered and
/// translates itself for every command (virtual address in, PRPs out).
struct SpdkMemory {
    ptr: NonNull<u8>,
}

// SAFETY: the allocation is process-wide memory owned by this value; it is freed once, on
// drop, and only accessed through DmaBuffer's raw-pointer copies.
unsafe impl Send for SpdkMemory {}
// SAFETY: as above; the value itself has no interior state.
unsafe impl Sync for SpdkMemory {}
impl DmaRegion for SpdkMemory {}

impl Drop for SpdkMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from spdk_zmalloc and every DmaBuffer into it (which holds
        // this region by Arc) is gone.
        unsafe { sys::spdk_free(self.ptr.as_ptr().cast()) };
    }
}

/// `len` bytes (rounded up to pages, page aligned, zeroed) of SPDK DMA memory. Its
/// [`DmaBuffer::iova`] is the bus address of the first byte only (hugepages need not be
/// contiguous): these buffers go to SPDK's driver, which translates every page itself,
/// never to our own driver (another [`Backend::dma_domain`]).
fn alloc_dma(len: usize) -> Result<DmaBuffer> {
    init_env()?;
    let len = len.max(1).next_multiple_of(nvme::spec::PAGE_SIZE);
    // SAFETY: plain allocation call; SPDK_MALLOC_DMA asks for registered hugepage memory.
    let p = unsafe {
        sys::spdk_zmalloc(
            len,
            nvme::spec::PAGE_SIZE,
            null_mut(),
            sys::SPDK_ENV_NUMA_ID_ANY,
            sys::SPDK_MALLOC_DMA,
        )
    };
    let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| {
        backend_err(
            "spdk",
            "allocate DMA memory",
            format!(
                "spdk_zmalloc({len}) failed: reserve more hugepages (/proc/sys/vm/nr_hugepages)"
            ),
        )
    })?;
    // SAFETY: `p` is a live SPDK allocation; a null size pointer asks for no length.
    let iova = unsafe { sys::spdk_vtophys(p, null_mut()) };
    let region: Arc<dyn DmaRegion> = Arc::new(SpdkMemory { ptr });
    // SAFETY: ptr..ptr+len is SPDK memory valid for reads and writes until `region` (held
    // by every DmaBuffer cloned from this one) is dropped; the device sees it through
    // SPDK's translation (see above for what `iova` means here).
    Ok(unsafe { DmaBuffer::from_raw_parts(ptr, iova, len, region) })
}

/// `len` bytes (rounded up to pages) of zeroed SPDK DMA memory that is contiguous in the
/// device's address space, so that its [`DmaBuffer::iova`] holds for every byte: what a
/// ring or a direct queue's data pool needs (the remote host builds PRPs from it). Up to
/// one hugepage (2 MiB) it is aligned to its size rounded up to a power of two, so it
/// never straddles two hugepages; larger allocations are checked with `spdk_vtophys`.
pub(crate) fn alloc_contiguous(len: usize) -> std::result::Result<DmaBuffer, nvme::Error> {
    let len = len.max(1).next_multiple_of(nvme::spec::PAGE_SIZE);
    let align = len.next_power_of_two().min(2 << 20);
    let oom = |why: String| nvme::Error::OutOfDmaMemory { len, why };
    // SAFETY: plain allocation call; SPDK_MALLOC_DMA asks for registered hugepage memory.
    let p = unsafe {
        sys::spdk_zmalloc(
            len,
            align,
            null_mut(),
            sys::SPDK_ENV_NUMA_ID_ANY,
            sys::SPDK_MALLOC_DMA,
        )
    };
    let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| {
        oom("spdk_zmalloc failed: reserve more hugepages (/proc/sys/vm/nr_hugepages)".into())
    })?;
    let region: Arc<dyn DmaRegion> = Arc::new(SpdkMemory { ptr });
    let mut contiguous = len as u64;
    // SAFETY: `p` is a live SPDK allocation of `len` bytes; SPDK writes the contiguous
    // length into `contiguous`.
    let iova = unsafe { sys::spdk_vtophys(p, &mut contiguous) };
    if iova == sys::SPDK_VTOPHYS_ERROR as u64 || contiguous < len as u64 {
        return Err(oom(format!(
            "SPDK memory is contiguous for {contiguous} bytes only; ask for at most 2 MiB"
        )));
    }
    // SAFETY: ptr..ptr+len is SPDK memory valid for reads and writes until `region` (held
    // by every DmaBuffer cloned from this one) is dropped; the device sees all of it at
    // iova..iova+len (checked above).
    Ok(unsafe { DmaBuffer::from_raw_parts(ptr, iova, len, region) })
}

/// The DMA domain every SPDK controller of the process shares: SPDK memory is registered
/// with all of them.
fn spdk_domain() -> usize {
    &ENV as *const _ as usize
}

// ---------------------------------------------------------------------------------------
// Controller
// ---------------------------------------------------------------------------------------

/// One NVMe controller attached by SPDK's driver (`spdk_nvme_connect`), detached on drop
/// (after every queue pair of it: they hold it by `Arc`).
pub struct SpdkController {
    bdf: String,
    ctrlr: NonNull<sys::spdk_nvme_ctrlr>,
    /// Attached with `enable_interrupts`: queue pairs have an eventfd (spdk_nvme_qpair_get_fd).
    interrupts: bool,
    /// Serialises admin commands and their completion polling (and resets).
    admin: Mutex<()>,
    /// Controller resets so far ([`SpdkController::reset`]): direct queues created
    /// before a reset are gone (`spdk_direct.rs`).
    pub(crate) generation: std::sync::atomic::AtomicU64,
    /// The VFIO device fd direct mode exports dma-bufs from, opened on first use.
    pub(crate) vfio: OnceLock<std::result::Result<Arc<nvme::vfio::VfioDevice>, String>>,
}

// SAFETY: SPDK's controller functions used here (get_ns, alloc/free qpair, admin commands
// under `admin`, detach once on drop) may be called from any thread; queue pairs are used
// by one thread at a time (their owners).
unsafe impl Send for SpdkController {}
// SAFETY: as above.
unsafe impl Sync for SpdkController {}

impl Drop for SpdkController {
    fn drop(&mut self) {
        // SAFETY: no queue pair of this controller is left (each holds an Arc of it).
        let rc = unsafe { sys::spdk_nvme_detach(self.ctrlr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(bdf = %self.bdf, rc, "spdk_nvme_detach failed");
        }
    }
}

/// Checks that SPDK can claim `bdf` before asking it to (its own failure says little):
/// the device exists and is bound to vfio-pci (or uio_pci_generic).
fn check_claimable(bdf: &str) -> Result<()> {
    let err = |e: nvme::Error| backend_err(&format!("spdk:{bdf}"), "open", e.to_string());
    match nvme::pci::current_driver(bdf).map_err(err)? {
        Some(d) if d == "vfio-pci" || d == "uio_pci_generic" => Ok(()),
        Some(driver) => Err(err(nvme::Error::BoundToOtherDriver {
            bdf: bdf.to_string(),
            driver,
        })),
        None => Err(err(nvme::Error::NotBound {
            bdf: bdf.to_string(),
        })),
    }
}

impl SpdkController {
    /// Attaches the controller at `bdf` (`DDDD:BB:DD.F`) with SPDK's PCIe driver; with
    /// `interrupts`, asks for MSI-X completion interrupts (queue pair eventfds), and
    /// attaches polled if SPDK cannot set them up.
    pub fn connect(bdf: &str, interrupts: bool) -> Result<Self> {
        check_claimable(bdf)?;
        init_env()?;
        let name = format!("spdk:{bdf}");
        let mut trid = sys::spdk_nvme_transport_id::default();
        let s = CString::new(format!("trtype:PCIe traddr:{bdf}"))
            .map_err(|_| backend_err(&name, "open", "PCI address contains a NUL byte"))?;
        // SAFETY: `trid` is a valid struct, `s` a NUL-terminated string; both outlive the call.
        if unsafe { sys::spdk_nvme_transport_id_parse(&mut trid, s.as_ptr()) } != 0 {
            return Err(backend_err(
                &name,
                "open",
                "SPDK cannot parse the PCI address",
            ));
        }
        let attach = |irq: bool| {
            let mut opts = sys::spdk_nvme_ctrlr_opts::default();
            // SAFETY: `opts` is a valid struct of the size passed.
            unsafe {
                sys::spdk_nvme_ctrlr_get_default_ctrlr_opts(
                    &mut opts,
                    size_of::<sys::spdk_nvme_ctrlr_opts>(),
                )
            };
            if irq {
                opts.enable_interrupts = true;
                opts.num_io_queues = opts.num_io_queues.min(IRQ_IO_QUEUES);
            }
            // SAFETY: `trid` and `opts` are valid for the call; SPDK copies them.
            NonNull::new(unsafe {
                sys::spdk_nvme_connect(&trid, &opts, size_of::<sys::spdk_nvme_ctrlr_opts>())
            })
        };
        let mut with_irq = interrupts;
        let mut ctrlr = attach(with_irq);
        if ctrlr.is_none() && with_irq {
            tracing::warn!(
                bdf,
                "SPDK could not attach with interrupts: attaching with polled queues"
            );
            with_irq = false;
            ctrlr = attach(false);
        }
        let ctrlr = ctrlr.ok_or_else(|| {
            backend_err(
                &name,
                "open",
                format!("SPDK could not attach the NVMe controller at {bdf} (is another process using it? SPDK's messages are above)"),
            )
        })?;
        Ok(SpdkController {
            bdf: bdf.to_string(),
            ctrlr,
            interrupts: with_irq,
            admin: Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            vfio: OnceLock::new(),
        })
    }

    /// Whether the controller's queue pairs raise interrupts.
    pub fn interrupts(&self) -> bool {
        self.interrupts
    }

    /// SPDK's controller handle, for callers that drive SPDK's API directly (raw admin
    /// commands, CMB mapping). Valid while `self` lives.
    pub fn raw(&self) -> *mut sys::spdk_nvme_ctrlr {
        self.ctrlr.as_ptr()
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// SPDK's cached Identify Controller data, as our spec type.
    pub fn identify(&self) -> nvme::spec::IdentifyController {
        // SAFETY: the controller is attached; SPDK returns a pointer to its 4 KiB copy,
        // valid while attached.
        let data = unsafe { sys::spdk_nvme_ctrlr_get_data(self.ctrlr.as_ptr()) };
        // SAFETY: `data` points at a spdk_nvme_ctrlr_data, which has the size of
        // IdentifyController (spdk-sys layout tests); reading its bytes is fine.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.cast::<u8>(), size_of::<sys::spdk_nvme_ctrlr_data>())
        };
        nvme::spec::IdentifyController::read_from_bytes(bytes)
            .expect("spdk_nvme_ctrlr_data has the size of IdentifyController")
    }

    /// Runs one admin command `sqe` (CID and data pointer are SPDK's to fill) with `buf`
    /// as its data, waiting up to 10 s; returns the completion entry.
    pub fn admin_raw(&self, sqe: &Sqe, buf: Option<&DmaBuffer>) -> Result<Cqe> {
        let name = format!("spdk:{}", self.bdf);
        let _serial = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let mut cmd: sys::spdk_nvme_cmd = sys::spdk_nvme_cmd::default();
        cmd.as_mut_bytes_compat().copy_from_slice(sqe.as_bytes());
        // The completion lands here; it is leaked if the command times out (SPDK may
        // still complete it later).
        let slot = Box::into_raw(Box::new(AdminSlot { cqe: None }));
        let (ptr, len) = buf.map_or((null_mut(), 0), |b| (b.as_ptr().cast(), b.len() as u32));
        // SAFETY: `cmd` is copied by SPDK; `ptr..ptr+len` is SPDK DMA memory kept alive by
        // the caller's `buf` until we return (and we return only after the completion or
        // after a timeout, see below); `slot` is valid until freed below.
        let rc = unsafe {
            sys::spdk_nvme_ctrlr_cmd_admin_raw(
                self.ctrlr.as_ptr(),
                &mut cmd,
                ptr,
                len,
                Some(on_admin_complete),
                slot.cast(),
            )
        };
        if rc != 0 {
            // SAFETY: SPDK refused the command: it will never call back with `slot`.
            drop(unsafe { Box::from_raw(slot) });
            return Err(backend_err(
                &name,
                "admin command",
                format!("SPDK refused it ({rc})"),
            ));
        }
        let t0 = Instant::now();
        loop {
            // SAFETY: the controller is attached; admin polling is serialised by `admin`.
            let rc = unsafe { sys::spdk_nvme_ctrlr_process_admin_completions(self.ctrlr.as_ptr()) };
            // SAFETY: `slot` is live; the callback wrote it (if at all) on this thread,
            // inside the call above.
            if let Some(cqe) = unsafe { (*slot).cqe } {
                // SAFETY: completed: SPDK holds no pointer to `slot` any more.
                drop(unsafe { Box::from_raw(slot) });
                return Ok(cqe);
            }
            if rc < 0 || t0.elapsed() > IO_TIMEOUT {
                return Err(backend_err(
                    &name,
                    "admin command",
                    if rc < 0 {
                        format!("the admin queue failed ({rc})")
                    } else {
                        format!("no completion within {IO_TIMEOUT:?}")
                    },
                ));
            }
            std::thread::yield_now();
        }
    }

    /// Resets the controller with SPDK's driver (`spdk_nvme_ctrlr_reset`: CC.EN cleared and
    /// set, the admin queue and SPDK's own I/O queue pairs re-created). The caller holds
    /// every queue pair of it idle (the poll groups hold their backend I/O) and has
    /// dropped every direct queue: the generation is bumped first, so a direct queue that
    /// is still dropped later neither deletes nor frees a qid SPDK gave out again.
    pub fn reset(&self) -> Result<()> {
        let _serial = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let t0 = Instant::now();
        // SAFETY: the controller is attached; admin use is serialised by `admin` and the
        // caller keeps the I/O queue pairs idle, as spdk_nvme_ctrlr_reset requires.
        let rc = unsafe { sys::spdk_nvme_ctrlr_reset(self.ctrlr.as_ptr()) };
        tracing::info!(bdf = %self.bdf, rc, took_ms = t0.elapsed().as_millis() as u64, "controller reset by SPDK (spdk_nvme_ctrlr_reset)");
        if rc != 0 {
            return Err(backend_err(
                &format!("spdk:{}", self.bdf),
                "reset",
                format!("spdk_nvme_ctrlr_reset failed ({rc})"),
            ));
        }
        Ok(())
    }

    /// Sends Identify Controller through [`SpdkController::admin_raw`] and compares the
    /// answer with SPDK's cached copy: proves the raw admin path (and our Sqe layout)
    /// once per controller. A mismatch or failure is logged, not fatal — I/O does not use
    /// this path.
    fn check_admin_path(&self, cached: &nvme::spec::IdentifyController) {
        let outcome = alloc_dma(nvme::spec::PAGE_SIZE).and_then(|buf| {
            let sqe = Sqe::identify(nvme::spec::cns::CONTROLLER, 0, 0, 0);
            let cqe = self.admin_raw(&sqe, Some(&buf))?;
            let mut bytes = vec![0u8; size_of::<nvme::spec::IdentifyController>()];
            buf.read(0, &mut bytes)
                .map_err(|e| backend_err(&self.bdf, "admin command", e.to_string()))?;
            Ok((
                cqe.status(),
                nvme::spec::IdentifyController::read_from_bytes(&bytes).ok(),
            ))
        });
        match outcome {
            Ok((st, Some(id)))
                if st.is_success()
                    && id.sn == cached.sn
                    && id.mn == cached.mn
                    && id.vid == cached.vid =>
            {
                tracing::info!(bdf = %self.bdf, "raw admin Identify through SPDK matches SPDK's controller data")
            }
            Ok((st, _)) => {
                tracing::warn!(bdf = %self.bdf, status = ?st, "raw admin Identify through SPDK differs from SPDK's controller data")
            }
            Err(e) => {
                tracing::warn!(bdf = %self.bdf, error = %e, "raw admin Identify through SPDK failed")
            }
        }
    }

    /// SPDK's namespace handle for `nsid`, if that namespace is active.
    pub(crate) fn namespace(&self, nsid: u32) -> Option<NonNull<sys::spdk_nvme_ns>> {
        // SAFETY: the controller is attached; the handle lives as long as it.
        let ns = NonNull::new(unsafe { sys::spdk_nvme_ctrlr_get_ns(self.ctrlr.as_ptr(), nsid) })?;
        // SAFETY: `ns` is a handle SPDK just returned.
        unsafe { sys::spdk_nvme_ns_is_active(ns.as_ptr()) }.then_some(ns)
    }
}

/// Helper: spdk_nvme_cmd as bytes (bindgen types do not derive zerocopy's traits).
trait AsBytesCompat {
    fn as_mut_bytes_compat(&mut self) -> &mut [u8];
}

impl AsBytesCompat for sys::spdk_nvme_cmd {
    fn as_mut_bytes_compat(&mut self) -> &mut [u8] {
        // SAFETY: spdk_nvme_cmd is 64 bytes of integers and bitfields (no padding, any bit
        // pattern valid); the slice borrows `self` mutably for its lifetime.
        unsafe {
            std::slice::from_raw_parts_mut((self as *mut Self).cast::<u8>(), size_of::<Self>())
        }
    }
}

struct AdminSlot {
    cqe: Option<Cqe>,
}

fn cpl_to_cqe(cpl: *const sys::spdk_nvme_cpl) -> Cqe {
    // SAFETY: SPDK passes a valid completion; spdk_nvme_cpl has the size and layout of Cqe
    // (spdk-sys layout tests), and Cqe accepts any bytes.
    let bytes = unsafe { std::slice::from_raw_parts(cpl.cast::<u8>(), size_of::<Cqe>()) };
    Cqe::read_from_bytes(bytes).expect("spdk_nvme_cpl is 16 bytes")
}

unsafe extern "C" fn on_admin_complete(arg: *mut c_void, cpl: *const sys::spdk_nvme_cpl) {
    // SAFETY: `arg` is the live AdminSlot of the waiting admin_raw (or a leaked one after
    // its timeout); only this thread touches it during the callback.
    unsafe { (*arg.cast::<AdminSlot>()).cqe = Some(cpl_to_cqe(cpl)) };
}

// ---------------------------------------------------------------------------------------
// Queue pairs
// ---------------------------------------------------------------------------------------

/// Per-command state SPDK's callback reaches through `cb_arg`.
struct Slot {
    queue: *mut QueueState,
    idx: u32,
    tag: u64,
}

/// A queue's command bookkeeping, on the heap at a fixed address (callbacks point into it).
/// Touched only through the raw pointer of its [`SpdkQueue`], by the queue's thread.
struct QueueState {
    slots: Box<[Slot]>,
    /// Free slot indices; capacity = slots (never grows).
    free: Vec<u32>,
    /// Completed (slot, status), reported by the next poll; a slot returns to `free` when
    /// reported, so `done.len() + in device ≤ slots` and `done` never grows.
    done: Vec<(u32, Status)>,
}

unsafe extern "C" fn on_io_complete(arg: *mut c_void, cpl: *const sys::spdk_nvme_cpl) {
    // SAFETY: `arg` is a Slot of a live QueueState (freed only after its queue pair, whose
    // destruction completes what is still outstanding); callbacks run on the queue's
    // thread inside spdk_nvme_qpair_process_completions (or its free), when no Rust
    // reference to the state is live.
    unsafe {
        let slot = &*arg.cast::<Slot>();
        let status = cpl_to_cqe(cpl).status();
        (*slot.queue).done.push((slot.idx, status));
    }
}

/// One SPDK I/O queue pair on namespace `ns`, with its command slots.
struct SpdkQueue {
    qpair: NonNull<sys::spdk_nvme_qpair>,
    ns: NonNull<sys::spdk_nvme_ns>,
    state: NonNull<QueueState>,
    depth: u32,
    max_transfer: usize,
    block_size: u32,
    /// A failed queue pair is reported once.
    failed_logged: bool,
    /// Commands started since SPDK last rang the SQ doorbell (polled queues have
    /// `delay_cmd_submit`: SPDK rings it once per spdk_nvme_qpair_process_completions, so
    /// a batch costs one MMIO write, as on `vfio:`).
    unflushed: bool,
    /// The queue pair's interrupt eventfd (nonblocking), when the controller has them.
    wake: Option<RawFd>,
    // The controller outlives the queue pair (field order; Drop frees the qpair first).
    ctrl: Arc<SpdkController>,
}

// SAFETY: a queue pair is used by one thread at a time (its owner: a poll group, or the
// sync path behind a mutex); SPDK allows moving it between threads between calls.
unsafe impl Send for SpdkQueue {}

impl Drop for SpdkQueue {
    fn drop(&mut self) {
        // SAFETY: the queue pair is ours; freeing it aborts what is outstanding (callbacks
        // into `state`, still alive here), then `state` is freed once.
        unsafe {
            sys::spdk_nvme_ctrlr_free_io_qpair(self.qpair.as_ptr());
            drop(Box::from_raw(self.state.as_ptr()));
        }
    }
}

impl SpdkQueue {
    fn open(
        ctrl: &Arc<SpdkController>,
        ns: NonNull<sys::spdk_nvme_ns>,
        depth: u32,
    ) -> Result<Self> {
        let name = format!("spdk:{}", ctrl.bdf);
        let mut opts = sys::spdk_nvme_io_qpair_opts::default();
        let sz = size_of::<sys::spdk_nvme_io_qpair_opts>();
        // SAFETY: the controller is attached; `opts` is valid for `sz` bytes.
        unsafe { sys::spdk_nvme_ctrlr_get_default_io_qpair_opts(ctrl.raw(), &mut opts, sz) };
        // the default is the controller's maximum (capped by SPDK); ask for ours
        opts.io_queue_size = opts.io_queue_size.min(depth).max(2);
        opts.io_queue_requests = opts.io_queue_requests.max(opts.io_queue_size);
        // one doorbell per batch; SPDK refuses it on a controller with interrupts ("delay
        // command submit cannot work with interrupts"), which then rings per command
        opts.__bindgen_anon_1.delay_cmd_submit = !ctrl.interrupts; // (a union with its old name)
        let slots = opts.io_queue_size - 1;
        // SAFETY: as above; SPDK copies `opts`.
        let qpair = unsafe { sys::spdk_nvme_ctrlr_alloc_io_qpair(ctrl.raw(), &opts, sz) };
        let qpair = NonNull::new(qpair).ok_or_else(|| {
            backend_err(
                &name,
                "create an I/O queue pair",
                "spdk_nvme_ctrlr_alloc_io_qpair failed",
            )
        })?;
        let state = Box::into_raw(Box::new(QueueState {
            slots: Box::new([]),
            free: (0..slots).rev().collect(),
            done: Vec::with_capacity(slots as usize),
        }));
        // SAFETY: `state` was just allocated; the slots point back at it.
        unsafe {
            (*state).slots = (0..slots)
                .map(|idx| Slot {
                    queue: state,
                    idx,
                    tag: 0,
                })
                .collect();
        }
        let wake = if ctrl.interrupts {
            // SAFETY: the queue pair was just allocated; no handler options asked for.
            let fd = unsafe { sys::spdk_nvme_qpair_get_fd(qpair.as_ptr(), null_mut()) };
            (fd >= 0 && set_nonblocking(fd)).then_some(fd)
        } else {
            None
        };
        // SAFETY: `ns` is an active namespace handle of this controller.
        let (max_transfer, block_size) = unsafe {
            (
                sys::spdk_nvme_ns_get_max_io_xfer_size(ns.as_ptr()) as usize,
                sys::spdk_nvme_ns_get_sector_size(ns.as_ptr()),
            )
        };
        Ok(SpdkQueue {
            qpair,
            ns,
            // SAFETY: Box::into_raw never returns null.
            state: unsafe { NonNull::new_unchecked(state) },
            depth: slots,
            max_transfer,
            block_size,
            failed_logged: false,
            unflushed: false,
            wake,
            ctrl: ctrl.clone(),
        })
    }

    /// Starts `op` under `tag`.
    fn start(&mut self, tag: u64, op: AsyncOp<'_>) -> std::result::Result<(), SubmitError> {
        let st = self.state.as_ptr();
        // SAFETY: the state is ours and no callback runs during this method (callbacks run
        // only inside process_completions / free).
        let Some(idx) = (unsafe { (*st).free.pop() }) else {
            return Err(SubmitError::Busy);
        };
        // SAFETY: as above; `idx` < slots.
        let slot = unsafe {
            let s = &mut (*st).slots[idx as usize];
            s.tag = tag;
            (s as *mut Slot).cast::<c_void>()
        };
        let (ns, qp) = (self.ns.as_ptr(), self.qpair.as_ptr());
        let cb =
            Some(on_io_complete as unsafe extern "C" fn(*mut c_void, *const sys::spdk_nvme_cpl));
        let bad_len = |buf: &DmaBuffer, nlb: u32| {
            nlb == 0 || buf.len() != nlb as usize * self.block_size as usize
        };
        // Every SPDK call below: `ns`/`qp` are live handles used by this thread only; data
        // buffers are SPDK DMA memory of exactly `nlb` blocks that the caller keeps alive
        // until the completion is reported (IoChannel contract); `slot` lives as long as
        // the queue's state, which outlives the queue pair.
        let rc: c_int = match op {
            AsyncOp::Read { slba, nlb, buf } if !bad_len(buf, nlb) => {
                // SAFETY: see above.
                unsafe {
                    sys::spdk_nvme_ns_cmd_read(ns, qp, buf.as_ptr().cast(), slba, nlb, cb, slot, 0)
                }
            }
            AsyncOp::Write { slba, nlb, buf } if !bad_len(buf, nlb) => {
                // SAFETY: see above.
                unsafe {
                    sys::spdk_nvme_ns_cmd_write(ns, qp, buf.as_ptr().cast(), slba, nlb, cb, slot, 0)
                }
            }
            AsyncOp::Read { .. } | AsyncOp::Write { .. } => -libc::EINVAL,
            AsyncOp::Flush => {
                // SAFETY: see above.
                unsafe { sys::spdk_nvme_ns_cmd_flush(ns, qp, cb, slot) }
            }
            AsyncOp::WriteZeroes { slba, nlb } if (1..=65536).contains(&nlb) => {
                // SAFETY: see above.
                unsafe { sys::spdk_nvme_ns_cmd_write_zeroes(ns, qp, slba, nlb, cb, slot, 0) }
            }
            AsyncOp::WriteZeroes { .. } => -libc::EINVAL,
        };
        if rc == 0 {
            self.unflushed = true;
            return Ok(());
        }
        // SAFETY: SPDK did not take the command: the slot is ours again.
        unsafe { (*st).free.push(idx) };
        if rc == -libc::ENOMEM {
            Err(SubmitError::Busy)
        } else {
            Err(SubmitError::Failed(Status::INVALID_FIELD.with_dnr()))
        }
    }

    /// Commands started and not yet reported (in the device or in `done`).
    fn outstanding(&self) -> usize {
        // SAFETY: read of our own state outside any callback.
        self.depth as usize - unsafe { (*self.state.as_ptr()).free.len() }
    }

    fn reported_pending(&self) -> bool {
        // SAFETY: as above.
        unsafe { !(*self.state.as_ptr()).done.is_empty() }
    }

    /// Lets SPDK run completion callbacks for up to `max` (> 0) completions, and ring the
    /// SQ doorbell for the commands started since the last call.
    fn process(&mut self, max: usize) {
        self.unflushed = false;
        // SAFETY: the queue pair is ours, used by this thread; no reference into `state`
        // is live while the callbacks write it.
        let rc = unsafe {
            sys::spdk_nvme_qpair_process_completions(
                self.qpair.as_ptr(),
                max.min(u32::MAX as usize) as u32,
            )
        };
        if rc < 0 && !self.failed_logged {
            self.failed_logged = true;
            tracing::error!(bdf = %self.ctrl.bdf, rc, "SPDK queue pair failed: its commands end with errors");
        }
    }

    /// Reports up to `max` recorded completions.
    fn report(&mut self, max: usize, done: &mut dyn FnMut(u64, Status)) -> usize {
        let st = self.state.as_ptr();
        let mut n = 0;
        while n < max {
            // SAFETY: our state, outside any callback; the reference ends before `done`
            // runs (which never reaches this queue).
            let Some((status, tag)) = (unsafe {
                let s = &mut *st;
                s.done.pop().map(|(idx, status)| {
                    s.free.push(idx); // the slot is free once reported
                    (status, s.slots[idx as usize].tag)
                })
            }) else {
                break;
            };
            done(tag, status);
            n += 1;
        }
        n
    }

    /// Runs one command to completion (the synchronous path).
    fn execute(&mut self, tag: u64, op: AsyncOp<'_>, name: &str, what: &'static str) -> Result<()> {
        loop {
            match self.start(tag, op) {
                Ok(()) => break,
                Err(SubmitError::Busy) => self.process(usize::MAX),
                Err(SubmitError::Failed(s)) => {
                    return Err(backend_err(
                        name,
                        what,
                        format!("refused with status {s:?}"),
                    ))
                }
            }
        }
        let t0 = Instant::now();
        let mut result = None;
        while result.is_none() {
            self.process(usize::MAX);
            // stale completions of earlier timed-out commands carry other tags
            self.report(usize::MAX, &mut |t, s| {
                if t == tag {
                    result = Some(s)
                }
            });
            if result.is_none() && t0.elapsed() > IO_TIMEOUT {
                return Err(backend_err(
                    name,
                    what,
                    format!("no completion within {IO_TIMEOUT:?}"),
                ));
            }
        }
        match result {
            Some(s) if s.is_success() => Ok(()),
            Some(s) => Err(backend_err(name, what, format!("failed with status {s:?}"))),
            None => unreachable!("loop ends with a result"),
        }
    }
}

/// Makes `fd` (DPDK's eventfd of a queue's vector) nonblocking, so clearing it never
/// waits; false if that fails (the queue is then polled).
fn set_nonblocking(fd: RawFd) -> bool {
    // SAFETY: fcntl on an fd SPDK owns and keeps open while the queue pair lives; only the
    // O_NONBLOCK status flag changes.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0
            && (fl & libc::O_NONBLOCK != 0
                || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0)
    }
}

// ---------------------------------------------------------------------------------------
// Backend and channels
// ---------------------------------------------------------------------------------------

struct SyncIo {
    q: SpdkQueue,
    bounce: DmaBuffer,
    next_tag: u64,
}

/// Namespace `nsid` of an SPDK-attached controller as a target backend.
pub struct SpdkBackend {
    name: String,
    nsid: u32,
    ns: NonNull<sys::spdk_nvme_ns>,
    block_size: u32,
    blocks: u64,
    vwc: bool,
    io: Mutex<SyncIo>,
    // The controller outlives its queue pairs (field order: `io` drops first).
    ctrl: Arc<SpdkController>,
}

// SAFETY: the namespace handle is only read through SPDK's thread-safe getters or handed
// to queue pairs that are each used by one thread; everything else is Send + Sync.
unsafe impl Send for SpdkBackend {}
// SAFETY: as above; the synchronous queue pair is behind a mutex.
unsafe impl Sync for SpdkBackend {}

impl SpdkBackend {
    /// A backend for namespace `nsid` of `ctrl`; `max_io` is the target's largest transfer
    /// (the synchronous bounce buffer's size).
    pub fn open(ctrl: Arc<SpdkController>, nsid: u32, max_io: usize) -> Result<Self> {
        let name = format!("spdk:{}:{nsid}", ctrl.bdf);
        let ns = ctrl.namespace(nsid).ok_or_else(|| {
            backend_err(
                &name,
                "open namespace",
                format!("the controller has no active namespace {nsid}"),
            )
        })?;
        // SAFETY: `ns` is an active namespace handle of the attached controller.
        let (block_size, blocks) = unsafe {
            (
                sys::spdk_nvme_ns_get_sector_size(ns.as_ptr()),
                sys::spdk_nvme_ns_get_num_sectors(ns.as_ptr()),
            )
        };
        let q = SpdkQueue::open(&ctrl, ns, SYNC_DEPTH)?;
        let chunk = max_io.min(q.max_transfer).max(block_size as usize);
        let bounce = alloc_dma(chunk)?;
        let vwc = ctrl.identify().vwc & 1 == 1;
        Ok(SpdkBackend {
            name,
            nsid,
            ns,
            block_size,
            blocks,
            vwc,
            io: Mutex::new(SyncIo {
                q,
                bounce,
                next_tag: 0,
            }),
            ctrl,
        })
    }

    fn with_io<T>(&self, f: impl FnOnce(&mut SyncIo) -> Result<T>) -> Result<T> {
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut io)
    }

    fn sync_op(&self, io: &mut SyncIo, op: AsyncOp<'_>, what: &'static str) -> Result<()> {
        io.next_tag += 1;
        let tag = io.next_tag;
        io.q.execute(tag, op, &self.name, what)
    }

    /// Runs a transfer through the bounce buffer in chunks.
    fn chunked(
        &self,
        slba: u64,
        len: usize,
        mut each: impl FnMut(&Self, &mut SyncIo, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size as usize;
        check_range(self, slba, (len / bs) as u64)?;
        self.with_io(|io| {
            let chunk = io.bounce.len() / bs * bs;
            let mut off = 0;
            while off < len {
                let n = chunk.min(len - off);
                each(self, io, slba + (off / bs) as u64, off, n)?;
                off += n;
            }
            Ok(())
        })
    }
}

fn dma_err(name: &str, e: nvme::Error) -> Error {
    backend_err(name, "copy through the bounce buffer", e.to_string())
}

impl Backend for SpdkBackend {
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
        if !buf.len().is_multiple_of(self.block_size as usize) {
            return Err(Error::BufferSize {
                expected: buf.len().next_multiple_of(self.block_size as usize),
                got: buf.len(),
            });
        }
        self.chunked(slba, buf.len(), |me, io, lba, off, n| {
            let b = io.bounce.slice(0, n).map_err(|e| dma_err(&me.name, e))?;
            let nlb = (n / me.block_size as usize) as u32;
            me.sync_op(
                io,
                AsyncOp::Read {
                    slba: lba,
                    nlb,
                    buf: &b,
                },
                "read",
            )?;
            b.read(0, &mut buf[off..off + n])
                .map_err(|e| dma_err(&me.name, e))
        })
    }
    fn write(&self, slba: u64, buf: &[u8]) -> Result<()> {
        if !buf.len().is_multiple_of(self.block_size as usize) {
            return Err(Error::BufferSize {
                expected: buf.len().next_multiple_of(self.block_size as usize),
                got: buf.len(),
            });
        }
        self.chunked(slba, buf.len(), |me, io, lba, off, n| {
            let b = io.bounce.slice(0, n).map_err(|e| dma_err(&me.name, e))?;
            b.write(0, &buf[off..off + n])
                .map_err(|e| dma_err(&me.name, e))?;
            let nlb = (n / me.block_size as usize) as u32;
            me.sync_op(
                io,
                AsyncOp::Write {
                    slba: lba,
                    nlb,
                    buf: &b,
                },
                "write",
            )
        })
    }
    fn flush(&self) -> Result<()> {
        self.with_io(|io| self.sync_op(io, AsyncOp::Flush, "flush"))
    }
    fn write_zeroes(&self, slba: u64, nlb: u64) -> Result<()> {
        check_range(self, slba, nlb)?;
        self.with_io(|io| {
            let mut done = 0u64;
            while done < nlb {
                let n = (nlb - done).min(65536) as u32;
                self.sync_op(
                    io,
                    AsyncOp::WriteZeroes {
                        slba: slba + done,
                        nlb: n,
                    },
                    "write zeroes",
                )?;
                done += u64::from(n);
            }
            Ok(())
        })
    }
    fn volatile_write_cache(&self) -> bool {
        self.vwc
    }
    fn dma_domain(&self) -> Option<usize> {
        Some(spdk_domain())
    }
    fn alloc_dma(&self, len: usize) -> Result<DmaBuffer> {
        alloc_dma(len)
            .map_err(|e| backend_err(&self.name, "allocate DMA buffer pool", e.to_string()))
    }
    fn open_channel(&self) -> Result<Option<Box<dyn IoChannel>>> {
        let q = SpdkQueue::open(&self.ctrl, self.ns, CHANNEL_DEPTH)?;
        tracing::info!(backend = %self.name, depth = q.depth, interrupt_fd = ?q.wake, "poll group SPDK queue pair");
        Ok(Some(Box::new(SpdkChannel { q })))
    }
    fn device(&self) -> Option<transport::backend::DeviceRef> {
        Some(transport::backend::DeviceRef {
            key: Arc::as_ptr(&self.ctrl) as usize,
            name: format!("spdk:{}", self.ctrl.bdf),
            nsid: self.nsid,
        })
    }
    fn device_log_page(&self, lid: u8, len: usize) -> Result<Vec<u8>> {
        if len == 0 || len > 2 * nvme::spec::PAGE_SIZE || !len.is_multiple_of(4) {
            return Err(backend_err(
                &self.name,
                "get log page",
                format!("log page length {len}"),
            ));
        }
        let buf = alloc_dma(len)?;
        // SPDK fills the CID and the data pointer (admin_raw).
        let sqe = Sqe::get_log_page(lid, u32::MAX, len as u32, 0, 0, 0);
        let cqe = self.ctrl.admin_raw(&sqe, Some(&buf))?;
        if !cqe.status().is_success() {
            return Err(backend_err(
                &self.name,
                "get log page",
                format!("log page {lid:#04x}: status {:?}", cqe.status()),
            ));
        }
        let mut v = vec![0u8; len];
        buf.read(0, &mut v)
            .map_err(|e| backend_err(&self.name, "get log page", e.to_string()))?;
        Ok(v)
    }
}

/// One poll group's SPDK queue pair.
struct SpdkChannel {
    q: SpdkQueue,
}

impl IoChannel for SpdkChannel {
    fn submit(&mut self, tag: u64, op: AsyncOp<'_>) -> std::result::Result<(), SubmitError> {
        if let AsyncOp::Read { buf, .. } | AsyncOp::Write { buf, .. } = op {
            if buf.len() > self.q.max_transfer {
                return Err(SubmitError::Failed(Status::INVALID_FIELD.with_dnr()));
            }
        }
        self.q.start(tag, op)
    }

    fn flush(&mut self) {
        // SPDK submits a batch (one doorbell) when it processes completions; what those
        // reap waits in the slot list for the next poll.
        if self.q.unflushed {
            self.q.process(self.q.depth as usize);
        }
    }

    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, Status)) -> usize {
        if max == 0 {
            return 0;
        }
        if (self.q.unflushed || !self.q.reported_pending()) && self.q.outstanding() > 0 {
            self.q.process(max);
        }
        self.q.report(max, done)
    }

    fn in_flight(&self) -> usize {
        self.q.outstanding()
    }

    fn max_transfer(&self) -> usize {
        self.q.max_transfer
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.q.wake
    }

    fn clear_wake(&mut self) {
        if let Some(fd) = self.q.wake {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v` from a nonblocking eventfd SPDK keeps open;
            // EAGAIN (nothing pending) is fine.
            let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
    }

    fn ready(&mut self) -> bool {
        if self.q.reported_pending() || self.q.unflushed {
            return true;
        }
        if self.q.wake.is_none() {
            return true; // unsure without an interrupt: poll
        }
        // Reap what the device posted before the eventfd was cleared; completions land in
        // the queue's `done` list for the next poll.
        if self.q.outstanding() > 0 {
            self.q.process(self.q.depth as usize);
        }
        self.q.reported_pending()
    }
}

/// Whether two PCI addresses name the same device (`01:00.0` = `0000:01:00.0`).
pub fn same_bdf(a: &str, b: &str) -> bool {
    match (nvme::pci::normalize_bdf(a), nvme::pci::normalize_bdf(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------
// Opener
// ---------------------------------------------------------------------------------------

/// Attaches NVMe controllers with SPDK, one per BDF, and hands out namespace backends.
pub struct SpdkOpener {
    controllers: Mutex<HashMap<String, Arc<SpdkController>>>,
    interrupts: bool,
}

impl SpdkOpener {
    /// An opener whose controllers raise completion interrupts if `interrupts` (and SPDK
    /// can set them up: `nvme_interrupts` of the configuration, as for `vfio:`).
    pub fn new(interrupts: bool) -> Self {
        SpdkOpener {
            controllers: Mutex::new(HashMap::new()),
            interrupts,
        }
    }

    /// The controllers attached so far (for stats and raw admin access).
    pub fn controllers(&self) -> Vec<(String, Arc<SpdkController>)> {
        let map = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The controller at `bdf`, if SPDK attached it.
    pub fn controller(&self, bdf: &str) -> Option<Arc<SpdkController>> {
        let map = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .find(|(k, _)| same_bdf(k, bdf))
            .map(|(_, c)| c.clone())
    }

    /// Whether the controller at `bdf` is attached by SPDK.
    pub fn has(&self, bdf: &str) -> bool {
        let map = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().any(|k| same_bdf(k, bdf))
    }

    /// A backend for namespace `nsid` of the controller at `bdf`.
    pub fn open(&self, bdf: &str, nsid: u32, max_io: usize) -> Result<Arc<dyn Backend>> {
        let bdf = nvme::pci::normalize_bdf(bdf)
            .map_err(|e| backend_err(&format!("spdk:{bdf}"), "open", e.to_string()))?;
        let ctrl = {
            let mut map = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&bdf) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(SpdkController::connect(&bdf, self.interrupts)?);
                    let id = c.identify();
                    tracing::info!(
                        bdf = %bdf,
                        interrupts = c.interrupts(),
                        model = %String::from_utf8_lossy(&id.mn).trim(),
                        "NVMe controller attached by SPDK"
                    );
                    c.check_admin_path(&id);
                    map.insert(bdf.clone(), c.clone());
                    c
                }
            }
        };
        Ok(Arc::new(SpdkBackend::open(ctrl, nsid, max_io)?))
    }
}
