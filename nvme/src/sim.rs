//! An in-process simulated NVMe controller: a register file in process memory, admin and
//! NVM I/O command processing on its own thread, DMA into this process's memory (IOVA =
//! virtual address, only into buffers allocated from the simulator, like an IOMMU), a RAM
//! namespace, a CMB, shadow doorbells, FLR, and fault injection (commands that never
//! complete, ignored aborts, error statuses, CSTS.CFS, a controller that never gets ready).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, IntoBytes};

use crate::dma::{BarMapping, DmaAllocator, DmaBuffer, DmaRegion, Mmio, Platform};
use crate::error::{Error, Result};
use crate::irq::EventFd;
use crate::spec::{
    self, admin_opc, cns, feat, io_opc, log, nidt, reg, Aqa, Cc, Cqe, IdentifyController,
    IdentifyNamespace, LbaFormat, NsIdDescriptor, Sqe, Status, PAGE_SIZE, U16, U32, U64,
};

/// Composite temperature of the simulated controller's SMART log (45 °C): not the 300 K
/// a target answers without a device, so tests can tell a passed-through log.
pub const SIM_TEMPERATURE_KELVIN: u16 = 318;
/// Error count of the one entry of the simulated controller's Error Information log.
pub const SIM_ERROR_COUNT: u64 = 3;

/// Simulated controller configuration.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Namespace 1 size in blocks.
    pub blocks: u64,
    /// Block size (512 or 4096).
    pub block_size: u32,
    /// Identify MDTS (2^mdts pages); 0 = unlimited.
    pub mdts: u8,
    /// I/O queue pairs the controller grants at most.
    pub max_io_queues: u16,
    /// CAP.MQES (0-based).
    pub mqes: u16,
    /// Advertise Doorbell Buffer Config in OACS.
    pub shadow_doorbells: bool,
    /// CMB size in bytes (multiple of 1 MiB, 0 = none), exposed as BAR 2.
    pub cmb_bytes: usize,
    /// CAP.DSTRD.
    pub dstrd: u8,
    /// CAP.TO (500 ms units).
    pub timeout_units: u8,
    /// Never sleep when idle: spin, then yield (for benchmarks; costs a core).
    pub busy_poll: bool,
    /// MSI-X vectors offered (0 = no interrupts). Vector 0 is the admin queue's; an I/O
    /// CQ created with IEN = 1 signals its vector's eventfd when a CQE is posted.
    pub msix_vectors: u16,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            blocks: 4096,
            block_size: 4096,
            mdts: 5,
            max_io_queues: 16,
            mqes: 1023,
            shadow_doorbells: true,
            cmb_bytes: 1 << 20,
            dstrd: 0,
            timeout_units: 2,
            busy_poll: false,
            msix_vectors: 17,
        }
    }
}

/// Fault injection switches, shared with the simulator thread.
#[derive(Default)]
pub struct Faults {
    stall: AtomicU32,
    fail: AtomicU32,
    fail_status: AtomicU16,
    ignore_abort: AtomicBool,
    fatal: AtomicBool,
    never_ready: AtomicBool,
    mute_interrupts: AtomicBool,
    /// An admin command to refuse once: `1 << 24 | status << 8 | opcode`, 0 for none.
    fail_admin: AtomicU32,
}

impl Faults {
    /// The next `n` I/O commands are fetched but never completed (until aborted or reset).
    pub fn stall_next_io(&self, n: u32) {
        self.stall.store(n, Ordering::SeqCst);
    }
    /// The next `n` I/O commands complete with `status`.
    pub fn fail_next_io(&self, n: u32, status: Status) {
        self.fail_status.store(status.0, Ordering::SeqCst);
        self.fail.store(n, Ordering::SeqCst);
    }
    /// Abort commands succeed but abort nothing.
    pub fn ignore_aborts(&self, on: bool) {
        self.ignore_abort.store(on, Ordering::SeqCst);
    }
    /// Raise CSTS.CFS and stop processing until the host resets the controller.
    pub fn set_fatal(&self) {
        self.fatal.store(true, Ordering::SeqCst);
    }
    /// CQEs are posted without raising their interrupt (a lost interrupt).
    pub fn mute_interrupts(&self, on: bool) {
        self.mute_interrupts.store(on, Ordering::SeqCst);
    }
    /// CSTS.RDY never becomes 1 after CC.EN = 1.
    pub fn never_ready(&self, on: bool) {
        self.never_ready.store(on, Ordering::SeqCst);
    }
    /// The next admin command with `opcode` completes with `status` and does nothing.
    pub fn fail_next_admin(&self, opcode: u8, status: Status) {
        let v = 1 << 24 | u32::from(status.0) << 8 | u32::from(opcode);
        self.fail_admin.store(v, Ordering::SeqCst);
    }
    /// The status to refuse an admin command `opcode` with, once, if one was asked for.
    fn take_admin_failure(&self, opcode: u8) -> Option<Status> {
        let v = self.fail_admin.load(Ordering::SeqCst);
        if v == 0 || v as u8 != opcode {
            return None;
        }
        self.fail_admin
            .compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Status((v >> 8) as u16))
    }
}

/// Page-aligned zeroed heap memory.
struct RawMem {
    ptr: NonNull<u8>,
    layout: Layout,
}
// SAFETY: plain heap memory, accessed only through raw pointers.
unsafe impl Send for RawMem {}
// SAFETY: as above.
unsafe impl Sync for RawMem {}
impl RawMem {
    fn new(len: usize) -> Result<RawMem> {
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let layout =
            Layout::from_size_align(len, PAGE_SIZE).map_err(|e| Error::OutOfDmaMemory {
                len,
                why: e.to_string(),
            })?;
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| Error::OutOfDmaMemory {
            len,
            why: "allocation failed".into(),
        })?;
        Ok(RawMem { ptr, layout })
    }
}
impl Drop for RawMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
impl DmaRegion for RawMem {}

struct SimShared {
    cfg: SimConfig,
    regs: Mmio,
    /// Live DMA mappings: start IOVA (= address) → length.
    dma: Mutex<BTreeMap<u64, usize>>,
    cmb: Option<Arc<RawMem>>,
    faults: Faults,
    stop: AtomicBool,
    flr_req: AtomicU32,
    flr_done: AtomicU32,
    commands: AtomicU64,
    ns: Mutex<Vec<u8>>,
    /// Enabled interrupt vectors' eventfds (empty: interrupts off).
    irqs: Mutex<Vec<Arc<EventFd>>>,
    /// Interrupts raised (eventfd signals) so far.
    interrupts: AtomicU64,
}
impl DmaRegion for SimShared {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimShared {
    /// Copy from simulated-device view of memory; false if any byte is unmapped.
    fn dma_read(&self, iova: u64, dst: &mut [u8]) -> bool {
        let map = lock(&self.dma);
        if !Self::mapped(&map, iova, dst.len()) {
            return false;
        }
        // SAFETY: [iova, iova+len) lies inside a live allocation (registered in `dma`,
        // which is only unregistered under this lock before being freed).
        unsafe {
            std::ptr::copy_nonoverlapping(iova as usize as *const u8, dst.as_mut_ptr(), dst.len())
        };
        true
    }
    fn dma_write(&self, iova: u64, src: &[u8]) -> bool {
        let map = lock(&self.dma);
        if !Self::mapped(&map, iova, src.len()) {
            return false;
        }
        // SAFETY: as in dma_read.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), iova as usize as *mut u8, src.len()) };
        true
    }
    fn dma_read_u32(&self, iova: u64) -> Option<u32> {
        let map = lock(&self.dma);
        if !iova.is_multiple_of(4) || !Self::mapped(&map, iova, 4) {
            return None;
        }
        // SAFETY: mapped and aligned, see dma_read; volatile because the host writes it.
        Some(unsafe { std::ptr::read_volatile(iova as usize as *const u32) })
    }
    fn dma_write_u32(&self, iova: u64, v: u32) -> bool {
        let map = lock(&self.dma);
        if !iova.is_multiple_of(4) || !Self::mapped(&map, iova, 4) {
            return false;
        }
        // SAFETY: mapped and aligned, see dma_read.
        unsafe { std::ptr::write_volatile(iova as usize as *mut u32, v) };
        true
    }
    fn mapped(map: &BTreeMap<u64, usize>, iova: u64, len: usize) -> bool {
        match map.range(..=iova).next_back() {
            Some((&start, &l)) => iova
                .checked_add(len as u64)
                .is_some_and(|e| e <= start + l as u64),
            None => false,
        }
    }
}

struct SimDmaRegion {
    shared: Arc<SimShared>,
    mem: Option<RawMem>,
}
impl DmaRegion for SimDmaRegion {}
impl Drop for SimDmaRegion {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.dma);
        if let Some(m) = self.mem.take() {
            map.remove(&(m.ptr.as_ptr() as u64));
            drop(m); // freed while the simulator cannot be inside a DMA copy
        }
    }
}

struct SimDma {
    shared: Arc<SimShared>,
}
impl DmaAllocator for SimDma {
    fn alloc(&self, len: usize) -> Result<DmaBuffer> {
        let mem = RawMem::new(len)?;
        let (ptr, size) = (mem.ptr, mem.layout.size());
        lock(&self.shared.dma).insert(ptr.as_ptr() as u64, size);
        let region = Arc::new(SimDmaRegion {
            shared: self.shared.clone(),
            mem: Some(mem),
        });
        // SAFETY: the allocation is valid for `size` bytes while `region` lives, and the
        // simulator sees it at IOVA = its address.
        Ok(unsafe { DmaBuffer::from_raw_parts(ptr, ptr.as_ptr() as u64, size, region) })
    }
}

struct SimPlatform {
    shared: Arc<SimShared>,
    dma: SimDma,
}

impl Platform for SimPlatform {
    fn name(&self) -> String {
        "sim".into()
    }
    fn regs(&self) -> &Mmio {
        &self.shared.regs
    }
    fn dma(&self) -> &dyn DmaAllocator {
        &self.dma
    }
    fn map_bar(&self, bir: u8) -> Result<BarMapping> {
        match (&self.shared.cmb, bir) {
            (Some(c), 2) => {
                let len = c.layout.size();
                // SAFETY: the CMB memory lives as long as the Arc<RawMem> region.
                let mem = unsafe {
                    DmaBuffer::from_raw_parts(c.ptr, c.ptr.as_ptr() as u64, len, c.clone())
                };
                Ok(BarMapping { mem })
            }
            _ => Err(Error::Unsupported {
                what: format!("BAR {bir} on the simulator"),
            }),
        }
    }
    fn interrupt_vectors(&self) -> u16 {
        self.shared.cfg.msix_vectors
    }
    fn enable_interrupts(&self, count: u16) -> Result<Vec<Arc<EventFd>>> {
        let mut irqs = lock(&self.shared.irqs);
        if irqs.is_empty() {
            if count == 0 || count > self.shared.cfg.msix_vectors {
                return Err(Error::Unsupported {
                    what: format!(
                        "{count} interrupt vectors on the simulator (it has {})",
                        self.shared.cfg.msix_vectors
                    ),
                });
            }
            *irqs = (0..count)
                .map(|_| EventFd::new().map(Arc::new))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Error::io("creating an eventfd", e))?;
        }
        Ok(irqs.clone())
    }
    fn device_reset(&self) -> Result<()> {
        let req = self.shared.flr_req.fetch_add(1, Ordering::SeqCst) + 1;
        let start = Instant::now();
        while self.shared.flr_done.load(Ordering::SeqCst) != req {
            if start.elapsed() > Duration::from_secs(5) {
                return Err(Error::Unsupported {
                    what: "simulator FLR did not complete".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }
}

/// A running simulated controller. Keep it alive longer than the controller using it.
pub struct Simulator {
    shared: Arc<SimShared>,
    platform: Arc<SimPlatform>,
    thread: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Start the simulator thread.
    pub fn start(cfg: SimConfig) -> Result<Simulator> {
        let regs_mem = Arc::new(RawMem::new(2 * PAGE_SIZE + 8 * PAGE_SIZE)?);
        // SAFETY: the register file memory lives as long as the Arc.
        let regs = unsafe { Mmio::new(regs_mem.ptr, regs_mem.layout.size(), regs_mem.clone()) };
        let cmb = if cfg.cmb_bytes > 0 {
            Some(Arc::new(RawMem::new(
                cfg.cmb_bytes.div_ceil(1 << 20) << 20,
            )?))
        } else {
            None
        };
        let mut map = BTreeMap::new();
        if let Some(c) = &cmb {
            map.insert(c.ptr.as_ptr() as u64, c.layout.size());
        }
        let ns_len = cfg.blocks as usize * cfg.block_size as usize;
        let shared = Arc::new(SimShared {
            regs,
            dma: Mutex::new(map),
            cmb,
            faults: Faults::default(),
            stop: AtomicBool::new(false),
            flr_req: AtomicU32::new(0),
            flr_done: AtomicU32::new(0),
            commands: AtomicU64::new(0),
            ns: Mutex::new(vec![0u8; ns_len]),
            irqs: Mutex::new(Vec::new()),
            interrupts: AtomicU64::new(0),
            cfg,
        });
        reset_registers(&shared);
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nvme-sim".into())
            .spawn(move || Engine::new(s2).run())
            .map_err(|e| Error::io("spawning the simulator thread", e))?;
        let platform = Arc::new(SimPlatform {
            shared: shared.clone(),
            dma: SimDma {
                shared: shared.clone(),
            },
        });
        Ok(Simulator {
            shared,
            platform,
            thread: Some(thread),
        })
    }
    /// The platform to hand to [`crate::Controller::new`].
    pub fn platform(&self) -> Arc<dyn Platform> {
        self.platform.clone()
    }
    /// Fault injection.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }
    /// Commands fetched and processed so far (admin + I/O); a completed command's CQE is
    /// in its CQ by the time it is counted.
    pub fn commands_processed(&self) -> u64 {
        self.shared.commands.load(Ordering::Acquire)
    }
    /// Read namespace bytes directly (for tests).
    pub fn namespace_bytes(&self, off: usize, len: usize) -> Vec<u8> {
        let ns = lock(&self.shared.ns);
        ns.get(off..off.saturating_add(len))
            .map(|s| s.to_vec())
            .unwrap_or_default()
    }
    /// Interrupts raised so far (eventfd signals for CQEs posted to IEN queues).
    pub fn interrupts_raised(&self) -> u64 {
        self.shared.interrupts.load(Ordering::Acquire)
    }
    /// Number of live DMA mappings (host buffers + the CMB).
    pub fn dma_mappings(&self) -> usize {
        lock(&self.shared.dma).len()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reset_registers(s: &SimShared) {
    let c = &s.cfg;
    let cap: u64 = c.mqes as u64
        | (1 << 16)
        | ((c.timeout_units as u64) << 24)
        | (((c.dstrd & 0xf) as u64) << 32)
        | (1 << 37)
        | ((s.cmb.is_some() as u64) << 57);
    let r = &s.regs;
    r.write64(reg::CAP, cap);
    r.write32(reg::VS, spec::Vs::V1_4.0);
    r.write32(reg::CC, 0);
    r.write32(reg::CSTS, 0);
    r.write64(reg::CMBMSC, 0);
    if let Some(m) = &s.cmb {
        // BIR 2, offset 0; SQS, LISTS, RDS, WDS; SZU = 2 (1 MiB).
        r.write32(reg::CMBLOC, 2);
        r.write32(
            reg::CMBSZ,
            0x1d | (2 << 8) | (((m.layout.size() >> 20) as u32) << 12),
        );
    }
    let dbs = (s.cfg.max_io_queues as usize + 1) * 2;
    for i in 0..dbs {
        r.write32(reg::DOORBELL_BASE + i * (4 << c.dstrd), 0);
    }
}

#[derive(Clone, Copy)]
struct SimSq {
    base: u64,
    size: u16,
    head: u16,
    cqid: u16,
}
#[derive(Clone, Copy)]
struct SimCq {
    base: u64,
    size: u16,
    tail: u16,
    phase: bool,
    /// Interrupt vector when IEN = 1.
    iv: Option<u16>,
}

struct Engine {
    s: Arc<SimShared>,
    enabled: bool,
    sqs: Vec<Option<SimSq>>,
    cqs: Vec<Option<SimCq>>,
    shadow: Option<(u64, u64)>,
    stuck: Vec<(u16, u16)>,
    granted: Option<u16>,
    reads: u64,
    writes: u64,
}

enum Outcome {
    Done(Status, u32),
    Pending,
}

impl Engine {
    fn new(s: Arc<SimShared>) -> Engine {
        let n = s.cfg.max_io_queues as usize + 1;
        Engine {
            s,
            enabled: false,
            sqs: vec![None; n],
            cqs: vec![None; n],
            shadow: None,
            stuck: Vec::new(),
            granted: None,
            reads: 0,
            writes: 0,
        }
    }

    fn db(&self, idx: usize) -> usize {
        reg::DOORBELL_BASE + idx * (4 << self.s.cfg.dstrd)
    }

    fn disable(&mut self) {
        self.enabled = false;
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.shadow = None;
        self.stuck.clear();
        self.granted = None;
        self.s.faults.fatal.store(false, Ordering::SeqCst);
        // A controller reset zeroes every queue's tail and head (spec: the admin queue
        // starts again at 0). The tails are read from the doorbell registers, so clear
        // them before reporting RDY = 0: a stale admin SQ tail would make the re-enabled
        // controller run the old entries before the host rings its first new one.
        for i in 0..2 * self.sqs.len() {
            self.s.regs.write32(self.db(i), 0);
        }
        self.s.regs.write32(reg::CSTS, 0);
    }

    fn run(mut self) {
        let mut idle = 0u32;
        while !self.s.stop.load(Ordering::Relaxed) {
            let req = self.s.flr_req.load(Ordering::SeqCst);
            if req != self.s.flr_done.load(Ordering::SeqCst) {
                self.disable();
                reset_registers(&self.s);
                self.s.flr_done.store(req, Ordering::SeqCst);
            }
            let s = self.s.clone();
            let regs = &s.regs;
            let cc = Cc(regs.read32(reg::CC));
            if cc.en() == 0 && (self.enabled || regs.read32(reg::CSTS) != 0) {
                self.disable();
            } else if cc.en() == 1
                && !self.enabled
                && !self.s.faults.never_ready.load(Ordering::SeqCst)
            {
                let aqa = Aqa(regs.read32(reg::AQA));
                self.sqs[0] = Some(SimSq {
                    base: regs.read64(reg::ASQ),
                    size: aqa.asqs() + 1,
                    head: 0,
                    cqid: 0,
                });
                self.cqs[0] = Some(SimCq {
                    base: regs.read64(reg::ACQ),
                    size: aqa.acqs() + 1,
                    tail: 0,
                    phase: true,
                    iv: Some(0),
                });
                self.enabled = true;
                regs.write32(reg::CSTS, 1);
            }
            let mut work = false;
            if self.enabled {
                if self.s.faults.fatal.load(Ordering::SeqCst) {
                    regs.write32(reg::CSTS, regs.read32(reg::CSTS) | 2);
                } else {
                    work = self.process();
                }
            }
            if work {
                idle = 0;
            } else if self.s.cfg.busy_poll {
                idle = idle.saturating_add(1);
                if idle > 100 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                idle = idle.saturating_add(1);
                if idle == 2000 {
                    self.publish_event_idx();
                }
                if idle > 2000 {
                    std::thread::sleep(Duration::from_micros(50));
                } else if idle > 100 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Before going to sleep, ask to be told (by MMIO) about any new submission.
    fn publish_event_idx(&mut self) {
        let Some((_, ev)) = self.shadow else { return };
        for qid in 1..self.sqs.len() {
            if let Some(sq) = self.sqs[qid] {
                self.s.dma_write_u32(
                    ev + (self.db(2 * qid) - reg::DOORBELL_BASE) as u64,
                    sq.head as u32,
                );
            }
        }
    }

    fn sq_tail(&self, qid: usize) -> u32 {
        match self.shadow {
            Some((sh, _)) if qid > 0 => self
                .s
                .dma_read_u32(sh + (self.db(2 * qid) - reg::DOORBELL_BASE) as u64)
                .unwrap_or(u32::MAX),
            _ => self.s.regs.read32(self.db(2 * qid)),
        }
    }
    fn cq_head(&self, qid: usize) -> u32 {
        match self.shadow {
            Some((sh, _)) if qid > 0 => self
                .s
                .dma_read_u32(sh + (self.db(2 * qid + 1) - reg::DOORBELL_BASE) as u64)
                .unwrap_or(u32::MAX),
            _ => self.s.regs.read32(self.db(2 * qid + 1)),
        }
    }

    fn cq_full(&self, cqid: u16) -> bool {
        match self.cqs.get(cqid as usize).copied().flatten() {
            Some(cq) => (cq.tail + 1) % cq.size == self.cq_head(cqid as usize) as u16,
            None => true,
        }
    }

    fn process(&mut self) -> bool {
        let mut work = false;
        for qid in 0..self.sqs.len() {
            let mut budget = 64;
            while budget > 0 {
                let Some(mut sq) = self.sqs[qid] else { break };
                let tail = self.sq_tail(qid);
                if tail >= sq.size as u32 || tail as u16 == sq.head || self.cq_full(sq.cqid) {
                    break;
                }
                let mut raw = [0u8; 64];
                let ok = self.s.dma_read(sq.base + sq.head as u64 * 64, &mut raw);
                sq.head = (sq.head + 1) % sq.size;
                self.sqs[qid] = Some(sq);
                budget -= 1;
                work = true;
                let sqe = Sqe::read_from_bytes(&raw).unwrap_or_default();
                let out = if !ok {
                    Outcome::Done(Status::DATA_TRANSFER_ERROR, 0)
                } else if qid == 0 {
                    match self.s.faults.take_admin_failure(sqe.opcode()) {
                        Some(st) => Outcome::Done(st, 0),
                        None => self.admin(&sqe),
                    }
                } else {
                    self.io(qid as u16, &sqe)
                };
                if let Outcome::Done(st, dw0) = out {
                    self.post(qid as u16, sqe.cid(), st, dw0);
                }
                // Counted after the completion is posted, so a waiter seeing the count can
                // reap the CQE.
                self.s.commands.fetch_add(1, Ordering::Release);
            }
        }
        work
    }

    fn post(&mut self, sqid: u16, cid: u16, st: Status, dw0: u32) {
        let Some(sq) = self.sqs.get(sqid as usize).copied().flatten() else {
            return;
        };
        let Some(mut cq) = self.cqs.get(sq.cqid as usize).copied().flatten() else {
            return;
        };
        let cqe = Cqe::new(cid, sqid, sq.head, st, cq.phase);
        let mut cqe = cqe;
        cqe.dw0 = U32::new(dw0);
        let at = cq.base + cq.tail as u64 * 16;
        let b = cqe.as_bytes();
        self.s.dma_write(at, &b[..12]);
        fence(Ordering::Release);
        let last = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        self.s.dma_write_u32(at + 12, last);
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        self.cqs[sq.cqid as usize] = Some(cq);
        // The interrupt follows the CQE (MSI-X: a posted write after the entry's).
        if let Some(iv) = cq.iv {
            if !self.s.faults.mute_interrupts.load(Ordering::SeqCst) {
                if let Some(e) = lock(&self.s.irqs).get(iv as usize) {
                    // Counted first: whoever the signal wakes sees the count.
                    self.s.interrupts.fetch_add(1, Ordering::Release);
                    e.signal();
                }
            }
        }
    }

    /// PRP list walk into (address, length) segments.
    fn prps(&self, sqe: &Sqe, len: usize) -> std::result::Result<Vec<(u64, usize)>, Status> {
        let page = PAGE_SIZE as u64;
        let prp1 = sqe.prp1.get();
        if prp1 & 3 != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        let mut segs = Vec::new();
        let first = len.min((page - (prp1 % page)) as usize);
        segs.push((prp1, first));
        let mut rest = len - first;
        if rest == 0 {
            return Ok(segs);
        }
        let prp2 = sqe.prp2.get();
        if rest <= PAGE_SIZE {
            if !prp2.is_multiple_of(page) {
                return Err(Status::INVALID_PRP_OFFSET);
            }
            segs.push((prp2, rest));
            return Ok(segs);
        }
        if prp2 & 7 != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        let mut list = prp2;
        while rest > 0 {
            let n_in_page = ((page - list % page) / 8) as usize;
            let mut entries = vec![0u8; n_in_page * 8];
            if !self.s.dma_read(list, &mut entries) {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            let mut chained = false;
            for i in 0..n_in_page {
                let e =
                    u64::from_le_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap_or_default());
                if i == n_in_page - 1 && rest > PAGE_SIZE {
                    list = e; // chain to the next list page
                    chained = true;
                    break;
                }
                if e % page != 0 {
                    return Err(Status::INVALID_PRP_OFFSET);
                }
                let l = rest.min(PAGE_SIZE);
                segs.push((e, l));
                rest -= l;
                if rest == 0 {
                    break;
                }
            }
            if !chained && rest > 0 {
                return Err(Status::INVALID_FIELD);
            }
        }
        Ok(segs)
    }

    fn copy_to_host(&self, sqe: &Sqe, data: &[u8]) -> Status {
        match self.prps(sqe, data.len()) {
            Ok(segs) => {
                let mut off = 0;
                for (a, l) in segs {
                    if !self.s.dma_write(a, &data[off..off + l]) {
                        return Status::DATA_TRANSFER_ERROR;
                    }
                    off += l;
                }
                Status::SUCCESS
            }
            Err(st) => st,
        }
    }

    fn copy_from_host(&self, sqe: &Sqe, data: &mut [u8]) -> Status {
        match self.prps(sqe, data.len()) {
            Ok(segs) => {
                let mut off = 0;
                for (a, l) in segs {
                    if !self.s.dma_read(a, &mut data[off..off + l]) {
                        return Status::DATA_TRANSFER_ERROR;
                    }
                    off += l;
                }
                Status::SUCCESS
            }
            Err(st) => st,
        }
    }

    fn identify_controller(&self) -> IdentifyController {
        let c = &self.s.cfg;
        let mut id = IdentifyController::zeroed();
        id.vid = U16::new(0x1b36);
        id.ssvid = U16::new(0x1af4);
        spec::set_ascii_field(&mut id.sn, "SIM0001");
        spec::set_ascii_field(&mut id.mn, "nvmf-p2p simulated controller");
        spec::set_ascii_field(&mut id.fr, "1.0");
        id.mdts = c.mdts;
        id.cntlid = U16::new(1);
        id.ver = U32::new(spec::Vs::V1_4.0);
        id.cntrltype = 1;
        id.oacs = U16::new(if c.shadow_doorbells {
            spec::oacs::DOORBELL_BUFFER_CONFIG
        } else {
            0
        });
        id.acl = 3;
        id.aerl = 3;
        id.lpa = 0x2;
        id.elpe = 3;
        id.sqes = 0x66;
        id.cqes = 0x44;
        id.maxcmd = U16::new(c.mqes);
        id.nn = U32::new(1);
        id.oncs = U16::new(spec::oncs::DSM | spec::oncs::WRITE_ZEROES);
        id.vwc = 1;
        let nqn = b"nqn.2026-11.io.nvmf-p2p:sim";
        id.subnqn[..nqn.len()].copy_from_slice(nqn);
        id
    }

    fn identify_namespace(&self) -> IdentifyNamespace {
        let c = &self.s.cfg;
        let mut ns = IdentifyNamespace::zeroed();
        ns.nsze = U64::new(c.blocks);
        ns.ncap = U64::new(c.blocks);
        ns.nuse = U64::new(c.blocks);
        ns.nlbaf = 1;
        ns.lbaf[0] = LbaFormat::new(9, 0);
        ns.lbaf[1] = LbaFormat::new(12, 0);
        ns.flbas = if c.block_size == 4096 { 1 } else { 0 };
        ns.dlfeat = 1;
        ns.nguid = [0x5a; 16];
        ns
    }

    fn admin(&mut self, sqe: &Sqe) -> Outcome {
        let cdw10 = sqe.cdw10.get();
        let maxq = self.s.cfg.max_io_queues;
        let st = match sqe.opcode() {
            admin_opc::IDENTIFY => {
                let page: Vec<u8> = match cdw10 as u8 {
                    cns::CONTROLLER => self.identify_controller().as_bytes().to_vec(),
                    cns::NAMESPACE if sqe.nsid.get() == 1 => {
                        self.identify_namespace().as_bytes().to_vec()
                    }
                    cns::NAMESPACE => return Outcome::Done(Status::INVALID_NAMESPACE, 0),
                    cns::ACTIVE_NS_LIST => {
                        let mut v = vec![0u8; PAGE_SIZE];
                        if sqe.nsid.get() < 1 {
                            v[0] = 1;
                        }
                        v
                    }
                    cns::NS_ID_DESCRIPTORS if sqe.nsid.get() == 1 => {
                        spec::build_ns_id_descriptors(&[
                            NsIdDescriptor {
                                nidt: nidt::NGUID,
                                nid: vec![0x5a; 16],
                            },
                            NsIdDescriptor {
                                nidt: nidt::CSI,
                                nid: vec![0],
                            },
                        ])
                        .to_vec()
                    }
                    _ => return Outcome::Done(Status::INVALID_FIELD, 0),
                };
                self.copy_to_host(sqe, &page)
            }
            admin_opc::SET_FEATURES | admin_opc::GET_FEATURES => {
                let fid = cdw10 as u8;
                if fid == feat::NUM_QUEUES {
                    if sqe.opcode() == admin_opc::SET_FEATURES {
                        let d = sqe.cdw11.get();
                        if d & 0xffff == 0xffff || d >> 16 == 0xffff {
                            return Outcome::Done(Status::INVALID_FIELD, 0);
                        }
                        self.granted = Some(maxq);
                    }
                    let g = (self.granted.unwrap_or(maxq) - 1) as u32;
                    return Outcome::Done(Status::SUCCESS, g | (g << 16));
                }
                if fid == feat::VOLATILE_WRITE_CACHE {
                    return Outcome::Done(Status::SUCCESS, 1);
                }
                Status::SUCCESS
            }
            admin_opc::CREATE_IO_CQ => {
                let qid = cdw10 as u16;
                let size = (cdw10 >> 16) + 1;
                if qid == 0 || qid > maxq || self.cqs[qid as usize].is_some() {
                    Status::INVALID_QUEUE_ID
                } else if size < 2 || size > self.s.cfg.mqes as u32 + 1 {
                    Status::INVALID_QUEUE_SIZE
                } else if sqe.cdw11.get() & 1 == 0
                    || !sqe.prp1.get().is_multiple_of(PAGE_SIZE as u64)
                {
                    Status::INVALID_FIELD
                } else if sqe.cdw11.get() & 2 != 0
                    && (sqe.cdw11.get() >> 16) as u16 >= self.s.cfg.msix_vectors
                {
                    Status::INVALID_INTERRUPT_VECTOR
                } else {
                    let ien = sqe.cdw11.get() & 2 != 0;
                    self.cqs[qid as usize] = Some(SimCq {
                        base: sqe.prp1.get(),
                        size: size as u16,
                        tail: 0,
                        phase: true,
                        iv: ien.then_some((sqe.cdw11.get() >> 16) as u16),
                    });
                    Status::SUCCESS
                }
            }
            admin_opc::CREATE_IO_SQ => {
                let qid = cdw10 as u16;
                let size = (cdw10 >> 16) + 1;
                let cqid = (sqe.cdw11.get() >> 16) as u16;
                if qid == 0 || qid > maxq || self.sqs[qid as usize].is_some() {
                    Status::INVALID_QUEUE_ID
                } else if size < 2 || size > self.s.cfg.mqes as u32 + 1 {
                    Status::INVALID_QUEUE_SIZE
                } else if cqid == 0 || cqid > maxq || self.cqs[cqid as usize].is_none() {
                    Status::INVALID_CQ
                } else if sqe.cdw11.get() & 1 == 0
                    || !sqe.prp1.get().is_multiple_of(PAGE_SIZE as u64)
                {
                    Status::INVALID_FIELD
                } else {
                    self.sqs[qid as usize] = Some(SimSq {
                        base: sqe.prp1.get(),
                        size: size as u16,
                        head: 0,
                        cqid,
                    });
                    Status::SUCCESS
                }
            }
            admin_opc::DELETE_IO_SQ => {
                let qid = cdw10 as u16;
                if qid == 0 || qid > maxq || self.sqs[qid as usize].is_none() {
                    Status::INVALID_QUEUE_ID
                } else {
                    self.sqs[qid as usize] = None;
                    self.stuck.retain(|&(q, _)| q != qid);
                    Status::SUCCESS
                }
            }
            admin_opc::DELETE_IO_CQ => {
                let qid = cdw10 as u16;
                if qid == 0 || qid > maxq || self.cqs[qid as usize].is_none() {
                    Status::INVALID_QUEUE_ID
                } else if self.sqs.iter().flatten().any(|s| s.cqid == qid) {
                    Status::INVALID_QUEUE_DELETION
                } else {
                    self.cqs[qid as usize] = None;
                    Status::SUCCESS
                }
            }
            admin_opc::GET_LOG_PAGE => {
                let numd = ((cdw10 >> 16) | (sqe.cdw11.get() << 16)) as usize + 1;
                let len = numd * 4;
                let mut v = vec![0u8; len.min(2 * PAGE_SIZE)];
                match cdw10 as u8 {
                    log::ERROR => {
                        // One entry, so a target passing the log through shows it.
                        let e = spec::ErrorLogEntry {
                            error_count: SIM_ERROR_COUNT.into(),
                            sqid: U16::new(1),
                            cid: U16::new(7),
                            status: U16::new(Status::LBA_OUT_OF_RANGE.to_field_with_phase(false)),
                            parameter_error_location: U16::new(0xffff),
                            lba: 0x1234u64.into(),
                            nsid: 1u32.into(),
                            ..Default::default()
                        };
                        let b = e.as_bytes();
                        let n = b.len().min(v.len());
                        v[..n].copy_from_slice(&b[..n]);
                    }
                    log::SMART => {
                        let mut sl = spec::SmartLog::zeroed();
                        sl.temperature = U16::new(SIM_TEMPERATURE_KELVIN);
                        sl.temp_sensor[0] = U16::new(SIM_TEMPERATURE_KELVIN);
                        sl.avail_spare = 97;
                        sl.spare_thresh = 10;
                        sl.power_on_hours = 42u128.into();
                        sl.num_error_log_entries = u128::from(SIM_ERROR_COUNT).into();
                        sl.host_read_commands = (self.reads as u128).into();
                        sl.host_write_commands = (self.writes as u128).into();
                        let b = sl.as_bytes();
                        let n = b.len().min(v.len());
                        v[..n].copy_from_slice(&b[..n]);
                    }
                    _ => return Outcome::Done(Status::INVALID_LOG_PAGE, 0),
                }
                self.copy_to_host(sqe, &v)
            }
            admin_opc::ABORT => {
                let sqid = cdw10 as u16;
                let cid = (cdw10 >> 16) as u16;
                if self.s.faults.ignore_abort.load(Ordering::SeqCst) {
                    return Outcome::Done(Status::SUCCESS, 1);
                }
                if let Some(pos) = self.stuck.iter().position(|&e| e == (sqid, cid)) {
                    self.stuck.remove(pos);
                    self.post(sqid, cid, Status::ABORT_REQUESTED, 0);
                    return Outcome::Done(Status::SUCCESS, 0);
                }
                return Outcome::Done(Status::SUCCESS, 1);
            }
            admin_opc::DOORBELL_BUFFER_CONFIG => {
                let (a, b) = (sqe.prp1.get(), sqe.prp2.get());
                if !self.s.cfg.shadow_doorbells {
                    Status::INVALID_OPCODE
                } else if a % PAGE_SIZE as u64 != 0 || b % PAGE_SIZE as u64 != 0 || a == 0 || b == 0
                {
                    Status::INVALID_FIELD
                } else {
                    self.shadow = Some((a, b));
                    Status::SUCCESS
                }
            }
            admin_opc::KEEP_ALIVE => Status::SUCCESS,
            admin_opc::ASYNC_EVENT_REQUEST => return Outcome::Pending,
            _ => Status::INVALID_OPCODE,
        };
        Outcome::Done(st, 0)
    }

    fn io(&mut self, qid: u16, sqe: &Sqe) -> Outcome {
        let f = &self.s.faults;
        if f.stall.load(Ordering::SeqCst) > 0 {
            f.stall.fetch_sub(1, Ordering::SeqCst);
            self.stuck.push((qid, sqe.cid()));
            return Outcome::Pending;
        }
        if f.fail.load(Ordering::SeqCst) > 0 {
            f.fail.fetch_sub(1, Ordering::SeqCst);
            return Outcome::Done(Status(f.fail_status.load(Ordering::SeqCst)), 0);
        }
        let nsid = sqe.nsid.get();
        let opc = sqe.opcode();
        if opc == io_opc::FLUSH && (nsid == 1 || nsid == u32::MAX) {
            return Outcome::Done(Status::SUCCESS, 0);
        }
        if nsid != 1 {
            return Outcome::Done(Status::INVALID_NAMESPACE, 0);
        }
        let bs = self.s.cfg.block_size as usize;
        let blocks = self.s.cfg.blocks;
        let slba = sqe.slba();
        let nlb = sqe.nlb0() as u64 + 1;
        let in_range = |slba: u64, nlb: u64| slba.checked_add(nlb).is_some_and(|e| e <= blocks);
        let st = match opc {
            io_opc::READ | io_opc::WRITE => {
                let len = nlb as usize * bs;
                let mdts = self.s.cfg.mdts;
                if mdts != 0 && len > PAGE_SIZE << mdts {
                    Status::INVALID_FIELD
                } else if !in_range(slba, nlb) {
                    Status::LBA_OUT_OF_RANGE
                } else {
                    let off = slba as usize * bs;
                    let s2 = self.s.clone();
                    let mut ns = lock(&s2.ns);
                    let data = &mut ns[off..off + len];
                    if opc == io_opc::READ {
                        self.reads += 1;
                        self.copy_to_host(sqe, data)
                    } else {
                        self.writes += 1;
                        self.copy_from_host(sqe, data)
                    }
                }
            }
            io_opc::WRITE_ZEROES => {
                if !in_range(slba, nlb) {
                    Status::LBA_OUT_OF_RANGE
                } else {
                    let off = slba as usize * bs;
                    lock(&self.s.ns)[off..off + nlb as usize * bs].fill(0);
                    Status::SUCCESS
                }
            }
            io_opc::DATASET_MANAGEMENT => {
                let nr = (sqe.cdw10.get() & 0xff) as usize + 1;
                let mut raw = vec![0u8; nr * 16];
                let st = self.copy_from_host(sqe, &mut raw);
                if !st.is_success() {
                    st
                } else {
                    let ranges: Vec<spec::DsmRange> = raw
                        .chunks(16)
                        .filter_map(|c| spec::DsmRange::read_from_bytes(c).ok())
                        .collect();
                    if ranges
                        .iter()
                        .any(|r| !in_range(r.slba.get(), r.nlb.get() as u64))
                    {
                        Status::LBA_OUT_OF_RANGE
                    } else {
                        if sqe.cdw11.get() & spec::dsm::DEALLOCATE != 0 {
                            let mut ns = lock(&self.s.ns);
                            for r in ranges {
                                let off = r.slba.get() as usize * bs;
                                ns[off..off + r.nlb.get() as usize * bs].fill(0);
                            }
                        }
                        Status::SUCCESS
                    }
                }
            }
            _ => Status::INVALID_OPCODE,
        };
        Outcome::Done(st, 0)
    }
}
